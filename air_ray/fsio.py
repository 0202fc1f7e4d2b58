"""Files on any fsspec filesystem, written so that readers never see a half-written one.

Every writer in air_ray goes through ``atomic_open``: the file is written under a hidden name (``.name.tmp``,
which pyarrow, pandas, polars, duckdb and ``datasets`` skip) and renamed into place once complete; on an
exception the temporary file is removed (a killed process leaves the hidden file, which readers skip).
"""

from __future__ import annotations

import errno
import json
import posixpath
from contextlib import contextmanager

from air_ray.errors import AirRayError


def with_protocol(fs, path: str) -> str:
    """A path as the user would write it: plain for local files, with the protocol otherwise."""
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if proto in ("file", "local") else f"{proto}://{path}"


def is_local(fs) -> bool:
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return proto in ("file", "local")


# errno values that mean "the output is full", not "this code is wrong": no space, over quota, file too large
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def out_of_space(e: BaseException) -> bool:
    return isinstance(e, OSError) and (e.errno in FULL_ERRNOS or "No space left on device" in str(e))


@contextmanager
def atomic_open(fs, path: str):
    """Open ``path`` on fsspec filesystem ``fs`` for writing under a hidden temporary name; the file is moved
    into place only when the block completes. A full output (no space, over quota) is an ``AirRayError`` naming
    the file: what was committed before it stays, and a rerun with space resumes from there."""
    parent, name = posixpath.split(path)
    tmp = posixpath.join(parent, f".{name}.tmp")
    try:
        fs.makedirs(parent, exist_ok=True)
        with fs.open(tmp, "wb") as f:
            yield f
        fs.mv(tmp, path)
    except BaseException as e:
        try:  # leave nothing behind
            fs.rm(tmp)
        except Exception:
            pass
        if out_of_space(e):
            raise AirRayError(f"out of space writing {with_protocol(fs, path)} ({e.strerror or e}): free space or "
                              "choose another output, then rerun the same command; committed partitions are "
                              "kept") from None
        raise


def write_bytes_atomic(fs, path: str, data: bytes) -> None:
    with atomic_open(fs, path) as f:
        f.write(data)


def write_json_atomic(fs, path: str, doc, indent: int | None = 1) -> None:
    write_bytes_atomic(fs, path, (json.dumps(doc, indent=indent, default=str) + ("\n" if indent else "")).encode())


def local_fs():
    import fsspec

    return fsspec.filesystem("file")
