"""HF vs vLLM backend on this machine: startup, scoring throughput, agreement (issue #6).

    .venv/bin/python bench/backends.py [--rows 32] [--dtype float32] [--threads 2]
    make bench-vllm BENCH_ARGS="--rows 8 --dtype bfloat16"

Rows: the first ``--rows`` rows of the bundled GSM8K sample; heads: the bench's fixed list (bench/throughput.py).
tokens/s = corpus tokens (prompt + response, counted once although both passes run) / wall seconds of
``Scorer.score`` after a one-row warm-up; startup = constructing the Scorer (model load; for vLLM both
engines and the ablated export). Agreement: max |score vLLM - score HF| and Spearman over the rows.
The last line is ``hf_tok_s=<> vllm_tok_s=<> max_abs_diff=<> spearman=<>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def spearman(a, b) -> float:
    import numpy as np

    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        r = np.empty(len(x))
        r[np.argsort(x, kind="mergesort")] = np.arange(len(x))
        return r

    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def run(backend: str, rows: list[dict], dtype: str, heads) -> dict:
    from air_ray.engine.scorer import Scorer

    t = time.perf_counter()
    with Scorer(heads=heads, dtype=dtype, device="cpu", backend=backend, max_tokens=2048) as scorer:
        startup = time.perf_counter() - t
        scorer.score(rows[:1])  # warm-up
        tokens = sum(len(scorer.preparer.prepare(r).input_ids) for r in rows)
        t = time.perf_counter()
        scores = scorer.score(rows)
        wall = time.perf_counter() - t
    return {"backend": backend, "startup_s": startup, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "scores": [s["score"] for s in scores]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the HF backend (default: torch's)")
    a = ap.parse_args(argv)
    import torch

    from common import DEFAULT_HEADS, load_rows

    if a.threads:
        torch.set_num_threads(a.threads)
    rows = load_rows(a.rows)
    res = [run("hf", rows, a.dtype, DEFAULT_HEADS), run("vllm", rows, a.dtype, DEFAULT_HEADS)]
    hf, vl = res
    diff = max(abs(x - y) for x, y in zip(hf["scores"], vl["scores"]))
    rho = spearman(hf["scores"], vl["scores"])
    print(f"\n{a.rows} rows, {hf['tokens']} tokens, {a.dtype}, CPU")
    print("| backend | startup s | tokens/s | scoring wall s |")
    print("|---|---:|---:|---:|")
    for r in res:
        print(f"| {r['backend']} | {r['startup_s']:.1f} | {r['tok_s']:.1f} | {r['wall_s']:.1f} |")
    print(json.dumps({"dtype": a.dtype, "rows": a.rows, "max_abs_diff": diff, "spearman": rho}))
    print(f"hf_tok_s={hf['tok_s']:.1f} vllm_tok_s={vl['tok_s']:.1f} max_abs_diff={diff:.2e} spearman={rho:.4f}")


if __name__ == "__main__":  # vLLM spawns processes
    main()
