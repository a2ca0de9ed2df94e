"""Weights before the barrier in one persistent kernel: is a decode megakernel worth building?

Why. Every lever inside XLA-launched kernels has been measured (BENCHMARKS.md, sessions 12-16):
the decode step's ~10 launches a layer each pay a chain of dependent round trips, XLA starts no
kernel before its predecessor ends, and a grid barrier inside one launch costs about what a
kernel boundary does (13th session) -- when the work after the barrier still has to fetch its
weights. What no measurement has covered is the one thing only a persistent kernel can do:
issue the *next* phase's weight loads before waiting at the barrier, so weight streaming
overlaps the barrier and the activations' round trip. This probe measures exactly that on the
simplest chain with the decode step's dependency shape: L dependent GEMVs ``y_l = W_l y_(l-1)``
(``W_l`` ``[D, D]`` bf16, one token), as

* ``xla``: one XLA GEMV per phase, the model's own form (`matvec_safe_matmul`, bf16 activations:
  XLA's GEMM and its split-K reduction, 1-2 launches a phase, as the decode step's projections);
* ``mega``: one Triton launch for all L phases; each of P programs owns ``D / P`` output rows,
  a grid barrier (one counter, release/acquire at GPU scope) separates the phases, and the
  program loads its rows of ``W_l`` only after the barrier;
* ``mega_prefetch``: the same, but the program issues the loads of its rows of ``W_(l+1)``
  right after its arrival at barrier l, so they are in flight while it waits there (after the
  arrival, because the release fence before it would otherwise wait for them).

A program holds ``D / P`` rows by ``block_k`` columns of a phase's weights in registers at once
(64 KB at D 2048 over 128 programs); at D 4096 it walks the row in chunks, and the prefetch
covers only the first chunk. The counter starts at zero (jax-triton's
memset); a program that polls ``SPIN`` times without the barrier opening gives up and reports it
(the ``fail`` output), so a scheduling surprise cannot hang the GPU.

    python scripts/megakernel_probe.py --d 2048 --layers 32 --out results/megakernel.jsonl

Measured (H200, BENCHMARKS.md seventeenth session): with the prefetch a phase costs ~1.3-1.5 µs
above its bytes (2 µs at d 4096), against XLA's 1.8-5.2 µs per GEMV phase at d 256-2048.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import (  # noqa: E402
    busy_and_span,
    copy_bandwidth,
    header,
    time_fn,
    traced_events,
    write_rows,
)

from prunepath_jax.kernels import jt  # noqa: E402
from prunepath_jax.kernels.triton_grid import _arrive, _wait  # noqa: E402
from prunepath_jax.models.layers import matvec_safe_matmul  # noqa: E402

SPIN = 200_000  # polls before a program gives up on a barrier (41-45 ms on the H200)


@triton.jit
def _x_chunk(x_ptr, y_ptr, layer, off, D: tl.constexpr):
    """Phase ``layer``'s input at columns ``off``: x for phase 0, else phase layer-1's output
    (read past L1: other SMs wrote it)."""
    if layer == 0:
        xv = tl.load(x_ptr + off)
    else:
        xv = tl.load(y_ptr + (layer - 1) * D + off, cache_modifier=".cg")
    return xv


@triton.jit
def _chain_kernel(
    x_ptr,  # [D] f32 input of phase 0
    w_ptr,  # [L, D, D] bf16 weights, output-row-major
    y_ptr,  # out [L, D] f32: every phase's output (the next phase's input); zeroed, so a read
    # past a failed barrier sees zeros, not a stale buffer's (possibly right) values
    ctr_ptr,  # out [1] i32 barrier counter (zeroed by jax-triton)
    fail_ptr,  # out [P] i32: 1 where the program gave up on a barrier
    L: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
    P: tl.constexpr, PREFETCH: tl.constexpr, SPIN: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rr = pid * ROWS + tl.arange(0, ROWS)
    rk = tl.arange(0, BLOCK_K)
    wp = w_ptr + rr[:, None] * D + rk[None, :]  # this program's rows, first column chunk
    w = tl.load(wp)  # phase 0's first chunk
    failed = pid * 0
    for layer in range(L):
        if layer > 0:
            # Barrier: every program has stored phase layer-1 (P arrivals per phase).
            failed = _wait(ctr_ptr, P * layer, failed, SPIN)
            if not PREFETCH:
                w = tl.load(wp + layer * D * D)
        y = tl.sum(w.to(tl.float32) * _x_chunk(x_ptr, y_ptr, layer, rk, D)[None, :], axis=1)
        for c in tl.static_range(1, D // BLOCK_K):  # the rest of the rows, after the barrier
            wc = tl.load(wp + layer * D * D + c * BLOCK_K)
            xc = _x_chunk(x_ptr, y_ptr, layer, c * BLOCK_K + rk, D)
            y += tl.sum(wc.to(tl.float32) * xc[None, :], axis=1)
        tl.store(y_ptr + layer * D + rr, y)
        _arrive(ctr_ptr)  # all of this program's stores issued, then the release add
        # After the arrival, not before: the release's fence (MEMBAR.GPU) would wait for these.
        if PREFETCH:  # the next phase's first chunk, in flight during the next barrier's wait
            w = tl.load(wp + tl.minimum(layer + 1, L - 1) * D * D)
    tl.store(fail_ptr + pid, failed)


def megakernel_chain(
    x_d: jax.Array, w_ldd: jax.Array, *, programs: int, prefetch: bool, block_k: int | None = None,
    warps: int = 8, spin: int = SPIN, interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """All L phases in one launch: ``(y_ld f32, fail_p i32)``. ``block_k``: columns a program
    holds at once (default all of them); with prefetch only the first ``block_k`` columns of the
    next phase are loaded before the wait."""
    n_layers, d, d2 = w_ldd.shape
    block_k = d if block_k is None else block_k
    rows = d // programs if programs else 0

    def pow2(n):
        return n > 0 and not n & (n - 1)

    if d != d2 or d % programs or not (pow2(rows) and pow2(d) and pow2(block_k)) or d % block_k:
        raise ValueError(
            f"need square power-of-2 layers split evenly over {programs} programs and into "
            f"{block_k}-column chunks: {w_ldd.shape}"
        )
    y, _, fail = jt.triton_call(
        _chain_kernel, x_d.astype(jnp.float32), w_ldd,
        out_shape=[jax.ShapeDtypeStruct((n_layers, d), jnp.float32),
                   jax.ShapeDtypeStruct((1,), jnp.int32),
                   jax.ShapeDtypeStruct((programs,), jnp.int32)],
        zeroed_outputs=(0, 1), grid=(programs,), num_warps=warps, num_stages=1,
        interpret=interpret, L=n_layers, D=d, ROWS=rows, BLOCK_K=block_k, P=programs,
        PREFETCH=bool(prefetch), SPIN=spin,
    )  # fmt: skip
    return y, fail


def xla_chain(x_d: jax.Array, w_t_ldd: jax.Array) -> jax.Array:
    """The model's form: bf16 activations, one XLA GEMV per phase (``w_t`` is ``[L, in, out]``)."""
    x = x_d.astype(jnp.bfloat16)[None, :]
    for layer in range(w_t_ldd.shape[0]):
        x = matvec_safe_matmul(x, w_t_ldd[layer])
    return x[0]


def reference_chain(x_d: jax.Array, w_ldd: jax.Array) -> jax.Array:
    """fp32 chain (bf16 weights): the megakernel's math, for the correctness check."""
    ys, x = [], x_d.astype(jnp.float32)
    for layer in range(w_ldd.shape[0]):
        x = jnp.dot(w_ldd[layer].astype(jnp.float32), x, precision=jax.lax.Precision.HIGHEST)
        ys.append(x)
    return jnp.stack(ys)


def device_span(fn, *args, log_dir: str = "/tmp/megakernel_trace") -> tuple[float, float, int]:
    """``(busy µs, span µs, kernels)`` of one call from a profiler trace: the kernels' own
    durations summed, and first start to last end (what the chain takes on the device, launch
    gaps included, host dispatch excluded), without the memsets of the barrier counter."""
    ev = traced_events(fn, *args, log_dir=log_dir)
    ev = [e for e in ev if "memset" not in e["name"].lower()]
    return (*busy_and_span(ev), len(ev))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, nargs="+", default=[2048])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--programs", type=int, nargs="+", default=[128])
    ap.add_argument("--warps", type=int, default=8)
    ap.add_argument("--block-k", type=int, default=2048, help="columns held at once (≤ d)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="results/megakernel.jsonl")
    a = ap.parse_args()
    head = {**header(), "bench": "megakernel_probe", "layers": a.layers}
    bw = max(copy_bandwidth().values())
    rows = []
    for d in a.d:
        kx, kw = jax.random.split(jax.random.key(d))
        w = (jax.random.normal(kw, (a.layers, d, d)) * d**-0.5).astype(jnp.bfloat16)
        w_t = jnp.swapaxes(w, 1, 2).copy()
        x = jax.random.normal(kx, (d,), jnp.float32)
        want = reference_chain(x, w)
        bytes_phase = d * d * 2
        fns = {"xla": (jax.jit(xla_chain), (x, w_t))}
        bk = min(a.block_k, d)
        for p in a.programs:
            for v in ("mega", "mega_prefetch"):
                f = jax.jit(lambda x, w, p=p, v=v, bk=bk: megakernel_chain(
                    x, w, programs=p, prefetch=v == "mega_prefetch", block_k=bk,
                    warps=a.warps))  # fmt: skip
                fns[f"{v}_p{p}"] = (f, (x, w))
        rows += chain_rows(fns, want, {**head, "d": d}, a.layers, bytes_phase, bw, a.iters)
    write_rows(a.out, rows)


def chain_rows(fns: dict, want, head: dict, layers: int, bytes_phase: int, bw: float,
               iters: int, catch: bool = False) -> list[dict]:  # fmt: skip
    """Runs, checks and times every chain variant ``{name: (jitted fn, args)}``: one row each
    (µs a phase from the device span, % of copy, error against the float32 chain ``want``,
    programs that gave up on a barrier). ``xla`` returns the last phase only, the others
    ``(y_ld, fail_p)``. ``catch``: a variant that does not compile or launch prints its error
    and is skipped (probes of experimental kernels), instead of stopping the run."""
    rows = []
    for name, (fn, args) in fns.items():
        try:
            out = jax.block_until_ready(fn(*args))
        except Exception as err:
            if not catch:
                raise
            print({**{k: head[k] for k in ("d",) if k in head}, "variant": name,
                   "error": repr(err)[:400]}, flush=True)  # fmt: skip
            continue
        if name == "xla":
            got, fails = np.asarray(out, np.float32), 0
            err = float(np.max(np.abs(got - want[-1])) / np.max(np.abs(want[-1])))
        else:
            got, fails = np.asarray(out[0]), int(np.asarray(out[1]).sum())
            err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        t = time_fn(fn, *args, warmup=3, iters=iters)
        busy, span, launches = device_span(fn, *args)
        row = {**head, "variant": name, "wall_us_per_phase": t * 1e6 / layers,
               "span_us_per_phase": span / layers, "busy_us_per_phase": busy / layers,
               "launches_per_phase": launches / layers,
               "floor_us_per_phase": bytes_phase / bw * 1e6,
               "pct_copy_bw": bytes_phase / (span / layers * 1e-6) / bw * 100,
               "rel_err_vs_fp32": err, "failed_programs": fails,
               "copy_TB_s": bw / 1e12}  # fmt: skip
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
               if k not in head or k == "d"}, flush=True)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
