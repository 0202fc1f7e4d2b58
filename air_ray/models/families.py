"""The decoder families air_ray scores and detects heads with, keyed by ``config.model_type``; anything else is
refused with one line naming these (``family_of``).

What holds for every family here (read in transformers 5.x's modeling code, checked per family on tiny random
models in ``tests/test_architectures.py``):

- every layer's attention goes through transformers' attention interface with q, k, v after norms and RoPE and
  the model's own mask, and the attention module knows its ``layer_idx``: the uniform ablation
  (``air_ray.engine.ablation.HeadAblation``) and head detection's capture work there;
- the decoder (``Family.decoder``) builds its masks and rotary tables from the inputs before the layer loop,
  each layer hands the next one plain hidden state, and after the loop comes only the final norm: the
  shared-prefix fast path (``air_ray.engine.losses.token_nll_pair``) applies.

Families differ in where each head's query rows live (``Family.queries``, for the vLLM backend's exported
checkpoint) and in whether zeroing them is the uniform ablation at all (``Family.export_refusal``).
"""

from __future__ import annotations

from dataclasses import dataclass

from air_ray.errors import AirRayError

# Family.queries: where head h's query rows are in each attention module
#   "q"    q_proj (or, with a query LoRA, q_b_proj): rows [h*w, (h+1)*w), w = rows / heads (MLA: qk_head_dim)
#   "qkv"  qkv_proj, queries first (Phi-3): rows [h*d, (h+1)*d)
#   "neox" query_key_value, [q, k, v] interleaved per head (GPT-NeoX): rows [3*h*d, 3*h*d + d)
QUERY_LAYOUTS = ("q", "qkv", "neox")


@dataclass(frozen=True)
class Family:
    name: str  # as users know it
    decoder: str  # the decoder (base model) class whose forward was read and found prefix-safe
    queries: str  # one of QUERY_LAYOUTS
    export_refusal: str | None = None  # why zeroing query rows is not the uniform ablation here
    export_refusal_if: str | None = None  # ... only when this config attribute is set (else always)


_Q_NORM_ALL = ("its q_norm normalises all heads' queries together, so zeroing one head's rows rescales the "
               "other heads' queries")

FAMILIES: dict[str, Family] = {
    "llama": Family("Llama (SmolLM2, ...)", "LlamaModel", "q"),
    "mistral": Family("Mistral", "MistralModel", "q"),
    "mixtral": Family("Mixtral", "MixtralModel", "q"),
    "qwen2": Family("Qwen2 / Qwen2.5", "Qwen2Model", "q"),
    "qwen2_moe": Family("Qwen2-MoE", "Qwen2MoeModel", "q"),
    "qwen3": Family("Qwen3", "Qwen3Model", "q"),
    "qwen3_moe": Family("Qwen3-MoE", "Qwen3MoeModel", "q"),
    "gemma": Family("Gemma", "GemmaModel", "q"),
    "gemma2": Family("Gemma 2", "Gemma2Model", "q"),
    "gemma3_text": Family("Gemma 3 (text)", "Gemma3TextModel", "q"),
    "phi3": Family("Phi-3", "Phi3Model", "qkv"),
    "phi": Family("Phi-1/2", "PhiModel", "q",
                  export_refusal="its queries pass a LayerNorm with a bias (qk_layernorm): LayerNorm(0) is that "
                                 "bias, so a zeroed query is not zero", export_refusal_if="qk_layernorm"),
    "olmo2": Family("OLMo 2", "Olmo2Model", "q", export_refusal=_Q_NORM_ALL),
    "olmo3": Family("OLMo 3", "Olmo3Model", "q", export_refusal=_Q_NORM_ALL),
    "olmoe": Family("OLMoE", "OlmoeModel", "q", export_refusal=_Q_NORM_ALL),
    "granite": Family("Granite", "GraniteModel", "q"),
    "granitemoe": Family("Granite-MoE", "GraniteMoeModel", "q"),
    "cohere": Family("Cohere (Command R)", "CohereModel", "q"),
    "cohere2": Family("Cohere2 (Command R7B, A)", "Cohere2Model", "q"),
    "starcoder2": Family("StarCoder2", "Starcoder2Model", "q"),
    "gpt_neox": Family("GPT-NeoX (Pythia)", "GPTNeoXModel", "neox"),
    "gpt_oss": Family("gpt-oss", "GptOssModel", "q",
                      export_refusal="its attention sinks stay in the softmax: a zeroed query gets weights "
                                     "1/(N + e^sink) that do not sum to 1, not 1/N"),
    "deepseek_v2": Family("DeepSeek-V2 (MLA)", "DeepseekV2Model", "q"),
    "deepseek_v3": Family("DeepSeek-V3 (MLA, query LoRA)", "DeepseekV3Model", "q"),
    "smollm3": Family("SmolLM3", "SmolLM3Model", "q"),
}
assert all(f.queries in QUERY_LAYOUTS for f in FAMILIES.values())


def supported() -> str:
    return ", ".join(sorted(FAMILIES))


def family_of(config) -> Family:
    """The family of a model (its transformers config), or an AirRayError naming what is supported."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        hint = ""
        if model_type == "gemma3":
            hint = " (the multimodal Gemma 3; its text-only checkpoints, gemma3_text, are)"
        raise AirRayError(f"model type {model_type!r} is not supported{hint}: air_ray scores and detects heads "
                          f"with the decoder families {supported()}")
    return family


def export_refusal(config) -> str | None:
    """Why the q-row-zeroed export (the vLLM backend's reference model) would not be the uniform ablation for
    this model, or None when it is exact."""
    family = family_of(config)
    if family.export_refusal is None:
        return None
    if family.export_refusal_if is not None and not getattr(config, family.export_refusal_if, False):
        return None
    return f"{family.name}: {family.export_refusal}"
