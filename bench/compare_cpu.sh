#!/usr/bin/env bash
# The evidence run of docs/EVIDENCE.md on a 2-core CPU, float32 (issue #25: <= 75 min on a quiet machine;
# measured 59 min on 2026-12-05):
#   1. critical heads of the default model (32 probes) and placebo heads (as many, random non-critical ones);
#   2. the 512-row GSM8K pool scored with each;
#   3. air-ray compare: K rows per strategy (score, score balanced over loss_base bins, delta, delta balanced,
#      placebo, loss_base, entropy_base, n_response_tokens, score with step weights), one student each, placed in the
#      null of SUBSETS random and SUBSETS difficulty-matched random subsets (one student each); loss only
#      (--max-new-tokens 0: exact match sits at the floor for a 135M student on CPU), EVAL_ROWS held-out rows;
#   4. the report of the run (bias table, placebo agreement, copy tokens, step weights, the comparison).
# Outputs under ${OUT:-out/evidence}; rerunning resumes (finished students are reused). Prints the wall time of each
# step and the load average at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/evidence}
PY=${PY:-.venv/bin/python}
K=${K:-32}
SUBSETS=${SUBSETS:-10}
EVAL_ROWS=${EVAL_ROWS:-64}
POOL=${POOL:-data/gsm8k_compare/pool.jsonl}
HELDOUT=${HELDOUT:-data/gsm8k_compare/heldout.jsonl}
mkdir -p "$OUT"
start=$(date +%s)
step() { echo "compare_cpu: $1 done at +$(( $(date +%s) - start )) s"; }
[ -f "$OUT/heads.json" ] || $PY -m air_ray heads --num-probes ${PROBES:-32} --output "$OUT/heads.json"
$PY -m air_ray heads --placebo --from "$OUT/heads.json" --seed 0 --output "$OUT/placebo.json"
step heads
$PY -m air_ray score --input "$POOL" --heads "$OUT/heads.json" --output "$OUT/run" --dtype float32
step "score (critical heads)"
$PY -m air_ray score --input "$POOL" --heads "$OUT/placebo.json" --output "$OUT/placebo_run" --dtype float32
step "score (placebo heads)"
$PY -m air_ray select --scores "$OUT/run" --output "$OUT/run/selection" --top-k "$K"
$PY -m air_ray compare --scores "$OUT/run" --placebo-scores "$OUT/placebo_run" --input "$POOL" \
    --eval-input "$HELDOUT" --eval-rows "$EVAL_ROWS" --top-k "$K" --seeds 1 \
    --random-subsets "$SUBSETS" --matched-subsets "$SUBSETS" --max-new-tokens 0 --eval-batch-size 32 \
    --dtype float32 --output "$OUT/run/compare"
step compare
$PY -m air_ray report --scores "$OUT/run" --heads "$OUT/heads.json" --placebo-scores "$OUT/placebo_run" \
    --output "$OUT/report"
echo "compare_cpu: wall $(( $(date +%s) - start )) s; load average $(cut -d' ' -f1-3 /proc/loadavg)"
