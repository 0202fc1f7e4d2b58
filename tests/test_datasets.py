"""Real reasoning datasets in, training-ready data out (issue #15): the same content in any shape gives the same
token ids and scores; reasoning is rendered by one rule; think-aware steps; Hugging Face folders, Arrow and
nested Parquet are read; bad records are rejected rows; `air-ray export` writes what `datasets` and a chat
template take, and what `air-ray train` reads directly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from air_ray.data.rows import FieldMap, RowPreparer
from air_ray.errors import AirRayError
from tests.test_shapes import PLAIN, REASONED, A, Q, R

REPO = Path(__file__).resolve().parents[1]


def prepared(tok, case, **kw):
    row, fields = case if isinstance(case, tuple) else (case, FieldMap())
    return RowPreparer(tok, fields=fields, **kw).prepare(row)


def test_same_token_ids_in_every_shape(smol_tok):
    for fmt in ("chat", "raw"):
        plain = {name: prepared(smol_tok, case, format=fmt) for name, case in PLAIN.items()}
        first = plain["prompt+response"]
        for name, p in plain.items():
            assert (p.input_ids, p.n_prompt_tokens, p.token_starts) == \
                   (first.input_ids, first.n_prompt_tokens, first.token_starts), (fmt, name)
        # reasoning apart from the answer: the same ids as the answer written with the think tags
        tagged = prepared(smol_tok, {"prompt": Q, "response": f"<think>\n{R}\n</think>\n\n{A}"}, format=fmt,
                          steps="think")
        for name, case in REASONED.items():
            p = prepared(smol_tok, case, format=fmt, steps="think")
            assert (p.input_ids, p.step_spans, p.step_kinds) == (tagged.input_ids, tagged.step_spans,
                                                                 tagged.step_kinds), (fmt, name)


def test_think_steps(smol_tok):
    p = prepared(smol_tok, REASONED["reasoning_content"], steps="think")
    text = f"<think>\n{R}\n</think>\n\n{A}"
    assert [text[a:b] for a, b in p.step_spans] == ["She sold 48 in April.", "So the total is 48.", A]
    assert p.step_kinds == ["think", "think", "answer"]
    # custom tags (OpenThoughts / Bespoke-Stratos write <|begin_of_thought|> ... <|end_of_thought|>)
    ot = "<|begin_of_thought|>\n\nstep one\nstep two\n\n<|end_of_thought|>\n\n<|begin_of_solution|>48<|end_of_solution|>"
    p = RowPreparer(smol_tok, steps="think", think_tags=("<|begin_of_thought|>", "<|end_of_thought|>")).prepare(
        {"prompt": Q, "response": ot})
    assert [ot[a:b] for a, b in p.step_spans] == ["step one", "step two", "<|begin_of_solution|>48<|end_of_solution|>"]
    assert p.step_kinds == ["think", "think", "answer"]
    # rendering with those tags: reasoning given apart becomes <|begin_of_thought|>\n...\n<|end_of_thought|>\n\n
    q = RowPreparer(smol_tok, steps="think", think_tags=("<|begin_of_thought|>", "<|end_of_thought|>")).prepare(
        REASONED["reasoning_content"][1] if isinstance(REASONED["reasoning_content"], tuple)
        else REASONED["reasoning_content"])
    assert q.step_kinds == ["think", "think", "answer"]
    # other rules: kind text
    assert set(prepared(smol_tok, PLAIN["messages"]).step_kinds) == {"text"}


QWEN3_LIKE = (  # renders reasoning_content the way Qwen3's template does (strips surrounding newlines)
    "{%- for m in messages -%}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and m.reasoning_content %}<think>\n{{ m.reasoning_content.strip('\\n') }}"
    "\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_reasoning_through_the_chat_template(smol_tok):
    import copy

    tok = copy.deepcopy(smol_tok)
    tok.chat_template = QWEN3_LIKE
    spaced = "\n\n" + R + "\n"  # the template strips these newlines; the fallback would keep them
    row = {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A,
                                                         "reasoning_content": spaced}]}
    prep = RowPreparer(tok, steps="think")
    assert prep._renders_reasoning()
    p = prep.prepare(row)
    text = prep.response_text(prep_conv(row))
    assert text == f"<think>\n{R}\n</think>\n\n{A}"
    assert p.input_ids[p.n_prompt_tokens:] == list(tok(text, add_special_tokens=False)["input_ids"])
    # a template that does not render reasoning_content (SmolLM2's): the tags, the reasoning as given
    assert RowPreparer(smol_tok).response_text(prep_conv(row)) == f"<think>\n{spaced}\n</think>\n\n{A}"


def prep_conv(row):
    from air_ray.data.shapes import parse_row

    return parse_row(row)


def test_field_flags_for_public_datasets():
    from air_ray import cli

    s1k = "--prompt-field question --reasoning-field thinking_trajectories --response-field attempt".split()
    _, cfg = cli.parse(["score", "--input", "s1k.jsonl", *s1k, "--steps", "think"])
    assert FieldMap.of(cfg) == FieldMap(prompt="question", reasoning="thinking_trajectories", response="attempt")
    numina = "--prompt-field problem --response-field solution --domain-field source".split()
    assert FieldMap.of(cli.parse(["export", "--scores", "r", "--input", "n", "--output", "o", *numina])[1]) == \
        FieldMap(prompt="problem", response="solution", domain="source")
    with pytest.raises(AirRayError, match="--think-tags"):
        cli.parse(["score", "--input", "x", "--think-tags", "<think>"])
    # the field map and the think tags are part of the scoring key only when set (older outputs keep theirs)
    base = cli.parse(["score", "--input", "x"])[1]
    assert base.scoring_key("f", [(0, 1)], "float32") != \
        cli.parse(["score", "--input", "x", *s1k])[1].scoring_key("f", [(0, 1)], "float32")


def test_over_long_record_is_rejected_before_tokenizing(smol_tok):
    calls = []

    class Counting:
        """The real tokenizer, recording how many characters each call tokenizes."""

        def __init__(self, tok):
            self._tok = tok

        def __getattr__(self, name):
            return getattr(self._tok, name)

        def __call__(self, text, **kw):
            calls.append(len(text))
            return self._tok(text, **kw)

    huge = "step. " * 500_000  # 3 MB
    prep = RowPreparer(Counting(smol_tok), max_tokens=512)
    with pytest.raises(Exception) as e:
        prep.prepare({"prompt": Q, "response": huge})
    assert getattr(e.value, "reason", None) == "too_long" and not calls
    cut = RowPreparer(Counting(smol_tok), max_tokens=512, truncate=True).prepare({"prompt": Q, "response": huge})
    assert cut.truncated and len(cut.input_ids) == 512 and max(calls) < len(huge) / 10


def test_readers(tmp_path):
    """A save_to_disk folder and an .arrow file are rows; nested Parquet works; a folder holding files of
    another kind fails naming them; dataset metadata is never read as rows."""
    import datasets

    from air_ray.data.corpus import expand_inputs, read_chunks

    rows = [{"question": Q, "attempt": A, "thinking_trajectories": [R]}, {"question": "2+2?", "attempt": "4",
                                                                         "thinking_trajectories": ["Add."]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    files = expand_inputs([str(tmp_path / "hf")])
    assert [Path(f).suffix for f in files] == [".arrow"]
    assert [json.loads(t) for c in read_chunks(files[0], 10) for t in c.texts] == rows
    nested = pa.Table.from_pylist([{"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}],
                                    "domain": "math"}])
    pq.write_table(nested, tmp_path / "nested.parquet")
    (texts,) = [c.texts for c in read_chunks(str(tmp_path / "nested.parquet"), 10)]
    assert json.loads(texts[0])["messages"][1] == {"role": "assistant", "content": A}
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.jsonl").write_text(json.dumps({"prompt": Q, "response": A}) + "\n")
    (tmp_path / "mixed" / "README.md").write_text("docs")
    assert len(expand_inputs([str(tmp_path / "mixed")])) == 1
    (tmp_path / "mixed" / "b.csv").write_text("prompt,response\n")
    with pytest.raises(AirRayError, match=r"cannot read: .*b\.csv"):
        expand_inputs([str(tmp_path / "mixed")])


# ----------------------------------------------------------------------------------------------
# slow: the real pipeline on a corpus of every shape, equal scores across shapes, export, train


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory, tiny_model):
    """Every shape of the same two contents, a save_to_disk folder, nested Parquet and bad records, scored by the
    real pipeline (tiny real model, local Ray), then selected."""
    import datasets

    from air_ray.config import ScoreConfig, SelectConfig
    from air_ray.outputs.select import select
    from air_ray.pipeline.score import run_score

    model_dir, heads = tiny_model
    d = tmp_path_factory.mktemp("shapes")
    corpus = d / "corpus"
    corpus.mkdir()
    ids = {}
    lines = []
    for i, (name, case) in enumerate({**PLAIN, **REASONED}.items()):
        if isinstance(case, tuple):  # mapped fields: a dataset of their own (scored with the flags below)
            continue
        row = dict(case, id=f"r{i}-{name.replace(' ', '_')}")
        ids[row["id"]] = name
        lines.append(json.dumps(row))
    lines.append("[" * 50_000 + "]" * 50_000)  # too deep for the JSON parser: a rejected row, not a crash
    (corpus / "shapes.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.Table.from_pylist([dict(PLAIN["messages"], id="p-nested", domain="math")]),
                   corpus / "nested.parquet")
    datasets.Dataset.from_list([dict(REASONED["reasoning_content"], id="hf-row")]).save_to_disk(str(corpus / "hf"))
    cfg = dict(model=str(model_dir), heads=str(heads), dtype="float32", device="cpu", address="local",
               steps="think", rows_per_partition=4)
    manifest = run_score(ScoreConfig(input=[str(corpus)], output=str(d / "run"), **cfg))
    # s1K-style columns, with the field flags
    s1k = d / "s1k.jsonl"
    s1k.write_text(json.dumps(dict(REASONED["s1K"][0], id="s1k-0")) + "\n")
    fields = dict(prompt_field="question", reasoning_field="thinking_trajectories", response_field="attempt")
    run_score(ScoreConfig(input=[str(s1k)], output=str(d / "s1k_run"), **cfg, **fields))
    select(SelectConfig(scores=str(d / "run"), output=str(d / "run" / "selection"), top_k=4))
    return {"dir": d, "corpus": corpus, "manifest": manifest, "cfg": cfg, "ids": ids, "fields": fields}


def _rows(path: Path) -> dict:
    return {r["id"]: r for f in sorted(path.glob("*.parquet")) for r in pq.read_table(f).to_pylist()}


@pytest.mark.slow
def test_every_shape_scores_the_same(shapes_run):
    m = shapes_run["manifest"]
    c = m.counts
    assert c["rows_read"] == c["rows_scored"] + c["rows_rejected"] == len(shapes_run["ids"]) + 3
    assert c["rejected_by_reason"] == {"too_deep": 1}
    scores = _rows(shapes_run["dir"] / "run" / "scores")
    plain = [scores[i] for i, name in shapes_run["ids"].items() if name in PLAIN] + [scores["p-nested"]]
    reasoned = [scores[i] for i, name in shapes_run["ids"].items() if name in REASONED] + [scores["hf-row"]]
    reasoned += list(_rows(shapes_run["dir"] / "s1k_run" / "scores").values())
    for group in (plain, reasoned):
        for r in group:
            assert (r["loss_base"], r["loss_ref"], r["score"], r["step_spans"], r["step_scores"]) == \
                   (group[0]["loss_base"], group[0]["loss_ref"], group[0]["score"], group[0]["step_spans"],
                    group[0]["step_scores"]), r["id"]
    assert reasoned[0]["step_kinds"] == ["think", "think", "answer"] and reasoned[0]["score"] != plain[0]["score"]


@pytest.mark.slow
def test_export_loads_in_datasets_and_a_chat_template(shapes_run, smol_tok):
    import datasets

    from air_ray.config import ExportConfig
    from air_ray.outputs.export import export

    d = shapes_run["dir"]
    run = d / "run"
    summary = export(ExportConfig(scores=str(run), input=[str(shapes_run["corpus"])], output=str(d / "export"),
                                  rows_per_file=3))
    sel = pq.read_table(run / "selection" / "selection.parquet").to_pylist()
    assert summary["rows"] == len(sel) == 4 and len(summary["files"]) == 2
    parts = sorted(str(p) for p in (d / "export" / "data").glob("*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=parts, split="train")
    assert sorted(ds["id"]) == sorted(r["id"] for r in sel)
    assert sorted(ds["rank"]) == [1, 2, 3, 4]
    scores = _rows(run / "scores")
    for row in ds:
        assert row["messages"][-1]["role"] == "assistant" and row["score"] == scores[row["id"]]["score"]
        assert row["step_weights"] == scores[row["id"]]["step_weights"]
        text = smol_tok.apply_chat_template(row["messages"], tokenize=False)
        assert row["messages"][-1]["content"] in text
        a, b = row["step_spans"][-1]
        assert 0 <= a < b <= len(row["messages"][-1]["content"])
    # prompt-completion style (chat scores: message lists, TRL's conversational form)
    export(ExportConfig(scores=str(run), input=[str(shapes_run["corpus"])], output=str(d / "pc"),
                        style="prompt-completion"))
    pc = datasets.load_dataset("parquet", data_files=str(d / "pc" / "data" / "part-00000.parquet"), split="train")
    assert set(pc.column_names) >= {"prompt", "completion", "step_spans", "step_weights", "step_kinds"}
    assert all(r["completion"][0]["role"] == "assistant" for r in pc)


@pytest.mark.slow
def test_export_fails_naming_missing_ids_and_leaves_nothing(shapes_run, tmp_path):
    from air_ray.config import ExportConfig
    from air_ray.outputs.export import export

    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps(PLAIN["prompt+response"]) + "\n")
    with pytest.raises(AirRayError, match=r"selected ids are not in the corpus \(e\.g\. \["):
        export(ExportConfig(scores=str(shapes_run["dir"] / "run"), input=[str(partial)],
                            output=str(tmp_path / "out"), rows_per_file=1))
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


@pytest.mark.slow
def test_train_reads_an_export(shapes_run, tiny_model, tmp_path):
    """`air-ray train --input EXPORT`: one real optimiser step on the tiny model, from the export alone."""
    model_dir, _ = tiny_model
    d = shapes_run["dir"]
    p = subprocess.run([sys.executable, "-m", "air_ray", "train", "--input", str(d / "export"), "--model",
                        str(model_dir), "--output", str(tmp_path / "sft"), "--max-steps", "1", "--batch-size", "2",
                        "--device", "cpu", "--no-save"], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((tmp_path / "sft" / "training_summary.json").read_text())
    assert summary["global_step"] == 1 and summary["join"]["n_examples"] == 4
