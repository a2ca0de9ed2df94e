#!/usr/bin/env bash
# Issue 5 GPU runs on one H200: kernel tests, the decode-kernel benchmark, the end-to-end decode.
# Usage: OUT=dir STAGE=kernels|e2e bash scripts/gpu_kernels.sh   (logs + JSONL rows in $OUT)
set -u
OUT=${OUT:-results/tmp}; mkdir -p "$OUT"
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
# The repo maps prunepath_jax.kernels/train/eval to top-level folders (pyproject package-dir);
# pytest puts the repo root first on sys.path, so mirror that mapping there.
for p in kernels train eval; do [ -e "prunepath_jax/$p" ] || ln -s "../$p" "prunepath_jax/$p"; done
run() { echo "== $*" | tee -a "$OUT/log.txt"; "$@" >> "$OUT/log.txt" 2>&1; echo "rc=$?" | tee -a "$OUT/log.txt"; }
case "${STAGE:-kernels}" in
kernels)
  run timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_pallas_logits.py \
    tests/test_kernels_pallas.py tests/test_kernels_triton.py tests/test_pallas_attention.py
  run timeout 330 python3 benchmarks/pallas_decode.py --sweep --batch 1 4 16 \
    --out "$OUT/pallas_decode.jsonl"
  ;;
all)  # sweep -> best tuning -> kernel rows -> end-to-end with it -> every GPU kernel test
  run timeout 220 python3 benchmarks/pallas_decode.py --sweep --batch 1 4 16 \
    --best-out "$OUT/best.json" --out "$OUT/pallas_decode.jsonl"
  run timeout 160 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --impls pallas triton --batches 4 8 --steps 8 --chunks 3 --pallas-tuning "$OUT/best.json" \
    --out "$OUT/sparse_decode.jsonl"
  run timeout 190 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_api.py tests/test_decode_attention_model.py tests/test_pallas_logits.py \
    tests/test_kernels_pallas.py tests/test_kernels_triton.py tests/test_pallas_attention.py
  ;;
final)  # the kernel-path generate diagnosis, the GPU tests not yet run, long-context decode
  run timeout 150 python3 scripts/diag_sparse_generate.py --batch 1
  run timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_decode_attention_model.py tests/test_pallas_attention.py \
    tests/test_kernels_pallas.py -k "gpu and (preact or attention or llama8b or b1)"
  run timeout 190 python3 benchmarks/sparse_decode.py --shapes llama-3-8b --sparsities \
    --impls pallas --batches --steps 8 --chunks 2 --long-ctx 4096 32768 \
    --out "$OUT/sparse_decode.jsonl"
  ;;
e2e)
  run timeout 380 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --impls pallas triton --pick-logits --batches 8 16 --steps 8 --chunks 3 \
    --out "$OUT/sparse_decode.jsonl"
  run timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_pallas_logits.py \
    tests/test_kernels_pallas.py tests/test_kernels_triton.py tests/test_kernels_api.py \
    tests/test_pallas_attention.py tests/test_decode_attention_model.py
  ;;
esac
