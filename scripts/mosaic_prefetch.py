"""Can a Mosaic GPU kernel fetch its weights before it waits for its predecessor? (H200 probe)

Why. Every overlap lever inside our Pallas-Triton decode kernels is measured and closed
(BENCHMARKS.md, thirteenth and fourteenth sessions): those kernels wait for their predecessor at
entry, so the weight stream of each GEMV starts only after the previous kernel's writes land.
Pallas' Mosaic GPU backend exposes ``griddepcontrol.wait`` as a primitive, so a kernel could
issue its weight copies (TMA, global → shared memory) first and wait only before it reads the
activation the predecessor wrote. This probe measures whether that pays, before any decode
kernel is ported.

A chain of ``N_CHAIN`` dependent kernels, each with its own weight slab (so nothing is reused in
L2): every program copies its ``rows × 128`` bf16 block of the slab into shared memory, then
the activation ``x`` (the previous kernel's output), and writes ``x + w[:8]`` (8 × 128) as the
next kernel's input. Variants, all signalling ``launch_dependents`` at their start:

* ``wait_first``: wait, then weights and ``x`` — what our Pallas-Triton kernels do;
* ``fetch_first``: weights, then wait, then ``x`` — the lever;
* ``no_wait``: never waits (may read a stale ``x``; timing bound only);
* ``pallas_triton``: the same reads and result as one Pallas-Triton kernel (the backend our
  decode kernels use; XLA makes it wait at entry), for the per-kernel cost side by side.

    python scripts/mosaic_prefetch.py --out results/mosaic_prefetch.jsonl
"""

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import busy_and_span, traced_events, write_rows  # noqa: E402

N_CHAIN = 16
COLS = 128  # bf16 columns of a weight block: one 256-byte row, one TMA box width
CHUNK = 256  # rows per TMA copy (a TMA box holds at most 256 rows)
OUT_ROWS = 8  # rows of the activation each kernel reads and writes per program
MOSAIC_VARIANTS = ("wait_first", "fetch_first", "no_wait")
VARIANTS = MOSAIC_VARIANTS + ("pallas_triton",)


def mosaic_step(x, w, *, variant: str, rows: int, programs: int):
    """One chain kernel: ``x`` [programs, OUT_ROWS, COLS], ``w`` [programs · rows, COLS] bf16 →
    ``x[0] + w_block[:OUT_ROWS]`` per program, [programs, OUT_ROWS, COLS]."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if variant not in MOSAIC_VARIANTS:
        raise ValueError(f"variant {variant!r} not in {MOSAIC_VARIANTS}")
    if rows % CHUNK and rows > CHUNK:
        raise ValueError(f"rows {rows} must be ≤ {CHUNK} or a multiple of it")
    chunks = max(1, rows // CHUNK)
    chunk = min(rows, CHUNK)

    def body(x_ref, w_ref, o_ref, w_smem, x_smem, o_smem, bars):
        pid = jax.lax.axis_index("p")
        plgpu.griddepcontrol_launch_dependents()

        def fetch_weights():
            for c in range(chunks):
                src = w_ref.at[pl.ds(pid * rows + c * chunk, chunk)]
                plgpu.copy_gmem_to_smem(src, w_smem.at[c], bars.at[c])

        if variant == "wait_first":
            plgpu.griddepcontrol_wait()
            fetch_weights()
        else:
            fetch_weights()
            if variant == "fetch_first":
                plgpu.griddepcontrol_wait()
        plgpu.copy_gmem_to_smem(x_ref.at[0], x_smem, bars.at[chunks])
        for c in range(chunks + 1):
            plgpu.barrier_wait(bars.at[c])
        o_smem[...] = x_smem[...] + w_smem[0, pl.ds(0, OUT_ROWS), :]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[pid])
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((programs, OUT_ROWS, COLS), jnp.bfloat16),
        scratch_types=[
            plgpu.SMEM((chunks, chunk, COLS), jnp.bfloat16),
            plgpu.SMEM((OUT_ROWS, COLS), jnp.bfloat16),
            plgpu.SMEM((OUT_ROWS, COLS), jnp.bfloat16),
            plgpu.Barrier(num_barriers=chunks + 1),
        ],
        grid=(programs,),
        grid_names=("p",),
    )(x, w)


def triton_step(x, w, *, rows: int, programs: int):
    """``mosaic_step``'s result from a Pallas-Triton kernel: each program streams its block of
    ``w`` in 64-row slabs (folded into the output times 0, so the loads stay) and adds its first
    ``OUT_ROWS`` rows to ``x[0]``."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltr

    slab = min(rows, 64)

    def body(x_ref, w_ref, o_ref):
        pid = pl.program_id(0)

        def step(c, acc):
            blk = pltr.load(w_ref.at[pl.ds(pid * rows + c * slab, slab), :])
            return acc + jnp.sum(blk.astype(jnp.float32), axis=0, keepdims=True)

        acc = jax.lax.fori_loop(0, rows // slab, step, jnp.zeros((1, COLS), jnp.float32))
        first = pltr.load(w_ref.at[pl.ds(pid * rows, OUT_ROWS), :]).astype(jnp.float32)
        xv = pltr.load(x_ref.at[pl.ds(0, 1), :, :]).astype(jnp.float32)  # [1, OUT_ROWS, COLS]
        val = xv + first[None] + (acc * 0.0)[None]
        pltr.store(o_ref.at[pl.ds(pid, 1), :, :], val.astype(o_ref.dtype))

    anyspec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct((programs, OUT_ROWS, COLS), jnp.bfloat16),
        grid=(programs,),
        in_specs=[anyspec, anyspec],
        out_specs=anyspec,
        compiler_params=pltr.CompilerParams(num_warps=4),
        name="probe_triton_stream",
    )(x, w)


def chain_fn(*, variant: str, rows: int, programs: int):
    """A jitted chain of ``N_CHAIN`` kernels over ``ws`` [N_CHAIN, programs · rows, COLS]."""
    import jax

    if variant == "pallas_triton":
        step = functools.partial(triton_step, rows=rows, programs=programs)
    else:
        step = functools.partial(mosaic_step, variant=variant, rows=rows, programs=programs)

    def chain(x, ws):
        for i in range(N_CHAIN):
            x = step(x, ws[i])
        return x

    return jax.jit(chain)


def trace_chain(fn, *args) -> dict:
    """Device-side figures of one traced call: the kernels' own µs and the span from the first
    kernel's start to the last one's end, per kernel (launch gaps included, host noise not)."""
    ev = traced_events(fn, *args, log_dir="/tmp/mosaic_prefetch_trace")
    if not ev:
        return {"trace": "no device events"}
    busy, span = busy_and_span(ev)
    names = sorted({e["name"] for e in ev})
    return {"device_span_us_per_kernel": span / N_CHAIN, "device_busy_us_per_kernel":
            busy / N_CHAIN, "device_events": len(ev), "kernel_names": names[:4]}  # fmt: skip


def time_variants(rows_list, programs: int, out: str | None, trace: bool = False) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    rows_out = []
    for rows in rows_list:
        key = jax.random.PRNGKey(rows)
        ws = jax.random.normal(key, (N_CHAIN, programs * rows, COLS), jnp.float32)
        ws = (ws * 0.01).astype(jnp.bfloat16)
        x = jnp.zeros((programs, OUT_ROWS, COLS), jnp.bfloat16)
        # every kernel adds its block's first rows to program 0's activation
        want = np.zeros((programs, OUT_ROWS, COLS), np.float32)
        # only each block's first rows enter the result: slice on the device, copy those over
        heads = ws.reshape(N_CHAIN, programs, rows, COLS)[:, :, :OUT_ROWS]
        heads = np.asarray(heads.astype(jnp.float32))
        for i in range(N_CHAIN):
            want = want[0][None] + heads[i]
        fns = {v: chain_fn(variant=v, rows=rows, programs=programs) for v in VARIANTS}
        errs = {}
        for v, fn in fns.items():
            got = np.asarray(fn(x, ws).astype(jnp.float32))
            errs[v] = float(np.abs(got - want).max())
        times = {v: [] for v in VARIANTS}
        for _ in range(15):  # interleave the variants: these machines drift
            for v, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(10):
                    y = fn(x, ws)
                y.block_until_ready()
                times[v].append((time.perf_counter() - t0) / 10)
        mb = programs * rows * COLS * 2 / 1e6
        for v in VARIANTS:
            us = statistics.median(times[v]) * 1e6 / N_CHAIN
            row = {"variant": v, "rows": rows, "programs": programs, "weight_mb": mb,
                   "us_per_kernel": us, "gb_s": mb * 1e3 / us, "max_abs_err": errs[v],
                   "xla_flags": os.environ.get("XLA_FLAGS", ""),
                   "device": jax.devices()[0].device_kind, "jax": jax.__version__}  # fmt: skip
            if trace:
                row.update(trace_chain(fns[v], x, ws))
            rows_out.append(row)
            print(row, flush=True)
    if out:
        write_rows(out, rows_out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 256, 512])
    ap.add_argument("--programs", type=int, default=132)
    ap.add_argument("--out", help="JSONL file to append the rows to")
    ap.add_argument("--trace", action="store_true", help="add device times from a profiler trace")
    a = ap.parse_args()
    time_variants(a.rows, a.programs, a.out, a.trace)


if __name__ == "__main__":
    main()
