#!/usr/bin/env bash
# The evidence run on one GPU (issue #32: sized for <= 10 min on an H100/H200 with the default model; NOT YET RUN on
# a GPU): the recipe of bench/compare_recipe.sh at 10x the pool and 15x the selection: the 6,000-row GSM8K pool
# scored in bf16, 500 rows per selection, 8 random subsets and 6 each of clean_random, repaired_random and
# answer_filter, students trained in bf16 mixed precision and evaluated on 500 of the 1,473 held-out rows by their
# losses and greedy exact match (up to NEW_TOKENS new tokens).
# OUT / POOL / HELDOUT / K / SUBSETS / CLEAN / EVAL_ROWS / NEW_TOKENS / DEFECTS override; rerunning resumes.
set -euo pipefail
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
export NAME=compare_gpu OUT=${OUT:-out/evidence_gpu} POOL=${POOL:-data/gsm8k_compare/pool_large.jsonl.gz}
export HELDOUT=${HELDOUT:-data/gsm8k_compare/heldout_large.jsonl.gz} K=${K:-500} SUBSETS=${SUBSETS:-8}
export CLEAN=${CLEAN:-6} EVAL_ROWS=${EVAL_ROWS:-500} SCORE_DTYPE=bfloat16 HEADS_ARGS=""
export STUDENT_ARGS="--max-new-tokens ${NEW_TOKENS:-160} --dtype float32 --bf16 --batch-size 16 --eval-batch-size 250"
exec bash "$(dirname "$0")/compare_recipe.sh"
