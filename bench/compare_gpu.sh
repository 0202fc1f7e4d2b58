#!/usr/bin/env bash
# The evidence run on one GPU (issue #32: sized for <= 10 min on an H100/H200 with the default model; NOT YET RUN on
# a GPU): the recipe of compare_cpu.sh at 10x the pool and 15x the selection. The 6,000-row GSM8K pool with a seeded
# 25 % of its rows corrupted (bench/plant_defects.py), scored in bf16 with the critical heads (--embed) and with
# placebo heads, and the original pool scored with the critical heads; then K rows per strategy (the strategies of
# compare_cpu.sh: the positive control clean_random, the AIR score plain / balanced / diverse / step-weighted, delta
# plain / balanced / diverse, random_diverse, the answer filter, placebo, loss_base), SUBSETS random subsets and CLEAN
# clean subsets, one student each (bf16 mixed precision), every student evaluated on EVAL_ROWS of the 1,473 held-out
# rows with greedy exact match (up to NEW_TOKENS new tokens) and the loss.
# POOL / HELDOUT / K / SUBSETS / CLEAN / EVAL_ROWS / NEW_TOKENS override.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/evidence_gpu}
PY=${PY:-.venv/bin/python}
POOL=${POOL:-data/gsm8k_compare/pool_large.jsonl.gz}
HELDOUT=${HELDOUT:-data/gsm8k_compare/heldout_large.jsonl.gz}
K=${K:-500}
SUBSETS=${SUBSETS:-8}
CLEAN=${CLEAN:-6}
EVAL_ROWS=${EVAL_ROWS:-500}
NEW_TOKENS=${NEW_TOKENS:-160}
DEFECTS=${DEFECTS:-0.25}
mkdir -p "$OUT"
start=$(date +%s)
step() { echo "compare_gpu: $1 done at +$(( $(date +%s) - start )) s"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
[ -f "$OUT/heads.json" ] || $PY -m air_ray heads --output "$OUT/heads.json"
$PY -m air_ray heads --placebo --from "$OUT/heads.json" --seed 0 --output "$OUT/placebo.json"
step heads
$PY bench/plant_defects.py "$POOL" "$OUT/planted.jsonl" --frac "$DEFECTS" --seed 0
$PY -m air_ray score --input "$OUT/planted.jsonl" --heads "$OUT/heads.json" --output "$OUT/planted/run" \
    --dtype bfloat16 --embed
$PY -m air_ray score --input "$OUT/planted.jsonl" --heads "$OUT/placebo.json" --output "$OUT/planted/placebo_run" \
    --dtype bfloat16
$PY -m air_ray score --input "$POOL" --heads "$OUT/heads.json" --output "$OUT/original/run" --dtype bfloat16 --embed
step score
common=(--eval-input "$HELDOUT" --eval-rows "$EVAL_ROWS" --top-k "$K" --seeds 1 --random-subsets "$SUBSETS"
        --max-new-tokens "$NEW_TOKENS" --dtype float32 --bf16 --batch-size 16 --eval-batch-size 250)
$PY -m air_ray select --scores "$OUT/planted/run" --output "$OUT/planted/run/selection" --top-k "$K"
$PY -m air_ray compare --scores "$OUT/planted/run" --placebo-scores "$OUT/planted/placebo_run" \
    --input "$OUT/planted.jsonl" "${common[@]}" --clean-subsets "$CLEAN" \
    --strategies clean_random score score_balanced score_diverse score_weighted delta delta_balanced delta_diverse \
                 random_diverse answer_filter placebo loss_base random
step "compare (planted pool)"
$PY -m air_ray select --scores "$OUT/original/run" --output "$OUT/original/run/selection" --top-k "$K"
$PY -m air_ray compare --scores "$OUT/original/run" --input "$POOL" "${common[@]}" \
    --strategies score delta_balanced score_diverse delta_diverse random_diverse answer_filter random
step "compare (original pool)"
$PY -m air_ray report --scores "$OUT/planted/run" --heads "$OUT/heads.json" \
    --placebo-scores "$OUT/planted/placebo_run" --output "$OUT/planted/report"
$PY -m air_ray report --scores "$OUT/original/run" --heads "$OUT/heads.json" --output "$OUT/original/report"
echo "compare_gpu: wall $(( $(date +%s) - start )) s"
