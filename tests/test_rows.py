"""Rows -> token ids, response token offsets, step spans and ids, with the real SmolLM2 tokenizer."""

import hashlib
import json

import pytest

from air_ray.errors import AirRayError
from air_ray.data.rows import RowError, RowPreparer, parse_row
from air_ray.data.steps import split_steps

PROMPT = "Tom has 3 apples and buys 4 more. How many apples does he have?"
RESPONSE = "He starts with 3 apples.\n3 + 4 = 7\n\n#### 7"


def chat_ids(tok, messages):
    out = tok.apply_chat_template(messages, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def sha1_id(key, response):
    blob = json.dumps([key, response], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


@pytest.fixture(scope="module")
def chat(smol_tok):
    return RowPreparer(smol_tok, format="chat", steps="lines")


def test_chat_prompt_response_row(smol_tok, chat):
    p = chat.prepare({"id": "r1", "prompt": PROMPT, "response": RESPONSE, "domain": "math"})
    prompt_ids = chat_ids(smol_tok, [{"role": "user", "content": PROMPT}])
    response_ids = smol_tok(RESPONSE, add_special_tokens=False)["input_ids"]
    assert p.input_ids == prompt_ids + list(response_ids)
    assert p.n_prompt_tokens == len(prompt_ids)
    assert p.n_response_tokens == len(response_ids)
    assert p.id == "r1" and p.domain == "math"
    # the prompt ends with the assistant header: the response starts right after it
    assert smol_tok.decode(p.input_ids[: p.n_prompt_tokens]).endswith("<|im_start|>assistant\n")
    assert smol_tok.decode(p.input_ids[p.n_prompt_tokens:]) == RESPONSE


def test_token_starts_are_response_offsets(smol_tok, chat):
    p = chat.prepare({"prompt": PROMPT, "response": RESPONSE})
    enc = smol_tok(RESPONSE, add_special_tokens=False, return_offsets_mapping=True)
    assert p.token_starts == [a for a, _ in enc["offset_mapping"]]
    assert len(p.token_starts) == p.n_response_tokens
    assert p.token_starts[0] == 0
    assert p.token_starts == sorted(p.token_starts)
    assert all(0 <= a < len(RESPONSE) for a in p.token_starts)
    # the tokens, decoded piece by piece from their offsets, rebuild the response
    ends = p.token_starts[1:] + [len(RESPONSE)]
    assert "".join(RESPONSE[a:b] for a, b in zip(p.token_starts, ends)) == RESPONSE
    assert p.step_spans == split_steps(RESPONSE, "lines")
    assert [RESPONSE[a:b] for a, b in p.step_spans] == ["He starts with 3 apples.", "3 + 4 = 7", "#### 7"]


def test_messages_row_equals_prompt_row(smol_tok, chat):
    msgs = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSE}]
    a = chat.prepare({"messages": msgs})
    b = chat.prepare({"prompt": PROMPT, "response": RESPONSE})
    assert a.input_ids == b.input_ids and a.n_prompt_tokens == b.n_prompt_tokens
    assert a.token_starts == b.token_starts and a.step_spans == b.step_spans
    # but the ids differ: the key is the messages list, not the prompt string
    assert a.id == sha1_id(msgs, RESPONSE) != b.id == sha1_id(PROMPT, RESPONSE)


def test_messages_row_with_system_and_history(smol_tok, chat):
    msgs = [
        {"role": "system", "content": "You solve math problems."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": RESPONSE},
    ]
    p = chat.prepare({"messages": msgs, "domain": "math"})
    prompt_ids = chat_ids(smol_tok, msgs[:-1])
    assert p.input_ids == prompt_ids + list(smol_tok(RESPONSE, add_special_tokens=False)["input_ids"])
    assert p.n_prompt_tokens == len(prompt_ids)
    assert "You solve math problems." in smol_tok.decode(prompt_ids)
    assert p.domain == "math"


def test_canonical_id(chat):
    prompt = "Café: ünïcode prompt ✓"  # ensure_ascii=False changes the blob
    p = chat.prepare({"prompt": prompt, "response": RESPONSE})
    assert len(p.id) == 16 and all(c in "0123456789abcdef" for c in p.id)
    assert p.id == sha1_id(prompt, RESPONSE)
    assert p.id != hashlib.sha1(json.dumps([prompt, RESPONSE]).encode()).hexdigest()[:16]
    # stable, and the same as an explicit null id
    assert chat.prepare({"prompt": prompt, "response": RESPONSE, "id": None}).id == p.id
    # sort_keys: the order of keys inside messages does not matter
    m1 = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    m2 = [{"content": "q", "role": "user"}, {"content": "a", "role": "assistant"}]
    assert chat.prepare({"messages": m1}).id == chat.prepare({"messages": m2}).id == sha1_id(m1, "a")
    # explicit ids: strings are kept, ints become strings
    assert chat.prepare({"prompt": "q", "response": "a", "id": 17}).id == "17"
    assert chat.prepare({"prompt": "q", "response": "a", "id": "x-1"}).id == "x-1"


def test_raw_format(smol_tok):
    raw = RowPreparer(smol_tok, format="raw")
    p = raw.prepare({"prompt": PROMPT, "response": RESPONSE})
    prompt_ids = list(smol_tok(PROMPT)["input_ids"])
    assert p.input_ids == prompt_ids + list(smol_tok(RESPONSE, add_special_tokens=False)["input_ids"])
    assert p.n_prompt_tokens == len(prompt_ids)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": RESPONSE}]
    q = raw.prepare({"messages": msgs})
    assert q.input_ids[: q.n_prompt_tokens] == list(smol_tok("S\nU")["input_ids"])
    assert q.token_starts == p.token_starts


def test_steps_rule_passes_through(smol_tok):
    para = RowPreparer(smol_tok, steps="paragraphs").prepare({"prompt": PROMPT, "response": RESPONSE})
    assert para.step_spans == split_steps(RESPONSE, "paragraphs") == [(0, 34), (36, 42)]
    rx = RowPreparer(smol_tok, steps=r"regex:\d \+").prepare({"prompt": PROMPT, "response": RESPONSE})
    assert rx.step_spans == [(25, len(RESPONSE))]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "q"}, "missing_field"),
        ({"response": "a"}, "missing_field"),
        ({"text": "hello"}, "missing_field"),
        ({"prompt": None, "response": "a"}, "missing_field"),
        ({"prompt": 3, "response": "a"}, "bad_type"),
        ({"prompt": "q", "response": ["a"]}, "bad_type"),
        ({"prompt": "q", "response": "a", "domain": 5}, "bad_type"),
        ({"prompt": "q", "response": "a", "id": True}, "bad_type"),
        ({"prompt": "q", "response": "a", "id": ""}, "bad_type"),
        ({"prompt": "q", "response": "a", "id": 1.5}, "bad_type"),
        ({"messages": "hello"}, "bad_type"),
        ({"messages": [{"role": "user"}]}, "bad_type"),
        ({"messages": [{"role": "assistant", "content": 3}]}, "bad_type"),
        ({"prompt": "q", "response": ""}, "empty_response"),
        ({"prompt": "q", "response": " \n\t"}, "empty_response"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
         "empty_response"),
        ({"messages": [{"role": "user", "content": "q"}]}, "no_assistant_turn"),
        ({"messages": []}, "no_assistant_turn"),
        ("a string", "not_object"),
        (["prompt", "response"], "not_object"),
        (None, "not_object"),
    ],
)
def test_row_errors(chat, row, reason):
    with pytest.raises(RowError) as e:
        chat.prepare(row)
    assert e.value.reason == reason
    assert str(e.value).startswith(reason)
    with pytest.raises(RowError):
        parse_row(row)


def test_too_long(smol_tok):
    row = {"prompt": PROMPT, "response": RESPONSE}
    n = len(RowPreparer(smol_tok).prepare(row).input_ids)
    assert len(RowPreparer(smol_tok, max_tokens=n).prepare(row).input_ids) == n  # the limit is inclusive
    with pytest.raises(RowError) as e:
        RowPreparer(smol_tok, max_tokens=n - 1).prepare(row)
    assert e.value.reason == "too_long"
    assert str(n) in str(e.value)


def test_preparer_config_errors(smol_tok):
    with pytest.raises(AirRayError, match="unknown format"):
        RowPreparer(smol_tok, format="json")
    with pytest.raises(AirRayError):
        RowPreparer(smol_tok, steps="words")


# ----------------------------------------------------------------------------------------------
# agent traces through the chat template (issue #26)

# renders tools and tool calls the way Qwen2.5's template does (a template with tool support)
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- elif m.role == 'assistant' %}<|im_start|>assistant\n{% if m.content %}{{ m.content }}{% endif %}"
    "{%- if m.tool_calls %}{% for c in m.tool_calls %}\n<tool_call>\n{\"name\": \"{{ c.function.name }}\", "
    "\"arguments\": {% if c.function.arguments is string %}{{ c.function.arguments }}{% else %}"
    "{{ c.function.arguments | tojson }}{% endif %}}\n</tool_call>{% endfor %}{% endif %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_agent_trace_through_a_template_with_tools(smol_tok):
    import copy

    from tests.test_shapes import AGENT, TOOLS, WEATHER

    tok = copy.deepcopy(smol_tok)
    tok.chat_template = TOOL_TEMPLATE
    prep = RowPreparer(tok, steps="lines")
    p = prep.prepare(AGENT)
    msgs = parse_row(AGENT).prompt
    want = list(tok.apply_chat_template(msgs, tools=TOOLS, add_generation_prompt=True)["input_ids"])
    assert p.input_ids[: p.n_prompt_tokens] == want
    text = tok.decode(want)
    assert '"name": "get_current_weather"' in text and '"location": "Paris, France"' in text  # the tool and the call
    assert "<tool_response>" in text and "cloudy" in text
    assert p.input_ids[p.n_prompt_tokens:] == list(tok(WEATHER, add_special_tokens=False)["input_ids"])


def test_agent_trace_where_the_template_has_no_tools(smol_tok):
    """SmolLM2's template renders neither tools nor tool calls: they are written into the text, never dropped."""
    from tests.test_shapes import AGENT, CALL, TOOLS

    prep = RowPreparer(smol_tok, steps="lines")
    p = prep.prepare(AGENT)
    text = smol_tok.decode(p.input_ids[: p.n_prompt_tokens])
    call = json.dumps({"name": "get_current_weather", "arguments": CALL["function"]["arguments"]})
    assert f"<|im_start|>assistant\n<tool_call>\n{call}\n</tool_call><|im_end|>" in text
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>" in text
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant that can look up the weather.\n\n<tools>")
    raw = RowPreparer(smol_tok, format="raw").prepare(AGENT)
    raw_text = smol_tok.decode(raw.input_ids[: raw.n_prompt_tokens])
    assert f"<tool_call>\n{call}\n</tool_call>" in raw_text and "<tools>" in raw_text
    # a row without tools is untouched (the same ids as before tools were read)
    plain = {"messages": [AGENT["messages"][1], AGENT["messages"][-1]]}
    assert prep.prepare(plain).input_ids[: 999] == chat_ids(smol_tok, [AGENT["messages"][1]]) + \
        list(smol_tok(AGENT["messages"][-1]["content"], add_special_tokens=False)["input_ids"])
