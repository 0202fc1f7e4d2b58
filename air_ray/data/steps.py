"""Splitting a reasoning trace into steps: [start, end) character spans of the response.

Rules:
  * ``lines``      — split on "\\n"; whitespace-only pieces are dropped.
  * ``paragraphs`` — split on blank lines (lines holding only whitespace); whitespace-only pieces dropped.
  * ``regex:P``    — a step starts at each match of P and runs to the next match (or the end); text before
                     the first match belongs to no step.
"""

from __future__ import annotations

import re
from functools import lru_cache

from air_ray.errors import AirRayError

Span = tuple[int, int]

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n(?:[ \t\r\f\v]*\n)*")


def _pieces_between(text: str, separators) -> list[Span]:
    spans, start = [], 0
    for m in separators:
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    return [(a, b) for a, b in spans if text[a:b].strip()]


@lru_cache(maxsize=64)
def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise AirRayError(f"bad step rule regex:{pattern}: {e}") from None


def check_rule(rule: str) -> str:
    """Validate a step rule early (at configuration time) and return it."""
    if rule in ("lines", "paragraphs"):
        return rule
    if rule.startswith("regex:") and rule[len("regex:"):]:
        _compile(rule[len("regex:"):])
        return rule
    raise AirRayError(f"unknown step rule {rule!r}: expected lines, paragraphs or regex:PATTERN")


def split_steps(text: str, rule: str = "lines") -> list[Span]:
    if rule == "lines":
        return _pieces_between(text, re.finditer("\n", text))
    if rule == "paragraphs":
        return _pieces_between(text, _PARAGRAPH_BREAK.finditer(text))
    check_rule(rule)
    starts = sorted({m.start() for m in _compile(rule[len("regex:"):]).finditer(text) if m.start() < len(text)})
    return [(a, b) for a, b in zip(starts, starts[1:] + [len(text)]) if b > a]
