"""Files on any fsspec filesystem: the one place air_ray makes a filesystem, and writes that readers never see
half-done.

``url_to_fs`` and ``open_uri`` turn a URI into a filesystem (every module goes through them). For ``s3://`` that
is ``S3FileSystem``: s3fs's, with the client's retries declared here (``S3_MAX_ATTEMPTS``, ``S3_CALL_RETRIES``),
one warning line per retry, and an ``S3Error`` (one line, naming the operation and the path) when a request
still fails after them.

Every writer in air_ray goes through ``atomic_open``: the file is written under a hidden name of the writer's own
(``.name.<pid>-<random>.tmp``, which pyarrow, pandas, polars, duckdb and ``datasets`` skip) and renamed into place
once complete; on an exception the temporary file is removed (a killed process leaves the hidden file, which
readers skip).

May import: ``errors``.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import secrets
import sys
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
    # a name of this writer's own: a restarted actor and the one it replaces (a node cut off, not dead) never
    # write into the same temporary file
    tmp = posixpath.join(parent, f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
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


# ----------------------------------------------------------------------------------------------
# filesystems: the one place they are made


def url_to_fs(uri: str):
    """``(filesystem, path)`` for any fsspec URI (``fsspec.core.url_to_fs``, with air_ray's S3 client)."""
    import fsspec

    uri = os.fspath(uri)
    protocol, _ = fsspec.core.split_protocol(uri)
    if protocol in ("s3", "s3a"):
        cls = _s3_class()
        return cls(**cls._get_kwargs_from_urls(uri)), cls._strip_protocol(uri)
    return fsspec.core.url_to_fs(uri)


def open_uri(uri: str, mode: str = "rb", **kwargs):
    """``fsspec.open(uri, mode, ...)`` through ``url_to_fs`` (``compression="infer"``, ``encoding`` as there)."""
    fs, path = url_to_fs(uri)
    return fs.open(path, mode, **kwargs)


# ----------------------------------------------------------------------------------------------
# S3: the client's retries, declared once
#
# Each request is retried by botocore ("standard" mode: HTTP 500/502/503/504, throttling such as 503 SlowDown,
# dropped or reset connections; jittered exponential backoff, 1 s doubling up to 20 s) up to S3_MAX_ATTEMPTS
# attempts in all. s3fs calls an operation again, up to S3_CALL_RETRIES calls in all, when a reply's body breaks
# off (botocore has handed it over by then) or throttling outlasts botocore's attempts. So one operation makes at
# most S3_CALL_RETRIES x S3_MAX_ATTEMPTS requests. AWS_MAX_ATTEMPTS and AWS_RETRY_MODE, when set, override the
# first two (as for any AWS client); a store's own config_kwargs (storage options, FSSPEC_S3) win over both.

S3_RETRY_MODE = "standard"
S3_MAX_ATTEMPTS = 10
S3_CALL_RETRIES = 5


def s3_client_config() -> dict:
    """botocore ``Config`` keywords of air_ray's S3 client."""
    return {"retries": {"mode": os.environ.get("AWS_RETRY_MODE") or S3_RETRY_MODE,
                        "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS") or S3_MAX_ATTEMPTS)},
            "connect_timeout": 10, "read_timeout": 60}


class S3Error(AirRayError, OSError):
    """An S3 request that still failed after the retries (an ``OSError`` too, as s3fs's errors are)."""


def _warn(msg: str) -> None:
    print(f"air-ray: warning: {msg}", file=sys.stderr, flush=True)


def _where(params: dict) -> str:
    bucket, key = params.get("Bucket", ""), params.get("Key", params.get("Prefix", ""))
    return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"


def _failure(response, caught_exception) -> str | None:
    """What went wrong with one attempt (botocore's needs-retry arguments), or None when nothing did."""
    if caught_exception is not None:
        return type(caught_exception).__name__
    if response is None:
        return None
    http, parsed = response
    if http.status_code < 500 and http.status_code != 429:
        return None
    code = (parsed or {}).get("Error", {}).get("Code")
    return f"HTTP {http.status_code}" + (f" {code}" if code and code != str(http.status_code) else "")


def _note_failure(request_dict, response=None, caught_exception=None, **_):
    """needs-retry: remember why the attempt failed, for the line the retry logs (decides nothing)."""
    why = _failure(response, caught_exception)
    if why:
        request_dict["context"]["air_ray_failure"] = why


def _log_retry(request, operation_name, **_):
    """request-created: a request made again (attempt > 1) is a retry: one line."""
    retries = request.context.get("retries") or {}
    attempt = retries.get("attempt", 1)
    if attempt > 1:
        cfg = request.context.get("client_config")
        most = (getattr(cfg, "retries", None) or {}).get("total_max_attempts") or retries.get("max", "?")
        why = request.context.get("air_ray_failure", "an error")
        _warn(f"s3 {operation_name} {_where(request.context.get('input_params') or {})}: {why}; "
              f"retry (attempt {attempt} of {most})")


class _LoggedBody:
    """A reply's body whose read, when it breaks off, says so in one line (s3fs then calls again)."""

    def __init__(self, body, where: str):
        self._body, self._where = body, where

    def __getattr__(self, name):
        return getattr(self._body, name)

    async def read(self, *args):
        try:
            return await self._body.read(*args)
        except Exception as e:
            _warn(f"s3 GetObject {self._where}: the reply broke off ({type(e).__name__}); reading it again "
                  f"(at most {S3_CALL_RETRIES} calls)")
            raise


def _exhausted(e: BaseException) -> bool:
    """A failure the retries were for (5xx, throttling, a dropped connection) that outlasted them; not a missing
    file, a permission, a bad request."""
    if isinstance(e, (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)):
        return False
    from botocore.exceptions import ClientError, HTTPClientError

    cause = e if isinstance(e, (ClientError, HTTPClientError)) else e.__cause__
    if isinstance(cause, HTTPClientError):
        return True
    if isinstance(cause, ClientError):
        meta = cause.response.get("ResponseMetadata", {})
        return meta.get("HTTPStatusCode", 0) >= 500 or meta.get("HTTPStatusCode") == 429 or bool(meta.get("MaxAttemptsReached"))
    return False


def _message(e: BaseException) -> str:
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return text.splitlines()[0] if text else type(e).__name__


def _s3_filesystem_class():
    import s3fs
    from fsspec.asyn import sync_wrapper

    class S3FileSystem(s3fs.S3FileSystem):
        """s3fs's S3 filesystem with air_ray's client retries (``s3_client_config``, ``S3_CALL_RETRIES``), one
        warning line per retry, and ``S3Error`` for a request that still fails after them."""

        retries = S3_CALL_RETRIES

        def __init__(self, *args, config_kwargs=None, **kwargs):
            super().__init__(*args, config_kwargs={**s3_client_config(), **(config_kwargs or {})}, **kwargs)

        async def set_session(self, refresh=False, kwargs=None):
            client = await super().set_session(refresh=refresh, kwargs=kwargs or {})
            if not getattr(client, "_air_ray_retries_logged", False):
                client.meta.events.register("needs-retry.s3", _note_failure)
                client.meta.events.register("request-created.s3", _log_retry)
                client._air_ray_retries_logged = True
            return client

        async def _call_s3(self, method, *akwarglist, **kwargs):
            try:
                resp = await super()._call_s3(method, *akwarglist, **kwargs)
            except Exception as e:
                if not _exhausted(e):
                    raise
                op = "".join(w.capitalize() for w in method.split("_"))
                raise S3Error(f"s3 {op} {_where(kwargs)} failed after the retries ({S3_CALL_RETRIES} calls x "
                              f"{s3_client_config()['retries']['total_max_attempts']} attempts at most): "
                              f"{_message(e)}") from e
            if method == "get_object" and "Body" in resp:
                resp["Body"] = _LoggedBody(resp["Body"], _where(kwargs))
            return resp

        call_s3 = sync_wrapper(_call_s3)  # s3fs's files call this one

    S3FileSystem.__module__, S3FileSystem.__qualname__ = __name__, "S3FileSystem"
    return S3FileSystem


def _s3_class():
    cls = globals().get("S3FileSystem")
    if cls is None:
        cls = globals()["S3FileSystem"] = _s3_filesystem_class()
    return cls


def __getattr__(name):  # lazy: s3fs is imported only when an s3:// URI is used (and pickles find the class)
    if name == "S3FileSystem":
        return _s3_class()
    raise AttributeError(name)
