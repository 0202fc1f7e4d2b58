"""``air-ray report``: a static HTML page (``DIR/index.html`` with PNG images beside it) of one scoring run.

Contents: the head heatmap (``air_ray.store.heads.plot_heads``), the score histogram (per domain when the ``domain``
column has values), score vs response length, the top and bottom ``K`` (20) rows with each reasoning step of
the response shaded by its step score (with a legend), and the selection summary of ``air-ray select``.

Memory and reads
----------------
* Pass 1 streams the partitions' ``id``, ``score``, ``domain`` and ``n_response_tokens`` columns only, in
  record batches. It keeps three numeric arrays for the plots (score float64, length int32, domain code int32:
  16 bytes a row) and the best / worst ``K`` rows as small Arrow tables, reduced after every batch with
  ``pyarrow.compute.select_k_unstable`` (score, then id ascending): no full sort, no Python object per row.
* Pass 2 reads the remaining columns of those ``2K`` rows only (a pushed-down ``id`` filter).
* The scores do not hold the text: each shown row's ``source`` file is read back with ``air_ray.data.lookup.Lookup``
  (the id a row was scored under, explicit or canonical; the first record of an id, as the scorer kept it) until
  every wanted id of that file is found. Only the sources
  of the shown rows are read. A row whose text is not found is shown with its steps and no text, saying why.

Everything taken from the data (responses, prompts, ids, domains, URIs) is HTML-escaped; the page loads
nothing from outside its directory (inline CSS, no scripts).
"""

from __future__ import annotations

import html
import json
import math
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from air_ray.errors import AirRayError
from air_ray.outputs.columns import DomainCodes, float_column, top_k
from air_ray.store.layout import COMPARE_JSON, COMPARE_PNG, CompareLayout, ReportLayout, RunLayout
from air_ray.store.schemas import RANK_ORDER
from air_ray.store.scores import ScoreFiles, find_selection, open_scores, selection_ids

K = 20                      # rows shown at each end
MAX_TEXT_CHARS = 20_000     # a longer response is cut for display (the steps after the cut are listed, not shown)
MAX_PROMPT_CHARS = 4_000
MAX_DOMAINS = 8             # plotted separately; the rest are drawn together as "other"
SCATTER_POINTS = 20_000     # the scatter plot draws a fixed-seed sample of at most this many rows
HIST_BINS = 50
_BATCH_ROWS = 65_536

TOP_KEYS = RANK_ORDER
BOTTOM_KEYS = [("score", "ascending"), ("id", "ascending")]
_PASS1 = ["id", "score", "domain", "n_response_tokens", "loss_base", "loss_ref", "entropy_base", "n_copy_tokens",
          "delta_copy"]
_DETAIL = ["id", "domain", "source", "n_prompt_tokens", "n_response_tokens", "loss_base", "loss_ref", "score",
           "step_spans", "step_token_counts", "step_scores", "step_weights", "truncated"]


# ------------------------------------------------------------------------------------------------------
# reading the scores


@dataclass
class Scan:
    """What pass 1 keeps: per-row numeric arrays for the plots and the extreme rows."""

    scores: np.ndarray            # float64, NaN for null
    lengths: np.ndarray           # int32 n_response_tokens
    domain_codes: np.ndarray      # int32 index into ``domains``
    domains: list                 # domain values (None = no domain) in order of first appearance
    top: pa.Table                 # id, score: the best K rows, best first
    bottom: pa.Table              # id, score: the worst K rows, worst first
    loss_base: np.ndarray = field(default_factory=lambda: np.empty(0))  # float64
    entropy: np.ndarray = field(default_factory=lambda: np.empty(0))    # float64, NaN for null
    selected: np.ndarray | None = None  # bool: in the selection (None: no selection)
    copy: dict = field(default_factory=dict)  # sums for the copy-token divergence (see ``copy_divergence``)
    files: list[str] = field(default_factory=list)
    metadata: dict | None = None  # the air_ray metadata of the first partition

    @property
    def n(self) -> int:
        return len(self.scores)


def scan(scores: ScoreFiles | str, k: int = K, selected_ids: pa.Array | None = None) -> Scan:
    """Pass 1 over every partition of ``scores`` (a URI, or the partitions opened; see the module doc);
    ``selected_ids``: the selection's ids, to mark the selected rows."""
    if isinstance(scores, str):
        scores = open_scores(scores, "report")
    keys = DomainCodes()
    s_parts, l_parts, d_parts, lb_parts, ent_parts, sel_parts = [], [], [], [], [], []
    copy = dict.fromkeys(("rows", "tokens", "copy_tokens", "copy_delta_sum", "delta_sum"), 0.0)
    top = bottom = None
    for batch in scores.batches(_PASS1, batch_size=_BATCH_ROWS, use_threads=True):
        s = float_column(batch)
        s_parts.append(s)
        ln = batch.column("n_response_tokens")
        lengths = np.asarray((pc.fill_null(ln, 0) if ln.null_count else ln).to_numpy(zero_copy_only=False), np.int32)
        l_parts.append(lengths)
        d_parts.append(keys.encode(batch.column("domain")).astype(np.int32))
        lb, lr = float_column(batch, "loss_base"), float_column(batch, "loss_ref")
        lb_parts.append(lb)
        ent_parts.append(float_column(batch, "entropy_base"))
        if selected_ids is not None:
            sel_parts.append(pc.is_in(batch.column("id"), value_set=selected_ids).to_numpy(zero_copy_only=False))
        n_copy, d_copy = float_column(batch, "n_copy_tokens"), np.nan_to_num(float_column(batch, "delta_copy"))
        measured = ~np.isnan(n_copy) & np.isfinite(lb) & np.isfinite(lr)  # rows scored with the copy columns
        copy["rows"] += float(measured.sum())
        copy["tokens"] += float(lengths[measured].sum())
        copy["copy_tokens"] += float(n_copy[measured].sum())
        copy["copy_delta_sum"] += float((n_copy * d_copy)[measured].sum())
        copy["delta_sum"] += float((lengths * (lr - lb))[measured].sum())
        ok = ~np.isnan(s)
        if batch.column("id").null_count:
            ok &= batch.column("id").is_valid().to_numpy(zero_copy_only=False)
        if not ok.any():
            continue
        t = pa.Table.from_batches([batch.select(["id", "score"])])
        if not ok.all():
            t = t.filter(pa.array(ok))
        top = top_k(t if top is None else [top, t], k, TOP_KEYS)
        bottom = top_k(t if bottom is None else [bottom, t], k, BOTTOM_KEYS)
    empty = pa.table({"id": pa.array([], pa.string()), "score": pa.array([], pa.float64())})
    top = empty if top is None else top.take(pc.sort_indices(top, sort_keys=TOP_KEYS))
    bottom = empty if bottom is None else bottom.take(pc.sort_indices(bottom, sort_keys=BOTTOM_KEYS))
    meta = scores.metadata()

    def cat(parts, dtype):
        return np.concatenate(parts) if parts else np.empty(0, dtype)

    return Scan(scores=cat(s_parts, np.float64), lengths=cat(l_parts, np.int32),
                domain_codes=cat(d_parts, np.int32), domains=list(keys.keys), top=top, bottom=bottom,
                loss_base=cat(lb_parts, np.float64), entropy=cat(ent_parts, np.float64),
                selected=None if selected_ids is None else cat(sel_parts, bool), copy=copy,
                files=scores.files, metadata=meta)


def copy_divergence(copy: dict) -> dict:
    """Mean L_ref - L_base (nats per token) over the response tokens that copy the prompt
    (``air_ray.influence.copy_mask``) and over the other response tokens, from ``Scan.copy``'s sums."""
    rest = copy["tokens"] - copy["copy_tokens"]
    return {"rows": int(copy["rows"]), "copy_tokens": int(copy["copy_tokens"]), "other_tokens": int(rest),
            "delta_copy": copy["copy_delta_sum"] / copy["copy_tokens"] if copy["copy_tokens"] else None,
            "delta_other": (copy["delta_sum"] - copy["copy_delta_sum"]) / rest if rest else None}


def _details(scores: ScoreFiles, wanted: list[tuple[str, float]]) -> dict[tuple[str, float], dict]:
    """Pass 2: every column of the wanted (id, score) rows."""
    if not wanted:
        return {}
    ids = sorted({i for i, _ in wanted})
    want = set(wanted)
    out: dict = {}
    table = scores.table(_DETAIL, filter=pc.field("id").isin(ids))
    for row in table.to_pylist():
        key = (row["id"], row["score"])
        if key in want and key not in out:  # the same id and score twice: the first one
            out[key] = row
    return out


# ------------------------------------------------------------------------------------------------------
# the response texts


def find_texts(wanted: dict[str, set[str]], fields=None, render=None
               ) -> tuple[dict[tuple[str, str], dict], dict[str, str]]:
    """``{source: {ids}}`` -> ``({(source, id): {"prompt", "response"}}, {source: why not all were found})``.

    Each source is streamed once and read only until all its wanted ids are found. ``fields``: the field map
    used for scoring; ``render``: conversation -> the scored response text (default: the think tags)."""
    from air_ray.data.lookup import Lookup
    from air_ray.data.rows import FieldMap, render_response

    fields, render = fields or FieldMap(), render or render_response

    found: dict = {}
    problems: dict = {}
    for source, ids in wanted.items():
        lookup = Lookup(set(ids), fields, expand=False)  # the source as the scores name it
        error = None
        for block, matches in lookup.blocks([source]):
            for m in matches:
                if m.first:
                    found[(source, m.conv.id)] = {"prompt": m.conv.prompt, "response": render(m.conv)}
            error = block.error or error
        if not lookup.done:
            problems[source] = (f"the source file cannot be read ({error})" if error
                                else "no row with this id in the source file")
    return found, problems


def _row_reading(corpus, meta: dict | None):
    """(field map, renderer) for showing the scored text (``air_ray.outputs.export.scored_text``)."""
    from air_ray.data.rows import FieldMap
    from air_ray.outputs.export import scored_text

    if corpus is None:
        return FieldMap(), None
    return FieldMap.of(corpus), scored_text(corpus, meta, need_model=False)


# ------------------------------------------------------------------------------------------------------
# plots


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _domain_groups(sc: Scan) -> tuple[list[str], np.ndarray] | None:
    """Up to MAX_DOMAINS largest domains by rows, the rest as "other": (labels, group per row); None when no
    row has a domain."""
    if not any(d is not None for d in sc.domains):
        return None
    counts = np.bincount(sc.domain_codes, minlength=len(sc.domains)) if sc.n else np.zeros(len(sc.domains), int)
    order = sorted(range(len(sc.domains)), key=lambda i: (-counts[i], str(sc.domains[i])))
    shown = order if len(order) <= MAX_DOMAINS + 1 else order[:MAX_DOMAINS]
    lut = np.full(len(sc.domains), len(shown), np.int32)
    labels = []
    for g, i in enumerate(shown):
        lut[i] = g
        labels.append("(no domain)" if sc.domains[i] is None else str(sc.domains[i]))
    if len(shown) < len(sc.domains):
        labels.append("other")
    return labels, lut[sc.domain_codes]


def plot_histogram(sc: Scan, out: Path) -> None:
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    finite = np.isfinite(sc.scores)
    data = sc.scores[finite]
    if len(data):
        lo, hi = float(data.min()), float(data.max())
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, HIST_BINS + 1)
        groups = _domain_groups(sc)
        if groups is None:
            ax.hist(data, bins=edges, alpha=0.7, label=f"all rows ({len(data):,})")
        else:
            labels, g = groups
            g = g[finite]
            for i, label in enumerate(labels):
                part = data[g == i]
                if len(part):
                    ax.hist(part, bins=edges, histtype="step", linewidth=1.6, label=f"{label} ({len(part):,})")
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finite scores", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("score")
    ax.set_ylabel("rows")
    ax.set_title("AIR score distribution" + (" by domain" if _domain_groups(sc) else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(out)


def _sample(idx: np.ndarray) -> tuple[np.ndarray, bool]:
    """At most ``SCATTER_POINTS`` of the row indices ``idx`` (a fixed-seed sample, kept in order), and whether it
    is a sample."""
    if len(idx) <= SCATTER_POINTS:
        return idx, False
    return np.sort(np.random.default_rng(0).choice(idx, SCATTER_POINTS, replace=False)), True


def plot_scatter(sc: Scan, out: Path) -> None:
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    idx, sampled = _sample(np.flatnonzero(np.isfinite(sc.scores)))
    if len(idx):
        x, y = sc.lengths[idx], sc.scores[idx]
        size = 12 if len(idx) < 2000 else 3
        groups = _domain_groups(sc)
        if groups is None:
            ax.scatter(x, y, s=size, alpha=0.6)
        else:
            labels, g = groups
            g = g[idx]
            for i, label in enumerate(labels):
                m = g == i
                if m.any():
                    ax.scatter(x[m], y[m], s=size, alpha=0.6, label=label)
            ax.legend(loc="upper right", fontsize=8)
        if x.min() > 0 and x.max() / x.min() > 100:
            ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no finite scores", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("response tokens")
    ax.set_ylabel("score")
    ax.set_title("score vs response length" + (f" ({SCATTER_POINTS:,} sampled rows)" if sampled else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out)


def plot_score_vs_loss(sc: Scan, out: Path) -> None:
    """Score against the base model's loss, the selected rows marked: what the bias table says, row by row."""
    from air_ray.outputs.stats import spearman

    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    idx, sampled = _sample(np.flatnonzero(np.isfinite(sc.scores) & np.isfinite(sc.loss_base)))
    if len(idx):
        x, y = sc.loss_base[idx], sc.scores[idx]
        size = 12 if len(idx) < 2000 else 3
        chosen = sc.selected[idx] if sc.selected is not None else np.zeros(len(idx), bool)
        ax.scatter(x[~chosen], y[~chosen], s=size, alpha=0.5, color="#999999",
                   label="not selected" if sc.selected is not None else "rows")
        if chosen.any():
            ax.scatter(x[chosen], y[chosen], s=size + 6, alpha=0.8, color="crimson", label="selected")
        ax.legend(loc="upper right", fontsize=8)
        rho = spearman(sc.scores, sc.loss_base)
        if np.nanmin(y) > 0 and np.nanmax(y) / np.nanmin(y) > 100:
            ax.set_yscale("log")
        title = "score vs loss_base" + (f": Spearman {rho:+.2f}" if rho is not None else "")
    else:
        ax.text(0.5, 0.5, "no finite scores", ha="center", va="center", transform=ax.transAxes)
        title = "score vs loss_base"
    ax.set_xlabel("loss_base (nats per response token, base model)")
    ax.set_ylabel("score")
    ax.set_title(title + (f" ({SCATTER_POINTS:,} sampled rows)" if sampled else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(out)


# ------------------------------------------------------------------------------------------------------
# what the score selects: bias, placebo, copy tokens, step weights (issue #25)


BIAS_ROWS = ("loss_base", "entropy_base", "n_response_tokens")


def run_bias(sc: Scan) -> dict:
    """The bias audit of the ``score`` column over every row of the run (the shape of ``selection.json``'s
    ``bias``), for a report without a selection."""
    from air_ray.outputs.stats import spearman

    cols = {"loss_base": sc.loss_base, "entropy_base": sc.entropy, "n_response_tokens": sc.lengths.astype(np.float64)}
    ok = np.isfinite(sc.scores)

    def mean(v):
        v = v[ok & np.isfinite(v)]
        return float(v.mean()) if len(v) else None

    return {"value": "score", "rows_candidates": int(ok.sum()), "sample": "every row with a score",
            "spearman": {c: spearman(sc.scores, v) for c, v in cols.items()},
            "pool_mean": {"score": mean(sc.scores), **{c: mean(v) for c, v in cols.items()}}}


def _bias_html(bias: dict, from_selection: bool) -> str:
    value = bias["value"]
    pool, chosen = bias.get("pool_mean") or {}, bias.get("selected_mean") or {}
    head = ["", f"Spearman with {value}", "pool mean"] + (["selected mean"] if from_selection else [])
    rows = [[value, "–", pool.get(value)] + ([chosen.get(value)] if from_selection else [])]
    rows += [[c, bias["spearman"].get(c), pool.get(c)] + ([chosen.get(c)] if from_selection else [])
             for c in BIAS_ROWS]
    where = (f"the selection's ranked value <code>{_e(value)}</code> (from selection.json)" if from_selection
             else "the <code>score</code> column (no selection found)")
    out = [f'<p>How {where} relates to the base model\'s loss and entropy and to the response length, over '
           f'{_e(_fmt(bias.get("rows_candidates")))} rows ({_e(bias.get("sample"))}). A strongly negative rho with '
           "<code>loss_base</code> means the ranking mostly prefers rows the model already predicts well; "
           "<code>select --balance loss_base</code> keeps the pool's difficulty, <code>select --by delta</code> "
           "ranks by the absolute divergence.</p>", _table(head, rows)]
    if bias.get("warning"):
        out.append(f'<p class="warnbox">{_e(bias["warning"])}</p>')
    if bias.get("domains"):
        dh = ["domain", "rows"] + [f"rho {c}" for c in BIAS_ROWS] + ["pool loss_base", "selected loss_base"]
        out.append(_table(dh, [[d["domain"] or "(no domain)", d.get("rows_sampled")]
                               + [d["spearman"].get(c) for c in BIAS_ROWS]
                               + [d["pool_mean"].get("loss_base"), d["selected_mean"].get("loss_base")]
                               for d in bias["domains"]]))
    out.append(f'<div class="plots"><img src="{ReportLayout.LOSS}" alt="score vs loss_base, selected rows marked">'
               "</div>")
    return "".join(out)


def placebo_agreement(real: ScoreFiles, placebo: ScoreFiles, ks: list[int]) -> dict:
    """The real and the placebo run joined by id: Spearman of their scores (and of their deltas), the top-k
    overlap of their rankings (and what chance would give: k^2 / n), and the mean divergence of each."""
    from air_ray.outputs.stats import spearman, top_overlap

    cols = ["id", "score", "loss_base", "loss_ref"]
    a = real.table(cols)
    b = placebo.table(cols)
    a = a.filter(pc.is_finite(a.column("score")))
    b = b.filter(pc.is_finite(b.column("score")))
    joined = a.join(b, keys="id", right_suffix="_placebo", join_type="inner").combine_chunks()
    n = joined.num_rows
    if n == 0:
        raise AirRayError("report --placebo-scores: no row id is in both runs")
    joined = joined.sort_by("id")  # ties broken by id in both rankings
    sr, sp = float_column(joined, "score"), float_column(joined, "score_placebo")
    dr = float_column(joined, "loss_ref") - float_column(joined, "loss_base")
    dp = float_column(joined, "loss_ref_placebo") - float_column(joined, "loss_base_placebo")
    lb = float_column(joined, "loss_base")
    overlap = [{"k": k, "shared": top_overlap(sr, sp, k), "chance": k * k / n} for k in sorted(set(ks)) if 0 < k <= n]
    return {"rows": n, "rows_real": real.rows, "rows_placebo": placebo.rows,
            "spearman_score": spearman(sr, sp), "spearman_delta": spearman(dr, dp),
            "spearman_placebo_score_loss_base": spearman(sp, lb), "spearman_score_loss_base": spearman(sr, lb),
            "mean_delta": float(np.nanmean(dr)), "mean_delta_placebo": float(np.nanmean(dp)),
            "top_overlap": overlap, "scores": (sr, sp)}


def _placebo_html(agree: dict | None, uri: str | None, heads_info: str) -> str:
    if agree is None:
        return ('<p class="note">No placebo run given. <code>air-ray heads --placebo --from heads.json --output '
                'placebo.json</code>, score the same corpus with <code>--heads placebo.json</code>, then '
                '<code>air-ray report --placebo-scores RUN</code> shows how much of this ranking any disabled heads '
                'would give.</p>')
    rows = [["rows in both runs", agree["rows"]],
            ["Spearman(score, placebo score)", agree["spearman_score"]],
            ["Spearman(delta, placebo delta)", agree["spearman_delta"]],
            ["Spearman(score, loss_base)", agree["spearman_score_loss_base"]],
            ["Spearman(placebo score, loss_base)", agree["spearman_placebo_score_loss_base"]],
            ["mean delta, critical heads (nats/token)", agree["mean_delta"]],
            ["mean delta, placebo heads (nats/token)", agree["mean_delta_placebo"]]]
    overlap = _table(["top k", "shared with the placebo's top k", "by chance (k²/n)"],
                     [[o["k"], o["shared"], o["chance"]] for o in agree["top_overlap"]])
    return (f'<p>The same rows scored with placebo heads (<code>{_e(uri)}</code>{heads_info}): as many heads, drawn at '
            "random among the non-critical ones. The closer the two rankings, the less of this one is specific to the "
            "critical heads.</p>" + _table(["", "value"], rows) + overlap +
            f'<div class="plots"><img src="{ReportLayout.PLACEBO}" alt="score against the placebo score"></div>')


def plot_placebo(agree: dict, out: Path) -> None:
    fig = _figure(6, 4.5)
    ax = fig.add_subplot()
    sr, sp = agree["scores"]
    i, _ = _sample(np.arange(len(sr)))
    sr, sp = sr[i], sp[i]
    ax.scatter(sp, sr, s=8, alpha=0.5)
    ax.set_xlabel("placebo score (random non-critical heads disabled)")
    ax.set_ylabel("score (critical heads disabled)")
    rho = agree["spearman_score"]
    ax.set_title("score vs placebo score" + (f": Spearman {rho:+.2f}" if rho is not None else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(out)


def _copy_html(sc: Scan) -> str:
    c = copy_divergence(sc.copy)
    if not c["rows"]:
        return ('<p class="note">These scores have no copy-token columns (scored before they existed): rescore to '
                "see whether disabling the heads hits copying harder than the rest.</p>")
    rows = [["copying the prompt", c["copy_tokens"], c["delta_copy"]], ["the other tokens", c["other_tokens"],
                                                                      c["delta_other"]]]
    return ("<p>The heads were chosen for retrieval: copying a token from the prompt. A response token copies when "
            "it and the token before it occur together in the prompt. If disabling the heads weakens the model where "
            "the method says, the mean divergence L_ref − L_base is larger on those tokens "
            f"({_e(_fmt(c['rows']))} of {_e(_fmt(sc.n))} rows measured).</p>"
            + _table(["response tokens", "tokens", "mean L_ref − L_base (nats)"], rows))


def _weights_html(manifest) -> str:
    """``manifest``: the run's ``Manifest`` (None without one)."""
    w = manifest.step_weights if manifest is not None else None
    if not w:
        return '<p class="note">No step-weight statistics (no <code>_manifest.json</code> with them).</p>'
    share = w.get("effective_token_share") or {}
    rows = [[w.get("rule"), w.get("rows"), share.get("p10"), share.get("median"), share.get("min"),
             w.get("max_weight")]]
    return ("<p>Step weights scale each response token's loss in step-weighted training. The effective token share "
            "of a row is (Σnw)²/(Σnw²)/Σn over its steps: 1.0 when every token counts the same, 1/k when one of k "
            "equal steps takes all the weight.</p>"
            + _table(["rule", "rows", "share p10", "share median", "share min", "largest weight"], rows))


# ------------------------------------------------------------------------------------------------------
# selection


# ------------------------------------------------------------------------------------------------------
# html


def _e(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        return f"{x:.{digits}g}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


class StepColors:
    """Step score -> a light background colour (diverging, symmetric around 0) and the legend for it."""

    def __init__(self, values):
        import matplotlib

        finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
        self.vmax = float(np.percentile(finite, 98)) if finite else 1.0
        if not self.vmax > 0:
            self.vmax = max(finite, default=0.0) or 1.0
        self.cmap = matplotlib.colormaps["RdBu_r"]

    def color(self, v) -> str:
        if v is None or not math.isfinite(v):
            return "#e0e0e0" if v is None else ("#b2182b" if v > 0 else "#2166ac")
        r, g, b, _ = self.cmap(0.5 + 0.5 * max(-1.0, min(1.0, v / self.vmax)))
        white = 0.55  # mixed towards white, so that the text stays readable on every shade
        return "#%02x%02x%02x" % tuple(int(round(255 * ((1 - white) * c + white))) for c in (r, g, b))

    def legend(self) -> str:
        stops = ", ".join(f"{self.color(self.vmax * t)} {50 + 50 * t:.0f}%" for t in np.linspace(-1, 1, 9))
        return (
            '<div class="legend"><span class="lg-title">step score</span>'
            f'<span class="lg-num">≤ {_e(_fmt(-self.vmax, 3))}</span>'
            f'<span class="lg-bar" style="background: linear-gradient(to right, {stops})"></span>'
            f'<span class="lg-num">≥ {_e(_fmt(self.vmax, 3))}</span>'
            '<span class="lg-sw" style="background:#e0e0e0"></span><span>step with no scored token</span>'
            '<span class="lg-sw" style="background:#fff;border:1px solid #bbb"></span><span>outside any step</span>'
            '<span class="lg-note">(0 = white; the scale ends at the 98th percentile of |step score| of the '
            'rows shown)</span></div>'
        )


def _step_title(i: int, row: dict) -> str:
    def at(key):
        xs = row.get(key) or []
        return xs[i] if i < len(xs) else None

    return (f"step {i + 1}: score {_fmt(at('step_scores'))}, weight {_fmt(at('step_weights'))}, "
            f"tokens {_fmt(at('step_token_counts'))}")


def _render_response(response: str, row: dict, colors: StepColors) -> str:
    spans = row.get("step_spans") or []
    scores = row.get("step_scores") or []
    shown = response[:MAX_TEXT_CHARS]
    parts, pos = [], 0
    for i, span in enumerate(spans):
        a, b = int(span[0]), int(span[1])
        if a >= len(shown):
            break
        b = min(b, len(shown))
        if a > pos:
            parts.append(_e(shown[pos:a]))
        v = scores[i] if i < len(scores) else None
        parts.append(f'<span class="st" style="background:{colors.color(v)}" title="{_e(_step_title(i, row))}">'
                     f'{_e(shown[max(a, pos):b])}<sup class="sv">{_e(_fmt(v, 3))}</sup></span>')
        pos = max(pos, b)
    if pos < len(shown):
        parts.append(_e(shown[pos:]))
    out = f'<div class="resp">{"".join(parts)}</div>'
    if len(response) > len(shown):
        out += (f'<p class="note">… {len(response) - len(shown):,} more characters not shown '
                f'(display limit {MAX_TEXT_CHARS:,}).</p>')
    return out


def _render_steps_only(row: dict, colors: StepColors) -> str:
    spans = row.get("step_spans") or []
    scores = row.get("step_scores") or []
    cells = []
    for i, span in enumerate(spans):
        v = scores[i] if i < len(scores) else None
        cells.append(f'<span class="st chip" style="background:{colors.color(v)}" title="{_e(_step_title(i, row))}">'
                     f'step {i + 1} [{int(span[0])}, {int(span[1])}) <b>{_e(_fmt(v, 3))}</b></span>')
    return f'<div class="chips">{"".join(cells) or "<i>no steps</i>"}</div>'


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"[{m.get('role')}] {m.get('content')}" for m in prompt)


def _render_row(rank: int, row: dict, text: dict | None, why: str | None, colors: StepColors,
                selected: set[str] | None) -> str:
    badges = []
    if row.get("truncated"):
        badges.append('<span class="badge warn">truncated</span>')
    if selected is not None:
        badges.append('<span class="badge ok">selected</span>' if row["id"] in selected
                      else '<span class="badge">not selected</span>')
    facts = (f'score <b>{_e(_fmt(row.get("score")))}</b> · loss_base {_e(_fmt(row.get("loss_base")))} · '
             f'loss_ref {_e(_fmt(row.get("loss_ref")))} · {_e(_fmt(row.get("n_response_tokens")))} response tokens · '
             f'{len(row.get("step_spans") or [])} steps · domain {_e(row.get("domain") or "–")}')
    head = (f'<div class="rowhead"><span class="rank">#{rank}</span> <code class="rid">{_e(row["id"])}</code> '
            f'{"".join(badges)}<div class="facts">{facts}</div>'
            f'<div class="src">source: <code>{_e(row.get("source"))}</code></div></div>')
    if text is not None:
        body = _render_response(text["response"], row, colors)
        prompt = _prompt_text(text["prompt"])
        cut = prompt[:MAX_PROMPT_CHARS] + (" …" if len(prompt) > MAX_PROMPT_CHARS else "")
        body = f'<details><summary>prompt</summary><div class="prompt">{_e(cut)}</div></details>' + body
    else:
        body = (f'<p class="note missing">Response text not found: {_e(why or "unknown reason")}. '
                f'The steps are shown without their text.</p>' + _render_steps_only(row, colors))
    return f'<div class="row">{head}{body}</div>'


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 16px 24px 48px; color: #222; background: #fff; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 4px; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
.meta { color: #555; font-size: 0.9em; } code { font-size: 0.92em; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; } th { background: #f4f4f4; }
td.l, th.l { text-align: left; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; } .plots img { max-width: 49%; }
.row { border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; margin: 10px 0; }
.rowhead { margin-bottom: 6px; } .rank { font-weight: bold; } .rid { background: #f4f4f4; padding: 1px 4px; }
.facts, .src { font-size: 0.85em; color: #444; } .src code { word-break: break-all; }
.resp, .prompt { white-space: pre-wrap; word-wrap: break-word; font-family: ui-monospace, Menlo, Consolas, monospace;
                 font-size: 0.85em; background: #fcfcfc; padding: 6px; border-radius: 4px; }
.prompt { color: #555; }
.st { border-radius: 2px; } .sv { font-size: 0.7em; color: #333; margin-left: 2px; font-family: system-ui, sans-serif; }
.chips { display: flex; flex-wrap: wrap; gap: 4px; } .chip { padding: 2px 6px; font-size: 0.8em; }
.badge { font-size: 0.75em; border-radius: 8px; padding: 1px 7px; background: #eee; margin-left: 4px; }
.badge.ok { background: #d4edda; } .badge.warn { background: #fff3cd; }
.note { font-size: 0.85em; color: #555; } .missing { color: #8a4b00; }
.warnbox { background: #fff3cd; border: 1px solid #e6d28f; padding: 6px 10px; border-radius: 4px; }
.legend { display: flex; align-items: center; flex-wrap: wrap; gap: 8px; font-size: 0.85em; margin: 8px 0 12px;
          position: sticky; top: 0; background: #fff; padding: 6px 0; border-bottom: 1px solid #eee; }
.lg-bar { display: inline-block; width: 260px; height: 14px; border: 1px solid #bbb; }
.lg-sw { display: inline-block; width: 18px; height: 14px; margin-left: 12px; } .lg-title { font-weight: bold; }
.lg-note { color: #777; }
"""


def _table(header: list[str], rows: list[list], left: int = 1) -> str:
    th = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{_e(_fmt(c))}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _selection_html(sel: dict | None, sel_dir: str | None) -> str:
    if sel is None:
        return ('<p class="note">No selection found (pass <code>--selection DIR</code>, or run '
                '<code>air-ray select</code> into <code>&lt;scores&gt;/selection</code>).</p>')
    c = sel.get("counts", {})
    cfg = sel.get("config", {})
    what = (f"top_k = {cfg.get('top_k')}" if cfg.get("top_k") is not None else f"top_frac = {cfg.get('top_frac')}")
    if cfg.get("per_domain"):
        what += ", per domain"
    if cfg.get("min_score") is not None:
        what += f", min_score = {cfg.get('min_score')}"
    out = [f'<p>From <code>{_e(sel_dir)}</code>: {_e(what)}; lowest selected score '
           f'<b>{_e(_fmt(sel.get("threshold_score")))}</b>.</p>']
    keys = ["rows_total", "rows_nan", "rows_below_min_score", "rows_candidates", "rows_selected"]
    out.append(_table(keys, [[c.get(k) for k in keys]], left=0))
    doms = sel.get("domains") or []
    if doms:
        dk = ["rows_total", "rows_nan", "rows_below_min_score", "rows_candidates", "rows_selected", "threshold_score"]
        out.append(_table(["domain"] + dk, [[d.get("domain") or "(no domain)"] + [d.get(k) for k in dk]
                                            for d in doms]))
    q = sel.get("quantiles") or {}
    if q:
        out.append(_table(["candidate score quantiles"] + list(q), [[""] + list(q.values())]))
    return "".join(out)


def _compare_html(scores: str, compare: str | None, out: Path) -> str:
    """The section of an ``air-ray compare`` result (``compare.json``'s table, and its plot copied beside the page);
    empty when there is none beside the run and none was given."""
    from air_ray.fsio import open_uri

    given = compare or CompareLayout.default(scores)
    base = posixpath.dirname(CompareLayout.uri_of(given, COMPARE_JSON))
    try:
        with open_uri(CompareLayout.uri_of(given, COMPARE_JSON), "rt") as f:
            doc = json.load(f)
        with open_uri(CompareLayout.uri_of(given, COMPARE_PNG), "rb") as f:
            ReportLayout(out).image(ReportLayout.COMPARE).write_bytes(f.read())
    except FileNotFoundError:
        if compare:
            raise AirRayError(f"report: no {COMPARE_JSON} and {COMPARE_PNG} at {compare} (run `air-ray compare`)") \
                from None
        return ""
    except (OSError, ValueError) as e:
        raise AirRayError(f"report: compare result {base} cannot be read: {e}") from None
    table = doc["table"]
    control = f'\n<p><b>{_e(table["control"])}</b></p>' if table.get("control") else ""
    defects = table.get("defects")
    planted = ("\n<h3>Planted defects among the selected rows</h3>\n" + _table(defects["header"], defects["rows"])
               if defects else "")
    return (f'<h2 id="compare">Selection strategies compared</h2>\n<p>{_e(table["caption"])} '
            f'(<code>{_e(base)}</code>)</p>\n' + _table(table["header"], table["rows"]) + control + planted +
            f'\n<div class="plots"><img src="{ReportLayout.COMPARE}" alt="students per selection strategy"></div>')


def _summary_html(sc: Scan) -> str:
    finite = np.isfinite(sc.scores)
    rows = []
    labels = ["all"] + (["(no domain)" if d is None else d for d in sc.domains]
                        if any(d is not None for d in sc.domains) else [])
    for i, label in enumerate(labels):
        m = np.ones(sc.n, bool) if i == 0 else sc.domain_codes == i - 1
        s = sc.scores[m & finite]
        rows.append([label, int(m.sum()), int((m & np.isnan(sc.scores)).sum()),
                     float(s.mean()) if len(s) else None, float(np.median(s)) if len(s) else None,
                     float(s.min()) if len(s) else None, float(s.max()) if len(s) else None,
                     float(sc.lengths[m].mean()) if m.any() else None])
        if i > 50:
            break
    return _table(["domain", "rows", "NaN scores", "mean", "median", "min", "max", "mean response tokens"], rows)


def _heads_html(doc: dict | None, heads_uri: str | None, heatmap: bool, meta: dict | None) -> str:
    out = []
    if doc is None:
        out.append('<p class="note">No heads.json given (<code>--heads</code>).</p>')
    else:
        if heatmap:
            out.append(f'<img src="{ReportLayout.HEADS}" alt="retrieval score of every head">')
        else:
            out.append('<p class="note">heads.json has no per-head "scores": no heatmap.</p>')
        out.append(f'<p>{len(doc["heads"])} critical heads from <code>{_e(heads_uri)}</code> (model '
                   f'<code>{_e(doc.get("model"))}</code>): '
                   + ", ".join(f"L{int(l)}.H{int(h)}" for l, h in doc["heads"]) + "</p>")
    if meta and meta.get("heads") is not None:
        used = sorted(tuple(int(x) for x in h) for h in meta["heads"])
        if doc is not None and used != sorted(tuple(h) for h in doc["heads"]):
            out.append('<p class="warnbox">The scores were computed with other heads than this heads.json: '
                       + _e(", ".join(f"L{l}.H{h}" for l, h in used)) + "</p>")
    return "".join(out)


def _run_html(scores: str, sc: Scan) -> str:
    meta = sc.metadata or {}
    bits = [f"scores <code>{_e(scores)}</code> ({len(sc.files)} partition{'s' * (len(sc.files) != 1)}, "
            f"{sc.n:,} rows)"]
    for k in ("model", "model_fingerprint", "format", "steps", "dtype", "step_weighting", "version"):
        if meta.get(k) is not None:
            bits.append(f"{_e(k)} <code>{_e(meta[k])}</code>")
    return '<p class="meta">' + " · ".join(bits) + "</p>"


# ------------------------------------------------------------------------------------------------------
# the report


def write_report(scores: str, heads: str | None, output: str | os.PathLike, selection: str | None = None,
                 k: int = K, corpus=None, compare: str | None = None, placebo_scores: str | None = None) -> str:
    """Write ``output/index.html`` (and its images) for the scores at ``scores``; returns the page's path.
    ``corpus``: options with the field map and think tags used for scoring (``ReportConfig``); ``compare``: the
    output of ``air-ray compare`` (default: ``<scores>/compare`` when there); ``placebo_scores``: the same corpus
    scored with placebo heads (``air-ray heads --placebo``)."""
    from air_ray.fsio import local_fs, write_bytes_atomic
    from air_ray.store.heads import load_heads, plot_heads

    out = Path(output)
    if out.exists() and not out.is_dir():
        raise AirRayError(f"report: output {output} is not a directory")
    heads_doc = load_heads(str(heads)) if heads else None
    files = open_scores(scores, "report")
    placebo = open_scores(placebo_scores, "report --placebo-scores") if placebo_scores else None
    sel, sel_dir = find_selection(scores, selection)
    sel_ids = selection_ids(sel_dir) if sel_dir else None  # None: no selection, or it cannot be read
    sc = scan(files, k, sel_ids)
    out.mkdir(parents=True, exist_ok=True)
    compared = _compare_html(scores, compare, out)
    bias = (sel or {}).get("bias")
    bias_html = _bias_html(bias, True) if bias else _bias_html(run_bias(sc), False)
    layout = ReportLayout(out)
    plot_score_vs_loss(sc, layout.image(layout.LOSS))
    agree, heads_info = None, ""
    if placebo is not None:
        n_ok = int(np.isfinite(sc.scores).sum())
        ks = [(sel or {}).get("counts", {}).get("rows_selected") or 0] + [math.ceil(f * n_ok) for f in (0.05, 0.1, 0.2)]
        agree = placebo_agreement(files, placebo, ks)
        plot_placebo(agree, layout.image(layout.PLACEBO))
        pmeta = placebo.metadata() or {}
        if pmeta.get("heads") is not None:
            heads_info = "; heads " + ", ".join(f"L{int(l)}.H{int(h)}" for l, h in pmeta["heads"])
    try:
        manifest = RunLayout(scores).manifest()
    except Exception:  # a folder of partitions without a run around it
        manifest = None

    # plots
    heatmap = False
    if heads_doc is not None and heads_doc.get("scores"):
        doc = dict(heads_doc)
        doc.setdefault("model", "?")
        doc.setdefault("top_frac", len(doc["heads"]) / max(1, np.asarray(doc["scores"]).size))
        plot_heads(doc, layout.image(layout.HEADS))
        heatmap = True
    plot_histogram(sc, layout.image(layout.HISTOGRAM))
    plot_scatter(sc, layout.image(layout.LENGTH))

    # the extreme rows, their details and texts
    ends = {"top": list(zip(sc.top.column("id").to_pylist(), sc.top.column("score").to_pylist())),
            "bottom": list(zip(sc.bottom.column("id").to_pylist(), sc.bottom.column("score").to_pylist()))}
    details = _details(files, ends["top"] + ends["bottom"])
    by_source: dict[str, set[str]] = {}
    for row in details.values():
        by_source.setdefault(row["source"], set()).add(row["id"])
    texts, problems = find_texts(by_source, *_row_reading(corpus, sc.metadata))
    shown = pa.array(sorted({r["id"] for r in details.values()}), pa.string())
    selected = None if sel_ids is None else set(sel_ids.filter(pc.is_in(sel_ids, value_set=shown)).to_pylist())
    colors = StepColors([v for r in details.values() for v in (r.get("step_scores") or [])])

    def rows_html(which: str) -> str:
        items = []
        for rank, key in enumerate(ends[which], 1):
            row = details.get(key)
            if row is None:  # vanished between the passes
                items.append(f'<p class="note">#{rank} <code>{_e(key[0])}</code>: no longer in the scores.</p>')
                continue
            text = texts.get((row["source"], row["id"]))
            why = None
            if text is None:
                why = problems.get(row["source"], "not found")
            else:
                spans = row.get("step_spans") or []
                end = max((int(s[1]) for s in spans), default=0)
                if end > len(text["response"]):
                    why, text = "the text in the source is shorter than the scored steps (the file changed?)", None
            items.append(_render_row(rank, row, text, why, colors, selected))
        return "".join(items)

    n_ok = int(np.isfinite(sc.scores).sum())
    overlap = ""
    if n_ok < 2 * k:
        overlap = (f'<p class="note">Only {sc.n - int(np.isnan(sc.scores).sum()):,} rows have a score: the top '
                   f"and bottom lists overlap.</p>")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>AIR report</title>
<style>{CSS}</style></head>
<body>
<h1>AIR data selection report</h1>
{_run_html(scores, sc)}
<h2 id="selection">Selection</h2>
{_selection_html(sel, sel_dir)}
<h2 id="bias">What the ranking favours</h2>
{bias_html}
<h2 id="placebo">Placebo heads</h2>
{_placebo_html(agree, placebo_scores, heads_info)}
<h2 id="copy">Where disabling the heads hurts</h2>
{_copy_html(sc)}
<h2 id="weights">Step weights</h2>
{_weights_html(manifest)}
{compared}
<h2 id="heads">Reasoning-critical heads</h2>
{_heads_html(heads_doc, heads, heatmap, sc.metadata)}
<h2 id="scores">Scores</h2>
{_summary_html(sc)}
<div class="plots"><img src="{layout.HISTOGRAM}" alt="score histogram">
<img src="{layout.LENGTH}" alt="score vs response length"></div>
<h2 id="top">Top {k} rows (highest score)</h2>
{overlap}{colors.legend()}
{rows_html("top")}
<h2 id="bottom">Bottom {k} rows (lowest score)</h2>
{colors.legend()}
{rows_html("bottom")}
<p class="note">Generated by <code>air-ray report</code>. Step shading: each step of the response (its character
span) is coloured by its step score; hover a step for its score, weight and token count.</p>
</body></html>
"""
    index = layout.page
    write_bytes_atomic(local_fs(), str(index.resolve()), page.encode("utf-8"))
    return str(index)
