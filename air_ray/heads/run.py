"""`air-ray heads`: load the model, build probes, detect critical heads (``detect_heads``, which can run anywhere:
on a Ray worker with the GPUs it asks for, see ``air_ray.pipeline.runner.run_task``), then write heads.json +
heads.png where the command runs (``run_heads``)."""

from __future__ import annotations

import sys
import time

from air_ray.config.commands import HeadsConfig


def probe_inputs(cfg: HeadsConfig):
    """``(OpenModel, tokenized probes, probe source)``: everything detection needs but the model's weights.
    Cheap (the tokenizer only), so the command runs it first where it was started: a bad model name or probes file
    is a one-line error before any cluster starts."""
    from air_ray.heads.probes import read_probes, synthetic_probes, tokenize_probe
    from air_ray.models import open_model

    model = open_model(cfg, check_family=True)  # outside the families: one line, now
    tok = model.tokenizer
    if cfg.probes:
        probes, source = read_probes(cfg.probes), cfg.probes
    else:
        probes = synthetic_probes(tok, num=cfg.num_probes, tokens=cfg.probe_tokens, seed=cfg.seed)
        source = "synthetic-kv"
    return model, [tokenize_probe(tok, p) for p in probes], source


def detect_heads(cfg: HeadsConfig) -> dict:
    """Load the model, build the probes, detect the critical heads; returns the heads.json document, with where
    the detection ran (``detected_on``: host, process, device)."""
    import os
    import socket

    from air_ray.store.heads import heads_doc
    from air_ray.heads.detect import detect
    from air_ray.models import resolve_device

    t0 = time.time()
    opened, tokens, source = probe_inputs(cfg)
    ref = opened.ref
    device = resolve_device(cfg.device)
    model = opened.load(dtype=cfg.dtype, device=device)
    print(f"[air-ray heads] {ref.name} ({ref.fingerprint}): {len(tokens)} probes, "
          f"{sum(len(t.input_ids) for t in tokens):,} tokens", file=sys.stderr, flush=True)
    det = detect(model, tokens, top_frac=cfg.head_frac, seed=cfg.seed)
    doc = heads_doc(
        model=ref.name, fingerprint=ref.fingerprint, shape=opened.shape, top_frac=cfg.head_frac, detection=det,
        probes={"source": source, "count": len(tokens), "seed": cfg.seed,
                "tokens": round(sum(len(t.input_ids) for t in tokens) / len(tokens), 1)},
    )
    doc["detected_on"] = {"host": socket.gethostname(), "pid": os.getpid(), "device": str(device),
                          "seconds": round(time.time() - t0, 3)}
    c = det.ablation_check
    print(f"[air-ray heads] {len(det.heads)} critical heads in {time.time() - t0:.1f}s; mean answer-token loss: "
          f"base {c['answer_loss_base']:.3f}, critical ablated {c['answer_loss_ablated']:.3f}, "
          f"{len(det.heads)} random heads ablated {c['answer_loss_random_heads']:.3f}", file=sys.stderr, flush=True)
    return doc


def run_heads(cfg: HeadsConfig, detect=detect_heads) -> dict:
    """Detect (``detect(cfg)``: here, or through ``run_task`` on a Ray worker) and write heads.json + heads.png
    into ``cfg.output``; returns the document."""
    from air_ray.store.heads import save_heads
    from air_ray.store.layout import heads_png

    doc = detect(cfg)
    save_heads(cfg.output, doc)
    print(f"[air-ray heads] wrote {cfg.output} and {heads_png(cfg.output)}", file=sys.stderr, flush=True)
    return doc


def run_placebo(cfg: HeadsConfig) -> dict:
    """``air-ray heads --placebo --from HEADS.json``: the placebo heads document (``air_ray.store.heads.placebo_doc``)
    written into ``cfg.output`` (heads.png beside it); no model is loaded."""
    from air_ray.store.heads import load_heads, placebo_doc, save_heads

    doc = placebo_doc(load_heads(cfg.from_), cfg.seed, cfg.from_)
    save_heads(cfg.output, doc)
    print(f"[air-ray heads] wrote {cfg.output}: {len(doc['heads'])} placebo heads (seed {cfg.seed}) drawn among the "
          f"heads {cfg.from_} does not mark critical", file=sys.stderr, flush=True)
    return doc
