"""Decode attention over a long KV cache (XLA, `models.layers.attention`) vs the bytes floor.

One decode step of one layer with Llama-3-8B's GQA (32 query heads, 8 KV heads, head_dim 128,
bf16) over 4k and 32k cached tokens at batch 1 and 8. The floor is the K and V bytes over the copy
bandwidth measured in the same run: decode attention reads the whole cache once and does ~1 FLOP
per byte, so anything above the floor is overhead (extra passes, materialised scores, poor
parallelism over a single query row). Issue 5 item 5: a split-K kernel is worth writing only if
XLA is far (> 1.5×) from this floor; on GPU the split-K Pallas kernel
(`kernels/pallas_attention.py`) is timed beside it.

Timing: n calls inside one jit on distinct queries, serialised (each waits for the previous
output: otherwise XLA's dot merger turns calls that share a cache into one batched product that
reads it once), rotating enough cache copies that their total exceeds the 50 MB L2, minus the
cost of an empty jit with n outputs.

    python benchmarks/decode_attention.py
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
from common import copy_bandwidth, header, markdown_table, time_fn, write_rows  # noqa: E402

from prunepath_jax.kernels.pallas_attention import decode_attention  # noqa: E402
from prunepath_jax.models.layers import attention  # noqa: E402


def bench(b, s, args, bw) -> list[dict]:
    h, kv, hd = args.heads, args.kv_heads, args.head_dim
    dtype = jnp.bfloat16
    kv_bytes = 2 * b * s * kv * hd * jnp.dtype(dtype).itemsize
    n_sets = max(1, min(8, math.ceil(200e6 / kv_bytes)))
    key = jax.random.key(s + b)
    caches = []
    for i in range(n_sets):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        caches.append((jax.random.normal(k1, (b, s, kv, hd), dtype),
                       jax.random.normal(k2, (b, s, kv, hd), dtype)))  # fmt: skip
    qs = jax.random.normal(jax.random.fold_in(key, 99), (args.n, b, 1, h, hd), dtype)
    allowed = jnp.ones((b, 1, s), bool)
    lengths = jnp.full((b,), s, jnp.int32)

    def make(n, impl, opts):
        def f(qs_, caches_, allowed_, lengths_):  # data as arguments, never closed over
            outs = [None]
            for j in range(n):
                q = qs_[j]
                if outs[-1] is not None:  # serialise: else XLA merges calls sharing a cache
                    q = jax.lax.optimization_barrier((q, outs[-1]))[0]
                if impl == "xla":
                    outs.append(attention(q, *caches_[j % n_sets], allowed_))
                else:
                    outs.append(decode_attention(q[:, 0], *caches_[j % n_sets], lengths_,
                                                 **opts)[:, None])  # fmt: skip
            return outs[1:]

        return jax.jit(f)

    xs = [jnp.full((16,), float(i)) for i in range(args.n)]
    t_empty = time_fn(jax.jit(lambda: [x + 1.0 for x in xs]), warmup=3, iters=20)
    data = (qs, caches, allowed, lengths)
    rows = []
    configs = [("xla", {})]
    if jax.default_backend() == "gpu":
        configs += [("pallas_split_k", {})]
    elif args.interpret:  # CPU smoke test of the kernel branch
        configs += [("pallas_split_k", {"interpret": True, "block_s": 16})]
    for impl, opts in configs:
        t = time_fn(make(args.n, impl, opts), *data, warmup=2, iters=args.iters)
        t = (t - t_empty) / args.n
        hlo = make(1, impl, opts).lower(*data).compile().as_text()
        entry = hlo[hlo.index("ENTRY") :]
        row = {
            "what": impl,
            "opts": opts,
            "batch": b,
            "ctx": s,
            "us": t * 1e6,
            "kv_MB": kv_bytes / 1e6,
            "GB_s": kv_bytes / t / 1e9,
            "kernels": entry.count(" fusion(") + entry.count("custom-call("),
            "cache_sets": n_sets,
        }
        if bw:
            row["floor_us"] = kv_bytes / bw * 1e6
            row["x_floor"] = row["us"] / row["floor_us"]
            row["copy_TB_s"] = bw / 1e12
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", nargs="+", type=int, default=[4096, 32768])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--interpret", action="store_true", help="CPU: time the kernel interpreted")
    ap.add_argument("--out", default="results/decode_attention.jsonl")
    a = ap.parse_args()
    head = header()
    bw = None
    if jax.default_backend() == "gpu":
        bws = copy_bandwidth()
        bw = max(bws.values())
        print({k: f"{v / 1e12:.3f} TB/s" for k, v in bws.items()}, flush=True)
    rows = []
    for s in a.ctx:
        for b in a.batch:
            for r in bench(b, s, a, bw):
                rows.append({**head, **r})
                write_rows(a.out, rows[-1:])
                print(rows[-1], flush=True)
    print(f"\n{head['date']} commit {head['commit']} on {head['device']} (jax {head['jax']})")
    cols = ["what", "opts", "batch", "ctx", "us", "kv_MB", "GB_s", "floor_us", "x_floor",
            "kernels"]  # fmt: skip
    print(markdown_table(rows, cols))


if __name__ == "__main__":
    main()
