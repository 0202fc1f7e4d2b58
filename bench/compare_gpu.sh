#!/usr/bin/env bash
# The compare run on one GPU (sized for ~10 minutes on an H200 with the default model; not yet run on one): the
# 512-row pool scored in bf16, then 128 rows per strategy, 5 seeds, students trained with bf16 mixed precision and
# evaluated on the 128 held-out rows with 256 new tokens. POOL / HELDOUT / K / SEEDS override; a bigger pool (e.g.
# all of GSM8K's train split as {"id", "prompt", "response"} rows, minus the held-out ids) gives a larger k.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/evidence_gpu}
PY=${PY:-.venv/bin/python}
POOL=${POOL:-data/gsm8k_compare/pool.jsonl}
HELDOUT=${HELDOUT:-data/gsm8k_compare/heldout.jsonl}
K=${K:-128}
SEEDS=${SEEDS:-5}
mkdir -p "$OUT"
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
[ -f "$OUT/heads.json" ] || $PY -m air_ray heads --output "$OUT/heads.json"
$PY -m air_ray score --input "$POOL" --heads "$OUT/heads.json" --output "$OUT/run" --dtype bfloat16
$PY -m air_ray compare --scores "$OUT/run" --input "$POOL" --eval-input "$HELDOUT" --top-k "$K" --seeds "$SEEDS" \
    --max-new-tokens 256 --dtype float32 --bf16 --batch-size 16 --eval-batch-size 64 --output "$OUT/compare"
echo "compare_gpu: wall $(( $(date +%s) - start )) s"
