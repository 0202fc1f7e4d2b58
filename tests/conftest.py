"""Shared fixtures: the real default model (loaded once per session, float32, CPU) and an independent
reference attention that disables heads explicitly (uniform 1/N attention rows over the keys each query sees),
used to check the ablation and the scorer against a plain implementation."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    """Tests marked ``vllm`` need the vLLM backend installed (`make vllm`; `make test` does it and sets
    AIR_RAY_REQUIRE_VLLM=1, so there a missing vLLM fails instead of skipping)."""
    import importlib.util
    import os

    if importlib.util.find_spec("vllm") is not None or os.environ.get("AIR_RAY_REQUIRE_VLLM") == "1":
        return
    skip = pytest.mark.skip(reason="vLLM is not installed (make vllm)")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)
GSM8K_SAMPLE = REPO / "air_ray" / "data" / "gsm8k_sample.jsonl"  # installed with the package


@pytest.fixture(scope="session")
def smol_ref():
    from air_ray.models import prepare_model

    return prepare_model("smollm2-135m")


@pytest.fixture(scope="session")
def smol_tok(smol_ref):
    from air_ray.models import load_tokenizer

    return load_tokenizer(smol_ref)


@pytest.fixture(scope="session")
def smol_fp32(smol_ref):
    """The default model, float32 on CPU, SDPA attention (as air_ray loads it). Tests that change it in place
    (HeadAblation, attention implementation) must restore it."""
    from air_ray.models import load_model

    return load_model(smol_ref, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def gsm8k_rows():
    with open(GSM8K_SAMPLE, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------
# the independent reference: explicit eager attention with disabled heads' rows written as 1/i

_names = itertools.count()


def make_uniform_attention(heads):
    """An eager attention function in which every (layer, head) in ``heads`` attends uniformly (exactly
    1/N, N = number of keys the mask lets the query see: causal prefix, sliding window, padding; sinks ignored);
    every other head is the plain written-out attention: softmax(QK^T * scaling, soft-capped when the model
    passes ``softcap``, masked, with the sink logit ``s_aux`` in the denominator when the model passes one) V.
    Shapes: query [b, H, q, d]; key [b, KV, k, d]; value [b, KV, k, d_v]."""
    import torch

    heads = frozenset((int(l), int(h)) for l, h in heads)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, s_aux=None,
                  **kwargs):
        b, H, q_len, d = query.shape
        rep = H // key.shape[1]
        k = key.repeat_interleave(rep, dim=1)  # query head h reads kv head h // rep
        v = value.repeat_interleave(rep, dim=1)
        if scaling is None:
            scaling = d ** -0.5
        scores = torch.matmul(query.float(), k.float().transpose(2, 3)) * scaling  # [b, H, q, k]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        k_len = scores.shape[-1]
        if attention_mask is None:
            visible = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
            visible = visible[None, None].expand(b, 1, q_len, k_len)
        elif attention_mask.dtype == torch.bool:
            visible = attention_mask[:, :, :, :k_len]
        else:  # eager float mask: 0 where visible, a very negative number elsewhere
            visible = attention_mask[:, :, :, :k_len] == 0
        scores = scores.masked_fill(~visible, float("-inf"))
        if s_aux is None:
            probs = scores.softmax(-1)
        else:  # a sink per head: one more logit in the softmax, dropped after it
            sink = s_aux.float().reshape(1, H, 1, 1).expand(b, H, q_len, 1)
            probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
        probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows (none with right padding)
        uniform = visible[:, 0].float() / visible[:, 0].sum(-1, keepdim=True).clamp(min=1).float()  # [b, q, k]
        for h in range(H):
            if (module.layer_idx, h) in heads:
                probs[:, h] = uniform
        out = torch.matmul(probs.to(v.dtype), v)  # [b, H, q, d_v]
        return out.transpose(1, 2).contiguous(), probs

    return attention


def register_uniform_attention(heads) -> str:
    """Register the reference attention for ``heads`` under a fresh name; pass it as attn_implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    name = f"test_uniform_ablation_{next(_names)}"
    AttentionInterface.register(name, make_uniform_attention(heads))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, eager_mask)
    return name


@pytest.fixture(scope="session")
def uniform_attention():
    """``uniform_attention(heads) -> attn_implementation name`` (see ``make_uniform_attention``)."""
    return register_uniform_attention


@pytest.fixture(scope="session")
def heads_file(tmp_path_factory, smol_ref):
    """A real heads.json for the default model from a small detection run (4 probes)."""
    from air_ray.config import HeadsConfig
    from air_ray.heads.run import run_heads

    out = tmp_path_factory.mktemp("heads") / "heads.json"
    run_heads(HeadsConfig(output=str(out), num_probes=4, probe_tokens=512, device="cpu"))
    return out


@pytest.fixture(scope="session")
def short_rows(gsm8k_rows):
    """The 9 shortest GSM8K sample rows (pipeline tests: cheap but real)."""
    return sorted(gsm8k_rows, key=lambda r: len(r["prompt"]) + len(r["response"]))[:9]


def tiny_checkpoint(d: Path, smol_ref, smol_tok, nan_words=(), heads=((1, 0), (1, 3)), config=None):
    """A real (tiny, randomly initialised) Llama checkpoint (or one of ``config``, a transformers config whose
    vocabulary is set to the tokenizer's) with the default model's tokenizer and chat template, and a heads.json
    for it -> (model dir, heads.json). The embeddings of ``nan_words``' tokens are NaN, so a row holding one of
    them has non-finite losses (the LM head is untied: a NaN row there would poison every row)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from air_ray.models import model_shape, prepare_model

    cfg = config or LlamaConfig(vocab_size=len(smol_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                tie_word_embeddings=False)
    cfg.vocab_size = len(smol_tok)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg) if config is None else AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for w in nan_words:
            for t in smol_tok(w, add_special_tokens=False)["input_ids"]:
                model.get_input_embeddings().weight[t] = float("nan")
    model.save_pretrained(d, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (Path(smol_ref.path) / name).exists():
            shutil.copy(Path(smol_ref.path) / name, d / name)
    ref = prepare_model(str(d))
    L, H, KV, _ = model_shape(cfg)
    path = d / "heads.json"
    path.write_text(json.dumps({"format_version": 1, "model": str(d), "model_fingerprint": ref.fingerprint,
                                "num_layers": L, "num_heads": H, "num_kv_heads": KV, "top_frac": 0.25,
                                "heads": [list(h) for h in heads]}))
    return d, path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smol_ref, smol_tok):
    """(model dir, heads.json) of a tiny real checkpoint: for pipeline tests where the model's size does not
    matter, only that it is a real model read by the real loader."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny_model"), smol_ref, smol_tok)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def moto_s3():
    """A real S3 endpoint: moto's server on loopback -> the environment that points clients at it."""
    import socket
    import subprocess
    import sys
    import time

    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    try:
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)



# ----------------------------------------------------------------------------------------------
# a `ray start` cluster of a test's own


TAG = "AIR_RAY_TEST_NODE"  # in the environment of a node's `ray start`, and so of its raylet, agents and workers


def tagged_pids(value: str, prefix: bool = False) -> list[int]:
    """PIDs whose environment holds ``AIR_RAY_TEST_NODE=<value>`` (``prefix``: a value starting so), and their
    descendants: one node's or one cluster's processes, whatever their titles (Ray's agents retitle themselves
    over their environment)."""
    import os

    want, tagged, children = f"{TAG}={value}".encode(), [], {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                env = (d / "environ").read_bytes().split(b"\0")
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
            if any(e.startswith(want) if prefix else e == want for e in env):
                tagged.append(int(d.name))
    out: set[int] = set()
    while tagged:
        pid = tagged.pop()
        if pid not in out:
            out.add(pid)
            tagged.extend(children.get(pid, []))
    return sorted(out)


def process_title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
    except OSError:
        return ""


class RayStartCluster:
    """A head and worker nodes on this machine, as an operator runs them: each a `ray start --block` of its own (own
    process group), token auth with a token of its own, its own temp dir (so the `ray_current_cluster` file that
    `ray start` writes is not the machine's) and ports of its own. Node ``name``'s `ray start` carries
    ``AIR_RAY_TEST_NODE=<cluster id>/<name>`` (``tagged_pids`` finds it and every process it started), so ``kill``
    and ``stop`` end this cluster's processes only (`ray stop` would end every Ray on the machine)."""

    def __init__(self, root: Path):
        import os
        import secrets
        import sys

        self.id = secrets.token_hex(6)
        self.root = root
        self.ray = str(Path(sys.executable).parent / "ray")
        self.nodes: dict = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(RAY_TMPDIR=str(root), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                        RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
                        PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
                        # the GCS declares a node whose raylet is gone dead within ~5 s (default ~15 s); a raylet
                        # that is only slow (2 loaded cores) still has 5 s to answer each check
                        RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="5000",
                        RAY_health_check_failure_threshold="5")
        self.address = f"127.0.0.1:{free_port()}"
        self.dashboard = None

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    def _start(self, name: str, cpus: int, head: bool, dashboard: bool) -> None:
        import subprocess

        ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
        args = [self.ray, "start", "--block", f"--num-cpus={cpus}", "--num-gpus=0", "--disable-usage-stats",
                "--node-ip-address=127.0.0.1", *(f"{p}={free_port()}" for p in ports)]
        if head:
            self.dashboard = free_port()
            args += [f"--port={self.address.rsplit(':', 1)[1]}", "--head", f"--include-dashboard={str(dashboard).lower()}",
                     "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_port()}",
                     f"--dashboard-port={self.dashboard}"]
        else:
            args += [f"--address={self.address}"]
        env = dict(self.env, **{TAG: f"{self.id}/{name}"})
        log = open(self.root / f"{name}.log", "w")
        self.nodes[name] = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, cwd=self.root)

    def add(self, name: str, cpus: int, head: bool = False, dashboard: bool = False, tries: int = 3,
            timeout: float = 120) -> "RayStartCluster":
        """Start node ``name`` (``dashboard``: the head's, for `ray job submit` and the state API) and wait until
        `ray start` says it runs (its raylet has registered with the GCS). On a loaded machine a raylet can miss
        Ray's 30 s to register; then the node is started again."""
        import os
        import time

        for attempt in range(tries):
            self._start(name, cpus, head, dashboard)
            t = time.time()
            while "Ray runtime started" not in (self.root / f"{name}.log").read_text():
                if self.nodes[name].poll() is not None or time.time() - t > timeout:
                    break
                time.sleep(0.2)
            else:
                return self
            self.kill(name)
            os.rename(self.root / f"{name}.log", self.root / f"{name}.failed-{attempt}.log")
        pytest.fail(f"node {name} did not start: {self.logs()}")

    def pids(self, name: str) -> list[int]:
        return tagged_pids(f"{self.id}/{name}")

    def kill(self, name: str) -> list[str]:
        """SIGKILL every process of node ``name`` (raylet, agents, workers) until none is left; their titles."""
        import os
        import signal
        import time

        victims: dict[int, str] = {}
        t = time.time()
        while pids := [p for p in self.pids(name) if p not in victims]:
            assert time.time() - t < 30, f"node {name} does not die"
            victims.update((p, process_title(p)) for p in pids)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        self.nodes[name].wait(timeout=30)
        return list(victims.values())

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.root.glob("*.log")))

    def job_submit(self, *entrypoint, submission_id: str | None = None, timeout=900):
        """`ray job submit` and wait: the finished process (its output is the job's). The head's job agent comes up
        a little after `ray start` says it runs: until then the submission is refused, and tried again."""
        import subprocess
        import time

        submission_id = submission_id or f"air-ray-test-{time.time_ns()}"
        deadline = time.time() + 120
        while True:
            p = subprocess.run([self.ray, "job", "submit", f"--address={self.dashboard_url}", "--submission-id",
                                submission_id, "--", *map(str, entrypoint)], env=self.env, capture_output=True,
                               text=True, timeout=timeout)
            if "No available agent to submit job" not in p.stderr + p.stdout or time.time() > deadline:
                return p
            time.sleep(2)

    def state(self, job: str) -> dict:
        """The job's driver (``driver_pid``) and the cluster's nodes (``{node_id: {"head", "cpus"}}``), from Ray's
        job and state APIs (in a process with this cluster's token)."""
        import subprocess
        import sys

        code = (
            "import json, sys\n"
            "from ray.job_submission import JobSubmissionClient\n"
            "from ray.util.state import list_nodes\n"
            "url, job = sys.argv[1:]\n"
            "d = JobSubmissionClient(url).get_job_info(job).driver_info\n"
            "nodes = {n.node_id: {'head': n.is_head_node, 'cpus': n.resources_total.get('CPU', 0)}\n"
            "         for n in list_nodes(address=url)}\n"
            "print(json.dumps({'driver_pid': int(d.pid), 'nodes': nodes}))\n"
        )
        p = subprocess.run([sys.executable, "-c", code, self.dashboard_url, job], env=self.env, capture_output=True,
                           text=True, timeout=120, check=True)
        return json.loads(p.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        """Every process of this cluster, and only those."""
        import os
        import signal
        import subprocess
        import time

        for _ in range(5):
            pids = tagged_pids(f"{self.id}/", prefix=True)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not pids:
                break
            time.sleep(0.5)
        for p in self.nodes.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def ray_start_cluster():
    """A `ray start` cluster of this test's own (``RayStartCluster``), stopped after the test (even on failure).
    Not under tmp_path: Ray's socket paths (<temp dir>/ray/session_<date>_<pid>/sockets/...) must fit 107 bytes."""
    import tempfile

    cluster = RayStartCluster(Path(tempfile.mkdtemp(prefix="arc-", dir="/tmp")))
    try:
        yield cluster
    finally:
        cluster.stop()
