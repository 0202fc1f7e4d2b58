"""What a row says about its own correctness: its final answer, the reference answer it carries, and a planted
defect. Plain text, no tokenizer.

Answers: a reference's checkable answer is the text after its last ``####`` (GSM8K), else its last
``\\boxed{...}``; a response's (``predicted_answer``) is the same, else its last number (the usual "flexible" GSM8K
extraction). Both sides are normalised (commas, ``$``, spaces, a trailing period, ``72.0`` = ``72``) and compared
as strings. ``evaluation.students`` checks generations with these, ``select --exclude-wrong-answer`` corpus rows.

A row's reference (``reference_answer``) is a field beside the response: ``--reference-field``, else the first of
``REFERENCE_FIELDS`` the row has. It may hold a whole solution (``#### N`` or ``\\boxed{}``), a bare answer (a number,
or a short line), or a longer text (its last number). ``answer_status`` gives one of ``ANSWER_STATUSES``:

  match         the response's final answer equals the reference's
  wrong         it does not
  no_answer     the row has a reference, the response no number at all (counted with the wrong ones)
  no_reference  the row has no reference field, or no answer can be read from it (kept, counted)

``DEFECT_FIELD`` (``air_defect``) is the column a planted pool (``air_ray.evaluation.defects``) marks each corrupted
row's kind in; the scorer never reads it, select's audit and compare do.
"""

from __future__ import annotations

import math
import re

DEFECT_FIELD = "air_defect"
# fields a row's reference answer is looked for in, in this order, when --reference-field is not given (``answer``
# is not among them: in GSM8K and many other sets it is the response itself; name it to use it)
REFERENCE_FIELDS = ("solution", "reference", "reference_answer", "gold", "gold_answer", "ground_truth",
                    "expected_answer", "final_answer")
ANSWER_STATUSES = ("match", "wrong", "no_answer", "no_reference")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_SHORT = 64  # a reference string this short, on one line and without markers, is the answer itself


def _boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth, out = start + len("\\boxed{"), 1, []
    while i < len(text):
        c = text[i]
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return "".join(out)
        out.append(c)
        i += 1
    return None


def normalise_answer(text: str | None) -> str | None:
    """``" $1,234.0. "`` -> ``"1234"``; non-numbers are stripped of spaces and ``$``."""
    if text is None:
        return None
    t = text.strip().rstrip(".").replace(",", "").replace("$", "").replace(" ", "")
    try:
        x = float(t)
    except ValueError:
        return t or None
    if not math.isfinite(x):
        return t
    return str(int(x)) if x == int(x) else repr(x)


def final_answer(text: str) -> str | None:
    """A reference's checkable answer: the text after the last ``####``, else the last ``\\boxed{}``."""
    if "####" in text:
        after = text.rsplit("####", 1)[1].strip()
        return normalise_answer(after.splitlines()[0]) if after else None
    return normalise_answer(_boxed(text))


def predicted_answer(text: str) -> str | None:
    """A generation's answer: ``#### N`` or ``\\boxed{}`` as in ``final_answer``, else its last number."""
    found = final_answer(text)
    if found is not None:
        return found
    numbers = _NUMBER.findall(text)
    return normalise_answer(numbers[-1]) if numbers else None


def reference_answer(value) -> str | None:
    """The answer a reference field holds: a number as it is; a string's ``#### N`` / ``\\boxed{}``, else the string
    itself when short and on one line, else its last number; None when there is none."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return normalise_answer(repr(value)) if math.isfinite(value) else None
    if not isinstance(value, str) or not value.strip():
        return None
    found = final_answer(value)
    if found is not None:
        return found
    if len(value.strip()) <= _SHORT and "\n" not in value.strip():
        return normalise_answer(value)
    numbers = _NUMBER.findall(value)
    return normalise_answer(numbers[-1]) if numbers else None


def find_reference(row: dict, field: str | None = None) -> tuple[str | None, str | None]:
    """``(the field's name, its answer)`` of a row's reference: ``field`` if given, else the first of
    ``REFERENCE_FIELDS`` the row has (not null); ``(None, None)`` when it has none."""
    if not isinstance(row, dict):
        return None, None
    for name in (field,) if field else REFERENCE_FIELDS:
        value = row
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            return name, reference_answer(value)
    return None, None


def answer_status(response: str, reference: str | None) -> str:
    """One of ``ANSWER_STATUSES`` for a response against a reference answer (None: no reference)."""
    if reference is None:
        return "no_reference"
    predicted = predicted_answer(response)
    if predicted is None:
        return "no_answer"
    return "match" if predicted == reference else "wrong"
