"""Going back to the corpus after scoring: its records as conversations, block by block in the scorer's order
(``read_blocks``), and the first record of each wanted id (``Lookup``). The one reader of every part that needs a
scored row's text again: export, report, training and compare's held-out rows.

A record that does not parse into a conversation (not UTF-8, not JSON, no supported shape: the scorer rejected it)
has no conversation and is counted, never skipped silently. The scorer kept the first record of an id and
rejected the later ones (``duplicate_id``); ``Lookup`` does the same. Reading stops after the block in which the
last wanted id was found. A file that cannot be read (or breaks off) gives its records so far, then its ``error``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from air_ray.data.corpus import expand_inputs, is_arrow_file, read_chunks, record_batches, record_text
from air_ray.data.shapes import Conversation, FieldMap, RowError, load_record, parse_row

BLOCK_ROWS = 1024  # records read at a time


@dataclass
class Block:
    """Consecutive records of one source."""

    source: str
    texts: list[str | None]  # the raw records (None: not valid UTF-8)
    convs: list[Conversation | None]  # each record as a conversation (None: no scorable row)
    batch: object = None  # the Arrow batch the records are (``arrow`` and a Parquet or Arrow source), else None
    error: str | None = None  # the file could not be read, or broke off, after these records


def conversation(text: str | None, fields: FieldMap) -> Conversation | None:
    """A raw record as the scorer parsed it, or None where the scorer rejected it."""
    try:
        return parse_row(load_record(text), fields)
    except (RowError, RecursionError):
        return None


def read_blocks(corpus, fields: FieldMap = FieldMap(), *, arrow: bool = False, expand: bool = True
                ) -> Iterator[Block]:
    """Every record of ``corpus``: URIs (files, directories, globs; expanded and read in the scorer's order;
    ``expand=False``: file URIs as a scores partition names them, read as they are), or a list of rows (dicts).
    ``arrow``: a Parquet or Arrow source's blocks carry their Arrow batch (its rows as they are, types kept)."""
    if isinstance(corpus, (str, os.PathLike)):
        corpus = [corpus]
    corpus = list(corpus)
    if not corpus or not all(isinstance(c, (str, os.PathLike)) for c in corpus):
        texts = [json.dumps(r) for r in corpus]
        yield Block("(rows)", texts, [conversation(t, fields) for t in texts])
        return
    sources = [os.fspath(c) for c in corpus]
    for source in expand_inputs(sources) if expand else sources:
        for texts, batch, error in _source_blocks(source, arrow):
            yield Block(source, texts, [conversation(t, fields) for t in texts], batch, error)


def _source_blocks(source: str, arrow: bool):
    if arrow and is_arrow_file(source):
        try:
            for batch in record_batches(source):
                yield [record_text(r) for r in batch.to_pylist()], batch, None
        except Exception as e:  # as read_chunks reports a file that cannot be read
            yield [], None, f"{type(e).__name__}: {e}"[:500]
        return
    for chunk in read_chunks(source, BLOCK_ROWS):
        yield chunk.texts, None, chunk.file_error


@dataclass
class Match:
    """A record whose id is wanted: its index in the block, raw text and conversation; ``first``: the first record
    of its id (the one the scorer scored)."""

    index: int
    text: str
    conv: Conversation
    first: bool


@dataclass
class Lookup:
    """The records of ``ids`` in a corpus, in the scorer's order; counts what it read."""

    ids: set[str]
    fields: FieldMap = FieldMap()
    arrow: bool = False
    expand: bool = True  # read_blocks' expand
    found: set[str] = field(default_factory=set)
    read: int = 0  # records read
    not_scorable: int = 0  # records that are no scorable row (never selected)
    later_duplicates: int = 0  # wanted records after the first of their id

    @property
    def done(self) -> bool:
        return self.found >= self.ids

    def blocks(self, corpus: Iterable) -> Iterator[tuple[Block, list[Match]]]:
        """``(block, its wanted records)`` until every id is found (see ``read_blocks`` for ``corpus``)."""
        if self.done:
            return
        for block in read_blocks(corpus, self.fields, arrow=self.arrow, expand=self.expand):
            matches = []
            for i, (text, conv) in enumerate(zip(block.texts, block.convs)):
                self.read += 1
                if conv is None:
                    self.not_scorable += 1
                elif conv.id in self.ids:
                    first = conv.id not in self.found
                    self.later_duplicates += not first
                    self.found.add(conv.id)
                    matches.append(Match(i, text, conv, first))
            yield block, matches
            if self.done:
                return
