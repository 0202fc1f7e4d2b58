"""air_ray: post-training data selection for reasoning by attention head influence (AIR)."""

__version__ = "0.1.0"

__all__ = ["Scorer", "AirRayError", "__version__"]

from air_ray.errors import AirRayError


def __getattr__(name):  # lazy: `import air_ray` must not import torch
    if name == "Scorer":
        from air_ray.scorer import Scorer

        return Scorer
    raise AttributeError(name)
