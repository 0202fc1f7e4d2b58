"""Peak memory and wall time of ``air_ray.select`` against the naive pandas way, on synthetic scores.

    .venv/bin/python bench/select_memory.py [--rows 10000000] [--partitions 100] [--top-frac 0.1]

Writes ``--rows`` SCORES rows (unique ids in random order, ~1 % NaN scores, rounded scores so ties occur, four
domains, 2-6 steps per row in the list columns) as ``--partitions`` Parquet files under a temporary folder,
then runs, each in a fresh subprocess whose VmHWM is that run's own peak (not ``ru_maxrss``, which Linux
carries over from the parent across fork + exec):

* ``select``: ``air_ray.outputs.select.select(SelectConfig(top_frac=...))``;
* ``naive``:  ``pandas.read_parquet`` of every column of every partition, ``sort_values(score desc, id asc)``,
  ``head(ceil(F * n))``.

It prints the rows, the wall times, each process's peak RSS (and its growth over the same interpreter with the
libraries imported) and the naive/select ratio. The naive run is killed if its RSS passes ``--naive-max-gb``
(reported as a lower bound) so the benchmark cannot take the machine down.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from air_ray.store.schemas import SCORES  # noqa: E402

DOMAINS = np.array(["math", "code", "science", "chat"])

SELECT_CHILD = """
import json, sys, time
import numpy, pyarrow, pyarrow.dataset, pyarrow.compute, pyarrow.parquet, fsspec
import matplotlib.figure, matplotlib.backends.backend_agg
from air_ray.config import SelectConfig
from air_ray.outputs.select import select
peak = lambda: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
before = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
t = time.perf_counter()
s = select(SelectConfig(scores=sys.argv[1], output=sys.argv[2], top_frac=float(sys.argv[3])))
print(json.dumps({"seconds": time.perf_counter() - t, "before": before, "peak": peak(),
                  "selected": s["counts"]["rows_selected"], "candidates": s["counts"]["rows_candidates"],
                  "threshold": s["threshold_score"]}))
"""

NAIVE_CHILD = """
import json, math, sys, time
import numpy, pyarrow, pyarrow.dataset, pyarrow.parquet, pandas as pd
peak = lambda: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
before = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
t = time.perf_counter()
df = pd.read_parquet(sys.argv[1])                      # every column, every partition
df = df[df["score"].notna()]
k = math.ceil(float(sys.argv[2]) * len(df))
top = df.sort_values(["score", "id"], ascending=[False, True]).head(k)
print(json.dumps({"seconds": time.perf_counter() - t, "before": before, "peak": peak(),
                  "selected": len(top), "threshold": float(top["score"].iloc[-1]) if k else None}))
"""


def synthetic_partition(rng, row_ids: np.ndarray) -> pa.Table:
    """One SCORES partition for the given row numbers, built with numpy/pyarrow only (no per-row Python)."""
    n = len(row_ids)
    ids = pc.binary_join_element_wise("id-", pc.utf8_lpad(pa.array(row_ids).cast(pa.string()), 10, "0"), "")
    score = np.round(rng.normal(size=n), 4)
    score[rng.random(n) < 0.01] = np.nan
    n_resp = rng.integers(50, 800, n).astype(np.int32)
    steps = rng.integers(2, 7, n).astype(np.int32)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(steps, out=offsets[1:])
    total = int(offsets[-1])
    # step j of a row spans [j * L / s, (j + 1) * L / s) of its response
    j = np.arange(total, dtype=np.int32) - np.repeat(offsets[:-1], steps)
    length, s_of = np.repeat(n_resp, steps), np.repeat(steps, steps)
    starts, ends = (j * length) // s_of, ((j + 1) * length) // s_of
    pairs = pa.FixedSizeListArray.from_arrays(pa.array(np.stack([starts, ends], 1).ravel().astype(np.int32)), 2)
    spans = pa.ListArray.from_arrays(pa.array(offsets), pairs.cast(pa.list_(pa.int32())))
    step_scores = rng.normal(size=total)
    weights = rng.random(total)
    cols = {
        "id": ids,
        "domain": pa.array(DOMAINS[rng.integers(0, len(DOMAINS), n)]),
        "source": pa.repeat("synthetic.jsonl", n).cast(pa.string()),
        "n_prompt_tokens": pa.array(rng.integers(20, 400, n).astype(np.int32)),
        "n_response_tokens": pa.array(n_resp),
        "loss_base": pa.array(rng.random(n) + 1.0),
        "loss_ref": pa.array(rng.random(n) + 1.0),
        "score": pa.array(score),
        "step_spans": spans,
        "step_token_counts": pa.ListArray.from_arrays(pa.array(offsets), pa.array((ends - starts).astype(np.int32))),
        "step_scores": pa.ListArray.from_arrays(pa.array(offsets), pa.array(step_scores)),
        "step_weights": pa.ListArray.from_arrays(pa.array(offsets), pa.array(weights)),
        "truncated": pa.array(np.zeros(n, bool)),
        "entropy_base": pa.array(rng.random(n) * 3.0),
        "step_kinds": pa.nulls(n, SCORES.field("step_kinds").type),
    }
    return pa.Table.from_pydict(cols, schema=SCORES)


def generate(folder: Path, rows: int, partitions: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    perm = rng.permutation(rows)
    nan = 0
    for p, row_ids in enumerate(np.array_split(perm, partitions)):
        t = synthetic_partition(rng, row_ids)
        nan += int(pc.sum(pc.is_nan(t.column("score"))).as_py())
        pq.write_table(t, folder / f"part-{p:05d}.parquet", compression="zstd")
    (folder / ".part-99999.parquet.tmp").write_bytes(b"in progress")  # must be ignored
    return nan


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_child(code: str, args: list[str], max_bytes: int | None = None) -> dict:
    """Run ``code`` in a fresh interpreter; kill it if its RSS passes ``max_bytes``."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    watched = {"max": 0, "killed": False}

    def watch():
        while proc.poll() is None:
            rss = _rss(proc.pid)
            watched["max"] = max(watched["max"], rss)
            if max_bytes and rss > max_bytes:
                watched["killed"] = True
                proc.kill()
                return
            time.sleep(0.05)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    out, err = proc.communicate()
    w.join()
    wall = time.perf_counter() - t
    if watched["killed"]:
        return {"killed": True, "peak": watched["max"], "process_seconds": wall}
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{err}")
    r = json.loads(out.strip().splitlines()[-1])
    r["process_seconds"] = wall
    return r


def mb(x: float) -> str:
    return f"{x / 2**20:,.0f} MB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--partitions", type=int, default=100)
    ap.add_argument("--top-frac", type=float, default=0.1)
    ap.add_argument("--workdir", default=None, help="where the temporary data goes (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--naive-max-gb", type=float, default=16.0, help="kill the naive run past this RSS")
    a = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="air_ray_select_bench_", dir=a.workdir))
    try:
        t = time.perf_counter()
        nan = generate(tmp / "run" / "scores", a.rows, a.partitions)
        gen_s = time.perf_counter() - t
        size = sum(p.stat().st_size for p in (tmp / "run" / "scores").glob("*.parquet"))
        print(f"rows            {a.rows:,} in {a.partitions} partitions ({mb(size)} zstd Parquet, {nan:,} NaN scores)"
              f", generated in {gen_s:.1f} s")

        s = run_child(SELECT_CHILD, [str(tmp / "run"), str(tmp / "out"), repr(a.top_frac)])
        print(f"select          top_frac={a.top_frac}: {s['selected']:,} of {s['candidates']:,} candidates, "
              f"threshold {s['threshold']}")
        print(f"select wall     {s['seconds']:.1f} s in select() ({s['process_seconds']:.1f} s process)")
        print(f"select peak RSS {mb(s['peak'])} (growth over imports {mb(s['peak'] - s['before'])})")
        result = {"rows": a.rows, "partitions": a.partitions, "top_frac": a.top_frac, "generate_s": gen_s,
                  "parquet_bytes": size, "select": s}
        if not a.skip_naive:
            n = run_child(NAIVE_CHILD, [str(tmp / "run" / "scores"), repr(a.top_frac)],
                          max_bytes=int(a.naive_max_gb * 2**30))
            if n.get("killed"):
                print(f"naive           killed past {a.naive_max_gb} GB RSS after {n['process_seconds']:.1f} s")
                print(f"ratio           naive/select peak RSS > {n['peak'] / s['peak']:.1f}x")
            else:
                assert n["selected"] == s["selected"] and n["threshold"] == s["threshold"], (n, s)
                print(f"naive wall      {n['seconds']:.1f} s ({n['process_seconds']:.1f} s process)")
                print(f"naive peak RSS  {mb(n['peak'])} (growth over imports {mb(n['peak'] - n['before'])})")
                print(f"ratio           naive/select peak RSS {n['peak'] / s['peak']:.1f}x, "
                      f"growth {(n['peak'] - n['before']) / max(1, s['peak'] - s['before']):.1f}x, "
                      f"wall {n['seconds'] / s['seconds']:.1f}x")
            result["naive"] = n
        print(json.dumps(result))
    finally:
        if a.keep:
            print(f"data kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
