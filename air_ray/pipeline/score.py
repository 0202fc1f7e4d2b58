"""``air-ray score``: ``run_score`` resolves a run's options (the job, its executor, placement and dtype), runs the
scoring chain (``air_ray.pipeline.stages.scoring_chain``) on that executor and writes the manifest.

The driver's preparation (``ScoringJob.prepare``) comes before any cluster starts: a wrong model or heads file must be
a one-line error, and Ray prints as it starts. Units committed by an earlier run with the same key are skipped and
counted from their markers. A small corpus on one machine runs in this process (``placement.choose_executor``);
the outputs, commit markers and manifest are the same either way.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, replace

from air_ray.config.commands import ScoreConfig
from air_ray.data.corpus import Split, plan_splits
from air_ray.data.shapes import FieldMap
from air_ray.pipeline.executors import Executor, InProcess, physical_cpus
from air_ray.pipeline.manifest import Progress, build_manifest, input_size
from air_ray.pipeline.placement import SMALL_CORPUS_BYTES, Placement, plan
from air_ray.pipeline.stages import LEGACY_KEPT, UnitKeys, id_chain, scoring_chain
from air_ray.store.records import CommitMarker, Manifest, UnitSummary


def run_score(cfg: ScoreConfig, prior_ids=None, dtype: str | None = None) -> Manifest:
    """Score a corpus into ``<output>/scores``, ``<output>/rejected`` and ``<output>/_manifest.json``; returns the
    manifest.

    ``prior_ids``: hashes (``air_ray.data.ids.id_hash``) of ids already scored in this output by files that are not
    inputs of this run (``air-ray rescore``): a record with such an id is a duplicate. The caller then owns the
    output's other partitions, so they are not reported as foreign. ``dtype``: the dtype to score in, resolved by
    the caller (``runner.scoring_dtype``; rescore names its version by it), else resolved here once the workers are
    placed."""
    from air_ray.pipeline.runner import RayData, choose, scoring_dtype

    t0 = time.time()
    cfg = cfg.replace()  # a copy: placement and the resolved dtype are filled in below, the caller's stays as given
    job = ScoringJob.prepare(cfg)
    phases = {"prepare_s": time.time() - t0}
    name, why = choose(cfg, job.total_bytes)
    with (InProcess() if name == InProcess.name else RayData()) as executor:
        executor.start(cfg)
        phases.update(executor.phases)
        place = place_workers(cfg, executor)
        dtype, dtype_why = (dtype, "resolved by the caller") if dtype else scoring_dtype(cfg, place.gpus_per_actor)
        cfg.dtype = dtype  # every worker scores in the dtype the key names
        keys = UnitKeys(cfg.scoring_key(job.model.fingerprint, job.heads["heads"], dtype),
                        tuple(job.legacy_keys.values()), dtype)
        workers = f"{cfg.workers} worker{'s' * (cfg.workers != 1)}"
        print(f"[air-ray score] {len(job.files)} input files, {job.total_bytes:,} bytes -> {cfg.output} "
              f"({name}: {why}; {workers} x {cfg.gpus_per_worker:g} GPU, {cfg.cpus_per_worker:g} CPU = "
              f"{place.threads} torch threads; {place.why}; {dtype}: {dtype_why})", flush=True)
        t = time.time()
        # the id pass of a small corpus runs here: a Ray Data job of its own costs seconds of start-up
        ids = executor if job.total_bytes > SMALL_CORPUS_BYTES else InProcess()
        id_pass = find_duplicates(job.files, job.splits, prior_ids, FieldMap.of(cfg), ids)
        phases["ids_s"] = time.time() - t
        committed = {u: m.key for u, m in job.markers.items()}
        items = id_pass.numbered(job.splits)  # each split with the number of its first line
        chain = scoring_chain(cfg, len(items), keys, id_pass.duplicates, committed, job.heads)
        progress = Progress(job.total_bytes, id_pass.records, live=executor.live,
                            bar=cfg.progress and sys.stderr.isatty())
        summaries, legacy = job.collect(executor.run(chain, items), phases, progress)
    placement = {"executor": name, "actors": place.actors, "gpus_per_actor": place.gpus_per_actor,
                 "cpus_per_actor": place.cpus_per_actor, "torch_threads": place.threads,
                 "why": f"{name}: {why}; {place.why}"}
    phases["actor_setup_s"] = max((s.setup_s for s in summaries), default=0.0)
    manifest = build_manifest(
        cfg, job.model, job.heads, job.files, summaries, time.time() - t0, scoring_key=keys.scoring,
        placement=placement, phases=phases, duplicate_ids=sum(len(v) for v in id_pass.duplicates.values()),
        id_pass=id_pass.summary(),
        foreign_partitions=[] if prior_ids is not None else job.run.foreign_partitions([s.unit for s in summaries]))
    job.finish(manifest, legacy, dtype)
    return manifest


@dataclass
class ScoringJob:
    """What the driver knows before any worker starts: the input files and their size, the output (writable), the
    model, the heads (checked against it), the keys of earlier releases and the commit markers found."""

    files: list[str]
    splits: list[list[Split]]  # per file: one, or the byte ranges of a large JSON-lines file
    run: object  # air_ray.store.layout.RunLayout
    model: object  # air_ray.models.OpenModel
    heads: dict  # the heads document
    legacy_keys: dict[str, str]
    markers: dict[str, CommitMarker]
    total_bytes: int

    @classmethod
    def prepare(cls, cfg: ScoreConfig) -> "ScoringJob":
        from air_ray.data.corpus import expand_inputs
        from air_ray.models import open_model
        from air_ray.store.heads import load_heads
        from air_ray.store.layout import RunLayout

        files = expand_inputs(cfg.input)
        run = RunLayout(cfg.output)
        run.check_writable()
        model = open_model(cfg)
        heads = load_heads(cfg.heads, fingerprint=model.fingerprint, shape=model.shape,
                           allow_mismatch=cfg.allow_model_mismatch)
        legacy = cfg.legacy_keys(model.fingerprint, heads["heads"])  # of the dtype option as given
        sizes = [input_size(f) for f in files]
        splits = [plan_splits(f, size, cfg.split_bytes) for f, size in zip(files, sizes)]
        return cls(files, splits, run, model, heads, legacy, run.commits(files), sum(sizes))

    def collect(self, summaries, phases: dict, bar: Progress) -> tuple[list[UnitSummary], Counter]:
        """Every unit's summary as the chain gives them (a unit committed earlier: from its marker), with the
        progress lines (``bar``, closed here); ``Counter`` of the units committed under a legacy key, by what became
        of them."""
        t = time.time()
        out: list[UnitSummary] = []
        legacy: Counter = Counter()
        try:
            for s in summaries:
                if s.legacy:  # committed under a key of a release before SCORING_VERSION
                    legacy[s.legacy] += 1
                    if s.skipped:  # the same numbers: re-keyed, so later runs find it under the current key
                        self.run.write_commit(CommitMarker(s.unit, s.key, self.markers[s.unit].summary))
                if s.skipped:  # committed earlier: its counts come from the marker
                    s = replace(self.markers[s.unit].summary, skipped=True, actor="(committed earlier)",
                                setup_s=s.setup_s)
                out.append(s)
                if len(out) == 1:
                    phases["first_partition_s"] = time.time() - t
                bar.update(s)
        finally:
            bar.close()
        phases["scoring_s"] = time.time() - t
        return out, legacy

    def finish(self, manifest: Manifest, legacy: Counter, dtype: str) -> None:
        """Write the manifest and say what the run did (foreign partitions, legacy units, phases, counts)."""
        output = manifest.config["output"]
        if manifest.foreign_partitions:
            print(f"[air-ray score] warning: {len(manifest.foreign_partitions)} partition files in {output} "
                  "come from other inputs (listed in _manifest.json as foreign_partitions); readers of scores/ "
                  "see them too", flush=True)
        if legacy:
            kept = legacy.pop(LEGACY_KEPT, 0)
            again = "".join(f"; {n} {why}: scored again" for why, n in sorted(legacy.items()))
            print(f"[air-ray score] {kept + sum(legacy.values())} partitions were committed under the scoring key of "
                  f"air_ray {', '.join(self.legacy_keys)} (before scoring keys named SCORING_VERSION and the resolved "
                  f"dtype): {kept} recorded dtype {dtype}, this run's: kept{again}", flush=True)
        self.run.write_manifest(manifest)
        c, r = manifest.counts, manifest.this_run
        resumed = f" ({r['units_skipped']} of {r['units']} partitions committed earlier)" if r["units_skipped"] else ""
        print("[air-ray score] phases: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s"
                                                     for k, v in manifest.phases.items()), flush=True)
        print(f"[air-ray score] done: {c['rows_read']:,} rows read, {c['rows_scored']:,} scored, "
              f"{c['rows_rejected']:,} rejected{resumed}; this run scored {r['rows_scored']:,} rows in "
              f"{manifest.wall_s:,.1f}s ({manifest.tokens_per_s:,.0f} tok/s)", flush=True)


def place_workers(cfg: ScoreConfig, executor: Executor) -> Placement:
    """Where the scoring workers go on the executor's nodes (``placement.plan``); ``cfg``'s workers, GPUs and CPUs
    per worker are set to it."""
    place = plan(executor.nodes(), actors=cfg.workers, gpus_per_actor=cfg.gpus_per_worker,
                 cpus_per_actor=cfg.cpus_per_worker, embedded=executor.embedded, physical_cpus=physical_cpus())
    cfg.workers, cfg.gpus_per_worker, cfg.cpus_per_worker = place.actors, place.gpus_per_actor, place.cpus_per_actor
    return place


@dataclass
class IdPass:
    """What the id pass found: later occurrences of an id (``{source: {line: detail}}``), the records the files
    hold (what the progress line counts to), the first line of each split of a file read in byte ranges, and what
    it cost the driver (16 bytes per record; spilled to disk past ``air_ray.data.ids.MEMORY_ROWS``)."""

    duplicates: dict[str, dict[int, str]]
    records: int
    first_lines: dict[int, list[int]]  # file index -> first line of each split (files read in byte ranges only)
    nbytes: int
    spilled: bool

    def numbered(self, splits: list[list[Split]]) -> list[Split]:
        """Every split to score, each with the file's number of its first line."""
        return [replace(s, first_line=self.first_lines[fi][s.index]) if fi in self.first_lines else s
                for fi, file_splits in enumerate(splits) for s in file_splits]

    def summary(self) -> dict:
        return {"records": self.records, "bytes": self.nbytes, "spilled_to_disk": self.spilled,
                "split_files": len(self.first_lines),
                "splits": sum(len(v) for v in self.first_lines.values())}


def find_duplicates(files: list[str], splits: list[list[Split]], prior_ids, fields: FieldMap,
                    executor: Executor) -> IdPass:
    """The id pass (``stages.id_chain`` on ``executor``, one item per file or split): every valid record's (id hash,
    order) into an ``IdTable`` (with the ids of ``prior_ids`` first: they win), then its duplicates."""
    from air_ray.data import ids as dedupe

    records, lines = 0, {}
    with dedupe.IdTable() as table:
        table.add(*dedupe.prior_orders(prior_ids))
        items = [(fi, s) for fi, file_splits in enumerate(splits) for s in file_splits]
        for out in executor.run(id_chain(fields), items):
            table.add(out["hash"], out["order"])
            records += out["records"]
            lines[(out["file"], out["split"])] = out["lines"]
        first_lines = {}
        for fi, file_splits in enumerate(splits):
            if len(file_splits) > 1:  # the first line of each split: 1 + the lines of the splits before it
                starts = [1]
                for s in file_splits[:-1]:
                    starts.append(starts[-1] + lines[(fi, s.index)])
                first_lines[fi] = starts
        duplicates = dedupe.by_source(table.duplicates(), files, first_lines)
        return IdPass(duplicates, records, first_lines, table.nbytes, table.spilled)
