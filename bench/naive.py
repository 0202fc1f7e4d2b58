"""The naive way to compute AIR losses, as public AttentionInfluence scripts do it: the baseline of
``bench/throughput.py``.

* two separately loaded copies of the model (``AutoModelForCausalLM.from_pretrained``): the base model, and a
  second copy in which the critical heads are disabled (their query-projection rows zeroed on that copy);
* one sample at a time, no batching;
* ``model(input_ids).logits``: full-vocabulary logits at every position of the sequence;
* cross-entropy at the response positions.

    .venv/bin/python bench/naive.py [--rows 4] [--dtype float32] [--heads heads.json]

Tokenisation matches air_ray's ``chat`` format (chat template of the prompt + the response's own tokens), so
the losses are comparable with the engine's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository (air_ray)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/
from common import DEFAULT_HEADS  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_models(path, heads, dtype: str = "float32"):
    """(base model, ablated copy): two full copies of the weights."""
    base = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()
    ablated = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()
    d = ablated.config.head_dim if getattr(ablated.config, "head_dim", None) else (
        ablated.config.hidden_size // ablated.config.num_attention_heads)
    with torch.no_grad():
        for layer, head in heads:
            q = ablated.model.layers[layer].self_attn.q_proj
            q.weight[head * d : (head + 1) * d] = 0
            if q.bias is not None:
                q.bias[head * d : (head + 1) * d] = 0
    return base, ablated


def encode(tok, row: dict) -> tuple[list[int], int]:
    """(prompt ids + response ids, number of prompt ids)."""
    prompt = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    response = tok(row["response"], add_special_tokens=False)["input_ids"]
    return prompt + response, len(prompt)


def response_loss(model, ids: list[int], n_prompt: int) -> torch.Tensor:
    """Per-token cross-entropy of the response, from full logits over the whole sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()  # [pos, vocab]
    return F.cross_entropy(logits[n_prompt - 1 : -1], torch.tensor(ids[n_prompt:]), reduction="none")


def score(base, ablated, tok, rows) -> list[dict]:
    out = []
    for row in rows:
        ids, n_prompt = encode(tok, row)
        lb = response_loss(base, ids, n_prompt)
        lr = response_loss(ablated, ids, n_prompt)
        loss_base, loss_ref = lb.mean().item(), lr.mean().item()
        out.append({"id": row.get("id"), "tokens": len(ids), "loss_base": loss_base, "loss_ref": loss_ref,
                    "score": (loss_ref - loss_base) / max(loss_base, 1e-6)})
    return out


def main(argv=None) -> None:
    from air_ray.models import prepare_model, weights_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--heads", help="heads.json (default: the bench's fixed list of the default model's heads)")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "air_ray/data/gsm8k_sample.jsonl"))
    a = ap.parse_args(argv)

    heads = json.load(open(a.heads))["heads"] if a.heads else DEFAULT_HEADS
    rows = [json.loads(l) for l in open(a.data) if l.strip()][: a.rows]
    ref = prepare_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(ref.path)
    base, ablated = load_models(weights_dir(ref, a.dtype), heads, a.dtype)  # the file in that dtype (fair to both)
    t = time.perf_counter()
    res = score(base, ablated, tok, rows)
    el = time.perf_counter() - t
    for r in res:
        print(json.dumps(r))
    print(f"{sum(r['tokens'] for r in res) / el:.1f} tokens/s", file=sys.stderr)


if __name__ == "__main__":
    main()
