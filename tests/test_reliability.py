"""Reliability (issue #4): every kind of bad input through the real pipeline, global duplicate ids, truncation,
--strict, commit markers and resume, a SIGKILLed scoring actor and a SIGKILLed driver."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _read_dir(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    files = sorted(p for p in path.glob("*.parquet") if not p.name.startswith((".", "_")))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


# ----------------------------------------------------------------------------------------------
# pure parts


def test_find_duplicates_matches_brute_force():
    from air_ray.data.ids import by_source, find_duplicates, id_hash, order_key

    rng = random.Random(0)
    files = ["a.jsonl", "b.jsonl", "c.parquet"]
    records = [(fi, line, f"id{rng.randrange(40)}") for fi in range(3) for line in range(1, 60, rng.choice([1, 2]))]
    rng.shuffle(records)  # arrival order must not matter
    got = find_duplicates(np.array([id_hash(r) for _, _, r in records], dtype=np.int64),
                          np.array([order_key(f, l) for f, l, _ in records], dtype=np.int64))
    first: dict[str, tuple[int, int]] = {}
    for f, l, r in sorted(records):
        first.setdefault(r, (f, l))
    want = {order_key(f, l): order_key(*first[r]) for f, l, r in records if first[r] != (f, l)}
    assert got == want and len(want) > 50
    named = by_source(got, files)
    f, l, r = next((f, l, r) for f, l, r in sorted(records) if first[r] != (f, l))
    assert named[files[f]][l] == f"first occurrence: {files[first[r][0]]}:{first[r][1]}"
    assert find_duplicates(np.array([], dtype=np.int64), np.array([], dtype=np.int64)) == {}


def test_truncate_cuts_the_response_to_a_token_prefix(smol_tok, gsm8k_rows):
    from air_ray.data.rows import RowError, RowPreparer

    row = max(gsm8k_rows, key=lambda r: len(r["response"]))
    full = RowPreparer(smol_tok, "chat", "lines").prepare(row)
    limit = full.n_prompt_tokens + full.n_response_tokens // 2
    with pytest.raises(RowError) as e:
        RowPreparer(smol_tok, "chat", "lines", max_tokens=limit).prepare(row)
    assert e.value.reason == "too_long"
    cut = RowPreparer(smol_tok, "chat", "lines", max_tokens=limit, truncate=True).prepare(row)
    assert cut.truncated and not full.truncated
    assert len(cut.input_ids) == limit and cut.input_ids == full.input_ids[:limit]
    assert cut.token_starts == full.token_starts[: cut.n_response_tokens]
    end = full.token_starts[cut.n_response_tokens]  # the first character that was cut away
    assert cut.step_spans and all(b <= end for _, b in cut.step_spans)
    assert cut.step_spans[:-1] == full.step_spans[: len(cut.step_spans) - 1]
    # a prompt that alone exceeds the budget is still rejected
    with pytest.raises(RowError) as e:
        RowPreparer(smol_tok, "chat", "lines", max_tokens=full.n_prompt_tokens, truncate=True).prepare(row)
    assert e.value.reason == "too_long" and "prompt alone" in e.value.detail


# ----------------------------------------------------------------------------------------------
# every bad-input kind through the real pipeline (a tiny real checkpoint with the default tokenizer, one of
# whose token embeddings is NaN, so that one row has non-finite losses)

NAN_WORD = " xylophone"


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory, smol_ref, smol_tok):
    from tests.conftest import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("nan_model"), smol_ref, smol_tok, nan_words=[NAN_WORD])


@pytest.fixture(scope="module")
def messy(tmp_path_factory, short_rows, smol_tok):
    """Two JSONL files, one corrupt .jsonl.gz: each kind of bad record once, blank lines, cross-file and
    in-file duplicate ids, one over-long response (cut), one over-long prompt (rejected), path-like ids."""
    d = tmp_path_factory.mktemp("messy")
    g = [dict(r) for r in short_rows[:6]]
    for r in short_rows:  # the NaN token must appear in one row only
        assert NAN_WORD.strip() not in r["prompt"] + r["response"]
    long_resp = "\n".join(f"Step {i}: add {i} and {i + 1} to get {2 * i + 1}." for i in range(60))
    a = [
        json.dumps(g[0]),                                                    # 1 ok
        "{not json",                                                         # 2 invalid_json
        "",                                                                  # 3 blank: not a row
        json.dumps([1, 2]),                                                  # 4 not_object
        json.dumps({"id": "np", "prompt": "hi"}),                            # 5 missing_field
        json.dumps({"id": "bt", "prompt": "hi", "response": 5}),             # 6 bad_type
        json.dumps({"id": "er", "prompt": "hi", "response": "  \n "}),       # 7 empty_response
        json.dumps({"id": "et", "prompt": "", "response": "4"}),             # 8 empty_tokens (raw format)
        json.dumps({"id": "na", "messages": [{"role": "user", "content": "hi"}]}),  # 9 no_assistant_turn
        None,                                                                # 10 invalid_utf8
        json.dumps(dict(g[1], id="../../escape", domain="../../../etc")),  # 11 ok: path-like id and domain
        json.dumps(dict(g[2], id=g[0]["id"])),                               # 12 duplicate_id (of line 1)
        json.dumps({"id": "nan", "prompt": g[3]["prompt"], "response": "It is a" + NAN_WORD + "."}),  # 13
        json.dumps({"id": "long", "prompt": "Count.", "response": long_resp}),  # 14 ok, truncated
        json.dumps({"id": "longprompt", "prompt": long_resp, "response": "done"}),  # 15 too_long
        "   ",                                                                # 16 blank
        json.dumps({"id": "m1", "messages": [{"role": "user", "content": g[4]["prompt"]},
                                             {"role": "assistant", "content": g[4]["response"]}]}),  # 17 ok
    ]
    with open(d / "a.jsonl", "wb") as f:
        for line in a:
            f.write(b"\xff\xfe{bad" if line is None else line.encode())
            f.write(b"\n")
    b = [json.dumps(g[5]), json.dumps(dict(g[3], id="m1")), json.dumps(dict(g[2], id="../../escape"))]
    (d / "b.jsonl").write_text("\n".join(b) + "\n")  # line 1 ok; 2 and 3 are duplicates of a.jsonl ids
    (d / "c.jsonl.gz").write_bytes(gzip.compress(b'{"id": "z", "prompt": "a", "response": "b"}\n')[:-12] + b"junk")
    expected = {
        "invalid_json": 1, "not_object": 1, "missing_field": 1, "bad_type": 1, "empty_response": 1,
        "empty_tokens": 1, "no_assistant_turn": 1, "invalid_utf8": 1, "duplicate_id": 3, "non_finite_loss": 1,
        "too_long": 1, "unreadable_file": 1,
    }
    scored = {g[0]["id"], "../../escape", "long", "m1", g[5]["id"]}
    return {"dir": d, "expected": expected, "scored": scored, "rows_read": 15 + 3 + 1}


def _cli(*args, timeout=900, **kw):
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "air_ray", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO, **kw)


@pytest.mark.slow
def test_every_bad_input_kind_through_the_pipeline(nan_model, messy, tmp_path):
    model_dir, heads = nan_model
    out = tmp_path / "out"
    p = _cli("score", "--model", model_dir, "--heads", heads, "--input", messy["dir"], "--output", out,
             "--format", "raw", "--max-tokens", 200, "--truncate", "--strict", "--rows-per-partition", 4,
             "--dtype", "float32", "--device", "cpu", "--address", "local", "--cpus-per-worker", 1)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-3000:]  # --strict: rows were rejected
    assert "rows rejected (--strict)" in p.stderr and "Traceback" not in p.stderr
    m = json.loads((out / "_manifest.json").read_text())
    c = m["counts"]
    assert c["rejected_by_reason"] == messy["expected"]
    assert c["rows_read"] == messy["rows_read"] == c["rows_scored"] + c["rows_rejected"]
    assert m["duplicate_ids"] == 3
    scores, rejected = _read_dir(out / "scores"), _read_dir(out / "rejected")
    assert sorted(r["id"] for r in scores) == sorted(messy["scored"])
    assert len(rejected) == c["rows_rejected"]
    by_line = {(Path(r["source"]).name, r["line"]): r for r in rejected}
    assert by_line[("a.jsonl", 12)]["reason"] == "duplicate_id"
    assert by_line[("a.jsonl", 12)]["detail"].endswith("a.jsonl:1")  # the first occurrence wins
    assert by_line[("b.jsonl", 2)]["id"] == "m1" and by_line[("b.jsonl", 3)]["reason"] == "duplicate_id"
    assert by_line[("a.jsonl", 13)]["reason"] == "non_finite_loss"
    assert by_line[("a.jsonl", 15)]["reason"] == "too_long"
    assert [r["reason"] for r in rejected if r["source"].endswith(".gz")] == ["unreadable_file"]
    assert not any(line in (3, 16) for (f, line) in by_line if f == "a.jsonl")  # blank lines are not rows
    trunc = {r["id"]: r["truncated"] for r in scores}
    assert trunc.pop("long") is True and not any(trunc.values())
    long = next(r for r in scores if r["id"] == "long")
    assert long["n_prompt_tokens"] + long["n_response_tokens"] == 200
    # ids and domains never reach a path: everything the run wrote is inside the output directory
    written = {p.relative_to(out).parts[0] for p in out.rglob("*")}
    assert written <= {"scores", "rejected", "_commits", "_manifest.json"}
    assert not (tmp_path / "escape").exists() and not list(tmp_path.parent.glob("escape*"))
    # without --strict the same run exits 0 (and reuses every committed partition)
    p = _cli("score", "--model", model_dir, "--heads", heads, "--input", messy["dir"], "--output", out,
             "--format", "raw", "--max-tokens", 200, "--truncate", "--rows-per-partition", 4,
             "--dtype", "float32", "--device", "cpu", "--address", "local", "--cpus-per-worker", 1)
    assert p.returncode == 0, p.stderr[-3000:]
    m2 = json.loads((out / "_manifest.json").read_text())
    assert m2["counts"] == c and m2["this_run"]["units_skipped"] == m2["this_run"]["units"]
    assert m2["this_run"]["rows_scored"] == 0


# ----------------------------------------------------------------------------------------------
# killed processes (the real default model; 8 short GSM8K rows, one row per partition, two actors)


@pytest.fixture(scope="module")
def kill_corpus(tmp_path_factory, short_rows):
    d = tmp_path_factory.mktemp("kill_corpus")
    rows = short_rows[:8]
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d, rows


def _score_args(heads_file, corpus_dir, out):
    return ["score", "--heads", heads_file, "--input", corpus_dir, "--output", out, "--dtype", "float32",
            "--device", "cpu", "--address", "local", "--rows-per-partition", 1, "--workers", 2,
            "--cpus-per-worker", 1]


def _start(args) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "air_ray", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _pids_with(fragment: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if fragment in (d / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def _wait_for(cond, timeout: float, proc: subprocess.Popen | None = None, what: str = ""):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _commits(out: Path) -> int:
    return len(list((out / "_commits").glob("*.json"))) if (out / "_commits").exists() else 0


def _reap(proc: subprocess.Popen) -> None:
    """Whatever of the run's process group outlived it (so a failed test leaves no Ray behind)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, heads_file, kill_corpus):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    p = _cli(*_score_args(heads_file, kill_corpus[0], out))
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def _assert_same_scores(a: Path, b: Path) -> None:
    ra = {r["id"]: r for r in _read_dir(a / "scores")}
    rb = {r["id"]: r for r in _read_dir(b / "scores")}
    assert ra.keys() == rb.keys()
    for k in ra:  # float32 on CPU, same batches: bit-identical
        for col in ("loss_base", "loss_ref", "score", "step_scores", "step_weights", "step_spans"):
            assert ra[k][col] == rb[k][col], (k, col)


@pytest.mark.slow
def test_sigkill_of_a_scoring_actor_loses_and_doubles_nothing(heads_file, kill_corpus, uninterrupted, tmp_path):
    out = tmp_path / "out"
    proc = _start(_score_args(heads_file, kill_corpus[0], out))
    try:
        actors = _wait_for(lambda: len(_pids_with("MapBatches(_ScoreActor)")) == 2 and _commits(out) >= 1
                           and _pids_with("MapBatches(_ScoreActor)"), 600, proc, "two score actors at work")
        assert _commits(out) < len(kill_corpus[1]), "too late: the run had already finished"
        victim = actors[0]
        os.kill(victim, signal.SIGKILL)
        log, _ = proc.communicate(timeout=900)
    finally:
        _reap(proc)
    assert proc.returncode == 0, log[-4000:]
    assert victim not in _pids_with("MapBatches(_ScoreActor)")
    m = json.loads((out / "_manifest.json").read_text())
    ids = [r["id"] for r in _read_dir(out / "scores")]
    assert sorted(ids) == sorted(r["id"] for r in kill_corpus[1])  # every valid id exactly once
    assert m["counts"]["rows_scored"] == len(ids) and m["counts"]["rows_rejected"] == 0
    assert _commits(out) == len(kill_corpus[1])
    _assert_same_scores(out, uninterrupted)


@pytest.mark.slow
def test_sigkill_of_the_driver_then_rerun_resumes(heads_file, kill_corpus, uninterrupted, tmp_path):
    out = tmp_path / "out"
    args = _score_args(heads_file, kill_corpus[0], out)
    proc = _start(args)
    try:
        _wait_for(lambda: _commits(out) >= 2, 600, proc, "two committed partitions")
        proc.kill()  # SIGKILL to the driver (`air-ray score`) only
        proc.wait(timeout=30)
        done_before = _commits(out)
        assert done_before < len(kill_corpus[1]), "too late: the run had already finished"
        assert not (out / "_manifest.json").exists()
        time.sleep(5)  # the embedded cluster shares the driver's fate
    finally:
        _reap(proc)
    p = _cli(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((out / "_manifest.json").read_text())
    total = len(kill_corpus[1])
    assert m["counts"]["rows_scored"] == total and m["counts"]["rows_read"] == total
    r = m["this_run"]
    assert r["units_skipped"] >= done_before >= 2 and r["rows_scored"] == total - r["units_skipped"] < total
    ids = [x["id"] for x in _read_dir(out / "scores")]
    assert len(ids) == len(set(ids)) == total
    assert not [f for f in out.rglob("*") if f.name.startswith(".") and f.name.endswith(".tmp")
                and f.stat().st_mtime > time.time() - 60]  # the rerun leaves no temporary files of its own
    _assert_same_scores(out, uninterrupted)  # equals an uninterrupted run, bit for bit


def test_half_written_partition_is_never_read(tmp_path):
    """A writer killed mid-file leaves only its hidden temporary file; readers and select see the committed
    partitions only. An exception inside the write removes the temporary file."""
    import fsspec
    import pandas as pd
    import pyarrow.dataset as pads

    from air_ray.fsio import atomic_open
    from air_ray.store import schemas as schema
    from air_ray.config import SelectConfig
    from air_ray.outputs.select import select

    fs = fsspec.filesystem("file")
    d = tmp_path / "scores"
    row = {"id": "a", "domain": None, "source": "s", "n_prompt_tokens": 1, "n_response_tokens": 1,
           "loss_base": 1.0, "loss_ref": 2.0, "score": 1.0, "step_spans": [[0, 1]], "step_token_counts": [1],
           "step_scores": [1.0], "step_weights": [1.0], "truncated": False,
           "entropy_base": 1.5}
    schema.write_table_atomic(schema.to_table([row], schema.SCORES), fs, str(d / "p-00000.parquet"))
    # what a SIGKILL mid-write leaves: a hidden, truncated file
    full = (d / "p-00000.parquet").read_bytes()
    (d / ".p-00001.parquet.tmp").write_bytes(full[: len(full) // 2])
    with pytest.raises(RuntimeError):
        with atomic_open(fs, str(d / "p-00002.parquet")) as f:
            f.write(full[:100])
            raise RuntimeError("killed")
    assert sorted(p.name for p in d.iterdir()) == [".p-00001.parquet.tmp", "p-00000.parquet"]
    assert len(pd.read_parquet(d)) == 1
    assert pads.dataset(str(d), format="parquet").count_rows() == 1
    summary = select(SelectConfig(scores=str(tmp_path), output=str(tmp_path / "sel"), top_k=5))
    assert summary["counts"]["rows_total"] == 1
    assert [r["id"] for r in _read_dir(tmp_path / "sel")] == ["a"]
