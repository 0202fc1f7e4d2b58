"""`air-ray export` is a faithful subset of the corpus (issue #26): every scored row of every shape exported, in every
style, both formats, its response character for character the text that was scored; nothing lost (reasoning apart,
tool calls, tool messages, names, tools, every source column); the export loads in `datasets`, a chat template with
tools, TRL's SFTTrainer and LLaMA-Factory's loader; compressed corpora are streamed and a corrupt one quarantined.

The corpora are written in the field names and nesting of the public datasets (OpenAI chat fine-tuning with tool
calls, LLaMA-Factory's Alpaca, s1K, NuminaMath-CoT, OpenThoughts' ShareGPT with system, a `save_to_disk` folder), and
scored by the real pipeline in process with a tiny real model (its tokenizer and chat template are SmolLM2's)."""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from air_ray.data.shapes import parse_row
from air_ray.errors import AirRayError
from tests.test_shapes import (AGENT, ALPACA, ALPACA_CHAT, ALPACA_INPUT, PLAIN, REASONED, SYS, TOOLS, WEATHER, A,
                               FieldMap, Q, R)


def _q(k: int) -> str:
    return f"{Q} (case {k})"


def corpus_rows() -> dict[str, list[dict]]:
    """file name -> rows: every detected shape, with and without reasoning, each row's content its own."""
    k = iter(range(1000))
    shapes = []
    for case in list(PLAIN.values()) + list(REASONED.values()):
        if isinstance(case, tuple):  # mapped fields: scored in runs of their own
            continue
        text = json.dumps(case).replace(json.dumps(Q)[1:-1], _q(next(k)))
        shapes.append(json.loads(text))
    # ShareGPT dumps (human/gpt, an id) and OpenThoughts (system + user/assistant)
    shapes.append({"id": "QWJhYvA_0", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
        {"from": "human", "value": _q(next(k))}, {"from": "gpt", "value": A}]})
    sharegpt = [{"system": SYS, "conversations": [
        {"from": "user", "value": _q(next(k))},
        {"from": "assistant", "value": "<|begin_of_thought|>\n\nthinking\n\n<|end_of_thought|>\n\n"
                                       "<|begin_of_solution|>\n\n48\n\n<|end_of_solution|>"}]} for _ in range(2)]
    # NuminaMath-CoT (its messages are read), an OpenAI agent trace with reasoning on the final turn
    numina = [{"source": "synthetic_math", "problem": _q(i), "solution": A,
               "messages": [{"content": _q(i), "role": "user"}, {"content": A, "role": "assistant"}]}
              for i in (next(k), next(k))]
    agent = [AGENT, json.loads(json.dumps(AGENT).replace("Paris", "Lyon"))]
    agent[1]["messages"][-1]["reasoning_content"] = R
    alpaca = [ALPACA, ALPACA_INPUT, ALPACA_CHAT]
    return {"shapes.jsonl": shapes, "openthoughts.jsonl.gz": sharegpt, "numina.jsonl.bz2": numina,
            "agent.jsonl.zst": agent, "alpaca.json.gz": alpaca,
            "reasoned.json.zst": [{"prompt": _q(next(k)), "response": A, "reasoning": R}]}


def write_corpus(d: Path) -> dict[str, list[dict]]:
    """The corpus folder: compressed files (a JSON array among them), nested Parquet with extra columns, a
    save_to_disk folder, and a truncated .jsonl.zst (quarantined)."""
    import datasets

    d.mkdir()
    files = corpus_rows()
    for name, rows in files.items():
        data = (json.dumps(rows) if ".json." in name else "".join(json.dumps(r) + "\n" for r in rows)).encode()
        if name.endswith(".gz"):
            data = gzip.compress(data)
        elif name.endswith(".zst"):
            data = zstandard.ZstdCompressor().compress(data)
        elif name.endswith(".bz2"):
            data = bz2.compress(data)
        (d / name).write_bytes(data)
    (d / "broken.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"prompt": _q(900 + i), "response": A}) + "\n" for i in range(50)).encode())[:-12])
    pq.write_table(nested_table(), d / "nested.parquet")
    files["nested.parquet"] = nested_table().to_pylist()
    hf = [{"messages": [{"role": "user", "content": _q(950)},
                        {"role": "assistant", "content": A, "reasoning_content": R}], "domain": "math"}]
    datasets.Dataset.from_list(hf).save_to_disk(str(d / "hf"))
    files["hf"] = hf
    return files


def nested_table() -> pa.Table:
    """Messages with extra columns: a license string, a nested struct, a list, an int32 and a timestamp."""
    rows = [{"messages": [{"role": "user", "content": _q(800 + i)},
                          {"role": "assistant", "content": f"{A} ({i})"}],
             "license": "cc-by-4.0", "meta": {"source": "gsm8k", "tags": ["math", f"t{i}"], "difficulty": i},
             "votes": [i, i + 1]} for i in range(6)]
    table = pa.Table.from_pylist(rows)
    return table.append_column("n", pa.array(range(6), pa.int32())).append_column(
        "created", pa.array([1_700_000_000 + i for i in range(6)], pa.timestamp("s")))


def expected(files: dict[str, list[dict]], fields=FieldMap()) -> dict[str, tuple[str, str | None]]:
    """id -> (answer, reasoning): what each scorable row holds, read off the fixtures themselves."""
    out = {}
    for rows in files.values():
        for row in rows:
            conv = parse_row(row, fields)
            out.setdefault(conv.id, (conv.answer, conv.reasoning))
    return out


def scored(answer: str, reasoning: str | None) -> str:
    """The text scored: the tiny model's template (SmolLM2's) does not render reasoning_content, so the tags."""
    return answer if reasoning is None else f"<think>\n{reasoning}\n</think>\n\n{answer}"


def score_and_select(model, corpus, out: Path, top_frac=1.0, **kw):
    from air_ray.config import ScoreConfig, SelectConfig
    from air_ray.outputs.select import select
    from air_ray.pipeline.score import run_score

    model_dir, heads = model
    manifest = run_score(ScoreConfig(input=[str(c) for c in corpus], output=str(out), model=str(model_dir),
                                     heads=str(heads), dtype="float32", device="cpu", executor="in-process",
                                     steps="think", rows_per_partition=8, **kw))
    select(SelectConfig(scores=str(out), output=str(out / "selection"), top_frac=top_frac))
    return manifest


def _export(run: Path, corpus, out: Path, **kw) -> dict:
    from air_ray.config import ExportConfig
    from air_ray.outputs.export import export

    return export(ExportConfig(scores=str(run), input=[str(c) for c in corpus], output=str(out), **kw))


# the exports the tests read: name -> (run, options); each made once per module, whichever test asks first
EXPORTS = {
    **{f"export-{fmt}-{style}": (fmt, dict(style=style, rows_per_file=7,
                                          output_format="jsonl" if style == "original" else "parquet"))
       for fmt in ("chat", "raw") for style in ("messages", "prompt-completion", "original")},
    **{f"inline-{style}": ("chat", dict(style=style, inline_reasoning=True))
       for style in ("messages", "prompt-completion")},
    "jsonl-chat-messages": ("chat", dict(output_format="jsonl")),
}


def exported(runs, name: str) -> tuple[Path, dict]:
    out = runs["d"] / name
    if name not in runs["exports"]:
        run, kw = EXPORTS[name]
        runs["exports"][name] = _export(runs["d"] / run, [runs["d"] / "corpus"], out, **kw)
    return out, runs["exports"][name]


def read_rows(out: Path) -> list[dict]:
    files = sorted((out / "data").glob("part-*"))
    rows = []
    for f in files:
        rows += pq.read_table(f).to_pylist() if f.suffix == ".parquet" else \
            [json.loads(line) for line in f.read_text().splitlines()]
    return rows


def scores_of(run: Path) -> dict:
    return {r["id"]: r for f in sorted((run / "scores").glob("*.parquet")) for r in pq.read_table(f).to_pylist()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """The corpus scored in both formats, s1K and Alpaca with field flags, all rows selected."""
    d = tmp_path_factory.mktemp("export")
    files = write_corpus(d / "corpus")
    chat = score_and_select(tiny_model, [d / "corpus"], d / "chat")
    raw = score_and_select(tiny_model, [d / "corpus"], d / "raw", format="raw")
    s1k = d / "s1k.jsonl"
    s1k_rows = [json.loads(json.dumps(REASONED["s1K"][0]).replace(json.dumps(Q)[1:-1], _q(700 + i)))
                for i in range(2)]
    s1k.write_text("".join(json.dumps(r) + "\n" for r in s1k_rows))
    s1k_fields = dict(prompt_field="question", reasoning_field="thinking_trajectories", response_field="attempt")
    s1k_manifest = score_and_select(tiny_model, [s1k], d / "s1k", **s1k_fields)
    alpaca = d / "alpaca.json"
    alpaca.write_text(json.dumps([ALPACA, ALPACA_INPUT, ALPACA_CHAT]))
    alpaca_fields = dict(prompt_field="instruction,input", response_field="output")
    alpaca_manifest = score_and_select(tiny_model, [alpaca], d / "alpaca", **alpaca_fields)
    return {"d": d, "files": files, "chat": chat, "raw": raw, "s1k": (s1k, s1k_rows, s1k_fields, s1k_manifest),
            "alpaca": (alpaca, alpaca_fields, alpaca_manifest), "exports": {}}


@pytest.mark.slow
def test_the_corpus_is_read_and_quarantined_as_it_should(runs):
    for m in (runs["chat"], runs["raw"]):
        c = m.counts
        n_rows = sum(len(v) for v in runs["files"].values())
        assert c["rows_read"] == c["rows_scored"] + c["rows_rejected"]
        # every fixture row scored; the truncated .jsonl.zst is one unreadable_file entry (and any rows it gave
        # before it broke off are scored), nothing else is rejected
        assert c["rows_scored"] >= n_rows and c["rejected_by_reason"] == {"unreadable_file": 1}
    # the Alpaca row with a system and history cannot be read by --prompt-field instruction,input: a reason, not a drop
    alpaca_counts = runs["alpaca"][2].counts
    assert (alpaca_counts["rows_scored"], alpaca_counts["rejected_by_reason"]) == (2, {"dropped_field": 1})


def check_export(summary: dict, out: Path, run: Path, want: dict, style: str, chat: bool, inline=False):
    """Every selected id once; counts reconcile; each row's response is the scored text, character for character;
    reasoning apart unless inline; the score columns are the run's."""
    sel = pq.read_table(run / "selection" / "selection.parquet").to_pylist()
    rows = read_rows(out)
    key = "air_id" if style == "original" else "id"
    assert sorted(r[key] for r in rows) == sorted(r["id"] for r in sel), style  # each exactly once
    assert summary["rows"] == summary["selected"] == len(sel) == sum(summary["file_rows"]) == len(rows)
    assert summary["corpus_rows_read"] >= len(rows)
    scores = scores_of(run)
    for row in rows:
        rid = row[key]
        answer, reasoning = want[rid]
        text = scored(answer, reasoning)
        s = scores[rid]
        pre = "air_" if style == "original" else ""
        assert row[pre + "scored_response"] == text, rid  # character for character
        assert (row[pre + "score"], row[pre + "step_weights"], row[pre + "step_spans"]) == \
               (s["score"], s["step_weights"], s["step_spans"]), rid
        assert max(b for _, b in row[pre + "step_spans"]) <= len(text)
        if style == "original":
            continue
        if style == "messages":
            last = row["messages"][-1]
        elif chat:
            last = row["completion"][-1]
        else:
            last = {"content": row["completion"], "reasoning_content": row["reasoning_content"]}
        assert last.get("role", "assistant") == "assistant"
        if inline or reasoning is None:
            assert last["content"] == text and last.get("reasoning_content") is None, rid
        else:
            assert (last["content"], last["reasoning_content"]) == (answer, reasoning), rid
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["chat", "raw"])
@pytest.mark.parametrize("style", ["messages", "prompt-completion", "original"])
def test_every_row_of_every_shape_exported_as_scored(runs, smol_tok, fmt, style):
    d = runs["d"]
    out = d / f"export-{fmt}-{style}"
    if style == "original":
        # a corpus of many shapes has no one Parquet schema (a content that is a string here, a list of parts
        # there): one line, nothing written; JSON lines keep each record as it is
        refused = d / f"refused-{fmt}"
        with pytest.raises(AirRayError, match="do not fit one Parquet schema.*--output-format jsonl"):
            _export(d / fmt, [d / "corpus"], refused, style=style, rows_per_file=7)
        assert not list((refused / "data").glob("*"))
    out, summary = exported(runs, out.name)
    want = expected(runs["files"])
    rows = check_export(summary, out, d / fmt, want, style, fmt == "chat")
    assert len(summary["files"]) == -(-len(rows) // 7) and summary["unreadable_files"][0]["source"].endswith(
        "broken.jsonl.zst")
    if style == "original":  # every source column, nested types kept
        by_id = {r["air_id"]: r for r in rows}
        agent = by_id[parse_row(AGENT).id]
        assert agent["tools"] == TOOLS and agent["parallel_tool_calls"] is False
        assert agent["messages"][2]["tool_calls"] == AGENT["messages"][2]["tool_calls"]
        assert {r["air_id"]: r for r in rows}[parse_row(ALPACA_CHAT).id]["history"] == ALPACA_CHAT["history"]
        return
    if style == "messages" or fmt == "chat":
        msgs = [r for r in rows if r["id"] == parse_row(AGENT).id][0]
        msgs = msgs["messages"] if style == "messages" else msgs["prompt"] + msgs["completion"]
        assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "assistant"]
        assert msgs[1]["name"] == "alice" and msgs[2]["tool_calls"] == [CALL_AS_EXPORTED]
        assert msgs[3]["tool_call_id"] == "call_id" and msgs[-1]["content"] == WEATHER
        assert json.loads([r for r in rows if r["id"] == parse_row(AGENT).id][0]["tools"]) == TOOLS
        # the prompt of a row without tools is exactly what was scored
        s = scores_of(d / fmt)
        for r in rows:
            prompt = r["messages"][:-1] if style == "messages" else r["prompt"]
            if fmt == "chat" and not r["tools"] and not any(m.get("tool_calls") for m in prompt):
                prompt = [{k: v for k, v in m.items() if v is not None} for m in prompt]
                ids = smol_tok.apply_chat_template(prompt, add_generation_prompt=True)
                assert len(ids["input_ids"] if hasattr(ids, "keys") else ids) == s[r["id"]]["n_prompt_tokens"]


CALL_AS_EXPORTED = {"id": "call_id", "type": "function", "function": {
    "name": "get_current_weather", "arguments": "{\"location\": \"Paris, France\", \"format\": \"celsius\"}"}}


@pytest.mark.slow
def test_inline_reasoning_and_mapped_fields(runs):
    d = runs["d"]
    for style in ("messages", "prompt-completion"):
        out, summary = exported(runs, f"inline-{style}")
        check_export(summary, out, d / "chat", expected(runs["files"]), style, True, inline=True)
    s1k, s1k_rows, fields, _ = runs["s1k"]
    want = expected({"s1k": s1k_rows}, FieldMap(prompt="question", reasoning="thinking_trajectories",
                                               response="attempt"))
    assert all(r == "She sold 48 in April.\n\nSo the total is 48." for _, r in want.values())
    for style in ("messages", "prompt-completion", "original"):
        out = d / f"s1k-{style}"
        check_export(_export(d / "s1k", [s1k], out, style=style, **fields), out, d / "s1k", want, style, True)
    alpaca, fields, _ = runs["alpaca"]
    want = expected({"a": [ALPACA, ALPACA_INPUT]}, FieldMap(prompt="instruction,input", response="output"))
    out = d / "alpaca-messages"
    rows = check_export(_export(d / "alpaca", [alpaca], out, **fields), out, d / "alpaca", want, "messages", True)
    assert {r["messages"][0]["content"] for r in rows} == {ALPACA["instruction"], "Add the numbers.\n48 and 24"}
    with pytest.raises(AirRayError, match="--inline-reasoning is for"):
        _export(d / "chat", [d / "corpus"], d / "never", style="original", inline_reasoning=True)


@pytest.mark.slow
def test_original_parquet_round_trip(tmp_path, tiny_model):
    """--style original of a Parquet source with extra and nested columns gives back exactly the source rows of the
    selection (a real subset: half of the rows), compared as Arrow tables."""
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(nested_table(), src / "nested.parquet")
    table = pq.read_table(src / "nested.parquet")  # the source rows as Parquet gives them (its list and time types)
    score_and_select(tiny_model, [src], tmp_path / "run", top_frac=0.5)
    summary = _export(tmp_path / "run", [src], tmp_path / "out", style="original", rows_per_file=2)
    sel = {r["id"] for r in pq.read_table(tmp_path / "run" / "selection" / "selection.parquet").to_pylist()}
    ids = [parse_row(r).id for r in table.to_pylist()]
    keep = [i for i, rid in enumerate(ids) if rid in sel]
    assert 0 < len(keep) < table.num_rows and summary["rows"] == len(keep)
    got = pa.concat_tables([pq.read_table(f) for f in sorted((tmp_path / "out" / "data").glob("part-*.parquet"))])
    assert got.select(table.column_names).equals(table.take(keep))
    assert got.column_names == table.column_names + [f for f in got.column_names if f.startswith("air_")]
    # JSONL back out, the same records (JSON's types)
    _export(tmp_path / "run", [src], tmp_path / "jsonl", style="original", output_format="jsonl")
    rows = read_rows(tmp_path / "jsonl")
    assert [{k: v for k, v in r.items() if not k.startswith("air_")} for r in rows] == \
        [json.loads(json.dumps(table.take(keep).to_pylist()[i], default=str)) for i in range(len(keep))]


@pytest.mark.slow
def test_loaders_find_the_export(runs):
    """datasets.load_dataset(DIR) and load_dataset("parquet", data_dir=DIR); LLaMA-Factory's loader rule (every file
    of the folder dataset_info.json names is of one type) and its dataset_info.json keys."""
    import datasets

    d = runs["d"]
    s1k, _, fields, _ = runs["s1k"]
    s1k_original = d / "s1k-original-loaders"
    _export(d / "s1k", [s1k], s1k_original, style="original", **fields)
    for out in (exported(runs, "export-chat-messages")[0], exported(runs, "export-raw-prompt-completion")[0],
                s1k_original):
        n = json.loads((out / ".export.json").read_text())["rows"]
        assert datasets.load_dataset(str(out), split="train").num_rows == n
        assert datasets.load_dataset("parquet", data_dir=str(out), split="train").num_rows == n
    out, summary = exported(runs, "jsonl-chat-messages")
    assert {p.suffix for p in (out / "data").iterdir()} == {".jsonl"}
    assert datasets.load_dataset(str(out), split="train").num_rows == summary["rows"]
    summary = exported(runs, "export-chat-original")[1]
    # LLaMA-Factory: dataset_dir = the export, dataset = its entry; file_name a folder of one file type
    info = json.loads((d / "export-chat-messages" / "dataset_info.json").read_text())
    (name, entry), = info.items()
    assert entry == {"file_name": "data", "formatting": "openai", "columns": {"messages": "messages", "tools": "tools"},
                     "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                              "assistant_tag": "assistant", "system_tag": "system", "observation_tag": "tool"}}
    folder = d / "export-chat-messages" / entry["file_name"]
    assert {p.suffix for p in folder.iterdir()} == {".parquet"}
    ds = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in folder.iterdir()), split="train")
    roles = {m["role"] for row in ds for m in row["messages"]}
    assert roles <= {entry["tags"][k] for k in ("user_tag", "assistant_tag", "system_tag", "observation_tag")}
    raw = json.loads((d / "export-raw-prompt-completion" / "dataset_info.json").read_text())
    assert list(raw.values()) == [{"file_name": "data", "columns": {"prompt": "prompt", "response": "completion"}}]
    assert not (d / "export-chat-original" / "dataset_info.json").exists()  # many shapes: no one formatting fits
    assert summary["llamafactory"] is None


@pytest.mark.slow
def test_chat_template_with_tools_and_trl_one_step(runs, tiny_model, tmp_path):
    """The messages export goes through apply_chat_template(messages, tools=...) of a template with tools, and TRL's
    SFTTrainer takes one optimiser step on each chat style."""
    import copy

    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tests.test_rows import TOOL_TEMPLATE

    d = runs["d"]
    exported(runs, "export-chat-messages")
    model_dir, _ = tiny_model
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tooled = copy.deepcopy(tok)
    tooled.chat_template = TOOL_TEMPLATE
    ds = datasets.load_dataset(str(d / "export-chat-messages"), split="train")
    agent = [r for r in ds if r["id"] == parse_row(AGENT).id][0]
    text = tooled.apply_chat_template(agent["messages"], tools=json.loads(agent["tools"]), tokenize=False)
    assert '"name": "get_current_weather"' in text and '"location": "Paris, France"' in text
    assert "<tool_response>" in text and text.rstrip().endswith(f"{WEATHER}<|im_end|>")
    for style in ("messages", "prompt-completion"):
        out, _ = exported(runs, f"inline-{style}")
        ds = datasets.load_dataset(str(out), split="train")
        model = AutoModelForCausalLM.from_pretrained(str(model_dir))
        args = SFTConfig(output_dir=str(tmp_path / style), max_steps=1, per_device_train_batch_size=4,
                         report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, max_length=512,
                         dataloader_num_workers=0, disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
        result = trainer.train()
        assert result.global_step == 1 and result.training_loss > 0


@pytest.mark.slow
def test_train_reads_every_style(runs, tiny_model):
    """`air-ray train --input EXPORT` reads the scored response and the prompt (tools included) of every style."""
    from air_ray.outputs.export import read_export

    want = expected(runs["files"])
    base = None
    for name in ("export-chat-messages", "export-chat-prompt-completion", "export-chat-original", "inline-messages"):
        ex = read_export(str(exported(runs, name)[0]))
        assert [e["response"] for e in ex] == [scored(*want[e["id"]]) for e in ex]
        agent = [e for e in ex if e["id"] == parse_row(AGENT).id][0]
        assert agent["tools"] == TOOLS and agent["prompt"][2]["tool_calls"][0]["function"]["name"] == \
            "get_current_weather"
        view = [(e["id"], e["rank"], e["step_spans"], e["step_weights"]) for e in ex]
        assert base is None or view == base
        base = view


def test_compressed_files_stream_and_corrupt_ones_are_quarantined(tmp_path):
    """.json.gz .jsonl.gz .json.zst .jsonl.zst .jsonl.bz2 read the records of the plain file; memory holds a
    block, not the file; a truncated or corrupt one keeps its records so far and carries the error."""
    import tracemalloc

    from air_ray.data.corpus import expand_inputs, read_chunks

    rows = [{"prompt": f"{Q} {i}", "response": A * (1 + i % 3)} for i in range(2_000)]
    lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
    array = json.dumps(rows).encode()
    codecs = {".gz": gzip.compress, ".zst": zstandard.ZstdCompressor().compress, ".bz2": bz2.compress}
    for name, data in {"a.jsonl.gz": lines, "b.json.gz": array, "c.json.zst": array, "d.jsonl.zst": lines,
                       "e.jsonl.bz2": lines, "f.json.bz2": array}.items():
        (tmp_path / name).write_bytes(codecs[Path(name).suffix](data))
    files = expand_inputs([str(tmp_path)])
    assert [Path(f).name for f in files] == ["a.jsonl.gz", "b.json.gz", "c.json.zst", "d.jsonl.zst", "e.jsonl.bz2",
                                            "f.json.bz2"]
    for f in files:
        got = [t.rstrip("\n") for c in read_chunks(f, 512) for t in c.texts if not c.file_error]
        assert [json.loads(t) for t in got] == rows, f
    # streamed: a file 20x larger (7 MB) is read with the same few hundred KB (a block, a chunk of records)
    big = tmp_path / "big"
    big.mkdir()
    more = [{"prompt": f"{Q} {i}", "response": A * (1 + i % 3)} for i in range(20 * len(rows))]
    for name, data in {"a.jsonl.gz": "".join(json.dumps(r) + "\n" for r in more).encode(),
                       "c.json.zst": json.dumps(more).encode()}.items():
        (big / name).write_bytes(codecs[Path(name).suffix](data))
        peaks = []
        for f in (tmp_path / name, big / name):
            tracemalloc.start()
            n = sum(len(c.texts) for c in read_chunks(str(f), 256))
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
        assert n == 20 * len(rows) and peaks[1] < min(1.5 * peaks[0] + 100_000, 4 * len(lines)), (name, peaks)
    # corrupt and truncated: records so far kept, the error carried (one unreadable_file rejected entry)
    (tmp_path / "bad").mkdir()
    for name, data in {"t.jsonl.zst": codecs[".zst"](lines * 20)[:-100], "t.jsonl.gz": codecs[".gz"](lines * 20)[:-100],
                       "t.json.bz2": codecs[".bz2"](array)[:-100], "x.jsonl.zst": b"not zstd at all" * 10,
                       "y.json.gz": codecs[".gz"](array[:-1])}.items():
        (tmp_path / "bad" / name).write_bytes(data)
        chunks = list(read_chunks(str(tmp_path / "bad" / name), 512))
        assert chunks[-1].file_error, name
        got = [json.loads(t) for c in chunks for t in c.texts]
        assert got == (rows * 20)[:len(got)], name
        if name.startswith("t.jsonl"):
            assert len(got) > 30_000, name  # a broken-off stream keeps what it had (all but its last block)


def test_gsm8k_rows_keep_their_ids_and_token_ids(smol_tok, gsm8k_rows):
    """The bundled GSM8K rows (prompt + response) are read as before issue #26: the id is the hash of
    [prompt, response], the token ids the chat template's (or the plain prompt's) then the response's."""
    import hashlib

    from air_ray.data.rows import RowPreparer

    for fmt in ("chat", "raw"):
        prep = RowPreparer(smol_tok, format=fmt)
        for row in gsm8k_rows[:16]:
            p = prep.prepare(row)
            key = json.dumps([row["prompt"], row["response"]], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
            assert p.id == row["id"]
            assert prep.prepare({"prompt": row["prompt"], "response": row["response"]}).id == \
                hashlib.sha1(key.encode()).hexdigest()[:16]
            if fmt == "chat":
                ids = smol_tok.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                                   add_generation_prompt=True)
                ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            else:
                ids = list(smol_tok(row["prompt"])["input_ids"])
            assert p.input_ids == ids + list(smol_tok(row["response"], add_special_tokens=False)["input_ids"])


@pytest.mark.slow
def test_report_shows_reasoning_rows(runs, tmp_path):
    """`air-ray report` renders the scored text of reasoning rows of a chat run (it went through the code that
    crashed export, issue #26)."""
    import html

    from air_ray.config import ReportConfig
    from air_ray.outputs.report import write_report

    d = runs["d"]
    cfg = ReportConfig(scores=str(d / "chat"), output=str(tmp_path / "report"))
    page = Path(write_report(str(d / "chat"), None, tmp_path / "report", corpus=cfg)).read_text()
    assert html.escape("<think>") in page and "She sold 48 in April." in page
