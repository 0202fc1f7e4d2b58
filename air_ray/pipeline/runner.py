"""Ray: the only module that imports it. Joining or starting a cluster (``connect``), a task with the GPUs and CPUs
it asks for (``run_task``: head detection), Ray Train (``train_on_cluster``), and ``RayData``: the executor that runs
a chain of stages (``air_ray.pipeline.stages``) on Ray Data.

    scoring chain:  from_items(files) ─flat_map→ ReadStage ─(one chunk per block)─map_batches(actor pool)→
                    PrepareStage ─map_batches(actor pool: --workers × --gpus/--cpus-per-worker)→ ScoreStage
    id chain:       from_items((index, file)) ─map_batches(a task each)→ IdStage

Items travel pickled, one per row. Each score actor writes its partition files itself (atomically, named from
the input file and chunk index), then the unit's commit marker, and returns the unit's summary; the driver
streams them. When an actor ends, its stage's ``teardown()`` runs (Ray Data deletes the actor's callable on a
graceful exit), which closes the scorer. A stage that fails with an ``AirRayError`` ends the run with its one line.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import sys
import time
from contextlib import contextmanager

from air_ray.config.commands import ScoreConfig
from air_ray.errors import AirRayError
from air_ray.pipeline.executors import Counts, Executor, local_gpus, physical_cpus
from air_ray.pipeline.placement import choose_executor, embedded_cpus
from air_ray.pipeline.stages import Chain, Link
from air_ray.progress import verbose

# ----------------------------------------------------------------------------------------------
# the executor


class _StageActor:
    """Builds a stage once per Ray actor, then feeds it one pickled item per batch row; the stage's ``teardown()``
    runs when the actor lets go of it. ``board``: the run's ``Counts`` actor, where the stage's ``progress`` goes."""

    stage = None

    def __init__(self, stage_cls, *args, board=None):
        self.stage = stage_cls(*args)
        if board is not None:
            self.stage.progress = lambda rows, tokens: board.add.remote(rows, tokens)  # not waited for
        self.stage.setup()

    def __del__(self):
        if self.stage is not None:
            stage, self.stage = self.stage, None
            stage.teardown()

    def __call__(self, batch: dict) -> dict:
        return {"payload": [pickle.dumps(self.stage.process(pickle.loads(b))) for b in batch["payload"]]}


class _PrepareActor(_StageActor):
    """Named apart so that logs and process titles say which pool a worker is in."""


class _ScoreActor(_StageActor):
    """``ray::MapWorker(MapBatches(_ScoreActor))`` in process titles and logs."""


_ACTORS = {"prepare": _PrepareActor, "score": _ScoreActor}


def _fan_out(row: dict, link: Link) -> list[dict]:
    """A stage that gives several items per item, as a Ray task (the stage built for it)."""
    stage = link.build()
    stage.setup()
    try:
        return [{"payload": pickle.dumps(x)} for x in stage.process(pickle.loads(row["payload"]))]
    finally:
        stage.teardown()


def _each(batch: dict, link: Link) -> dict:
    """A stage without a pool, as a Ray task per item (the stage built for it)."""
    stage = link.build()
    stage.setup()
    try:
        return {"payload": [pickle.dumps(stage.process(pickle.loads(b))) for b in batch["payload"]]}
    finally:
        stage.teardown()


class RayData(Executor):
    """A chain on Ray Data, on the cluster ``--address`` (or RAY_ADDRESS, or a ``ray start`` cluster here) names, else
    an embedded one (``connect``). A stage linked with ``fan_out`` runs as a task per item, then one item per block
    so that the next pool spreads them over its actors; a stage with a ``pool`` runs in an actor pool of that size,
    each actor holding one built stage; any other as a task per item."""

    name = "ray"

    def __init__(self):
        super().__init__()
        self.started = False  # this run started an embedded cluster (and stops it)
        self.embedded = False
        self.board = None  # a Counts actor the pooled stages report their progress to (made by run)

    def start(self, cfg) -> None:
        import ray

        t = time.time()
        self.started = self.embedded = connect(cfg.address, embedded_cpus(physical_cpus(), cfg.workers,
                                                                          cfg.cpus_per_worker))
        self.phases["cluster_s"] = time.time() - t
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the run's own progress (Progress) instead of one bar per operator
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # and no advice to turn them on
        if not verbose():  # Ray Data's INFO lines (execution plan, start, end of each dataset) stay in its log file
            for handler in logging.getLogger("ray.data").handlers:
                if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
                    handler.setLevel(max(handler.level, logging.WARNING))
        ctx.raise_original_map_exception = True  # an AirRayError in a stage reaches _rows as itself: one line
        for name in ("ray.data._internal.execution.streaming_executor_state", "ray.data.exceptions"):
            logging.getLogger(name).addFilter(_QUIET)  # where Ray Data logs a failed stage (idempotent)

    def stop(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False

    def nodes(self) -> list[dict]:
        import ray

        return [n["Resources"] for n in ray.nodes() if n.get("Alive")]

    def live(self) -> tuple[int, int]:
        import ray

        return tuple(ray.get(self.board.totals.remote(), timeout=30)) if self.board is not None else (0, 0)

    def run(self, chain: Chain, items):
        import ray

        if self.board is None:
            self.board = ray.remote(Counts).options(num_cpus=0).remote()
        items = list(items)
        ds = ray.data.from_items([{"payload": pickle.dumps(x)} for x in items], override_num_blocks=max(1, len(items)))
        for link in chain.links:
            if link.fan_out:
                ds = ds.flat_map(_fan_out, fn_kwargs={"link": link}, **link.resources)
                ds = ds.repartition(target_num_rows_per_block=1)  # one item per block: the next pool spreads them
            elif link.pool is None:
                ds = ds.map_batches(_each, batch_size=1, fn_kwargs={"link": link}, **link.resources)
            else:
                pool = link.pool
                in_flight = {"max_tasks_in_flight_per_actor": pool.in_flight} if pool.in_flight else {}
                ds = ds.map_batches(_ACTORS.get(link.name, _StageActor), fn_constructor_args=(link.stage, *link.args),
                                    fn_constructor_kwargs={"board": self.board}, batch_size=1, compute=ray.data.ActorPoolStrategy(min_size=pool.min,
                                                                                     max_size=pool.max, **in_flight),
                                    **link.resources)
        for row in _rows(ds):
            yield pickle.loads(row["payload"])


def choose(cfg: ScoreConfig, total_bytes: int) -> tuple[str, str]:
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
                           ray_named=named, local_gpus=local_gpus)


# ----------------------------------------------------------------------------------------------
# the cluster


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
    if not sys.stdout.isatty():  # the workers' lines arrive prefixed "(worker pid=...)": no colour codes in a log
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
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

    physical = physical_cpus()
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
    physical = physical_cpus()
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


def _task(fn, threads: int, *args):
    import ray
    import torch

    torch.set_num_threads(threads)
    where = {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
             "pid": os.getpid()}
    return fn(*args), where


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
            gpus = local_gpus()
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
