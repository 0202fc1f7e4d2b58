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
* ``--by``: the value ranked (the ``score`` column of ``selection.parquet`` holds it): ``score`` (the AIR score),
  ``delta`` (``loss_ref - loss_base``), a heuristic column, or ``random`` (a seeded hash of the id).
* ``--balance COLUMN --balance-bins B``: the candidates of each domain group (one group unless ``per_domain``) are
  cut at the ``j/B`` quantiles of ``COLUMN`` (numpy's linear interpolation; a row equal to an edge goes to the
  upper bin); the group's ``k`` is split over its bins in proportion to their candidates (largest remainder, ties to
  the lower bin, never more than a bin holds); each bin's best rows are selected; the union is ranked globally as
  above. A row whose ``COLUMN`` is null is no candidate (counted in ``rows_nan``). ``selection.json["balance"]``
  has each group's edges and per-bin candidates, k and rows selected.
* ``--diversity K``: the candidates of each domain group are assigned to K k-means groups of the scores'
  ``embedding`` column (``air_ray.outputs.clusters``: fitted on at most ``FIT_SAMPLE`` evenly spaced rows, seeded by
  ``--seed``, before pass 1; every row assigned to its nearest centre as it streams, in both passes); the group's k
  is split over its clusters in proportion to their candidates (largest remainder), and, with ``--balance``, each
  cluster's share over its balance bins the same way. A row without an embedding is no candidate (``rows_nan``).
  ``selection.json["diversity"]`` has the fit and each cluster's candidates, k and rows selected.
* ``--exclude-wrong-answer`` / ``--exclude-defective``: rows whose answer check fails or that carry a planted defect
  (``air_ray.outputs.facts``: the corpus read once before pass 1) are no candidates, counted in
  ``rows_wrong_answer`` / ``rows_defective`` (a row is counted under the first rule it fails, in the order NaN,
  below min_score, wrong answer, defective; the counts add up to ``rows_total``).
* ``bias`` (every run): Spearman's rho of the value ranked with ``loss_base``, ``entropy_base`` and
  ``n_response_tokens`` over the candidates, the candidates' and the selected rows' means of each (and the same
  per domain when there are several). rho is computed on every candidate among at most ``BIAS_SAMPLE`` (200,000)
  evenly spaced rows of the footers' order (exact for smaller runs); the means are exact. When the value is
  ``score`` or ``delta``, unbalanced, and ``|rho(value, loss_base)| >= 0.5``, ``bias.warning`` says so and
  ``select`` prints it as one warning line naming ``--balance loss_base``. Where the corpus was read (a filter,
  ``--input``, or a run whose manifest says its rows carry a defect or reference field), ``bias.corpus`` has the
  defect share (by kind) and the wrong-answer share of the pool (every row with a value) and of the selection.

Algorithm and memory
--------------------
Two streaming passes over record batches, reading only the needed columns (never a Python object per row):

1. the value, ``domain`` and the bias columns: counts per domain (total / NaN / below min_score / candidates),
   the bias sums and sample, and the candidate values as float64 numpy: written straight into one array
   preallocated from the row count of the Parquet footers (8 bytes per row, e.g. 80 MB for 10 M rows); with
   ``per_domain`` or ``balance`` kept as chunks of (value, domain code, balance value) and joined after the pass
   (up to ~40 bytes per candidate while the groups are cut and sorted). These give ``n`` per group, hence ``k``
   per group, and the exact ``k``-th largest value per group (``numpy.partition``, in place), the exact quantiles
   (numpy's default linear interpolation) and the histogram (100 fixed bins between the smallest and largest
   finite candidate value).
2. ``id``, the value, ``domain`` and the bias columns: a row can only be selected if its value is >= its
   group's ``k``-th largest, so each batch is first cut down to those rows with a vectorised comparison. The
   survivors are exactly the selected rows plus ties at the threshold; when ties make a group's buffer exceed
   ``max(2k, 65536)`` rows it is reduced back to the exact top ``k`` with ``pyarrow.compute.select_k_unstable``
   on (score desc, id asc). Memory is therefore O(k) Arrow rows (ids included) + 8 bytes per candidate score
   + a few record batches, whatever the number of rows or the ties.

The last step sorts the kept rows (at most ``sum k``) by (score desc, id asc) and numbers them.
Both passes must read exactly the rows the footers announce; otherwise the scores changed under us (AirRayError).
Time and memory against a pandas sort: ``bench/select_memory.py`` (README, bench/RESULTS.md).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from air_ray.config.commands import SelectConfig
from air_ray.config.options import warn
from air_ray.data.answers import REFERENCE_FIELDS
from air_ray.errors import AirRayError
from air_ray.fsio import with_protocol, write_bytes_atomic
from air_ray.outputs.clusters import FIT_SAMPLE, Clusters, fit, vectors
from air_ray.outputs.columns import DomainCodes, float_column, top_k
from air_ray.outputs.facts import CorpusFacts, FactTally
from air_ray.outputs.stats import spearman
from air_ray.store.layout import SelectionLayout
from air_ray.store.schemas import EMBEDDING, RANK_ORDER, SCORES, SELECTION, with_metadata, write_table_atomic
from air_ray.store.scores import ScoreFiles, open_scores

QUANTILES = (("p0", 0.0), ("p10", 0.10), ("p25", 0.25), ("p50", 0.50), ("p75", 0.75), ("p90", 0.90),
             ("p99", 0.99), ("p100", 1.0))
HIST_BINS = 100
BIAS_COLUMNS = ("loss_base", "entropy_base", "n_response_tokens")  # what the bias audit relates the ranking to
BIAS_SAMPLE = 200_000  # Spearman's rho over at most this many evenly spaced candidate rows
BIAS_WARN = 0.5  # |rho(value, loss_base)| from which select warns (ranking by score or delta, unbalanced)
# the columns ``--by`` reads to make the value ranked ("random": a seeded hash of the id)
_VALUE_COLUMNS = {"score": ("score",), "delta": ("loss_ref", "loss_base"), "random": ("id",)}

# Streaming knobs (module level so tests can shrink them to exercise many batches and compactions).
_BATCH_ROWS = 65_536
_COMPACT_MIN = 65_536
_FRAGMENT_READAHEAD = 2
_BATCH_READAHEAD = 4


def select(cfg: SelectConfig, quiet: bool = False) -> dict:
    """Rank every scores partition globally, write the selection and return its summary (see module doc):
    the corpus facts and the clusters when asked for -> pass 1 (counts, candidate values, bias sums and sample) ->
    thresholds per group -> pass 2 (rows at or above them) -> rank -> summary -> files. ``quiet``: the bias warning
    goes into the summary only, not to stderr."""
    cfg = cfg.validate()
    by = (cfg.by, int(cfg.seed))
    value_columns = list(_VALUE_COLUMNS.get(cfg.by, (cfg.by,)))
    require = list(dict.fromkeys(["id", *value_columns] + ([cfg.balance] if cfg.balance else [])))
    columns = list(dict.fromkeys(["id", "domain", "source", *value_columns, *BIAS_COLUMNS, EMBEDDING]))
    scores = open_scores(cfg.scores, "select", columns=columns, require=require)
    ctx = _Context(cfg, _corpus_facts(cfg, scores), _clusters(cfg, scores))
    counted = _count(scores, cfg, by, ctx)
    groups = _thresholds(counted, cfg, ctx)
    kept = _keep(scores, cfg, by, counted.domains, groups, ctx) if groups.active.any() else {}
    selection, covariates = _rank(kept, groups.k)
    summary = _summary(cfg, scores, counted, groups, selection, covariates, ctx)
    _write(cfg.output, selection, summary)
    if summary["bias"].get("warning") and not quiet:
        warn(summary["bias"]["warning"])
    return summary


# ------------------------------------------------------------------------------------------------------
# what pass 1 and pass 2 apply to every batch alike: the corpus facts' exclusions and the clusters


class _Context:
    """The rows left out by the corpus facts (``--exclude-wrong-answer``, ``--exclude-defective``) and each row's
    cluster (``--diversity``), the same in both passes; ``columns``: what they read besides the value."""

    def __init__(self, cfg: SelectConfig, facts: CorpusFacts | None, clusters: Clusters | None):
        self.facts, self.clusters = facts, clusters
        self.exclude_failed = cfg.exclude_wrong_answer
        self.exclude_defective = cfg.exclude_defective
        self.columns = (["id"] if facts is not None else []) + ([EMBEDDING] if clusters is not None else [])
        self.k = clusters.k if clusters is not None else 1

    def excluded(self, batch) -> tuple[np.ndarray, np.ndarray]:
        """(rows whose answer check failed, rows with a defect), each only when its filter is on."""
        rows = batch.num_rows
        none = np.zeros(rows, bool)
        if self.facts is None:
            return none, none
        ids = batch.column("id")
        failed = self.facts.failed_of(ids) >= 0 if self.exclude_failed else none
        defective = self.facts.defect_of(ids) >= 0 if self.exclude_defective else none
        return failed, defective

    def cluster(self, batch) -> tuple[np.ndarray, np.ndarray]:
        """(each row's cluster, whether it has an embedding): all in cluster 0 without --diversity."""
        if self.clusters is None:
            return np.zeros(batch.num_rows, np.int64), np.ones(batch.num_rows, bool)
        x, present = vectors(batch.column(EMBEDDING))
        codes = np.zeros(batch.num_rows, np.int64)
        if present.any():
            codes[present] = self.clusters.assign(x[present])
        return codes, present


def _corpus_facts(cfg: SelectConfig, scores: ScoreFiles) -> CorpusFacts | None:
    """The corpus facts (``air_ray.outputs.facts``) when a filter needs them, ``--input`` names the corpus, or the
    run's manifest says its rows carry a defect or reference field; else None (the corpus is not read)."""
    from types import SimpleNamespace

    from air_ray.data.shapes import FieldMap
    from air_ray.outputs.facts import read_facts
    from air_ray.store.layout import RunLayout

    manifest = RunLayout(cfg.scores).manifest()
    carried = (manifest.corpus_fields or {}) if manifest is not None else {}
    if not (cfg.exclude_wrong_answer or cfg.exclude_defective or cfg.input or any(carried.values())):
        return None
    run_cfg = (manifest.config or {}) if manifest is not None else {}  # the field flags the run scored with
    fields = FieldMap.of(SimpleNamespace(**{f"{k}_field": run_cfg.get(f"{k}_field")
                                            for k in FieldMap.__dataclass_fields__}))
    if cfg.input:
        return read_facts(list(cfg.input), fields, cfg.reference_field, expand=True)
    sources: set[str] = set()
    for batch in scores.batches(["source"], batch_size=_BATCH_ROWS):
        sources.update(v for v in pc.unique(batch.column("source")).to_pylist() if v is not None)
    return read_facts(sorted(sources), fields, cfg.reference_field)


def _clusters(cfg: SelectConfig, scores: ScoreFiles) -> Clusters | None:
    """``--diversity K``: k-means fitted on at most ``clusters.FIT_SAMPLE`` evenly spaced rows' embeddings."""
    if cfg.diversity is None:
        return None
    total = scores.rows
    m = min(total, FIT_SAMPLE)
    xs, offset = [], 0
    for batch in scores.batches([EMBEDDING], batch_size=_BATCH_ROWS):
        take = evenly_spaced(offset, batch.num_rows, total, m)
        offset += batch.num_rows
        if take.any():
            x, present = vectors(batch.column(EMBEDDING).filter(pa.array(take)))
            if present.any():
                xs.append(x[present])
    if not xs:
        raise AirRayError(f"select --diversity: the scores under {cfg.scores} have no embedding column; score with "
                          "`air-ray score --embed` (the base model's pooled hidden state, written beside the scores)")
    return fit(np.concatenate(xs), int(cfg.diversity), int(cfg.seed))


# ------------------------------------------------------------------------------------------------------
# pass 1: counts per domain, the candidates' values (and group and balance value), the bias sums and sample


@dataclass
class _Counted:
    domains: DomainCodes
    totals: "_Counter"
    nans: "_Counter"
    belows: "_Counter"
    failed: "_Counter"  # left out by --exclude-wrong-answer
    defective: "_Counter"  # left out by --exclude-defective
    scores: np.ndarray  # [candidates] the value ranked
    dom: np.ndarray | None  # [candidates] domain code (grouped only)
    bal: np.ndarray | None  # [candidates] the --balance column (balance only)
    clu: np.ndarray | None  # [candidates] cluster (diversity only)
    bias: "_Bias"
    pool: FactTally | None  # the corpus facts over the rows with a value


def _count(scores: ScoreFiles, cfg: SelectConfig, by, ctx: _Context) -> _Counted:
    """One group (not per domain, unbalanced, no diversity): the candidate values go straight into one preallocated
    float64 array (rows from the footers). Otherwise numpy chunks of value, domain code, balance value and cluster,
    joined at the end. A row is a candidate when it has a value (and a balance value and an embedding where those
    are used), is not below --min-score and is not left out by a corpus filter; each row that is not is counted
    under the first of these it fails."""
    footer_rows = scores.rows
    min_score = cfg.min_score
    domains = DomainCodes()  # domain value (None for null) -> dense id
    totals, nans, belows, failed, defective = _Counter(), _Counter(), _Counter(), _Counter(), _Counter()
    grouped = cfg.per_domain or cfg.balance is not None or ctx.clusters is not None
    flat = None if grouped else np.empty(footer_rows, np.float64)
    n_flat = 0
    parts: list[tuple] = []  # (values, domain codes, balance values, clusters) of each batch's candidates (grouped)
    bias = _Bias(footer_rows)
    pool = FactTally(ctx.facts) if ctx.facts is not None else None
    for batch in _batches(scores, ["score", "domain", *BIAS_COLUMNS, *ctx.columns], by):
        s = float_column(batch)
        gid = domains.encode(batch.column("domain"))
        valid = ~np.isnan(s)
        bal = None
        if cfg.balance is not None:
            bal = float_column(batch, cfg.balance)
            valid &= ~np.isnan(bal)  # a row that cannot be put in a bin is no candidate (counted with the NaNs)
        clu, present = ctx.cluster(batch)
        valid &= present  # nor one without an embedding under --diversity
        cand = valid if min_score is None else valid & (s >= min_score)
        totals.add(gid)
        nans.add(gid[~valid])
        if min_score is not None:
            belows.add(gid[valid & ~cand])
        if pool is not None:
            pool.add(batch.column("id").filter(pa.array(valid)))
        out_failed, out_defective = ctx.excluded(batch)
        failed.add(gid[cand & out_failed])
        cand &= ~out_failed
        defective.add(gid[cand & out_defective])
        cand &= ~out_defective
        bias.add(batch, s, gid, cand)
        if grouped:
            if cand.any():
                parts.append((s[cand], gid[cand], None if bal is None else bal[cand], clu[cand]))
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
    counters = (domains, totals, nans, belows, failed, defective)
    if not grouped:
        return _Counted(*counters, flat[:n_flat], None, None, None, bias, pool)

    def cat(i, dtype):
        return np.concatenate([p[i] for p in parts]) if parts else np.empty(0, dtype)

    values, dom = cat(0, np.float64), cat(1, np.int64)
    bal = cat(2, np.float64) if cfg.balance is not None else None
    clu = cat(3, np.int64) if ctx.clusters is not None else None
    return _Counted(*counters, values, dom, bal, clu, bias, pool)


# ------------------------------------------------------------------------------------------------------
# thresholds: the selection groups (domain x cluster x balance bin), k per group and its k-th largest value


@dataclass
class _Groups:
    k: np.ndarray  # [groups] rows to select
    thresh: np.ndarray  # [groups] a row of group g is kept in pass 2 iff active[g] and value >= thresh[g]
    active: np.ndarray  # [groups] k > 0
    n: np.ndarray  # [groups] candidates
    bins: int = 1  # balance bins per cluster (group = (domain group * clusters + cluster) * bins + bin)
    clusters: int = 1  # --diversity groups per domain group
    edges: dict = field(default_factory=dict)  # domain group -> [bins - 1] inner bin edges of the balance column
    histogram: dict = field(default_factory=dict)
    quantiles: dict = field(default_factory=dict)


def _k_of(cfg: SelectConfig, n: int) -> int:
    if cfg.top_k is not None:
        return min(cfg.top_k, n)
    return min(n, math.ceil(Fraction(str(float(cfg.top_frac))) * n))


def split_quota(k: int, sizes: np.ndarray) -> np.ndarray:
    """``k`` split over bins in proportion to their ``sizes`` (largest remainder; ties to the lower bin), never
    more than a bin holds."""
    sizes = np.asarray(sizes, np.int64)
    total = int(sizes.sum())
    k = min(k, total)
    if total == 0 or k <= 0:
        return np.zeros(len(sizes), np.int64)
    exact = [Fraction(k * int(n), total) for n in sizes]
    quota = np.array([math.floor(e) for e in exact], np.int64)
    left = k - int(quota.sum())
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - quota[i]), i))
    for i in order[:left]:
        quota[i] += 1
    return quota


def _thresholds(c: _Counted, cfg: SelectConfig, ctx: _Context) -> _Groups:
    """The groups, k per group and the exact k-th largest value per group (``numpy.partition``, in place), then
    the histogram and quantiles from the same array, which is dropped after."""
    histogram, quantiles = _histogram(c.scores), None
    floor = -np.inf if cfg.min_score is None else cfg.min_score  # NaN compares False
    if c.dom is None:  # one group
        n = len(c.scores)
        k = np.array([_k_of(cfg, n)], np.int64)
        thresh = np.array([floor])
        if 0 < k[0] < n:
            c.scores.partition(n - int(k[0]))  # in place: [n - k] is the k-th largest
            thresh[0] = c.scores[n - int(k[0])]
        groups = _Groups(k=k, thresh=thresh, active=k > 0, n=np.array([n], np.int64))
    else:
        groups = _grouped_thresholds(c, cfg, floor, ctx.k)
    groups.histogram, groups.quantiles = histogram, quantiles or _quantiles(c.scores)
    c.scores = np.empty(0, np.float64)
    c.dom = c.bal = c.clu = None
    return groups


def _grouped_thresholds(c: _Counted, cfg: SelectConfig, floor: float, clusters: int) -> _Groups:
    """Each domain group's k (one group unless --per-domain) split over its clusters in proportion to their
    candidates, each cluster's over its balance bins the same way (``split_quota``); then the thresholds."""
    n_dom = max(len(c.domains), 1)
    dgroup = c.dom if cfg.per_domain else np.zeros(len(c.scores), np.int64)
    n_d = np.bincount(dgroup, minlength=n_dom) if len(dgroup) else np.zeros(n_dom, np.int64)
    k_d = np.array([_k_of(cfg, int(n)) for n in n_d], np.int64) if cfg.per_domain else \
        np.array([_k_of(cfg, int(n_d.sum()))] + [0] * (n_dom - 1), np.int64)
    bins = cfg.balance_bins if cfg.balance is not None else 1
    edges: dict = {}
    sub = (dgroup * clusters + (c.clu if c.clu is not None else 0)) * bins
    if bins > 1:
        for g in np.flatnonzero(n_d):
            m = dgroup == g
            edges[int(g)] = np.quantile(c.bal[m], [j / bins for j in range(1, bins)])
            sub[m] += np.searchsorted(edges[int(g)], c.bal[m], side="right")
    n_groups = n_dom * clusters * bins
    n = np.bincount(sub, minlength=n_groups) if len(sub) else np.zeros(n_groups, np.int64)
    k = np.zeros(n_groups, np.int64)
    for g in range(n_dom):
        cells = n[g * clusters * bins:(g + 1) * clusters * bins].reshape(clusters, bins)
        for j, kc in enumerate(split_quota(int(k_d[g]), cells.sum(1))):
            start = (g * clusters + j) * bins
            k[start:start + bins] = split_quota(int(kc), cells[j])
    order = np.argsort(sub, kind="stable")
    values = c.scores[order]
    del order
    thresh = np.full(n_groups, floor)
    off = 0
    for g in range(n_groups):
        size = int(n[g])
        if 0 < k[g] < size:
            view = values[off:off + size]
            view.partition(size - int(k[g]))
            thresh[g] = view[size - int(k[g])]
        off += size
    return _Groups(k=k, thresh=thresh, active=k > 0, n=n, bins=bins, clusters=clusters, edges=edges)


def _group_of(batch, cfg: SelectConfig, domains: DomainCodes, groups: _Groups, ctx: _Context
              ) -> tuple[np.ndarray, np.ndarray]:
    """(selection group of each row of a pass-2 batch, whether the row can be a candidate at all)."""
    rows = batch.num_rows
    dgroup = domains.encode(batch.column("domain"), grow=False) if cfg.per_domain else np.zeros(rows, np.int64)
    clu, ok = ctx.cluster(batch)
    sub = (dgroup * groups.clusters + clu) * groups.bins
    if cfg.balance is not None:
        bal = float_column(batch, cfg.balance)
        ok &= ~np.isnan(bal)
        for g, inner in groups.edges.items():
            m = dgroup == g
            sub[m] += np.searchsorted(inner, bal[m], side="right")
    return sub, ok


# ------------------------------------------------------------------------------------------------------
# pass 2: keep only rows at or above their group's threshold, compact ties


def _keep(scores: ScoreFiles, cfg: SelectConfig, by, domains: DomainCodes, groups: _Groups, ctx: _Context
          ) -> dict[int, list]:
    """``{group: [tables]}`` holding that group's best ``k`` rows (and ties, cut back to ``k`` whenever a
    group's buffer exceeds ``max(2k, _COMPACT_MIN)`` rows), with the bias columns. A row a corpus filter leaves out
    is never kept."""
    buffers: dict[int, list[pa.Table]] = {}
    buffered = np.zeros(len(groups.k), np.int64)
    seen = 0
    single = len(groups.k) == 1
    kept_columns = ["id", "score", "domain", *BIAS_COLUMNS]
    for batch in _batches(scores, list(dict.fromkeys(kept_columns + ctx.columns)), by):
        seen += batch.num_rows
        s = float_column(batch)
        if single:
            gid = None
            keep = s >= groups.thresh[0]
        else:
            gid, ok = _group_of(batch, cfg, domains, groups, ctx)
            keep = ok & groups.active[gid] & (s >= groups.thresh[gid])
        out_failed, out_defective = ctx.excluded(batch)
        keep &= ~(out_failed | out_defective)
        if not keep.any():
            continue
        kept = pa.Table.from_batches([batch.select(kept_columns).filter(pa.array(keep))])
        parts = [(0, None)] if single else _split(gid[keep], np.arange(kept.num_rows))
        for g, rows in parts:
            t = kept if rows is None else kept.take(pa.array(rows))
            buffers.setdefault(g, []).append(t)
            buffered[g] += t.num_rows
            if buffered[g] > max(2 * int(groups.k[g]), _COMPACT_MIN):
                buffers[g] = [top_k(buffers[g], int(groups.k[g]), RANK_ORDER)]
                buffered[g] = buffers[g][0].num_rows
    if seen != scores.rows:
        raise _changed(cfg.scores, scores.rows, seen)
    pa.default_memory_pool().release_unused()
    return buffers


def _rank(buffers: dict[int, list], k: np.ndarray) -> tuple[pa.Table, dict]:
    """The kept rows, best ``k`` per group, sorted by (value desc, id asc) and numbered 1..N: (SELECTION, the
    selected rows' bias columns as numpy and their group)."""
    picked = [_tag(top_k(buffers.pop(g), int(k[g]), RANK_ORDER), g) for g in sorted(buffers)]
    # one chunk: Arrow's multi-key sort is several times slower over many chunks
    if picked:
        table = pa.concat_tables(picked).combine_chunks()
    else:
        table = pa.schema([SCORES.field("id"), SCORES.field("domain"), pa.field("score", pa.float64()),
                           *(SCORES.field(c) for c in BIAS_COLUMNS), pa.field("_group", pa.int64())]).empty_table()
    del picked
    table = table.take(pc.sort_indices(table, sort_keys=RANK_ORDER))
    if table.column("id").null_count:
        raise AirRayError("select: a selected row has a null id")
    n = table.num_rows
    selection = pa.Table.from_arrays(
        [table.column("id").combine_chunks(), table.column("score").combine_chunks(),
         pa.array(np.arange(1, n + 1, dtype=np.int64)), table.column("domain").combine_chunks()],
        schema=SELECTION)
    covariates = {c: float_column(table, c) for c in ("score", *BIAS_COLUMNS)}
    covariates["_group"] = table.column("_group").to_numpy()
    return selection, covariates


def _tag(t: pa.Table, g: int) -> pa.Table:
    return t.append_column("_group", pa.array(np.full(t.num_rows, g, np.int64)))


# ------------------------------------------------------------------------------------------------------
# the bias audit: how the value ranked relates to the base model's loss, entropy and the response length


class _Bias:
    """Pass 1's share of the audit: per domain, the candidates' sums and counts of the value and each bias column
    (for the pool means), and an evenly spaced sample of at most ``BIAS_SAMPLE`` rows of the file footers' order,
    kept where they are candidates (for Spearman's rho; exact when the pool is no larger)."""

    def __init__(self, footer_rows: int):
        self.total = footer_rows
        self.m = min(footer_rows, BIAS_SAMPLE)
        self.offset = 0
        self.sums: dict[str, _Counter] = {c: _Counter(float) for c in ("score", *BIAS_COLUMNS)}
        self.counts: dict[str, _Counter] = {c: _Counter() for c in ("score", *BIAS_COLUMNS)}
        self.sample: list[dict] = []

    def add(self, batch, s: np.ndarray, gid: np.ndarray, cand: np.ndarray) -> None:
        cols = {"score": s, **{c: float_column(batch, c) for c in BIAS_COLUMNS}}
        for c, v in cols.items():
            ok = cand & np.isfinite(v)  # means of finite values (a +-inf score is ranked, not averaged)
            self.sums[c].add(gid[ok], v[ok])
            self.counts[c].add(gid[ok])
        in_sample = evenly_spaced(self.offset, len(s), self.total, self.m)
        self.offset += len(s)
        take = in_sample & cand
        if take.any():
            self.sample.append({"gid": gid[take], **{c: v[take] for c, v in cols.items()}})

    def summary(self, cfg: SelectConfig, domains: DomainCodes, selected: dict, n_candidates: int) -> dict:
        sample = {c: np.concatenate([p[c] for p in self.sample]) if self.sample else np.empty(0)
                  for c in ("gid", "score", *BIAS_COLUMNS)}
        sel_dom = domains.encode(pa.array(selected["domain"], pa.string()), grow=False) \
            if len(selected["domain"]) else np.empty(0, np.int64)

        def entry(gids: list[int] | None) -> dict:
            m = np.ones(len(sample["gid"]), bool) if gids is None else np.isin(sample["gid"], gids)
            ms = np.ones(len(sel_dom), bool) if gids is None else np.isin(sel_dom, gids)
            rho = {c: _num4(spearman(sample["score"][m], sample[c][m])) for c in BIAS_COLUMNS}
            pool = {}
            for c in ("score", *BIAS_COLUMNS):
                tot = sum(self.sums[c].get(g) for g in (range(len(domains)) if gids is None else gids))
                cnt = sum(self.counts[c].get(g) for g in (range(len(domains)) if gids is None else gids))
                pool[c] = _num(tot / cnt) if cnt else None
            chosen = {}
            for c in ("score", *BIAS_COLUMNS):
                v = selected[c][ms]
                v = v[np.isfinite(v)]
                chosen[c] = _num(float(v.mean())) if len(v) else None
            return {"rows_sampled": int(m.sum()), "spearman": rho,
                    "pool_mean": _rename(pool, cfg.by), "selected_mean": _rename(chosen, cfg.by)}

        out = {"value": cfg.by, "rows_candidates": n_candidates, "sample": "every candidate" if self.m >= self.total
               else f"every candidate among {self.m:,} evenly spaced rows of {self.total:,}", **entry(None)}
        if len(domains) > 1:
            out["domains"] = [dict(domain=domains.keys[g], **entry([g])) for g in range(len(domains))]
        rho = out["spearman"]["loss_base"]
        if cfg.by in ("score", "delta") and cfg.balance is None and rho is not None and abs(rho) >= BIAS_WARN:
            pool, chosen = out["pool_mean"]["loss_base"], out["selected_mean"]["loss_base"]
            means = "" if pool is None or chosen is None else \
                f" (selected mean loss_base {chosen:.3f}, the pool's {pool:.3f})"
            out["warning"] = (f"select --by {cfg.by}: Spearman {rho:+.2f} with loss_base over the pool: the selection "
                              f"favours rows the base model finds {'easy' if rho < 0 else 'hard'}{means}; "
                              "--balance loss_base ranks within loss_base bins and keeps the pool's difficulty")
        return out


def evenly_spaced(offset: int, n: int, total: int, m: int) -> np.ndarray:
    """[n] bool: which of rows offset..offset+n-1 (of ``total``) are among ``m`` evenly spaced ones: row i is iff
    i = floor(j * total / m) for some j < m (every row when m >= total)."""
    if m >= total:
        return np.ones(n, bool)
    i = np.arange(offset, offset + n, dtype=np.int64)
    j = (i * m + total - 1) // total
    return (j < m) & ((j * total) // m == i)


def _rename(means: dict, by: str) -> dict:
    """The value's mean under its own name (``score``, ``delta``, ...) beside the bias columns."""
    out = {c: v for c, v in means.items() if c != "score"}
    if by not in BIAS_COLUMNS:
        out = {by: means["score"], **out}
    return out


def _num4(x):
    return None if x is None else round(float(x), 4)


# ------------------------------------------------------------------------------------------------------
# summary and files


def _summary(cfg: SelectConfig, scores: ScoreFiles, c: _Counted, groups: _Groups, selection: pa.Table,
             covariates: dict, ctx: _Context) -> dict:
    sel_by_domain = _selected_by_domain(selection)
    span = groups.clusters * groups.bins  # groups per domain group
    dom_rows = []
    for d, key in enumerate(c.domains.keys):
        total, nan, below = c.totals.get(d), c.nans.get(d), c.belows.get(d)
        failed, defective = c.failed.get(d), c.defective.get(d)
        n_sel_d, thr_d = sel_by_domain.get(key, (0, None))
        dom_rows.append({
            "domain": key, "rows_total": total, "rows_nan": nan, "rows_below_min_score": below,
            "rows_wrong_answer": failed, "rows_defective": defective,
            "rows_candidates": total - nan - below - failed - defective,
            "k": int(groups.k[d * span:(d + 1) * span].sum()) if cfg.per_domain else None,
            "rows_selected": n_sel_d, "threshold_score": _num(thr_d),
        })
    dom_rows.sort(key=lambda r: (r["domain"] is not None, r["domain"] or ""))
    n_sel = selection.num_rows
    n_cand = int(groups.n.sum())
    threshold = float(pc.min(selection.column("score")).as_py()) if n_sel else None
    selected = dict(covariates, domain=selection.column("domain").to_pylist())
    bias = c.bias.summary(cfg, c.domains, selected, n_cand)
    if ctx.facts is not None:
        chosen = FactTally(ctx.facts)
        chosen.add(selection.column("id").combine_chunks())
        bias["corpus"] = {"sources": len(ctx.facts.sources), "read": ctx.facts.counts,
                          "reference_field": cfg.reference_field or "auto: " + ", ".join(REFERENCE_FIELDS),
                          "pool": c.pool.summary(), "selected": chosen.summary(),
                          "pool_rows": "every scored row with a value, before --min-score and the corpus filters"}
    summary = {
        "counts": {
            "rows_total": int(c.totals.total()), "rows_nan": int(c.nans.total()),
            "rows_below_min_score": int(c.belows.total()), "rows_wrong_answer": int(c.failed.total()),
            "rows_defective": int(c.defective.total()), "rows_candidates": n_cand, "rows_selected": n_sel,
        },
        "k": int(groups.k.sum()),
        "threshold_score": _num(threshold),
        "quantiles": groups.quantiles,
        "domains": dom_rows,
        "histogram": groups.histogram,
        "bias": bias,
        "config": select_config_doc(cfg),
        "inputs": [with_protocol(scores.fs, f) for f in scores.files],
        "outputs": SelectionLayout(cfg.output).uris(),
        "ranking": {"order": "score desc, id asc", "rank": "global over the whole selection",
                    "score": f"the value ranked: {cfg.by}" + (f" (seeded hash of the id, seed {cfg.seed})"
                                                               if cfg.by == "random" else ""),
                    "top_frac_count": "ceil(F * n), F as written in decimal, n = candidates (per domain)"},
    }
    if ctx.clusters is not None:
        summary["ranking"]["diversity"] = (f"the candidates{' of each domain' if cfg.per_domain else ''} in "
                                           f"{ctx.k} k-means groups of their embedding (seed {cfg.seed}); k split "
                                           "over the groups in proportion to their candidates (largest remainder)"
                                           + ("" if not cfg.balance else ", each group's share over its balance bins"))
        summary["diversity"] = _diversity_summary(cfg, c.domains, groups, covariates["_group"], ctx.clusters)
    if cfg.balance:
        summary["ranking"]["balance"] = (f"{cfg.balance} cut into {groups.bins} quantile bins over the candidates"
                                         f"{' of each domain' if cfg.per_domain else ''}; k split over the bins in "
                                         "proportion to their candidates (largest remainder); the best rows of each "
                                         "bin selected, then ranked together")
        summary["balance"] = _balance_summary(cfg, c.domains, groups, covariates["_group"])
    return summary


def select_config_doc(cfg: SelectConfig) -> dict:
    """The options a selection was made with, as ``selection.json["config"]`` records them."""
    return {"scores": cfg.scores, "output": cfg.output, "top_k": cfg.top_k,
            "top_frac": None if cfg.top_frac is None else float(cfg.top_frac),
            "per_domain": cfg.per_domain, "min_score": cfg.min_score, "by": cfg.by,
            "balance": cfg.balance, "balance_bins": cfg.balance_bins if cfg.balance else None,
            "diversity": cfg.diversity, "exclude_wrong_answer": cfg.exclude_wrong_answer,
            "exclude_defective": cfg.exclude_defective, "reference_field": cfg.reference_field,
            "input": list(cfg.input) or None,
            "seed": int(cfg.seed) if cfg.by == "random" or cfg.diversity else None}


def _cells(groups: _Groups, selected_group: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates, k and rows selected per group, as [domain groups, clusters, bins]."""
    shape = (-1, groups.clusters, groups.bins)
    picked = np.bincount(selected_group, minlength=len(groups.k)) if len(selected_group) else \
        np.zeros(len(groups.k), np.int64)
    return groups.n.reshape(shape), groups.k.reshape(shape), picked.reshape(shape)


def _balance_summary(cfg: SelectConfig, domains: DomainCodes, groups: _Groups, selected_group: np.ndarray) -> list:
    """Per domain group (one unless --per-domain): the inner bin edges, and candidates, k and rows selected per
    bin (over every cluster)."""
    n, k, picked = (a.sum(1) for a in _cells(groups, selected_group))
    out = []
    for g in range(len(n)):
        if not n[g].any():
            continue
        out.append({"domain": domains.keys[g] if cfg.per_domain else "(all)",
                    "edges": [_num(float(e)) for e in groups.edges.get(g, [])],
                    "rows_candidates": [int(x) for x in n[g]], "k": [int(x) for x in k[g]],
                    "rows_selected": [int(x) for x in picked[g]]})
    return out


def _diversity_summary(cfg: SelectConfig, domains: DomainCodes, groups: _Groups, selected_group: np.ndarray,
                       clusters: Clusters) -> dict:
    """The clustering (sample, iterations, inertia) and, per domain group, candidates, k and rows selected per
    cluster (over every balance bin)."""
    n, k, picked = (a.sum(2) for a in _cells(groups, selected_group))
    per = [{"domain": domains.keys[g] if cfg.per_domain else "(all)", "rows_candidates": [int(x) for x in n[g]],
            "k": [int(x) for x in k[g]], "rows_selected": [int(x) for x in picked[g]]}
           for g in range(len(n)) if n[g].any()]
    return {"groups": clusters.k, "seed": int(cfg.seed), "fit_rows": clusters.sample_rows,
            "iterations": clusters.iterations, "inertia": _num(clusters.inertia), "domains": per}


def _write(output: str, selection: pa.Table, summary: dict) -> None:
    """selection.parquet (the summary as its metadata), then the plot, then selection.json (the completion
    marker)."""
    files = SelectionLayout(output)
    files.fs.makedirs(files.root, exist_ok=True)
    json.dumps(summary, allow_nan=False)  # every number in the summary is finite (non-finite ones are null)
    write_table_atomic(with_metadata(selection, summary), files.fs, files.parquet)
    write_bytes_atomic(files.fs, files.plot, _plot(summary["histogram"], summary["threshold_score"], summary))
    write_bytes_atomic(files.fs, files.summary, (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())


# ------------------------------------------------------------------------------------------------------
# reading


def _changed(uri: str, before: int, now: int) -> AirRayError:
    return AirRayError(f"select: the scores under {uri} changed while selecting ({before} rows in the file "
                       f"footers, {now} read); run it again")


def _batches(scores: ScoreFiles, columns: list[str], by: tuple[str, int] = ("score", 0)):
    """Record batches of ``columns``, where "score" is the value ranked (``--by``) as float64."""
    key, seed = by
    read = []
    for c in columns:
        read += list(_VALUE_COLUMNS.get(key, (key,))) if c == "score" else [c]
    read = list(dict.fromkeys(read))
    for b in scores.batches(read, batch_size=_BATCH_ROWS, use_threads=True,
                            fragment_readahead=_FRAGMENT_READAHEAD, batch_readahead=_BATCH_READAHEAD):
        if key == "score":
            value = b.column("score")
        elif key == "random":
            value = _random_keys(b.column("id"), seed)
        elif key == "delta":
            value = pc.subtract(pc.cast(b.column("loss_ref"), pa.float64()), pc.cast(b.column("loss_base"), pa.float64()))
        else:
            value = pc.cast(b.column(key), pa.float64())
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
    """Per dense id: a count of rows, or (``dtype=float``) a sum of values."""

    def __init__(self, dtype=np.int64):
        self.counts = np.zeros(0, dtype)

    def add(self, ids: np.ndarray, weights: np.ndarray | None = None) -> None:
        if not len(ids):
            return
        c = np.bincount(ids, weights=weights)
        if len(c) > len(self.counts):
            self.counts = np.pad(self.counts, (0, len(c) - len(self.counts)))
        self.counts[:len(c)] += c.astype(self.counts.dtype, copy=False)

    def get(self, i: int):
        return self.counts[i].item() if i < len(self.counts) else 0

    def total(self):
        return self.counts.sum().item()


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
