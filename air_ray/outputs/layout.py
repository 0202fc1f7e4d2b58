"""The layout of a scoring run's output and its Parquet schemas: every writer and every reader goes through here.

    <run>/                                  air-ray score --output (rescore: <output>/v=<version>/)
        scores/<unit>.parquet               SCORES: one file per unit (a chunk of one input file)
        rejected/<unit>.parquet             REJECTED
        _commits/<unit>.json                commit marker {unit, key, summary}, written after the unit's files
        _manifest.json                      the run's manifest (air_ray.pipeline.manifest)
        selection/                          air-ray select's usual place: SELECTION_FILES
        heads.json, ledger.parquet (LEDGER), _lease.json      in a rescore version
        _scoring_key.json                   in a version named by a legacy key: the current key it holds
    <rescore output>/heads/<fingerprint>.json                  heads detected once per model (heads: detect)

A unit is named from its input file and chunk index (``air_ray.data.corpus.unit_name``), so a rerun replaces
a unit's files instead of adding some. Files are written atomically (``air_ray.fsio``); names starting with
``.`` or ``_`` are never partitions. Score partitions are read with the declared SCORES schema, so a partition
written before a column was appended reads that column as null.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from air_ray.errors import AirRayError
from air_ray.fsio import atomic_open, open_uri, url_to_fs, with_protocol, write_bytes_atomic, write_json_atomic

SCORES_DIR = "scores"
REJECTED_DIR = "rejected"
COMMITS_DIR = "_commits"
MANIFEST = "_manifest.json"
SELECTION_DIR = "selection"
SELECTION_FILES = ("selection.parquet", "selection.json", "score_hist.png")
VERSION_PREFIX = "v="
LEDGER_FILE = "ledger.parquet"
LEASE_FILE = "_lease.json"
HEADS_FILE = "heads.json"
KEY_ALIAS_FILE = "_scoring_key.json"  # a rescore version scored under a legacy key, recognised as the current key
DETECTED_HEADS_DIR = "heads"
PARTITION_KINDS = (SCORES_DIR, REJECTED_DIR)

# ----------------------------------------------------------------------------------------------
# schemas

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
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    raw = meta.get(METADATA_KEY)
    return json.loads(raw) if raw else None


def read_error(who: str, e: Exception) -> AirRayError:
    return AirRayError(f"{who}: cannot read the score partitions: {str(e).splitlines()[0] if str(e) else e!r}")


def _hidden(path: str) -> bool:
    return posixpath.basename(path).startswith((".", "_"))


# ----------------------------------------------------------------------------------------------
# one run's directory


class RunLayout:
    """Paths and files of one run's output directory (any fsspec URI)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, root = url_to_fs(uri)
        self.root = root.rstrip("/") or root

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def uri_of(self, *parts: str) -> str:
        return with_protocol(self.fs, self.path(*parts))

    def version(self, version: str) -> "RunLayout":
        """A rescore version's directory, ``<root>/v=<version>``."""
        return RunLayout(self.uri_of(f"{VERSION_PREFIX}{version}"))

    # -- partitions -------------------------------------------------------------------------------

    def partition(self, kind: str, unit: str) -> str:
        return self.path(kind, f"{unit}.parquet")

    def write_partition(self, kind: str, unit: str, table: pa.Table) -> None:
        """One file per unit and kind; no empty files (some readers choke on them): a rerun that leaves a unit
        with no rows of this kind removes the stale file instead."""
        path = self.partition(kind, unit)
        if table.num_rows:
            write_table_atomic(table, self.fs, path)
        elif self.fs.exists(path):
            self.fs.rm(path)

    def partitions(self, kind: str = SCORES_DIR) -> list[str]:
        """Paths of the visible partitions of ``kind`` (hidden and temporary names skipped), sorted."""
        return sorted(p for p in self.fs.glob(self.path(kind, "*.parquet")) if not _hidden(p))

    def partition_metadata(self, kind: str = SCORES_DIR) -> Iterator[tuple[str, dict | None]]:
        """``(partition path, the air_ray metadata its file records)`` for every visible partition of ``kind``."""
        for p in self.partitions(kind):
            yield p, read_metadata(self.fs, p)

    def foreign_partitions(self, units: Sequence[str]) -> list[str]:
        """Partition files that ``units`` (this run's) do not account for, as ``kind/name``."""
        mine = set(units)
        out = []
        for kind in PARTITION_KINDS:
            for p in self.partitions(kind):
                if posixpath.basename(p)[: -len(".parquet")] not in mine:
                    out.append(posixpath.join(kind, posixpath.basename(p)))
        return sorted(out)

    def remove_units(self, prefix: str, keep: set[str]) -> int:
        """Remove the files (partitions and commit markers) of units named ``prefix*`` that are not in
        ``keep``; returns how many files went."""
        removed = 0
        for kind, ext in ((SCORES_DIR, ".parquet"), (REJECTED_DIR, ".parquet"), (COMMITS_DIR, ".json")):
            for p in self.fs.glob(self.path(kind, f"{prefix}*{ext}")):
                if posixpath.basename(p)[: -len(ext)] not in keep:
                    self.fs.rm(p)
                    removed += 1
        return removed

    # -- commit markers and manifest --------------------------------------------------------------

    def write_commit(self, unit: str, key: str, summary: dict) -> None:
        """The marker goes last: a unit without one (or with another key) is redone by the next run."""
        write_bytes_atomic(self.fs, self.path(COMMITS_DIR, f"{unit}.json"),
                           json.dumps({"unit": unit, "key": key, "summary": summary}).encode())

    def commits(self) -> dict[str, dict]:
        """The commit markers of earlier runs: ``{unit: marker}`` (unreadable ones are ignored: their units are
        redone)."""
        paths = self.fs.glob(self.path(COMMITS_DIR, "*.json"))
        if not paths:
            return {}
        out = {}
        for _, blob in self.fs.cat(paths).items():
            try:
                m = json.loads(blob)
                out[m["unit"]] = m
            except (ValueError, KeyError, TypeError):
                continue
        return out

    def write_manifest(self, manifest: dict) -> None:
        write_json_atomic(self.fs, self.path(MANIFEST), manifest)

    def read_manifest(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path(MANIFEST)))
        except FileNotFoundError:
            return None

    def check_writable(self) -> None:
        probe = self.path(".air_ray_write_check")
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            with self.fs.open(probe, "wb") as f:
                f.write(b"ok")
            self.fs.rm(probe)
        except Exception as e:
            raise AirRayError(f"output {self.uri} cannot be written: {type(e).__name__}: {e}") from None

    # -- a rescore version ------------------------------------------------------------------------

    def read_ledger(self) -> dict[str, dict]:
        path = self.path(LEDGER_FILE)
        if not self.fs.exists(path):
            return {}
        with self.fs.open(path, "rb") as f:
            return {r["uri"]: r for r in pq.read_table(f, schema=LEDGER).to_pylist()}

    def write_ledger(self, ledger: dict[str, dict]) -> None:
        write_table_atomic(to_table([ledger[k] for k in sorted(ledger)], LEDGER), self.fs, self.path(LEDGER_FILE))

    def key_alias(self) -> dict | None:
        """``{"scoring_key", ...}`` when this rescore version, named by a legacy key, was recognised as holding the
        numbers of the current one (``air_ray.pipeline.rescore.version_for``), else None."""
        try:
            return json.loads(self.fs.cat_file(self.path(KEY_ALIAS_FILE)))
        except FileNotFoundError:
            return None

    def write_key_alias(self, doc: dict) -> None:
        write_json_atomic(self.fs, self.path(KEY_ALIAS_FILE), doc)

    def detected_heads(self, fingerprint: str) -> str:
        """Where rescore keeps heads detected for a model (under the output root, shared by its versions)."""
        return self.path(DETECTED_HEADS_DIR, f"{fingerprint}.json")


# ----------------------------------------------------------------------------------------------
# reading score partitions


def find_partitions(uri: str, who: str = "select") -> tuple[object, list[str]]:
    """``(fs, sorted partition paths)`` of a scores URI: ``<uri>/scores/*.parquet`` if that folder exists,
    else ``<uri>/*.parquet``; hidden names (``.x``, ``_x``) are skipped. AirRayError when there are none."""
    run = RunLayout(uri)
    fs, root = run.fs, run.root
    try:
        if fs.isdir(run.path(SCORES_DIR)):
            root = run.path(SCORES_DIR)
        elif not fs.isdir(root):
            raise AirRayError(f"{who}: no scores at {uri} (not a directory)")
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        raise AirRayError(f"{who}: no scores at {uri} (not found)") from None
    files = sorted(e["name"] for e in entries
                   if e.get("type") == "file" and e["name"].endswith(".parquet") and not _hidden(e["name"]))
    if not files:
        raise AirRayError(f"{who}: no score partitions (*.parquet) under {with_protocol(fs, root)}")
    return fs, files


@dataclass
class ScoreFiles:
    """The score partitions of a run, opened as one pyarrow dataset with the declared schema (or the named
    columns of it). ``rows``: the row count of the Parquet footers."""

    fs: object
    files: list[str]
    dataset: object
    rows: int
    who: str

    def batches(self, columns: Sequence[str], batch_size: int = 65_536, **scan) -> Iterator[pa.RecordBatch]:
        """Record batches of ``columns``; read errors become one-line AirRayErrors."""
        try:
            yield from self.dataset.to_batches(columns=list(columns), batch_size=batch_size, **scan)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise read_error(self.who, e) from None

    def table(self, columns: Sequence[str], filter=None) -> pa.Table:
        try:
            return self.dataset.to_table(columns=list(columns), filter=filter)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise read_error(self.who, e) from None

    def metadata(self) -> dict | None:
        """The air_ray metadata of the first partition (what produced the scores)."""
        try:
            return read_metadata(self.fs, self.files[0])
        except Exception:
            return None


def open_scores(uri: str, who: str = "select", columns: Sequence[str] | None = None,
                require: Sequence[str] = ()) -> ScoreFiles:
    """Every score partition under ``uri`` (``find_partitions``) as a dataset of ``columns`` (default: every
    SCORES column) typed by SCORES. ``require``: columns every partition must hold (AirRayError naming the
    first file without one); other missing columns read as null."""
    import pyarrow.dataset as ds

    fs, files = find_partitions(uri, who)
    schema = SCORES if columns is None else pa.schema([SCORES.field(c) for c in columns])
    rows = 0
    try:
        dataset = ds.dataset(files, filesystem=fs, format="parquet", schema=schema)
        for frag in dataset.get_fragments():
            rows += frag.metadata.num_rows
            if require:
                missing = [c for c in require if c not in set(frag.physical_schema.names)]
                if missing:
                    raise AirRayError(f"{who}: {with_protocol(fs, frag.path)} is not a scores partition "
                                      f"(no column {', '.join(missing)})")
    except (pa.ArrowInvalid, OSError) as e:
        raise read_error(who, e) from None
    return ScoreFiles(fs, files, dataset, rows, who)


# ----------------------------------------------------------------------------------------------
# selection


def selection_parquet(uri: str) -> str:
    """``selection.parquet`` given it or the directory holding it."""
    return uri if uri.endswith(".parquet") else uri.rstrip("/") + "/" + SELECTION_FILES[0]


def read_selection(uri: str) -> dict[str, tuple[int, float]]:
    """``{id: (rank, value ranked)}`` in rank order, from ``selection.parquet`` or a directory holding it."""
    fs, path = url_to_fs(uri)
    try:
        if fs.isdir(path):
            path = posixpath.join(path.rstrip("/"), SELECTION_FILES[0])
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["id", "rank", "score"])
    except FileNotFoundError:
        raise AirRayError(f"no selection at {uri} (expected {SELECTION_FILES[0]})") from None
    except (KeyError, ValueError, pa.ArrowInvalid) as e:
        raise AirRayError(f"{uri} is not a selection (needs columns id, rank, score): {e}") from None
    table = table.sort_by("rank")
    ids = table.column("id").to_pylist()
    out = dict(zip(ids, zip(table.column("rank").to_pylist(), table.column("score").to_pylist())))
    if len(out) != len(ids):
        raise AirRayError(f"selection {uri} lists an id more than once")
    return out


def read_selection_ids(uri: str) -> list[str]:
    """Selected ids in rank order, from ``selection.parquet`` or a directory holding it."""
    return list(read_selection(uri))


def find_selection(scores: str, selection: str | None, who: str = "report") -> tuple[dict | None, str | None]:
    """(selection.json, its directory URI) from ``selection`` (a directory or the selection.json itself), else
    ``<scores>/selection`` or ``<scores>/../selection`` when there; (None, None) otherwise."""
    if selection:
        cands, required = [selection], True
    else:
        run = RunLayout(scores)
        cands = [run.uri_of(SELECTION_DIR), with_protocol(run.fs, posixpath.join(posixpath.dirname(run.root),
                                                                                   SELECTION_DIR))]
        required = False
    for c in cands:
        path = c if c.endswith(".json") else c.rstrip("/") + "/" + SELECTION_FILES[1]
        try:
            with open_uri(path, "rt") as f:
                return json.load(f), posixpath.dirname(path)
        except FileNotFoundError:
            continue
        except (OSError, json.JSONDecodeError) as e:
            if required:
                raise AirRayError(f"{who}: selection {path} cannot be read: {e}") from None
    if required:
        raise AirRayError(f"{who}: no {SELECTION_FILES[1]} at {selection} (run `air-ray select` first)")
    return None, None


def selection_ids(sel_dir: str) -> pa.Array | None:
    """The ids of ``<sel_dir>/selection.parquet`` (None when it cannot be read)."""
    try:
        fs, path = url_to_fs(selection_parquet(sel_dir))
        return pq.read_table(path, filesystem=fs, columns=["id"]).column("id").combine_chunks()
    except Exception:
        return None


def selected_among(sel_dir: str | None, ids: list[str]) -> set[str] | None:
    """Which of ``ids`` are in ``<sel_dir>/selection.parquet`` (None when it cannot be read)."""
    if not sel_dir or not ids:
        return None
    import pyarrow.compute as pc

    try:
        fs, path = url_to_fs(selection_parquet(sel_dir))
        t = pq.read_table(path, filesystem=fs, columns=["id"], filters=pc.field("id").isin(ids))
        return set(t.column("id").to_pylist())
    except Exception:
        return None
