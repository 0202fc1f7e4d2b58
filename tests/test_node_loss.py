"""Whole-node loss (issue #16, point 3): a real multi-node Ray cluster on this machine (a `ray start` head and two
`ray start` worker nodes, each its own raylet), `air-ray score --address` joined to it, and mid-run the worker
node that hosts a scoring actor is killed: its raylet, its agents and its workers, SIGKILL. Every row must come
out exactly once, the counts must reconcile and the scores must equal an uninterrupted run's."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import process_title as _title
from tests.test_reliability import _assert_same_scores, _commits, _read_dir, _reap

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ROWS, ROWS_PER_PARTITION, ACTORS = 48, 2, 2
SCORE_ACTOR = "MapBatches(_ScoreActor)"


def _score_args(model, heads, corpus: Path, out: Path, address: str) -> list[str]:
    return ["score", "--model", model, "--heads", heads, "--input", corpus, "--output", out, "--dtype", "float32",
            "--device", "cpu", "--address", address, "--workers", ACTORS, "--cpus-per-worker", 1,
            "--rows-per-partition", ROWS_PER_PARTITION]


def _uninterrupted(model, heads, corpus: Path, out: Path) -> None:
    """The reference: the same stages in a plain loop in this process (no Ray), with what each scoring actor
    has: one torch thread, the same chunks."""
    import torch

    from air_ray.cli import parse
    from air_ray.store.heads import load_heads
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


def test_losing_a_worker_node_mid_run(ray_start_cluster, tiny_model, gsm8k_rows, tmp_path):
    import pyarrow.parquet as pq

    model, heads = tiny_model
    corpus = tmp_path / "rows.jsonl"
    short = sorted(gsm8k_rows, key=lambda r: len(r["prompt"]) + len(r["response"]))[:24]
    ids = [f"n-{i}" for i in range(ROWS)]
    corpus.write_text("".join(json.dumps(dict(short[i % len(short)], id=rid)) + "\n" for i, rid in enumerate(ids)))
    units = ROWS // ROWS_PER_PARTITION
    cluster = ray_start_cluster
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
