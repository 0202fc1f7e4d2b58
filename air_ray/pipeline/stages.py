"""The scoring run's steps and their chains, declared once; how a chain runs is an executor's business
(``air_ray.pipeline.executors``: in this process; ``air_ray.pipeline.runner``: on Ray Data).

A stage has the ``resources`` one worker of it needs, ``setup()`` once per worker, ``process(item)`` per item and
``teardown()`` when the worker ends:

    IdStage       (file index, Split) -> (id hash, order) of every valid record, the records and lines read
                                                                         (CPU; feeds the dedupe)
    ReadStage     Split (a file, or a byte range of a large one) -> Chunks of raw records (CPU; several per item)
    PrepareStage  Chunk            -> PreparedChunk: token ids + steps    (CPU: a tokenizer, no model);
                                      or "skipped" when the unit is already committed with the same key
    ScoreStage    PreparedChunk    -> partition files + commit marker + a UnitSummary
                                      (a worker holding one scorer: base + ablated model)

A ``Chain`` is a sequence of ``Link``s: a stage with its arguments and how many workers run it (``pool``: an actor
pool of that size; none: a task per item). ``scoring_chain`` is read -> prepare -> score, ``id_chain`` the id pass.

Exactly once: a unit's files are written under hidden names and renamed into place, then its commit marker
``_commits/<unit>.json`` (key + summary) is written last (``air_ray.store``). A rerun skips a unit whose marker key
still matches (same scoring settings, same input records, same duplicate decisions) and counts it from the marker.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

from air_ray.config.commands import ScoreConfig
from air_ray.data.corpus import Chunk, Split, read_chunks
from air_ray.data.rows import FieldMap, PreparedRow, RowError
from air_ray.store.records import UnitSummary


@dataclass
class PreparedChunk:
    unit: str
    source: str
    rows_read: int
    nbytes: int
    prepared: list[tuple[int, PreparedRow]] = field(default_factory=list)  # (line, row)
    rejected: list[dict] = field(default_factory=list)
    key: str = ""  # the unit key its commit marker records
    skipped: bool = False  # committed by an earlier run with the same key: nothing to do
    legacy: str = ""  # committed under a legacy key: LEGACY_KEPT (skipped), else why it is scored again
    corpus_fields: Counter = field(default_factory=Counter)  # prepared rows carrying a defect / reference field


def unit_key(scoring_key: str, chunk: Chunk, duplicate_lines) -> str:
    blob = json.dumps([scoring_key, chunk.digest(), sorted(duplicate_lines)])
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class UnitKeys:
    """What a unit's commit marker is compared with: the run's scoring key, the keys releases before
    ``SCORING_VERSION`` gave the same options (``EngineOptions.legacy_keys``) and the dtype the run scores in. A unit
    committed under a legacy key is kept when its score partition records that dtype (or has no scored row), and
    scored again otherwise: under ``dtype: auto`` an old key did not say which dtype."""

    scoring: str
    legacy: tuple[str, ...] = ()
    dtype: str = ""


LEGACY_KEPT = "kept"


def rejected_row(source: str, line: int | None, reason: str, detail: str = "", id: str | None = None) -> dict:
    return {"source": source, "line": line, "id": id, "reason": reason, "detail": detail[:1000]}


def worker_name() -> str:
    """``host:pid`` of this process: where a unit was scored (the manifest's ``per_actor_rows``)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Stage(abc.ABC):
    """``resources`` (Ray resources of one worker), ``setup()`` once, ``process(item)`` per item, ``teardown()``
    at the end (release what ``setup`` took). ``progress(rows, tokens)``: work done inside an item, as it goes;
    the executor that runs the stage connects it to the run's progress line (here it goes nowhere)."""

    resources: dict = {"num_cpus": 0.25}

    def progress(self, rows: int, tokens: int) -> None:
        pass

    def setup(self) -> None:
        pass

    @abc.abstractmethod
    def process(self, item):
        """One item in, its result out (a stage linked with ``fan_out``: an iterable of results)."""

    def teardown(self) -> None:
        pass


class IdStage(Stage):
    """The ids of the valid records of one file or split, hashed, with their global order (see
    ``air_ray.data.ids``; a split's lines counted from 1), and how many records and lines (blank ones too) it
    holds."""

    def __init__(self, fields: FieldMap = FieldMap()):
        self.fields = fields

    def process(self, item: tuple[int, Split]) -> dict:
        import numpy as np

        from air_ray.data.ids import id_hash, order_key
        from air_ray.data.shapes import record_id

        file_index, split = item
        hashes, lines, records, counts = [], [], 0, {}
        for chunk in read_chunks(split, 1 << 16, counts):
            records += len(chunk.lines)
            for line, text in zip(chunk.lines, chunk.texts):
                rid = record_id(text, self.fields)
                if rid is not None:
                    hashes.append(id_hash(rid))
                    lines.append(line)
        within = split.index if split.count > 1 else 0
        return {"file": file_index, "split": split.index, "hash": np.asarray(hashes, np.int64),
                "order": order_key(file_index, np.asarray(lines, np.int64), within), "records": records,
                "lines": counts.get("lines", 0)}


class ReadStage(Stage):
    resources = {"num_cpus": 0.25}  # I/O bound

    def __init__(self, rows_per_partition: int):
        self.rows_per_partition = rows_per_partition

    def process(self, split: Split):
        yield from read_chunks(split, self.rows_per_partition)


class PrepareStage(Stage):
    resources = {"num_cpus": 0.25}  # tokenizing is ~1000x cheaper than scoring; do not starve the actors

    def __init__(self, cfg: ScoreConfig, keys: UnitKeys = UnitKeys(""), duplicates: dict | None = None,
                 committed: dict | None = None):
        self.cfg = cfg
        self.keys = keys
        self.duplicates = duplicates or {}  # {source: {line: detail}}: later occurrences of an id
        self.committed = committed or {}  # {unit: key} of the commit markers found in the output
        self.preparer = None

    def setup(self) -> None:
        from air_ray.data.rows import RowPreparer
        from air_ray.models import open_model

        model = open_model(self.cfg)
        # the limit the scoring backends apply: --max-tokens, within the model's context
        self.preparer = RowPreparer.of(model.tokenizer, self.cfg, max_tokens=model.token_limit(self.cfg.max_tokens))

    def process(self, chunk: Chunk) -> PreparedChunk:
        from air_ray.data.shapes import load_record, record_id

        dups = self.duplicates.get(chunk.source, {})
        out = PreparedChunk(chunk.unit, chunk.source, rows_read=len(chunk.lines), nbytes=chunk.nbytes)
        dup_lines = [line for line in chunk.lines if line in dups]
        out.key = unit_key(self.keys.scoring, chunk, dup_lines)
        committed = self.committed.get(chunk.unit)
        if committed == out.key:
            out.skipped = True
            return out
        if committed and committed in {unit_key(k, chunk, dup_lines) for k in self.keys.legacy}:
            recorded = self._recorded_dtype(chunk.unit)
            out.legacy = LEGACY_KEPT if recorded in (None, self.keys.dtype) else f"recorded dtype {recorded}"
            if out.legacy == LEGACY_KEPT:
                out.skipped = True
                return out
        fields = self.preparer.fields
        for line, text in zip(chunk.lines, chunk.texts):
            if line in dups and text is not None:
                rid = record_id(text, fields)
                out.rejected.append(rejected_row(chunk.source, line, "duplicate_id", dups[line], rid))
                continue
            rid = None
            try:
                row = load_record(text)
                rid = _stated_id(row, fields)
                out.prepared.append((line, self.preparer.prepare(row)))
                out.corpus_fields.update(carried_fields(row))
            except RowError as e:
                out.rejected.append(rejected_row(chunk.source, line, e.reason, e.detail, rid))
            except RecursionError:  # a record nested too deep for the parser or the tokenizer's template
                out.rejected.append(rejected_row(chunk.source, line, "too_deep", "nested too deep to read", rid))
        if chunk.file_error:
            out.rows_read += 1  # the file itself is one rejected entry
            out.rejected.append(rejected_row(chunk.source, None, "unreadable_file", chunk.file_error))
        return out

    def _recorded_dtype(self, unit: str) -> str | None:
        """The dtype a unit's score partition records (None: no scored row, so no numbers to disagree)."""
        from air_ray.store.layout import RunLayout

        return (RunLayout(self.cfg.output).unit_metadata(unit) or {}).get("dtype")


class ScoreStage(Stage):
    """Holds one scorer (base + ablated model, or the backend's engines); writes one partition per chunk."""

    def __init__(self, cfg: ScoreConfig, heads_doc: dict):
        self.cfg = cfg
        self.heads_doc = heads_doc
        self.scorer = None
        self.run = None

    @property
    def resources(self) -> dict:
        return {"num_cpus": self.cfg.cpus_per_worker, "num_gpus": self.cfg.gpus_per_worker or 0}

    def setup(self) -> None:
        from air_ray.engine.scorer import Scorer
        from air_ray.store.layout import RunLayout

        t0 = time.time()
        gpus = self.cfg.gpus_per_worker or 0
        # as many threads as the worker has CPUs (the backend gives them back when it closes)
        threads = max(1, int(self.cfg.cpus_per_worker)) if self.cfg.cpus_per_worker else None
        self.scorer = Scorer(self.cfg, heads=self.heads_doc, gpus=gpus, threads=threads, shard=gpus > 1)
        self.run = RunLayout(self.cfg.output)
        self.metadata = dict(self.scorer.describe(), heads_file=self.cfg.heads)
        self.name = worker_name()
        self.setup_s = time.time() - t0  # reported with this worker's first summary

    def process(self, chunk: PreparedChunk) -> UnitSummary:
        from air_ray.store.layout import REJECTED_DIR, SCORES_DIR
        from air_ray.store.records import CommitMarker
        from air_ray.store.schemas import REJECTED, scores_schema, to_table

        t0 = time.time()
        if chunk.skipped:  # the driver takes its counts from the commit marker
            return self._summary(chunk)
        rows = [p for _, p in chunk.prepared]
        engine_before = self.scorer.engine_s
        results = self.scorer.score_prepared(rows, on_batch=self.progress)
        scored, rejected = [], list(chunk.rejected)
        for (line, p), r in zip(chunk.prepared, results):
            if isinstance(r, RowError):
                rejected.append(rejected_row(chunk.source, line, r.reason, r.detail, p.id))
            else:
                scored.append(dict(r, source=chunk.source))
        self.run.write_partition(SCORES_DIR, chunk.unit, to_table(scored, scores_schema(self.cfg.embed), self.metadata))
        self.run.write_partition(REJECTED_DIR, chunk.unit, to_table(rejected, REJECTED))
        summary = self._summary(chunk, rows_read=chunk.rows_read, rows_scored=len(scored),
                                rows_rejected=len(rejected), reasons=dict(Counter(r["reason"] for r in rejected)),
                                weights=weight_stats(scored), corpus_fields=dict(chunk.corpus_fields),
                                tokens=sum(len(p.input_ids) for p in rows),
                                seconds=time.time() - t0, engine_s=self.scorer.engine_s - engine_before)
        self.run.write_commit(CommitMarker(chunk.unit, chunk.key, summary))  # last: the unit is done
        return summary

    def _summary(self, chunk: PreparedChunk, **counts) -> UnitSummary:
        """The unit's summary; this worker's setup time goes with its first one."""
        summary = UnitSummary(chunk.unit, chunk.source, chunk.key, legacy=chunk.legacy, skipped=chunk.skipped,
                              nbytes=chunk.nbytes, setup_s=self.setup_s, actor=self.name, **counts)
        self.setup_s = 0.0
        return summary

    def teardown(self) -> None:
        if self.scorer is not None:
            self.scorer.close()  # in the caller's process (--executor in-process) torch's threads as they were
            self.scorer = None


def carried_fields(row) -> list[str]:
    """The fields of a record that select's audit reads (``air_ray.data.answers``): the planted defect field and
    the first reference field, where the record has them."""
    from air_ray.data.answers import DEFECT_FIELD, find_reference

    if not isinstance(row, dict):
        return []
    name, _ = find_reference(row)
    return ([DEFECT_FIELD] if DEFECT_FIELD in row else []) + ([name] if name else [])


def _stated_id(row, fields: FieldMap) -> str | None:
    """The id a row states itself (for rejected rows), else None."""
    from air_ray.data.shapes import get_field

    rid = get_field(row, fields.id or "id") if isinstance(row, dict) else None
    return rid if isinstance(rid, str) else None


def weight_stats(scored: list[dict]) -> dict:
    """The step weights of a unit's rows, in a form that merges across units (``manifest.merge_weight_stats``):
    how many rows have each effective token share (rounded to 3 decimals) and the largest weight."""
    from air_ray.influence import effective_token_share

    shares = Counter(f"{effective_token_share(r['step_token_counts'], r['step_weights']):.3f}" for r in scored)
    return {"rows": len(scored), "share": dict(sorted(shares.items())),
            "max": max((max(r["step_weights"], default=1.0) for r in scored), default=None)}


# ----------------------------------------------------------------------------------------------
# the chains


@dataclass(frozen=True)
class Pool:
    """How many workers run a stage on Ray: an actor pool of ``min``..``max`` actors, each given ``in_flight``
    items at a time (None: Ray Data's default)."""

    min: int
    max: int
    in_flight: int | None = None


@dataclass(frozen=True)
class Link:
    """One stage of a chain: its class and arguments, whether it gives several items per item (``fan_out``), and
    its workers on Ray (``pool``; None: a task per item, the stage built for it). ``name`` names its workers."""

    name: str
    stage: type[Stage]
    args: tuple = ()
    fan_out: bool = False
    pool: Pool | None = None

    def build(self) -> Stage:
        return self.stage(*self.args)

    @property
    def resources(self) -> dict:
        """Ray resources of one worker of this stage (a ``ScoreStage``'s depend on its options)."""
        return dict(self.build().resources)


@dataclass(frozen=True)
class Chain:
    links: tuple[Link, ...]


def scoring_chain(cfg: ScoreConfig, n_items: int, keys: UnitKeys, duplicates: dict, committed: dict,
                  heads_doc: dict) -> Chain:
    """read -> prepare -> score, over the input files and splits: the scoring run (``cfg``'s placement already
    resolved)."""
    return Chain((
        Link("read", ReadStage, (cfg.rows_per_partition,), fan_out=True),
        Link("prepare", PrepareStage, (cfg, keys, duplicates, committed), pool=Pool(1, max(1, min(n_items, 4)))),
        Link("score", ScoreStage, (cfg, heads_doc), pool=Pool(cfg.workers, cfg.workers, in_flight=1)),
    ))


def id_chain(fields: FieldMap) -> Chain:
    """The id pass, over ``(file index, Split)`` items: every valid record's id hash and global order."""
    return Chain((Link("ids", IdStage, (fields,)),))
