"""Training: step-weighted fine-tuning of a student on selected rows.

``weights`` (step weights as per-token loss weights; the weighted causal-LM loss), ``examples`` (the selected rows
joined with their scores and corpus text, or read from an export), ``trainer`` (the collator, the Hugging Face
Trainer with the weighted loss, ``train_weighted_sft``). ``air-ray train`` runs it on Ray Train
(``air_ray.pipeline.runner``), ``air-ray compare`` trains its students with it (``air_ray.evaluation``).

May import: ``air_ray.errors``, ``influence``, ``data``, ``models``, ``store``, ``config``, ``outputs`` (reading an
export back); torch and transformers lazily. Never the engine, Ray or the CLI.
"""

from air_ray.training.examples import TrainingRows, load_training_rows, read_step_weights, training_rows
from air_ray.training.trainer import (
    StepWeightedCollator, build_trainer, encode_examples, load_trainable, pad_token_id, train_weighted_sft,
    weighted_trainer_class,
)
from air_ray.training.weights import (
    IGNORE_INDEX, check_steps, step_token_weights, weighted_causal_lm_loss, weights_from_offsets,
)

__all__ = [
    "IGNORE_INDEX", "StepWeightedCollator", "TrainingRows", "build_trainer", "check_steps", "encode_examples",
    "load_trainable", "load_training_rows", "pad_token_id", "read_step_weights", "step_token_weights",
    "train_weighted_sft", "training_rows", "weighted_causal_lm_loss", "weighted_trainer_class",
    "weights_from_offsets",
]
