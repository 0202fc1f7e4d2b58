"""Row shapes: any supported corpus record -> one ``Conversation`` (prompt, answer, reasoning, tools, id, domain), or a
``RowError`` with a stable reason. Plain Python: no tokenizer.

Detected per row, in this order (unless fields are mapped, see ``FieldMap``):

  messages        {"messages": [{"role", "content"}, ...], "tools"?}; the last message is the assistant's answer
  conversations   ShareGPT: {"conversations": [{"from", "value"}, ...], "system"?}; from human/user, gpt/assistant/
                  model, system; a top-level "system" string becomes the system message
  prompt+completion   TRL: {"prompt", "completion"}, each a string or a list of messages
  alpaca          {"instruction", "input"?, "output", "system"?, "history"?} (LLaMA-Factory's default): the prompt is
                  instruction + "\n" + input when input is not empty; a system string and history pairs
                  [[user, assistant], ...] make the prompt a conversation
  prompt+response     {"prompt": str, "response": str}

A message's content is a string, or a list of parts ``[{"type": "text", "text": ...}]`` (joined with "\n"; any
other part rejects the row: ``non_text_content``). Reasoning given apart from the answer is the
``reasoning_content`` (or ``reasoning``) of the last assistant message, or the ``--reasoning-field``.

Agent traces (OpenAI form): an assistant message may carry ``tool_calls`` (its content then may be null), ``tool``
messages answer them (``tool_call_id``), any message may carry a ``name``, and the row's ``tools`` (a list of tool
definitions, or its JSON text) says what the model could call. They are kept on the messages and in
``Conversation.tools`` for the chat template. The scored response is the last assistant turn's text: a last turn
that only calls tools is rejected (``tool_call_only``).

Mapped fields (``--prompt-field`` ...): a field may hold a string or a list of strings (joined with "\n"); the text
flags take several fields, ``--prompt-field instruction,input``: those present and non-empty, joined with "\n". A
flag naming one of a detected shape's fields but not a non-empty sibling of it (``--prompt-field instruction`` on
an Alpaca row whose ``input`` is not empty) rejects the row (``dropped_field``) rather than drop that text.

Ids: the row's ``id`` (an int becomes a string), else the first 16 hex characters of the sha1 of the canonical
JSON of ``[prompt key, answer]`` (``[prompt key, answer, reasoning]`` when there is reasoning), where the prompt
key is the prompt string, or the messages (the answer's message included) for conversation shapes: the same
content gives the same id in ``prompt+response``, Alpaca (without system and history) and TRL string rows, and in
``messages``, ShareGPT and TRL message rows. Tool calls, tool call ids, names and a row's ``tools`` are part of
the key where a row has them (rows without them keep the ids they always had).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

# every reason a row can be rejected for (README, "Bad input"); each RowError carries one
REASONS = ("invalid_json", "invalid_utf8", "too_deep", "not_object", "missing_field", "bad_type", "bad_role",
           "non_text_content", "empty_response", "empty_tokens", "no_assistant_turn", "duplicate_id", "too_long",
           "non_finite_loss", "unreadable_file", "tool_call_only", "dropped_field")

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "system": "system", "tool": "tool"}
REASONING_KEYS = ("reasoning_content", "reasoning")
# the fields a detected shape builds its prompt from: a field flag naming some of them must name every non-empty one
_PROMPT_SIBLINGS = {"alpaca": ("system", "history", "instruction", "input")}


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
    objects (``meta.source``); ``prompt``, ``response`` and ``reasoning`` may name several fields, ``a,b`` (the
    present, non-empty ones joined with "\\n"). ``messages`` may hold OpenAI messages or ShareGPT turns."""

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

    prompt: str | list[dict]  # a string prompt, or the messages before the answer ({role, content} and, where the
    # row has them, reasoning_content, tool_calls, tool_call_id, name)
    answer: str  # the assistant's final answer
    reasoning: str | None  # reasoning given apart from the answer
    id: str
    domain: str | None
    shape: str  # messages | conversations | prompt+completion | alpaca | prompt+response | fields
    tools: list[dict] | None = None  # the tool definitions the row offers (its ``tools``)
    answer_keys: dict = field(default_factory=dict)  # tool_calls, name of the answer's message, where it has them

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
    """OpenAI messages or ShareGPT turns -> ([{role, content, (reasoning_content, tool_calls, tool_call_id, name)}],
    plain), where plain means the list was already exactly that (its own form is then the id key, as before)."""
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise RowError("bad_type", f"{where!r} must be a list of messages")
    out, plain = [], True
    for i, m in enumerate(value):
        if "from" in m and "role" not in m:  # ShareGPT
            role_raw, content_raw, plain = m.get("from"), m.get("value"), False
        else:
            role_raw, content_raw = m.get("role"), m.get("content")
        calls = m.get("tool_calls") or None  # [] or null: no call
        if not isinstance(role_raw, str) or content_raw is None and not calls and \
                not any(m.get(k) for k in REASONING_KEYS):
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
        if calls is not None:
            msg["tool_calls"] = _tool_calls(calls, f"{where}[{i}].tool_calls")
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None:
                msg[key] = _text(m[key], f"{where}[{i}].{key}", lists=False)
        out.append(msg)
    return out, plain


def _tool_calls(value, where: str) -> list[dict]:
    """OpenAI tool calls: [{id?, type?, function: {name, arguments (JSON text or an object)}}], kept as given."""
    ok = isinstance(value, list) and all(
        isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
        for c in value)
    if not ok:
        raise RowError("bad_type", f"{where} must be a list of {{function: {{name: str, arguments}}}}")
    return [dict(c) for c in value]


def _tools(row: dict) -> list[dict] | None:
    """The row's tool definitions (``tools``: a list of objects, or its JSON text), None when it has none."""
    value = row.get("tools")
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            raise RowError("bad_type", "'tools' is a string but not JSON") from None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RowError("bad_type", "'tools' must be a list of tool definitions (objects), or its JSON text")
    return value or None


def _split_answer(msgs: list[dict], where: str) -> tuple[list[dict], str, str | None, dict]:
    """-> (the messages before the answer, the answer, its reasoning, its tool_calls / name)."""
    if not msgs or msgs[-1]["role"] != "assistant":
        raise RowError("no_assistant_turn", f"the last message of {where!r} is not an assistant turn")
    last = msgs[-1]
    if last.get("tool_calls") and not last["content"].strip():
        raise RowError("tool_call_only", f"the last message of {where!r} only calls tools: it has no text to score")
    keys = {k: last[k] for k in ("tool_calls", "name") if k in last}
    return msgs[:-1], last["content"], last.get("reasoning_content"), keys


# ----------------------------------------------------------------------------------------------
# shapes


def parse_row(row, fields: FieldMap = FieldMap()) -> Conversation:
    """The row as a Conversation, or RowError."""
    if not isinstance(row, dict):
        raise RowError("not_object", f"row is {type(row).__name__}")
    domain = row.get("domain") if fields.domain is None else get_field(row, fields.domain)
    if domain is not None and not isinstance(domain, str):
        raise RowError("bad_type", f"the domain is {type(domain).__name__}, not a string")
    conv, key = _parts(row, fields)
    if not conv.answer.strip() and not (conv.reasoning or "").strip():
        raise RowError("empty_response", "the response is empty")
    rid = row.get("id") if fields.id is None else get_field(row, fields.id)
    if rid is None:
        rid = canonical_id(key, conv.answer, conv.reasoning)
    elif isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    elif not isinstance(rid, str) or not rid:
        raise RowError("bad_type", "the id must be a non-empty string")
    conv.id, conv.domain = rid, domain
    return conv


def _parts(row: dict, f: FieldMap) -> tuple[Conversation, object]:
    """-> (the conversation without its id and domain, the id key of its prompt)."""
    tools = _tools(row)

    def conv(prompt, answer, reasoning, shape, keys=None):
        c = Conversation(prompt, answer, reasoning, id="", domain=None, shape=shape, tools=tools,
                         answer_keys=keys or {})
        key = prompt if isinstance(prompt, str) else _key_messages(prompt, answer, reasoning, c.answer_keys)
        return c, key

    def with_tools(key):
        return {"messages": key, "tools": tools} if tools else key

    if f.messages is not None or (f.prompt is None and f.response is None and row.get("messages") is not None):
        name = f.messages or "messages"
        value = get_field(row, name)
        if value is None:
            raise RowError("missing_field", f"no {name!r}")
        msgs, plain = _messages(value, name)
        prompt, answer, reasoning, keys = _split_answer(msgs, name)
        reasoning = _mapped_reasoning(row, f, reasoning)
        c, key = conv(prompt, answer, reasoning, "messages", keys)
        if plain and reasoning is None and f.messages is None:
            key = value
        return c, with_tools(key)
    if f.prompt is not None or f.response is not None:
        _check_siblings(row, f)
        prompt = _mapped(row, f.prompt) if f.prompt is not None else _field(row, "prompt", "'prompt'")
        answer = _mapped(row, f.response) if f.response is not None else _field(row, "response", "'response'")
        c, key = conv(prompt, answer, _mapped_reasoning(row, f, None), "fields")
        return c, with_tools(key)
    if row.get("conversations") is not None:
        msgs, _ = _messages(row["conversations"], "conversations")
        system = row.get("system")
        if isinstance(system, str) and system.strip() and not any(m["role"] == "system" for m in msgs):
            msgs = [{"role": "system", "content": system}] + msgs
        prompt, answer, reasoning, keys = _split_answer(msgs, "conversations")
        c, key = conv(prompt, answer, _mapped_reasoning(row, f, reasoning), "conversations", keys)
        return c, with_tools(key)
    if "completion" in row and "prompt" in row:
        p, comp = row.get("prompt"), row.get("completion")
        if p is None or comp is None:
            raise RowError("missing_field", "need 'prompt' and 'completion'")
        if isinstance(comp, str) and isinstance(p, str):
            c, key = conv(p, comp, _mapped_reasoning(row, f, None), "prompt+completion")
            return c, with_tools(key)
        pm = [{"role": "user", "content": _text(p, "'prompt'", False)}] if isinstance(p, str) else \
            _messages(p, "prompt")[0]
        cm = [{"role": "assistant", "content": comp}] if isinstance(comp, str) else _messages(comp, "completion")[0]
        prompt, answer, reasoning, keys = _split_answer(pm + cm, "completion")
        c, key = conv(prompt, answer, _mapped_reasoning(row, f, reasoning), "prompt+completion", keys)
        return c, with_tools(key)
    if _detected(row) == "alpaca":
        c, key = conv(*_alpaca(row), _mapped_reasoning(row, f, None), "alpaca")
        return c, with_tools(key)
    if "prompt" not in row and "response" not in row:
        raise RowError("missing_field", "need 'prompt' and 'response', 'messages', 'conversations', 'prompt' and "
                                        "'completion', or 'instruction' and 'output' (or map fields: --prompt-field, "
                                        "--response-field, ...)")
    prompt, answer = _field(row, "prompt", "'prompt'"), _field(row, "response", "'response'")
    c, key = conv(prompt, answer, _mapped_reasoning(row, f, None), "prompt+response")
    return c, with_tools(key)


def _detected(row: dict) -> str | None:
    """The shape a row without field flags is read as, where it builds its prompt from several fields."""
    if "instruction" in row and "output" in row and not any(
            row.get(k) is not None for k in ("messages", "conversations", "prompt")):
        return "alpaca"
    return None


def _alpaca(row: dict) -> tuple[str | list[dict], str]:
    """(prompt, answer) of an Alpaca row, as LLaMA-Factory builds them."""
    instruction = _field(row, "instruction", "'instruction'")
    query = _field(row, "input", "'input'", required=False)
    answer = _field(row, "output", "'output'")
    text = f"{instruction}\n{query}" if query else instruction
    system = _field(row, "system", "'system'", required=False)
    history = row.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(h, list) and len(h) == 2 and all(isinstance(t, str) for t in h) for h in history):
        raise RowError("bad_type", "'history' must be a list of [user, assistant] string pairs")
    if not system and not history:
        return text, answer
    msgs = [{"role": "system", "content": system}] if system else []
    for user, assistant in history:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return msgs + [{"role": "user", "content": text}], answer


def _check_siblings(row: dict, f: FieldMap) -> None:
    """A --prompt-field naming some of the fields the detected shape builds its prompt from must name each of
    them that is not empty (else that text would be dropped without a word)."""
    shape = _detected(row)
    siblings = _PROMPT_SIBLINGS.get(shape)
    if not siblings or f.prompt is None:
        return
    named = {n.strip() for n in f.prompt.split(",")}
    if not named & set(siblings):
        return
    for s in siblings:
        if s not in named and row.get(s) not in (None, "", []):
            want = ",".join(x for x in siblings if x in named or row.get(x) not in (None, "", []))
            raise RowError("dropped_field", f"--prompt-field {f.prompt} leaves out the row's non-empty {s!r}, which "
                                            f"the {shape} shape uses: name it too (--prompt-field {want}), or give "
                                            f"no field flags ({shape} rows are detected)")


def _mapped(row: dict, spec: str, required: bool = True) -> str | None:
    """A mapped text field, or several (``a,b``): the present, non-empty ones joined with "\\n"."""
    names = [n.strip() for n in spec.split(",")]
    if len(names) == 1:
        return _field(row, names[0], names[0], lists=True, required=required)
    parts = [p for n in names if (p := _field(row, n, n, lists=True, required=False))]
    if not parts and required:
        raise RowError("missing_field", f"none of {', '.join(map(repr, names))} is there")
    return "\n".join(parts) if parts else None


def _mapped_reasoning(row: dict, f: FieldMap, found: str | None) -> str | None:
    if f.reasoning is None:
        return found
    return _mapped(row, f.reasoning, required=False)


def _key_messages(prompt: list[dict], answer: str, reasoning: str | None, keys: dict) -> list[dict]:
    """The id key of a conversation: its messages without the reasoning of earlier turns (as ids were made before
    those were kept), and the answer with its reasoning and tool keys."""
    last = {"role": "assistant", "content": answer, **keys}
    if reasoning is not None:
        last["reasoning_content"] = reasoning
    return [{k: v for k, v in m.items() if k != "reasoning_content"} for m in prompt] + [last]


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
