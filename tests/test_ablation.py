"""QueryAblation (zeroing the query rows of the critical heads) must compute exactly the uniform ablation:
the same logits as an explicit eager attention in which the disabled heads' rows are 1/i over the causal
prefix. Checked on tiny random float32 Llama / Qwen2 / Qwen3 / Mistral models and on SmolLM2."""

from __future__ import annotations

import pytest
import torch

from air_ray.engine.ablation import QueryAblation, attention_modules
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


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_query_ablation_equals_uniform_attention_tiny(arch, uniform_attention):
    model, ref = tiny_pair(arch, TINY_HEADS, uniform_attention)
    if arch in ("qwen2", "qwen3"):
        assert model.model.layers[0].self_attn.q_proj.bias.abs().min() > 0
    if arch == "qwen3":
        assert hasattr(model.model.layers[0].self_attn, "q_norm")
    ids, mask = batch(model.config.vocab_size, [SEQ, SEQ - 13])
    base = logits(model, ids, mask)
    with QueryAblation(model, TINY_HEADS).ablated() as m:
        assert m is model
        ablated = logits(model, ids, mask)
    expected = logits(ref, ids, mask)
    d = max_diff(ablated, expected, mask)
    print(f"{arch}: max |dlogit| ablated vs uniform reference = {d:.2e}, "
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
    with QueryAblation(model, TINY_HEADS).ablated():
        a1 = logits(model, one[0], None)
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
def test_weights_restored_and_kv_untouched(arch, uniform_attention):
    model, _ = tiny_pair(arch, [], uniform_attention)
    heads = [(0, 3), (2, 0), (2, 1)]
    before = snapshot(model)
    abl = QueryAblation(model, heads)
    H, KV, d = model.config.num_attention_heads, model.config.num_key_value_heads, abl.head_dim
    assert KV < H  # grouped-query attention: k/v rows are shared
    with abl.ablated():
        assert abl.active
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
    assert not abl.active
    after = snapshot(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    # restored also when the pass raises, and enable/disable are idempotent
    with pytest.raises(RuntimeError):
        with abl.ablated():
            abl.enable()
            raise RuntimeError("boom")
    abl.disable()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # repeated use gives the same ablated model
    ids, mask = batch(model.config.vocab_size, [16])
    with abl.ablated():
        a = logits(model, ids, mask)
    with abl.ablated():
        b = logits(model, ids, mask)
    assert torch.equal(a, b)


def test_heads_validation(uniform_attention):
    model, _ = tiny_pair("llama", [], uniform_attention)  # 3 layers x 4 heads
    for bad in [[(3, 0)], [(0, 4)], [(-1, 0)], [(0, -1)], [(0, 0), (7, 7)]]:
        with pytest.raises(AirRayError, match="does not exist"):
            QueryAblation(model, bad)
    abl = QueryAblation(model, [[2, 1], (0, 3), (2, 1)])  # lists accepted, duplicates merged, sorted
    assert abl.heads == [(0, 3), (2, 1)]
    assert abl.first_layer == 0
    assert QueryAblation(model, []).first_layer is None
    with QueryAblation(model, []).ablated():  # no heads: a no-op
        pass
    with pytest.raises(AirRayError, match="self_attn.q_proj"):
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
    with QueryAblation(model, SMOL_HEADS).ablated():
        ablated = logits(model, ids, mask)
    expected = logits(ref, ids, mask)
    d = max_diff(ablated, expected, mask)
    print(f"smollm2: max |dlogit| ablated vs uniform reference = {d:.2e}, vs base = "
          f"{max_diff(ablated, base, mask):.2f}")
    assert d <= TOL
    assert max_diff(ablated, base, mask) > 0.5
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
