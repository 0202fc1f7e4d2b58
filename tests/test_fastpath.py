"""The shared-prefix fast path (``air_ray.engine.losses.token_nll_pair``): layers below the first ablated layer
run once for both passes. In float32 it must give the plain path's per-token losses (two full passes) within
1e-5, on tiny random Llama (GQA) / Qwen2 (q bias, mixed sliding/full layers) / Qwen3 (q/k norm) / Mistral models
and on the real default model, with padded batches, first_layer 0 and no heads; and leave the model as it found
it. Every other family: tests/test_architectures.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from air_ray.engine.ablation import HeadAblation
from air_ray.engine.losses import prefix_shareable, token_nll_pair

from tests.test_ablation import randomize, tiny_config

TOL = 1e-5
LENGTHS = [48, 31, 17]  # right-padded batch
STARTS = [20, 9, 16]


def tiny_model(arch: str, **overrides):
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch)
    for k, v in overrides.items():
        setattr(config, k, v)
    return randomize(AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")).eval()


def sequences(vocab: int, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def pair(model, heads, seqs, starts, share_prefix):
    abl = HeadAblation(model, heads)
    return token_nll_pair(model, seqs, starts, ablated=abl.ablated, first_layer=abl.first_layer,
                          share_prefix=share_prefix)


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b]
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def snapshot(model):
    layers = list(model.base_model.layers)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return layers, state


def assert_untouched(model, snap):
    layers, state = snap
    assert list(model.base_model.layers) == layers  # the very same modules, in order
    assert all(not L._forward_hooks and not L._forward_pre_hooks for L in layers)
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in state.items())


def check(model, heads, seqs=None, starts=STARTS, lengths=LENGTHS):
    seqs = seqs or sequences(model.config.vocab_size, lengths)
    snap = snapshot(model)
    fb, fr, fe = pair(model, heads, seqs, starts, share_prefix=True)
    assert_untouched(model, snap)
    pb, pr, pe = pair(model, heads, seqs, starts, share_prefix=False)
    d = max(max_diff(fb, pb), max_diff(fr, pr), max_diff(fe, pe))
    effect = max_diff(pr, pb)
    print(f"{type(model).__name__} heads={heads}: max |d nll| fast vs plain = {d:.2e}; ablation effect {effect:.2f}")
    assert d <= TOL
    return fb, fr, effect


# ----------------------------------------------------------------------------------------------
# tiny random models (3 layers)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("heads", [[(1, 0), (1, 1), (2, 3)], [(2, 1)], [(0, 1), (2, 0)]],
                         ids=["first_layer1", "first_layer2", "first_layer0"])
def test_fast_equals_plain_tiny(arch, heads):
    model = tiny_model(arch)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    assert prefix_shareable(model, heads[0][0]) == (heads[0][0] > 0)
    _, _, effect = check(model, heads)
    assert effect > 0.05  # the reference differs from the base, so the comparison means something


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_no_heads_reference_is_base(arch):
    model = tiny_model(arch)
    fb, fr, effect = check(model, [])
    assert effect == 0.0
    assert max_diff(fb, fr) == 0.0


def test_unpadded_batch_and_single_sequence():
    model = tiny_model("qwen2")
    heads = [(1, 2), (2, 0)]
    check(model, heads, lengths=[40, 40], starts=[10, 25])  # no padding: no mask, is_causal kernel
    check(model, heads, lengths=[33], starts=[1])


def test_mixed_layer_types_keep_their_mask():
    """Qwen2 with sliding-window layers from layer 1 on: a layer looks its mask up by its index in the layer
    list, which the fast path keeps (stand-ins replace the skipped layers, the list keeps its length)."""
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=1,
                       layer_types=["full_attention", "sliding_attention", "full_attention"])
    assert model.base_model.has_sliding_layers
    check(model, [(1, 0), (2, 2)], lengths=[30, 21], starts=[4, 3])
    check(model, [(2, 2)], lengths=[30, 21], starts=[4, 3])


def test_sharded_model_takes_the_plain_path():
    """A model spread over devices by accelerate's device_map keeps the plain path (its per-layer device hooks
    were not verified with stand-in layers), with the same losses."""
    model = tiny_model("llama")
    assert prefix_shareable(model, 1)
    model.hf_device_map = {"model.layers.0": 0, "model.layers.1": 1}
    try:
        assert not prefix_shareable(model, 1)
        check(model, [(1, 0), (2, 3)])
    finally:
        del model.hf_device_map


def test_restored_when_the_reference_pass_fails():
    model = tiny_model("llama")
    heads = [(1, 0), (2, 1)]
    snap = snapshot(model)
    abl = HeadAblation(model, heads)
    boom = model.base_model.layers[2].register_forward_pre_hook(
        lambda m, a: (_ for _ in ()).throw(RuntimeError("boom")) if abl.active else None)
    seqs = sequences(model.config.vocab_size, LENGTHS)
    with pytest.raises(RuntimeError, match="boom"):
        token_nll_pair(model, seqs, STARTS, ablated=abl.ablated, first_layer=abl.first_layer)
    boom.remove()
    assert not abl.active
    assert_untouched(model, snap)
    check(model, heads)  # and it still works


# ----------------------------------------------------------------------------------------------
# the real default model (SmolLM2-135M, 30 layers)

SMOL_HEADS = [(17, 3), (18, 6), (23, 2)]


@pytest.fixture(scope="module")
def smol_batch(smol_tok, gsm8k_rows):
    """The four shortest of the first 20 sample rows (of different lengths, so the batch is padded), chat
    format: (input ids, response starts)."""
    from air_ray.data.rows import RowPreparer

    prep = RowPreparer(smol_tok, format="chat", steps="lines")
    rows = sorted((prep.prepare(r) for r in gsm8k_rows[:20]), key=lambda p: len(p.input_ids))[:4]
    assert len({len(p.input_ids) for p in rows}) > 1  # padded
    return [p.input_ids for p in rows], [p.n_prompt_tokens for p in rows]


@pytest.mark.slow
def test_fast_equals_plain_smollm2(smol_fp32, smol_batch):
    seqs, starts = smol_batch
    assert prefix_shareable(smol_fp32, 17)
    _, _, effect = check(smol_fp32, SMOL_HEADS, seqs, starts)
    assert effect > 0.1
    check(smol_fp32, [(0, 2), (17, 3)], seqs[:2], starts[:2])  # first_layer 0: the plain path


@pytest.mark.slow
def test_fast_equals_plain_smollm2_detected_heads(smol_fp32, smol_batch, heads_file):
    from air_ray.store.heads import load_heads

    heads = load_heads(str(heads_file))["heads"]
    seqs, starts = smol_batch
    check(smol_fp32, heads, seqs[:3], starts[:3])


@pytest.mark.slow
def test_scorer_share_prefix_switch(gsm8k_rows):
    """``Scorer(share_prefix=False)`` is the plain path; both give the same token losses and scores."""
    from air_ray.engine.scorer import Scorer

    scorer = Scorer(model="smollm2-135m", heads=SMOL_HEADS, dtype="float32", device="cpu", share_prefix=False,
                    batch_tokens=1024)
    assert scorer.backend.share_prefix is False
    losses = []
    token_losses = scorer.token_losses
    scorer.token_losses = lambda prepared, on_batch=None: losses.append(token_losses(prepared)) or losses[-1]
    rows = sorted(gsm8k_rows[10:20], key=lambda r: len(r["prompt"]) + len(r["response"]))[:3]
    plain = scorer.score(rows)
    scorer.backend.share_prefix = True
    fast = scorer.score(rows)
    for (pb, pr, pe, _), (fb, fr, fe, _) in zip(*losses):  # per row: base, ref, entropy, pooled (None)
        assert max_diff([pb, pr, pe], [fb, fr, fe]) <= TOL
    for p, f in zip(plain, fast):
        assert p["id"] == f["id"]
        assert abs(p["score"] - f["score"]) <= 1e-5
        assert abs(p["entropy_base"] - f["entropy_base"]) <= 1e-5 and 0 < p["entropy_base"] < np.log(49152)
    import inspect

    assert inspect.signature(Scorer).parameters["share_prefix"].default is True  # the fast path is the default


def test_fast_path_skips_the_shared_layers():
    """The fast path runs layers [0, k) once per batch (not twice) and layers [k, L) twice."""
    model = tiny_model("mistral")
    calls = [0] * 3
    hooks = [L.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, L in enumerate(model.base_model.layers)]
    seqs = sequences(model.config.vocab_size, LENGTHS)
    pair(model, [(2, 0)], seqs, STARTS, share_prefix=True)
    assert calls == [1, 1, 2]
    calls[:] = [0] * 3
    pair(model, [(2, 0)], seqs, STARTS, share_prefix=False)
    assert calls == [2, 2, 2]
    for h in hooks:
        h.remove()


# ----------------------------------------------------------------------------------------------
# the LM head at response positions, in chunks; batching by token budget


@pytest.mark.parametrize("chunk", [None, 1, 7, 1000])
def test_chunked_head_equals_full_logits(chunk):
    """token_nll (chunked, in-place logsumexp) = cross-entropy of the full [batch, pos, vocab] logits, and the
    entropies token_nll_pair gives = the entropy of softmax(full logits), at the same positions."""
    from air_ray.engine.losses import token_nll

    model = tiny_model("qwen3")
    seqs = sequences(model.config.vocab_size, LENGTHS)
    got = token_nll(model, seqs, STARTS, chunk=chunk)
    abl = HeadAblation(model, [(1, 0)])
    base, _, ent = token_nll_pair(model, seqs, STARTS, ablated=abl.ablated, first_layer=abl.first_layer,
                                  chunk=chunk)
    for s, st, g, b, e in zip(seqs, STARTS, got, base, ent):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([s])).logits[0].float()  # [pos, vocab]
        want = torch.nn.functional.cross_entropy(logits[st - 1 : -1], torch.tensor(s[st:]), reduction="none")
        want_ent = torch.distributions.Categorical(logits=logits[st - 1 : -1].double()).entropy()
        assert len(g) == len(s) - st == len(e)
        assert np.abs(g - want.double().numpy()).max() <= TOL
        assert np.abs(b - want.double().numpy()).max() <= TOL
        assert np.abs(e - want_ent.numpy()).max() <= TOL
        assert (e > 0).all() and (e <= np.log(model.config.vocab_size) + TOL).all()


def test_entropy_sums_against_float64():
    """_exp_sums, block by block (more rows than one block, a partial last block), gives the entropy of
    softmax(logits) within float32 rounding; a -inf logit counts 0 log 0 = 0; a NaN logit gives a NaN entropy."""
    from air_ray.engine.losses import EXP_ELEMENTS, EXP_ROWS, _exp_sums

    gen = torch.Generator().manual_seed(18)
    # SmolLM2's vocabulary: EXP_ROWS rows a block; a small vocabulary: more rows a block (EXP_ELEMENTS // vocab)
    for vocab, rows in ((EXP_ELEMENTS // EXP_ROWS, EXP_ROWS), (100, EXP_ELEMENTS // 100)):
        logits = torch.randn(2 * rows + 3, vocab, generator=gen) * 4  # [n, vocab]
        logits[0, 3] = logits[1, :vocab // 2] = float("-inf")
        logits[-1, 7] = float("nan")
        z, e_log_e = _exp_sums(logits - logits.amax(dim=-1, keepdim=True))
        got = (z.log() - e_log_e / z).double()
        want = torch.distributions.Categorical(logits=logits[:-1].double()).entropy()
        assert (got[:-1] - want).abs().max() <= TOL
        assert torch.isnan(got[-1])


def test_head_chunk_size():
    from air_ray.engine.losses import HEAD_CHUNK_BYTES, head_chunk

    assert head_chunk(49152) * 49152 * 4 <= HEAD_CHUNK_BYTES
    assert head_chunk(151936) >= 100
    assert head_chunk(10**9) == 16
    assert head_chunk(49152, 5) == 5
    assert 8 * head_chunk(151936) <= head_chunk(151936, device="cuda") <= (512 << 20) // (4 * 151936)


def test_batch_by_tokens():
    from air_ray.engine.losses import batch_by_tokens

    lengths = [50, 10, 300, 12, 11, 48, 5000, 52]
    batches = batch_by_tokens(lengths, 200)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) == 1 or len(b) * longest <= 200  # within the budget (an over-long row alone)
        assert [lengths[i] for i in b] == sorted(lengths[i] for i in b)
        assert len(b) * longest - sum(lengths[i] for i in b) <= 0.1 * len(b) * longest  # <= 10 % padding
    assert [6] in batches  # 5000 tokens: a batch of its own
    assert batch_by_tokens(lengths, 10**6, max_padding=1.0) == [sorted(range(8), key=lambda i: lengths[i])]
    assert batch_by_tokens([], 100) == []
