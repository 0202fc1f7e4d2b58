"""``air-ray compare``: does a selection train a better student than random subsets of the same size?

From one scoring run (``--scores``, the pool ``--input``):

1. **select** ``top_k`` rows per strategy with ``air_ray.outputs.select`` (``STRATEGIES``: the AIR score, the score
   balanced over ``loss_base`` bins, the absolute divergence ``delta`` (plain and balanced), the score of a placebo
   run (``--placebo-scores``: random non-critical heads disabled), the heuristics ``loss_base``, ``entropy_base``,
   ``n_response_tokens``, and two nulls: ``random`` (``--random-subsets`` seeded random subsets) and
   ``matched_random`` (``--matched-subsets`` random subsets within ``loss_base`` bins: the pool's difficulty).
   Every selection must hold exactly ``top_k`` rows;
2. **train** a student on each from the same initial weights with the same hyperparameters through
   ``air_ray.training.train_weighted_sft`` (the code of ``air-ray train``): plain SFT, except
   ``score_weighted`` (the score selection with its step weights). A deterministic strategy trains once per training
   seed ``0..seeds-1``; random subset ``j`` is one student (selection seed ``j``, training seed ``j mod seeds``);
3. **evaluate** every student on the held-out rows (``--eval-input``, none of them in the pool) with
   ``air_ray.evaluation.students``: mean response loss (nats per token) and, unless ``--max-new-tokens 0``, greedy
   exact match.

**Why a null of subsets.** Rerunning one selection with another training seed moves the held-out loss by ~0.0002 on
the default model; two random subsets of 64 GSM8K rows differ by ~0.009. The variance is in *which rows*, so each
strategy (its mean over training seeds) is placed in the distribution of the random students
(``air_ray.outputs.stats.null_position``): its percentile (100 = better than every random subset), the one-sided
empirical p-values of "better" and "worse" ((1 + null draws at least as good) / (N + 1): with N = 10 the smallest
is 0.09), and z = (value - null mean) / null sd (signed: positive is better). The same against ``matched_random``,
the fair null for the balanced strategies.

Each finished run leaves ``runs/<strategy>-seed<j>/result.json`` with a key of everything that determines it; a
rerun with the same options reuses those and trains only what is missing (an interrupted compare resumes). Then
``compare.json`` (config, held-out counts, the initial model, every run, ``summary``, ``table``), ``compare.md``
(the table) and ``compare.png`` (every student's held-out loss, the nulls as dots) are written.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from air_ray.config.commands import CompareConfig, SelectConfig, TrainConfig
from air_ray.errors import AirRayError
from air_ray.fsio import local_fs, write_bytes_atomic, write_json_atomic
from air_ray.outputs.stats import null_position
from air_ray.store.layout import COMPARE_JSON, COMPARE_MD, COMPARE_PNG, CompareLayout

METRICS = (("loss", "held-out loss (nats/token)", True), ("accuracy", "exact match", False))  # lower is better?
NULLS = ("random", "matched_random")
# strategy -> (select --by, select --balance, scores: "pool" or "placebo", trained with step weights)
STRATEGIES = {
    "score": ("score", None, "pool", False),
    "score_balanced": ("score", "loss_base", "pool", False),
    "delta": ("delta", None, "pool", False),
    "delta_balanced": ("delta", "loss_base", "pool", False),
    "placebo": ("score", None, "placebo", False),
    "loss_base": ("loss_base", None, "pool", False),
    "entropy_base": ("entropy_base", None, "pool", False),
    "n_response_tokens": ("n_response_tokens", None, "pool", False),
    "score_weighted": ("score", None, "pool", True),
    "random": ("random", None, "pool", False),
    "matched_random": ("random", "loss_base", "pool", False),
}


@dataclass(frozen=True)
class Run:
    """One student: a strategy, its index (training seed, or random subset), what it selects and how it trains."""

    strategy: str
    index: int
    train_seed: int

    @property
    def name(self) -> str:
        return f"{self.strategy}-seed{self.index}"

    @property
    def null(self) -> bool:
        return self.strategy in NULLS

    @property
    def selection_name(self) -> str:
        """Deterministic selections are the same for every training seed (score_weighted is the score one)."""
        if self.null:
            return f"{self.strategy}-{self.index}"
        return "score" if self.strategy == "score_weighted" else self.strategy


def plan(cfg: CompareConfig) -> list[Run]:
    """Every student, in the order they are trained: for each index, the deterministic strategies (index < seeds)
    then the nulls (index < their subset count), so that an interrupted run has something of each."""
    n = {"random": cfg.random_subsets, "matched_random": cfg.matched_subsets}
    runs = []
    for j in range(max(cfg.seeds, cfg.random_subsets, cfg.matched_subsets)):
        for s in cfg.strategies:
            if (s in NULLS and j < n[s]) or (s not in NULLS and j < cfg.seeds):
                runs.append(Run(s, j, j % cfg.seeds if s in NULLS else j))
    return runs


# ----------------------------------------------------------------------------------------------
# statistics


def mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    xs = [v for v in values if v is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def summarise(results: list[dict], strategies: list[str]) -> dict:
    """Per strategy and metric: its students' values, mean and sd; for a deterministic strategy its place in each
    null (``null_position`` of its mean); for a null its spread (min, max)."""
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["strategy"], []).append(r)
    nulls = {n: {m: [r["eval"][m] for r in by.get(n, [])] for m, _, _ in METRICS} for n in NULLS}
    out = {}
    for s in strategies:
        runs = sorted(by.get(s, []), key=lambda r: r["seed"])
        entry = {"students": len(runs),  # a null's: the mean over its subsets
                 "selected_loss_base": mean_sd([r.get("selected_loss_base") for r in runs])[0]}
        for metric, _, lower in METRICS:
            vals = [r["eval"][metric] for r in runs]
            m, sd = mean_sd(vals)
            e = {"mean": m, "sd": sd, "values": vals}
            if s in NULLS:
                finite = [v for v in vals if v is not None]
                e.update(min=min(finite, default=None), max=max(finite, default=None))
            for n in NULLS:
                if s != n and nulls[n][metric]:
                    e[f"vs_{n}"] = null_position(m, nulls[n][metric], lower)
            entry[metric] = e
        deltas = [r["weights_delta"] for r in runs]
        entry["weights_delta_min"] = min(deltas) if deltas else None
        out[s] = entry
    return out


# ----------------------------------------------------------------------------------------------
# the run


def run_keys(cfg: CompareConfig, fingerprint: str, runs: list[Run], held_out_ids: list[str]) -> dict:
    """``{run name: key}``: a hash of everything that determines one run's result: the model, the scores it selects
    from, the training and evaluation options, the strategy, its selection and training seeds and the held-out
    rows (``initial``: the initial model's evaluation)."""
    from air_ray.version import __version__

    doc = {name: getattr(cfg, name) for name in
           ("dtype", "format", "max_steps", "lr", "batch_size", "max_length", "grad_accum", "bf16", "add_eos",
            "top_k", "max_new_tokens", "think_tags", "prompt_field", "response_field", "reasoning_field",
            "messages_field", "id_field", "domain_field")}
    doc.update(model=fingerprint, input=sorted(cfg.input), air_ray=__version__,
               held_out=hashlib.sha1("\n".join(held_out_ids).encode()).hexdigest())
    pool = _scores_signature(cfg.scores)
    placebo = _scores_signature(cfg.placebo_scores) if cfg.placebo_scores else None
    keys = {"initial": _hash(dict(doc, strategy="initial", seed=0, scores=pool))}
    for r in runs:
        by, balance, scores, weighted = STRATEGIES[r.strategy]
        spec = dict(doc, strategy=r.strategy, seed=r.index, train_seed=r.train_seed, weighted=weighted, by=by,
                    scores=placebo if scores == "placebo" else pool)
        if balance:
            spec.update(balance=balance, balance_bins=cfg.balance_bins)
        keys[r.name] = _hash(spec)
    return keys


def _hash(doc: dict) -> str:
    return hashlib.sha1(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _scores_signature(scores: str) -> list:
    from air_ray.store.scores import open_scores

    return open_scores(scores, "compare", columns=("id",)).signature()


def _pool_ids(scores: str) -> set[str]:
    from air_ray.store.scores import open_scores

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


def _select(cfg: CompareConfig, out: CompareLayout, run: Run) -> tuple[str, float | None]:
    """(the selection directory of ``run``, the selected rows' mean loss_base). Select is cheap, so it is made again
    on every invocation and always matches the scores."""
    from air_ray.outputs.select import select

    by, balance, scores, _ = STRATEGIES[run.strategy]
    sel_dir = out.selection(run.selection_name)
    summary = select(SelectConfig(scores=cfg.placebo_scores if scores == "placebo" else cfg.scores,
                                  output=str(sel_dir), top_k=cfg.top_k, by=by, seed=run.index, balance=balance,
                                  balance_bins=cfg.balance_bins), quiet=True)
    n = summary["counts"]["rows_selected"]
    if n != cfg.top_k:
        raise AirRayError(f"compare: {run.strategy} (--by {by}) selects {n} rows, not --top-k {cfg.top_k} "
                          f"(candidates: {summary['counts']['rows_candidates']} of {summary['counts']['rows_total']}; "
                          f"a row whose {by} is missing is no candidate); lower --top-k or drop the strategy")
    return str(sel_dir), summary["bias"]["selected_mean"].get("loss_base")


def run_compare(cfg: CompareConfig, log=print) -> dict:
    """Select, train and evaluate every run of ``plan(cfg)``; write compare.json/.md/.png; return compare.json."""
    from air_ray.data.rows import FieldMap, RowPreparer
    from air_ray.evaluation.students import evaluate, read_held_out
    from air_ray.models import open_model
    from air_ray.training import load_trainable, train_weighted_sft

    cfg = cfg.validate()
    t_start = time.perf_counter()
    out = CompareLayout(cfg.out_dir)
    out.root.mkdir(parents=True, exist_ok=True)
    opened = open_model(cfg)
    ref, tokenizer = opened.ref, opened.tokenizer
    render = RowPreparer.of(tokenizer, cfg).response_text
    held_out, held_counts = read_held_out(list(cfg.eval_input), FieldMap.of(cfg), render, cfg.eval_rows)
    pool_ids = _pool_ids(cfg.scores)
    overlap = sorted({r.id for r in held_out} & pool_ids)
    if overlap:
        raise AirRayError(f"compare: {len(overlap)} held-out rows are in the scored pool (e.g. {overlap[:3]}); "
                          "the held-out rows must be rows no student can train on")
    if cfg.placebo_scores and _pool_ids(cfg.placebo_scores) != pool_ids:
        raise AirRayError("compare: --placebo-scores holds other rows than --scores; score the same pool with the "
                          "placebo heads")
    held_ids = [r.id for r in held_out]
    n_check = sum(r.answer is not None for r in held_out)
    runs = plan(cfg)
    log(f"compare: {len(held_out)} held-out rows ({n_check} with a checkable answer"
        f"{'' if cfg.max_new_tokens else ', not decoded: --max-new-tokens 0'}), {len(runs)} students "
        f"({', '.join(cfg.strategies)}; {cfg.seeds} training seed(s), {cfg.random_subsets} random and "
        f"{cfg.matched_subsets} matched subsets), top_k {cfg.top_k}, into {out}")
    eval_kw = dict(format=cfg.format, add_eos=cfg.add_eos, max_length=cfg.max_length,
                   batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens)

    # every selection first: a strategy that cannot select top_k rows fails before any training
    selections = {}
    for r in runs:
        if r.selection_name not in selections:
            selections[r.selection_name] = _select(cfg, out, r)

    keys = run_keys(cfg, ref.fingerprint, runs, held_ids)
    initial = _read_json(out.result(out.INITIAL))
    todo = [r for r in runs if (_read_json(out.result(r.name)) or {}).get("key") != keys[r.name]]
    state0 = None
    if todo or (initial or {}).get("key") != keys["initial"]:
        t0 = time.perf_counter()
        first = selections[runs[0].selection_name][0]
        _, _, model0 = load_trainable(_train_config(cfg, out.run(out.INITIAL), first, 0, False))
        state0 = {n: p.detach().float().cpu().clone() for n, p in model0.named_parameters()}
        if (initial or {}).get("key") != keys["initial"]:
            initial = {"key": keys["initial"], "strategy": "initial",
                       "eval": evaluate(model0, tokenizer, held_out, **eval_kw), "seconds": time.perf_counter() - t0}
            write_json_atomic(local_fs(), str(out.result(out.INITIAL)), initial)
        del model0
    log(f"compare: initial model: {_figures(initial['eval'])}")

    results = []
    for i, r in enumerate(runs, 1):
        run_dir = out.run(r.name)
        done = _read_json(out.result(r.name))
        if done is not None and done.get("key") == keys[r.name]:
            log(f"compare: [{i}/{len(runs)}] {r.name}: done before ({_figures(done['eval'])})")
            results.append(done)
            continue
        t0 = time.perf_counter()
        sel_dir, sel_loss = selections[r.selection_name]
        weighted = STRATEGIES[r.strategy][3]
        tcfg = _train_config(cfg, run_dir, sel_dir, r.train_seed, weighted)
        loaded = load_trainable(tcfg)
        summary = train_weighted_sft(tcfg, log=lambda *_: None, loaded=loaded)
        model = loaded[2]
        t_train = time.perf_counter() - t0
        result = {
            "key": keys[r.name], "strategy": r.strategy, "seed": r.index, "train_seed": r.train_seed,
            "selection": sel_dir, "selected_loss_base": sel_loss,
            "train": {"steps": summary["global_step"], "loss": summary["train_loss"], "losses": summary["losses"],
                      "rows": summary["join"]["n_examples"], "step_weights": summary["step_weights"],
                      "seconds": t_train},
            "weights_delta": _weights_delta(model, state0),
            "eval": evaluate(model, tokenizer, held_out, **eval_kw),
            "seconds": time.perf_counter() - t0,
        }
        write_json_atomic(local_fs(), str(out.result(r.name)), result)
        results.append(result)
        log(f"compare: [{i}/{len(runs)}] {r.name}: trained {result['train']['steps']} steps on "
            f"{result['train']['rows']} rows (train loss {result['train']['loss']:.4f}) in {t_train:.0f} s; "
            f"{_figures(result['eval'])} [{result['seconds']:.0f} s]")
        del loaded, model
        gc.collect()

    doc = {
        "config": {k: v for k, v in vars(cfg).items()},
        "model": {"name": ref.name, "fingerprint": ref.fingerprint},
        "held_out": dict(held_counts, n_checkable=n_check),
        "nulls": list(NULLS),
        "initial": initial,
        "runs": results,
        "summary": summarise(results, list(cfg.strategies)),
        "seconds": time.perf_counter() - t_start,
    }
    header, rows = table_rows(doc)
    doc["table"] = {"caption": caption(doc), "header": header, "rows": rows}  # what `air-ray report` shows
    md = markdown(doc)
    write_bytes_atomic(local_fs(), str(out.file(COMPARE_MD)), md.encode())
    write_bytes_atomic(local_fs(), str(out.file(COMPARE_PNG)), plot(doc))
    write_json_atomic(local_fs(), str(out.file(COMPARE_JSON)), doc)  # last: its presence means complete
    log(md)
    log(f"compare: wrote {out.file(COMPARE_JSON)}, {COMPARE_MD}, {COMPARE_PNG} in {doc['seconds']:.0f} s")
    return doc


def _figures(ev: dict) -> str:
    acc = "-" if ev["accuracy"] is None else f"{ev['n_correct']}/{ev['n_checkable']} ({100 * ev['accuracy']:.1f} %)"
    return f"held-out loss {ev['loss']:.4f} nats/token, exact match {acc}"


# ----------------------------------------------------------------------------------------------
# table and plot


def _num(x, fmt: str, scale: float = 1.0) -> str:
    return "–" if x is None else format(scale * x, fmt)


def _place(p: dict | None) -> str:
    """``62 % · p 0.36 / 0.73 · z +0.4``: percentile, p(better) / p(worse), z."""
    if not p or p.get("percentile") is None:
        return "–"
    return (f"{p['percentile']:.0f} % · p {p['p_better']:.2f} / {p['p_worse']:.2f}"
            + ("" if p["z"] is None else f" · z {p['z']:+.1f}"))


def table_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    """The comparison table (header, rows) of a compare.json: used by compare.md and by ``air-ray report``."""
    decoded = doc["config"].get("max_new_tokens", 0) > 0
    header = ["strategy", "students", "selected loss_base", "held-out loss (nats/token)", "vs random",
              "vs matched random"]
    if decoded:
        header += ["exact match (%)", "exact match vs random"]
    header.append("min rel. weight change")
    ini = doc["initial"]["eval"]
    rows = [["initial model (no training)", "–", "–", f"{ini['loss']:.4f}", "–", "–"]
            + (["–" if ini["accuracy"] is None else f"{100 * ini['accuracy']:.1f}", "–"] if decoded else []) + ["0"]]
    for s, e in doc["summary"].items():
        loss, acc = e["loss"], e["accuracy"]
        if s in NULLS:
            spread = (f"{_num(loss['mean'], '.4f')} ± {_num(loss['sd'], '.4f')} [{_num(loss['min'], '.4f')}, "
                      f"{_num(loss['max'], '.4f')}]")
        else:
            spread = _num(loss["mean"], ".4f") + ("" if loss["sd"] is None else f" ± {loss['sd']:.4f}")
        row = [s, str(e["students"]), _num(e["selected_loss_base"], ".3f"), spread,
               _place(loss.get("vs_random")), _place(loss.get("vs_matched_random"))]
        if decoded:
            row += [_num(acc["mean"], ".1f", 100) + ("" if acc["sd"] is None else f" ± {100 * acc['sd']:.1f}"),
                    _place(acc.get("vs_random"))]
        row.append("–" if e["weights_delta_min"] is None else f"{e['weights_delta_min']:.2e}")
        rows.append(row)
    return header, rows


def caption(doc: dict) -> str:
    c = doc["config"]
    decoded = c.get("max_new_tokens", 0) > 0
    return (f"Students ({doc['model']['name']}) fine-tuned on {c['top_k']} rows per selection; deterministic "
            f"strategies with {c['seeds']} training seed(s), the nulls with {c['random_subsets']} random and "
            f"{c['matched_subsets']} difficulty-matched random subsets, one student each. Held-out: "
            f"{doc['held_out']['rows_used']} rows"
            + (f" ({doc['held_out']['n_checkable']} with a checkable answer, greedy decoding up to "
               f"{c['max_new_tokens']} new tokens)" if decoded else " (loss only, no decoding)")
            + ". \"vs random\": the strategy's place in the null of random-subset students: percentile (100 % = "
              "better than every one), one-sided empirical p-values of better / worse ((1 + null draws at least as "
              "good) / (N + 1)), z (positive = better). Loss: lower is better; exact match: higher is better.")


def markdown(doc: dict) -> str:
    c = doc["config"]
    header, rows = table_rows(doc)
    lines = [f"# air-ray compare: {c['top_k']} rows per selection, student {doc['model']['name']}", "", caption(doc),
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(doc: dict) -> bytes:
    """Every student's held-out loss (and exact match when decoded), one row per strategy: the nulls' students as
    dots, the deterministic strategies' as markers, the initial model as a dashed line."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if m[0] == "loss" or doc["config"].get("max_new_tokens", 0) > 0]
    names = list(doc["summary"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(7.5 * len(metrics), 0.42 * len(names) + 1.8), squeeze=False)
    for ax, (metric, label, lower) in zip(axes[0], metrics):
        scale = 100.0 if metric == "accuracy" else 1.0
        for y, n in enumerate(names):
            vals = [scale * v for v in doc["summary"][n][metric]["values"] if v is not None]
            null = n in NULLS
            ax.scatter(vals, [y] * len(vals), s=22 if null else 60, marker="o" if null else "D",
                       color="#777777" if null else ("#4C72B0" if n.startswith(("score", "delta")) else "#DD8452"),
                       alpha=0.7 if null else 0.95, zorder=3)
        e = doc["summary"].get("random", {}).get(metric) or {}
        if e.get("min") is not None:
            ax.axvspan(scale * e["min"], scale * e["max"], color="#bbbbbb", alpha=0.3, zorder=1,
                       label="range of the random-subset students")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ini = doc["initial"]["eval"][metric]
        ax.set_xlabel(f"{label}{' (%)' if scale != 1 else ''}: {'lower' if lower else 'higher'} is better"
                      + ("" if ini is None else f" (initial model: {scale * ini:.4g})"), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"one student per selection of {doc['config']['top_k']} rows; dots: the random-subset students",
                 fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
