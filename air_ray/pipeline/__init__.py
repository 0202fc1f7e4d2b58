"""The pipeline: how a corpus gets scored at scale.

``stages`` are the steps (read, ids, prepare, score), each with its resources, ``setup``, ``process`` and
``teardown``, and their chains, declared once (``scoring_chain``, ``id_chain``); ``executors`` run a chain in this
process (``InProcess``), ``runner`` on Ray Data (``RayData``; the only module that imports Ray: also the cluster,
head detection's task, Ray Train); ``placement`` decides the executor and where the workers go; ``score`` is
``run_score`` (resolve the options, pick the executor, run the chain, write the manifest); ``manifest`` builds the
manifest and the progress lines; ``rescore`` scores only what is new into a versioned output under a lease.

May import: every part below it (``config``, ``data``, ``models``, ``store``, ``engine``, ``heads``, ``outputs``,
``training``). Never the CLI.
"""
