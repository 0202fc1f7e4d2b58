"""``air-ray export``: the selected rows as a training-ready dataset, a faithful subset of the corpus.

    air-ray export --scores RUN [--selection RUN/selection] --input CORPUS... --output DIR
                   [--style messages|prompt-completion|original] [--inline-reasoning] [--output-format parquet|jsonl]
                   [--rows-per-file N] [the field flags used for scoring]

Writes ``DIR/data/part-00000.parquet`` ... (or ``.jsonl``), ``DIR/dataset_info.json`` (an entry LLaMA-Factory can
name, where a formatting of its fits the style) and ``DIR/.export.json`` (the summary: counts, options, files).
The summary is a dot-file and the rows sit in ``data/`` so that ``datasets.load_dataset(DIR)``,
``load_dataset("parquet", data_dir=DIR)`` and LLaMA-Factory (which reads every file of the folder it is given)
find only rows.

Styles:

- ``messages``: ``id``, ``messages`` (OpenAI form: each message's ``role`` and ``content``, and where some row has
  them ``reasoning_content``, ``tool_calls`` (``function.arguments`` as JSON text), ``tool_call_id``, ``name``),
  ``tools`` (the row's tool definitions as JSON text, or null), then the score columns. The assistant's content is
  the answer; reasoning given apart stays in its ``reasoning_content`` (``--inline-reasoning``: the content is the
  reasoning and the answer as they were scored, and no ``reasoning_content``).
- ``prompt-completion``: ``prompt`` and ``completion`` instead of ``messages`` (message lists for chat-formatted
  scores, TRL's conversational form; strings for raw ones, with a ``reasoning_content`` column).
- ``original``: each source record as it is, every column, nested types kept (a Parquet or Arrow source's rows
  are taken from its Arrow batches, so their types are the source's), plus ``air_id``, ``air_domain``,
  ``air_score``, ``air_rank``, ``air_step_spans``, ``air_step_weights``, ``air_step_kinds``,
  ``air_scored_response``.

Score columns of the first two styles: ``domain``, ``score`` (the AIR score), ``rank`` (in the selection),
``step_spans``, ``step_weights``, ``step_kinds`` and ``scored_response``: the response exactly as it was scored
(``air_ray.data.rows``: the answer, or the reasoning rendered with it), the text ``step_spans`` index.

Each selected id appears exactly once: the corpus is read in the scorer's order (sorted files, then lines) and the
first row with the id is taken, as the scorer did; if an id cannot be found, the command fails naming the missing
ids and leaves no new file behind (files are written under hidden names and renamed into place only once every id
is found). Memory: the selected ids with their step lists, one block of the corpus and one output file's rows;
reading stops once every selected id is found.
"""

from __future__ import annotations

import json

import pyarrow as pa

from air_ray.config.commands import ExportConfig
from air_ray.errors import AirRayError
from air_ray.fsio import with_protocol, write_bytes_atomic, write_json_atomic
from air_ray.store.layout import EXPORT_DATA_DIR, PARTITION_EXT, ExportLayout, RunLayout
from air_ray.store.schemas import AIR_COLUMNS, EXPORT_COLUMNS, write_table_atomic
from air_ray.store.scores import open_scores, read_selection

LLAMAFACTORY_NAME = "air_ray_export"
_OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                "system_tag": "system", "observation_tag": "tool"}


def export(cfg: ExportConfig) -> dict:
    """Write the export (see the module doc); returns the summary written to ``.export.json``."""
    from air_ray.data.lookup import Lookup
    from air_ray.data.shapes import FieldMap

    cfg = cfg.validate()
    ranks = read_selection(cfg.selection or RunLayout(cfg.scores).selection)
    steps, meta = _scored(cfg.scores, set(ranks))
    chat = (meta or {}).get("format", "chat") == "chat"
    rows = _Rows(cfg, chat, scored_text(cfg, meta))
    out = ExportLayout(cfg.output)
    writer = _Files(out, cfg.output_format, cfg.rows_per_file,
                    AIR_COLUMNS if cfg.style == "original" else EXPORT_COLUMNS)
    # the scorer kept the first record of an id: later ones, and records that are no row, were never selected
    lookup = Lookup({i for i in ranks if i in steps}, FieldMap.of(cfg),
                    arrow=cfg.style == "original" and cfg.output_format == "parquet")
    found = lookup.found
    unreadable: list[dict] = []
    try:
        for block, matches in lookup.blocks(cfg.input):
            picked = [(m.index, m.text, m.conv) for m in matches if m.first]
            for item in rows.build(picked, block.batch, steps, ranks):
                writer.add(item)
            if block.error:
                unreadable.append({"source": block.source, "error": block.error})
        missing = [i for i in ranks if i not in found]
        if missing:
            why = (f"{len(missing)} of {len(ranks)} selected ids are not in the "
                   + ("scores" if any(i not in steps for i in missing) else "corpus"))
            raise AirRayError(f"export: {why} (e.g. {missing[:10]}); check --scores, --input and the field flags "
                              "(the same as for scoring)")
        files, file_rows, schema = writer.commit()
    except BaseException:
        writer.abort()
        raise
    if not (len(found) == sum(file_rows) == len(ranks)):  # every selected id exactly once
        raise AirRayError(f"export: internal error: {len(ranks)} selected, {len(found)} found, {sum(file_rows)} "
                          "written")
    entry = rows.llamafactory()
    if entry:
        write_json_atomic(out.fs, out.llamafactory, {LLAMAFACTORY_NAME: entry})
    elif out.fs.exists(out.llamafactory):
        out.fs.rm(out.llamafactory)
    summary = {"rows": len(found), "selected": len(ranks), "style": cfg.style, "format": "chat" if chat else "raw",
               "output_format": cfg.output_format, "inline_reasoning": cfg.inline_reasoning,
               "files": [with_protocol(out.fs, f) for f in files], "file_rows": file_rows,
               "corpus_rows_read": lookup.read, "corpus_rows_not_scorable": lookup.not_scorable,
               "corpus_rows_later_duplicates": lookup.later_duplicates,
               "unreadable_files": unreadable, "schema": schema,
               "llamafactory": {"dataset_dir": cfg.output, "dataset": LLAMAFACTORY_NAME} if entry else None,
               "config": cfg.__dict__}
    write_json_atomic(out.fs, out.summary, summary)
    print(f"[air-ray export] {len(found):,} rows in {len(files)} files -> {out.data_dir} (summary "
          f"{with_protocol(out.fs, out.summary)})", flush=True)
    return summary


def _scored(scores_uri: str, ids: set[str]) -> tuple[dict[str, dict], dict | None]:
    """{id: domain, score and step columns} of the selected ids (the first row of an id), and the metadata of
    the scores (model, format)."""
    columns = ("id", "domain", "score", "step_spans", "step_weights", "step_kinds")
    scores = open_scores(scores_uri, "export", columns=columns, require=("id", "step_spans", "step_weights"))
    out: dict[str, dict] = {}
    for row in scores.rows_of(ids, columns).to_pylist():
        out.setdefault(row["id"], row)
    return out, scores.metadata()


def scored_text(options, meta: dict | None, need_model: bool = True):
    """conv -> the response text that was scored: through the scoring model's chat template where it renders
    reasoning (the model recorded in the scores' metadata; its tokenizer is loaded on the first row with
    reasoning), else the think tags. ``need_model=False``: fall back to the tags when that model cannot be
    prepared here (the report), instead of failing."""
    from air_ray.data.rows import RowPreparer, render_response, think_tags_of

    tags = think_tags_of(options)
    preparer: list = []

    def render(conv) -> str:
        if conv.reasoning is None:
            return conv.answer
        if not preparer:
            preparer.append(None)
            if meta and meta.get("format", "chat") == "chat" and meta.get("model"):
                from air_ray.config import ModelOptions
                from air_ray.models import open_model

                try:  # the scoring model, opened as the scorer opened it (its recorded name, default options)
                    tokenizer = open_model(ModelOptions(model=meta["model"])).tokenizer
                    preparer[0] = RowPreparer.of(tokenizer, options, format="chat")
                except AirRayError:
                    if need_model:
                        raise
        return preparer[0].response_text(conv) if preparer[0] is not None else render_response(conv, tags)

    return render


# ----------------------------------------------------------------------------------------------
# rows


def _arrow_message(m: dict) -> dict:
    """A message as the export stores it: tool call arguments as JSON text (one Arrow type for every row)."""
    if not m.get("tool_calls"):
        return dict(m)
    calls = []
    for c in m["tool_calls"]:
        fn = c["function"]
        args = fn.get("arguments")
        call = {k: c[k] for k in ("id", "type") if c.get(k) is not None}
        call["function"] = {"name": fn["name"],
                            "arguments": args if isinstance(args, str) or args is None else
                            json.dumps(args, ensure_ascii=False)}
        calls.append(call)
    return {**m, "tool_calls": calls}


class _Rows:
    """Picked corpus rows -> output rows (dicts) or Arrow tables, in the style asked for; notes what the export
    holds for its LLaMA-Factory entry."""

    def __init__(self, cfg: ExportConfig, chat: bool, render):
        self.cfg, self.chat, self.render = cfg, chat, render
        self.shapes: set[str] = set()
        self.columns: set[str] = set()  # columns of the source records (original style)
        self.tools = self.calls = False

    def build(self, picked, batch, steps: dict, ranks: dict):
        """Output items of ``picked`` ([(index in the block, raw record, conversation)])."""
        if not picked:
            return []
        scores = []
        for _, _, conv in picked:
            response = self.render(conv)
            scored = steps[conv.id]
            spans = scored["step_spans"] or []
            if spans and max(int(b) for _, b in spans) > len(response):
                raise AirRayError(f"export: id {conv.id!r}: the corpus row does not match its scores (its steps end "
                                  "after its response; was it scored with other field flags or think tags?)")
            scores.append({"domain": scored["domain"], "score": scored["score"], "rank": ranks[conv.id][0],
                           "step_spans": spans, "step_weights": scored["step_weights"],
                           "step_kinds": scored.get("step_kinds"), "scored_response": response})
            self.shapes.add(conv.shape)
            self.tools = self.tools or bool(conv.tools)
            self.calls = self.calls or any(m.get("tool_calls") for m in conv.messages()) or \
                "tool_calls" in conv.answer_keys
        if self.cfg.style != "original":
            return [self._row(conv, s) for (_, _, conv), s in zip(picked, scores)]
        air = [{"air_id": conv.id, **{f"air_{k}": v for k, v in s.items()}} for (_, _, conv), s in zip(picked, scores)]
        if batch is not None:  # an Arrow source: its rows as they are, with the score columns appended
            table = pa.Table.from_batches([batch]).take([i for i, _, _ in picked]).replace_schema_metadata(None)
            self._own_columns(table.column_names)
            extra = pa.Table.from_pylist(air, schema=pa.schema(list(AIR_COLUMNS.items())))
            for name in extra.column_names:
                table = table.append_column(name, extra[name])
            return [table]
        items = []
        for (_, text, _), a in zip(picked, air):
            record = json.loads(text)
            self._own_columns(record)
            items.append({**record, **a})
        return items

    def _own_columns(self, names) -> None:
        clash = sorted(set(names) & set(AIR_COLUMNS))
        if clash:
            raise AirRayError(f"export --style original: the corpus already has a column {clash[0]!r}; the score "
                              "columns would overwrite it (use --style messages or prompt-completion)")
        self.columns.update(names)

    def _row(self, conv, s: dict) -> dict:
        from air_ray.data.rows import raw_prompt

        inline = self.cfg.inline_reasoning or conv.reasoning is None
        text = s["scored_response"] if inline else conv.answer
        row = {"id": conv.id}
        if self.cfg.style == "prompt-completion" and not self.chat:
            row.update(prompt=raw_prompt(conv.prompt, conv.tools), completion=text,
                       reasoning_content=None if inline else conv.reasoning)
            return {**row, **s}
        answer = {"role": "assistant", "content": text}
        if not inline:
            answer["reasoning_content"] = conv.reasoning
        answer.update(conv.answer_keys)
        prompt = [_arrow_message(m) for m in conv.messages()]
        if self.cfg.style == "messages":
            row["messages"] = prompt + [_arrow_message(answer)]
        else:
            row["prompt"], row["completion"] = prompt, [_arrow_message(answer)]
        row["tools"] = json.dumps(conv.tools, ensure_ascii=False) if conv.tools else None
        return {**row, **s}

    def llamafactory(self) -> dict | None:
        """The dataset_info.json entry (keys of LLaMA-Factory's data/README.md) for a formatting of LLaMA-Factory's
        that reads this export as it is, or None."""
        entry: dict = {"file_name": EXPORT_DATA_DIR}
        style, cfg = self.cfg.style, self.cfg
        if style == "messages" or (style == "original" and self.shapes == {"messages"} and cfg.messages_field is None
                                   and cfg.prompt_field is None and cfg.response_field is None):
            # OpenAI messages: sharegpt with OpenAI tags; assistant tool_calls are read by the "openai" converter
            entry.update(formatting="openai" if self.calls else "sharegpt", columns={"messages": "messages"},
                         tags=dict(_OPENAI_TAGS))
            if self.tools:
                entry["columns"]["tools"] = "tools"
            return entry
        if style == "prompt-completion" and not self.chat:
            return {**entry, "columns": {"prompt": "prompt", "response": "completion"}}
        if style == "original" and self.shapes == {"alpaca"}:
            columns = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                       "history": "history", "tools": "tools"}
            return {**entry, "columns": {k: v for k, v in columns.items() if v in self.columns}}
        return None


# ----------------------------------------------------------------------------------------------
# files


class _Files:
    """Output items (row dicts, Arrow tables) -> hidden files of ``rows_per_file`` rows in ``DIR/data``;
    ``commit`` gives every Parquet file one schema (the union of the files' columns and struct fields), renames
    them into place and removes parts of an earlier export that are not replaced; ``abort`` removes them."""

    def __init__(self, out: ExportLayout, fmt: str, rows_per_file: int, types: dict):
        self.out, self.fmt, self.n, self.types = out, fmt, rows_per_file, types
        self.items: list = []
        self.count = 0
        self.hidden: list[tuple[str, int]] = []

    def add(self, item) -> None:
        self.items.append(item)
        self.count += item.num_rows if isinstance(item, pa.Table) else 1
        while self.count >= self.n:
            self._flush(self.n)

    def _path(self, i: int, hidden: bool) -> str:
        return self.out.part(i, self.fmt, hidden)

    def _flush(self, n: int) -> None:
        path = self._path(len(self.hidden), hidden=True)
        if self.fmt == "jsonl":
            rows, self.items = self.items[:n], self.items[n:]
            write_bytes_atomic(self.out.fs, path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                          for r in rows).encode())
        else:
            table = _concat(self.items, self.types)
            self.items = [table.slice(n)] if table.num_rows > n else []
            write_table_atomic(table.slice(0, n), self.out.fs, path)
        self.hidden.append((path, n))
        self.count -= n

    def commit(self) -> tuple[list[str], list[int], str | None]:
        """-> (the files, their row counts, the schema of the Parquet files)."""
        if self.count:
            self._flush(self.count)
        fs = self.out.fs
        schema = self._unify() if self.fmt == "parquet" and self.hidden else None
        final = [self._path(i, hidden=False) for i in range(len(self.hidden))]
        for old in self.out.stale_parts():  # an earlier export's parts (and those of the layout before data/)
            if old not in final:
                fs.rm(old)
        for old in self.out.summaries()[1:]:  # the summary of the layout before data/
            if fs.exists(old):
                fs.rm(old)
        for (tmp, _), path in zip(self.hidden, final):
            fs.mv(tmp, path)
        return final, [n for _, n in self.hidden], schema.to_string(show_schema_metadata=False) if schema else None

    def _unify(self) -> pa.Schema:
        """One schema for every file (the files were written as their rows came: a later one may hold a message key
        or a column an earlier one did not); files that differ are rewritten to it, one at a time."""
        import pyarrow.parquet as pq

        fs = self.out.fs
        schemas = []
        for path, _ in self.hidden:
            with fs.open(path, "rb") as f:
                schemas.append(pq.read_schema(f))
        try:
            schema = pa.unify_schemas(schemas, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise _schema_error(e) from None
        for (path, _), own in zip(self.hidden, schemas):
            if not own.equals(schema):
                with fs.open(path, "rb") as f:
                    table = pq.read_table(f)
                write_table_atomic(_conform(table, schema), fs, path)
        return schema

    def abort(self) -> None:
        for tmp, _ in self.hidden:
            try:
                self.out.fs.rm(tmp)
            except Exception:
                pass


def _schema_error(e: Exception) -> AirRayError:
    return AirRayError(f"export: the exported rows do not fit one Parquet schema ({str(e).splitlines()[0]}); "
                       "--output-format jsonl keeps each record as it is")


def _table(rows: list[dict], types: dict) -> pa.Table:
    """Rows -> a table: the columns export declares get their types, the rest (messages, source columns) are
    inferred."""
    names = list(dict.fromkeys(k for r in rows for k in r))  # every row's keys (from_pylist reads the first's)
    try:
        table = pa.table({n: pa.array([r.get(n) for r in rows], type=types.get(n)) for n in names})
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise _schema_error(e) from None
    return table


def _concat(items: list, types: dict) -> pa.Table:
    tables, run = [], []
    for item in items:
        if isinstance(item, pa.Table):
            if run:
                tables.append(_table(run, types))
                run = []
            tables.append(item)
        else:
            run.append(item)
    if run:
        tables.append(_table(run, types))
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise _schema_error(e) from None


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns in its order (a column it lacks is null), each cast to its type."""
    columns = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


# ----------------------------------------------------------------------------------------------
# reading an export back


def export_summary(uri: str) -> dict | None:
    """The summary of the export at ``uri`` (``.export.json``, or ``export.json`` of the layout before data/), or
    None when ``uri`` is no export."""
    try:
        out = ExportLayout(uri)
        for path in out.summaries():
            if out.fs.exists(path):
                with out.fs.open(path, "rb") as f:
                    return json.loads(f.read())
    except Exception:
        return None
    return None


def is_export(uri: str) -> bool:
    return export_summary(uri) is not None


def read_export(uri: str) -> list[dict]:
    """The rows of an export as training examples ``{id, rank, prompt, response, tools, step_spans, step_weights}``
    (in rank order): ``prompt`` a string or messages, ``response`` the scored response text."""
    import pyarrow.parquet as pq

    from air_ray.data.shapes import FieldMap, RowError, parse_row

    out = ExportLayout(uri)
    summary = export_summary(uri) or {}
    files = out.parts()
    if not files:
        raise AirRayError(f"no export at {uri} (no data/part-*; run `air-ray export`)")
    fields = FieldMap.of(_Namespace(summary.get("config") or {}))
    examples = []
    for path in files:
        with out.fs.open(path, "rb") as f:
            rows = pq.read_table(f).to_pylist() if path.endswith(PARTITION_EXT) else \
                [json.loads(line) for line in f.read().decode("utf-8").splitlines() if line.strip()]
        for row in rows:
            if "air_rank" in row:  # style original: the source record, read as the scorer read it
                try:
                    conv = parse_row({k: v for k, v in row.items() if k not in AIR_COLUMNS}, fields)
                except RowError as e:
                    raise AirRayError(f"export {uri}: row {row['air_id']!r} no longer parses ({e})") from None
                examples.append({"id": row["air_id"], "rank": row["air_rank"], "prompt": conv.prompt,
                                 "tools": conv.tools, "response": row["air_scored_response"],
                                 "step_spans": row["air_step_spans"] or [],
                                 "step_weights": row["air_step_weights"] or []})
                continue
            if "messages" in row:
                prompt, last = row["messages"][:-1], row["messages"][-1]
            else:
                comp = row["completion"]
                prompt, last = row["prompt"], ({"content": comp} if isinstance(comp, str) else comp[-1])
            if isinstance(prompt, list):  # Parquet gives every message every key: drop the empty ones
                prompt = [{k: v for k, v in m.items() if v is not None} for m in prompt]
            tools = json.loads(row["tools"]) if row.get("tools") else None
            examples.append({"id": row["id"], "rank": row["rank"], "prompt": prompt, "tools": tools,
                             "response": row.get("scored_response") or last["content"],
                             "step_spans": row["step_spans"] or [], "step_weights": row["step_weights"] or []})
    examples.sort(key=lambda e: e["rank"])
    return examples


class _Namespace:
    def __init__(self, d: dict):
        self.__dict__.update(d)
