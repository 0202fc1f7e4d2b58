"""The pipeline's steps, which do not know how they run (``setup`` once, then ``process`` per item).

    ReadStage     source URI       -> Chunks of raw records              (CPU)
    PrepareStage  Chunk            -> PreparedChunk: token ids + steps    (CPU: a tokenizer, no model)
    ScoreStage    PreparedChunk    -> partition files + a summary row     (an actor: base + ablated model)

Ray wiring lives in ``air_ray.pipeline``; these classes run the same in a plain loop.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections import Counter
from dataclasses import dataclass, field

from air_ray.config import ScoreConfig
from air_ray.corpus import Chunk, read_chunks
from air_ray.rows import PreparedRow, RowError


@dataclass
class PreparedChunk:
    unit: str
    source: str
    rows_read: int
    nbytes: int
    prepared: list[tuple[int, PreparedRow]] = field(default_factory=list)  # (line, row)
    rejected: list[dict] = field(default_factory=list)


def rejected_row(source: str, line: int | None, reason: str, detail: str = "", id: str | None = None) -> dict:
    return {"source": source, "line": line, "id": id, "reason": reason, "detail": detail[:1000]}


class ReadStage:
    resources = {"num_cpus": 0.25}  # I/O bound

    def __init__(self, rows_per_partition: int):
        self.rows_per_partition = rows_per_partition

    def setup(self) -> None:
        pass

    def process(self, source: str):
        yield from read_chunks(source, self.rows_per_partition)


class PrepareStage:
    resources = {"num_cpus": 0.25}  # tokenizing is ~1000x cheaper than scoring; do not starve the actors

    def __init__(self, cfg: ScoreConfig):
        self.cfg = cfg
        self.preparer = None

    def setup(self) -> None:
        from air_ray.models import load_tokenizer, prepare_model
        from air_ray.rows import RowPreparer

        ref = prepare_model(self.cfg.model, allow_pickle=self.cfg.allow_pickle)
        tok = load_tokenizer(ref, trust_remote_code=self.cfg.trust_remote_code)
        self.preparer = RowPreparer(tok, self.cfg.format, self.cfg.steps, self.cfg.max_tokens)

    def process(self, chunk: Chunk) -> PreparedChunk:
        out = PreparedChunk(chunk.unit, chunk.source, rows_read=len(chunk.lines), nbytes=chunk.nbytes)
        for line, text in zip(chunk.lines, chunk.texts):
            if text is None:
                out.rejected.append(rejected_row(chunk.source, line, "invalid_utf8", "the line is not valid UTF-8"))
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                out.rejected.append(rejected_row(chunk.source, line, "invalid_json", str(e)))
                continue
            rid = row.get("id") if isinstance(row, dict) and isinstance(row.get("id"), str) else None
            try:
                out.prepared.append((line, self.preparer.prepare(row)))
            except RowError as e:
                out.rejected.append(rejected_row(chunk.source, line, e.reason, e.detail, rid))
        if chunk.file_error:
            out.rows_read += 1  # the file itself is one rejected entry
            out.rejected.append(rejected_row(chunk.source, None, "unreadable_file", chunk.file_error))
        return out


class ScoreStage:
    """Holds one model (base + ablated by switching query rows); writes one partition per chunk."""

    def __init__(self, cfg: ScoreConfig, heads_doc: dict):
        self.cfg = cfg
        self.heads_doc = heads_doc
        self.scorer = None
        self.fs = None

    @property
    def resources(self) -> dict:
        return {"num_cpus": self.cfg.cpus_per_actor, "num_gpus": self.cfg.gpus_per_actor or 0}

    def setup(self) -> None:
        import fsspec

        from air_ray.scorer import Scorer

        c = self.cfg
        self.scorer = Scorer(
            model=c.model, heads=self.heads_doc, dtype=c.dtype, device=c.device, format=c.format, steps=c.steps,
            step_temperature=c.step_temperature, batch_tokens=c.batch_tokens, max_tokens=c.max_tokens,
            allow_pickle=c.allow_pickle, trust_remote_code=c.trust_remote_code,
            shard=(c.gpus_per_actor or 0) > 1,
        )
        self.fs, self.root = fsspec.core.url_to_fs(c.output)
        self.metadata = dict(self.scorer.describe(), heads_file=c.heads)

    def process(self, chunk: PreparedChunk) -> dict:
        from air_ray import schema

        t0 = time.time()
        rows = [p for _, p in chunk.prepared]
        results = self.scorer.score_prepared(rows)
        scored, rejected = [], list(chunk.rejected)
        for (line, p), r in zip(chunk.prepared, results):
            if isinstance(r, RowError):
                rejected.append(rejected_row(chunk.source, line, r.reason, r.detail, p.id))
            else:
                scored.append(dict(r, source=chunk.source))
        self._write(schema.to_table(scored, schema.SCORES, self.metadata), "scores", chunk.unit)
        self._write(schema.to_table(rejected, schema.REJECTED), "rejected", chunk.unit)
        return {
            "unit": chunk.unit,
            "source": chunk.source,
            "rows_read": chunk.rows_read,
            "rows_scored": len(scored),
            "rows_rejected": len(rejected),
            "reasons": json.dumps(Counter(r["reason"] for r in rejected)),
            "tokens": sum(len(p.input_ids) for p in rows),
            "nbytes": chunk.nbytes,
            "seconds": time.time() - t0,
        }

    def _write(self, table, kind: str, unit: str) -> None:
        """One file per chunk and kind; no empty files (some readers choke on them): a rerun that leaves a
        chunk with no rows of this kind removes the stale file instead."""
        from air_ray.schema import write_atomic

        path = posixpath.join(self.root, kind, f"{unit}.parquet")
        if table.num_rows:
            write_atomic(table, self.fs, path)
        elif self.fs.exists(path):
            self.fs.rm(path)
