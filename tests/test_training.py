"""Step-weighted fine-tuning (air_ray.training, jobs/train_weighted_sft.py): token weights under two tokenizer
families, the weighted loss against Hugging Face's, the selection + scores + corpus join, the collator, and
(slow) a few real optimiser steps on the default model showing a step weighted 0 gets no gradient."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pyarrow as pa
import pytest
import torch

from air_ray.store import schemas as schema
from air_ray.errors import AirRayError
from air_ray.data.rows import RowPreparer, canonical_id
from air_ray.config import TrainConfig
from air_ray.training import (
    IGNORE_INDEX,
    StepWeightedCollator,
    build_trainer,
    encode_examples,
    load_training_rows,
    step_token_weights,
    weighted_causal_lm_loss,
    weights_from_offsets,
)

REPO = Path(__file__).resolve().parent.parent

# "Hi " is in no step; step 0 = "Step 1: add 2." [3, 17); "\n" (17) in no step; step 1 = "Step 2: so 5. " [18, 32)
# (its trailing space included); step 2 = "Answer: 5" [32, 41).
RESPONSE = "Hi Step 1: add 2.\nStep 2: so 5. Answer: 5"
SPANS = [[3, 17], [18, 32], [32, 41]]
WEIGHTS = [2.0, 0.0, 0.5]


def tiny_tokenizer(pre_tokenizer, texts=(RESPONSE,), **special):
    """A WordLevel tokenizer trained here on ``texts`` (no hub), wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizer
    tok.train_from_iterator(list(texts), trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", *special.values()]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", **special)


def space_glued_tokenizer(texts=(RESPONSE,), **special):
    """Words keep their leading space (" Step"), like byte-level BPE; whitespace runs are tokens of their own."""
    from tokenizers import Regex, pre_tokenizers

    return tiny_tokenizer(pre_tokenizers.Split(Regex(r" ?\S+|\s+"), behavior="isolated"), texts, **special)


def whitespace_dropping_tokenizer():
    """Offsets never include whitespace: \\w+ and punctuation runs."""
    from tokenizers import pre_tokenizers

    return tiny_tokenizer(pre_tokenizers.Whitespace())


def tokens(tok, text):
    enc = tok(text, add_special_tokens=False)
    return tok.convert_ids_to_tokens(enc["input_ids"])


# ----------------------------------------------------------------------------------------------
# step_token_weights


def offset_starts(tok, text):
    return [int(a) for a, _ in tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]


def test_step_token_weights_default_tokenizer(smol_tok):
    assert tokens(smol_tok, RESPONSE) == [
        "Hi", "ĠStep", "Ġ", "1", ":", "Ġadd", "Ġ", "2", ".", "Ċ",
        "Step", "Ġ", "2", ":", "Ġso", "Ġ", "5", ".", "ĠAnswer", ":", "Ġ", "5"]
    # byte-level BPE: the offsets of "ĠStep" and "ĠAnswer" start at their space
    assert offset_starts(smol_tok, RESPONSE) == [
        0, 2, 7, 8, 9, 10, 14, 15, 16, 17,
        18, 22, 23, 24, 25, 28, 29, 30, 31, 38, 39, 40]
    w = step_token_weights(RESPONSE, SPANS, WEIGHTS, smol_tok)
    assert w == [
        1.0,  # "Hi" (0): before the first step
        1.0,  # "ĠStep" (2): its first character, the space at 2, is in no step
        2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0,  # 7 .. 16: step 0 (whitespace-only "Ġ" included)
        1.0,  # "Ċ" (17) between steps: in no step
        0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,  # 18 .. 30: step 1
        0.0,  # "ĠAnswer" (31): its space is step 1's last character, so step 1
        0.5, 0.5, 0.5]  # 38, 39, 40: step 2


def test_step_token_weights_tiny_tokenizer_with_glued_spaces():
    tok = space_glued_tokenizer()
    assert tokens(tok, RESPONSE) == ["Hi", " Step", " 1:", " add", " 2.", "\n", "Step", " 2:", " so", " 5.",
                                     " Answer:", " 5"]
    assert offset_starts(tok, RESPONSE) == [0, 2, 7, 10, 14, 17, 18, 22, 25, 28, 31, 39]
    assert step_token_weights(RESPONSE, SPANS, WEIGHTS, tok) == [
        1.0,  # "Hi" (0)
        1.0,  # " Step" (2): space in no step
        2.0, 2.0, 2.0,  # " 1:" (7), " add" (10), " 2." (14): step 0
        1.0,  # "\n" (17)
        0.0, 0.0, 0.0, 0.0,  # "Step" (18), " 2:" (22), " so" (25), " 5." (28): step 1
        0.0,  # " Answer:" (31): space is step 1's last character
        0.5]  # " 5" (39): step 2


def test_step_token_weights_tiny_tokenizer_without_spaces():
    tok = whitespace_dropping_tokenizer()
    assert tokens(tok, RESPONSE) == ["Hi", "Step", "1", ":", "add", "2", ".", "Step", "2", ":", "so", "5", ".",
                                     "Answer", ":", "5"]
    assert offset_starts(tok, RESPONSE) == [0, 3, 8, 9, 11, 15, 16, 18, 23, 24, 26, 29, 30, 32, 38, 40]
    # no token starts at a space: "Step" (3) is in step 0 and "Answer" (32) in step 2, unlike the glued tokens
    assert step_token_weights(RESPONSE, SPANS, WEIGHTS, tok) == [
        1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5]


def test_weights_follow_the_scorers_token_to_step_assignment(smol_tok):
    """The scorer's token starts (air_ray.data.rows) mapped to steps by air_ray.influence.token_step_index give the
    same per-token weights: training weights and step scores describe the same tokens."""
    from air_ray.influence import token_step_index

    prepared = RowPreparer(smol_tok, format="raw").prepare({"prompt": "Q?", "response": RESPONSE})
    step_of = token_step_index(prepared.token_starts, SPANS).tolist()
    assert step_token_weights(RESPONSE, SPANS, WEIGHTS, smol_tok) == [WEIGHTS[i] if i >= 0 else 1.0 for i in step_of]
    # with this response's own "lines" steps too (as the scorer splits them)
    spans = [list(s) for s in prepared.step_spans]
    w = [0.5 + i for i in range(len(spans))]
    step_of = token_step_index(prepared.token_starts, spans).tolist()
    assert len(set(step_of)) > 1
    assert step_token_weights(RESPONSE, spans, w, smol_tok) == [w[i] if i >= 0 else 1.0 for i in step_of]


def test_no_steps_means_weight_one(smol_tok):
    n = len(smol_tok(RESPONSE, add_special_tokens=False)["input_ids"])
    assert step_token_weights(RESPONSE, [], [], smol_tok) == [1.0] * n
    assert step_token_weights(RESPONSE, None, None, smol_tok) == [1.0] * n


def test_first_character_rule_on_hand_made_offsets():
    text = "ab\n\n cd  ef"
    #       01 2 3 45678910   (a0 b1 \n2 \n3 ' '4 c5 d6 ' '7 ' '8 e9 f10)
    offsets = [(0, 2), (2, 5), (2, 6), (5, 7), (7, 9), (7, 10), (4, 4), (11, 11), (1, 3), (4, 7)]
    spans, w = [[0, 2], [5, 11]], [3.0, 0.25]
    assert weights_from_offsets(text, offsets, spans, w) == [
        3.0,   # "ab" (0)
        1.0,   # "\n\n " (2): in no step
        1.0,   # "\n\n c" (2): its first character is in no step, though "c" is in step 1
        0.25,  # "cd" (5)
        0.25,  # "  " (7): whitespace inside step 1
        0.25,  # "  e" (7)
        1.0,   # empty span at 4 (between the steps)
        1.0,   # empty span at 11, the end of the text: in no step (spans are half-open)
        3.0,   # "b\n" (1): starts in step 0, ends outside it
        1.0,   # " cd" (4): starts at the space before step 1
    ]
    # touching steps: a token starting at a step's end belongs to the next step
    assert weights_from_offsets(text, [(0, 1), (1, 3), (2, 3), (3, 4)], [[0, 2], [2, 4]], [5.0, 7.0]) == [
        5.0, 5.0, 7.0, 7.0]
    assert weights_from_offsets(text, [], spans, w) == []


def test_step_token_weights_rejects_bad_input(smol_tok):
    with pytest.raises(AirRayError, match="2 step spans but 1 step weights"):
        step_token_weights(RESPONSE, [[0, 3], [3, 5]], [1.0], smol_tok)
    with pytest.raises(AirRayError, match="sorted, disjoint"):
        step_token_weights(RESPONSE, [[0, 5], [3, 8]], [1.0, 1.0], smol_tok)
    with pytest.raises(AirRayError, match="inside the response"):
        step_token_weights(RESPONSE, [[0, len(RESPONSE) + 1]], [1.0], smol_tok)
    with pytest.raises(AirRayError, match="finite number"):
        step_token_weights(RESPONSE, [[0, 3]], [float("nan")], smol_tok)
    with pytest.raises(AirRayError, match="finite number"):
        step_token_weights(RESPONSE, [[0, 3]], [-1.0], smol_tok)


def test_slow_tokenizer_is_refused():
    class SlowTokenizer:
        is_fast = False

        def __call__(self, *a, **k):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")

    with pytest.raises(AirRayError, match="not a fast tokenizer.*offsets"):
        step_token_weights(RESPONSE, SPANS, WEIGHTS, SlowTokenizer())
    with pytest.raises(AirRayError, match="not a fast tokenizer"):
        StepWeightedCollator(SlowTokenizer(), format="raw")


# ----------------------------------------------------------------------------------------------
# weighted_causal_lm_loss


def _batch(seed=0, b=2, t=7, v=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :2] = IGNORE_INDEX  # a prompt
    labels[1, -2:] = IGNORE_INDEX  # padding
    return logits, labels


def test_all_ones_equals_hf_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits, labels = _batch()
    ours = weighted_causal_lm_loss(logits, labels, torch.ones(labels.shape))
    hf = ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])
    assert torch.allclose(ours, hf, rtol=1e-6, atol=1e-7)
    assert torch.allclose(weighted_causal_lm_loss(logits, labels, torch.full(labels.shape, 3.5)), hf, rtol=1e-6)


def _manual(logits, labels, weights):
    total = num = 0.0
    for i in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[i, t + 1])
            if y == IGNORE_INDEX:
                continue
            nll = -torch.log_softmax(logits[i, t].double(), -1)[y].item()
            total += float(weights[i, t + 1]) * nll
            num += float(weights[i, t + 1])
    return total / num


def test_weighted_loss_is_normalised_by_the_weight_sum():
    logits, labels = _batch(seed=1)
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(2)) * 3
    weights[0, 3] = 0.0
    ours = weighted_causal_lm_loss(logits, labels, weights).item()
    assert ours == pytest.approx(_manual(logits, labels, weights), rel=1e-5)
    # not a plain mean: with these weights it differs from the unweighted loss
    assert abs(ours - weighted_causal_lm_loss(logits, labels, torch.ones(labels.shape)).item()) > 1e-3


def test_ignore_index_is_respected():
    logits, labels = _batch(seed=3)
    weights = torch.ones(labels.shape)
    base = weighted_causal_lm_loss(logits, labels, weights)
    # weights at ignored labels do not count, however large
    w2 = weights.clone()
    w2[labels == IGNORE_INDEX] = 1e6
    assert torch.allclose(weighted_causal_lm_loss(logits, labels, w2), base)
    # the logits predicting an ignored label (or nothing: the last position) do not matter
    l2 = logits.clone()
    l2[0, :1] += 100 * torch.randn(1, logits.shape[-1])  # predicts labels[0, 1] (ignored)
    l2[:, -1] = 0  # predicts nothing
    assert torch.allclose(weighted_causal_lm_loss(l2, labels, weights), base)
    # and a custom ignore_index
    lab = labels.clone()
    lab[lab == IGNORE_INDEX] = -1
    assert torch.allclose(weighted_causal_lm_loss(logits, lab, weights, ignore_index=-1), base)


def test_zero_weight_position_gets_zero_gradient():
    logits, labels = _batch(seed=4)
    weights = torch.ones(labels.shape)
    weights[1, 3] = 0.0  # the label at 3 is predicted by the logits at 2
    logits[1, 2, labels[1, 3]] = float("-inf")  # even an infinite loss there must not leak (no 0 * inf)
    logits.requires_grad_(True)
    loss = weighted_causal_lm_loss(logits, labels, weights)
    assert torch.isfinite(loss)
    loss.backward()
    g = logits.grad
    assert torch.isfinite(g).all()
    assert torch.equal(g[1, 2], torch.zeros_like(g[1, 2]))
    assert g[1, 1].abs().sum() > 0 and g[1, 3].abs().sum() > 0  # neighbours are trained
    assert torch.equal(g[0, 0], torch.zeros_like(g[0, 0]))  # predicts an ignored label
    assert torch.equal(g[:, -1], torch.zeros_like(g[:, -1]))  # predicts nothing


def test_all_zero_weights_give_zero_loss_and_gradient():
    logits, labels = _batch(seed=5)
    logits.requires_grad_(True)
    loss = weighted_causal_lm_loss(logits, labels, torch.zeros(labels.shape))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_loss_rejects_bad_shapes():
    logits, labels = _batch()
    with pytest.raises(ValueError, match="batch, pos"):
        weighted_causal_lm_loss(logits, labels, torch.ones(labels.shape[0], labels.shape[1] + 1))
    with pytest.raises(ValueError, match="batch, pos"):
        weighted_causal_lm_loss(logits[0], labels[0], torch.ones(labels.shape[1]))


# ----------------------------------------------------------------------------------------------
# join: selection + scores + corpus


def score_row(rid, spans, weights, score=1.0, domain=None):
    row = {"id": rid, "domain": domain, "source": "corpus.jsonl", "n_prompt_tokens": 5, "n_response_tokens": 9,
           "loss_base": 1.0, "loss_ref": 1.5, "score": score, "step_spans": spans,
           "step_token_counts": [1] * len(spans), "step_scores": [0.1] * len(spans), "step_weights": weights}
    for f in schema.SCORES:  # columns added to the schema later: a typed default when not nullable
        if f.name not in row:
            row[f.name] = None if f.nullable else "" if pa.types.is_string(f.type) else f.type.to_pandas_dtype()().item()
    return row


CORPUS = [
    {"id": "a", "prompt": "What is 1 + 1?", "response": "One plus one.\nIt is 2."},
    {"id": "b", "messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there."}]},
    {"prompt": "No id here", "response": "First.\nSecond."},
    {"id": "d", "prompt": "Not selected", "response": "Skip.\nMe."},
]
C_ID = canonical_id("No id here", "First.\nSecond.")


def write_inputs(root: str, selected=("b", "a", C_ID), corpus=CORPUS, extra_lines=("{not json",)):
    """scores in two partitions, a selection in non-rank order, a JSONL corpus, on any fsspec URI ``root``."""
    fs, base = fsspec.core.url_to_fs(root)
    scores = [score_row("a", [[0, 13], [14, 22]], [1.5, 0.5], 3.0),
              score_row("b", [[0, 9]], [1.0], 2.0),
              score_row(C_ID, [[0, 6], [7, 14]], [0.0, 2.0], 1.0),
              score_row("d", [[0, 5], [6, 9]], [1.0, 1.0], 0.5)]
    for i, part in enumerate((scores[:2], scores[2:])):
        schema.write_table_atomic(schema.to_table(part, schema.SCORES), fs, f"{base}/score/scores/part-{i}.parquet")
    sel = [{"id": rid, "score": 0.0, "rank": r, "domain": None} for r, rid in enumerate(selected, 1)]
    schema.write_table_atomic(schema.to_table(sel[::-1], schema.SELECTION), fs, f"{base}/select/selection.parquet")
    lines = [json.dumps(r) for r in corpus] + list(extra_lines)
    fs.makedirs(f"{base}/corpus", exist_ok=True)
    with fs.open(f"{base}/corpus/rows.jsonl", "w") as f:
        f.write("\n".join(lines) + "\n")
    return f"{root}/select", f"{root}/score", f"{root}/corpus"


def test_join_selection_scores_corpus(tmp_path):
    sel, scores, corpus = write_inputs(str(tmp_path))
    rows = load_training_rows(sel, scores, corpus)
    assert [e["id"] for e in rows.examples] == ["b", "a", C_ID]  # rank order
    assert [e["rank"] for e in rows.examples] == [1, 2, 3]
    b, a, c = rows.examples
    assert a["prompt"] == "What is 1 + 1?" and a["response"] == "One plus one.\nIt is 2."
    assert a["step_spans"] == [[0, 13], [14, 22]] and a["step_weights"] == [1.5, 0.5]
    assert b["prompt"] == [{"role": "user", "content": "Say hi"}] and b["response"] == "Hi there."
    assert c["step_weights"] == [0.0, 2.0]
    rep = rows.report()
    assert rep["n_selected"] == 3 and rep["n_examples"] == 3
    assert rep["n_missing_in_corpus"] == 0 and rep["n_missing_in_scores"] == 0
    # a selection file path works as well as its directory, and the corpus may be a list of rows
    rows2 = load_training_rows(f"{sel}/selection.parquet", scores, CORPUS)
    assert rows2.examples == rows.examples


def test_join_on_an_fsspec_uri():
    root = "memory://training-join-test"
    try:
        sel, scores, corpus = write_inputs(root)
        rows = load_training_rows(sel, scores, corpus)
        assert [e["id"] for e in rows.examples] == ["b", "a", C_ID]
    finally:
        fsspec.filesystem("memory").rm("/training-join-test", recursive=True)


def test_ids_missing_from_the_corpus_are_never_dropped_silently(tmp_path):
    sel, scores, corpus = write_inputs(str(tmp_path), corpus=[r for r in CORPUS if r.get("id") != "a"])
    with pytest.raises(AirRayError, match=r"of 3 selected ids, 1 not in the corpus \(e.g. \['a'\]\)"):
        load_training_rows(sel, scores, corpus)
    rows = load_training_rows(sel, scores, corpus, allow_missing=True)
    assert [e["id"] for e in rows.examples] == ["b", C_ID]
    assert rows.missing_in_corpus == ["a"] and rows.report()["n_missing_in_corpus"] == 1


def test_ids_missing_from_the_scores_raise(tmp_path):
    sel, scores, corpus = write_inputs(str(tmp_path), selected=("a", "zzz"))
    with pytest.raises(AirRayError, match=r"1 not in the scores \(e.g. \['zzz'\]\)"):
        load_training_rows(sel, scores, corpus)
    rows = load_training_rows(sel, scores, corpus, allow_missing=True)
    assert [e["id"] for e in rows.examples] == ["a"] and rows.missing_in_scores == ["zzz"]


def test_a_corpus_that_does_not_match_the_scores_raises(tmp_path):
    corpus = [dict(r, response="short") if r.get("id") == "a" else r for r in CORPUS]
    sel, scores, corpus_uri = write_inputs(str(tmp_path), corpus=corpus)
    with pytest.raises(AirRayError, match="'a': the corpus row does not match its scores"):
        load_training_rows(sel, scores, corpus_uri)


# ----------------------------------------------------------------------------------------------
# collator


def test_collator_raw_format_tiny_tokenizer():
    texts = ["Q1?", "Q two?", "Hi Step 1: add 2.\nStep 2: so 5. Answer: 5", "A b.\nC d."]
    tok = space_glued_tokenizer(texts)
    rows = [{"prompt": "Q1?", "response": RESPONSE, "step_spans": SPANS, "step_weights": WEIGHTS},
            {"prompt": "Q two?", "response": "A b.\nC d.", "step_spans": [[0, 4], [5, 9]], "step_weights": [0.0, 4.0]}]
    batch = StepWeightedCollator(tok, format="raw")(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "weights"}
    n0 = 1 + 12  # "Q1?" + the 12 response tokens; no EOS (the tokenizer has none)
    p1 = tok("Q two?")["input_ids"]
    r1 = tok("A b.\nC d.", add_special_tokens=False)["input_ids"]
    n1 = len(p1) + len(r1)
    assert batch["input_ids"].shape == (2, max(n0, n1))
    r0 = tok(RESPONSE, add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0].tolist() == tok("Q1?")["input_ids"] + r0
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] + r0
    assert batch["weights"][0].tolist() == [0.0] + step_token_weights(RESPONSE, SPANS, WEIGHTS, tok)
    assert batch["attention_mask"][0].tolist() == [1] * n0
    # the shorter row: padded on the right with the pad id, label -100, weight 0, mask 0
    pad = n0 - n1
    assert pad > 0
    assert batch["input_ids"][1].tolist() == p1 + r1 + [tok.pad_token_id] * pad
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * len(p1) + r1 + [IGNORE_INDEX] * pad
    assert batch["weights"][1].tolist() == [0.0] * len(p1) + [0.0, 0.0, 1.0, 4.0, 4.0] + [0.0] * pad
    assert batch["attention_mask"][1].tolist() == [1] * n1 + [0] * pad


def test_collator_chat_format_default_tokenizer(smol_tok):
    row = {"prompt": "What is 2 + 3?", "response": RESPONSE, "step_spans": SPANS, "step_weights": WEIGHTS}
    coll = StepWeightedCollator(smol_tok, format="chat")
    e = coll.encode(row)
    p_ids = RowPreparer(smol_tok, format="chat").prompt_ids("What is 2 + 3?")
    r_ids = smol_tok(RESPONSE, add_special_tokens=False)["input_ids"]
    eos = smol_tok.eos_token_id
    assert e["input_ids"] == p_ids + r_ids + [eos]
    assert e["labels"] == [IGNORE_INDEX] * len(p_ids) + r_ids + [eos]
    assert e["weights"] == [0.0] * len(p_ids) + step_token_weights(RESPONSE, SPANS, WEIGHTS, smol_tok) + [1.0]
    assert not e["truncated"]
    no_eos = StepWeightedCollator(smol_tok, format="chat", add_eos=False).encode(row)
    assert no_eos["input_ids"] == p_ids + r_ids
    # truncation on the right
    k = len(p_ids) + 3
    cut = StepWeightedCollator(smol_tok, format="chat", max_length=k).encode(row)
    assert cut["truncated"] and cut["input_ids"] == (p_ids + r_ids)[:k] and len(cut["weights"]) == k


def test_encode_examples_reports_rows_without_response_tokens(smol_tok):
    rows = [{"id": "short", "prompt": "Hi", "response": "Yes.", "step_spans": [[0, 4]], "step_weights": [1.0]},
            {"id": "long", "prompt": "word " * 200, "response": "Yes.", "step_spans": [], "step_weights": []}]
    coll = StepWeightedCollator(smol_tok, format="raw", max_length=64)
    features, rep = encode_examples(rows, coll)
    yes = smol_tok("Yes.", add_special_tokens=False)["input_ids"] + [smol_tok.eos_token_id]
    assert len(features) == 1 and features[0]["labels"][-len(yes):] == yes
    assert rep["n_left_out_no_response_token"] == 1 and rep["left_out_ids"] == ["long"] and rep["n_truncated"] == 1
    batch = coll(features)  # encoded features pass straight through
    assert batch["input_ids"].shape == (1, len(features[0]["input_ids"]))


# ----------------------------------------------------------------------------------------------
# the job


def test_job_arguments(monkeypatch):
    """The job is `air-ray train`: the same options (--corpus still accepted for --input), parsed by the CLI."""
    from air_ray import cli

    _, cfg = cli.parse(["train", "--selection", "s", "--scores", "sc", "--input", "c1", "c2", "--output", "o",
                        "--max-steps", "3", "--lr", "2e-5", "--batch-size", "2", "--max-length", "64"])
    assert (cfg.selection, cfg.scores, cfg.input, cfg.output) == ("s", "sc", ["c1", "c2"], "o")
    assert (cfg.max_steps, cfg.lr, cfg.batch_size, cfg.max_length) == (3, 2e-5, 2, 64)
    assert cfg.model == "smollm2-135m" and cfg.format == "chat" and cfg.add_eos
    assert cli.parse(["train", "--selection", "s", "--scores", "sc", "--corpus", "c", "--output", "o",
                      "--no-eos"])[1].input == ["c"]
    src = (REPO / "jobs" / "train_weighted_sft.py").read_text()
    imports = [l for l in src.splitlines() if l.startswith(("import ", "from "))]
    assert imports.index("import _jobpath  # noqa: F401  (first: fixes sys.path; jobs/select.py would shadow the "
                         "stdlib select)") < imports.index("from air_ray.cli import main")
    assert 'main(["train", *sys.argv[1:]])' in src


def test_job_reports_missing_rows_as_an_error(tmp_path):
    sel, scores, corpus = write_inputs(str(tmp_path), corpus=CORPUS[1:])
    p = subprocess.run([sys.executable, str(REPO / "jobs" / "train_weighted_sft.py"), "--selection", sel,
                        "--scores", scores, "--input", corpus, "--output", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    # the driver's own output: no traceback (Ray's worker lines, "(TrainController pid=...) ...", may carry one of
    # Ray Train's own under load: "Failed to send resource request ... safe to ignore")
    driver = "\n".join(line for line in p.stderr.splitlines() if not line.startswith("("))
    assert "1 not in the corpus" in driver and "Traceback" not in driver


@pytest.mark.slow
def test_train_runs_on_ray_train_workers(tmp_path, tiny_model):
    """`air-ray train` fine-tunes on Ray Train workers (TorchTrainer), not in its own process: one CPU worker takes
    the same steps as the plain Trainer in this process; two workers train data parallel."""
    from safetensors.torch import load_file

    from air_ray.config import TrainConfig
    from air_ray.training import train_weighted_sft

    model, _ = tiny_model
    sel, scores, corpus = write_inputs(str(tmp_path))
    common = dict(selection=sel, scores=scores, input=[corpus], model=str(model), max_steps=2, batch_size=2, lr=1e-3,
                  device="cpu")

    def cli(out: str, *extra):
        args = [f"--{k.replace('_', '-')}={v}" for k, v in common.items() if k != "input"]
        p = subprocess.Popen([sys.executable, "-m", "air_ray", "train", *args, "--input", corpus, "--output", out,
                              "--address", "local", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        stdout, stderr = p.communicate(timeout=900)
        assert p.returncode == 0, stdout[-2000:] + stderr[-3000:]
        return p.pid, stdout, json.loads((Path(out) / "training_summary.json").read_text())

    pid, stdout, one = cli(str(tmp_path / "one"), "--cpus-per-worker=1")
    assert "1 Ray Train worker x 0 GPU, 1 CPU" in stdout
    assert one["world_size"] == 1 and one["process"]["pid"] != pid and one["global_step"] == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker had
    try:
        here = train_weighted_sft(TrainConfig(**common, output=str(tmp_path / "here")), log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    assert one["losses"] == pytest.approx(here["losses"], rel=1e-5)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "here" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5

    _, _, two = cli(str(tmp_path / "two"), "--workers=2", "--cpus-per-worker=1")
    assert two["world_size"] == 2 and two["global_step"] == 2 and all(math.isfinite(x) for x in two["losses"])
    c, init = load_file(tmp_path / "two" / "model.safetensors"), load_file(Path(model) / "model.safetensors")
    assert max((c[k] - init[k]).abs().max().item() for k in init if k in c) > 1e-4  # it trained
    assert max((c[k] - a[k]).abs().max().item() for k in a) > 0  # on other batches than one worker


# ----------------------------------------------------------------------------------------------
# slow: real optimiser steps on the default model


@pytest.mark.slow
def test_weighted_sft_on_the_default_model(smol_ref, tmp_path):
    """Through the job's Trainer (build_trainer / train_weighted_sft): the logits predicting the tokens of a
    step weighted 0 get exactly zero gradient, so rewriting that (last) step leaves every parameter gradient
    unchanged; then a few real optimiser steps run on Parquet inputs and the model is saved."""
    from air_ray.training import load_trainable, train_weighted_sft

    # One thread: on a 2-core machine shared with other processes, two OpenMP threads spin against each other and
    # CPU training gets ~10x slower (measured 42 s vs 4 s for the two optimiser steps below).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _weighted_sft_on_the_default_model(smol_ref, tmp_path, load_trainable, train_weighted_sft)
    finally:
        torch.set_num_threads(threads)


def _weighted_sft_on_the_default_model(smol_ref, tmp_path, load_trainable, train_weighted_sft):
    sel, scores, corpus = write_inputs(str(tmp_path))
    cfg = TrainConfig(selection=sel, scores=scores, input=[corpus], output=str(tmp_path / "sft"), model=smol_ref.name,
                      max_steps=2, lr=1e-4, batch_size=2, max_length=48, format="raw", device="cpu", add_eos=False)
    loaded = load_trainable(cfg)
    _, tok, model = loaded

    def row(last: str, w: float) -> dict:
        r = "3 + 4 = 7.\n" + last
        return {"prompt": "3 + 4?", "response": r, "step_spans": [[0, 10], [11, len(r)]], "step_weights": [1.0, w]}

    trainer = build_trainer(cfg, model, tok, [])
    trainer.current_gradient_accumulation_steps = 1  # set by train(); training_step reads it
    captured = {}

    def keep_logits(module, inputs, output):
        output.retain_grad()
        captured["logits"] = output

    hook = model.lm_head.register_forward_hook(keep_logits)
    try:
        def step(r):
            model.zero_grad(set_to_none=True)
            batch = trainer.data_collator([r])
            trainer.training_step(model, batch)
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            return batch, grads, captured["logits"].grad[0].detach().clone()

        batch, g_a, logit_grad = step(row("So it is 7.", 0.0))
        _, g_b, _ = step(row("Hence, nine!", 0.0))
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)

    labels, weights = batch["labels"][0], batch["weights"][0]
    predicted_by = {t - 1: float(weights[t]) for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX}
    zero = [p for p, w in predicted_by.items() if w == 0.0]
    live = [p for p, w in predicted_by.items() if w > 0.0]
    assert len(zero) >= 3 and len(live) >= 3
    for p in zero:  # the zero-weight step's tokens: not one nonzero gradient entry on their logits
        assert torch.count_nonzero(logit_grad[p]) == 0, p
    for p in live:
        assert logit_grad[p].abs().sum() > 0, p
    assert len(g_a) > 100 and g_a.keys() == g_b.keys()
    # the last step's text changed but is weighted 0: the parameter gradients do not move
    scale = max(g.abs().max().item() for g in g_a.values())
    assert scale > 0
    worst = max((g_a[n] - g_b[n]).abs().max().item() for n in g_a)
    assert worst <= 1e-5 * scale, worst

    # a few real optimiser steps through the job's function, on the Parquet inputs
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    summary = train_weighted_sft(cfg, log=lambda *_: None, loaded=loaded)
    assert summary["global_step"] == 2 and len(summary["losses"]) == 2
    assert all(math.isfinite(x) for x in summary["losses"])
    assert summary["join"]["n_examples"] == 3
    assert not torch.equal(before, model.model.layers[0].self_attn.q_proj.weight.detach())
    out = tmp_path / "sft"
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))
    assert json.loads((out / "training_summary.json").read_text())["global_step"] == 2
