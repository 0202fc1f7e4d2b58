"""Corpus input: expanding URIs to files, and reading files as chunks of raw records.

Files: ``.jsonl``, ``.jsonl.gz``, ``.json`` (JSON lines, or one JSON array), ``.parquet`` and ``.arrow`` (Arrow
IPC stream or file, as ``datasets.save_to_disk`` writes them) on any fsspec URI. A directory is read recursively:
a Hugging Face ``save_to_disk`` folder (``.arrow`` files beside ``dataset_info.json`` / ``state.json``) is a
corpus like any other. Dataset metadata and documentation files (``dataset_info.json``, ``state.json``,
``dataset_dict.json``, ``README*``, ``LICENSE*``, ``*.md``) are skipped; any other file of a kind that cannot be
read fails the listing with one line naming it, so nothing is parsed as something it is not. A chunk is the unit of work and of output: ``rows_per_partition`` consecutive records of one file,
named deterministically from the file and its index, so a rerun replaces a partition rather than adding one.
Records stay raw text here (``None`` for a line that is not valid UTF-8); parsing and validation happen in
the prepare step, where a bad record becomes a rejected row instead of an exception.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Iterator

from air_ray.errors import AirRayError
from air_ray.fsio import open_uri, url_to_fs, with_protocol

EXTENSIONS = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".arrow")
# files a dataset folder holds beside its rows (Hugging Face metadata, docs): never rows
_NOT_ROWS = ("dataset_info.json", "state.json", "dataset_dict.json", ".gitattributes")
_DOCS = ("readme", "license", "licence", "notice", "citation")
_GLOB = re.compile(r"[*?\[]")


@dataclass
class Chunk:
    unit: str  # partition name (no extension)
    source: str  # input URI
    lines: list[int] = field(default_factory=list)  # 1-based line (JSONL) or row number (Parquet)
    texts: list[str | None] = field(default_factory=list)  # raw JSON text; None = not valid UTF-8
    nbytes: int = 0
    file_error: str | None = None  # the whole file could not be read

    def digest(self) -> str:
        """A hash of what the chunk holds (records, their lines, any file error): a committed partition is
        reused only while its input is unchanged."""
        h = hashlib.sha1(self.source.encode())
        for line, text in zip(self.lines, self.texts):
            h.update(f"\n{line}\t".encode())
            h.update(b"\x00<invalid utf-8>" if text is None else text.encode("utf-8"))
        h.update(f"\n{self.file_error}".encode())
        return h.hexdigest()[:20]


def expand_inputs(uris: list[str]) -> list[str]:
    """Files, directories (searched recursively) and globs -> sorted, de-duplicated file URIs."""
    out: list[str] = []
    unreadable: list[str] = []
    for uri in uris:
        try:
            fs, path = url_to_fs(uri)
        except (ImportError, ValueError) as e:
            raise AirRayError(f"input {uri}: {e}") from None
        try:
            matches = fs.glob(path.rstrip("/")) if _GLOB.search(path) else [path]
            if not _GLOB.search(path) and not fs.exists(path):
                raise AirRayError(f"input {uri} does not exist")
            found = []
            for m in matches:
                if fs.isdir(m):  # a directory (or a glob matching directories): every file below it
                    found += [p for p in fs.find(m) if not posix_hidden(p)]
                else:
                    found.append(m)
        except AirRayError:
            raise
        except Exception as e:  # unreachable endpoint, permission ...
            raise AirRayError(f"input {uri} cannot be listed: {type(e).__name__}: {e}") from None
        for p in found:
            kind = file_kind(p)
            if kind == "rows":
                out.append(with_protocol(fs, p))
            elif kind == "unknown":
                unreadable.append(with_protocol(fs, p))
    if unreadable:
        raise AirRayError(f"input {' '.join(uris)} holds files air_ray cannot read: "
                          f"{', '.join(sorted(unreadable)[:5])}{' ...' if len(unreadable) > 5 else ''} (rows are read "
                          f"from {', '.join(EXTENSIONS)}; move other files away or name the data files)")
    out = sorted(set(out))
    if not out:
        raise AirRayError(f"no input files ({', '.join(EXTENSIONS)}) found in {' '.join(uris)}")
    return out


def file_kind(path: str) -> str:
    """"rows" (a readable data file), "skip" (dataset metadata or documentation) or "unknown"."""
    name = path.rstrip("/").split("/")[-1]
    if name in _NOT_ROWS or name.lower().startswith(_DOCS) or name.lower().endswith((".md", ".txt.license")):
        return "skip"
    return "rows" if name.endswith(EXTENSIONS) else "unknown"


def posix_hidden(path: str) -> bool:
    return any(part.startswith((".", "_")) for part in path.split("/")[-1:])


def unit_name(source: str, index: int) -> str:
    """Deterministic, filesystem-safe partition name: <file stem>-<hash of the URI>-<chunk index>."""
    stem = source.rstrip("/").split("/")[-1]
    for ext in EXTENSIONS:
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._")[:60] or "input"
    digest = hashlib.sha1(source.encode()).hexdigest()[:10]
    return f"{stem}-{digest}-{index:05d}"


def read_chunks(source: str, rows_per_partition: int) -> Iterator[Chunk]:
    """All records of one file, in chunks. If the file cannot be read (or breaks off), the chunk in progress
    carries ``file_error``: its records so far are kept, and the file gets one rejected entry."""
    index = 0
    chunk = Chunk(unit_name(source, 0), source)
    try:
        if source.endswith(".parquet"):
            records = _parquet_records(source)
        elif source.endswith(".arrow"):
            records = _arrow_records(source)
        else:
            records = _text_records(source)
        for line, text, nbytes in records:
            chunk.lines.append(line)
            chunk.texts.append(text)
            chunk.nbytes += nbytes
            if len(chunk.lines) == rows_per_partition:
                yield chunk
                index += 1
                chunk = Chunk(unit_name(source, index), source)
    except Exception as e:  # corrupt gzip, bad parquet footer, vanished file ...
        chunk.file_error = f"{type(e).__name__}: {e}"[:500]
    if chunk.lines or chunk.file_error or index == 0:
        yield chunk


def _text_records(source: str) -> Iterator[tuple[int, str | None, int]]:
    with open_uri(source, "rb", compression="infer") as f:
        head = f.read(1 << 16)
        if source.endswith(".json") and head.lstrip()[:1] == b"[":
            try:
                rows = json.loads(head + f.read())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"not a valid JSON array: {e}") from None
            for i, row in enumerate(rows, 1):
                text = json.dumps(row, ensure_ascii=False)
                yield i, text, len(text)
            return
        f.seek(0)
        for i, raw in enumerate(f, 1):  # streams: a huge file is never held whole
            if not raw.strip():
                continue  # blank lines are not rows
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = None
            yield i, text, len(raw)


def _parquet_records(source: str) -> Iterator[tuple[int, str | None, int]]:
    import pyarrow.parquet as pq

    with open_uri(source, "rb") as f:
        pf = pq.ParquetFile(f)
        n = 0
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                text = json.dumps(row, ensure_ascii=False, default=str)
                yield n, text, len(text)


def _arrow_records(source: str) -> Iterator[tuple[int, str | None, int]]:
    """An Arrow IPC file: the stream format ``datasets.save_to_disk`` writes, or the random-access file format."""
    import pyarrow as pa

    with open_uri(source, "rb") as f:
        try:
            reader = pa.ipc.open_stream(f)
        except pa.ArrowInvalid:
            f.seek(0)
            file_reader = pa.ipc.open_file(f)
            reader = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
        n = 0
        for batch in reader:
            for row in batch.to_pylist():
                n += 1
                text = json.dumps(row, ensure_ascii=False, default=str)
                yield n, text, len(text)
