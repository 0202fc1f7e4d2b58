"""Outputs: what a scoring run leaves behind and everything made from it.

``select`` ranks globally; ``export`` writes the selected rows as a training-ready dataset; ``report`` writes a
static HTML page; ``columns`` holds the Arrow helpers select and report share, ``stats`` the rank statistics select,
report and compare share. Everything is read and written through ``air_ray.store``.

May import: ``air_ray.errors``, ``fsio``, ``influence``, ``data``, ``models``, ``store``, ``config``. Never the engine,
heads or Ray.
"""
