"""Step-weighted supervised fine-tuning: the scores' ``step_weights`` become per-token loss weights.

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

Data (``load_training_rows``, ``StepWeightedCollator``)
-------------------------------------------------------
``load_training_rows(selection, scores, corpus)`` joins the selection (ids, in rank order) with the scores
(step spans and weights, read with a pyarrow filter on the selected ids) and the corpus rows (prompt and
response text, found by the same id the scorer used: the row's ``id`` or the canonical hash of its content).
Ids missing from the scores or the corpus raise ``AirRayError`` (or, with ``allow_missing=True``, are listed
in the returned report); they are never dropped silently. Memory: the selected rows only, whatever the size of
the scores and the corpus (both are streamed).

The collator tokenizes a row as the scorer does (``air_ray.data.rows``: format ``chat`` or ``raw`` prompt ids, then
``tokenizer(response, add_special_tokens=False)``), optionally appends EOS (weight 1.0: it is in no step),
truncates on the right to ``max_length``, and pads on the right. Prompt and padding positions get label -100
and weight 0; response tokens get their step weights.
"""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from air_ray.config.commands import TrainConfig
from air_ray.errors import AirRayError
from air_ray.store.layout import training_summary
from air_ray.store.scores import open_scores, read_selection_ids

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------
# token weights


def _check_steps(step_spans, step_weights, n_chars: int) -> tuple[list[tuple[int, int]], list[float]]:
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


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise AirRayError(f"{type(tokenizer).__name__} is not a fast tokenizer: step weights need character "
                          "offsets (return_offsets_mapping); load it with use_fast=True or convert it")


def weights_from_offsets(response: str, offsets, step_spans, step_weights) -> list[float]:
    """One weight per (start, end) character span in ``offsets`` (the rule of ``step_token_weights``): the
    weight of the step holding the span's start, 1.0 for none. Validates the steps against ``response``."""
    from air_ray.influence import token_step_index

    spans, weights = _check_steps(step_spans, step_weights, len(response))
    step_of = token_step_index([int(a) for a, _ in offsets], spans)
    return [weights[i] if i >= 0 else 1.0 for i in step_of.tolist()]


def step_token_weights(response: str, step_spans, step_weights, tokenizer) -> list[float]:
    """One weight per token of ``tokenizer(response, add_special_tokens=False)``: the weight of the step
    containing the token's first character (its offset start; see the module doc), 1.0 for tokens in no step.
    ``tokenizer`` must be a fast tokenizer (character offsets)."""
    _require_fast(tokenizer)
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


# ----------------------------------------------------------------------------------------------
# joining selection + scores + corpus


@dataclass
class TrainingRows:
    """Training examples (in selection rank order) and what could not be joined."""

    examples: list[dict]  # {id, rank, prompt, response, step_spans, step_weights}
    n_selected: int
    missing_in_scores: list[str] = field(default_factory=list)
    missing_in_corpus: list[str] = field(default_factory=list)
    corpus_rows_read: int = 0
    corpus_rows_unparsable: int = 0

    def report(self) -> dict:
        d = asdict(self)
        d.pop("examples")
        d["n_examples"] = len(self.examples)
        d["n_missing_in_scores"] = len(self.missing_in_scores)
        d["n_missing_in_corpus"] = len(self.missing_in_corpus)
        return d


def read_step_weights(scores_uri: str, ids: Iterable[str]) -> dict[str, tuple[list, list]]:
    """``{id: (step_spans, step_weights)}`` for the given ids, scanning the scores partitions with a filter."""
    columns = ("id", "step_spans", "step_weights")
    scores = open_scores(scores_uri, "train", columns=columns, require=columns)
    out: dict[str, tuple[list, list]] = {}
    for batch in scores.rows_of(ids, columns).to_batches():
        for rid, spans, weights in zip(*(batch.column(c).to_pylist() for c in ("id", "step_spans", "step_weights"))):
            item = (spans or [], weights or [])
            if rid in out and out[rid] != item:
                raise AirRayError(f"scores at {scores_uri} hold id {rid!r} twice with different step weights")
            out[rid] = item
    return out


def corpus_rows(corpus) -> Iterable[tuple[bool, object]]:
    """``(parsed, row)`` for every corpus record: a list of dicts, or URIs (files, directories, globs)."""
    from air_ray.data.corpus import expand_inputs, read_chunks

    if isinstance(corpus, (str, os.PathLike)):
        corpus = [corpus]
    corpus = list(corpus)
    if corpus and all(isinstance(c, (str, os.PathLike)) for c in corpus):
        for source in expand_inputs([os.fspath(c) for c in corpus]):
            for chunk in read_chunks(source, 4096):
                if chunk.file_error:
                    raise AirRayError(f"corpus {source} cannot be read: {chunk.file_error}")
                for text in chunk.texts:
                    try:
                        yield True, json.loads(text) if text is not None else None
                    except json.JSONDecodeError:
                        yield False, None
    else:
        for row in corpus:
            yield True, row


def load_training_rows(selection: str, scores: str, corpus, *, allow_missing: bool = False, fields=None,
                       render=None) -> TrainingRows:
    """Join selection (ids) + scores (step_spans, step_weights) + corpus (prompt/response text) by id.

    ``corpus``: a URI or list of URIs (``.jsonl``, ``.jsonl.gz``, ``.json``, ``.parquet``; files, directories or
    globs, any fsspec filesystem) or a list of row dicts, in the row forms of ``air_ray.data.rows``. Ids are those
    the scorer used (the row's ``id``, else the canonical hash of its content). Ids of the selection missing
    from the scores or the corpus raise ``AirRayError``, unless ``allow_missing`` (then they are listed in the
    result and those rows are left out). ``fields``: a ``FieldMap`` (the field flags used for scoring);
    ``render``: conversation -> the scored response text (default: ``render_response``, the think tags).
    """
    from air_ray.data.rows import FieldMap, RowError, parse_row, render_response

    fields = fields or FieldMap()
    render = render or render_response

    ids = read_selection_ids(selection)
    steps = read_step_weights(scores, ids)
    missing_scores = [i for i in ids if i not in steps]
    wanted = {i for i in ids if i in steps}
    found: dict[str, tuple] = {}
    read = unparsable = 0
    for parsed, row in corpus_rows(corpus):
        if len(found) == len(wanted):
            break  # every selected row is found: stop reading
        read += 1
        if not parsed or row is None:
            unparsable += 1
            continue
        try:
            conv = parse_row(row, fields)
        except (RowError, RecursionError):
            unparsable += 1  # such rows were rejected by the scorer too: never selected
            continue
        rid = conv.id
        if rid not in wanted:
            continue
        prompt, response = conv.prompt, render(conv)
        if rid in found and found[rid][:2] != (prompt, response):
            raise AirRayError(f"the corpus holds id {rid!r} twice with different content")
        found[rid] = (prompt, response, conv.tools)
    missing_corpus = [i for i in ids if i in wanted and i not in found]
    if (missing_scores or missing_corpus) and not allow_missing:
        parts = []
        if missing_scores:
            parts.append(f"{len(missing_scores)} not in the scores (e.g. {missing_scores[:5]})")
        if missing_corpus:
            parts.append(f"{len(missing_corpus)} not in the corpus (e.g. {missing_corpus[:5]})")
        raise AirRayError(f"of {len(ids)} selected ids, " + " and ".join(parts) +
                          "; check --scores/--corpus, or allow missing rows to train on the rest")
    examples = []
    for rank, rid in enumerate(ids, 1):
        if rid not in found:
            continue
        prompt, response, tools = found[rid]
        spans, weights = steps[rid]
        try:
            _check_steps(spans, weights, len(response))
        except AirRayError as e:
            raise AirRayError(f"id {rid!r}: the corpus row does not match its scores ({e})") from None
        examples.append({"id": rid, "rank": rank, "prompt": prompt, "tools": tools, "response": response,
                         "step_spans": spans, "step_weights": weights})
    return TrainingRows(examples, len(ids), missing_scores, missing_corpus, read, unparsable)


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

        _require_fast(tokenizer)
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


def training_rows(cfg: TrainConfig, preparer) -> TrainingRows:
    """The examples to train on: an export's rows (``--input`` an `air-ray export` directory), or the join of
    selection + scores + corpus."""
    from air_ray.data.rows import FieldMap
    from air_ray.outputs.export import is_export, read_export

    if cfg.selection is None:
        if len(cfg.input) != 1 or not is_export(cfg.input[0]):
            raise AirRayError(f"train: --input {' '.join(cfg.input)} is not an `air-ray export` directory; give "
                              "--selection and --scores to join a corpus")
        examples = read_export(cfg.input[0])
        for ex in examples:
            _check_steps(ex["step_spans"], ex["step_weights"], len(ex["response"]))
        return TrainingRows(examples, len(examples))
    return load_training_rows(cfg.selection, cfg.scores, cfg.input, allow_missing=cfg.allow_missing,
                              fields=FieldMap.of(cfg), render=preparer.response_text)


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


def train_weighted_sft(cfg: TrainConfig, log=print, loaded=None) -> dict:
    """Join, encode, fine-tune with step weights, save the model and ``training_summary.json`` into
    ``cfg.output``; returns the summary. ``loaded``: an already loaded ``load_trainable(cfg)`` triple."""
    from air_ray.data.rows import RowPreparer
    from air_ray.models import open_model

    cfg = cfg.validate()
    if loaded is not None:
        ref, tokenizer, model = loaded
    else:  # the tokenizer first: a join that fails does not wait for the model
        opened = open_model(cfg)
        ref, tokenizer, model = opened.ref, opened.tokenizer, None
    rows = training_rows(cfg, RowPreparer.of(tokenizer, cfg))
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
