"""The Parquet schemas of every artifact, in one place: the writer and every reader use these.

Partitions become visible atomically: each file is written under a hidden name (``.name.tmp``, which
pyarrow, pandas, polars, duckdb and ``datasets`` skip) and renamed into place once complete.
"""

from __future__ import annotations

import json
import posixpath
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.parquet as pq

SCORES = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("domain", pa.string(), nullable=True),
    pa.field("source", pa.string(), nullable=False),
    pa.field("n_prompt_tokens", pa.int32(), nullable=False),
    pa.field("n_response_tokens", pa.int32(), nullable=False),
    pa.field("loss_base", pa.float64(), nullable=False),
    pa.field("loss_ref", pa.float64(), nullable=False),
    pa.field("score", pa.float64(), nullable=False),
    pa.field("step_spans", pa.list_(pa.list_(pa.int32()))),
    pa.field("step_token_counts", pa.list_(pa.int32())),
    pa.field("step_scores", pa.list_(pa.float64())),
    pa.field("step_weights", pa.list_(pa.float64())),
    # appended after the columns of issue #3 (readers select by name): the response was cut to --max-tokens
    pa.field("truncated", pa.bool_(), nullable=False),
    # appended (issue #8): mean entropy (nats) of the base model's next-token distribution over the response
    # tokens, a heuristic baseline to rank by (select --by entropy_base); null under --backend vllm
    pa.field("entropy_base", pa.float64(), nullable=True),
])

REJECTED = pa.schema([
    pa.field("source", pa.string(), nullable=False),
    pa.field("line", pa.int64(), nullable=True),  # 1-based line (JSONL) or row index + 1 (Parquet)
    pa.field("id", pa.string(), nullable=True),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string(), nullable=True),
])

SELECTION = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("score", pa.float64(), nullable=False),
    pa.field("rank", pa.int64(), nullable=False),
    pa.field("domain", pa.string(), nullable=True),
])

LEDGER = pa.schema([  # <output>/v=<version>/ledger.parquet: one row per input file (air-ray rescore)
    pa.field("uri", pa.string(), nullable=False),
    pa.field("size", pa.int64(), nullable=True),
    pa.field("etag", pa.string(), nullable=True),
    pa.field("mtime", pa.string(), nullable=True),
    pa.field("sha256", pa.string(), nullable=False),
    pa.field("rows", pa.int64(), nullable=True),  # records read (scored + rejected)
    pa.field("partitions", pa.int32(), nullable=True),
    pa.field("status", pa.string(), nullable=False),  # scoring | done
    pa.field("time", pa.timestamp("s", tz="UTC"), nullable=False),
])

METADATA_KEY = b"air_ray"


def to_table(rows: list[dict], schema: pa.Schema, metadata: dict | None = None) -> pa.Table:
    table = pa.Table.from_pylist(rows, schema=schema)
    if metadata is not None:
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    return table


@contextmanager
def atomic_open(fs, path: str):
    """Open ``path`` on fsspec filesystem ``fs`` for writing under a hidden temporary name; the file is moved
    into place only when the block completes, so readers never see a partial file."""
    parent, name = posixpath.split(path)
    tmp = posixpath.join(parent, f".{name}.tmp")
    fs.makedirs(parent, exist_ok=True)
    try:
        with fs.open(tmp, "wb") as f:
            yield f
    except BaseException:
        try:  # an exception: leave nothing behind (a killed process leaves the hidden file, which readers skip)
            fs.rm(tmp)
        except Exception:
            pass
        raise
    fs.mv(tmp, path)


def write_atomic(table: pa.Table, fs, path: str) -> None:
    with atomic_open(fs, path) as f:
        pq.write_table(table, f, compression="zstd")


def write_bytes_atomic(fs, path: str, data: bytes) -> None:
    with atomic_open(fs, path) as f:
        f.write(data)


def read_metadata(fs, path: str) -> dict | None:
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    raw = meta.get(METADATA_KEY)
    return json.loads(raw) if raw else None
