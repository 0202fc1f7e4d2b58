"""The Scorer's API: options object or keyword arguments, a backend from the table, close() and `with`, and the
scoring stage releasing its scorer when its worker ends. A tiny real checkpoint (fast); no Ray."""

from __future__ import annotations

import pytest

from air_ray.errors import AirRayError

ROWS = [{"id": "a", "prompt": "What is 2 + 3?", "response": "2 + 3 = 5.\nThe answer is 5."},
        {"id": "b", "prompt": "Name a colour.", "response": "Blue."}]


def test_public_import():
    from air_ray import Scorer
    from air_ray.engine.scorer import Scorer as S

    assert Scorer is S


def test_backend_table_matches_the_choices():
    from air_ray.config import BACKENDS
    from air_ray.engine.backends import TABLE

    assert tuple(TABLE) == BACKENDS


@pytest.mark.slow
def test_options_object_and_keywords_give_the_same_scores(tiny_model):
    from air_ray import Scorer
    from air_ray.config import EngineOptions, ScoreConfig

    model_dir, heads = tiny_model
    kw = dict(model=str(model_dir), heads=str(heads), dtype="float32", device="cpu")
    with Scorer(**kw) as a:
        by_kw = a.score(ROWS)
    with Scorer(EngineOptions(**kw)) as b:
        by_opts = b.score(ROWS)
    with Scorer(ScoreConfig(input=["x"], **kw), batch_tokens=16) as c:  # a pipeline config, one option changed
        by_cfg = c.score(ROWS)
        assert c.options.batch_tokens == 16
    assert by_kw == by_opts == by_cfg
    with pytest.raises(AirRayError, match="--dtype 'fp8'"):
        Scorer(dtype="fp8", **{k: v for k, v in kw.items() if k != "dtype"})


@pytest.mark.slow
def test_with_closes_the_backend(tiny_model):
    import gc
    import weakref

    from air_ray import Scorer

    model_dir, heads = tiny_model
    with Scorer(model=str(model_dir), heads=str(heads), dtype="float32", device="cpu") as s:
        assert s.backend is not None and s.model is not None
        model = weakref.ref(s.model)
        s.score(ROWS[:1])
    assert s.backend is None and s.model is None
    gc.collect()
    assert model() is None  # nothing holds the weights any more
    with pytest.raises(AirRayError, match="closed"):
        s.token_losses([])
    s.close()  # idempotent


@pytest.mark.slow
def test_score_stage_teardown_closes_its_scorer(tiny_model, tmp_path):
    from air_ray.config import ScoreConfig
    from air_ray.store.heads import load_heads
    from air_ray.pipeline.runner import _ScoreActor
    from air_ray.pipeline.stages import ScoreStage

    model_dir, heads = tiny_model
    cfg = ScoreConfig(model=str(model_dir), heads=str(heads), input=["x"], output=str(tmp_path), dtype="float32",
                      device="cpu", gpus_per_worker=0)
    actor = _ScoreActor(ScoreStage, cfg, load_heads(str(heads)))  # as Ray Data builds it in the actor
    stage = actor.stage
    assert stage.scorer.backend is not None
    del actor  # Ray Data drops the callable when the actor exits gracefully
    assert stage.scorer is None
