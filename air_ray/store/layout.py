"""Every path and file name air_ray writes or reads back; no other module spells one.

    <run>/                                  air-ray score --output (rescore: <output>/v=<version>/)
        scores/<unit>.parquet               SCORES (air_ray.store.schemas): one file per unit (a chunk of one input)
        rejected/<unit>.parquet             REJECTED
        _commits/<unit>.json                CommitMarker (air_ray.store.records), written after the unit's files
        _manifest.json                      Manifest
        selection/                          air-ray select's usual place (SelectionLayout)
        compare/                            air-ray compare's usual place (CompareLayout)
        heads.json, ledger.parquet (LEDGER), _lease.json      in a rescore version
        _scoring_key.json                   in a version named by a legacy key: the current key it holds
    <rescore output>/heads/<fingerprint>.json                  heads detected once per model (heads: detect)
    <selection>/  selection.parquet  selection.json (written last)  score_hist.png
    <export>/     data/part-00000.parquet|jsonl ...  dataset_info.json  .export.json (written last)
    <compare>/    runs/<run>/result.json  selections/<strategy>/  compare.md  compare.png  compare.json (last)
    <report>/     index.html  heads.png  score_hist.png  score_vs_length.png  score_vs_loss.png  placebo.png
                  compare.png
    <training>/   the model (save_pretrained)  training_summary.json
    heads.json    heads.png beside it

A unit is named from its input file and chunk index (``air_ray.data.corpus.unit_name``), so a rerun replaces
a unit's files instead of adding some. Files are written atomically (``air_ray.fsio``); names starting with
``.`` or ``_`` are never partitions.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from air_ray.errors import AirRayError
from air_ray.fsio import url_to_fs, with_protocol, write_bytes_atomic, write_json_atomic
from air_ray.store.records import CommitMarker, Manifest
from air_ray.store.schemas import LEDGER, read_metadata, to_table, write_table_atomic

SCORES_DIR = "scores"
REJECTED_DIR = "rejected"
COMMITS_DIR = "_commits"
MANIFEST = "_manifest.json"
PARTITION_KINDS = (SCORES_DIR, REJECTED_DIR)
PARTITION_EXT = ".parquet"
VERSION_PREFIX = "v="
LEDGER_FILE = "ledger.parquet"
LEASE_FILE = "_lease.json"
HEADS_FILE = "heads.json"
KEY_ALIAS_FILE = "_scoring_key.json"  # a rescore version scored under a legacy key, recognised as the current key
DETECTED_HEADS_DIR = "heads"

SELECTION_DIR = "selection"
SELECTION_PARQUET, SELECTION_JSON, SELECTION_PLOT = SELECTION_FILES = (
    "selection.parquet", "selection.json", "score_hist.png")

COMPARE_DIR = "compare"
COMPARE_JSON, COMPARE_MD, COMPARE_PNG = COMPARE_FILES = ("compare.json", "compare.md", "compare.png")

EXPORT_DATA_DIR = "data"
EXPORT_SUMMARY = ".export.json"
EXPORT_SUMMARY_BEFORE_DATA_DIR = "export.json"  # exports written before data/ (parts beside it)
EXPORT_LLAMAFACTORY = "dataset_info.json"
EXPORT_PART = "part-{:05d}.{}"
EXPORT_PART_GLOB = "part-*"

REPORT_PAGE = "index.html"

TRAINING_SUMMARY = "training_summary.json"


def hidden(path: str) -> bool:
    """A name starting with ``.`` or ``_``: in-progress files and markers, never data."""
    return posixpath.basename(path).startswith((".", "_"))


def heads_png(heads_json: str | Path) -> Path:
    """The heatmap written beside a heads.json."""
    return Path(heads_json).with_suffix(".png")


# ----------------------------------------------------------------------------------------------
# a scoring run (and a rescore version)


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

    def exists(self) -> bool:
        return self.fs.exists(self.root)

    # -- partitions -------------------------------------------------------------------------------

    def partition(self, kind: str, unit: str) -> str:
        return self.path(kind, unit + PARTITION_EXT)

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
        return sorted(p for p in self.fs.glob(self.path(kind, "*" + PARTITION_EXT)) if not hidden(p))

    def has_scores(self) -> bool:
        return self.fs.exists(self.path(SCORES_DIR))

    def partition_metadata(self, kind: str = SCORES_DIR) -> Iterator[tuple[str, dict | None]]:
        """``(partition path, the air_ray metadata its file records)`` for every visible partition of ``kind``."""
        for p in self.partitions(kind):
            yield p, read_metadata(self.fs, p)

    def unit_metadata(self, unit: str) -> dict | None:
        """The air_ray metadata of a unit's score partition (None: no such file, or none recorded)."""
        path = self.partition(SCORES_DIR, unit)
        if not self.fs.exists(path):
            return None
        return read_metadata(self.fs, path)

    def foreign_partitions(self, units: Sequence[str]) -> list[str]:
        """Partition files that ``units`` (this run's) do not account for, as ``kind/name``."""
        mine = set(units)
        out = []
        for kind in PARTITION_KINDS:
            for p in self.partitions(kind):
                if posixpath.basename(p)[: -len(PARTITION_EXT)] not in mine:
                    out.append(posixpath.join(kind, posixpath.basename(p)))
        return sorted(out)

    def remove_units(self, prefix: str, keep: set[str]) -> int:
        """Remove the files (partitions and commit markers) of units named ``prefix*`` that are not in
        ``keep``; returns how many files went."""
        removed = 0
        for kind, ext in ((SCORES_DIR, PARTITION_EXT), (REJECTED_DIR, PARTITION_EXT), (COMMITS_DIR, ".json")):
            for p in self.fs.glob(self.path(kind, f"{prefix}*{ext}")):
                if posixpath.basename(p)[: -len(ext)] not in keep:
                    self.fs.rm(p)
                    removed += 1
        return removed

    # -- commit markers and manifest --------------------------------------------------------------

    def write_commit(self, marker: CommitMarker) -> None:
        """The marker goes last: a unit without one (or with another key) is redone by the next run."""
        write_bytes_atomic(self.fs, self.path(COMMITS_DIR, f"{marker.unit}.json"),
                           json.dumps(marker.to_json()).encode())

    def commits(self, sources: Sequence[str] | None = None) -> dict[str, CommitMarker]:
        """The commit markers of earlier runs: ``{unit: marker}`` (unreadable ones are ignored: their units are
        redone); ``sources``: only those of these input files' units (one listing, then only their markers read: a
        rescore of a few new files into a large version reads a few markers)."""
        paths = self.fs.glob(self.path(COMMITS_DIR, "*.json"))
        if sources is not None:
            from air_ray.data.corpus import unit_prefix

            prefixes = tuple(unit_prefix(s) for s in sources)
            paths = [p for p in paths if posixpath.basename(p).startswith(prefixes)]
        if not paths:
            return {}
        out = {}
        for _, blob in self.fs.cat(paths).items():
            try:
                m = CommitMarker.from_json(json.loads(blob))
            except (ValueError, KeyError, TypeError):
                continue
            out[m.unit] = m
        return out

    def write_manifest(self, manifest: Manifest) -> None:
        write_json_atomic(self.fs, self.path(MANIFEST), manifest.to_json())

    def manifest(self) -> Manifest | None:
        try:
            return Manifest.from_json(json.loads(self.fs.cat_file(self.path(MANIFEST))))
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

    @property
    def heads_file(self) -> str:
        """The heads.json a rescore version was scored with (a URI)."""
        return self.uri_of(HEADS_FILE)

    @property
    def lease_file(self) -> str:
        return self.path(LEASE_FILE)

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

    @property
    def selection(self) -> str:
        """The usual place of this run's selection (a URI)."""
        return self.uri_of(SELECTION_DIR)


# ----------------------------------------------------------------------------------------------
# what is made from a run


class SelectionLayout:
    """``air-ray select --output``: selection.parquet, score_hist.png and selection.json (the completion marker)."""

    def __init__(self, uri: str):
        self.fs, root = url_to_fs(uri)
        self.root = root.rstrip("/") or root

    @property
    def parquet(self) -> str:
        return posixpath.join(self.root, SELECTION_PARQUET)

    @property
    def summary(self) -> str:
        return posixpath.join(self.root, SELECTION_JSON)

    @property
    def plot(self) -> str:
        return posixpath.join(self.root, SELECTION_PLOT)

    def uris(self) -> dict[str, str]:
        """``{file name: URI}`` of the three files."""
        return {name: with_protocol(self.fs, posixpath.join(self.root, name)) for name in SELECTION_FILES}


def selection_parquet(uri: str) -> str:
    """``selection.parquet`` given it or the directory holding it."""
    return uri if uri.endswith(PARTITION_EXT) else uri.rstrip("/") + "/" + SELECTION_PARQUET


def selection_json(uri: str) -> str:
    """``selection.json`` given it or the directory holding it."""
    return uri if uri.endswith(".json") else uri.rstrip("/") + "/" + SELECTION_JSON


def selection_candidates(scores: str) -> list[str]:
    """Where a run's selection usually is: ``<scores>/selection``, then ``<scores>/../selection``."""
    run = RunLayout(scores)
    return [run.uri_of(SELECTION_DIR), with_protocol(run.fs, posixpath.join(posixpath.dirname(run.root),
                                                                            SELECTION_DIR))]


class ExportLayout(RunLayout):
    """``air-ray export --output``: the rows in ``data/`` (so that readers of the folder find only rows), the
    LLaMA-Factory entry and the summary (a dot-file, written last)."""

    def part(self, i: int, fmt: str, hidden: bool = False) -> str:
        return self.path(EXPORT_DATA_DIR, ("." if hidden else "") + EXPORT_PART.format(i, fmt))

    def parts(self) -> list[str]:
        """The row files, sorted (an export written before data/: its parts beside the summary)."""
        return sorted(self.fs.glob(self.path(EXPORT_DATA_DIR, EXPORT_PART_GLOB))) or \
            sorted(self.fs.glob(self.path(EXPORT_PART_GLOB + PARTITION_EXT)))

    def stale_parts(self) -> list[str]:
        """Row files of any earlier export here (and of the layout before data/)."""
        return self.fs.glob(self.path(EXPORT_DATA_DIR, EXPORT_PART_GLOB)) + \
            self.fs.glob(self.path(EXPORT_PART_GLOB + PARTITION_EXT))

    @property
    def data_dir(self) -> str:
        return self.uri_of(EXPORT_DATA_DIR)

    @property
    def summary(self) -> str:
        return self.path(EXPORT_SUMMARY)

    @property
    def llamafactory(self) -> str:
        return self.path(EXPORT_LLAMAFACTORY)

    def summaries(self) -> list[str]:
        """Where the summary may be: ``.export.json``, or ``export.json`` of the layout before data/."""
        return [self.path(EXPORT_SUMMARY), self.path(EXPORT_SUMMARY_BEFORE_DATA_DIR)]


class CompareLayout:
    """``air-ray compare --output`` (a local directory): one folder per run (its ``result.json``), one per
    selection, and compare.md, compare.png, compare.json (the completion marker)."""

    INITIAL = "initial"  # the run that evaluates the initial model

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def default(scores: str) -> str:
        """Where ``air-ray compare`` writes by default and ``air-ray report`` looks: ``<scores>/compare``."""
        return f"{scores.rstrip('/')}/{COMPARE_DIR}"

    @staticmethod
    def uri_of(uri: str, name: str) -> str:
        """File ``name`` of the comparison at ``uri`` (its directory, or a JSON file in it)."""
        base = uri.rstrip("/")
        return f"{posixpath.dirname(base) if base.endswith('.json') else base}/{name}"

    def run(self, name: str) -> Path:
        return self.root / "runs" / name

    def result(self, name: str) -> Path:
        return self.run(name) / "result.json"

    def selection(self, name: str) -> Path:
        return self.root / "selections" / name

    def file(self, name: str) -> Path:
        """One of ``COMPARE_FILES``."""
        return self.root / name


class ReportLayout:
    """``air-ray report --output`` (a local directory): index.html and its images, referred to by their names."""

    HEADS = "heads.png"
    HISTOGRAM = "score_hist.png"
    LENGTH = "score_vs_length.png"
    LOSS = "score_vs_loss.png"
    PLACEBO = "placebo.png"
    COMPARE = COMPARE_PNG

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def page(self) -> Path:
        return self.root / REPORT_PAGE

    def image(self, name: str) -> Path:
        return self.root / name


def training_summary(output: str) -> str:
    """``training_summary.json`` in a training run's (local) output directory."""
    return str(Path(output.removeprefix("file://")) / TRAINING_SUMMARY)


class DemoLayout:
    """``air-ray demo --output`` (a local directory): the rows scored, heads.json, the run, its selection and report."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def input(self, name: str) -> Path:
        """Where the first ``--limit`` rows of an input file named ``name`` are written."""
        return self.root / "input" / name

    @property
    def heads(self) -> Path:
        return self.root / HEADS_FILE

    @property
    def run(self) -> RunLayout:
        return RunLayout(str(self.root / "scores"))

    @property
    def selection(self) -> SelectionLayout:
        """Beside the run (where ``air-ray report`` finds it: ``<scores>/../selection``)."""
        return SelectionLayout(str(self.root / SELECTION_DIR))

    @property
    def report(self) -> ReportLayout:
        return ReportLayout(self.root / "report")

    def outputs(self) -> list[str]:
        """Every file and folder the demo leaves, as the paths it prints."""
        run, sel = self.run, self.selection
        return [str(self.heads), str(heads_png(self.heads)), run.path(SCORES_DIR) + "/", run.path(REJECTED_DIR) + "/",
                run.path(MANIFEST), sel.parquet, sel.summary, sel.plot, str(self.report.page)]
