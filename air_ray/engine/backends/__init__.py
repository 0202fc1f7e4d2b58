"""Where per-token losses come from: one small interface, two implementations, one table.

A backend is opened for one model and one set of critical heads, and gives, per prepared row, the loss of each
response token under the base model and under the reference model (the heads disabled), and the base model's
next-token entropy where it has the full distribution:

    backend = open_backend(name, spec, **own) # BackendSpec: model, heads, options, device, dtype, GPUs, threads;
                                              # own: the fields of the backend's own Spec
    backend.max_tokens                        # the longest row it accepts (None: no limit of its own)
    backend.token_losses(prepared, on_batch)  # -> [TokenLosses(base, ref, entropy | None, pooled)] in row order;
                                              #    on_batch(rows, tokens) after each model batch it runs
    backend.close()                           # release the model / engines now

``hf`` (``air_ray.engine.backends.hf``): transformers, one copy of the weights, the heads switched in place; its
own spec adds ``shard`` and ``share_prefix``. ``vllm`` (``air_ray.engine.backends.vllm``): two vLLM engines, the
reference an exported checkpoint, tensor parallel over the GPUs. Both run on ``threads`` CPU threads (torch's, or
vLLM's OpenMP threads on CPU); the batch budget (``--batch-tokens``) is the hf backend's, vLLM schedules its own
batches within its KV cache and says so when the budget is given.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol, Sequence

import numpy as np

from air_ray.config.commands import BACKENDS, EngineOptions
from air_ray.data.rows import PreparedRow
from air_ray.models.resolve import ModelRef


OnBatch = Callable[[int, int], None]  # (rows, tokens) of a model batch done: progress inside a partition


class TokenLosses(NamedTuple):
    """One row's response tokens: losses (nats) under the base and the reference model, and the base model's
    next-token entropy (nats; None when the backend has no full distribution). Shapes: [response tokens].
    ``pooled``: the base model's last hidden state averaged over the response tokens, [d_model] (only when the
    backend was opened with ``options.embed``)."""

    base: np.ndarray
    ref: np.ndarray
    entropy: np.ndarray | None
    pooled: np.ndarray | None = None


@dataclass
class BackendSpec:
    """What every backend is opened with (a backend's ``Spec`` may add its own fields)."""

    ref: ModelRef
    heads: list[tuple[int, int]]  # checked against the model's shape
    options: EngineOptions
    config: object  # the model's transformers config
    device: str  # resolved: cpu | cuda[:N]
    dtype: str  # resolved: float32 | bfloat16 | float16
    pad_id: int = 0
    gpus: float = 0  # GPUs this process holds
    threads: int | None = None  # CPU threads to run on (None: as the process has them)


class Backend(Protocol):
    max_tokens: int | None

    def token_losses(self, prepared: Sequence[PreparedRow], on_batch: OnBatch | None = None) -> list[TokenLosses]: ...

    def close(self) -> None: ...


# backend name -> "module:class"; the names are the choices of --backend (``air_ray.config.BACKENDS``)
TABLE = {
    "hf": "air_ray.engine.backends.hf:HFBackend",
    "vllm": "air_ray.engine.backends.vllm:VllmBackend",
}
assert tuple(TABLE) == BACKENDS, "every --backend choice has exactly one implementation"


def open_backend(name: str, spec: BackendSpec, **own) -> Backend:
    """Backend ``name`` opened with ``spec`` and the fields of its own ``Spec`` among ``own`` (placement hints of
    another backend are not its business: hf's ``shard`` means nothing to vLLM, which runs tensor parallel)."""
    module, cls_name = TABLE[name].split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    fields = {f.name for f in dataclasses.fields(cls.Spec)}
    return cls(cls.Spec(**vars(spec), **{k: v for k, v in own.items() if k in fields}))
