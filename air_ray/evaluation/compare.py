"""``air-ray compare``: does the AIR selection train a better student than the heuristics?

From one scoring run (``--scores``, the pool ``--input``), for each seed ``s`` in ``0..seeds-1`` and each strategy:

1. **select** ``top_k`` rows with ``air_ray.outputs.select`` (``--by`` the strategy; ``random`` seeded with ``s``;
   ``score_weighted`` is the ``score`` selection). Every strategy must select exactly ``top_k`` rows;
2. **train** a student from the same initial weights with the same hyperparameters and seed ``s``, through
   ``air_ray.outputs.training.train_weighted_sft`` (the code of ``air-ray train``): plain SFT (every response token
   weighs 1.0), except ``score_weighted``, trained with its step weights;
3. **evaluate** it on the held-out rows (``--eval-input``, none of them in the pool) with
   ``air_ray.evaluation.students``: mean response loss (nats per token) and greedy exact-match accuracy.

The initial model is evaluated once, as the row every student started from. Each finished run leaves
``runs/<strategy>-seed<s>/result.json`` with a key of everything that determines it; a rerun with the same options
reuses those and trains only what is missing (an interrupted compare resumes). Then:

* ``compare.json``: config, held-out counts, the initial model's figures, every run, and ``summary``;
* ``compare.md``: per strategy the mean ± sd over seeds of loss and accuracy, and the paired difference against
  ``random`` (same seed) with a 95 % interval over seeds (Student's t, n - 1 degrees of freedom; none with one
  seed);
* ``compare.png``: the same as bars (mean ± sd), the initial model as a dashed line.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import time
from pathlib import Path

from air_ray.config.commands import CompareConfig, SelectConfig, TrainConfig
from air_ray.errors import AirRayError
from air_ray.fsio import local_fs, write_bytes_atomic, write_json_atomic

REFERENCE = "random"
METRICS = (("loss", "loss (nats/token)", "lower is better"), ("accuracy", "exact match", "higher is better"))
FILES = ("compare.json", "compare.md", "compare.png")
# two-sided 95 % quantiles of Student's t for 1..10 degrees of freedom; beyond, a Cornish-Fisher expansion
_T95 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281)


def t95(df: int) -> float:
    if df < 1:
        raise ValueError("df must be >= 1")
    if df <= len(_T95):
        return _T95[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    xs = [v for v in values if v is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def seeds_to_separate(mean: float, sd: float, limit: int = 10_000) -> int | None:
    """The fewest seeds whose 95 % interval would exclude 0 if the differences kept this mean and sd (a rough
    size for a run that would separate the strategies); None when the mean is 0 or more than ``limit`` are
    needed."""
    if not mean or sd is None:
        return None
    if sd == 0:
        return 2
    for n in range(2, limit + 1):
        if t95(n - 1) * sd / math.sqrt(n) < abs(mean):
            return n
    return None


def paired(values: list[float | None], reference: list[float | None]) -> dict:
    """Mean of the per-seed differences ``values[s] - reference[s]`` with its 95 % t interval (None for n < 2), and
    ``seeds_to_separate`` (see there)."""
    d = [v - r for v, r in zip(values, reference) if v is not None and r is not None]
    m, sd = mean_sd(d)
    if m is None or sd is None:
        return {"mean": m, "ci95": None, "n": len(d), "sd": None, "seeds_to_separate": None}
    half = t95(len(d) - 1) * sd / math.sqrt(len(d))
    return {"mean": m, "ci95": [m - half, m + half], "n": len(d), "sd": sd,
            "seeds_to_separate": seeds_to_separate(m, sd)}


def summarise(runs: list[dict], strategies: list[str], seeds: int) -> dict:
    """Per strategy: mean and sd over seeds of each metric, and the paired difference against ``random``."""
    by = {(r["strategy"], r["seed"]): r for r in runs}
    out = {}
    for s in strategies:
        entry = {"n_seeds": sum((s, k) in by for k in range(seeds))}
        for metric, _, _ in METRICS:
            vals = [by[(s, k)]["eval"][metric] if (s, k) in by else None for k in range(seeds)]
            m, sd = mean_sd(vals)
            entry[metric] = {"mean": m, "sd": sd, "per_seed": vals}
            if s != REFERENCE and REFERENCE in strategies:
                ref = [by[(REFERENCE, k)]["eval"][metric] if (REFERENCE, k) in by else None for k in range(seeds)]
                entry[metric]["vs_random"] = paired(vals, ref)
        deltas = [by[(s, k)]["weights_delta"] for k in range(seeds) if (s, k) in by]
        entry["weights_delta_min"] = min(deltas) if deltas else None
        out[s] = entry
    return out


# ----------------------------------------------------------------------------------------------
# the run


def run_keys(cfg: CompareConfig, fingerprint: str, runs: list[tuple[str, int]], held_out_ids: list[str]) -> dict:
    """``{(strategy, seed): key}``: a hash of everything that determines one run's result: the model, the pool's
    scores, the training and evaluation options, the strategy, the seed and the held-out rows."""
    import air_ray

    doc = {name: getattr(cfg, name) for name in
           ("dtype", "format", "max_steps", "lr", "batch_size", "max_length", "grad_accum", "bf16", "add_eos",
            "top_k", "max_new_tokens", "think_tags", "prompt_field", "response_field", "reasoning_field",
            "messages_field", "id_field", "domain_field")}
    doc.update(model=fingerprint, scores=_scores_signature(cfg.scores), input=sorted(cfg.input),
               held_out=hashlib.sha1("\n".join(held_out_ids).encode()).hexdigest(), air_ray=air_ray.__version__)
    return {(s, k): hashlib.sha1(json.dumps(dict(doc, strategy=s, seed=k), sort_keys=True,
                                            default=str).encode()).hexdigest()[:16] for s, k in runs}


def _scores_signature(scores: str) -> list:
    from air_ray.outputs.layout import find_partitions

    fs, files = find_partitions(scores, "compare")
    return sorted((f, fs.size(f)) for f in files)


def _pool_ids(scores: str) -> set[str]:
    from air_ray.outputs.layout import open_scores

    files = open_scores(scores, "compare", columns=("id",), require=("id",))
    return set(files.table(("id",)).column("id").to_pylist())


def _weights_delta(model, initial: dict) -> float:
    """||theta - theta_0|| / ||theta_0|| over every parameter (the student really moved)."""
    import torch

    num = den = 0.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            p0 = initial[name]
            num += float((p.detach().float().cpu() - p0).pow(2).sum())
            den += float(p0.pow(2).sum())
    return math.sqrt(num / den) if den else float("nan")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _train_config(cfg: CompareConfig, run_dir: Path, selection: str, seed: int, weighted: bool) -> TrainConfig:
    shared = {f.name: getattr(cfg, f.name) for f in TrainConfig.option_fields()
              if f.name in {g.name for g in CompareConfig.option_fields()} and f.name not in ("input", "output")}
    steps = cfg.max_steps or math.ceil(cfg.top_k / (cfg.batch_size * cfg.grad_accum))
    return TrainConfig(**dict(shared, input=list(cfg.input), selection=selection, scores=cfg.scores,
                              output=str(run_dir / "train"), max_steps=steps, seed=seed, step_weights=weighted,
                              save=False)).validate()


def _select(cfg: CompareConfig, out: Path, strategy: str, seed: int) -> str:
    """The selection directory of (strategy, seed) (only ``random`` depends on the seed; select is cheap, so it
    is made again on every invocation and always matches the scores)."""
    from air_ray.outputs.select import select

    by = "score" if strategy == "score_weighted" else strategy
    sel_dir = out / "selections" / (f"{by}-seed{seed}" if by == "random" else by)
    summary = select(SelectConfig(scores=cfg.scores, output=str(sel_dir), top_k=cfg.top_k, by=by, seed=seed))
    n = summary["counts"]["rows_selected"]
    if n != cfg.top_k:
        raise AirRayError(f"compare: --by {by} selects {n} rows, not --top-k {cfg.top_k} (candidates: "
                          f"{summary['counts']['rows_candidates']} of {summary['counts']['rows_total']}; a row whose "
                          f"{by} is missing is no candidate); lower --top-k or drop the strategy")
    return str(sel_dir)


def run_compare(cfg: CompareConfig, log=print) -> dict:
    """Select, train and evaluate every (strategy, seed); write compare.json/.md/.png; return compare.json."""
    from air_ray.data.rows import FieldMap, RowPreparer
    from air_ray.evaluation.students import evaluate, read_held_out
    from air_ray.models import load_tokenizer, prepare_model
    from air_ray.outputs.training import load_trainable, train_weighted_sft

    cfg = cfg.validate()
    t_start = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref = prepare_model(cfg.model, allow_pickle=cfg.allow_pickle)
    tokenizer = load_tokenizer(ref, trust_remote_code=cfg.trust_remote_code)
    render = RowPreparer.of(tokenizer, cfg).response_text
    held_out, held_counts = read_held_out(list(cfg.eval_input), FieldMap.of(cfg), render, cfg.eval_rows)
    overlap = sorted({r.id for r in held_out} & _pool_ids(cfg.scores))
    if overlap:
        raise AirRayError(f"compare: {len(overlap)} held-out rows are in the scored pool (e.g. {overlap[:3]}); "
                          "the held-out rows must be rows no student can train on")
    held_ids = [r.id for r in held_out]
    n_check = sum(r.answer is not None for r in held_out)
    log(f"compare: {len(held_out)} held-out rows ({n_check} with a checkable answer), strategies "
        f"{', '.join(cfg.strategies)}, {cfg.seeds} seed(s), top_k {cfg.top_k}, into {out}")
    eval_kw = dict(format=cfg.format, add_eos=cfg.add_eos, max_length=cfg.max_length,
                   batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens)

    # every selection first: a strategy that cannot select top_k rows fails before any training
    selections = {(s, k): _select(cfg, out, s, k) for k in range(cfg.seeds) for s in cfg.strategies}

    plan = [(s, k) for k in range(cfg.seeds) for s in cfg.strategies]
    keys = run_keys(cfg, ref.fingerprint, [("initial", 0), *plan], held_ids)
    initial_key = keys[("initial", 0)]
    initial = _read_json(out / "runs" / "initial" / "result.json")
    todo = [(s, k) for s, k in plan
            if (_read_json(out / "runs" / f"{s}-seed{k}" / "result.json") or {}).get("key") != keys[(s, k)]]
    state0 = None
    if todo or (initial or {}).get("key") != initial_key:
        t0 = time.perf_counter()
        _, _, model0 = load_trainable(_train_config(cfg, out / "runs" / "initial", selections[plan[0]], 0, False))
        state0 = {n: p.detach().float().cpu().clone() for n, p in model0.named_parameters()}
        if (initial or {}).get("key") != initial_key:
            initial = {"key": initial_key, "strategy": "initial", "eval": evaluate(model0, tokenizer, held_out, **eval_kw),
                       "seconds": time.perf_counter() - t0}
            write_json_atomic(local_fs(), str(out / "runs" / "initial" / "result.json"), initial)
        del model0
    log(f"compare: initial model: {_figures(initial['eval'])}")

    runs = []
    for i, (s, k) in enumerate(plan, 1):
        run_dir = out / "runs" / f"{s}-seed{k}"
        key = keys[(s, k)]
        done = _read_json(run_dir / "result.json")
        if done is not None and done.get("key") == key:
            log(f"compare: [{i}/{len(plan)}] {s} seed {k}: done before ({_figures(done['eval'])})")
            runs.append(done)
            continue
        t0 = time.perf_counter()
        tcfg = _train_config(cfg, run_dir, selections[(s, k)], k, s == "score_weighted")
        loaded = load_trainable(tcfg)
        summary = train_weighted_sft(tcfg, log=lambda *_: None, loaded=loaded)
        model = loaded[2]
        t_train = time.perf_counter() - t0
        result = {
            "key": key, "strategy": s, "seed": k, "selection": selections[(s, k)],
            "train": {"steps": summary["global_step"], "loss": summary["train_loss"], "losses": summary["losses"],
                      "rows": summary["join"]["n_examples"], "step_weights": summary["step_weights"],
                      "seconds": t_train},
            "weights_delta": _weights_delta(model, state0),
            "eval": evaluate(model, tokenizer, held_out, **eval_kw),
            "seconds": time.perf_counter() - t0,
        }
        write_json_atomic(local_fs(), str(run_dir / "result.json"), result)
        runs.append(result)
        log(f"compare: [{i}/{len(plan)}] {s} seed {k}: trained {result['train']['steps']} steps on "
            f"{result['train']['rows']} rows (train loss {result['train']['loss']:.4f}) in {t_train:.0f} s; "
            f"{_figures(result['eval'])} [{result['seconds']:.0f} s]")
        del loaded, model
        gc.collect()

    doc = {
        "config": {k: v for k, v in vars(cfg).items()},
        "model": {"name": ref.name, "fingerprint": ref.fingerprint},
        "held_out": dict(held_counts, n_checkable=n_check),
        "reference": REFERENCE,
        "initial": initial,
        "runs": runs,
        "summary": summarise(runs, list(cfg.strategies), cfg.seeds),
        "seconds": time.perf_counter() - t_start,
    }
    header, rows = table_rows(doc)
    doc["table"] = {"caption": caption(doc), "header": header, "rows": rows}  # what `air-ray report` shows
    md = markdown(doc)
    write_bytes_atomic(local_fs(), str(out / "compare.md"), md.encode())
    write_bytes_atomic(local_fs(), str(out / "compare.png"), plot(doc))
    write_json_atomic(local_fs(), str(out / "compare.json"), doc)  # last: its presence means complete
    log(md)
    log(f"compare: wrote {out / 'compare.json'}, compare.md, compare.png in {doc['seconds']:.0f} s")
    return doc


def _figures(ev: dict) -> str:
    acc = "-" if ev["accuracy"] is None else f"{ev['n_correct']}/{ev['n_checkable']} ({100 * ev['accuracy']:.1f} %)"
    return f"held-out loss {ev['loss']:.4f} nats/token, exact match {acc}"


# ----------------------------------------------------------------------------------------------
# table and plot


def _pm(d: dict, digits: int, scale: float = 1.0) -> str:
    if d["mean"] is None:
        return "–"
    s = f"{scale * d['mean']:.{digits}f}"
    return s + (f" ± {scale * d['sd']:.{digits}f}" if d.get("sd") is not None else "")


def _diff(d: dict | None, digits: int, scale: float = 1.0) -> str:
    if not d or d["mean"] is None:
        return "–"
    s = f"{scale * d['mean']:+.{digits}f}"
    if d["ci95"]:
        lo, hi = d["ci95"]
        s += f" [{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]"
        if lo <= 0 <= hi:  # not separated: how many seeds would, at this mean and sd
            n = d.get("seeds_to_separate")
            s += f" (~{n} seeds to separate)" if n else " (no seed count separates it)"
    return s


def table_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    """The comparison table (header, rows) of a compare.json: used by compare.md and by ``air-ray report``."""
    header = ["strategy", "seeds", "held-out loss (nats/token)", "Δ loss vs random [95% CI]",
              "exact match (%)", "Δ exact match vs random (points) [95% CI]", "min rel. weight change"]
    ini = doc["initial"]["eval"]
    rows = [["initial model (no training)", "–", f"{ini['loss']:.4f}", "–",
             "–" if ini["accuracy"] is None else f"{100 * ini['accuracy']:.1f}", "–", "0"]]
    for s, e in doc["summary"].items():
        rows.append([s, str(e["n_seeds"]), _pm(e["loss"], 4), _diff(e["loss"].get("vs_random"), 4),
                     _pm(e["accuracy"], 1, 100), _diff(e["accuracy"].get("vs_random"), 1, 100),
                     "–" if e["weights_delta_min"] is None else f"{e['weights_delta_min']:.2e}"])
    return header, rows


def caption(doc: dict) -> str:
    c = doc["config"]
    return (f"Students ({doc['model']['name']}) fine-tuned on {c['top_k']} rows per strategy, {c['seeds']} seed(s); "
            f"held-out: {doc['held_out']['rows_used']} rows ({doc['held_out']['n_checkable']} with a checkable "
            f"answer, greedy decoding up to {c['max_new_tokens']} new tokens). Mean ± sd over seeds; Δ = strategy "
            "minus random on the same seed, mean and 95 % t interval over seeds. Loss: lower is better; exact "
            "match: higher is better.")


def markdown(doc: dict) -> str:
    c = doc["config"]
    header, rows = table_rows(doc)
    lines = [f"# air-ray compare: {c['top_k']} rows per strategy, {c['seeds']} seed(s), student {doc['model']['name']}",
             "", caption(doc), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(doc: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["summary"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, (metric, label, better) in zip(axes, METRICS):
        scale = 100.0 if metric == "accuracy" else 1.0
        means = [scale * (doc["summary"][n][metric]["mean"] or 0.0) for n in names]
        sds = [scale * (doc["summary"][n][metric]["sd"] or 0.0) for n in names]
        ax.bar(range(len(names)), means, yerr=sds, capsize=4,
               color=["#4C72B0" if n.startswith("score") else "#999999" for n in names])
        ini = doc["initial"]["eval"][metric]
        if ini is not None:
            ax.axhline(scale * ini, color="k", ls="--", lw=1, label="initial model")
            ax.legend(loc="best", fontsize=8)
        if metric == "loss":
            lo = min(m - s for m, s in zip(means, sds))
            hi = max([m + s for m, s in zip(means, sds)] + [ini or 0.0])
            ax.set_ylim(max(0.0, lo - 0.1 * (hi - lo + 1e-9)), hi + 0.1 * (hi - lo + 1e-9))
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
        ax.set_title(f"{label}{' (%)' if scale != 1 else ''}: {better}", fontsize=9)
    fig.suptitle(f"students fine-tuned on {doc['config']['top_k']} rows per strategy (mean ± sd over "
                 f"{doc['config']['seeds']} seed(s))", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
