"""Shared fixtures: the real default model (loaded once per session, float32, CPU) and an independent
reference attention that disables heads explicitly (uniform 1/N attention rows over the keys each query sees),
used to check the ablation and the scorer against a plain implementation."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    """Tests marked ``vllm`` need the vLLM backend installed (`make vllm`; `make test` does it and sets
    AIR_RAY_REQUIRE_VLLM=1, so there a missing vLLM fails instead of skipping)."""
    import importlib.util
    import os

    if importlib.util.find_spec("vllm") is not None or os.environ.get("AIR_RAY_REQUIRE_VLLM") == "1":
        return
    skip = pytest.mark.skip(reason="vLLM is not installed (make vllm)")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)
GSM8K_SAMPLE = REPO / "data" / "gsm8k_sample" / "train_sample.jsonl"


@pytest.fixture(scope="session")
def smol_ref():
    from air_ray.models import prepare_model

    return prepare_model("smollm2-135m")


@pytest.fixture(scope="session")
def smol_tok(smol_ref):
    from air_ray.models import load_tokenizer

    return load_tokenizer(smol_ref)


@pytest.fixture(scope="session")
def smol_fp32(smol_ref):
    """The default model, float32 on CPU, SDPA attention (as air_ray loads it). Tests that change it in place
    (HeadAblation, attention implementation) must restore it."""
    from air_ray.models import load_model

    return load_model(smol_ref, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def gsm8k_rows():
    with open(GSM8K_SAMPLE, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------
# the independent reference: explicit eager attention with disabled heads' rows written as 1/i

_names = itertools.count()


def make_uniform_attention(heads):
    """An eager attention function in which every (layer, head) in ``heads`` attends uniformly (exactly
    1/N, N = number of keys the mask lets the query see: causal prefix, sliding window, padding; sinks ignored);
    every other head is the plain written-out attention: softmax(QK^T * scaling, soft-capped when the model
    passes ``softcap``, masked, with the sink logit ``s_aux`` in the denominator when the model passes one) V.
    Shapes: query [b, H, q, d]; key [b, KV, k, d]; value [b, KV, k, d_v]."""
    import torch

    heads = frozenset((int(l), int(h)) for l, h in heads)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, s_aux=None,
                  **kwargs):
        b, H, q_len, d = query.shape
        rep = H // key.shape[1]
        k = key.repeat_interleave(rep, dim=1)  # query head h reads kv head h // rep
        v = value.repeat_interleave(rep, dim=1)
        if scaling is None:
            scaling = d ** -0.5
        scores = torch.matmul(query.float(), k.float().transpose(2, 3)) * scaling  # [b, H, q, k]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        k_len = scores.shape[-1]
        if attention_mask is None:
            visible = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
            visible = visible[None, None].expand(b, 1, q_len, k_len)
        elif attention_mask.dtype == torch.bool:
            visible = attention_mask[:, :, :, :k_len]
        else:  # eager float mask: 0 where visible, a very negative number elsewhere
            visible = attention_mask[:, :, :, :k_len] == 0
        scores = scores.masked_fill(~visible, float("-inf"))
        if s_aux is None:
            probs = scores.softmax(-1)
        else:  # a sink per head: one more logit in the softmax, dropped after it
            sink = s_aux.float().reshape(1, H, 1, 1).expand(b, H, q_len, 1)
            probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
        probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows (none with right padding)
        uniform = visible[:, 0].float() / visible[:, 0].sum(-1, keepdim=True).clamp(min=1).float()  # [b, q, k]
        for h in range(H):
            if (module.layer_idx, h) in heads:
                probs[:, h] = uniform
        out = torch.matmul(probs.to(v.dtype), v)  # [b, H, q, d_v]
        return out.transpose(1, 2).contiguous(), probs

    return attention


def register_uniform_attention(heads) -> str:
    """Register the reference attention for ``heads`` under a fresh name; pass it as attn_implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    name = f"test_uniform_ablation_{next(_names)}"
    AttentionInterface.register(name, make_uniform_attention(heads))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, eager_mask)
    return name


@pytest.fixture(scope="session")
def uniform_attention():
    """``uniform_attention(heads) -> attn_implementation name`` (see ``make_uniform_attention``)."""
    return register_uniform_attention


@pytest.fixture(scope="session")
def heads_file(tmp_path_factory, smol_ref):
    """A real heads.json for the default model from a small detection run (4 probes)."""
    from air_ray.config import HeadsConfig
    from air_ray.heads.run import run_heads

    out = tmp_path_factory.mktemp("heads") / "heads.json"
    run_heads(HeadsConfig(output=str(out), num_probes=4, probe_tokens=512, device="cpu"))
    return out


@pytest.fixture(scope="session")
def short_rows(gsm8k_rows):
    """The 9 shortest GSM8K sample rows (pipeline tests: cheap but real)."""
    return sorted(gsm8k_rows, key=lambda r: len(r["prompt"]) + len(r["response"]))[:9]


def tiny_checkpoint(d: Path, smol_ref, smol_tok, nan_words=(), heads=((1, 0), (1, 3)), config=None):
    """A real (tiny, randomly initialised) Llama checkpoint (or one of ``config``, a transformers config whose
    vocabulary is set to the tokenizer's) with the default model's tokenizer and chat template, and a heads.json
    for it -> (model dir, heads.json). The embeddings of ``nan_words``' tokens are NaN, so a row holding one of
    them has non-finite losses (the LM head is untied: a NaN row there would poison every row)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from air_ray.models import model_shape, prepare_model

    cfg = config or LlamaConfig(vocab_size=len(smol_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                tie_word_embeddings=False)
    cfg.vocab_size = len(smol_tok)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg) if config is None else AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for w in nan_words:
            for t in smol_tok(w, add_special_tokens=False)["input_ids"]:
                model.get_input_embeddings().weight[t] = float("nan")
    model.save_pretrained(d, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (Path(smol_ref.path) / name).exists():
            shutil.copy(Path(smol_ref.path) / name, d / name)
    ref = prepare_model(str(d))
    L, H, KV, _ = model_shape(cfg)
    path = d / "heads.json"
    path.write_text(json.dumps({"format_version": 1, "model": str(d), "model_fingerprint": ref.fingerprint,
                                "num_layers": L, "num_heads": H, "num_kv_heads": KV, "top_frac": 0.25,
                                "heads": [list(h) for h in heads]}))
    return d, path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smol_ref, smol_tok):
    """(model dir, heads.json) of a tiny real checkpoint: for pipeline tests where the model's size does not
    matter, only that it is a real model read by the real loader."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny_model"), smol_ref, smol_tok)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def moto_s3():
    """A real S3 endpoint: moto's server on loopback -> the environment that points clients at it."""
    import socket
    import subprocess
    import sys
    import time

    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    try:
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)
