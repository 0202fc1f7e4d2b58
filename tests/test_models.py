"""Model cache: a checkpoint air_ray converted gets one copy per load dtype (issue #7: load-time memory)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tests.conftest import tiny_checkpoint


@pytest.fixture
def home_model(tmp_path, monkeypatch, smol_ref, smol_tok):
    """A tiny float32 checkpoint placed in a fresh $AIR_RAY_HOME/models as if air_ray had converted it."""
    from air_ray.models import ModelRef, fingerprint

    home = tmp_path / "home"
    monkeypatch.setenv("AIR_RAY_HOME", str(home))
    d = home / "models" / "tiny"
    d.mkdir(parents=True)
    tiny_checkpoint(d, smol_ref, smol_tok)
    (d / ".complete").write_text("{}")
    return ModelRef(name="tiny", path=d, fingerprint=fingerprint(d))


def tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as g:
            out.update({k: g.get_tensor(k) for k in g.keys()})
    return out


def test_cast_copy_made_once_and_equal(home_model):
    from air_ray.models import load_model, weights_dir

    ref = home_model
    assert weights_dir(ref, "float32") == ref.path
    cast = weights_dir(ref, "bfloat16")
    assert cast == ref.path.with_name("tiny@bfloat16")
    src, got = tensors(ref.path), tensors(cast)
    assert got.keys() == src.keys()
    for k, v in src.items():
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v.to(torch.bfloat16)), k
    assert json.loads((cast / ".complete").read_text())["fingerprint"] == ref.fingerprint
    stamp = (cast / ".complete").stat().st_mtime_ns
    assert weights_dir(ref, "bfloat16") == cast and (cast / ".complete").stat().st_mtime_ns == stamp  # reused

    model = load_model(ref, dtype="bfloat16", device="cpu")
    plain = load_model(ref, dtype="float32", device="cpu")
    for (k, a), (_, b) in zip(model.state_dict().items(), plain.state_dict().items()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b.to(torch.bfloat16)), k


def test_cast_copy_remade_when_the_source_changes(home_model):
    from air_ray.models import ModelRef, weights_dir

    ref = home_model
    cast = weights_dir(ref, "bfloat16")
    changed = ModelRef(name=ref.name, path=ref.path, fingerprint="0" * 16)
    assert weights_dir(changed, "bfloat16") == cast
    assert json.loads((cast / ".complete").read_text())["fingerprint"] == "0" * 16
    assert not [p for p in cast.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_own_checkpoint_loaded_as_is(tmp_path, monkeypatch, smol_ref, smol_tok):
    from air_ray.models import prepare_model, weights_dir

    monkeypatch.setenv("AIR_RAY_HOME", str(tmp_path / "home"))
    d = tmp_path / "mine"
    d.mkdir()
    tiny_checkpoint(d, smol_ref, smol_tok)
    ref = prepare_model(str(d))
    assert weights_dir(ref, "bfloat16") == ref.path
    assert not (tmp_path / "home" / "models").exists()


def test_export_ablated_zeroes_only_the_heads_query_rows(home_model):
    """The vLLM backend's reference model: the base weights with the heads' q_proj rows zeroed, made once per
    (fingerprint, heads, dtype), with the tokenizer beside it."""
    from air_ray.engine.ablation import zero_query_rows
    from air_ray.models import load_model
    from air_ray.engine.backends.vllm import export_ablated

    ref, heads = home_model, [(1, 0), (1, 3), (0, 2)]
    out = export_ablated(ref, heads, "float32")
    assert out.parent.name == "ablated" and out.name.startswith(ref.fingerprint)
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()
    model = load_model(ref, dtype="float32", device="cpu")
    zero_query_rows(model, heads)
    want = model.state_dict()
    got = tensors(out)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    q = got["model.layers.1.self_attn.q_proj.weight"]
    assert not q[0:head_dim].any() and not q[3 * head_dim : 4 * head_dim].any() and q[head_dim : 3 * head_dim].all()
    assert got["model.layers.1.self_attn.k_proj.weight"].all()  # GQA: k/v rows are shared, never touched
    stamp = (out / ".complete").stat().st_mtime_ns
    assert export_ablated(ref, heads[::-1], "float32") == out and (out / ".complete").stat().st_mtime_ns == stamp
    other = export_ablated(ref, heads[:1], "bfloat16")
    assert other != out and tensors(other)["model.layers.1.self_attn.q_proj.weight"].dtype == torch.bfloat16
