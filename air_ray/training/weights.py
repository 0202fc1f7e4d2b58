"""Step weights as per-token loss weights, and the weighted loss.

Token weights (``step_token_weights``)
--------------------------------------
One weight per token of ``tokenizer(response, add_special_tokens=False)``, for any *fast* tokenizer (the
trainer's own, not necessarily the scoring one): character offsets tie tokens to the response text, and the
step spans are character spans ``[start, end)`` of that same text.

Rule. Each token gets the weight of the step whose span contains the token's **first character**, or 1.0 when
no step contains it. The first character is the start ``a`` of the token's offset span ``[a, b)``, as the
tokenizer reports it, whatever that character is (also for an empty span, ``a == b``):

* a byte-level BPE token (GPT-2, SmolLM, Llama 3 ...) such as ``" Answer"``, whose offset starts at the space
  glued in front of the word, belongs to the step holding that space: when the space is the last character of
  the previous step, the token takes the previous step's weight; when the space is between two steps, 1.0;
* a whitespace token (``"\\n"``) between two ``lines`` steps is in no step and gets 1.0; whitespace inside a
  step gets that step's weight;
* several tokens sharing one character (byte-fallback pieces of one multi-byte character) share its step.

This is the rule the scorer uses to compute step scores (``air_ray.influence.token_step_index`` over the
offset starts, ``air_ray.data.rows``), and the weights are computed with that same function, so with the same
tokenizer the training weights and the step scores describe the same tokens. Step spans must be sorted and
disjoint (as ``air_ray.data.steps.split_steps`` makes them).

Loss (``weighted_causal_lm_loss``)
----------------------------------
``labels`` are aligned with ``input_ids`` exactly as for Hugging Face causal LMs (``labels = input_ids`` with
-100 where nothing is learnt); the shift happens inside, as in ``transformers.loss_utils.ForCausalLMLoss``: the
logits at position t are scored against ``labels[t + 1]`` with weight ``weights[t + 1]``. The loss is
``sum(w * nll) / sum(w)`` over the positions whose label is not ``ignore_index``. With all weights 1 it equals
the Hugging Face loss. A weight-0 position contributes exactly zero gradient.
"""

from __future__ import annotations

import math

from air_ray.errors import AirRayError

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------
# token weights


def check_steps(step_spans, step_weights, n_chars: int) -> tuple[list[tuple[int, int]], list[float]]:
    spans = [] if step_spans is None else [(int(s[0]), int(s[1])) for s in step_spans]
    weights = [] if step_weights is None else list(step_weights)
    if len(spans) != len(weights):
        raise AirRayError(f"{len(spans)} step spans but {len(weights)} step weights")
    prev_end = 0
    for (a, b), w in zip(spans, weights):
        if not (0 <= a < b <= n_chars) or a < prev_end:
            raise AirRayError(f"step span [{a}, {b}) is not a sorted, disjoint, non-empty span inside the "
                              f"response ({n_chars} characters)")
        if w is None or not math.isfinite(float(w)) or float(w) < 0:
            raise AirRayError(f"step weight {w!r} is not a finite number >= 0")
        prev_end = b
    return spans, [float(w) for w in weights]


def require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise AirRayError(f"{type(tokenizer).__name__} is not a fast tokenizer: step weights need character "
                          "offsets (return_offsets_mapping); load it with use_fast=True or convert it")


def weights_from_offsets(response: str, offsets, step_spans, step_weights) -> list[float]:
    """One weight per (start, end) character span in ``offsets`` (the rule of ``step_token_weights``): the
    weight of the step holding the span's start, 1.0 for none. Validates the steps against ``response``."""
    from air_ray.influence import token_step_index

    spans, weights = check_steps(step_spans, step_weights, len(response))
    step_of = token_step_index([int(a) for a, _ in offsets], spans)
    return [weights[i] if i >= 0 else 1.0 for i in step_of.tolist()]


def step_token_weights(response: str, step_spans, step_weights, tokenizer) -> list[float]:
    """One weight per token of ``tokenizer(response, add_special_tokens=False)``: the weight of the step
    containing the token's first character (its offset start; see the module doc), 1.0 for tokens in no step.
    ``tokenizer`` must be a fast tokenizer (character offsets)."""
    require_fast(tokenizer)
    enc = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    return weights_from_offsets(response, enc["offset_mapping"], step_spans, step_weights)


# ----------------------------------------------------------------------------------------------
# loss


def weighted_causal_lm_loss(logits, labels, weights, ignore_index: int = IGNORE_INDEX):
    """``sum(w * nll) / sum(w)`` over the predicted positions whose label is not ``ignore_index``.

    logits:  [batch, pos, vocab]  (any float dtype; computed in float32)
    labels:  [batch, pos]         aligned with input_ids, like Hugging Face causal-LM labels: the shift is done
                                  here (logits[:, t] predict labels[:, t + 1]; labels[:, 0] is never a target)
    weights: [batch, pos]         aligned with labels: weights[:, t] weighs the prediction of labels[:, t]

    Positions with label ``ignore_index`` count for nothing, whatever their weight. Weights must be >= 0; a
    position with weight 0 contributes exactly zero gradient (its loss term is masked out, never multiplied by
    an infinite loss). If the total weight is 0 the loss is a graph-connected 0 (zero gradients).
    """
    import torch
    import torch.nn.functional as F

    if logits.dim() != 3 or labels.shape != logits.shape[:2] or weights.shape != labels.shape:
        raise ValueError(f"need logits [batch, pos, vocab], labels and weights [batch, pos]; got "
                         f"{tuple(logits.shape)}, {tuple(labels.shape)}, {tuple(weights.shape)}")
    vocab = logits.shape[-1]
    logits = logits.float()
    labels = labels.to(logits.device)
    weights = weights.to(device=logits.device, dtype=torch.float32)
    # shift as ForCausalLMLoss does: pad one ignored label on the right, then labels[:, t + 1] is the target of
    # logits[:, t]; the last position predicts nothing
    shift_labels = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]  # [batch, pos]
    shift_weights = F.pad(weights, (0, 1), value=0.0)[:, 1:]  # [batch, pos]
    nll = F.cross_entropy(logits.reshape(-1, vocab), shift_labels.reshape(-1), ignore_index=ignore_index,
                          reduction="none").view_as(shift_weights)  # [batch, pos]
    active = (shift_labels != ignore_index) & (shift_weights != 0)  # [batch, pos]
    w = torch.where(active, shift_weights, torch.zeros_like(shift_weights))  # [batch, pos]
    terms = torch.where(active, nll * w, torch.zeros_like(nll))  # [batch, pos]; no 0 * inf
    total = w.sum()
    if total.item() == 0:
        return terms.sum() * 0.0
    return terms.sum() / total
