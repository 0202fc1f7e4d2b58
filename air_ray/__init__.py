"""air_ray: post-training data selection for reasoning by attention head influence (AIR).

The parts, one folder each (README, "Layout"): ``config`` (every option, declared once), ``data`` (the data
contract), ``models``, ``engine`` (ablation, losses, backends, ``Scorer``), ``heads`` (detection),
``pipeline`` (stages and the Ray wiring), ``outputs`` (the output layout, select, report, training) and ``cli``;
``influence`` is the math, ``errors`` the one user-facing exception.
"""

__version__ = "0.1.0"

__all__ = ["Scorer", "AirRayError", "__version__"]

from air_ray.errors import AirRayError


def __getattr__(name):  # lazy: `import air_ray` must not import torch
    if name == "Scorer":
        from air_ray.engine.scorer import Scorer

        return Scorer
    raise AttributeError(name)
