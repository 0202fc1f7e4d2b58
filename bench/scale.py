"""The pipeline at the scale users run it (issue #33): N rows through the real commands on this machine.

    .venv/bin/python bench/scale.py [--rows 100000 1000000] [--out out/scale] [--write-results]

A model small enough to cost little on a CPU, so that what is measured is the pipeline: a random-weight Llama
(2 layers, --hidden wide) with a word-level tokenizer over the synthetic corpus's own small vocabulary and a plain chat
template, built here; its "critical heads" are fixed (layer 1, heads 0 and 2). The scoring code path is the real one:
`air-ray rescore` / `score` through Ray Data on an embedded cluster, `select`, `export`.

For each N it generates a corpus of GSM8K-shaped synthetic rows (a word problem, 2-8 calculation steps with
`<<a*b=c>>c`, `#### N`; ids r<index>), with known rates of duplicate records (1 %: an earlier row again, same id) and
bad records (0.4 %: half not JSON, half without a response), laid out as users' dumps are:

* 40 % of the rows in many JSON-lines files of 10,000 rows;
* 50 % in one large JSON-lines file whose rows also carry a `trace` field of ~4 KB the scorer never reads (as dumps
  carry a model's raw output or metadata beside the text), so that at N = 10^6 it is over 2 GB and is read in byte
  ranges by several tasks;
* 10 % in Parquet shards of 20,000 rows;
* and, kept aside, 10 % more rows in new JSON-lines files (with 1 % duplicates of ids scored before), added for the
  third rescore.

Steps, each a fresh `python -m air_ray ...` process (wall time; the peak RSS of the driver, the process that runs the
command, and of every other process of its tree: Ray's workers by their role, from /proc VmHWM sampled every 0.2 s):

1. `rescore` (the first pass: every file is new, so it scores the whole corpus with `run_score`, then selects);
2. `select --top-frac 0.01` on the version's scores;
3. `rescore` with nothing new (must read no partition's rows: listing, ledger, selection.json only);
4. `rescore` after adding the new files (scores only those; ids already scored count as earlier occurrences);
5. `export` of the selected 1 % (`--style messages`, Parquet).

Then the exactly-once check (committed rows + rejected rows = the corpus's records; no id twice among the scores).
The pipeline's overhead per row is (wall - the scoring workers' time in the model / workers) / rows, the model's time
from the manifest (``this_run.engine_s``, summed over the units, so divided by the workers that ran side by side);
the engine alone on a sample of rows (the same model, `Scorer.token_losses` in this process) is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PY = sys.executable
NAMES = ["Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jill", "Kai", "Lea"]
THINGS = ["apples", "books", "coins", "cards", "eggs", "pens", "shells", "stamps", "bricks", "tickets", "cups",
          "boxes", "marbles", "plants", "shirts", "bottles"]
VERBS = ["buys", "finds", "sells", "makes", "gives", "keeps", "packs", "loses", "earns", "collects"]
GLUE = ("each day every week then so in total left more than half of the price is costs dollars how many does have "
        "after with and for at a an it he she they now first next finally altogether").split()
WORDS = sorted(set(NAMES + THINGS + VERBS + GLUE))


# ----------------------------------------------------------------------------------------------
# the corpus


def problem(i: int, rng: random.Random) -> dict:
    """One GSM8K-shaped row: a word problem and 2-8 calculation steps ending in #### N."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 40), rng.randint(2, 12)
    prompt = (f"{name} {rng.choice(VERBS)} {a} {thing} each day . " * rng.randint(1, 3)
              + f"{name} keeps {b} more {thing} every week . How many {thing} does {name} have in total ?")
    steps, value = [], a
    for _ in range(rng.randint(2, 8)):
        k = rng.randint(2, 9)
        op = rng.choice(["*", "+"])
        new = value * k if op == "*" else value + k
        steps.append(f"{name} {rng.choice(VERBS)} {value} {op} {k} = <<{value}{op}{k}={new}>>{new} {thing} then")
        value = new
    return {"id": f"r{i:08d}", "prompt": prompt, "response": "\n".join(steps) + f"\n#### {value}", "domain": "math"}


def records(start: int, stop: int, seed: int, dup_rate: float, bad_rate: float, trace: int = 0):
    """``(record text or dict, kind)`` for rows start..stop-1 with duplicates and bad records mixed in; kind is row,
    dup or bad. ``trace``: bytes of an unread field per row."""
    rng = random.Random(seed)
    pool = "".join(rng.choice("abcdefghij klmnopqrst") for _ in range(1 << 16))
    recent: list[dict] = []
    for i in range(start, stop):
        row = problem(i, rng)
        if trace:
            at = rng.randrange(0, len(pool) - trace)
            row["trace"] = pool[at:at + trace + rng.randint(-trace // 4, trace // 4)]
        yield row, "row"
        recent.append(row)
        if len(recent) > 1000:
            recent = recent[-500:]
        u = rng.random()
        if u < dup_rate and len(recent) > 1:
            yield rng.choice(recent[:-1]), "dup"
        elif u < dup_rate + bad_rate:
            yield ({"id": f"bad{i:08d}", "prompt": row["prompt"]} if rng.random() < 0.5 else "{not json " + str(i)), \
                "bad"


def write_corpus(root: Path, n: int, seed: int = 0) -> dict:
    """The corpus of the module doc under ``root/corpus`` (and ``root/new``); returns its counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus, new = root / "corpus", root / "new"
    for d in (corpus, new):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    counts = {"rows": 0, "records": 0, "dup": 0, "bad": 0, "files": 0, "bytes": 0}
    n_small, n_big = int(0.4 * n), int(0.5 * n)

    def jsonl(path: Path, recs, into: dict):
        with open(path, "w", encoding="utf-8") as f:
            for rec, kind in recs:
                f.write((rec if isinstance(rec, str) else json.dumps(rec)) + "\n")
                into[kind if kind != "row" else "rows"] += 1
                into["records"] += 1
        into["files"] += 1
        into["bytes"] += path.stat().st_size

    for k, start in enumerate(range(0, n_small, 10_000)):
        jsonl(corpus / f"part-{k:05d}.jsonl", records(start, min(start + 10_000, n_small), seed + k, 0.01, 0.004),
              counts)
    jsonl(corpus / "big.jsonl", records(n_small, n_small + n_big, seed + 7919, 0.01, 0.004, trace=4000), counts)
    counts["big_file_bytes"] = (corpus / "big.jsonl").stat().st_size
    for k, start in enumerate(range(n_small + n_big, n, 20_000)):
        rows, kinds = [], []
        for rec, kind in records(start, min(start + 20_000, n), seed + 104729 + k, 0.01, 0.004):
            if isinstance(rec, str):  # Parquet holds no broken JSON: a row without a response instead
                rec = {"id": f"bad{start}-{len(rows)}", "prompt": "?"}
            rows.append({"id": rec["id"], "prompt": rec["prompt"], "response": rec.get("response"),
                         "domain": rec.get("domain")})
            kinds.append(kind)
        path = corpus / f"shard-{k:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        for kind in kinds:
            counts[kind if kind != "row" else "rows"] += 1
        counts["records"] += len(rows)
        counts["files"] += 1
        counts["bytes"] += path.stat().st_size
    added = {"rows": 0, "records": 0, "dup": 0, "bad": 0, "files": 0, "bytes": 0}
    for k, start in enumerate(range(n, n + n // 10, 10_000)):
        def with_old(recs, rng=random.Random(seed + 31 * k)):
            for rec, kind in recs:  # 1 % of the new rows repeat an id scored before
                yield rec, kind
                if kind == "row" and rng.random() < 0.01:
                    yield problem(rng.randrange(0, n_small), random.Random(0)) | {"id": f"r{rng.randrange(n_small):08d}"}, "dup"
        jsonl(new / f"new-{k:05d}.jsonl", with_old(records(start, min(start + 10_000, n + n // 10), seed + 65537 + k,
                                                           0.0, 0.004)), added)
    counts["new"] = added
    return counts


# ----------------------------------------------------------------------------------------------
# the model


def build_model(d: Path, hidden: int) -> tuple[Path, Path]:
    """A word-level tokenizer over the corpus's words (digits one by one), a random Llama of ``hidden`` width and
    2 layers, and a heads.json for it -> (model dir, heads.json)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from air_ray.models import model_shape, prepare_model

    if (d / "heads.json").exists():
        return d, d / "heads.json"
    d.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]
    symbols = list("0123456789.,?!:;'\"()[]{}<>=+-*/#$%&_\\|@^~`")
    vocab = {t: i for i, t in enumerate(specials + symbols + WORDS + ["user", "assistant", "system"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    fast.save_pretrained(d)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, eos_token_id=vocab["<eos>"], pad_token_id=vocab["<pad>"])
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    ref = prepare_model(str(d))
    L, H, KV, _ = model_shape(cfg)
    (d / "heads.json").write_text(json.dumps({
        "format_version": 1, "model": str(d), "model_fingerprint": ref.fingerprint, "num_layers": L, "num_heads": H,
        "num_kv_heads": KV, "top_frac": 0.25, "heads": [[1, 0], [1, 2]]}))
    return d, d / "heads.json"


def engine_seconds_per_row(model: Path, heads: Path, rows: list[dict]) -> dict:
    """The engine alone (prepare outside the clock, then ``Scorer.token_losses``) on ``rows``, in this process."""
    from air_ray.engine.scorer import Scorer

    with Scorer(model=str(model), heads=str(heads), dtype="float32", device="cpu") as s:
        prepared = [s.preparer.prepare(r) for r in rows]
        s.token_losses(prepared[:64])  # warm
        t = time.perf_counter()
        s.token_losses(prepared)
        el = time.perf_counter() - t
    tokens = sum(len(p.input_ids) for p in prepared)
    return {"rows": len(rows), "seconds": el, "per_row_ms": 1000 * el / len(rows), "tokens_per_row": tokens / len(rows)}


# ----------------------------------------------------------------------------------------------
# running a step


RANK = {"score actor": 3, "prepare actor": 3, "ray worker": 2, "air-ray": 1}


def _role(p) -> str:
    """What a process of the command's tree is: the driver is found apart (``run_step``)."""
    try:
        cmd, name = " ".join(p.cmdline()), p.name()
    except Exception:
        return "?"
    if cmd.startswith("ray::") or "default_worker.py" in cmd:
        return "score actor" if "_ScoreActor" in cmd else "prepare actor" if "_PrepareActor" in cmd else "ray worker"
    for key, role in (("raylet", "raylet"), ("gcs_server", "gcs"), ("dashboard", "dashboard"),
                      ("log_monitor", "log monitor")):
        if key in name or key in cmd.split(" ")[0] or f"{key}.py" in cmd:
            return role
    return "other"


def run_step(name: str, argv: list[str], log: Path) -> dict:
    """``python -m air_ray argv``: wall time, exit code, and peak RSS (VmHWM) of the driver (the process that runs the
    command: the supervised child of a Ray command) and of the other processes of its tree, by role."""
    import psutil

    env = dict(os.environ, AIR_RAY_PROGRESS_S="30", HF_HUB_OFFLINE="1")
    t = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([PY, "-m", "air_ray", *argv], stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=REPO)
    peaks: dict[int, tuple[str, int]] = {}
    root = psutil.Process(proc.pid)
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                tree = [root] + root.children(recursive=True)
            except psutil.Error:
                tree = []
            for p in tree:
                try:
                    with open(f"/proc/{p.pid}/status") as f:
                        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
                except (OSError, StopIteration):
                    continue
                role = _role(p)
                if role == "other" and "air_ray" in " ".join(p.cmdline() if p.is_running() else []):
                    role = "air-ray"
                old_role, old = peaks.get(p.pid, ("?", 0))
                if RANK.get(old_role, 0) > RANK.get(role, 0):  # a worker's title moves from IDLE to its actor's
                    role = old_role
                peaks[p.pid] = (role, max(hwm, old))
            done.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    code = proc.wait()
    done.set()
    th.join()
    wall = time.perf_counter() - t
    air = sorted(((pid, v[1]) for pid, v in peaks.items() if v[0] == "air-ray"))
    driver = air[-1][1] if air else 0  # the command's own process: the last air-ray process started (the child)
    by_role: dict[str, int] = {}
    for pid, (role, hwm) in peaks.items():
        if role not in ("air-ray", "other", "?"):
            by_role[role] = max(by_role.get(role, 0), hwm)
    text = log.read_text(errors="replace")
    if code != 0:
        raise SystemExit(f"scale: step {name} failed (exit {code}); see {log}:\n{text[-3000:]}")
    return {"step": name, "wall_s": round(wall, 1), "driver_peak_mb": round(driver / 2**20),
            "workers_peak_mb": {k: round(v / 2**20) for k, v in sorted(by_role.items())}}


def count_files(root: Path) -> dict:
    return {d: len([p for p in (root / d).glob("*") if not p.name.startswith(".")]) if (root / d).exists() else 0
            for d in ("scores", "rejected", "_commits")}


def exactly_once(version: Path, expected_records: int) -> dict:
    """Committed rows + rejected rows = the corpus's records; no id twice among the committed rows."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    scores = ds.dataset(str(version / "scores"), format="parquet")
    ids = scores.to_table(columns=["id"]).column("id")
    rejected = ds.dataset(str(version / "rejected"), format="parquet").count_rows()
    unique = len(pc.unique(ids))
    return {"committed": len(ids), "rejected": rejected, "records": expected_records,
            "reconciles": len(ids) + rejected == expected_records, "duplicate_ids": len(ids) - unique}


# ----------------------------------------------------------------------------------------------


def run(n: int, out: Path, hidden: int) -> dict:
    root = out / f"n{n}"
    t = time.perf_counter()
    counts = write_corpus(root, n)
    gen_s = time.perf_counter() - t
    model, heads = build_model(out / f"model-h{hidden}", hidden)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    output = root / "rescore"
    shutil.rmtree(output, ignore_errors=True)
    common = ["--model", str(model), "--heads", str(heads), "--dtype", "float32", "--executor", "ray",
              "--address", "local", "--no-progress"]
    rescore = ["rescore", "--input", str(root / "corpus"), "--output", str(output), *common,
               "--select", "top_frac=0.01"]
    steps = [run_step("score (rescore, first pass)", rescore, logs / "1-score.log")]
    version = next(p for p in output.iterdir() if p.name.startswith("v="))
    manifest = json.loads((version / "_manifest.json").read_text())
    files_first = count_files(version)
    steps.append(run_step("select 1 %", ["select", "--scores", str(version), "--output", str(root / "selection"),
                                         "--top-frac", "0.01"], logs / "2-select.log"))
    steps.append(run_step("rescore, nothing new", rescore, logs / "3-rescore-same.log"))
    same_log = (logs / "3-rescore-same.log").read_text()
    rescore_new = ["rescore", "--input", str(root / "corpus"), str(root / "new"), "--output", str(output), *common,
                   "--select", "top_frac=0.01"]
    steps.append(run_step("rescore, +10 % new files", rescore_new, logs / "4-rescore-new.log"))
    manifest_new = json.loads((version / "_manifest.json").read_text())
    steps.append(run_step("export 1 %", ["export", "--scores", str(version), "--selection", str(version / "selection"),
                                         "--input", str(root / "corpus"), str(root / "new"), "--output",
                                         str(root / "export")], logs / "5-export.log"))
    check = exactly_once(version, counts["records"] + counts["new"]["records"])
    sample = [problem(i, random.Random(i)) for i in range(2000)]
    engine = engine_seconds_per_row(model, heads, sample)
    scored = manifest["counts"]["rows_read"]
    first = steps[0]
    run = manifest["this_run"]  # the scoring workers' time on the units, and the part of it in the model
    actors = max(1, len(manifest.get("per_actor_rows") or {}))  # they run side by side: the wall holds 1/actors
    overhead_ms = 1000 * (first["wall_s"] - run["engine_s"] / actors) / scored
    return {"n": n, "hidden": hidden, "generate_s": round(gen_s, 1), "corpus": counts, "steps": steps,
            "first_pass": {"rows_read": scored, "rows_per_s": round(scored / first["wall_s"], 1),
                           "phases": manifest["phases"], "id_pass": manifest.get("id_pass"),
                           "partitions": len(manifest["partitions"]), "files": files_first},
            "rescore_same_kept_selection": "the selection of" in same_log and "is current" in same_log,
            "rescore_new": {"rows_scored": manifest_new["this_run"]["rows_scored"],
                            "rejected_by_reason": manifest_new["counts"]["rejected_by_reason"]},
            "engine": engine, "engine_in_pipeline_ms_per_row": round(1000 * run["engine_s"] / scored, 3),
            "score_stage_non_engine_ms_per_row": round(1000 * (run["score_stage_s"] - run["engine_s"]) / scored, 3),
            "overhead_ms_per_row": round(overhead_ms, 3), "exactly_once": check}


def markdown(results: list[dict]) -> str:
    """The table of bench/RESULTS.md: one column per N, and the slope to 10^7 (linear in N from the two largest)."""
    ns = [r["n"] for r in results]
    head = "| | " + " | ".join(f"N = {n:,}" for n in ns) + (" | 10^7 (slope) |" if len(ns) > 1 else " |")
    lines = [head, "|---|" + "---:|" * (len(ns) + (len(ns) > 1))]

    def row(label, values, fmt="{:,.0f}", extrapolate=True):
        cells = [fmt.format(v) if v is not None else "–" for v in values]
        if len(ns) > 1:
            a, b = values[-2], values[-1]
            slope = "–" if not extrapolate or a is None or b is None else \
                fmt.format(b + (b - a) / (ns[-1] - ns[-2]) * (10**7 - ns[-1]))
            cells.append(slope)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("corpus records (files; bytes)", [r["corpus"]["records"] for r in results])
    row("largest file, bytes", [r["corpus"]["big_file_bytes"] for r in results])
    for i, name in enumerate(s["step"] for s in results[0]["steps"]):
        row(f"{name}: wall s", [r["steps"][i]["wall_s"] for r in results], "{:,.1f}")
        row(f"{name}: driver peak RSS MB", [r["steps"][i]["driver_peak_mb"] for r in results], extrapolate=False)
    row("first pass rows/s", [r["first_pass"]["rows_per_s"] for r in results], "{:,.0f}", extrapolate=False)
    row("partitions written", [r["first_pass"]["partitions"] for r in results])
    row("id pass bytes (driver)", [r["first_pass"]["id_pass"]["bytes"] for r in results])
    row("engine ms per row (alone, in this process)", [r["engine"]["per_row_ms"] for r in results], "{:.3f}",
        extrapolate=False)
    row("engine ms per row (in the pipeline)", [r["engine_in_pipeline_ms_per_row"] for r in results], "{:.3f}",
        extrapolate=False)
    row("scoring stage beside the engine, ms per row", [r["score_stage_non_engine_ms_per_row"] for r in results],
        "{:.3f}", extrapolate=False)
    row("pipeline overhead (wall - engine) / rows, ms", [r["overhead_ms_per_row"] for r in results], "{:.3f}",
        extrapolate=False)
    for role in sorted({k for r in results for k in r["steps"][0]["workers_peak_mb"]}):
        row(f"first pass: {role} peak RSS MB", [r["steps"][0]["workers_peak_mb"].get(role) for r in results],
            extrapolate=False)
    row("exactly once: committed + rejected = records", [int(r["exactly_once"]["reconciles"]) for r in results],
        "{}", extrapolate=False)
    row("duplicate ids among committed rows", [r["exactly_once"]["duplicate_ids"] for r in results], "{}",
        extrapolate=False)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--out", default=str(REPO / "out" / "scale"))
    ap.add_argument("--hidden", type=int, default=16,
                    help="width of the random Llama (2 layers; 64 costs ~2 ms a row on a 2-core CPU, 30 min at 10^6)")
    ap.add_argument("--keep", action="store_true", help="keep each N's corpus and outputs")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    results = []
    for n in a.rows:
        r = run(n, out, a.hidden)
        results.append(r)
        print(json.dumps(r), flush=True)
        (out / f"result-n{n}.json").write_text(json.dumps(r, indent=1))
        if not a.keep:
            shutil.rmtree(out / f"n{n}", ignore_errors=True)
    print(markdown(results), flush=True)
    print(f"scale: wall {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
