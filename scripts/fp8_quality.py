"""What float8 rows of x (the grouped prefill's opt-in ``x_fp8``) cost in quality.

Why: `kernels/fp8_rows.py` rounds each token's FFN input to e4m3 with a scale a row, so the
grouped up kernel gathers half the bytes. That changes every expert's pre-activations by up to
2^-4 relative per element of x. This script measures the cost where users would see it: the
perplexity of SmolLM2-135M converted as `make demo` does (balanced k-means, training-free
routers, gate "none"), swept over τ on held-out shipped text, once as shipped and once with the
FFN input rounded exactly as the kernel rounds it (the XLA paths patched to see
``dequantize_rows(quantize_rows(x))``; the routers still see the unrounded x, as in the kernel
path). τ 1.05 keeps every expert with gate "none": the dense FFN with its input rounded.

    python scripts/fp8_quality.py --out results/fp8_quality
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import jax

from prunepath_jax.config import PrunePathConfig
from prunepath_jax.convert import to_prunepath
from prunepath_jax.demo import calibration_batches
from prunepath_jax.eval.sweep import sweep
from prunepath_jax.kernels import fp8_rows
from prunepath_jax.loading import load_pretrained
from prunepath_jax.nn import PrunePathFFN
from prunepath_jax.router_init import init_routers
from prunepath_jax.runinfo import run_header


def rounded(x_btd):
    """x with each token's row rounded as the fp8 kernel reads it."""
    b, t, d = x_btd.shape
    q = fp8_rows.quantize_rows(x_btd.reshape(b * t, d))
    return fp8_rows.dequantize_rows(*q, x_btd.dtype).reshape(b, t, d)


@contextlib.contextmanager
def fp8_expert_inputs():
    """The PrunePath FFN's XLA expert paths (masked and gathered) on rounded rows of x.

    The evaluation's jitted functions are cached by the model's graph, which the patch does not
    change: the caches are cleared on the way in and out, so both passes trace what they run."""
    masked, gathered = PrunePathFFN._masked, PrunePathFFN._gathered
    PrunePathFFN._masked = lambda self, x, gate: masked(self, rounded(x), gate)
    PrunePathFFN._gathered = lambda self, x, sel, gate: gathered(self, rounded(x), sel, gate)
    jax.clear_caches()
    try:
        yield
    finally:
        PrunePathFFN._masked, PrunePathFFN._gathered = masked, gathered
        jax.clear_caches()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help='"default" (SmolLM2-135M), HF dir, .gguf')
    ap.add_argument("--taus", nargs="+", type=float, default=[1.05, 0.9, 0.7, 0.5])
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--out", default="results/fp8_quality")
    a = ap.parse_args()
    pre = load_pretrained(a.model)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model, _ = to_prunepath(pre.model, PrunePathConfig(gate="none"))
    model, _ = init_routers(model, calibration_batches(pre.tokenizer, a.calib_tokens))
    head, rows = run_header(), []
    for label in ("shipped", "fp8"):
        t0 = time.perf_counter()
        with fp8_expert_inputs() if label == "fp8" else contextlib.nullcontext():
            got = sweep(model, pre.tokenizer, "shipped", a.taus, max_tokens=a.eval_tokens,
                        seq_len=512, batch_size=4, progress=False, out_dir=out / label)  # fmt: skip
        rows += [{**head, "x": label, **r} for r in got if r.get("setting") == "tau"]
        print(f"{label}: {len(got)} rows, {time.perf_counter() - t0:.0f} s", flush=True)
    with open(out / "fp8_quality.jsonl", "a") as fh:
        for r in rows:
            fh.write(json.dumps(r, default=str) + "\n")
    ppl = {(r["x"], r["tau"]): r for r in rows}
    if all(ppl[("fp8", t)]["ppl"] == ppl[("shipped", t)]["ppl"] for t in a.taus):
        raise SystemExit("the rounded pass equals the shipped one at every τ: the patch did not "
                         "reach the traced model")  # fmt: skip
    print("| τ | FFN sparsity | perplexity, x as shipped | x rounded to e4m3 | ratio |")
    print("|---|---|---|---|---|")
    for tau in a.taus:
        s, q = ppl[("shipped", tau)], ppl[("fp8", tau)]
        print(f"| {tau} | {s['sparsity']:.3f} | {s['ppl']:.3f} | {q['ppl']:.3f} | "
              f"{q['ppl'] / s['ppl']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
