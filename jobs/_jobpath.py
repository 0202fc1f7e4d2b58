"""Imported first by every job: `python jobs/select.py` puts jobs/ on sys.path, where `select.py` would
shadow the standard library's `select` module. Swap jobs/ for the repository root."""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
sys.path.insert(0, os.path.dirname(_here))
