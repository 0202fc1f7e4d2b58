"""One typed configuration object per command, built from flags or a YAML file and passed down as is."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from air_ray.errors import AirRayError
from air_ray.models import DEFAULT_MODEL


BACKENDS = ("hf", "vllm")  # air_ray/scorer.py (hf), air_ray/vllm_backend.py (vllm)


@dataclass
class ModelOptions:
    model: str = DEFAULT_MODEL
    dtype: str = "auto"  # auto = bfloat16 on CUDA and on CPUs with native bf16, else float32
    device: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False


@dataclass
class HeadsConfig(ModelOptions):
    out: str = "heads.json"
    probes: str | None = None
    num_probes: int = 64
    probe_tokens: int = 512
    seed: int = 0
    top_frac: float = 0.05
    dtype: str = "float32"

    def check(self) -> "HeadsConfig":
        if not 0 < self.top_frac <= 1:
            raise AirRayError("--top-frac must be in (0, 1]")
        if self.num_probes < 1 or self.probe_tokens < 32:
            raise AirRayError("--num-probes must be >= 1 and --probe-tokens >= 32")
        return self


@dataclass
class ScoreConfig(ModelOptions):
    heads: str = "heads.json"
    input: list[str] = field(default_factory=list)
    output: str = "out/scores"
    format: str = "chat"
    steps: str = "lines"
    step_temperature: float = 1.0
    backend: str = "hf"  # one of BACKENDS
    vllm_gpu_memory: float = 0.85  # vllm on GPU: the fraction of the device both engines share
    vllm_cpu_kv_cache_gib: float = 1.0  # vllm on CPU: KV cache of each engine
    actors: int = 1
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    batch_tokens: int = 8192
    max_tokens: int | None = 8192
    truncate: bool = False  # cut over-long responses to max_tokens (flagged) instead of rejecting them
    strict: bool = False  # exit non-zero when any row is rejected
    rows_per_partition: int = 512
    address: str | None = None  # auto | local | ray://... ; None: join a running cluster, else start one
    allow_model_mismatch: bool = False

    def check(self) -> "ScoreConfig":
        from air_ray.rows import FORMATS
        from air_ray.steps import check_rule

        if not self.input:
            raise AirRayError("no --input given")
        if self.format not in FORMATS:
            raise AirRayError(f"unknown --format {self.format!r}: expected chat or raw")
        check_rule(self.steps)
        if self.backend not in BACKENDS:
            raise AirRayError(f"unknown --backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")
        if not 0 < self.vllm_gpu_memory <= 1 or self.vllm_cpu_kv_cache_gib <= 0:
            raise AirRayError("--vllm-gpu-memory must be in (0, 1] and --vllm-cpu-kv-cache-gib > 0")
        if self.actors < 1 or self.batch_tokens < 1 or self.rows_per_partition < 1:
            raise AirRayError("--actors, --batch-tokens and --rows-per-partition must be >= 1")
        if self.step_temperature <= 0:
            raise AirRayError("--step-temperature must be > 0")
        return self

    def scoring_key(self, model_fingerprint: str, heads) -> str:
        """A short hash of everything that changes a partition's contents for the same input: the model,
        the heads, the row and step rules, the numerics and the scoring code's version. Placement options
        (actors, batch size, addresses) are not part of it."""
        import hashlib
        import json

        import air_ray

        doc = {
            "model_fingerprint": model_fingerprint,
            "heads": sorted([int(l), int(h)] for l, h in heads),
            "format": self.format, "steps": self.steps, "step_temperature": self.step_temperature,
            "dtype": self.dtype, "max_tokens": self.max_tokens, "truncate": self.truncate,
            "backend": self.backend, "air_ray": air_ray.__version__,
        }
        return hashlib.sha1(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]


def config_keys(cls) -> set[str]:
    return {f.name for f in fields(cls)}
