"""The engine: per-token losses under the base model and the weakened reference, and the scores from them.

``ablation`` disables the critical heads (query rows zeroed, in place); ``losses`` computes per-token losses
without [tokens x vocab] logits and shares the layers below the first critical head between the two passes;
``backends`` gives one interface over transformers (``hf``) and vLLM (``vllm``); ``scorer.Scorer`` ties rows,
backend and the influence math together.

May import: ``air_ray.errors``, ``config``, ``influence``, ``data``, ``models``, and ``heads.artifact`` (reading
heads.json); torch, transformers and vLLM. Never Ray or the CLI.
"""
