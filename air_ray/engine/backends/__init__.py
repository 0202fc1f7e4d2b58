"""Where per-token losses come from: one small interface, two implementations, one table.

A backend is opened for one model and one set of critical heads, and gives, per prepared row, the loss of each
response token under the base model and under the reference model (the heads disabled), and the base model's
next-token entropy where it has the full distribution:

    backend = open_backend(spec)              # BackendSpec: model, heads, options, placement
    backend.max_tokens                        # the longest row it accepts (None: no limit of its own)
    backend.token_losses(prepared)            # -> [TokenLosses(base, ref, entropy | None)] in row order
    backend.close()                           # release the model / engines now

``hf`` (``air_ray.engine.backends.hf``): transformers, one copy of the weights, the heads switched in place.
``vllm`` (``air_ray.engine.backends.vllm``): two vLLM engines, the reference an exported checkpoint.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import NamedTuple, Protocol, Sequence

import numpy as np

from air_ray.config.commands import BACKENDS, EngineOptions
from air_ray.data.rows import PreparedRow
from air_ray.models.resolve import ModelRef


class TokenLosses(NamedTuple):
    """One row's response tokens: losses (nats) under the base and the reference model, and the base model's
    next-token entropy (nats; None when the backend has no full distribution). Shapes: [response tokens]."""

    base: np.ndarray
    ref: np.ndarray
    entropy: np.ndarray | None


@dataclass
class BackendSpec:
    """Everything a backend is opened with."""

    ref: ModelRef
    heads: list[tuple[int, int]]  # checked against the model's shape
    options: EngineOptions
    config: object  # the model's transformers config
    device: str  # resolved: cpu | cuda[:N]
    dtype: str  # resolved: float32 | bfloat16 | float16
    pad_id: int = 0
    gpus: float = 0  # GPUs this process holds (vllm: tensor parallel over them)
    shard: bool = False  # hf: spread the model over every visible GPU
    share_prefix: bool = True  # hf: run the layers below the first critical head once for both passes


class Backend(Protocol):
    max_tokens: int | None

    def token_losses(self, prepared: Sequence[PreparedRow]) -> list[TokenLosses]: ...

    def close(self) -> None: ...


# backend name -> "module:class"; the names are the choices of --backend (``air_ray.config.BACKENDS``)
TABLE = {
    "hf": "air_ray.engine.backends.hf:HFBackend",
    "vllm": "air_ray.engine.backends.vllm:VllmBackend",
}
assert tuple(TABLE) == BACKENDS, "every --backend choice has exactly one implementation"


def open_backend(name: str, spec: BackendSpec) -> Backend:
    module, cls = TABLE[name].split(":")
    return getattr(importlib.import_module(module), cls)(spec)
