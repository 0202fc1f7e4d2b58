"""Whole-node loss (issue #16, point 3): a real multi-node Ray cluster on this machine (a `ray start` head and two
`ray start` worker nodes, each its own raylet), `air-ray score --address` joined to it, and mid-run the worker
node that hosts a scoring actor is killed: its raylet, its agents and its workers, SIGKILL. Every row must come
out exactly once, the counts must reconcile and the scores must equal an uninterrupted run's."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.test_reliability import _assert_same_scores, _commits, _read_dir, _reap

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
TAG = "AIR_RAY_TEST_NODE"  # in the environment of a node's `ray start`, and so of its raylet, agents and workers


def _tagged(value: str, prefix: bool = False) -> list[int]:
    """PIDs whose environment holds ``AIR_RAY_TEST_NODE=<value>`` (``prefix``: a value starting so), and their
    descendants: one node's or one cluster's processes, whatever their titles (Ray's agents retitle themselves
    over their environment)."""
    want, tagged, children = f"{TAG}={value}".encode(), [], {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                env = (d / "environ").read_bytes().split(b"\0")
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
            if any(e.startswith(want) if prefix else e == want for e in env):
                tagged.append(int(d.name))
    out: set[int] = set()
    while tagged:
        pid = tagged.pop()
        if pid not in out:
            out.add(pid)
            tagged.extend(children.get(pid, []))
    return sorted(out)


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
    except OSError:
        return ""


class LocalCluster:
    """A head and worker nodes, each a `ray start --block` of its own (own process group), token auth with a token
    of its own, its own temp dir (so the `ray_current_cluster` file that `ray start` writes is not the machine's)
    and ports of its own; node ``name``'s `ray start` carries ``AIR_RAY_TEST_NODE=<cluster id>/<name>`` (``_tagged``
    finds it and every process it started)."""

    def __init__(self, root: Path):
        self.id = secrets.token_hex(6)
        self.root = root
        self.nodes: dict[str, subprocess.Popen] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(RAY_TMPDIR=str(root), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                        RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
                        # the GCS declares a node whose raylet is gone dead within ~5 s (default ~15 s); a raylet
                        # that is only slow (2 loaded cores) still has 5 s to answer each check
                        RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="5000",
                        RAY_health_check_failure_threshold="5")
        self.address = f"127.0.0.1:{free_port()}"

    def start(self, name: str, cpus: int, head: bool = False) -> None:
        ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
        args = [str(RAY), "start", "--block", f"--num-cpus={cpus}", "--num-gpus=0", "--disable-usage-stats",
                "--node-ip-address=127.0.0.1", *(f"{p}={free_port()}" for p in ports)]
        if head:
            args += [f"--port={self.address.rsplit(':', 1)[1]}", "--head", "--include-dashboard=false",
                     f"--ray-client-server-port={free_port()}", f"--dashboard-port={free_port()}"]
        else:
            args += [f"--address={self.address}"]
        env = dict(self.env, **{TAG: f"{self.id}/{name}"})
        log = open(self.root / f"{name}.log", "w")
        self.nodes[name] = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, cwd=self.root)

    def add(self, name: str, cpus: int, head: bool = False, tries: int = 3, timeout: float = 120) -> None:
        """Start node ``name`` and wait until `ray start` says it runs (its raylet has registered with the GCS). On
        a loaded machine a raylet can miss Ray's 30 s to register; then the node is started again."""
        for attempt in range(tries):
            self.start(name, cpus, head)
            t = time.time()
            while "Ray runtime started" not in (self.root / f"{name}.log").read_text():
                if self.nodes[name].poll() is not None or time.time() - t > timeout:
                    break
                time.sleep(0.2)
            else:
                return
            self.kill(name)
            os.rename(self.root / f"{name}.log", self.root / f"{name}.failed-{attempt}.log")
        pytest.fail(f"node {name} did not start: {self.logs()}")

    def pids(self, name: str) -> list[int]:
        return _tagged(f"{self.id}/{name}")

    def kill(self, name: str) -> list[str]:
        """SIGKILL every process of node ``name`` (raylet, agents, workers) until none is left; their titles."""
        victims: dict[int, str] = {}
        t = time.time()
        while pids := [p for p in self.pids(name) if p not in victims]:
            assert time.time() - t < 30, f"node {name} does not die"
            victims.update((p, _title(p)) for p in pids)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        self.nodes[name].wait(timeout=30)
        return list(victims.values())

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        """Every process of this cluster, and only those (never `ray stop`: other clusters run on this machine)."""
        for _ in range(5):
            pids = _tagged(f"{self.id}/", prefix=True)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not pids:
                break
            time.sleep(0.5)
        for p in self.nodes.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def cluster():
    # not under tmp_path: Ray's socket paths (<temp dir>/ray/session_<date>_<pid>/sockets/...) must fit 107 bytes
    c = LocalCluster(Path(tempfile.mkdtemp(prefix="arn-", dir="/tmp")))
    try:
        yield c
    finally:
        c.stop()


ROWS, ROWS_PER_PARTITION, ACTORS = 48, 2, 2
SCORE_ACTOR = "MapBatches(_ScoreActor)"


def _score_args(model, heads, corpus: Path, out: Path, address: str) -> list[str]:
    return ["score", "--model", model, "--heads", heads, "--input", corpus, "--output", out, "--dtype", "float32",
            "--device", "cpu", "--address", address, "--actors", ACTORS, "--cpus-per-actor", 1,
            "--rows-per-partition", ROWS_PER_PARTITION]


def _uninterrupted(model, heads, corpus: Path, out: Path) -> None:
    """The reference: the same stages in a plain loop in this process (no Ray), with what each scoring actor
    has: one torch thread, the same chunks."""
    import torch

    from air_ray.cli import parse
    from air_ray.heads.artifact import load_heads
    from air_ray.pipeline.stages import PrepareStage, ReadStage, ScoreStage

    _, cfg = parse(list(map(str, _score_args(model, heads, corpus, out, "local"))))
    cfg = cfg.validate()
    threads = torch.get_num_threads()
    prepare, score = PrepareStage(cfg), ScoreStage(cfg, load_heads(cfg.heads))
    prepare.setup()
    score.setup()  # sets torch's threads to --cpus-per-actor
    try:
        for chunk in ReadStage(cfg.rows_per_partition).process(str(corpus)):
            score.process(prepare.process(chunk))
    finally:
        score.teardown()
        torch.set_num_threads(threads)


def _visible_partitions(out: Path) -> dict[str, set[str]]:
    return {kind: {p.stem for p in (out / kind).glob("*.parquet") if not p.name.startswith((".", "_"))}
            for kind in ("scores", "rejected")}


def test_losing_a_worker_node_mid_run(cluster, tiny_model, gsm8k_rows, tmp_path):
    import pyarrow.parquet as pq

    model, heads = tiny_model
    corpus = tmp_path / "rows.jsonl"
    short = sorted(gsm8k_rows, key=lambda r: len(r["prompt"]) + len(r["response"]))[:24]
    ids = [f"n-{i}" for i in range(ROWS)]
    corpus.write_text("".join(json.dumps(dict(short[i % len(short)], id=rid)) + "\n" for i, rid in enumerate(ids)))
    units = ROWS // ROWS_PER_PARTITION
    t0 = time.time()
    # as Ray advises for a real cluster, the head (the driver's node) runs no tasks or actors; each worker node has
    # room for the light stages (read, repartition, prepare: 2 CPUs) and both scoring actors, so that what ran on a
    # lost node can start again on the other
    cluster.add("head", cpus=0, head=True)
    for name in ("w1", "w2"):  # one at a time: a raylet has 30 s to register
        cluster.add(name, cpus=4)
    t_up = time.time() - t0

    out, log = tmp_path / "out", tmp_path / "run.log"
    proc = subprocess.Popen([sys.executable, "-m", "air_ray", *map(str, _score_args(model, heads, corpus, out,
                                                                                     cluster.address))],
                            cwd=REPO, env=cluster.env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    checked: set[Path] = set()

    def whole_partitions_only():
        """Every partition file readers can see is a whole Parquet file, and stays one."""
        for kind in ("scores", "rejected"):
            for name in _visible_partitions(out)[kind]:
                f = out / kind / f"{name}.parquet"
                if f not in checked:
                    pq.read_metadata(f)  # a half-written file has no footer
                    checked.add(f)

    try:
        def victim():  # a worker node whose scoring actor is past its set-up, once 2 units are committed
            if _commits(out) < 2:
                return None
            return next((n for n in ("w1", "w2") if any(SCORE_ACTOR in t and "__init__" not in t
                                                        for t in map(_title, cluster.pids(n)))), None)

        t = time.time()
        while not (node := victim()):
            assert proc.poll() is None, "the run ended before a node could be killed: " + log.read_text()[-3000:]
            assert time.time() - t < 300, "no working score actor on a worker node: " + log.read_text()[-3000:]
            whole_partitions_only()
            time.sleep(0.1)
        placement = {n: sorted(_title(p).split()[0] for p in cluster.pids(n) if SCORE_ACTOR in _title(p))
                     for n in cluster.nodes}
        t_kill, killed = time.time() - t, cluster.kill(node)
        at_kill = _commits(out)
        while proc.poll() is None and time.time() - t < 600:
            whole_partitions_only()
            time.sleep(0.1)
    finally:
        _reap(proc)
    text = log.read_text()
    t_run = time.time() - t
    assert at_kill < units, "too late: the run had already finished"
    assert any(SCORE_ACTOR in k for k in killed) and any("/raylet " in k for k in killed)
    assert any("DashboardAgent" in k for k in killed) and any("RuntimeEnvAgent" in k for k in killed)
    assert proc.returncode == 0, text[-4000:]

    ref = tmp_path / "ref"
    t = time.time()
    _uninterrupted(model, heads, corpus, ref)
    t_ref = time.time() - t

    m = json.loads((out / "_manifest.json").read_text())
    got = [r["id"] for r in _read_dir(out / "scores")]
    lost, doubled = len(set(ids) - set(got)), len(got) - len(set(got))
    hidden = [f.name for f in out.rglob(".*.tmp")]  # what a writer killed mid-file leaves: never read
    c = m["counts"]
    print(f"\n{ROWS} rows, {units} units, {ACTORS} actors; 3 nodes; node {node} killed {t_kill:.1f}s into the run "
          f"at {at_kill}/{units} committed units (score actors: {placement}): {len(killed)} processes "
          f"({', '.join(sorted({k.split()[0].rsplit('/', 1)[-1] for k in killed}))}); run rc {proc.returncode}; "
          f"rows lost {lost}, doubled {doubled}; hidden temporary files {hidden}; actors in the manifest {len(m['per_actor_rows'])}; "
          f"cluster up {t_up:.1f}s, run {t_run:.1f}s, reference {t_ref:.1f}s, total {time.time() - t0:.1f}s")
    assert sorted(got) == sorted(ids) and lost == doubled == 0  # every row exactly once
    assert c["rows_read"] == ROWS == c["rows_scored"] + c["rows_rejected"] and c["rows_rejected"] == 0
    assert sum(m["per_actor_rows"].values()) == c["rows_scored"] and m["this_run"]["units"] == units
    # no partition without its commit marker, none half written (checked while the run went on)
    commits = {p.stem for p in (out / "_commits").glob("*.json")}
    visible = _visible_partitions(out)
    assert len(commits) == units and visible["scores"] == commits and visible["rejected"] <= commits
    _assert_same_scores(out, ref)
