"""One-token attention projections: the Pallas projection kernel vs XLA, device time per call.

Each case is a decode layer's QKV projection (RMSNorm fused in the kernel; XLA: `rms_norm` then
`Dense`) or O projection (residual add fused; XLA: `Dense` then the add) at the Llama-3.2-1B and
Llama-3-8B shapes. A chain of calls over 8 weight sets (more bytes than the 50 MB L2, so weights
come from HBM as in a decode step) runs in one jit; every kernel's device time comes from a
``jax.profiler`` trace (the XLA rows include their small fusions, which is what the kernel
removes), wall time per call from the clock. Results are rows in a JSON-lines file. A variant
with ``"w_layout": "nd"`` passes the weights transposed (``[n, d]``, transposed before timing).

    python3 benchmarks/proj_gemv.py --out results/proj_gemv.jsonl \
        --variants '{"bn16": {"block_n": 16, "block_d": 256}}'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
from common import copy_bandwidth, header, kernel_durations, time_fn, write_rows  # noqa: E402

from prunepath_jax.kernels.pallas_proj import projection  # noqa: E402
from prunepath_jax.models.layers import matvec_safe_matmul, rms_norm  # noqa: E402

SHAPES = {  # name: (d, n_qkv, n_heads·head_dim)
    "llama-3.2-1b": (2048, 3072, 2048),
    "llama-3-8b": (4096, 6144, 4096),
}
N_SETS = 8


def _chain(kind: str, tuning: dict | None):
    """A jitted chain of N_SETS projections; ``tuning`` None: the XLA path."""

    def one(x, w, nw, r):
        if tuning is None:
            if kind == "qkv":
                return matvec_safe_matmul(rms_norm(x, nw, 1e-5), w)
            return r + matvec_safe_matmul(x, w)
        tn = {k: v for k, v in tuning.items() if k != "w_layout"}
        lay = tuning.get("w_layout", "dn")
        if kind == "qkv":
            return projection(x, w, norm=(nw, 1e-5), tuning=tn, w_layout=lay)
        return projection(x, w, resid_tn=r, tuning=tn, w_layout=lay)

    return jax.jit(lambda xs, ws, nws, rs: [one(*a) for a in zip(xs, ws, nws, rs, strict=True)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--variants", default="{}", help="JSON {label: tuning} besides the default")
    ap.add_argument("--out", default="results/proj_gemv.jsonl")
    ap.add_argument("--best-out", help="write the variant with the least total device time")
    a = ap.parse_args()
    total: dict[str, float] = {}
    variants = {"xla": None, "kernel_nd": {"w_layout": "nd"}, "kernel_dn": {},
                **json.loads(a.variants)}  # fmt: skip
    bw = max(copy_bandwidth(2 << 30).values())
    head = {**header(), "copy_TB_s": bw / 1e12, "batch": a.batch}
    for shape in a.shapes:
        d, n_qkv, n_o_in = SHAPES[shape]
        for kind, (din, n) in (("qkv", (d, n_qkv)), ("o", (n_o_in, d))):
            keys = jax.random.split(jax.random.key(din + n), 4)
            bf = jnp.bfloat16
            ws = [jax.random.normal(k, (din, n), bf) * din**-0.5
                  for k in jax.random.split(keys[0], N_SETS)]  # fmt: skip
            xs = [jax.random.normal(k, (a.batch, din), bf)
                  for k in jax.random.split(keys[1], N_SETS)]  # fmt: skip
            nws = [jnp.ones((din,), bf)] * N_SETS
            rs = [jax.random.normal(k, (a.batch, n), bf)
                  for k in jax.random.split(keys[2], N_SETS)]  # fmt: skip
            ref = _chain(kind, None)(xs, ws, nws, rs)
            ws_nd = None
            for label, tuning in variants.items():
                fn = _chain(kind, tuning)
                w_in = ws
                if (tuning or {}).get("w_layout") == "nd":  # transposed once, outside the timing
                    ws_nd = ws_nd or [jnp.asarray(w.T) for w in ws]
                    w_in = ws_nd
                out = fn(xs, w_in, nws, rs)
                err = max(float(jnp.max(jnp.abs(o.astype(jnp.float32) - e.astype(jnp.float32))))
                          for o, e in zip(out, ref, strict=True))  # fmt: skip
                wall = time_fn(fn, xs, w_in, nws, rs, warmup=3, iters=20) / N_SETS
                durs = kernel_durations(fn, xs, w_in, nws, rs)
                dev = sum(sum(v) for v in durs.values()) / N_SETS
                w_bytes = din * n * 2
                row = {**head, "shape": shape, "proj": kind, "variant": label,
                       "tuning": tuning, "device_us": dev, "wall_us": wall * 1e6,
                       "launches": sum(len(v) for v in durs.values()) / N_SETS,
                       "weight_TB_s": w_bytes / (dev * 1e-6) / 1e12, "max_abs_vs_xla": err,
                       "kernels": {k: sum(v) / N_SETS for k, v in durs.items()}}  # fmt: skip
                write_rows(a.out, [row])
                total[label] = total.get(label, 0.0) + dev
                print(f"{shape} {kind} {label}: device {dev:.2f} us ({row['weight_TB_s']:.2f} "
                      f"TB/s), wall {wall * 1e6:.2f} us, launches {row['launches']:.1f}, "
                      f"err {err:.3g}", flush=True)  # fmt: skip

    best = min((lab for lab in total if lab != "xla"), key=total.get)
    print(f"total device us per layer (QKV + O, summed over shapes): {total}; best {best}")
    if a.best_out:
        Path(a.best_out).write_text(json.dumps({"w_layout": "dn", **variants[best]}))


if __name__ == "__main__":
    main()
