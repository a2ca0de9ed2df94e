"""Can a latency-bound decode kernel hide the next GEMV's weight bytes by prefetching them into L2?

Why. A decode layer's fixed costs are latency chains: each kernel spends microseconds in a few
dependent memory round trips while DRAM idles (ncu, BENCHMARKS.md thirteenth session: the expert
kernel at one expert keeps DRAM 2.4% busy). Fusing launches did not shorten the chains, so the
lever left is overlap: extra programs in a latency-bound kernel that stream weights a later
kernel will read (e.g. the next layer's QKV projection during the routing kernels) into L2, so
that kernel reads them at L2 speed. This measures the mechanism before any model plumbing.

The chain, per "layer" ``i`` of ``--layers`` (distinct weights, so nothing stays in L2 between
layers without help):

* ``K``: a latency-bound Pallas-Triton kernel — ``--chain`` programs each walk ``--hops``
  dependent loads through a small table (the routing kernels' stand-in) and pass x on; with
  ``prefetch``, ``--programs`` more programs load the next GEMV's weight ``W_i`` whole
  (``evict_last``) and store one float each, so the loads cannot be dropped;
* optionally ``E``: a streaming kernel reading an expert-sized buffer (``--stream-mb``, the
  expert kernel's bytes between routing and the next layer), with default or ``evict_first``
  loads: whether the stream evicts what was prefetched;
* ``P`` (``side`` variants): the prefetch as a kernel of its own that takes the layer's input
  ``y`` as an operand (so it starts after ``y`` exists) and that nothing downstream reads; under
  ``--xla_gpu_command_buffer_scheduling_mode=CONCURRENT`` XLA's command buffer is a DAG and
  ``P`` may run beside ``K`` and ``E`` instead of lengthening ``K`` (the fourteenth session's
  in-kernel prefetch lengthened ``K`` by more than ``G`` saved);
* ``G``: XLA's GEMV ``x @ W_i`` (``[1, d] @ [d, n]`` bf16, the QKV projection's shape), by
  default in the decode step's own form (``--gemv model``); runs 7-8 of BENCHMARKS.md used an
  f32-accumulating dot that XLA lowers to a slower reduce fusion (``--gemv dot_f32``).

Rows: wall µs per layer of each variant's jitted chain (and device µs per kernel from a profiler
trace), side by side in one process.

    python benchmarks/l2_prefetch.py --shape 2048,3072     # H200: Llama-3.2-1B QKV
    python benchmarks/l2_prefetch.py --smoke               # CPU, interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

sys.path.insert(0, str(Path(__file__).parent))
from common import copy_bandwidth, header, kernel_durations, time_fn, write_rows  # noqa: E402

from prunepath_jax.kernels.jt import next_pow2  # noqa: E402
from prunepath_jax.models.layers import matvec_safe_matmul  # noqa: E402

try:
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

COLS = 512  # weights viewed as [rows, 512]; a streaming load is a [tile, 512] slab
TABLE = 1024


def _rows_per(rows: int, programs: int, tile: int) -> int:
    """Rows of 512 each of ``programs`` programs streams, in whole ``tile``-row loads."""
    per = rows // programs
    if per * programs != rows or per % tile:
        raise ValueError(f"{rows} rows do not split into {programs} programs of {tile}-row tiles")
    return per


def _stream_rows(src_ref, junk_ref, slot, r0, rows_per, tile, evict):
    """Loads rows ``[r0, r0 + rows_per)`` of ``src_ref`` (``[rows, 512]``) in ``tile``-row
    slabs and stores their sum at ``junk_ref[slot]``, so the loads cannot be dropped."""

    def step(i, acc):
        rows = pl.ds(pl.multiple_of(r0 + i * tile, tile), tile)
        return acc + plgpu.load(src_ref.at[rows, :], eviction_policy=evict).astype(jnp.float32)

    acc = jax.lax.fori_loop(0, rows_per // tile, step, jnp.zeros((tile, COLS), jnp.float32))
    plgpu.store(junk_ref.at[pl.ds(slot, 1)], jnp.full((1,), jnp.sum(acc), jnp.float32))


def _k_kernel(y_ref, tab_ref, *refs, d, n_chain, hops, rows_per, tile, prefetch):
    """Programs < n_chain: ``hops`` dependent table loads (program 0 also copies x on);
    the others: load their rows of W (into L2) and store the sum."""
    w_ref, x_ref, junk_ref = refs if prefetch else (None,) + refs
    pid = pl.program_id(0)

    @pl.when(pid < n_chain)
    def _():
        def hop(_, idx):
            # volatile: from L2 every hop, as the routing kernels' first loads of partials and
            # gate tables (Pallas' ".cg" cache modifier fails to lower in jax 0.10-0.11)
            return jnp.sum(plgpu.load(tab_ref.at[pl.ds(idx, 1)], volatile=True))

        start = (pid * 7) % TABLE
        idx = jax.lax.fori_loop(0, hops, hop, start)
        plgpu.store(junk_ref.at[pl.ds(pid, 1)], jnp.full((1,), idx, jnp.int32).astype(jnp.float32))

        @pl.when(pid == 0)
        def _():
            dp = next_pow2(d)
            ok = jax.lax.broadcasted_iota(jnp.int32, (1, dp), 1) < d
            cols = (pl.ds(0, 1), pl.ds(0, dp))
            x = plgpu.load(y_ref.at[cols], mask=ok, other=0)
            plgpu.store(x_ref.at[cols], x, mask=ok)

    if prefetch:

        @pl.when(pid >= n_chain)
        def _():
            r0 = (pid - n_chain) * rows_per
            _stream_rows(w_ref, junk_ref, pid, r0, rows_per, tile, "evict_last")


def k_call(y, tab, w_rc, *, d, n_chain, hops, programs, tile, prefetch, interpret):
    """``(x [1, d], junk)``: the latency-bound kernel, with ``programs`` prefetching W or not."""
    rows_per = _rows_per(w_rc.shape[0], programs, tile) if prefetch else 0
    grid = n_chain + (programs if prefetch else 0)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    kern = functools.partial(_k_kernel, d=d, n_chain=n_chain, hops=hops, rows_per=rows_per,
                             tile=tile, prefetch=prefetch)  # fmt: skip
    ins = (y, tab) + ((w_rc,) if prefetch else ())
    return pl.pallas_call(
        kern,
        out_shape=(
            jax.ShapeDtypeStruct((1, d), y.dtype),
            jax.ShapeDtypeStruct((grid,), jnp.float32),
        ),  # fmt: skip
        grid=(grid,),
        in_specs=[any_spec] * len(ins),
        out_specs=(any_spec, any_spec),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name="prefetch_probe_k",
    )(*ins)


def _p_kernel(y_ref, w_ref, junk_ref, *, rows_per, tile):
    """Loads its rows of W with ``evict_last`` (into L2); ``y`` is an operand only to order P
    after the layer's input."""
    del y_ref
    pid = pl.program_id(0)
    _stream_rows(w_ref, junk_ref, pid, pid * rows_per, rows_per, tile, "evict_last")


def p_call(y, w_rc, *, programs, tile, interpret):
    """``junk [programs]``: the side prefetch kernel over ``w_rc`` ``[rows, 512]``."""
    rows_per = _rows_per(w_rc.shape[0], programs, tile)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        functools.partial(_p_kernel, rows_per=rows_per, tile=tile),
        out_shape=jax.ShapeDtypeStruct((programs,), jnp.float32),
        grid=(programs,),
        in_specs=[any_spec, any_spec],
        out_specs=any_spec,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name="prefetch_probe_side",
    )(y, w_rc)


def _e_kernel(x_ref, buf_ref, out_ref, junk_ref, *, rows_per, tile, evict):
    """Streams its rows of the buffer (the expert kernel's bytes); program 0 passes x on."""
    pid = pl.program_id(0)
    _stream_rows(buf_ref, junk_ref, pid, pid * rows_per, rows_per, tile, evict)

    @pl.when(pid == 0)
    def _():
        plgpu.store(out_ref, plgpu.load(x_ref))


def e_call(x, buf, *, programs, tile, evict, interpret):
    rows_per = _rows_per(buf.shape[0], programs, tile)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        functools.partial(_e_kernel, rows_per=rows_per, tile=tile, evict=evict),
        out_shape=(
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct((programs,), jnp.float32),
        ),  # fmt: skip
        grid=(programs,),
        in_specs=[any_spec, any_spec],
        out_specs=(any_spec, any_spec),
        compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=3),
        interpret=interpret,
        name="prefetch_probe_stream",
    )(x, buf)[0]


def chain(y0, tab, ws, bufs, *, d, a, prefetch, stream, interpret, side=False):
    """The variant's chain over every layer; returns the last GEMV output and the side
    prefetch kernels' junk (returned, so XLA keeps those kernels)."""
    y = y0
    junk = []
    for i, w in enumerate(ws):
        w_rc = w.reshape(-1, COLS)
        if side:
            junk.append(p_call(y, w_rc, programs=a.programs, tile=a.tile_rows,
                               interpret=interpret))  # fmt: skip
        x, _ = k_call(y, tab, w_rc, d=d, n_chain=a.chain, hops=a.hops, programs=a.programs,
                      tile=a.tile_rows, prefetch=prefetch, interpret=interpret)  # fmt: skip
        if stream != "off":  # "normal" (default eviction) or "evict_first"
            evict = None if stream == "normal" else stream
            x = e_call(x, bufs[i], programs=a.programs, tile=a.tile_rows, evict=evict,
                       interpret=interpret)  # fmt: skip
        if a.gemv == "model":  # the decode step's projection (XLA's split-K Triton GEMM)
            y = matvec_safe_matmul(x, w)  # [1, n]
        else:  # runs 7-8: XLA turns this into a reduce fusion (~0.85 TB/s)
            y = jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    return y, junk


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="2048,3072", help="d,n of the GEMV (1B QKV: 2048,3072)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--chain", type=int, default=32, help="latency-bound programs")
    ap.add_argument("--hops", type=int, default=12, help="dependent loads a chain program walks")
    ap.add_argument("--programs", type=int, default=256, help="prefetch / stream programs")
    ap.add_argument("--stream-mb", type=float, default=24.0, help="expert bytes between K and G")
    ap.add_argument("--tile-rows", type=int, default=16, help="rows of 512 per prefetch load")
    ap.add_argument(
        "--gemv",
        default="model",
        choices=["model", "dot_f32"],
        help="model: the decode step's own projection form (models.layers.matvec_safe_matmul); "
        "dot_f32: the f32-accumulating dot of runs 7-8, which XLA lowers to a reduce fusion",
    )
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--variants", nargs="+", help="a subset of the variants, in this order")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in the interpreter (CPU)")
    ap.add_argument("--out", default="results/l2_prefetch.jsonl")
    a = ap.parse_args()
    interpret = a.smoke
    if a.smoke:
        a.shape, a.layers, a.chain, a.hops, a.programs, a.stream_mb = "64,128", 2, 2, 3, 2, 0.03
        a.tile_rows = 8
    d, n = (int(v) for v in a.shape.split(","))
    key = jax.random.split(jax.random.key(0), 3)
    ws = [jax.random.normal(k, (d, n), jnp.bfloat16) * d**-0.5
          for k in jax.random.split(key[0], a.layers)]  # fmt: skip
    share = a.programs * a.tile_rows  # whole tiles for every program
    srows = int(a.stream_mb * 2**20) // (2 * COLS) // share * share
    bufs = [jnp.ones((srows, COLS), jnp.bfloat16) for _ in range(a.layers)]
    tab = jax.random.randint(key[1], (TABLE,), 0, TABLE, dtype=jnp.int32)
    y0 = jax.random.normal(key[2], (1, n), jnp.bfloat16)
    variants = {
        "no_prefetch": dict(prefetch=False, stream="off"),
        "prefetch": dict(prefetch=True, stream="off"),
        "no_prefetch+stream": dict(prefetch=False, stream="normal"),
        "prefetch+stream": dict(prefetch=True, stream="normal"),
        "prefetch+stream_evict_first": dict(prefetch=True, stream="evict_first"),
        "side": dict(prefetch=False, stream="off", side=True),
        "side+stream": dict(prefetch=False, stream="normal", side=True),
        "side+stream_evict_first": dict(prefetch=False, stream="evict_first", side=True),
    }
    if a.variants:
        variants = {k: variants[k] for k in a.variants}
    head = {**header(), "d": d, "n": n, "layers": a.layers, "chain": a.chain, "hops": a.hops,
            "programs": a.programs, "tile_rows": a.tile_rows, "gemv": a.gemv,
            "stream_mb": srows * COLS * 2 / 2**20}  # fmt: skip
    if not a.smoke:
        head["copy_TB_s"] = max(copy_bandwidth().values()) / 1e12
    ref = y0
    for w in ws:  # the chain's math without the kernels: x = y[:, :d], y = x @ W
        ref = jnp.dot(ref[:, :d], w, preferred_element_type=jnp.float32).astype(ref.dtype)
    rows = []
    for name, v in variants.items():
        fn = jax.jit(functools.partial(chain, d=d, a=a, interpret=interpret, **v))
        got = fn(y0, tab, ws, bufs)[0]
        if not bool(jnp.allclose(got.astype(jnp.float32), ref.astype(jnp.float32), rtol=0.05,
                                 atol=0.05)):  # fmt: skip
            raise AssertionError(f"{name}: the chain's output differs from the XLA chain's")
        us = time_fn(fn, y0, tab, ws, bufs, iters=a.iters) * 1e6 / a.layers
        row = {**head, "variant": name, "wall_us_per_layer": us,
               "xla_flags": os.environ.get("XLA_FLAGS", "")}  # fmt: skip
        if not a.smoke:
            dur = kernel_durations(fn, y0, tab, ws, bufs)
            row["device_us_per_layer"] = {k: sum(v) / a.layers for k, v in dur.items()}
        rows.append(row)
        print(name, f"{us:.2f} us/layer", row.get("device_us_per_layer", ""), flush=True)
    write_rows(a.out, rows)


if __name__ == "__main__":
    main()
