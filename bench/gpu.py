"""GPU throughput of the scoring engine on random-init weights (no network, no checkpoint): tokens/s and MFU.

    bench/gpu.sh [--rows 512] [--batch-tokens 32768] [--compare-plain]      # CUDA, bf16, ~1.5B Qwen2 shape
    .venv/bin/python bench/gpu.py --tiny --device cpu --dtype float32       # smoke test of this script

The model is a Qwen2-1.5B-shaped decoder (28 layers, d_model 1536, 12 query / 2 KV heads, d_ff 8960, vocab
151936, tied embeddings) built from its config with random weights, on the device directly. Rows are random
token ids with lengths drawn uniformly from [--min-len, --max-len], the first 40 % of each the "prompt".
Critical heads: --heads random heads at layers >= --first-layer (default 0.55 L, as SmolLM2's 17 of 30).

What runs is the engine's own path: ``air_ray.engine.losses.batch_by_tokens`` (token budget, length-sorted) and
``air_ray.engine.losses.token_nll_pair`` (shared prefix below the first ablated layer, LM head at response
positions in chunks) with ``air_ray.engine.ablation.HeadAblation`` (the model's kernel, disabled heads uniform); ``--compare-plain`` also runs the two full passes and checks the
losses agree. The ceiling is this device's measured matmul rate on the model's projection shapes (M = 8192
tokens) in the same dtype; FLOPs are counted as in bench/throughput.py (``count_flops``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import count_flops, dims  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_config(tiny: bool):
    from transformers import Qwen2Config

    if tiny:  # smoke test: runs on a CPU in seconds
        return Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                           tie_word_embeddings=True)
    return Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_ceiling(m: dict, dtype, device: str, seconds: float = 3.0, tokens: int = 8192) -> float:
    """FLOP/s of x [tokens, k] @ w.t() (w [n, k], the nn.Linear layout) over one layer's projections."""
    d, dh, H, KV, ff = m["d"], m["dh"], m["H"], m["KV"], m["ff"]
    shapes = [(d, H * dh), (d, KV * dh), (d, KV * dh), (H * dh, d), (d, ff), (d, ff), (ff, d)]
    g = torch.Generator(device=device).manual_seed(0)
    xs = {k: torch.randn(tokens, k, device=device, generator=g).to(dtype) for k in {s[0] for s in shapes}}
    ws = [torch.randn(n, k, device=device, generator=g).to(dtype) for k, n in shapes]
    for (k, _), w in zip(shapes, ws):
        torch.matmul(xs[k], w.t())
    sync(device)
    flops, t0, reps = 0.0, time.perf_counter(), 0
    while reps < 3 or time.perf_counter() - t0 < seconds:
        for (k, n), w in zip(shapes, ws):
            torch.matmul(xs[k], w.t())
            flops += 2 * tokens * k * n
        reps += 1
        sync(device)
    return flops / (time.perf_counter() - t0)


def main(argv=None) -> int:
    from air_ray.engine.ablation import HeadAblation
    from air_ray.engine.losses import batch_by_tokens, token_nll_pair

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--tiny", action="store_true", help="a tiny Qwen2 config (CPU smoke test)")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--min-len", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--batch-tokens", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=14, help="number of random critical heads")
    ap.add_argument("--first-layer", type=int, default=None, help="lowest ablated layer (default 0.55 L)")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attn_implementation (the ablation "
                                                                               "wraps these two)")
    ap.add_argument("--compare-plain", action="store_true", help="also the two full passes; losses must agree")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the result here too")
    a = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available (this torch build or machine); use --device cpu --tiny to smoke-test")
    dtype = DTYPES[a.dtype]
    torch.manual_seed(a.seed)
    config = make_config(a.tiny)
    t = time.perf_counter()
    with torch.device(a.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=a.attn)
    model.eval().requires_grad_(False)
    m = dims(model.config)
    sync(a.device)
    print(f"model: Qwen2 {m['L']} layers, d_model {m['d']}, {m['H']}/{m['KV']} heads, d_ff {m['ff']}, vocab "
          f"{m['V']}; {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, {a.dtype}, {a.attn}, "
          f"built in {time.perf_counter() - t:.1f} s on {a.device}", flush=True)

    rng = random.Random(a.seed)
    first = a.first_layer if a.first_layer is not None else round(0.55 * m["L"])
    pool = [(l, h) for l in range(first, m["L"]) for h in range(m["H"])]
    heads = sorted(rng.sample(pool, min(a.heads, len(pool))))
    heads[0] = (first, heads[0][1])  # the lowest ablated layer is first_layer
    ablation = HeadAblation(model, heads)
    lens = [rng.randint(a.min_len, a.max_len) for _ in range(a.rows)]
    seqs = [[rng.randrange(3, m["V"]) for _ in range(n)] for n in lens]
    starts = [max(1, int(0.4 * n)) for n in lens]
    batches = batch_by_tokens(lens, a.batch_tokens)

    def run(share_prefix: bool, which=None):
        out = {}
        for b in (batches if which is None else which):
            base, ref, _ = token_nll_pair(model, [seqs[i] for i in b], [starts[i] for i in b], ablated=ablation.ablated,
                                       first_layer=ablation.first_layer, share_prefix=share_prefix)
            out.update({i: (x, y) for i, x, y in zip(b, base, ref)})
        return out

    run(True, batches[:1])  # warm-up (kernels, allocator)
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(a.device)
    t = time.perf_counter()
    fast = run(True)
    sync(a.device)
    wall = time.perf_counter() - t
    ceiling = matmul_ceiling(m, dtype, a.device, seconds=1.0 if a.tiny else 3.0, tokens=1024 if a.tiny else 8192)
    tokens = sum(lens)
    layer_passes = m["L"] + (m["L"] - ablation.first_layer)
    flops = count_flops(m, list(zip(lens, starts)), layer_passes, "response")
    res = {"device": torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device,
           "dtype": a.dtype, "rows": a.rows, "tokens": tokens, "batches": len(batches), "wall_s": wall,
           "tokens_per_s": tokens / wall, "flops": flops, "ceiling_flops": ceiling,
           "mfu": flops / wall / ceiling, "layer_passes": layer_passes, "first_layer": ablation.first_layer,
           "padding": 1 - tokens / sum(len(b) * max(lens[i] for i in b) for b in batches)}
    if a.device.startswith("cuda"):
        res["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if a.compare_plain:
        t = time.perf_counter()
        plain = run(False)
        sync(a.device)
        res["plain_tokens_per_s"] = tokens / (time.perf_counter() - t)
        res["max_abs_diff_vs_plain"] = max(float(abs(fast[i][j] - plain[i][j]).max()) for i in fast for j in (0, 1))
    print(f"{res['rows']} rows, {tokens:,} tokens in {len(batches)} batches ({res['padding']:.1%} padding): "
          f"{res['tokens_per_s']:,.0f} tokens/s, {flops / wall / 1e12:.2f} TFLOP/s of a measured "
          f"{ceiling / 1e12:.1f} TFLOP/s matmul ceiling: MFU {res['mfu']:.3f}"
          + (f"; peak memory {res['peak_memory_gb']:.1f} GiB" if "peak_memory_gb" in res else ""))
    if a.compare_plain:
        print(f"plain two full passes: {res['plain_tokens_per_s']:,.0f} tokens/s "
              f"(fast/plain {res['tokens_per_s'] / res['plain_tokens_per_s']:.2f}); max |d nll| "
              f"{res['max_abs_diff_vs_plain']:.2e}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    print(f"tokens_per_s={res['tokens_per_s']:.1f} mfu={res['mfu']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
