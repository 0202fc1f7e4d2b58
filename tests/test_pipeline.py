"""The Ray Data pipeline end to end: real Ray, the real default model, real Parquet (and a real S3 endpoint:
a moto server on loopback)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from air_ray.store import schemas as schema

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _read_dir(path: Path) -> list[dict]:
    files = sorted(p for p in path.glob("*.parquet") if not p.name.startswith((".", "_")))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, short_rows):
    """Two files: a JSONL with good rows and each common kind of bad line, and a Parquet file."""
    d = tmp_path_factory.mktemp("corpus")
    good_jsonl, good_parquet = short_rows[:6], short_rows[6:9]
    lines = [json.dumps(good_jsonl[0]), "not json", "", json.dumps(good_jsonl[1]), "[1, 2]",
             json.dumps({"id": "no-response", "prompt": "hi"}), "   ",
             json.dumps({"id": "empty", "prompt": "hi", "response": " "})]
    lines += [json.dumps(r) for r in good_jsonl[2:]]
    (d / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(good_parquet), d / "b.parquet")
    expected_rejects = {"invalid_json", "not_object", "missing_field", "empty_response"}
    return {"dir": d, "good": good_jsonl + good_parquet, "rows_read": 6 + 3 + 4, "rejects": expected_rejects}


def _score_cfg(heads_file, inputs, output, **kw):
    from air_ray.config import ScoreConfig

    base = dict(heads=str(heads_file), input=[str(i) for i in inputs], output=str(output), dtype="float32",
                device="cpu", rows_per_partition=3, address="local")
    base.update(kw)
    return ScoreConfig(**base)


@pytest.fixture(scope="module")
def two_actor_run(tmp_path_factory, heads_file, corpus):
    from air_ray.pipeline.score import run_score

    out = tmp_path_factory.mktemp("run2")
    manifest = run_score(_score_cfg(heads_file, [corpus["dir"]], out, workers=2, cpus_per_worker=1))
    return out, manifest


def test_counts_reconcile_and_both_actors_work(two_actor_run, corpus):
    out, m = two_actor_run
    c = m.counts
    assert c["rows_read"] == corpus["rows_read"] == c["rows_scored"] + c["rows_rejected"]
    assert c["rows_scored"] == len(corpus["good"])
    assert set(c["rejected_by_reason"]) == corpus["rejects"]
    assert len(m.per_actor_rows) == 2 and all(v > 0 for v in m.per_actor_rows.values())
    assert sum(m.per_actor_rows.values()) == c["rows_scored"]
    saved = json.loads((out / "_manifest.json").read_text())
    assert saved["counts"] == c and saved["model_fingerprint"] and saved["heads"]


def test_manifest_step_weight_statistics(two_actor_run):
    """The manifest's step-weight statistics (merged from the units' summaries) equal those recomputed from the
    partitions: the effective token share of every row's weights at p10 / median (rank ceil(q n)), and the largest
    weight; the default rule's weights average 1 per token in every row."""
    import math

    import numpy as np

    from air_ray.influence import effective_token_share

    out, m = two_actor_run
    rows = _read_dir(out / "scores")
    shares = sorted(round(effective_token_share(r["step_token_counts"], r["step_weights"]), 3) for r in rows)
    w = m.step_weights
    assert w["rule"] == "bounded" and w["rows"] == len(rows) and w["rows_without_stats"] == 0
    q = w["effective_token_share"]
    assert q["min"] == shares[0]
    assert q["p10"] == shares[math.ceil(0.1 * len(shares)) - 1] and q["median"] == shares[math.ceil(0.5 * len(shares)) - 1]
    assert w["max_weight"] == pytest.approx(max(max(r["step_weights"]) for r in rows))
    for r in rows:
        n, wt = np.array(r["step_token_counts"], float), np.array(r["step_weights"])
        if n.sum():
            assert (n * wt).sum() / n.sum() == pytest.approx(1.0), r["id"]
            assert 0.5 - 1e-9 <= wt[n > 0].min() and wt.max() <= 2.0 + 1e-9


def test_every_row_exactly_once(two_actor_run, corpus):
    out, m = two_actor_run
    scores = _read_dir(out / "scores")
    rejected = _read_dir(out / "rejected")
    ids = [r["id"] for r in scores]
    assert sorted(ids) == sorted(r["id"] for r in corpus["good"])
    assert len(ids) == len(set(ids))
    assert len(rejected) == m.counts["rows_rejected"]
    assert {r["line"] for r in rejected} == {2, 5, 6, 8}  # 1-based lines; blank lines 3 and 7 are not rows
    assert all(r["source"].endswith("a.jsonl") and r["reason"] and r["detail"] for r in rejected)
    # deterministic partition names: <stem>-<hash>-<chunk>
    names = sorted(p.name for p in (out / "scores").glob("*.parquet"))
    # 10 records / 3 per chunk + 1 chunk of b; the chunk a-00001 holds only rejected rows: no empty file
    assert len(names) == 4 and names[0].startswith("a-") and names[-1].startswith("b-")


def test_schema_exact_and_readers(two_actor_run):
    out, _ = two_actor_run
    for f in (out / "scores").glob("*.parquet"):
        sch = pq.read_schema(f)
        assert sch.remove_metadata().equals(schema.SCORES.remove_metadata()), sch
        meta = json.loads(sch.metadata[b"air_ray"])
        assert {"model", "model_fingerprint", "heads", "format", "steps", "version"} <= set(meta)
    for f in (out / "rejected").glob("*.parquet"):
        assert pq.read_schema(f).remove_metadata().equals(schema.REJECTED)

    import datasets
    import duckdb
    import pandas as pd
    import polars as pl

    d = out / "scores"
    n = len(_read_dir(d))
    assert len(pd.read_parquet(d)) == n
    assert pl.read_parquet(d / "*.parquet").height == n
    assert duckdb.sql(f"select count(*) from read_parquet('{d}/*.parquet')").fetchall()[0][0] == n
    ds = datasets.load_dataset("parquet", data_dir=str(d), split="train")
    assert ds.num_rows == n and "step_weights" in ds.column_names


def test_pipeline_equals_scorer(two_actor_run, corpus, heads_file):
    from air_ray import Scorer

    out, _ = two_actor_run
    got = {r["id"]: r for r in _read_dir(out / "scores")}
    scorer = Scorer(heads=str(heads_file), dtype="float32", device="cpu")
    want = scorer.score(corpus["good"])
    for w in want:
        g = got[w["id"]]
        assert g["n_prompt_tokens"] == w["n_prompt_tokens"] and g["n_response_tokens"] == w["n_response_tokens"]
        assert g["step_spans"] == w["step_spans"] and g["step_token_counts"] == w["step_token_counts"]
        for k in ("loss_base", "loss_ref", "score", "entropy_base"):
            assert g[k] == pytest.approx(w[k], abs=1e-5), k
        for a, b in zip(g["step_scores"], w["step_scores"]):
            assert (a is None and b is None) or a == pytest.approx(b, abs=1e-4)


def test_select_on_pipeline_output(two_actor_run, tmp_path):
    from air_ray.config import SelectConfig
    from air_ray.outputs.select import select

    out, _ = two_actor_run
    select(SelectConfig(scores=str(out), output=str(tmp_path / "sel"), top_frac=0.5))
    rows = _read_dir(out / "scores")
    brute = sorted(rows, key=lambda r: (-r["score"], r["id"]))[: -(-len(rows) // 2)]
    sel = pq.read_table(tmp_path / "sel" / "selection.parquet").to_pylist()
    assert [r["id"] for r in sel] == [r["id"] for r in brute]
    assert [r["rank"] for r in sel] == list(range(1, len(sel) + 1))
    # a heuristic baseline from the same scoring run (issue #8)
    select(SelectConfig(scores=str(out), output=str(tmp_path / "ent"), top_k=3, by="entropy_base"))
    want = sorted(rows, key=lambda r: (-r["entropy_base"], r["id"]))[:3]
    got = pq.read_table(tmp_path / "ent" / "selection.parquet").to_pylist()
    assert [r["id"] for r in got] == [r["id"] for r in want]
    assert [r["score"] for r in got] == [r["entropy_base"] for r in want]
    assert all(0 < r["entropy_base"] < 11 for r in rows)  # nats; log(49152) = 10.8


def test_rerun_replaces_not_duplicates(two_actor_run, corpus, heads_file, tmp_path):
    """Deterministic partition names: a second run into the same output leaves the same files."""
    from air_ray.pipeline.score import run_score

    out, _ = two_actor_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = sorted(p.name for p in (copy / "scores").glob("*.parquet"))
    run_score(_score_cfg(heads_file, [corpus["dir"] / "b.parquet"], copy, workers=1, cpus_per_worker=2))
    after = sorted(p.name for p in (copy / "scores").glob("*.parquet"))
    assert before == after
    ids = [r["id"] for r in _read_dir(copy / "scores")]
    assert len(ids) == len(set(ids)) == len(corpus["good"])


def test_ray_job_submit_single_actor_equals_two_actors(two_actor_run, corpus, heads_file, tmp_path,
                                                       ray_start_cluster):
    """`ray start --head` on free ports, `ray job submit` jobs/score.py, check the Parquet."""
    out2, _ = two_actor_run
    out1 = tmp_path / "run1"
    cluster = ray_start_cluster.add("head", cpus=4, head=True, dashboard=True)
    submit = cluster.job_submit(
        sys.executable, str(REPO / "jobs" / "score.py"), "--heads", str(heads_file), "--input", str(corpus["dir"]),
        "--output", str(out1), "--dtype", "float32", "--device", "cpu", "--workers", "1",
        # one CPU, as each of the two actors had: torch's thread count changes float32 reductions (~1e-6)
        "--cpus-per-worker", "1", "--rows-per-partition", "3", "--address", "auto",
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in (submit.stdout + submit.stderr).lower()
    assert "[air-ray score] done" in submit.stdout + submit.stderr  # the job's own progress lines
    a = {r["id"]: r for r in _read_dir(out1 / "scores")}
    b = {r["id"]: r for r in _read_dir(out2 / "scores")}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k]["score"] == pytest.approx(b[k]["score"], abs=1e-9)
        assert a[k]["step_scores"] == pytest.approx(b[k]["step_scores"], abs=1e-9)


def test_s3_round_trip(moto_s3, corpus, heads_file, tmp_path):
    """Read from and write to s3:// on a real HTTP endpoint (moto server on loopback)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_s3["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket="air")
    rows = corpus["good"][:3]
    s3.put_object(Bucket="air", Key="dumps/d1/part.jsonl", Body="\n".join(json.dumps(r) for r in rows).encode())
    env = dict(os.environ, **moto_s3)
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "air_ray", "score", "--heads", str(heads_file), "--input", "s3://air/dumps/*/",
           "--output", "s3://air/runs/r1", "--dtype", "float32", "--device", "cpu", "--format", "raw",
           "--address", "local", "--cpus-per-worker", "2"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([sys.executable, "-m", "air_ray", "select", "--scores", "s3://air/runs/r1",
                        "--output", "s3://air/runs/r1/selection", "--top-k", "2"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="air", Prefix="runs/r1/")["Contents"]}
    assert "runs/r1/_manifest.json" in keys and "runs/r1/selection/selection.parquet" in keys
    assert not any(k.rsplit("/", 1)[-1].startswith(".") for k in keys)  # no temporary files left behind
    local = tmp_path / "dl"
    local.mkdir()
    for k in keys:
        if k.startswith("runs/r1/scores/"):
            s3.download_file("air", k, str(local / k.rsplit("/", 1)[-1]))
    got = _read_dir(local)
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in rows)
    assert all(r["source"].startswith("s3://air/dumps/d1/") for r in got)
    manifest = json.loads(s3.get_object(Bucket="air", Key="runs/r1/_manifest.json")["Body"].read())
    assert manifest["counts"]["rows_scored"] == 3 and manifest["counts"]["rows_rejected"] == 0


def test_in_process_equals_ray(two_actor_run, corpus, heads_file, tmp_path):
    """``--executor in-process`` (issue #18: no Ray start-up for a small run) runs the same stages in this process:
    the same partitions, rows, rejected rows and counts as the Ray pipeline, the same scores (the Ray run's actors
    had 1 torch thread, this one 2: float32 sums differ in the last bits); a rerun resumes from the commit markers."""
    from air_ray.pipeline.score import run_score

    ray_out, ray_m = two_actor_run
    out = tmp_path / "in-process"
    cfg = _score_cfg(heads_file, [corpus["dir"]], out, address=None, executor="in-process")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = run_score(cfg)
        assert torch.get_num_threads() == 1  # the scorer's threads were this process's only while it scored
    finally:
        torch.set_num_threads(threads)
    assert m.placement["executor"] == "in-process" and m.placement["torch_threads"] >= 1
    assert "cluster_s" not in m.phases and m.counts == ray_m.counts
    assert sorted(p.name for p in (out / "scores").glob("*.parquet")) == \
        sorted(p.name for p in (ray_out / "scores").glob("*.parquet"))
    want = {r["id"]: r for r in _read_dir(ray_out / "scores")}
    got = {r["id"]: r for r in _read_dir(out / "scores")}
    assert set(got) == set(want)
    for i, g in got.items():
        assert g["step_spans"] == want[i]["step_spans"] and g["n_response_tokens"] == want[i]["n_response_tokens"]
        for k in ("loss_base", "loss_ref", "score", "entropy_base"):
            assert g[k] == pytest.approx(want[i][k], rel=1e-5, abs=1e-6), k
    key = lambda r: (Path(r["source"]).name, r["line"], r["reason"])  # noqa: E731
    assert sorted(map(key, _read_dir(out / "rejected"))) == sorted(map(key, _read_dir(ray_out / "rejected")))
    again = run_score(cfg)
    assert again.this_run["units_skipped"] == again.this_run["units"] == m.this_run["units"]
    assert again.counts == m.counts
