"""Input rows -> token ids, response token offsets and step spans (CPU only: a tokenizer, no model).

Row forms: ``{"id"?, "prompt": str, "response": str, "domain"?}`` or
``{"id"?, "messages": [{"role", "content"}, ...], "domain"?}`` whose last message (role ``assistant``) is the
response and the ones before it the prompt conversation. A missing id becomes the first 16 hex chars of the
sha1 of the canonical JSON of ``[prompt or messages, response]``.

Token ids: format ``chat`` = ``apply_chat_template(prompt_messages, add_generation_prompt=True)``; format
``raw`` = ``tokenizer(prompt)`` (for messages rows, the prompt contents joined by newlines); either followed
by ``tokenizer(response, add_special_tokens=False)``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from air_ray.config.commands import FORMATS
from air_ray.data.steps import Span, check_rule, split_steps


class RowError(ValueError):
    """A row that cannot be scored. ``reason`` is a stable machine-readable code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class PreparedRow:
    id: str
    domain: str | None
    input_ids: list[int]  # prompt ids + response ids
    n_prompt_tokens: int
    token_starts: list[int]  # first character of each response token, in the response
    step_spans: list[Span] = field(default_factory=list)
    truncated: bool = False  # the response was cut to fit max_tokens (``truncate=True``)

    @property
    def n_response_tokens(self) -> int:
        return len(self.input_ids) - self.n_prompt_tokens


def canonical_id(prompt_or_messages, response: str) -> str:
    blob = json.dumps([prompt_or_messages, response], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def _require_str(row: dict, key: str) -> str:
    if key not in row or row[key] is None:
        raise RowError("missing_field", f"no {key!r}")
    if not isinstance(row[key], str):
        raise RowError("bad_type", f"{key!r} is {type(row[key]).__name__}, not a string")
    return row[key]


def split_row(row) -> tuple[list[dict] | str, str, str, str | None]:
    """-> (prompt messages or prompt text, response, id, domain). Raises RowError."""
    if not isinstance(row, dict):
        raise RowError("not_object", f"row is {type(row).__name__}")
    domain = row.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise RowError("bad_type", f"'domain' is {type(domain).__name__}, not a string")
    if row.get("messages") is not None:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs
        ):
            raise RowError("bad_type", "'messages' must be a list of {role: str, content: str}")
        if not msgs or msgs[-1]["role"] != "assistant":
            raise RowError("no_assistant_turn", "the last message is not an assistant turn")
        prompt, response, key = msgs[:-1], msgs[-1]["content"], msgs
    else:
        if "prompt" not in row and "response" not in row:
            raise RowError("missing_field", "need 'prompt' and 'response', or 'messages'")
        prompt, response = _require_str(row, "prompt"), _require_str(row, "response")
        key = prompt
    if not response.strip():
        raise RowError("empty_response", "the response is empty")
    rid = row.get("id")
    if rid is None:
        rid = canonical_id(key, response)
    elif isinstance(rid, (int,)) and not isinstance(rid, bool):
        rid = str(rid)
    elif not isinstance(rid, str) or not rid:
        raise RowError("bad_type", "'id' must be a non-empty string")
    return prompt, response, rid, domain


def row_id(text: str | None) -> str | None:
    """The id a raw JSON record will be scored under, or None when the record is not a valid row (it is
    rejected for that reason later). Cheap: no tokenizer."""
    if text is None:
        return None
    try:
        return split_row(json.loads(text))[2]
    except (json.JSONDecodeError, RowError):
        return None


class RowPreparer:
    """Tokenizes rows and splits their steps; the same ids in every backend."""

    def __init__(self, tokenizer, format: str = "chat", steps: str = "lines", max_tokens: int | None = None,
                 truncate: bool = False):
        from air_ray.errors import AirRayError

        if format not in FORMATS:
            raise AirRayError(f"unknown format {format!r}: expected one of {', '.join(FORMATS)}")
        if format == "chat" and not getattr(tokenizer, "chat_template", None):
            raise AirRayError("format 'chat' needs a tokenizer with a chat template; use --format raw")
        self.tokenizer = tokenizer
        self.format = format
        self.steps = check_rule(steps)
        self.max_tokens = max_tokens
        self.truncate = truncate  # cut an over-long response to fit max_tokens instead of rejecting the row

    def prompt_ids(self, prompt) -> list[int]:
        tok = self.tokenizer
        if self.format == "chat":
            msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            out = tok.apply_chat_template(msgs, add_generation_prompt=True)
            return list(out["input_ids"] if hasattr(out, "keys") else out)
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        return list(tok(text)["input_ids"])

    def prepare(self, row) -> PreparedRow:
        prompt, response, rid, domain = split_row(row)
        p_ids = self.prompt_ids(prompt)
        enc = self.tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
        r_ids = list(enc["input_ids"])
        if not r_ids:
            raise RowError("empty_tokens", "the response tokenizes to nothing")
        if not p_ids:
            raise RowError("empty_tokens", "the prompt tokenizes to nothing: no position predicts the first "
                                           "response token")
        starts = [int(a) for a, _ in enc["offset_mapping"]]
        n, truncated = len(p_ids) + len(r_ids), False
        if self.max_tokens is not None and n > self.max_tokens:
            keep = self.max_tokens - len(p_ids)
            if not self.truncate or keep < 1:
                why = " (the prompt alone leaves no room for the response)" if self.truncate else ""
                raise RowError("too_long", f"{n} tokens > max_tokens {self.max_tokens}{why}")
            # cut before the first token that does not fit; the steps are those of the text that is kept
            response, r_ids, starts, truncated = response[: starts[keep]], r_ids[:keep], starts[:keep], True
        return PreparedRow(
            id=rid,
            domain=domain,
            input_ids=p_ids + r_ids,
            n_prompt_tokens=len(p_ids),
            token_starts=starts,
            step_spans=split_steps(response, self.steps),
            truncated=truncated,
        )
