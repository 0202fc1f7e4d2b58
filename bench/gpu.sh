#!/usr/bin/env bash
# Scoring throughput on a CUDA machine with no network: a random-init ~1.5B Qwen2-shaped model (no checkpoint,
# no tokenizer, nothing downloaded), bf16, the engine's own path (air_ray.engine.losses.token_nll_pair). Prints tokens/s
# and MFU against this GPU's measured bf16 matmul rate; the last line is `tokens_per_s=... mfu=...`.
#
#   bench/gpu.sh                                  # defaults: 512 rows of 256..2048 tokens, 32768-token batches
#   bench/gpu.sh --rows 2048 --compare-plain      # more rows; also the plain two full passes (must agree)
#   PY=/path/to/python bench/gpu.sh               # a Python whose torch is a CUDA build (the Makefile's .venv
#                                                 # pins the CPU wheel on the dev machine)
#
# Needs: torch (CUDA build), transformers, numpy and this repository (air_ray importable from the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import sys, torch; print("torch", torch.__version__, "cuda", torch.version.cuda);
sys.exit(0 if torch.cuda.is_available() else "CUDA is not available to this Python: set PY to one with a CUDA torch")'
exec "$PY" bench/gpu.py --device cuda --dtype bfloat16 "$@"
