"""Models: resolve a spec (alias, directory, GGUF, hub id) to a local checkpoint with a fingerprint
(``resolve``), load it (``load``: device, dtype, the causal LM, tokenizer, config, attention shape, context
length, the weights' directory per dtype), and open it from a command's options in one way (``open``:
``open_model``); ``families``: the decoder families supported and what differs between them.

May import: ``air_ray.errors``; torch and transformers lazily. Never Ray, the CLI or other parts.
"""

from air_ray.models.families import FAMILIES, Family, export_refusal, family_of
from air_ray.models.load import (
    attention_implementation, context_length, cpu_has_fast_bf16, load_config, load_model, load_tokenizer, model_shape,
    resolve_device, resolve_dtype, token_limit, torch_dtype, weights_dir,
)
from air_ray.models.open import OpenModel, open_model
from air_ray.models.resolve import DEFAULT_MODEL, ModelRef, air_ray_home, cached_checkpoint, fingerprint, prepare_model

__all__ = [
    "DEFAULT_MODEL", "FAMILIES", "Family", "ModelRef", "OpenModel", "air_ray_home", "attention_implementation",
    "cached_checkpoint", "context_length", "cpu_has_fast_bf16", "export_refusal", "family_of", "fingerprint",
    "load_config", "load_model", "load_tokenizer", "model_shape", "open_model", "prepare_model", "resolve_device",
    "resolve_dtype", "token_limit", "torch_dtype", "weights_dir",
]
