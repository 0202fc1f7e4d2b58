"""The pipeline: how a corpus gets scored at scale.

``stages`` are the steps (read, ids, prepare, score), each with its resources, ``setup``, ``process`` and
``teardown``, and no knowledge of how they run; ``runner`` is the Ray wiring (the only module that imports
Ray) and ``run_score``; ``manifest`` builds ``_manifest.json`` and the progress lines; ``rescore`` scores only
what is new into a versioned output under a ``lease``.

May import: every part below it (``config``, ``data``, ``models``, ``engine``, ``heads``, ``outputs``). Never
the CLI.
"""
