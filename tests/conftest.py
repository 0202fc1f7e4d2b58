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
GSM8K_SAMPLE = REPO / "data" / "gsm8k_sample" / "train_sample.jsonl"


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


class RayStartCluster:
    """A `ray start` cluster on this machine, as an operator runs one: a head (with the dashboard, for `ray job
    submit`) and worker nodes, token authentication on, in a temporary directory of its own. ``stop()`` ends only
    this cluster's processes (``ray stop`` would end every Ray on the machine)."""

    def __init__(self):
        import os
        import sys
        import tempfile

        bin_dir = Path(sys.executable).parent
        self.ray = str(bin_dir / "ray")
        # short: Ray's socket paths live under it (a Unix socket path holds at most 107 bytes)
        self.temp_dir = tempfile.mkdtemp(prefix="arc", dir="/tmp")
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0",
                        PATH=f"{bin_dir}:{os.environ.get('PATH', '')}")
        self.env.pop("RAY_ADDRESS", None)
        self.gcs = self.dashboard = None

    def _ray(self, *args, timeout=180, check=True):
        import subprocess

        p = subprocess.run([self.ray, *map(str, args)], env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"ray {' '.join(map(str, args))}: {p.stdout[-2000:]}{p.stderr[-2000:]}")
        return p

    def start_head(self, num_cpus: int, **resources):
        self.gcs, self.dashboard = free_port(), free_port()
        self._ray("get-auth-token", "--generate", check=False)  # ~/.ray/auth_token, if there is none yet
        self._ray("start", "--head", f"--port={self.gcs}", f"--dashboard-port={self.dashboard}",
                  "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--num-cpus={num_cpus}",
                  f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
                  *([f"--resources={json.dumps(resources)}"] if resources else []))
        return self

    def add_node(self, num_cpus: int, **resources):
        self._ray("start", f"--address=127.0.0.1:{self.gcs}", f"--num-cpus={num_cpus}", "--disable-usage-stats",
                  *([f"--resources={json.dumps(resources)}"] if resources else []))
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    def job_submit(self, *entrypoint, submission_id: str | None = None, timeout=900):
        """`ray job submit` and wait: the finished process (its output is the job's). The head's job agent comes up
        a little after `ray start` returns: until then the submission is refused, and tried again."""
        import time

        submission_id = submission_id or f"air-ray-test-{time.time_ns()}"
        deadline = time.time() + 120
        while True:
            p = self._ray("job", "submit", f"--address={self.dashboard_url}", "--submission-id", submission_id, "--",
                          *entrypoint, timeout=timeout, check=False)
            if "No available agent to submit job" not in p.stderr + p.stdout or time.time() > deadline:
                return p
            time.sleep(2)

    def state(self, job: str) -> dict:
        """The job's driver (``pid``) and the cluster's nodes (``{node_id: {"head", "cpus"}}``), from Ray's job and
        state APIs (in a process with this cluster's token authentication)."""
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

    def pids(self) -> list[int]:
        """This cluster's processes: every Ray process started for it names its temporary directory; workers
        die with their raylet."""
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if self.temp_dir in (d / "cmdline").read_bytes().decode(errors="replace"):
                        out.append(int(d.name))
                except OSError:
                    continue
        return out

    def stop(self) -> None:
        import os
        import signal

        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def ray_start_cluster():
    """A `ray start` cluster of this test's own (``RayStartCluster``); stopped after the test."""
    cluster = RayStartCluster()
    try:
        yield cluster
    finally:
        cluster.stop()
