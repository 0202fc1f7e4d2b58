"""The engine: per-token losses under the base model and the weakened reference, and the scores from them.

``ablation`` makes the critical heads' attention uniform (inside the model's own attention call for ``hf``; the
q-row-zeroed export for ``vllm``); ``losses`` computes per-token losses through the model's own output path
without [tokens x vocab] logits and shares the layers below the first critical head between the two passes;
``backends`` gives one interface over transformers (``hf``) and vLLM (``vllm``); ``scorer.Scorer`` ties rows,
backend and the influence math together.

May import: ``air_ray.errors``, ``config``, ``influence``, ``data``, ``models``, ``store`` (heads.json, the ``Heads``
value); torch, transformers and vLLM. Never Ray or the CLI.
"""
