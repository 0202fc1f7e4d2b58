"""Keys that follow the numbers (issue #27): the scoring key hashes SCORING_VERSION and the dtype resolved on the
device that scores, not the package version; runs written before that (keys of air_ray 0.1.0: the package version
and the dtype option as given) are recognised where their files record the same numbers, and scored again, with a
line saying why, where they do not. The runs on disk are real (the real loader, a real tiny checkpoint, real
Parquet and commit markers, no Ray)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from air_ray.config import EngineOptions, RescoreConfig, ScoreConfig
from air_ray.config import commands

REPO = Path(__file__).resolve().parents[1]
HEADS = [(17, 3), (2, 5)]


def test_a_package_release_leaves_the_key_alone(monkeypatch):
    import air_ray

    opts = EngineOptions().validate()
    key = opts.scoring_key("0123456789abcdef", HEADS, "float32")
    monkeypatch.setattr(air_ray, "__version__", "9.9.9")
    assert opts.scoring_key("0123456789abcdef", HEADS, "float32") == key
    monkeypatch.setattr(commands, "SCORING_VERSION", commands.SCORING_VERSION + 1)  # a change of the numbers
    assert opts.scoring_key("0123456789abcdef", HEADS, "float32") != key
    assert opts.legacy_keys("0123456789abcdef", HEADS) == {}  # 0.1.0's numbers are no longer this version's


def test_the_key_names_the_resolved_dtype():
    from air_ray.models import resolve_dtype

    auto, f32, bf16 = (EngineOptions(dtype=d).validate() for d in ("auto", "float32", "bfloat16"))
    # auto on a CPU without native bf16 is float32: the same key as asking for float32
    on_cpu = resolve_dtype("auto", "cpu", cpu_bf16=False)
    assert on_cpu == "float32"
    assert auto.scoring_key("fp", HEADS, on_cpu) == f32.scoring_key("fp", HEADS) == f32.scoring_key("fp", HEADS, "float32")
    # ... and on CUDA (or a CPU with native bf16) bfloat16, which is another key
    assert resolve_dtype("auto", "cuda") == resolve_dtype("auto", "cpu", cpu_bf16=True) == "bfloat16"
    assert auto.scoring_key("fp", HEADS, "bfloat16") == bf16.scoring_key("fp", HEADS) != f32.scoring_key("fp", HEADS)
    with pytest.raises(ValueError, match="resolved"):  # auto is not a dtype
        auto.scoring_key("fp", HEADS)


def test_this_machine_resolves_auto_where_it_scores():
    """With no cluster to join, auto is resolved for this machine's device (the CPU here, unless it has a GPU)."""
    from air_ray.models import resolve_dtype
    from air_ray.pipeline.runner import scoring_dtype

    cfg = ScoreConfig(input=["x.jsonl"], device="cpu", executor="in-process").validate()
    assert scoring_dtype(cfg)[0] == resolve_dtype("auto", "cpu")
    assert scoring_dtype(cfg.replace(dtype="float32")) == ("float32", "--dtype as given")
    assert scoring_dtype(cfg.replace(device="cuda:1"))[0] == "bfloat16"  # the workers' device, not this one's


def test_legacy_keys_are_the_keys_air_ray_0_1_0_wrote():
    """The values were computed by air_ray 0.1.0's own `EngineOptions.scoring_key` (main before issue #27, the
    same arguments): a run it wrote is found under them."""
    fp = "0123456789abcdef"
    cases = [({}, "ef68c9a3f6d6"), ({"dtype": "float32"}, "ebcfddca1ae2"),
             ({"dtype": "bfloat16", "steps": "paragraphs", "base_loss_floor": 0.05, "prompt_field": "q"},
              "7488afa63c89")]
    for options, key in cases:  # 0.1.0 weighted steps by softmax: the rule that keeps its keys
        opts = EngineOptions(**options, step_weighting="softmax").validate()
        assert opts.scoring_key(fp, HEADS, legacy="0.1.0") == key, options
    # 0.1.0's numbers are scoring version 1, not this one (rows are read differently since version 2): its runs are
    # not taken as this version's, whatever the options
    assert commands.LEGACY_KEY_RELEASES == {"0.1.0": 1} and commands.SCORING_VERSION > 1
    assert EngineOptions(step_weighting="softmax").validate().legacy_keys(fp, HEADS) == {}


@pytest.fixture
def same_numbers(monkeypatch):
    """The runs below test the mechanism that keeps the runs of a release whose numbers are this version's (it kept
    0.1.0's under scoring version 1): as if 0.1.0's numbers were this version's."""
    monkeypatch.setattr(commands, "LEGACY_KEY_RELEASES", {"0.1.0": commands.SCORING_VERSION})


def test_the_changelog_names_the_scoring_version():
    text = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    versions = [int(v) for v in re.findall(r"^- \*\*(\d+)\*\*", text, flags=re.M)]
    assert versions and max(versions) == commands.SCORING_VERSION, versions


# ----------------------------------------------------------------------------------------------
# runs on disk


def _corpus(tmp: Path, rows: list[dict]) -> list[Path]:
    files = []
    for i in range(2):
        f = tmp / "corpus" / f"part{i}.jsonl"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("".join(json.dumps(r) + "\n" for r in rows[4 * i:4 * i + 4]), encoding="utf-8")
        files.append(f)
    return files


def _as_written_by(release: str, run: Path, cfg: ScoreConfig, fingerprint: str, heads) -> None:
    """Make ``run`` what ``release`` left: its commit markers under that release's unit keys (its scoring key of
    ``cfg``, the same input records, no duplicates), and files without the scoring version."""
    from air_ray.data.corpus import read_chunks
    from air_ray.pipeline.stages import unit_key

    legacy = cfg.legacy_keys(fingerprint, heads)[release]
    n = 0
    for f in cfg.input:
        for chunk in read_chunks(f, cfg.rows_per_partition):
            marker = run / "_commits" / f"{chunk.unit}.json"
            doc = json.loads(marker.read_text())
            doc["key"] = unit_key(legacy, chunk, [])
            marker.write_text(json.dumps(doc))
            n += 1
    assert n == len(list((run / "_commits").glob("*.json"))) == 4


def _dtypes(run: Path) -> set[str]:
    return {json.loads(pq.read_schema(p).metadata[b"air_ray"])["dtype"] for p in (run / "scores").glob("*.parquet")}


def _markers(run: Path) -> dict[str, str]:
    return {p.stem: json.loads(p.read_text())["key"] for p in (run / "_commits").glob("*.json")}


@pytest.fixture(scope="module")
def setting(tiny_model, gsm8k_rows, tmp_path_factory):
    from air_ray.store.heads import load_heads
    from air_ray.models import prepare_model, resolve_dtype

    model, heads = tiny_model
    tmp = tmp_path_factory.mktemp("keys")
    files = _corpus(tmp, gsm8k_rows[:8])
    here = resolve_dtype("auto", "cpu")
    return {"model": str(model), "heads": str(heads), "files": [str(f) for f in files], "tmp": tmp,
            "fingerprint": prepare_model(str(model)).fingerprint,
            "critical": load_heads(str(heads))["heads"], "here": here,
            "other": "float32" if here == "bfloat16" else "bfloat16"}


def _score_cfg(s: dict, output: Path, cls=ScoreConfig, **kw) -> ScoreConfig:
    """A score (or rescore) config of the setting: the tiny model, 2 rows a partition, in this process."""
    return cls(model=s["model"], heads=s["heads"], input=s["files"], output=str(output), device="cpu",
               rows_per_partition=2, executor="in-process", step_weighting="softmax", **kw).validate()


@pytest.mark.slow
def test_a_score_run_of_air_ray_0_1_0_is_kept_or_rescored(setting, capsys, same_numbers):
    from air_ray.pipeline.score import run_score

    s = setting
    out = s["tmp"] / "run"
    auto = _score_cfg(s, out)
    first = run_score(auto)
    # auto is resolved on the device that scores: the key of the explicit dtype, the numbers of it
    explicit = run_score(_score_cfg(s, s["tmp"] / "explicit", dtype=s["here"]))
    assert first.scoring_key == explicit.scoring_key == auto.scoring_key(s["fingerprint"], s["critical"],
                                                                                s["here"])
    assert _dtypes(out) == {s["here"]}

    # the same run as air_ray 0.1.0 left it: every partition is kept (its file records this run's dtype), re-keyed
    _as_written_by("0.1.0", out, auto, s["fingerprint"], s["critical"])
    old = _markers(out)
    capsys.readouterr()
    again = run_score(_score_cfg(s, out))
    said = capsys.readouterr().out
    assert again.this_run == {"units": 4, "units_skipped": 4, "rows_read": 0, "rows_scored": 0, "rows_rejected": 0,
                              "score_stage_s": 0, "engine_s": 0}  # nothing scored: no time in the stage or model
    assert "4 partitions were committed under the scoring key of air_ray 0.1.0" in said
    assert f"4 recorded dtype {s['here']}, this run's: kept" in said and "scored again" not in said
    assert _markers(out) == _markers(s["tmp"] / "explicit") != old  # now under the current keys
    assert again.counts == first.counts
    run_score(_score_cfg(s, out))  # and from then on found as any committed partition
    assert "air_ray 0.1.0" not in capsys.readouterr().out

    # a run 0.1.0 scored under dtype auto on a machine where auto meant the other dtype: the old key is the same,
    # the numbers are not, so every partition is scored again, and the run says why
    other = s["tmp"] / "other"
    run_score(_score_cfg(s, other, dtype=s["other"]))
    _as_written_by("0.1.0", other, auto, s["fingerprint"], s["critical"])
    capsys.readouterr()
    redone = run_score(_score_cfg(s, other))
    said = capsys.readouterr().out
    assert redone.this_run["rows_scored"] == 8 and redone.this_run["units_skipped"] == 0
    assert f"0 recorded dtype {s['here']}, this run's: kept; 4 recorded dtype {s['other']}: scored again" in said
    assert _dtypes(other) == {s["here"]}


def _rescore_cfg(s: dict, output: Path, **kw) -> RescoreConfig:
    return _score_cfg(s, output, RescoreConfig, select={"top_frac": 0.5}, **kw)


@pytest.mark.slow
def test_a_rescore_version_of_air_ray_0_1_0_is_continued_or_replaced(setting, capsys, same_numbers):
    from air_ray.pipeline.rescore import run_rescore

    s = setting
    out = s["tmp"] / "air"
    auto = _rescore_cfg(s, out)
    new = run_rescore(auto)
    legacy = auto.legacy_keys(s["fingerprint"], s["critical"])["0.1.0"]
    assert new["version"] == auto.scoring_key(s["fingerprint"], s["critical"], s["here"]) != legacy
    # the version as 0.1.0 left it: named by its key, markers under its unit keys
    (out / f"v={new['version']}").rename(out / f"v={legacy}")
    _as_written_by("0.1.0", out / f"v={legacy}", auto, s["fingerprint"], s["critical"])
    capsys.readouterr()
    s2 = run_rescore(auto)
    said = capsys.readouterr().out
    assert s2["version"] == legacy and (s2["files_unchanged"], s2["rows_scored"], s2["rows_total"]) == (2, 0, 8)
    assert f"v={legacy} was scored by air_ray 0.1.0 (--dtype auto)" in said
    assert f"record dtype {s['here']}, this run's: continuing it as version {new['version']}" in said
    assert not (out / f"v={new['version']}").exists()
    assert json.loads((out / f"v={legacy}" / "_scoring_key.json").read_text())["scoring_key"] == new["version"]
    s3 = run_rescore(auto)  # remembered: no second look at the partitions, nothing to say
    assert s3["version"] == legacy and s3["rows_scored"] == 0 and "0.1.0" not in capsys.readouterr().out

    # a version 0.1.0 scored under auto where auto meant the other dtype: a new version, scored in full
    out2 = s["tmp"] / "air2"
    made = run_rescore(_rescore_cfg(s, out2, dtype=s["other"]))
    shutil.move(str(out2 / f"v={made['version']}"), str(out2 / f"v={legacy}"))
    capsys.readouterr()
    s4 = run_rescore(_rescore_cfg(s, out2))
    said = capsys.readouterr().out
    assert s4["version"] == new["version"] and (s4["files_new"], s4["rows_scored"]) == (2, 8)
    assert f"record dtype {s['other']}, this run scores {s['here']}: a new version v={new['version']}, every " \
           "input file scored again" in said
    assert _dtypes(out2 / f"v={legacy}") == {s["other"]} and _dtypes(out2 / f"v={new['version']}") == {s["here"]}
