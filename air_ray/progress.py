"""Progress a person can read in a log: lines printed at once (``say``), and a line every ``EVERY_S`` seconds while
work goes on (``Ticker``), whatever the work is doing at the time (a model batch, a training step, a Ray wait).

Commands draw a progress bar only on a terminal; everywhere else (a log file, ``ray job logs``, a CI console) they
print these plain lines, so a run that works is never silent for long, and a hung one shows as lines that stop
moving.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

# a plain progress line at least this often while work goes on (AIR_RAY_PROGRESS_S: another interval, e.g. in tests)
EVERY_S = float(os.environ.get("AIR_RAY_PROGRESS_S") or 30.0)


def say(msg: str) -> None:
    """One line on stdout, flushed (stdout is block-buffered when it is not a terminal)."""
    print(msg, flush=True)


def duration(seconds: float) -> str:
    """``3h02m``, ``4m05s``, ``12s``."""
    s = int(round(max(seconds, 0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Ticker:
    """While open, prints ``line()`` every ``every_s`` seconds from a background thread (a line of None is not
    printed); ``with Ticker(line): ...``. The work runs in the caller's thread as before: torch and Ray release the
    interpreter while they compute or wait, so the line comes on time."""

    def __init__(self, line: Callable[[], str | None], every_s: float = EVERY_S, out: Callable[[str], None] = say):
        self.line, self.every_s, self.out = line, every_s, out
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                text = self.line()
            except Exception as e:  # a progress line must never end the run
                text = f"(progress unavailable: {type(e).__name__}: {e})"
            if text:
                self.out(text)

    def start(self) -> "Ticker":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="air-ray-progress", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "Ticker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Elapsed:
    """Start time and a rate-based ETA of ``done`` of ``total`` units."""

    def __init__(self):
        self.t0 = time.time()

    @property
    def seconds(self) -> float:
        return time.time() - self.t0

    def eta(self, done: float, total: float | None) -> str:
        if not total or done <= 0:
            return "ETA ?"
        return f"ETA {duration(self.seconds * max(total - done, 0) / done)}"


VERBOSE_ENV = "AIR_RAY_VERBOSE"  # "1": the libraries' own progress bars and Ray's start-up lines are shown


def verbose() -> bool:
    """Whether the run shows what libraries print on their own (``--verbose``, or AIR_RAY_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet_libraries() -> None:
    """Unless verbose: transformers' and huggingface_hub's own progress bars off ("Loading weights" on every model
    load, in every worker), where this process imports them now or later; when stderr is no terminal, every other
    tqdm bar of the processes started from here too (the run's own bar passes ``disable=False``)."""
    if verbose():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is first imported
    import sys

    if not sys.stderr.isatty():  # in a log, other tqdm bars too (transformers' GGUF conversion draws one with tqdm
        os.environ.setdefault("TQDM_DISABLE", "1")  # directly): read when tqdm is first imported (the children)

    if "transformers" in sys.modules:  # imported already: switch its bars off directly
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
