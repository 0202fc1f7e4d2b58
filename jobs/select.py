"""`ray job submit --working-dir . -- python jobs/select.py --config jobs/configs/select.yaml` (or flags).

Thin: the options are those of `air-ray select`; everything happens in air_ray.
"""

import sys

import _jobpath  # noqa: F401  (first: fixes sys.path)
from air_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["select", *sys.argv[1:]]))
