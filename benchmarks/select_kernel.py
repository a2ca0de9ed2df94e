"""The prefill selection alone: `routing.select` (XLA's sort) against the Triton selection
kernel's launch layouts, device µs from a profiler trace, in one process.

Why: the grouped prefill's selection (`triton_grouped`, tuning ``selection="triton"``) ran one
token a program with 8 warps, 45.5 µs at 4096 tokens x 448 experts on an H100, ~10x the bytes it
moves (7 MB of logits in, the mask out); `triton_select.select_gates` also takes several tokens a
program (``block_t``) and other warp counts. Each row: the device µs of one call (median over
``--iters`` traced calls, every kernel of the call summed), the tokens whose expert set differs
from XLA's, and the mean k/E. Logits are N(0, scale²) with τ set so XLA's mean k/E is near
``--density`` (bisection on the first call's k).

    python benchmarks/select_kernel.py --shapes 4096x448 16384x256 --layouts 1:8 1:4 4:4 4:8
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    busy_and_span,
    header,
    markdown_table,
    row_emitter,
    traced_events,
)

from prunepath_jax import routing  # noqa: E402
from prunepath_jax.kernels.triton_select import select_gates  # noqa: E402


def tau_for_density(logits_te: jax.Array, density: float) -> float:
    """τ whose XLA selection keeps ``density`` of the experts on average (bisection)."""
    e = logits_te.shape[1]
    k_of = jax.jit(lambda x, tau: routing.select(x, tau).k_t.mean() / e)  # x an argument: a
    # closed-over array is a constant XLA would fold (sort included) at compile time
    lo, hi = 1e-4, 1.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float(k_of(logits_te, jnp.float32(mid))) < density else (lo, mid)
    return 0.5 * (lo + hi)


def device_us(fn, *args, iters: int) -> float:
    """Median over ``iters`` traced calls of the call's kernels' summed device µs."""
    return float(np.median([busy_and_span(traced_events(fn, *args))[0] for _ in range(iters)]))


def _as_mask(sel, x, tau):
    g, k = sel(x, tau)
    return g != 0, k


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["4096x448", "16384x256", "4096x48"],
                    help="TOKENSxEXPERTS")  # fmt: skip
    ap.add_argument("--layouts", nargs="+",
                    default=["1:8", "1:4", "1:2", "2:4", "4:4", "4:8", "8:8", "16:8"],
                    help="BLOCK_T:WARPS of the Triton kernel (int8 mask out)")  # fmt: skip
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default="results/select_kernel.jsonl")
    a = ap.parse_args(argv)
    rows, emit = row_emitter({**header(), "bench": "select_kernel"}, a.out)
    for shape in a.shapes:
        t, e = (int(v) for v in shape.split("x"))
        lg = a.scale * jax.random.normal(jax.random.key(0), (t, e), jnp.float32)
        tau = tau_for_density(lg, a.density)
        xla = jax.jit(lambda x, tau: routing.select(x, tau)[:2])
        m_ref, k_ref = xla(lg, tau)
        variants = {"xla": xla}
        for lay in a.layouts:
            bt, w = (int(v) for v in lay.split(":"))
            sel = functools.partial(select_gates, gate="none", block_t=bt, warps=w,
                                    out_dtype=jnp.int8)  # fmt: skip
            variants[f"triton {lay}"] = jax.jit(functools.partial(_as_mask, sel))
        for name, fn in variants.items():
            try:
                m, k = fn(lg, tau)
                us = device_us(fn, lg, tau, iters=a.iters)
            except Exception as err:  # a layout that does not compile is a row too
                emit({"shape": shape, "variant": name, "error": repr(err)[:300]})
                continue
            differ = int(jnp.sum(jnp.any(m != m_ref, axis=1)))
            emit({"shape": shape, "variant": name, "tau": tau, "us": us,
                  "tokens_differ": differ, "k_equal": bool(jnp.all(k == k_ref)),
                  "density": float(k.mean() / e), "ns_per_token": 1e3 * us / t})  # fmt: skip
    print(markdown_table(rows, ["shape", "variant", "us", "ns_per_token", "tokens_differ",
                                "k_equal", "density"]))  # fmt: skip


if __name__ == "__main__":
    main()
