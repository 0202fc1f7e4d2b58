"""The influence formulas on hand-computed numbers (no model, no torch)."""

import math

import numpy as np
import pytest

from air_ray.influence import EPS, StepWeighting, all_finite, bounded_weights, copy_mask, effective_token_share, \
    influence, relative_divergence, token_step_index
from air_ray.influence import softmax_weights as step_weights

SOFTMAX = StepWeighting("softmax")


def softmax_weights(scores, temperature=1.0):  # the rule by hand
    ex = [math.exp(s / temperature) for s in scores]
    return [len(scores) * e / sum(ex) for e in ex]


# tokens start at chars 0, 3, 6, 10; steps [0,6) [6,9) [9,12) [12,15)
BASE = [1.0, 2.0, 1.0, 4.0]
REF = [2.0, 2.0, 3.0, 4.0]
STARTS = [0, 3, 6, 10]
SPANS = [(0, 6), (6, 9), (9, 12), (12, 15)]


def test_influence_hand_computed():
    out = influence(BASE, REF, STARTS, SPANS, SOFTMAX)
    assert out["loss_base"] == pytest.approx(2.0)  # 8 / 4
    assert out["loss_ref"] == pytest.approx(2.75)  # 11 / 4
    assert out["score"] == pytest.approx(0.375)  # (2.75 - 2) / 2
    assert out["step_spans"] == [[0, 6], [6, 9], [9, 12], [12, 15]]
    assert out["step_token_counts"] == [2, 1, 1, 0]
    s = out["step_scores"]
    assert s[0] == pytest.approx((2.0 - 1.5) / 1.5)  # tokens 0, 1
    assert s[1] == pytest.approx(2.0)  # token 2: (3 - 1) / 1
    assert s[2] == pytest.approx(0.0)  # token 3: (4 - 4) / 4
    assert s[3] is None  # no token starts in [12, 15)
    w = out["step_weights"]
    expected = softmax_weights([1 / 3, 2.0, 0.0])
    assert w[:3] == pytest.approx(expected)
    assert w[3] == 1.0
    assert sum(w[:3]) / 3 == pytest.approx(1.0)
    assert w[1] > w[0] > w[2]


def softmax_at(t):
    return StepWeighting("softmax", temperature=t)


def test_influence_temperature():
    scores = [1 / 3, 2.0, 0.0]
    w2 = influence(BASE, REF, STARTS, SPANS, softmax_at(2.0))["step_weights"]
    assert w2[:3] == pytest.approx(softmax_weights(scores, 2.0))
    assert w2[3] == 1.0
    w1 = influence(BASE, REF, STARTS, SPANS, softmax_at(1.0))["step_weights"]
    # a higher temperature flattens the weights towards 1 ...
    assert abs(w2[1] - 1) < abs(w1[1] - 1)
    hot = influence(BASE, REF, STARTS, SPANS, softmax_at(1e6))["step_weights"]
    assert hot == pytest.approx([1.0, 1.0, 1.0, 1.0], abs=1e-5)
    # ... a low one puts all the mass (n = 3) on the best step
    cold = influence(BASE, REF, STARTS, SPANS, softmax_at(1e-3))["step_weights"]
    assert cold == pytest.approx([0.0, 3.0, 0.0, 1.0], abs=1e-9)
    # the scores themselves do not depend on the temperature
    assert influence(BASE, REF, STARTS, SPANS, softmax_at(5.0))["step_scores"][:3] == pytest.approx(scores)


def test_influence_negative_and_zero_base():
    # the reference model can be better than the base: negative scores
    out = influence([2.0, 2.0], [1.0, 1.0], [0, 1], [(0, 1), (1, 2)])
    assert out["score"] == pytest.approx(-0.5)
    assert out["step_scores"] == pytest.approx([-0.5, -0.5])
    assert out["step_weights"] == pytest.approx([1.0, 1.0])
    # a zero base loss divides by EPS, not by zero
    out = influence([0.0, 0.0], [0.5, 0.0], [0, 1], [(0, 1), (1, 2)])
    assert out["score"] == pytest.approx(0.25 / EPS)
    assert out["step_scores"] == pytest.approx([0.5 / EPS, 0.0])
    assert all_finite(out["step_weights"])


def test_influence_no_steps_and_tokens_outside_steps():
    out = influence([1.0, 3.0], [2.0, 3.0], [0, 5], [])
    assert out["score"] == pytest.approx(0.25)
    assert out["step_spans"] == [] and out["step_scores"] == [] and out["step_weights"] == []
    assert out["step_token_counts"] == []
    # the token at char 0 lies before the only step: it counts for the sample, not the step
    out = influence([1.0, 3.0], [2.0, 3.0], [0, 5], [(4, 9)])
    assert out["score"] == pytest.approx(0.25)
    assert out["step_token_counts"] == [1]
    assert out["step_scores"] == pytest.approx([0.0])
    assert out["step_weights"] == pytest.approx([1.0])


def test_influence_rejects_bad_input():
    with pytest.raises(ValueError):
        influence([], [], [], [])
    with pytest.raises(ValueError):
        influence([1.0, 2.0], [1.0], [0, 1], [])
    with pytest.raises(ValueError):
        influence([1.0, 2.0], [1.0, 2.0], [0], [])


def test_token_step_index_edges():
    spans = [(0, 5), (5, 9)]
    # a token starting exactly at a span's end belongs to the next span
    assert token_step_index([0, 4, 5, 8, 9], spans).tolist() == [0, 0, 1, 1, -1]
    # ... or to none when there is a gap
    assert token_step_index([4, 5, 6, 7, 8], [(0, 5), (7, 9)]).tolist() == [0, -1, -1, 1, 1]
    # tokens before the first step
    assert token_step_index([0, 2, 3, 10], [(3, 10)]).tolist() == [-1, -1, 0, -1]
    # no steps at all
    assert token_step_index([0, 1, 2], []).tolist() == [-1, -1, -1]
    # no tokens
    assert token_step_index([], spans).tolist() == []
    assert token_step_index([0, 1], spans).dtype == np.int64


def test_relative_divergence():
    assert relative_divergence(3.0, 2.0) == pytest.approx(0.5)
    assert relative_divergence(1.0, 2.0) == pytest.approx(-0.5)
    assert relative_divergence(2.0, 2.0) == 0.0
    assert EPS == 1e-6
    assert relative_divergence(0.5, 0.0) == pytest.approx(0.5 / 1e-6)
    assert relative_divergence(0.5, 1e-9) == pytest.approx((0.5 - 1e-9) / 1e-6)
    assert relative_divergence(1.0, -1.0) == pytest.approx(2.0 / 1e-6)  # never divides by a negative


def test_step_weights():
    assert step_weights([]) == []
    assert step_weights([None, None]) == [1.0, 1.0]
    assert step_weights([0.7]) == pytest.approx([1.0])
    assert step_weights([0.3, 0.3, 0.3]) == pytest.approx([1.0, 1.0, 1.0])
    w = step_weights([0.0, math.log(3.0), None])  # exp: 1 and 3
    assert w == pytest.approx([2 * 1 / 4, 2 * 3 / 4, 1.0])
    # softmax is shift invariant; the weights of the scored steps average 1
    scores = [0.1, -0.4, 1.3, None, 0.0]
    w1, w2 = step_weights(scores), step_weights([None if s is None else s + 100 for s in scores])
    assert w1 == pytest.approx(w2)
    assert np.mean([x for x, s in zip(w1, scores) if s is not None]) == pytest.approx(1.0)
    assert w1[3] == 1.0
    assert step_weights([1.0, 0.0], 0.5) == pytest.approx(softmax_weights([1.0, 0.0], 0.5))
    # large scores do not overflow
    assert all_finite(step_weights([1e6, 0.0]))
    assert step_weights([1e6, 0.0]) == pytest.approx([2.0, 0.0])


def test_all_finite():
    assert all_finite([1.0, 2.0], np.zeros(3))
    assert not all_finite([1.0, float("nan")])
    assert not all_finite([1.0], [float("inf")])


def test_base_loss_floor():
    """A step the base model predicts almost perfectly: with the default floor its relative score is huge and it
    takes nearly all the step weight; a floor of 0.05 nats bounds it (score = absolute increase / floor), and
    spans above the floor are unchanged."""
    base = [0.001, 2.0, 1.0]
    ref = [0.05, 2.2, 1.1]
    starts, spans = [0, 3, 6], [(0, 3), (3, 6), (6, 9)]
    default = influence(base, ref, starts, spans, SOFTMAX)
    assert default["step_scores"][0] == pytest.approx(49.0)  # (0.05 - 0.001) / 0.001
    assert default["step_weights"][0] == pytest.approx(3.0, abs=1e-6)  # all the weight
    floored = influence(base, ref, starts, spans, SOFTMAX, floor=0.05)
    assert floored["step_scores"][0] == pytest.approx(0.049 / 0.05)
    assert floored["step_scores"][1:] == default["step_scores"][1:] == pytest.approx([0.1, 0.1])
    assert floored["score"] == default["score"]  # the sample's mean base loss is above the floor
    assert 1.0 < floored["step_weights"][0] < 2.0
    assert relative_divergence(0.5, 0.0) == 0.5 / EPS == relative_divergence(0.5, 0.0, EPS)


def test_base_loss_floor_option():
    from air_ray.config import EngineOptions
    from air_ray.errors import AirRayError

    default = EngineOptions()
    assert default.base_loss_floor == EPS
    key = default.scoring_key("fp", [(1, 2)], "float32")
    assert EngineOptions(base_loss_floor=1e-6).scoring_key("fp", [(1, 2)], "float32") == key  # old outputs keep theirs
    assert EngineOptions(base_loss_floor=0.05).scoring_key("fp", [(1, 2)], "float32") != key
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(AirRayError, match="base-loss-floor"):
            EngineOptions(base_loss_floor=bad).validate()


# ------------------------------------------------------------------------------------------------------
# bounded step weights (the default), the effective token share, copy tokens (issue #25)


def token_mean(n, w):
    return sum(a * b for a, b in zip(n, w)) / sum(n)


def test_bounded_weights_hand_computed():
    # two steps of 2 and 1 tokens, mean divergence 1.0 and 4.0: mu = (2*1 + 4) / 3 = 2, sigma^2 = (2*1 + 4) / 3 = 2
    w = bounded_weights([1.0, 4.0], [2, 1], strength=0.3, w_min=0.5, w_max=2.0)
    s = math.sqrt(2)
    assert w == pytest.approx([1 - 0.3 / s, 1 + 0.3 * 2 / s])
    assert token_mean([2, 1], w) == pytest.approx(1.0)
    # no spread, one scored step, no scored step: uniform
    assert bounded_weights([0.5, 0.5, 0.5], [3, 1, 2]) == [1.0, 1.0, 1.0]
    assert bounded_weights([0.5, None], [3, 0]) == [1.0, 1.0]
    assert bounded_weights([], []) == []
    # a step without tokens keeps 1.0 and does not count
    w = bounded_weights([1.0, None, 4.0], [2, 0, 1])
    assert w[1] == 1.0 and [w[0], w[2]] == pytest.approx(bounded_weights([1.0, 4.0], [2, 1]))
    # the weights follow the divergence, not its sign or scale: shift and scale invariant
    d, n = [0.3, -1.2, 2.5, 0.9, 0.0], [4, 7, 1, 3, 9]
    assert bounded_weights(d, n) == pytest.approx(bounded_weights([10 + 3 * x for x in d], n))


@pytest.mark.parametrize("seed", range(40))
def test_bounded_weights_stay_bounded_and_renormalised(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 12))
    d = (rng.standard_cauchy(k) if seed % 2 else rng.normal(size=k)).tolist()  # heavy tails too
    n = rng.integers(1, 40, size=k).tolist()
    strength = float(rng.choice([0.1, 0.3, 1.0, 3.0]))
    lo, hi = float(rng.choice([0.0, 0.25, 0.5, 1.0])), float(rng.choice([1.0, 1.5, 2.0, 4.0]))
    w = bounded_weights(d, n, strength, lo, hi)
    assert min(w) >= lo - 1e-12 and max(w) <= hi + 1e-12
    assert token_mean(n, w) == pytest.approx(1.0, abs=1e-9)
    # the order of the steps' divergences is kept (weakly: clipping ties the extremes)
    order = np.argsort(d)
    assert all(w[order[i]] <= w[order[i + 1]] + 1e-12 for i in range(k - 1))
    if lo < 1 < hi and strength > 0:  # without clipping the share is exactly 1 / (1 + strength^2)
        raw = 1 + strength * (np.array(d) - token_mean(n, d)) / np.sqrt(token_mean(n, (np.array(d) - token_mean(n, d)) ** 2))
        if raw.min() >= lo and raw.max() <= hi:
            assert effective_token_share(n, w) == pytest.approx(1 / (1 + strength ** 2))


def test_effective_token_share():
    assert effective_token_share([3, 5], [1.0, 1.0]) == pytest.approx(1.0)
    assert effective_token_share([2, 2, 2, 2], [4.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)  # one step of four
    # (sum n w)^2 / (sum n w^2) / sum n by hand
    n, w = [1, 3], [2.0, 0.5]
    assert effective_token_share(n, w) == pytest.approx((2 + 1.5) ** 2 / (4 + 0.75) / 4)
    assert effective_token_share([], []) == 1.0 and effective_token_share([0, 0], [1.0, 1.0]) == 1.0


def test_influence_default_is_bounded():
    out = influence(BASE, REF, STARTS, SPANS)
    # step divergences: tokens 0,1 -> (1 + 0) / 2 = 0.5; token 2 -> 2; token 3 -> 0; step 4 has no token
    assert out["step_weights"][:3] == pytest.approx(bounded_weights([0.5, 2.0, 0.0], [2, 1, 1]))
    assert out["step_weights"][3] == 1.0
    assert token_mean([2, 1, 1], out["step_weights"][:3]) == pytest.approx(1.0)
    # the scores do not depend on the weighting
    soft = influence(BASE, REF, STARTS, SPANS, SOFTMAX)
    assert {k: v for k, v in out.items() if k != "step_weights"} == {k: v for k, v in soft.items() if k != "step_weights"}


def test_step_weighting_rejects_bad_values():
    for bad in (dict(rule="other"), dict(strength=-1.0), dict(w_min=1.5), dict(w_max=0.5), dict(temperature=0.0)):
        with pytest.raises(ValueError):
            StepWeighting(**bad)


def test_copy_mask_and_copy_divergence():
    prompt = [5, 7, 9, 7, 11, 3]
    response = [7, 9, 2, 7, 11, 11, 3]
    # pairs in the prompt: (5,7) (7,9) (9,7) (7,11) (11,3); the first response token is never a copy
    assert copy_mask(prompt, response).tolist() == [False, True, False, False, True, False, True]
    assert copy_mask([1], [1, 1]).tolist() == [False, False] and copy_mask(prompt, [7]).tolist() == [False]
    base, ref = [1.0, 1.0, 2.0, 1.0], [1.5, 2.0, 2.0, 3.0]
    out = influence(base, ref, [0, 1, 2, 3], [], copied=[False, True, False, True])
    assert out["n_copy_tokens"] == 2 and out["delta_copy"] == pytest.approx((1.0 + 2.0) / 2)
    out = influence(base, ref, [0, 1, 2, 3], [], copied=[False] * 4)
    assert out["n_copy_tokens"] == 0 and out["delta_copy"] is None
    assert "n_copy_tokens" not in influence(base, ref, [0, 1, 2, 3], [])
    with pytest.raises(ValueError):
        influence(base, ref, [0, 1, 2, 3], [], copied=[True])


def test_step_weighting_options_and_key():
    from air_ray.config import EngineOptions
    from air_ray.errors import AirRayError

    default = EngineOptions()
    assert default.weighting == StepWeighting()  # bounded, strength 0.3, [0.5, 2.0]
    key = default.scoring_key("fp", [(1, 2)], "float32")
    # softmax, the rule before the option, hashes as that code did: with the key formula of air_ray 0.1.0 it gives the
    # keys 0.1.0 wrote (values computed by that code); bounded gives others
    assert EngineOptions(step_weighting="softmax").scoring_key("fp", [(1, 2)], legacy="0.1.0") == "4be9fa26fe9f"
    assert EngineOptions(step_weighting="softmax", step_temperature=2.0).scoring_key(
        "fp", [(1, 2)], legacy="0.1.0") == "dd656300792c"
    assert default.scoring_key("fp", [(1, 2)], legacy="0.1.0") not in ("4be9fa26fe9f", "dd656300792c")
    assert EngineOptions(step_weighting="softmax").scoring_key("fp", [(1, 2)], "float32") != key
    for change in (dict(step_strength=0.5), dict(step_weight_min=0.2), dict(step_weight_max=3.0)):
        assert EngineOptions(**change).scoring_key("fp", [(1, 2)], "float32") != key, change
    assert EngineOptions(step_temperature=3.0).scoring_key("fp", [(1, 2)], "float32") == key  # softmax's only
    for bad in (dict(step_strength=-0.1), dict(step_weight_min=1.5), dict(step_weight_max=0.9),
                dict(step_weighting="linear")):
        with pytest.raises(AirRayError):
            EngineOptions(**bad).validate()
