"""Per-token losses from a causal LM without materialising [tokens x vocab] logits.

The decoder runs once over the padded batch; only the positions that predict target tokens go through the
LM head, in chunks, so peak extra memory is [chunk, vocab] rather than [batch, pos, vocab].
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def batch_by_tokens(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches whose padded size (rows x longest) stays within ``batch_tokens``.

    Rows are sorted by length first (length bucketing cuts padding); a row longer than the budget gets a
    batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) + 1) * lengths[i] > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def token_nll(model, sequences: Sequence[Sequence[int]], starts: Sequence[int], *, pad_id: int = 0,
              chunk: int = 2048) -> list[np.ndarray]:
    """-log p(x_t | x_<t) in nats for t in [starts[i], len(sequences[i])) of each sequence (one batch).

    Shapes: input_ids [batch, pos]; hidden [batch, pos, d_model]; picked [n_targets, d_model];
    logits [chunk, vocab] (float32).
    """
    import torch
    import torch.nn.functional as F

    if not sequences:
        return []
    dev = next(model.parameters()).device
    lens = [len(s) for s in sequences]
    if any(s < 1 or s >= n for s, n in zip(starts, lens)):
        raise ValueError("every sequence needs 1 <= start < len")
    T = max(lens)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    padded = any(n != T for n in lens)
    mask = (torch.arange(T)[None, :] < torch.as_tensor(lens)[:, None]).long() if padded else None
    with torch.inference_mode():
        hidden = model.base_model(
            input_ids=ids.to(dev), attention_mask=None if mask is None else mask.to(dev), use_cache=False
        ).last_hidden_state  # [batch, pos, d_model]
        rows = torch.cat([torch.full((n - s,), i, dtype=torch.long) for i, (s, n) in enumerate(zip(starts, lens))])
        cols = torch.cat([torch.arange(s - 1, n - 1) for s, n in zip(starts, lens)])
        targets = ids[rows, cols + 1]
        head = model.get_output_embeddings()
        softcap = getattr(model.config, "final_logit_softcapping", None)
        hdev = hidden.device
        out = []
        for a in range(0, len(rows), chunk):
            picked = hidden[rows[a : a + chunk].to(hdev), cols[a : a + chunk].to(hdev)]  # [n, d_model]
            logits = head(picked.to(head.weight.device)).float()  # [n, vocab]
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            out.append(F.cross_entropy(logits, targets[a : a + chunk].to(logits.device), reduction="none"))
        nll = torch.cat(out).double().cpu().numpy()
    bounds = np.cumsum([0] + [n - s for s, n in zip(starts, lens)])
    return [nll[bounds[i] : bounds[i + 1]] for i in range(len(sequences))]
