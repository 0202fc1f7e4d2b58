"""Finding reasoning-critical heads by retrieval score.

Rule (teacher-forced): answer token k sits at position P+k. The query at position P+k-1 predicts it. A head
*copies* token k when the argmax of its attention row at P+k-1 (over positions 0..P+k-1, ties to the lowest
position) lies in the answer's span in the prompt and the token there equals answer token k.
Probe score = copies / answer tokens; head score = mean over probes; critical heads = the top
ceil(top_frac * layers * heads) by score, ties by (layer, head) ascending.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass

import numpy as np

from air_ray.errors import AirRayError
from air_ray.heads.probes import ProbeTokens

CAPTURE_ATTN = "air_ray_capture"


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
    """An attention function that runs SDPA and, for the rows asked for, records each head's argmax.

    Only the query rows needed are scored ([head, rows, pos] per layer at a time); the full [pos, pos]
    attention matrix is never built.
    """

    def __init__(self):
        self.rows: slice | None = None
        self.argmax: dict = {}  # layer -> [head, rows] (torch)

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        import torch
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        if self.rows is not None:
            # query [batch=1, head, pos, d_head]; key [batch=1, kv_head, pos, d_head]
            q = query[0, :, self.rows].float()  # [head, rows, d_head]
            k = key[0].float().repeat_interleave(query.shape[1] // key.shape[1], dim=0)  # [head, pos, d_head]
            scaling = kwargs.get("scaling") or q.shape[-1] ** -0.5
            s = torch.einsum("hrd,hpd->hrp", q, k) * scaling  # [head, rows, pos]
            qpos = torch.arange(self.rows.start, self.rows.stop, device=s.device)[:, None]
            kpos = torch.arange(s.shape[-1], device=s.device)[None, :]
            attn = s.masked_fill(kpos > qpos, float("-inf")).softmax(-1)
            self.argmax[module.layer_idx] = attn.argmax(-1).cpu()
        return out


def _register_capture(capture: _Capture) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(CAPTURE_ATTN, capture)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE_ATTN, sdpa_mask)


@dataclass
class Detection:
    scores: np.ndarray  # [layer, head]
    heads: list[tuple[int, int]]
    ablation_check: dict


def detect(model, probes: list[ProbeTokens], top_frac: float = 0.05, seed: int = 0, progress: bool = True
           ) -> Detection:
    """Retrieval scores of every head, the critical heads, and the ablation check."""
    from air_ray.engine.ablation import QueryAblation
    from air_ray.engine.losses import token_nll
    from air_ray.models.load import model_shape

    if not probes:
        raise AirRayError("no probes")
    L, H, _, _ = model_shape(model)
    capture = _Capture()
    _register_capture(capture)
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_ATTN)
    totals = np.zeros((L, H))
    base_losses = []
    try:
        for i, p in enumerate(probes):
            capture.rows, capture.argmax = slice(p.n_prompt - 1, len(p.input_ids) - 1), {}
            base_losses.append(token_nll(model, [p.input_ids], [p.n_prompt])[0])
            argmax = np.stack([capture.argmax[l].numpy() for l in range(L)])  # [layer, head, answer]
            totals += copy_fraction(argmax, p)
            if progress and (i + 1) % max(1, len(probes) // 8) == 0:
                print(f"heads: {i + 1}/{len(probes)} probes", file=sys.stderr, flush=True)
    finally:
        capture.rows = None
        model.set_attn_implementation(previous)
    scores = totals / len(probes)
    heads = top_heads(scores, top_frac)

    critical = set(heads)
    others = [(l, h) for l in range(L) for h in range(H) if (l, h) not in critical]
    rand = random.Random(seed).sample(others, min(len(heads), len(others)))

    def answer_loss(ablate):
        with QueryAblation(model, ablate).ablated():
            nll = [token_nll(model, [p.input_ids], [p.n_prompt])[0] for p in probes]
        return float(np.mean([x.mean() for x in nll]))

    check = {
        "answer_loss_base": float(np.mean([x.mean() for x in base_losses])),
        "answer_loss_ablated": answer_loss(heads),
        "answer_loss_random_heads": answer_loss(rand),
        "random_heads": [list(h) for h in rand],
    }
    return Detection(scores=scores, heads=heads, ablation_check=check)
