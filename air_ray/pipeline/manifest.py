"""The run's manifest (``air_ray.store.records.Manifest``: config, model, heads, versions, counts per reason, per
source and per actor, step weights, placement, timings), built from the units' summaries, and its progress lines.
Plain Python: the driver feeds it the ``UnitSummary`` of every unit."""

from __future__ import annotations

import math
import platform
import sys
import time
from collections import Counter

from air_ray.progress import EVERY_S, Ticker, duration, say
from air_ray.store.records import Manifest, UnitSummary


def versions() -> dict:
    """Versions of what produced the scores (read from the installed distributions: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    from air_ray.config.commands import SCORING_VERSION
    from air_ray.version import __version__

    out = {"air_ray": __version__, "scoring_version": SCORING_VERSION}
    for name in ("ray", "torch", "transformers", "pyarrow", "vllm"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return dict(out, python=platform.python_version())


class Progress:
    """The run's progress: rows done of the records the id pass counted (``total_rows``), counting the rows of
    partitions still being scored (``live``: the executor's (rows, tokens) reported after each model batch), tokens,
    tokens/s and an ETA. On a terminal (``bar``) a bar on stderr (tqdm, over the input bytes), refreshed as
    partitions finish and every 2 s; elsewhere a plain line on stdout every ``every_s`` seconds while the run lasts
    (``air_ray.progress.EVERY_S``), when a partition finishes at most every 5 s, and one at the end. ``close()``
    ends it."""

    def __init__(self, total_bytes: int, total_rows: int | None = None, live=None, bar: bool = False,
                 every_s: float = EVERY_S):
        self.total_bytes, self.total_rows = max(total_bytes, 1), total_rows
        self.live = live or (lambda: (0, 0))
        self.t0 = self.last = time.time()
        self.rows = self.tokens = self.nbytes = self.parts = 0  # of the finished partitions
        self.reported = 0  # rows of the finished partitions that went through the model (live counts them too)
        self.printed = -1
        self.bar = None
        if bar:
            import os

            from tqdm import tqdm

            try:  # a terminal that reports no size (a bare pty) gets 100 columns, not an empty bar
                sized = os.get_terminal_size(sys.stderr.fileno()).columns > 0
            except OSError:
                sized = False
            self.bar = tqdm(total=self.total_bytes, desc="[air-ray score]", unit="B", unit_scale=True,
                            unit_divisor=1024, file=sys.stderr, dynamic_ncols=sized, ncols=None if sized else 100,
                            mininterval=0.5, postfix="0 rows, 0 tok/s", disable=False,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} input{postfix} "
                                       "[{elapsed}<{remaining}]")
        self.ticker = Ticker(self._tick, every_s=2.0 if bar else every_s).start()  # _tick prints itself

    def update(self, s: UnitSummary) -> None:
        self.rows += s.rows_read
        self.nbytes += s.nbytes
        self.parts += 1
        if not s.skipped:
            self.tokens += s.tokens
            self.reported += s.rows_scored + s.reasons.get("non_finite_loss", 0)
        if self.bar is not None:
            self._postfix()
            self.bar.update(min(s.nbytes, self.total_bytes - self.bar.n))
        elif time.time() - self.last >= 5.0:
            self._line()

    def counts(self) -> tuple[int, int]:
        """(rows, tokens) done: the finished partitions' and what the running ones reported so far."""
        try:
            rows, tokens = self.live()
        except Exception:  # the progress board is gone (the run is ending): the finished partitions only
            rows, tokens = self.reported, self.tokens
        return self.rows + max(0, rows - self.reported), self.tokens + max(0, tokens - self.tokens)

    def _tick(self) -> None:
        if self.bar is not None:
            self._postfix()
            self.bar.refresh()
        else:
            self._line()

    def _postfix(self) -> None:
        rows, tokens = self.counts()
        self.bar.set_postfix_str(f"{rows:,} rows, {tokens / max(time.time() - self.t0, 1e-9):,.0f} tok/s",
                                 refresh=False)

    def _line(self) -> None:
        self.last = now = time.time()
        self.printed = self.parts
        rows, tokens = self.counts()
        el = now - self.t0
        if self.total_rows:
            frac = min(rows / self.total_rows, 1.0)
            of = f"{rows:,} of {self.total_rows:,} rows ({frac:.0%})"
        else:
            frac = min(self.nbytes / self.total_bytes, 1.0)
            of = f"{rows:,} rows ({frac:.0%} of input)"
        eta = duration(el * (1 - frac) / frac) if frac > 0 else "?"
        waiting = "" if rows or self.parts else " (the scoring workers are starting: loading the model)"
        say(f"[air-ray score] {of}, {tokens:,} tokens, {tokens / max(el, 1e-9):,.0f} tok/s, {self.parts} "
            f"partitions done, ETA {eta}{waiting}")

    def close(self) -> None:
        """Stop the ticks; end the bar, or print the last line (where anything happened since the one before)."""
        self.ticker.stop()
        if self.bar is not None:
            self._postfix()
            self.bar.close()
            self.bar = None
        elif self.parts != self.printed:
            self._line()


def input_size(uri: str) -> int:
    """File size for the ETA; 0 when the store cannot say."""
    from air_ray.fsio import url_to_fs

    try:
        fs, path = url_to_fs(uri)
        return int(fs.size(path) or 0)
    except Exception:
        return 0


def merge_weight_stats(summaries: list[UnitSummary]) -> dict:
    """The step weights of the whole run from the units' ``weight_stats``: the effective token share of a row's
    weights (``air_ray.influence.effective_token_share``; 1.0 = uniform) at p10 / median / p90, its minimum, and
    the largest weight. Units committed before these statistics existed are counted apart."""
    shares: Counter = Counter()
    rows = missing = 0
    top = None
    for s in summaries:
        w = s.weights
        if w is None:
            missing += s.rows_scored
            continue
        rows += w["rows"]
        shares.update({float(k): v for k, v in w["share"].items()})
        if w["max"] is not None:
            top = w["max"] if top is None else max(top, w["max"])
    values = sorted(shares)
    counts = [shares[v] for v in values]

    def quantile(q: float):  # the value at rank ceil(q * n), ascending (the values are rounded to 3 decimals)
        if not rows:
            return None
        need, seen = max(1, math.ceil(round(q * rows, 9))), 0
        for v, c in zip(values, counts):
            seen += c
            if seen >= need:
                return v
        return values[-1]

    return {"rule": None, "rows": rows, "rows_without_stats": missing,
            "effective_token_share": {"min": values[0] if values else None, "p10": quantile(0.10),
                                      "median": quantile(0.5), "p90": quantile(0.90)},
            "max_weight": top}


def build_manifest(cfg, model, heads_doc: dict, files: list[str], summaries: list[UnitSummary], wall: float, *,
                   scoring_key: str, placement: dict, phases: dict, duplicate_ids: int,
                   foreign_partitions: list[str], id_pass: dict | None = None) -> Manifest:
    """The run's manifest: ``cfg`` as it scored (placement and dtype resolved), ``model`` (an ``OpenModel``), the heads
    document, the input files and every unit's summary (those skipped counted from their markers)."""
    from dataclasses import asdict

    reasons: Counter = Counter()
    carried: Counter = Counter()
    per_actor: Counter = Counter()
    per_source: dict[str, Counter] = {}
    for s in summaries:
        reasons.update(s.reasons)
        carried.update(s.corpus_fields)
        per_actor[s.actor] += s.rows_scored
        src = per_source.setdefault(s.source, Counter())
        src.update(rows_read=s.rows_read, rows_scored=s.rows_scored, rows_rejected=s.rows_rejected, partitions=1)
    fresh = [s for s in summaries if not s.skipped]
    tokens = sum(s.tokens for s in fresh)
    return Manifest(
        config=asdict(cfg),
        model=model.ref.name,
        model_fingerprint=model.fingerprint,
        heads=[list(h) for h in heads_doc["heads"]],
        versions=versions(),
        inputs=files,
        partitions=sorted(s.unit for s in summaries),
        counts={
            "rows_read": sum(s.rows_read for s in summaries),
            "rows_scored": sum(s.rows_scored for s in summaries),
            "rows_rejected": sum(s.rows_rejected for s in summaries),
            "rejected_by_reason": dict(sorted(reasons.items())),
        },
        this_run={  # what this run did; a resumed run skips units committed earlier
            "units": len(summaries),
            "units_skipped": len(summaries) - len(fresh),
            "rows_read": sum(s.rows_read for s in fresh),
            "rows_scored": sum(s.rows_scored for s in fresh),
            "rows_rejected": sum(s.rows_rejected for s in fresh),
            # summed over the scoring workers: their time on the units, and the part of it in the model
            "score_stage_s": round(sum(s.seconds for s in fresh), 3),
            "engine_s": round(sum(s.engine_s for s in fresh), 3),
        },
        per_actor_rows=dict(sorted(per_actor.items())),
        per_source={k: dict(v) for k, v in sorted(per_source.items())},
        step_weights=dict(merge_weight_stats(summaries), rule=cfg.step_weighting),
        wall_s=round(wall, 3),
        tokens=tokens,
        tokens_per_s=tokens / wall if wall > 0 else 0.0,
        scoring_key=scoring_key,
        placement=placement,
        phases={k: round(v, 3) for k, v in phases.items()},
        duplicate_ids=duplicate_ids,
        foreign_partitions=foreign_partitions,
        corpus_fields=dict(sorted(carried.items())),
        id_pass=id_pass,
    )
