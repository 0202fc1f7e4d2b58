"""select --diversity K (k-means quotas on the scores' embedding) and the corpus filters --exclude-wrong-answer /
--exclude-defective with their audit (issue #32): exact against brute force, deterministic under a seed, counts that
reconcile. No model: score partitions and corpora written here."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import air_ray.outputs.select as sel
from air_ray.config import SelectConfig
from air_ray.data.answers import answer_status, find_reference, reference_answer
from air_ray.errors import AirRayError
from air_ray.outputs.clusters import fit
from air_ray.outputs.select import select, split_quota
from air_ray.store.schemas import EMBED_DIMS, scores_schema


def scores_table(ids, scores, domains, embeddings=None, loss_base=None, source="corpus.jsonl") -> pa.Table:
    n = len(ids)
    schema = scores_schema(embed=embeddings is not None)
    cols = {
        "id": pa.array(ids, pa.string()), "domain": pa.array(domains, pa.string()),
        "source": pa.array([source] * n, pa.string()),
        "n_prompt_tokens": pa.array(np.full(n, 12, np.int32)), "n_response_tokens": pa.array(np.full(n, 40, np.int32)),
        "loss_base": pa.array(np.ones(n) if loss_base is None else np.asarray(loss_base, np.float64)),
        "loss_ref": pa.array(np.full(n, 2.0)), "score": pa.array(np.asarray(scores, np.float64)),
        "truncated": pa.array(np.zeros(n, bool)), "entropy_base": pa.array(np.full(n, 2.0)),
    }
    if embeddings is not None:
        cols["embedding"] = pa.array([None if e is None else list(map(float, e)) for e in embeddings],
                                     schema.field("embedding").type)
    for f in schema:
        cols.setdefault(f.name, pa.nulls(n, f.type))
    return pa.Table.from_pydict(cols, schema=schema)


def blobs(rng, sizes: list[int], spread: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Points around len(sizes) well-separated directions (EMBED_DIMS dims): (X, true group)."""
    centres = np.eye(EMBED_DIMS)[:len(sizes)] * 10.0
    xs, gs = [], []
    for g, n in enumerate(sizes):
        xs.append(centres[g] + spread * rng.standard_normal((n, EMBED_DIMS)))
        gs += [g] * n
    return np.concatenate(xs), np.asarray(gs)


def write(root: Path, table: pa.Table, parts: int = 3) -> None:
    (root / "scores").mkdir(parents=True)
    cuts = np.linspace(0, table.num_rows, parts + 1).astype(int)
    for i in range(parts):
        pq.write_table(table.slice(cuts[i], cuts[i + 1] - cuts[i]), root / "scores" / f"part-{i}.parquet")


# ------------------------------------------------------------------------------------------------------
# k-means and --diversity


def test_kmeans_finds_separated_groups_and_is_deterministic():
    rng = np.random.default_rng(0)
    x, truth = blobs(rng, [30, 50, 20])
    a, b = fit(x, 3, seed=7), fit(x, 3, seed=7)
    assert np.array_equal(a.centres, b.centres) and a.iterations == b.iterations
    got = a.assign(x)
    # the same partition as the truth, whatever the cluster numbers
    pairs = set(zip(got.tolist(), truth.tolist()))
    assert len(pairs) == 3 and len({p[0] for p in pairs}) == 3
    with pytest.raises(AirRayError, match="only 2 rows have an embedding"):
        fit(x[:2], 3, seed=0)


def diverse_brute_force(ids, scores, groups, k):
    """k split over the groups in proportion to their sizes (largest remainder, ties to the lower group); each
    group's best rows by (score desc, id asc); all ranked together."""
    gs = sorted(set(groups))
    sizes = [sum(1 for g in groups if g == x) for x in gs]
    exact = [Fraction(k * n, len(ids)) for n in sizes]
    quota = [math.floor(e) for e in exact]
    for i in sorted(range(len(gs)), key=lambda i: (-(exact[i] - quota[i]), i))[:k - sum(quota)]:
        quota[i] += 1
    chosen = []
    for g, q in zip(gs, quota):
        members = sorted((r for r in zip(ids, scores, groups) if r[2] == g), key=lambda r: (-r[1], r[0]))
        chosen += members[:q]
    return [r[0] for r in sorted(chosen, key=lambda r: (-r[1], r[0]))], dict(zip(gs, quota))


@pytest.mark.parametrize("k", [0, 1, 7, 20, 99, 100, 500])
def test_diversity_quotas_match_brute_force(tmp_path, k, monkeypatch):
    monkeypatch.setattr(sel, "_BATCH_ROWS", 11)  # many batches in both passes
    monkeypatch.setattr(sel, "_plot", lambda *a: b"")
    rng = np.random.default_rng(1)
    x, truth = blobs(rng, [17, 45, 38])
    n = len(x)
    order = rng.permutation(n)
    x, truth = x[order], truth[order]
    ids = [f"r{i:03d}" for i in range(n)]
    scores = np.round(rng.standard_normal(n), 1)  # ties
    write(tmp_path / "run", scores_table(ids, scores, ["math"] * n, x))
    summary = select(SelectConfig(scores=str(tmp_path / "run"), output=str(tmp_path / "o"), top_k=k, diversity=3,
                                  seed=5))
    got = pq.read_table(tmp_path / "o" / "selection.parquet").column("id").to_pylist()
    # the clusters are the blobs (relabelled): the quotas follow their sizes
    cluster = fit(x, 3, 5).assign(x)
    want, quota = diverse_brute_force(ids, scores.tolist(), cluster.tolist(), min(k, n))
    assert got == want
    d = summary["diversity"]["domains"][0]
    assert sum(d["k"]) == min(k, n) == len(got) and d["rows_selected"] == d["k"]
    assert sorted(d["rows_candidates"]) == [17, 38, 45]
    for size, share in zip(d["rows_candidates"], d["k"]):  # each group's share rounded fairly: floor or ceil
        exact = Fraction(min(k, n) * size, n)
        assert math.floor(exact) <= share <= math.ceil(exact)
    assert summary["diversity"]["groups"] == 3 and summary["diversity"]["fit_rows"] == n
    # deterministic under the seed: the same files again
    again = select(SelectConfig(scores=str(tmp_path / "run"), output=str(tmp_path / "o2"), top_k=k, diversity=3,
                                seed=5))
    assert pq.read_table(tmp_path / "o2" / "selection.parquet").column("id").to_pylist() == got
    assert again["diversity"] == summary["diversity"]


def test_diversity_with_balance_per_domain_and_random(tmp_path, monkeypatch):
    monkeypatch.setattr(sel, "_BATCH_ROWS", 13)
    rng = np.random.default_rng(2)
    x, _ = blobs(rng, [40, 40, 40], spread=2.0)  # overlapping: k-means has work to do
    n = len(x)
    ids = [f"q{i:03d}" for i in range(n)]
    domains = ["a" if i % 3 else "b" for i in range(n)]
    lb = rng.uniform(0.1, 3.0, n)
    write(tmp_path / "run", scores_table(ids, rng.standard_normal(n), domains, x, loss_base=lb))
    for by in ("score", "random"):
        s = select(SelectConfig(scores=str(tmp_path / "run"), output=str(tmp_path / f"o-{by}"), top_k=12, by=by,
                                diversity=4, balance="loss_base", balance_bins=2, per_domain=True, seed=3))
        assert s["counts"]["rows_selected"] == 24  # 12 per domain
        for d in s["diversity"]["domains"]:
            assert sum(d["k"]) == 12 and d["rows_selected"] == d["k"]
            for size, share in zip(d["rows_candidates"], d["k"]):
                exact = Fraction(12 * size, sum(d["rows_candidates"]))
                assert math.floor(exact) <= share <= math.ceil(exact)
        for g in s["balance"]:  # each cluster's share split over its loss_base bins
            assert sum(g["rows_selected"]) == 12
        assert {d["domain"] for d in s["domains"] if d["rows_selected"] == 12} == {"a", "b"}


def test_diversity_needs_an_embedding(tmp_path):
    write(tmp_path / "run", scores_table(["a", "b", "c"], [1.0, 2.0, 3.0], [None] * 3))
    with pytest.raises(AirRayError, match="score --embed"):
        select(SelectConfig(scores=str(tmp_path / "run"), output=str(tmp_path / "o"), top_k=2, diversity=2))
    # rows without an embedding are no candidates (counted with the NaNs)
    rng = np.random.default_rng(0)
    x, _ = blobs(rng, [3, 3])
    emb = [None if i == 2 else x[i] for i in range(6)]
    root = tmp_path / "partial"
    write(root, scores_table([f"r{i}" for i in range(6)], [float(i) for i in range(6)], [None] * 6, emb), parts=1)
    s = select(SelectConfig(scores=str(root), output=str(tmp_path / "o2"), top_k=5, diversity=2))
    assert s["counts"]["rows_nan"] == 1 and s["counts"]["rows_candidates"] == 5 and s["counts"]["rows_selected"] == 5


# ------------------------------------------------------------------------------------------------------
# answers, --exclude-wrong-answer, --exclude-defective, the audit


def test_answer_checks():
    gsm = "Half is 90 / 2 = <<90/2=45>>45\n#### 45"
    assert reference_answer(gsm) == "45" and reference_answer(45) == "45" and reference_answer("1,234.0") == "1234"
    assert reference_answer("The answer is \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert reference_answer("a long solution without markers\nthat ends with 17 apples") == "17"
    assert reference_answer(None) is None and reference_answer("") is None and reference_answer(True) is None
    assert find_reference({"solution": gsm}) == ("solution", "45")
    assert find_reference({"answer": gsm}) == (None, None)  # answer is not looked in unless named
    assert find_reference({"answer": gsm}, "answer") == ("answer", "45")
    assert find_reference({"meta": {"gold": 3}}, "meta.gold") == ("meta.gold", "3")
    assert answer_status("so 40 + 5 = 45\n#### 45", "45") == "match"
    assert answer_status("#### 46", "45") == "wrong"
    assert answer_status("The total is $45.00.", "45") == "match"  # the last number
    assert answer_status("no number at all", "45") == "no_answer"
    assert answer_status("#### 45", None) == "no_reference"


def corpus_rows():
    """GSM8K-style rows: a reference in `solution` (or none), a planted defect in `air_defect`."""
    rows = []
    for i in range(40):
        answer = 10 + i
        good = f"Step one gives {answer - 1}.\nAdd one: {answer - 1} + 1 = <<{answer - 1}+1={answer}>>{answer}\n" \
               f"#### {answer}"
        row = {"id": f"g{i:02d}", "prompt": f"What is {answer - 1} + 1?", "response": good, "air_defect": None,
               "solution": good}
        if i % 5 == 1:  # a wrong final answer
            row.update(response=good.replace(f"#### {answer}", f"#### {answer + 3}"), air_defect="wrong_answer")
        elif i % 5 == 2:  # cut before the answer: the last number is a step's
            row.update(response=good.split("\n")[0], air_defect="truncated")
        elif i % 5 == 3:  # no reference at all: kept
            del row["solution"]
        elif i % 10 == 4:  # the reference as a bare number, in another field
            del row["solution"]
            row["gold_answer"] = answer
        rows.append(row)
    return rows


def test_exclude_wrong_answer_and_defective_with_the_audit(tmp_path):
    rows = corpus_rows()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    ids = [r["id"] for r in rows]
    scores = [float(i % 7) + i / 100 for i in range(len(rows))]
    write(tmp_path / "run", scores_table(ids, scores, ["math"] * len(rows), source=str(corpus)))
    run = str(tmp_path / "run")
    wrong = {r["id"] for r in rows if r["air_defect"] in ("wrong_answer", "truncated")}
    assert len(wrong) == 16
    s = select(SelectConfig(scores=run, output=str(tmp_path / "o"), top_k=40, exclude_wrong_answer=True))
    got = pq.read_table(tmp_path / "o" / "selection.parquet").column("id").to_pylist()
    assert set(got) == set(ids) - wrong
    c = s["counts"]
    assert c["rows_wrong_answer"] == 16 and c["rows_candidates"] == 24 and c["rows_selected"] == 24
    assert c["rows_total"] == c["rows_nan"] + c["rows_below_min_score"] + c["rows_wrong_answer"] + \
        c["rows_defective"] + c["rows_candidates"]
    read = s["bias"]["corpus"]["read"]
    no_ref = sum(1 for r in rows if "solution" not in r and "gold_answer" not in r)
    assert read["answer_no_reference"] == no_ref and read["rows_read"] == 41 and read["rows_not_scorable"] == 1
    assert read["reference_fields"] == {"solution": 28, "gold_answer": 4}  # every defective row has a solution
    pool, chosen = s["bias"]["corpus"]["pool"], s["bias"]["corpus"]["selected"]
    assert pool["defect_share"] == pytest.approx(16 / 40) and chosen["defect_share"] == 0.0
    assert pool["defect_share_by_kind"] == {"truncated": 0.2, "wrong_answer": 0.2}
    assert pool["wrong_answer_share"] == pytest.approx(16 / 40) and chosen["wrong_answer_share"] == 0.0

    # the oracle filter (compare's clean_random) and the audit of a plain ranking (the corpus named by --input)
    s = select(SelectConfig(scores=run, output=str(tmp_path / "o2"), top_k=10, by="random", exclude_defective=True))
    got = pq.read_table(tmp_path / "o2" / "selection.parquet").column("id").to_pylist()
    assert not set(got) & wrong and s["counts"]["rows_defective"] == 16 and len(got) == 10
    # ... built from the random subset of the same seed (what pairs compare's clean_random-j with random-j): that
    # subset's clean rows in their order, then the next clean rows of the same seeded order
    for seed in (0, 3):
        select(SelectConfig(scores=run, output=str(tmp_path / f"r{seed}"), top_k=10, by="random", seed=seed))
        select(SelectConfig(scores=run, output=str(tmp_path / f"c{seed}"), top_k=10, by="random", seed=seed,
                            exclude_defective=True))
        select(SelectConfig(scores=run, output=str(tmp_path / f"a{seed}"), top_k=40, by="random", seed=seed))
        rand, clean, order = (pq.read_table(tmp_path / f"{d}{seed}" / "selection.parquet").column("id").to_pylist()
                              for d in "rca")
        assert sorted(order) == sorted(ids) and rand == order[:10]
        kept = [i for i in rand if i not in wrong]
        assert 0 < len(kept) < 10 and clean == [i for i in order if i not in wrong][:10] and clean[:len(kept)] == kept
    s = select(SelectConfig(scores=run, output=str(tmp_path / "o3"), top_k=8, input=[str(corpus)]))
    top = sorted(zip(ids, scores), key=lambda r: (-r[1], r[0]))[:8]
    share = sum(1 for i, _ in top if i in wrong) / 8
    assert s["bias"]["corpus"]["selected"]["defect_share"] == pytest.approx(share)
    assert s["counts"]["rows_wrong_answer"] == 0  # audit only: nothing left out

    # a scoring run without a manifest and without the flags: the corpus is not read
    s = select(SelectConfig(scores=run, output=str(tmp_path / "o4"), top_k=8))
    assert "corpus" not in s["bias"]


def test_a_named_reference_field(tmp_path):
    rows = [{"id": f"x{i}", "prompt": "p", "response": f"#### {i}", "expected": i if i % 2 else i + 1}
            for i in range(6)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write(tmp_path / "run", scores_table([r["id"] for r in rows], [1.0] * 6, [None] * 6, source=str(corpus)),
          parts=1)
    s = select(SelectConfig(scores=str(tmp_path / "run"), output=str(tmp_path / "o"), top_k=6,
                            exclude_wrong_answer=True, reference_field="expected"))
    assert s["counts"]["rows_wrong_answer"] == 3 and s["counts"]["rows_selected"] == 3
    # the default fields do not include it: every row kept, counted as without a reference
    s = select(SelectConfig(scores=str(tmp_path / "run"), output=str(tmp_path / "o2"), top_k=6,
                            exclude_wrong_answer=True))
    assert s["counts"]["rows_wrong_answer"] == 0 and s["bias"]["corpus"]["read"]["answer_no_reference"] == 6


def test_split_quota_fair_rounding():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 30, size=int(rng.integers(1, 9)))
        k = int(rng.integers(0, sizes.sum() + 2))
        q = split_quota(k, sizes)
        assert q.sum() == min(k, sizes.sum())
        for n, share in zip(sizes, q):
            if sizes.sum():
                exact = Fraction(min(k, int(sizes.sum())) * int(n), int(sizes.sum()))
                assert math.floor(exact) <= share <= math.ceil(exact)


def test_only_the_first_record_of_an_id_counts(tmp_path):
    """The scorer scored the first record of an id and rejected the later ones: a later record with the same id and
    a wrong answer (or a defect) does not mark the scored row."""
    rows = [{"id": "a", "prompt": "p", "response": "#### 1", "solution": "#### 1"},
            {"id": "b", "prompt": "p", "response": "#### 5", "solution": "#### 2", "air_defect": "wrong_answer"},
            {"id": "a", "prompt": "p", "response": "#### 9", "solution": "#### 1", "air_defect": "wrong_answer"}]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write(tmp_path / "run", scores_table(["a", "b"], [2.0, 1.0], [None] * 2, source=str(corpus)), parts=1)
    s = select(SelectConfig(scores=str(tmp_path / "run"), output=str(tmp_path / "o"), top_k=2,
                            exclude_wrong_answer=True))
    assert pq.read_table(tmp_path / "o" / "selection.parquet").column("id").to_pylist() == ["a"]
    read = s["bias"]["corpus"]["read"]
    assert read["rows_later_duplicate"] == 1 and read["answer_wrong"] == 1 and read["answer_match"] == 1
    assert s["bias"]["corpus"]["pool"]["defect_share"] == 0.5  # b only
