"""The Scorer against a plain two-copy reference on the real default model.

Reference: two separately loaded float32 models with eager attention; in the second, the critical heads
are disabled by the explicit uniform attention (rows of exactly 1/i, see conftest), not by zeroing query
rows. One sample at a time, full-vocabulary logits over the whole sequence, log_softmax losses at the
response positions, and the AIR formulas written out here (not air_ray.influence)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

HEADS = [(18, 6), (17, 3), (17, 4), (23, 2), (18, 7), (20, 6), (21, 8), (23, 7), (22, 7), (23, 8), (24, 4),
         (19, 5), (23, 1), (22, 4)]


@pytest.fixture(scope="module")
def scorer_fp32():
    from air_ray.engine.scorer import Scorer

    return Scorer(model="smollm2-135m", heads=HEADS, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def short_rows(scorer_fp32, gsm8k_rows):
    """The 8 shortest rows of the sample (CPU time: bf16 is slow here); different lengths, so the scorer's
    batch is padded."""
    prep = scorer_fp32.preparer
    order = sorted(range(len(gsm8k_rows)), key=lambda i: (len(prep.prepare(gsm8k_rows[i]).input_ids), i))
    return [gsm8k_rows[i] for i in order[:8]]


@pytest.fixture(scope="module")
def fp32_results(scorer_fp32, short_rows):
    return scorer_fp32.score(short_rows)


def chat_prompt_ids(tok, prompt):
    out = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def line_spans(text):
    spans, pos = [], 0
    for line in text.split("\n"):
        if line.strip():
            spans.append((pos, pos + len(line)))
        pos += len(line) + 1
    return spans


def response_losses(model, ids, n_prompt, entropy=False):
    """-log p(ids[t] | ids[:t]) for every response position t, from full logits (and, with ``entropy``, the
    entropy -sum p log p of each of those next-token distributions)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()  # [pos, vocab]
    logp = torch.log_softmax(logits, dim=-1)[n_prompt - 1 : len(ids) - 1]  # [response, vocab]
    targets = torch.tensor(ids[n_prompt:])
    nll = -logp.gather(1, targets[:, None])[:, 0].double().numpy()
    if entropy:
        return nll, -(logp.exp() * logp).sum(-1).double().numpy()
    return nll


def hand_scores(base, ref, starts, spans):
    def rel(r, b):
        return (r - b) / max(b, 1e-6)

    out = {"loss_base": float(np.mean(base)), "loss_ref": float(np.mean(ref))}
    out["score"] = rel(out["loss_ref"], out["loss_base"])
    counts, scores = [], []
    for a, b in spans:
        sel = [i for i, s in enumerate(starts) if a <= s < b]
        counts.append(len(sel))
        scores.append(rel(np.mean(ref[sel]), np.mean(base[sel])) if sel else None)
    deltas = [float(np.mean(ref[sel] - base[sel])) if n else None
              for n, sel in ((c, [i for i, s in enumerate(starts) if a <= s < b]) for c, (a, b) in zip(counts, spans))]
    out["step_token_counts"] = counts
    out["step_scores"] = scores
    out["step_weights"] = bounded_by_hand(deltas, counts)
    return out


def bounded_by_hand(deltas, counts, strength=0.3, lo=0.5, hi=2.0):
    """The default step weights, the slow way: z of each step's mean divergence (token-weighted within the row),
    1 + strength z, then the shift c (found by bisection) that makes the token-weighted mean of clip(1 + strength z
    + c, lo, hi) exactly 1."""
    idx = [i for i, (d, n) in enumerate(zip(deltas, counts)) if n]
    w = [1.0] * len(deltas)
    if len(idx) < 2:
        return w
    n = np.array([counts[i] for i in idx], float)
    d = np.array([deltas[i] for i in idx])
    mu = (n * d).sum() / n.sum()
    sd = math.sqrt((n * (d - mu) ** 2).sum() / n.sum())
    if sd == 0:
        return w
    raw = 1 + strength * (d - mu) / sd
    a, b = -10.0, 10.0
    for _ in range(200):
        c = (a + b) / 2
        if (n * np.clip(raw + c, lo, hi)).sum() < n.sum():
            a = c
        else:
            b = c
    for i, x in zip(idx, np.clip(raw + (a + b) / 2, lo, hi)):
        w[i] = float(x)
    return w


@pytest.fixture(scope="module")
def reference_models(smol_ref, uniform_attention):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smol_ref.path, dtype=torch.float32, attn_implementation="eager")
    ref = AutoModelForCausalLM.from_pretrained(smol_ref.path, dtype=torch.float32,
                                               attn_implementation=uniform_attention(HEADS))
    assert base.config._attn_implementation == "eager"
    return base.eval(), ref.eval()


def test_scorer_matches_two_copy_reference(fp32_results, short_rows, reference_models, smol_tok):
    # the scorer saw all 8 rows in one padded batch; compare 6 of them one at a time
    rows, got = short_rows[:6], fp32_results[:6]
    assert len({len(r["prompt"]) + len(r["response"]) for r in rows}) > 1
    base_model, ref_model = reference_models
    deltas = {"score": 0.0, "step": 0.0, "loss": 0.0}
    for row, g in zip(rows, got):
        p_ids = chat_prompt_ids(smol_tok, row["prompt"])
        enc = smol_tok(row["response"], add_special_tokens=False, return_offsets_mapping=True)
        ids = p_ids + list(enc["input_ids"])
        starts = [a for a, _ in enc["offset_mapping"]]
        spans = line_spans(row["response"])
        lb, ent = response_losses(base_model, ids, len(p_ids), entropy=True)
        lr = response_losses(ref_model, ids, len(p_ids))
        want = hand_scores(lb, lr, starts, spans)

        assert g["id"] == row["id"] and g["domain"] == row["domain"]
        assert g["n_prompt_tokens"] == len(p_ids)
        assert g["n_response_tokens"] == len(starts)
        assert [tuple(s) for s in g["step_spans"]] == spans
        assert g["step_token_counts"] == want["step_token_counts"]
        assert g["loss_base"] == pytest.approx(want["loss_base"], abs=1e-3)
        assert g["loss_ref"] == pytest.approx(want["loss_ref"], abs=1e-3)
        assert g["score"] == pytest.approx(want["score"], abs=2e-3)
        assert g["entropy_base"] == pytest.approx(float(np.mean(ent)), abs=1e-3)  # the heuristic baseline
        assert want["score"] > 0  # disabling these heads hurts
        for gs, ws in zip(g["step_scores"], want["step_scores"]):
            assert (gs is None) == (ws is None)
            if ws is not None:
                assert gs == pytest.approx(ws, abs=5e-3)
                deltas["step"] = max(deltas["step"], abs(gs - ws))
        assert g["step_weights"] == pytest.approx(want["step_weights"], abs=5e-3)
        deltas["score"] = max(deltas["score"], abs(g["score"] - want["score"]))
        deltas["loss"] = max(deltas["loss"], abs(g["loss_base"] - want["loss_base"]),
                             abs(g["loss_ref"] - want["loss_ref"]))
    print(f"\nscorer vs two-copy reference: max |d score| = {deltas['score']:.2e}, max |d step score| = "
          f"{deltas['step']:.2e}, max |d mean loss| = {deltas['loss']:.2e}; scores "
          f"{[round(g['score'], 4) for g in got]}")


def spearman(a, b):
    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        for v in np.unique(x):  # average ranks of ties
            tie = x == v
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / math.sqrt((ra * ra).sum() * (rb * rb).sum()))


def test_spearman_helper():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8207826816681233)  # scipy's value


def test_bf16_ranks_like_fp32(scorer_fp32, gsm8k_rows):
    """bf16 (what CUDA runs) ranks samples like float32. bf16 matmuls are emulated on this CPU, so keep it
    small: the 8 shortest rows, in raw format (no chat template: ~90 instead of ~120 tokens a row)."""
    from air_ray.data.rows import RowPreparer
    from air_ray.engine.scorer import Scorer

    raw = RowPreparer(scorer_fp32.tokenizer, format="raw")
    prepared = sorted((raw.prepare(r) for r in gsm8k_rows), key=lambda p: (len(p.input_ids), p.id))[:8]
    fp32 = [r["score"] for r in scorer_fp32.score_prepared(prepared)]
    bf16_scorer = Scorer(model="smollm2-135m", heads=HEADS, dtype="bfloat16", device="cpu", format="raw")
    assert next(bf16_scorer.model.parameters()).dtype == torch.bfloat16
    bf16 = [r["score"] for r in bf16_scorer.score_prepared(prepared)]
    rho = spearman(fp32, bf16)
    dmax = max(abs(a - b) for a, b in zip(fp32, bf16))
    print(f"\nbf16 vs fp32 on {len(prepared)} rows ({sum(len(p.input_ids) for p in prepared)} tokens): "
          f"spearman {rho:.3f}, max |d score| {dmax:.4f}\n"
          f"fp32 {[round(x, 4) for x in fp32]}\nbf16 {[round(x, 4) for x in bf16]}")
    assert rho >= 0.9
    assert dmax <= 0.05
