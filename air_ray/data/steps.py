"""Splitting a reasoning trace into steps: [start, end) character spans of the response, each with a kind.

Rules:
  * ``lines``      — split on "\\n"; whitespace-only pieces are dropped.
  * ``paragraphs`` — split on blank lines (lines holding only whitespace); whitespace-only pieces dropped.
  * ``regex:P``    — a step starts at each match of P and runs to the next match (or the end); text before
                     the first match belongs to no step.
  * ``think``      — for ``<think>`` traces: the tags belong to no step; the thinking between them is split into
                     paragraphs (into lines when it has no blank line), each a ``think`` step; everything after
                     the closing tag is one ``answer`` step. Steps are trimmed of surrounding whitespace. A
                     response without the tags is split into paragraphs (``text`` steps); one whose closing tag
                     is missing (cut off) is all thinking.

Kinds: ``think`` / ``answer`` under the ``think`` rule, ``text`` otherwise.
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


RULES = ("lines", "paragraphs", "think", "regex:PATTERN")
DEFAULT_RULE = RULES[0]
THINK_TAGS = ("<think>", "</think>")  # the default tags around reasoning (``--think-tags``)


def parse_think_tags(text: str) -> tuple[str, str]:
    """``"OPEN,CLOSE"`` (the form of ``--think-tags``) -> ``(OPEN, CLOSE)``; AirRayError for anything else."""
    open_tag, sep, close_tag = text.partition(",")
    if not sep or not open_tag or not close_tag or "," in close_tag:
        raise AirRayError(f"--think-tags {text!r}: expected OPEN,CLOSE (e.g. {','.join(THINK_TAGS)})")
    return open_tag, close_tag


def check_rule(rule: str) -> str:
    """Validate a step rule early (at configuration time) and return it."""
    if rule in ("lines", "paragraphs", "think"):
        return rule
    if rule.startswith("regex:") and rule[len("regex:"):]:
        _compile(rule[len("regex:"):])
        return rule
    raise AirRayError(f"unknown step rule {rule!r}: expected lines, paragraphs, think or regex:PATTERN")


def split_steps(text: str, rule: str = DEFAULT_RULE, think_tags: tuple[str, str] = THINK_TAGS) -> list[Span]:
    return steps_and_kinds(text, rule, think_tags)[0]


def steps_and_kinds(text: str, rule: str = DEFAULT_RULE,
                    think_tags: tuple[str, str] = THINK_TAGS) -> tuple[list[Span], list[str]]:
    """(step spans, their kinds) of ``text`` under ``rule``."""
    if rule == "think":
        return _think(text, think_tags)
    spans = _split(text, rule)
    return spans, ["text"] * len(spans)


def _trimmed(text: str, spans, offset: int = 0) -> list[Span]:
    out = []
    for a, b in spans:
        piece = text[a:b]
        lead = len(piece) - len(piece.lstrip())
        trail = len(piece) - len(piece.rstrip())
        if b - trail > a + lead:
            out.append((offset + a + lead, offset + b - trail))
    return out


def _think(text: str, tags: tuple[str, str]) -> tuple[list[Span], list[str]]:
    open_tag, close_tag = tags
    a = text.find(open_tag)
    if a < 0 and close_tag not in text:
        spans = _trimmed(text, _split(text, "paragraphs"))
        return spans, ["text"] * len(spans)
    spans, kinds = [], []
    start = 0
    if a >= 0:
        before = _trimmed(text[:a], _split(text[:a], "paragraphs"))
        spans += before
        kinds += ["text"] * len(before)
        start = a + len(open_tag)
    b = text.find(close_tag, start)
    end = b if b >= 0 else len(text)
    thinking = text[start:end]
    rule = "paragraphs" if _PARAGRAPH_BREAK.search(thinking.strip()) else "lines"
    think = _trimmed(thinking, _split(thinking, rule), offset=start)
    spans += think
    kinds += ["think"] * len(think)
    if b >= 0:
        answer = _trimmed(text, [(b + len(close_tag), len(text))])
        spans += answer
        kinds += ["answer"] * len(answer)
    return spans, kinds


def _split(text: str, rule: str) -> list[Span]:
    if rule == "lines":
        return _pieces_between(text, re.finditer("\n", text))
    if rule == "paragraphs":
        return _pieces_between(text, _PARAGRAPH_BREAK.finditer(text))
    check_rule(rule)
    starts = sorted({m.start() for m in _compile(rule[len("regex:"):]).finditer(text) if m.start() < len(text)})
    return [(a, b) for a, b in zip(starts, starts[1:] + [len(text)]) if b > a]
