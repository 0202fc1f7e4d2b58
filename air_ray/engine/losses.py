"""Per-token losses from a causal LM without materialising [tokens x vocab] logits.

The decoder runs once over the padded batch; only the positions that predict target tokens go through the
model's own output path (its LM head and whatever it does to the logits: Cohere's logit_scale, Granite's
logits_scaling, Gemma's final soft-capping), in chunks, so peak extra memory is one [chunk, vocab] block (64 MB
of float32 logits by default) rather than [batch, pos, vocab]. The log-softmax is taken in float32 whatever the
model's dtype.

``token_nll_pair`` computes the base and the reference (critical heads disabled) losses of one batch. The
layers below the first ablated layer compute the same thing in both passes, so by default it runs them
once: the base pass keeps the hidden state that enters layer ``first_layer`` and the reference pass starts
there (``share_prefix``). With SmolLM2-135M (30 layers, first ablated layer 17) that is 30 + 13 layer
passes instead of 60.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, ContextManager, Sequence

import numpy as np

from air_ray.models.families import FAMILIES

# decoder classes whose forward was read (transformers 5.x) and found prefix-safe: the masks and rotary tables
# are built from the inputs before the layer loop, every layer gets (hidden_states, mask, position_embeddings,
# ...) and returns the hidden state that the next layer takes, and nothing after the loop but the final norm
# (air_ray.models.families; tests/test_architectures.py checks the fast path against the plain one per family).
# Other models take the plain two full passes.
PREFIX_SAFE_DECODERS = frozenset(f.decoder for f in FAMILIES.values())


def default_batch_tokens(device) -> int:
    """The token budget of one batch when ``--batch-tokens`` is not given, by device
    (``air_ray.config.commands.BATCH_TOKENS``, where the option declares it)."""
    from air_ray.config.commands import BATCH_TOKENS

    return BATCH_TOKENS["cpu" if str(device).split(":")[0] == "cpu" else "gpu"]


def batch_by_tokens(lengths: Sequence[int], batch_tokens: int, max_padding: float = 0.1) -> list[list[int]]:
    """Indices grouped into batches whose padded size (rows x longest) stays within ``batch_tokens``.

    Rows are sorted by length first (length bucketing cuts padding), and a batch is also closed when adding
    the next (longer) row would make more than ``max_padding`` of its padded positions padding: padding is
    computed like real tokens. On a large corpus sorted lengths are dense and batches fill the budget; on a
    few rows of scattered lengths this gives smaller batches instead of padded ones. A row longer than the
    budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i in order:
        padded = (len(cur) + 1) * lengths[i]  # sorted: row i is the longest so far
        if cur and (padded > batch_tokens or padded - real - lengths[i] > max_padding * padded):
            batches.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += lengths[i]
    if cur:
        batches.append(cur)
    return batches


class _Batch:
    """One padded batch and the positions whose next token is scored.

    Shapes: ids [batch, pos] (right-padded with pad_id); mask [batch, pos] or None when nothing is padded;
    rows, cols, targets [n_targets] (the hidden state at (rows, cols) predicts targets).
    """

    def __init__(self, sequences: Sequence[Sequence[int]], starts: Sequence[int], pad_id: int):
        import torch

        self.lens = [len(s) for s in sequences]
        self.starts = list(starts)
        if any(s < 1 or s >= n for s, n in zip(self.starts, self.lens)):
            raise ValueError("every sequence needs 1 <= start < len")
        T = max(self.lens)
        self.ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
        for i, s in enumerate(sequences):
            self.ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        padded = any(n != T for n in self.lens)
        self.mask = (torch.arange(T)[None, :] < torch.as_tensor(self.lens)[:, None]).long() if padded else None
        self.rows = torch.cat([torch.full((n - s,), i, dtype=torch.long)
                               for i, (s, n) in enumerate(zip(self.starts, self.lens))])
        self.cols = torch.cat([torch.arange(s - 1, n - 1) for s, n in zip(self.starts, self.lens)])
        self.targets = self.ids[self.rows, self.cols + 1]

    def split(self, nll: np.ndarray) -> list[np.ndarray]:
        bounds = np.cumsum([0] + [n - s for s, n in zip(self.starts, self.lens)])
        return [nll[bounds[i] : bounds[i + 1]] for i in range(len(self.lens))]


def _hidden(model, b: _Batch):
    """The decoder's last hidden state (after the final norm), [batch, pos, d_model]."""
    dev = next(model.parameters()).device
    return model.base_model(
        input_ids=b.ids.to(dev), attention_mask=None if b.mask is None else b.mask.to(dev), use_cache=False
    ).last_hidden_state


# one [chunk, vocab] float32 block of logits stays within this (the chunk is at least 16 positions); on a GPU
# the budget is larger so that the head's matmul stays big enough for the tensor cores
HEAD_CHUNK_BYTES = 64 << 20
HEAD_CHUNK_BYTES_CUDA = 512 << 20


def head_chunk(vocab: int, chunk: int | None = None, device: str = "cpu") -> int:
    """Positions per LM-head chunk: ``chunk`` if given, else as many as fit the budget of float32 logits
    (CPU: SmolLM2, vocab 49152: 341 positions; Qwen2, vocab 151936: 110. CUDA: 8x that)."""
    if chunk:
        return int(chunk)
    budget = HEAD_CHUNK_BYTES_CUDA if str(device).startswith("cuda") else HEAD_CHUNK_BYTES
    return max(16, budget // (4 * vocab))


class _Output:
    """What the stand-in decoder returns: the hidden states it was given, every other field of a decoder output
    None (router logits, caches, attentions)."""

    def __init__(self, hidden):
        self.last_hidden_state = hidden

    def __getattr__(self, name):
        return None

    def __getitem__(self, i):
        if i != 0:
            raise IndexError(i)
        return self.last_hidden_state


_GIVEN_CLASS = None


@contextmanager
def own_logits(model):
    """``logits(hidden)``: the model's own logits [n, vocab] for final hidden states [n, d_model] (after the
    decoder's final norm), from its own causal-LM forward: the decoder (``model.<base_model_prefix>``) is
    replaced, for the duration, by a stand-in that returns those hidden states, so the model's own head and
    logit post-processing apply unchanged (Cohere's logit_scale, Granite's logits_scaling, Gemma's final
    soft-capping, tied or untied embeddings). Restored on exit, also on error."""
    global _GIVEN_CLASS
    if _GIVEN_CLASS is None:
        import torch.nn as nn

        class Given(nn.Module):
            def __init__(self):
                super().__init__()
                self.hidden = None  # [1, n, d_model]

            def forward(self, *args, **kwargs):
                return _Output(self.hidden)

        _GIVEN_CLASS = Given
    prefix = model.base_model_prefix
    decoder = getattr(model, prefix)
    given = _GIVEN_CLASS()

    def logits(hidden):
        given.hidden = hidden[None]  # [1, n, d_model]
        return model(logits_to_keep=0, use_cache=False).logits[0]  # [n, vocab]

    setattr(model, prefix, given)
    try:
        yield logits
    finally:
        setattr(model, prefix, decoder)


# the entropy on CPU takes the exp of a few rows of a [chunk, vocab] block at a time: a small temporary of about
# EXP_ELEMENTS floats (16 x 49152 float32 = 3 MB) that stays in cache and is reused, instead of a second [chunk, vocab]
# block; at least EXP_ROWS rows (16 for SmolLM2's vocabulary; more for a small one, where 16 rows would be a few KB
# and the loop's per-call cost would dominate). On a GPU: the whole chunk.
EXP_ROWS = 16
EXP_ELEMENTS = 16 * 49152


def _exp_sums(shifted):
    """``(sum(e), sum(e * log e))`` per row, e = exp(shifted), for the entropy H = log Z - sum(e log e) / Z.

    log e is ``shifted`` itself, so no log is taken (torch.xlogy, which takes one, was 10x slower on CPU). A -inf
    logit gives e = 0 and 0 * -inf = NaN where 0 log 0 = 0 is meant: those NaNs become 0 (a NaN logit still gives
    a NaN entropy, through Z).
    Shapes: shifted [n, vocab] (logits - max, float32); e_r [rows, vocab]; both sums [n]."""
    rows = max(EXP_ROWS, EXP_ELEMENTS // max(1, shifted.shape[1])) if shifted.device.type == "cpu" else \
        max(1, len(shifted))
    z = shifted.new_empty(len(shifted))
    e_log_e = shifted.new_empty(len(shifted))
    for r in range(0, len(shifted), rows):
        s_r = shifted[r : r + rows]
        e_r = s_r.exp()
        z[r : r + rows] = e_r.sum(dim=-1)
        e_log_e[r : r + rows] = e_r.mul_(s_r).nan_to_num_(nan=0.0).sum(dim=-1)
    return z, e_log_e


def _pooled(hidden, b: _Batch) -> np.ndarray:
    """The last hidden state averaged over each row's response positions [start, len), float32 numpy.
    Shapes: hidden [batch, pos, d_model]; out [batch, d_model]."""
    import torch

    rows = [hidden[i, s:n].float().mean(dim=0) for i, (s, n) in enumerate(zip(b.starts, b.lens))]  # [d_model] each
    return torch.stack(rows).cpu().numpy()


def _head_nll(model, hidden, b: _Batch, chunk: int | None, entropy: bool = False):
    """Cross-entropy at the scored positions only, ``chunk`` positions at a time through the model's own output
    path (``own_logits``); with ``entropy``: (cross-entropy, entropy of the next-token distribution) there.

    The loss is computed in place in the chunk's float32 logits (logsumexp - target logit; float32 also when the
    model runs in bf16), so one [chunk, vocab] block is all the extra memory: F.cross_entropy would add a
    second one (its log_softmax). The entropy, from the same block: with e = exp(logits - max) and Z = sum(e),
    H = log Z - sum(e * log e) / Z (``_exp_sums``: EXP_ROWS rows of e at a time).
    Shapes: hidden [batch, pos, d_model]; picked [chunk, d_model]; logits [chunk, vocab] (float32).
    """
    import torch

    head = model.get_output_embeddings()
    chunk = head_chunk(head.weight.shape[0], chunk, head.weight.device.type)
    hdev = hidden.device
    out, ent = [], []
    with own_logits(model) as logits_of:
        for a in range(0, len(b.rows), chunk):
            picked = hidden[b.rows[a : a + chunk].to(hdev), b.cols[a : a + chunk].to(hdev)]  # [n, d_model]
            logits = logits_of(picked).float()  # [n, vocab]
            target = logits.gather(1, b.targets[a : a + chunk, None].to(logits.device))[:, 0]  # [n]
            top = logits.amax(dim=-1)  # [n]
            shifted = logits.sub_(top[:, None])  # [n, vocab], in place: logits - max, <= 0
            if entropy:
                z, e_log_e = _exp_sums(shifted)  # [n], [n]
                log_z = z.log()
                ent.append(log_z - e_log_e / z)
            else:
                log_z = shifted.exp_().sum(dim=-1).log_()  # [n], in place
            out.append(log_z + top - target)
    nll = torch.cat(out).double().cpu().numpy()
    return (nll, torch.cat(ent).double().cpu().numpy()) if entropy else nll


def token_nll(model, sequences: Sequence[Sequence[int]], starts: Sequence[int], *, pad_id: int = 0,
              chunk: int | None = None) -> list[np.ndarray]:
    """-log p(x_t | x_<t) in nats for t in [starts[i], len(sequences[i])) of each sequence (one batch).

    Shapes: input_ids [batch, pos]; hidden [batch, pos, d_model]; picked [chunk, d_model];
    logits [chunk, vocab] (float32); ``chunk`` None: see ``head_chunk``.
    """
    import torch

    if not sequences:
        return []
    b = _Batch(sequences, starts, pad_id)
    with torch.inference_mode():
        return b.split(_head_nll(model, _hidden(model, b), b, chunk))


# ----------------------------------------------------------------------------------------------
# base and reference losses of one batch, sharing the layers below the first ablated one


def prefix_shareable(model, first_layer: int | None) -> bool:
    """Whether ``token_nll_pair`` can run layers [0, first_layer) once for both passes on this model: a
    decoder class in PREFIX_SAFE_DECODERS, on one device (a model sharded by accelerate's device_map keeps
    the plain path: its per-layer device hooks were not verified with stand-in layers)."""
    base = getattr(model, "base_model", None)
    layers = getattr(base, "layers", None)
    devices = set((getattr(model, "hf_device_map", None) or {}).values())
    return (
        first_layer is not None
        and 0 < first_layer <= len(layers or ())
        and type(base).__name__ in PREFIX_SAFE_DECODERS
        and len(layers) == model.config.num_hidden_layers
        and len(devices) <= 1
    )


_REPLAY_CLASS = None


def _replay(value=None):
    """A stand-in for a decoder layer below the first ablated one, during the reference pass: returns
    ``value`` (the hidden state that layer produced in the base pass) or, when None, its input unchanged (no
    compute). The layer list keeps its length, so lookups by layer index (``config.layer_types[i]`` in
    Qwen2/Qwen3) still see the right layer; the embedding lookup, causal mask and rotary tables are rebuilt
    from input_ids as usual (no matmul)."""
    global _REPLAY_CLASS
    if _REPLAY_CLASS is None:
        import torch.nn as nn

        class Replay(nn.Module):
            def __init__(self, value):
                super().__init__()
                self.value = value  # [batch, pos, d_model] or None

            def forward(self, hidden_states, *args, **kwargs):
                return hidden_states if self.value is None else self.value

        _REPLAY_CLASS = Replay
    return _REPLAY_CLASS(value)


@contextmanager
def _capture_output(layer):
    """Keeps the output of ``layer`` (a decoder layer: a [batch, pos, d_model] tensor) from the next pass."""
    box: dict = {}

    def hook(module, args, output):
        box["h"] = output.clone()

    handle = layer.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


@contextmanager
def _replayed(model, k: int, h_k):
    """Layers [0, k) replaced by stand-ins that hand ``h_k`` (the input of layer k) to layer k; restored
    on exit, also on error."""
    layers = model.base_model.layers
    saved = [layers[i] for i in range(k)]
    try:
        for i in range(k):
            layers[i] = _replay(h_k if i == k - 1 else None)
        yield
    finally:
        for i, layer in enumerate(saved):
            layers[i] = layer


def token_nll_pair(
    model,
    sequences: Sequence[Sequence[int]],
    starts: Sequence[int],
    *,
    ablated: Callable[[], ContextManager],
    first_layer: int | None,
    pad_id: int = 0,
    chunk: int | None = None,
    share_prefix: bool = True,
    pool: bool = False,
) -> tuple:
    """(base losses, reference losses, base entropies) per sequence: losses as ``token_nll`` gives them, and
    the entropy (nats) of the base model's next-token distribution at the same positions. The reference pass
    runs inside ``ablated()`` (the critical heads disabled), whose lowest layer is ``first_layer`` (None: no
    head). ``pool``: a fourth item, the base pass's last hidden state averaged over each sequence's response
    positions, [batch, d_model] float32 (``_pooled``).

    ``share_prefix`` (default): layers [0, first_layer) run once, in the base pass; the reference pass runs
    layers [first_layer, L) + final norm + LM head on the hidden state the base pass had there. No heads: the
    reference model is the base model, and its losses are the base losses. ``share_prefix=False`` or a model
    not in ``PREFIX_SAFE_DECODERS``: two full passes (the plain path).

    Shapes: hidden [batch, pos, d_model]; h_k (the input of layer first_layer) [batch, pos, d_model].
    """
    import torch

    if not sequences:
        return ([], [], [], np.zeros((0, 0), np.float32)) if pool else ([], [], [])
    b = _Batch(sequences, starts, pad_id)
    pooled = []

    def base_pass(hidden):
        if pool:
            pooled.append(_pooled(hidden, b))
        return _head_nll(model, hidden, b, chunk, entropy=True)

    def out(base, ref, ent):
        return (b.split(base), b.split(ref), b.split(ent)) + ((pooled[0],) if pool else ())

    with torch.inference_mode():
        if not share_prefix:
            base, ent = base_pass(_hidden(model, b))
            with ablated():
                ref = _head_nll(model, _hidden(model, b), b, chunk)
            return out(base, ref, ent)
        if first_layer is None:
            base, ent = base_pass(_hidden(model, b))
            return out(base, base.copy(), ent)
        if not prefix_shareable(model, first_layer):
            return token_nll_pair(model, sequences, starts, ablated=ablated, first_layer=first_layer,
                                  pad_id=pad_id, chunk=chunk, share_prefix=False, pool=pool)
        k = first_layer
        with _capture_output(model.base_model.layers[k - 1]) as box:
            hidden = _hidden(model, b)  # [batch, pos, d_model]
        base, ent = base_pass(hidden)
        del hidden
        h_k = box.pop("h", None)  # [batch, pos, d_model]
        with ablated():
            if isinstance(h_k, torch.Tensor) and h_k.shape[:2] == b.ids.shape:
                with _replayed(model, k, h_k):
                    ref = _head_nll(model, _hidden(model, b), b, chunk)
            else:  # the layer did not hand a plain hidden state on: run the full pass
                ref = _head_nll(model, _hidden(model, b), b, chunk)
        return out(base, ref, ent)
