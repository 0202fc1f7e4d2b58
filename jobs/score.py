"""`ray job submit --working-dir . -- python jobs/score.py --config jobs/configs/score.yaml` (or flags).

Thin: the options are those of `air-ray score`; everything happens in air_ray.
"""

import sys

import _jobpath  # noqa: F401  (first: fixes sys.path)
from air_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["score", *sys.argv[1:]]))
