"""Loading a prepared model: device and dtype resolution, the causal LM, its tokenizer and config, and its
attention shape. Every import of torch and transformers here is lazy."""

from __future__ import annotations

import threading
from pathlib import Path

from air_ray.errors import AirRayError
from air_ray.progress import quiet_libraries
from air_ray.models.resolve import ModelRef, air_ray_home, cached_checkpoint, is_complete


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AirRayError(f"device {device!r} requested but CUDA is not available")
    if device != "cpu" and not device.startswith("cuda"):
        raise AirRayError(f"unknown device {device!r}: expected auto, cpu or cuda[:N]")
    return device


def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX) and torch runs its AVX-512 kernels here;
    without both, bf16 is emulated and several times slower than float32. (A process restricted to AVX2 kernels,
    ``ATEN_CPU_CAPABILITY=avx2``, runs as a CPU without native bf16 would.)"""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    if not any(f in flags.split() for f in ("avx512_bf16", "amx_bf16")):
        return False
    try:
        import torch
    except ImportError:
        return True
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def resolve_dtype(dtype: str, device: str, cpu_bf16: bool | None = None) -> str:
    """``auto`` -> bfloat16 on CUDA and on CPUs with native bf16 (``cpu_bf16``; default: this machine's CPU), else
    float32."""
    if dtype != "auto":
        torch_dtype(dtype)  # validates
        return dtype
    if device.startswith("cuda"):
        return "bfloat16"
    return "bfloat16" if (cpu_has_fast_bf16() if cpu_bf16 is None else cpu_bf16) else "float32"


def torch_dtype(dtype: str):
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise AirRayError(f"unknown dtype {dtype!r}: expected float32, bfloat16 or float16") from None


_TOKENIZERS = threading.local()  # .loaded: {(path, fingerprint, trust_remote_code, files): tokenizer}, per thread
_TOKENIZERS_KEPT = 2  # per thread: a run uses one model; a process that goes through many keeps the last two
_TOKENIZER_FILES = ("tokenizer", "special_tokens", "added_tokens", "vocab", "merges", "chat_template", "spiece")


def load_tokenizer(ref: ModelRef, *, trust_remote_code: bool = False):
    """The model's fast tokenizer, loaded once per thread and state of its files (~0.5 s for SmolLM2's; a run in
    one process asks for it in two stages). Per thread because a fast tokenizer keeps its truncation settings as
    state between calls; air_ray never changes a tokenizer it was handed."""
    from transformers import AutoTokenizer

    loaded = _TOKENIZERS.__dict__.setdefault("loaded", {})
    files = sorted((p.name, st.st_mtime_ns, st.st_size) for p in Path(ref.path).iterdir()
                   if p.name.startswith(_TOKENIZER_FILES) and p.is_file() for st in [p.stat()])
    key = (str(ref.path), ref.fingerprint, trust_remote_code, tuple(files))
    if key not in loaded:
        tok = AutoTokenizer.from_pretrained(ref.path, trust_remote_code=trust_remote_code)
        if not getattr(tok, "is_fast", False):
            raise AirRayError(f"model {ref.name!r}: air_ray needs a fast tokenizer (character offsets)")
        while len(loaded) >= _TOKENIZERS_KEPT:  # the oldest goes (dicts keep insertion order)
            del loaded[next(iter(loaded))]
        loaded[key] = tok
    return loaded[key]


def load_model(
    ref: ModelRef,
    *,
    dtype: str = "auto",
    device: str = "auto",
    attn_implementation: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    shard: bool = False,
    config=None,
):
    """Load the causal LM once, in eval mode. ``shard=True`` spreads it over every visible GPU.
    ``attn_implementation`` None: ``attention_implementation`` of its config (``config``: already loaded)."""
    import torch
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    dtype = resolve_dtype(dtype, dev)
    if attn_implementation is None:
        attn_implementation = attention_implementation(config or load_config(ref, trust_remote_code=trust_remote_code))
    kw = dict(
        dtype=torch_dtype(dtype),
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True,
    )
    if shard and dev.startswith("cuda") and torch.cuda.device_count() > 1:
        kw["device_map"] = "auto"
    quiet_libraries()  # no "Loading weights" bar per load (in every worker) unless --verbose
    model = AutoModelForCausalLM.from_pretrained(weights_dir(ref, dtype), **kw)
    if "device_map" not in kw:
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    return model


def attention_implementation(config) -> str | None:
    """How the model computes attention: ``eager`` where PyTorch's SDPA would silently drop part of the model's
    own attention (Gemma 2's soft-capped attention logits), else None: transformers' default, SDPA where the
    model supports it and eager where it does not (gpt-oss: attention sinks)."""
    return "eager" if getattr(config, "attn_logit_softcapping", None) else None


def context_length(config) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings``), None when it does not say."""
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if n else None


def token_limit(max_tokens: int | None, config) -> int | None:
    """The longest row either backend accepts: the smaller of ``--max-tokens`` and the model's context (None:
    neither limits it). A longer row is rejected as ``too_long`` (or cut with ``--truncate``)."""
    limits = [n for n in (max_tokens, context_length(config)) if n]
    return min(limits) if limits else None


def model_shape(model_or_config) -> tuple[int, int, int, int]:
    """(num_layers, num_heads, num_kv_heads, head_dim) of a decoder-only model (or of its config)."""
    c = getattr(model_or_config, "config", model_or_config)
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return c.num_hidden_layers, heads, kv, head_dim


def load_config(ref: ModelRef, *, trust_remote_code: bool = False):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(ref.path, trust_remote_code=trust_remote_code)


def weights_dir(ref: ModelRef, dtype: str) -> Path:
    """Where to load ``ref``'s weights in ``dtype`` from: a checkpoint air_ray converted (alias or GGUF,
    stored in float32) gets a copy already cast to ``dtype``, made once beside it (``<name>@<dtype>``).

    Loading the float32 file as bfloat16 holds the mapped float32 file and the cast copy at once (SmolLM2:
    1.1 GB peak against 0.39 GB from a bfloat16 file), in every actor on every start. The copy is bound to
    the fingerprint of the checkpoint it came from and remade when that changes. A user's own checkpoint is
    loaded as it is (no second copy of a large model on disk)."""
    home = air_ray_home() / "models"
    if dtype == "float32" or ref.path.parent != home or not is_complete(ref.path):
        return ref.path
    from transformers import AutoModelForCausalLM

    def build(tmp: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch_dtype(dtype), use_safetensors=True)
        model.save_pretrained(tmp, safe_serialization=True)

    marker = {"source": str(ref.path), "fingerprint": ref.fingerprint, "dtype": dtype}
    cast = cached_checkpoint(home / f"{ref.path.name}@{dtype}", marker, build)
    return cast if is_complete(cast) else ref.path
