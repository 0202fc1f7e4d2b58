"""The `air-ray` command line: parse flags (or a YAML config whose keys are the flags), build one typed
config, call one function. User errors print one line and exit 2 (traceback with --debug)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from air_ray.config import BACKENDS
from air_ray.errors import AirRayError


def _model_opts(p: argparse.ArgumentParser, dtype_default: str = "auto") -> None:
    p.add_argument("--model", default="smollm2-135m", help="alias, local HF dir, .gguf file or hub id")
    p.add_argument("--dtype", default=dtype_default, choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA and CPUs with native bf16, else float32")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle (.bin) weights")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model repo")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="air-ray", description="AIR data selection by attention head influence")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", required=True)

    m = sub.add_parser("model", help="prepare models").add_subparsers(dest="model_command", required=True)
    f = m.add_parser("fetch", help="prepare a model offline; prints its local directory last")
    f.add_argument("name", nargs="?", default="smollm2-135m")
    f.add_argument("--allow-pickle", action="store_true")

    h = sub.add_parser("heads", help="detect reasoning-critical (retrieval) heads -> heads.json + heads.png")
    h.add_argument("--config", help="YAML file whose keys are these options")
    _model_opts(h, dtype_default="float32")
    h.add_argument("--out", default="heads.json")
    h.add_argument("--probes", help="JSONL of {prompt, answer}; default: built-in synthetic probes")
    h.add_argument("--num-probes", type=int, default=64)
    h.add_argument("--probe-tokens", type=int, default=512)
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--top-frac", type=float, default=0.05)

    s = sub.add_parser("score", help="score a corpus on Ray Data -> Parquet partitions")
    s.add_argument("--config", help="YAML file whose keys are these options")
    _model_opts(s)
    s.add_argument("--heads", default="heads.json")
    s.add_argument("--input", nargs="+", default=[], help="files, directories or globs (any fsspec URI)")
    s.add_argument("--output", default="out/scores")
    s.add_argument("--format", default="chat", choices=["chat", "raw"])
    s.add_argument("--steps", default="lines", help="lines | paragraphs | regex:PATTERN")
    s.add_argument("--step-temperature", type=float, default=1.0)
    s.add_argument("--backend", default="hf", choices=list(BACKENDS),
                   help="hf: transformers, one weight copy (default); vllm: two vLLM engines per actor")
    s.add_argument("--actors", type=int, default=1)
    s.add_argument("--gpus-per-actor", type=float, default=None,
                   help="default: 1 if the cluster has GPUs; > 1: tensor parallel (vllm) or sharded (hf)")
    s.add_argument("--vllm-gpu-memory", type=float, default=0.85, help="vllm: device fraction both engines share")
    s.add_argument("--vllm-cpu-kv-cache-gib", type=float, default=1.0, help="vllm on CPU: KV cache per engine")
    s.add_argument("--cpus-per-actor", type=float, default=1.0)
    s.add_argument("--batch-tokens", type=int, default=8192, help="token budget of one model batch")
    s.add_argument("--max-tokens", type=int, default=8192, help="longer rows are rejected (or --truncate)")
    s.add_argument("--truncate", action="store_true",
                   help="cut a response that does not fit --max-tokens (column truncated=true) instead of "
                        "rejecting the row")
    s.add_argument("--strict", action="store_true", help="exit 1 when any row is rejected (outputs are written)")
    s.add_argument("--rows-per-partition", type=int, default=512)
    s.add_argument("--address", default=None, help="auto (join) | local (embedded) | ray://...")
    s.add_argument("--allow-model-mismatch", action="store_true")

    sel = sub.add_parser("select", help="rank every partition globally and select the top")
    sel.add_argument("--config", help="YAML file whose keys are these options")
    sel.add_argument("--scores", help="output URI of `air-ray score` (or a directory of partitions)")
    sel.add_argument("--output")
    g = sel.add_mutually_exclusive_group()
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-frac", type=float)
    sel.add_argument("--per-domain", action="store_true")
    sel.add_argument("--min-score", type=float)
    sel.add_argument("--by", default="score", choices=["score", "loss_base", "entropy_base", "n_response_tokens",
                                                       "random"],
                     help="the value ranked (descending): the AIR score, or a heuristic baseline from the same run")
    sel.add_argument("--seed", type=int, default=0, help="seed of --by random")

    r = sub.add_parser("rescore", help="score only new or changed input files into a versioned output; "
                                       "refresh the selection (for schedules)")
    r.add_argument("--config", required=True, help="rescore.yaml: inputs, output, model, heads, format, steps, "
                                                    "dtype, select, and any score option")
    r.add_argument("--wait", action="store_true", help="wait for a concurrent run instead of backing off")
    r.add_argument("--lease-ttl-s", type=float, default=None, help="lease lifetime (default 600)")

    rp = sub.add_parser("report", help="a static HTML report (heads, scores, top/bottom rows, selection) "
                                       "-> DIR/index.html")
    rp.add_argument("--scores", help="output URI of `air-ray score` (or a directory of partitions)")
    rp.add_argument("--heads", help="heads.json (heatmap and critical heads)")
    rp.add_argument("--output", help="local directory for index.html and its images")
    rp.add_argument("--selection", help="output of `air-ray select` (default: <scores>/selection or "
                                        "<scores>/../selection when there)")

    d = sub.add_parser("demo", help="the whole pipeline on the bundled GSM8K sample, on a local Ray")
    d.add_argument("--output", default="out/demo")
    d.add_argument("--input", default="data/gsm8k_sample/train_sample.jsonl")
    d.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    d.add_argument("--num-probes", type=int, default=12)
    d.add_argument("--probe-tokens", type=int, default=512)
    return ap


def _apply_yaml(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """`--config FILE.yaml`: its keys (the long options, - or _) become the defaults; flags still win."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return
    import yaml

    try:
        with open(known.config) as f:
            doc = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise AirRayError(f"config {known.config}: {e}") from None
    if not isinstance(doc, dict):
        raise AirRayError(f"config {known.config}: expected a mapping of option: value")
    dests = {a.dest for a in parser._actions}
    values = {}
    for k, v in doc.items():
        key = str(k).replace("-", "_")
        if key not in dests or key in ("help", "config"):
            raise AirRayError(f"config {known.config}: unknown option {k!r}")
        values[key] = [str(x) for x in v] if key == "input" and isinstance(v, list) else v
    if isinstance(values.get("input"), str):
        values["input"] = [values["input"]]
    parser.set_defaults(**values)


def _subparser(ap: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for a in ap._actions:
        if isinstance(a, argparse._SubParsersAction) and name in a.choices:
            return a.choices[name]
    raise KeyError(name)


def _to_config(cls, ns: argparse.Namespace):
    return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    debug = "--debug" in argv
    try:
        cmd = next((a for a in argv if not a.startswith("-")), None)
        if cmd in ("heads", "score", "select"):
            _apply_yaml(_subparser(ap, cmd), argv)
        ns = ap.parse_args(argv)
        return _dispatch(ns)
    except AirRayError as e:
        if debug:
            raise
        print(f"air-ray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(ns: argparse.Namespace) -> int:
    if ns.command == "model":
        from air_ray.models import prepare_model

        ref = prepare_model(ns.name, allow_pickle=ns.allow_pickle)
        print(f"model {ref.name}: fingerprint {ref.fingerprint}")
        print(ref.path)
        return 0
    if ns.command == "heads":
        from air_ray.config import HeadsConfig
        from air_ray.detect import run_heads

        doc = run_heads(_to_config(HeadsConfig, ns).check())
        print(json.dumps({"heads": doc["heads"], "ablation_check": doc["ablation_check"]}))
        return 0
    if ns.command == "score":
        from air_ray.config import ScoreConfig
        from air_ray.pipeline import run_score

        manifest = run_score(_to_config(ScoreConfig, ns))
        rejected = manifest["counts"]["rows_rejected"]
        if ns.strict and rejected:
            print(f"air-ray: {rejected:,} rows rejected (--strict); see {ns.output}/rejected/", file=sys.stderr)
            return 1
        return 0
    if ns.command == "select":
        from air_ray.select import SelectConfig, select

        if not ns.scores or not ns.output:
            raise AirRayError("select needs --scores and --output")
        summary = select(_to_config(SelectConfig, ns))
        print(json.dumps({k: summary[k] for k in ("counts", "threshold_score") if k in summary}))
        return 0
    if ns.command == "rescore":
        from air_ray.rescore import RescoreConfig, main_summary_line, run_rescore

        cfg = RescoreConfig.from_yaml(ns.config, wait=ns.wait or None, lease_ttl_s=ns.lease_ttl_s)
        print(main_summary_line(run_rescore(cfg)), flush=True)
        return 0
    if ns.command == "report":
        from air_ray.report import write_report

        if not ns.scores or not ns.output:
            raise AirRayError("report needs --scores and --output")
        print(write_report(ns.scores, ns.heads, ns.output, selection=ns.selection))
        return 0
    if ns.command == "demo":
        from air_ray.demo import run_demo

        run_demo(ns.output, ns.input, limit=ns.limit, num_probes=ns.num_probes, probe_tokens=ns.probe_tokens)
        return 0
    raise AssertionError(ns.command)
