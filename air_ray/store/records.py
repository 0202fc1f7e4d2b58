"""The typed records of a scoring run, and their JSON forms on disk.

``UnitSummary``: what scoring one unit (a chunk of one input file) did; it travels from the scoring stage to the
driver, and is kept in the unit's commit marker (``CommitMarker``: ``_commits/<unit>.json``, ``{unit, key,
summary}``), from which a later run counts a unit it skips. ``Manifest``: ``_manifest.json``, the run as a whole.

The JSON forms are contracts (markers written by earlier releases are read back): a summary's ``reasons``,
``weights`` and ``corpus_fields`` are JSON text inside the marker, as they have been since they were Arrow columns; keys a marker of an
earlier release does not have read as their defaults.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields


@dataclass
class UnitSummary:
    """One unit's counts: the same fields whether it was scored now or skipped (committed earlier)."""

    unit: str
    source: str
    key: str  # the unit key its commit marker records
    legacy: str = ""  # committed under a key of a release before SCORING_VERSION: "kept", else why scored again
    skipped: bool = False  # committed earlier with the same key: counted from its marker
    rows_read: int = 0
    rows_scored: int = 0
    rows_rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # rejected rows by reason
    weights: dict | None = None  # step-weight statistics (air_ray.pipeline.stages.weight_stats); None: unknown
    corpus_fields: dict[str, int] = field(default_factory=dict)  # rows carrying a defect or reference field, by name
    tokens: int = 0
    nbytes: int = 0  # input bytes of the unit
    seconds: float = 0.0  # the scoring stage's time on the unit (the model, the scores, the files)
    engine_s: float = 0.0  # of which in the model (the backend's token_losses)
    setup_s: float = 0.0  # the scoring worker's setup, reported with its first unit
    actor: str = ""  # the worker that scored it (host:pid); not kept in the marker

    def to_json(self) -> dict:
        """The marker's ``summary`` (``reasons`` and ``weights`` as JSON text)."""
        d = asdict(self)
        d.pop("actor")
        d["reasons"], d["weights"] = json.dumps(self.reasons), json.dumps(self.weights)
        d["corpus_fields"] = json.dumps(self.corpus_fields)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "UnitSummary":
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        for k in ("reasons", "weights", "corpus_fields"):
            if isinstance(values.get(k), str):
                values[k] = json.loads(values[k])
        values["reasons"] = values.get("reasons") or {}
        values["corpus_fields"] = values.get("corpus_fields") or {}
        return cls(**values)


@dataclass
class CommitMarker:
    """``_commits/<unit>.json``, written after the unit's files: the unit is done, under ``key``."""

    unit: str
    key: str
    summary: UnitSummary

    def to_json(self) -> dict:
        return {"unit": self.unit, "key": self.key, "summary": self.summary.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> "CommitMarker":
        return cls(d["unit"], d["key"], UnitSummary.from_json(d["summary"]))


@dataclass(kw_only=True)
class Manifest:
    """``_manifest.json``: the run's options, model, heads, versions, inputs, counts (per reason, source and
    actor), step-weight statistics, placement and timings. Fields in the order they are written; a manifest of an
    earlier release reads its missing fields as None."""

    format_version: int = 1
    config: dict | None = None  # the options the run scored with (placement and dtype resolved)
    model: str | None = None
    model_fingerprint: str | None = None
    heads: list | None = None  # as heads.json lists them
    versions: dict | None = None
    inputs: list | None = None
    partitions: list | None = None  # every unit of the run, sorted
    counts: dict | None = None  # rows_read, rows_scored, rows_rejected, rejected_by_reason
    this_run: dict | None = None  # what this run did (a resumed run skips units committed earlier)
    per_actor_rows: dict | None = None
    per_source: dict | None = None
    step_weights: dict | None = None
    wall_s: float | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None
    scoring_key: str | None = None
    placement: dict | None = None
    phases: dict | None = None
    duplicate_ids: int | None = None
    foreign_partitions: list | None = None
    # rows whose record carries a planted defect field or a reference answer field, by field name (select reads the
    # corpus for its audit when any does)
    corpus_fields: dict | None = None
    # the id pass: records counted, bytes of (id hash, order) pairs gathered by the driver, whether they spilled to
    # disk, the files read in byte ranges and their splits
    id_pass: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Manifest":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
