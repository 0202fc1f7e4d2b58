"""A lease object on any fsspec store: at most one writer per output version at a time.

``_lease.json`` holds the owner (a random token), host, pid and an expiry time. A holder renews it every
ttl/3 seconds from a background thread; a crashed holder's lease lapses after ``ttl_s`` — sooner on the same
host, where a lease whose process is gone is taken over at once.

Acquisition: on a local filesystem the file is created with O_EXCL (atomic). On object stores, which have no
portable create-if-absent through fsspec, the lease is written and read back after a settle delay; of two
writers racing within that delay the later write wins and the earlier one backs off.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
import uuid

from air_ray.fsio import is_local


class Lease:
    def __init__(self, fs, path: str, ttl_s: float = 600.0, settle_s: float = 1.0):
        self.fs, self.path, self.ttl_s, self.settle_s = fs, path, float(ttl_s), settle_s
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading ----------------------------------------------------------------------------------

    def holder(self) -> dict | None:
        """The current lease document, or None when there is none or it has lapsed."""
        try:
            doc = json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except (ValueError, OSError):  # torn or unreadable: treat as lapsed
            return None
        if doc.get("expires", 0) < time.time():
            return None
        if doc.get("host") == socket.gethostname() and not _alive(doc.get("pid")):
            return None  # its process is gone
        return doc

    # -- holding ----------------------------------------------------------------------------------

    def _doc(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "acquired": now, "expires": now + self.ttl_s}).encode()

    def acquire(self) -> bool:
        if self.holder() is not None:
            return False
        self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        if is_local(self.fs):
            if not self._create_local():
                return False
        else:
            self.fs.pipe_file(self.path, self._doc())
            time.sleep(self.settle_s)
            current = self.holder()
            if current is None or current.get("owner") != self.owner:
                return False
        self._thread = threading.Thread(target=self._renew, daemon=True, name="air-ray-lease")
        self._thread.start()
        return True

    def _create_local(self) -> bool:
        path = self.path
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            # a lapsed lease: move it aside atomically (only one contender wins the rename), then create
            stale = f"{path}.{self.owner}.stale"
            try:
                os.rename(path, stale)
                os.remove(stale)
            except FileNotFoundError:
                return False
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._doc())
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                current = json.loads(self.fs.cat_file(self.path))
                if current.get("owner") != self.owner:
                    return  # lost (it lapsed and another run took it): stop renewing
                if is_local(self.fs):
                    tmp = f"{self.path}.{self.owner}.tmp"
                    with open(tmp, "wb") as f:
                        f.write(self._doc())
                    os.replace(tmp, self.path)
                else:
                    self.fs.pipe_file(self.path, self._doc())
            except Exception:
                continue  # a transient store error: try again at the next beat

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            current = json.loads(self.fs.cat_file(self.path))
            if current.get("owner") == self.owner:
                self.fs.rm(self.path)
        except (FileNotFoundError, ValueError, OSError):
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
