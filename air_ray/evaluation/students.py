"""A student on held-out rows: mean response loss and exact-match accuracy, independent of the scorer.

Rows are read with the data contract's row shapes (``air_ray.data.shapes``: the same prompt and response text the
students were trained on). Everything after that is here and plain: prompt ids from the tokenizer's own chat
template (``format chat``) or the prompt text (``raw``); the loss from ``model(input_ids).logits`` and a
cross-entropy; answers from ``model.generate`` (greedy, at most ``max_new_tokens`` new tokens). Nothing from
``air_ray.engine`` is on this path.

Loss: nats per token over every held-out response token (the response's tokens, then EOS when ``add_eos``, as
in training), summed over rows and divided by the token count; rows are cut to ``max_length`` on the right.

Accuracy: rows whose reference response has a checkable final answer (GSM8K's ``#### N``, else the last
``\\boxed{...}``) are decoded greedily; the prediction is the generated text's ``#### N`` or last ``\\boxed{}``,
else its last number (the usual "flexible" GSM8K extraction). Both sides are normalised (commas, ``$``, a
trailing period, ``72.0`` = ``72``) and compared as strings. Rows without a checkable answer count in the loss
only; ``n_checkable`` says how many were decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

from air_ray.data.answers import final_answer, predicted_answer
from air_ray.errors import AirRayError

IGNORE_INDEX = -100


@dataclass
class HeldOutRow:
    id: str
    prompt: str | list[dict]
    response: str
    answer: str | None  # the reference's checkable final answer, normalised


# ----------------------------------------------------------------------------------------------
# held-out rows


def read_held_out(corpus, fields, render, limit: int | None = None) -> tuple[list[HeldOutRow], dict]:
    """The held-out rows (in file order, the first ``limit``; ``corpus`` as ``load_training_rows`` takes it) and a
    count of what was read and left out (a row that does not parse is left out and counted, never silently)."""
    from air_ray.data.lookup import read_blocks

    rows: list[HeldOutRow] = []
    counts = {"rows_read": 0, "rows_unparsable": 0, "rows_duplicate_id": 0}
    seen: set[str] = set()
    convs = (c for block in read_blocks(corpus, fields) for c in _readable(block))
    for conv in convs:
        if limit is not None and len(rows) >= limit:
            break
        counts["rows_read"] += 1
        if conv is None:
            counts["rows_unparsable"] += 1
        elif conv.id in seen:
            counts["rows_duplicate_id"] += 1
        else:
            seen.add(conv.id)
            response = render(conv)
            rows.append(HeldOutRow(conv.id, conv.prompt, response, final_answer(response)))
    if not rows:
        raise AirRayError(f"no usable held-out rows in {corpus} ({counts})")
    counts["rows_used"] = len(rows)
    return rows, counts


def _readable(block):
    """A block's conversations; a file that cannot be read is an error, not a shorter held-out set."""
    if block.error:
        raise AirRayError(f"corpus {block.source} cannot be read: {block.error}")
    return block.convs


# ----------------------------------------------------------------------------------------------
# token ids (the tokenizer's own template, not air_ray.data.rows)


def prompt_ids(tokenizer, prompt, format: str) -> list[int]:
    if format == "chat":
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    return tokenizer(text)["input_ids"]


def answer_offset(response: str) -> int | None:
    """Where a reference response's final answer starts: its last ``####`` (GSM8K), else its last ``\\boxed{``;
    None when it has neither."""
    for marker in ("####", "\\boxed{"):
        at = response.rfind(marker)
        if at >= 0:
            return at
    return None


def _sequence(tokenizer, row: HeldOutRow, format: str, add_eos: bool, max_length: int
              ) -> tuple[list[int], int, int | None]:
    """(prompt + response ids cut to ``max_length``, number of prompt ids, the position of the first token of the
    final answer (``answer_offset``; the tokens from there to the end, EOS included) or None)."""
    p = prompt_ids(tokenizer, row.prompt, format)
    enc = tokenizer(row.response, add_special_tokens=False, return_offsets_mapping=True)
    r = list(enc["input_ids"])
    at = answer_offset(row.response)
    first = None if at is None else next((i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > at), None)
    if add_eos and tokenizer.eos_token_id is not None:
        r = r + [int(tokenizer.eos_token_id)]
    return (p + r)[:max_length], len(p), None if first is None else len(p) + first


# ----------------------------------------------------------------------------------------------
# the two measures


def _by_length(items: list[tuple], batch_size: int):
    """``(token ids, ...)`` items sorted by length, in batches: ``(batch, its longest length)``."""
    items = sorted(items, key=lambda x: len(x[0]))
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        yield chunk, max(len(x[0]) for x in chunk)


def response_loss(model, tokenizer, rows: list[HeldOutRow], *, format: str = "chat", add_eos: bool = True,
                  max_length: int = 1024, batch_size: int = 16) -> dict:
    """Mean response loss in nats per token (every response token of every row, see the module doc), and the same
    over the final-answer tokens only (``answer_loss``: from the last ``####`` or ``\\boxed{`` to the end, EOS
    included; rows without one are not in it): what exact match would judge, as a loss."""
    import torch
    import torch.nn.functional as F

    from air_ray.training import pad_token_id

    device = next(model.parameters()).device
    seqs = [_sequence(tokenizer, r, format, add_eos, max_length) for r in rows]
    total, count, answer, n_answer = 0.0, 0, 0.0, 0
    model.eval()
    with torch.no_grad():
        for chunk, n in _by_length(seqs, batch_size):
            ids = torch.full((len(chunk), n), pad_token_id(tokenizer), dtype=torch.long)  # [batch, pos]
            mask = torch.zeros((len(chunk), n), dtype=torch.long)  # [batch, pos]
            labels = torch.full((len(chunk), n), IGNORE_INDEX, dtype=torch.long)  # [batch, pos]
            for b, (s, n_prompt, _) in enumerate(chunk):
                ids[b, :len(s)] = torch.tensor(s)
                mask[b, :len(s)] = 1
                labels[b, n_prompt:len(s)] = torch.tensor(s[n_prompt:], dtype=torch.long)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # [batch, pos, vocab]
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(device),
                                  ignore_index=IGNORE_INDEX, reduction="none").view(len(chunk), n - 1)  # [batch, pos-1]
            total += float(nll.sum())
            count += int((labels[:, 1:] != IGNORE_INDEX).sum())
            for b, (s, _, start) in enumerate(chunk):
                if start is not None and start < len(s):  # position t - 1 predicts token t
                    answer += float(nll[b, start - 1:len(s) - 1].sum())
                    n_answer += len(s) - start
    if count == 0:
        raise AirRayError("no held-out response token is left after max_length")
    return {"loss": total / count, "n_tokens": count, "answer_loss": answer / n_answer if n_answer else None,
            "n_answer_tokens": n_answer}


def exact_match(model, tokenizer, rows: list[HeldOutRow], *, format: str = "chat", max_new_tokens: int = 256,
                batch_size: int = 16, keep: int = 3) -> dict:
    """Greedy decoding of every row with a checkable answer; accuracy = matches / rows decoded. ``keep``: the
    first few generations are kept in the result as examples."""
    import torch

    from air_ray.training import pad_token_id

    device = next(model.parameters()).device
    checkable = [r for r in rows if r.answer is not None]
    if not checkable or max_new_tokens == 0:
        return {"accuracy": None, "n_checkable": len(checkable), "n_correct": 0, "examples": []}
    prompts = [(prompt_ids(tokenizer, r.prompt, format), r) for r in checkable]
    pad = pad_token_id(tokenizer)
    correct, examples = 0, []
    model.eval()
    with torch.no_grad():
        for chunk, n in _by_length(prompts, batch_size):
            ids = torch.full((len(chunk), n), pad, dtype=torch.long)  # [batch, pos], padded on the left
            mask = torch.zeros((len(chunk), n), dtype=torch.long)  # [batch, pos]
            for b, (p, _) in enumerate(chunk):
                ids[b, n - len(p):] = torch.tensor(p)
                mask[b, n - len(p):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id)  # [batch, pos + new]
            for b, (_, row) in enumerate(chunk):
                text = tokenizer.decode(out[b, n:], skip_special_tokens=True)
                pred = predicted_answer(text)
                correct += pred == row.answer
                if len(examples) < keep:
                    examples.append({"id": row.id, "answer": row.answer, "predicted": pred, "generated": text[:400]})
    return {"accuracy": correct / len(checkable), "n_checkable": len(checkable), "n_correct": correct,
            "examples": examples}


def evaluate(model, tokenizer, rows: list[HeldOutRow], *, format: str, add_eos: bool, max_length: int,
             batch_size: int, max_new_tokens: int) -> dict:
    """``{loss, n_tokens, accuracy, n_checkable, n_correct, examples}`` of one student."""
    out = response_loss(model, tokenizer, rows, format=format, add_eos=add_eos, max_length=max_length,
                        batch_size=batch_size)
    out.update(exact_match(model, tokenizer, rows, format=format, max_new_tokens=max_new_tokens,
                           batch_size=batch_size))
    return out
