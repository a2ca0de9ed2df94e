"""GPU diagnosis: where do kernel-path greedy tokens or prompt logits leave the XLA path?

SmolLM2-shaped random bf16 weights, k = 12 of 48 (as tests/test_kernels_api.py). Prints, per
backend: prompt-logit error vs XLA (FFN kernels only, no cache), per-layer k_t agreement, and
greedy tokens with (FFN kernel, XLA attention), (XLA FFN, Pallas attention) and both.

    python scripts/diag_sparse_generate.py --batch 1
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

from prunepath_jax.config import PRESETS
from prunepath_jax.generate import generate
from prunepath_jax.kernels.synthetic import sparse_llama
from prunepath_jax.models.decode_attention import set_attention
from prunepath_jax.nn import route_args, set_compute


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--impls", nargs="+", default=["pallas", "triton"])
    a = ap.parse_args()
    model = sparse_llama(PRESETS["smollm2-135m"], 12, dtype=jnp.bfloat16)
    rng = np.random.default_rng(a.batch)
    prompts = [list(rng.integers(0, 49152, 5 + 3 * i)) for i in range(a.batch)]
    toks = jnp.asarray([p[:5] for p in prompts], jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(5), toks.shape)
    args = route_args(model.cfg, 1.0)
    set_compute(model, "kernel", "xla")
    out_x = model(toks, pos, ffn_args=args)
    ref = generate(model, prompts, 16, tau=1.0, implementation="xla")
    print("xla tokens", ref, flush=True)
    for impl in a.impls:
        set_compute(model, "kernel", impl)
        out_k = model(toks, pos, ffn_args=args)
        err = float(jnp.max(jnp.abs(out_k.logits - out_x.logits)))
        scale = float(jnp.max(jnp.abs(out_x.logits)))
        k_eq = [bool(jnp.all(sk.k_t == sx.k_t)) for sk, sx in
                zip(out_k.ffn_stats, out_x.ffn_stats, strict=True)]  # fmt: skip
        first_bad = k_eq.index(False) if False in k_eq else None
        print(
            f"{impl}: prompt logits max err {err:.4g} (scale {scale:.4g}); k_t equal in "
            f"{sum(k_eq)}/{len(k_eq)} layers, first differing layer {first_bad}",
            flush=True,
        )
        print(f"{impl} ffn only (xla attention)", generate(model, prompts, 16, tau=1.0), flush=True)
        set_compute(model, "kernel", "xla")
        if impl == "pallas":
            set_attention(model, "pallas")
            print("pallas attention only", generate(model, prompts, 16, tau=1.0), flush=True)
            set_attention(model, "xla")
        print(f"{impl} via generate(implementation=)",
              generate(model, prompts, 16, tau=1.0, implementation=impl), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
