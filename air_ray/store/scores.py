"""Reading back what a run wrote: the score partitions (one pyarrow dataset, typed by ``SCORES``) and a selection.

Every column a reader asks for is checked against the schema here, and read errors become one-line
``AirRayError``s naming the reader (``who``). A run with no score partition at all is ``NoScores``.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from air_ray.errors import AirRayError
from air_ray.fsio import open_uri, url_to_fs, with_protocol
from air_ray.store.layout import (
    PARTITION_EXT, SCORES_DIR, SELECTION_JSON, SELECTION_PARQUET, RunLayout, hidden, selection_candidates,
    selection_json, selection_parquet,
)
from air_ray.store.schemas import SCORES, read_metadata, scores_schema


class NoScores(AirRayError):
    """A scores URI without a single score partition."""


def read_error(who: str, e: Exception) -> AirRayError:
    return AirRayError(f"{who}: cannot read the score partitions: {str(e).splitlines()[0] if str(e) else e!r}")


def find_partitions(uri: str, who: str = "select") -> tuple[object, list[str]]:
    """``(fs, sorted partition paths)`` of a scores URI: ``<uri>/scores/*.parquet`` if that folder exists,
    else ``<uri>/*.parquet``; hidden names (``.x``, ``_x``) are skipped. ``NoScores`` when there are none."""
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
                   if e.get("type") == "file" and e["name"].endswith(PARTITION_EXT) and not hidden(e["name"]))
    if not files:
        raise NoScores(f"{who}: no score partitions (*{PARTITION_EXT}) under {with_protocol(fs, root)}")
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

    def rows_of(self, ids, columns: Sequence[str]) -> pa.Table:
        """``columns`` of the rows whose id is in ``ids`` (a pushed-down filter)."""
        import pyarrow.dataset as ds

        return self.table(columns, filter=ds.field("id").isin(pa.array(sorted(set(ids)), pa.string())))

    def metadata(self) -> dict | None:
        """The air_ray metadata of the first partition (what produced the scores)."""
        try:
            return read_metadata(self.fs, self.files[0])
        except Exception:
            return None

    def signature(self) -> list:
        """``[(path, size)]`` of every partition: changes when the scores do."""
        return sorted((f, self.fs.size(f)) for f in self.files)


def open_scores(uri: str, who: str = "select", columns: Sequence[str] | None = None,
                require: Sequence[str] = ()) -> ScoreFiles:
    """Every score partition under ``uri`` (``find_partitions``) as a dataset of ``columns`` (default: every
    SCORES column) typed by SCORES. ``require``: columns every partition must hold (AirRayError naming the
    first file without one); other missing columns read as null."""
    import pyarrow.dataset as ds

    fs, files = find_partitions(uri, who)
    known = scores_schema(embed=True)  # every column a partition may hold
    schema = SCORES if columns is None else pa.schema([known.field(c) for c in columns])
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


def read_selection(uri: str) -> dict[str, tuple[int, float]]:
    """``{id: (rank, value ranked)}`` in rank order, from ``selection.parquet`` or a directory holding it."""
    fs, path = url_to_fs(uri)
    try:
        if fs.isdir(path):
            path = posixpath.join(path.rstrip("/"), SELECTION_PARQUET)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["id", "rank", "score"])
    except FileNotFoundError:
        raise AirRayError(f"no selection at {uri} (expected {SELECTION_PARQUET})") from None
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
    cands, required = ([selection], True) if selection else (selection_candidates(scores), False)
    for c in cands:
        path = selection_json(c)
        try:
            with open_uri(path, "rt") as f:
                return json.load(f), posixpath.dirname(path)
        except FileNotFoundError:
            continue
        except (OSError, json.JSONDecodeError) as e:
            if required:
                raise AirRayError(f"{who}: selection {path} cannot be read: {e}") from None
    if required:
        raise AirRayError(f"{who}: no {SELECTION_JSON} at {selection} (run `air-ray select` first)")
    return None, None


def selection_ids(sel_dir: str) -> pa.Array | None:
    """The ids of ``<sel_dir>/selection.parquet`` (None when it cannot be read)."""
    try:
        fs, path = url_to_fs(selection_parquet(sel_dir))
        return pq.read_table(path, filesystem=fs, columns=["id"]).column("id").combine_chunks()
    except Exception:
        return None
