"""What the score selects (issue #25), on real rows: 24 GSM8K rows scored by the real default model (float32, no
Ray) with real critical heads and with placebo heads. The placebo heads file (`air-ray heads --placebo`), the copy
token columns against the scorer's own per-token losses, the bias audit against pandas, `--balance` and `--by
delta` on those rows, and the report's sections (bias, placebo agreement, copy tokens, step weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from air_ray.store.schemas import SCORES, to_table, write_table_atomic
from tests.test_report import serve  # noqa: F401 (a fixture: a local HTTP server for the page)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def air_ray(*args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "air_ray", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def write_run(run: Path, rows: list[dict], meta: dict) -> None:
    import fsspec

    fs = fsspec.filesystem("file")
    write_table_atomic(to_table(rows[:10], SCORES, meta), fs, str(run / "scores" / "part-a.parquet"))
    write_table_atomic(to_table(rows[10:], SCORES, meta), fs, str(run / "scores" / "part-b.parquet"))


@pytest.fixture(scope="module")
def pool(tmp_path_factory, heads_file, gsm8k_rows):
    """The placebo heads (through the CLI), then both runs of the 24 shortest sample rows (two domains)."""
    from air_ray.engine.scorer import Scorer

    root = tmp_path_factory.mktemp("quality")
    placebo = root / "placebo.json"
    p = air_ray("heads", "--placebo", "--from", heads_file, "--seed", 7, "--output", placebo)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = sorted(gsm8k_rows, key=lambda r: len(r["prompt"]) + len(r["response"]))[:24]
    rows = [dict(r, domain="easy" if i % 3 else "other") for i, r in enumerate(rows)]
    corpus = root / "pool.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = {"root": root, "rows": rows, "corpus": corpus, "placebo_heads": placebo}
    for name, heads in (("real", heads_file), ("placebo", placebo)):
        scorer = Scorer(heads=str(heads), dtype="float32", device="cpu")
        results = scorer.score(rows)
        for r in results:
            r["source"] = str(corpus)
        write_run(root / name, results, scorer.describe())
        out[name] = results
        if name == "real":
            out["scorer"] = scorer
        else:
            scorer.close()
    return out


def frame(results) -> pd.DataFrame:
    return pd.DataFrame(results).set_index("id")


def rho(a: pd.Series, b: pd.Series) -> float:
    """Spearman by its definition: Pearson's r of the average ranks (pandas; no scipy here)."""
    return a.rank().corr(b.rank())


# ------------------------------------------------------------------------------------------------------
# placebo heads


def test_placebo_heads_file(pool, heads_file, tmp_path):
    from air_ray.store.heads import heads_fingerprint, load_heads

    real = load_heads(str(heads_file))
    doc = json.loads(pool["placebo_heads"].read_text())
    critical = {tuple(h) for h in real["heads"]}
    placebo = {tuple(h) for h in doc["heads"]}
    assert len(placebo) == len(critical) == len(doc["heads"])  # same count, no head twice
    assert not placebo & critical  # disjoint
    assert all(0 <= l < real["num_layers"] and 0 <= h < real["num_heads"] for l, h in placebo)
    assert doc["placebo"] is True and doc["model_fingerprint"] == real["model_fingerprint"]
    assert doc["placebo_of"]["heads_fingerprint"] == heads_fingerprint(real)
    assert doc["placebo_of"]["heads"] == sorted(list(h) for h in critical) and doc["placebo_of"]["seed"] == 7
    assert "ablation_check" not in doc and (pool["placebo_heads"].with_suffix(".png")).stat().st_size > 1000
    # seeded: the same seed draws the same heads, another seed others
    again, other = tmp_path / "again.json", tmp_path / "other.json"
    assert air_ray("heads", "--placebo", "--from", heads_file, "--seed", 7, "--output", again).returncode == 0
    assert air_ray("heads", "--placebo", "--from", heads_file, "--seed", 8, "--output", other).returncode == 0
    assert json.loads(again.read_text())["heads"] == doc["heads"]
    assert json.loads(other.read_text())["heads"] != doc["heads"]
    # scoring with it works like any heads file (fingerprint checked), and it disables other heads
    assert pool["scorer"].heads != [tuple(h) for h in doc["heads"]]
    assert [r["loss_base"] for r in pool["placebo"]] == [r["loss_base"] for r in pool["real"]]
    assert [r["loss_ref"] for r in pool["placebo"]] != [r["loss_ref"] for r in pool["real"]]


def test_placebo_flags_go_together(tmp_path, heads_file):
    p = air_ray("heads", "--placebo", "--output", tmp_path / "x.json")
    assert p.returncode == 2 and "--placebo and --from go together" in p.stderr
    p = air_ray("heads", "--from", heads_file, "--output", tmp_path / "x.json")
    assert p.returncode == 2 and "--placebo and --from go together" in p.stderr
    # YAML spells it `from` too
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"placebo: true\nfrom: {heads_file}\nseed: 1\noutput: {tmp_path / 'y.json'}\n")
    p = air_ray("heads", "--config", cfg)
    assert p.returncode == 0 and "deprecated" not in p.stderr, p.stderr[-1000:]
    assert json.loads((tmp_path / "y.json").read_text())["placebo"] is True


def test_placebo_needs_enough_other_heads():
    from air_ray.errors import AirRayError
    from air_ray.store.heads import placebo_doc

    doc = {"num_layers": 2, "num_heads": 2, "heads": [[0, 0], [0, 1], [1, 0]], "model_fingerprint": "x"}
    with pytest.raises(AirRayError, match="too few others"):
        placebo_doc(doc, 0)
    two = placebo_doc(dict(doc, heads=[[0, 0], [1, 1]]), 0)
    assert sorted(map(tuple, two["heads"])) == [(0, 1), (1, 0)]


# ------------------------------------------------------------------------------------------------------
# copy tokens


def test_copy_columns_against_the_scorers_token_losses(pool):
    from air_ray.influence import copy_mask

    scorer = pool["scorer"]
    prepared = [scorer.preparer.prepare(r) for r in pool["rows"]]
    losses = scorer.token_losses(prepared)
    some_copies = 0
    for p, (base, ref, *_), got in zip(prepared, losses, pool["real"]):
        mask = copy_mask(p.input_ids[:p.n_prompt_tokens], p.input_ids[p.n_prompt_tokens:])
        assert got["n_copy_tokens"] == int(mask.sum())
        d = np.asarray(ref, np.float64) - np.asarray(base, np.float64)
        if mask.any():
            some_copies += 1
            assert got["delta_copy"] == pytest.approx(float(d[mask].mean()), abs=1e-5)
        else:
            assert got["delta_copy"] is None
    assert some_copies >= len(prepared) // 2  # GSM8K answers reuse the question's numbers


# ------------------------------------------------------------------------------------------------------
# select on real rows


def select(run: Path, out: Path, **kw) -> dict:
    from air_ray.config import SelectConfig
    from air_ray.outputs.select import select as run_select

    return run_select(SelectConfig(scores=str(run), output=str(out), **kw))


def selected_ids(out: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(out / "selection.parquet").column("id").to_pylist()


def test_bias_audit_on_real_rows_against_pandas(pool):
    df = frame(pool["real"])
    out = pool["root"] / "sel"
    summary = select(pool["root"] / "real", out, top_k=6)
    b = summary["bias"]
    for col in ("loss_base", "entropy_base", "n_response_tokens"):
        assert b["spearman"][col] == pytest.approx(rho(df["score"], df[col]), abs=1e-4), col
        assert b["pool_mean"][col] == pytest.approx(df[col].mean())
    chosen = df.loc[selected_ids(out)]
    assert list(chosen.index) == list(df.sort_values("score", ascending=False).index[:6])
    for col in ("score", "loss_base", "entropy_base", "n_response_tokens"):
        assert b["selected_mean"][col] == pytest.approx(chosen[col].mean())
    for d in b["domains"]:
        part = df[df["domain"] == d["domain"]]
        assert d["spearman"]["loss_base"] == pytest.approx(rho(part["score"], part["loss_base"]), abs=1e-4)
        sel_d = chosen[chosen["domain"] == d["domain"]]
        assert d["selected_mean"]["loss_base"] == (pytest.approx(sel_d["loss_base"].mean()) if len(sel_d) else None)
    # the warning is there exactly when |rho(score, loss_base)| >= 0.5
    assert ("warning" in b) == (abs(b["spearman"]["loss_base"]) >= 0.5)


def test_balance_and_delta_on_real_rows(pool):
    df = frame(pool["real"])
    out = pool["root"] / "bal"
    summary = select(pool["root"] / "real", out, top_k=6, balance="loss_base", balance_bins=3)
    edges = np.quantile(df["loss_base"], [1 / 3, 2 / 3])
    bins = np.searchsorted(edges, df["loss_base"], side="right")
    df["bin"] = bins
    want = []
    for b in range(3):  # 8 rows a bin: 2 selected from each, by score
        want += list(df[df["bin"] == b].sort_values("score", ascending=False).index[:2])
    got = selected_ids(out)
    assert sorted(got) == sorted(want)
    assert list(df.loc[got, "score"]) == sorted(df.loc[got, "score"], reverse=True)  # ranked together
    assert summary["balance"][0]["rows_selected"] == [2, 2, 2]
    assert summary["balance"][0]["edges"] == pytest.approx(list(edges))
    plain = select(pool["root"] / "real", pool["root"] / "plain", top_k=6)
    pool_mean = df["loss_base"].mean()
    assert abs(summary["bias"]["selected_mean"]["loss_base"] - pool_mean) <= \
        abs(plain["bias"]["selected_mean"]["loss_base"] - pool_mean)
    # --by delta ranks by loss_ref - loss_base; the selection's score column holds it
    out = pool["root"] / "delta"
    select(pool["root"] / "real", out, top_k=5, by="delta")
    delta = (df["loss_ref"] - df["loss_base"]).sort_values(ascending=False)
    assert selected_ids(out) == list(delta.index[:5])


# ------------------------------------------------------------------------------------------------------
# the report


def test_report_sections(pool):
    from air_ray.outputs.report import write_report

    root = pool["root"]
    select(root / "real", root / "real" / "selection", top_k=6)
    page = Path(write_report(str(root / "real"), None, root / "report", corpus=None,
                             placebo_scores=str(root / "placebo"))).read_text(encoding="utf-8")
    real, plc = frame(pool["real"]), frame(pool["placebo"]).loc[frame(pool["real"]).index]
    for name in ("score_vs_loss.png", "placebo.png"):
        assert (root / "report" / name).stat().st_size > 5000, name
    # bias: the selection's table (its ranked value, pool and selected means)
    sel = json.loads((root / "real" / "selection" / "selection.json").read_text())
    assert "What the ranking favours" in page and "from selection.json" in page
    assert f"{sel['bias']['spearman']['loss_base']:.4g}" in page
    # placebo agreement: Spearman of the two runs' scores, joined by id; the top-6 overlap
    assert f"{rho(real['score'], plc['score']):.4g}" in page
    top_real = set(real["score"].sort_values(ascending=False).index[:6])
    top_plc = set(plc["score"].sort_values(ascending=False).index[:6])
    assert f"<td class=\"l\">6</td><td class=\"\">{len(top_real & top_plc)}</td>" in page
    # copy tokens: the token-weighted mean divergence on copying tokens and on the rest
    n_c = real["n_copy_tokens"].astype(float)
    d_c = real["delta_copy"].fillna(0.0)
    delta_all = (real["n_response_tokens"] * (real["loss_ref"] - real["loss_base"])).sum()
    copy_mean = (n_c * d_c).sum() / n_c.sum()
    other_mean = (delta_all - (n_c * d_c).sum()) / (real["n_response_tokens"].sum() - n_c.sum())
    assert f"{copy_mean:.4g}" in page and f"{other_mean:.4g}" in page
    assert "(24 of 24 rows measured)" in page
    # without a manifest: said so
    assert "No step-weight statistics" in page


def test_report_sections_render_in_chromium(pool, serve, tmp_path):
    """The page with every new section (placebo scatter included) loads in headless Chromium without errors."""
    from tests.test_report import load_in_chromium

    from air_ray.outputs.report import write_report

    out = tmp_path / "report"
    write_report(str(pool["root"] / "real"), None, out, placebo_scores=str(pool["root"] / "placebo"))
    got = load_in_chromium(serve(out) + "index.html", tmp_path / "chrome")
    assert got["errors"] == [], got["errors"]
    widths = dict(got["images"])
    assert {"score_vs_loss.png", "placebo.png"} <= set(widths) and all(w > 0 for w in widths.values()), widths
