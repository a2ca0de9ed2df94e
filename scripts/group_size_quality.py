"""What wider experts cost in quality: the τ sweep of one model converted at several G.

Why: the grouped prefill GEMM is bound by L2 traffic, and 64-neuron experts made one 8B layer
1.56× dense against 1.26× with 32 (H200, BENCHMARKS.md, fiftieth session), because each
program's tile is twice as wide for the same rows of x. Wider experts are coarser, so at the
same fraction of FFN neurons skipped each token keeps fewer, less specific choices. This
converts the model once per group size (balanced k-means, the training-free router
initialisation on shipped training text, gate "none", as `make demo`), sweeps τ on held-out
shipped text and writes one table of perplexity against realised FFN sparsity, with the dense
model's perplexity beside it. Default: SmolLM2-135M on 16 384 evaluation tokens (~10 min on 2
CPU cores); 4096 tokens were too few to show the gap (BENCHMARKS.md, fiftieth session).

    python scripts/group_size_quality.py --group-sizes 32 64 --out results/group_size
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from prunepath_jax.config import PrunePathConfig
from prunepath_jax.convert import to_prunepath
from prunepath_jax.demo import calibration_batches
from prunepath_jax.eval.sweep import sweep
from prunepath_jax.loading import load_pretrained
from prunepath_jax.router_init import init_routers
from prunepath_jax.runinfo import run_header


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help='"default" (SmolLM2-135M), HF dir, .gguf')
    ap.add_argument("--group-sizes", nargs="+", type=int, default=[32, 64])
    ap.add_argument("--taus", nargs="+", type=float, default=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--out", default="results/group_size")
    a = ap.parse_args()
    pre = load_pretrained(a.model)
    f = pre.config.d_ff
    bad = [g for g in a.group_sizes if g <= 0 or f % g]
    if bad:
        raise SystemExit(f"group sizes {bad} do not divide the FFN width {f}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    head = run_header()
    rows = []
    for i, g in enumerate(a.group_sizes):
        t0 = time.perf_counter()
        model, _ = to_prunepath(pre.model, PrunePathConfig(group_size=g, gate="none"))
        model, _ = init_routers(model, calibration_batches(pre.tokenizer, a.calib_tokens))
        got = sweep(model, pre.tokenizer, "shipped", a.taus, max_tokens=a.eval_tokens,
                    seq_len=512, batch_size=4, progress=False, out_dir=out / f"g{g}",
                    reference=pre.model if i == 0 else None)  # fmt: skip
        for r in got:
            rows.append({**head, "group_size": g, "n_experts": f // g, **r,
                         "seconds": time.perf_counter() - t0})  # fmt: skip
        print(f"G {g}: {len(got)} rows, {time.perf_counter() - t0:.0f} s", flush=True)
    with open(out / "group_size.jsonl", "a") as fh:
        for r in rows:
            fh.write(json.dumps(r, default=str) + "\n")
    dense = next((r["ppl"] for r in rows if r.get("setting") == "dense"), None)
    print(f"\ndense perplexity {dense}")
    print("| G | E | τ | FFN sparsity | perplexity |\n|---|---|---|---|---|")
    for r in rows:
        if r.get("setting") == "tau":
            print(f"| {r['group_size']} | {r['n_experts']} | {r['tau']} | "
                  f"{r['sparsity']:.3f} | {r['ppl']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
