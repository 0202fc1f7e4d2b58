"""The planted pool of the evidence recipe (issue #32): each defect kind is what it says, the pool is the seed's, and
compare's positive-control statistics by hand. No model."""

from __future__ import annotations

import json
import math
import random
import re
from itertools import combinations

import pytest

from air_ray.data.answers import DEFECT_FIELD, final_answer
from air_ray.evaluation.compare import positive_control, summarise
from air_ray.evaluation.defects import KINDS, SOLUTION_FIELD, plant_defects, write_planted
from air_ray.outputs.stats import two_sample

NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def test_every_kind_is_what_it_says(gsm8k_rows):
    rows = [dict(r) for r in gsm8k_rows[:160]]
    out, counts = plant_defects(rows, 0.25, seed=3)
    assert counts["defective"] == 40 and counts["planted"] == dict.fromkeys(KINDS, 10)
    assert sum(r[DEFECT_FIELD] is not None for r in out) == 40
    for before, after in zip(rows, out):
        assert after[SOLUTION_FIELD] == before["response"]  # the reference: the original response
        assert (after["id"], after["prompt"]) == (before["id"], before["prompt"])
        old, new = before["response"].split("\n"), after["response"].split("\n")
        kind = after[DEFECT_FIELD]
        if kind is None:
            assert new == old
        elif kind == "wrong_answer":  # only the #### line, and its number is another
            assert new[:-1] == old[:-1] and final_answer(after["response"]) != final_answer(before["response"])
            assert new[-1].startswith("#### ")
        elif kind == "wrong_step":  # one step line changed, in its numbers only; the #### line as it was
            changed = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
            assert len(changed) == 1 and len(new) == len(old) and new[-1] == old[-1]
            a, b = old[changed[0]], new[changed[0]]
            assert NUM.sub("N", a) == NUM.sub("N", b) and NUM.findall(a) != NUM.findall(b)
        elif kind == "shuffled":  # two different step lines swapped
            changed = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
            assert len(changed) == 2 and sorted(new) == sorted(old) and new[-1] == old[-1]
        else:  # truncated: the first two thirds of the lines, the #### line gone
            assert kind == "truncated" and new == old[:(2 * len(old)) // 3] and "####" not in after["response"]
    again, _ = plant_defects(rows, 0.25, seed=3)
    assert again == out  # the seed's pool, every time
    other, _ = plant_defects(rows, 0.25, seed=4)
    assert [r[DEFECT_FIELD] for r in other] != [r[DEFECT_FIELD] for r in out]


def test_the_planted_file(gsm8k_rows, tmp_path):
    src = tmp_path / "pool.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows[:20]))
    counts = write_planted(str(src), str(tmp_path / "planted.jsonl"), 0.5, seed=0)
    rows = [json.loads(line) for line in (tmp_path / "planted.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and sum(r[DEFECT_FIELD] is not None for r in rows) == counts["defective"] == 10
    assert json.loads((tmp_path / "planted.jsonl.json").read_text())["planted"] == counts["planted"]


def test_two_sample_permutation_test_by_hand():
    clean, null = [0.90, 0.92, 0.91], [0.95, 0.93, 0.97, 0.96]
    t = two_sample(clean, null, lower_is_better=True)
    # every relabelling of the 7 students into 3 + 4: the observed difference is the largest of the 35
    diffs = []
    both = clean + null
    for pick in combinations(range(7), 3):
        a = [both[i] for i in pick]
        b = [both[i] for i in range(7) if i not in pick]
        diffs.append(sum(b) / 4 - sum(a) / 3)  # better = lower: null mean - clean mean
    observed = sum(null) / 4 - sum(clean) / 3
    assert t["diff"] == pytest.approx(observed) and t["permutations"] == 35
    assert t["p_better"] == pytest.approx(sum(d >= observed - 1e-12 for d in diffs) / 35) == pytest.approx(1 / 35)
    worse = two_sample(null, clean, lower_is_better=True)
    assert worse["diff"] < 0 and worse["p_better"] == 1.0
    assert two_sample([1.0], null, True)["p_better"] is None  # one student: no test


def test_the_positive_control_is_read_from_the_students():
    def run(s, k, loss, defects=None):
        return {"strategy": s, "seed": k, "eval": {"loss": loss, "accuracy": None}, "weights_delta": 0.1,
                "selected_loss_base": 1.0, "selected_corpus": defects}

    rng = random.Random(0)
    shares = {"defect_share": 0.25, "defect_share_by_kind": {"truncated": 0.25}, "wrong_answer_share": 0.125}
    results = [run("random", j, 1.0 + rng.gauss(0, 0.005), shares) for j in range(20)]
    results += [run("clean_random", j, 0.985 + rng.gauss(0, 0.005), dict(shares, defect_share=0.0)) for j in range(10)]
    results += [run("score", 0, 0.99, dict(shares, defect_share=0.0625))]
    summary = summarise(results, ["score", "random", "clean_random"])
    pc = positive_control(summary)
    assert list(pc) == ["loss"]  # the students have no final-answer loss here: no control on it
    pc = pc["loss"]
    assert pc["separated"] and pc["p_better"] < 0.05 and pc["n"] == 10 and pc["n_null"] == 20
    assert summary["clean_random"]["selected_corpus"]["defect_share"] == 0.0
    assert summary["random"]["selected_corpus"]["defect_share_by_kind"] == {"truncated": 0.25}
    assert "two_sample_vs_random" not in summary["score"]["loss"]
    # clean students no better than random ones: not separated, and said so
    same = [run("clean_random", j, 1.0 + rng.gauss(0, 0.005)) for j in range(10)]
    summary = summarise(results[:20] + same, ["random", "clean_random"])
    assert not positive_control(summary)["loss"]["separated"]
    assert positive_control(summarise(results[:20], ["random"])) is None
    assert math.isfinite(summary["clean_random"]["loss"]["two_sample_vs_random"]["t"])
