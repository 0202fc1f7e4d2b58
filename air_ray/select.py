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
from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral, Real

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from air_ray.errors import AirRayError
from air_ray.corpus import with_protocol
from air_ray.schema import METADATA_KEY, SCORES, SELECTION, write_atomic, write_bytes_atomic

QUANTILES = (("p0", 0.0), ("p10", 0.10), ("p25", 0.25), ("p50", 0.50), ("p75", 0.75), ("p90", 0.90),
             ("p99", 0.99), ("p100", 1.0))
HIST_BINS = 100
SORT_KEYS = [("score", "descending"), ("id", "ascending")]

# Streaming knobs (module level so tests can shrink them to exercise many batches and compactions).
_BATCH_ROWS = 65_536
_COMPACT_MIN = 65_536
_FRAGMENT_READAHEAD = 2
_BATCH_READAHEAD = 4

# The columns read, with the types of the SCORES schema (the scanner casts compatible physical types).
_READ_SCHEMA = pa.schema([SCORES.field("id"), SCORES.field("domain"), SCORES.field("score")])

# --by: the AIR score, or one of the heuristics the paper compares against (from the same scoring run).
# Every one ranks descending: highest loss, highest entropy, longest response first; random = a seeded hash.
BY = ("score", "loss_base", "entropy_base", "n_response_tokens", "random")


@dataclass
class SelectConfig:
    """Options of ``air-ray select``; exactly one of ``top_k`` / ``top_frac`` must be set."""

    scores: str
    output: str
    top_k: int | None = None
    top_frac: float | None = None
    per_domain: bool = False
    min_score: float | None = None
    by: str = "score"  # the value ranked: score | loss_base | entropy_base | n_response_tokens | random
    seed: int = 0  # for by=random

    def check(self) -> "SelectConfig":
        if self.by not in BY:
            raise AirRayError(f"select: --by {self.by!r}: expected one of {', '.join(BY)}")
        if not self.scores or not isinstance(self.scores, str):
            raise AirRayError("select: scores must be a URI")
        if not self.output or not isinstance(self.output, str):
            raise AirRayError("select: output must be a URI")
        if (self.top_k is None) == (self.top_frac is None):
            raise AirRayError("select: set exactly one of top_k / top_frac")
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, Integral) or self.top_k < 0:
                raise AirRayError(f"select: top_k must be an integer >= 0, got {self.top_k!r}")
        if self.top_frac is not None:
            f = self.top_frac
            if isinstance(f, bool) or not isinstance(f, Real) or not (0.0 < float(f) <= 1.0):
                raise AirRayError(f"select: top_frac must be in (0, 1], got {f!r}")
        if self.min_score is not None:
            m = self.min_score
            if isinstance(m, bool) or not isinstance(m, Real) or not math.isfinite(float(m)):
                raise AirRayError(f"select: min_score must be a finite number, got {m!r}")
        if not isinstance(self.per_domain, bool):
            raise AirRayError(f"select: per_domain must be true or false, got {self.per_domain!r}")
        return self


def select(cfg: SelectConfig) -> dict:
    """Rank every scores partition globally, write the selection and return its summary (see module doc)."""
    import fsspec

    cfg.check()
    top_k = None if cfg.top_k is None else int(cfg.top_k)
    frac = None if cfg.top_frac is None else Fraction(str(float(cfg.top_frac)))
    min_score = None if cfg.min_score is None else float(cfg.min_score)

    fs, files = find_partitions(cfg.scores)
    dataset, footer_rows = _open_dataset(fs, files, cfg.by)
    by = (cfg.by, int(cfg.seed))

    # ---- pass 1: counts per domain + candidate scores per selection group ----------------------------
    # Global: the candidate scores go straight into one preallocated float64 array (rows from the footers).
    # Per domain: numpy chunks per domain, then copied group by group into one array (chunks freed as copied).
    domains = _Keys()                       # domain value (None for null) -> dense id
    totals, nans, belows = _Counter(), _Counter(), _Counter()
    flat = None if cfg.per_domain else np.empty(footer_rows, np.float64)
    n_flat = 0
    chunks: dict[int, list[np.ndarray]] = {}  # domain id -> candidate scores (per_domain only)
    for batch in _batches(dataset, ["score", "domain"], by):
        s = _scores(batch)
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

    n_groups = len(domains) if cfg.per_domain else 1
    group_n = np.zeros(n_groups, np.int64)
    if cfg.per_domain:
        for g, parts in chunks.items():
            group_n[g] = sum(len(p) for p in parts)
    else:
        group_n[0] = n_flat
    n_cand = int(group_n.sum())

    def k_of(n: int) -> int:
        return min(top_k, n) if top_k is not None else min(n, math.ceil(frac * n))

    group_k = np.array([k_of(int(n)) for n in group_n], np.int64)
    # A row of group g is kept in pass 2 iff active[g] and score >= thresh[g] (NaN compares False).
    thresh = np.full(n_groups, -np.inf if min_score is None else min_score)
    active = group_k > 0

    # All candidate scores in one float64 array, one contiguous slice per group.
    if cfg.per_domain:
        allscores = np.empty(n_cand, np.float64)
        off = 0
        for g in range(n_groups):
            parts = chunks.pop(g, [])
            while parts:
                p = parts.pop(0)
                allscores[off:off + len(p)] = p
                off += len(p)
        del chunks
    else:
        allscores = flat[:n_flat]
        del flat
    off = 0
    for g in range(n_groups):
        n, k = int(group_n[g]), int(group_k[g])
        if 0 < k < n:
            view = allscores[off:off + n]
            view.partition(n - k)  # in place: view[n - k] is the k-th largest score
            thresh[g] = view[n - k]
        off += n
    hist = _histogram(allscores)
    quantiles = _quantiles(allscores)
    del allscores

    # ---- pass 2: keep only rows at or above their group's threshold, compact ties --------------------
    buffers: dict[int, list[pa.Table]] = {}
    buffered = np.zeros(n_groups, np.int64)
    seen = 0
    if active.any():
        for batch in _batches(dataset, ["id", "score", "domain"], by):
            seen += batch.num_rows
            s = _scores(batch)
            if cfg.per_domain:
                gid = domains.encode(batch.column("domain"), grow=False)
                keep = active[gid] & (s >= thresh[gid])
            else:
                keep = s >= thresh[0]
            if not keep.any():
                continue
            kept = pa.Table.from_batches([batch.filter(pa.array(keep))])
            parts = _split(gid[keep], np.arange(kept.num_rows)) if cfg.per_domain else [(0, None)]
            for g, rows in parts:
                t = kept if rows is None else kept.take(pa.array(rows))
                buffers.setdefault(g, []).append(t)
                buffered[g] += t.num_rows
                if buffered[g] > max(2 * int(group_k[g]), _COMPACT_MIN):
                    buffers[g] = [_top(buffers[g], int(group_k[g]))]
                    buffered[g] = buffers[g][0].num_rows
        if seen != footer_rows:
            raise _changed(cfg.scores, footer_rows, seen)

    pa.default_memory_pool().release_unused()
    picked = [_top(buffers.pop(g), int(group_k[g])) for g in sorted(buffers)]
    # one chunk: Arrow's multi-key sort is several times slower over many chunks
    table = pa.concat_tables(picked).combine_chunks() if picked else _READ_SCHEMA.empty_table()
    del picked
    table = table.take(pc.sort_indices(table, sort_keys=SORT_KEYS))
    if table.column("id").null_count:
        raise AirRayError("select: a selected row has a null id")
    n_sel = table.num_rows
    selection = pa.Table.from_arrays(
        [table.column("id").combine_chunks(), table.column("score").combine_chunks(),
         pa.array(np.arange(1, n_sel + 1, dtype=np.int64)), table.column("domain").combine_chunks()],
        schema=SELECTION)
    del table, buffers

    # ---- summary --------------------------------------------------------------------------------------
    out_fs, out_root = fsspec.core.url_to_fs(cfg.output)
    sel_by_domain = _selected_by_domain(selection)
    dom_rows = []
    for d, key in enumerate(domains.keys):
        total, nan, below = totals.get(d), nans.get(d), belows.get(d)
        n_sel_d, thr_d = sel_by_domain.get(key, (0, None))
        dom_rows.append({
            "domain": key, "rows_total": total, "rows_nan": nan, "rows_below_min_score": below,
            "rows_candidates": total - nan - below, "k": int(group_k[d]) if cfg.per_domain else None,
            "rows_selected": n_sel_d, "threshold_score": _num(thr_d),
        })
    dom_rows.sort(key=lambda r: (r["domain"] is not None, r["domain"] or ""))
    threshold = float(pc.min(selection.column("score")).as_py()) if n_sel else None
    summary = {
        "counts": {
            "rows_total": int(totals.total()), "rows_nan": int(nans.total()),
            "rows_below_min_score": int(belows.total()), "rows_candidates": n_cand, "rows_selected": n_sel,
        },
        "k": int(group_k.sum()),
        "threshold_score": _num(threshold),
        "quantiles": quantiles,
        "domains": dom_rows,
        "histogram": hist,
        "config": {"scores": cfg.scores, "output": cfg.output, "top_k": top_k,
                   "top_frac": None if cfg.top_frac is None else float(cfg.top_frac),
                   "per_domain": cfg.per_domain, "min_score": min_score, "by": cfg.by,
                   "seed": int(cfg.seed) if cfg.by == "random" else None},
        "inputs": [with_protocol(fs, f) for f in files],
        "outputs": {name: with_protocol(out_fs, posixpath.join(out_root, name))
                    for name in ("selection.parquet", "selection.json", "score_hist.png")},
        "ranking": {"order": "score desc, id asc", "rank": "global over the whole selection",
                    "score": f"the value ranked: {cfg.by}" + (f" (seeded hash of the id, seed {cfg.seed})"
                                                               if cfg.by == "random" else ""),
                    "top_frac_count": "ceil(F * n), F as written in decimal, n = candidates (per domain)"},
    }

    # ---- outputs: parquet, then the plot, then the summary (the completion marker) --------------------
    out_fs.makedirs(out_root, exist_ok=True)
    meta = json.dumps(summary, sort_keys=True, allow_nan=False).encode()
    write_atomic(selection.replace_schema_metadata({METADATA_KEY: meta}), out_fs,
                 posixpath.join(out_root, "selection.parquet"))
    write_bytes_atomic(out_fs, posixpath.join(out_root, "score_hist.png"), _plot(hist, threshold, summary))
    write_bytes_atomic(out_fs, posixpath.join(out_root, "selection.json"),
                 (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())
    return summary


# ------------------------------------------------------------------------------------------------------
# inputs


def find_partitions(uri: str) -> tuple[object, list[str]]:
    """``(fs, sorted partition paths)`` of a scores URI: ``<uri>/scores/*.parquet`` if that folder exists,
    else ``<uri>/*.parquet``; hidden names (``.x``, ``_x``) are skipped. AirRayError when there are none."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/") or root
    try:
        sub = posixpath.join(root, "scores")
        if fs.isdir(sub):
            root = sub
        elif not fs.isdir(root):
            raise AirRayError(f"select: no scores at {uri} (not a directory)")
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        raise AirRayError(f"select: no scores at {uri} (not found)") from None
    files = sorted(
        e["name"] for e in entries
        if e.get("type") == "file" and e["name"].endswith(".parquet")
        and not posixpath.basename(e["name"]).startswith((".", "_"))
    )
    if not files:
        raise AirRayError(f"select: no score partitions (*.parquet) under {with_protocol(fs, root)}")
    return fs, files


def _changed(uri: str, before: int, now: int) -> AirRayError:
    return AirRayError(f"select: the scores under {uri} changed while selecting ({before} rows in the file "
                       f"footers, {now} read); run it again")


def _open_dataset(fs, files: list[str], by: str = "score"):
    """``(dataset of the needed columns, number of rows per the Parquet footers)``; checks every partition."""
    import pyarrow.dataset as ds

    schema = _READ_SCHEMA
    if by not in ("score", "random"):
        schema = schema.append(SCORES.field(by))
    rows = 0
    try:
        dataset = ds.dataset(files, filesystem=fs, format="parquet", schema=schema)
        for frag in dataset.get_fragments():
            rows += frag.metadata.num_rows
            names = set(frag.physical_schema.names)
            missing = [c for c in schema.names if c not in names]
            if missing:
                raise AirRayError(f"select: {with_protocol(fs, frag.path)} is not a scores partition "
                                  f"(no column {', '.join(missing)})")
    except (pa.ArrowInvalid, OSError) as e:
        raise AirRayError(f"select: cannot read the score partitions: {str(e).splitlines()[0]}") from None
    return dataset, rows


def _batches(dataset, columns: list[str], by: tuple[str, int] = ("score", 0)):
    """Record batches of ``columns``, where "score" is the value ranked (``--by``) as float64."""
    key, seed = by
    read = list(columns)
    if key != "score" and "score" in read:
        read[read.index("score")] = "id" if key == "random" else key
        read = list(dict.fromkeys(read))  # by=random with id already asked for
    try:
        for b in dataset.to_batches(columns=read, batch_size=_BATCH_ROWS, use_threads=True,
                                    fragment_readahead=_FRAGMENT_READAHEAD, batch_readahead=_BATCH_READAHEAD):
            if key == "score" or "score" not in columns:
                yield b
                continue
            value = _random_keys(b.column("id"), seed) if key == "random" else pc.cast(b.column(key), pa.float64())
            yield pa.RecordBatch.from_arrays([value if c == "score" else b.column(c) for c in columns],
                                             names=columns)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise AirRayError(f"select: cannot read the score partitions: {str(e).splitlines()[0]}") from None


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


def _scores(batch: pa.RecordBatch) -> np.ndarray:
    """The score column as float64 numpy, nulls as NaN (zero-copy when there are no nulls)."""
    col = batch.column("score")
    if col.null_count:
        col = pc.fill_null(col, np.nan)
    return col.to_numpy(zero_copy_only=False)


class _Keys:
    """Dense ids for domain values (``None`` = null domain), assigned in order of first appearance."""

    def __init__(self):
        self.ids: dict = {}
        self.keys: list = []

    def __len__(self) -> int:
        return len(self.keys)

    def encode(self, arr: pa.Array, grow: bool = True) -> np.ndarray:
        enc = pc.dictionary_encode(arr, null_encoding="encode")
        local = enc.dictionary.to_pylist()  # the distinct values of this batch only
        lut = np.empty(len(local), np.int64)
        for i, v in enumerate(local):
            g = self.ids.get(v)
            if g is None:
                if not grow:
                    raise AirRayError("select: the scores changed while selecting (a new domain appeared); "
                                      "run it again")
                g = self.ids[v] = len(self.keys)
                self.keys.append(v)
            lut[i] = g
        return lut[enc.indices.to_numpy(zero_copy_only=False)]


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


def _top(tables: list[pa.Table], k: int) -> pa.Table:
    """The best ``k`` rows (score desc, id asc) of ``tables``, in no particular order."""
    t = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if t.num_rows <= k:
        return t
    t = t.combine_chunks()
    return t.take(pc.select_k_unstable(t, k=k, sort_keys=SORT_KEYS))


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
