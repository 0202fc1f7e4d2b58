"""The ablation must compute exactly the uniform ablation: the same logits as an explicit eager attention in
which the disabled heads' rows are 1/N over the keys the mask shows. ``HeadAblation`` (the hf backend: the
model's own kernel, the disabled heads' outputs replaced) and ``zero_query_rows`` (the vLLM backend's export:
query rows zeroed) are both checked on tiny random float32 Llama / Qwen2 / Qwen3 / Mistral models and on
SmolLM2; every other family is in test_architectures.py. Also: switching leaves the weights and the attention
implementation as they were, the pieces (which keys a query sees, the mean of V over them) on their own."""

from __future__ import annotations

import copy

import pytest
import torch

from air_ray.engine.ablation import HeadAblation, attention_modules, uniform_output, visible_keys, zero_query_rows
from air_ray.errors import AirRayError

TOL = 1e-4
SEQ = 48


def tiny_config(arch: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0)
    if arch == "llama":
        return LlamaConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=16, **common)
    if arch == "qwen2":  # q/k/v biases
        return Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **common)
    if arch == "qwen3":  # q_norm / k_norm, and biases too
        return Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
                           **common)
    if arch == "mistral":
        return MistralConfig(num_attention_heads=8, num_key_value_heads=2, head_dim=8, sliding_window=None,
                             **common)
    raise ValueError(arch)


def randomize(model, seed=0):
    """Weights large enough for peaked attention (so disabling a head changes the logits a lot), random
    non-zero biases and non-trivial norm weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "q_proj" in name or "k_proj" in name:
                p.copy_(0.35 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def tiny_pair(arch: str, heads, uniform_attention):
    """(the model with SDPA attention, a second copy whose attention is the explicit uniform reference)."""
    from transformers import AutoModelForCausalLM

    # one config object each: from_config records the attention implementation on the config it is given
    model = randomize(AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32,
                                                       attn_implementation="sdpa"))
    ref = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32,
                                           attn_implementation=uniform_attention(heads))
    ref.load_state_dict(model.state_dict())
    assert model.config._attn_implementation == "sdpa"
    assert ref.config._attn_implementation.startswith("test_uniform_ablation_")
    return model.eval(), ref.eval()


def batch(vocab: int, lengths, seed=1):
    """Right-padded random ids and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def max_diff(a, b, mask):
    keep = mask.bool()
    return (a[keep] - b[keep]).abs().max().item()


TINY_HEADS = [(0, 1), (1, 0), (1, 1), (2, 3)]  # (1, 0) and (1, 1) share a kv head


@pytest.mark.parametrize("form", ["head_ablation", "zeroed_query_rows"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_ablation_equals_uniform_attention_tiny(arch, form, uniform_attention):
    model, ref = tiny_pair(arch, TINY_HEADS, uniform_attention)
    if arch in ("qwen2", "qwen3"):
        assert model.model.layers[0].self_attn.q_proj.bias.abs().min() > 0
    if arch == "qwen3":
        assert hasattr(model.model.layers[0].self_attn, "q_norm")
    ids, mask = batch(model.config.vocab_size, [SEQ, SEQ - 13])
    base = logits(model, ids, mask)
    if form == "head_ablation":
        with HeadAblation(model, TINY_HEADS).ablated() as m:
            assert m is model
            ablated = logits(model, ids, mask)
    else:
        zeroed = copy.deepcopy(model)
        zero_query_rows(zeroed, TINY_HEADS)
        ablated = logits(zeroed, ids, mask)
    expected = logits(ref, ids, mask)
    d = max_diff(ablated, expected, mask)
    print(f"{arch} {form}: max |dlogit| ablated vs uniform reference = {d:.2e}, "
          f"vs base = {max_diff(ablated, base, mask):.2f}")
    assert d <= TOL
    # the ablation matters (otherwise the comparison above proves nothing) ...
    assert max_diff(ablated, base, mask) > 0.5
    # ... and the reference with no disabled head is the base model
    _, plain = tiny_pair(arch, [], uniform_attention)
    plain.load_state_dict(model.state_dict())
    assert max_diff(logits(plain, ids, mask), base, mask) <= TOL
    # batch of one (no padding, no mask) gives the same
    one = ids[:1], mask[:1]
    if form == "head_ablation":
        with HeadAblation(model, TINY_HEADS).ablated():
            a1 = logits(model, one[0], None)
    else:
        a1 = logits(zeroed, one[0], None)
    assert max_diff(a1, logits(ref, one[0], None), one[1]) <= TOL
    assert max_diff(a1, ablated[:1], one[1]) <= TOL


def test_uniform_reference_writes_one_over_i(uniform_attention):
    """The reference itself: a disabled head's attention row i is exactly 1/i over the prefix."""
    model, ref = tiny_pair("llama", [(1, 2)], uniform_attention)
    ids, mask = batch(model.config.vocab_size, [20, 14])
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, output_attentions=True)
    probs = out.attentions[1][:, 2]  # [batch, q, k]
    for b, n in enumerate([20, 14]):
        rows = probs[b, :n, :]
        expected = torch.tril(torch.ones(n, probs.shape[-1]))[:n] / torch.arange(1, n + 1)[:, None]
        expected[:, n:] = 0
        torch.testing.assert_close(rows, expected, rtol=0, atol=1e-7)
    other = out.attentions[1][0, 1]
    assert not torch.allclose(other, probs[0])  # the other heads still attend by content


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_head_ablation_moves_no_weight_and_restores_the_model(arch, uniform_attention):
    model, _ = tiny_pair(arch, [], uniform_attention)
    heads = [(0, 3), (2, 0), (2, 1)]
    before = snapshot(model)
    abl = HeadAblation(model, heads)
    with abl.ablated():
        assert abl.active and model.config._attn_implementation == "air_ray_uniform_sdpa"
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not abl.active and model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_air_ray_uniform_heads") for m in attention_modules(model))
    # restored also when the pass raises, and enable/disable are idempotent
    with pytest.raises(RuntimeError):
        with abl.ablated():
            abl.enable()
            raise RuntimeError("boom")
    abl.disable()
    assert model.config._attn_implementation == "sdpa"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # repeated use gives the same ablated model; eager kernels are wrapped the same way
    ids, mask = batch(model.config.vocab_size, [16])
    with abl.ablated():
        a = logits(model, ids, mask)
    with abl.ablated():
        b = logits(model, ids, mask)
    assert torch.equal(a, b)
    model.set_attn_implementation("eager")
    with abl.ablated():
        assert model.config._attn_implementation == "air_ray_uniform_eager"
        e = logits(model, ids, mask)
    assert model.config._attn_implementation == "eager"
    assert (e - a).abs().max() <= TOL
    model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_zeroed_query_rows_touch_only_those_rows(arch, uniform_attention):
    """The export form: only the heads' query rows (and biases) are zeroed; under grouped-query attention the
    k/v rows are shared by several query heads and stay."""
    model, _ = tiny_pair(arch, [], uniform_attention)
    heads = [(0, 3), (2, 0), (2, 1)]
    before = snapshot(model)
    zero_query_rows(model, heads)
    H, KV = model.config.num_attention_heads, model.config.num_key_value_heads
    d = model.config.head_dim if getattr(model.config, "head_dim", None) else model.config.hidden_size // H
    assert KV < H  # grouped-query attention: k/v rows are shared
    now = model.state_dict()
    for k, v in now.items():
        if "q_proj" not in k:  # k/v projections, norms, MLPs, embeddings: untouched
            assert torch.equal(v, before[k]), k
    for l, attn in enumerate(attention_modules(model)):
        w, w0 = attn.q_proj.weight, before[f"model.layers.{l}.self_attn.q_proj.weight"]
        for h in range(H):
            rows = slice(h * d, (h + 1) * d)
            if (l, h) in heads:
                assert (w[rows] == 0).all()
                if attn.q_proj.bias is not None:
                    assert (attn.q_proj.bias[rows] == 0).all()
            else:
                assert torch.equal(w[rows], w0[rows])


def test_visible_keys_reads_every_mask_form():
    """SDPA's boolean mask, eager's additive float mask and no mask (the kernel's causal default) give the same
    visible keys; with a window, each query sees its last few keys only."""
    from transformers.masking_utils import sdpa_mask, eager_mask, sliding_window_causal_mask_function

    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    assert torch.equal(visible_keys(None, 6, 6), causal)
    assert torch.equal(visible_keys(None, 1, 6), torch.ones(1, 1, 1, 6, dtype=torch.bool))  # one new query
    pad = torch.tensor([[1, 1, 1, 1, 0, 0]]).bool()
    kw = dict(batch_size=1, q_length=6, kv_length=6, attention_mask=pad, allow_is_causal_skip=False)
    b, f = sdpa_mask(**kw), eager_mask(**kw, dtype=torch.float32)
    assert f.dtype == torch.float32 and torch.equal(visible_keys(b, 6, 6), visible_keys(f, 6, 6))
    assert torch.equal(visible_keys(b, 6, 6)[0, 0, :4, :4], causal[0, 0, :4, :4])
    assert not visible_keys(b, 6, 6)[0, 0, :, 4:].any()  # padding is never seen
    w = sdpa_mask(batch_size=1, q_length=6, kv_length=6, mask_function=sliding_window_causal_mask_function(2),
                  allow_is_causal_skip=False)
    assert visible_keys(w, 6, 6)[0, 0].sum(-1).tolist() == [1, 2, 2, 2, 2, 2]
    assert visible_keys(w, 6, 6, rows=slice(3, 5))[0, 0].tolist() == [[False, False, True, True, False, False],
                                                                     [False, False, False, True, True, False]]


def test_uniform_output_is_the_mean_of_visible_values():
    """The mean of V over each query's visible keys, written out: for the causal default, windows, padding,
    a batch whose rows differ, a query that sees nothing, and a mask that is not one run per query."""
    g = torch.Generator().manual_seed(0)
    value = torch.randn(2, 2, 7, 3, generator=g)  # [batch, kv_head, k, d_v]
    heads = torch.tensor([0, 3])  # 4 query heads over 2 kv heads: heads 0 and 3 read kv heads 0 and 1

    def explicit(visible):  # [batch, 1, q, k] -> [batch, q, n, d_v]
        w = visible.float()
        w = w / w.sum(-1, keepdim=True).clamp(min=1)
        return torch.stack([w[:, 0] @ value[:, h // 2] for h in heads.tolist()], dim=2)

    causal = torch.ones(7, 7, dtype=torch.bool).tril()[None, None].expand(2, 1, 7, 7)
    torch.testing.assert_close(uniform_output(value, heads, 2, None), explicit(causal), rtol=0, atol=1e-6)
    window = causal & ~torch.ones(7, 7, dtype=torch.bool).tril(-3)  # the last 3 keys
    padded = causal.clone()
    padded[1, :, :, 5:] = False  # row 1 has 5 real tokens
    padded[1, :, 0, :] = False  # and a query that sees nothing
    holes = causal.clone()
    holes[:, :, 6, 2] = False  # not one run: the fallback
    for visible in (window, padded, holes, causal[:1]):
        want = explicit(visible.expand(2, 1, 7, 7))
        torch.testing.assert_close(uniform_output(value, heads, 2, visible), want, rtol=0, atol=1e-6)
    assert uniform_output(value, heads, 2, padded)[1, 0].abs().max() == 0


def test_only_sdpa_and_eager_are_wrapped():
    from air_ray.engine.ablation import uniform_implementation

    assert uniform_implementation("sdpa") == "air_ray_uniform_sdpa"
    with pytest.raises(AirRayError, match="sdpa or eager"):
        uniform_implementation("flash_attention_2")


def test_heads_validation(uniform_attention):
    model, _ = tiny_pair("llama", [], uniform_attention)  # 3 layers x 4 heads
    for bad in [[(3, 0)], [(0, 4)], [(-1, 0)], [(0, -1)], [(0, 0), (7, 7)]]:
        with pytest.raises(AirRayError, match="does not exist"):
            HeadAblation(model, bad)
    abl = HeadAblation(model, [[2, 1], (0, 3), (2, 1)])  # lists accepted, duplicates merged, sorted
    assert abl.heads == [(0, 3), (2, 1)]
    assert abl.first_layer == 0
    assert HeadAblation(model, []).first_layer is None
    with HeadAblation(model, []).ablated():  # no heads: a no-op
        assert model.config._attn_implementation == "sdpa"
    with pytest.raises(AirRayError, match="one attention module with a layer_idx per decoder layer"):
        attention_modules(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------------
# the real default model

SMOL_HEADS = [(0, 4), (3, 0), (3, 1), (3, 2), (11, 7), (17, 3), (18, 6), (23, 8), (29, 0)]


@pytest.mark.slow
def test_query_ablation_equals_uniform_attention_smollm2(smol_ref, smol_tok, smol_fp32, uniform_attention):
    from transformers import AutoModelForCausalLM

    model = smol_fp32
    ref = AutoModelForCausalLM.from_pretrained(smol_ref.path, dtype=torch.float32,
                                               attn_implementation=uniform_attention(SMOL_HEADS)).eval()
    texts = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
             "How many clips did Natalia sell altogether in April and May? She sold 48/2 = 24 clips in May.",
             "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting."]
    enc = [smol_tok(t)["input_ids"] for t in texts]
    lengths = [len(e) for e in enc]
    assert 40 <= max(lengths) <= 64 and min(lengths) < max(lengths)
    ids = torch.full((2, max(lengths)), smol_tok.pad_token_id)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    before = snapshot(model)
    base = logits(model, ids, mask)
    with HeadAblation(model, SMOL_HEADS).ablated():
        ablated = logits(model, ids, mask)
    expected = logits(ref, ids, mask)
    zeroed = copy.deepcopy(model)
    zero_query_rows(zeroed, SMOL_HEADS)
    exported = logits(zeroed, ids, mask)
    d, d_export = max_diff(ablated, expected, mask), max_diff(exported, expected, mask)
    print(f"smollm2: max |dlogit| ablated vs uniform reference = {d:.2e}, exported form {d_export:.2e}, "
          f"vs base = {max_diff(ablated, base, mask):.2f}")
    assert d <= TOL and d_export <= TOL
    assert max_diff(ablated, base, mask) > 0.5
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
