"""Ray wiring for ``air-ray score``: the only module that imports Ray and knows how the stages run.

    1. from_items(files) ─map_batches→ IdStage ─→ driver: global duplicate ids (first occurrence wins)
    2. from_items(files) ─flat_map→ ReadStage ─map_batches(actor pool)→ PrepareStage
                         ─map_batches(actor pool: --workers × --gpus/--cpus-per-worker)→ ScoreStage ─→ summaries

Each chunk of rows (``rows_per_partition``) is one item; the score actor writes its partition files itself
(atomically, named from the input file and chunk index), then the unit's commit marker, and returns a summary
row. Units committed by an earlier run with the same key are skipped and counted from their markers. The
driver streams the summaries for progress and writes ``_manifest.json``. When an actor ends, its stage's
``teardown()`` runs (Ray Data deletes the actor's callable on a graceful exit), which closes the scorer.

``--executor in-process`` (by default for a small corpus on a machine with no cluster to join:
``placement.choose_executor``) runs the same stages in this process instead, one partition after another, and
starts no Ray; the outputs, commit markers and manifest are the same.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import sys
import time
from collections import Counter
from contextlib import contextmanager

from air_ray.config.commands import ScoreConfig
from air_ray.data.shapes import FieldMap
from air_ray.errors import AirRayError
from air_ray.pipeline.manifest import Progress, build_manifest, input_size
from air_ray.pipeline.placement import SMALL_CORPUS_BYTES, choose_executor, embedded_cpus, plan
from air_ray.pipeline.stages import LEGACY_KEPT, IdStage, PrepareStage, ReadStage, ScoreStage, UnitKeys


# ----------------------------------------------------------------------------------------------
# adapters: a stage inside Ray Data


def _read(row: dict, rows_per_partition: int) -> list[dict]:
    stage = ReadStage(rows_per_partition)
    return [{"payload": pickle.dumps(c)} for c in stage.process(row["source"])]


def _ids(batch: dict, fields) -> dict:
    import numpy as np

    stage = IdStage(fields)
    outs = [stage.process((int(i), str(src))) for i, src in zip(batch["index"], batch["source"])]
    return {k: np.array([x for o in outs for x in o[k]], dtype=np.int64) for k in ("hash", "order")}


class _StageActor:
    """Builds a stage once per Ray worker/actor, then feeds it one pickled item per batch row; the stage's
    ``teardown()`` runs when the actor lets go of it."""

    stage = None

    def __init__(self, stage_cls, *args):
        self.stage = stage_cls(*args)
        self.stage.setup()
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def __del__(self):
        if self.stage is not None:
            stage, self.stage = self.stage, None
            stage.teardown()

    def __call__(self, batch: dict) -> dict:
        outs = [self.stage.process(pickle.loads(b)) for b in batch["payload"]]
        if outs and isinstance(outs[0], dict):  # summaries
            return {k: [o[k] for o in outs] for k in outs[0]} | {"actor": [self.name] * len(outs)}
        return {"payload": [pickle.dumps(o) for o in outs]}


class _PrepareActor(_StageActor):
    """Named apart so that logs and process titles say which pool a worker is in."""


class _ScoreActor(_StageActor):
    """``ray::MapWorker(MapBatches(_ScoreActor))`` in process titles and logs."""


# ----------------------------------------------------------------------------------------------
# the run


def connect(address: str | None, embedded_cpus: int, dashboard: bool = False) -> bool:
    """Join or start Ray (an embedded cluster gets ``embedded_cpus`` logical CPUs, and a dashboard only when
    ``dashboard``: Ray Train's placement-group cleaner needs its state API). Returns True when this call started a
    local cluster (and should stop it).

    A run joins only a cluster it was told to join (``--address``, ``RAY_ADDRESS``: set by ``ray job submit``) or
    a ``ray start`` cluster on this machine (the one ``ray start`` records in ``/tmp/ray/ray_current_cluster``),
    never another process's embedded cluster: that one stops when its run ends, and would take this run down.
    ``--address local`` always starts an embedded cluster; ``auto`` requires a cluster to join."""
    import ray

    if ray.is_initialized():
        return False
    kw = dict(log_to_driver=True, configure_logging=False)
    target = address if address not in (None, "auto", "local") else None
    if target is None and address != "local":
        target = os.environ.get("RAY_ADDRESS") or _ray_start_cluster()
        if target is None and address == "auto":
            raise AirRayError("--address auto: no Ray cluster to join (no RAY_ADDRESS, no `ray start` cluster on this "
                              "machine); start one with `ray start --head`, or leave --address out for an embedded "
                              "cluster")
    if target is not None:
        try:
            ray.init(address=target, **kw)
        except ConnectionError as e:
            raise AirRayError(f"cannot join the Ray cluster at {target!r}: {e}") from None
        return False
    # Ray's own tools inside the cluster (Ray Train's placement-group cleaner, the state API) look for "the" local
    # cluster and fail when other runs' clusters are up on this machine: the cluster's processes get its address
    # (RAY_ADDRESS, from a GCS port chosen here), this process's environment stays as it was
    from ray._private.services import get_node_ip_address

    port = _free_port()
    with _environ(RAY_GCS_SERVER_PORT=str(port), RAY_ADDRESS=f"{get_node_ip_address()}:{port}"):
        ray.init(address="local", num_cpus=embedded_cpus, include_dashboard=dashboard,
                 **({"dashboard_host": "127.0.0.1", "dashboard_port": _free_port()} if dashboard else {}), **kw)
    return True


@contextmanager
def _environ(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _ray_start_cluster() -> str | None:
    """The GCS address of a live ``ray start`` cluster on this machine, else None."""
    from ray._private import services

    try:
        address = services.find_bootstrap_address(None)  # written by `ray start` only
        return address if address and address in services.find_gcs_addresses() else None
    except Exception:  # no such file, or Ray's internals moved: start an embedded cluster
        return None


def run_task(fn, *args, address: str | None = None, cpus: float | None = None, gpus: float | None = None):
    """``fn(*args)`` as one Ray task with the GPUs and CPUs it asks for, on the cluster ``address`` names (or an
    embedded one, as ``air-ray score`` does), not in this process; returns ``(its result, where it ran)``, where is
    ``{"node_id", "node_ip", "pid"}``. Defaults: 1 GPU if the cluster has GPUs, else none; 1 CPU with a GPU, else a
    node's CPUs. torch in the task runs as many threads as it has CPUs. An ``AirRayError`` in the task is raised
    here as itself (one line)."""
    import ray

    physical = _physical_cpus()
    started = connect(address, embedded_cpus(physical, 1, cpus))
    try:
        gpus, cpus = _worker_resources(gpus, cpus, started=started, physical=physical)
        task = ray.remote(_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
        try:
            return ray.get(task.remote(fn, int(max(1, cpus)), *args))
        except ray.exceptions.RayTaskError as e:
            _raise_user_error(e)
            raise
    finally:
        if started:
            ray.shutdown()


def _user_error(e: BaseException | None) -> AirRayError | None:
    """The ``AirRayError`` a Ray task or a Ray Data stage failed with (an S3 request that failed after its retries,
    a bad input): ``e``'s cause, or a cause of that, ...; else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # RayTaskError: the exception raised in the task
        if isinstance(cause, AirRayError):
            return cause
        e = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)
    return None


def _raise_user_error(e: BaseException) -> None:
    """Raise ``_user_error(e)`` as one line (Ray Data appends its retry advice to the message); else return."""
    cause = _user_error(e)
    if cause is not None:
        raise type(cause)(str(cause).split("\n", 1)[0]) from None


class _QuietUserErrors(logging.Filter):
    """Ray Data logs a failed stage's traceback before raising it; for an ``AirRayError`` the one line the CLI
    prints says it all, so those records are dropped (every other failure is logged as before)."""

    def filter(self, record: logging.LogRecord) -> bool:
        e = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return _user_error(e) is None


_QUIET = _QuietUserErrors()


def _rows(ds):
    """``ds.iter_rows()``; a stage that failed with an ``AirRayError`` raises it here as itself."""
    try:
        yield from ds.iter_rows()
    except Exception as e:
        _raise_user_error(e)
        raise


def detect_heads_on_cluster(cfg):
    """``air_ray.heads.run.detect_heads(cfg)`` as a Ray task with ``cfg``'s GPUs, CPUs and address (``run_task``)."""
    from air_ray.heads.run import detect_heads

    doc, where = run_task(detect_heads, cfg, address=cfg.address, cpus=cfg.cpus_per_worker, gpus=cfg.gpus_per_worker)
    doc["detected_on"].update(node_id=where["node_id"], node_ip=where["node_ip"])
    return doc


def train_on_cluster(cfg) -> dict:
    """``air-ray train`` through Ray Train: ``TorchTrainer`` with ``cfg.workers`` data-parallel workers
    (``ScalingConfig(num_workers, use_gpu)``), each running ``train_weighted_sft`` (the Hugging Face Trainer finds
    the process group Ray Train set up and gives each worker its share of every batch); the first worker writes
    the model and ``training_summary.json`` into ``cfg.output``. This process only coordinates. Returns the
    summary."""
    import tempfile

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    cfg = cfg.validate()
    physical = _physical_cpus()
    started = connect(cfg.address, embedded_cpus(physical, cfg.workers, cfg.cpus_per_worker), dashboard=True)
    try:
        gpus, cpus = _worker_resources(cfg.gpus_per_worker, cfg.cpus_per_worker, started=started,
                                       physical=physical, share=cfg.workers)
        print(f"[air-ray train] {cfg.workers} Ray Train worker{'s' * (cfg.workers != 1)} x {gpus:g} GPU, "
              f"{cpus:g} CPU", flush=True)
        # what the workers hand back (Ray Train keeps metrics only with checkpoints): the summary, or the one line
        # of an AirRayError
        mailbox = Queue(actor_options={"num_cpus": 0})
        with tempfile.TemporaryDirectory(prefix="air_ray_train_") as storage:
            trainer = TorchTrainer(
                _train_worker, train_loop_config={"cfg": cfg, "threads": int(max(1, cpus)), "mailbox": mailbox},
                scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=gpus > 0,
                                             resources_per_worker={"CPU": cpus, **({"GPU": gpus} if gpus else {})}),
                # Ray Train's own run state (no checkpoints: the model goes to cfg.output)
                run_config=RunConfig(name="air-ray-train", storage_path=storage),
            )
            trainer.fit()
        kind, value = mailbox.get(timeout=60)
        if kind == "error":  # a bad join, no trainable rows: the workers' one line
            raise AirRayError(value)
        return json.loads(value)
    finally:
        if started:
            ray.shutdown()


def _train_worker(config: dict) -> None:
    import ray.train
    import torch

    from air_ray.training import train_weighted_sft

    torch.set_num_threads(config["threads"])
    first = ray.train.get_context().get_world_rank() == 0
    try:
        summary = train_weighted_sft(config["cfg"], log=print if first else (lambda *_: None))
    except AirRayError as e:  # every worker reads the same rows, so every worker meets it
        if first:
            config["mailbox"].put(("error", str(e)))
        return
    if first:
        config["mailbox"].put(("summary", json.dumps(summary, default=str)))


def _worker_resources(gpus: float | None, cpus: float | None, *, started: bool, physical: int,
                      share: int = 1) -> tuple[float, float]:
    """``(GPUs, CPUs)`` of a task or of each of ``share`` workers, where not given: 1 GPU if the cluster has GPUs,
    else none; 1 CPU with a GPU, else a node's CPUs (this machine's, for an embedded cluster) split ``share`` ways."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if gpus is None:
        gpus = 1 if any(n.get("GPU", 0) > 0 for n in nodes) else 0
    if cpus is None:
        node_cpus = physical if started else max((n.get("CPU", 1) for n in nodes), default=1)
        cpus = 1 if gpus else max(1, int(node_cpus // share))
    return gpus, cpus


def _physical_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _task(fn, threads: int, *args):
    import ray
    import torch

    torch.set_num_threads(threads)
    where = {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
             "pid": os.getpid()}
    return fn(*args), where


def _executor(cfg: ScoreConfig, total_bytes: int) -> tuple[str, str]:
    """``placement.choose_executor`` with this machine's facts: a Ray cluster named (``--address local``: an
    embedded one; one to join: ``--address``, RAY_ADDRESS, a `ray start` cluster here) and its GPUs (each looked at
    only when it matters)."""
    named = None
    if cfg.executor == "auto":
        if cfg.address == "local":
            named = "--address local: an embedded Ray cluster"
        elif cfg.address is not None or os.environ.get("RAY_ADDRESS") or _ray_start_cluster() is not None:
            named = "a Ray cluster to join"
    return choose_executor(cfg.executor, actors=cfg.workers, backend=cfg.backend, total_bytes=total_bytes,
                           ray_named=named, local_gpus=_local_gpus)


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _score_in_process(cfg: ScoreConfig, files: list[str], keys: UnitKeys, duplicates: dict, committed: dict,
                      heads_doc: dict):
    """The summaries of the Ray pipeline's stages run in this process: read, prepare and score one partition after
    another (``--executor in-process``)."""
    read = ReadStage(cfg.rows_per_partition)
    prepare = PrepareStage(cfg, keys, duplicates, committed)
    score = ScoreStage(cfg, heads_doc)
    name = f"{socket.gethostname()}:{os.getpid()}"
    prepare.setup()
    try:
        score.setup()
        try:
            for source in files:
                for chunk in read.process(source):
                    yield dict(score.process(prepare.process(chunk)), actor=name)
        finally:
            score.teardown()
    finally:
        prepare.teardown()


def _cluster_to_join(cfg: ScoreConfig) -> bool:
    """Whether the run joins a Ray cluster (``connect``'s rule) rather than scoring on this machine."""
    if cfg.executor == "in-process" or cfg.address == "local":
        return False
    return cfg.address is not None or bool(os.environ.get("RAY_ADDRESS")) or _ray_start_cluster() is not None


def _cpu_nodes_have_fast_bf16() -> bool:
    """Whether every alive CPU node of the joined cluster multiplies bf16 natively (a probe task on each)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from air_ray.models import cpu_has_fast_bf16

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    probe = ray.remote(num_cpus=0, max_retries=0)(cpu_has_fast_bf16)
    on = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote() for n in nodes]
    return bool(nodes) and all(ray.get(on, timeout=300))


def scoring_dtype(cfg: ScoreConfig, gpus: float | None = None) -> tuple[str, str]:
    """``(dtype, why)``: the dtype the scoring workers compute in. ``--dtype`` as given, or ``auto`` resolved for the
    device they score on (``air_ray.models.resolve_dtype``: bfloat16 on CUDA and on CPUs with native bf16, float32
    elsewhere). That device is ``--device``, or under ``auto`` CUDA when each worker gets GPUs: ``gpus`` (the
    placement's), else ``--gpus-per-worker``, else whether the cluster (joined to ask), or this machine when no
    cluster is joined, has any. On a joined cluster's CPUs, bfloat16 only when every CPU node has native bf16. The
    run then scores in exactly this dtype on every worker, and its scoring key says which."""
    from air_ray.models import resolve_dtype

    if cfg.dtype != "auto":
        return cfg.dtype, "--dtype as given"
    joined = _cluster_to_join(cfg)
    device = cfg.device
    if device == "auto":
        if gpus is None:
            gpus = cfg.gpus_per_worker
        if gpus is None and joined:
            import ray

            connect(cfg.address, 1)
            gpus = sum(n["Resources"].get("GPU", 0) for n in ray.nodes() if n.get("Alive"))
        elif gpus is None:
            gpus = _local_gpus()
        device = "cuda" if gpus > 0 else "cpu"
    if device.startswith("cuda"):
        return resolve_dtype("auto", device), f"auto on {device}"
    if joined:
        connect(cfg.address, 1)
        fast = _cpu_nodes_have_fast_bf16()
        return resolve_dtype("auto", "cpu", fast), f"auto on the cluster's CPUs ({'all' if fast else 'not all'} " \
                                                   "with native bf16)"
    dtype = resolve_dtype("auto", "cpu")
    return dtype, f"auto on this machine's CPU ({'with' if dtype == 'bfloat16' else 'without'} native bf16)"


def run_score(cfg: ScoreConfig, prior_ids=None, dtype: str | None = None) -> dict:
    """Score a corpus into ``<output>/scores``, ``<output>/rejected`` and ``<output>/_manifest.json``.

    ``prior_ids``: hashes (``air_ray.data.ids.id_hash``) of ids already scored in this output by files that are not
    inputs of this run (``air-ray rescore``): a record with such an id is a duplicate. The caller then owns the
    output's other partitions, so they are not reported as foreign. ``dtype``: the dtype to score in, resolved by
    the caller (``scoring_dtype``; rescore names its version by it), else resolved here once the workers are
    placed."""
    from air_ray.data.corpus import expand_inputs
    from air_ray.models import open_model
    from air_ray.store.heads import load_heads
    from air_ray.store.layout import RunLayout
    from air_ray.store.records import CommitMarker, Manifest, UnitSummary

    cfg = cfg.replace()  # a copy: placement and the resolved dtype are filled in below, the caller's stays as given
    t0 = time.time()
    phases: dict[str, float] = {}
    files = expand_inputs(cfg.input)
    run = RunLayout(cfg.output)
    run.check_writable()
    # before the cluster starts, so that a wrong model or heads file is a one-line error (Ray prints as it starts)
    model = open_model(cfg)
    ref = model.ref
    heads_doc = load_heads(cfg.heads, fingerprint=ref.fingerprint, shape=model.shape,
                           allow_mismatch=cfg.allow_model_mismatch)
    legacy_keys = cfg.legacy_keys(ref.fingerprint, heads_doc["heads"])  # of the dtype option as given
    markers = run.commits()
    total_bytes = sum(input_size(f) for f in files)
    phases["prepare_s"] = time.time() - t0

    physical = _physical_cpus()
    executor, executor_why = _executor(cfg, total_bytes)
    in_process = executor == "in-process"
    started = False
    if not in_process:
        import ray

        t = time.time()
        started = connect(cfg.address, embedded_cpus(physical, cfg.workers, cfg.cpus_per_worker))
        phases["cluster_s"] = time.time() - t
    try:
        if in_process:
            nodes = [{"CPU": physical, "GPU": min(1, _local_gpus())}]
        else:
            nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        place = plan(nodes, actors=cfg.workers, gpus_per_actor=cfg.gpus_per_worker, cpus_per_actor=cfg.cpus_per_worker,
                     embedded=started or in_process, physical_cpus=physical)
        cfg.workers, cfg.gpus_per_worker, cfg.cpus_per_worker = place.actors, place.gpus_per_actor, place.cpus_per_actor
        dtype, dtype_why = (dtype, "resolved by the caller") if dtype else scoring_dtype(cfg, place.gpus_per_actor)
        cfg.dtype = dtype  # every worker scores in the dtype the key names
        scoring_key = cfg.scoring_key(ref.fingerprint, heads_doc["heads"], dtype)
        if not in_process:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # the run's own progress (Progress) instead of one bar per operator
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # and no advice to turn them on
            ctx.raise_original_map_exception = True  # an AirRayError in a stage reaches _rows as itself: one line
            for name in ("ray.data._internal.execution.streaming_executor_state", "ray.data.exceptions"):
                logging.getLogger(name).addFilter(_QUIET)  # where Ray Data logs a failed stage (idempotent)
        workers = f"{cfg.workers} worker{'s' * (cfg.workers != 1)}"
        print(f"[air-ray score] {len(files)} input files, {total_bytes:,} bytes -> {cfg.output} "
              f"({executor}: {executor_why}; {workers} x {cfg.gpus_per_worker:g} GPU, {cfg.cpus_per_worker:g} CPU = "
              f"{place.threads} torch threads; {place.why}; {dtype}: {dtype_why})", flush=True)

        t = time.time()
        duplicates = find_duplicates(files, prior_ids, FieldMap.of(cfg),
                                     local=in_process or total_bytes <= SMALL_CORPUS_BYTES)
        phases["ids_s"] = time.time() - t
        committed = {u: m.key for u, m in markers.items()}
        keys = UnitKeys(scoring_key, tuple(legacy_keys.values()), dtype)
        t = time.time()
        if in_process:
            rows = _score_in_process(cfg, files, keys, duplicates, committed, heads_doc)
        else:
            rows = _rows(_pipeline(cfg, files, keys, duplicates, committed, heads_doc))
        progress = Progress(total_bytes, bar=cfg.progress and sys.stderr.isatty())
        summaries = []
        legacy: Counter = Counter()
        try:
            for s in rows:
                s = dict(s)
                if s["legacy"]:  # committed under a key of a release before SCORING_VERSION
                    legacy[s["legacy"]] += 1
                    if s["skipped"]:  # the same numbers: re-keyed, so later runs find it under the current key
                        run.write_commit(CommitMarker(s["unit"], s["key"], markers[s["unit"]].summary))
                if s["skipped"]:  # committed earlier: its counts come from the marker
                    s = dict(markers[s["unit"]].summary.to_json(), skipped=True, actor="(committed earlier)",
                             setup_s=s.get("setup_s", 0.0))
                summaries.append(s)
                if len(summaries) == 1:
                    phases["first_partition_s"] = time.time() - t
                progress.update(s)
        finally:
            progress.close()
        phases["scoring_s"] = time.time() - t
    finally:
        if started:
            ray.shutdown()

    phases["actor_setup_s"] = max((s.get("setup_s", 0.0) for s in summaries), default=0.0)
    wall = time.time() - t0
    manifest = build_manifest(cfg, ref, heads_doc, files, summaries, wall)
    manifest["scoring_key"] = scoring_key
    manifest["placement"] = {"executor": executor, "actors": place.actors, "gpus_per_actor": place.gpus_per_actor,
                             "cpus_per_actor": place.cpus_per_actor, "torch_threads": place.threads,
                             "why": f"{executor}: {executor_why}; {place.why}"}
    manifest["phases"] = {k: round(v, 3) for k, v in phases.items()}
    manifest["duplicate_ids"] = sum(len(v) for v in duplicates.values())
    manifest["foreign_partitions"] = [] if prior_ids is not None else run.foreign_partitions(manifest["partitions"])
    if manifest["foreign_partitions"]:
        print(f"[air-ray score] warning: {len(manifest['foreign_partitions'])} partition files in {cfg.output} "
              "come from other inputs (listed in _manifest.json as foreign_partitions); readers of scores/ "
              "see them too", flush=True)
    if legacy:
        kept = legacy.pop(LEGACY_KEPT, 0)
        again = "".join(f"; {n} {why}: scored again" for why, n in sorted(legacy.items()))
        print(f"[air-ray score] {kept + sum(legacy.values())} partitions were committed under the scoring key of "
              f"air_ray {', '.join(legacy_keys)} (before scoring keys named SCORING_VERSION and the resolved dtype): "
              f"{kept} recorded dtype {dtype}, this run's: kept{again}", flush=True)
    manifest = Manifest.from_json(manifest)
    run.write_manifest(manifest)
    c, r = manifest.counts, manifest.this_run
    resumed = f" ({r['units_skipped']} of {r['units']} partitions committed earlier)" if r["units_skipped"] else ""
    print("[air-ray score] phases: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in phases.items()),
          flush=True)
    print(f"[air-ray score] done: {c['rows_read']:,} rows read, {c['rows_scored']:,} scored, "
          f"{c['rows_rejected']:,} rejected{resumed}; this run scored {r['rows_scored']:,} rows in {wall:,.1f}s "
          f"({manifest.tokens_per_s:,.0f} tok/s)", flush=True)
    return manifest


def _pipeline(cfg: ScoreConfig, files: list[str], keys: UnitKeys, duplicates: dict, committed: dict, heads_doc: dict):
    """The Ray Data dataset of the scoring run (the module docstring's pass 2); its rows are the summaries."""
    import ray

    score_stage = ScoreStage(cfg, heads_doc)
    return (
        ray.data.from_items([{"source": f} for f in files], override_num_blocks=len(files))
        .flat_map(_read, fn_kwargs={"rows_per_partition": cfg.rows_per_partition}, **ReadStage.resources)
        # one chunk per block, so that the actor pool can spread chunks over its actors
        .repartition(target_num_rows_per_block=1)
        .map_batches(_PrepareActor, fn_constructor_args=(PrepareStage, cfg, keys, duplicates, committed),
                     batch_size=1,
                     compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, min(len(files), 4))),
                     **PrepareStage.resources)
        .map_batches(_ScoreActor, fn_constructor_args=(ScoreStage, cfg, heads_doc), batch_size=1,
                     compute=ray.data.ActorPoolStrategy(size=cfg.workers, max_tasks_in_flight_per_actor=1),
                     **score_stage.resources)
    )


def find_duplicates(files: list[str], prior_ids=None, fields=None, local: bool = False) -> dict[str, dict[int, str]]:
    """Pass 1 (Ray Data tasks; ``local``: in this process): every valid record's (id hash, order) -> later
    occurrences of an id."""
    import numpy as np
    import ray

    from air_ray.data import ids as dedupe

    fields = fields or FieldMap()
    hashes, orders = [], []
    if local:
        for b in (_ids({"index": [i], "source": [f]}, fields) for i, f in enumerate(files)):
            hashes.append(b["hash"])
            orders.append(b["order"])
    else:
        ds = ray.data.from_items([{"index": i, "source": f} for i, f in enumerate(files)],
                                 override_num_blocks=len(files))
        ds = ds.map_batches(_ids, batch_size=1, fn_kwargs={"fields": fields}, **IdStage.resources)
        for b in ds.iter_batches(batch_format="numpy", batch_size=None):
            hashes.append(b["hash"])
            orders.append(b["order"])
    if not hashes:
        return {}
    h, o = dedupe.with_prior(np.concatenate(hashes), np.concatenate(orders), prior_ids)
    return dedupe.by_source(dedupe.find_duplicates(h, o), files)
