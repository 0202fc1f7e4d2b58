"""`ray job submit --working-dir . -- python jobs/rescore.py --config jobs/configs/rescore.yaml` (on a schedule).

Thin: the options are those of `air-ray rescore`; everything happens in air_ray. The last line printed is the
run's JSON summary.
"""

import sys

import _jobpath  # noqa: F401  (first: fixes sys.path)
from air_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["rescore", *sys.argv[1:]]))
