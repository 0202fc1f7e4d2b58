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


def two_sample(values, null, lower_is_better: bool, permutations: int = 20_000, seed: int = 0) -> dict:
    """Whether the students of a strategy with subsets of its own (``values``, e.g. compare's clean_random) do
    better than those of a null (``null``, the random subsets): the difference of the means on the "better" scale
    (positive = better), and the one-sided permutation p-value of "better": (1 + relabellings whose difference is at
    least as large) / (1 + ``permutations``), the students' labels shuffled with a seeded generator (every
    relabelling exactly when there are no more than ``permutations`` of them). Welch's t beside it."""
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    b = np.asarray([v for v in null if v is not None and math.isfinite(v)], np.float64)
    out = {"n": len(a), "n_null": len(b), "diff": None, "p_better": None, "t": None, "permutations": 0}
    if len(a) < 2 or len(b) < 2:
        return out
    sign = -1.0 if lower_is_better else 1.0
    a, b = sign * a, sign * b
    both = np.concatenate([a, b])
    observed = a.mean() - b.mean()
    total = math.comb(len(both), len(a))
    if total <= permutations:  # every relabelling (the observed one among them)
        from itertools import combinations

        idx = np.arange(len(both))
        diffs = []
        for pick in combinations(range(len(both)), len(a)):
            mask = np.isin(idx, pick)
            diffs.append(both[mask].mean() - both[~mask].mean())
        diffs = np.asarray(diffs)
        p = float((diffs >= observed - 1e-12).sum()) / len(diffs)
        n_perm = len(diffs)
    else:
        rng = np.random.default_rng(seed)
        hits = 0
        for _ in range(permutations):
            perm = rng.permutation(both)
            hits += perm[:len(a)].mean() - perm[len(a):].mean() >= observed - 1e-12
        p = float((1 + hits) / (1 + permutations))
        n_perm = permutations
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    out.update(diff=float(observed), p_better=p, t=float(observed / se) if se > 0 else None, permutations=n_perm)
    return out


def paired(values, null, lower_is_better: bool, permutations: int = 20_000, seed: int = 0) -> dict:
    """Whether the students of a strategy built *from* the null's subsets (``values[j]`` made from ``null[j]``, e.g.
    compare's clean_random subset j: random subset j's clean rows, topped up with the next clean rows of the same
    seeded order) do better than their own null students: the mean of the paired differences on the "better" scale
    (positive = better), and the one-sided sign-flip p-value of "better": (1 + sign flips whose mean is at least as
    large) / (1 + ``permutations``), every flip exactly when 2^n is no more than ``permutations``. Pairs where either
    value is missing are left out. The paired t beside it. Pairing removes the spread between subsets that the two
    students of a pair share, so it sees an effect that ``two_sample`` cannot."""
    pairs = [(a, b) for a, b in zip(values, null) if a is not None and b is not None
             and math.isfinite(a) and math.isfinite(b)]
    out = {"n_pairs": len(pairs), "diff": None, "sd": None, "p_better": None, "t": None, "permutations": 0}
    if len(pairs) < 2:
        return out
    d = np.asarray([b - a if lower_is_better else a - b for a, b in pairs], np.float64)  # positive: values better
    observed = d.mean()
    n = len(d)
    if 2 ** n <= permutations:  # every sign flip (the observed one among them)
        signs = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1) * 2 - 1  # [flips, pairs]
        means = (signs * d).mean(axis=1)
        p = float((means >= observed - 1e-12).sum()) / len(means)
        n_perm = len(means)
    else:
        rng = np.random.default_rng(seed)
        means = (rng.choice([-1.0, 1.0], size=(permutations, n)) * d).mean(axis=1)
        p = float((1 + (means >= observed - 1e-12).sum()) / (1 + permutations))
        n_perm = permutations
    sd = float(d.std(ddof=1))
    out.update(diff=float(observed), sd=sd, p_better=p, t=float(observed / (sd / math.sqrt(n))) if sd > 0 else None,
               permutations=n_perm)
    return out
