#!/usr/bin/env bash
# The evidence run of docs/EVIDENCE.md on a 2-core CPU, float32 (issue #32: <= 120 min on a quiet machine): the recipe
# of bench/compare_recipe.sh with the CPU's sizes: the 512-row GSM8K pool, 32 rows per selection, 20 random subsets,
# 10 subsets each of clean_random, repaired_random and answer_filter, 32 probes; students evaluated on 48 held-out
# rows by their losses only (--max-new-tokens 0: exact match sits at the floor for a 135M student, and decoding was
# 60-80 % of a student's time).
# OUT / POOL / HELDOUT / K / SUBSETS / CLEAN / EVAL_ROWS / PROBES / DEFECTS override; rerunning resumes.
set -euo pipefail
export NAME=compare_cpu OUT=${OUT:-out/evidence} POOL=${POOL:-data/gsm8k_compare/pool.jsonl}
export HELDOUT=${HELDOUT:-data/gsm8k_compare/heldout.jsonl} K=${K:-32} SUBSETS=${SUBSETS:-20} CLEAN=${CLEAN:-10}
export EVAL_ROWS=${EVAL_ROWS:-48} SCORE_DTYPE=float32 HEADS_ARGS="--num-probes ${PROBES:-32}"
export STUDENT_ARGS="--max-new-tokens 0 --eval-batch-size 32 --dtype float32"
exec bash "$(dirname "$0")/compare_recipe.sh"
