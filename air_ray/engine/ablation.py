"""The weakened reference model: the critical heads' attention made exactly uniform.

The ablation is defined by what it means, for every model: each disabled (layer, head)'s query i gives weight
1/N_i to each of the N_i key positions the model's own mask lets it see (the causal prefix, a sliding window,
padding), attention sinks ignored, so its output is the mean of V over those keys; every other head is untouched.

``HeadAblation`` (the ``hf`` backend and head detection's check) computes it where the model computes
attention. transformers hands each layer's attention to a registered function with q, k, v (after q/k norms and
RoPE) and the mask its kernel uses; while the ablation is on, the model runs ``air_ray_uniform_<kernel>``, its
own kernel (SDPA, or the family's eager code) with each disabled head made uniform:

* no attention sinks: the head's query is set to zero *in the kernel's input* (after every norm and RoPE), so
  every logit is 0 (soft-capping keeps 0 at 0) and the kernel's own softmax under its own mask gives exactly
  1/N_i. No extra work; the default model's scores are bit-identical to the earlier q_proj-row form.
* attention sinks (gpt-oss: a learned logit added to every row, so q = 0 gives 1/(N_i + e^s), not 1/N_i): the
  kernel runs as is and the head's output is replaced by the mean of V over the keys the mask shows its query
  (``uniform_output``: one cumulative sum over V per disabled head).

No weight changes, one copy of the model, and switching is cheap.

``zero_query_rows`` is the form the ``vllm`` backend exports (a checkpoint): with q = 0 every attention logit
of the head is 0 and the softmax under the mask is 1/N, the same thing, wherever nothing between the query rows
and the softmax maps 0 elsewhere or adds to the softmax. ``air_ray.models.families.export_refusal`` names the
families where something does (a q_norm over all heads, sinks, a LayerNorm bias on q); they are refused.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

from air_ray.errors import AirRayError

Head = tuple[int, int]  # (layer, head)

UNIFORM_PREFIX = "air_ray_uniform_"  # + the model's own kernel: the attention implementation while ablated
KERNELS = ("sdpa", "eager")  # the kernels the ablation and head detection wrap
_HEADS = "_air_ray_uniform_heads"  # attribute of an attention module while ablated: its disabled heads, [n]


def check_heads(heads, shape: tuple[int, int, int, int]) -> list[tuple[int, int]]:
    """The heads as sorted unique (layer, head) pairs, each checked against the model's shape."""
    from air_ray.store.heads import Heads

    n_layers, n_heads = shape[0], shape[1]
    out = list(Heads.of(heads))
    for l, h in out:
        if not (0 <= l < n_layers and 0 <= h < n_heads):
            raise AirRayError(f"head ({l}, {h}) does not exist in a model of {n_layers}x{n_heads} heads")
    return out


def attention_modules(model) -> list:
    """The attention module of every decoder layer, in layer order: the one module whose class name ends in
    ``Attention`` and whose ``layer_idx`` is i, for each layer i."""
    layers = getattr(getattr(model, "base_model", model), "layers", None) or ()
    found: dict[int, list] = {}
    for m in model.modules():
        if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int):
            found.setdefault(m.layer_idx, []).append(m)
    if not layers or sorted(found) != list(range(len(layers))) or any(len(v) != 1 for v in found.values()):
        raise AirRayError(f"{type(model).__name__}: air_ray needs one attention module with a layer_idx per decoder "
                          "layer (transformers' decoder families; see air_ray.models.families)")
    return [found[i][0] for i in range(len(layers))]


# ----------------------------------------------------------------------------------------------
# the pieces shared with head detection: the model's own kernel, and which keys a query sees


def model_kernel(implementation: str, module):
    """The attention function the model itself runs under ``implementation``: transformers' SDPA, or the
    family's own eager code (``eager_attention_forward`` of its modeling module, which applies Gemma 2's
    soft-capping, gpt-oss's sinks, ...)."""
    if implementation == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    if implementation == "eager":
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is not None:
            return eager
    raise AirRayError(f"attention implementation {implementation!r} of {type(module).__name__}: air_ray runs the "
                      f"model with {' or '.join(KERNELS)}")


def visible_keys(attention_mask, q_len: int, k_len: int, rows: slice | None = None, device=None):
    """Which keys each query may see under the mask the attention kernel got: bool [batch or 1, 1, q, k].

    ``attention_mask``: boolean (SDPA's: True = visible), additive float (eager's: 0 visible, the dtype's minimum
    hidden) or None (the kernel's own causal default: query i of q sees keys <= i + k - q; on ``device``).
    ``rows``: only those query rows.
    """
    import torch

    rows = rows if rows is not None else slice(0, q_len)
    if attention_mask is None:
        q = torch.arange(rows.start, rows.stop, device=device)[:, None]  # [rows, 1]
        return (torch.arange(k_len, device=device)[None, :] <= q + (k_len - q_len))[None, None]
    m = attention_mask[:, :, rows, :k_len]
    if m.dtype == torch.bool:
        return m
    return m > torch.finfo(m.dtype).min / 2


def uniform_output(value, heads, groups: int, visible):
    """The disabled heads' attention output: for each query head in ``heads``, the mean of V over the keys its
    query sees. ``value`` [batch, kv_head, k, d_v] (query head h reads kv head h // groups); ``heads`` [n];
    ``visible`` [batch or 1, 1, q, k] bool, or None for the causal prefix with q = k. Returns [batch, q, n, d_v].

    The masks transformers builds (causal, sliding window, padding) show each query one run of consecutive
    keys [lo, hi), so the mean is a difference of prefix sums of V (float64: exact enough for any length).
    """
    import torch
    import torch.nn.functional as F

    v = value[:, heads // groups].double()  # [batch, n, k, d_v]
    b, n, k_len, d = v.shape
    prefix = F.pad(v.cumsum(2), (0, 0, 1, 0))  # [batch, n, k + 1, d_v]: prefix[:, :, j] = sum of keys < j
    if visible is None:
        count = torch.arange(1, k_len + 1, device=v.device, dtype=v.dtype)[:, None]  # [q = k, 1]
        return (prefix[:, :, 1:] / count).to(value.dtype).transpose(1, 2)
    if visible.shape[1] != 1:  # a mask per head
        visible = visible[:, heads]
    count = visible.sum(-1)  # [batch or 1, 1 or n, q]
    as_bytes = visible.view(torch.uint8)  # argmax takes no bool; a view, no copy
    lo = as_bytes.argmax(-1)  # the first visible key
    hi = k_len - as_bytes.flip(-1).argmax(-1)  # one past the last (flip: one mask-sized temporary)
    if bool(((hi - lo == count) | (count == 0)).all()):

        def prefix_at(j):  # j [batch or 1, 1 or n, q] -> prefix[:, :, j] [batch, n, q, d_v]
            return prefix.gather(2, j.expand(b, n, -1)[..., None].expand(-1, -1, -1, d))

        total = prefix_at(hi) - prefix_at(lo)
    else:  # a mask that is not one run per query: sum with the mask itself
        total = visible.to(v.dtype) @ v  # [batch, n, q, d_v]
    mean = total * (count > 0)[..., None] / count.clamp(min=1)[..., None]  # a query that sees nothing: 0
    return mean.to(value.dtype).transpose(1, 2)


_REGISTERED: set[str] = set()


def has_sinks(module, kwargs) -> bool:
    """Whether the kernel adds attention-sink logits (gpt-oss passes them as ``s_aux``)."""
    return kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None


def _uniform_kernel(implementation: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        """The model's own kernel with the disabled heads uniform (see the module doc).
        query [batch, head, q, d]; key, value [batch, kv_head, k, d(_v)]; out [batch, q, head, d_v]."""
        kernel = model_kernel(implementation, module)
        heads = getattr(module, _HEADS, None)
        if heads is not None and not has_sinks(module, kwargs):
            query = query.clone()
            query[:, heads] = 0  # every logit of these heads is 0: softmax under the mask = 1/N
            return kernel(module, query, key, value, attention_mask, **kwargs)
        out, weights = kernel(module, query, key, value, attention_mask, **kwargs)
        if heads is not None:
            q_len, k_len = query.shape[2], key.shape[2]
            visible = (None if attention_mask is None and q_len == k_len
                       else visible_keys(attention_mask, q_len, k_len, device=query.device))
            out[:, :, heads] = uniform_output(value, heads, query.shape[1] // value.shape[1], visible)
        return out, weights

    return attention


def uniform_implementation(implementation: str) -> str:
    """The name of the attention implementation "``implementation``, with the disabled heads uniform", registered
    with transformers (with the same mask function as ``implementation``) on first use."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if implementation not in KERNELS:
        raise AirRayError(f"attention implementation {implementation!r}: the ablation runs on "
                          f"{' or '.join(KERNELS)} (load the model with one of them)")
    name = UNIFORM_PREFIX + implementation
    if name not in _REGISTERED:
        AttentionInterface.register(name, _uniform_kernel(implementation))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[implementation])
        _REGISTERED.add(name)
    return name


def check_supported(model) -> None:
    """One clear line, before any scoring, for a model outside the supported families (or one whose code comes
    from its repository, not from transformers)."""
    from air_ray.models import family_of

    family_of(model.config)
    if not type(model).__module__.startswith("transformers.models."):
        raise AirRayError(f"{type(model).__name__} runs its own modeling code ({type(model).__module__}); air_ray "
                          "checks the ablation on transformers' own implementation of each family only")


class HeadAblation:
    """Switches a loaded model between base and "critical heads uniform", in place and cheaply: ``ablated()``
    sets the heads on their layers' attention modules and the model's attention implementation to the uniform
    wrapper of its kernel; on exit (also on error) both go back."""

    def __init__(self, model, heads: list[Head]):
        import torch

        from air_ray.models import model_shape

        check_supported(model)
        self.model = model
        self.heads = check_heads(heads, model_shape(model))
        modules = attention_modules(model)
        self._per_module = []  # (attention module, its disabled query heads [n] on its device)
        for layer in sorted({l for l, _ in self.heads}):
            m = modules[layer]
            device = next(m.parameters()).device
            self._per_module.append((m, torch.tensor([h for l, h in self.heads if l == layer], device=device)))
        self._previous: str | None = None
        self.active = False

    @property
    def first_layer(self) -> int | None:
        """The lowest ablated layer: layers below it compute the same thing in both passes."""
        return self.heads[0][0] if self.heads else None

    def enable(self) -> None:
        if self.active:
            return
        if self.heads:
            config = self.model.config
            name = uniform_implementation(config._attn_implementation)
            self._previous = config._attn_implementation
            self.model.set_attn_implementation(name)
            if config._attn_implementation != name:
                self.model.set_attn_implementation(self._previous)
                raise AirRayError(f"{type(self.model).__name__}: transformers would not switch its attention to "
                                  "air_ray's uniform heads (it does not use the attention interface)")
            for m, heads in self._per_module:
                setattr(m, _HEADS, heads)
        self.active = True

    def disable(self) -> None:
        if not self.active:
            return
        for m, _ in self._per_module:
            if hasattr(m, _HEADS):
                delattr(m, _HEADS)
        if self._previous is not None:
            self.model.set_attn_implementation(self._previous)
            self._previous = None
        self.active = False

    @contextmanager
    def ablated(self):
        self.enable()
        try:
            yield self.model
        finally:
            self.disable()


# ----------------------------------------------------------------------------------------------
# the vllm backend's exported form


def query_rows(module, layout: str, head: int, n_heads: int):
    """(the weight's module, the rows of ``head``'s queries) in one attention module, for a layout of
    ``air_ray.models.families.QUERY_LAYOUTS``."""
    if layout == "q":
        proj = getattr(module, "q_proj", None) or module.q_b_proj  # MLA with a query LoRA: q_b_proj
        w = proj.out_features // n_heads  # per-head query width (MLA: qk_head_dim, not config.head_dim)
        return proj, slice(head * w, (head + 1) * w)
    if layout == "qkv":
        d = module.head_dim
        return module.qkv_proj, slice(head * d, (head + 1) * d)
    if layout == "neox":
        d = module.head_size
        return module.query_key_value, slice(3 * head * d, 3 * head * d + d)
    raise ValueError(layout)


def zero_query_rows(model, heads) -> None:
    """The ``vllm`` backend's reference weights: each head's query rows (and biases) zeroed, in place and for good.
    An AirRayError for a family where that is not the uniform ablation (``export_refusal``)."""
    import torch

    from air_ray.models import export_refusal, family_of, model_shape

    check_supported(model)
    why = export_refusal(model.config)
    if why:
        raise AirRayError(f"a checkpoint with zeroed query rows is not the uniform ablation for {why}")
    layout = family_of(model.config).queries
    shape = model_shape(model)
    modules = attention_modules(model)
    with torch.no_grad():
        for l, h in check_heads(heads, shape):
            proj, rows = query_rows(modules[l], layout, h, shape[1])
            proj.weight[rows] = 0
            if proj.bias is not None:
                proj.bias[rows] = 0
