"""One PrunePath FFN layer's training cost: masked XLA vs the grouped-GEMM custom VJP.

Where does the training step's time go when the FFNs run on the grouped kernels? One layer of a
preset's shape over ``--tokens`` bf16 tokens, every token selecting exactly k experts
(k_min = k_max = k, so the FLOP fraction is exact), timed three ways:

- ``fwd``: the layer's output only;
- ``router``: value and gradient w.r.t. the input and the router (router-only training: the
  input's gradient is still needed, it carries earlier layers' routers);
- ``full``: also W_in and W_out (full training).

For each it reports the median ms, the ms of the dense SwiGLU FFN (three GEMMs, the same shape)
and, with ``--profile``, the top device kernels of one call (name, µs) so a slow path shows which
kernel is at fault.

    python benchmarks/ffn_grad.py --preset llama-3.2-1b --tokens 16384 --frac 0.25 0.5 --profile
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    GROUPED_PATHS,
    grouped_tuning,
    header,
    markdown_table,
    router_backward,
    row_emitter,
    summarize,
    time_fn,
    traced_events,
)

from prunepath_jax.config import PRESETS, PrunePathConfig  # noqa: E402
from prunepath_jax.nn import PrunePathFFN, RouteArgs  # noqa: E402

# path name -> (compute mode, the grouped GEMM's backward tuning)
PATHS = {"masked": ("masked", {}), **{n: ("kernel", tn) for n, tn in GROUPED_PATHS.items()}}
KINDS = ("fwd", "router", "full")


def layer(preset: str, frac: float):
    base = PRESETS[preset]
    e = base.d_ff // 32
    k = max(1, round(frac * e))
    cfg = base.replace(prunepath=PrunePathConfig(group_size=32, k_min=k, k_max=k))
    mlp = PrunePathFFN(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    mlp.router[...] = 0.01 * jax.random.normal(jax.random.key(1), mlp.router.shape)
    return cfg, mlp, k, e


def objective(y):
    """The scalar a step differentiates: the outputs times a fixed random cotangent, so every
    output element gets a distinct dy."""
    dy = jax.random.normal(jax.random.key(9), y.shape, y.dtype)
    return jnp.sum((y * dy).astype(jnp.float32))


def value_or_grads(kind: str, f, params, x, router: str | None = None):
    """``f(params, x)`` (``fwd``) or its gradients: w.r.t. x and ``params[router]`` only
    (``router``; x alone where there is no router), or w.r.t. x and every parameter (``full``)."""
    if kind == "fwd":
        return f(params, x)
    if kind == "full":
        return jax.grad(f, argnums=(0, 1))(params, x)
    if router is None:
        return jax.grad(f, argnums=1)(params, x)
    frozen = {n: v for n, v in params.items() if n != router}
    g = jax.grad(lambda r, x: f(type(params)({**frozen, router: r}), x), argnums=(0, 1))
    return g(params[router], x)


def layer_fn(graphdef, rest, arg):
    """The PrunePath layer as ``f(params, x_btd) -> objective``."""
    return lambda params, x_btd: objective(nnx.merge(graphdef, params, rest)(x_btd, arg)[0])


def dense_fn(w, x_td):
    """The dense SwiGLU FFN of the same shape: the GEMM floor the masked path pays in full."""
    h = jnp.einsum("td,cfd->ctf", x_td, w["w_in"])
    return objective((jax.nn.silu(h[0]) * h[1]) @ w["w_out"])


def bench(emit, preset, tokens, frac, paths, kinds, iters, profile, top, expert_groups,
          router_bwds=("split",)):  # fmt: skip
    cfg, mlp, k, e = layer(preset, frac)
    x_btd = jax.random.normal(jax.random.key(2), (1, tokens, cfg.d_model), jnp.bfloat16)
    arg = RouteArgs(jnp.float32(0.9))
    fixed = {"preset": preset, "tokens": tokens, "k": k, "e": e}
    w = {"w_in": mlp.w_in[...], "w_out": mlp.w_out[...]}
    for kind in kinds:
        fn = jax.jit(functools.partial(value_or_grads, kind, dense_fn))
        ms = time_fn(fn, w, x_btd[0], iters=iters) * 1e3
        emit({**fixed, "path": "dense", "kind": kind, "ms": ms})
    runs = [(n, "auto") for n in paths if PATHS[n][0] != "kernel"]
    runs += [(n, eg) for eg in expert_groups for n in paths if PATHS[n][0] == "kernel"]
    for rb, (name, eg) in itertools.product(router_bwds, runs):
        label = (name if eg == "auto" else f"{name}@eg{eg}") + ("" if rb == "split" else "+rbwd32")
        mode, backward = PATHS[name]
        tuning = {"expert_group": eg, **backward}
        mlp.compute = mode
        mlp.implementation = "triton" if mode == "kernel" else None
        graphdef, params, rest = nnx.split(mlp, nnx.Param, ...)
        f = layer_fn(graphdef, rest, arg)
        for kind in kinds:
            with grouped_tuning(**tuning), router_backward(rb):  # read when traced: inside
                fn = jax.jit(functools.partial(value_or_grads, kind, f, router="router"))
                ms = time_fn(fn, params, x_btd, iters=iters) * 1e3
                row = {**fixed, "path": label, "kind": kind, "ms": ms}
                if profile:
                    s = summarize(traced_events(fn, params, x_btd), 1)
                    row["busy_us"] = s.get("busy_us_per_step")
                    row["top_kernels"] = s.get("kernels", [])[:top]
            emit(row)
            for kr in row.get("top_kernels", []):
                print(f"    {kr['us_per_step']:9.1f} us  x{kr['per_step']:.0f}  {kr['name']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama-3.2-1b", choices=sorted(PRESETS))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--frac", nargs="+", type=float, default=[0.25, 0.5])
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument(
        "--expert-groups",
        nargs="+",
        type=lambda v: v if v == "auto" else int(v),
        default=["auto"],
        help="the kernel paths once per tile order (triton_group.group_by_expert; rows of "
        "another order than the shipped 'auto' are labelled path@eg<G>)",
    )
    ap.add_argument(
        "--router-bwd",
        nargs="+",
        default=["split"],
        choices=["split", "fp32"],
        help="the bf16 router logits' backward: the tensor-core split (the default) and/or the "
        "fp32 GEMMs it replaced (rows labelled path+rbwd32)",
    )
    ap.add_argument("--profile", action="store_true", help="top kernels of one call per row")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--out", default="results/ffn_grad.jsonl")
    a = ap.parse_args()
    rows, emit = row_emitter(header(), a.out)
    for frac in a.frac:
        bench(
            emit,
            a.preset,
            a.tokens,
            frac,
            a.paths,
            a.kinds,
            a.iters,
            a.profile,
            a.top,
            a.expert_groups,
            a.router_bwd,
        )
    cols = ["preset", "tokens", "k", "e", "path", "kind", "ms", "busy_us"]
    print(markdown_table(rows, cols))


if __name__ == "__main__":
    main()
