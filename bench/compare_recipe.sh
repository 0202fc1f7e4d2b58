#!/usr/bin/env bash
# The evidence recipe of docs/EVIDENCE.md, as bench/compare_cpu.sh (2-core CPU) and bench/compare_gpu.sh (one GPU) run
# it with their sizes (the variables below, each overridable from the environment):
#   1. critical heads of the default model and placebo heads (as many, random non-critical ones);
#   2. the planted pool: POOL with a seeded DEFECTS share of its rows corrupted (bench/plant_defects.py: wrong_answer,
#      wrong_step, shuffled, truncated in equal parts; column air_defect, reference column solution), scored with
#      the critical heads (--embed: the diversity quotas need it) and with the placebo heads; the original pool
#      scored with the critical heads (--embed);
#   3. air-ray compare on each, K rows per strategy, one student each, every strategy placed in the null of SUBSETS
#      random subsets:
#      planted: the positive control clean_random (CLEAN random subsets of the clean rows, subset j made from
#      random subset j: tested paired and unpaired), the paired control repaired_random (random subsets 0..CLEAN-1
#      trained with their defects repaired, each against its random student), the AIR score plain, balanced,
#      diverse and step-weighted, delta
#      plain / balanced / diverse, random_diverse, the answer-match filter (CLEAN subsets, made and tested as
#      clean_random's), the placebo heads' score and the negative control loss_base;
#      original: the score, delta balanced, the diverse strategies and the answer filter (no reference column
#      there: its subsets are the random ones, whose students are reused);
#   4. the report of each run.
# Outputs under OUT; rerunning resumes (finished students are reused). Prints the wall time of each step and the
# load average at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NAME:?NAME (compare_cpu or compare_gpu) is set by the recipe that runs this}"
: "${OUT:?}" "${POOL:?}" "${HELDOUT:?}" "${K:?}" "${SUBSETS:?}" "${CLEAN:?}" "${EVAL_ROWS:?}" "${SCORE_DTYPE:?}"
PY=${PY:-.venv/bin/python}
DEFECTS=${DEFECTS:-0.25}
HEADS_ARGS=${HEADS_ARGS:-}
STUDENT_ARGS=${STUDENT_ARGS:-}
mkdir -p "$OUT"
start=$(date +%s)
step() { echo "$NAME: $1 done at +$(( $(date +%s) - start )) s"; }
[ -f "$OUT/heads.json" ] || $PY -m air_ray heads $HEADS_ARGS --output "$OUT/heads.json"
$PY -m air_ray heads --placebo --from "$OUT/heads.json" --seed 0 --output "$OUT/placebo.json"
step heads
$PY bench/plant_defects.py "$POOL" "$OUT/planted.jsonl" --frac "$DEFECTS" --seed 0
score() {  # score INPUT HEADS OUTPUT [flags]
  $PY -m air_ray score --input "$1" --heads "$2" --output "$3" --dtype "$SCORE_DTYPE" "${@:4}"
}
score "$OUT/planted.jsonl" "$OUT/heads.json" "$OUT/planted/run" --embed
step "score (planted pool, critical heads)"
score "$OUT/planted.jsonl" "$OUT/placebo.json" "$OUT/planted/placebo_run"
step "score (planted pool, placebo heads)"
score "$POOL" "$OUT/heads.json" "$OUT/original/run" --embed
step "score (original pool, critical heads)"

# shellcheck disable=SC2206  # STUDENT_ARGS: flags, split on spaces
common=(--eval-input "$HELDOUT" --eval-rows "$EVAL_ROWS" --top-k "$K" --seeds 1 --random-subsets "$SUBSETS"
        $STUDENT_ARGS)
$PY -m air_ray select --scores "$OUT/planted/run" --output "$OUT/planted/run/selection" --top-k "$K"
$PY -m air_ray compare --scores "$OUT/planted/run" --placebo-scores "$OUT/planted/placebo_run" \
    --input "$OUT/planted.jsonl" "${common[@]}" --clean-subsets "$CLEAN" \
    --strategies clean_random repaired_random score score_balanced score_diverse score_weighted delta delta_balanced \
                 delta_diverse random_diverse answer_filter placebo loss_base random
step "compare (planted pool)"
$PY -m air_ray select --scores "$OUT/original/run" --output "$OUT/original/run/selection" --top-k "$K"
$PY -m air_ray compare --scores "$OUT/original/run" --input "$POOL" "${common[@]}" --clean-subsets "$CLEAN" \
    --strategies score delta_balanced score_diverse delta_diverse random_diverse answer_filter random
step "compare (original pool)"
$PY -m air_ray report --scores "$OUT/planted/run" --heads "$OUT/heads.json" \
    --placebo-scores "$OUT/planted/placebo_run" --output "$OUT/planted/report"
$PY -m air_ray report --scores "$OUT/original/run" --heads "$OUT/heads.json" --output "$OUT/original/report"
echo "$NAME: wall $(( $(date +%s) - start )) s; load average $(cut -d' ' -f1-3 /proc/loadavg)"
