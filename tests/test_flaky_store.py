"""A flaky object store (issue #16): ``air-ray score``, ``select`` and ``rescore`` against a real S3 endpoint (moto's
server) behind a proxy on loopback that fails a quarter of the requests (HTTP 500, 503 SlowDown, connections
dropped before the store sees the request, after it applied it, or in the middle of the reply; a fixed seed:
``tests/faulty_proxy.py``). Every command must finish, through the client's retries, in one attempt, or fail with
one clear line and finish when run again; then, read straight from the store (not through the proxy): every row
exactly once, counts that reconcile, the right selection, a sane ledger, the lease released and no temporary
files. Real Ray, a real (tiny) checkpoint, real HTTP: nothing is mocked."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.faulty_proxy import FAULTS, FaultyProxy

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
RATE, SEED = 0.25, 16
RETRY_LINE = "air-ray: warning: s3 "


def _run(label: str, args: list, env: dict, log: list) -> subprocess.CompletedProcess:
    """``python -m air_ray ARGS``: once, and once more if the first run failed (which it may only do with one
    clear line: no traceback). Returns the run that succeeded."""
    e = dict(os.environ, **env)
    e.pop("RAY_ADDRESS", None)
    for attempt in (1, 2):
        t = time.time()
        p = subprocess.run([sys.executable, "-m", "air_ray", *map(str, args)], cwd=REPO, env=e, capture_output=True,
                           text=True, timeout=600)
        log.append({"command": label, "attempt": attempt, "rc": p.returncode, "s": round(time.time() - t, 1),
                    "retries_logged": (p.stdout + p.stderr).count(RETRY_LINE)})
        if p.returncode == 0:
            return p
        last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
        assert "Traceback" not in p.stderr and last.startswith("air-ray: error: "), \
            f"{label} failed without one clear line:\n{p.stderr[-4000:]}"
    raise AssertionError(f"{label} failed twice; last: {last}")


def _keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="air", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _rows(s3, keys: list[str]) -> list[dict]:
    return [r for k in sorted(keys) for r in pq.read_table(io.BytesIO(s3.get_object(Bucket="air", Key=k)["Body"]
                                                                       .read())).to_pylist()]


def _json(s3, key: str) -> dict:
    return json.loads(s3.get_object(Bucket="air", Key=key)["Body"].read())


def test_score_select_rescore_through_a_flaky_store(moto_s3, tiny_model, gsm8k_rows, tmp_path):
    import boto3

    model, heads = tiny_model
    s3 = boto3.client("s3", endpoint_url=moto_s3["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket="air")  # set-up and checks talk to the store directly; the commands, through the proxy
    rows = [dict(r) for r in gsm8k_rows[:24]]
    files = {f"dumps/d{i}/part.jsonl": [json.dumps(r) for r in rows[8 * i:8 * (i + 1)]] for i in range(3)}
    files["dumps/d2/part.jsonl"] += ["{not json", json.dumps(rows[0])]  # two rejected: invalid_json, duplicate_id
    for key, lines in files.items():
        s3.put_object(Bucket="air", Key=key, Body=("\n".join(lines) + "\n").encode())
    ids = {r["id"] for r in rows}

    proxy = FaultyProxy(moto_s3["AWS_ENDPOINT_URL"], rate=RATE, seed=SEED)
    env = dict(moto_s3, AWS_ENDPOINT_URL=proxy.start(), RAY_DEDUP_LOGS="0")  # every worker's retry line, counted
    log: list[dict] = []
    t0 = time.time()
    try:
        common = ["--model", model, "--heads", heads, "--format", "chat", "--steps", "lines", "--dtype", "float32",
                  "--device", "cpu", "--address", "local", "--rows-per-partition", 4]
        _run("score", ["score", "--input", "s3://air/dumps/", "--output", "s3://air/runs/r1", *common], env, log)
        p = _run("select", ["select", "--scores", "s3://air/runs/r1", "--output", "s3://air/runs/r1/selection",
                            "--top-k", 10], env, log)
        assert json.loads(p.stdout.strip().splitlines()[-1])["counts"]["rows_selected"] == 10
        cfg = tmp_path / "rescore.yaml"
        cfg.write_text(yaml.safe_dump({
            "input": ["s3://air/dumps/*/*.jsonl"], "output": "s3://air/air", "model": str(model), "heads": str(heads),
            "format": "chat", "steps": "lines", "dtype": "float32", "device": "cpu", "rows_per_partition": 4,
            "select": {"top_k": 10}, "address": "local"}))
        p = _run("rescore", ["rescore", "--config", cfg], env, log)
        summary = json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        proxy.stop()
    wall = time.time() - t0
    counts = proxy.counts()
    print("\nflaky store: runs", json.dumps(log), json.dumps(counts), f"{wall:.1f}s")

    # the faults happened, of every kind, and the retries that got through them were logged
    assert counts["faults"] >= 0.15 * counts["requests"], counts
    assert all(counts[k] > 0 for k in FAULTS), counts
    assert sum(r["retries_logged"] for r in log) > 0, log

    # score: every input row exactly once (scored, or rejected with its reason); counts reconcile
    keys = _keys(s3, "runs/r1/")
    assert not [k for k in keys if k.rsplit("/", 1)[-1].startswith(".")], "temporary files left behind"
    scored = _rows(s3, [k for k in keys if k.startswith("runs/r1/scores/") and k.endswith(".parquet")])
    rejected = _rows(s3, [k for k in keys if k.startswith("runs/r1/rejected/") and k.endswith(".parquet")])
    got = [r["id"] for r in scored]
    assert len(got) == len(set(got)) and set(got) == ids, (len(got), len(set(got)), len(ids))
    assert sorted(r["reason"] for r in rejected) == ["duplicate_id", "invalid_json"]
    c = _json(s3, "runs/r1/_manifest.json")["counts"]
    assert (c["rows_read"], c["rows_scored"], c["rows_rejected"]) == (len(rows) + 2, len(rows), 2), c

    # select: the 10 best-scored rows, each once
    sel = _rows(s3, ["runs/r1/selection/selection.parquet"])
    best = sorted(scored, key=lambda r: (-r["score"], r["id"]))[:10]
    assert sorted(r["id"] for r in sel) == sorted(r["id"] for r in best) and len(sel) == 10

    # rescore: the version holds every row once, the ledger every file (done), the lease is released
    assert summary["status"] == "done" and summary["rows_total"] == len(rows) and summary["selected"] == 10, summary
    v = f"air/v={summary['version']}/"
    vkeys = _keys(s3, v)
    assert not [k for k in vkeys if k.rsplit("/", 1)[-1].startswith(".")], "temporary files left behind"
    assert v + "_lease.json" not in vkeys
    vids = [r["id"] for r in _rows(s3, [k for k in vkeys if k.startswith(v + "scores/") and k.endswith(".parquet")])]
    assert len(vids) == len(set(vids)) and set(vids) == ids
    ledger = _rows(s3, [v + "ledger.parquet"])
    assert sorted(r["uri"] for r in ledger) == sorted(f"s3://air/{k}" for k in files)
    assert {r["status"] for r in ledger} == {"done"} and sum(r["rows"] for r in ledger) == len(rows) + 2
    assert len(_rows(s3, [v + "selection/selection.parquet"])) == 10

    figures = {"rows": len(rows), "rows_lost": len(ids - set(got)) + len(ids - set(vids)),
               "rows_doubled": len(got) - len(set(got)) + len(vids) - len(set(vids)), **counts,
               "retries_logged": sum(r["retries_logged"] for r in log), "wall_s": round(wall, 1), "runs": log}
    print("\nflaky store:", json.dumps(figures))


def test_a_store_that_keeps_failing_is_one_line(moto_s3):
    """Retries are bounded: a store that answers every request with 503 SlowDown fails the command after them
    (AWS_MAX_ATTEMPTS=2 here, to be quick) with one line naming the operation and the path, each retry logged."""
    import boto3

    boto3.client("s3", endpoint_url=moto_s3["AWS_ENDPOINT_URL"], region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="air")
    proxy = FaultyProxy(moto_s3["AWS_ENDPOINT_URL"], rate=1.0, seed=SEED, faults=("http_503",))
    e = dict(os.environ, **dict(moto_s3, AWS_ENDPOINT_URL=proxy.start(), AWS_MAX_ATTEMPTS="2"))
    try:
        p = subprocess.run([sys.executable, "-m", "air_ray", "select", "--scores", "s3://air/runs/r1", "--output",
                            "s3://air/runs/r1/selection", "--top-k", "3"], cwd=REPO, env=e, capture_output=True,
                           text=True, timeout=300)
    finally:
        proxy.stop()
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert lines[-1].startswith("air-ray: error: s3 ListObjectsV2 s3://air/runs/r1/scores/ failed after the retries"), lines[-1]
    retries = [ln for ln in lines if ln.startswith(RETRY_LINE)]
    assert retries and len(retries) < proxy.counts()["requests"] <= 5 * 2 * 3, (len(retries), proxy.counts())
