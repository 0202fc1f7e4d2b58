"""Scoring throughput: the air_ray engine, end to end through ``air-ray score``, and the naive way, in one run.

    .venv/bin/python bench/throughput.py [--rows 256] [--dtype float32|bfloat16] [--long] [--ideas [LIST]]
    make bench BENCH_ARGS="--rows 32 --ideas --long"
    make bench BENCH_ARGS="--rows 96 --ideas noheap --skip e2e-ray"

Rows: ``--rows`` rows of the bundled GSM8K sample (cycled, with fresh ids, past its 200 rows); model: the
default (SmolLM2-135M); heads: ``--heads FILE`` or a fixed list of the default model's critical heads.

Every part runs in its own fresh interpreter, so that its peak RSS (VmHWM of that process; not ``ru_maxrss``,
which Linux carries across fork + exec) is its own:

* ``ceiling``: the machine's matmul rate, float32 and bfloat16, on the model's projection shapes (1024 tokens x
  q/k/v/o/gate/up/down, ``torch.matmul`` with the weight in nn.Linear layout), with the parts' thread count;
* ``engine``:  ``air_ray.engine.scorer.Scorer`` (one weight copy, token-budget batches of length-sorted rows, the
  shared prefix below the first ablated layer, LM head at response positions only, in chunks);
* ``naive``:   ``bench/naive.py``: two model copies, one sample at a time, full-vocabulary logits at every
  position;
* ``--ideas``: the engine with one idea taken away at a time: ``plain`` (two full passes), ``fullhead`` (LM
  head over [batch, pos, vocab] at every position), ``unbucketed`` (rows in file order, 8 per batch: padding),
  ``single`` (one row per batch), ``eager`` (eager attention instead of SDPA), ``noheap`` (freed memory given
  back to the OS as glibc does by default, instead of kept: ``air_ray.engine.heap``), ``batch8192`` (the GPU's
  token budget per batch instead of the CPU's default 4096); and ``sdpa``: which SDPA
  kernel an unpadded and a padded batch get (torch profiler). ``--ideas a,b``: only those (no ``sdpa``);
* ``e2e``:     ``air-ray score`` as a user runs it, in a subprocess: default flags (only ``--heads``,
  ``--input``, ``--output`` and the bench's ``--dtype``); its wall time is the whole process (interpreter, Ray
  start if it starts Ray, model load, id pass, scoring, writing); tokens and the phases from its
  ``_manifest.json``; peak RSS = the largest sampled sum of RSS over its process tree (Ray's workers are not
  where VmHWM looks). Default flags score a small corpus in-process (``--executor auto``), so
* ``e2e-ray``: the same with ``--executor ray``: the Ray Data pipeline on an embedded cluster;
* ``script``:  ``bench/naive.py`` run as a script, the whole process (imports, both model loads, scoring): the
  plain two-copy script as a user runs it, beside ``air-ray score`` as a user runs it. Each of these whole-process
  parts runs ``--e2e-runs`` times (default 2), half before the interleaved rounds below and half after, in
  mirrored order (e2e, script | rounds | script, e2e): a drift of the machine's speed falls on both alike;
* ``long`` (``--long``): the engine on one synthetic ~16k-token response: memory beyond the loaded weights
  (peak RSS while scoring - RSS before it).

The machine may be shared. So ceiling, engine, naive and the idea variants load once and then score the rows in
``--rounds`` slices, each slice by every part in turn (rotating order), one part computing at a time: a
change of load falls on all of them alike. The ceiling is the best of its samples (one per round).

Columns: tokens/s = corpus tokens (prompt + response of every row, counted once although both passes run over
them) / wall seconds of the scoring calls (tokenisation included; model load and one warm-up row excluded);
tok/cpu-s = the same per CPU second of that process (all its threads); MFU = model FLOPs / wall / ceiling;
peak RSS = VmHWM of the whole process (model load included); scoring = VmHWM counted from after the
warm-up (the load's transient peak excluded).

Model FLOPs, counted explicitly for what each part executes, over real (not padding) tokens:
  per token per layer-pass   2 * (d*H*dh + 2*d*KV*dh + H*dh*d + 3*d*ff)      (q, k, v, o, gate, up, down)
  attention per layer-pass   4 * H*dh * n(n+1)/2 per sequence of n tokens      (QK^T and PV, causal half)
  LM head                    2 * d * vocab per position that goes through it
  engine: layer-passes per token = L + (L - first_layer) (shared prefix), LM head at response positions x 2;
  plain:  2L; naive: 2L and the LM head at every position x 2. Norms, RoPE, softmax, loss: not counted.

The last line is ``speedup=<engine/naive tokens/s> mfu=<engine MFU> rss_ratio=<engine/naive peak RSS>
e2e_vs_plain=<air-ray score tokens/s, whole process / naive tokens/s> e2e_vs_engine=<the same / engine tokens/s>
e2e_ray_vs_engine=<the same with --executor ray / engine tokens/s> e2e_vs_script=<air-ray score / bench/naive.py,
both whole processes>`` (the naive and engine rates count scoring time only, model load excluded: e2e_vs_plain
and e2e_vs_engine are conservative; e2e_vs_script counts start-up on both sides).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ (when imported rather than run)
from common import DATA, DEFAULT_HEADS, MODEL, REPO, count_flops, dims, load_rows, reset_peak, status_kb  # noqa: E402

IDEAS = ("plain", "fullhead", "unbucketed", "single", "eager", "noheap", "batch8192")


# ----------------------------------------------------------------------------------------------
# the parts (each runs in its own interpreter: ``throughput.py --child PART --spec JSON``)


def _setup_threads(spec: dict) -> None:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))


def matmul_rate(dtype: str, seconds: float) -> float:
    """FLOP/s of torch.matmul on the model's projection shapes (M = 1024 tokens), over >= ``seconds``."""
    import torch

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    d, ff, kv = 576, 1536, 192  # SmolLM2-135M: d_model, d_ff, KV*d_head
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, ff), (d, ff), (ff, d)]  # one layer: q k v o gate up down
    # x [1024, k] @ w.t() with w [n, k]: the nn.Linear weight layout. The layout matters for bf16 on AVX2:
    # a contiguous [k, n] right operand takes a ~4x slower bf16 path here.
    g = torch.Generator().manual_seed(0)
    xs = {k: torch.randn(1024, k, generator=g).to(dt) for k in {s[0] for s in shapes}}
    ws = [torch.randn(n, k, generator=g).to(dt) for k, n in shapes]
    for (k, _), w in zip(shapes, ws):  # warm-up
        torch.matmul(xs[k], w.t())
    flops, t0, reps = 0.0, time.perf_counter(), 0
    while reps < 1 or time.perf_counter() - t0 < seconds:
        for (k, n), w in zip(shapes, ws):
            torch.matmul(xs[k], w.t())
            flops += 2 * 1024 * k * n
        reps += 1
    return flops / (time.perf_counter() - t0)


def _engine(spec: dict, variant: str | None = None):
    import torch

    from air_ray.engine import losses
    from air_ray.engine.scorer import Scorer

    _setup_threads(spec)
    if variant == "noheap":  # this process only (each part has its own)
        from air_ray.engine import heap

        heap.hold = lambda: False
    # batch8192: the GPU's default budget on the CPU
    budget = losses.default_batch_tokens("cuda") if variant == "batch8192" else spec["batch_tokens"]
    scorer = Scorer(model=MODEL, heads=spec["heads"], dtype=spec["dtype"], device="cpu", batch_tokens=budget,
                    share_prefix=variant != "plain")
    if variant == "eager":
        scorer.model.set_attn_implementation("eager")
    if variant == "fullhead":  # logits at every position, [batch, pos, vocab] at once (as the naive way)

        def full_head(model, hidden, b, chunk, entropy=False):
            logits = model.get_output_embeddings()(hidden).float()  # [batch, pos, vocab]
            picked = logits[b.rows, b.cols]  # [n, vocab]
            nll = torch.nn.functional.cross_entropy(picked, b.targets, reduction="none").double().numpy()
            if entropy:
                return nll, torch.distributions.Categorical(logits=picked).entropy().double().numpy()
            return nll

        losses._head_nll = full_head
    if variant in ("unbucketed", "single"):
        per = 1 if variant == "single" else 8

        def in_order(lengths, batch_tokens):
            return [list(range(i, min(i + per, len(lengths)))) for i in range(0, len(lengths), per)]

        scorer.backend.batcher = in_order
    return scorer


class Worker:
    """A part that scores slices of the rows on command (see ``serve``); it loads its model once."""

    info: dict = {}

    def __init__(self, spec: dict):
        self.spec = spec
        self.rows = load_rows(spec["rows"])
        self.totals = {"tokens": 0, "response_tokens": 0, "flops": 0.0, "wall": 0.0, "cpu": 0.0,
                       "padded_tokens": 0, "batches": 0}
        self.scores: dict = {}
        self.loads: list = []
        self.slices: list = []  # (tokens, wall) per round

    def warm_up(self) -> None:
        """Score the shortest row once (not timed), then count the scoring peak from here."""
        warm = min(self.rows, key=lambda r: len(r["prompt"]) + len(r["response"]))
        self.run([warm])
        self.load_peak = status_kb("VmHWM") * 1024
        reset_peak()

    def run(self, rows: list[dict]) -> dict:
        raise NotImplementedError

    def slice(self, lo: int, hi: int) -> dict:
        self.loads.append(os.getloadavg()[0])
        c0, t0 = time.process_time(), time.perf_counter()
        r = self.run(self.rows[lo:hi])
        r["wall"], r["cpu"] = time.perf_counter() - t0, time.process_time() - c0
        for k in self.totals:
            self.totals[k] += r.get(k, 0)
        self.scores.update(r.pop("scores"))
        self.slices.append((r["tokens"], r["wall"]))
        return {"wall": r["wall"], "tokens": r["tokens"]}

    def done(self) -> dict:
        peak_scoring = status_kb("VmHWM") * 1024
        return {**self.totals, **self.info, "scores": self.scores, "load": max(self.loads, default=0.0),
                "slices": self.slices,
                "peak_scoring": peak_scoring, "peak": max(self.load_peak, peak_scoring)}


class EngineWorker(Worker):
    """``air_ray.engine.scorer.Scorer``, or with one idea taken away (``spec["variant"]``)."""

    def __init__(self, spec: dict):
        super().__init__(spec)
        self.variant = spec.get("variant")
        self.scorer = _engine(spec, self.variant)
        m = dims(self.scorer.model.config)
        k = self.scorer.backend.ablation.first_layer
        shared = self.variant != "plain" and k is not None and k > 0
        self.layer_passes = m["L"] + (m["L"] - k if shared else m["L"]) if k is not None else m["L"]
        self.m = m
        self.info = {"layer_passes": self.layer_passes, "first_layer": k, "variant": self.variant}

    def run(self, rows):
        prepared = [self.scorer.preparer.prepare(r) for r in rows]
        results = self.scorer.score_prepared(prepared)
        seqs = [(len(p.input_ids), p.n_prompt_tokens) for p in prepared]
        lens = [n for n, _ in seqs]
        backend = self.scorer.backend
        batches = backend.batcher(lens, backend.batch_tokens)  # as token_losses made them
        return {"tokens": sum(lens), "response_tokens": sum(n - p for n, p in seqs),
                "flops": count_flops(self.m, seqs, self.layer_passes,
                                     "all" if self.variant == "fullhead" else "response"),
                "padded_tokens": sum(len(b) * max(lens[i] for i in b) for b in batches), "batches": len(batches),
                "scores": {r["id"]: r["score"] for r in results if isinstance(r, dict)}}


class NaiveWorker(Worker):
    """``bench/naive.py``: two model copies, one sample at a time, full-vocabulary logits."""

    def __init__(self, spec: dict):
        super().__init__(spec)
        import naive
        from transformers import AutoTokenizer

        from air_ray.models import prepare_model, weights_dir

        self.naive = naive
        ref = prepare_model(MODEL)
        self.tok = AutoTokenizer.from_pretrained(ref.path)
        # from the checkpoint stored in that dtype, as the engine loads it (a hub checkpoint would be too)
        self.base, self.ablated = naive.load_models(weights_dir(ref, spec["dtype"]), spec["heads"], spec["dtype"])
        self.m = dims(self.base.config)
        self.info = {"layer_passes": 2 * self.m["L"]}

    def run(self, rows):
        res = self.naive.score(self.base, self.ablated, self.tok, rows)
        seqs = [(r["tokens"], self.naive.encode(self.tok, row)[1]) for r, row in zip(res, rows)]
        return {"tokens": sum(n for n, _ in seqs), "response_tokens": sum(n - p for n, p in seqs),
                "flops": count_flops(self.m, seqs, 2 * self.m["L"], "all"),
                "scores": {r["id"]: r["score"] for r in res}}


class CeilingWorker(Worker):
    """The matmul rate: both dtypes once at start, then a 1 s sample of the run's dtype at every round."""

    def __init__(self, spec: dict):
        import torch

        self.spec = spec
        self.info = {"threads": torch.get_num_threads(), "float32": matmul_rate("float32", 2.0),
                     "bfloat16": matmul_rate("bfloat16", 2.0)}
        self.samples = [self.info[spec["dtype"]]]

    def warm_up(self) -> None:
        pass

    def slice(self, lo: int, hi: int) -> dict:
        self.samples.append(matmul_rate(self.spec["dtype"], 1.0))
        return {"rate": self.samples[-1]}

    def done(self) -> dict:
        return {**self.info, "samples": self.samples, "best": max(self.samples),
                "peak": status_kb("VmHWM") * 1024}


WORKERS = {"engine": EngineWorker, "naive": NaiveWorker, "ceiling": CeilingWorker}


def serve(name: str, spec: dict) -> None:
    """Worker loop: one JSON command per stdin line ({"lo", "hi"} or {"done"}), one JSON answer per line."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints of libraries go to stderr, not into the answers
    _setup_threads(spec)
    w = WORKERS[name](spec)
    w.warm_up()
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        ans = w.done() if cmd.get("done") else w.slice(cmd["lo"], cmd["hi"])
        out.write(json.dumps(ans) + "\n")
        out.flush()
        if cmd.get("done"):
            return


def part_long(spec: dict) -> dict:
    """One synthetic ~spec["long_tokens"]-token response: memory beyond the loaded weights."""
    scorer = _engine(spec)
    tok = scorer.tokenizer
    rows = load_rows(200)
    pieces, n = [], 0
    for r in rows:
        pieces.append(r["response"])
        n += len(tok(r["response"] + "\n", add_special_tokens=False)["input_ids"])
        if n >= spec["long_tokens"]:
            break
    while n < spec["long_tokens"]:  # the sample is shorter than asked: repeat it
        pieces += pieces
        n *= 2
    text = "\n".join(pieces)
    ids = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    cut = ids[spec["long_tokens"] - 1][1]
    row = {"id": "long", "prompt": rows[0]["prompt"], "response": text[:cut]}
    scorer.score([load_rows(1)[0]])  # warm-up
    weights = sum(p.numel() * p.element_size() for p in scorer.model.parameters())
    before = status_kb("VmRSS") * 1024
    clean = reset_peak()
    t = time.perf_counter()
    p = scorer.preparer.prepare(row)
    res = scorer.score_prepared([p])[0]
    wall = time.perf_counter() - t
    peak = status_kb("VmHWM") * 1024
    return {"tokens": len(p.input_ids), "response_tokens": p.n_response_tokens, "wall": wall,
            "weights": weights, "rss_before": before, "peak": peak, "extra": peak - before,
            "peak_reset": clean, "score": res["score"] if isinstance(res, dict) else str(res)}


def part_sdpa(spec: dict) -> dict:
    """Which SDPA kernel a batch gets, unpadded (no mask: is_causal) and padded (a boolean mask), and its time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from air_ray.models import load_model, prepare_model

    _setup_threads(spec)
    model = load_model(prepare_model(MODEL), dtype=spec["dtype"], device="cpu")
    T, B = 512, 4
    ids = torch.randint(5, 40000, (B, T), generator=torch.Generator().manual_seed(0))
    padded = torch.ones(B, T, dtype=torch.long)
    padded[1:, T // 2:] = 0  # three of four rows half padding
    out = {}
    with torch.inference_mode():
        model.base_model(input_ids=ids[:, :64])
        for name, mask in (("unpadded", None), ("padded", padded)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model.base_model(input_ids=ids, attention_mask=mask)
            ev = {e.key: e for e in prof.key_averages()}
            kernels = sorted(k for k in ev if "scaled_dot_product" in k and k != "aten::scaled_dot_product_attention")
            sdpa_ms = ev["aten::scaled_dot_product_attention"].cpu_time_total / 1e3 if \
                "aten::scaled_dot_product_attention" in ev else None
            t = time.perf_counter()
            model.base_model(input_ids=ids, attention_mask=mask)
            out[name] = {"kernels": kernels, "sdpa_ms_profiled": sdpa_ms, "forward_s": time.perf_counter() - t}
    return out


def _run_watched(cmd: list[str], lock_path: str | None = None, env: dict | None = None) -> tuple[int, str, float, int]:
    """Run ``cmd`` to its end: (return code, output, wall seconds, peak RSS = the largest sampled sum over its
    process tree). ``lock_path``: flock this file meanwhile (one Ray cluster at a time on this machine)."""
    import psutil

    lock = None
    if lock_path:
        import fcntl

        lock = open(lock_path, "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env=env)
        peak = {"v": 0}

        def watch():
            root = psutil.Process(proc.pid)
            while proc.poll() is None:
                try:
                    procs = [root] + root.children(recursive=True)
                    total = 0
                    for p in procs:
                        try:
                            total += p.memory_info().rss
                        except psutil.Error:
                            pass
                    peak["v"] = max(peak["v"], total)
                except psutil.Error:
                    pass
                time.sleep(0.25)

        w = threading.Thread(target=watch, daemon=True)
        w.start()
        log, _ = proc.communicate()
        w.join()
        return proc.returncode, log, time.perf_counter() - t, peak["v"]
    finally:
        if lock:
            lock.close()


def part_e2e(spec: dict) -> dict:
    """``air-ray score`` on the rows with default flags (``spec["executor"]``: with ``--executor`` that)."""
    work = Path(spec["workdir"])
    out = work / f"e2e_out_{spec.get('executor') or 'default'}_{spec.get('run', 0)}"  # fresh: nothing to resume
    cmd = [str(Path(sys.executable).with_name("air-ray")), "score", "--heads", spec["heads_file"], "--input",
           spec["rows_file"], "--output", str(out), "--dtype", spec["dtype"]]
    if spec.get("executor"):
        cmd += ["--executor", spec["executor"]]
    rc, log, wall_cli, peak = _run_watched(cmd, spec.get("ray_lock"))
    if rc != 0:
        raise RuntimeError(f"air-ray score failed ({rc}):\n{log[-3000:]}")
    man = json.loads((out / "_manifest.json").read_text())
    import pyarrow.parquet as pq

    table = pq.read_table(out / "scores", columns=["id", "score"])
    return {"tokens": man["tokens"], "wall": wall_cli, "wall_manifest": man["wall_s"], "peak": peak,
            "rows_scored": man["counts"]["rows_scored"], "phases": man.get("phases", {}),
            "placement": man.get("placement", {}),
            "scores": dict(zip(table.column("id").to_pylist(), table.column("score").to_pylist()))}


def part_script(spec: dict) -> dict:
    """``bench/naive.py`` run as a user runs a script: the whole process (imports, both model loads, scoring)."""
    cmd = [sys.executable, str(REPO / "bench" / "naive.py"), "--rows", str(spec["rows"]), "--dtype", spec["dtype"],
           "--heads", spec["heads_file"], "--data", spec["rows_file"]]
    rc, log, wall, peak = _run_watched(cmd, env=_child_env())
    if rc != 0:
        raise RuntimeError(f"bench/naive.py failed ({rc}):\n{log[-3000:]}")
    res = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return {"tokens": sum(r["tokens"] for r in res), "wall": wall, "peak": peak,
            "scores": {r["id"]: r["score"] for r in res}}


PARTS = {"long": part_long, "e2e": part_e2e, "script": part_script, "sdpa": part_sdpa}


# ----------------------------------------------------------------------------------------------
# the parent


def _child_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_part(name: str, spec: dict) -> dict:
    """One part in a fresh interpreter; its result is the JSON on its last stdout line."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", name, "--spec",
                           json.dumps(spec)], capture_output=True, text=True, env=_child_env())
    if proc.returncode != 0:
        raise SystemExit(f"part {name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["process_s"] = time.perf_counter() - t
    print(f"  {name:<18} done in {r['process_s']:.0f} s", file=sys.stderr, flush=True)
    return r


class Child:
    """A worker process (``--serve``): asked for one slice at a time."""

    def __init__(self, label: str, kind: str, spec: dict, logdir: Path):
        self.label = label
        self.log = open(logdir / f"{label}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", kind, "--spec",
                                      json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=_child_env())
        self.ask(None)  # ready: loaded and warmed up

    def ask(self, cmd: dict | None) -> dict:
        if cmd is not None:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            raise SystemExit(f"part {self.label} failed ({self.proc.returncode}):\n{self.log.read()[-4000:]}")
        return json.loads(line)

    def close(self) -> dict:
        r = self.ask({"done": True})
        self.proc.wait()
        self.log.close()
        return r


def interleaved(parts: dict[str, tuple[str, dict]], rows: int, rounds: int, workdir: Path) -> dict:
    """Every part loads once in its own process; then the rows are scored in ``rounds`` slices, each slice by
    every part in turn (the order rotating), so that a shared machine's changing load falls on all parts
    alike. Only one part computes at any time."""
    children = []
    for label, (kind, spec) in parts.items():
        t = time.perf_counter()
        children.append(Child(label, kind, spec, workdir))
        print(f"  {label:<18} loaded in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    cuts = [round(i * rows / rounds) for i in range(rounds + 1)]
    for r in range(rounds):
        lo, hi = cuts[r], cuts[r + 1]
        if lo == hi:
            continue
        order = children[r % len(children):] + children[: r % len(children)]
        for c in order:
            c.ask({"lo": lo, "hi": hi})
        print(f"  round {r + 1}/{rounds}: rows {lo}..{hi - 1} done", file=sys.stderr, flush=True)
    return {c.label: c.close() for c in children}


def fmt_mb(x) -> str:
    return f"{x / 2**20:,.0f} MB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--heads", help="heads.json of the default model (default: a fixed list of its heads)")
    ap.add_argument("--batch-tokens", type=int, help="token budget of one batch (default: the product's on the CPU)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of every part")
    ap.add_argument("--long", action="store_true", help="also score one ~16k-token response (memory)")
    ap.add_argument("--long-tokens", type=int, default=16384)
    ap.add_argument("--ideas", nargs="?", const=",".join(IDEAS) + ",sdpa", default="",
                    help="also the engine with each idea taken away, and SDPA; or only those listed (a,b)")
    ap.add_argument("--skip", default="", help="comma list of parts not to run: e2e, e2e-ray, script, naive")
    ap.add_argument("--ray-lock", default=os.environ.get("AIR_RAY_BENCH_LOCK"),
                    help="flock this file while the e2e part runs Ray (one cluster at a time)")
    ap.add_argument("--rounds", type=int, default=4, help="slices of the rows, each scored by every part in turn")
    ap.add_argument("--e2e-runs", type=int, default=2,
                    help="runs of each e2e part, half before the interleaved rounds and half after (rate: all tokens "
                         "/ all wall seconds)")
    ap.add_argument("--json", help="also write every result here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.serve:
        serve(a.serve, json.loads(a.spec))
        return 0
    if a.child:
        print(json.dumps(PARTS[a.child](json.loads(a.spec))))
        return 0

    from air_ray.engine.losses import default_batch_tokens
    from air_ray.models import model_shape, load_config, prepare_model

    if a.batch_tokens is None:  # what the e2e part's default flags get
        a.batch_tokens = default_batch_tokens("cpu")

    skip = {s for s in a.skip.split(",") if s}
    ref = prepare_model(MODEL)
    shape = model_shape(load_config(ref))
    if a.heads:
        from air_ray.store.heads import load_heads

        heads = [list(h) for h in load_heads(a.heads, fingerprint=ref.fingerprint, shape=shape)["heads"]]
    else:
        heads = DEFAULT_HEADS
    work = Path(tempfile.mkdtemp(prefix="air_ray_bench_"))
    heads_file = work / "heads.json"
    heads_file.write_text(json.dumps({
        "format_version": 1, "model": MODEL, "model_fingerprint": ref.fingerprint, "num_layers": shape[0],
        "num_heads": shape[1], "num_kv_heads": shape[2], "heads": heads}))
    rows_file = work / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in load_rows(a.rows)))
    spec = {"rows": a.rows, "dtype": a.dtype, "heads": heads, "batch_tokens": a.batch_tokens,
            "threads": a.threads, "long_tokens": a.long_tokens, "workdir": str(work),
            "heads_file": str(heads_file), "rows_file": str(rows_file), "ray_lock": a.ray_lock}
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"throughput bench: {a.rows} rows of {DATA.name}, {MODEL}, {a.dtype}, {a.threads} threads, "
          f"{len(heads)} heads (first layer {min(h[0] for h in heads)}), batch_tokens {a.batch_tokens}, "
          f"load average {load:.1f}", file=sys.stderr, flush=True)

    parts = {"ceiling": ("ceiling", spec), "engine": ("engine", spec)}
    if "naive" not in skip:
        parts["naive"] = ("naive", spec)
    ideas = [v for v in a.ideas.split(",") if v]
    unknown = sorted(set(ideas) - set(IDEAS) - {"sdpa"})
    if unknown:
        ap.error(f"--ideas: unknown {unknown}; known: {', '.join(IDEAS)}, sdpa")
    parts.update({f"engine-{v}": ("engine", dict(spec, variant=v)) for v in IDEAS if v in ideas})
    # whole processes: default flags, the Ray pipeline on the same rows (which default flags may not start for
    # them), and the naive way run as a script. The runs are split before and after the interleaved rounds, in
    # mirrored order (e2e, script | rounds | script, e2e), so that a drift of the machine's speed falls on both
    # sides alike
    whole = [(n, part, sp) for n, part, sp in (("e2e", "e2e", spec), ("e2e-ray", "e2e", dict(spec, executor="ray")),
                                               ("script", "script", spec)) if n not in skip]
    runs: dict[str, list] = {n: [] for n, _, _ in whole}

    def whole_round(k: int, order: list) -> None:
        for n, part, sp in order:
            runs[n].append(run_part(part, dict(sp, run=k)))

    before = a.e2e_runs // 2
    for k in range(before):
        whole_round(k, whole if k % 2 == 0 else whole[::-1])
    res: dict = interleaved(parts, a.rows, max(1, min(a.rounds, a.rows)), work)
    for k in range(before, a.e2e_runs):
        whole_round(k, whole[::-1] if (a.e2e_runs - 1 - k) % 2 == 0 else whole)
    for n, rs in runs.items():
        if rs:
            mean = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731; tokens / wall = all tokens / all seconds
            res[n] = dict(rs[-1], tokens=mean("tokens"), wall=mean("wall"), peak=max(r["peak"] for r in rs),
                          walls=[r["wall"] for r in rs])
            if "wall_manifest" in rs[-1]:
                res[n]["wall_manifest"] = mean("wall_manifest")
    if "sdpa" in ideas:
        res["sdpa"] = run_part("sdpa", spec)
    if a.long:
        res["long"] = run_part("long", spec)

    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": res}, indent=1))
    # the ceiling: the best matmul-rate sample of the run (one at the start and one at every round)
    samples = res["ceiling"]["samples"]
    ceil = max(samples)
    other = "bfloat16" if a.dtype == "float32" else "float32"
    eng = res["engine"]
    naive = res.get("naive")
    rate = lambda r: r["tokens"] / r["wall"]  # noqa: E731
    print()
    print(f"rows {a.rows}, {eng['tokens']:,} corpus tokens ({eng['response_tokens']:,} response), dtype {a.dtype}, "
          f"threads {res['ceiling']['threads']}, heads from layer {eng['first_layer']} of {shape[0]}, "
          f"batch_tokens {a.batch_tokens}")
    print(f"ceiling {a.dtype} {ceil / 1e9:.1f} GFLOP/s (best of {len(samples)} matmul samples this run, worst "
          f"{min(samples) / 1e9:.1f}); {other} {res['ceiling'][other] / 1e9:.1f} GFLOP/s")
    print(f"{'part':<18}{'tokens/s':>9}{'x naive':>8}{'MFU':>7}{'layers':>7}{'peak RSS':>10}{'scoring':>10}"
          f"{'wall s':>8}{'tok/cpu-s':>10}{'load':>6}")
    order = ["engine", "e2e", "e2e-ray", "naive", "script"] + [f"engine-{v}" for v in IDEAS]
    for name in order:
        r = res.get(name)
        if not r:
            continue
        x = f"{rate(r) / rate(naive):.2f}" if naive else "-"
        mfu = f"{r['flops'] / r['wall'] / ceil:.3f}" if "flops" in r else "-"
        lp = f"{r['layer_passes']:g}" if "layer_passes" in r else "-"
        sp = fmt_mb(r["peak_scoring"]) if "peak_scoring" in r else "-"
        cpu = f"{r['tokens'] / r['cpu']:.1f}" if "cpu" in r else "-"
        load = f"{r['load']:.1f}" if "load" in r else "-"
        print(f"{name:<18}{rate(r):>9.1f}{x:>8}{mfu:>7}{lp:>7}{fmt_mb(r['peak']):>10}{sp:>10}{r['wall']:>8.1f}"
              f"{cpu:>10}{load:>6}")
    if naive and len(naive.get("slices", [])) > 1:
        import statistics

        per = {n: [(t / w) / (tn / wn) for (t, w), (tn, wn) in zip(res[n]["slices"], naive["slices"])]
               for n in order if n in res and "slices" in res[n] and n != "naive"}
        print("x naive per round (median): " + "; ".join(
            f"{n} {statistics.median(v):.2f}" for n, v in per.items()))
    for name in ("naive", "e2e", "e2e-ray", "script"):
        if name in res:
            d = max(abs(eng["scores"][k] - v) for k, v in res[name]["scores"].items())
            print(f"max |score engine - {name}| = {d:.2e}")
    for name, how in (("e2e", "default flags"), ("e2e-ray", "--executor ray")):
        if name in res:
            e = res[name]
            print(f"{name}: {e['rows_scored']} rows scored by `air-ray score` with {how} in "
                  + " and ".join(f"{w:.1f}" for w in e["walls"])
                  + f" s ({len(e['walls'])} runs; the whole process; table: their mean; its manifest says "
                  f"{e['wall_manifest']:.1f} s on average); phases of the last "
                  + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in e["phases"].items())
                  + f"; placement {e['placement'].get('why', '?')}; peak RSS is the sampled sum over its process "
                  "tree")
    if "script" in res:
        print("script: bench/naive.py as a user runs it (imports, both model loads, scoring) in "
              + " and ".join(f"{w:.1f}" for w in res["script"]["walls"])
              + " s (the whole process; runs mirrored around the rounds with the e2e runs: e2e, script | rounds | "
              "script, e2e)")
    if "sdpa" in res:
        for k, v in ((k, v) for k, v in res["sdpa"].items() if isinstance(v, dict)):
            print(f"sdpa {k:<9} kernels {', '.join(v['kernels']) or '?'}; sdpa {v['sdpa_ms_profiled']:.0f} ms "
                  f"(profiled), forward {v['forward_s']:.2f} s (4 x 512 tokens)")
    for name in ("engine", "engine-unbucketed"):
        if name in res:
            r = res[name]
            print(f"{name}: {r['batches']} batches, padding {r['padded_tokens'] - r['tokens']:,} of "
                  f"{r['padded_tokens']:,} batch positions")
    if "long" in res:
        L = res["long"]
        print(f"long: {L['tokens']:,} tokens ({L['response_tokens']:,} response) in {L['wall']:.0f} s; weights "
              f"{fmt_mb(L['weights'])}; RSS before {fmt_mb(L['rss_before'])}, peak {fmt_mb(L['peak'])}: extra "
              f"{fmt_mb(L['extra'])} ({'< 1 GB' if L['extra'] < 2**30 else '>= 1 GB'})")
    e2e = res.get("e2e")
    fmt = lambda x: f"{x:.2f}" if x == x else "nan"  # noqa: E731
    vs_plain = rate(e2e) / rate(naive) if e2e and naive else float("nan")
    vs_engine = rate(e2e) / rate(eng) if e2e else float("nan")
    e2e_ray = res.get("e2e-ray")
    ray_vs_engine = rate(e2e_ray) / rate(eng) if e2e_ray else float("nan")
    script = res.get("script")
    vs_script = rate(e2e) / rate(script) if e2e and script else float("nan")
    print(f"speedup={fmt(rate(eng) / rate(naive)) if naive else 'nan'} mfu={eng['flops'] / eng['wall'] / ceil:.3f} "
          f"rss_ratio={fmt(eng['peak'] / naive['peak']) if naive else 'nan'} e2e_vs_plain={fmt(vs_plain)} "
          f"e2e_vs_engine={fmt(vs_engine)} e2e_ray_vs_engine={fmt(ray_vs_engine)} e2e_vs_script={fmt(vs_script)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
