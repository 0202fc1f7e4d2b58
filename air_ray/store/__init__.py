"""The store: everything a run persists and reads back, as typed records; no other module spells a path, a file
name or a schema.

``layout`` (every path and file name: a scoring run and a rescore version, a selection, an export, a comparison, a
report, a training run, the demo), ``schemas`` (the Parquet schemas and column types, writing tables, their
metadata), ``records`` (``UnitSummary``, ``CommitMarker``, ``Manifest``), ``scores`` (reading the score partitions and
a selection back; ``NoScores``), ``heads`` (heads.json and heads.png; the ``Heads`` value), ``lease`` (one writer per
output version).

May import: ``air_ray.errors``, ``air_ray.fsio``; fsspec, Arrow, numpy, matplotlib (heads.png). Never models, the
engine, Ray or the CLI: everything above reads and writes through it.
"""
