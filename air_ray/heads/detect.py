"""Finding reasoning-critical heads by retrieval score.

Rule (teacher-forced): answer token k sits at position P+k. The query at position P+k-1 predicts it. A head
*copies* token k when the argmax of its attention row at P+k-1 (over the positions 0..P+k-1 that the model's
mask lets that query see, fewer under a sliding window; ties to the lowest position) lies in the answer's span
in the prompt and the token there equals answer token k.
Probe score = copies / answer tokens; head score = mean over probes; critical heads = the top
ceil(top_frac * layers * heads) by score, ties by (layer, head) ascending.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from air_ray.errors import AirRayError
from air_ray.heads.probes import ProbeTokens
from air_ray.progress import Elapsed, Ticker, duration

CAPTURE_PREFIX = "air_ray_capture_"  # + the model's own kernel (sdpa | eager)


# ----------------------------------------------------------------------------------------------
# the rule, on plain arrays


def copy_fraction(argmax: np.ndarray, probe: ProbeTokens) -> np.ndarray:
    """argmax: [..., answer] attended position per query row P+k-1 -> fraction of answer tokens copied [...]."""
    ids = np.asarray(probe.input_ids)
    answer = ids[probe.n_prompt :]
    in_span = np.zeros(len(ids), dtype=bool)
    in_span[probe.answer_span] = True
    pos = np.asarray(argmax)
    copies = in_span[pos] & (ids[pos] == answer)
    return copies.mean(axis=-1)


def top_heads(scores: np.ndarray, top_frac: float) -> list[tuple[int, int]]:
    """The top ceil(top_frac * L * H) heads by score, best first; ties by (layer, head) ascending."""
    L, H = scores.shape
    n = math.ceil(top_frac * L * H - 1e-9)
    order = sorted(((-float(scores[l, h]), l, h) for l in range(L) for h in range(H)))
    return [(l, h) for _, l, h in order[:n]]


# ----------------------------------------------------------------------------------------------
# capturing attention rows, one layer at a time


class _Capture:
    """An attention function that runs the model's own kernel (``air_ray.engine.ablation.model_kernel``) and, for
    the query rows asked for, records each head's argmax over exactly the keys the model's mask lets that query
    see (causal prefix, sliding window).

    Only the query rows needed are scored ([head, rows, pos] per layer at a time); the full [pos, pos]
    attention matrix is never built. The scores are the kernel's: q k^T * scaling, soft-capped where the model
    soft-caps (Gemma 2); sinks only add to the softmax's denominator, so they move no argmax.
    """

    def __init__(self, implementation: str):
        self.implementation = implementation
        self.rows: slice | None = None
        self.argmax: dict = {}  # layer -> [head, rows] (torch)

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        import torch

        from air_ray.engine.ablation import model_kernel, visible_keys

        out = model_kernel(self.implementation, module)(module, query, key, value, attention_mask, **kwargs)
        if self.rows is not None:
            # query [batch=1, head, pos, d_head]; key [batch=1, kv_head, pos, d_head]
            q = query[0, :, self.rows].float()  # [head, rows, d_head]
            k = key[0].float().repeat_interleave(query.shape[1] // key.shape[1], dim=0)  # [head, pos, d_head]
            scaling = kwargs.get("scaling") or q.shape[-1] ** -0.5
            s = torch.einsum("hrd,hpd->hrp", q, k) * scaling  # [head, rows, pos]
            softcap = kwargs.get("softcap")
            if softcap:
                s = torch.tanh(s / softcap) * softcap
            seen = visible_keys(attention_mask, query.shape[2], key.shape[2], self.rows, device=s.device)[0, 0]
            attn = s.masked_fill(~seen, float("-inf")).softmax(-1)  # [head, rows, pos]
            self.argmax[module.layer_idx] = attn.argmax(-1).cpu()
        return out

    def take(self, n_layers: int) -> np.ndarray:
        """[layer, head, rows] of the last pass; cleared for the next one."""
        out = np.stack([self.argmax[l].numpy() for l in range(n_layers)])
        self.argmax = {}
        return out


@contextmanager
def capturing(model):
    """While open, each forward pass of ``model`` over one sequence records, for the query rows ``capture.rows``
    (a slice; None: none), the key position each head attends to most (ties to the lowest), over the keys that
    query may see: ``capture.take(n_layers)`` -> [layer, head, rows]. The model runs its own kernel throughout
    and comes back with its attention implementation unchanged."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    from air_ray.engine.ablation import KERNELS

    previous = model.config._attn_implementation
    if previous not in KERNELS:
        raise AirRayError(f"attention implementation {previous!r}: head detection runs on {' or '.join(KERNELS)}")
    capture = _Capture(previous)
    name = CAPTURE_PREFIX + previous
    AttentionInterface.register(name, capture)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[previous])
    model.set_attn_implementation(name)
    try:
        yield capture
    finally:
        capture.rows = None
        model.set_attn_implementation(previous)


@dataclass
class Detection:
    scores: np.ndarray  # [layer, head]
    heads: list[tuple[int, int]]
    ablation_check: dict


def detect(model, probes: list[ProbeTokens], top_frac: float = 0.05, seed: int = 0, progress: bool = True
           ) -> Detection:
    """Retrieval scores of every head, the critical heads, and the ablation check."""
    from air_ray.engine.ablation import check_supported
    from air_ray.engine.losses import token_nll
    from air_ray.models.load import model_shape

    if not probes:
        raise AirRayError("no probes")
    check_supported(model)
    L, H, _, _ = model_shape(model)
    totals = np.zeros((L, H))
    base_losses = []
    done = {"probes": 0, "tokens": 0, "what": "probes"}
    total_tokens = sum(len(p.input_ids) for p in probes)
    clock = Elapsed()

    def line() -> str:
        if done["what"] != "probes":
            return f"[air-ray heads] {len(probes)} probes read; {done['what']} ({duration(clock.seconds)} in all)"
        return (f"[air-ray heads] {done['probes']} of {len(probes)} probes, {done['tokens']:,} of {total_tokens:,} "
                f"tokens, {done['tokens'] / max(clock.seconds, 1e-9):,.0f} tok/s, "
                f"{clock.eta(done['tokens'], total_tokens)}")

    ticker = Ticker(line).start() if progress else None
    try:
        with capturing(model) as capture:
            for p in probes:
                capture.rows = slice(p.n_prompt - 1, len(p.input_ids) - 1)  # the rows predicting answer tokens
                base_losses.append(token_nll(model, [p.input_ids], [p.n_prompt])[0])
                totals += copy_fraction(capture.take(L), p)  # argmax [layer, head, answer]
                done["probes"] += 1
                done["tokens"] += len(p.input_ids)
        done["what"] = "the ablation check: the answer loss with the critical heads, then random heads, disabled"
        return _detection(model, probes, totals, base_losses, top_frac, seed, L, H)
    finally:
        if ticker is not None:
            ticker.stop()


def _detection(model, probes, totals, base_losses, top_frac, seed, L, H) -> Detection:
    """The critical heads from the summed copy fractions, and the ablation check."""
    from air_ray.engine.ablation import HeadAblation
    from air_ray.engine.losses import token_nll

    scores = totals / len(probes)
    heads = top_heads(scores, top_frac)

    critical = set(heads)
    others = [(l, h) for l in range(L) for h in range(H) if (l, h) not in critical]
    rand = random.Random(seed).sample(others, min(len(heads), len(others)))

    def answer_loss(ablate):
        with HeadAblation(model, ablate).ablated():
            nll = [token_nll(model, [p.input_ids], [p.n_prompt])[0] for p in probes]
        return float(np.mean([x.mean() for x in nll]))

    check = {
        "answer_loss_base": float(np.mean([x.mean() for x in base_losses])),
        "answer_loss_ablated": answer_loss(heads),
        "answer_loss_random_heads": answer_loss(rand),
        "random_heads": [list(h) for h in rand],
    }
    return Detection(scores=scores, heads=heads, ablation_check=check)
