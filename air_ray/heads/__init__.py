"""Heads: finding the reasoning-critical (retrieval) heads of a model.

``probes`` builds retrieval probes (a prompt holding an answer verbatim, then the answer); ``detect`` scores every
head by how often its top-1 attention copies the answer and picks the top fraction; ``artifact`` reads and
writes heads.json (+ heads.png); ``run`` is ``air-ray heads``.

May import: ``air_ray.errors``, ``config``, ``models``, ``engine`` (ablation and losses, for detection and its
check). ``artifact`` imports none of these (every part reads heads.json through it). Never Ray or the CLI.
"""
