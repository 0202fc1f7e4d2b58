"""Are two scoring runs' scores the same? ``python bench/compare_scores.py RUN_A RUN_B [--ignore COL] [--atol X]``

Reads every score partition of both runs (``air_ray.store``), pairs rows by id and compares every
column exactly (floats by their bits: NaN equals NaN, -0.0 differs from 0.0), or with ``--atol X`` floats (also
inside lists) within X of each other; prints a summary with the largest float difference and exits 1 on any
difference. Used for the "scores unchanged" checks (issue #13: bit for bit; issue #14: --atol 1e-6)."""

from __future__ import annotations

import math
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _bits(x):
    if isinstance(x, float):
        return struct.pack("<d", x)
    if isinstance(x, list):
        return [_bits(v) for v in x]
    return x


def _floats(x):
    """The floats of a value (a float, or a list of them at any depth), None when it holds anything else."""
    if isinstance(x, float):
        return [x]
    if isinstance(x, list):
        out = []
        for v in x:
            f = _floats(v)
            if f is None:
                return None
            out += f
        return out
    return None


def _max_abs(va, vb) -> float | None:
    """max |a - b| over the floats of two values of the same shape (None: not comparable as floats)."""
    fa, fb = _floats(va), _floats(vb)
    if fa is None or fb is None or _shape(va) != _shape(vb):
        return None
    if any(math.isnan(a) != math.isnan(b) for a, b in zip(fa, fb)):
        return math.inf
    return max((abs(a - b) for a, b in zip(fa, fb) if not math.isnan(a)), default=0.0)


def _shape(x):
    """The nesting of lists in a value, every float replaced by "f"."""
    return [_shape(v) for v in x] if isinstance(x, list) else ("f" if isinstance(x, float) else x)


def rows(uri: str, ignore: set[str]) -> dict:
    from air_ray.store.schemas import SCORES
    from air_ray.store.scores import open_scores

    table = open_scores(uri, "compare").table([c for c in SCORES.names if c not in ignore])
    return {r["id"]: r for r in table.to_pylist()}


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--ignore", nargs="*", default=[], help="columns not compared (e.g. source: the input path)")
    ap.add_argument("--atol", type=float, default=None, help="floats equal within this (default: bit for bit)")
    args = ap.parse_args(argv)
    a, b = args.a, args.b
    ra, rb = rows(a, set(args.ignore)), rows(b, set(args.ignore))
    diffs = []
    if set(ra) != set(rb):
        diffs.append(f"ids differ: {len(set(ra) ^ set(rb))} not in both")
    cols = 0
    max_abs = 0.0
    for rid in sorted(set(ra) & set(rb)):
        for col, va in ra[rid].items():
            vb = rb[rid][col]
            cols += 1
            if _bits(va) == _bits(vb):
                continue
            d = _max_abs(va, vb)
            if d is not None:
                max_abs = max(max_abs, d)
            if args.atol is None or d is None or not d <= args.atol:
                diffs.append(f"{rid}.{col}: {va!r} != {vb!r}")
    same = "identical (bit for bit)" if args.atol is None else f"equal within {args.atol:g}"
    print(f"{len(ra)} rows in {a}, {len(rb)} rows in {b}, {cols} values compared: "
          f"{same if not diffs else f'{len(diffs)} differences'}, max |diff| {max_abs:.3g}")
    for d in diffs[:20]:
        print("  " + d)
    return 1 if diffs else 0


if __name__ == "__main__":
    raise SystemExit(main())
