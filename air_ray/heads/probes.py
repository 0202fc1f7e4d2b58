"""Retrieval probes: a prompt that holds an answer string verbatim, followed by that answer.

Probe files are JSONL rows ``{"prompt": str, "answer": str}``. The built-in probes are synthetic few-shot
key-value retrieval tasks (random keys, values from bundled text, three solved demonstrations, then the
query), deterministic by seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources

from air_ray.errors import AirRayError


@dataclass(frozen=True)
class Probe:
    prompt: str
    answer: str


@dataclass(frozen=True)
class ProbeTokens:
    input_ids: list[int]  # prompt ids (with the tokenizer's special tokens) + answer ids
    n_prompt: int  # P: answer token k sits at position P + k
    answer_span: list[int]  # prompt positions whose start offset lies in the last occurrence of the answer

    @property
    def n_answer(self) -> int:
        return len(self.input_ids) - self.n_prompt


def read_probes(path: str) -> list[Probe]:
    from air_ray.fsio import open_uri

    probes = []
    with open_uri(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt, answer = row["prompt"], row["answer"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise AirRayError(f"probe file {path} line {n}: need a JSON object with prompt and answer ({e})")
            if not isinstance(prompt, str) or not isinstance(answer, str) or not answer:
                raise AirRayError(f"probe file {path} line {n}: prompt and answer must be non-empty strings")
            if answer not in prompt:
                raise AirRayError(f"probe file {path} line {n}: the answer does not appear in the prompt")
            probes.append(Probe(prompt, answer))
    if not probes:
        raise AirRayError(f"probe file {path} holds no probes")
    return probes


def tokenize_probe(tokenizer, probe: Probe) -> ProbeTokens:
    start = probe.prompt.rfind(probe.answer)
    if start < 0 or not probe.answer:
        raise AirRayError(f"probe answer {probe.answer[:40]!r} does not appear in its prompt")
    end = start + len(probe.answer)
    enc = tokenizer(probe.prompt, return_offsets_mapping=True, return_special_tokens_mask=True)
    span = [
        i
        for i, ((a, _), special) in enumerate(zip(enc["offset_mapping"], enc["special_tokens_mask"]))
        if not special and start <= a < end
    ]
    answer_ids = tokenizer(probe.answer, add_special_tokens=False)["input_ids"]
    if not answer_ids:
        raise AirRayError(f"probe answer {probe.answer!r} tokenizes to nothing")
    return ProbeTokens(list(enc["input_ids"]) + list(answer_ids), len(enc["input_ids"]), span)


def _values() -> list[str]:
    text = resources.files("air_ray.heads").joinpath("probe_values.txt").read_text(encoding="utf-8")
    return [v for v in text.splitlines() if v.strip()]


def _key(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_HEAD = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n"
_QA = 'Key: "{k}"\nThe value associated with the specified key is: "'


def _render(pairs: list[tuple[str, str]], demos: list[int], query: int) -> tuple[str, str]:
    body = "{" + ",\n ".join(f'"{k}": "{v}"' for k, v in pairs) + "}\n\n"
    shots = "".join(_QA.format(k=pairs[i][0]) + pairs[i][1] + '"\n\n' for i in demos)
    return _HEAD + body + shots + _QA.format(k=pairs[query][0]), pairs[query][1]


def synthetic_probes(tokenizer, num: int = 64, tokens: int = 512, seed: int = 0, shots: int = 3) -> list[Probe]:
    """``num`` key-value retrieval probes of about ``tokens`` tokens each (prompt + answer)."""
    values = _values()
    rng = random.Random(seed)
    probes = []
    for _ in range(num):
        pool = rng.sample(values, len(values))
        n_pairs = shots + 2
        while True:
            pairs = [(_key(rng), pool[i % len(pool)]) for i in range(n_pairs)]
            prompt, answer = _render(pairs, list(range(shots)), shots)
            size = len(tokenizer(prompt + answer)["input_ids"])
            if size >= tokens or n_pairs >= len(pool):
                break
            per_pair = max(size / n_pairs, 1.0)
            n_pairs = min(len(pool), n_pairs + max(1, int((tokens - size) / per_pair)))
        # shrink to fit, then shuffle where the demonstrations and the query sit
        while n_pairs > shots + 2 and size > tokens:
            n_pairs -= 1
            pairs = pairs[:n_pairs]
            size = len(tokenizer(_render(pairs, list(range(shots)), shots)[0] + pairs[shots][1])["input_ids"])
        order = rng.sample(range(n_pairs), shots + 1)
        prompt, answer = _render(pairs, order[:shots], order[shots])
        probes.append(Probe(prompt, answer))
    return probes
