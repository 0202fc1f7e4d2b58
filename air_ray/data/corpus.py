"""Corpus input: expanding URIs to files, and reading files as chunks of raw records.

Files: ``.jsonl`` and ``.json`` (JSON lines, or one JSON array), each also compressed (``.gz``, ``.zst``, ``.bz2``:
``.jsonl.gz``, ``.json.zst``, ...), ``.parquet`` and ``.arrow`` (Arrow IPC stream or file, as
``datasets.save_to_disk`` writes them) on any fsspec URI. Every file is streamed: JSON lines line by line, a JSON
array element by element, Parquet and Arrow batch by batch, compressed files through a streaming decompressor, so
memory holds one block and one record, never a whole file. A compressed file that is corrupt or breaks off ends
its reading with ``file_error`` (its records read so far are kept), as any unreadable file does. A directory is
read recursively: a Hugging Face ``save_to_disk`` folder (``.arrow`` files beside ``dataset_info.json`` /
``state.json``) is a corpus like any other. Dataset metadata and documentation files (``dataset_info.json``,
``state.json``, ``dataset_dict.json``, ``README*``, ``LICENSE*``, ``*.md``) are skipped; any other file of a kind
that cannot be read fails the listing with one line naming it, so nothing is parsed as something it is not. A
chunk is the unit of work and of output: ``rows_per_partition`` consecutive records of one file, named
deterministically from the file and its index, so a rerun replaces a partition rather than adding one.
Records stay raw text here (``None`` for a line that is not valid UTF-8); parsing and validation happen in
the prepare step, where a bad record becomes a rejected row instead of an exception.

A large uncompressed JSON-lines file (over ``SPLIT_BYTES``) is read in byte ranges (``Split``), each by its own task,
as Hadoop reads text files: a split holds the records whose line *starts* in its range, so the line that crosses a
boundary belongs to the split it starts in, which reads past its end to finish it; the next split skips to the
first line start after its own start. The splits of a file are planned from its size alone (``plan_splits``), so
a rerun gives the same splits and the same partition names. Line numbers stay those of the whole file: the id pass
counts each split's lines, and the scoring pass gives each split its first line number. Compressed files, JSON
arrays, Parquet and Arrow files are read whole, by one task.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Iterator

from air_ray.errors import AirRayError
from air_ray.fsio import open_uri, url_to_fs, with_protocol

COMPRESSIONS = (".gz", ".zst", ".bz2")  # of JSON files, read as streams
JSON_EXTENSIONS = tuple(e + c for e in (".jsonl", ".json") for c in ("", *COMPRESSIONS))
EXTENSIONS = (*JSON_EXTENSIONS, ".parquet", ".arrow")
SPLIT_BYTES = 128 << 20  # a .jsonl file larger than this is read in byte ranges of about this size, in parallel
_BLOCK = 1 << 16  # bytes read at a time (a file that breaks off loses at most the records of its last block)
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


def unit_prefix(source: str) -> str:
    """What every partition name of ``source`` starts with: <file stem>-<hash of the URI>-."""
    stem = source.rstrip("/").split("/")[-1]
    for ext in EXTENSIONS:
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._")[:60] or "input"
    digest = hashlib.sha1(source.encode()).hexdigest()[:10]
    return f"{stem}-{digest}-"


def unit_name(source: str, index: int, split: int | None = None) -> str:
    """Deterministic, filesystem-safe partition name: <file stem>-<hash of the URI>-<chunk index>; a chunk of split
    ``split`` of a file read in byte ranges: <file stem>-<hash of the URI>-s<split>-<chunk index within it>."""
    return f"{unit_prefix(source)}{'' if split is None else f's{split:04d}-'}{index:05d}"


@dataclass(frozen=True)
class Split:
    """The records of ``source`` whose line starts in the byte range [start, end) (``end`` None: to the end of the
    file), split ``index`` of ``count``; ``first_line``: the file's 1-based number of the split's first line (known
    once the id pass has counted the lines of the splits before it)."""

    source: str
    index: int = 0
    count: int = 1
    start: int = 0
    end: int | None = None
    first_line: int = 1


def splittable(source: str) -> bool:
    """Whether a file can be read in byte ranges: uncompressed JSON lines."""
    return source.endswith(".jsonl")


def plan_splits(source: str, size: int, split_bytes: int | None = None) -> list[Split]:
    """The splits of a file of ``size`` bytes: one for a small, compressed or non-JSON-lines file, else
    ceil(size / split_bytes) ranges of equal size (from the size alone: the same splits on every run)."""
    split_bytes = split_bytes or SPLIT_BYTES
    if not splittable(source) or size <= split_bytes:
        return [Split(source)]
    n = -(-size // split_bytes)
    bounds = [size * i // n for i in range(n + 1)]
    return [Split(source, i, n, bounds[i], None if i == n - 1 else bounds[i + 1]) for i in range(n)]


def read_chunks(source: str | Split, rows_per_partition: int, counts: dict | None = None) -> Iterator[Chunk]:
    """All records of one file (or one split of it), in chunks. If the file cannot be read (or breaks off), the chunk
    in progress carries ``file_error``: its records so far are kept, and the file gets one rejected entry.
    ``counts["lines"]``: the lines the split holds (blank ones included), added up as they are read."""
    split = source if isinstance(source, Split) else Split(source)
    source = split.source
    part = None if split.count == 1 else split.index
    index = 0
    chunk = Chunk(unit_name(source, 0, part), source)
    try:
        if split.count > 1:
            records = _range_records(split, counts)
        else:
            records = _arrow_records(source) if is_arrow_file(source) else _text_records(source)
        for line, text, nbytes in records:
            chunk.lines.append(line)
            chunk.texts.append(text)
            chunk.nbytes += nbytes
            if len(chunk.lines) == rows_per_partition:
                yield chunk
                index += 1
                chunk = Chunk(unit_name(source, index, part), source)
    except Exception as e:  # corrupt or truncated compressed file, bad parquet footer, vanished file ...
        chunk.file_error = f"{type(e).__name__}: {e}"[:500]
    if chunk.lines or chunk.file_error or index == 0:
        yield chunk


def is_arrow_file(source: str) -> bool:
    """A Parquet or Arrow file (records are Arrow rows); else JSON text."""
    return source.endswith((".parquet", ".arrow"))


def _blocks(source: str) -> Iterator[bytes]:
    """The file's bytes, decompressed (by its extension), a block at a time. A compressed stream that is corrupt
    or ends mid-frame raises."""
    with open_uri(source, "rb", compression=None if source.endswith(".zst") else "infer") as f:
        if source.endswith(".zst"):  # fsspec's zstd reader ends silently at a truncated frame: decode it here
            yield from _zstd_blocks(f)
            return
        while block := f.read(_BLOCK):
            yield block


def _zstd_blocks(f) -> Iterator[bytes]:
    """zstd frames decoded from ``f``, fed to the decoder a slice at a time so that one output block stays small:
    256 bytes of input, down to 16 where a stream is so repetitive that a slice gives more than 1 MiB (a zstd block
    is at most 128 KiB of output and takes a few bytes of input: 16 bytes give at most ~0.6 MiB)."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    dobj, fed, step, block = dctx.decompressobj(), False, 256, b""
    while block or (block := f.read(_BLOCK)):
        data, block = block[:step], block[step:]
        while data:
            fed = True
            out = dobj.decompress(data)
            if out:
                yield out
            step = 16 if len(out) > 1 << 20 else min(256, step * 2)
            data = b""
            if dobj.eof:  # a frame ended: what follows is the next frame (a zstd file may hold several)
                data, dobj, fed = dobj.unused_data, dctx.decompressobj(), False
    if fed and not dobj.eof:
        raise ValueError("the zstd stream ends mid-frame (a truncated file)")


def _text_records(source: str) -> Iterator[tuple[int, str | None, int]]:
    """JSON lines (line numbers 1-based, blank lines skipped), or the elements of one JSON array (a ``.json`` file,
    compressed or not, whose first character is ``[``)."""
    blocks = _blocks(source)
    first = next(blocks, b"")
    if source.endswith(tuple(".json" + c for c in ("", *COMPRESSIONS))):
        while first and not first.removeprefix(codecs.BOM_UTF8).strip() and (block := next(blocks, None)):
            first += block  # a file that starts with a lot of whitespace
        if first.removeprefix(codecs.BOM_UTF8).lstrip()[:1] == b"[":
            for i, row in enumerate(_json_array(_chain(first, blocks)), 1):
                text = json.dumps(row, ensure_ascii=False)
                yield i, text, len(text)
            return
    for i, raw in enumerate(_lines(_chain(first, blocks)), 1):
        if not raw.strip():
            continue  # blank lines are not rows
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        yield i, text, len(raw)


def _range_records(split: Split, counts: dict | None = None) -> Iterator[tuple[int, str | None, int]]:
    """The records of one split of a JSON-lines file (see the module doc), numbered from ``split.first_line``; every
    line of the split (blank ones too) is counted in ``counts["lines"]``."""
    with open_uri(split.source, "rb", compression=None) as f:
        first = b""
        if split.start > 0:  # skip to the first line that starts at or after split.start
            f.seek(split.start - 1)
            while True:
                block = f.read(_BLOCK)
                if not block:
                    return
                cut = block.find(b"\n")
                if cut >= 0:
                    first = block[cut + 1:]
                    pos = f.tell() - len(first)
                    break
        else:
            pos = 0
        line = split.first_line
        for raw in _lines(_chain(first, iter(lambda: f.read(_BLOCK), b""))):
            if split.end is not None and pos >= split.end:
                return
            pos += len(raw)
            if counts is not None:
                counts["lines"] = counts.get("lines", 0) + 1
            if raw.strip():  # blank lines are not rows
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = None
                yield line, text, len(raw)
            line += 1


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


def _lines(blocks: Iterator[bytes]) -> Iterator[bytes]:
    """Lines with their ``\\n`` (the last one without, if the file does not end with one)."""
    tail = b""
    for block in blocks:
        lines = (tail + block).split(b"\n")
        tail = lines.pop()
        for line in lines:
            yield line + b"\n"
    if tail:
        yield tail


def _json_array(blocks: Iterator[bytes]):
    """The elements of one JSON array, decoded one at a time from a stream of blocks (memory: a block and the
    element being read)."""
    decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8-sig")()
    buf, pos, eof = "", 0, False

    def more() -> None:
        nonlocal buf, pos, eof
        block = next(blocks, None)
        eof = block is None
        buf, pos = buf[pos:] + utf8.decode(block or b"", final=eof), 0

    def peek() -> str:
        """The next character that is not white space ("" at the end of the file)."""
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or eof:
                return buf[pos:pos + 1]
            more()

    if peek() != "[":
        raise ValueError("not a valid JSON array: it does not start with [")
    pos += 1
    if peek() == "]":
        pos += 1
    else:
        while True:
            peek()
            while True:  # one element; one that reaches the end of the buffer may go on in the next block
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:
                        break
                except json.JSONDecodeError as e:
                    if eof:
                        raise ValueError(f"not a valid JSON array: {e}") from None
                more()
            pos = end
            yield value
            c = peek()
            pos += 1
            if c == "]":
                break
            if c != ",":
                raise ValueError("not a valid JSON array: " + ("it ends before its closing ]" if c == "" else
                                                               f"{c!r} where , or ] belongs"))
    if peek() != "":
        raise ValueError("not a valid JSON array: text after its closing ]")


def record_batches(source: str):
    """The Arrow record batches of a Parquet or Arrow IPC file (the stream format ``datasets.save_to_disk``
    writes, or the random-access file format), in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open_uri(source, "rb") as f:
        if source.endswith(".parquet"):
            yield from pq.ParquetFile(f).iter_batches(batch_size=1024)
            return
        try:
            reader = pa.ipc.open_stream(f)
        except pa.ArrowInvalid:
            f.seek(0)
            file_reader = pa.ipc.open_file(f)
            reader = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
        yield from reader


def record_text(row: dict) -> str:
    """An Arrow row as the raw JSON record the rest of the pipeline reads (values JSON has no type for, such as
    timestamps, as their text)."""
    return json.dumps(row, ensure_ascii=False, default=str)


def _arrow_records(source: str) -> Iterator[tuple[int, str | None, int]]:
    n = 0
    for batch in record_batches(source):
        for row in batch.to_pylist():
            n += 1
            text = record_text(row)
            yield n, text, len(text)
