"""Sparse-FFN kernels on one layer shape: decode bandwidth, launch overhead, grouped-GEMM prefill.

Decode (t = batch tokens): a chain of ``n_rot`` layers with different weights in one jitted
program (the next layer's input is the last one's output, so nothing is skipped and L2 never
holds the weights), timed per layer. Bytes that had to be read = the union of the batch's
selected experts' W_gate/W_up/W_out slabs + the fp32 router; achieved GB/s = those bytes / time,
next to the copy bandwidth measured in the same run. k is set through the real routing path:
random routers and k_min = k_max = k at tau = 1.0.

Prefill: t tokens through the grouped GEMM vs the dense XLA SwiGLU FFN and the masked XLA path.

    python benchmarks/ffn_kernels.py --impls triton pallas xla --out results/kernels.jsonl
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    copy_bandwidth,
    grouped_tuning,
    header,
    kernel_durations,
    markdown_table,
    router_logits_mode,
    time_fn,
    write_rows,
)

from prunepath_jax import routing  # noqa: E402
from prunepath_jax.kernels import api  # noqa: E402


def make_layers(n, d, f, e, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3 * n)
    out = []
    for i in range(n):
        w_in = (jax.random.normal(ks[3 * i], (2, f, d), jnp.float32) * d**-0.5).astype(dtype)
        w_out = (jax.random.normal(ks[3 * i + 1], (f, d), jnp.float32) * f**-0.5).astype(dtype)
        router = jax.random.normal(ks[3 * i + 2], (d, e), jnp.float32) * d**-0.5
        out.append((router, w_in, w_out))
    return out


def union_fraction(x_td, layers, k, e):
    fr = []
    for router, _, _ in layers:
        sel = routing.select(routing.router_logits(router, x_td), 1.0, k_min=k, k_max=k)
        fr.append(float(jnp.mean(jnp.any(sel.mask_te, axis=0))))
    return float(np.mean(fr))


def chain_fn(impl, g, k):
    def f(x, layers):
        for router, w_in, w_out in layers:
            if impl == "dense":
                h = jnp.einsum("td,cfd->tcf", x, w_in, preferred_element_type=jnp.float32)
                a = (jax.nn.silu(h[:, 0]) * h[:, 1]).astype(x.dtype)
                y = jnp.matmul(a, w_out, preferred_element_type=jnp.float32).astype(x.dtype)
            else:
                y, _ = api.sparse_ffn(x, router, w_in, w_out, jnp.float32(1.0), group_size=g,
                                      k_min=k, k_max=k, implementation=impl)  # fmt: skip
            x = (x + y).astype(x.dtype)
        return x

    return jax.jit(f)


def kernel_breakdown(fn, *args, top: int = 8) -> dict:
    """The device µs of one warm call, by kernel (the ``top`` largest, the rest summed)."""
    per = {n: sum(v) for n, v in kernel_durations(fn, *args).items()}
    ranked = sorted(per.items(), key=lambda kv: -kv[1])
    out = {n[:60]: round(us, 1) for n, us in ranked[:top]}
    out["(rest)"] = round(sum(us for _, us in ranked[top:]), 1)
    return {"device_us_total": round(sum(per.values()), 1), "kernels_us": out}


def hlo_text(fn, *args) -> str:
    """The optimized HLO XLA compiles ``fn(*args)`` to."""
    return fn.lower(*args).compile().as_text()


def launches(fn, *args) -> dict:
    txt = hlo_text(fn, *args)
    return {"custom_calls": txt.count(" custom-call("), "fusions": txt.count(" fusion(")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--f", type=int, default=14336)
    ap.add_argument("--g", type=int, default=32)
    ap.add_argument("--impls", nargs="+", default=["triton", "pallas"])
    ap.add_argument("--fractions", nargs="*", type=float, default=[0.1, 0.25, 0.5, 1.0])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--n-rot", type=int, default=8)
    ap.add_argument("--prefill-tokens", type=int, default=4096)
    ap.add_argument("--prefill-fraction", type=float, default=0.25)
    ap.add_argument(
        "--prefill-tunings",
        nargs="*",
        type=lambda v: tuple(int(x) if x.isdigit() else x for x in v.split(",")),
        default=[(64, 64, 4, 3)],
        help="block_m,block_d,warps,stages[,router_logits[,expert_group[,selection[,"
        "select_block_t,select_warps[,select_counts[,grouping[,up_form]]]]]]] per variant "
        "(router_logits "
        "shared, fp32 "
        "or bf16x3; expert_group auto or an int; selection xla or triton, the latter's launch "
        "layout, atomic or partial for its per-expert counts, and triton for the token lists "
        "by `triton_group.kernel_slots`; up_form auto, xw or wx)",
    )
    ap.add_argument(
        "--prefill-router-ab",
        action="store_true",
        help="also time the masked XLA path and the first grouped tuning with the fp32 router GEMM "
        "(what every path used before the shared tensor-core split), side by side",
    )
    ap.add_argument(
        "--prefill-trace",
        action="store_true",
        help="also record each prefill variant's per-kernel device µs (profiler trace): where the "
        "time goes between routing, grouping, the grouped up-projection and the down GEMM",
    )
    ap.add_argument("--prefill-top", type=int, default=8, help="kernels listed by --prefill-trace")
    ap.add_argument("--prefill-hlo", help="also write each prefill variant's optimized HLO here")
    ap.add_argument("--out", default="results/kernels.jsonl")
    a = ap.parse_args()
    head = header()
    impls = [i for i in a.impls if i != "pallas" or
             importlib.util.find_spec("prunepath_jax.kernels.pallas_decode")]  # fmt: skip
    bws = copy_bandwidth(2 << 30)
    bw = max(bws.values())
    print({k: f"{v / 1e12:.2f} TB/s" for k, v in bws.items()}, flush=True)
    d, f, g = a.d, a.f, a.g
    e = f // g
    dt = jnp.bfloat16
    layers = make_layers(a.n_rot, d, f, e, dt)
    slab = 3 * g * d * 2
    rows = []
    for b in a.batches if a.fractions else []:
        x = jax.random.normal(jax.random.key(b), (b, d), jnp.float32).astype(dt)
        dense = chain_fn("dense", g, e)
        t_dense = time_fn(dense, x, layers, warmup=3, iters=20) / a.n_rot
        for frac in a.fractions:
            k = max(1, round(frac * e))
            u = union_fraction(x, layers, k, e)
            need = u * e * slab + d * e * 4
            for impl in impls:
                fn = chain_fn(impl, g, k)
                try:
                    t = time_fn(fn, x, layers, warmup=3, iters=20) / a.n_rot
                    lc = launches(chain_fn(impl, g, k), x, layers[:1])
                except Exception as err:  # report, keep going
                    print(f"{impl} b{b} k{k}: {type(err).__name__}: {str(err)[:300]}", flush=True)
                    continue
                row = {**head, "bench": "decode_layer", "impl": impl, "batch": b, "k": k,
                       "k_frac": k / e, "union_frac": u, "us": t * 1e6, "dense_us": t_dense * 1e6,
                       "speedup_vs_dense": t_dense / t, "GB_s": need / t / 1e9,
                       "pct_copy_bw": 100 * need / t / bw, "copy_TB_s": bw / 1e12, **lc,
                       "shape": f"d{d} f{f} G{g} E{e}"}  # fmt: skip
                rows.append(row)
                keys = ("impl", "batch", "k", "us", "GB_s", "pct_copy_bw", "speedup_vs_dense")
                print({k_: row[k_] for k_ in keys}, row["custom_calls"], flush=True)
    # Launch overhead per layer: k = 1 at batch 1 moves ~0.4 MB of weights.
    x1 = jax.random.normal(jax.random.key(0), (1, d), jnp.float32).astype(dt)
    for impl in impls if a.fractions else []:
        try:
            t = time_fn(chain_fn(impl, g, 1), x1, layers, warmup=3, iters=20) / a.n_rot
        except Exception as err:
            print(f"{impl} k=1: {err!r}"[:300], flush=True)
            continue
        floor = (slab + d * e * 4) / bw
        rows.append({**head, "bench": "layer_overhead", "impl": impl, "batch": 1, "k": 1,
                     "us": t * 1e6, "bytes_floor_us": floor * 1e6,
                     "overhead_us": (t - floor) * 1e6, "copy_TB_s": bw / 1e12})  # fmt: skip
        print(rows[-1], flush=True)
    # Prefill: grouped GEMM vs dense.
    tp = a.prefill_tokens
    kp = max(1, round(a.prefill_fraction * e))
    xp = jax.random.normal(jax.random.key(1), (tp, d), jnp.float32).astype(dt)
    one = layers[:1]
    dense_fn = chain_fn("dense", g, e)
    t_dense = time_fn(dense_fn, xp, one, warmup=2, iters=10)
    flops = 2 * tp * 3 * f * d
    rows.append({**head, "bench": "prefill_ffn", "impl": "dense_xla", "tokens": tp, "k": e,
                 "us": t_dense * 1e6, "TFLOP_s": flops / t_dense / 1e12,
                 **(kernel_breakdown(dense_fn, xp, one) if a.prefill_trace else {})})  # fmt: skip
    print(rows[-1], flush=True)
    names = ("block_m", "block_d", "warps", "stages", "router_logits", "expert_group", "selection",
             "select_block_t", "select_warps", "select_counts", "grouping", "up_form")  # fmt: skip
    variants = [("xla", None)] + [
        ("triton", dict(zip(names, v, strict=False))) for v in a.prefill_tunings
    ]
    if a.prefill_router_ab:
        variants += [("xla", {"router_logits": "fp32"}), ("triton", {**variants[1][1],
                     "router_logits": "fp32"})]  # fmt: skip
    for impl, tn in variants:
        # each variant from the module's defaults; the XLA path's router: the shared function,
        # or (A/B) the fp32 GEMM at every size
        try:
            with (grouped_tuning(**(tn if impl == "triton" and tn else {})),
                  router_logits_mode("fp32" if impl == "xla" and tn else "shared")):  # fmt: skip
                fn = chain_fn(impl, g, kp)
                t = time_fn(fn, xp, one, warmup=2, iters=10)
                kb = kernel_breakdown(fn, xp, one, top=a.prefill_top) if a.prefill_trace else {}
                if a.prefill_hlo:
                    Path(a.prefill_hlo).mkdir(parents=True, exist_ok=True)
                    hlo = Path(a.prefill_hlo) / f"{impl}_{len(rows)}.txt"
                    hlo.write_text(hlo_text(fn, xp, one))
        except Exception as err:
            print(f"prefill {impl} {tn}: {err!r}"[:300], flush=True)
            continue
        rows.append({**head, "bench": "prefill_ffn", "impl": impl, "tokens": tp, "k": kp,
                     "k_frac": kp / e, "us": t * 1e6, "speedup_vs_dense": t_dense / t,
                     "useful_TFLOP_s": flops * kp / e / t / 1e12, "tuning": str(tn),
                     **kb})  # fmt: skip
        print(rows[-1], flush=True)
    write_rows(a.out, rows)
    cols = ["bench", "impl", "tuning", "batch", "k", "union_frac", "us", "dense_us",
            "speedup_vs_dense", "GB_s", "pct_copy_bw", "custom_calls", "fusions",
            "overhead_us"]  # fmt: skip
    print(f"\n{head['date']} commit {head['commit']} on {head['device']}; copy "
          f"{bw / 1e12:.2f} TB/s")  # fmt: skip
    print(markdown_table(rows, cols))


if __name__ == "__main__":
    main()
