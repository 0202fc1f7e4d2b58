"""Options are declared once (air_ray.config) and the CLI flags, the YAML loader and the Python API all come from
that declaration and check values the same way."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from air_ray import cli
from air_ray.cli import SUBCOMMANDS
from air_ray.config import EngineOptions, RescoreConfig, ScoreConfig
from air_ray.config.options import flag, kind_of, opt_of
from air_ray.errors import AirRayError

COMMANDS = {name: command.config for name, command in SUBCOMMANDS.items()}  # subcommand -> its config class

REPO = Path(__file__).resolve().parent.parent


def subparser(command: str):
    p = cli.build_parser()
    for word in command.split():
        p = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction").choices[word]
    return p


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_flags_are_exactly_the_declared_options(command):
    cls = COMMANDS[command]
    p = subparser(command)
    dests = {a.dest for a in p._actions} - {"help", "config", "print_config", "verbose"}
    assert dests == {f.name for f in cls.option_fields() if opt_of(f).cli}
    for f in cls.option_fields():
        assert opt_of(f).help, f"{command}: option {f.name} has no help"
        if not opt_of(f).positional and opt_of(f).cli:
            strings = {s for a in p._actions if a.dest == f.name for s in a.option_strings}
            assert flag(f.name) in strings and all(flag(a) in strings for a in opt_of(f).aliases)


def test_same_name_same_meaning_across_commands():
    """An option name used by several commands has the same type and choices everywhere."""
    seen: dict[str, tuple] = {}
    for command, cls in COMMANDS.items():
        hints = cls.types()
        for f in cls.option_fields():
            if command == "demo" and f.name == "input":  # the demo reads one bundled file
                continue
            sig = (kind_of(hints[f.name]), opt_of(f).choices)
            assert seen.setdefault(f.name, sig) == sig, f"{f.name}: {sig} in {command}, {seen[f.name]} elsewhere"
    for name in ("output", "input", "model", "dtype", "seed"):
        assert name in seen


def test_yaml_values_are_checked_like_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    for body, needle in (("dtype: float16x\n", "--dtype 'float16x': expected one of auto, float32"),
                         ("workers: two\n", "--workers: expected an integer"),
                         ("truncate: maybe\n", "--truncate: expected true or false"),
                         ("backend: tpu\n", "--backend 'tpu'"),
                         ("steps: 'regex:('\n", "bad step rule"),
                         ("max_tokens: 1\n", "--max-tokens must be >= 2"),
                         ("executor: in-process\nworkers: 2\n", "--executor in-process runs one scorer"),
                         ("executor: in-process\naddress: auto\n", "it takes no --address"),
                         ("executor: threads\n", "--executor 'threads'")):
        cfg.write_text("input: x.jsonl\n" + body)
        with pytest.raises(AirRayError, match=None) as e:
            cli.parse(["score", "--config", str(cfg)])
        assert needle in str(e.value), (body, str(e.value))
    # the same values as flags fail the same way
    with pytest.raises(AirRayError, match="--dtype 'float16x'"):
        cli.parse(["score", "--input", "x.jsonl", "--dtype", "float16x"])
    # and in Python
    with pytest.raises(AirRayError, match="--dtype 'float16x'"):
        ScoreConfig(input=["x"], dtype="float16x").validate()


def test_yaml_values_are_normalised(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("input: one.jsonl\nstep-temperature: 2\nmax_tokens: null\ncpus_per_worker: 2\n")
    _, c = cli.parse(["score", "--config", str(cfg)])
    assert c.input == ["one.jsonl"] and c.step_temperature == 2.0 and c.max_tokens is None and c.cpus_per_worker == 2.0
    cfg.write_text("selection: s\nscores: x\ninput: c\noutput: o\nlr: 1e-5\n")  # YAML reads 1e-5 as a string
    assert cli.parse(["train", "--config", str(cfg)])[1].lr == 1e-5


def test_flags_win_over_the_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("input: [a.jsonl, b.jsonl]\nworkers: 3\ntruncate: true\n")
    _, c = cli.parse(["score", "--config", str(cfg), "--workers", "5", "--no-truncate", "--max-tokens", "none"])
    assert (c.input, c.workers, c.truncate, c.max_tokens) == (["a.jsonl", "b.jsonl"], 5, False, None)


def test_rescore_takes_the_score_keys_plus_its_own(tmp_path, capsys):
    score_keys = "input: [d/*.jsonl]\noutput: out/air\nmodel: smollm2-135m\nformat: raw\nsteps: paragraphs\n" \
                 "dtype: float32\nworkers: 2\nrows_per_partition: 64\nmax_tokens: 4096\naddress: local\n"
    cfg = tmp_path / "score.yaml"
    cfg.write_text(score_keys)
    score = cli.parse(["score", "--config", str(cfg)])[1]
    cfg.write_text(score_keys + "heads: detect\nselect: {top_k: 5, per_domain: true}\ndetect: {num_probes: 8}\n"
                                "lease_ttl_s: 60\n")
    _, r = cli.parse(["rescore", "--config", str(cfg)])
    assert isinstance(r, RescoreConfig) and r.select == {"top_k": 5, "per_domain": True}
    for f in ScoreConfig.option_fields():
        if f.name != "heads":
            assert getattr(r, f.name) == getattr(score, f.name), f.name
    assert r.selection_config("s", "o").top_k == 5 and r.heads_config("h.json").num_probes == 8
    # the old spelling still works, with a warning
    cfg.write_text(score_keys.replace("input:", "inputs:"))
    assert cli.parse(["rescore", "--config", str(cfg)])[1].input == ["d/*.jsonl"]
    assert "'inputs' is deprecated; use 'input'" in capsys.readouterr().err
    # nested mappings as KEY=VALUE flags; a bad nested key or value is refused before anything runs
    _, r = cli.parse(["rescore", "--input", "a", "--output", "o", "--select", "top_frac=0.2", "by=loss_base"])
    assert r.select == {"top_frac": 0.2, "by": "loss_base"}
    with pytest.raises(AirRayError, match="select: unknown key 'top'"):
        cli.parse(["rescore", "--input", "a", "--output", "o", "--select", "top=3"])
    with pytest.raises(AirRayError, match="--by 'length'"):
        cli.parse(["rescore", "--input", "a", "--output", "o", "--select", "top_k=3", "by=length"])
    with pytest.raises(AirRayError, match="rescore needs --output"):
        cli.parse(["rescore", "--input", "a"])


def test_old_spellings_still_work(tmp_path, capsys):
    _, h = cli.parse(["heads", "--out", "h.json"])
    assert h.output == "h.json" and "--out is deprecated; use --output" in capsys.readouterr().err
    cfg = tmp_path / "h.yaml"
    cfg.write_text("out: x.json\n")
    assert cli.parse(["heads", "--config", str(cfg)])[1].output == "x.json"
    assert "'out' is deprecated" in capsys.readouterr().err


def test_every_command_takes_config(tmp_path):
    for command, cls in COMMANDS.items():
        p = subparser(command)
        assert any("--config" in a.option_strings for a in p._actions), command


def test_engine_options_are_the_scorer_options():
    """ScoreConfig is an EngineOptions: the scoring stage hands its config to the Scorer as is."""
    assert issubclass(ScoreConfig, EngineOptions)
    eng = {f.name for f in EngineOptions.option_fields()}
    assert {"model", "heads", "dtype", "format", "steps", "max_tokens", "backend", "batch_tokens"} <= eng
    assert EngineOptions().max_tokens == ScoreConfig(input=["x"]).max_tokens == 8192


def _cli(*args, timeout=120):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "air_ray", *args], capture_output=True, text=True, timeout=timeout,
                       env=env, cwd=REPO)
    return p, time.time() - t


def test_a_bad_yaml_value_fails_before_ray_starts(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"input: {tmp_path / 'in.jsonl'}\noutput: {tmp_path / 'out'}\ndtype: float16x\n")
    p, took = _cli("score", "--config", str(cfg))
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines == ["air-ray: error: score --dtype 'float16x': expected one of auto, float32, bfloat16, float16"]
    assert "Ray" not in p.stdout + p.stderr and not (tmp_path / "out").exists()
    assert took < 60  # no model load, no cluster


def test_report_takes_config(tmp_path):
    from tests.test_report import synthetic_rows, write_partition

    write_partition(tmp_path / "run" / "scores" / "a.parquet", synthetic_rows(30, 0, str(tmp_path / "gone.jsonl")))
    cfg = tmp_path / "report.yaml"
    cfg.write_text(f"scores: {tmp_path / 'run'}\noutput: {tmp_path / 'rep'}\n")
    p, _ = _cli("report", "--config", str(cfg))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().endswith("index.html") and (tmp_path / "rep" / "index.html").is_file()


def test_unknown_flag_is_one_line():
    p, _ = _cli("select", "--scores", "x", "--output", "y", "--top-k", "1", "--bogus")
    assert p.returncode == 2 and p.stderr.strip() == "air-ray: error: unrecognized arguments: --bogus"


def test_summary_of_options_in_manifest_is_plain_json():
    c = ScoreConfig(input=["x"]).validate()
    assert json.loads(json.dumps(c.__dict__))["input"] == ["x"]


# ----------------------------------------------------------------------------------------------
# issue #27: a command line that fits its ecosystem

# every flag renamed, with its old spelling (still accepted, with a deprecation line): command, old, new, a value
RENAMED = [
    ("heads", "top-frac", "head-frac", "0.1"),
    ("heads", "gpus", "gpus-per-worker", "1"),
    ("heads", "cpus", "cpus-per-worker", "2"),
    ("score", "actors", "workers", "3"),
    ("score", "gpus-per-actor", "gpus-per-worker", "1"),
    ("score", "cpus-per-actor", "cpus-per-worker", "2"),
    ("rescore", "actors", "workers", "3"),
    ("rescore", "gpus-per-actor", "gpus-per-worker", "1"),
    ("rescore", "cpus-per-actor", "cpus-per-worker", "2"),
]
REQUIRED = {"score": ["--input", "x.jsonl"], "rescore": ["--input", "x.jsonl", "--output", "o"], "heads": []}


def test_version():
    p, _ = _cli("--version", timeout=60)
    import air_ray
    from air_ray.config.commands import SCORING_VERSION

    assert p.returncode == 0 and p.stdout.strip() == f"air-ray {air_ray.__version__} (scoring version {SCORING_VERSION})"


@pytest.mark.parametrize("command,old,new,value", RENAMED, ids=lambda x: str(x))
def test_renamed_flags_keep_their_old_spelling(command, old, new, value, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # --help lines unwrapped
    field = new.replace("-", "_")
    _, cfg = cli.parse([command, *REQUIRED[command], f"--{new}", value])
    assert str(getattr(cfg, field)) in (value, f"{float(value)}")
    assert capsys.readouterr().err == ""
    _, legacy = cli.parse([command, *REQUIRED[command], f"--{old}", value])
    assert getattr(legacy, field) == getattr(cfg, field)
    assert f"--{old} is deprecated; use --{new}" in capsys.readouterr().err
    yml = tmp_path / "c.yaml"
    yml.write_text(f"{old.replace('-', '_')}: {value}\n")
    assert getattr(cli.parse([command, *REQUIRED[command], "--config", str(yml)])[1], field) == getattr(cfg, field)
    assert f"'{old.replace('-', '_')}' is deprecated; use '{field}'" in capsys.readouterr().err
    # the help lists the new spelling and names the old one as deprecated
    text = subparser(command).format_help()
    assert f"--{new}" in text and f"deprecated spelling: --{old})" in text


def test_rescore_detect_keys_keep_their_old_spelling(capsys):
    _, r = cli.parse(["rescore", "--input", "a", "--output", "o", "--detect", "top_frac=0.25", "gpus=0", "cpus=1"])
    h = r.heads_config("h.json")
    assert (h.head_frac, h.gpus_per_worker, h.cpus_per_worker) == (0.25, 0, 1)
    assert "'top_frac' is deprecated; use 'head_frac'" in capsys.readouterr().err


def test_one_spelling_for_gpus_and_cpus():
    """Every command that places work says --workers / --gpus-per-worker / --cpus-per-worker (old spellings are
    aliases only)."""
    seen = set()
    for command, cls in COMMANDS.items():
        for f in cls.option_fields():
            if re.search(r"gpu|cpu|actor|worker", f.name) and not f.name.startswith("vllm_"):
                seen.add(f.name)
    assert seen == {"workers", "gpus_per_worker", "cpus_per_worker"}, seen


def test_help_is_grouped():
    """`--help` has one section per group, in the order of GROUPS, and every option is in one of them."""
    from air_ray.config.options import GROUPS, group_of

    for command, cls in COMMANDS.items():
        for f in cls.option_fields():
            assert group_of(cls, f) in GROUPS, (command, f.name)
    text = subparser("score").format_help()
    titles = re.findall(r"^(\w+) options:$", text, flags=re.M)
    assert titles == ["input", "model", "scoring", "placement", "output"], titles
    section = lambda name: text.split(f"\n{name} options:\n", 1)[1].split("\n\n", 1)[0]  # noqa: E731
    assert "--input" in section("input") and "--prompt-field" in section("input")
    assert "--dtype" in section("model") and "--heads" in section("scoring") and "--steps" in section("scoring")
    assert "--workers" in section("placement") and "--address" in section("placement")
    assert "--output" in section("output") and "--no-progress" in section("output")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_print_config_prints_what_config_reads_back(command, tmp_path, capsys):
    """`--print-config`: defaults < --config file < flags, as YAML that --config reads back to the same options."""
    args = {"model fetch": [], "heads": ["--num-probes", "3"], "score": ["--input", "a.jsonl", "--steps", "think"],
            "select": ["--scores", "s", "--output", "o", "--top-k", "5"],
            "rescore": ["--input", "a", "--output", "o", "--select", "top_k=3"],
            "report": ["--scores", "s", "--output", "o"], "export": ["--scores", "s", "--input", "c", "--output", "o"],
            "train": ["--input", "e", "--output", "o"], "compare": ["--scores", "s", "--input", "p", "--eval-input", "h"],
            "demo": ["--limit", "4"]}[command]
    given = tmp_path / "given.yaml"
    given.write_text("seed: 7\n" if "seed" in {f.name for f in COMMANDS[command].option_fields()} else "{}\n")
    assert cli.main([*command.split(), "--config", str(given), *args, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"# air-ray {command}: the effective options")
    doc = yaml.safe_load(printed)
    _, want = cli.parse([*command.split(), "--config", str(given), *args])
    # keys are the long option names: a field named after a Python keyword (from_) is written as the option (from)
    assert doc == {f.name.rstrip("_"): getattr(want, f.name) for f in COMMANDS[command].option_fields()}
    back = tmp_path / "back.yaml"
    back.write_text(printed)
    assert cli.parse([*command.split(), "--config", str(back)])[1] == want


def test_print_config_runs_nothing(tmp_path):
    p, took = _cli("score", "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "out"),
                   "--print-config")
    assert p.returncode == 0 and "input:" in p.stdout and not (tmp_path / "out").exists(), p.stderr
    assert "Ray" not in p.stdout + p.stderr and took < 60
