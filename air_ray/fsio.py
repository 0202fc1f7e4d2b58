"""Files on any fsspec filesystem, written so that readers never see a half-written one.

Every writer in air_ray goes through ``atomic_open``: the file is written under a hidden name (``.name.tmp``,
which pyarrow, pandas, polars, duckdb and ``datasets`` skip) and renamed into place once complete; on an
exception the temporary file is removed (a killed process leaves the hidden file, which readers skip).
"""

from __future__ import annotations

import json
import posixpath
from contextlib import contextmanager


def with_protocol(fs, path: str) -> str:
    """A path as the user would write it: plain for local files, with the protocol otherwise."""
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if proto in ("file", "local") else f"{proto}://{path}"


def is_local(fs) -> bool:
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return proto in ("file", "local")


@contextmanager
def atomic_open(fs, path: str):
    """Open ``path`` on fsspec filesystem ``fs`` for writing under a hidden temporary name; the file is moved
    into place only when the block completes."""
    parent, name = posixpath.split(path)
    tmp = posixpath.join(parent, f".{name}.tmp")
    fs.makedirs(parent, exist_ok=True)
    try:
        with fs.open(tmp, "wb") as f:
            yield f
    except BaseException:
        try:  # leave nothing behind
            fs.rm(tmp)
        except Exception:
            pass
        raise
    fs.mv(tmp, path)


def write_bytes_atomic(fs, path: str, data: bytes) -> None:
    with atomic_open(fs, path) as f:
        f.write(data)


def write_json_atomic(fs, path: str, doc, indent: int | None = 1) -> None:
    write_bytes_atomic(fs, path, (json.dumps(doc, indent=indent, default=str) + ("\n" if indent else "")).encode())


def local_fs():
    import fsspec

    return fsspec.filesystem("file")
