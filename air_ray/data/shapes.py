"""Row shapes: any supported corpus record -> one ``Conversation`` (prompt, answer, reasoning, id, domain), or a
``RowError`` with a stable reason. Plain Python: no tokenizer.

Detected per row, in this order (unless fields are mapped, see ``FieldMap``):

  messages        {"messages": [{"role", "content"}, ...]}; the last message is the assistant's answer
  conversations   ShareGPT: {"conversations": [{"from", "value"}, ...], "system"?}; from human/user, gpt/assistant/
                  model, system; a top-level "system" string becomes the system message
  prompt+completion   TRL: {"prompt", "completion"}, each a string or a list of messages
  prompt+response     {"prompt": str, "response": str}

A message's content is a string, or a list of parts ``[{"type": "text", "text": ...}]`` (joined with "\\n"; any
other part rejects the row: ``non_text_content``). Reasoning given apart from the answer is the
``reasoning_content`` (or ``reasoning``) of the last assistant message, or the ``--reasoning-field``.

Ids: the row's ``id`` (an int becomes a string), else the first 16 hex characters of the sha1 of the canonical
JSON of ``[prompt key, answer]`` (``[prompt key, answer, reasoning]`` when there is reasoning), where the prompt
key is the prompt string, or the messages (the answer's message included) for conversation shapes: the same
content gives the same id in ``prompt+response`` and TRL string rows, and in ``messages``, ShareGPT and TRL
message rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

# every reason a row can be rejected for (README, "Bad input"); each RowError carries one
REASONS = ("invalid_json", "invalid_utf8", "too_deep", "not_object", "missing_field", "bad_type", "bad_role",
           "non_text_content", "empty_response", "empty_tokens", "no_assistant_turn", "duplicate_id", "too_long",
           "non_finite_loss", "unreadable_file")

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "system": "system", "tool": "tool"}
REASONING_KEYS = ("reasoning_content", "reasoning")


class RowError(ValueError):
    """A row that cannot be scored. ``reason`` is a stable machine-readable code (``REASONS``)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class FieldMap:
    """Where a row's parts are, when they are not in one of the detected shapes (``None``: detect).

    A mapped field may hold a string or a list of strings (joined with "\\n"); dotted names reach into nested
    objects (``meta.source``). ``messages`` may hold OpenAI messages or ShareGPT turns."""

    prompt: str | None = None
    response: str | None = None
    reasoning: str | None = None
    messages: str | None = None
    id: str | None = None
    domain: str | None = None

    @classmethod
    def of(cls, options) -> "FieldMap":
        """From an options object with ``prompt_field`` ... ``domain_field`` (``air_ray.config``)."""
        return cls(**{k: getattr(options, f"{k}_field", None) for k in cls.__dataclass_fields__})


@dataclass
class Conversation:
    """One row, whatever shape it came in."""

    prompt: str | list[dict]  # a string prompt, or the messages before the answer ([{role, content}])
    answer: str  # the assistant's final answer
    reasoning: str | None  # reasoning given apart from the answer
    id: str
    domain: str | None
    shape: str  # messages | conversations | prompt+completion | prompt+response | fields

    def messages(self) -> list[dict]:
        """The prompt as messages (a string prompt is one user message)."""
        return [{"role": "user", "content": self.prompt}] if isinstance(self.prompt, str) else list(self.prompt)


def canonical_id(prompt_or_messages, response: str, reasoning: str | None = None) -> str:
    key = [prompt_or_messages, response] + ([reasoning] if reasoning is not None else [])
    blob = json.dumps(key, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# values


def get_field(row: dict, name: str):
    value = row
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _text(value, what: str, lists: bool) -> str:
    """A string, or (``lists``) a list of strings joined with "\\n"."""
    if isinstance(value, str):
        return value
    if lists and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    want = "a string or a list of strings" if lists else "a string"
    raise RowError("bad_type", f"{what} is {type(value).__name__}, not {want}")


def _field(row: dict, name: str, what: str, lists: bool = False, required: bool = True) -> str | None:
    value = get_field(row, name)
    if value is None:
        if required:
            raise RowError("missing_field", f"no {name!r}")
        return None
    return _text(value, what or repr(name), lists)


def _content(value, where: str) -> str:
    """A message content: a string, or a list of text parts (joined with "\\n")."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        texts = []
        for part in value:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, dict) and part.get("type") not in (None, "text"):
                raise RowError("non_text_content", f"{where} has a {part.get('type')!r} part (only text is scored)")
            else:
                raise RowError("bad_type", f"{where}: content parts must be {{type: text, text: str}}")
        return "\n".join(texts)
    raise RowError("bad_type", f"{where}: content must be a string or a list of text parts")


def _messages(value, where: str) -> tuple[list[dict], bool]:
    """OpenAI messages or ShareGPT turns -> ([{role, content, (reasoning_content)}], plain), where plain means
    the list was already exactly that (its own form is then the id key, as before)."""
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise RowError("bad_type", f"{where!r} must be a list of messages")
    out, plain = [], True
    for i, m in enumerate(value):
        if "from" in m and "role" not in m:  # ShareGPT
            role_raw, content_raw, plain = m.get("from"), m.get("value"), False
        else:
            role_raw, content_raw = m.get("role"), m.get("content")
        if not isinstance(role_raw, str) or content_raw is None and not any(m.get(k) for k in REASONING_KEYS):
            raise RowError("bad_type", f"{where!r} must be a list of {{role: str, content: str}}")
        role = ROLES.get(role_raw)
        if role is None:
            raise RowError("bad_role", f"{where}[{i}] has role {role_raw!r} (expected one of {', '.join(ROLES)})")
        if role != role_raw or not isinstance(content_raw, str):
            plain = False
        msg = {"role": role, "content": _content(content_raw if content_raw is not None else "", f"{where}[{i}]")}
        for key in REASONING_KEYS:
            if m.get(key) is not None:
                msg["reasoning_content"] = _text(m[key], f"{where}[{i}].{key}", lists=False)
                plain = plain and key == "reasoning_content"
                break
        out.append(msg)
    return out, plain


def _split_answer(msgs: list[dict], where: str) -> tuple[list[dict], str, str | None]:
    if not msgs or msgs[-1]["role"] != "assistant":
        raise RowError("no_assistant_turn", f"the last message of {where!r} is not an assistant turn")
    last = msgs[-1]
    prompt = [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]]
    return prompt, last["content"], last.get("reasoning_content")


# ----------------------------------------------------------------------------------------------
# shapes


def parse_row(row, fields: FieldMap = FieldMap()) -> Conversation:
    """The row as a Conversation, or RowError."""
    if not isinstance(row, dict):
        raise RowError("not_object", f"row is {type(row).__name__}")
    domain = row.get("domain") if fields.domain is None else get_field(row, fields.domain)
    if domain is not None and not isinstance(domain, str):
        raise RowError("bad_type", f"the domain is {type(domain).__name__}, not a string")
    prompt, answer, reasoning, key, shape = _parts(row, fields)
    if not answer.strip() and not (reasoning or "").strip():
        raise RowError("empty_response", "the response is empty")
    rid = row.get("id") if fields.id is None else get_field(row, fields.id)
    if rid is None:
        rid = canonical_id(key, answer, reasoning)
    elif isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    elif not isinstance(rid, str) or not rid:
        raise RowError("bad_type", "the id must be a non-empty string")
    return Conversation(prompt=prompt, answer=answer, reasoning=reasoning, id=rid, domain=domain, shape=shape)


def _parts(row: dict, f: FieldMap):
    """-> (prompt, answer, reasoning, id key, shape)."""
    if f.messages is not None or (f.prompt is None and f.response is None and row.get("messages") is not None):
        name = f.messages or "messages"
        value = get_field(row, name)
        if value is None:
            raise RowError("missing_field", f"no {name!r}")
        msgs, plain = _messages(value, name)
        prompt, answer, reasoning = _split_answer(msgs, name)
        reasoning = _mapped_reasoning(row, f, reasoning)
        key = value if plain and reasoning is None and f.messages is None else _key_messages(prompt, answer, reasoning)
        return prompt, answer, reasoning, key, "messages"
    if f.prompt is not None or f.response is not None:
        prompt = _field(row, f.prompt or "prompt", f.prompt or "'prompt'", lists=f.prompt is not None)
        answer = _field(row, f.response or "response", f.response or "'response'", lists=f.response is not None)
        reasoning = _mapped_reasoning(row, f, None)
        return prompt, answer, reasoning, prompt, "fields"
    if row.get("conversations") is not None:
        msgs, _ = _messages(row["conversations"], "conversations")
        system = row.get("system")
        if isinstance(system, str) and system.strip() and not any(m["role"] == "system" for m in msgs):
            msgs = [{"role": "system", "content": system}] + msgs
        prompt, answer, reasoning = _split_answer(msgs, "conversations")
        reasoning = _mapped_reasoning(row, f, reasoning)
        return prompt, answer, reasoning, _key_messages(prompt, answer, reasoning), "conversations"
    if "completion" in row and "prompt" in row:
        p, c = row.get("prompt"), row.get("completion")
        if p is None or c is None:
            raise RowError("missing_field", "need 'prompt' and 'completion'")
        if isinstance(c, str) and isinstance(p, str):
            reasoning = _mapped_reasoning(row, f, None)
            return p, c, reasoning, p, "prompt+completion"
        pm = [{"role": "user", "content": _text(p, "'prompt'", False)}] if isinstance(p, str) else \
            _messages(p, "prompt")[0]
        cm = [{"role": "assistant", "content": c}] if isinstance(c, str) else _messages(c, "completion")[0]
        prompt, answer, reasoning = _split_answer(pm + cm, "completion")
        reasoning = _mapped_reasoning(row, f, reasoning)
        return prompt, answer, reasoning, _key_messages(prompt, answer, reasoning), "prompt+completion"
    if "prompt" not in row and "response" not in row:
        raise RowError("missing_field", "need 'prompt' and 'response', 'messages', 'conversations' or 'prompt' and "
                                        "'completion' (or map fields: --prompt-field, --response-field, ...)")
    prompt, answer = _field(row, "prompt", "'prompt'"), _field(row, "response", "'response'")
    reasoning = _mapped_reasoning(row, f, None)
    return prompt, answer, reasoning, prompt, "prompt+response"


def _mapped_reasoning(row: dict, f: FieldMap, found: str | None) -> str | None:
    if f.reasoning is None:
        return found
    return _field(row, f.reasoning, repr(f.reasoning), lists=True, required=False)


def _key_messages(prompt: list[dict], answer: str, reasoning: str | None) -> list[dict]:
    last = {"role": "assistant", "content": answer}
    if reasoning is not None:
        last["reasoning_content"] = reasoning
    return prompt + [last]


def record_id(text: str | None, fields: FieldMap = FieldMap()) -> str | None:
    """The id a raw JSON record will be scored under, or None when the record is not a valid row (it is
    rejected for that reason later). Cheap: no tokenizer."""
    if text is None:
        return None
    try:
        return parse_row(json.loads(text), fields).id
    except (json.JSONDecodeError, RowError, RecursionError):
        return None


def load_record(text: str | None):
    """A raw record -> its JSON value, or RowError (``invalid_utf8``, ``invalid_json``, ``too_deep``)."""
    if text is None:
        raise RowError("invalid_utf8", "the line is not valid UTF-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RowError("invalid_json", str(e)) from None
    except RecursionError:
        raise RowError("too_deep", "the record is nested deeper than JSON parsing allows") from None
