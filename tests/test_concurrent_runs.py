"""Runs never take each other down (issue #16, point 0): a run started while another run's embedded cluster is up
starts its own instead of joining it, so the first run stopping its cluster does not kill the second. Real
processes, real Ray, a tiny real model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.test_reliability import _commits

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _rows(gsm8k_rows, n: int, prefix: str) -> str:
    return "".join(json.dumps(dict(gsm8k_rows[i % len(gsm8k_rows)], id=f"{prefix}-{i}")) + "\n" for i in range(n))


def _start(args, log: Path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.Popen([sys.executable, "-m", "air_ray", *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=env, cwd=REPO, start_new_session=True)


def test_score_and_rescore_beside_a_shorter_run(tmp_path, tiny_model, gsm8k_rows):
    model, heads = tiny_model
    common = ["--model", str(model), "--heads", str(heads), "--dtype", "float32", "--device", "cpu",
              "--cpus-per-worker", "1", "--executor", "ray"]  # three runs on two cores: one torch thread each;
    # Ray: small corpora on a machine with no cluster would otherwise be scored in-process
    (tmp_path / "a.jsonl").write_text(_rows(gsm8k_rows, 8, "a"))
    (tmp_path / "b.jsonl").write_text(_rows(gsm8k_rows, 80, "b"))
    (tmp_path / "c.jsonl").write_text(_rows(gsm8k_rows, 80, "c"))
    a = _start(["score", *common, "--input", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "A")],
               tmp_path / "a.log")
    procs = {"a": a}
    try:
        deadline = time.time() + 300
        while "input files" not in (tmp_path / "a.log").read_text():  # A's embedded cluster is up
            assert a.poll() is None and time.time() < deadline, (tmp_path / "a.log").read_text()[-3000:]
            time.sleep(0.2)
        b = _start(["score", *common, "--input", str(tmp_path / "b.jsonl"), "--output", str(tmp_path / "B"),
                    "--rows-per-partition", "20"], tmp_path / "b.log")
        c = _start(["rescore", *common, "--input", str(tmp_path / "c.jsonl"), "--output", str(tmp_path / "C"),
                    "--rows-per-partition", "20", "--select", "top_k=5"], tmp_path / "c.log")
        procs.update(b=b, c=c)
        codes = {}
        while len(codes) < 3 and time.time() < deadline + 600:
            for name, p in procs.items():
                if name not in codes and p.poll() is not None:
                    codes[name] = p.returncode
            time.sleep(0.2)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    logs = {n: (tmp_path / f"{n}.log").read_text() for n in "abc"}
    assert codes == {"a": 0, "b": 0, "c": 0}, {n: logs[n][-2000:] for n in "abc"}
    assert list(codes)[0] == "a", "the short run should finish first (else this test proves nothing)"
    for out, n, prefix in ((tmp_path / "A", 8, "a"), (tmp_path / "B", 80, "b")):
        ids = [r["id"] for f in sorted((out / "scores").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
        assert sorted(ids) == sorted(f"{prefix}-{i}" for i in range(n))  # every row, once
    summary = json.loads(logs["c"].strip().splitlines()[-1])
    assert summary["status"] == "done" and summary["rows_scored"] == summary["rows_total"] == 80


def test_a_lost_cluster_ends_with_one_line_and_a_rerun_resumes(tmp_path, tiny_model, gsm8k_rows, ray_start_cluster):
    """The cluster a run joined (RAY_ADDRESS, as `ray job submit` sets it) stops mid-run: Ray ends the driver from
    C++, and `air-ray` (its parent, ``air_ray.cli.supervise``) says so in one last line, exit 3; the same command
    rerun (here without RAY_ADDRESS and with no cluster left: in-process, the default for a small corpus) scores the
    rest, every row once."""
    model, heads = tiny_model
    (tmp_path / "rows.jsonl").write_text(_rows(gsm8k_rows, 40, "r"))
    out = tmp_path / "out"
    args = ["score", "--model", str(model), "--heads", str(heads), "--dtype", "float32", "--device", "cpu",
            "--cpus-per-worker", "1", "--input", str(tmp_path / "rows.jsonl"), "--output", str(out),
            "--rows-per-partition", "2"]
    cluster = ray_start_cluster.add("head", cpus=4, head=True)
    env = dict(cluster.env, RAY_ADDRESS=cluster.address, HF_HUB_OFFLINE="1",
               RAY_gcs_rpc_server_reconnect_timeout_s="10")  # Ray's default: 60 s before it gives up
    run = subprocess.Popen([sys.executable, "-m", "air_ray", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env, cwd=REPO, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not _commits(out):
            assert run.poll() is None and time.time() < deadline, run.communicate()[1][-3000:]
            time.sleep(0.2)
        cluster.stop()
        stdout, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, 9)
    committed = _commits(out)
    assert run.returncode == 3, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("air-ray: error: the Ray cluster was lost mid-run"), stderr[-2000:]
    assert 0 < committed < 20 and not (out / "_manifest.json").exists()

    rerun = subprocess.run([sys.executable, "-m", "air_ray", *args], capture_output=True, text=True, cwd=REPO,
                           timeout=900, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    m = json.loads((out / "_manifest.json").read_text())
    assert m["placement"]["executor"] == "in-process"
    assert m["this_run"]["units_skipped"] >= committed and m["counts"]["rows_scored"] == 40
    ids = [r["id"] for f in sorted((out / "scores").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert sorted(ids) == sorted(f"r-{i}" for i in range(40))  # every row, once
