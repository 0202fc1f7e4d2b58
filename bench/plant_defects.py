"""A pool with planted defects for the evidence recipes (bench/compare_cpu.sh, bench/compare_gpu.sh): a seeded share of
the rows of a GSM8K pool replaced by corrupted copies (air_ray.evaluation.defects: wrong_answer, wrong_step, shuffled,
truncated in equal parts), each row marked in `air_defect` (null when clean) and carrying its original response as
`solution`.

    python bench/plant_defects.py POOL.jsonl[.gz] OUT.jsonl [--frac 0.25] [--seed 0]
"""

from __future__ import annotations

import argparse
import json

from air_ray.evaluation.defects import write_planted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source")
    ap.add_argument("output")
    ap.add_argument("--frac", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(json.dumps(write_planted(a.source, a.output, a.frac, a.seed)))


if __name__ == "__main__":
    main()
