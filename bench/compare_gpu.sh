#!/usr/bin/env bash
# The evidence run on one GPU (issue #25: sized for <= 10 min on an H200 with the default model; NOT YET RUN on a GPU):
# a 6,000-row GSM8K pool scored in bf16 with the critical and with placebo heads, then K rows per strategy (the
# strategies of compare_cpu.sh), SUBSETS random and SUBSETS matched random subsets, one student each (bf16 mixed
# precision), every student evaluated on EVAL_ROWS of the 1,473 held-out rows with greedy exact match (up to 192 new
# tokens) and the loss. POOL / HELDOUT / K / SUBSETS / EVAL_ROWS override.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/evidence_gpu}
PY=${PY:-.venv/bin/python}
POOL=${POOL:-data/gsm8k_compare/pool_large.jsonl.gz}
HELDOUT=${HELDOUT:-data/gsm8k_compare/heldout_large.jsonl.gz}
K=${K:-500}
SUBSETS=${SUBSETS:-8}
EVAL_ROWS=${EVAL_ROWS:-1000}
mkdir -p "$OUT"
start=$(date +%s)
step() { echo "compare_gpu: $1 done at +$(( $(date +%s) - start )) s"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
[ -f "$OUT/heads.json" ] || $PY -m air_ray heads --output "$OUT/heads.json"
$PY -m air_ray heads --placebo --from "$OUT/heads.json" --seed 0 --output "$OUT/placebo.json"
step heads
$PY -m air_ray score --input "$POOL" --heads "$OUT/heads.json" --output "$OUT/run" --dtype bfloat16
$PY -m air_ray score --input "$POOL" --heads "$OUT/placebo.json" --output "$OUT/placebo_run" --dtype bfloat16
step score
$PY -m air_ray select --scores "$OUT/run" --output "$OUT/run/selection" --top-k "$K"
$PY -m air_ray compare --scores "$OUT/run" --placebo-scores "$OUT/placebo_run" --input "$POOL" \
    --eval-input "$HELDOUT" --eval-rows "$EVAL_ROWS" --top-k "$K" --seeds 1 --random-subsets "$SUBSETS" \
    --matched-subsets "$SUBSETS" --max-new-tokens 192 --dtype float32 --bf16 --batch-size 16 \
    --eval-batch-size 500 --output "$OUT/run/compare"
step compare
$PY -m air_ray report --scores "$OUT/run" --heads "$OUT/heads.json" --placebo-scores "$OUT/placebo_run" \
    --output "$OUT/report"
echo "compare_gpu: wall $(( $(date +%s) - start )) s"
