"""What the benchmarks share: the rows, the model and its default critical heads, the FLOP count of scoring,
and this process's memory figures. Imported by every script in bench/ (none imports another).
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "air_ray" / "data" / "gsm8k_sample.jsonl"
MODEL = "smollm2-135m"
# the default model's critical heads (air-ray heads, default settings), best first
DEFAULT_HEADS = [[18, 6], [17, 3], [17, 4], [23, 2], [18, 7], [20, 6], [21, 8], [23, 7], [22, 7], [17, 5], [23, 8],
                 [24, 4], [26, 1], [24, 0]]


def status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def load_rows(n: int) -> list[dict]:
    base = [json.loads(line) for line in open(DATA, encoding="utf-8") if line.strip()]
    out = []
    for i in range(n):
        r = dict(base[i % len(base)])
        if i >= len(base):
            r["id"] = f"{r['id']}-rep{i // len(base)}"
        out.append(r)
    return out


def dims(config) -> dict:
    H = config.num_attention_heads
    return dict(d=config.hidden_size, L=config.num_hidden_layers, H=H,
                KV=getattr(config, "num_key_value_heads", None) or H,
                dh=getattr(config, "head_dim", None) or config.hidden_size // H,
                ff=config.intermediate_size, V=config.vocab_size)


def count_flops(m: dict, seqs: list[tuple[int, int]], layer_passes: float, head_positions: str,
                head_passes: int = 2) -> float:
    """Model FLOPs of scoring ``seqs`` = [(tokens, prompt tokens)] (see the module docstring).

    layer_passes: decoder layers run per token (both passes together); head_positions: "response" or "all".
    """
    per_token = 2 * (m["d"] * m["H"] * m["dh"] + 2 * m["d"] * m["KV"] * m["dh"] + m["H"] * m["dh"] * m["d"]
                     + 3 * m["d"] * m["ff"])
    total = 0.0
    for n, p in seqs:
        attn = 4 * m["H"] * m["dh"] * n * (n + 1) / 2
        head = 2 * m["d"] * m["V"] * ((n - p) if head_positions == "response" else n)
        total += layer_passes * (n * per_token + attn) + head_passes * head
    return total
