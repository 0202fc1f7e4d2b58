"""Step-weighted fine-tuning as a Ray job (the options are those of `air-ray train`), e.g.

    ray job submit --working-dir . -- python jobs/train_weighted_sft.py --selection out/run/selection --scores out/run --input air_ray/data/gsm8k_sample.jsonl --output out/sft

Thin: each response token's loss is weighted by its step's weight from the scores; everything happens in
air_ray.training.
"""

import sys

import _jobpath  # noqa: F401  (first: fixes sys.path; jobs/select.py would shadow the stdlib select)
from air_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
