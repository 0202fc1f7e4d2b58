"""Scheduled rescoring (issue #5) on real files, a real Ray cluster and a real (tiny) checkpoint: new dumps,
no change, a changed file, new heads, concurrent runs, a killed run, and once on a moto S3 server."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from air_ray.data.corpus import unit_name

from tests.test_reliability import _reap, _read_dir, _wait_for

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_local():
    """One embedded Ray for the in-process runs of this module (run_score joins it instead of starting one)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _config(tmp: Path, model, heads, inputs, output, **extra) -> Path:
    doc = {"input": [str(i) for i in inputs], "output": str(output), "model": str(model), "heads": str(heads),
           "format": "chat", "steps": "lines", "dtype": "float32", "device": "cpu", "rows_per_partition": 4,
           "select": {"top_frac": 0.5}, "address": "local", **extra}
    path = tmp / f"rescore-{hashlib.sha1(json.dumps(doc).encode()).hexdigest()[:8]}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(doc))
    return path


def _rescore(cfg_path: Path) -> dict:
    from air_ray.config import RescoreConfig
    from air_ray.pipeline.rescore import run_rescore

    return run_rescore(RescoreConfig.load(str(cfg_path)))


def _version_dir(out: Path, summary: dict) -> Path:
    return out / f"v={summary['version']}"


def test_incremental_story(ray_local, tiny_model, gsm8k_rows, tmp_path):
    model, heads = tiny_model
    rows = [dict(r) for r in gsm8k_rows[:30]]
    dumps, out = tmp_path / "dumps", tmp_path / "air"
    _write(dumps / "d1" / "part.jsonl", rows[0:6])
    _write(dumps / "d2" / "part.jsonl", rows[6:12])
    cfg = _config(tmp_path, model, heads, [f"{dumps}/*/*.jsonl"], out)

    # two dumps: everything is new
    s1 = _rescore(cfg)
    assert (s1["files_new"], s1["files_changed"], s1["files_unchanged"]) == (2, 0, 0)
    assert s1["rows_scored"] == s1["rows_total"] == 12 and s1["selected"] == 6 and s1["status"] == "done"
    v = _version_dir(out, s1)
    ledger = {r["uri"]: r for r in pq.read_table(v / "ledger.parquet").to_pylist()}
    d1 = str(dumps / "d1" / "part.jsonl")
    assert ledger[d1]["sha256"] == hashlib.sha256(Path(d1).read_bytes()).hexdigest()
    assert ledger[d1]["rows"] == 6 and ledger[d1]["partitions"] == 2 and ledger[d1]["status"] == "done"
    assert not (v / "_lease.json").exists() and (v / "heads.json").exists()
    assert len(pq.read_table(v / "selection" / "selection.parquet")) == 6

    # a third dump: only it is scored; an id already in the version is a duplicate
    third = rows[12:17] + [dict(rows[18], id=rows[0]["id"])]
    _write(dumps / "d3" / "part.jsonl", third)
    s2 = _rescore(cfg)
    assert (s2["files_new"], s2["files_changed"], s2["files_unchanged"]) == (1, 0, 2)
    assert s2["rows_scored"] == 5 and s2["rows_total"] == 17 and s2["selected"] == 9
    assert s2["version"] == s1["version"]
    dup = [r for r in _read_dir(v / "rejected") if r["reason"] == "duplicate_id"]
    assert [(r["id"], r["detail"]) for r in dup] == [(rows[0]["id"], "first occurrence: already scored in this output")]

    # no change: nothing scored, and not one partition read (the selection is of these very partitions: issue #33);
    # garbage in every partition file would fail any reader
    saved = {p: p.read_bytes() for p in (v / "scores").glob("*.parquet")}
    selection = (v / "selection" / "selection.json").read_bytes()
    for p in saved:
        p.write_bytes(b"not a parquet file")
    s3 = _rescore(cfg)
    assert (s3["files_new"], s3["files_changed"], s3["files_unchanged"], s3["rows_scored"]) == (0, 0, 3, 0)
    assert s3["rows_total"] == 17 and s3["selected"] == 9
    assert (v / "selection" / "selection.json").read_bytes() == selection
    for p, data in saved.items():
        p.write_bytes(data)

    # a changed file (fewer rows, one response edited): rescored, its stale partition removed, no duplicates
    changed = [rows[6], dict(rows[7], response=rows[7]["response"] + "\nChecked."), rows[20]]
    _write(dumps / "d2" / "part.jsonl", changed)
    s4 = _rescore(cfg)
    assert (s4["files_new"], s4["files_changed"], s4["files_unchanged"]) == (0, 1, 2)
    assert s4["rows_scored"] == 3 and s4["rows_total"] == 6 + 3 + 5
    scores = _read_dir(v / "scores")
    ids = [r["id"] for r in scores]
    assert len(ids) == len(set(ids)) == 14
    assert {r["id"] for r in rows[8:12]}.isdisjoint(ids) and rows[20]["id"] in ids
    ledger = {r["uri"]: r for r in pq.read_table(v / "ledger.parquet").to_pylist()}
    d2 = str(dumps / "d2" / "part.jsonl")
    assert ledger[d2]["rows"] == 3 and ledger[d2]["partitions"] == 1
    assert (v / "scores" / f"{unit_name(d2, 0)}.parquet").exists()
    assert not list(v.glob(f"*/{unit_name(d2, 1)}.*"))  # the chunk the shorter file no longer has is gone
    assert sum(1 for r in scores if r["source"] == d2) == 3
    assert len(list((v / "_commits").glob("*.json"))) == 2 + 1 + 2  # d2's second chunk is gone

    # different heads: a new version, scored in full
    doc = json.loads(Path(heads).read_text())
    other = tmp_path / "heads-other.json"
    other.write_text(json.dumps(dict(doc, heads=[[0, 1]])))
    s5 = _rescore(_config(tmp_path, model, other, [f"{dumps}/*/*.jsonl"], out))
    assert s5["version"] != s1["version"]
    assert (s5["files_new"], s5["rows_scored"], s5["rows_total"]) == (3, 14, 14)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("v=")) == sorted(
        [f"v={s1['version']}", f"v={s5['version']}"])


def _cli(*args, env=None):
    e = dict(os.environ, **(env or {}))
    e.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "air_ray", *map(str, args)], cwd=REPO, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _last_json(log: str) -> dict:
    return json.loads(log.strip().splitlines()[-1])


def test_heads_detect_once_per_model(ray_local, tiny_model, gsm8k_rows, tmp_path):
    """heads: detect runs head detection on the first pass only, keeps the result under <output>/heads/ and
    scores with it; the next pass reuses it (same version, nothing redone)."""
    from air_ray.store.heads import load_heads
    from air_ray.models import prepare_model

    model, _ = tiny_model
    dumps, out = tmp_path / "dumps", tmp_path / "air"
    _write(dumps / "d1" / "part.jsonl", [dict(r) for r in gsm8k_rows[:4]])
    cfg = _config(tmp_path, model, "detect", [f"{dumps}/*/*.jsonl"], out,
                  detect={"num_probes": 2, "probe_tokens": 128, "head_frac": 0.25})
    s1 = _rescore(cfg)
    fp = prepare_model(str(model)).fingerprint
    kept = out / "heads" / f"{fp}.json"
    doc = load_heads(str(kept), fingerprint=fp)
    assert len(doc["heads"]) == 2 and doc["top_frac"] == 0.25  # 25 % of 2 layers x 4 heads
    v = _version_dir(out, s1)
    assert json.loads((v / "heads.json").read_text())["heads"] == [list(h) for h in doc["heads"]]
    assert s1["rows_scored"] == 4 and s1["status"] == "done"
    stamp = kept.stat().st_mtime_ns
    s2 = _rescore(cfg)
    assert kept.stat().st_mtime_ns == stamp and s2["version"] == s1["version"] and s2["rows_scored"] == 0


def test_concurrent_runs_one_backs_off(tiny_model, gsm8k_rows, tmp_path):
    model, heads = tiny_model
    dumps, out = tmp_path / "dumps", tmp_path / "air"
    _write(dumps / "d1" / "part.jsonl", gsm8k_rows[:8])
    cfg = _config(tmp_path, model, heads, [dumps], out)
    a = _cli("rescore", "--config", cfg)
    try:
        _wait_for(lambda: list(out.glob("v=*/_lease.json")), 300, a, "the first run's lease")
        b = _cli("rescore", "--config", cfg)
        log_b, _ = b.communicate(timeout=300)
        assert b.returncode == 0, log_b[-3000:]
        assert "backing off" in log_b and _last_json(log_b)["status"] == "busy"
        assert _last_json(log_b)["rows_scored"] == 0
        log_a, _ = a.communicate(timeout=600)
    finally:
        _reap(a)
    assert a.returncode == 0, log_a[-3000:]
    sa = _last_json(log_a)
    assert sa["status"] == "done" and sa["rows_scored"] == sa["rows_total"] == 8


def test_killed_run_then_rerun(smol_ref, heads_file, gsm8k_rows, tmp_path):
    """The real default model (slow enough to be killed mid-way), SIGKILL, rerun at once: the dead run's lease
    is taken over (same host, its process is gone); complete, nothing doubled."""
    rows = sorted(gsm8k_rows, key=lambda r: len(r["prompt"]) + len(r["response"]))[:10]
    dumps, out = tmp_path / "dumps", tmp_path / "air"
    _write(dumps / "d1" / "part.jsonl", rows[:5])
    _write(dumps / "d2" / "part.jsonl", rows[5:])
    cfg = _config(tmp_path, "smollm2-135m", heads_file, [dumps], out, rows_per_partition=1)
    a = _cli("rescore", "--config", cfg)
    try:
        _wait_for(lambda: len(list(out.glob("v=*/_commits/*.json"))) >= 2, 600, a, "two committed partitions")
        a.kill()
        a.wait(timeout=30)
    finally:
        _reap(a)
    done = len(list(out.glob("v=*/_commits/*.json")))
    assert done < 10, "too late: the run had finished"
    b = _cli("rescore", "--config", cfg)
    log, _ = b.communicate(timeout=900)
    assert b.returncode == 0, log[-3000:]
    s = _last_json(log)
    assert s["status"] == "done" and s["files_new"] == 2 and s["rows_total"] == 10
    v = out / f"v={s['version']}"
    ids = [r["id"] for r in _read_dir(v / "scores")]
    assert sorted(ids) == sorted(r["id"] for r in rows)
    m = json.loads((v / "_manifest.json").read_text())
    assert m["this_run"]["units_skipped"] >= done and m["this_run"]["rows_scored"] == 10 - m["this_run"]["units_skipped"]
    ledger = pq.read_table(v / "ledger.parquet").to_pylist()
    assert {r["status"] for r in ledger} == {"done"} and sum(r["rows"] for r in ledger) == 10


def test_rescore_on_s3(tiny_model, gsm8k_rows, tmp_path, moto_s3):
    import boto3

    model, heads = tiny_model
    s3 = boto3.client("s3", endpoint_url=moto_s3["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket="air")
    for i, chunk in enumerate([gsm8k_rows[:4], gsm8k_rows[4:7]]):
        s3.put_object(Bucket="air", Key=f"dumps/d{i}/part.jsonl",
                      Body="".join(json.dumps(r) + "\n" for r in chunk).encode())
    cfg = _config(tmp_path, model, heads, ["s3://air/dumps/*/*.jsonl"], "s3://air/air")
    for expect_new, expect_scored in ((2, 7), (0, 0)):
        p = _cli("rescore", "--config", cfg, env=moto_s3)
        log, _ = p.communicate(timeout=600)
        assert p.returncode == 0, log[-3000:]
        s = _last_json(log)
        assert (s["files_new"], s["rows_scored"], s["rows_total"], s["selected"]) == (expect_new, expect_scored, 7, 4)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="air", Prefix="air/")["Contents"]}
    v = f"air/v={s['version']}/"
    assert {v + "ledger.parquet", v + "selection/selection.parquet", v + "heads.json"} <= keys
    assert v + "_lease.json" not in keys
