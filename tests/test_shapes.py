"""Row shapes (air_ray.data.shapes): every supported shape, written with the exact field names and nesting of the
public datasets people curate, parses to the same conversation; bad rows get their stable reason. No tokenizer."""

from __future__ import annotations

import json

import pytest

from air_ray.data.shapes import REASONS, FieldMap, RowError, canonical_id, load_record, parse_row, record_id

Q = "Natalia sold clips to 48 of her friends in April. How many clips did she sell?"
A = "Natalia sold 48 clips.\n#### 48"
R = "She sold 48 in April.\n\nSo the total is 48."
SYS = "Your role as an assistant involves thoroughly exploring questions."

# the same content, in every shape (the ids agree within the string-prompt shapes and within the conversation
# shapes; prompt+response rows keep the id they always had)
PLAIN = {
    "prompt+response": {"prompt": Q, "response": A},
    "trl strings": {"prompt": Q, "completion": A},
    "fields": ({"question": Q, "attempt": A}, FieldMap(prompt="question", response="attempt")),
    "messages": {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]},
    "content parts": {"messages": [{"role": "user", "content": [{"type": "text", "text": Q}]},
                                   {"role": "assistant", "content": [{"type": "text", "text": A}]}]},
    "sharegpt": {"id": None, "conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": A}]},
    "trl messages": {"prompt": [{"role": "user", "content": Q}], "completion": [{"role": "assistant", "content": A}]},
    "messages field": ({"dialog": [{"from": "user", "value": Q}, {"from": "assistant", "value": A}]},
                       FieldMap(messages="dialog")),
}
REASONED = {
    "reasoning_content": {"messages": [{"role": "user", "content": Q},
                                       {"role": "assistant", "content": A, "reasoning_content": R}]},
    "reasoning": {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A, "reasoning": R}]},
    "trl completion": {"prompt": [{"role": "user", "content": Q}],
                       "completion": [{"role": "assistant", "content": A, "reasoning_content": R}]},
    # s1K: question / thinking_trajectories (a list of strings) / attempt
    "s1K": ({"question": Q, "thinking_trajectories": ["She sold 48 in April.", "", "So the total is 48."],
             "attempt": A, "cot_type": "math", "source_type": "gsm8k", "cot": None, "solution": "48"},
            FieldMap(prompt="question", reasoning="thinking_trajectories", response="attempt")),
}


def parse(case):
    row, fields = case if isinstance(case, tuple) else (case, FieldMap())
    return parse_row(row, fields)


def test_every_shape_gives_the_same_conversation():
    convs = {name: parse(case) for name, case in PLAIN.items()}
    for name, c in convs.items():
        assert (c.messages(), c.answer, c.reasoning) == ([{"role": "user", "content": Q}], A, None), name
    strings = {convs[n].id for n in ("prompt+response", "trl strings", "fields")}
    talks = {convs[n].id for n in ("messages", "content parts", "sharegpt", "trl messages", "messages field")}
    assert strings == {canonical_id(Q, A)} and len(talks) == 1 and strings != talks
    # a messages row keeps the id it always had: the hash of its own messages
    assert talks == {canonical_id(PLAIN["messages"]["messages"], A)}
    reasoned = {name: parse(case) for name, case in REASONED.items()}
    for name, c in reasoned.items():
        assert (c.answer, c.reasoning) == (A, R), name
    assert len({reasoned[n].id for n in ("reasoning_content", "reasoning", "trl completion")}) == 1
    assert reasoned["s1K"].id == canonical_id(Q, A, R) and reasoned["s1K"].prompt == Q


def test_sharegpt_roles_and_the_system_string():
    # OpenThoughts-114k / Bespoke-Stratos-17k: a top-level system string and user/assistant turns
    row = {"system": SYS, "conversations": [
        {"from": "user", "value": Q},
        {"from": "assistant", "value": "<|begin_of_thought|>\n\nthinking\n\n<|end_of_thought|>\n\n"
                                       "<|begin_of_solution|>\n\n48\n\n<|end_of_solution|>"}]}
    c = parse_row(row)
    assert c.shape == "conversations" and c.prompt == [{"role": "system", "content": SYS},
                                                        {"role": "user", "content": Q}]
    assert c.answer.startswith("<|begin_of_thought|>") and c.reasoning is None
    # ShareGPT dumps: human / gpt, ids like "QWJhYvA_0", several turns
    dump = {"id": "QWJhYvA_0", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                                                 {"from": "human", "value": Q}, {"from": "gpt", "value": A}]}
    c = parse_row(dump)
    assert c.id == "QWJhYvA_0" and [m["role"] for m in c.prompt] == ["user", "assistant", "user"] and c.answer == A
    # gpt-style "model" role (Gemma data) is the assistant
    assert parse_row({"conversations": [{"from": "user", "value": Q}, {"from": "model", "value": A}]}).answer == A


def test_numinamath_both_ways():
    row = {"source": "synthetic_math", "problem": Q, "solution": A,
           "messages": [{"content": Q, "role": "user"}, {"content": A, "role": "assistant"}]}
    detected = parse_row(row)  # the messages column
    assert detected.shape == "messages" and detected.domain is None
    mapped = parse_row(row, FieldMap(prompt="problem", response="solution", domain="source"))
    assert (mapped.prompt, mapped.answer, mapped.domain) == (Q, A, "synthetic_math")


def test_mapped_fields_nested_and_lists():
    row = {"meta": {"uid": "u-7", "topic": "algebra"}, "q": ["line one", "line two"], "a": A}
    c = parse_row(row, FieldMap(prompt="q", response="a", id="meta.uid", domain="meta.topic"))
    assert (c.prompt, c.id, c.domain) == ("line one\nline two", "u-7", "algebra")
    # a list in a detected shape's string field is still an error (it may be a list of candidates)
    with pytest.raises(RowError) as e:
        parse_row({"prompt": Q, "response": [A, A]})
    assert e.value.reason == "bad_type"


@pytest.mark.parametrize("row, fields, reason", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                   {"role": "assistant", "content": A}]}, FieldMap(), "non_text_content"),
    ({"conversations": [{"from": "narrator", "value": Q}, {"from": "gpt", "value": A}]}, FieldMap(), "bad_role"),
    ({"conversations": [{"from": "human", "value": Q}]}, FieldMap(), "no_assistant_turn"),
    ({"prompt": Q, "completion": None}, FieldMap(), "missing_field"),
    ({"question": Q}, FieldMap(prompt="question", response="attempt"), "missing_field"),
    ({"question": 3, "attempt": A}, FieldMap(prompt="question", response="attempt"), "bad_type"),
    ({"question": Q, "attempt": A, "t": [1, 2]}, FieldMap(prompt="question", response="attempt", reasoning="t"),
     "bad_type"),
    ({"text": "hello"}, FieldMap(), "missing_field"),
    ({"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": "  "}]}, FieldMap(),
     "empty_response"),
])
def test_bad_rows_have_stable_reasons(row, fields, reason):
    with pytest.raises(RowError) as e:
        parse_row(row, fields)
    assert e.value.reason == reason and reason in REASONS


def test_deep_and_broken_records():
    deep = "[" * 200_000 + "]" * 200_000
    with pytest.raises(RowError) as e:
        load_record(deep)
    assert e.value.reason == "too_deep"
    assert record_id(deep) is None  # the id pass skips it; the prepare step rejects it
    with pytest.raises(RowError) as e:
        load_record('{"prompt": ')
    assert e.value.reason == "invalid_json"
    with pytest.raises(RowError) as e:
        load_record(None)
    assert e.value.reason == "invalid_utf8"
    assert record_id(json.dumps(PLAIN["sharegpt"])) == parse(PLAIN["sharegpt"]).id


# ----------------------------------------------------------------------------------------------
# issue #26: Alpaca, agent traces (OpenAI tool calls), several fields for one part

# OpenAI's chat fine-tuning format with function calling: an assistant turn that only calls a tool (content null),
# the tool's answer, the final answer; the tools offered; a user with a name; parallel_tool_calls as OpenAI writes it
TOOLS = [{"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "The city and country, e.g. San Francisco, USA"},
        "format": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["location", "format"]}}}]
CALL = {"id": "call_id", "type": "function", "function": {
    "name": "get_current_weather", "arguments": "{\"location\": \"Paris, France\", \"format\": \"celsius\"}"}}
WEATHER = "It is 18 degrees Celsius and cloudy in Paris."
AGENT = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant that can look up the weather."},
        {"role": "user", "name": "alice", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_id", "content": "{\"temperature\": 18, \"condition\": \"cloudy\"}"},
        {"role": "assistant", "content": WEATHER}],
    "tools": TOOLS, "parallel_tool_calls": False}

# LLaMA-Factory's Alpaca format (alpaca_en_demo.json; tatsu-lab/alpaca also has a "text" column)
ALPACA = {"instruction": "Give three tips for staying healthy.", "input": "",
          "output": "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Get enough sleep."}
ALPACA_INPUT = {"instruction": "Add the numbers.", "input": "48 and 24", "output": "48 + 24 = 72\n#### 72"}
ALPACA_CHAT = {"instruction": "And times two?", "input": "", "output": "144", "system": "You are a calculator.",
               "history": [["Add the numbers.\n48 and 24", "72"]]}


def test_alpaca_is_detected_as_llamafactory_builds_it():
    c = parse_row(ALPACA)
    assert (c.shape, c.prompt, c.answer) == ("alpaca", ALPACA["instruction"], ALPACA["output"])
    c = parse_row(ALPACA_INPUT)
    assert c.prompt == "Add the numbers.\n48 and 24"
    # the same content as a prompt+response row: the same id
    assert c.id == parse_row({"prompt": "Add the numbers.\n48 and 24", "response": ALPACA_INPUT["output"]}).id
    c = parse_row(ALPACA_CHAT)
    assert c.prompt == [{"role": "system", "content": "You are a calculator."},
                        {"role": "user", "content": "Add the numbers.\n48 and 24"},
                        {"role": "assistant", "content": "72"}, {"role": "user", "content": "And times two?"}]
    with pytest.raises(RowError) as e:
        parse_row(dict(ALPACA, history=[["only one"]]))
    assert e.value.reason == "bad_type"


def test_several_fields_or_a_reason_never_a_silent_drop():
    both = parse_row(ALPACA_INPUT, FieldMap(prompt="instruction,input", response="output"))
    assert (both.prompt, both.answer, both.id) == ("Add the numbers.\n48 and 24", ALPACA_INPUT["output"],
                                                   parse_row(ALPACA_INPUT).id)
    # an empty input adds nothing (no trailing newline)
    assert parse_row(ALPACA, FieldMap(prompt="instruction,input", response="output")).prompt == ALPACA["instruction"]
    # naming instruction alone would drop the non-empty input: a rejected row with its own reason
    with pytest.raises(RowError) as e:
        parse_row(ALPACA_INPUT, FieldMap(prompt="instruction", response="output"))
    assert e.value.reason == "dropped_field" and "'input'" in e.value.detail and "instruction,input" in e.value.detail
    # ... but not when that sibling is empty, nor for fields of no detected shape (s1K, NuminaMath's problem)
    assert parse_row(ALPACA, FieldMap(prompt="instruction", response="output")).prompt == ALPACA["instruction"]
    with pytest.raises(RowError) as e:
        parse_row(ALPACA_CHAT, FieldMap(prompt="instruction,input", response="output"))
    assert e.value.reason == "dropped_field"
    with pytest.raises(RowError) as e:
        parse_row({"a": "", "b": None, "response": "x"}, FieldMap(prompt="a,b"))
    assert e.value.reason == "missing_field"


def test_agent_trace():
    c = parse_row(AGENT)
    assert c.shape == "messages" and c.answer == WEATHER and c.tools == TOOLS
    call, tool = c.prompt[2], c.prompt[3]
    assert call == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert tool == {"role": "tool", "content": AGENT["messages"][3]["content"], "tool_call_id": "call_id"}
    assert c.prompt[1]["name"] == "alice"
    # tools as JSON text (how Arrow-typed datasets and LLaMA-Factory keep them) read the same, same id
    assert parse_row(dict(AGENT, tools=json.dumps(TOOLS))).tools == TOOLS
    assert parse_row(dict(AGENT, tools=json.dumps(TOOLS))).id == c.id
    # the tools and the call are part of the id; rows without them keep theirs (test_every_shape...)
    assert parse_row(dict(AGENT, tools=None)).id != c.id
    # a last turn that only calls a tool has nothing to score
    with pytest.raises(RowError) as e:
        parse_row({"messages": AGENT["messages"][:3]})
    assert e.value.reason == "tool_call_only"
    for bad in ({"tools": "not json"}, {"tools": ["get_current_weather"]}, {"tools": {"type": "function"}}):
        with pytest.raises(RowError) as e:
            parse_row(dict(AGENT, **bad))
        assert e.value.reason == "bad_type"
    with pytest.raises(RowError) as e:
        parse_row({"messages": [AGENT["messages"][1], {"role": "assistant", "content": None,
                                                       "tool_calls": [{"function": {"arguments": "{}"}}]},
                                {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})
    assert e.value.reason == "bad_type"
    # Parquet-typed messages carry every key, null where a message has none: the same conversation
    empty = {"name": None, "tool_calls": None, "tool_call_id": None}
    typed = {"messages": [dict(empty, **m) for m in AGENT["messages"]], "tools": AGENT["tools"]}
    assert parse_row(typed).prompt == c.prompt
