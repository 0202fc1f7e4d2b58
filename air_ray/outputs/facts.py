"""What the corpus says about the scored rows beyond their text: a planted defect (``air_defect``) and whether the
final answer matches a reference field (``air_ray.data.answers``). ``select`` reads these for
``--exclude-wrong-answer``, ``--exclude-defective`` and the defect and answer shares of its audit.

The corpus is read once through ``air_ray.data.lookup.read_blocks`` (the scorer's row shapes and ids): ``--input``
if given, else the files the score partitions name in their ``source`` column; the field flags are those the run
scored with (its ``_manifest.json``), so ids match. As the scorer, only the first record of an id counts.

Memory: a 64-bit hash of every record's id and 4 bytes of codes (to count only the first record of an id, as the
scorer did: 12 bytes a row, numpy), and the ids of rows that are defective or fail the answer check, with a small
code each. On a pool of 10 M rows of which a quarter fail, that is 120 MB of arrays and 2.5 M ids (~100 MB).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from air_ray.data.answers import ANSWER_STATUSES, DEFECT_FIELD, answer_status, find_reference
from air_ray.errors import AirRayError

FAILED = ("wrong", "no_answer")  # answer statuses --exclude-wrong-answer leaves out


@dataclass
class CorpusFacts:
    """Defect kinds and failed answer checks by id, and the counts of what was read."""

    defect_kinds: list[str]  # code -> kind
    defect_ids: pa.Array  # ids of rows with a defect (string)
    defect_codes: np.ndarray  # [len(defect_ids)] index into defect_kinds
    failed_ids: pa.Array  # ids whose answer check is wrong or no_answer
    failed_codes: np.ndarray  # [len(failed_ids)] index into FAILED
    counts: dict = field(default_factory=dict)  # rows read, answer statuses, defect kinds, reference fields
    sources: list[str] = field(default_factory=list)

    @property
    def has_defects(self) -> bool:
        return self.counts.get("rows_with_defect_field", 0) > 0

    @property
    def has_references(self) -> bool:
        return self.counts.get("rows_with_reference", 0) > 0

    def defect_of(self, ids: pa.Array) -> np.ndarray:
        """[rows] int64: each id's defect code, -1 when clean (or not in the corpus)."""
        return _codes(ids, self.defect_ids, self.defect_codes)

    def failed_of(self, ids: pa.Array) -> np.ndarray:
        """[rows] int64: each id's failed answer status code (index into FAILED), -1 when it did not fail."""
        return _codes(ids, self.failed_ids, self.failed_codes)


def _codes(ids: pa.Array, keys: pa.Array, codes: np.ndarray) -> np.ndarray:
    if not len(keys) or not len(ids):
        return np.full(len(ids), -1, np.int64)
    idx = pc.index_in(ids, value_set=keys)
    pos = np.asarray(pc.fill_null(idx, -1).to_numpy(zero_copy_only=False), np.int64)
    out = np.full(len(ids), -1, np.int64)
    hit = pos >= 0
    out[hit] = codes[pos[hit]]
    return out


def read_facts(sources: list[str], fields, reference_field: str | None = None, expand: bool = False) -> CorpusFacts:
    """Read ``sources`` (corpus files as the score partitions name them; ``expand``: URIs to expand, as ``--input``
    takes them) and keep what the module doc says. A file that cannot be read is an error: the audit and the filter
    must see every row."""
    from air_ray.data.ids import id_hash
    from air_ray.data.lookup import read_blocks

    kinds: dict[str, int] = {}
    names: dict[str, int] = {}  # reference field name -> code
    flagged: list[tuple[int, str, int, int]] = []  # (position, id, defect code or -1, failed code or -1)
    parts: list[tuple[np.ndarray, ...]] = []  # per block: id hash, answer status, reference field, defect field
    counts: Counter = Counter()
    position = 0
    for block in read_blocks(sources, fields, expand=expand):
        if block.error:
            raise AirRayError(f"select: corpus {block.source} cannot be read: {block.error}")
        h, st, ref, has = [], [], [], []
        for text, conv in zip(block.texts, block.convs):
            counts["rows_read"] += 1
            if conv is None:
                counts["rows_not_scorable"] += 1
                continue
            row = json.loads(text)
            defect = -1
            carries = isinstance(row, dict) and DEFECT_FIELD in row
            if carries and row[DEFECT_FIELD] not in (None, ""):
                defect = kinds.setdefault(str(row[DEFECT_FIELD]), len(kinds))
            name, reference = find_reference(row, reference_field)
            answer = conv.answer if conv.answer.strip() or not conv.reasoning else conv.reasoning
            status = answer_status(answer, reference)
            failed = FAILED.index(status) if status in FAILED else -1
            if defect >= 0 or failed >= 0:
                flagged.append((position, conv.id, defect, failed))
            h.append(id_hash(conv.id))
            st.append(ANSWER_STATUSES.index(status))
            ref.append(-1 if name is None else names.setdefault(name, len(names)))
            has.append(carries)
            position += 1
        parts.append((np.asarray(h, np.int64), np.asarray(st, np.int8), np.asarray(ref, np.int16),
                      np.asarray(has, bool)))
    # the scorer kept the first record of an id and rejected the later ones: only first records count
    hashes, status, ref, has = (np.concatenate([p[i] for p in parts]) if parts else np.empty(0)
                                for i in range(4))
    del parts
    is_first = np.zeros(len(hashes), bool)
    is_first[np.unique(hashes, return_index=True)[1]] = True
    del hashes
    counts["rows_later_duplicate"] = int((~is_first).sum())
    for code, n in enumerate(np.bincount(status[is_first].astype(np.int64), minlength=len(ANSWER_STATUSES))):
        if n:
            counts[f"answer_{ANSWER_STATUSES[code]}"] = int(n)
    counts["rows_with_defect_field"] = int(has[is_first].sum())
    by_name = np.bincount(ref[is_first & (ref >= 0)].astype(np.int64), minlength=len(names))
    references = {name: int(by_name[code]) for name, code in names.items() if by_name[code]}
    flagged = [f for f in flagged if is_first[f[0]]]
    counts["rows_with_reference"] = sum(references.values())
    defects = [(rid, d) for _, rid, d, _ in flagged if d >= 0]
    failures = [(rid, f) for _, rid, _, f in flagged if f >= 0]
    return CorpusFacts(
        defect_kinds=list(kinds), defect_ids=pa.array([r for r, _ in defects], pa.string()),
        defect_codes=np.asarray([d for _, d in defects], np.int64),
        failed_ids=pa.array([r for r, _ in failures], pa.string()),
        failed_codes=np.asarray([f for _, f in failures], np.int64),
        counts=dict(sorted(counts.items()), reference_fields=dict(sorted(references.items()))), sources=list(sources))


class FactTally:
    """Defect kinds and failed answer checks counted over a set of rows (the pool, then the selection)."""

    def __init__(self, facts: CorpusFacts):
        self.facts = facts
        self.rows = 0
        self.defects = np.zeros(len(facts.defect_kinds), np.int64)
        self.failed = np.zeros(len(FAILED), np.int64)

    def add(self, ids: pa.Array) -> None:
        self.rows += len(ids)
        d = self.facts.defect_of(ids)
        self.defects += np.bincount(d[d >= 0], minlength=len(self.defects))
        f = self.facts.failed_of(ids)
        self.failed += np.bincount(f[f >= 0], minlength=len(self.failed))

    def summary(self) -> dict:
        n = max(self.rows, 1)
        out = {"rows": self.rows}
        if self.facts.has_defects:
            out["defective"] = int(self.defects.sum())
            out["defect_share"] = round(float(self.defects.sum()) / n, 4) if self.rows else None
            out["defect_share_by_kind"] = {k: round(float(c) / n, 4) if self.rows else None
                                           for k, c in zip(self.facts.defect_kinds, self.defects)}
        if self.facts.has_references:
            out["wrong_answer"] = int(self.failed.sum())
            out["wrong_answer_share"] = round(float(self.failed.sum()) / n, 4) if self.rows else None
        return out
