"""Options, declared once: typed config objects from which the CLI flags, the YAML loader and the Python API
are built, and the choice lists every part checks against.

May import: ``air_ray.errors``, ``air_ray.influence`` (the step-weighting rule and the loss floor),
``air_ray.models.resolve`` (the default model's name) and ``air_ray.data`` (the formats, step rules and think tags
of the data contract). Never torch, Ray or the CLI.
"""

from air_ray.config.commands import (
    BACKENDS, DTYPES, EXPORT_STYLES, FORMATS, SELECT_BY, CompareConfig, CorpusOptions, DemoConfig,
    EngineOptions, ExportConfig, FetchConfig, HeadsConfig,
    ModelOptions, ReportConfig, RescoreConfig, ScoreConfig, SelectConfig, TrainConfig,
)
from air_ray.config.options import Opt, Options

__all__ = [
    "BACKENDS", "DTYPES", "EXPORT_STYLES", "FORMATS", "SELECT_BY", "CompareConfig", "CorpusOptions",
    "DemoConfig",
    "EngineOptions", "ExportConfig", "FetchConfig",
    "HeadsConfig", "ModelOptions", "Opt", "Options", "ReportConfig", "RescoreConfig", "ScoreConfig",
    "SelectConfig", "TrainConfig",
]
