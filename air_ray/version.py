"""The package's version (``air_ray.__version__``): what ``air-ray --version`` prints and what every artifact records
beside the scoring version. Scores are keyed by the scoring version (``air_ray.config.commands.SCORING_VERSION``),
not by this one. Imports nothing."""

__version__ = "0.1.0"
