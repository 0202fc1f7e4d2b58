"""Step-weighted supervised fine-tuning: the collator, the Hugging Face ``Trainer`` whose loss is the weighted one
(``air_ray.training.weights``), and ``train_weighted_sft`` (``air-ray train``; compare's students; on Ray Train
through ``air_ray.pipeline.runner.train_on_cluster``).

The collator tokenizes a row as the scorer does (``air_ray.data.rows``: format ``chat`` or ``raw`` prompt ids, then
``tokenizer(response, add_special_tokens=False)``), optionally appends EOS (weight 1.0: it is in no step),
truncates on the right to ``max_length``, and pads on the right. Prompt and padding positions get label -100
and weight 0; response tokens get their step weights.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict
from typing import Sequence

from air_ray.config.commands import TrainConfig
from air_ray.errors import AirRayError
from air_ray.store.layout import training_summary
from air_ray.training.examples import training_rows
from air_ray.training.weights import IGNORE_INDEX, require_fast, weighted_causal_lm_loss, weights_from_offsets


# ----------------------------------------------------------------------------------------------
# collator


def pad_token_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS, else 0 (padding is masked out)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


class StepWeightedCollator:
    """Rows -> padded batches ``{input_ids, attention_mask, labels, weights}`` (torch tensors, [batch, pos]).

    A row is ``{prompt, response, step_spans, step_weights, tools?}`` (as ``load_training_rows`` makes) or an already
    encoded ``{input_ids, labels, weights}`` (``encode``'s output). Prompt ids follow ``air_ray.data.rows`` (format
    ``chat``: the chat template with the generation prompt; ``raw``: ``tokenizer(prompt)``); then the response
    tokens with their step weights; then EOS with weight 1.0 if ``add_eos`` and the tokenizer has one.
    Sequences longer than ``max_length`` are cut on the right. Padding is on the right: label -100, weight 0.
    """

    def __init__(self, tokenizer, format: str = "chat", max_length: int | None = None, add_eos: bool = True):
        from air_ray.data.rows import RowPreparer

        require_fast(tokenizer)
        if max_length is not None and max_length < 2:
            raise AirRayError("max_length must be >= 2")
        self.tokenizer = tokenizer
        self.preparer = RowPreparer(tokenizer, format=format)
        self.max_length = max_length
        self.add_eos = add_eos
        self.pad_id = pad_token_id(tokenizer)

    def encode(self, row: dict) -> dict:
        """-> ``{input_ids, labels, weights, truncated}`` (lists), unpadded."""
        p_ids = list(self.preparer.prompt_ids(row["prompt"], row.get("tools")))
        response = row["response"]
        enc = self.tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
        r_ids = list(enc["input_ids"])
        r_w = weights_from_offsets(response, enc["offset_mapping"], row.get("step_spans"), row.get("step_weights"))
        if self.add_eos and self.tokenizer.eos_token_id is not None:
            r_ids.append(int(self.tokenizer.eos_token_id))
            r_w.append(1.0)
        ids = p_ids + r_ids
        labels = [IGNORE_INDEX] * len(p_ids) + r_ids
        weights = [0.0] * len(p_ids) + r_w
        truncated = self.max_length is not None and len(ids) > self.max_length
        if truncated:
            ids, labels, weights = ids[:self.max_length], labels[:self.max_length], weights[:self.max_length]
        return {"input_ids": ids, "labels": labels, "weights": weights, "truncated": truncated}

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        enc = [r if "input_ids" in r else self.encode(r) for r in rows]
        n = max(len(e["input_ids"]) for e in enc)
        ids = torch.full((len(enc), n), self.pad_id, dtype=torch.long)  # [batch, pos]
        mask = torch.zeros((len(enc), n), dtype=torch.long)  # [batch, pos]
        labels = torch.full((len(enc), n), IGNORE_INDEX, dtype=torch.long)  # [batch, pos]
        weights = torch.zeros((len(enc), n), dtype=torch.float32)  # [batch, pos]
        for i, e in enumerate(enc):
            k = len(e["input_ids"])
            ids[i, :k] = torch.tensor(e["input_ids"], dtype=torch.long)
            mask[i, :k] = 1
            labels[i, :k] = torch.tensor(e["labels"], dtype=torch.long)
            weights[i, :k] = torch.tensor(e["weights"], dtype=torch.float32)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "weights": weights}


def encode_examples(examples: Sequence[dict], collator: StepWeightedCollator) -> tuple[list[dict], dict]:
    """Encode every example once; examples left with no trainable token (the prompt fills ``max_length``) are
    left out and reported, never silently."""
    features, truncated, no_target = [], 0, []
    for ex in examples:
        e = collator.encode(ex)
        truncated += e["truncated"]
        # position 0 is never a target (the shift): a trainable token needs a labelled position >= 1
        if not any(l != IGNORE_INDEX for l in e["labels"][1:]):
            no_target.append(ex.get("id"))
            continue
        features.append({"input_ids": e["input_ids"], "labels": e["labels"], "weights": e["weights"]})
    return features, {"n_encoded": len(features), "n_truncated": truncated,
                      "n_left_out_no_response_token": len(no_target), "left_out_ids": no_target[:20]}


# ----------------------------------------------------------------------------------------------
# Trainer


def weighted_trainer_class():
    """The ``transformers.Trainer`` subclass whose loss is ``weighted_causal_lm_loss`` (imported lazily)."""
    from transformers import Trainer

    class StepWeightedTrainer(Trainer):
        # per-batch weighted mean: the Trainer divides it by the gradient accumulation steps
        loss_is_scaled_for_ga = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            labels = inputs.pop("labels")  # [batch, pos]
            weights = inputs.pop("weights")  # [batch, pos]
            outputs = model(**inputs)  # no labels: the model computes no loss of its own
            loss = weighted_causal_lm_loss(outputs.logits, labels, weights)
            return (loss, outputs) if return_outputs else loss

    return StepWeightedTrainer


def build_trainer(cfg: TrainConfig, model, tokenizer, features: list[dict]):
    """A ``StepWeightedTrainer`` over encoded ``features`` (see ``encode_examples``)."""
    from transformers import TrainingArguments

    from air_ray.models.load import resolve_device

    device = resolve_device(cfg.device)
    args = TrainingArguments(
        output_dir=cfg.output.removeprefix("file://"),
        max_steps=int(cfg.max_steps),
        learning_rate=float(cfg.lr),
        per_device_train_batch_size=int(cfg.batch_size),
        gradient_accumulation_steps=int(cfg.grad_accum),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,  # keep "weights" in the batch
        dataloader_num_workers=0,
        use_cpu=device == "cpu",
        bf16=bool(cfg.bf16),
        seed=int(cfg.seed),
        disable_tqdm=True,
    )
    collator = StepWeightedCollator(tokenizer, format=cfg.format, max_length=cfg.max_length, add_eos=cfg.add_eos)
    return weighted_trainer_class()(model=model, args=args, train_dataset=features, data_collator=collator)


def load_trainable(cfg: TrainConfig):
    """``(ModelRef, tokenizer, model)`` with the model in train mode and every parameter trainable."""
    from air_ray.models import open_model

    opened = open_model(cfg)
    tokenizer = opened.tokenizer
    model = opened.load(dtype=cfg.dtype, device=cfg.device)
    ref = opened.ref
    model.train()
    model.requires_grad_(True)
    return ref, tokenizer, model


def train_weighted_sft(cfg: TrainConfig, log=print, loaded=None, quiet: bool = False, rows=None) -> dict:
    """Join, encode, fine-tune with step weights, save the model and ``training_summary.json`` into
    ``cfg.output``; returns the summary. ``loaded``: an already loaded ``load_trainable(cfg)`` triple. ``quiet``:
    without the Trainer's line per optimiser step (compare's students: the losses are in the summary). ``rows``:
    the ``TrainingRows`` to train on, already joined (``training_rows(cfg, ...)`` otherwise)."""
    from air_ray.data.rows import RowPreparer
    from air_ray.models import open_model

    cfg = cfg.validate()
    if loaded is not None:
        ref, tokenizer, model = loaded
    else:  # the tokenizer first: a join that fails does not wait for the model
        opened = open_model(cfg)
        ref, tokenizer, model = opened.ref, opened.tokenizer, None
    rows = training_rows(cfg, RowPreparer.of(tokenizer, cfg)) if rows is None else rows
    if not cfg.step_weights:  # plain SFT: no step, so every response token weighs 1.0
        rows.examples = [dict(ex, step_spans=[], step_weights=[]) for ex in rows.examples]
    report = rows.report()
    log(f"train: {report['n_examples']} of {rows.n_selected} selected rows joined"
        + (f"; left out {report['n_missing_in_scores']} not in the scores, {report['n_missing_in_corpus']} "
           "not in the corpus" if rows.missing_in_scores or rows.missing_in_corpus else ""))
    if model is None:
        ref, tokenizer, model = load_trainable(cfg)
    collator = StepWeightedCollator(tokenizer, format=cfg.format, max_length=cfg.max_length, add_eos=cfg.add_eos)
    features, enc_report = encode_examples(rows.examples, collator)
    if enc_report["n_left_out_no_response_token"]:
        log(f"train: left out {enc_report['n_left_out_no_response_token']} rows whose prompt fills "
            f"max_length {cfg.max_length} (e.g. {enc_report['left_out_ids'][:5]})")
    if not features:
        raise AirRayError("train: no trainable rows")
    trainer = build_trainer(cfg, model, tokenizer, features)
    if quiet:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    result = trainer.train()
    out = cfg.output.removeprefix("file://")
    first = trainer.is_world_process_zero()  # data parallel (Ray Train): one worker writes
    if cfg.save:
        trainer.save_model(out)  # writes on the first worker only
        if first:
            tokenizer.save_pretrained(out)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {
        "config": asdict(cfg),
        "model": {"name": ref.name, "fingerprint": ref.fingerprint},
        "join": report,
        "encode": enc_report,
        "global_step": int(trainer.state.global_step),
        "step_weights": bool(cfg.step_weights),
        "train_loss": float(result.training_loss),
        "losses": losses,
        "world_size": int(trainer.args.world_size),
        "process": {"host": socket.gethostname(), "pid": os.getpid()},  # where the first worker ran
    }
    if first:
        os.makedirs(out, exist_ok=True)
        with open(training_summary(out), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, default=str)
            f.write("\n")
        log(f"train: {summary['global_step']} steps, loss {summary['train_loss']:.4f}; wrote {out}")
    return summary
