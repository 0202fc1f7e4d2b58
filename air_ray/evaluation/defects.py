"""A pool with planted defects: the realistic case a curator filters, and the positive control of ``compare``.

``plant_defects(rows, frac, seed)`` returns the rows with a fixed, seeded ``frac`` of them replaced by corrupted
copies of themselves (same id, prompt and domain), in four kinds in equal parts (``KINDS``; the remainder of an
uneven split goes to the kinds in this order):

  wrong_answer   the final ``#### N`` changed; the steps untouched
  wrong_step     one intermediate result changed (GSM8K's ``<<a*b=c>>c``: both c; else the step's last number) and
                 the rest of the trace left as it is (the later steps still use the right value)
  shuffled       two different steps swapped (the ``#### N`` line stays last)
  truncated      the trace cut before its last third: the first floor(2/3 n) of its n lines kept (the ``#### N``
                 line is always among the lines cut)

A row is a ``{prompt, response, ...}`` row whose response is a GSM8K-style trace: steps one per line, the last line
``#### N``. A row that cannot carry a kind (no number in a step, fewer than two distinct steps) is given another kind
or left clean; the counts come back with the rows, so the pool's defect share is what was planted, never assumed.
Every row gets ``air_defect`` (the kind, or null when clean: a column the scorer never reads) and ``solution`` (the
row's original response, the reference ``select --exclude-wrong-answer`` checks against). ``repair_defects`` undoes
it: every corrupted row given back its ``solution`` (compare's ``repaired_random``: the same rows, repaired). Pure
Python, no model.
"""

from __future__ import annotations

import random
import re
from decimal import Decimal, InvalidOperation

from air_ray.data.answers import DEFECT_FIELD
from air_ray.errors import AirRayError

KINDS = ("wrong_answer", "wrong_step", "shuffled", "truncated")
SOLUTION_FIELD = "solution"  # the row's original response: its reference answer (data.answers.REFERENCE_FIELDS)
_FINAL = re.compile(r"^####\s*(.+?)\s*$")
_CALC = re.compile(r"<<([^<>]*)=([-\d.,]+)>>([-\d.,]+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _lines(response: str) -> tuple[list[str], int | None]:
    """(the response's lines, the index of its ``#### N`` line or None)."""
    lines = response.split("\n")
    final = next((i for i in range(len(lines) - 1, -1, -1) if _FINAL.match(lines[i].strip())), None)
    return lines, final


def _other_number(text: str, rng: random.Random) -> str:
    """A number near ``text`` (an integer or a decimal, commas allowed) but not equal to it, written the same way:
    the result of a plausible slip, never the same value."""
    plain = text.replace(",", "")
    try:
        x = Decimal(plain)
    except InvalidOperation:
        raise ValueError(f"not a number: {text!r}") from None
    span = max(2, int(abs(x) * Decimal("0.3")))
    step = rng.choice([d for d in range(-span, span + 1) if d != 0])
    y = x + step
    if x >= 0 > y:  # a count does not go negative: slip upwards instead
        y = x + abs(step)
    places = -x.as_tuple().exponent if x.as_tuple().exponent < 0 else 0
    out = f"{y:.{places}f}"
    return f"{int(out):,}" if "," in text and places == 0 else out


def wrong_answer(response: str, rng: random.Random) -> str | None:
    lines, final = _lines(response)
    if final is None or not _NUMBER.fullmatch(_FINAL.match(lines[final].strip()).group(1).replace("$", "")):
        return None
    value = _FINAL.match(lines[final].strip()).group(1).replace("$", "")
    lines[final] = f"#### {_other_number(value, rng)}"
    return "\n".join(lines)


def wrong_step(response: str, rng: random.Random) -> str | None:
    lines, final = _lines(response)
    steps = [i for i, line in enumerate(lines[:final]) if _NUMBER.search(line)]
    if not steps:
        return None
    i = rng.choice(steps)
    line = lines[i]
    calcs = [m for m in _CALC.finditer(line) if m.group(2) == m.group(3)]
    if calcs:  # <<expr=c>>c: both c changed, the expression left (the slip is in the result)
        m = calcs[-1]
        new = _other_number(m.group(2), rng)
        lines[i] = line[:m.start()] + f"<<{m.group(1)}={new}>>{new}" + line[m.end():]
    else:  # the step's last number
        m = list(_NUMBER.finditer(line))[-1]
        lines[i] = line[:m.start()] + _other_number(m.group(0), rng) + line[m.end():]
    return "\n".join(lines)


def shuffled(response: str, rng: random.Random) -> str | None:
    lines, final = _lines(response)
    steps = [i for i, line in enumerate(lines[:final]) if line.strip()]
    pairs = [(a, b) for a in steps for b in steps if a < b and lines[a] != lines[b]]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    lines[a], lines[b] = lines[b], lines[a]
    return "\n".join(lines)


def truncated(response: str, rng: random.Random) -> str | None:
    lines = response.rstrip("\n").split("\n")
    keep = (2 * len(lines)) // 3
    if keep < 1:
        return None
    return "\n".join(lines[:keep])


CORRUPT = {"wrong_answer": wrong_answer, "wrong_step": wrong_step, "shuffled": shuffled, "truncated": truncated}


def plant_defects(rows: list[dict], frac: float, seed: int = 0, response_field: str = "response"
                  ) -> tuple[list[dict], dict]:
    """``(rows, counts)``: every row with ``air_defect`` and ``solution`` added, ``round(frac * len(rows))`` of them
    corrupted (see the module doc); ``counts``: rows, planted per kind, defective, and rows no kind could corrupt."""
    if not 0 <= frac <= 1:
        raise AirRayError(f"--plant-defects {frac}: a fraction in [0, 1]")
    n = round(frac * len(rows))
    want = {k: n // len(KINDS) + (i < n % len(KINDS)) for i, k in enumerate(KINDS)}
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    out = [dict(r, **{DEFECT_FIELD: None, SOLUTION_FIELD: r[response_field]}) for r in rows]
    planted = dict.fromkeys(KINDS, 0)
    untouchable = 0
    turn = 0
    for i in order:
        if sum(planted.values()) == n:
            break
        text = rows[i][response_field]
        open_kinds = [k for k in KINDS[turn:] + KINDS[:turn] if planted[k] < want[k]]
        for kind in open_kinds:  # the kind whose turn it is, else the next one this row can carry
            corrupted = CORRUPT[kind](text, rng)
            if corrupted is not None and corrupted != text:
                out[i][response_field] = corrupted
                out[i][DEFECT_FIELD] = kind
                planted[kind] += 1
                turn = (KINDS.index(kind) + 1) % len(KINDS)
                break
        else:
            untouchable += 1
    return out, {"rows": len(rows), "defective": sum(planted.values()), "planted": planted, "wanted": want,
                 "rows_no_kind_fits": untouchable, "seed": seed, "frac": frac}


def write_planted(source: str, output: str, frac: float, seed: int = 0) -> dict:
    """Plant defects in the rows of a ``{prompt, response}`` JSONL file (plain or .gz) and write them to ``output``
    (JSON lines); returns the counts (also written beside it as ``<output>.json``)."""
    import gzip
    import json

    opener = gzip.open if source.endswith(".gz") else open
    with opener(source, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    planted, counts = plant_defects(rows, frac, seed)
    with open(output, "w", encoding="utf-8") as f:
        for r in planted:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    counts["source"] = source
    with open(output + ".json", "w", encoding="utf-8") as f:
        json.dump(counts, f, indent=2)
        f.write("\n")
    return counts


def repair_defects(rows: list[dict], response_field: str = "response") -> tuple[list[dict], int]:
    """``(rows, repaired)``: the rows of a planted pool with every corrupted one (``air_defect`` set) given back its
    original response (``solution``) and marked clean; id, prompt and every other field as they were."""
    out, n = [], 0
    for i, r in enumerate(rows):
        if r.get(DEFECT_FIELD):
            if not isinstance(r.get(SOLUTION_FIELD), str):
                raise AirRayError(f"row {i} (id {r.get('id')!r}) is marked {DEFECT_FIELD}={r[DEFECT_FIELD]!r} but has "
                                  f"no {SOLUTION_FIELD!r} text to repair it from (pools written by "
                                  "bench/plant_defects.py carry it)")
            r = dict(r, **{response_field: r[SOLUTION_FIELD], DEFECT_FIELD: None})
            n += 1
        out.append(r)
    return out, n
