"""Masked vs gathered PrunePath FFN at small batch: does reading only the selected experts pay?

One FFN layer of a given shape with a router set so every token selects exactly k experts
(k_min = k_max = k), both XLA paths jitted, median time of many calls (rotating among several
weight copies on GPU so L2 does not serve repeated reads).

    python benchmarks/ffn_paths.py --shape smollm2-135m --frac 0.1 0.25 0.5 1.0 --batch 1 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from common import header, markdown_table, time_fn, write_rows  # noqa: E402

from prunepath_jax.config import PRESETS, PrunePathConfig  # noqa: E402
from prunepath_jax.nn import PrunePathFFN, RouteArgs  # noqa: E402


def bench(shape: str, frac: float, batch: int, dtype, iters: int) -> dict:
    base = PRESETS[shape]
    e = base.d_ff // 32
    k = max(1, round(frac * e))
    cfg = base.replace(prunepath=PrunePathConfig(group_size=32, k_min=k, k_max=k))
    mlp = PrunePathFFN(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    mlp.router[...] = jax.random.normal(jax.random.key(1), mlp.router.shape)
    x = jax.random.normal(jax.random.key(2), (batch, 1, cfg.d_model), dtype)
    arg = RouteArgs(jnp.float32(1.05))
    out = {}
    for mode in ("masked", "gather"):
        mlp.compute = mode
        graphdef, state = nnx.split(mlp)
        f = jax.jit(lambda s, x, a, g=graphdef: nnx.merge(g, s)(x, a)[0])
        out[mode] = (time_fn(f, state, x, arg, warmup=3, iters=iters), f(state, x, arg))
    err = float(jnp.abs(out["masked"][1] - out["gather"][1]).max())
    t_m, t_g = out["masked"][0], out["gather"][0]
    return {"shape": shape, "batch": batch, "k": k, "E": e, "k_over_E": k / e,
            "masked_us": t_m * 1e6, "gather_us": t_g * 1e6, "speedup": t_m / t_g,
            "max_abs_diff": err}  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="+", default=["smollm2-135m"], choices=sorted(PRESETS))
    ap.add_argument("--frac", nargs="+", type=float, default=[0.1, 0.25, 0.5, 1.0])
    ap.add_argument("--batch", nargs="+", type=int, default=[1])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default="results/ffn_paths.jsonl")
    a = ap.parse_args()
    head = header()
    rows = []
    for shape in a.shape:
        for b in a.batch:
            for frac in a.frac:
                r = {**head, **bench(shape, frac, b, getattr(jnp, a.dtype), a.iters)}
                rows.append(r)
                print({k: r[k] for k in ("shape", "batch", "k", "masked_us", "gather_us")})
    write_rows(a.out, rows)
    print(f"\n{head['date']} commit {head['commit']} on {head['device']} (jax {head['jax']})")
    cols = ["shape", "batch", "k", "E", "k_over_E", "masked_us", "gather_us", "speedup",
            "max_abs_diff"]  # fmt: skip
    print(markdown_table(rows, cols))


if __name__ == "__main__":
    main()
