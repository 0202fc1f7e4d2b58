"""A command that drives a Ray cluster runs in a child process, so that a lost cluster ends it with one line.

When the cluster goes away mid-run (``ray stop``, a dead head node, the embedded cluster's processes killed), Ray's
core worker ends the driver process from C++ after it fails to reach the GCS: exit 1, no Python exception, no
``finally``, and a C++ log line last. Nothing inside that process can say what happened, so ``air-ray`` runs such
commands (``Subcommand.ray`` in ``air_ray.cli.SUBCOMMANDS``) in a child and waits: the child reports a normal end through a pipe (``STATUS_FD``)
when its interpreter exits; a child that ended without it was ended from below, and this process prints

    air-ray: error: the Ray cluster was lost mid-run (...); rerun the same command to resume ...

and exits ``LOST_EXIT`` (3): a scheduler can tell "rerun" from a bad command (2). Everything else passes through:
the child's exit code, stdout and stderr (inherited, so progress bars and ordering are as without the parent),
except, unless ``--verbose``, the lines of ``NATIVE_NOISE`` that Ray's C++ core writes to file descriptor 2
(``NativeFilter``: they stay in Ray's log files).
SIGTERM and SIGHUP are passed on; the child dies with this process (``PR_SET_PDEATHSIG``), so a killed driver
takes its embedded cluster down as before.

A child whose command returned ends without the interpreter's teardown (``exit_now``): its work is written and
closed, and freeing a loaded model's objects one by one took ~1 s of every run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

STATUS_FD = "AIR_RAY_STATUS_FD"
CHILD_STDERR_FD = "AIR_RAY_STDERR_FD"  # the child's sys.stderr, when its file descriptor 2 goes through NativeFilter
LOST_EXIT = 3
_OK = b"ok"


def supervised() -> bool:
    """True in the child (it reports its end through the pipe instead of starting another child)."""
    return STATUS_FD in os.environ


def report_normal_exit() -> None:
    """In the child: when the interpreter exits normally (any exit code, a traceback included), tell the parent."""
    import atexit

    fd = int(os.environ.pop(STATUS_FD))  # not inherited by this child's own children (Ray's processes)

    def done():
        try:
            os.write(fd, _OK)
        except OSError:
            pass

    atexit.register(done)


def exit_now(code: int) -> int:
    """In the child, after its command returned ``code``: run the exit handlers (the pipe's report, logging's flush,
    Ray's shutdown), flush stdout and stderr and end the process without the interpreter's teardown (the garbage
    collection of every object, modules one by one: ~1 s with a model loaded). Returns ``code`` (a normal exit)
    where a non-daemon thread is still running, since the interpreter would wait for it."""
    import atexit
    import threading

    main = threading.main_thread()
    if any(t is not main and t.is_alive() and not t.daemon for t in threading.enumerate()):
        return code
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def run_child(argv: list[str]) -> int:
    """Run ``air-ray argv`` in a child process; its exit code, or ``LOST_EXIT`` with one line when it was ended
    from below (Ray's exit on a lost cluster, or a signal)."""
    from air_ray.progress import verbose

    read, write = os.pipe()
    env = dict(os.environ, **{STATUS_FD: str(write)})
    native = None if verbose() else NativeFilter()
    if native is not None:
        env[CHILD_STDERR_FD] = str(native.direct)
    child = subprocess.Popen([sys.executable, "-m", "air_ray", *argv], env=env,
                             pass_fds=(write, *(native.pass_fds if native else ())),
                             stderr=native.write if native else None, preexec_fn=_die_with_parent(os.getpid()))
    os.close(write)
    if native is not None:
        native.started()
    forward = {s: signal.signal(s, lambda n, _f: child.send_signal(n)) for s in (signal.SIGTERM, signal.SIGHUP)}
    interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the child (same process group)
    try:
        code = child.wait()
    finally:
        for s, handler in forward.items():
            signal.signal(s, handler)
        signal.signal(signal.SIGINT, interrupt)
        if native is not None:
            native.finish()
    # the child wrote before it ended; a process it forked may still hold the pipe open, so no blocking read
    os.set_blocking(read, False)
    try:
        normal = os.read(read, len(_OK)) == _OK
    except BlockingIOError:
        normal = False
    finally:
        os.close(read)
    if normal:
        return code
    if code in (130, -signal.SIGINT):  # interrupted: Ctrl-C says it all
        return 130
    if code < 0:
        how = f"the run's process was killed by {signal.Signals(-code).name}"
    else:
        how = (f"the Ray cluster was lost mid-run (exit {code} from Ray: its GCS or this node's raylet stopped "
               "answering)")
    print(f"air-ray: error: {how}; rerun the same command to resume: committed partitions are kept",
          file=sys.stderr, flush=True)
    return LOST_EXIT


def _die_with_parent(parent: int):
    def preexec():
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # not Linux: the child may outlive a SIGKILLed parent
            pass
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


# Lines that Ray's C++ core writes to the driver's stderr although they are not the user's concern; each is also in
# Ray's own log files (<ray temp dir>/session_*/logs/python-core-driver-*.log), so dropping it here loses nothing.
NATIVE_NOISE = (
    # Ray Data's actor pools always create their actors with arguments in the object store and restarts allowed
    # (ray-project/ray#57733): logged at error level for every pool, and harmless here (a restarted scoring actor
    # gets its arguments again from the driver, which holds them for the whole run)
    re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"),
)


class NativeFilter:
    """The child's file descriptor 2 is a pipe this process reads: lines ``noise`` matches are dropped, the rest
    written on to this process's stderr, also after the child ended (the last lines of a child that Ray ended from
    below are not lost). The child's Python ``sys.stderr`` writes straight to the stream this process has
    (``CHILD_STDERR_FD``): a terminal stays a terminal for its progress bar, and its own lines keep their order."""

    def __init__(self, noise=NATIVE_NOISE):
        self.noise = noise
        self.read, self.write = os.pipe()
        self.direct = os.dup(2)  # the child's sys.stderr
        self.thread = threading.Thread(target=self._pump, name="air-ray-stderr", daemon=True)
        self.pending = b""

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return (self.direct,)

    def started(self) -> None:
        """After the child started: only the child writes into the pipe now."""
        os.close(self.write)
        os.close(self.direct)
        self.thread.start()

    def _emit(self, data: bytes, last: bool = False) -> None:
        self.pending += data
        *lines, self.pending = self.pending.split(b"\n")
        if last and self.pending:
            lines.append(self.pending)
            self.pending = b""
        out = b"".join(line + b"\n" for line in lines if not any(p.search(line) for p in self.noise))
        if out:
            os.write(2, out)

    def _pump(self) -> None:
        while True:
            try:
                data = os.read(self.read, 65536)
            except OSError:
                break
            if not data:
                break
            self._emit(data)

    def finish(self, timeout: float = 0.5) -> None:
        """After the child ended: what it wrote is passed on (processes it started may hold the pipe open, so this
        waits ``timeout`` seconds at most)."""
        self.thread.join(timeout)
        if not self.thread.is_alive():
            self._emit(b"", last=True)


def use_direct_stderr() -> None:
    """In the child of a ``NativeFilter``: ``sys.stderr`` writes to the stream the parent had, not to the filtered
    file descriptor 2 (which the child's own children inherit)."""
    fd = os.environ.pop(CHILD_STDERR_FD, None)
    if fd is None:
        return
    sys.stderr.flush()
    sys.stderr = os.fdopen(int(fd), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                           errors=sys.stderr.errors or "backslashreplace")
