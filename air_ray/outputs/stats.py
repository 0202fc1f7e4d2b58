"""Rank statistics on numpy arrays, shared by select (the bias audit), report (placebo agreement) and compare (the
random null): Spearman's rho with average ranks for ties, top-k overlap, and where a value falls in a null
distribution. No Python object per row."""

from __future__ import annotations

import math

import numpy as np


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` ascending, ties given their average rank."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.concatenate(([True], xs[1:] != xs[:-1])))
    ends = np.concatenate((starts[1:], [len(xs)]))
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based positions starts+1 .. ends
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(x, y) -> float | None:
    """Spearman's rank correlation of the pairs where both are finite; None with fewer than 3 such pairs or a
    constant side."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return None
    rx, ry = average_ranks(x[ok]), average_ranks(y[ok])
    rx -= rx.mean()
    ry -= ry.mean()
    den = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else None


def top_overlap(a: np.ndarray, b: np.ndarray, k: int) -> int:
    """How many of the ``k`` highest of ``a`` are among the ``k`` highest of ``b`` (rows aligned; ties broken by
    position)."""
    k = min(k, len(a))
    if k <= 0:
        return 0
    top_a = np.argsort(-np.asarray(a, np.float64), kind="stable")[:k]
    top_b = np.argsort(-np.asarray(b, np.float64), kind="stable")[:k]
    return int(len(np.intersect1d(top_a, top_b)))


def null_position(value: float, null, lower_is_better: bool) -> dict:
    """Where ``value`` falls in a null distribution (e.g. the metric of students trained on random subsets):

    * ``percentile``: 100 x (nulls better than ``value`` + half the ties) / N, on the "better" scale: 100 means
      better than every null draw, 0 worse than every one;
    * ``p_better``: (1 + nulls at least as good) / (N + 1), the one-sided empirical p-value of "better than the
      null" (its smallest possible value is 1 / (N + 1)); ``p_worse`` likewise for "worse";
    * ``z``: (value - null mean) / null sd, signed so that positive is better.
    """
    null = np.asarray([v for v in null if v is not None and math.isfinite(v)], np.float64)
    n = len(null)
    if value is None or not math.isfinite(value) or n == 0:
        return {"n": n, "percentile": None, "p_better": None, "p_worse": None, "z": None}
    sign = -1.0 if lower_is_better else 1.0  # on the "better" scale: higher is better
    v, nl = sign * value, sign * null
    below, ties = int((nl < v).sum()), int((nl == v).sum())
    sd = float(nl.std(ddof=1)) if n > 1 else 0.0
    return {"n": n, "percentile": 100.0 * (below + 0.5 * ties) / n,
            "p_better": (1 + int((nl >= v).sum())) / (n + 1), "p_worse": (1 + int((nl <= v).sum())) / (n + 1),
            "z": (v - float(nl.mean())) / sd if sd > 0 else None}
