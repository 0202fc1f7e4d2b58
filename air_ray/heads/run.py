"""`air-ray heads`: load the model, build probes, detect critical heads, write heads.json + heads.png."""

from __future__ import annotations

import sys
import time

from air_ray.config.commands import HeadsConfig


def run_heads(cfg: HeadsConfig) -> dict:
    from air_ray.heads.artifact import write_heads
    from air_ray.heads.detect import detect
    from air_ray.heads.probes import read_probes, synthetic_probes, tokenize_probe
    from air_ray.models.families import family_of
    from air_ray.models.load import load_config, load_model, load_tokenizer, model_shape, resolve_device
    from air_ray.models.resolve import prepare_model

    t0 = time.time()
    ref = prepare_model(cfg.model, allow_pickle=cfg.allow_pickle)
    family_of(load_config(ref, trust_remote_code=cfg.trust_remote_code))  # outside the families: one line, now
    tok = load_tokenizer(ref, trust_remote_code=cfg.trust_remote_code)
    if cfg.probes:
        probes = read_probes(cfg.probes)
        source = cfg.probes
    else:
        probes = synthetic_probes(tok, num=cfg.num_probes, tokens=cfg.probe_tokens, seed=cfg.seed)
        source = "synthetic-kv"
    tokens = [tokenize_probe(tok, p) for p in probes]
    model = load_model(ref, dtype=cfg.dtype, device=resolve_device(cfg.device), allow_pickle=cfg.allow_pickle,
                       trust_remote_code=cfg.trust_remote_code)
    print(f"[air-ray heads] {ref.name} ({ref.fingerprint}): {len(tokens)} probes, "
          f"{sum(len(t.input_ids) for t in tokens):,} tokens", file=sys.stderr, flush=True)
    det = detect(model, tokens, top_frac=cfg.top_frac, seed=cfg.seed)
    doc = write_heads(
        cfg.output, model=ref.name, fingerprint=ref.fingerprint, shape=model_shape(model), top_frac=cfg.top_frac,
        detection=det,
        probes={"source": source, "count": len(tokens), "seed": cfg.seed,
                "tokens": round(sum(len(t.input_ids) for t in tokens) / len(tokens), 1)},
    )
    c = det.ablation_check
    print(f"[air-ray heads] {len(det.heads)} critical heads in {time.time() - t0:.1f}s; mean answer-token loss: "
          f"base {c['answer_loss_base']:.3f}, critical ablated {c['answer_loss_ablated']:.3f}, "
          f"{len(det.heads)} random heads ablated {c['answer_loss_random_heads']:.3f}", file=sys.stderr, flush=True)
    print(f"[air-ray heads] wrote {cfg.output} and {cfg.output.rsplit('.', 1)[0]}.png", file=sys.stderr, flush=True)
    return doc
