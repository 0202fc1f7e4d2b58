"""heads.json: the critical heads of one model (and every head's retrieval score), written by ``air-ray heads``
and read by every command that scores; ``heads.png`` is its heatmap. ``Heads`` is the set of critical heads as one
value (sorted, unique; its ``digest`` names what depends on it). Plain JSON, numpy and matplotlib: no model needed
to read it.

The document keeps its heads in the order detection found them (best first); everything that computes with them
(the scoring key, the ablation, the vLLM export) takes them through ``Heads``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from air_ray.errors import AirRayError
from air_ray.fsio import local_fs, open_uri, write_bytes_atomic
from air_ray.store.layout import heads_png

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Heads:
    """Critical (layer, head) pairs, sorted and unique."""

    pairs: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, heads) -> "Heads":
        """From any iterable of (layer, head) pairs (lists, tuples, numpy ints; a ``Heads``)."""
        if isinstance(heads, Heads):
            return heads
        return cls(tuple(sorted({(int(l), int(h)) for l, h in heads})))

    def __iter__(self):
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def to_json(self) -> list[list[int]]:
        return [[l, h] for l, h in self.pairs]

    @property
    def digest(self) -> str:
        """A short hash of the set (the vLLM backend's exported reference is named by it)."""
        return hashlib.sha1(json.dumps(self.to_json()).encode()).hexdigest()[:12]


def heads_doc(*, model: str, fingerprint: str, shape: tuple[int, int, int, int], top_frac: float, detection,
              probes: dict) -> dict:
    """The heads.json document of a detection (``detection``: a ``detect.Detection``)."""
    L, H, KV, _ = shape
    return {
        "format_version": FORMAT_VERSION,
        "model": model,
        "model_fingerprint": fingerprint,
        "num_layers": L,
        "num_heads": H,
        "num_kv_heads": KV,
        "top_frac": top_frac,
        "heads": [[int(l), int(h)] for l, h in detection.heads],
        "scores": [[round(float(x), 6) for x in row] for row in detection.scores],
        "probes": probes,
        "ablation_check": detection.ablation_check,
    }


def heads_fingerprint(doc: dict) -> str:
    """A short hash of a heads document's content (which heads, of which model, found how); where and when it was
    detected (``detected_on``) is not part of it."""
    content = {k: v for k, v in doc.items() if k != "detected_on"}
    return hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def placebo_doc(source: dict, seed: int, source_uri: str | None = None) -> dict:
    """A heads document with as many heads as ``source`` marks critical, drawn uniformly at random (numpy's
    ``default_rng(seed)``) among the heads it does not mark: scoring with it disables heads that were *not* found,
    so its ranking shows how much of the real one any disabled heads would give. ``placebo: true``; the source's
    fingerprint, heads and ablation check are kept under ``placebo_of``."""
    L, H = int(source["num_layers"]), int(source["num_heads"])
    critical = {(int(l), int(h)) for l, h in source["heads"]}
    others = [(l, h) for l in range(L) for h in range(H) if (l, h) not in critical]
    if len(others) < len(critical):
        raise AirRayError(f"heads --placebo: {len(critical)} critical heads of {L * H}: too few others to draw "
                          "as many at random")
    pick = np.random.default_rng(seed).choice(len(others), size=len(critical), replace=False)
    doc = {k: v for k, v in source.items() if k not in ("ablation_check", "detected_on", "heads")}
    doc["heads"] = Heads.of(others[i] for i in pick).to_json()
    doc["placebo"] = True
    doc["placebo_of"] = {"heads_fingerprint": heads_fingerprint(source), "uri": source_uri, "seed": int(seed),
                         "heads": Heads.of(critical).to_json(),
                         "ablation_check": source.get("ablation_check")}
    return doc


def heads_json(doc: dict) -> bytes:
    """heads.json's bytes (heads as lists)."""
    return json.dumps(dict(doc, heads=[[int(l), int(h)] for l, h in doc["heads"]]), indent=1).encode()


def save_heads(path: str | Path, doc: dict) -> None:
    """Write heads.json (atomically) and heads.png beside it (when the document has every head's retrieval score:
    a placebo drawn from a hand-written heads file has none)."""
    path = Path(path).resolve()
    write_bytes_atomic(local_fs(), str(path), heads_json(doc))
    if doc.get("scores"):
        plot_heads(doc, heads_png(path))


def plot_heads(doc: dict, out: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = np.asarray(doc["scores"])
    L, H = scores.shape
    fig, ax = plt.subplots(figsize=(max(4, H * 0.5 + 2), max(4, L * 0.22 + 1.5)))
    im = ax.imshow(scores, aspect="auto", cmap="viridis", interpolation="nearest")
    for l, h in doc["heads"]:
        ax.add_patch(plt.Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    marked = "placebo, random non-critical" if doc.get("placebo") else f"critical, top {doc['top_frac']:.0%}"
    ax.set_title(f"retrieval score — {doc['model']} (red: {marked})", fontsize=9)
    fig.colorbar(im, ax=ax, label="retrieval score")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def load_heads(path: str, *, fingerprint: str | None = None, shape: tuple | None = None,
               allow_mismatch: bool = False) -> dict:
    """Read heads.json and check that it fits the model (fingerprint and shape)."""
    try:
        with open_uri(path, "rt") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise AirRayError(f"heads file {path} does not exist (run `air-ray heads` first)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise AirRayError(f"heads file {path} cannot be read: {e}") from None
    if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION or "heads" not in doc:
        raise AirRayError(f"heads file {path} is not an air_ray heads.json (format_version {FORMAT_VERSION})")
    if shape is not None:
        L, H, KV = shape[:3]
        if (doc.get("num_layers"), doc.get("num_heads")) != (L, H) or any(
            not (0 <= l < L and 0 <= h < H) for l, h in doc["heads"]
        ):
            raise AirRayError(
                f"heads file {path} is for a model of {doc.get('num_layers')}x{doc.get('num_heads')} heads, "
                f"this model has {L}x{H}"
            )
    if fingerprint is not None and doc.get("model_fingerprint") != fingerprint and not allow_mismatch:
        raise AirRayError(
            f"heads file {path} was made for model {doc.get('model')!r} (fingerprint "
            f"{doc.get('model_fingerprint')}), not this one ({fingerprint}); pass --allow-model-mismatch to use it"
        )
    doc["heads"] = [(int(l), int(h)) for l, h in doc["heads"]]
    return doc
