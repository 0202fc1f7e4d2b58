"""What a student trains on: the selected rows with their prompt, scored response and step weights.

``load_training_rows(selection, scores, corpus)`` joins the selection (ids, in rank order) with the scores
(step spans and weights, read with a pyarrow filter on the selected ids) and the corpus rows (prompt and
response text, found by the same id the scorer used: the row's ``id`` or the canonical hash of its content;
``air_ray.data.lookup``). Ids missing from the scores or the corpus raise ``AirRayError`` (or, with
``allow_missing=True``, are listed in the returned report); they are never dropped silently. Memory: the selected
rows only, whatever the size of the scores and the corpus (both are streamed). ``training_rows(cfg)`` takes them
from an ``air-ray export`` instead when ``--input`` is one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

from air_ray.config.commands import TrainConfig
from air_ray.errors import AirRayError
from air_ray.store.scores import open_scores, read_selection_ids
from air_ray.training.weights import check_steps


@dataclass
class TrainingRows:
    """Training examples (in selection rank order) and what could not be joined."""

    examples: list[dict]  # {id, rank, prompt, tools, response, step_spans, step_weights}
    n_selected: int
    missing_in_scores: list[str] = field(default_factory=list)
    missing_in_corpus: list[str] = field(default_factory=list)
    corpus_rows_read: int = 0
    corpus_rows_unparsable: int = 0

    def report(self) -> dict:
        d = asdict(self)
        d.pop("examples")
        d["n_examples"] = len(self.examples)
        d["n_missing_in_scores"] = len(self.missing_in_scores)
        d["n_missing_in_corpus"] = len(self.missing_in_corpus)
        return d


def read_step_weights(scores_uri: str, ids: Iterable[str]) -> dict[str, tuple[list, list]]:
    """``{id: (step_spans, step_weights)}`` for the given ids, scanning the scores partitions with a filter."""
    columns = ("id", "step_spans", "step_weights")
    scores = open_scores(scores_uri, "train", columns=columns, require=columns)
    out: dict[str, tuple[list, list]] = {}
    for batch in scores.rows_of(ids, columns).to_batches():
        for rid, spans, weights in zip(*(batch.column(c).to_pylist() for c in columns)):
            item = (spans or [], weights or [])
            if rid in out and out[rid] != item:
                raise AirRayError(f"scores at {scores_uri} hold id {rid!r} twice with different step weights")
            out[rid] = item
    return out


def load_training_rows(selection: str, scores: str, corpus, *, allow_missing: bool = False, fields=None,
                       render=None) -> TrainingRows:
    """Join selection (ids) + scores (step_spans, step_weights) + corpus (prompt/response text) by id.

    ``corpus``: a URI or list of URIs (``.jsonl``, ``.jsonl.gz``, ``.json``, ``.parquet``; files, directories or
    globs, any fsspec filesystem) or a list of row dicts, in the row forms of ``air_ray.data.rows``. Ids are those
    the scorer used (the row's ``id``, else the canonical hash of its content). Ids of the selection missing
    from the scores or the corpus raise ``AirRayError``, unless ``allow_missing`` (then they are listed in the
    result and those rows are left out). ``fields``: a ``FieldMap`` (the field flags used for scoring);
    ``render``: conversation -> the scored response text (default: ``render_response``, the think tags).
    """
    from air_ray.data.lookup import Lookup
    from air_ray.data.rows import FieldMap, render_response

    render = render or render_response
    ids = read_selection_ids(selection)
    steps = read_step_weights(scores, ids)
    missing_scores = [i for i in ids if i not in steps]
    lookup = Lookup({i for i in ids if i in steps}, fields or FieldMap())
    found: dict[str, tuple] = {}
    for block, matches in lookup.blocks(corpus):
        if block.error:
            raise AirRayError(f"corpus {block.source} cannot be read: {block.error}")
        for m in matches:
            prompt, response = m.conv.prompt, render(m.conv)
            if not m.first and found[m.conv.id][:2] != (prompt, response):
                raise AirRayError(f"the corpus holds id {m.conv.id!r} twice with different content")
            found.setdefault(m.conv.id, (prompt, response, m.conv.tools))
    missing_corpus = [i for i in ids if i in lookup.ids and i not in found]
    if (missing_scores or missing_corpus) and not allow_missing:
        parts = []
        if missing_scores:
            parts.append(f"{len(missing_scores)} not in the scores (e.g. {missing_scores[:5]})")
        if missing_corpus:
            parts.append(f"{len(missing_corpus)} not in the corpus (e.g. {missing_corpus[:5]})")
        raise AirRayError(f"of {len(ids)} selected ids, " + " and ".join(parts) +
                          "; check --scores/--corpus, or allow missing rows to train on the rest")
    examples = []
    for rank, rid in enumerate(ids, 1):
        if rid not in found:
            continue
        prompt, response, tools = found[rid]
        spans, weights = steps[rid]
        try:
            check_steps(spans, weights, len(response))
        except AirRayError as e:
            raise AirRayError(f"id {rid!r}: the corpus row does not match its scores ({e})") from None
        examples.append({"id": rid, "rank": rank, "prompt": prompt, "tools": tools, "response": response,
                         "step_spans": spans, "step_weights": weights})
    return TrainingRows(examples, len(ids), missing_scores, missing_corpus, lookup.read, lookup.not_scorable)


def training_rows(cfg: TrainConfig, preparer) -> TrainingRows:
    """The examples to train on: an export's rows (``--input`` an `air-ray export` directory), or the join of
    selection + scores + corpus."""
    from air_ray.data.rows import FieldMap
    from air_ray.outputs.export import is_export, read_export

    if cfg.selection is None:
        if len(cfg.input) != 1 or not is_export(cfg.input[0]):
            raise AirRayError(f"train: --input {' '.join(cfg.input)} is not an `air-ray export` directory; give "
                              "--selection and --scores to join a corpus")
        examples = read_export(cfg.input[0])
        for ex in examples:
            check_steps(ex["step_spans"], ex["step_weights"], len(ex["response"]))
        return TrainingRows(examples, len(examples))
    return load_training_rows(cfg.selection, cfg.scores, cfg.input, allow_missing=cfg.allow_missing,
                              fields=FieldMap.of(cfg), render=preparer.response_text)
