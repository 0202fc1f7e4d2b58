"""The command line's contract: one-line errors with exit code 2, `model fetch` prints the directory last."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


def air_ray(*args, env=None, timeout=300):
    e = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "air_ray", *args], capture_output=True, text=True,
                          timeout=timeout, env=e)


def assert_one_line_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn" not in ln]
    assert len(lines) == 1 and lines[0].startswith("air-ray: error: "), p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_unknown_model(tmp_path):
    assert_one_line_error(air_ray("model", "fetch", "no-such-model"), "unknown model")
    assert_one_line_error(air_ray("heads", "--model", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "h.json")),
                          "unknown model")
    assert_one_line_error(air_ray("model", "fetch", "nobody-xyz/no-such-repo"), "unknown model")


def test_debug_shows_traceback():
    p = air_ray("--debug", "model", "fetch", "no-such-model")
    assert p.returncode != 0 and "Traceback" in p.stderr


@pytest.mark.slow
def test_model_fetch_prints_directory_last(smol_ref):
    p = air_ray("model", "fetch", "smollm2-135m")
    assert p.returncode == 0, p.stderr[-2000:]
    last = p.stdout.strip().splitlines()[-1]
    assert last == str(smol_ref.path) and os.path.isdir(last)


def test_probe_answer_not_in_prompt(tmp_path):
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"prompt": "The code is 1234.", "answer": "1234"}) + "\n"
                      + json.dumps({"prompt": "The code is 1234.", "answer": "9999"}) + "\n")
    assert_one_line_error(air_ray("heads", "--probes", str(probes), "--out", str(tmp_path / "h.json")),
                          "line 2", "answer")


@pytest.mark.slow
def test_heads_for_another_model(tmp_path, heads_file, smol_ref):
    doc = json.loads(heads_file.read_text())
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "1+1?", "response": "2"}) + "\n")
    args = ["score", "--input", str(inp), "--output", str(tmp_path / "out"), "--address", "local"]

    other = dict(doc, model_fingerprint="0123456789abcdef")
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert_one_line_error(air_ray(*args, "--heads", str(tmp_path / "other.json")), "fingerprint",
                          "--allow-model-mismatch")

    shape = dict(doc, num_layers=12, heads=[[11, 0]])
    (tmp_path / "shape.json").write_text(json.dumps(shape))
    assert_one_line_error(air_ray(*args, "--heads", str(tmp_path / "shape.json")), "12x9")

    assert_one_line_error(air_ray(*args, "--heads", str(tmp_path / "missing.json")), "does not exist")


@pytest.mark.slow
def test_score_input_and_output_errors(tmp_path, heads_file):
    base = ["score", "--heads", str(heads_file), "--address", "local"]
    assert_one_line_error(air_ray(*base, "--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o")),
                          "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(air_ray(*base, "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o")),
                          "no input files")
    inp = tmp_path / "in.jsonl"
    inp.write_text("{}\n")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(air_ray(*base, "--input", str(inp), "--output", str(blocker / "out")), "cannot be written")


def test_yaml_config_unknown_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("scores: x\noutput: y\ntop_fraction: 0.1\n")
    assert_one_line_error(air_ray("select", "--config", str(cfg)), "top_fraction")


def test_unreachable_input_store(tmp_path):
    """An object store that does not answer: one line naming the input, not a traceback from deep in s3fs."""
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}
    p = air_ray("score", "--input", "s3://nobucket/dumps/", "--output", str(tmp_path / "o"), "--address", "local",
                env=env)
    assert_one_line_error(p, "s3://nobucket/dumps/", "cannot be listed")


def test_allow_model_mismatch_overrides_only_the_fingerprint(tmp_path):
    from air_ray.errors import AirRayError
    from air_ray.store.heads import load_heads

    doc = {"format_version": 1, "model": "m", "model_fingerprint": "aaaa", "num_layers": 2, "num_heads": 4,
           "heads": [[1, 2]]}
    path = tmp_path / "h.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(AirRayError, match="fingerprint"):
        load_heads(str(path), fingerprint="bbbb", shape=(2, 4, 2, 8))
    assert load_heads(str(path), fingerprint="bbbb", shape=(2, 4, 2, 8), allow_mismatch=True)["heads"] == [(1, 2)]
    with pytest.raises(AirRayError, match="2x4"):  # a shape mismatch is never overridden
        load_heads(str(path), fingerprint="bbbb", shape=(3, 4, 2, 8), allow_mismatch=True)


@pytest.mark.slow
def test_heads_detection_runs_as_a_ray_task(tmp_path, smol_ref):
    """`air-ray heads` detects in a Ray task (with the CPUs/GPUs it asks for), not in the command's process, and
    writes heads.json + heads.png where the command runs; the result equals a detection in this process."""
    from air_ray.config import HeadsConfig
    from air_ray.heads.run import detect_heads

    out = tmp_path / "h.json"
    args = ["--num-probes", "2", "--probe-tokens", "256", "--device", "cpu", "--address", "local"]
    proc = subprocess.Popen([sys.executable, "-m", "air_ray", "heads", *args, "--output", str(out), "--cpus-per-worker", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    doc = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    where = doc["detected_on"]
    assert where["pid"] != proc.pid and where["pid"] != os.getpid() and where["device"] == "cpu", where
    here = detect_heads(HeadsConfig(num_probes=2, probe_tokens=256, device="cpu", output=str(tmp_path / "x.json")))
    assert doc["heads"] == here["heads"]
    assert max(abs(a - b) for ra, rb in zip(doc["scores"], here["scores"]) for a, b in zip(ra, rb)) <= 1e-5


@pytest.mark.slow
def test_ray_job_submit_detect_heads_runs_on_a_worker(tmp_path, ray_start_cluster):
    """`ray job submit -- python jobs/detect_heads.py ...` on a `ray start` cluster whose head has no CPUs (as in
    cluster/rayjob-score.yaml): the job's driver runs on the head and only coordinates; the detection runs on the
    worker node, in another process."""
    cluster = ray_start_cluster.add("head", cpus=0, head=True, dashboard=True).add("w1", cpus=2)
    out = tmp_path / "heads.json"
    job = f"detect-heads-{os.getpid()}"
    p = cluster.job_submit(sys.executable, str(REPO / "jobs" / "detect_heads.py"), "--num-probes", "2",
                           "--probe-tokens", "256", "--device", "cpu", "--output", str(out), submission_id=job)
    assert p.returncode == 0 and "succeeded" in p.stdout + p.stderr, p.stdout[-3000:] + p.stderr[-3000:]
    where = json.loads(out.read_text())["detected_on"]
    state = cluster.state(job)
    head = [i for i, n in state["nodes"].items() if n["head"]]
    worker = [i for i, n in state["nodes"].items() if not n["head"] and n["cpus"] > 0]
    assert len(head) == 1 and len(worker) == 1, state
    assert where["node_id"] == worker[0] != head[0], (where, state)
    assert where["pid"] != state["driver_pid"] and where["device"] == "cpu", (where, state)


# ----------------------------------------------------------------------------------------------
# progress: a bar on a terminal, plain lines elsewhere (issue #27)


def on_terminal(args: list[str], timeout: float = 600) -> tuple[int, str]:
    """``air-ray args`` with stdin, stdout and stderr on a pseudo-terminal of 120 x 40 -> (exit code, all it wrote)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "air_ray", *args], stdin=slave, stdout=slave, stderr=slave,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), close_fds=True)
    os.close(slave)
    out = bytearray()
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # EIO: the child side is closed
            break
        if not data:
            break
        out += data
    os.close(master)
    return proc.wait(timeout=timeout), out.decode(errors="replace")


PLAIN = re.compile(r"^\[air-ray score\] [\d,]+ of [\d,]+ rows \(\d+%\), [\d,]+ tokens, [\d,]+ tok/s, \d+ partitions done, "
                   r"ETA \S+", re.M)
# what Ray prints on its own that a user does not need to see (issue #34): the C++ core's warning about actor
# arguments, Ray Data's INFO lines, colour codes of the workers' line prefixes, the model loader's bar
NOISE = ("has constructor arguments in the object store", "Execution plan of Dataset", "\x1b[", "Loading weights")
OUR_BAR = re.compile(r"\[air-ray score\] +\d+%\|[^|]*\| \S+/\S+ input, [\d,]+ rows, [\d,]+ tok/s \[")


@pytest.fixture(scope="module")
def progress_corpus(tmp_path_factory, tiny_model, gsm8k_rows):
    d = tmp_path_factory.mktemp("progress")
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows[:8]))
    model, heads = tiny_model
    return d, ["score", "--model", str(model), "--heads", str(heads), "--input", str(d / "rows.jsonl"),
               "--rows-per-partition", "2", "--device", "cpu", "--dtype", "float32"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["terminal, ray", "terminal --no-progress", "pipe", "pipe, ray", "pipe, ray --verbose"])
def test_progress_bar_on_a_terminal_plain_lines_elsewhere(how, progress_corpus, tmp_path):
    d, args = progress_corpus
    args = args + ["--output", str(tmp_path / "out")]
    on_ray = ["--executor", "ray", "--address", "local", "--workers", "1", "--cpus-per-worker", "1"]
    if how == "terminal, ray":  # Ray Data's own bars stay quiet: the run's bar is the only one
        code, text = on_terminal(args + on_ray)
    elif how == "terminal --no-progress":
        code, text = on_terminal(args + ["--no-progress"])
    else:  # a log: stdout and stderr are pipes; a plain line at least every second (AIR_RAY_PROGRESS_S)
        extra = (on_ray if "ray" in how else []) + (["--verbose"] if "verbose" in how else [])
        env = {k: v for k, v in os.environ.items() if k not in ("AIR_RAY_VERBOSE", "RAY_COLOR_PREFIX")}
        p = subprocess.run([sys.executable, "-m", "air_ray", *args, *extra], capture_output=True, text=True,
                           timeout=600, env=dict(env, HF_HUB_OFFLINE="1", AIR_RAY_PROGRESS_S="1"))
        code, text = p.returncode, p.stdout + p.stderr
        if "verbose" in how:  # Ray's own lines are there to be kept out: the check below can fail. (Only the
            # driver's own: the worker's loader bar reaches the driver through Ray's log monitor, which may send it
            # after the driver has exited.)
            assert "Execution plan of Dataset" in text, text[-3000:]
        else:
            assert not [n for n in NOISE if n in text], text[-3000:]
    assert code == 0, text[-3000:]
    assert "8 scored" in text
    segments = re.split(r"[\r\n]+", text)
    bars = [s for s in segments if "%|" in s]
    if how == "terminal, ray":
        ours = [s for s in bars if OUR_BAR.search(s)]
        assert ours and "100%" in ours[-1] and "8 rows" in ours[-1], bars
        assert not PLAIN.search(text)
        # no other bar but the model loader's (in the worker): none of Ray Data's operators or its row counts
        others = [s for s in bars if not OUR_BAR.search(s) and "Loading weights" not in s]
        assert others == [], others
    else:
        assert not any(OUR_BAR.search(s) for s in bars), bars
        lines = [s for s in segments if PLAIN.match(s)]
        assert lines and "8 of 8 rows (100%)" in lines[-1], lines
