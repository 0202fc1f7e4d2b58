"""The weakened reference model: critical heads disabled by zeroing their query rows.

With q = 0 every attention logit of the head is 0, so softmax under the causal mask gives exactly 1/i
over the prefix — the uniform ablation — with any kernel (eager, SDPA, flash, paged). Only the query rows
``h*d_head:(h+1)*d_head`` of ``q_proj`` (weight and bias) are touched: under grouped-query attention the
k/v rows are shared by several query heads and must stay. q/k norms (Qwen3) and RoPE map 0 to 0.

One copy of the weights: the original rows are kept aside and written back after the ablated pass.
"""

from __future__ import annotations

from contextlib import contextmanager

from air_ray.errors import AirRayError

Head = tuple[int, int]  # (layer, head)


def attention_modules(model) -> list:
    """The self-attention module of every decoder layer, in layer order."""
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    if layers is None or not all(hasattr(getattr(L, "self_attn", None), "q_proj") for L in layers):
        raise AirRayError(
            f"{type(model).__name__}: air_ray supports decoder models whose layers have self_attn.q_proj "
            "(Llama, Qwen2, Qwen3, Mistral, ...)"
        )
    return [L.self_attn for L in layers]


def check_heads(heads, shape: tuple[int, int, int, int]) -> list[tuple[int, int]]:
    """The heads as sorted unique (layer, head) pairs, each checked against the model's shape."""
    n_layers, n_heads = shape[0], shape[1]
    out = sorted({(int(l), int(h)) for l, h in heads})
    for l, h in out:
        if not (0 <= l < n_layers and 0 <= h < n_heads):
            raise AirRayError(f"head ({l}, {h}) does not exist in a model of {n_layers}x{n_heads} heads")
    return out


class QueryAblation:
    """Switches a loaded model between base and "critical heads disabled", in place."""

    def __init__(self, model, heads: list[Head]):
        from air_ray.models.load import model_shape

        self.model = model
        shape = model_shape(model)
        self.heads = check_heads(heads, shape)
        self.head_dim = shape[3]
        self._attn = attention_modules(model)
        self._saved: dict[Head, tuple] = {}
        self.active = False

    @property
    def first_layer(self) -> int | None:
        """The lowest ablated layer: layers below it compute the same thing in both passes."""
        return self.heads[0][0] if self.heads else None

    def _rows(self, l: int, h: int):
        q = self._attn[l].q_proj
        sl = slice(h * self.head_dim, (h + 1) * self.head_dim)
        return q.weight, (q.bias if q.bias is not None else None), sl

    def enable(self) -> None:
        import torch

        if self.active:
            return
        with torch.no_grad():
            for l, h in self.heads:
                w, b, sl = self._rows(l, h)
                self._saved[(l, h)] = (w[sl].clone(), None if b is None else b[sl].clone())
                w[sl].zero_()
                if b is not None:
                    b[sl].zero_()
        self.active = True

    def disable(self) -> None:
        import torch

        if not self.active:
            return
        with torch.no_grad():
            for (l, h), (w0, b0) in self._saved.items():
                w, b, sl = self._rows(l, h)
                w[sl].copy_(w0)
                if b is not None:
                    b[sl].copy_(b0)
        self._saved.clear()
        self.active = False

    @contextmanager
    def ablated(self):
        self.enable()
        try:
            yield self.model
        finally:
            self.disable()
