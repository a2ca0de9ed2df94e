"""Pallas-Triton sparse decode FFN on one Llama-3-8B layer: µs per call and GB/s on the bytes read.

For batch 1/4/16 and k/E = 10/25/50/100% (routers random, ``k_min = k_max = k`` so every token
uses exactly k experts; at batch > 1 the union of the tokens' experts is what must be read):

* ``kernel``: the expert kernel alone (gate table precomputed) — the bytes-bound part; GB/s on
  the union's expert bytes (3·G·d per expert).
* ``layer``: the whole call (router logits, the selection kernel, the expert kernel, casts);
  GB/s on expert bytes + the fp32 router (d·E·4 bytes, read by every call).
* ``xla_dense``: the dense masked XLA FFN (the reference), for the speedup.

Timing: ``n`` independent calls inside one jit (distinct inputs, 4 weight sets of 352 MB rotated so
L2 (50 MB) cannot hold them), per-call time = (T(jit) − T(empty jit with n outputs)) / n so the
dispatch cost drops out (XLA compiles identical Triton kernels once, so n costs no compile
time). Also: the copy bandwidth of the same run, the launch cost of a chained tiny Pallas kernel,
and the per-layer cost of a 30-layer chain at the SmolLM2 shape (launch-bound), vs XLA.

    python benchmarks/pallas_decode.py                 # H200
    python benchmarks/pallas_decode.py --smoke         # CPU, interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

sys.path.insert(0, str(Path(__file__).parent))
from common import copy_bandwidth, header, markdown_table, time_fn, write_rows  # noqa: E402

from prunepath_jax import routing  # noqa: E402
from prunepath_jax.kernels import pallas_decode as pd  # noqa: E402

try:
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None


def per_call(make, n, iters, t_empty, data):
    """Seconds per call of a jit built by ``make(n)`` that runs n calls on ``data`` (passed as
    arguments, never closed over: closed-over arrays would become HLO constants), less the fixed
    cost of dispatching a jit with n trivial outputs (``t_empty``, measured once)."""
    return max(time_fn(make(n), data, warmup=2, iters=iters) - t_empty, 1e-9) / n


def after(x, prev):
    """``x``, but only once ``prev`` exists: serialises the n calls of a timed jit as layers are
    (and stops XLA's dot merger from fusing calls that share a weight set into one GEMM)."""
    if prev is None:
        return x
    return jax.lax.optimization_barrier((x, prev))[0]


def empty_jit_time(n, iters) -> float:
    """Dispatch + sync cost of a jit with n tiny outputs (subtracted from every timing)."""
    xs = [jnp.full((16,), float(i)) for i in range(n)]
    f = jax.jit(lambda: [x + 1.0 for x in xs])
    return time_fn(f, warmup=3, iters=iters)


def kernel_launches(fn, *args) -> dict:
    """Kernel-like ops in the optimised HLO of one call (what a decode step launches per layer)."""
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    entry = hlo[hlo.index("ENTRY") :]
    pats = {
        "fusion": r"\bfusion\(",
        "custom-call": r"custom-call\(",
        "sort": r"\bsort\(",
        "scatter": r"\bscatter\(",
        "dot": r"\bdot\(",
    }
    return {k: len(re.findall(p, entry)) for k, p in pats.items()}


class Layer:
    """R weight sets of one layer shape, and the inputs for n distinct calls."""

    def __init__(self, d, f, g, dtype, n_sets, seed=0):
        self.d, self.f, self.g, self.e = d, f, g, f // g
        key = jax.random.key(seed)
        self.sets = []
        for i in range(n_sets):
            k = jax.random.split(jax.random.fold_in(key, i), 3)
            self.sets.append(
                (
                    jax.random.normal(k[0], (d, self.e), jnp.float32) * 0.02,
                    (jax.random.normal(k[1], (2, f, d), jnp.float32) * d**-0.5).astype(dtype),
                    (jax.random.normal(k[2], (f, d), jnp.float32) * f**-0.5).astype(dtype),
                )
            )
        self.dtype = dtype

    def xs(self, n, t, seed=1):
        k = jax.random.key(seed)
        return jax.random.normal(k, (n, t, self.d), jnp.float32).astype(self.dtype)


def bench_shape(lay, t, kfrac, tuning, args, what=("kernel", "layer")) -> list[dict]:
    """Rows for one (batch, k) point."""
    e, g, d = lay.e, lay.g, lay.d
    k = max(1, round(kfrac * e))
    tau = jnp.float32(1.05)
    rkw = {"rule": "paper", "gate": "sigmoid", "k_min": k, "k_max": k}
    r_sets = len(lay.sets)
    xs = lay.xs(args.n, t)
    # Union sizes (what must be read) per call, from the reference routing.
    unions = []
    gate_tabs = []
    plan = pd._plan(t, d, g, lay.dtype, dict(tuning))
    ep = max(pd._next_pow2(e), 16)
    for j in range(args.n):
        r, _, _ = lay.sets[j % r_sets]
        gte, _ = pd.route_gates(xs[j], r, tau, **rkw)
        unions.append(int(jnp.sum(jnp.any(gte != 0, axis=0))))
        gate_tabs.append(jnp.zeros((plan["tp"], ep), jnp.float32).at[:t, :e].set(gte))
    u = float(np.mean(unions))
    expert_bytes = u * 3 * g * d * jnp.dtype(lay.dtype).itemsize
    router_bytes = d * e * 4
    rows = []
    base = {"batch": t, "k": k, "k_frac": kfrac, "union": u, "union_frac": u / e,
            "tuning": dict(tuning)}  # fmt: skip
    if "kernel" in what:
        x_p = [
            xs[j]
            if t in (1, plan["tp"])
            else jnp.zeros((plan["tp"], d), lay.dtype).at[:t].set(xs[j])
            for j in range(args.n)
        ]

        def make_k(n):
            def f(data):
                sets, gts, xps = data
                outs = [None]
                for j in range(n):
                    _, wi, wo = sets[j % r_sets]
                    outs.append(pd.expert_ffn(
                        gts[j], after(xps[j], outs[-1]), wi, wo, t=t, group_size=g,
                        n_slots=min(e, t * k), plan=plan, interpret=args.interpret,
                    ))  # fmt: skip
                return outs[1:]

            return jax.jit(f)

        s = per_call(make_k, args.n, args.iters, args.t_empty, (lay.sets, gate_tabs, x_p))
        rows.append({**base, "what": "kernel", "us": s * 1e6, "MB_read": expert_bytes / 1e6,
                     "GB_s": expert_bytes / s / 1e9})  # fmt: skip
    if "layer" in what:

        def make_l(n):
            def f(data):
                sets, xs_, tau_ = data
                outs = [None]
                for j in range(n):
                    r, wi, wo = sets[j % r_sets]
                    outs.append(pd.sparse_ffn_decode(
                        after(xs_[j], outs[-1]), r, wi, wo, tau_, group_size=g,
                        interpret=args.interpret, **rkw, **tuning,
                    )[0])  # fmt: skip
                return outs[1:]

            return jax.jit(f)

        s = per_call(make_l, args.n, args.iters, args.t_empty, (lay.sets, xs, tau))
        nb = expert_bytes + router_bytes
        launches = None if kfrac != 0.25 else kernel_launches(
            lambda x, w, tau_: pd.sparse_ffn_decode(x, *w, tau_, group_size=g,
                                                   interpret=args.interpret, **rkw, **tuning),
            xs[0], lay.sets[0], tau,
        )  # fmt: skip
        rows.append({**base, "what": "layer", "us": s * 1e6, "MB_read": nb / 1e6,
                     "GB_s": nb / s / 1e9, "hlo_ops": launches})  # fmt: skip
    return rows


def bench_dense(lay, t, args) -> dict:
    """The dense masked XLA FFN (every expert, gate 1): what a non-sparse decode reads."""
    r_sets = len(lay.sets)
    xs = lay.xs(args.n, t, seed=2)

    def make(n):
        def f(data):
            sets, xs_ = data
            outs = [None]
            for j in range(n):
                _, wi, wo = sets[j % r_sets]
                h = jnp.einsum("td,cfd->tcf", after(xs_[j], outs[-1]), wi)
                outs.append((jax.nn.silu(h[:, 0]) * h[:, 1]) @ wo)
            return outs[1:]

        return jax.jit(f)

    s = per_call(make, args.n, args.iters, args.t_empty, (lay.sets, xs))
    nb = 3 * lay.f * lay.d * jnp.dtype(lay.dtype).itemsize
    return {"batch": t, "what": "xla_dense", "k": lay.e, "k_frac": 1.0, "union": lay.e,
            "union_frac": 1.0, "us": s * 1e6, "MB_read": nb / 1e6,
            "GB_s": nb / s / 1e9}  # fmt: skip


def breakdown(lay, t, kfrac, args) -> list[dict]:
    """µs per call of each piece of one layer (serialised chains of n calls): the router logits
    (XLA), the selection kernel, XLA's selection (the reference's ops), the expert kernel, and
    the whole layer with either selection."""
    from prunepath_jax.kernels.pallas_logits import router_logits_pallas
    from prunepath_jax.kernels.pallas_routing import route_gates_pallas

    e, g, d = lay.e, lay.g, lay.d
    k = max(1, round(kfrac * e))
    rkw = {"rule": "paper", "gate": "sigmoid", "k_min": k, "k_max": k}
    plan = pd._plan(t, d, g, lay.dtype, {})
    tp, ep = plan["tp"], max(pd._next_pow2(e), 16)
    xs = lay.xs(args.n, t, seed=4)
    tau = jnp.float32(1.05)
    r_sets = len(lay.sets)

    def chain(piece):
        def f(sets, xs_, tau_):
            outs = [None]
            for j in range(args.n):
                r, wi, wo = sets[j % r_sets]
                x = after(xs_[j], outs[-1])
                if piece == "logits_pallas":  # the split-K kernel (+ its XLA sum)
                    xp = x if tp == t else jnp.zeros((tp, d), x.dtype).at[:t].set(x)
                    outs.append(router_logits_pallas(xp, r, interpret=args.interpret))
                    continue
                lg = routing.router_logits(r, x)
                if piece == "logits":
                    out = lg
                elif piece == "select_pallas":
                    out = route_gates_pallas(
                        lg, tau_, tp=tp, ep=ep, interpret=args.interpret, **rkw
                    )[0]
                elif piece == "select_xla":
                    sel = routing.select(lg, tau_, k_min=k, k_max=k)
                    out = routing.gates(lg, sel.mask_te)
                elif piece == "experts":
                    gt = (
                        jnp.zeros((tp, ep), jnp.float32)
                        .at[:t, :e]
                        .set(jax.lax.stop_gradient(jax.nn.one_hot(jnp.arange(k), e).max(0) * 0.5))
                    )
                    out = pd.expert_ffn(gt, x if t in (1, tp) else jnp.zeros((tp, d), x.dtype),
                                        wi, wo, t=t, group_size=g, n_slots=min(e, t * k),
                                        plan=plan, interpret=args.interpret)  # fmt: skip
                else:
                    out = pd.sparse_ffn_decode(x, r, wi, wo, tau_, group_size=g,
                                               interpret=args.interpret, **LAYERS[piece],
                                               **rkw)[0]  # fmt: skip
                outs.append(out)
            return outs[1:]

        return jax.jit(f)

    rows = []
    pieces = ["logits", "logits_pallas", "select_pallas", "select_xla", "experts", *LAYERS]
    for piece in pieces:
        tt = time_fn(chain(piece), lay.sets, xs, tau, warmup=2, iters=args.iters)
        us = max(tt - args.t_empty, 0.0) / args.n * 1e6
        rows.append({"what": f"breakdown_{piece}", "batch": t, "k": k, "us": us})
    return rows


# Whole-layer variants of the breakdown: Pallas logits + selection (the default), XLA logits +
# Pallas selection, XLA logits + XLA selection.
LAYERS = {
    "layer_pallas": {},
    "layer_pallas_xla_logits": {"logits": "xla"},
    "layer_xla": {"routing": "xla"},
}


def launch_overhead(args) -> list[dict]:
    """µs per extra launch: a chain of n tiny dependent Pallas-Triton kernels in one jit; and the
    per-layer time of a 30-layer chain of the whole sparse FFN at the SmolLM2 shape (d 576,
    f 1536, G 32, bf16, k = 25%) vs the XLA reference (masked) and dense paths."""
    rows = []

    def tiny(x):
        def k(x_ref, o_ref):
            o_ref[...] = x_ref[...] * 1.0001 + 1.0

        return pl.pallas_call(
            k, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=args.interpret,
            compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        )(x)  # fmt: skip

    def make_tiny(n):
        def f(x):
            for _ in range(n):
                x = tiny(x)
            return x

        return jax.jit(f)

    x = jnp.ones((128,), jnp.float32)
    f1, f2 = make_tiny(1), make_tiny(101)
    t1, t2 = time_fn(f1, x, iters=args.iters), time_fn(f2, x, iters=args.iters)
    rows.append({"what": "pallas_tiny_launch", "us_per_launch": (t2 - t1) / 100 * 1e6})

    d, f, g = 576, 1536, 32
    lay = Layer(d, f, g, jnp.bfloat16, n_sets=30, seed=5)
    e = lay.e
    k = e // 4
    tau = jnp.float32(1.05)
    x0 = lay.xs(1, 1)[0]

    def chain(kind, n_layers):
        def f(x, sets):
            for i in range(n_layers):
                r, wi, wo = sets[i]
                if kind == "pallas":
                    y, _ = pd.sparse_ffn_decode(x, r, wi, wo, tau, group_size=g, k_min=k,
                                                k_max=k, interpret=args.interpret)  # fmt: skip
                elif kind == "xla_masked":
                    lg = routing.router_logits(r, x)
                    sel = routing.select(lg, tau, k_min=k, k_max=k)
                    gt = routing.gates(lg, sel.mask_te)
                    h = jnp.einsum("td,cfd->tcf", x, wi)
                    a = jax.nn.silu(h[:, 0]) * h[:, 1] * jnp.repeat(gt, g, -1).astype(x.dtype)
                    y = a @ wo
                else:
                    h = jnp.einsum("td,cfd->tcf", x, wi)
                    y = (jax.nn.silu(h[:, 0]) * h[:, 1]) @ wo
                x = x + y
            return x

        return jax.jit(f)

    for kind in ("pallas", "xla_masked", "xla_dense"):
        ta = time_fn(chain(kind, 2), x0, lay.sets, iters=args.iters)
        tb = time_fn(chain(kind, 30), x0, lay.sets, iters=args.iters)
        rows.append({"what": f"smollm2_layer_{kind}", "us_per_layer": (tb - ta) / 28 * 1e6,
                     "n_layers": 30, "k": k, "e": e})  # fmt: skip
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in the interpreter (CPU)")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--kfrac", nargs="+", type=float, default=[0.1, 0.25, 0.5, 1.0])
    ap.add_argument("--n", type=int, default=16, help="calls per timed jit")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--sweep", action="store_true", help="tuning sweep at batch 1 and 4 first")
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--out", default="results/pallas_decode.jsonl")
    ap.add_argument("--best-out", help="write the sweep's best tuning per batch here (JSON)")
    a = ap.parse_args()
    a.interpret = a.smoke
    head = header()
    rows = []
    bw = None
    if jax.default_backend() == "gpu":
        bws = copy_bandwidth()
        bw = max(bws.values())
        print({k: f"{v / 1e12:.3f} TB/s" for k, v in bws.items()}, flush=True)
    if a.smoke:
        d, f, g, n_sets = 64, 256, 32, 2
        a.n, a.iters = 2, 1
    else:
        d, f, g, n_sets = 4096, 14336, 32, 4
    t0 = time.time()
    a.t_empty = empty_jit_time(a.n, 20)
    print(f"empty jit with {a.n} outputs: {a.t_empty * 1e6:.1f} us", flush=True)
    lay = Layer(d, f, g, jnp.bfloat16, n_sets)
    best = {}
    if a.sweep:
        grid = {
            # one token: the default (dots on 16 padded rows + atomic down) against the
            # pre-activation form with the up-projection split over d (shorter chains of
            # dependent loads per program, more programs); {} again last to gauge drift.
            1: [{}, {"use_dot": False},
                *({"down": "preact", "up_splits": u, "block_d_down": 512, "down_chunks": 32}
                  for u in (1, 2, 4, 8)),
                {"down": "preact", "up_splits": 4, "block_d_down": 256, "down_chunks": 16},
                {"down": "preact", "up_splits": 4, "block_d_down": 1024, "down_chunks": 64},
                {"down": "preact", "up_splits": 8, "block_d": 256, "block_d_down": 512,
                 "down_chunks": 32},
                {}],
            4: [{}, {"down": "preact", "up_splits": 2, "down_chunks": 16, "block_d_down": 256},
                {"down": "preact", "up_splits": 4, "down_chunks": 16, "block_d_down": 256}],
        }  # fmt: skip
        for t, configs in grid.items():
            if t not in a.batch:
                continue
            scored = []
            for tun in configs:
                total = 0.0
                for kf in (0.1, 0.25):  # low k (latency-bound) and the 75%-sparsity point
                    try:
                        r = bench_shape(lay, t, kf, tun, a, what=("kernel",))[0]
                    except Exception as err:  # a config that fails to compile is a result too
                        r = {"batch": t, "what": "kernel", "tuning": tun,
                             "error": repr(err)[:300]}  # fmt: skip
                    r["sweep"] = True
                    rows.append({**head, **r})
                    write_rows(a.out, rows[-1:])  # row by row: a timeout keeps what was measured
                    print(r, flush=True)
                    total = total + r["us"] if "us" in r else float("inf")
                scored.append((total, tun))
            best[t] = min(scored, key=lambda s: s[0])[1]
        print("best tuning:", best, flush=True)
        pd.TUNING_OVERRIDES.update(best)  # the breakdown's layers run the winners too
        if a.best_out:
            Path(a.best_out).write_text(json.dumps({str(k): v for k, v in best.items()}))
    for t in a.batch:
        for kf in a.kfrac:
            for r in bench_shape(lay, t, kf, best.get(t, {}), a):
                if bw:
                    r["copy_TB_s"] = bw / 1e12
                    r["frac_of_copy"] = r["GB_s"] * 1e9 / bw
                rows.append({**head, **r})
                write_rows(a.out, rows[-1:])
                print(r, flush=True)
        r = bench_dense(lay, t, a)
        if bw:
            r["copy_TB_s"] = bw / 1e12
            r["frac_of_copy"] = r["GB_s"] * 1e9 / bw
        rows.append({**head, **r})
        write_rows(a.out, rows[-1:])
        print(r, flush=True)
    if not a.no_breakdown:
        for t_b in a.batch[:1]:
            for r in breakdown(lay, t_b, a.kfrac[0], a):
                rows.append({**head, **r})
                write_rows(a.out, rows[-1:])
                print(r, flush=True)
    del lay
    for r in launch_overhead(a):
        rows.append({**head, **r})
        write_rows(a.out, rows[-1:])
        print(r, flush=True)
    print(f"total {time.time() - t0:.0f}s", flush=True)
    cols = ["what", "batch", "k", "union", "us", "MB_read", "GB_s", "frac_of_copy", "tuning"]
    print(f"\n{head['date']} commit {head['commit']} on {head['device']} (jax {head['jax']})")
    if bw:
        print(f"copy bandwidth {bw / 1e12:.3f} TB/s")
    print(markdown_table([r for r in rows if "us" in r and not r.get("sweep")], cols))
    print(markdown_table([r for r in rows if r.get("sweep")], cols))
    print(markdown_table([r for r in rows if "us" not in r and "error" not in r],
                         ["what", "us_per_launch", "us_per_layer"]))  # fmt: skip


if __name__ == "__main__":
    main()
