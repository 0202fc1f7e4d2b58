"""``air-ray compare``: does a selection train a better student than random subsets of the same size?

From one scoring run (``--scores``, the pool ``--input``):

1. **select** ``top_k`` rows per strategy with ``air_ray.outputs.select`` (``STRATEGIES``: the AIR score plain,
   balanced over ``loss_base`` bins, with diversity quotas and trained with its step weights; the absolute divergence
   ``delta`` plain, balanced and diverse; the score of a placebo run (``--placebo-scores``: random non-critical heads
   disabled); the heuristics ``loss_base``, ``entropy_base``, ``n_response_tokens``, ``random_diverse`` (random inside
   each diversity group) and ``answer_filter`` (subsets of the rows whose final answer matches their reference,
   made as clean_random's are: ``--clean-subsets``); the nulls ``random`` (``--random-subsets`` seeded random
   subsets) and ``matched_random`` (``--matched-subsets`` random subsets within ``loss_base`` bins: the pool's
   difficulty); and, on a pool with planted defects (``air_ray.evaluation.defects``), the positive controls
   ``clean_random`` (``--clean-subsets`` random subsets of the rows without a defect) and ``repaired_random``
   (random subsets 0..clean_subsets-1 again, trained with their defects repaired). Every selection must hold exactly
   ``top_k`` rows;
2. **train** a student on each from the same initial weights with the same hyperparameters through
   ``air_ray.training.train_weighted_sft`` (the code of ``air-ray train``): plain SFT, except
   ``score_weighted`` (the score selection with its step weights). A deterministic strategy trains once per training
   seed ``0..seeds-1``; random subset ``j`` is one student (selection seed ``j``, training seed ``j mod seeds``).
   Runs that select the same rows in the same order share one student (``run_keys``);
3. **evaluate** every student on the held-out rows (``--eval-input``, none of them in the pool) with
   ``air_ray.evaluation.students``: mean response loss (nats per token), the same over the final answer's tokens
   alone, and, unless ``--max-new-tokens 0``, greedy exact match.

**Why a null of subsets.** Rerunning one selection with another training seed moves the held-out loss by ~0.0002 on
the default model; two random subsets of 64 GSM8K rows differ by ~0.009. The variance is in *which rows*, so each
strategy (its mean over training seeds) is placed in the distribution of the random students
(``air_ray.outputs.stats.null_position``): its percentile (100 = better than every random subset), the one-sided
empirical p-values of "better" and "worse" ((1 + null draws at least as good) / (N + 1): with N = 20 the smallest
is 0.048), and z = (value - null mean) / null sd (signed: positive is better). The same against ``matched_random``,
the fair null for the balanced strategies.

**Can the experiment tell at all?** A pool with planted defects has two answers, both tested one-sided per loss:

- ``clean_random``: random subsets of the clean rows must train better students than random subsets of all rows
  (a permutation test against all random students). This is the test a strategy faces, one selection placed in
  the spread between random subsets: where the control does not stand out of it, no strategy's place in that null
  says anything at this size. (Clean subset j is random subset j less its defective rows, topped up with the next
  clean rows of seed j's order; its paired test against random subset j is reported too, though swapping a quarter
  of the rows changes a student about as much as a new subset does.)
- ``repaired_random``: random subset j itself, the same ids in the same order and the same training seed, trained
  on the pool with its defects repaired (each corrupted row given back its ``solution``), against random subset j
  (a sign-flip test of the pairs). The two students differ by the defects alone, so this asks whether the students
  see data quality at all, free of the spread between subsets.

``positive_control`` holds both verdicts at p < 0.05.

Each finished run leaves ``runs/<strategy>-seed<j>/result.json`` with a key of everything that determines it; a
rerun with the same options reuses those and trains only what is missing (an interrupted compare resumes). Then
``compare.json`` (config, held-out counts, the initial model, every run, ``summary``, ``positive_control``, the
pool's defect and wrong-answer shares, ``table``), ``compare.md`` (the tables) and ``compare.png`` (every student's
held-out losses, the subsets' students as dots) are written.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from air_ray.config.commands import COMPARE_STRATEGIES, CompareConfig, SelectConfig, TrainConfig
from air_ray.errors import AirRayError
from air_ray.fsio import local_fs, write_bytes_atomic, write_json_atomic
from air_ray.outputs.stats import null_position, paired, two_sample
from air_ray.progress import Ticker, duration, say
from air_ray.store.layout import COMPARE_JSON, COMPARE_MD, COMPARE_PNG, CompareLayout

# (key, label, lower is better): the response loss, the loss of the final answer alone (``students.response_loss``),
# and exact match
METRICS = (("loss", "held-out loss (nats/token)", True), ("answer_loss", "final-answer loss (nats/token)", True),
           ("accuracy", "exact match", False))
LOSSES = ("loss", "answer_loss")
EVALUATION = 2  # what a student's result holds (2: the final-answer loss too): in every run key, so a result made
# by an earlier evaluation is made again, not shown without the new measure
NULLS = ("random", "matched_random")  # the distributions every strategy is placed in


@dataclass(frozen=True)
class Strategy:
    """How a strategy selects (the options of ``air-ray select``, from the pool's scores or the placebo run's) and
    trains (with step weights or not). ``subsets``: the CompareConfig option counting its random subsets, one
    student each (the nulls and the positive control); None: one selection, trained once per training seed."""

    by: str
    balance: str | None = None
    scores: str = "pool"  # pool | placebo
    weighted: bool = False
    diverse: bool = False  # select --diversity (CompareConfig.diversity groups)
    exclude_wrong_answer: bool = False
    exclude_defective: bool = False
    subsets: str | None = None
    paired: bool = False  # its subset j is made from random subset j: tested paired with that student too
    repaired: bool = False  # trained on the pool with its planted defects repaired (``defects.repair_defects``)


STRATEGIES = {
    "score": Strategy("score"),
    "score_balanced": Strategy("score", balance="loss_base"),
    "delta": Strategy("delta"),
    "delta_balanced": Strategy("delta", balance="loss_base"),
    "placebo": Strategy("score", scores="placebo"),
    "loss_base": Strategy("loss_base"),
    "entropy_base": Strategy("entropy_base"),
    "n_response_tokens": Strategy("n_response_tokens"),
    "score_weighted": Strategy("score", weighted=True),
    "score_diverse": Strategy("score", diverse=True),
    "delta_diverse": Strategy("delta", diverse=True),
    "random_diverse": Strategy("random", diverse=True),  # random inside each group (selection seed 0)
    # the curator's filter, made as clean_random is: subset j is random subset j less its wrong final answers, topped
    # up with the next rows of seed j's order that pass (paired with random subset j)
    "answer_filter": Strategy("random", exclude_wrong_answer=True, subsets="clean_subsets", paired=True),
    "random": Strategy("random", subsets="random_subsets"),
    "matched_random": Strategy("random", balance="loss_base", subsets="matched_subsets"),
    # the positive control: subset j is random subset j's clean rows topped up with the next clean rows of seed j's
    # order (select --by random --seed j --exclude-defective), so its students pair with the random ones
    "clean_random": Strategy("random", exclude_defective=True, subsets="clean_subsets", paired=True),
    # the paired positive control: random subset j itself (the same ids in the same order, the same seed), trained
    # with its planted defects repaired: the two students differ by the defects alone
    "repaired_random": Strategy("random", subsets="clean_subsets", paired=True, repaired=True),
}
assert tuple(STRATEGIES) == COMPARE_STRATEGIES, "every compare strategy is declared once, in the config's order"


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
    def subsets(self) -> bool:
        """One of the strategies with random subsets (the nulls, the positive control)."""
        return STRATEGIES[self.strategy].subsets is not None

    @property
    def selection_name(self) -> str:
        """Deterministic selections are the same for every training seed (score_weighted is the score one)."""
        if self.subsets:
            return f"{self.strategy}-{self.index}"
        return "score" if self.strategy == "score_weighted" else self.strategy


def plan(cfg: CompareConfig, strategies: list[str] | None = None) -> list[Run]:
    """Every student, in the order they are trained: for each index, the deterministic strategies (index < seeds)
    then those with subsets (index < their subset count), so that an interrupted run has something of each."""
    strategies = list(cfg.strategies if strategies is None else strategies)
    n = {s: getattr(cfg, STRATEGIES[s].subsets) if STRATEGIES[s].subsets else cfg.seeds for s in strategies}
    runs = []
    for j in range(max(n.values(), default=0)):
        for s in strategies:
            if j < n[s]:
                runs.append(Run(s, j, j % cfg.seeds if STRATEGIES[s].subsets else j))
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
    """Per strategy and metric: its students' values, mean and sd, and its place in each null (``null_position`` of
    its mean); for a strategy with subsets its spread (min, max), and for the positive control (clean_random) also
    the tests of its students against the random ones: unpaired (``two_sample``) and paired with the subset each
    is made from (``paired``). Per strategy the selected rows' mean loss_base and planted-defect and wrong-answer
    shares (means over its students) where the pool has them."""
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["strategy"], []).append(r)
    nulls = {n: {m: [r["eval"].get(m) for r in by.get(n, [])] for m, _, _ in METRICS} for n in NULLS}
    out = {}
    for s in strategies:
        runs = sorted(by.get(s, []), key=lambda r: r["seed"])
        entry = {"students": len(runs),  # with subsets: the mean over its subsets
                 "selected_loss_base": mean_sd([r.get("selected_loss_base") for r in runs])[0]}
        corpus = [r["selected_corpus"] for r in runs if r.get("selected_corpus")]
        if corpus:
            entry["selected_corpus"] = {k: mean_sd([c.get(k) for c in corpus])[0]
                                        for k in ("defect_share", "wrong_answer_share") if k in corpus[0]}
            if "defect_share_by_kind" in corpus[0]:
                entry["selected_corpus"]["defect_share_by_kind"] = {
                    kind: mean_sd([c["defect_share_by_kind"].get(kind) for c in corpus])[0]
                    for kind in corpus[0]["defect_share_by_kind"]}
        for metric, _, lower in METRICS:
            vals = [r["eval"].get(metric) for r in runs]
            m, sd = mean_sd(vals)
            e = {"mean": m, "sd": sd, "values": vals}
            if STRATEGIES[s].subsets:
                finite = [v for v in vals if v is not None]
                e.update(min=min(finite, default=None), max=max(finite, default=None))
                if s not in NULLS and nulls["random"][metric]:
                    e["two_sample_vs_random"] = two_sample(vals, nulls["random"][metric], lower)
                if STRATEGIES[s].paired and by.get("random"):
                    null_by_seed = {r["seed"]: r["eval"].get(metric) for r in by["random"]}
                    e["paired_vs_random"] = paired(vals, [null_by_seed.get(r["seed"]) for r in runs], lower)
            for n in NULLS:
                if s != n and nulls[n][metric]:
                    e[f"vs_{n}"] = null_position(m, nulls[n][metric], lower)
            entry[metric] = e
        deltas = [r["weights_delta"] for r in runs]
        entry["weights_delta_min"] = min(deltas) if deltas else None
        out[s] = entry
    return out


def positive_control(summary: dict, alpha: float = 0.05) -> dict | None:
    """Per loss metric (``LOSSES``): what the two positive controls of a pool with planted defects say, each a
    one-sided test at ``alpha``:

    - clean_random (``separated``, ``p_better``, ``diff``, ``n``, ``n_null``; the test in ``two_sample``): its
      students against all random ones, unpaired. Does a selection without the defects stand out of the spread
      between random subsets? That is how every other strategy, one selection each, is placed in the random null:
      where it does not, no strategy's place in that null can show a gain of that size. (Its paired test, clean
      subset j against random subset j, is under ``paired``.)
    - repaired_random (``repaired``: its ``paired`` test, with ``separated``): random subset j trained with its
      defects repaired against random subset j as it is, a sign-flip test of the pairs. The two students differ by
      the defects alone: does this experiment see data quality at all?

    None without a positive control."""
    out = {}
    for metric in LOSSES:
        entry: dict = {"alpha": alpha}
        clean = summary.get("clean_random", {}).get(metric, {})
        test = clean.get("two_sample_vs_random")
        if test and test.get("p_better") is not None:
            entry.update(separated=test["p_better"] < alpha, diff=test["diff"], p_better=test["p_better"],
                         n=test["n"], n_null=test["n_null"], two_sample=test, paired=clean.get("paired_vs_random"),
                         percentile_of_mean=(clean.get("vs_random") or {}).get("percentile"))
        fixed = summary.get("repaired_random", {}).get(metric, {}).get("paired_vs_random")
        if fixed and fixed.get("p_better") is not None:
            entry["repaired"] = dict(fixed, separated=fixed["p_better"] < alpha)
        if len(entry) > 1:
            out[metric] = entry
    return out or None


# ----------------------------------------------------------------------------------------------
# the run


def run_keys(cfg: CompareConfig, fingerprint: str, runs: list[Run], held_out_ids: list[str],
             selections: dict[str, "Selected"]) -> dict:
    """``{run name: key}``: a hash of everything that determines one student: the model, the pool's scores (step
    weights come from them), the training and evaluation options, the held-out rows, and the run's selected ids in
    rank order (the order the trainer reads them in), its training seed and whether it trains with step weights
    (``initial``: the initial model's evaluation). Two runs whose selections are the same rows in the same order
    (clean_random on a pool without defects is random) have the same key: one student serves both."""
    from air_ray.version import __version__

    doc = {name: getattr(cfg, name) for name in
           ("dtype", "format", "max_steps", "lr", "batch_size", "max_length", "grad_accum", "bf16", "add_eos",
            "top_k", "max_new_tokens", "think_tags", "prompt_field", "response_field", "reasoning_field",
            "messages_field", "id_field", "domain_field")}
    doc.update(model=fingerprint, input=sorted(cfg.input), air_ray=__version__, evaluation=EVALUATION,
               held_out=hashlib.sha1("\n".join(held_out_ids).encode()).hexdigest(),
               scores=_scores_signature(cfg.scores))
    keys = {"initial": _hash(dict(doc, strategy="initial", seed=0))}
    for r in runs:
        keys[r.name] = _hash(dict(doc, selected=selections[r.selection_name].digest, train_seed=r.train_seed,
                                  weighted=STRATEGIES[r.strategy].weighted,
                                  **({"repaired": True} if STRATEGIES[r.strategy].repaired else {})))
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


@dataclass(frozen=True)
class Selected:
    """A selection of one run: its directory, a digest of its ids in rank order, the selected rows' mean loss_base
    and their defect and answer shares (``select``'s audit; None where the pool has neither)."""

    dir: str
    digest: str
    loss_base: float | None
    corpus: dict | None
    pool_corpus: dict | None


def _select(cfg: CompareConfig, out: CompareLayout, run: Run) -> Selected:
    """The selection of ``run`` (``air-ray select`` with its strategy's options). Select is cheap, so it is made
    again on every invocation and always matches the scores."""
    from air_ray.outputs.select import select
    from air_ray.store.scores import read_selection_ids

    st = STRATEGIES[run.strategy]
    sel_dir = out.selection(run.selection_name)
    summary = select(SelectConfig(
        scores=cfg.placebo_scores if st.scores == "placebo" else cfg.scores, output=str(sel_dir), top_k=cfg.top_k,
        by=st.by, seed=run.index if st.subsets else 0, balance=st.balance, balance_bins=cfg.balance_bins,
        diversity=cfg.diversity if st.diverse else None, exclude_wrong_answer=st.exclude_wrong_answer,
        exclude_defective=st.exclude_defective, input=list(cfg.input)), quiet=True)
    n = summary["counts"]["rows_selected"]
    if n != cfg.top_k:
        raise AirRayError(f"compare: {run.strategy} (--by {st.by}) selects {n} rows, not --top-k {cfg.top_k} "
                          f"(candidates: {summary['counts']['rows_candidates']} of {summary['counts']['rows_total']}; "
                          f"a row whose {st.by} is missing is no candidate); lower --top-k or drop the strategy")
    ids = read_selection_ids(str(sel_dir))
    corpus = summary["bias"].get("corpus") or {}
    chosen = corpus.get("selected")
    if st.repaired and chosen and "defect_share" in chosen:  # trained repaired: no defect left (answers not audited)
        chosen = {"defect_share": 0.0,
                  "defect_share_by_kind": dict.fromkeys(chosen.get("defect_share_by_kind") or {}, 0.0)}
    return Selected(str(sel_dir), hashlib.sha1("\n".join(ids).encode()).hexdigest(),
                    summary["bias"]["selected_mean"].get("loss_base"), chosen, corpus.get("pool"))


def repaired_pool(cfg: CompareConfig) -> dict[str, str]:
    """``{id: original response}`` of every row of the pool with a planted defect (``defects.repair_defects``):
    what repaired_random's students train on in place of the corrupted responses. The pool must be JSON lines
    (plain or compressed) of ``{id, prompt, response}`` rows, as ``bench/plant_defects.py`` writes it."""
    from air_ray.data.answers import DEFECT_FIELD
    from air_ray.evaluation.defects import repair_defects
    from air_ray.fsio import open_uri

    rows = []
    for uri in cfg.input:
        if not uri.split("?")[0].endswith((".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.bz2")):
            raise AirRayError(f"compare: repaired_random reads the planted pool as JSON lines; {uri} is not a .jsonl "
                              "file (leave the strategy out, or plant the defects with bench/plant_defects.py)")
        with open_uri(uri, "rt", compression="infer", encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    field, id_field = cfg.response_field or "response", cfg.id_field or "id"
    planted = [r for r in rows if r.get(DEFECT_FIELD)]
    if any(not isinstance(r.get(id_field), str) for r in planted):
        raise AirRayError(f"compare: repaired_random needs every planted row to carry its {id_field!r} (the rows "
                          "bench/plant_defects.py writes do)")
    fixed, _ = repair_defects(planted, field)  # checks each has its solution
    return {r[id_field]: r[field] for r in fixed}


def _repaired_rows(tcfg: TrainConfig, tokenizer, fixes: dict[str, str]):
    """The student's rows joined as ``air-ray train`` joins them (the planted pool, checked against its scores),
    then every planted row given its original response: plain SFT, no step spans. Returns (rows, rows repaired)."""
    from air_ray.data.rows import RowPreparer
    from air_ray.training.examples import training_rows

    rows = training_rows(tcfg, RowPreparer.of(tokenizer, tcfg))
    n = 0
    for ex in rows.examples:
        if ex["id"] in fixes:
            ex.update(response=fixes[ex["id"]], step_spans=[], step_weights=[])
            n += 1
    return rows, n


def available(cfg: CompareConfig, log=print) -> list[str]:
    """The strategies of this run: as asked for; the default leaves out those the run lacks what they need for
    (placebo: already in the config's check; the *_diverse ones: an embedding column; clean_random and
    repaired_random: a defect column in the pool), each with a line saying why. Asked for by name, they fail at
    their selection instead."""
    from air_ray.data.answers import DEFECT_FIELD
    from air_ray.outputs.facts import read_facts
    from air_ray.data.rows import FieldMap
    from air_ray.store.schemas import EMBEDDING
    from air_ray.store.scores import open_scores

    strategies = list(cfg.strategies)
    if [s for s in COMPARE_STRATEGIES if s != "placebo" or cfg.placebo_scores] != strategies:
        return strategies
    scores = open_scores(cfg.scores, "compare", columns=(EMBEDDING,))
    if not any(b.column(EMBEDDING).null_count < b.num_rows for b in scores.batches([EMBEDDING])):
        log("compare: the scores have no embedding (score --embed): score_diverse, delta_diverse and random_diverse "
            "are left out")
        strategies = [s for s in strategies if not STRATEGIES[s].diverse]
    if not read_facts(list(cfg.input), FieldMap.of(cfg), expand=True).has_defects:
        log(f"compare: the pool has no {DEFECT_FIELD} column: clean_random and repaired_random (the positive "
            "controls of a pool with planted defects) are left out")
        strategies = [s for s in strategies if s not in ("clean_random", "repaired_random")]
    return strategies


class _Status:
    """What compare is doing now, for the progress line every ``progress.EVERY_S`` seconds."""

    def __init__(self, runs: list[Run]):
        self.runs, self.i, self.what, self.since = runs, 0, "selecting", time.time()
        self.trained: list[float] = []  # seconds of each student trained in this invocation
        self.left = len(runs)  # students still to train or to find done

    def set(self, i: int, what: str) -> None:
        self.i, self.what, self.since = i, what, time.time()

    def line(self) -> str:
        name = self.runs[self.i - 1].name if 0 < self.i <= len(self.runs) else "-"
        per = sum(self.trained) / len(self.trained) if self.trained else None
        eta = f", ETA {duration(per * self.left)}" if per else ""
        return (f"[air-ray compare] student {self.i} of {len(self.runs)} ({name}): {self.what} for "
                f"{duration(time.time() - self.since)}; {len(self.trained)} trained this run"
                + (f", {per:.0f} s each" if per else "") + eta)


def run_compare(cfg: CompareConfig, log=say) -> dict:
    """Select, train and evaluate every run of ``plan(cfg)``; write compare.json/.md/.png; return compare.json."""
    from air_ray.data.rows import FieldMap, RowPreparer
    from air_ray.evaluation.students import evaluate, read_held_out
    from air_ray.models import open_model
    from air_ray.training import load_trainable

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
    strategies = available(cfg, log)
    runs = plan(cfg, strategies)
    log(f"compare: {len(held_out)} held-out rows ({n_check} with a checkable answer"
        f"{'' if cfg.max_new_tokens else ', not decoded: --max-new-tokens 0'}), {len(runs)} students "
        f"({', '.join(strategies)}; {cfg.seeds} training seed(s), "
        + ", ".join(f"{getattr(cfg, STRATEGIES[s].subsets)} {s} subsets" for s in strategies if STRATEGIES[s].subsets)
        + f"), top_k {cfg.top_k}, into {out.root}")
    eval_kw = dict(format=cfg.format, add_eos=cfg.add_eos, max_length=cfg.max_length,
                   batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens)

    # every selection first: a strategy that cannot select top_k rows fails before any training
    selections: dict[str, Selected] = {}
    for r in runs:
        if r.selection_name not in selections:
            selections[r.selection_name] = _select(cfg, out, r)

    keys = run_keys(cfg, ref.fingerprint, runs, held_ids, selections)
    initial = _read_json(out.result(out.INITIAL))
    todo = [r for r in runs if (_read_json(out.result(r.name)) or {}).get("key") != keys[r.name]]
    repaired = None  # read only when a repaired_random student is still to train
    if any(STRATEGIES[r.strategy].repaired for r in todo):
        repaired = repaired_pool(cfg)
        log(f"compare: repaired_random trains on random subsets with the pool's {len(repaired)} planted defects "
            "repaired (their original responses)")
    state0 = None
    if todo or (initial or {}).get("key") != keys["initial"]:
        t0 = time.perf_counter()
        first = selections[runs[0].selection_name].dir
        _, _, model0 = load_trainable(_train_config(cfg, out.run(out.INITIAL), first, 0, False))
        state0 = {n: p.detach().float().cpu().clone() for n, p in model0.named_parameters()}
        if (initial or {}).get("key") != keys["initial"]:
            initial = {"key": keys["initial"], "strategy": "initial",
                       "eval": evaluate(model0, tokenizer, held_out, **eval_kw), "seconds": time.perf_counter() - t0}
            write_json_atomic(local_fs(), str(out.result(out.INITIAL)), initial)
        del model0
    log(f"compare: initial model: {_figures(initial['eval'])}")

    results = []
    students: dict[str, dict] = {}  # key -> a finished student (one student serves runs of the same key)
    status = _Status(runs)
    with Ticker(status.line):
        for i, r in enumerate(runs, 1):
            status.set(i, "training")
            results.append(_student(cfg, out, r, i, selections[r.selection_name], keys[r.name], students, state0,
                                    tokenizer, held_out, eval_kw, status, log, repaired))
            status.left -= 1

    summary = summarise(results, strategies)
    pool_corpus = next((s.pool_corpus for s in selections.values() if s.pool_corpus), None)
    doc = {
        "config": {k: v for k, v in vars(cfg).items()},
        "model": {"name": ref.name, "fingerprint": ref.fingerprint},
        "held_out": dict(held_counts, n_checkable=n_check),
        "nulls": list(NULLS),
        "strategies": strategies,
        "pool_corpus": pool_corpus,  # the pool's defect and wrong-answer shares (select's audit), where it has them
        "initial": initial,
        "runs": results,
        "summary": summary,
        "positive_control": positive_control(summary),
        "seconds": time.perf_counter() - t_start,
    }
    header, rows = table_rows(doc)
    defects = defect_rows(doc)
    doc["table"] = {"caption": caption(doc), "header": header, "rows": rows,  # what `air-ray report` shows
                    "control": control_line(doc),
                    "defects": None if defects is None else {"header": defects[0], "rows": defects[1]}}
    md = markdown(doc)
    write_bytes_atomic(local_fs(), str(out.file(COMPARE_MD)), md.encode())
    write_bytes_atomic(local_fs(), str(out.file(COMPARE_PNG)), plot(doc))
    write_json_atomic(local_fs(), str(out.file(COMPARE_JSON)), doc)  # last: its presence means complete
    log(md)
    log(f"compare: wrote {out.file(COMPARE_JSON)}, {COMPARE_MD}, {COMPARE_PNG} in {doc['seconds']:.0f} s")
    return doc


def _student(cfg: CompareConfig, out: CompareLayout, r: Run, i: int, sel: Selected, key: str, students: dict,
             state0: dict | None, tokenizer, held_out, eval_kw: dict, status: _Status, log,
             repaired: dict[str, str] | None = None) -> dict:
    """The result of run ``r``: found done before (same key), the student of another run with the same key, or a
    student trained and evaluated now (repaired_random: its planted rows given their ``repaired`` responses)."""
    from air_ray.evaluation.students import evaluate
    from air_ray.training import load_trainable, train_weighted_sft

    own = {"strategy": r.strategy, "seed": r.index, "train_seed": r.train_seed, "selection": sel.dir,
           "selected_loss_base": sel.loss_base, "selected_corpus": sel.corpus}
    where = f"compare: [{i}/{len(status.runs)}] {r.name}"
    done = _read_json(out.result(r.name))
    if done is not None and done.get("key") == key:
        log(f"{where}: done before ({_figures(done['eval'])})")
        students.setdefault(key, done)
        return dict(done, **own)
    twin = students.get(key)
    if twin is not None:  # the same rows in the same order, trained the same way: that student's result
        result = dict(twin, **own, same_student_as=f"{twin['strategy']}-seed{twin['seed']}", seconds=0.0)
        write_json_atomic(local_fs(), str(out.result(r.name)), result)
        log(f"{where}: the same selection as {result['same_student_as']}: its student ({_figures(result['eval'])})")
        return result
    t0 = time.perf_counter()
    tcfg = _train_config(cfg, out.run(r.name), sel.dir, r.train_seed, STRATEGIES[r.strategy].weighted)
    loaded = load_trainable(tcfg)
    rows, n_repaired = _repaired_rows(tcfg, tokenizer, repaired) if STRATEGIES[r.strategy].repaired else (None, None)
    summary = train_weighted_sft(tcfg, log=lambda *_: None, loaded=loaded, quiet=True, rows=rows)
    model = loaded[2]
    t_train = time.perf_counter() - t0
    status.set(i, "evaluating")
    result = {
        "key": key, **own,
        "train": {"steps": summary["global_step"], "loss": summary["train_loss"], "losses": summary["losses"],
                  "rows": summary["join"]["n_examples"], "step_weights": summary["step_weights"],
                  **({"rows_repaired": n_repaired} if n_repaired is not None else {}),
                  "seconds": t_train},
        "weights_delta": _weights_delta(model, state0),
        "eval": evaluate(model, tokenizer, held_out, **eval_kw),
        "seconds": time.perf_counter() - t0,
    }
    write_json_atomic(local_fs(), str(out.result(r.name)), result)
    students[key] = result
    status.trained.append(result["seconds"])
    log(f"{where}: trained {result['train']['steps']} steps on {result['train']['rows']} rows (train loss "
        f"{result['train']['loss']:.4f}) in {t_train:.0f} s; {_figures(result['eval'])} [{result['seconds']:.0f} s]")
    del loaded, model
    gc.collect()
    return result


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


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _corpus_columns(doc: dict) -> list[tuple[str, str]]:
    """``(header, key)`` of the defect and wrong-answer share columns the pool has (none for a plain pool)."""
    pool = doc.get("pool_corpus") or {}
    cols = []
    if "defect_share" in pool:
        cols.append((f"defective selected (pool {_pct(pool['defect_share'])})", "defect_share"))
    if "wrong_answer_share" in pool:
        cols.append((f"wrong answer selected (pool {_pct(pool['wrong_answer_share'])})", "wrong_answer_share"))
    return cols


def _two_sample(t: dict | None, pair: dict | None = None) -> str:
    if not t or t.get("p_better") is None:
        return ""
    out = f"; vs the random students: {t['diff']:+.4f}, permutation p {t['p_better']:.3f}"
    if pair and pair.get("p_better") is not None:
        out += f"; paired ({pair['n_pairs']}): {pair['diff']:+.4f}, sign-flip p {pair['p_better']:.3f}"
    return out


def _spread(e: dict) -> str:
    """A metric's mean (± sd, and [min, max] for a strategy with subsets)."""
    if e.get("mean") is None:
        return "–"
    if "min" in e:
        return f"{_num(e['mean'], '.4f')} ± {_num(e['sd'], '.4f')} [{_num(e['min'], '.4f')}, {_num(e['max'], '.4f')}]"
    return _num(e["mean"], ".4f") + ("" if e["sd"] is None else f" ± {e['sd']:.4f}")


def table_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    """The comparison table (header, rows) of a compare.json: used by compare.md and by ``air-ray report``."""
    decoded = doc["config"].get("max_new_tokens", 0) > 0
    corpus = _corpus_columns(doc)
    answers = any((e.get("answer_loss") or {}).get("mean") is not None for e in doc["summary"].values())
    matched = "matched_random" in doc["summary"]
    header = ["strategy", "students", "selected loss_base", *(h for h, _ in corpus), "held-out loss (nats/token)",
              "vs random", *(["vs matched random"] if matched else [])]
    if answers:
        header += ["final-answer loss (nats/token)", "final-answer loss vs random"]
    if decoded:
        header += ["exact match (%)", "exact match vs random"]
    header.append("min rel. weight change")
    ini = doc["initial"]["eval"]
    rows = [["initial model (no training)", "–", "–", *("–" for _ in corpus), f"{ini['loss']:.4f}", "–",
             *(["–"] if matched else [])]
            + ([_num(ini.get("answer_loss"), ".4f"), "–"] if answers else [])
            + (["–" if ini["accuracy"] is None else f"{100 * ini['accuracy']:.1f}", "–"] if decoded else []) + ["0"]]
    for s, e in doc["summary"].items():
        loss, acc = e["loss"], e["accuracy"]
        shares = e.get("selected_corpus") or {}
        row = [s, str(e["students"]), _num(e["selected_loss_base"], ".3f"), *(_pct(shares.get(k)) for _, k in corpus),
               _spread(loss), _place(loss.get("vs_random"))
               + _two_sample(loss.get("two_sample_vs_random"), loss.get("paired_vs_random")),
               *([_place(loss.get("vs_matched_random"))] if matched else [])]
        if answers:
            a = e.get("answer_loss") or {}
            row += [_spread(a), _place(a.get("vs_random"))
                    + _two_sample(a.get("two_sample_vs_random"), a.get("paired_vs_random"))]
        if decoded:
            row += [_num(acc["mean"], ".1f", 100) + ("" if acc["sd"] is None else f" ± {100 * acc['sd']:.1f}"),
                    _place(acc.get("vs_random"))]
        row.append("–" if e["weights_delta_min"] is None else f"{e['weights_delta_min']:.2e}")
        rows.append(row)
    return header, rows


def defect_rows(doc: dict) -> tuple[list[str], list[list[str]]] | None:
    """The share of each planted defect kind among the selected rows, per strategy, beside the pool's (None when
    the pool has no defect column)."""
    pool = (doc.get("pool_corpus") or {}).get("defect_share_by_kind")
    if not pool:
        return None
    kinds = sorted(pool)
    rows = [["pool", *(_pct(pool[k]) for k in kinds), _pct(doc["pool_corpus"]["defect_share"])]]
    for s, e in doc["summary"].items():
        shares = e.get("selected_corpus") or {}
        by_kind = shares.get("defect_share_by_kind") or {}
        rows.append([s, *(_pct(by_kind.get(k)) for k in kinds), _pct(shares.get("defect_share"))])
    return ["selected by", *kinds, "all defects"], rows


def caption(doc: dict) -> str:
    c = doc["config"]
    decoded = c.get("max_new_tokens", 0) > 0
    strategies = doc["summary"]  # the strategies that ran, as table_rows reads them
    subsets = [f"{c['random_subsets']} random subsets"]
    if "matched_random" in strategies:
        subsets.append(f"{c['matched_subsets']} difficulty-matched random subsets")
    if "clean_random" in strategies:
        subsets.append(f"the positive control clean_random with {c.get('clean_subsets')} random subsets of the clean "
                       "rows")
    if "repaired_random" in strategies:
        subsets.append(f"the paired control repaired_random: random subsets 0-{c.get('clean_subsets', 1) - 1} "
                       "trained with their planted defects repaired")
    if "answer_filter" in strategies:
        subsets.append(f"answer_filter with {c.get('clean_subsets')} subsets of the rows whose final answer matches "
                       "its reference")
    return (f"Students ({doc['model']['name']}) fine-tuned on {c['top_k']} rows per selection; deterministic "
            f"strategies with {c['seeds']} training seed(s), {', '.join(subsets[:-1])}"
            f"{' and ' if len(subsets) > 1 else ''}{subsets[-1]}, one student each. Held-out: "
            f"{doc['held_out']['rows_used']} rows"
            + (f" ({doc['held_out']['n_checkable']} with a checkable answer, greedy decoding up to "
               f"{c['max_new_tokens']} new tokens)" if decoded else " (loss only, no decoding)")
            + ". \"vs random\": the strategy's place in the null of random-subset students: percentile (100 % = "
              "better than every one), one-sided empirical p-values of better / worse ((1 + null draws at least as "
              "good) / (N + 1)), z (positive = better); for a strategy with subsets of its own, that of its mean "
              "and the permutation test of its students against the random ones (and, for those made from random "
              "subset j: clean_random, answer_filter, repaired_random, the sign-flip test of the pairs). Loss: "
              "lower is better; exact match: higher is better. Defect and wrong-answer shares: of the selected rows "
              "(means over a strategy's students), beside the pool's.")


def control_line(doc: dict) -> str | None:
    """What the positive control says, one sentence per loss metric (None without one)."""
    pcs = doc.get("positive_control")
    if not pcs:
        return None
    label = {m: lab for m, lab, _ in METRICS}
    out = []
    for metric, pc in pcs.items():
        what = label[metric].split(" (")[0]
        if "separated" in pc:
            if pc["separated"]:
                out.append(f"Positive control on the {what}: clean_random beat the random students ({pc['diff']:+.4f} "
                           f"better in the mean, one-sided permutation p {pc['p_better']:.3f} < {pc['alpha']}): on "
                           "this measure the experiment can tell a better selection from random ones.")
            else:
                out.append(f"Positive control on the {what}: clean_random did NOT separate from the random students "
                           f"(difference {pc['diff']:+.4f}, one-sided permutation p {pc['p_better']:.3f} >= "
                           f"{pc['alpha']}): on this measure the experiment cannot tell a better selection from "
                           "random ones at this size, so no strategy's place in its null says anything.")
        fixed = pc.get("repaired")
        if fixed:
            said = (f"repaired_random, the same {fixed['n_pairs']} random subsets trained with their defects "
                    f"repaired: {fixed['diff']:+.4f} better in the mean, sign-flip p {fixed['p_better']:.3f}")
            if fixed["separated"]:
                out.append(f"Paired control on the {what} ({said} < {pc['alpha']}): the students see the planted "
                           "defects" + (", but the gain is smaller than the spread between random subsets." if
                                        pc.get("separated") is False else "."))
            else:
                out.append(f"Paired control on the {what} ({said} >= {pc['alpha']}): the students do not measurably "
                           "see the planted defects at this size.")
    return " ".join(out)


def markdown(doc: dict) -> str:
    c = doc["config"]
    header, rows = table_rows(doc)
    lines = [f"# air-ray compare: {c['top_k']} rows per selection, student {doc['model']['name']}", "", caption(doc),
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    control = control_line(doc)
    if control:
        lines += ["", control]
    defects = defect_rows(doc)
    if defects:
        h, rs = defects
        lines += ["", "## Planted defects among the selected rows", "", "| " + " | ".join(h) + " |",
                  "|" + "---|" * len(h)] + ["| " + " | ".join(r) + " |" for r in rs]
    return "\n".join(lines) + "\n"


def plot(doc: dict) -> bytes:
    """Every student's held-out loss (and exact match when decoded), one row per strategy: the nulls' students as
    dots, the deterministic strategies' as markers, the initial model as a dashed line."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if (m[0] in LOSSES and any(e.get(m[0], {}).get("mean") is not None
                                                             for e in doc["summary"].values()))
               or (m[0] == "accuracy" and doc["config"].get("max_new_tokens", 0) > 0)]
    names = list(doc["summary"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(7.5 * len(metrics), 0.42 * len(names) + 1.8), squeeze=False)
    for ax, (metric, label, lower) in zip(axes[0], metrics):
        scale = 100.0 if metric == "accuracy" else 1.0
        for y, n in enumerate(names):
            vals = [scale * v for v in doc["summary"][n][metric]["values"] if v is not None]
            many = STRATEGIES[n].subsets is not None  # one dot per subset's student
            color = "#777777" if n in NULLS else "#2CA02C" if many else \
                "#4C72B0" if n.startswith(("score", "delta")) else "#DD8452"
            ax.scatter(vals, [y] * len(vals), s=22 if many else 60, marker="o" if many else "D", color=color,
                       alpha=0.7 if many else 0.95, zorder=3)
        e = doc["summary"].get("random", {}).get(metric) or {}
        if e.get("min") is not None:
            ax.axvspan(scale * e["min"], scale * e["max"], color="#bbbbbb", alpha=0.3, zorder=1,
                       label="range of the random-subset students")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ini = doc["initial"]["eval"].get(metric)
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
