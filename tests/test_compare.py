"""``air-ray compare`` (issue #17): the statistics and answer extraction as plain functions, then the command end
to end on a tiny scale (real Ray scoring run, real default model as the student, one optimiser step, one seed),
its files, that every student moved away from the initial weights, the report section, resume and the
held-out overlap check."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from air_ray.evaluation.compare import paired, summarise, t95
from air_ray.evaluation.students import final_answer, normalise_answer, predicted_answer

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


def test_t_interval_against_known_quantiles():
    assert t95(1) == pytest.approx(12.7062) and t95(2) == pytest.approx(4.3027)
    for df, q in ((12, 2.1788), (20, 2.0860), (30, 2.0423), (100, 1.9840)):  # tables of Student's t
        assert t95(df) == pytest.approx(q, abs=2e-3)
    d = paired([1.0, 2.0, 4.0], [0.5, 1.0, 1.5])  # differences 0.5, 1, 2.5: mean 4/3, sd 1.0408
    half = 4.3027 * math.sqrt(((0.5 - 4 / 3) ** 2 + (1 - 4 / 3) ** 2 + (2.5 - 4 / 3) ** 2) / 2) / math.sqrt(3)
    assert d["mean"] == pytest.approx(4 / 3) and d["n"] == 3
    assert d["ci95"] == pytest.approx([4 / 3 - half, 4 / 3 + half])
    assert paired([1.0], [0.0])["ci95"] is None  # one seed: no interval
    # seeds needed for the interval to exclude 0 at this mean and sd: t(n-1) * sd / sqrt(n) < |mean|
    n = d["seeds_to_separate"]
    assert t95(n - 1) * d["sd"] / math.sqrt(n) < 4 / 3 <= t95(n - 2) * d["sd"] / math.sqrt(n - 1)


def test_summary_pairs_by_seed():
    def run(s, k, loss, acc):
        return {"strategy": s, "seed": k, "eval": {"loss": loss, "accuracy": acc}, "weights_delta": 0.1 + k}

    runs = [run("score", 0, 1.0, 0.2), run("score", 1, 2.0, 0.3), run("random", 0, 1.5, 0.1),
            run("random", 1, 2.2, 0.1)]
    s = summarise(runs, ["score", "random"], 2)
    assert s["score"]["loss"]["mean"] == pytest.approx(1.5) and s["score"]["n_seeds"] == 2
    assert s["score"]["loss"]["vs_random"]["mean"] == pytest.approx(((1.0 - 1.5) + (2.0 - 2.2)) / 2)
    assert s["score"]["accuracy"]["vs_random"]["mean"] == pytest.approx(0.15)
    assert "vs_random" not in s["random"]["loss"] and s["random"]["weights_delta_min"] == pytest.approx(0.1)


# ----------------------------------------------------------------------------------------------
# end to end


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "air_ray", *map(str, args)], cwd=REPO, text=True,
                          capture_output=True, timeout=900)


@pytest.mark.slow
def test_compare_end_to_end(tiny_model, smol_ref, gsm8k_rows, tmp_path):
    model_dir, heads = tiny_model
    pool, held = tmp_path / "pool.jsonl", tmp_path / "heldout.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows[:8]))
    held.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows[100:104]) + "{not json\n")
    run = tmp_path / "run"
    # the scoring run (real Ray, a tiny real checkpoint: the scores only have to exist)
    p = _cli("score", "--input", pool, "--heads", heads, "--model", model_dir, "--output", run, "--dtype", "float32",
             "--address", "local")
    assert p.returncode == 0, p.stdout + p.stderr

    args = ["compare", "--scores", run, "--input", pool, "--eval-input", held, "--model", smol_ref.name,
            "--strategies", "score", "score_weighted", "random", "--top-k", "3", "--seeds", "1", "--max-steps", "1",
            "--batch-size", "3", "--lr", "1e-4", "--max-length", "256", "--max-new-tokens", "8", "--device", "cpu"]
    p = _cli(*args)
    assert p.returncode == 0, p.stdout + p.stderr
    out = run / "compare"  # the default: beside the run, where the report finds it
    for name in ("compare.json", "compare.md", "compare.png"):
        assert (out / name).stat().st_size > 0, name
    doc = json.loads((out / "compare.json").read_text())
    assert doc["held_out"]["rows_used"] == 4 and doc["held_out"]["rows_unparsable"] == 1
    assert doc["held_out"]["n_checkable"] == 4  # GSM8K's #### N
    assert [(r["strategy"], r["seed"]) for r in doc["runs"]] == [("score", 0), ("score_weighted", 0), ("random", 0)]
    initial = doc["initial"]["eval"]
    for r in doc["runs"]:
        assert r["train"]["steps"] == 1 and r["train"]["rows"] == 3
        assert r["train"]["step_weights"] == (r["strategy"] == "score_weighted")
        assert r["weights_delta"] > 1e-6, r  # the student really moved
        assert r["eval"]["loss"] != initial["loss"] and math.isfinite(r["eval"]["loss"])
        assert r["eval"]["n_checkable"] == 4 and 0 <= r["eval"]["accuracy"] <= 1
        sel = json.loads((Path(r["selection"]) / "selection.json").read_text())
        assert sel["counts"]["rows_selected"] == 3
        assert sel["config"]["by"] == ("score" if r["strategy"] == "score_weighted" else r["strategy"])
    # weighted and plain training on the same rows give different students
    by = {r["strategy"]: r for r in doc["runs"]}
    assert by["score"]["eval"]["loss"] != by["score_weighted"]["eval"]["loss"]
    assert doc["summary"]["score"]["loss"]["vs_random"]["mean"] == pytest.approx(
        by["score"]["eval"]["loss"] - by["random"]["eval"]["loss"])
    md = (out / "compare.md").read_text()
    assert "| score_weighted | 1 |" in md and "initial model" in md

    # the report shows the comparison
    rep = tmp_path / "report"
    p = _cli("report", "--scores", run, "--output", rep)
    assert p.returncode == 0, p.stdout + p.stderr
    html = (rep / "index.html").read_text()
    assert "Selection strategies compared" in html and "score_weighted" in html
    assert (rep / "compare.png").exists()

    # a rerun resumes: nothing is trained again, the results are the same files
    before = {r: (out / "runs" / r / "result.json").read_text() for r in ("score-seed0", "score_weighted-seed0",
                                                                         "random-seed0", "initial")}
    p = _cli(*args)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("done before") == 3 and "trained" not in p.stdout
    assert before == {r: (out / "runs" / r / "result.json").read_text() for r in before}

    # held-out rows that are in the pool are refused, before any training
    p = _cli(*args[:5], "--eval-input", pool, *args[7:], "--output", tmp_path / "bad")
    assert p.returncode == 2 and "held-out rows are in the scored pool" in p.stderr
    assert not (tmp_path / "bad" / "runs").exists()
