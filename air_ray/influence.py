"""The Attention Influence Score, readable in one place.

Inputs are plain numbers: per response token, the loss (nats, -log p) under the base model and under the
reference model (critical heads disabled), the character start of each token in the response, the step spans,
and (optionally) which response tokens copy the prompt. No torch, no Ray.

    per token:   d_t = L_ref(t) - L_base(t)
    per span S:  score(S) = (mean_{t in S} L_ref - mean_{t in S} L_base) / max(mean_{t in S} L_base, floor)
    sample:      S = all response tokens;  step: S = the tokens whose first character lies in the step
    delta:       mean_{t in S} d_t  (the absolute divergence, nats per token; ``select --by delta``)
    step weights (``StepWeighting``), over the scored steps i (n_i > 0 tokens, mean divergence d_i):
      bounded (default): z_i = (d_i - mu) / sigma, mu and sigma the token-weighted mean and sd of d_i in the row;
                 w_i = clip(1 + strength * z_i + c, w_min, w_max), c the shift that makes the token-weighted
                 mean weight sum_i n_i w_i / sum_i n_i exactly 1 (c = 0 unless a weight is clipped)
      softmax:   w = n * softmax(step_scores / T) (they average 1 over steps, not tokens)
    1.0 for steps with no token, and for every step of a row whose steps all have the same divergence.
    effective token share of a row = (sum_i n_i w_i)^2 / (sum_i n_i w_i^2) / sum_i n_i  (1.0: uniform weights)

Why bounded is the default: step *scores* divide by L_base and are heavy-tailed (on the default model and GSM8K:
p99 14.8, max 44), so under softmax the top step took median 48 % of a row's weight (p90 99 %), the effective
token share fell to 0.05 at p10, and the top step was the trivial ``#### N`` line in 59 % of rows. The bounded
rule standardises the absolute divergence within the row: without clipping the effective share is exactly
1 / (1 + strength^2) (0.92 at the default 0.3), and a step's weight stays within [w_min, w_max].

The floor (``--base-loss-floor``, default 1e-6 nats) only keeps the division finite. A span the base model
already predicts almost perfectly (mean L_base near 0) gets a score of order L_ref / L_base: with L_base = 0.001
and L_ref = 0.05 that is 49, while typical scores are below 1. A floor of a few hundredths of a nat (e.g. 0.05)
bounds that: below the floor the score is the absolute increase L_ref - L_base divided by the floor.

Copy tokens: response token t copies the prompt when the pair (token t-1, token t) occurs, in that order, in the
prompt's token ids: the pattern a retrieval (induction) head completes, attending from t-1 to the prompt
position after the earlier occurrence of token t-1 and copying the token there. ``n_copy_tokens`` and
``delta_copy`` (mean d_t over those tokens) show whether disabling the heads hits retrieval more than the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

EPS = 1e-6  # the default floor of L_base
WEIGHTINGS = ("bounded", "softmax")


@dataclass(frozen=True)
class StepWeighting:
    """How step weights are made from a row's steps (see the module doc)."""

    rule: str = "bounded"
    strength: float = 0.3  # bounded: lambda, the weight change per standard deviation of step divergence
    w_min: float = 0.5  # bounded: the smallest weight
    w_max: float = 2.0  # bounded: the largest weight
    temperature: float = 1.0  # softmax: T

    def __post_init__(self):
        if self.rule not in WEIGHTINGS:
            raise ValueError(f"step weighting {self.rule!r}: expected one of {', '.join(WEIGHTINGS)}")
        if not (self.strength >= 0 and 0 <= self.w_min <= 1 <= self.w_max and self.temperature > 0):
            raise ValueError("step weighting: need strength >= 0, 0 <= w_min <= 1 <= w_max and temperature > 0")


def relative_divergence(loss_ref_mean: float, loss_base_mean: float, floor: float = EPS) -> float:
    return (loss_ref_mean - loss_base_mean) / max(loss_base_mean, floor)


def token_step_index(token_starts: Sequence[int], step_spans: Sequence[Sequence[int]]) -> np.ndarray:
    """For each token, the index of the step holding its first character, or -1 for none."""
    starts = np.asarray(token_starts, dtype=np.int64)
    if not len(step_spans):
        return np.full(len(starts), -1, dtype=np.int64)
    spans = np.asarray(step_spans, dtype=np.int64)
    idx = np.searchsorted(spans[:, 0], starts, side="right") - 1
    inside = (idx >= 0) & (starts < spans[np.clip(idx, 0, None), 1])
    return np.where(inside, idx, -1)


def softmax_weights(step_scores: Sequence[float | None], temperature: float = 1.0) -> list[float]:
    """``n * softmax(scores / T)`` over the scored steps (score not None); 1.0 for the others."""
    scored = [i for i, s in enumerate(step_scores) if s is not None]
    weights = [1.0] * len(step_scores)
    if scored:
        z = np.array([step_scores[i] for i in scored], dtype=np.float64) / temperature
        z = np.exp(z - z.max())
        w = len(scored) * z / z.sum()
        for i, wi in zip(scored, w):
            weights[i] = float(wi)
    return weights


def bounded_weights(step_deltas: Sequence[float | None], step_token_counts: Sequence[int], strength: float = 0.3,
                    w_min: float = 0.5, w_max: float = 2.0) -> list[float]:
    """``clip(1 + strength * z + c, w_min, w_max)`` over the scored steps (count > 0), z the step's mean divergence
    standardised within the row (token-weighted), c the shift that makes the token-weighted mean weight exactly 1;
    1.0 for the other steps (see the module doc)."""
    weights = [1.0] * len(step_deltas)
    scored = [i for i, (d, n) in enumerate(zip(step_deltas, step_token_counts)) if n > 0 and d is not None]
    if len(scored) < 2:
        return weights
    d = np.array([step_deltas[i] for i in scored], dtype=np.float64)
    n = np.array([step_token_counts[i] for i in scored], dtype=np.float64)
    total = n.sum()
    mu = float((n * d).sum() / total)
    sigma = float(np.sqrt((n * (d - mu) ** 2).sum() / total))
    if not sigma > 1e-12 * max(1.0, abs(mu)):
        return weights
    raw = 1.0 + strength * (d - mu) / sigma
    if raw.min() >= w_min and raw.max() <= w_max:
        w = raw
    else:
        w = np.clip(raw + _mean_one_shift(raw, n, w_min, w_max), w_min, w_max)
    for i, wi in zip(scored, w):
        weights[i] = float(wi)
    return weights


def _mean_one_shift(raw: np.ndarray, n: np.ndarray, lo: float, hi: float) -> float:
    """The c with sum(n * clip(raw + c, lo, hi)) == sum(n): f(c) is continuous, non-decreasing and piecewise
    linear with breakpoints lo - raw_i and hi - raw_i, so the root lies on one linear piece between two of
    them (f(-inf) = lo * N <= N <= hi * N = f(+inf) because lo <= 1 <= hi)."""
    target = float(n.sum())

    def f(c: float) -> float:
        return float((n * np.clip(raw + c, lo, hi)).sum())

    points = np.unique(np.concatenate([lo - raw, hi - raw]))
    values = np.array([f(c) for c in points])
    j = int(np.searchsorted(values, target))  # values[j - 1] < target <= values[j]
    if j == 0:
        return float(points[0])
    if j == len(points):
        return float(points[-1])
    c0, c1, f0, f1 = points[j - 1], points[j], values[j - 1], values[j]
    return float(c0 + (target - f0) * (c1 - c0) / (f1 - f0)) if f1 > f0 else float(c0)


def step_weights(step_scores: Sequence[float | None], step_deltas: Sequence[float | None],
                 step_token_counts: Sequence[int], weighting: StepWeighting = StepWeighting()) -> list[float]:
    if weighting.rule == "softmax":
        return softmax_weights(step_scores, weighting.temperature)
    return bounded_weights(step_deltas, step_token_counts, weighting.strength, weighting.w_min, weighting.w_max)


def effective_token_share(step_token_counts: Sequence[int], step_weights: Sequence[float]) -> float:
    """``(sum n w)^2 / (sum n w^2) / sum n`` over the steps of one row: the share of its step tokens a trainer
    effectively learns from (1.0 for uniform weights, 1/k when one of k equal steps takes all the weight); 1.0 for
    a row with no scored step."""
    n = np.asarray(step_token_counts, dtype=np.float64)
    w = np.asarray(step_weights, dtype=np.float64)
    total = n.sum()
    if not len(n) or total <= 0:
        return 1.0
    sq = float((n * w * w).sum())
    return float((n * w).sum() ** 2 / sq / total) if sq > 0 else 0.0


def copy_mask(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> np.ndarray:
    """For each response token t, whether (response token t-1, token t) occurs in that order in the prompt (the
    first response token: never)."""
    out = np.zeros(len(response_ids), dtype=bool)
    p = np.asarray(prompt_ids, dtype=np.int64)
    r = np.asarray(response_ids, dtype=np.int64)
    if len(p) < 2 or len(r) < 2:
        return out
    pairs = set(zip(p[:-1].tolist(), p[1:].tolist()))
    out[1:] = [pair in pairs for pair in zip(r[:-1].tolist(), r[1:].tolist())]
    return out


def influence(
    loss_base: Sequence[float],
    loss_ref: Sequence[float],
    token_starts: Sequence[int],
    step_spans: Sequence[Sequence[int]],
    weighting: StepWeighting = StepWeighting(),
    floor: float = EPS,
    copied: Sequence[bool] | None = None,
) -> dict:
    """Sample and step scores of one response (``floor``: of L_base in every relative score; ``copied``: which
    response tokens copy the prompt, see ``copy_mask``). Returns the score columns of the output schema."""
    base = np.asarray(loss_base, dtype=np.float64)
    ref = np.asarray(loss_ref, dtype=np.float64)
    if base.shape != ref.shape or base.shape != (len(token_starts),) or base.size == 0:
        raise ValueError(f"need one base loss, one ref loss and one start per token, got {base.shape}, "
                         f"{ref.shape}, {len(token_starts)}")
    lb, lr = float(base.mean()), float(ref.mean())
    step_of = token_step_index(token_starts, step_spans)
    counts, scores, deltas = [], [], []
    for i in range(len(step_spans)):
        sel = step_of == i
        n = int(sel.sum())
        counts.append(n)
        b, r = (float(base[sel].mean()), float(ref[sel].mean())) if n else (None, None)
        scores.append(relative_divergence(r, b, floor) if n else None)
        deltas.append(float((ref[sel] - base[sel]).mean()) if n else None)
    out = {
        "loss_base": lb,
        "loss_ref": lr,
        "score": relative_divergence(lr, lb, floor),
        "step_spans": [[int(a), int(b)] for a, b in step_spans],
        "step_token_counts": counts,
        "step_scores": scores,
        "step_weights": step_weights(scores, deltas, counts, weighting),
    }
    if copied is not None:
        mask = np.asarray(copied, dtype=bool)
        if mask.shape != base.shape:
            raise ValueError(f"need one copy flag per token, got {mask.shape} for {base.shape}")
        out["n_copy_tokens"] = int(mask.sum())
        out["delta_copy"] = float((ref[mask] - base[mask]).mean()) if mask.any() else None
    return out


def all_finite(*arrays) -> bool:
    return all(bool(np.isfinite(np.asarray(a, dtype=np.float64)).all()) for a in arrays)
