#!/usr/bin/env bash
# The compare run of docs/EVIDENCE.md on a 2-core CPU, float32 (about an hour with 2 seeds): score a 512-row
# GSM8K pool with the default model, then train one student per strategy and seed on 64 rows each and evaluate
# every student on 128 held-out rows. Outputs under ${OUT:-out/evidence}; rerunning resumes the finished runs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/evidence}
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-2}
mkdir -p "$OUT"
start=$(date +%s)
[ -f "$OUT/heads.json" ] || $PY -m air_ray heads --num-probes 32 --output "$OUT/heads.json"
$PY -m air_ray score --input data/gsm8k_compare/pool.jsonl --heads "$OUT/heads.json" --output "$OUT/run" \
    --dtype float32
$PY -m air_ray compare --scores "$OUT/run" --input data/gsm8k_compare/pool.jsonl \
    --eval-input data/gsm8k_compare/heldout.jsonl --top-k 64 --seeds "$SEEDS" --max-new-tokens 128 --eval-batch-size 32 \
    --dtype float32 --output "$OUT/compare"
echo "compare_cpu: wall $(( $(date +%s) - start )) s; load average $(cut -d' ' -f1-3 /proc/loadavg)"
