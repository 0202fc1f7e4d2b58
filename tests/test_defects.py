"""The planted pool of the evidence recipe (issue #32): each defect kind is what it says, the pool is the seed's, and
compare's positive-control statistics by hand. No model."""

from __future__ import annotations

import json
import math
import random
import re
from itertools import combinations, product

import pytest

from air_ray.data.answers import DEFECT_FIELD, final_answer
from air_ray.evaluation.compare import control_line, positive_control, summarise
from air_ray.evaluation.defects import KINDS, SOLUTION_FIELD, plant_defects, repair_defects, write_planted
from air_ray.errors import AirRayError
from air_ray.outputs.stats import paired, two_sample

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


def test_paired_sign_flip_test_by_hand():
    clean, null = [0.90, 0.95, 0.91, 0.99], [0.92, 0.96, 0.90, 1.00]
    t = paired(clean, null, lower_is_better=True)
    d = [b - a for a, b in zip(clean, null)]  # better = lower: null - clean
    flips = [sum(s * x for s, x in zip(signs, d)) / 4 for signs in product((1, -1), repeat=4)]
    observed = sum(d) / 4
    assert t["n_pairs"] == 4 and t["permutations"] == 16 and t["diff"] == pytest.approx(observed)
    assert t["p_better"] == pytest.approx(sum(f >= observed - 1e-12 for f in flips) / 16)
    sd = math.sqrt(sum((x - observed) ** 2 for x in d) / 3)
    assert t["sd"] == pytest.approx(sd) and t["t"] == pytest.approx(observed / (sd / 2))
    # higher is better (exact match): the signs turn; a missing value drops its pair; one pair: no test
    up = paired([0.5, 0.6, None, 0.7], [0.4, 0.5, 0.9, 0.6], lower_is_better=False)
    assert up["n_pairs"] == 3 and up["diff"] == pytest.approx(0.1) and up["p_better"] == pytest.approx(1 / 8)
    assert paired([1.0], [2.0], True)["p_better"] is None
    # more pairs than exact flips allowed: seeded random flips, (1 + hits) / (1 + permutations)
    big = paired([1.0 - 0.001 * (j % 3) for j in range(30)], [1.0] * 30, True, permutations=2000)
    assert big["permutations"] == 2000 and big["p_better"] == pytest.approx(1 / 2001)


def test_the_paired_control_sees_what_the_spread_between_subsets_hides():
    """Random subset j trained as it is and repaired share subset j's luck: a gain of 0.002 under a spread of 0.01
    between subsets separates paired (repaired_random) and not unpaired (clean_random, on other rows), and the
    page says which; pairs are matched by seed, whatever order the results come in."""
    def run(s, k, loss):
        return {"strategy": s, "seed": k, "eval": {"loss": loss, "answer_loss": None, "accuracy": None},
                "weights_delta": 0.1, "selected_loss_base": 1.0}

    rng = random.Random(1)
    luck = [rng.gauss(0, 0.01) for _ in range(30)]
    results = [run("random", j, 1.0 + luck[j]) for j in range(20)]
    results += [run("repaired_random", j, 0.998 + luck[j] + rng.gauss(0, 0.0005)) for j in range(10)]
    results += [run("clean_random", j, 0.998 + luck[20 + j]) for j in range(10)]  # other rows: other luck
    rng.shuffle(results)
    summary = summarise(results, ["random", "clean_random", "repaired_random"])
    pc = positive_control(summary)["loss"]
    fixed = pc["repaired"]
    assert fixed["n_pairs"] == 10 and fixed["separated"] and fixed["p_better"] < 0.01
    assert fixed["diff"] == pytest.approx(0.002, abs=5e-4) and fixed == dict(
        summary["repaired_random"]["loss"]["paired_vs_random"], separated=True)
    assert not pc["separated"] and pc["p_better"] > 0.05 and pc["two_sample"]["n"] == 10
    line = control_line({"positive_control": {"loss": pc}})
    assert "clean_random did NOT separate" in line and "the students see the planted defects, but the gain is " \
        "smaller than the spread" in line and "same 10 random subsets" in line
    # only the paired control: its verdict alone; a repaired subset whose random subset has no student: left out
    fewer = [r for r in results
             if r["strategy"] != "clean_random" and not (r["strategy"] == "random" and r["seed"] == 9)]
    pc = positive_control(summarise(fewer, ["random", "repaired_random"]))["loss"]
    assert "separated" not in pc and pc["repaired"]["n_pairs"] == 9
    assert control_line({"positive_control": {"loss": pc}}).startswith("Paired control on the held-out loss")


def test_repair_gives_every_planted_row_its_solution(gsm8k_rows):
    rows, counts = plant_defects(gsm8k_rows[:40], 0.25, seed=3)
    fixed, n = repair_defects(rows)
    assert n == counts["defective"] == 10
    for before, planted, after in zip(gsm8k_rows[:40], rows, fixed):
        assert after["response"] == before["response"] and after[DEFECT_FIELD] is None
        assert {k: v for k, v in after.items() if k not in ("response", DEFECT_FIELD)} == \
            {k: v for k, v in planted.items() if k not in ("response", DEFECT_FIELD)}
    with pytest.raises(AirRayError, match="no 'solution' text"):
        repair_defects([{"id": "a", "response": "x", DEFECT_FIELD: "shuffled"}])
