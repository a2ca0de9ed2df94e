"""One decode token's FFN on a layer shape: dense, PrunePath's expert kernels and TEAL's
masked-row kernels (``kernels/triton_teal.py``), side by side in one process.

Why: the results table compares our decode speed with TEAL's *published* figures; this times
TEAL's kind of kernel on the same GPU and shapes, at the same fractions of FFN weight bytes
skipped, so the ratio comes from one run (and ``eval/teal.py`` gives each method's quality at
that fraction).

A chain of ``n_rot`` layers with different weights in one jitted program (the next layer's
input is the RMS-normalised sum of the last one's input and output, so nothing is skipped,
L2 never holds the weights, and every layer sees inputs of the same scale), timed per layer.
TEAL's thresholds are per layer: the target quantile of the magnitudes of that layer's input
and intermediate activation over a dense pass of the same chain (calibration), so a token
reads about ``1 - target`` of the bytes; the bytes it actually had to read (its kept rows,
counted from the dense pass) give its GB/s. PrunePath's rows: the registry's batch-1 kernels
at k / E, bytes = k experts' slabs + the fp32 router. Copy bandwidth measured in the same run.

    python benchmarks/teal_decode.py --out results/teal_decode.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import copy_bandwidth, header, row_emitter, time_fn  # noqa: E402
from ffn_kernels import make_layers  # noqa: E402

from prunepath_jax.kernels import api  # noqa: E402
from prunepath_jax.kernels.triton_teal import teal_ffn_decode  # noqa: E402


def _norm(x):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32) + 1e-6)).astype(x.dtype)


def chain(kind: str, g: int, k: int, **teal_tuning):
    """``f(x [d], layers, t_l2) -> x``: the layers' FFNs one after another."""

    def f(x, layers, t_l2):
        for i, (router, w_in, w_out, w_in_dn) in enumerate(layers):
            xn = _norm(x)
            if kind == "dense":
                h = jnp.einsum("d,cfd->cf", xn, w_in, preferred_element_type=jnp.float32)
                a = (jax.nn.silu(h[0]) * h[1]).astype(x.dtype)
                y = jnp.matmul(a, w_out, preferred_element_type=jnp.float32).astype(x.dtype)
            elif kind == "teal":
                y = teal_ffn_decode(xn, w_in_dn, w_out, t_l2[i, 0], t_l2[i, 1], **teal_tuning)
            else:
                y, _ = api.sparse_ffn(xn[None], router, w_in, w_out, jnp.float32(1.0), group_size=g,
                                      k_min=k, k_max=k, implementation=kind)  # fmt: skip
                y = y[0]
            x = (x + y).astype(x.dtype)
        return x

    return jax.jit(f)


def calibrate(x, layers, targets):
    """Per-layer TEAL thresholds ``{target: [L, 2]}`` and the kept shares ``{target: (kx, ka)}``
    of the dense chain's inputs and activations (what a TEAL token reads, per layer)."""
    xs, acts = [], []
    for _, w_in, w_out, _ in layers:
        xn = _norm(x)
        h = jnp.einsum("d,cfd->cf", xn, w_in, preferred_element_type=jnp.float32)
        a = (jax.nn.silu(h[0]) * h[1]).astype(x.dtype)
        xs.append(np.abs(np.asarray(xn, np.float32)))
        acts.append(np.abs(np.asarray(a, np.float32)))
        y = jnp.matmul(a, w_out, preferred_element_type=jnp.float32).astype(x.dtype)
        x = (x + y).astype(x.dtype)
    pairs = list(zip(xs, acts, strict=True))
    t = {p: np.array([[np.quantile(xv, p), np.quantile(av, p)] for xv, av in pairs])
         for p in targets}  # fmt: skip
    kept = {p: (np.mean([np.mean(xv >= t[p][i, 0]) for i, xv in enumerate(xs)]),
                np.mean([np.mean(av >= t[p][i, 1]) for i, av in enumerate(acts)]))
            for p in targets}  # fmt: skip
    return t, kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--f", type=int, default=14336)
    ap.add_argument("--g", type=int, default=32)
    ap.add_argument("--n-rot", type=int, default=8)
    ap.add_argument("--teal", nargs="+", type=float, default=[0.25, 0.5, 0.75, 0.9])
    ap.add_argument("--teal-tunings", nargs="+",
                    default=["264:32:c", "264:64:c", "264:128:c", "264:128:m"],
                    help="programs:block_k:c|m of TEAL's GEMVs (split-K grid target, rows a "
                    "load; c: over the kept rows' index list, m: every row masked, slower at "
                    "every sparsity in the fortieth session)")  # fmt: skip
    ap.add_argument("--k-fracs", nargs="+", type=float, default=[0.1, 0.25, 0.5])
    ap.add_argument("--impls", nargs="+", default=["pallas", "triton"])
    ap.add_argument("--out", default="results/teal_decode.jsonl")
    a = ap.parse_args()
    d, f, g = a.d, a.f, a.g
    e = f // g
    dt = jnp.bfloat16
    bw = max(copy_bandwidth(2 << 30).values())
    layers = [(r, wi, wo, jnp.concatenate(list(wi), axis=0).T)
              for r, wi, wo in make_layers(a.n_rot, d, f, e, dt)]  # fmt: skip
    x = jax.random.normal(jax.random.key(0), (d,), jnp.float32).astype(dt)
    t_by_p, kept = calibrate(x, layers, a.teal)
    _, emit = row_emitter(header(), a.out, bench="teal_decode", shape=f"d{d} f{f} G{g} E{e}",
                          copy_TB_s=bw / 1e12)  # fmt: skip
    zeros = jnp.zeros((a.n_rot, 2), jnp.float32)
    t_dense = time_fn(chain("dense", g, e), x, layers, zeros, warmup=3, iters=20) / a.n_rot
    dense_bytes = 3 * f * d * 2
    gb_s = dense_bytes / t_dense / 1e9
    emit({"impl": "dense", "read_frac": 1.0, "us": t_dense * 1e6, "GB_s": gb_s,
          "pct_copy": 100 * gb_s * 1e9 / bw})  # fmt: skip
    for tuning in a.teal_tunings:
        progs, bk, *form = tuning.split(":")
        progs, bk, compacted = int(progs), int(bk), form != ["m"]
        for p in a.teal:
            kx, ka = kept[p]
            need = (2 * kx + ka) / 3 * dense_bytes
            t_l2 = jnp.asarray(t_by_p[p], jnp.float32)
            fn = chain("teal", g, e, programs=progs, block_k=bk, compacted=compacted)
            t = time_fn(fn, x, layers, t_l2, warmup=3, iters=20) / a.n_rot
            emit({"impl": "teal" if compacted else "teal_masked", "target": p,
                  "programs": progs, "block_k": bk,
                  "read_frac": need / dense_bytes, "us": t * 1e6, "GB_s": need / t / 1e9,
                  "pct_copy": 100 * need / t / bw, "speedup_vs_dense": t_dense / t})  # fmt: skip
    for impl in a.impls:
        for frac in a.k_fracs:
            k = max(1, round(frac * e))
            need = k * 3 * g * d * 2 + d * e * 4
            try:
                t = time_fn(chain(impl, g, k), x, layers, zeros, warmup=3, iters=20) / a.n_rot
            except Exception as err:  # report, keep going
                print(f"{impl} k{k}: {type(err).__name__}: {str(err)[:300]}", flush=True)
                continue
            emit({"impl": impl, "k": k, "read_frac": k / e, "us": t * 1e6,
                  "GB_s": need / t / 1e9, "pct_copy": 100 * need / t / bw,
                  "speedup_vs_dense": t_dense / t})  # fmt: skip


if __name__ == "__main__":
    main()
