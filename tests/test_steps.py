"""Step rules: exact [start, end) character spans of the response."""

import pytest

from air_ray.errors import AirRayError
from air_ray.data.steps import check_rule, split_steps


def pieces(text, spans):
    return [text[a:b] for a, b in spans]


def test_lines_exact_spans():
    text = "First line\n\n   \n  indented one \nlast"
    spans = split_steps(text, "lines")
    assert spans == [(0, 10), (16, 31), (32, 36)]
    assert pieces(text, spans) == ["First line", "  indented one ", "last"]
    assert split_steps(text) == spans  # lines is the default


def test_lines_leading_trailing_newlines_and_whitespace_only():
    text = "\nA = 1\n\t\nB = 2\n"
    spans = split_steps(text, "lines")
    assert pieces(text, spans) == ["A = 1", "B = 2"]
    assert spans == [(1, 6), (9, 14)]
    assert split_steps("", "lines") == []
    assert split_steps(" \n\t\n  ", "lines") == []
    assert split_steps("single", "lines") == [(0, 6)]


def test_lines_match_str_split():
    text = "a\n b\n\n c \n \nd\r\ne"
    spans = split_steps(text, "lines")
    expected = [ln for ln in text.split("\n") if ln.strip()]
    assert pieces(text, spans) == expected
    # spans are in order, disjoint, and inside the text
    assert all(0 <= a < b <= len(text) for a, b in spans)
    assert all(b1 < a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))


def test_paragraphs():
    text = "p1 line1\np1 line2\n\np2\n  \t\np3\n\n \n\n p4 \n\n"
    spans = split_steps(text, "paragraphs")
    assert pieces(text, spans) == ["p1 line1\np1 line2", "p2", "p3", " p4 "]
    a = text.index("p2")
    assert spans[1] == (a, a + 2)
    assert spans[0] == (0, 17)


def test_paragraphs_edges():
    assert split_steps("", "paragraphs") == []
    assert split_steps("\n\n \n", "paragraphs") == []
    assert split_steps("one\ntwo", "paragraphs") == [(0, 7)]  # a single newline is no break
    text = "\n\nx\n\ny"
    assert pieces(text, split_steps(text, "paragraphs")) == ["x", "y"]


def test_regex_steps():
    text = "Intro words. Step 1: add. Step 2: multiply. Step 3: done"
    spans = split_steps(text, r"regex:Step \d+:")
    s1, s2, s3 = text.index("Step 1"), text.index("Step 2"), text.index("Step 3")
    assert spans == [(s1, s2), (s2, s3), (s3, len(text))]
    assert pieces(text, spans) == ["Step 1: add. ", "Step 2: multiply. ", "Step 3: done"]
    # the text before the first match is in no step
    assert all(a >= s1 for a, _ in spans)


def test_regex_edges():
    assert split_steps("no marker here", r"regex:Step") == []
    assert split_steps("Step", r"regex:Step") == [(0, 4)]
    # zero-width matches: a step starts at each line start; a match at the very end starts no step
    text = "a\nbb\n"
    assert split_steps(text, r"regex:(?m)^") == [(0, 2), (2, 5)]
    # matches at the same start count once
    assert split_steps("xx", r"regex:x|xx") == [(0, 1), (1, 2)]


def test_check_rule():
    assert check_rule("lines") == "lines"
    assert check_rule("paragraphs") == "paragraphs"
    assert check_rule(r"regex:\d+\.") == r"regex:\d+\."
    for bad in ["", "words", "Lines", "regex:", "regex"]:
        with pytest.raises(AirRayError, match="unknown step rule"):
            check_rule(bad)
    with pytest.raises(AirRayError, match="bad step rule"):
        check_rule("regex:(unclosed")
    with pytest.raises(AirRayError):
        split_steps("text", "sentences")
    with pytest.raises(AirRayError):
        split_steps("text", "regex:[")
