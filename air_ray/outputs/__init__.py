"""Outputs: what a scoring run leaves behind and everything made from it.

``layout`` owns the output directory (paths, Parquet schemas, listing and reading partitions, commit markers,
manifest, selection, rescore ledger); ``select`` ranks globally; ``export`` writes the selected rows as training-ready Parquet; ``report`` writes a
static HTML page;
``training`` turns step weights into per-token loss weights and fine-tunes; ``columns`` holds the Arrow helpers
select and report share.

May import: ``air_ray.errors``, ``fsio``, ``config``, ``influence``, ``data``, ``models``, ``heads.artifact``.
Never Ray.
"""
