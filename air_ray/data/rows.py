"""Rows -> token ids, response token offsets and step spans (CPU only: a tokenizer, no model).

A record is parsed into a ``Conversation`` by ``air_ray.data.shapes`` (every supported row shape). The scored
response is the answer, or, when the row has reasoning given apart from the answer, the reasoning and the answer
as the model's chat template renders an assistant turn carrying ``reasoning_content`` (where the template does),
else ``OPEN + "\\n" + reasoning + "\\n" + CLOSE + "\\n\\n" + answer`` with the think tags (default
``<think>``, ``</think>``). The same content in any shape gives the same token ids.

Token ids: format ``chat`` = ``apply_chat_template(prompt_messages, tools=row tools, add_generation_prompt=True)``;
format ``raw`` = ``tokenizer(prompt)`` (for conversations, the prompt contents joined by newlines); either followed
by ``tokenizer(response, add_special_tokens=False)``.

Tool calls and tool definitions (agent traces) go to the chat template as they are where it renders them. Where it
does not (and in format ``raw``), they are written as text in the Hermes form many templates use, so that nothing
the model saw is dropped: each call as ``<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`` after its
message's content, the definitions as ``<tools>\n{one JSON object a line}\n</tools>`` at the end of the system
message (a system message of their own where the row has none).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from air_ray.data.shapes import Conversation, FieldMap, RowError, canonical_id, parse_row
from air_ray.data.steps import DEFAULT_RULE, THINK_TAGS, Span, check_rule, parse_think_tags, steps_and_kinds

__all__ = ["FORMATS", "Conversation", "FieldMap", "PreparedRow", "RowError", "RowPreparer", "canonical_id",
           "parse_row", "raw_prompt", "render_response"]

FORMATS = ("chat", "raw")  # how a row's prompt becomes token ids (the module doc); the first is the default


@dataclass
class PreparedRow:
    id: str
    domain: str | None
    input_ids: list[int]  # prompt ids + response ids
    n_prompt_tokens: int
    token_starts: list[int]  # first character of each response token, in the response
    step_spans: list[Span] = field(default_factory=list)
    truncated: bool = False  # the response was cut to fit max_tokens (``truncate=True``)
    step_kinds: list[str] = field(default_factory=list)  # think | answer | text, one per step

    @property
    def n_response_tokens(self) -> int:
        return len(self.input_ids) - self.n_prompt_tokens


def render_response(conv: Conversation, think_tags: tuple[str, str] = THINK_TAGS, template=None) -> str:
    """The scored response text of ``conv``: the answer, or reasoning + answer (see the module doc).
    ``template``: a callable rendering through a chat template, None where it does not render reasoning."""
    if conv.reasoning is None:
        return conv.answer
    if template is not None:
        text = template(conv)
        if text is not None:
            return text
    open_tag, close_tag = think_tags
    return f"{open_tag}\n{conv.reasoning}\n{close_tag}\n\n{conv.answer}"


def _call_text(call: dict) -> str:
    fn = call["function"]
    return "<tool_call>\n" + json.dumps({"name": fn["name"], "arguments": fn.get("arguments")},
                                        ensure_ascii=False) + "\n</tool_call>"


def tools_as_text(messages: list[dict], tools: list[dict] | None, calls: bool = True) -> list[dict]:
    """``messages`` with the tool calls (``calls``) and the tool definitions ``tools`` written into the text (the
    module doc); messages without either are returned as they are."""
    out = []
    for m in messages:
        if calls and m.get("tool_calls"):
            blocks = "\n".join(_call_text(c) for c in m["tool_calls"])
            m = {**{k: v for k, v in m.items() if k != "tool_calls"},
                 "content": f"{m['content']}\n{blocks}" if m["content"] else blocks}
        out.append(m)
    if tools:
        text = "<tools>\n" + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) + "\n</tools>"
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{text}" if out[0]["content"] else text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def raw_prompt(prompt, tools: list[dict] | None = None) -> str:
    """The prompt text of format ``raw``: a string prompt as it is, a conversation's contents joined by newlines
    (tool calls and definitions written in, the module doc)."""
    if isinstance(prompt, str) and not tools:
        return prompt
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return "\n".join(m["content"] for m in tools_as_text(msgs, tools))


class RowPreparer:
    """Tokenizes rows and splits their steps; the same ids in every backend."""

    def __init__(self, tokenizer, format: str = FORMATS[0], steps: str = DEFAULT_RULE, max_tokens: int | None = None,
                 truncate: bool = False, fields: FieldMap = FieldMap(), think_tags: tuple[str, str] = THINK_TAGS):
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
        self.fields = fields
        self.think_tags = tuple(think_tags)
        self._renders: dict[str, bool] = {}  # what the chat template renders (reasoning_content, tool calls, tools)
        self._token_chars: int | None = None

    @classmethod
    def of(cls, tokenizer, options, max_tokens: int | None = None, format: str | None = None) -> "RowPreparer":
        """From an options object (``air_ray.config``: format, steps, truncate, the field map, think tags);
        ``format`` for options that have none (export, report: the format the scores record)."""
        return cls(tokenizer, format=format or options.format, steps=getattr(options, "steps", DEFAULT_RULE),
                   max_tokens=max_tokens, truncate=getattr(options, "truncate", False), fields=FieldMap.of(options),
                   think_tags=think_tags_of(options))

    # -- the response text ------------------------------------------------------------------------

    _PROBE = "air_ray_probe"
    _PROBES = {  # what the template is asked to render, and whether the marker then appears
        "reasoning": ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a",
                                                          "reasoning_content": _PROBE}], None),
        "tool_calls": ([{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "", "tool_calls": [
                            {"id": "c0", "type": "function", "function": {"name": _PROBE, "arguments": {}}}]},
                        {"role": "tool", "tool_call_id": "c0", "content": "r"}], None),
        "tools": ([{"role": "user", "content": "q"}], [{"type": "function", "function": {
            "name": _PROBE, "description": "d", "parameters": {"type": "object", "properties": {}}}}]),
    }

    def _template_renders(self, what: str) -> bool:
        """Does the chat template render ``what`` (reasoning, tool_calls, tools)? Asked once per preparer."""
        if what not in self._renders:
            messages, tools = self._PROBES[what]
            try:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                          **({"tools": tools} if tools else {}))
                self._renders[what] = self._PROBE in text
            except Exception:  # a template that rejects the extra key
                self._renders[what] = False
        return self._renders[what]

    def _renders_reasoning(self) -> bool:
        return self._template_renders("reasoning")

    def template_input(self, prompt, tools: list[dict] | None = None) -> tuple[list[dict], list[dict] | None]:
        """(messages, tools) as the chat template gets them: tool calls and definitions as they are where the
        template renders them, else written into the text (the module doc)."""
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        calls = any(m.get("tool_calls") for m in msgs) and not self._template_renders("tool_calls")
        defs = bool(tools) and not self._template_renders("tools")
        if calls or defs:
            msgs = tools_as_text(msgs, tools if defs else None, calls=calls)
        return msgs, (tools or None) if not defs else None

    def _apply(self, messages: list[dict], tools, **kw):
        return self.tokenizer.apply_chat_template(messages, **kw, **({"tools": tools} if tools else {}))

    def _template_response(self, conv: Conversation) -> str | None:
        """The assistant turn as the chat template renders it with ``reasoning_content``, between the generation
        prompt and the end of the answer; None where the template does not render it that way."""
        if self.format != "chat" or not conv.answer or not self._renders_reasoning():
            return None
        msgs, tools = self.template_input(conv.prompt, conv.tools)
        prefix = self._apply(msgs, tools, tokenize=False, add_generation_prompt=True)
        full = self._apply(msgs + [{"role": "assistant", "content": conv.answer, "reasoning_content": conv.reasoning}],
                           tools, tokenize=False)
        if not full.startswith(prefix):
            return None
        rest = full[len(prefix):]
        end = rest.rfind(conv.answer)
        if end < 0 or conv.reasoning.strip() not in rest[:end]:
            return None
        return rest[: end + len(conv.answer)]

    def response_text(self, conv: Conversation) -> str:
        return render_response(conv, self.think_tags, self._template_response)

    def _max_chars(self, tokens: int) -> int:
        """More characters than any ``tokens`` tokens can hold (4x the longest vocabulary entry per token): a
        longer text is over the limit without tokenizing it."""
        if self._token_chars is None:
            self._token_chars = max((len(t) for t in self.tokenizer.get_vocab()), default=16)
        return 4 * max(self._token_chars, 1) * tokens

    def prompt_ids(self, prompt, tools: list[dict] | None = None) -> list[int]:
        if self.format == "chat":
            msgs, tools = self.template_input(prompt, tools)
            out = self._apply(msgs, tools, add_generation_prompt=True)
            return list(out["input_ids"] if hasattr(out, "keys") else out)
        return list(self.tokenizer(raw_prompt(prompt, tools))["input_ids"])

    def prepare(self, row) -> PreparedRow:
        conv = parse_row(row, self.fields)
        response = self.response_text(conv)
        if self.max_tokens is not None and len(response) > self._max_chars(self.max_tokens + 64):
            if not self.truncate:  # never tokenize megabytes only to reject them
                raise RowError("too_long", f"the response has {len(response):,} characters: more than "
                                           f"the limit of {self.max_tokens} tokens can hold")
            response = response[: self._max_chars(self.max_tokens + 64)]  # the kept prefix lies well inside
        p_ids = self.prompt_ids(conv.prompt, conv.tools)
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
                raise RowError("too_long", f"{n} tokens > the limit of {self.max_tokens} (--max-tokens, within the "
                                           f"model's context){why}")
            # cut before the first token that does not fit; the steps are those of the text that is kept
            response, r_ids, starts, truncated = response[: starts[keep]], r_ids[:keep], starts[:keep], True
        spans, kinds = steps_and_kinds(response, self.steps, self.think_tags)
        return PreparedRow(
            id=conv.id,
            domain=conv.domain,
            input_ids=p_ids + r_ids,
            n_prompt_tokens=len(p_ids),
            token_starts=starts,
            step_spans=spans,
            truncated=truncated,
            step_kinds=kinds,
        )


def think_tags_of(options) -> tuple[str, str]:
    """``--think-tags OPEN,CLOSE`` -> (OPEN, CLOSE); the default tags when unset."""
    value = getattr(options, "think_tags", None)
    return parse_think_tags(value) if value else THINK_TAGS
