"""``air-ray export``: the selected rows as a training-ready dataset.

    air-ray export --scores RUN [--selection RUN/selection] --input CORPUS... --output DIR
                   [--style messages|prompt-completion] [--rows-per-file N] [the field flags used for scoring]

Writes ``DIR/part-00000.parquet`` ... (``EXPORT_MESSAGES`` or ``EXPORT_PROMPT_COMPLETION``) and ``DIR/export.json``
(counts, options, the files). Each selected id appears exactly once: the corpus is read in the scorer's order
(sorted files, then lines) and the first row with the id is taken, as the scorer did; if an id cannot be found,
the command fails naming the missing ids and leaves no new file behind (files are written under hidden names and
renamed into place only once every id is found).

The assistant's content is the response that was scored (``air_ray.data.rows``: the reasoning rendered with the
answer where the row has reasoning apart), so ``step_spans`` (character spans of that text), ``step_weights``
and ``step_kinds`` describe it exactly. ``score`` is the AIR score of the row, ``rank`` its rank in the selection.
Memory: the selected ids with their step lists, and one file's rows; the corpus is streamed and reading stops
once every selected id is found.
"""

from __future__ import annotations

import posixpath

import pyarrow as pa

from air_ray.config.commands import ExportConfig
from air_ray.errors import AirRayError
from air_ray.fsio import with_protocol, write_json_atomic
from air_ray.outputs.layout import SELECTION_DIR, RunLayout, open_scores, read_selection, write_table_atomic

MESSAGE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])
_STEPS = [pa.field("step_spans", pa.list_(pa.list_(pa.int32()))), pa.field("step_weights", pa.list_(pa.float64())),
          pa.field("step_kinds", pa.list_(pa.string()))]
_HEAD = [pa.field("id", pa.string(), nullable=False)]
_TAIL = [pa.field("domain", pa.string()), pa.field("score", pa.float64()), pa.field("rank", pa.int64()), *_STEPS]
EXPORT_MESSAGES = pa.schema(_HEAD + [pa.field("messages", pa.list_(MESSAGE))] + _TAIL)


def prompt_completion_schema(chat: bool) -> pa.Schema:
    """Chat-formatted scores: prompt and completion are message lists (TRL's conversational form); raw: strings."""
    kind = pa.list_(MESSAGE) if chat else pa.string()
    return pa.schema(_HEAD + [pa.field("prompt", kind), pa.field("completion", kind)] + _TAIL)


EXPORT_FILE = "export.json"
_PART = "part-{:05d}.parquet"


def export(cfg: ExportConfig) -> dict:
    """Write the export (see the module doc); returns the summary written to ``export.json``."""
    cfg = cfg.validate()
    ranks = read_selection(cfg.selection or RunLayout(cfg.scores).uri_of(SELECTION_DIR))
    steps, meta = _scored(cfg.scores, set(ranks))
    chat = (meta or {}).get("format", "chat") == "chat"
    schema = EXPORT_MESSAGES if cfg.style == "messages" else prompt_completion_schema(chat)
    out = RunLayout(cfg.output)
    writer = _Files(out, schema, cfg.rows_per_file)
    render = scored_text(cfg, meta)
    found, read = set(), 0
    try:
        for conv in _conversations(cfg):
            read += 1
            if conv.id not in ranks or conv.id in found or conv.id not in steps:
                continue
            found.add(conv.id)
            writer.add(_row(conv, render(conv), steps[conv.id], ranks[conv.id], cfg.style, chat))
            if len(found) == len(ranks):
                break
        missing = [i for i in ranks if i not in found]
        if missing:
            why = (f"{len(missing)} of {len(ranks)} selected ids are not in the "
                   + ("scores" if any(i not in steps for i in missing) else "corpus"))
            raise AirRayError(f"export: {why} (e.g. {missing[:10]}); check --scores, --input and the field flags "
                              "(the same as for scoring)")
        files = writer.commit()
    except BaseException:
        writer.abort()
        raise
    summary = {"rows": len(found), "selected": len(ranks), "corpus_rows_read": read, "style": cfg.style,
               "format": "chat" if chat else "raw", "files": [with_protocol(out.fs, f) for f in files],
               "schema": schema.to_string(show_schema_metadata=False), "config": cfg.__dict__}
    write_json_atomic(out.fs, out.path(EXPORT_FILE), summary)
    print(f"[air-ray export] {len(found):,} rows in {len(files)} files -> {cfg.output}", flush=True)
    return summary


def _scored(scores_uri: str, ids: set[str]) -> tuple[dict[str, dict], dict | None]:
    """{id: domain, score and step columns} of the selected ids (the first row of an id), and the metadata of
    the scores (model, format)."""
    import pyarrow.dataset as ds

    columns = ("id", "domain", "score", "step_spans", "step_weights", "step_kinds")
    scores = open_scores(scores_uri, "export", columns=columns, require=("id", "step_spans", "step_weights"))
    out: dict[str, dict] = {}
    table = scores.table(columns, filter=ds.field("id").isin(pa.array(sorted(ids), pa.string())))
    for row in table.to_pylist():
        out.setdefault(row["id"], row)
    return out, scores.metadata()


def _conversations(cfg: ExportConfig):
    """Every parseable corpus row as a Conversation, in the scorer's order (bad rows are skipped: the scorer
    rejected them, so they were never selected)."""
    from air_ray.data.corpus import expand_inputs, read_chunks
    from air_ray.data.shapes import FieldMap, RowError, load_record, parse_row

    fields = FieldMap.of(cfg)
    for source in expand_inputs(cfg.input):
        for chunk in read_chunks(source, 4096):
            if chunk.file_error:
                raise AirRayError(f"export: corpus {source} cannot be read: {chunk.file_error}")
            for text in chunk.texts:
                try:
                    yield parse_row(load_record(text), fields)
                except (RowError, RecursionError):
                    continue


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
                from air_ray.models import load_tokenizer, prepare_model

                try:
                    preparer[0] = RowPreparer.of(load_tokenizer(prepare_model(meta["model"])), options)
                except AirRayError:
                    if need_model:
                        raise
        return preparer[0].response_text(conv) if preparer[0] is not None else render_response(conv, tags)

    return render


def _row(conv, response: str, scored: dict, rank_score, style: str, chat: bool) -> dict:
    spans = scored["step_spans"] or []
    if spans and max(int(b) for _, b in spans) > len(response):
        raise AirRayError(f"export: id {conv.id!r}: the corpus row does not match its scores (its steps end after "
                          "its response; was it scored with other field flags or think tags?)")
    rank, _ = rank_score
    row = {"id": conv.id, "domain": scored["domain"], "score": scored["score"], "rank": rank,
           "step_spans": spans, "step_weights": scored["step_weights"], "step_kinds": scored.get("step_kinds")}
    answer = {"role": "assistant", "content": response}
    if style == "messages":
        row["messages"] = conv.messages() + [answer]
    elif chat:
        row["prompt"], row["completion"] = conv.messages(), [answer]
    else:
        row["prompt"] = conv.prompt if isinstance(conv.prompt, str) else "\n".join(m["content"] for m in conv.prompt)
        row["completion"] = response
    return row


class _Files:
    """Rows -> hidden Parquet files of ``rows_per_file`` rows; ``commit`` renames them into place (and removes
    parts of an earlier export that are not replaced), ``abort`` removes them."""

    def __init__(self, out: RunLayout, schema: pa.Schema, rows_per_file: int):
        self.out, self.schema, self.n = out, schema, rows_per_file
        self.rows: list[dict] = []
        self.hidden: list[str] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.n:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        path = self.out.path("." + _PART.format(len(self.hidden)))
        write_table_atomic(pa.Table.from_pylist(self.rows, schema=self.schema), self.out.fs, path)
        self.hidden.append(path)
        self.rows = []

    def commit(self) -> list[str]:
        self._flush()
        fs = self.out.fs
        final = [self.out.path(_PART.format(i)) for i in range(len(self.hidden))]
        for old in fs.glob(self.out.path("part-*.parquet")):
            if old not in final:
                fs.rm(old)
        for tmp, path in zip(self.hidden, final):
            fs.mv(tmp, path)
        return final

    def abort(self) -> None:
        for tmp in self.hidden:
            try:
                self.out.fs.rm(tmp)
            except Exception:
                pass


def read_export(uri: str) -> list[dict]:
    """The rows of an export as training examples ``{id, rank, prompt, response, step_spans, step_weights}``
    (in rank order): ``prompt`` a string or messages, ``response`` the scored response text."""
    import pyarrow.parquet as pq

    out = RunLayout(uri)
    files = sorted(p for p in out.fs.glob(out.path("part-*.parquet")))
    if not files:
        raise AirRayError(f"no export at {uri} (no part-*.parquet; run `air-ray export`)")
    examples = []
    for path in files:
        with out.fs.open(path, "rb") as f:
            for row in pq.read_table(f).to_pylist():
                if "messages" in row:
                    prompt, response = row["messages"][:-1], row["messages"][-1]["content"]
                else:
                    comp = row["completion"]
                    prompt, response = row["prompt"], comp if isinstance(comp, str) else comp[-1]["content"]
                examples.append({"id": row["id"], "rank": row["rank"], "prompt": prompt, "response": response,
                                 "step_spans": row["step_spans"] or [], "step_weights": row["step_weights"] or []})
    examples.sort(key=lambda e: e["rank"])
    return examples


def is_export(uri: str) -> bool:
    try:
        out = RunLayout(uri)
        return out.fs.exists(posixpath.join(out.root, EXPORT_FILE))
    except Exception:
        return False
