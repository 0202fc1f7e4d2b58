"""Global duplicate ids: the first occurrence wins (input files in sorted order, then line order).

Every valid record contributes one (id hash, order) pair: 16 bytes per row travel to the driver. ``IdTable`` keeps
them in memory up to ``MEMORY_ROWS`` pairs (64 MB); past that it appends them to ``BUCKETS`` files on local disk by
the top bits of the hash and finds the duplicates one bucket at a time, so the driver holds 1/``BUCKETS`` of them at
once whatever the size of the corpus (1e8 rows: 1.6 GB on disk, 25 MB per bucket). A 64-bit id hash collides with
probability ~n²/2⁶⁵ (3e-6 for 10M rows). The result names each losing record by its order and the winner it lost to.

An order is ``file index << 40 | line``; for a file read in byte ranges (``air_ray.data.corpus.Split``) the line is
not known in the id pass (each range is read by its own task), so it is ``file index << 40 | split << 28 | line
within the split``, which orders records the same way; ``by_source`` turns it into the file's line.
"""

from __future__ import annotations

import hashlib

import numpy as np

LINE_BITS = 40  # order = file_index << 40 | line: a trillion lines per file, 8 million files
SPLIT_LINE_BITS = 28  # a split of a file read in byte ranges: 268 million lines (a 128 MB split has fewer)
MEMORY_ROWS = 4_000_000  # IdTable: (hash, order) pairs kept in memory before it spills to disk
BUCKETS = 64  # IdTable's spill files, by the top 6 bits of the hash


def id_hash(rid: str) -> int:
    return int.from_bytes(hashlib.sha1(rid.encode("utf-8")).digest()[:8], "little", signed=True)


def order_key(file_index: int, line: int, split: int = 0) -> int:
    """The order of a record: its file, then (for a file read in byte ranges) its split, then its line (within the
    split: the split's first line is 1)."""
    return (file_index << LINE_BITS) | (split << SPLIT_LINE_BITS) | line


def split_order(order: int) -> tuple[int, int]:
    return order >> LINE_BITS, order & ((1 << LINE_BITS) - 1)


class IdTable:
    """Every record's (id hash, order), in memory up to ``limit`` pairs, then in ``buckets`` files under a temporary
    directory (removed by ``close``); ``duplicates()`` as ``find_duplicates`` gives them. ``nbytes``: the bytes of
    pairs added (16 per row)."""

    def __init__(self, limit: int | None = None, buckets: int = BUCKETS):
        self.limit = MEMORY_ROWS if limit is None else limit
        self.buckets = buckets
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.rows = 0
        self.nbytes = 0
        self.dir: str | None = None  # set once spilled

    def add(self, hashes, orders) -> None:
        h, o = np.asarray(hashes, np.int64), np.asarray(orders, np.int64)
        self.rows += len(h)
        self.nbytes += 16 * len(h)
        self.parts.append((h, o))
        if self.dir is not None or self.rows > self.limit:
            self._spill()

    def _bucket_path(self, b: int) -> str:
        import os

        return os.path.join(self.dir, f"{b:03d}.bin")

    def _spill(self) -> None:
        import tempfile

        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="air_ray_ids_")
        for h, o in self.parts:
            bucket = (h.view(np.uint64) >> np.uint64(64 - 6)).astype(np.int64) % self.buckets
            order = np.argsort(bucket, kind="stable")
            cuts = np.searchsorted(bucket[order], np.arange(self.buckets + 1))
            pairs = np.stack([h[order], o[order]], axis=1)  # [rows, 2]
            for b in range(self.buckets):
                if cuts[b] < cuts[b + 1]:
                    with open(self._bucket_path(b), "ab") as f:
                        f.write(pairs[cuts[b]:cuts[b + 1]].tobytes())
        self.parts = []

    @property
    def spilled(self) -> bool:
        return self.dir is not None

    def duplicates(self) -> dict[int, int]:
        if not self.spilled:
            if not self.parts:
                return {}
            return find_duplicates(np.concatenate([h for h, _ in self.parts]),
                                   np.concatenate([o for _, o in self.parts]))
        import os

        out: dict[int, int] = {}
        for b in range(self.buckets):
            path = self._bucket_path(b)
            if os.path.exists(path):
                pairs = np.fromfile(path, np.int64).reshape(-1, 2)
                out.update(find_duplicates(pairs[:, 0].copy(), pairs[:, 1].copy()))
        return out

    def close(self) -> None:
        import shutil

        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.parts = []

    def __enter__(self) -> "IdTable":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def find_duplicates(hashes: np.ndarray, orders: np.ndarray) -> dict[int, int]:
    """``{order of a later occurrence: order of the first occurrence}`` over all records.

    Shapes: hashes [rows] int64, orders [rows] int64 (unique per record)."""
    if len(hashes) == 0:
        return {}
    idx = np.lexsort((orders, hashes))  # by hash, then by order within a hash
    h, o = hashes[idx], orders[idx]
    later = np.flatnonzero(h[1:] == h[:-1]) + 1  # [n_dups] positions that repeat the previous hash
    if len(later) == 0:
        return {}
    # the first position of each run of equal hashes
    run_start = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
    first = run_start[np.searchsorted(run_start, later, side="right") - 1]
    return dict(zip(o[later].tolist(), o[first].tolist()))


def prior_orders(prior: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Ids already scored (earlier than every record here) as (hashes, orders): negative orders, so they win."""
    if prior is None or not len(prior):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    prior = np.unique(np.asarray(prior, dtype=np.int64))
    return prior, -1 - np.arange(len(prior), dtype=np.int64)


def by_source(dups: dict[int, int], files: list[str], first_lines: dict[int, list[int]] | None = None
              ) -> dict[str, dict[int, str]]:
    """``{source: {line: "first occurrence: <source>:<line>"}}`` for the prepare step. ``first_lines``: for a
    file read in byte ranges (by index), the first line of each of its splits."""
    first_lines = first_lines or {}

    def where(order: int) -> tuple[int, int]:
        fi, line = split_order(order)
        if fi in first_lines:
            split, within = line >> SPLIT_LINE_BITS, line & ((1 << SPLIT_LINE_BITS) - 1)
            line = first_lines[fi][split] + within - 1
        return fi, line

    out: dict[str, dict[int, str]] = {}
    for later, first in dups.items():
        if later < 0:
            continue  # an id already scored earlier (``prior_orders``)
        fi, line = where(later)
        if first < 0:
            detail = "first occurrence: already scored in this output"
        else:
            ff, fline = where(first)
            detail = f"first occurrence: {files[ff]}:{fline}"
        out.setdefault(files[fi], {})[line] = detail
    return out
