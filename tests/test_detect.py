"""Detection of the retrieval (critical) heads on the real default model, float32 on CPU."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from air_ray.heads.detect import detect
from air_ray.heads.probes import synthetic_probes, tokenize_probe

pytestmark = pytest.mark.slow


# 8 probes: each is ~530 tokens, not 384 (3 shots of 32-token UUID keys do not fit in 384, see
# test_heads_rule.py::test_synthetic_probes_small_budget), so 8 cost about what 12 x 384 would; detection runs
# 3 passes a probe and 12 probes take ~2 minutes of this 2-core CPU.
# Measured answer losses (base / critical heads ablated / random heads ablated):
#   6 probes 0.520 / 5.490 / 0.780;  8 probes 0.600 / 5.782 / 0.870;  12 probes 0.527 / 4.897 / 0.749
NUM_PROBES = 8


@pytest.fixture(scope="module")
def detection(smol_tok, smol_fp32):
    model = smol_fp32
    q_before = [m.self_attn.q_proj.weight.detach().clone() for m in model.model.layers]
    probes = [tokenize_probe(smol_tok, p) for p in synthetic_probes(smol_tok, num=NUM_PROBES, tokens=384, seed=0)]
    det = detect(model, probes, top_frac=0.05, seed=0, progress=False)
    # the shared model comes back as it was: attention implementation and weights
    assert model.config._attn_implementation == "sdpa"
    assert all(torch.equal(m.self_attn.q_proj.weight, w) for m, w in zip(model.model.layers, q_before))
    print(f"\ndetect: heads {det.heads}\nablation_check "
          f"{ {k: v for k, v in det.ablation_check.items() if k != 'random_heads'} }\n"
          f"heads per layer {np.bincount([l for l, _ in det.heads], minlength=30).tolist()}\n"
          f"top scores {sorted(det.scores.ravel().round(3).tolist(), reverse=True)[:16]}")
    return det


def test_detect_picks_top_heads(detection):
    L, H = 30, 9
    scores, heads = detection.scores, detection.heads
    assert scores.shape == (L, H)
    assert ((scores >= 0) & (scores <= 1)).all()
    assert len(heads) == math.ceil(0.05 * L * H) == 14
    assert len(set(heads)) == 14
    picked = [scores[l, h] for l, h in heads]
    assert picked == sorted(picked, reverse=True)  # best first
    rest = [scores[l, h] for l in range(L) for h in range(H) if (l, h) not in set(heads)]
    assert min(picked) >= max(rest)
    assert picked[0] > 0.6 and min(picked) > 0.1  # real retrieval heads, not noise (measured 0.80 and 0.157)
    # retrieval heads live in the middle and late layers of this model
    layers = [l for l, _ in heads]
    assert sum(l >= 10 for l in layers) >= 12
    assert np.mean(layers) >= 14


def test_ablation_check(detection):
    check = detection.ablation_check
    base, ablated, rand = check["answer_loss_base"], check["answer_loss_ablated"], check["answer_loss_random_heads"]
    assert base < 1.0  # the model does the retrieval task
    assert ablated > base + 2.5  # disabling the critical heads breaks it
    assert ablated > rand + 2.0  # far more than disabling as many other heads
    assert rand < base + 1.0
    # the random control: as many heads, none of them critical, chosen by the seed
    crit = set(detection.heads)
    others = [(l, h) for l in range(30) for h in range(9) if (l, h) not in crit]
    expected = random.Random(0).sample(others, len(detection.heads))
    assert [tuple(h) for h in check["random_heads"]] == expected
