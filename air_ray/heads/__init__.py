"""Heads: finding the reasoning-critical (retrieval) heads of a model.

``probes`` builds retrieval probes (a prompt holding an answer verbatim, then the answer); ``detect`` scores every
head by how often its top-1 attention copies the answer and picks the top fraction; ``run`` is ``air-ray heads``
(heads.json and heads.png are written through ``air_ray.store.heads``).

May import: ``air_ray.errors``, ``fsio``, ``config``, ``models``, ``store``, ``engine`` (ablation and losses, for
detection and its check). Never Ray or the CLI.
"""
