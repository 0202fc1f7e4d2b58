"""``air-ray compare`` (issues #17, #25): the null statistics and answer extraction as plain functions, the run plan,
then the command end to end on a tiny scale (a real scoring run of a tiny checkpoint and of its placebo heads, the
real default model as the student, one optimiser step, two random and two matched subsets), its files, that every
student moved away from the initial weights, the report section, resume and the held-out overlap check."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from air_ray.evaluation.compare import NULLS, Run, plan, summarise
from air_ray.data.answers import final_answer, normalise_answer, predicted_answer
from air_ray.outputs.stats import null_position

# the line each student trained now prints (the 30 s heartbeat also says "N trained this run": not counted)
TRAINED = re.compile(r": trained \d+ steps on ")

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# plain functions


def test_answers():
    assert final_answer("a\nb = <<3*4=12>>12\n#### 1,234") == "1234"
    assert final_answer("so \\boxed{\\frac{1}{2}} and \\boxed{7}") == "7"
    assert final_answer("nested \\boxed{\\sqrt{x^{2}}}") == "\\sqrt{x^{2}}"
    assert final_answer("no answer here 42") is None  # a reference needs #### or \boxed
    assert final_answer("#### ") is None
    assert predicted_answer("The answer is $18.00.") == "18"  # the flexible fallback: the last number
    assert predicted_answer("#### 5\nthen 6") == "5"
    assert predicted_answer("nothing") is None
    assert normalise_answer(" -3.50 ") == "-3.5" and normalise_answer("72.0") == "72"


def test_null_position_by_hand():
    null = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]  # ten random-subset students' held-out losses
    p = null_position(2.5, null, lower_is_better=True)  # better (lower) than 8 of 10
    assert p["n"] == 10 and p["percentile"] == pytest.approx(80.0)
    assert p["p_better"] == pytest.approx((1 + 2) / 11)  # null draws at least as good: 1.0, 2.0
    assert p["p_worse"] == pytest.approx((1 + 8) / 11)
    sd = math.sqrt(sum((x - 5.5) ** 2 for x in null) / 9)
    assert p["z"] == pytest.approx((5.5 - 2.5) / sd)  # positive: better
    # ties count half; the best possible value gives the smallest p of N = 10: 1 / 11
    assert null_position(3.0, null, True)["percentile"] == pytest.approx(100 * (7 + 0.5) / 10)
    best = null_position(0.0, null, True)
    assert best["percentile"] == 100.0 and best["p_better"] == pytest.approx(1 / 11) and best["p_worse"] == 1.0
    # higher is better (accuracy): mirrored
    acc = null_position(8.5, null, lower_is_better=False)
    assert acc["percentile"] == pytest.approx(80.0) and acc["z"] == pytest.approx((8.5 - 5.5) / sd)
    assert null_position(None, null, True)["percentile"] is None
    assert null_position(1.0, [None, None], True) == {"n": 0, "percentile": None, "p_better": None,
                                                     "p_worse": None, "z": None}
    assert null_position(1.0, [2.0], True)["z"] is None  # one draw: no spread


def test_plan():
    from air_ray.config import CompareConfig

    cfg = CompareConfig(scores="s", input=["p"], eval_input=["h"], strategies=["score", "random", "matched_random"],
                        seeds=2, random_subsets=3, matched_subsets=1).validate()
    runs = plan(cfg)
    assert [(r.strategy, r.index, r.train_seed) for r in runs] == [
        ("score", 0, 0), ("random", 0, 0), ("matched_random", 0, 0), ("score", 1, 1), ("random", 1, 1),
        ("random", 2, 0)]
    assert Run("score_weighted", 1, 1).selection_name == "score" and Run("random", 2, 0).selection_name == "random-2"
    # the placebo strategy is in the default only with a placebo run; asked for without one: an error
    from air_ray.errors import AirRayError

    assert "placebo" not in CompareConfig(scores="s", input=["p"], eval_input=["h"]).validate().strategies
    assert "placebo" in CompareConfig(scores="s", input=["p"], eval_input=["h"], placebo_scores="q").validate().strategies
    with pytest.raises(AirRayError, match="needs --placebo-scores"):
        CompareConfig(scores="s", input=["p"], eval_input=["h"], strategies=["placebo", "random"]).validate()
    assert CompareConfig(scores="s", input=["p"], eval_input=["h"], random_subsets=4).validate().matched_subsets == 4


def test_summary_places_each_strategy_in_the_nulls():
    def run(s, k, loss, acc=None):
        return {"strategy": s, "seed": k, "eval": {"loss": loss, "accuracy": acc}, "weights_delta": 0.1 + k,
                "selected_loss_base": 0.9}

    results = [run("score", 0, 1.0), run("score", 1, 1.2)]
    results += [run("random", j, 1.0 + 0.05 * j) for j in range(6)]
    results += [run("matched_random", j, 1.3 - 0.1 * j) for j in range(3)]
    s = summarise(results, ["score", "random", "matched_random"])
    assert s["score"]["loss"]["mean"] == pytest.approx(1.1) and s["score"]["students"] == 2
    assert s["score"]["loss"]["vs_random"] == null_position(1.1, [1.0 + 0.05 * j for j in range(6)], True)
    assert s["score"]["loss"]["vs_matched_random"] == null_position(1.1, [1.3, 1.2, 1.1], True)
    assert s["random"]["loss"]["min"] == pytest.approx(1.0) and s["random"]["loss"]["max"] == pytest.approx(1.25)
    assert "vs_random" not in s["random"]["loss"] and "vs_matched_random" in s["random"]["loss"]
    assert s["score"]["accuracy"]["mean"] is None and s["score"]["accuracy"]["vs_random"]["percentile"] is None
    assert s["score"]["weights_delta_min"] == pytest.approx(0.1) and s["score"]["selected_loss_base"] == 0.9
    assert set(NULLS) == {"random", "matched_random"}


def test_final_answer_loss_by_hand(tiny_model, smol_tok, gsm8k_rows):
    """students.response_loss's final-answer loss = the mean -log p of the tokens from the last #### to EOS, each row
    run alone through a plain forward (no batching, no padding)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from air_ray.evaluation.students import HeldOutRow, prompt_ids, response_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model[0], dtype=torch.float32)
    rows = [HeldOutRow(r["id"], r["prompt"], r["response"], None) for r in gsm8k_rows[:5]]
    rows.append(HeldOutRow("plain", "a prompt", "an answer without a marker", None))  # in the loss only
    got = response_loss(model, smol_tok, rows, batch_size=4)
    total = n = 0
    for r in rows[:5]:
        p = prompt_ids(smol_tok, r.prompt, "chat")
        cut = r.response.rfind("####")
        head = smol_tok(r.response[:cut], add_special_tokens=False)["input_ids"]
        ids = p + smol_tok(r.response, add_special_tokens=False)["input_ids"] + [smol_tok.eos_token_id]
        assert ids[:len(p) + len(head)] == p + head  # "####" starts a token here: the split is clean
        start = len(p) + len(head)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        nll = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
        total += float(nll[start - 1:].sum())
        n += len(ids) - start
    assert got["n_answer_tokens"] == n and got["answer_loss"] == pytest.approx(total / n, rel=1e-4)


# ----------------------------------------------------------------------------------------------
# end to end


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "air_ray", *map(str, args)], cwd=REPO, text=True,
                          capture_output=True, timeout=900)


@pytest.mark.slow
def test_compare_end_to_end(tiny_model, smol_ref, gsm8k_rows, tmp_path):
    from air_ray.evaluation.defects import plant_defects

    model_dir, heads = tiny_model
    pool, held = tmp_path / "pool.jsonl", tmp_path / "heldout.jsonl"
    planted, counts = plant_defects(gsm8k_rows[:12], 0.25, seed=0)  # 3 corrupted rows, a reference on every row
    assert counts["defective"] == 3
    pool.write_text("".join(json.dumps(r) + "\n" for r in planted))
    held.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows[100:104]) + "{not json\n")
    run, placebo_run = tmp_path / "run", tmp_path / "placebo_run"
    # the scoring runs (the tiny checkpoint with its heads, and with placebo heads: the scores only have to exist;
    # the first through real Ray)
    p = _cli("heads", "--placebo", "--from", heads, "--output", tmp_path / "placebo.json")
    assert p.returncode == 0, p.stdout + p.stderr
    for out, h, extra in ((run, heads, ["--address", "local", "--embed"]), (placebo_run, tmp_path / "placebo.json", [])):
        p = _cli("score", "--input", pool, "--heads", h, "--model", model_dir, "--output", out, "--dtype", "float32",
                 *extra)
        assert p.returncode == 0, p.stdout + p.stderr

    strategies = ["score", "score_balanced", "delta_balanced", "placebo", "score_weighted", "score_diverse",
                  "random_diverse", "answer_filter", "random", "matched_random", "clean_random", "repaired_random"]
    args = ["compare", "--scores", run, "--input", pool, "--eval-input", held, "--model", smol_ref.name,
            "--strategies", *strategies, "--placebo-scores", placebo_run, "--random-subsets", "3",
            "--matched-subsets", "2", "--clean-subsets", "2", "--diversity", "2", "--balance-bins", "2",
            "--top-k", "4", "--seeds", "1", "--max-steps", "1", "--batch-size", "4", "--lr", "1e-4",
            "--max-length", "256", "--max-new-tokens", "4", "--device", "cpu"]
    p = _cli(*args)
    assert p.returncode == 0, p.stdout + p.stderr
    out = run / "compare"  # the default: beside the run, where the report finds it
    for name in ("compare.json", "compare.md", "compare.png"):
        assert (out / name).stat().st_size > 0, name
    doc = json.loads((out / "compare.json").read_text())
    assert doc["held_out"]["rows_used"] == 4 and doc["held_out"]["rows_unparsable"] == 1
    assert doc["held_out"]["n_checkable"] == 4  # GSM8K's #### N
    names = [(r["strategy"], r["seed"], r["train_seed"]) for r in doc["runs"]]
    assert names == [(s, 0, 0) for s in strategies] + [("answer_filter", 1, 0), ("random", 1, 0),
                                                       ("matched_random", 1, 0), ("clean_random", 1, 0),
                                                       ("repaired_random", 1, 0), ("random", 2, 0)]
    # the planted defects: the pool's share, each selection's, the oracle filter's none
    assert doc["pool_corpus"]["defect_share"] == 0.25 and doc["pool_corpus"]["rows"] == 12
    for r in doc["runs"]:
        assert r["selected_corpus"]["defect_share"] is not None
        if r["strategy"] in ("clean_random", "repaired_random"):
            assert r["selected_corpus"]["defect_share"] == 0.0
    assert doc["summary"]["clean_random"]["loss"]["two_sample_vs_random"]["n"] == 2
    assert doc["summary"]["clean_random"]["loss"]["paired_vs_random"]["n_pairs"] == 2  # clean j against random j
    assert doc["summary"]["answer_filter"]["loss"]["paired_vs_random"]["n_pairs"] == 2  # the filter's, the same way
    assert set(doc["positive_control"]) == {"loss", "answer_loss"}  # GSM8K's #### N: a final-answer loss too
    assert all("separated" in c and c["repaired"]["n_pairs"] == 2 for c in doc["positive_control"].values())
    # repaired_random: random subset j's rows, its planted ones trained with their original responses
    assert "repaired_random trains on random subsets with the pool's 3 planted defects repaired" in p.stdout
    defective = {r["id"] for r in planted if r["air_defect"]}
    assert doc["initial"]["eval"]["n_answer_tokens"] > 0 and doc["initial"]["eval"]["answer_loss"] > 0
    initial = doc["initial"]["eval"]
    for r in doc["runs"]:
        assert r["train"]["steps"] == 1 and r["train"]["rows"] == 4
        assert r["train"]["step_weights"] == (r["strategy"] == "score_weighted")
        assert r["weights_delta"] > 1e-6, r  # the student really moved
        assert r["eval"]["loss"] != initial["loss"] and math.isfinite(r["eval"]["loss"])
        assert r["eval"]["n_checkable"] == 4 and 0 <= r["eval"]["accuracy"] <= 1
        sel = json.loads((Path(r["selection"]) / "selection.json").read_text())
        assert sel["counts"]["rows_selected"] == 4 and sel["bias"]["selected_mean"]["loss_base"] == \
            pytest.approx(r["selected_loss_base"])
        c = sel["config"]
        assert c["by"] == {"delta_balanced": "delta", "random": "random", "matched_random": "random",
                           "random_diverse": "random", "answer_filter": "random", "clean_random": "random",
                           "repaired_random": "random"}.get(
            r["strategy"], "score")
        assert c["diversity"] == (2 if r["strategy"] in ("score_diverse", "random_diverse") else None)
        assert c["exclude_wrong_answer"] == (r["strategy"] == "answer_filter")
        assert c["exclude_defective"] == (r["strategy"] == "clean_random")
        if c["diversity"]:
            assert sum(sel["diversity"]["domains"][0]["rows_selected"]) == 4
        if c["exclude_wrong_answer"]:  # the corrupted final answer and the cut trace fail the check
            assert sel["counts"]["rows_wrong_answer"] >= 1
        assert c["balance"] == ("loss_base" if r["strategy"] in ("score_balanced", "delta_balanced",
                                                                  "matched_random") else None)
        if c["balance"]:
            assert [g["rows_selected"] for g in sel["balance"]] == [[2, 2]]  # 12 rows in 2 bins: 2 from each
        assert c["scores"] == str(placebo_run if r["strategy"] == "placebo" else run)
    by = {(r["strategy"], r["seed"]): r for r in doc["runs"]}
    # the random subsets differ from each other; the placebo run selects by its own scores
    import pyarrow.parquet as pq

    subsets = {tuple(sorted(pq.read_table(Path(by[("random", j)]["selection"]) / "selection.parquet")
                            .column("id").to_pylist())) for j in range(3)}
    assert len(subsets) >= 2  # seeded subsets of 4 of 12 rows: not all the same

    def ids(r):
        return pq.read_table(Path(r["selection"]) / "selection.parquet").column("id").to_pylist()

    for j in range(2):  # repaired_random j: random subset j's rows in its order, a student of its own
        assert ids(by[("repaired_random", j)]) == ids(by[("random", j)])
        assert "same_student_as" not in by[("repaired_random", j)]
        assert by[("repaired_random", j)]["train"]["rows_repaired"] == len(defective & set(ids(by[("random", j)])))
    assert any(by[("repaired_random", j)]["train"]["rows_repaired"] for j in range(2))  # a repair was trained
    # weighted and plain training on the same rows give different students
    assert by[("score", 0)]["eval"]["loss"] != by[("score_weighted", 0)]["eval"]["loss"]
    # each strategy placed in the nulls of its students' results
    null = [by[("random", j)]["eval"]["loss"] for j in range(3)]
    matched = [by[("matched_random", j)]["eval"]["loss"] for j in range(2)]
    e = doc["summary"]["score"]["loss"]
    assert e["vs_random"] == null_position(by[("score", 0)]["eval"]["loss"], null, True)
    assert e["vs_matched_random"] == null_position(by[("score", 0)]["eval"]["loss"], matched, True)
    assert doc["summary"]["random"]["students"] == 3 and doc["summary"]["random"]["loss"]["min"] == min(null)
    md = (out / "compare.md").read_text()
    assert "| score_weighted | 1 |" in md and "initial model" in md and "| random | 3 |" in md
    assert "Planted defects among the selected rows" in md and "Positive control on the held-out loss: clean_random" in md

    # the report shows the comparison
    rep = tmp_path / "report"
    p = _cli("report", "--scores", run, "--output", rep)
    assert p.returncode == 0, p.stdout + p.stderr
    html = (rep / "index.html").read_text()
    assert "Selection strategies compared" in html and "matched_random" in html
    assert (rep / "compare.png").exists()

    # a rerun resumes: nothing is trained again, the results are the same files
    before = {r: (out / "runs" / r / "result.json").read_text() for r in ("score-seed0", "random-seed2", "initial")}
    p = _cli(*args)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("done before") == len(doc["runs"]) and not TRAINED.search(p.stdout)
    assert before == {r: (out / "runs" / r / "result.json").read_text() for r in before}

    # loss only (--max-new-tokens 0): no decoding, no exact-match column; random_diverse in one group is random subset
    # 0 again (the same rows in the same order): its student is that one, not trained twice
    p = _cli(*args[:-4], "--max-new-tokens", "0", "--device", "cpu", "--strategies", "random", "random_diverse",
             "--random-subsets", "2", "--diversity", "1", "--output", tmp_path / "loss_only")
    assert p.returncode == 0, p.stdout + p.stderr
    doc0 = json.loads((tmp_path / "loss_only" / "compare.json").read_text())
    assert all(r["eval"]["accuracy"] is None for r in doc0["runs"]) and "exact match" not in doc0["table"]["header"]
    by0 = {(r["strategy"], r["seed"]): r for r in doc0["runs"]}
    assert by0[("random_diverse", 0)]["same_student_as"] == "random-seed0" and len(TRAINED.findall(p.stdout)) == 2
    assert by0[("random_diverse", 0)]["eval"] == by0[("random", 0)]["eval"]

    # held-out rows that are in the pool are refused, before any training
    p = _cli(*args[:5], "--eval-input", pool, *args[7:], "--output", tmp_path / "bad")
    assert p.returncode == 2 and "held-out rows are in the scored pool" in p.stderr
    assert not (tmp_path / "bad" / "runs").exists()
