#!/usr/bin/env bash
# Issue 4 speed + issue 6 multi-GPU runs on one host with 2+ GPUs (the lent nvidia-h200-x2).
# Usage: OUT=dir bash scripts/gpu_train_bench.sh   (logs and JSONL rows land in $OUT)
set -u
OUT=${OUT:-results/tmp}; mkdir -p "$OUT"
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
run() { echo "== $*" | tee -a "$OUT/log.txt"; "$@" >> "$OUT/log.txt" 2>&1; echo "rc=$?" >> "$OUT/log.txt"; }
# 1. Training tokens/s and MFU on one H200: SmolLM2 and Llama-3.2-1B shapes, full vs router-only
#    (skipped with SKIP_1GPU=1 when it runs beside the quality job instead).
if [ -z "${SKIP_1GPU:-}" ]; then
run env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/train_step.py --preset llama-3.2-1b smollm2-135m \
  --batch 16 --seq 2048 --steps 5 --out "$OUT/train_step.jsonl"
fi
# 2. The 1B step on 2 GPUs: same global batch (loss must match 1 GPU), data- and fsdp-sharded;
#    and twice the batch on 2 GPUs (weak scaling).
run python3 benchmarks/train_step.py --preset llama-3.2-1b --modes full --batch 16 --seq 2048 \
  --steps 5 --mesh 2 1 1 --out "$OUT/train_step.jsonl"
run python3 benchmarks/train_step.py --preset llama-3.2-1b --modes full --batch 16 --seq 2048 \
  --steps 5 --mesh 1 2 1 --out "$OUT/train_step.jsonl"
run python3 benchmarks/train_step.py --preset llama-3.2-1b --modes full --batch 32 --seq 2048 \
  --steps 5 --mesh 2 1 1 --out "$OUT/train_step.jsonl"
# 3. One process per GPU through jax.distributed (the multi-host path) vs one process.
MP="--preset llama-3.2-1b --batch 16 --seq 1024 --steps 3 --compute bfloat16 --mesh 1 2 1"
run python3 scripts/multiprocess_step.py $MP --out "$OUT/multiprocess.jsonl"
for i in 0 1; do
  JAX_COORDINATOR_ADDRESS=localhost:12355 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$i \
  CUDA_VISIBLE_DEVICES=$i python3 scripts/multiprocess_step.py $MP --distributed \
    --out "$OUT/multiprocess.jsonl" > "$OUT/mp$i.log" 2>&1 &
done
wait; grep -h RESULT "$OUT"/mp*.log >> "$OUT/log.txt"
# 4. Expert-parallel decode on the Llama-3-8B shape: 1 GPU vs experts over 2 GPUs.
run python3 scripts/ep_decode.py --preset llama-3-8b --devices 1 2 --compute masked \
  --out "$OUT/ep_decode.jsonl"
