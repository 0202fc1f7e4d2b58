"""The ``air-ray`` command line: flags built from the config classes (``air_ray.config``), then one call.

Every subcommand takes its options as flags, or from ``--config FILE.yaml`` whose keys are the long option
names (flags given on the command line win). Values from either go through the same checks
(``Options.validate``) before any model loads or Ray starts. User errors print one line and exit 2
(``--debug`` shows the traceback); jobs/ entrypoints call ``main([subcommand, *argv])``. ``SUBCOMMANDS`` is the one
table of subcommands (config class, function, help, whether it drives Ray).

May import: every part (it parses, then calls one function of one part).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable

from air_ray.config.commands import (
    SCORING_VERSION, CompareConfig, DemoConfig, ExportConfig, FetchConfig, HeadsConfig, ReportConfig, RescoreConfig,
    ScoreConfig, SelectConfig, TrainConfig,
)
from air_ray.config.options import GROUPS, Options, flag, group_of, kind_of, opt_of, optional, warn
from air_ray.errors import AirRayError
from air_ray.progress import VERBOSE_ENV, quiet_libraries
from air_ray.version import __version__

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (through main), instead of usage + message
        where = self.prog.removeprefix("air-ray").strip()
        raise AirRayError(f"{where}: {message}" if where else message)


def _value_parser(tp, name: str):
    kind = kind_of(tp)
    conv = {"int": int, "float": float}.get(kind, str)

    def parse(text: str):
        if optional(tp) and text.lower() in ("none", "null"):
            return None
        if kind == "dict":
            key, sep, value = text.partition("=")
            if not sep or not key:
                raise argparse.ArgumentTypeError(f"{flag(name)} takes KEY=VALUE pairs, got {text!r}")
            import yaml

            return key, yaml.safe_load(value)
        try:
            return conv(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag(name)}: {text!r} is not {'an integer' if conv is int else 'a number'}")

    return parse


def add_options(p: argparse.ArgumentParser, cls: type[Options]) -> None:
    """One flag per option of ``cls`` (and its old spellings, listed in the help as deprecated), in the --help
    sections of ``GROUPS``; unset flags stay out of the namespace."""
    p.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE.yaml",
                   help="YAML file whose keys are these options (flags given here win)")
    p.add_argument("--print-config", action="store_true", default=argparse.SUPPRESS,
                   help="print the effective options as YAML (defaults < --config file < flags; --config reads it "
                        "back) and exit")
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="also show what Ray and the model libraries print on their own (start-up lines, their "
                        "progress bars); the same as AIR_RAY_VERBOSE=1")
    sections = {g: p.add_argument_group(f"{g} options") for g in GROUPS}
    hints = cls.types()
    for f in cls.option_fields():
        o = opt_of(f)
        if not o.cli:
            continue
        section = sections.get(group_of(cls, f), p)
        tp, kind = hints[f.name], kind_of(hints[f.name])
        choices = "{" + ",".join(map(str, o.choices)) + "}" if o.choices else None
        default = "" if f.default is None or kind in ("list", "dict") else f" (default: {f.default})"
        if kind == "dict" and o.factory is not None:
            default = f" (default: {' '.join(f'{k}={v}' for k, v in o.factory().items()) or 'none'})"
        old = f" (deprecated spelling: {', '.join(flag(a) for a in o.aliases)})" if o.aliases else ""
        helptext = (o.help or "") + default + old
        if o.positional:
            section.add_argument(f.name, nargs="?", default=argparse.SUPPRESS, type=_value_parser(tp, f.name),
                                 metavar=o.metavar or f.name.upper(), help=helptext)
            continue
        names = [flag(f.name)] + [flag(a) for a in o.aliases]
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=helptext)
        if kind == "bool":
            section.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        elif kind in ("list", "dict"):
            section.add_argument(*names, nargs="+", type=_value_parser(tp, f.name), metavar=o.metavar or choices,
                                 **kw)
        else:
            section.add_argument(*names, type=_value_parser(tp, f.name), metavar=o.metavar or choices, **kw)


def version_line() -> str:
    return f"air-ray {__version__} (scoring version {SCORING_VERSION})"


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="air-ray", description="AIR data selection by attention head influence")
    ap.add_argument("--version", action="version", version=version_line())
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    ap.add_argument("--verbose", action="store_true", help="also show what Ray and the model libraries print on "
                                                          "their own (as every command's --verbose)")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, command in SUBCOMMANDS.items():
        cls, helptext = command.config, command.help
        parent = sub
        if " " in name:
            group, name = name.split(" ", 1)
            if group not in groups:
                groups[group] = sub.add_parser(group, help=f"{group} commands").add_subparsers(
                    dest=f"{group}_command", required=True, parser_class=_Parser)
            parent = groups[group]
        p = parent.add_parser(name, help=helptext, description=helptext)
        p.set_defaults(_config=cls)
        add_options(p, cls)
    return ap


def _deprecated_flags(argv: list[str], cls: type[Options]) -> None:
    given = {tok.split("=", 1)[0] for tok in argv if tok.startswith("--")}
    for f in cls.option_fields():
        for a in opt_of(f).aliases:
            for old, new in ((flag(a), flag(f.name)), ("--no-" + flag(a)[2:], "--no-" + flag(f.name)[2:])):
                if old in given:
                    warn(f"{old} is deprecated; use {new}")


def _parse(argv: list[str]) -> tuple[str, Options, argparse.Namespace]:
    ns = build_parser().parse_args(argv)
    cls: type[Options] = ns._config
    _deprecated_flags(argv, cls)
    given = {f.name: getattr(ns, f.name) for f in cls.option_fields() if hasattr(ns, f.name)}
    for name, value in list(given.items()):
        if isinstance(value, list) and value and isinstance(value[0], tuple):  # KEY=VALUE pairs -> mapping
            given[name] = dict(value)
    return cls.command, cls.load(getattr(ns, "config", None), **given), ns


def parse(argv: list[str]) -> tuple[str, Options]:
    """``(subcommand, its validated config)`` from a command line (without the program name)."""
    return _parse(argv)[:2]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from air_ray.cli import supervise

    debug = "--debug" in argv
    if "--verbose" in argv:
        os.environ[VERBOSE_ENV] = "1"  # for this process, its supervised child and an embedded cluster's workers
    quiet_libraries()
    try:
        command, cfg, ns = _parse(argv)
        if getattr(ns, "print_config", False):
            print(f"# air-ray {command}: the effective options (defaults < --config file < flags)")
            print(cfg.to_yaml(), end="")
            return 0
        run = SUBCOMMANDS[command]
        if run.ray:
            if not supervise.supervised():  # the work runs in a child: a lost Ray cluster still ends in one line
                return supervise.run_child(argv)
            supervise.report_normal_exit()
            supervise.use_direct_stderr()
            return supervise.exit_now(run.run(cfg))
        return run.run(cfg)
    except AirRayError as e:
        if debug:
            raise
        print(f"air-ray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# ----------------------------------------------------------------------------------------------
# one function per subcommand


def _fetch(cfg: FetchConfig) -> int:
    from air_ray.models import prepare_model

    ref = prepare_model(cfg.model, allow_pickle=cfg.allow_pickle)
    print(f"model {ref.name}: fingerprint {ref.fingerprint}")
    print(ref.path)
    return 0


def _heads(cfg: HeadsConfig) -> int:
    from air_ray.heads.run import probe_inputs, run_heads, run_placebo
    from air_ray.pipeline.runner import detect_heads_on_cluster

    if cfg.placebo:  # no model, no cluster: drawn from the heads file
        print(json.dumps({"heads": run_placebo(cfg)["heads"], "placebo": True}))
        return 0

    probe_inputs(cfg)  # a bad model or probes file: one line, before any cluster starts
    # the detection runs as a Ray task with the GPUs it asks for (on a GPU worker of a cluster), not here
    doc = run_heads(cfg, detect=detect_heads_on_cluster)
    print(json.dumps({"heads": doc["heads"], "ablation_check": doc["ablation_check"]}))
    return 0


def _score(cfg: ScoreConfig) -> int:
    from air_ray.pipeline.score import run_score

    manifest = run_score(cfg)
    rejected = manifest.counts["rows_rejected"]
    if cfg.strict and rejected:
        print(f"air-ray: {rejected:,} rows rejected (--strict); see {cfg.output}/rejected/", file=sys.stderr)
        return 1
    return 0


def _select(cfg: SelectConfig) -> int:
    from air_ray.outputs.select import select

    summary = select(cfg)
    print(json.dumps({k: summary[k] for k in ("counts", "threshold_score") if k in summary}))
    return 0


def _rescore(cfg: RescoreConfig) -> int:
    from air_ray.pipeline.rescore import main_summary_line, run_rescore

    print(main_summary_line(run_rescore(cfg)), flush=True)
    return 0


def _report(cfg: ReportConfig) -> int:
    from air_ray.outputs.report import write_report

    print(write_report(cfg.scores, cfg.heads, cfg.output, selection=cfg.selection, corpus=cfg,
                       compare=cfg.compare, placebo_scores=cfg.placebo_scores))
    return 0


def _export(cfg: ExportConfig) -> int:
    from air_ray.outputs.export import export

    export(cfg)
    return 0


def _train(cfg: TrainConfig) -> int:
    from air_ray.pipeline.runner import train_on_cluster

    train_on_cluster(cfg)  # Ray Train workers fine-tune; this process coordinates
    return 0


def _compare(cfg: CompareConfig) -> int:
    from air_ray.evaluation.compare import run_compare

    run_compare(cfg)
    return 0


def _demo(cfg: DemoConfig) -> int:
    from air_ray.cli.demo import run_demo

    run_demo(cfg)
    return 0


@dataclass(frozen=True)
class Subcommand:
    """One ``air-ray`` subcommand: its config class (whose ``command`` is its name: ``model fetch`` is fetch of the
    group model), the function that runs it, its help line, and whether it drives a Ray cluster (``ray``: it runs in
    a supervised child, ``air_ray.cli.supervise``)."""

    config: type[Options]
    run: Callable[[Options], int]
    help: str
    ray: bool = False

    @property
    def name(self) -> str:
        return self.config.command


# every subcommand, once, in --help order
SUBCOMMANDS: dict[str, Subcommand] = {s.name: s for s in (
    Subcommand(FetchConfig, _fetch, "prepare a model offline; prints its local directory last"),
    Subcommand(HeadsConfig, _heads, "detect reasoning-critical (retrieval) heads -> heads.json + heads.png", ray=True),
    Subcommand(ScoreConfig, _score, "score a corpus on Ray Data -> Parquet partitions", ray=True),
    Subcommand(SelectConfig, _select, "rank every partition globally and select the top"),
    Subcommand(RescoreConfig, _rescore, "score only new or changed input files into a versioned output; refresh the "
                                        "selection (for schedules)", ray=True),
    Subcommand(ReportConfig, _report, "a static HTML report (heads, scores, top/bottom rows, selection) -> "
                                      "DIR/index.html"),
    Subcommand(ExportConfig, _export, "the selected rows as a training-ready dataset (messages, prompt/completion or "
                                      "the original records, with scores and step weights; Parquet or JSON lines)"),
    Subcommand(TrainConfig, _train, "step-weighted fine-tuning on a selection (step weights -> per-token loss "
                                    "weights)", ray=True),
    Subcommand(CompareConfig, _compare, "train one student per selection strategy (AIR score vs heuristics) and "
                                        "evaluate each on held-out rows -> compare.json, compare.md, compare.png"),
    Subcommand(DemoConfig, _demo, "the whole pipeline on the bundled GSM8K sample, on a local Ray", ray=True),
)}
