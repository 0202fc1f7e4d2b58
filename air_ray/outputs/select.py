"""The global selection reducer: every scores partition -> one ranked selection, in bounded memory.

``select(SelectConfig(scores=..., output=..., top_k=... | top_frac=..., per_domain=..., min_score=...))``
reads ``<scores>/scores/*.parquet`` (or ``<scores>/*.parquet`` when there is no ``scores/`` folder; names
starting with ``.`` or ``_`` are in-progress files or markers and are skipped) and writes, under ``output``:

* ``selection.parquet`` -- schema ``SELECTION`` (``id``, ``score``, ``rank``, ``domain``), sorted by rank, the
  summary below as the ``air_ray`` schema metadata;
* ``score_hist.png`` -- histogram of the candidate scores with the selection threshold marked;
* ``selection.json`` -- the summary (also returned by ``select``), written last.

Semantics
---------
* Rows whose ``score`` is NaN (or null) are never candidates; they are counted in ``rows_nan``.
  With ``min_score X``, rows with ``score < X`` are dropped next (``rows_below_min_score``).
  What remains are the *candidates* (``n`` rows).
* Order: ``score`` descending, ties by ``id`` ascending (byte order of the UTF-8 ids, which is Python's
  ``str`` order). Rank 1 is the best row.
* ``top_k=k`` selects ``min(k, n)`` rows; ``top_frac=F`` selects ``ceil(F * n)`` rows, where ``F`` is taken as
  the decimal it is written as (``Fraction(str(F))``) so that e.g. ``0.07 * 100`` is exactly 7, not the
  binary float product ``7.000000000000001`` whose ceiling would be 8.
* ``per_domain`` applies ``k`` (or ``F`` to the domain's own candidate count) within each domain; a null domain
  is a group of its own. Ranks stay *global*: the union of the per-domain selections is ranked 1..N by the
  same order (score desc, id asc), so ``rank`` is always the position in the whole selected set and never
  restarts per domain.
* ``threshold_score`` is the lowest selected score (null when nothing is selected); each domain entry has its
  own lowest selected score.

Algorithm and memory
--------------------
Two streaming passes over record batches, reading only the needed columns (never a Python object per row):

1. ``score`` and ``domain``: counts per domain (total / NaN / below min_score / candidates) and the candidate
   scores as float64 numpy: written straight into one array preallocated from the row count of the Parquet
   footers (8 bytes per row, e.g. 80 MB for 10 M rows); with ``per_domain`` kept as chunks per domain and
   then copied domain by domain into one array (up to 16 bytes per candidate for a moment). These give ``n`` per
   group, hence ``k`` per group, and the exact ``k``-th largest score per group (``numpy.partition``, in place),
   the exact quantiles (numpy's default linear interpolation) and the histogram (100 fixed bins between the
   smallest and largest finite candidate score).
2. ``id``, ``score`` and ``domain``: a row can only be selected if its score is >= its group's ``k``-th largest
   score, so each batch is first cut down to those rows with a vectorised comparison. The survivors are
   exactly the selected rows plus ties at the threshold score; when ties make a group's buffer exceed
   ``max(2k, 65536)`` rows it is reduced back to the exact top ``k`` with ``pyarrow.compute.select_k_unstable``
   on (score desc, id asc). Memory is therefore O(k) Arrow rows (ids included) + 8 bytes per candidate score
   + a few record batches, whatever the number of rows or the ties.

The last step sorts the kept rows (at most ``sum k``) by (score desc, id asc) and numbers them.
Both passes must read exactly the rows the footers announce; otherwise the scores changed under us (AirRayError).
Measured (``bench/select_memory.py``, 2 cores): 10 M rows in 100 partitions, ``top_frac=0.1`` -> 8-13 s and
0.42-0.51 GB peak RSS, against 143-155 s and 16 GB for ``pandas.read_parquet`` + ``sort_values``.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from air_ray.config.commands import SELECT_BY, SelectConfig
from air_ray.errors import AirRayError
from air_ray.fsio import url_to_fs, with_protocol, write_bytes_atomic
from air_ray.outputs.columns import DomainCodes, float_column, top_k
from air_ray.outputs.layout import SCORES, SELECTION, SELECTION_FILES, ScoreFiles, open_scores, \
    with_metadata, write_table_atomic

QUANTILES = (("p0", 0.0), ("p10", 0.10), ("p25", 0.25), ("p50", 0.50), ("p75", 0.75), ("p90", 0.90),
             ("p99", 0.99), ("p100", 1.0))
HIST_BINS = 100
SORT_KEYS = [("score", "descending"), ("id", "ascending")]
BY = SELECT_BY

# Streaming knobs (module level so tests can shrink them to exercise many batches and compactions).
_BATCH_ROWS = 65_536
_COMPACT_MIN = 65_536
_FRAGMENT_READAHEAD = 2
_BATCH_READAHEAD = 4

# The columns read, with the types of the SCORES schema (the scanner casts compatible physical types).
_READ_SCHEMA = pa.schema([SCORES.field("id"), SCORES.field("domain"), SCORES.field("score")])


def select(cfg: SelectConfig) -> dict:
    """Rank every scores partition globally, write the selection and return its summary (see module doc):
    pass 1 (counts and candidate scores) -> thresholds per group -> pass 2 (rows at or above them) -> rank ->
    summary -> files."""
    cfg = cfg.validate()
    by = (cfg.by, int(cfg.seed))
    columns = _READ_SCHEMA.names + ([] if cfg.by in ("score", "random") else [cfg.by])
    scores = open_scores(cfg.scores, "select", columns=columns, require=columns)
    counted = _count(scores, cfg, by)
    groups = _thresholds(counted, cfg)
    kept = _keep(scores, cfg, by, counted.domains, groups) if groups.active.any() else {}
    selection = _rank(kept, groups.k)
    summary = _summary(cfg, scores, counted, groups, selection)
    _write(cfg.output, selection, summary)
    return summary


# ------------------------------------------------------------------------------------------------------
# pass 1: counts per domain and the candidate scores of each selection group


@dataclass
class _Counted:
    domains: DomainCodes
    totals: "_Counter"
    nans: "_Counter"
    belows: "_Counter"
    group_n: np.ndarray  # [groups] candidates per selection group (one group unless per_domain)
    scores: np.ndarray  # every candidate score, one contiguous slice per group (in group order)


def _count(scores: ScoreFiles, cfg: SelectConfig, by) -> _Counted:
    """Global: the candidate scores go straight into one preallocated float64 array (rows from the footers).
    Per domain: numpy chunks per domain, then copied group by group into one array (chunks freed as copied)."""
    footer_rows = scores.rows
    min_score = cfg.min_score
    domains = DomainCodes()  # domain value (None for null) -> dense id
    totals, nans, belows = _Counter(), _Counter(), _Counter()
    flat = None if cfg.per_domain else np.empty(footer_rows, np.float64)
    n_flat = 0
    chunks: dict[int, list[np.ndarray]] = {}  # domain id -> candidate scores (per_domain only)
    for batch in _batches(scores, ["score", "domain"], by):
        s = float_column(batch)
        gid = domains.encode(batch.column("domain"))
        valid = ~np.isnan(s)
        cand = valid if min_score is None else valid & (s >= min_score)
        totals.add(gid)
        nans.add(gid[~valid])
        if min_score is not None:
            belows.add(gid[valid & ~cand])
        if cfg.per_domain:
            if cand.any():
                for g, part in _split(gid[cand], s[cand]):
                    chunks.setdefault(g, []).append(part)
        else:
            m = int(np.count_nonzero(cand))
            if n_flat + m > footer_rows:
                raise _changed(cfg.scores, footer_rows, totals.total())
            flat[n_flat:n_flat + m] = s[cand] if m < len(s) else s
            n_flat += m
    if totals.total() != footer_rows:
        raise _changed(cfg.scores, footer_rows, totals.total())
    if cfg.by == "entropy_base" and footer_rows and nans.total() == footer_rows:
        raise AirRayError("select --by entropy_base: no row has an entropy_base value (scores made with "
                          "--backend vllm have none: vLLM returns no full next-token distribution)")
    pa.default_memory_pool().release_unused()  # the allocator keeps freed batch memory otherwise

    if not cfg.per_domain:
        return _Counted(domains, totals, nans, belows, np.array([n_flat], np.int64), flat[:n_flat])
    group_n = np.zeros(len(domains), np.int64)
    for g, parts in chunks.items():
        group_n[g] = sum(len(p) for p in parts)
    allscores = np.empty(int(group_n.sum()), np.float64)
    off = 0
    for g in range(len(domains)):
        parts = chunks.pop(g, [])
        while parts:
            p = parts.pop(0)
            allscores[off:off + len(p)] = p
            off += len(p)
    return _Counted(domains, totals, nans, belows, group_n, allscores)


# ------------------------------------------------------------------------------------------------------
# thresholds: k per group and the k-th largest score


@dataclass
class _Groups:
    k: np.ndarray  # [groups] rows to select
    thresh: np.ndarray  # [groups] a row of group g is kept in pass 2 iff active[g] and score >= thresh[g]
    active: np.ndarray  # [groups] k > 0
    histogram: dict = field(default_factory=dict)
    quantiles: dict = field(default_factory=dict)


def _thresholds(c: _Counted, cfg: SelectConfig) -> _Groups:
    """The exact k-th largest score per group (``numpy.partition`` in place), then the histogram and the
    quantiles from the same array, which is dropped after."""
    frac = None if cfg.top_frac is None else Fraction(str(float(cfg.top_frac)))

    def k_of(n: int) -> int:
        return min(cfg.top_k, n) if cfg.top_k is not None else min(n, math.ceil(frac * n))

    k = np.array([k_of(int(n)) for n in c.group_n], np.int64)
    thresh = np.full(len(k), -np.inf if cfg.min_score is None else cfg.min_score)  # NaN compares False
    off = 0
    for g, n in enumerate(c.group_n.tolist()):
        if 0 < k[g] < n:
            view = c.scores[off:off + n]
            view.partition(n - int(k[g]))  # in place: view[n - k] is the k-th largest score
            thresh[g] = view[n - int(k[g])]
        off += n
    groups = _Groups(k=k, thresh=thresh, active=k > 0, histogram=_histogram(c.scores),
                     quantiles=_quantiles(c.scores))
    c.scores = np.empty(0, np.float64)
    return groups


# ------------------------------------------------------------------------------------------------------
# pass 2: keep only rows at or above their group's threshold, compact ties


def _keep(scores: ScoreFiles, cfg: SelectConfig, by, domains: DomainCodes, groups: _Groups) -> dict[int, list]:
    """``{group: [tables]}`` holding that group's best ``k`` rows (and ties, cut back to ``k`` whenever a
    group's buffer exceeds ``max(2k, _COMPACT_MIN)`` rows)."""
    buffers: dict[int, list[pa.Table]] = {}
    buffered = np.zeros(len(groups.k), np.int64)
    seen = 0
    for batch in _batches(scores, ["id", "score", "domain"], by):
        seen += batch.num_rows
        s = float_column(batch)
        if cfg.per_domain:
            gid = domains.encode(batch.column("domain"), grow=False)
            keep = groups.active[gid] & (s >= groups.thresh[gid])
        else:
            keep = s >= groups.thresh[0]
        if not keep.any():
            continue
        kept = pa.Table.from_batches([batch.filter(pa.array(keep))])
        parts = _split(gid[keep], np.arange(kept.num_rows)) if cfg.per_domain else [(0, None)]
        for g, rows in parts:
            t = kept if rows is None else kept.take(pa.array(rows))
            buffers.setdefault(g, []).append(t)
            buffered[g] += t.num_rows
            if buffered[g] > max(2 * int(groups.k[g]), _COMPACT_MIN):
                buffers[g] = [top_k(buffers[g], int(groups.k[g]), SORT_KEYS)]
                buffered[g] = buffers[g][0].num_rows
    if seen != scores.rows:
        raise _changed(cfg.scores, scores.rows, seen)
    pa.default_memory_pool().release_unused()
    return buffers


def _rank(buffers: dict[int, list], k: np.ndarray) -> pa.Table:
    """The kept rows, best ``k`` per group, sorted by (score desc, id asc) and numbered 1..N: SELECTION."""
    picked = [top_k(buffers.pop(g), int(k[g]), SORT_KEYS) for g in sorted(buffers)]
    # one chunk: Arrow's multi-key sort is several times slower over many chunks
    table = pa.concat_tables(picked).combine_chunks() if picked else _READ_SCHEMA.empty_table()
    del picked
    table = table.take(pc.sort_indices(table, sort_keys=SORT_KEYS))
    if table.column("id").null_count:
        raise AirRayError("select: a selected row has a null id")
    n = table.num_rows
    return pa.Table.from_arrays(
        [table.column("id").combine_chunks(), table.column("score").combine_chunks(),
         pa.array(np.arange(1, n + 1, dtype=np.int64)), table.column("domain").combine_chunks()],
        schema=SELECTION)


# ------------------------------------------------------------------------------------------------------
# summary and files


def _summary(cfg: SelectConfig, scores: ScoreFiles, c: _Counted, groups: _Groups, selection: pa.Table) -> dict:
    out_fs, out_root = url_to_fs(cfg.output)
    sel_by_domain = _selected_by_domain(selection)
    dom_rows = []
    for d, key in enumerate(c.domains.keys):
        total, nan, below = c.totals.get(d), c.nans.get(d), c.belows.get(d)
        n_sel_d, thr_d = sel_by_domain.get(key, (0, None))
        dom_rows.append({
            "domain": key, "rows_total": total, "rows_nan": nan, "rows_below_min_score": below,
            "rows_candidates": total - nan - below, "k": int(groups.k[d]) if cfg.per_domain else None,
            "rows_selected": n_sel_d, "threshold_score": _num(thr_d),
        })
    dom_rows.sort(key=lambda r: (r["domain"] is not None, r["domain"] or ""))
    n_sel = selection.num_rows
    threshold = float(pc.min(selection.column("score")).as_py()) if n_sel else None
    return {
        "counts": {
            "rows_total": int(c.totals.total()), "rows_nan": int(c.nans.total()),
            "rows_below_min_score": int(c.belows.total()), "rows_candidates": int(c.group_n.sum()),
            "rows_selected": n_sel,
        },
        "k": int(groups.k.sum()),
        "threshold_score": _num(threshold),
        "quantiles": groups.quantiles,
        "domains": dom_rows,
        "histogram": groups.histogram,
        "config": {"scores": cfg.scores, "output": cfg.output, "top_k": cfg.top_k,
                   "top_frac": None if cfg.top_frac is None else float(cfg.top_frac),
                   "per_domain": cfg.per_domain, "min_score": cfg.min_score, "by": cfg.by,
                   "seed": int(cfg.seed) if cfg.by == "random" else None},
        "inputs": [with_protocol(scores.fs, f) for f in scores.files],
        "outputs": {name: with_protocol(out_fs, posixpath.join(out_root, name)) for name in SELECTION_FILES},
        "ranking": {"order": "score desc, id asc", "rank": "global over the whole selection",
                    "score": f"the value ranked: {cfg.by}" + (f" (seeded hash of the id, seed {cfg.seed})"
                                                               if cfg.by == "random" else ""),
                    "top_frac_count": "ceil(F * n), F as written in decimal, n = candidates (per domain)"},
    }


def _write(output: str, selection: pa.Table, summary: dict) -> None:
    """selection.parquet (the summary as its metadata), then the plot, then selection.json (the completion
    marker)."""
    out_fs, out_root = url_to_fs(output)
    out_fs.makedirs(out_root, exist_ok=True)
    parquet, summary_json, plot = (posixpath.join(out_root, name) for name in SELECTION_FILES)
    json.dumps(summary, allow_nan=False)  # every number in the summary is finite (non-finite ones are null)
    write_table_atomic(with_metadata(selection, summary), out_fs, parquet)
    write_bytes_atomic(out_fs, plot, _plot(summary["histogram"], summary["threshold_score"], summary))
    write_bytes_atomic(out_fs, summary_json, (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())


# ------------------------------------------------------------------------------------------------------
# reading


def _changed(uri: str, before: int, now: int) -> AirRayError:
    return AirRayError(f"select: the scores under {uri} changed while selecting ({before} rows in the file "
                       f"footers, {now} read); run it again")


def _batches(scores: ScoreFiles, columns: list[str], by: tuple[str, int] = ("score", 0)):
    """Record batches of ``columns``, where "score" is the value ranked (``--by``) as float64."""
    key, seed = by
    read = list(columns)
    if key != "score" and "score" in read:
        read[read.index("score")] = "id" if key == "random" else key
        read = list(dict.fromkeys(read))  # by=random with id already asked for
    for b in scores.batches(read, batch_size=_BATCH_ROWS, use_threads=True,
                            fragment_readahead=_FRAGMENT_READAHEAD, batch_readahead=_BATCH_READAHEAD):
        if key == "score" or "score" not in columns:
            yield b
            continue
        value = _random_keys(b.column("id"), seed) if key == "random" else pc.cast(b.column(key), pa.float64())
        yield pa.RecordBatch.from_arrays([value if c == "score" else b.column(c) for c in columns], names=columns)


def _random_keys(ids: pa.Array, seed: int) -> pa.Array:
    """A uniform [0, 1) value per id from a seeded hash: the same ids give the same order on every run and
    machine, whatever the partitioning."""
    import hashlib

    salt = f"{seed}:".encode()
    out = np.empty(len(ids), np.float64)
    for i, rid in enumerate(ids.to_pylist()):
        if rid is None:
            out[i] = np.nan
            continue
        h = hashlib.blake2b(salt + rid.encode("utf-8"), digest_size=8).digest()
        out[i] = int.from_bytes(h, "little") / 2.0**64
    return pa.array(out)


class _Counter:
    def __init__(self):
        self.counts = np.zeros(0, np.int64)

    def add(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        c = np.bincount(ids)
        if len(c) > len(self.counts):
            self.counts = np.pad(self.counts, (0, len(c) - len(self.counts)))
        self.counts[:len(c)] += c

    def get(self, i: int) -> int:
        return int(self.counts[i]) if i < len(self.counts) else 0

    def total(self) -> int:
        return int(self.counts.sum())


def _split(ids: np.ndarray, values: np.ndarray):
    """``(id, values of that id)`` for each id present, by one stable argsort."""
    order = np.argsort(ids, kind="stable")
    ids, values = ids[order], values[order]
    cuts = np.flatnonzero(np.diff(ids)) + 1
    starts = np.concatenate(([0], cuts))
    return [(int(ids[a]), v) for a, v in zip(starts, np.split(values, cuts))]


# ------------------------------------------------------------------------------------------------------
# statistics


def _num(x):
    """JSON-safe float: non-finite values (+-inf scores) become null."""
    return None if x is None or not math.isfinite(x) else float(x)


def _quantiles(scores: np.ndarray) -> dict:
    if not len(scores):
        return {name: None for name, _ in QUANTILES}
    # overwrite_input: partitions in place instead of copying (callers are done with the order)
    with np.errstate(invalid="ignore"):  # inf - inf between infinite scores: NaN, reported as null
        vals = np.quantile(scores, [q for _, q in QUANTILES], overwrite_input=True)
    return {name: _num(float(v)) for (name, _), v in zip(QUANTILES, vals)}


def _histogram(scores: np.ndarray) -> dict:
    """100 fixed-width bins between the smallest and largest finite candidate score."""
    if not len(scores):
        return {"edges": [], "counts": [], "non_finite": 0}
    lo, hi = float(scores.min()), float(scores.max())
    data, non_finite = scores, 0
    if not (math.isfinite(lo) and math.isfinite(hi)):
        finite = np.isfinite(scores)
        non_finite = int(len(scores) - finite.sum())
        data = scores[finite]
        if not len(data):
            return {"edges": [], "counts": [], "non_finite": non_finite}
        lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(data, bins=HIST_BINS, range=(lo, hi))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts], "non_finite": non_finite}


def _selected_by_domain(selection: pa.Table) -> dict:
    if not selection.num_rows:
        return {}
    agg = selection.select(["domain", "score"]).group_by("domain").aggregate([("score", "count"), ("score", "min")])
    return {d: (int(n), float(m)) for d, n, m in zip(agg.column("domain").to_pylist(),
                                                     agg.column("score_count").to_pylist(),
                                                     agg.column("score_min").to_pylist())}


# ------------------------------------------------------------------------------------------------------
# outputs


def _plot(hist: dict, threshold: float | None, summary: dict) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    c = summary["counts"]
    if hist["counts"]:
        ax.stairs(hist["counts"], hist["edges"], fill=True, alpha=0.6, label=f"candidates ({c['rows_candidates']})")
        if threshold is not None and math.isfinite(threshold):
            ax.axvline(threshold, color="crimson", linestyle="--", linewidth=1.5,
                       label=f"lowest selected score {threshold:.4g} ({c['rows_selected']} selected)")
        ax.legend(loc="upper left", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no candidate rows", ha="center", va="center", transform=ax.transAxes)
    cfg = summary["config"]
    what = f"top_k={cfg['top_k']}" if cfg["top_k"] is not None else f"top_frac={cfg['top_frac']}"
    if cfg["per_domain"]:
        what += " per domain"
    ax.set_title(f"AIR scores: {what}", fontsize=10)
    ax.set_xlabel("score")
    ax.set_ylabel("rows")
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.12, top=0.92)  # tight_layout would draw twice
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
