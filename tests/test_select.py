"""The global selection reducer: exact against a brute-force ranking, readable by every reader, bounded memory."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import uuid
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import air_ray.outputs.select as sel
from air_ray.errors import AirRayError
from air_ray.store.schemas import METADATA_KEY, SCORES, SELECTION
from air_ray.config import SelectConfig
from air_ray.outputs.select import select

DOMAINS = ["math", "code", None, "science", "Zeta", "été"]


# ------------------------------------------------------------------------------------------------------
# helpers


def scores_table(ids, scores, domains, loss_base=None, loss_ref=None) -> pa.Table:
    """A SCORES-schema table with the given id / score / domain (and loss) columns (other columns filled in)."""
    n = len(ids)
    ids = pa.array(ids, pa.string())
    cols = {
        "id": ids,
        "domain": pa.array(domains, pa.string()),
        "source": pa.repeat("train.jsonl", n).cast(pa.string()),
        "n_prompt_tokens": pa.array(np.full(n, 12, np.int32)),
        "n_response_tokens": pa.array(np.full(n, 40, np.int32)),
        "loss_base": pa.array(np.ones(n) if loss_base is None else np.asarray(loss_base, np.float64)),
        "loss_ref": pa.array(np.ones(n) if loss_ref is None else np.asarray(loss_ref, np.float64)),
        "score": pa.array(np.asarray(scores, np.float64)),
        "truncated": pa.array(np.zeros(n, bool)),
        "entropy_base": pa.array(np.full(n, 2.0)),
    }
    for f in SCORES:  # the step columns and every later optional column: null
        cols.setdefault(f.name, pa.nulls(n, f.type))
    return pa.Table.from_pydict(cols, schema=SCORES)


def write_partitions(root: Path, rows: list[tuple], n_parts: int, rng, hidden: bool = True) -> None:
    """Split ``rows`` (id, score, domain) over ``n_parts`` files (one of them empty) plus hidden junk."""
    root.mkdir(parents=True, exist_ok=True)
    cuts = sorted(rng.integers(0, len(rows) + 1, size=n_parts - 1).tolist()) if rows else [0] * (n_parts - 1)
    bounds = [0, *cuts, len(rows)]
    for i in range(n_parts):
        part = rows[bounds[i]:bounds[i + 1]]
        losses = {} if not part or len(part[0]) < 5 else \
            {"loss_base": [r[3] for r in part], "loss_ref": [r[4] for r in part]}
        t = scores_table([r[0] for r in part], [r[1] for r in part], [r[2] for r in part], **losses)
        pq.write_table(t, root / f"part-{i:05d}.parquet")
    pq.write_table(scores_table([], [], []), root / "part-empty.parquet")
    if hidden:
        # in-progress files and markers: unreadable garbage, must be ignored
        (root / ".part-99999.parquet.tmp").write_bytes(b"not a parquet file")
        (root / ".part-99998.parquet").write_bytes(b"PAR1 half written")
        (root / "_SUCCESS").write_bytes(b"")
        (root / "_common_metadata.parquet").write_bytes(b"garbage")
        (root / "notes.txt").write_text("not a partition")


def random_rows(rng, n: int) -> list[tuple]:
    """Rows with many exact score ties, NaNs, +-0.0, +-inf and ids whose byte order matters."""
    alphabet = list("abcXYZ019_-é€")
    ids = set()
    while len(ids) < n:
        ids.add("".join(rng.choice(alphabet, size=int(rng.integers(1, 6)))))
    ids = sorted(ids)
    rng.shuffle(ids)
    specials = [math.nan, 0.0, -0.0, math.inf, -math.inf]
    rows = []
    for i in ids:
        u = rng.random()
        if u < 0.08:
            s = specials[int(rng.integers(len(specials)))]
        else:
            s = float(rng.integers(-6, 7)) / 4  # few distinct values -> many ties
        rows.append((i, s, DOMAINS[int(rng.integers(len(DOMAINS)))]))
    return rows


def brute_force(rows, top_k=None, top_frac=None, per_domain=False, min_score=None):
    """Pure-Python reference: [(id, score, rank, domain)] in rank order."""
    cands = [r for r in rows if not math.isnan(r[1]) and (min_score is None or r[1] >= min_score)]
    groups: dict = {}
    for r in cands:
        groups.setdefault(r[2] if per_domain else "*", []).append(r)
    chosen = []
    for rs in groups.values():
        rs.sort(key=lambda r: (-r[1], r[0]))
        k = top_k if top_k is not None else math.ceil(Fraction(str(top_frac)) * len(rs))
        chosen += rs[:k]
    chosen.sort(key=lambda r: (-r[1], r[0]))
    return [(r[0], r[1], i + 1, r[2]) for i, r in enumerate(chosen)]


def read_selection(path) -> list[tuple]:
    t = pq.read_table(path)
    assert t.schema.remove_metadata() == SELECTION
    return list(zip(*(t.column(c).to_pylist() for c in ("id", "score", "rank", "domain"))))


def same(a: list[tuple], b: list[tuple]) -> bool:
    """Equal row lists, NaN-free, with -0.0 == 0.0 (the reference may keep either zero of a tie)."""
    return len(a) == len(b) and all(x == y for x, y in zip(a, b))


CONFIGS = [
    dict(top_k=10),
    dict(top_k=0),
    dict(top_k=1),
    dict(top_k=10_000),
    dict(top_frac=0.1),
    dict(top_frac=0.07),
    dict(top_frac=1 / 3),
    dict(top_frac=1.0),
    dict(top_k=7, per_domain=True),
    dict(top_frac=0.25, per_domain=True),
    dict(top_frac=0.1, min_score=0.5),
    dict(top_k=15, min_score=-0.25),
    dict(top_k=4, per_domain=True, min_score=0.0),
    dict(top_frac=0.5, per_domain=True, min_score=1.0),
    dict(top_k=5, min_score=100.0),
]


@pytest.fixture
def small_batches(monkeypatch):
    """Tiny batches and compaction caps, so one small data set crosses every streaming path."""
    monkeypatch.setattr(sel, "_BATCH_ROWS", 7)
    monkeypatch.setattr(sel, "_COMPACT_MIN", 3)


# ------------------------------------------------------------------------------------------------------
# exactness


@pytest.mark.parametrize("opts", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("tiny", [False, True], ids=["default-batches", "tiny-batches"])
def test_matches_brute_force(tmp_path, opts, tiny, monkeypatch):
    monkeypatch.setattr(sel, "_plot", lambda *a: b"")  # the plot is checked elsewhere; keeps 90 runs fast
    if tiny:
        monkeypatch.setattr(sel, "_BATCH_ROWS", 7)
        monkeypatch.setattr(sel, "_COMPACT_MIN", 3)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        rows = random_rows(rng, int(rng.integers(150, 400)))
        src = tmp_path / f"run{seed}"
        write_partitions(src / "scores", rows, n_parts=int(rng.integers(2, 7)), rng=rng)
        out = tmp_path / f"out{seed}"
        summary = select(SelectConfig(scores=str(src), output=str(out), **opts))

        want = brute_force(rows, **opts)
        got = read_selection(out / "selection.parquet")
        assert same(got, want), (opts, seed)

        c = summary["counts"]
        mn = opts.get("min_score")
        nan = sum(math.isnan(r[1]) for r in rows)
        below = sum(1 for r in rows if not math.isnan(r[1]) and mn is not None and r[1] < mn)
        assert c == {"rows_total": len(rows), "rows_nan": nan, "rows_below_min_score": below,
                     "rows_wrong_answer": 0, "rows_defective": 0,
                     "rows_candidates": len(rows) - nan - below, "rows_selected": len(want)}
        thr = min((r[1] for r in want), default=None)
        assert summary["threshold_score"] == (thr if thr is None or math.isfinite(thr) else None)
        assert summary == json.loads((out / "selection.json").read_text())
        by_dom = {d["domain"]: d for d in summary["domains"]}
        assert set(by_dom) == {r[2] for r in rows}
        for d, entry in by_dom.items():
            drows = [r for r in rows if r[2] == d]
            dsel = [r for r in want if r[3] == d]
            assert entry["rows_total"] == len(drows)
            assert entry["rows_nan"] == sum(math.isnan(r[1]) for r in drows)
            assert entry["rows_selected"] == len(dsel)
            assert entry["rows_candidates"] == entry["rows_total"] - entry["rows_nan"] - entry["rows_below_min_score"]
        assert sum(d["rows_selected"] for d in summary["domains"]) == len(want)


def test_ties_broken_by_id_ascending(tmp_path):
    ids = ["b", "a", "é", "Z", "aa", "c", "€", "_"]
    rows = [(i, 1.0, "x") for i in ids] + [("top", 2.0, "x"), ("nan", math.nan, "x"), ("low", 0.5, "x")]
    rng = np.random.default_rng(0)
    rng.shuffle(rows)
    write_partitions(tmp_path / "s", rows, n_parts=3, rng=rng)
    select(SelectConfig(scores=str(tmp_path / "s"), output=str(tmp_path / "o"), top_k=5))
    got = read_selection(tmp_path / "o" / "selection.parquet")
    # Python str order == UTF-8 byte order: uppercase < '_' < lowercase < 'é' < '€'
    assert [r[0] for r in got] == ["top", "Z", "_", "a", "aa"]
    assert [r[2] for r in got] == [1, 2, 3, 4, 5]


def test_top_frac_is_the_ceiling_of_the_decimal_fraction(tmp_path):
    rows = [(f"r{i:03d}", float(i), None) for i in range(100)]
    rng = np.random.default_rng(1)
    write_partitions(tmp_path / "s", rows, n_parts=4, rng=rng)
    # 0.07 * 100 == 7.000000000000001 in binary floating point; the selection is 7 rows, not 8
    s = select(SelectConfig(scores=str(tmp_path / "s"), output=str(tmp_path / "a"), top_frac=0.07))
    assert s["counts"]["rows_selected"] == 7 and s["k"] == 7
    rows.append(("r100", 100.0, None))  # n = 101 -> ceil(10.1) = 11
    write_partitions(tmp_path / "t", rows, n_parts=4, rng=rng)
    s = select(SelectConfig(scores=str(tmp_path / "t"), output=str(tmp_path / "b"), top_frac=0.1))
    assert s["counts"]["rows_selected"] == 11
    assert s["threshold_score"] == 90.0


def test_nan_never_selected(tmp_path):
    rows = [(f"n{i}", math.nan, "d") for i in range(20)] + [("ok", -3.0, "d")]
    write_partitions(tmp_path / "s", rows, n_parts=3, rng=np.random.default_rng(2))
    s = select(SelectConfig(scores=str(tmp_path / "s"), output=str(tmp_path / "o"), top_frac=1.0))
    assert read_selection(tmp_path / "o" / "selection.parquet") == [("ok", -3.0, 1, "d")]
    assert s["counts"]["rows_nan"] == 20 and s["counts"]["rows_candidates"] == 1


def test_per_domain_ranks_are_global(tmp_path):
    rows = [(f"m{i}", 10.0 + i, "math") for i in range(5)] + [(f"c{i}", float(i), "code") for i in range(5)] \
        + [(f"n{i}", 5.5 + i / 10, None) for i in range(5)]
    write_partitions(tmp_path / "s", rows, n_parts=2, rng=np.random.default_rng(3))
    s = select(SelectConfig(scores=str(tmp_path / "s"), output=str(tmp_path / "o"), top_k=2, per_domain=True))
    got = read_selection(tmp_path / "o" / "selection.parquet")
    assert got == [("m4", 14.0, 1, "math"), ("m3", 13.0, 2, "math"), ("n4", 5.9, 3, None),
                   ("n3", 5.8, 4, None), ("c4", 4.0, 5, "code"), ("c3", 3.0, 6, "code")]
    doms = {d["domain"]: d for d in s["domains"]}
    assert doms[None]["threshold_score"] == 5.8 and doms["code"]["k"] == 2
    assert [d["domain"] for d in s["domains"]] == [None, "code", "math"]


def test_many_ties_bounded_by_compaction(tmp_path, small_batches):
    # every score equal: the threshold filter keeps everything, compaction must keep exactly the k smallest ids
    n = 500
    rng = np.random.default_rng(4)
    ids = [f"{x:04d}" for x in rng.permutation(n)]
    rows = [(i, 0.25, "d") for i in ids]
    write_partitions(tmp_path / "s", rows, n_parts=5, rng=rng)
    select(SelectConfig(scores=str(tmp_path / "s"), output=str(tmp_path / "o"), top_k=13))
    got = read_selection(tmp_path / "o" / "selection.parquet")
    assert got == [(f"{x:04d}", 0.25, x + 1, "d") for x in range(13)]


# ------------------------------------------------------------------------------------------------------
# inputs and outputs


def test_flat_layout_and_file_uri(tmp_path):
    rng = np.random.default_rng(5)
    rows = random_rows(rng, 120)
    write_partitions(tmp_path / "flat", rows, n_parts=3, rng=rng)
    s = select(SelectConfig(scores=f"file://{tmp_path / 'flat'}", output=f"file://{tmp_path / 'o'}", top_k=9))
    assert same(read_selection(tmp_path / "o" / "selection.parquet"), brute_force(rows, top_k=9))
    assert s["inputs"] == sorted(str(p) for p in (tmp_path / "flat").glob("part-*.parquet"))
    assert len(s["inputs"]) == 4  # 3 partitions + the empty one; hidden and non-parquet files skipped


def test_scores_subfolder_wins(tmp_path):
    rng = np.random.default_rng(6)
    rows = random_rows(rng, 80)
    write_partitions(tmp_path / "run" / "scores", rows, n_parts=2, rng=rng)
    # a stray partition next to scores/ is not read when scores/ exists
    pq.write_table(scores_table(["stray"], [1e9], ["x"]), tmp_path / "run" / "stray.parquet")
    select(SelectConfig(scores=str(tmp_path / "run"), output=str(tmp_path / "o"), top_k=3))
    assert same(read_selection(tmp_path / "o" / "selection.parquet"), brute_force(rows, top_k=3))


def test_memory_filesystem_in_and_out():
    import fsspec

    fs = fsspec.filesystem("memory")
    base = f"/air_ray_select_{uuid.uuid4().hex}"
    rng = np.random.default_rng(7)
    rows = random_rows(rng, 150)
    try:
        for i, chunk in enumerate((rows[:60], rows[60:])):
            with fs.open(f"{base}/in/scores/part-{i}.parquet", "wb") as f:
                pq.write_table(scores_table(*zip(*chunk)), f)
        with fs.open(f"{base}/in/scores/.part-2.parquet.tmp", "wb") as f:
            f.write(b"garbage")
        s = select(SelectConfig(scores=f"memory://{base}/in", output=f"memory://{base}/out",
                                top_frac=0.2, per_domain=True))
        with fs.open(f"{base}/out/selection.parquet", "rb") as f:
            t = pq.read_table(f)
        got = list(zip(*(t.column(c).to_pylist() for c in ("id", "score", "rank", "domain"))))
        assert same(got, brute_force(rows, top_frac=0.2, per_domain=True))
        assert s["inputs"] == [f"memory://{base}/in/scores/part-0.parquet", f"memory://{base}/in/scores/part-1.parquet"]
        assert json.loads(fs.cat(f"{base}/out/selection.json")) == s
        assert fs.cat(f"{base}/out/score_hist.png")[:8] == b"\x89PNG\r\n\x1a\n"
        assert not [p for p in fs.ls(f"{base}/out", detail=False) if p.rsplit("/", 1)[-1].startswith(".")]
    finally:
        if fs.exists(base):
            fs.rm(base, recursive=True)


def test_outputs_readable_everywhere(tmp_path):
    import duckdb
    import pandas as pd
    import polars as pl

    rng = np.random.default_rng(8)
    rows = random_rows(rng, 300)
    write_partitions(tmp_path / "s", rows, n_parts=4, rng=rng)
    out = tmp_path / "o"
    summary = select(SelectConfig(scores=str(tmp_path / "s"), output=str(out), top_frac=0.3, min_score=-1.0))
    want = brute_force(rows, top_frac=0.3, min_score=-1.0)
    path = str(out / "selection.parquet")

    df = pd.read_parquet(path)
    assert list(df.columns) == ["id", "score", "rank", "domain"]
    assert df["rank"].tolist() == list(range(1, len(want) + 1))
    assert df["id"].tolist() == [r[0] for r in want]
    assert [None if pd.isna(d) else d for d in df["domain"]] == [r[3] for r in want]

    pf = pl.read_parquet(path)
    assert pf.columns == ["id", "score", "rank", "domain"]
    assert pf["id"].to_list() == [r[0] for r in want] and pf["score"].to_list() == [r[1] for r in want]

    con = duckdb.connect()
    got = con.execute(f"SELECT id, score, rank, domain FROM read_parquet('{path}') ORDER BY rank").fetchall()
    assert same([tuple(r) for r in got], want)

    meta = json.loads(pq.read_schema(path).metadata[METADATA_KEY])
    assert meta == summary
    doc = json.loads((out / "selection.json").read_text())
    assert doc == summary
    assert doc["config"] == {"scores": str(tmp_path / "s"), "output": str(out), "top_k": None, "top_frac": 0.3,
                             "per_domain": False, "min_score": -1.0, "by": "score", "balance": None,
                             "balance_bins": None, "diversity": None, "exclude_wrong_answer": False,
                             "exclude_defective": False, "reference_field": None, "input": None, "seed": None}
    cands = np.array([r[1] for r in rows if not math.isnan(r[1]) and r[1] >= -1.0])
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, reported as null
        q = dict(zip(["p0", "p10", "p25", "p50", "p75", "p90", "p99", "p100"],
                     np.quantile(cands, [0, .1, .25, .5, .75, .9, .99, 1])))
    assert doc["quantiles"] == {k: (float(v) if math.isfinite(v) else None) for k, v in q.items()}
    assert sum(doc["histogram"]["counts"]) + doc["histogram"]["non_finite"] == len(cands)
    assert len(doc["histogram"]["edges"]) == sel.HIST_BINS + 1
    png = (out / "score_hist.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert sorted(p.name for p in out.iterdir()) == ["score_hist.png", "selection.json", "selection.parquet"]


def test_rerun_overwrites(tmp_path):
    rng = np.random.default_rng(9)
    rows = random_rows(rng, 100)
    write_partitions(tmp_path / "s", rows, n_parts=2, rng=rng)
    select(SelectConfig(scores=str(tmp_path / "s"), output=str(tmp_path / "o"), top_k=20))
    select(SelectConfig(scores=str(tmp_path / "s"), output=str(tmp_path / "o"), top_k=4))
    assert len(read_selection(tmp_path / "o" / "selection.parquet")) == 4
    assert json.loads((tmp_path / "o" / "selection.json").read_text())["counts"]["rows_selected"] == 4


def test_empty_selection_when_no_candidates(tmp_path):
    rows = [("a", math.nan, "d"), ("b", 1.0, "d")]
    write_partitions(tmp_path / "s", rows, n_parts=2, rng=np.random.default_rng(10))
    s = select(SelectConfig(scores=str(tmp_path / "s"), output=str(tmp_path / "o"), top_k=3, min_score=2.0))
    assert read_selection(tmp_path / "o" / "selection.parquet") == []
    assert s["threshold_score"] is None and s["counts"]["rows_candidates"] == 0
    assert s["quantiles"]["p50"] is None
    assert (tmp_path / "o" / "score_hist.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------------
# errors


def test_no_partitions(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AirRayError, match="no score partitions"):
        select(SelectConfig(scores=str(tmp_path / "empty"), output=str(tmp_path / "o"), top_k=1))
    hidden = tmp_path / "hidden" / "scores"
    hidden.mkdir(parents=True)
    (hidden / ".part-0.parquet.tmp").write_bytes(b"x")
    (hidden / "_SUCCESS").write_bytes(b"")
    with pytest.raises(AirRayError, match="no score partitions"):
        select(SelectConfig(scores=str(tmp_path / "hidden"), output=str(tmp_path / "o"), top_k=1))
    with pytest.raises(AirRayError, match="no scores at"):
        select(SelectConfig(scores=str(tmp_path / "missing"), output=str(tmp_path / "o"), top_k=1))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("opts", [
    dict(), dict(top_k=3, top_frac=0.5), dict(top_k=-1), dict(top_k=1.5), dict(top_k=True),
    dict(top_frac=0.0), dict(top_frac=1.5), dict(top_frac=-0.1), dict(top_frac=math.nan),
    dict(top_k=1, min_score=math.nan), dict(top_k=1, per_domain="yes"),
])
def test_bad_config(tmp_path, opts):
    write_partitions(tmp_path / "s", [("a", 1.0, None)], n_parts=1, rng=np.random.default_rng(0))
    with pytest.raises(AirRayError) as e:
        select(SelectConfig(scores=str(tmp_path / "s"), output=str(tmp_path / "o"), **opts))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


def test_not_a_scores_partition(tmp_path):
    (tmp_path / "s").mkdir()
    pq.write_table(pa.table({"id": ["a"], "other": [1.0]}), tmp_path / "s" / "part-0.parquet")
    with pytest.raises(AirRayError, match="no column"):
        select(SelectConfig(scores=str(tmp_path / "s"), output=str(tmp_path / "o"), top_k=1))


def test_corrupt_partition(tmp_path):
    write_partitions(tmp_path / "s", [("a", 1.0, None)], n_parts=1, rng=np.random.default_rng(0))
    (tmp_path / "s" / "part-bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(AirRayError, match="cannot read"):
        select(SelectConfig(scores=str(tmp_path / "s"), output=str(tmp_path / "o"), top_k=1))


# ------------------------------------------------------------------------------------------------------
# bounded memory


MEMORY_CHILD = textwrap.dedent("""
    import json, sys, time
    from air_ray.config import SelectConfig
    from air_ray.outputs.select import select
    import pyarrow, pyarrow.dataset, pyarrow.compute, numpy, matplotlib.figure, matplotlib.backends.backend_agg
    def peak_mb():  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
        return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    before = next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
    t = time.perf_counter()
    summary = select(SelectConfig(scores=sys.argv[1], output=sys.argv[2], top_frac=0.1))
    print(json.dumps({"before_mb": before, "peak_mb": peak_mb(), "seconds": time.perf_counter() - t,
                      "counts": summary["counts"], "threshold": summary["threshold_score"]}))
""")


def synthetic_partitions(root: Path, rows: int, parts: int, seed: int = 0) -> int:
    """``rows`` SCORES rows (unique ids in random order, ~1% NaN, ties) in ``parts`` files; returns NaN count."""
    import pyarrow.compute as pc

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    perm = rng.permutation(rows)
    nan_total = 0
    for p, idx in enumerate(np.array_split(perm, parts)):
        n = len(idx)
        ids = pc.binary_join_element_wise("id-", pc.utf8_lpad(pa.array(idx).cast(pa.string()), 10, "0"), "")
        score = np.round(rng.normal(size=n), 4)
        score[rng.random(n) < 0.01] = np.nan
        nan_total += int(np.isnan(score).sum())
        domain = pa.array(np.array(["math", "code", "science", "chat"])[rng.integers(0, 4, n)])
        cols = {f.name: pa.nulls(n, f.type) for f in SCORES}
        cols.update(id=ids, domain=domain, score=pa.array(score), source=pa.repeat("synthetic", n),
                    n_prompt_tokens=pa.array(np.full(n, 10, np.int32)),
                    n_response_tokens=pa.array(np.full(n, 20, np.int32)),
                    loss_base=pa.array(np.ones(n)), loss_ref=pa.array(np.ones(n)),
                    truncated=pa.array(np.zeros(n, bool)), entropy_base=pa.array(np.full(n, 2.0)))
        pq.write_table(pa.Table.from_pydict(cols, schema=SCORES), root / f"part-{p:05d}.parquet")
    return nan_total


def test_memory_bounded_two_million_rows(tmp_path):
    rows, parts = 2_000_000, 20
    nan = synthetic_partitions(tmp_path / "run" / "scores", rows, parts)
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(tmp_path / "run"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = r["peak_mb"] - r["before_mb"]
    print(f"select of {rows} rows: {r['seconds']:.1f} s, peak RSS {r['peak_mb']:.0f} MB, growth {growth:.0f} MB")
    # 2M candidate scores are 16 MB and the 200k selected rows a few MB: anything near the data size is a leak
    assert growth < 500, r
    n_cand = rows - nan
    assert r["counts"]["rows_candidates"] == n_cand
    assert r["counts"]["rows_selected"] == math.ceil(Fraction(1, 10) * n_cand)
    t = pq.read_table(tmp_path / "out" / "selection.parquet")
    assert t["rank"].to_pylist() == list(range(1, t.num_rows + 1))
    s = t["score"].to_numpy()
    assert (np.diff(s) <= 0).all() and s[-1] == r["threshold"]


@pytest.mark.parametrize("by", ["loss_base", "entropy_base", "n_response_tokens", "random"])
def test_select_by_a_baseline(tmp_path, by):
    """--by ranks a heuristic column (descending) or a seeded random order, with the same machinery."""
    rng = np.random.default_rng(3)
    n = 500
    ids = [f"r{i:04d}" for i in rng.permutation(n)]
    t = scores_table(ids, rng.normal(size=n), [None] * n)
    loss = np.round(rng.random(n) * 3, 2)  # ties
    length = rng.integers(5, 400, n).astype(np.int32)
    t = t.set_column(t.schema.get_field_index("loss_base"), "loss_base", pa.array(loss))
    t = t.set_column(t.schema.get_field_index("n_response_tokens"), "n_response_tokens", pa.array(length))
    t = t.set_column(t.schema.get_field_index("entropy_base"), "entropy_base", pa.array(rng.random(n) * 4))
    root = tmp_path / "s" / "scores"
    root.mkdir(parents=True)
    pq.write_table(t.slice(0, 200), root / "a.parquet")
    pq.write_table(t.slice(200), root / "b.parquet")
    out = tmp_path / f"sel-{by}"
    summary = select(SelectConfig(scores=str(tmp_path / "s"), output=str(out), top_k=50, by=by, seed=7))
    got = pq.read_table(out / "selection.parquet").to_pylist()
    rows = t.to_pylist()
    if by == "random":
        import hashlib

        def key(r):
            h = hashlib.blake2b(b"7:" + r["id"].encode(), digest_size=8).digest()
            return int.from_bytes(h, "little") / 2.0**64
        again = select(SelectConfig(scores=str(tmp_path / "s"), output=str(tmp_path / "again"), top_k=50,
                                    by=by, seed=7))
        assert [r["id"] for r in pq.read_table(tmp_path / "again" / "selection.parquet").to_pylist()] == \
            [r["id"] for r in got] and again["config"]["seed"] == 7
        other = select(SelectConfig(scores=str(tmp_path / "s"), output=str(tmp_path / "other"), top_k=50,
                                    by=by, seed=8))
        assert other["threshold_score"] != summary["threshold_score"]
    else:
        def key(r):
            return float(r[by])
    want = sorted(rows, key=lambda r: (-key(r), r["id"]))[:50]
    assert [r["id"] for r in got] == [r["id"] for r in want]
    assert [r["score"] for r in got] == pytest.approx([key(r) for r in want])  # the value ranked
    assert summary["config"]["by"] == by and summary["ranking"]["score"].startswith(f"the value ranked: {by}")


def test_select_by_unknown_column(tmp_path):
    with pytest.raises(AirRayError, match="--by"):
        select(SelectConfig(scores=str(tmp_path), output=str(tmp_path / "o"), top_k=1, by="length"))


# ------------------------------------------------------------------------------------------------------
# --by delta, --balance (issue #25)


def balanced_brute_force(rows, top_k=None, top_frac=None, per_domain=False, min_score=None, bins=4, by="score"):
    """Reference of --balance loss_base: rows (id, score, domain, loss_base, loss_ref). Candidates per domain group
    cut at the j/bins quantiles of loss_base (numpy's default interpolation; a row equal to an edge goes up), k
    split over the bins in proportion to their sizes (largest remainder, ties to the lower bin), the best of
    each bin by (value desc, id asc), then all ranked together."""
    def value(r):
        return r[4] - r[3] if by == "delta" else r[1]

    cands = [r for r in rows if not math.isnan(value(r)) and not math.isnan(r[3])
             and (min_score is None or value(r) >= min_score)]
    groups: dict = {}
    for r in cands:
        groups.setdefault(r[2] if per_domain else "*", []).append(r)
    chosen = []
    for rs in groups.values():
        k = top_k if top_k is not None else math.ceil(Fraction(str(top_frac)) * len(rs))
        k = min(k, len(rs))
        edges = np.quantile([r[3] for r in rs], [j / bins for j in range(1, bins)])
        per_bin: dict = {b: [] for b in range(bins)}
        for r in rs:
            per_bin[sum(1 for e in edges if r[3] >= e)].append(r)
        exact = {b: Fraction(k * len(per_bin[b]), len(rs)) for b in per_bin}
        quota = {b: math.floor(e) for b, e in exact.items()}
        for b in sorted(per_bin, key=lambda b: (-(exact[b] - quota[b]), b))[:k - sum(quota.values())]:
            quota[b] += 1
        for b, members in per_bin.items():
            members.sort(key=lambda r: (-value(r), r[0]))
            chosen += members[:quota[b]]
    chosen.sort(key=lambda r: (-value(r), r[0]))
    return [(r[0], value(r), i + 1, r[2]) for i, r in enumerate(chosen)]


def rows_with_losses(rng, n: int) -> list[tuple]:
    """random_rows plus loss_base (many ties, some NaN) and loss_ref."""
    out = []
    for r in random_rows(rng, n):
        lb = float(rng.integers(0, 12)) / 4 if rng.random() > 0.03 else math.nan
        out.append((*r, lb, lb + float(rng.integers(-3, 9)) / 8))
    return out


BALANCED = [dict(top_k=12), dict(top_frac=0.3), dict(top_k=9, per_domain=True), dict(top_frac=0.5, min_score=0.0),
            dict(top_k=1000), dict(top_k=0)]


@pytest.mark.parametrize("opts", BALANCED, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("by", ["score", "delta"])
def test_balance_matches_brute_force(tmp_path, opts, by, small_batches, monkeypatch):
    monkeypatch.setattr(sel, "_plot", lambda *a: b"")
    for seed, bins in ((0, 4), (1, 3), (2, 1)):
        rng = np.random.default_rng(seed)
        rows = rows_with_losses(rng, int(rng.integers(150, 300)))
        src, out = tmp_path / f"s{seed}", tmp_path / f"o{seed}"
        write_partitions(src / "scores", rows, n_parts=3, rng=rng)
        summary = select(SelectConfig(scores=str(src), output=str(out), by=by, balance="loss_base",
                                      balance_bins=bins, **opts))
        want = balanced_brute_force(rows, bins=bins, by=by, **opts)
        got = read_selection(out / "selection.parquet")
        assert [r[0] for r in got] == [r[0] for r in want], (opts, seed)
        assert [r[1] for r in got] == pytest.approx([r[1] for r in want])
        assert summary["counts"]["rows_nan"] == sum(math.isnan(r[3]) or math.isnan(r[4] - r[3] if by == "delta"
                                                                                   else r[1]) for r in rows)
        for g in summary["balance"]:
            assert sum(g["rows_selected"]) == sum(g["k"]) and len(g["rows_candidates"]) == bins
            assert all(s <= n for s, n in zip(g["rows_selected"], g["rows_candidates"]))
        assert sum(sum(g["rows_selected"]) for g in summary["balance"]) == len(want)


def test_split_quota():
    assert sel.split_quota(10, np.array([5, 5, 5, 5])).tolist() == [3, 3, 2, 2]  # remainders tie: lower bins
    assert sel.split_quota(3, np.array([1, 0, 9])).tolist() == [0, 0, 3]
    assert sel.split_quota(7, np.array([2, 2, 2])).tolist() == [2, 2, 2]  # never more than a bin holds
    assert sel.split_quota(0, np.array([4, 4])).tolist() == [0, 0]
    for k in range(0, 40):
        q = sel.split_quota(k, np.array([7, 3, 11, 0, 5]))
        assert q.sum() == min(k, 26) and (q <= [7, 3, 11, 0, 5]).all()


def test_select_by_delta(tmp_path):
    rng = np.random.default_rng(3)
    rows = rows_with_losses(rng, 120)
    write_partitions(tmp_path / "s", rows, n_parts=2, rng=rng)
    summary = select(SelectConfig(scores=str(tmp_path / "s"), output=str(tmp_path / "o"), top_k=10, by="delta"))
    want = sorted((r for r in rows if not math.isnan(r[4] - r[3])), key=lambda r: (-(r[4] - r[3]), r[0]))[:10]
    got = read_selection(tmp_path / "o" / "selection.parquet")
    assert [r[0] for r in got] == [r[0] for r in want]
    assert [r[1] for r in got] == pytest.approx([r[4] - r[3] for r in want])
    assert summary["config"]["by"] == "delta" and summary["bias"]["value"] == "delta"


def hand_spearman(x, y):
    """rho = 1 - 6 sum d^2 / (n (n^2 - 1)) for values without ties."""
    rank = lambda v: {val: i + 1 for i, val in enumerate(sorted(v))}  # noqa: E731
    rx, ry = rank(x), rank(y)
    d2 = sum((rx[a] - ry[b]) ** 2 for a, b in zip(x, y))
    n = len(x)
    return 1 - 6 * d2 / (n * (n * n - 1))


def test_bias_audit_against_hand_computation(tmp_path, capsys):
    # 8 rows: the score falls as loss_base rises (an inverse-loss ranking), one NaN score is no candidate
    lb = [0.2, 0.4, 0.5, 0.9, 1.3, 1.7, 2.2, 3.0, 1.0]
    lr = [1.2, 1.3, 1.1, 1.5, 1.9, 2.0, 2.5, 3.1, 1.0]
    sc = [5.0, 2.25, 1.2, 0.66, 0.46, 0.2, 0.15, 0.03, math.nan]
    ids = [f"r{i}" for i in range(9)]
    lengths = [40, 90, 10, 60, 70, 20, 80, 30, 50]
    t = scores_table(ids, sc, ["a"] * 4 + ["b"] * 5, loss_base=lb, loss_ref=lr)
    t = t.set_column(t.schema.get_field_index("n_response_tokens"), "n_response_tokens",
                     pa.array(lengths, pa.int32()))
    (tmp_path / "s").mkdir()
    pq.write_table(t, tmp_path / "s" / "p.parquet")
    summary = select(SelectConfig(scores=str(tmp_path / "s"), output=str(tmp_path / "o"), top_k=3))
    b = summary["bias"]
    assert b["rows_candidates"] == 8 and b["rows_sampled"] == 8
    assert b["spearman"]["loss_base"] == pytest.approx(hand_spearman(sc[:8], lb[:8]), abs=1e-4) == -1.0
    assert b["spearman"]["n_response_tokens"] == pytest.approx(hand_spearman(sc[:8], lengths[:8]), abs=1e-4)
    assert b["spearman"]["entropy_base"] is None  # constant: no correlation defined
    assert b["pool_mean"]["loss_base"] == pytest.approx(sum(lb[:8]) / 8)
    assert b["pool_mean"]["score"] == pytest.approx(sum(sc[:8]) / 8)
    assert b["selected_mean"]["loss_base"] == pytest.approx((0.2 + 0.4 + 0.5) / 3)
    assert b["selected_mean"]["n_response_tokens"] == pytest.approx((40 + 90 + 10) / 3)
    # several domains: the same per domain
    dom = {d["domain"]: d for d in b["domains"]}
    assert dom["a"]["spearman"]["loss_base"] == pytest.approx(-1.0)
    assert dom["b"]["pool_mean"]["loss_base"] == pytest.approx(sum(lb[4:8]) / 4)
    assert dom["b"]["selected_mean"]["loss_base"] is None  # none of b selected
    assert dom["a"]["selected_mean"]["loss_base"] == pytest.approx((0.2 + 0.4 + 0.5) / 3)
    # |rho| >= 0.5 with loss_base: one warning line naming the option that removes it
    assert "Spearman -1.00 with loss_base" in b["warning"] and "--balance loss_base" in b["warning"]
    err = capsys.readouterr().err
    assert err.count("air-ray: warning:") == 1 and "--balance loss_base" in err
    # balanced: no warning, the selection follows the pool's loss_base
    summary = select(SelectConfig(scores=str(tmp_path / "s"), output=str(tmp_path / "o2"), top_k=4,
                                  balance="loss_base", balance_bins=4))
    assert "warning" not in summary["bias"] and "air-ray: warning" not in capsys.readouterr().err
    assert [g["rows_selected"] for g in summary["balance"]] == [[1, 1, 1, 1]]
    # --by delta: rho of delta with loss_base
    delta = [r - b_ for r, b_ in zip(lr, lb)]
    summary = select(SelectConfig(scores=str(tmp_path / "s"), output=str(tmp_path / "o3"), top_k=2, by="delta"))
    assert summary["bias"]["spearman"]["loss_base"] == pytest.approx(hand_spearman(delta[:9], lb[:9]), abs=1e-4)
    assert summary["bias"]["pool_mean"]["delta"] == pytest.approx(sum(delta) / 9)


def test_bias_sample_is_evenly_spaced(tmp_path, monkeypatch):
    monkeypatch.setattr(sel, "BIAS_SAMPLE", 10)
    n = 97
    lb = np.linspace(0.1, 3.0, n)
    t = scores_table([f"r{i:03d}" for i in range(n)], 1.0 / lb, [None] * n, loss_base=lb, loss_ref=lb + 0.5)
    (tmp_path / "s").mkdir()
    pq.write_table(t.slice(0, 50), tmp_path / "s" / "a.parquet")
    pq.write_table(t.slice(50), tmp_path / "s" / "b.parquet")
    summary = select(SelectConfig(scores=str(tmp_path / "s"), output=str(tmp_path / "o"), top_k=5))
    b = summary["bias"]
    assert b["rows_sampled"] == 10 and "10 evenly spaced rows of 97" in b["sample"]
    assert b["spearman"]["loss_base"] == pytest.approx(-1.0)
    assert b["pool_mean"]["loss_base"] == pytest.approx(lb.mean())  # the means are over every candidate
