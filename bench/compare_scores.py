"""Are two scoring runs' scores the same, bit for bit? ``python bench/compare_scores.py RUN_A RUN_B [--ignore COL]``

Reads every score partition of both runs (``air_ray.outputs.layout``), pairs rows by id and compares every
column exactly (floats by their bits: NaN equals NaN, -0.0 differs from 0.0); prints a summary and exits 1 on
any difference. Used for the redesign's "scores unchanged" check (issue #13)."""

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


def rows(uri: str, ignore: set[str]) -> dict:
    from air_ray.outputs.layout import SCORES, open_scores

    table = open_scores(uri, "compare").table([c for c in SCORES.names if c not in ignore])
    return {r["id"]: r for r in table.to_pylist()}


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--ignore", nargs="*", default=[], help="columns not compared (e.g. source: the input path)")
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
            if _bits(va) != _bits(vb):
                diffs.append(f"{rid}.{col}: {va!r} != {vb!r}")
                if isinstance(va, float) and isinstance(vb, float) and math.isfinite(va) and math.isfinite(vb):
                    max_abs = max(max_abs, abs(va - vb))
    print(f"{len(ra)} rows in {a}, {len(rb)} rows in {b}, {cols} values compared: "
          f"{'identical (bit for bit)' if not diffs else f'{len(diffs)} differences, max |diff| {max_abs:.3g}'}")
    for d in diffs[:20]:
        print("  " + d)
    return 1 if diffs else 0


if __name__ == "__main__":
    raise SystemExit(main())
