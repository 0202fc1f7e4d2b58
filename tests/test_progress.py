"""Progress a newcomer can see in a log (issue #34): a plain line at least every interval while work goes on, rows
inside a partition counted as they are scored, and the native noise of Ray's C++ core filtered out of stderr. No
model: a slow stand-in stage runs through the real chain executor and the real progress line."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap
import time
from contextlib import redirect_stdout

from air_ray.cli.supervise import NATIVE_NOISE, NativeFilter
from air_ray.pipeline.executors import InProcess
from air_ray.pipeline.manifest import Progress
from air_ray.pipeline.stages import Chain, Link, Stage
from air_ray.progress import Ticker, duration
from air_ray.store.records import UnitSummary

LINE = re.compile(r"^\[air-ray score\] ([\d,]+) of ([\d,]+) rows \((\d+)%\), ([\d,]+) tokens, [\d,]+ tok/s, (\d+) "
                  r"partitions done, ETA \S+", re.M)


class SlowScore(Stage):
    """Stands in for the scoring stage: each item is a partition of ``rows`` rows, scored one slow batch of 2 rows at
    a time (reported as the real stage's model batches are), then its summary."""

    def process(self, item):
        unit, rows = item
        for _ in range(0, rows, 2):
            time.sleep(0.3)
            self.progress(2, 20)
        return UnitSummary(unit, "corpus.jsonl", "key", rows_read=rows, rows_scored=rows, tokens=10 * rows, nbytes=100)


def test_a_line_comes_mid_partition_with_the_rows_scored_so_far():
    executor = InProcess()
    chain = Chain((Link("score", SlowScore),))
    out = io.StringIO()
    with redirect_stdout(out):
        bar = Progress(total_bytes=200, total_rows=12, live=executor.live, every_s=0.5)
        for summary in executor.run(chain, [("u0", 6), ("u1", 6)]):  # 2 partitions of 3 batches, ~0.9 s each
            bar.update(summary)
        bar.close()
    lines = [m.groups() for m in LINE.finditer(out.getvalue())]
    assert lines, out.getvalue()
    # some line was printed while a partition was being scored: rows that no finished partition holds yet
    assert any(int(rows) % 6 and int(done) * 6 < int(rows) for rows, _, _, _, done in lines), lines
    rows, total, pct, tokens, done = lines[-1]  # the last line: all of it
    assert (rows, total, pct, tokens, done) == ("12", "12", "100", "120", "2")


def test_ticker_prints_while_the_caller_works():
    got = []
    with Ticker(lambda: f"tick {len(got)}", every_s=0.05, out=got.append):
        time.sleep(0.4)  # the work: the ticker's thread prints meanwhile
    n = len(got)
    assert n >= 3 and got[0] == "tick 0"
    time.sleep(0.2)
    assert len(got) == n  # stopped with the block
    assert duration(3725) == "1h02m" and duration(65) == "1m05s" and duration(9.4) == "9s"


def test_native_noise_is_dropped_and_every_other_line_passes(tmp_path):
    noise = ("[2026-12-06 21:08:37,687 E 7520 7520] core_worker.cc:2465: Actor with class name: "
             "'MapWorker(MapBatches(_PrepareActor))' and ID: '482d' has constructor arguments in the object store and "
             "max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor restart "
             "will fail.")
    assert any(p.search(noise.encode()) for p in NATIVE_NOISE)
    child = textwrap.dedent(f"""
        import os, sys
        os.write(2, b"native before\\n" + {noise!r}.encode() + b"\\nnative after\\nno newline at the end")
        fd = int(os.environ["DIRECT"])
        os.write(fd, b"python side\\n")
    """)
    err = tmp_path / "err"
    with open(err, "wb") as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)  # this process's stderr: a file, as in a log
        try:
            native = NativeFilter()
            p = subprocess.Popen([sys.executable, "-c", child], stderr=native.write, pass_fds=native.pass_fds,
                                 env=dict(os.environ, DIRECT=str(native.direct)))
            native.started()
            p.wait(timeout=60)
            native.finish()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    text = err.read_text()
    assert "native before\n" in text and "native after\n" in text and "no newline at the end" in text
    assert "python side\n" in text and "constructor arguments" not in text


def test_other_libraries_bars_stay_out_of_a_log_unless_verbose():
    """A library's own tqdm bar (transformers draws the GGUF conversion's with tqdm directly) in a process started
    after ``quiet_libraries``, with stderr a pipe: gone by default, there with AIR_RAY_VERBOSE=1."""
    script = textwrap.dedent("""
        import subprocess, sys
        from air_ray.progress import quiet_libraries
        quiet_libraries()
        child = "from tqdm import tqdm\\nfor _ in tqdm(range(3), desc='LIBRARY-BAR'): pass"
        sys.exit(subprocess.run([sys.executable, "-c", child]).returncode)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "AIR_RAY_VERBOSE")}
    for verbose, shown in ((None, False), ("1", True)):
        p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                           env=dict(env, **({"AIR_RAY_VERBOSE": verbose} if verbose else {})))
        assert p.returncode == 0, p.stderr
        assert ("LIBRARY-BAR" in p.stderr) is shown, p.stderr
