"""Scale (issue #33): a large JSON-lines file read in byte ranges (no row lost or doubled at a split: rows across a
boundary, CRLF, blank lines, a last line without a newline; a gzip file is read whole), and the id pass past its
memory limit (the (hash, order) pairs spill to disk and give the same duplicates)."""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from air_ray.data import ids as dedupe
from air_ray.data.corpus import Split, plan_splits, read_chunks


def _whole(path: str) -> list[tuple]:
    return [(line, text) for c in read_chunks(path, 7) for line, text in zip(c.lines, c.texts)]


def _by_splits(path: str, split_bytes: int) -> tuple[list[tuple], list[Split]]:
    """Every split read on its own (as the id pass does: lines counted from 1), then numbered from the counts."""
    size = Path(path).stat().st_size
    splits = plan_splits(path, size, split_bytes)
    got, first = [], 1
    for s in splits:
        counts: dict = {}
        for c in read_chunks(replace(s, first_line=first), 5, counts):
            assert c.file_error is None
            got += list(zip(c.lines, c.texts))
        first += counts.get("lines", 0)
    return got, splits


def test_splits_give_every_row_once(tmp_path):
    rng = random.Random(0)
    path = str(tmp_path / "rows.jsonl")
    for trial in range(200):
        lines = []
        for i in range(rng.randint(0, 40)):
            u = rng.random()
            lines.append("" if u < 0.1 else "  " if u < 0.15 else json.dumps({"id": i, "t": "é" * rng.randint(0, 60)}))
        eol = rng.choice(["\n", "\r\n"])
        Path(path).write_text(eol.join(lines) + (eol if rng.random() < 0.5 else ""), encoding="utf-8", newline="")
        split_bytes = rng.randint(1, 120)
        got, splits = _by_splits(path, split_bytes)
        assert got == _whole(path), (trial, split_bytes, len(splits))


def test_a_row_across_a_boundary_belongs_to_the_split_it_starts_in(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [json.dumps({"id": f"r{i}", "pad": "x" * 30}) for i in range(10)]
    path.write_text("\n".join(rows))  # no newline at the end
    size = path.stat().st_size
    boundary = len(rows[0]) + 1 + 5  # 5 bytes into row 2
    splits = [Split(str(path), 0, 2, 0, boundary), Split(str(path), 1, 2, boundary, None)]
    first = [(c.lines, c.texts) for c in read_chunks(splits[0], 100)]
    counts: dict = {}
    second = [(c.lines, c.texts) for c in read_chunks(replace(splits[1], first_line=1), 100, counts)]
    assert [json.loads(t)["id"] for t in first[0][1]] == ["r0", "r1"]  # r1 starts before the boundary: read whole
    assert [json.loads(t)["id"] for t in second[0][1]] == [f"r{i}" for i in range(2, 10)]
    assert counts["lines"] == 8 and size > boundary
    # a boundary exactly at a line start: that line opens the next split
    at = len(rows[0]) + 1
    a = read_chunks(Split(str(path), 0, 2, 0, at), 100)
    b = read_chunks(Split(str(path), 1, 2, at, None), 100)
    assert [json.loads(t)["id"] for c in a for t in c.texts] == ["r0"]
    assert [json.loads(t)["id"] for c in b for t in c.texts][0] == "r1"


def test_only_uncompressed_json_lines_are_split(tmp_path):
    rows = "".join(json.dumps({"id": i}) + "\n" for i in range(1000))
    gz = tmp_path / "rows.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(rows)
    assert plan_splits(str(gz), gz.stat().st_size, 100) == [Split(str(gz))]  # read whole, by one task
    assert len([t for c in read_chunks(str(gz), 64) for t in c.texts]) == 1000
    assert len(plan_splits(str(tmp_path / "a.json"), 10**9, 100)) == 1  # a JSON array is read whole
    assert len(plan_splits(str(tmp_path / "a.parquet"), 10**9, 100)) == 1
    plain = plan_splits(str(tmp_path / "a.jsonl"), 1001, 100)
    assert len(plain) == 11 and plain[0].start == 0 and plain[-1].end is None
    assert all(a.end == b.start for a, b in zip(plain, plain[1:]))  # contiguous, from the size alone


# ------------------------------------------------------------------------------------------------------
# the id pass


def _pairs(rng, n: int, dup_rate: float):
    hashes = rng.integers(-2**63, 2**63 - 1, size=n, dtype=np.int64)
    dups = rng.random(n) < dup_rate
    hashes[dups] = hashes[rng.integers(0, n, size=int(dups.sum()))]
    orders = rng.permutation(n).astype(np.int64)
    return hashes, orders


def test_id_table_spills_past_its_limit_and_finds_the_same_duplicates():
    rng = np.random.default_rng(0)
    hashes, orders = _pairs(rng, 5000, 0.05)
    want = dedupe.find_duplicates(hashes, orders)
    assert len(want) > 100
    prior_h, prior_o = dedupe.prior_orders(hashes[:40])
    with_prior = dedupe.find_duplicates(np.concatenate([prior_h, hashes]), np.concatenate([prior_o, orders]))
    for limit in (10**9, 100, 1):
        with dedupe.IdTable(limit=limit, buckets=8) as table:
            table.add(prior_h, prior_o)
            for a in range(0, 5000, 333):  # as the id pass adds them: a file or split at a time
                table.add(hashes[a:a + 333], orders[a:a + 333])
            assert table.spilled == (limit < 5000) and table.nbytes == 16 * (5000 + len(prior_h))
            assert table.duplicates() == with_prior
        if table.dir:
            assert not Path(table.dir).exists()  # removed on close
    with dedupe.IdTable(limit=1) as table:
        table.add(hashes, orders)
        assert table.duplicates() == want


def test_split_orders_name_the_files_lines():
    files = ["a.jsonl", "big.jsonl"]
    first_lines = {1: [1, 101, 250]}  # big.jsonl read in three splits
    dups = {dedupe.order_key(1, 5, 2): dedupe.order_key(1, 7, 1), dedupe.order_key(0, 3): -1,
            dedupe.order_key(1, 1, 0): dedupe.order_key(0, 2)}
    assert dedupe.by_source(dups, files, first_lines) == {
        "big.jsonl": {254: "first occurrence: big.jsonl:107", 1: "first occurrence: a.jsonl:2"},
        "a.jsonl": {3: "first occurrence: already scored in this output"}}


@pytest.mark.slow
def test_a_split_corpus_scores_as_the_whole_file_does(tiny_model, gsm8k_rows, tmp_path, monkeypatch):
    """The same corpus scored whole and in 2 kB ranges (in this process, with the id pass forced to spill: the driver
    holds no more than 3 of its (hash, order) pairs at once): the same scores, every row once, rejected rows named by
    the file's own line numbers."""
    from air_ray.config import ScoreConfig
    from air_ray.pipeline.score import run_score

    model, heads = tiny_model
    rows = [dict(r) for r in gsm8k_rows[:24]]
    lines = [json.dumps(r) for r in rows]
    lines.insert(5, "")  # a blank line
    lines.insert(9, json.dumps(rows[2]))  # an id seen before (line 3): a duplicate in another split
    lines.append("{not json")
    corpus = tmp_path / "big.jsonl"
    corpus.write_text("\r\n".join(lines), newline="")  # CRLF, no newline at the end
    monkeypatch.setattr(dedupe, "MEMORY_ROWS", 3)
    runs = {}
    for name, split_bytes in (("whole", 1 << 30), ("split", 2000)):
        cfg = ScoreConfig(input=[str(corpus)], output=str(tmp_path / name), model=str(model), heads=str(heads),
                          dtype="float32", device="cpu", executor="in-process", rows_per_partition=4,
                          split_bytes=split_bytes, progress=False)
        runs[name] = run_score(cfg)
    m = runs["split"]
    assert m.id_pass["splits"] > 3 and m.id_pass["spilled_to_disk"] and m.id_pass["records"] == 26
    for name in runs:
        c = runs[name].counts
        assert (c["rows_read"], c["rows_scored"], c["rows_rejected"]) == (26, 24, 2), name
    read = {name: {r["id"]: r["score"] for r in pq.read_table(tmp_path / name / "scores").to_pylist()}
            for name in runs}
    # the same rows, the same scores (other partitions batch them otherwise: float32 sums in another order)
    assert read["split"].keys() == read["whole"].keys() and len(read["split"]) == 24
    assert read["split"] == {k: pytest.approx(v, abs=1e-6) for k, v in read["whole"].items()}
    rejected = sorted((r["line"], r["reason"], r["detail"][:30]) for r in
                      pq.read_table(tmp_path / "split" / "rejected").to_pylist())
    assert rejected == [(10, "duplicate_id", f"first occurrence: {corpus}:3"[:30]), (27, "invalid_json",
                                                                                     rejected[1][2])]
