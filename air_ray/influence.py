"""The Attention Influence Score, readable in one place.

Inputs are plain numbers: per response token, the loss (nats, -log p) under the base model and under the
reference model (critical heads disabled), the character start of each token in the response, and the
step spans. No torch, no Ray.

    per token:   d_t = L_ref(t) - L_base(t)
    per span S:  score(S) = (mean_{t in S} L_ref - mean_{t in S} L_base) / max(mean_{t in S} L_base, floor)
    sample:      S = all response tokens;  step: S = the tokens whose first character lies in the step
    weights:     over the n scored steps, w = n * softmax(step_scores / T) (they average 1); 1.0 for steps
                 with no token

The floor (``--base-loss-floor``, default 1e-6 nats) only keeps the division finite. A span the base model
already predicts almost perfectly (mean L_base near 0: memorised or trivially forced text) gets a score of
order L_ref / L_base: with L_base = 0.001 and L_ref = 0.05 that is 49, while typical scores are below 1. Ranked
globally such rows rise to the top, and inside a sample such a step takes nearly all of n * softmax(scores / T)
(the other steps' weights go to ~0). A floor of a few hundredths of a nat (e.g. 0.05) bounds that: below the
floor the score is the absolute increase L_ref - L_base divided by the floor.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

EPS = 1e-6  # the default floor of L_base


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


def step_weights(step_scores: Sequence[float | None], temperature: float = 1.0) -> list[float]:
    scored = [i for i, s in enumerate(step_scores) if s is not None]
    weights = [1.0] * len(step_scores)
    if scored:
        z = np.array([step_scores[i] for i in scored], dtype=np.float64) / temperature
        z = np.exp(z - z.max())
        w = len(scored) * z / z.sum()
        for i, wi in zip(scored, w):
            weights[i] = float(wi)
    return weights


def influence(
    loss_base: Sequence[float],
    loss_ref: Sequence[float],
    token_starts: Sequence[int],
    step_spans: Sequence[Sequence[int]],
    temperature: float = 1.0,
    floor: float = EPS,
) -> dict:
    """Sample and step scores of one response (``floor``: of L_base in every relative score). Returns the score
    columns of the output schema."""
    base = np.asarray(loss_base, dtype=np.float64)
    ref = np.asarray(loss_ref, dtype=np.float64)
    if base.shape != ref.shape or base.shape != (len(token_starts),) or base.size == 0:
        raise ValueError(f"need one base loss, one ref loss and one start per token, got {base.shape}, "
                         f"{ref.shape}, {len(token_starts)}")
    lb, lr = float(base.mean()), float(ref.mean())
    step_of = token_step_index(token_starts, step_spans)
    counts, scores = [], []
    for i in range(len(step_spans)):
        sel = step_of == i
        n = int(sel.sum())
        counts.append(n)
        scores.append(relative_divergence(float(ref[sel].mean()), float(base[sel].mean()), floor) if n else None)
    return {
        "loss_base": lb,
        "loss_ref": lr,
        "score": relative_divergence(lr, lb, floor),
        "step_spans": [[int(a), int(b)] for a, b in step_spans],
        "step_token_counts": counts,
        "step_scores": scores,
        "step_weights": step_weights(scores, temperature),
    }


def all_finite(*arrays) -> bool:
    return all(bool(np.isfinite(np.asarray(a, dtype=np.float64)).all()) for a in arrays)
