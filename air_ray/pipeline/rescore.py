"""``air-ray rescore``: score only what is new in the dumps, keep one global selection current.

    <output>/v=<version>/                version = the scoring key: a short hash of everything that changes scores
                                         (a version scored before the key named SCORING_VERSION and the resolved
                                         dtype is continued when its partitions record this run's dtype)
        scores/ rejected/ _commits/      the partitions (as ``air-ray score`` writes them)
        ledger.parquet                   one row per input file: uri, size, etag/mtime, sha256, rows, status
        selection/                       recomputed over every partition of the version after each run
        heads.json                       the heads this version was scored with
        _lease.json                      held while a run writes (``air_ray.store.lease``)

A file is *new* when its uri is not in the ledger, *changed* when its content hash differs, *unchanged*
otherwise (the hash is recomputed only when size and etag/mtime differ from the ledger's). New and changed
files are scored by ``run_score``; ids already scored by the version's other files count as earlier
occurrences (``duplicate_id``). A changed file's partitions are replaced by rename, and partitions it no
longer produces are removed. A run killed mid-way leaves the ledger without its files, so the next run scores
them again and skips every partition already committed.
"""

from __future__ import annotations

import hashlib
import json
import time

from air_ray.config.commands import RescoreConfig, ScoreConfig
from air_ray.store.layout import HEADS_FILE, LEASE_FILE, RunLayout
from air_ray.store.scores import NoScores

BUSY = "busy"


def _stat(fs, path: str) -> dict:
    info = fs.info(path)
    etag = info.get("ETag") or info.get("etag")
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    return {"size": info.get("size"), "etag": None if etag is None else str(etag).strip('"'),
            "mtime": None if mtime is None else str(mtime)}


def _sha256(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def classify(files: list[str], ledger: dict[str, dict]) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """Stat (and hash where needed) every input file -> (ledger rows as they are now, {kind: [uris]})."""
    from air_ray.fsio import url_to_fs

    kinds: dict[str, list[str]] = {"new": [], "changed": [], "unchanged": []}
    now: dict[str, dict] = {}
    for uri in files:
        fs_, path = url_to_fs(uri)
        st = _stat(fs_, path)
        old = ledger.get(uri)
        same_stat = old is not None and (old["size"], old["etag"], old["mtime"]) == (st["size"], st["etag"],
                                                                                     st["mtime"])
        sha = old["sha256"] if same_stat else _sha256(fs_, path)
        row = dict(old or {}, uri=uri, sha256=sha, **st)
        if old is None:
            kinds["new"].append(uri)
        elif old["sha256"] != sha:
            kinds["changed"].append(uri)
        elif old["status"] != "done":  # a run died while scoring it: score it again (committed parts skip)
            kinds["new" if old.get("rows") is None else "changed"].append(uri)
        else:
            kinds["unchanged"].append(uri)
        now[uri] = row
    return now, kinds


def prior_id_hashes(version: RunLayout, exclude_sources: set[str]):
    """Hashes of the ids already scored in the version by files other than ``exclude_sources``."""
    import numpy as np

    from air_ray.data.ids import id_hash
    from air_ray.store.scores import open_scores

    if not version.has_scores():
        return np.empty(0, dtype=np.int64)
    try:
        scores = open_scores(version.uri, "rescore", columns=("id", "source"))
    except NoScores:  # a scores/ folder with no partition in it yet
        return np.empty(0, dtype=np.int64)
    out = []
    for batch in scores.batches(["id", "source"]):
        for rid, src in zip(batch.column("id").to_pylist(), batch.column("source").to_pylist()):
            if src not in exclude_sources:
                out.append(id_hash(rid))
    return np.asarray(out, dtype=np.int64)


def remove_stale_partitions(version: RunLayout, sources: list[str], keep: set[str]) -> int:
    """Partitions of ``sources`` that this run did not produce (a changed file that now has fewer chunks)."""
    from air_ray.data.corpus import unit_prefix

    return sum(version.remove_units(unit_prefix(src), keep) for src in sources)


def current_selection(version: RunLayout, cfg) -> dict | None:
    """The version's selection.json when it was made with ``cfg`` (a ``SelectConfig``) from exactly the partitions
    the version lists now, else None. Only a directory listing and that file are read: a pass with nothing new reads
    no partition. (Partitions change only through a rescore, which then selects again; a listing catches any that
    came or went otherwise.)"""
    from air_ray.fsio import with_protocol
    from air_ray.outputs.select import select_config_doc
    from air_ray.store.scores import find_partitions, find_selection

    doc, _ = find_selection(version.uri, version.selection)
    if not doc or doc.get("config") != select_config_doc(cfg.validate()):
        return None
    fs, files = find_partitions(version.uri, "rescore")
    return doc if sorted(doc.get("inputs") or []) == sorted(with_protocol(fs, f) for f in files) else None


def resolve_heads(cfg: RescoreConfig, out: RunLayout, model) -> tuple[dict, bytes]:
    """heads.json as given, or detected once per model (an ``OpenModel``) and kept under
    <output>/heads/<fingerprint>.json."""
    import os
    import tempfile

    from air_ray.store.heads import heads_json, load_heads

    ref = model.ref
    path = cfg.heads
    if cfg.heads == "detect":
        from air_ray.fsio import with_protocol, write_bytes_atomic
        from air_ray.heads.run import run_heads
        from air_ray.pipeline.runner import detect_heads_on_cluster

        kept = out.detected_heads(ref.fingerprint)
        if not out.fs.exists(kept):
            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, HEADS_FILE)
                run_heads(cfg.heads_config(local), detect=detect_heads_on_cluster)
                with open(local, "rb") as f:
                    write_bytes_atomic(out.fs, kept, f.read())
        path = with_protocol(out.fs, kept)
    doc = load_heads(path, fingerprint=ref.fingerprint, shape=model.shape, allow_mismatch=cfg.allow_model_mismatch)
    return doc, heads_json(doc)


def version_for(out: RunLayout, key: str, legacy: dict[str, str], dtype: str, dtype_option: str) -> tuple[str, str]:
    """``(version, a line to print or "")``: the version this run scores into. ``v=<key>``; where that does not exist
    yet but a version named by a legacy key of the same options does (``legacy``: ``{release: key}``, scored before
    keys named ``SCORING_VERSION`` and the resolved dtype), that version when its partitions record this run's
    ``dtype`` (remembered in its ``_scoring_key.json``), else ``v=<key>``, scored in full, and the line says why."""
    if out.fs.exists(out.version(key).root):
        return key, ""
    for release, old in legacy.items():
        vrun = out.version(old)
        if not vrun.fs.exists(vrun.root):
            continue
        if (vrun.key_alias() or {}).get("scoring_key") == key:
            return old, ""
        recorded = sorted({(m or {}).get("dtype") for _, m in vrun.partition_metadata()} - {None})
        was = f"v={old} was scored by air_ray {release} (--dtype {dtype_option}), keyed before keys named the " \
              f"scoring version and the resolved dtype"
        if recorded in ([], [dtype]):
            vrun.write_key_alias({"scoring_key": key, "legacy_key": old, "release": release, "dtype": dtype})
            return old, f"[air-ray rescore] {was}; its partitions record dtype {dtype}, this run's: continuing it " \
                        f"as version {key}"
        return key, (f"[air-ray rescore] {was}; its partitions record dtype {', '.join(recorded)}, this run scores "
                     f"{dtype}: a new version v={key}, every input file scored again")
    return key, ""


def run_rescore(cfg: RescoreConfig) -> dict:
    """One scheduled pass; returns (and the CLI prints as its last line) the run summary."""
    from air_ray.data.corpus import expand_inputs
    from air_ray.fsio import write_bytes_atomic
    from air_ray.models import open_model
    from air_ray.outputs.select import select
    from air_ray.store.lease import Lease
    from air_ray.pipeline.runner import scoring_dtype
    from air_ray.pipeline.score import run_score

    cfg = cfg.validate()
    out = RunLayout(cfg.output)
    model = open_model(cfg)
    ref = model.ref
    heads_doc, heads_raw = resolve_heads(cfg, out, model)
    dtype, _ = scoring_dtype(cfg)
    version, note = version_for(out, cfg.scoring_key(ref.fingerprint, heads_doc["heads"], dtype),
                                cfg.legacy_keys(ref.fingerprint, heads_doc["heads"]), dtype, cfg.dtype)
    if note:
        print(note, flush=True)
    vrun = out.version(version)
    fs, vuri = vrun.fs, vrun.uri
    summary = {"version": version, "files_new": 0, "files_changed": 0, "files_unchanged": 0, "rows_scored": 0,
               "rows_total": 0, "selected": 0}

    lease = Lease(fs, vrun.lease_file, ttl_s=cfg.lease_ttl_s)
    while not lease.acquire():
        holder = lease.holder() or {}
        msg = (f"[air-ray rescore] another run holds {vrun.uri_of(LEASE_FILE)} (host {holder.get('host')}, pid "
               f"{holder.get('pid')}, until {time.strftime('%H:%M:%S', time.gmtime(holder.get('expires', 0)))} "
               "UTC)")
        if not cfg.wait:
            print(msg + "; backing off (use --wait to wait for it)", flush=True)
            return dict(summary, status=BUSY)
        print(msg + "; waiting", flush=True)
        time.sleep(min(30.0, max(1.0, cfg.lease_ttl_s / 10)))
    try:
        files = expand_inputs(cfg.input)
        ledger = vrun.read_ledger()
        current, kinds = classify(files, ledger)
        todo = kinds["new"] + kinds["changed"]
        summary.update(files_new=len(kinds["new"]), files_changed=len(kinds["changed"]),
                       files_unchanged=len(kinds["unchanged"]))
        print(f"[air-ray rescore] version {version}: {len(kinds['new'])} new, {len(kinds['changed'])} changed, "
              f"{len(kinds['unchanged'])} unchanged input files", flush=True)
        write_bytes_atomic(fs, vrun.path(HEADS_FILE), heads_raw)
        if todo:
            stamp = _now()
            for uri in todo:  # mark them: a run that dies now leaves them "scoring", so the next run redoes them
                ledger[uri] = dict(current[uri], status="scoring", time=stamp)  # keeps any earlier rows/partitions
            vrun.write_ledger(ledger)
            prior = prior_id_hashes(vrun, set(todo))
            score_cfg = ScoreConfig.build({f.name: getattr(cfg, f.name) for f in ScoreConfig.option_fields()})
            score_cfg = score_cfg.replace(input=todo, output=vuri, heads=vrun.heads_file)
            manifest = run_score(score_cfg, prior_ids=prior, dtype=dtype)
            remove_stale_partitions(vrun, kinds["changed"], set(manifest.partitions))
            summary["rows_scored"] = manifest.this_run["rows_scored"]
            stamp = _now()
            for uri in todo:
                s = manifest.per_source.get(uri, {})
                ledger[uri] = dict(current[uri], rows=s.get("rows_read", 0), partitions=s.get("partitions", 0),
                                   status="done", time=stamp)
        for uri in kinds["unchanged"]:
            ledger[uri] = dict(ledger[uri], **{k: current[uri][k] for k in ("size", "etag", "mtime")})
        vrun.write_ledger(ledger)
        try:
            sel_cfg = cfg.selection_config(vuri, vrun.selection)
            sel = None if todo else current_selection(vrun, sel_cfg)
            if sel is not None:  # nothing new, and the selection is of these very partitions: not one row read
                print(f"[air-ray rescore] nothing new: the selection of {len(sel['inputs'])} partitions is current",
                      flush=True)
            else:
                sel = select(sel_cfg)
            summary["rows_total"] = sel["counts"]["rows_total"]
            summary["selected"] = sel["counts"]["rows_selected"]
        except NoScores:
            print(f"[air-ray rescore] nothing scored yet in {vuri}: no selection", flush=True)
    finally:
        lease.release()
    return dict(summary, status="done")


def _now():
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def main_summary_line(summary: dict) -> str:
    keys = ("version", "files_new", "files_changed", "files_unchanged", "rows_scored", "rows_total", "selected",
            "status")
    return json.dumps({k: summary[k] for k in keys})

