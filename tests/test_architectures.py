"""Every supported decoder family (``air_ray.models.families``) on a tiny random float32 model, against
independent references (issue #14):

- the ablation (``HeadAblation``) = an explicit eager attention with the disabled heads' rows written as 1/N
  over the keys the model's mask shows (conftest ``make_uniform_attention``: causal, sliding window, padding;
  soft-capping and sinks for the other heads), on a padded batch, and it moves the loss measurably;
- per-token losses and entropies = those of the model's own ``model(...).logits`` (logit scaling,
  soft-capping, tied heads), and the shared-prefix fast path = the plain two passes;
- head detection's top-1 attention = the argmax of ``output_attentions`` from eager attention (sliding windows);
- the vLLM backend's export (query rows zeroed) = the reference where it is allowed, and it is really not where
  the family is refused;
- a model outside the families, or a vLLM export that would not be exact, is one clear line before scoring.

The README's "Model families" table is backed by these tests, one parametrized case per family and column.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch

from air_ray.engine.ablation import HeadAblation, attention_modules, query_rows, zero_query_rows
from air_ray.engine.losses import prefix_shareable, token_nll, token_nll_pair
from air_ray.errors import AirRayError
from air_ray.models.families import FAMILIES, export_refusal, family_of
from air_ray.models.load import attention_implementation

from tests.conftest import register_uniform_attention
from tests.test_ablation import batch as padded_batch, logits

TOL = 1e-4  # logits: ablated model vs the explicit reference (float32)
FAST_TOL = 1e-5  # per-token losses: shared-prefix path vs plain path
EFFECT = 0.05  # the ablation must move some token's loss by more than this (nats)
VOCAB, SEQ, WINDOW = 256, 40, 8
LENGTHS = [SEQ, 27]  # a right-padded batch
STARTS = [12, 5]  # scored tokens from here on
HEADS = [(1, 0), (1, 1), (2, 3)]  # (1, 0) and (1, 1) share a kv head; layer 1 sliding where the family slides
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"]
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_config(model_type: str):
    """A tiny config of each family, with what makes the family different switched on and made to matter:
    sliding windows shorter than the sequence, soft-capping and logit scales far from 1, sinks, MLA dims."""
    from transformers import AutoConfig

    kw = dict(COMMON, tie_word_embeddings=False)
    slide = dict(sliding_window=WINDOW, layer_types=LAYER_TYPES)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    mla = dict(num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
               n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
               first_k_dense_replace=1)
    extra = {
        "llama": dict(head_dim=16),
        "mistral": dict(head_dim=16, sliding_window=WINDOW),  # Mistral v0.1: every layer slides
        "mixtral": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2),
        "qwen2": dict(use_sliding_window=True, max_window_layers=1, **slide),  # q/k/v biases
        "qwen2_moe": dict(shared_expert_intermediate_size=32, decoder_sparse_step=1, **moe),
        "qwen3": dict(head_dim=16, attention_bias=True),  # per-head q_norm / k_norm
        "qwen3_moe": dict(head_dim=16, decoder_sparse_step=1, **moe),
        "gemma": dict(head_dim=16, tie_word_embeddings=True),
        "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=2.0,
                       final_logit_softcapping=1.5, tie_word_embeddings=True, **slide),
        "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=16, final_logit_softcapping=1.5,
                            tie_word_embeddings=True, **slide),
        "phi3": dict(),  # fused qkv_proj
        "phi": dict(qk_layernorm=True),  # LayerNorm (with bias) on q and k
        "olmo2": dict(),  # q_norm over all heads' queries
        "olmo3": dict(**slide),
        "olmoe": dict(num_experts=4, num_experts_per_tok=2),
        "granite": dict(logits_scaling=0.25, attention_multiplier=0.3, embedding_multiplier=2.0,
                        residual_multiplier=0.7),
        "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, logits_scaling=0.25,
                           attention_multiplier=0.3, embedding_multiplier=2.0, residual_multiplier=0.7),
        "cohere": dict(logit_scale=4.0, use_qk_norm=True),
        "cohere2": dict(logit_scale=4.0, **slide),
        "starcoder2": dict(sliding_window=WINDOW),  # biases
        "gpt_neox": dict(),  # query_key_value interleaved per head, partial rotary
        "gpt_oss": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **slide),  # sinks
        # MLA: per-head query width qk_nope + qk_rope = 24, values 12; V2-Lite has no query LoRA, V3 has one
        "deepseek_v2": dict(q_lora_rank=None, **mla),
        "deepseek_v3": dict(q_lora_rank=24, n_group=1, topk_group=1, **mla),
        "smollm3": dict(no_rope_layers=[1, 0, 1]),  # a NoPE layer
    }[model_type]
    kw.update(extra)
    if model_type == "gpt_neox":  # one kv head per query head
        kw.pop("num_key_value_heads")
    return AutoConfig.for_model(model_type, **kw)


def randomize(model, seed=0):
    """Weights large enough for peaked attention (so a uniform head changes the output a lot), random
    biases and norm weights, sinks of a few nats."""
    g = torch.Generator().manual_seed(seed)
    qk = ("q_proj", "k_proj", "qkv_proj", "query_key_value", "q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("sinks"):
                p.copy_(2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif any(s in name for s in qk):
                p.copy_(0.35 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def build(model_type: str, attn_implementation: str | None = "auto"):
    """The tiny model of a family with fixed random weights; ``auto``: the implementation air_ray loads it with."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    impl = attention_implementation(config) if attn_implementation == "auto" else attn_implementation
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=impl)
    return randomize(model).eval()


@functools.lru_cache(maxsize=None)
def tiny(model_type: str):
    return build(model_type)


def like(model, attn_implementation: str):
    """A second model of the same family and weights with another attention implementation."""
    other = build(model.config.model_type, attn_implementation)
    other.load_state_dict(model.state_dict())
    return other


def batch():
    return padded_batch(VOCAB, LENGTHS)


def response_nll(lg, ids):
    """Per-token losses of the scored tokens from full logits [batch, pos, vocab] -> [tokens] (row after row)."""
    out = []
    for i, (s, n) in enumerate(zip(STARTS, LENGTHS)):
        out.append(-torch.log_softmax(lg[i, s - 1 : n - 1], -1).gather(1, ids[i, s:n, None])[:, 0])
    return torch.cat(out)


def sequences():
    ids, _ = batch()
    return [ids[i, :n].tolist() for i, n in enumerate(LENGTHS)]


FAMILY_IDS = sorted(FAMILIES)


# ----------------------------------------------------------------------------------------------
# the ablation


@pytest.mark.parametrize("model_type", FAMILY_IDS)
def test_ablation_is_uniform_attention(model_type):
    model = tiny(model_type)
    assert family_of(model.config) is FAMILIES[model_type]
    assert len(attention_modules(model)) == 3
    ref = like(model, register_uniform_attention(HEADS))
    ids, mask = batch()
    base = logits(model, ids, mask)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    implementation = model.config._attn_implementation
    with HeadAblation(model, HEADS).ablated():
        ablated = logits(model, ids, mask)
    assert model.config._attn_implementation == implementation
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # no weight moved
    want = logits(ref, ids, mask)
    keep = mask.bool()
    d = (ablated - want)[keep].abs().max().item()
    tol = TOL * max(1.0, want.abs().max().item() / 10)  # float32 error grows with the logits' scale
    effect = (response_nll(ablated, ids) - response_nll(base, ids)).abs().max().item()
    print(f"{model_type} ({implementation}): max |dlogit| vs reference {d:.1e}, ablation effect {effect:.2f} nats")
    assert d <= tol
    assert effect > EFFECT
    # one sequence, no padding (no mask: the kernel's causal default) gives the same rows
    with HeadAblation(model, HEADS).ablated():
        one = logits(model, ids[:1], None)
    assert (one[0] - want[0]).abs().max().item() <= tol


def test_gemma2_and_gpt_oss_run_eager():
    """SDPA would drop Gemma 2's attention soft-capping; gpt-oss's sinks have no SDPA path at all."""
    assert tiny("gemma2").config._attn_implementation == "eager"
    assert tiny("gpt_oss").config._attn_implementation == "eager"
    assert tiny("llama").config._attn_implementation == "sdpa"


def test_sliding_window_matters():
    """The uniform heads of a sliding layer average over the window, not the whole prefix: a reference that
    ignored the window would differ (so the comparison above can fail)."""
    model = tiny("mistral")
    ids, mask = batch()
    with HeadAblation(model, [(1, 0)]).ablated():
        windowed = logits(model, ids, mask)
    no_window = copy.deepcopy(tiny_config("mistral"))
    no_window.sliding_window = None
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_config(no_window, dtype=torch.float32, attn_implementation="sdpa").eval()
    other.load_state_dict(model.state_dict())
    with HeadAblation(other, [(1, 0)]).ablated():
        full = logits(other, ids, mask)
    assert (windowed - full)[:, WINDOW + 1 :].abs().max() > 0.1


# ----------------------------------------------------------------------------------------------
# losses from the model's own output path; the shared-prefix fast path


@pytest.mark.parametrize("model_type", FAMILY_IDS)
def test_losses_are_the_models_own(model_type):
    model = tiny(model_type)
    ids, mask = batch()
    seqs = sequences()
    full = [logits(model, torch.tensor([s]), None)[0] for s in seqs]  # [pos, vocab] per sequence
    got = token_nll(model, seqs, STARTS, chunk=7)
    abl = HeadAblation(model, HEADS)
    base, _, ent = token_nll_pair(model, seqs, STARTS, ablated=abl.ablated, first_layer=abl.first_layer, chunk=5)
    for s, st, lg, g, b, e in zip(seqs, STARTS, full, got, base, ent):
        logp = torch.log_softmax(lg[st - 1 : -1], -1)
        want = -logp.gather(1, torch.tensor(s[st:])[:, None])[:, 0].double().numpy()
        want_ent = -(logp.exp() * logp).sum(-1).double().numpy()
        # float32 sums in another order (a padded batch against one sequence): 1e-5 of the value beyond 1 nat (the tiny
        # random models give losses up to ~25 nats; granitemoe's differ by 2.5e-5 there on an AVX512 CPU)
        tol = FAST_TOL * np.maximum(1.0, np.abs(want))
        assert (np.abs(g - want) <= tol).all() and (np.abs(b - want) <= tol).all()
        assert (np.abs(e - want_ent) <= FAST_TOL * np.maximum(1.0, np.abs(want_ent))).all()
    if model_type in ("cohere", "cohere2", "granite", "granitemoe", "gemma2", "gemma3_text"):
        # the family post-processes its logits: the bare LM head would give other losses
        with torch.no_grad():
            hidden = model.base_model(input_ids=torch.tensor([seqs[0]])).last_hidden_state[0]
            bare = model.get_output_embeddings()(hidden).float()
        assert (bare - full[0]).abs().max() > 0.1


@pytest.mark.parametrize("model_type", FAMILY_IDS)
def test_shared_prefix_equals_plain(model_type):
    model = tiny(model_type)
    seqs = sequences()
    abl = HeadAblation(model, HEADS)
    assert abl.first_layer == 1 and prefix_shareable(model, 1)
    layers = list(model.base_model.layers)
    fast = token_nll_pair(model, seqs, STARTS, ablated=abl.ablated, first_layer=1, share_prefix=True)
    assert list(model.base_model.layers) == layers
    plain = token_nll_pair(model, seqs, STARTS, ablated=abl.ablated, first_layer=1, share_prefix=False)
    d = max(float(np.abs(x - y).max()) for f, p in zip(fast, plain) for x, y in zip(f, p))
    effect = max(float(np.abs(r - b).max()) for b, r in zip(plain[0], plain[1]))
    print(f"{model_type}: fast vs plain {d:.1e}, effect {effect:.2f}")
    assert d <= FAST_TOL and effect > EFFECT


# ----------------------------------------------------------------------------------------------
# head detection


@pytest.mark.parametrize("model_type", FAMILY_IDS)
def test_detection_argmax_is_eager_attention_argmax(model_type):
    from air_ray.heads.detect import capturing

    model = tiny(model_type)
    eager = like(model, "eager")
    ids = torch.tensor([sequences()[0]])
    rows = slice(4, SEQ - 1)
    implementation = model.config._attn_implementation
    with capturing(model) as capture:
        capture.rows = rows
        with torch.no_grad():
            model.base_model(input_ids=ids)
        got = capture.take(3)  # [layer, head, rows]
    assert model.config._attn_implementation == implementation
    with torch.no_grad():
        attentions = eager(input_ids=ids, output_attentions=True).attentions  # per layer [1, head, q, k]
    want = np.stack([a[0, :, rows].argmax(-1).numpy() for a in attentions])
    assert got.shape == want.shape == (3, 4, SEQ - 5)
    assert (got == want).all(), f"{(got != want).sum()} of {got.size} rows differ"


def test_detection_window_matters():
    """Under Mistral's window the top-1 keys differ from those of the same weights without the window, so a
    capture that ignored the window would fail the comparison above."""
    from transformers import AutoModelForCausalLM

    from air_ray.heads.detect import capturing

    model = tiny("mistral")
    no_window = tiny_config("mistral")
    no_window.sliding_window = None
    other = AutoModelForCausalLM.from_config(no_window, dtype=torch.float32, attn_implementation="sdpa").eval()
    other.load_state_dict(model.state_dict())
    ids = torch.tensor([sequences()[0]])
    got = {}
    for name, m in (("window", model), ("none", other)):
        with capturing(m) as capture, torch.no_grad():
            capture.rows = slice(4, SEQ - 1)
            m.base_model(input_ids=ids)
            got[name] = capture.take(3)
    q = np.arange(4, SEQ - 1)
    assert (got["window"] > q - WINDOW).all()  # every top-1 key inside the window
    assert (got["none"] <= q - WINDOW).any()  # without it, some are not


def test_detect_on_a_sliding_window_family():
    """``detect`` end to end (probes, copy rule, ablation check) on tiny gpt-oss: eager, sinks, windows."""
    from air_ray.heads.detect import detect
    from air_ray.heads.probes import ProbeTokens

    model = tiny("gpt_oss")
    seq = sequences()[0]
    probe = ProbeTokens(input_ids=seq[:30] + seq[10:14], n_prompt=30, answer_span=slice(10, 14))
    det = detect(model, [probe], top_frac=0.25, seed=0, progress=False)
    assert det.scores.shape == (3, 4) and len(det.heads) == 3
    assert model.config._attn_implementation == "eager"
    assert np.isfinite(det.ablation_check["answer_loss_ablated"])


# ----------------------------------------------------------------------------------------------
# the vLLM backend's exported checkpoint


@pytest.mark.parametrize("model_type", FAMILY_IDS)
def test_query_row_export_exact_or_refused(model_type):
    model = tiny(model_type)
    ref = like(model, register_uniform_attention(HEADS))
    ids, mask = batch()
    want = logits(ref, ids, mask)
    keep = mask.bool()
    zeroed = copy.deepcopy(model)
    why = export_refusal(model.config)
    if why is None:
        zero_query_rows(zeroed, HEADS)
        d = (logits(zeroed, ids, mask) - want)[keep].abs().max().item()
        print(f"{model_type}: exported (q rows zeroed) vs reference {d:.1e}")
        assert d <= TOL
        return
    with pytest.raises(AirRayError, match="not the uniform ablation"):
        zero_query_rows(zeroed, HEADS)
    # refused for a reason: zeroing the rows anyway is not the ablation
    modules = attention_modules(zeroed)
    with torch.no_grad():
        for l, h in HEADS:
            proj, rows = query_rows(modules[l], FAMILIES[model_type].queries, h, 4)
            proj.weight[rows] = 0
            if proj.bias is not None:
                proj.bias[rows] = 0
    d = (logits(zeroed, ids, mask) - want)[keep].abs().max().item()
    print(f"{model_type}: refused ({why}); zeroing anyway is off by {d:.2f}")
    assert d > 0.01


# ----------------------------------------------------------------------------------------------
# whole checkpoints through the Scorer: refusals before scoring, eager where SDPA cannot, the model's context


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, smol_ref, smol_tok):
    """model type -> (model dir, heads.json) of tiny checkpoints with the default model's tokenizer."""
    from transformers import GPT2Config

    from tests.conftest import tiny_checkpoint

    out = {}
    for model_type in ("gpt_oss", "olmo2"):
        out[model_type] = tiny_checkpoint(tmp_path_factory.mktemp(model_type), smol_ref, smol_tok, heads=HEADS,
                                          config=tiny_config(model_type))
    gpt2 = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256)
    out["gpt2"] = tiny_checkpoint(tmp_path_factory.mktemp("gpt2"), smol_ref, smol_tok, heads=[(1, 0)], config=gpt2)
    short = tiny_config("llama")
    short.max_position_embeddings = 64
    out["short"] = tiny_checkpoint(tmp_path_factory.mktemp("short"), smol_ref, smol_tok, heads=HEADS, config=short)
    return out


def test_unsupported_family_is_one_line_before_scoring(checkpoints, tmp_path):
    from transformers import Gemma3Config

    from air_ray.config import HeadsConfig
    from air_ray.engine.scorer import Scorer
    from air_ray.heads.run import run_heads

    d, heads = checkpoints["gpt2"]
    supported = "not supported: air_ray scores and detects heads with the decoder families cohere, cohere2, "
    with pytest.raises(AirRayError, match=f"model type 'gpt2' is {supported}"):
        Scorer(model=str(d), heads=str(heads), dtype="float32", device="cpu")
    with pytest.raises(AirRayError, match="model type 'gpt2' is not supported"):
        run_heads(HeadsConfig(model=str(d), output=str(tmp_path / "h.json"), num_probes=1, device="cpu"))
    assert not (tmp_path / "h.json").exists()
    from air_ray.models import load_model, prepare_model

    model = load_model(prepare_model(str(d)), dtype="float32", device="cpu")
    with pytest.raises(AirRayError, match="model type 'gpt2' is not supported"):
        HeadAblation(model, [(1, 0)])
    with pytest.raises(AirRayError, match="gemma3_text, are"):
        family_of(Gemma3Config())
    assert all(len(str(e).splitlines()) == 1 for e in [AirRayError(FAMILIES["olmo2"].export_refusal)])


def test_scorer_on_a_family_without_sdpa(checkpoints):
    """gpt-oss (sinks) has no SDPA path: it loads eager and scores end to end, the ablation on the eager kernel."""
    from air_ray.engine.scorer import Scorer

    d, heads = checkpoints["gpt_oss"]
    with Scorer(model=str(d), heads=str(heads), dtype="float32", device="cpu", format="raw") as scorer:
        assert scorer.model.config._attn_implementation == "eager"
        rows = [{"id": "a", "prompt": "What is 2+3?", "response": "2+3 = 5\n#### 5"},
                {"id": "b", "prompt": "Say hi.", "response": "Hello there!\nBye."}]
        out = scorer.score(rows)
    assert [r["id"] for r in out] == ["a", "b"]
    assert all(np.isfinite(r["score"]) and r["loss_ref"] != r["loss_base"] for r in out)


def test_vllm_backend_refuses_an_inexact_export(checkpoints, monkeypatch, tmp_path):
    """OLMo 2's q_norm over all heads: the vLLM backend refuses with one line before any engine starts or any
    export is written; the export itself refuses too."""
    from air_ray.engine.backends.vllm import export_ablated
    from air_ray.engine.scorer import Scorer
    from air_ray.models import prepare_model

    monkeypatch.setenv("AIR_RAY_HOME", str(tmp_path / "home"))
    d, heads = checkpoints["olmo2"]
    with pytest.raises(AirRayError, match=r"--backend vllm .* not the uniform ablation for OLMo 2: its q_norm .* "
                                          r"use --backend hf") as e:
        Scorer(model=str(d), heads=str(heads), dtype="float32", device="cpu", backend="vllm")
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(AirRayError, match="not the uniform ablation for OLMo 2"):
        export_ablated(prepare_model(str(d)), HEADS, "float32")
    assert not (tmp_path / "home" / "ablated").exists() or not any((tmp_path / "home" / "ablated").iterdir())
    with Scorer(model=str(d), heads=str(heads), dtype="float32", device="cpu", format="raw") as hf:  # hf: exact
        assert np.isfinite(hf.score([{"prompt": "a b", "response": "c d"}])[0]["score"])


def test_rows_longer_than_the_model_context(checkpoints):
    """--max-tokens 8192 on a model built for 64 positions: the limit is 64, in the Scorer and in the pipeline's
    prepare stage; a longer row is too_long, or cut with --truncate."""
    from air_ray.config import ScoreConfig
    from air_ray.data.rows import RowError
    from air_ray.engine.scorer import Scorer
    from air_ray.models import load_config, prepare_model, token_limit
    from air_ray.pipeline.stages import PrepareStage

    d, heads = checkpoints["short"]
    config = load_config(prepare_model(str(d)))
    assert token_limit(8192, config) == 64 and token_limit(None, config) == 64 and token_limit(32, config) == 32
    long = {"id": "long", "prompt": "Add them up.", "response": "1 + 1 = 2\n" * 40}
    with Scorer(model=str(d), heads=str(heads), dtype="float32", device="cpu", format="raw") as scorer:
        assert scorer.options.max_tokens == 8192 and scorer.preparer.max_tokens == 64
        with pytest.raises(RowError, match="too_long"):
            scorer.score([long])
    with Scorer(model=str(d), heads=str(heads), dtype="float32", device="cpu", format="raw", truncate=True) as scorer:
        (row,) = scorer.score([long])
        assert row["truncated"] and row["n_prompt_tokens"] + row["n_response_tokens"] == 64
    stage = PrepareStage(ScoreConfig(model=str(d), input=["x.jsonl"], format="raw"))
    stage.setup()
    assert stage.preparer.max_tokens == 64


def test_log_softmax_in_float32_under_bf16():
    """A bf16 model: the losses are those of its own bf16 logits with the log-softmax taken in float32 (a bf16
    log-softmax would be off by far more)."""
    model = build("llama").to(torch.bfloat16)
    ids, mask = batch()
    got = token_nll(model, sequences(), STARTS)  # the same padded batch
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits  # bf16 [batch, pos, vocab]
    for i, (st, n, g) in enumerate(zip(STARTS, LENGTHS, got)):
        lg = full[i, st - 1 : n - 1]  # [tokens, vocab]
        target = ids[i, st:n, None]
        fp32 = -torch.log_softmax(lg.float(), -1).gather(1, target)[:, 0].double().numpy()
        bf16 = -torch.log_softmax(lg, -1).gather(1, target)[:, 0].double().numpy()
        assert np.abs(g - fp32).max() <= 1e-5
        assert np.abs(bf16 - fp32).max() > 1e-3


def test_readme_family_table_is_this_table():
    """The README's "Model families" table lists exactly these families, with the kernel each tiny model runs
    and the vLLM export refused exactly where the family table refuses it."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Model families", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"^\| (.+?) \| `(\w+)` \| (\w+)\** \|(.*)\|$", line)
        if m and m.group(1) != "family":  # not the header
            rows[m.group(2)] = [m.group(1), m.group(3)] + [c.strip() for c in m.group(4).split("|")]
    assert set(rows) == set(FAMILIES)
    for model_type, (name, kernel, _, ablation, losses, detection, prefix, export) in rows.items():
        assert name == FAMILIES[model_type].name
        assert kernel == tiny(model_type).config._attn_implementation, model_type
        assert (ablation, losses, detection, prefix) == ("exact", "own", "yes", "yes")
        assert export.startswith("refused") == (FAMILIES[model_type].export_refusal is not None), model_type
        assert export.startswith("refused") or export == "exact"
