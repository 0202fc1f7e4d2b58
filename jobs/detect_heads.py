"""`ray job submit --working-dir . -- python jobs/detect_heads.py --config jobs/configs/detect_heads.yaml` (or flags).

Thin: the options are those of `air-ray heads`; everything happens in air_ray (the detection itself runs as a
Ray task with the GPUs it asks for, `--gpus-per-worker`, on a worker, not in this driver).
"""

import sys

import _jobpath  # noqa: F401  (first: fixes sys.path)
from air_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["heads", *sys.argv[1:]]))
