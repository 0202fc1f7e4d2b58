"""`make demo` / `air-ray demo`: fetch the default model, detect heads, score the GSM8K sample installed with the
package (``air_ray.data.SAMPLE``) on an embedded local Ray, select the top 10%, write the HTML report, print a
summary and, last, the report's path."""

from __future__ import annotations

import json
import time
from pathlib import Path

from air_ray.config.commands import DemoConfig


def run_demo(cfg: DemoConfig) -> dict:
    import pyarrow.parquet as pq

    from air_ray.config.commands import HeadsConfig, ScoreConfig, SelectConfig
    from air_ray.data import SAMPLE
    from air_ray.errors import AirRayError
    from air_ray.heads.run import run_heads
    from air_ray.models import prepare_model
    from air_ray.outputs.report import write_report
    from air_ray.outputs.select import select
    from air_ray.pipeline.score import run_score
    from air_ray.store.layout import DemoLayout
    from air_ray.store.schemas import SCORES
    from air_ray.store.scores import open_scores

    cfg = cfg.validate()
    output, input, limit = cfg.output, cfg.input or str(SAMPLE), cfg.limit
    t0 = time.time()
    out = DemoLayout(output)
    out.root.mkdir(parents=True, exist_ok=True)
    src = Path(input)
    if not src.is_file():
        raise AirRayError(f"demo input {input} not found")
    print(f"input: {src}" + (f" (the first {limit} rows)" if limit else ""), flush=True)
    if limit:
        lines = [ln for ln in src.read_text(encoding="utf-8").splitlines() if ln.strip()][:limit]
        src = out.input(src.name)
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_text("\n".join(lines) + "\n", encoding="utf-8")

    print("== 1/5 model", flush=True)
    ref = prepare_model()
    print(f"{ref.name} -> {ref.path} (fingerprint {ref.fingerprint})", flush=True)

    print("== 2/5 heads", flush=True)
    heads = run_heads(HeadsConfig(output=str(out.heads), num_probes=cfg.num_probes, probe_tokens=cfg.probe_tokens))

    print("== 3/5 score (embedded local Ray)", flush=True)
    run, selection = out.run, out.selection
    manifest = run_score(ScoreConfig(
        heads=str(out.heads), input=[str(src)], output=run.uri, address="local", rows_per_partition=64,
        progress=cfg.progress,
    ))

    print("== 4/5 select top 10%", flush=True)
    summary = select(SelectConfig(scores=run.uri, output=selection.root, top_frac=0.1))

    print("== 5/5 report", flush=True)
    page = write_report(run.uri, str(out.heads), out.report.root, selection=selection.root)

    sel = pq.read_table(selection.parquet).to_pylist()
    scores = {r["id"]: r for r in open_scores(run.uri, "demo").table(SCORES.names).to_pylist()}
    rows = {json.loads(ln).get("id"): json.loads(ln) for ln in src.read_text(encoding="utf-8").splitlines()
            if ln.strip()}
    c = manifest.counts
    print()
    print(f"critical heads ({len(heads['heads'])}): {heads['heads']}")
    ac = heads["ablation_check"]
    print(f"probe answer loss: base {ac['answer_loss_base']:.3f} | critical heads off "
          f"{ac['answer_loss_ablated']:.3f} | random heads off {ac['answer_loss_random_heads']:.3f}")
    print(f"rows: read {c['rows_read']}, scored {c['rows_scored']}, rejected {c['rows_rejected']}; "
          f"{manifest.tokens_per_s:.0f} tok/s; selected {len(sel)} (threshold {summary['threshold_score']:.4f})")
    b, w = summary["bias"], manifest.step_weights

    def num(x, fmt=".3f"):
        return "n/a" if x is None else format(x, fmt)

    print(f"what the score favours: Spearman(score, loss_base) {num(b['spearman']['loss_base'], '+.2f')}; selected "
          f"mean loss_base {num(b['selected_mean']['loss_base'])}, the pool's {num(b['pool_mean']['loss_base'])} "
          "(select --balance loss_base or --by delta: see README)")
    print(f"step weights ({w['rule']}): effective token share median {num(w['effective_token_share']['median'])}, "
          f"largest weight {num(w['max_weight'])}")
    print()
    print(f"{'rank':>4}  {'id':<20} {'score':>8} {'tokens':>6}  most influential step")
    for r in sel[:10]:
        s = scores[r["id"]]
        resp = rows.get(r["id"], {}).get("response", "")
        best = max((i for i, v in enumerate(s["step_scores"]) if v is not None),
                   key=lambda i: s["step_scores"][i], default=None)
        step = resp[s["step_spans"][best][0]:s["step_spans"][best][1]] if best is not None else ""
        print(f"{r['rank']:>4}  {r['id']:<20} {r['score']:>8.4f} {s['n_response_tokens']:>6}  {step[:60]!r}")
    print()
    print("outputs:")
    for p in out.outputs():
        print(f"  {p}")
    print(f"demo finished in {time.time() - t0:.0f}s; open the report:")
    print(page, flush=True)
    return {"heads": heads, "manifest": manifest, "selection": summary, "report": page}
