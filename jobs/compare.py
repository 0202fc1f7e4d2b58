"""Does the AIR selection train a better student? As a Ray job (the options are those of `air-ray compare`), e.g.

    ray job submit --working-dir . -- python jobs/compare.py --scores out/run --input data/pool.jsonl --eval-input data/heldout.jsonl --top-k 64 --seeds 3

Thin: selection, training and evaluation happen in air_ray.evaluation.compare (on the node the job runs on).
"""

import sys

import _jobpath  # noqa: F401  (first: fixes sys.path; jobs/select.py would shadow the stdlib select)
from air_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["compare", *sys.argv[1:]]))
