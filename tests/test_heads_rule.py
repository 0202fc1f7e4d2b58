"""The retrieval-head rule on plain arrays, and probe tokenisation (no model)."""

import json
import math

import numpy as np
import pytest

from air_ray.errors import AirRayError
from air_ray.heads.detect import copy_fraction, top_heads
from air_ray.heads.probes import Probe, ProbeTokens, read_probes, synthetic_probes, tokenize_probe

# prompt positions 0..7, answer tokens at 8, 9. The answer (20, 21) occurs in the prompt at 2-3 and, last,
# at 5-6: only 5-6 is the answer span.
IDS = [10, 11, 20, 21, 12, 20, 21, 13, 20, 21]
PROBE = ProbeTokens(input_ids=IDS, n_prompt=8, answer_span=[5, 6])


@pytest.mark.parametrize(
    "argmax, expected",
    [
        ([5, 6], 1.0),  # both answer tokens copied from the span
        ([5, 0], 0.5),  # the second row looks elsewhere
        ([2, 3], 0.0),  # the right tokens, but the first occurrence lies outside the span
        ([6, 5], 0.0),  # inside the span, but the tokens there are not the ones predicted
        ([2, 6], 0.5),
        ([7, 7], 0.0),
        ([5, 5], 0.5),  # a copy of token 0 counts for k=0 only
    ],
)
def test_copy_fraction_single_row(argmax, expected):
    assert copy_fraction(np.array(argmax), PROBE) == pytest.approx(expected)


def test_copy_fraction_span_and_equality_are_both_required():
    # position 4 is in a (wider) span but holds 12; position 2 holds 20 but is outside the span
    probe = ProbeTokens(input_ids=IDS, n_prompt=8, answer_span=[4, 5, 6])
    assert copy_fraction(np.array([4, 6]), probe) == pytest.approx(0.5)
    assert copy_fraction(np.array([2, 3]), probe) == pytest.approx(0.0)
    # with an empty span nothing is ever a copy
    empty = ProbeTokens(input_ids=IDS, n_prompt=8, answer_span=[])
    assert copy_fraction(np.array([5, 6]), empty) == 0.0


def test_copy_fraction_batched_shape():
    argmax = np.array([
        [[5, 6], [2, 3], [5, 0]],  # layer 0, heads 0..2
        [[6, 5], [5, 6], [0, 6]],  # layer 1
    ])  # [layer, head, answer]
    out = copy_fraction(argmax, PROBE)
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out, [[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]])


def test_top_heads_count_order_and_ties():
    scores = np.array([
        [0.1, 0.9, 0.5, 0.0],
        [0.9, 0.2, 0.5, 0.3],
        [0.5, 0.9, 0.0, 0.7],
    ])
    # ceil(0.25 * 12) = 3: the three 0.9s, ties by (layer, head) ascending
    assert top_heads(scores, 0.25) == [(0, 1), (1, 0), (2, 1)]
    # ceil(0.3 * 12) = ceil(3.6) = 4
    assert top_heads(scores, 0.3) == [(0, 1), (1, 0), (2, 1), (2, 3)]
    # ceil(0.45 * 12) = ceil(5.4) = 6: the three 0.5s in (layer, head) order, cut after two
    assert top_heads(scores, 0.45) == [(0, 1), (1, 0), (2, 1), (2, 3), (0, 2), (1, 2)]
    # everything, best first
    allh = top_heads(scores, 1.0)
    assert len(allh) == 12 and allh[-2:] == [(0, 3), (2, 2)]
    assert [scores[l, h] for l, h in allh] == sorted(scores.ravel(), reverse=True)
    # the smallest fraction still picks one head
    assert top_heads(scores, 0.01) == [(0, 1)]


def test_top_heads_ceil_is_exact():
    scores = np.arange(30.0).reshape(3, 10)
    assert len(top_heads(scores, 0.1)) == 3  # 0.1 * 30 = 3.0000000000000004 in floats, still 3
    assert len(top_heads(np.zeros((30, 9)), 0.05)) == math.ceil(0.05 * 270) == 14
    assert top_heads(np.zeros((30, 9)), 0.05)[:3] == [(0, 0), (0, 1), (0, 2)]  # all tied


# ----------------------------------------------------------------------------------------------
# probes, with the real tokenizer


def test_tokenize_probe_span_is_last_occurrence(smol_tok):
    answer = "violet harbor 7731"
    prompt = (f'Notes: the first code was "{answer}" and then others.\n'
              f'Record: code "{answer}" was confirmed.\nQuestion: what was the code? Answer: "')
    pt = tokenize_probe(smol_tok, Probe(prompt, answer))
    enc = smol_tok(prompt, return_offsets_mapping=True)
    first, last = prompt.find(answer), prompt.rfind(answer)
    assert first < last
    expected = [i for i, (a, _) in enumerate(enc["offset_mapping"]) if last <= a < last + len(answer)]
    assert pt.answer_span == expected
    assert expected == list(range(expected[0], expected[-1] + 1))  # contiguous
    # nothing from the first occurrence
    assert all(enc["offset_mapping"][i][0] >= last for i in pt.answer_span)
    # the span's tokens cover the answer (up to a leading space token boundary)
    a0 = enc["offset_mapping"][pt.answer_span[0]][0]
    b1 = enc["offset_mapping"][pt.answer_span[-1]][1]
    assert prompt[a0:b1] == answer
    # ids: prompt ids (with special tokens) + answer ids (without)
    answer_ids = smol_tok(answer, add_special_tokens=False)["input_ids"]
    assert pt.input_ids == list(enc["input_ids"]) + list(answer_ids)
    assert pt.n_prompt == len(enc["input_ids"])
    assert pt.n_answer == len(answer_ids)


def test_tokenize_probe_rejects_missing_answer(smol_tok):
    with pytest.raises(AirRayError):
        tokenize_probe(smol_tok, Probe("no such thing here", "zebra"))


def test_read_probes(tmp_path, smol_tok):
    good = [{"prompt": 'say "abc def": "', "answer": "abc def"}, {"prompt": "x=42; x?", "answer": "42"}]
    path = tmp_path / "probes.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in good) + "\n\n")
    probes = read_probes(str(path))
    assert probes == [Probe(r["prompt"], r["answer"]) for r in good]
    # line 4 (after a blank line 3) holds an answer that is not in its prompt
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([json.dumps(good[0]), json.dumps(good[1]), "",
                              json.dumps({"prompt": "nothing", "answer": "missing"})]) + "\n")
    with pytest.raises(AirRayError, match=r"line 4\b.*does not appear"):
        read_probes(str(bad))
    for i, text in enumerate(["{not json", json.dumps({"prompt": "p"}), json.dumps({"prompt": "p", "answer": ""}),
                              json.dumps(["p", "a"])]):
        f = tmp_path / f"broken{i}.jsonl"
        f.write_text(json.dumps(good[0]) + "\n" + text + "\n")
        with pytest.raises(AirRayError, match="line 2"):
            read_probes(str(f))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(AirRayError, match="no probes"):
        read_probes(str(empty))


def test_synthetic_probes_deterministic_and_sized(smol_tok):
    a = synthetic_probes(smol_tok, num=4, tokens=768, seed=0)
    b = synthetic_probes(smol_tok, num=4, tokens=768, seed=0)
    c = synthetic_probes(smol_tok, num=4, tokens=768, seed=1)
    assert a == b
    assert a != c
    assert len(set(a)) == 4  # different probes within a set
    for tokens, probes in [(768, a), (1024, synthetic_probes(smol_tok, num=3, tokens=1024, seed=3))]:
        for p in probes:
            assert p.answer and p.answer in p.prompt
            size = len(smol_tok(p.prompt + p.answer)["input_ids"])
            assert abs(size - tokens) <= 0.15 * tokens, (size, tokens)
            pt = tokenize_probe(smol_tok, p)
            assert pt.answer_span and pt.n_answer >= 1
            assert pt.answer_span[-1] < pt.n_prompt


@pytest.mark.xfail(strict=True, reason="known issue: with 3 shots and 32-token UUID keys the smallest probe "
                                       "(5 pairs) is ~490-580 tokens with SmolLM2's tokenizer, so budgets "
                                       "below ~500 (e.g. the demo's 384) are overshot by ~40%")
def test_synthetic_probes_small_budget(smol_tok):
    for p in synthetic_probes(smol_tok, num=4, tokens=384, seed=0):
        size = len(smol_tok(p.prompt + p.answer)["input_ids"])
        assert abs(size - 384) <= 0.15 * 384, size
