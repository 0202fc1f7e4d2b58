"""air_ray: post-training data selection for reasoning by attention head influence (AIR).

The parts, one folder each (README, "Layout"), lowest first: ``influence`` (the math), ``data`` (the data
contract), ``models``, ``store`` (everything a run persists and reads back), ``config`` (every option, declared
once), ``engine`` (ablation, losses, backends, ``Scorer``), ``heads`` (detection), ``outputs`` (select, export,
report), ``training``, ``pipeline`` (the chain of stages, its executors, the Ray wiring), ``evaluation`` and ``cli``;
``errors`` is the one user-facing exception, ``fsio`` atomic writes on any filesystem, ``version`` the package's
version.
"""

__all__ = ["Scorer", "AirRayError", "__version__"]

from air_ray.errors import AirRayError
from air_ray.version import __version__


def __getattr__(name):  # lazy: `import air_ray` must not import torch
    if name == "Scorer":
        from air_ray.engine.scorer import Scorer

        return Scorer
    raise AttributeError(name)
