"""The Parquet schemas of what air_ray writes, and how tables are written and their metadata read.

``SCORES`` (a score partition; ``scores_schema(embed=True)`` adds ``embedding``), ``REJECTED`` (the rejected rows of a partition), ``SELECTION``
(``selection.parquet``), ``LEDGER`` (a rescore version's ``ledger.parquet``), and the columns of an export
(``EXPORT_COLUMNS``; ``AIR_COLUMNS`` beside the source columns of ``--style original``). Every reader asks for
columns of these by name through the store (``air_ray.store.scores``), which checks them against the schema. Columns
are only ever appended, nullable, so a file written before a column existed reads it as null. ``RANK_ORDER`` is the
order of a selection: value descending, ties by id ascending.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from air_ray.fsio import atomic_open

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
    # appended (issue #15): the kind of each step: think | answer (step rule think) or text
    pa.field("step_kinds", pa.list_(pa.string()), nullable=True),
    # appended (issue #25): response tokens whose (previous, this) token pair occurs in the prompt (the copying a
    # retrieval head does), and the mean L_ref - L_base over them (null when none); air_ray.influence.copy_mask
    pa.field("n_copy_tokens", pa.int32(), nullable=True),
    pa.field("delta_copy", pa.float64(), nullable=True),
])

# `air-ray score --embed` only (the default partitions stay as they are): the base model's last hidden state mean-pooled
# over the response tokens, projected to EMBED_DIMS by a seeded random matrix (air_ray.engine.scorer), for select's
# --diversity quotas
EMBEDDING = "embedding"
EMBED_DIMS = 64
EMBEDDING_FIELD = pa.field(EMBEDDING, pa.list_(pa.float32(), EMBED_DIMS), nullable=True)


def scores_schema(embed: bool = False) -> pa.Schema:
    """The schema of a score partition: ``SCORES``, with the embedding column when the run has ``--embed``."""
    return SCORES.append(EMBEDDING_FIELD) if embed else SCORES


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

# the order of a selection (and of the report's top rows): the value ranked descending, ties by id ascending
RANK_ORDER = [("score", "descending"), ("id", "ascending")]

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

# air-ray export: the score columns of the messages and prompt-completion styles, and the declared types of every
# column it writes (the message structs are inferred: only the keys some message has)
_EXPORT_STEPS = {"step_spans": pa.list_(pa.list_(pa.int32())), "step_weights": pa.list_(pa.float64()),
                 "step_kinds": pa.list_(pa.string())}
EXPORT_SCORE_COLUMNS = {"domain": pa.string(), "score": pa.float64(), "rank": pa.int64(), **_EXPORT_STEPS,
                        "scored_response": pa.string()}
EXPORT_COLUMNS = {"id": pa.string(), "tools": pa.string(), "reasoning_content": pa.string(), **EXPORT_SCORE_COLUMNS}
# --style original: the source record's own columns, then these
AIR_COLUMNS = {f"air_{k}": t for k, t in {"id": pa.string(), **EXPORT_SCORE_COLUMNS}.items()}

METADATA_KEY = b"air_ray"  # the schema metadata key of what produced a file (JSON)


def to_table(rows: list[dict], schema: pa.Schema, metadata: dict | None = None) -> pa.Table:
    """Rows (dicts) as a table of ``schema``; a nullable column a row does not have is null (columns appended
    to a schema stay optional for writers that predate them)."""
    optional = [f.name for f in schema if f.nullable]
    rows = [r if all(k in r for k in optional) else {**dict.fromkeys(optional), **r} for r in rows]
    table = pa.Table.from_pylist(rows, schema=schema)
    if metadata is not None:
        table = with_metadata(table, metadata)
    return table


def with_metadata(table: pa.Table, metadata: dict) -> pa.Table:
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


def write_table_atomic(table: pa.Table, fs, path: str) -> None:
    with atomic_open(fs, path) as f:
        pq.write_table(table, f, compression="zstd")


def read_metadata(fs, path: str) -> dict | None:
    """The air_ray metadata a Parquet file records (``METADATA_KEY``), or None."""
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    raw = meta.get(METADATA_KEY)
    return json.loads(raw) if raw else None
