"""Weights streamed through shared memory across grid barriers (Gluon): does the barrier's cost
leave the decode megakernel's phases?

Why. The one-launch decode step (``kernels/triton_megastep``) pays ~1.5-5 µs a phase above its
bytes (BENCHMARKS.md, sessions 17-36). In ``@triton.jit`` the next phase's weights can only be
loaded into registers (full at 254 a thread in the step) or asked of L2, and only after the
program's arrival at the barrier: the release fence before the arrival waits for loads in flight.
So every phase restarts its weight stream from empty: the barrier's latency, the activation's L2
round trip and the first bytes' DRAM latency are serial. Gluon allocates shared memory and
issues ``cp.async`` copies into it that stay in flight across any code, so a program can keep a
ring of weight chunks streaming *through* the barrier wait and the next phase's first
activation loads. This probe measures that on ``scripts/megakernel_probe.py``'s chain of L
dependent GEMVs ``y_l = W_l y_(l-1)`` (P programs own ``D / P`` output rows each, one grid
barrier a phase), side by side with the Triton chain variants and XLA:

* ``ring<N>_ck<C>``: each program streams its rows of every ``W_l`` in ``[ROWS, C]`` chunks
  through an N-slot shared-memory ring, phase after phase with no break: at every chunk it
  issues the copy N-1 chunks ahead (across phase boundaries) before it waits for anything;
* ``ws`` / ``wsx``: the same ring fed by a producer warp (``gl.warp_specialize``, mbarriers),
  the other warps only compute (``wsx``: the activation row read once a phase into shared
  memory); ``after``, ``regs``, ``nobar``: diagnostics (``gluon_chain``'s docstring).

    python scripts/gluon_chain_probe.py --d 2048 4096 --layers 32 --out results/gluon.jsonl

Measured (H200, BENCHMARKS.md thirty-seventh session): the warp-specialized ring takes a d 4096
phase from the Triton chain's 12.6 µs (63% of copy) to 8.9 (89%; XLA 10.5), d 2048 from 3.75 to
3.4, d 1024 not at all (1.85, the barrier and activation round trip). The warps must sit side by
side along the columns: stacked over the rows each loads the whole activation, 2x slower.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import triton.experimental.gluon.language as gl
from triton.experimental import gluon
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.ampere import mbarrier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth, header, write_rows  # noqa: E402
from megakernel_probe import (  # noqa: E402
    SPIN,
    chain_rows,
    megakernel_chain,
    reference_chain,
    xla_chain,
)

from prunepath_jax.kernels import gluon_launch, jt  # noqa: E402

# Gluon is experimental and its names move between releases: the GPU image runs triton 3.6,
# the CPU tests whatever pip resolves. A CTA barrier: ``thread_barrier`` in 3.6, ``barrier`` later.
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
# cp.async into shared memory: ``async_copy_global_to_shared`` in 3.6, ``async_load`` later.
_async_load = getattr(cp, "async_load", None) or cp.async_copy_global_to_shared

MODES = ("ring", "after", "ws", "wsx", "regs", "nobar")
# mbarrier counts of the warp-specialized ring: every producer thread's cp.async completion
# arrives on ``ready`` (``.noinc``); one arrival of the consumers frees a slot.
WS_READY_PER_WARP = 32
WS_EMPTY_COUNT = 1


@gluon.jit
def _gl_arrive(ctr_ptr):
    _cta_barrier()
    gl.atomic_add(ctr_ptr, 1, sem="release", scope="gpu")


@gluon.jit
def _nap(dummy, NS: gl.constexpr):
    """``nanosleep`` of about ``NS`` ns (0: none): a waiting warp leaves the issue slots to a
    producer warp instead of spinning on them."""
    if NS > 0:
        gl.inline_asm_elementwise("nanosleep.u32 $1;\n\tmov.u32 $0, 0;", "=r,r", [dummy * 0 + NS],
                                  dtype=gl.int32, is_pure=False, pack=1)  # fmt: skip


@gluon.jit
def _gl_wait(ctr_ptr, target, failed, SPIN: gl.constexpr, NAP: gl.constexpr = 0):
    """``triton_grid._wait`` in Gluon (the dialects cannot call each other's functions), with an
    optional ``NAP`` ns sleep between polls."""
    seen = gl.atomic_add(ctr_ptr, 0, sem="acquire", scope="gpu")
    n = target * 0
    while (seen < target) & (n < SPIN):
        _nap(target, NAP)
        seen = gl.atomic_add(ctr_ptr, 0, sem="acquire", scope="gpu")
        n += 1
    _cta_barrier()
    return gl.where(seen < target, 1, failed)


@gluon.jit
def _gl_issue(ring, w_ptr, offs, s, L: gl.constexpr, NC: gl.constexpr, D: gl.constexpr,
              CK: gl.constexpr, NBUF: gl.constexpr):  # fmt: skip
    """Copy of stream chunk ``s`` (phase ``s // NC``, columns ``(s % NC) · CK``) into its ring
    slot, as one commit group (an empty group past the stream's end keeps the count)."""
    if s < L * NC:
        src = w_ptr + (s // NC) * (D * D) + (s % NC) * CK + offs  # < 2^31 elements here
        _async_load(ring.index(s % NBUF), src, cache_modifier=".cg")
    cp.commit_group()


@gluon.jit
def _gl_chain_kernel(
    x_ptr,  # [D] f32 input of phase 0
    w_ptr,  # [L, D, D] bf16 weights, output-row-major
    y_ptr,  # out [L, D] f32, zeroed
    ctr_ptr,  # out [1] i32 barrier counter, zeroed
    fail_ptr,  # out [P] i32
    L: gl.constexpr, D: gl.constexpr, ROWS: gl.constexpr, CK: gl.constexpr, P: gl.constexpr,
    NBUF: gl.constexpr, SPIN: gl.constexpr, WARPS: gl.constexpr, AFTER: gl.constexpr,
    REGS: gl.constexpr, NOBAR: gl.constexpr, WC: gl.constexpr,
):  # fmt: skip
    NC: gl.constexpr = D // CK
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [WARPS // WC, WC], [1, 0])
    row_l: gl.constexpr = gl.SliceLayout(1, blk)
    col_l: gl.constexpr = gl.SliceLayout(0, blk)
    sh: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    ring = gl.allocate_shared_memory(gl.bfloat16, [NBUF, ROWS, CK], sh)
    pid = gl.program_id(0)
    rr = pid * ROWS + gl.arange(0, ROWS, layout=row_l)
    rk = gl.arange(0, CK, layout=col_l)
    offs = rr[:, None] * D + rk[None, :]
    if not REGS:
        for j in gl.static_range(NBUF - 1):  # the stream's first chunks
            _gl_issue(ring, w_ptr, offs, j, L, NC, D, CK, NBUF)
    failed = pid * 0
    if REGS:  # phase 0's rows in registers (the Triton chain's form, in Gluon)
        wr = gl.load(w_ptr + offs)
    for layer in range(L):
        y = gl.zeros([ROWS], gl.float32, layout=row_l)
        for c in gl.static_range(NC):
            s = layer * NC + c
            if not AFTER:
                # Keep NBUF - 1 chunks in flight, through the barrier's wait. The slot it reuses
                # was read by the previous chunk, before the CTA barrier after every read.
                _gl_issue(ring, w_ptr, offs, s + NBUF - 1, L, NC, D, CK, NBUF)
            if c == 0:
                if layer > 0:
                    if not NOBAR:
                        failed = _gl_wait(ctr_ptr, P * layer, failed, SPIN)
            # The activation's L2 round trip first: it overlaps the copies' landing.
            if layer == 0:
                xv = gl.load(x_ptr + c * CK + rk)
            else:
                xv = gl.load(y_ptr + (layer - 1) * D + c * CK + rk, cache_modifier=".cg")
            if REGS:
                w = wr
            else:
                if AFTER:
                    cp.wait_group(0)
                else:
                    cp.wait_group(NBUF - 1)  # chunk s has landed (this thread's copies)
                _cta_barrier()  # ... and every other thread's
                w = ring.index(s % NBUF).load(blk)
            y += gl.sum(w.to(gl.float32) * xv[None, :], axis=1)
            _cta_barrier()  # every thread has read slot s % NBUF: free for a copy
        gl.store(y_ptr + layer * D + rr, y)
        if NOBAR:
            _cta_barrier()
        else:
            _gl_arrive(ctr_ptr)
        if REGS:  # the next phase's rows, in flight during the barrier's wait
            wr = gl.load(w_ptr + gl.minimum(layer + 1, L - 1) * (D * D) + offs)
        elif AFTER:  # AFTER (NBUF 2, one chunk a phase): the next phase's copy after the arrival
            _gl_issue(ring, w_ptr, offs, layer + 1, L, NC, D, CK, NBUF)
    if not REGS:
        cp.wait_group(0)
    gl.store(fail_ptr + pid, failed)


@gluon.jit
def _ws_producer(ring, ready, empty, w_ptr, L: gl.constexpr, D: gl.constexpr, ROWS: gl.constexpr,
                 CK: gl.constexpr, NBUF: gl.constexpr, PW: gl.constexpr):  # fmt: skip
    """The worker warps: copy every chunk of this program's rows into the ring, a row at a time,
    each slot after the consumers freed it; completion signalled on the slot's ``ready``."""
    NC: gl.constexpr = D // CK
    row: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [1, PW], [1, 0])
    rk = gl.arange(0, CK, layout=gl.SliceLayout(0, row))[None, :]  # [1, CK]
    r0 = gl.program_id(0) * ROWS
    for s in range(L * NC):
        slot = s % NBUF
        if s >= NBUF:
            mbarrier.wait(empty.index(slot), ((s // NBUF) - 1) & 1)
        base = w_ptr + (s // NC) * (D * D) + (s % NC) * CK + r0 * D
        dst = ring.index(slot)
        for r in gl.static_range(ROWS):
            _async_load(dst.slice(r, 1), base + r * D + rk, cache_modifier=".cg")
        cp.mbarrier_arrive(ready.index(slot), increment_count=False)


@gluon.jit
def _ws_consumer(ring, ready, empty, xs, x_ptr, y_ptr, ctr_ptr, fail_ptr, L: gl.constexpr,
                 D: gl.constexpr, ROWS: gl.constexpr, CK: gl.constexpr, P: gl.constexpr,
                 NBUF: gl.constexpr, SPIN: gl.constexpr, WARPS: gl.constexpr, WC: gl.constexpr,
                 XS: gl.constexpr):  # fmt: skip
    """The default warps: wait for each chunk, multiply, free its slot; store and arrive at the
    grid barrier a phase. They issue no copies, so their release fence waits for none. With
    ``XS`` the phase's whole activation row is loaded once after the barrier (one L2 round
    trip, not one a chunk) and kept in shared memory ``xs``."""
    NC: gl.constexpr = D // CK
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [WARPS // WC, WC], [1, 0])
    pid = gl.program_id(0)
    rr = pid * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, blk))
    rk = gl.arange(0, CK, layout=gl.SliceLayout(0, blk))
    rd = gl.arange(0, D, layout=gl.BlockedLayout([4], [32], [WARPS], [0]))
    failed = pid * 0
    for layer in range(L):
        y = gl.zeros([ROWS], gl.float32, layout=gl.SliceLayout(1, blk))
        if layer > 0:
            failed = _gl_wait(ctr_ptr, P * layer, failed, SPIN)
        if XS:
            if layer == 0:
                xs.store(gl.load(x_ptr + rd))
            else:
                xs.store(gl.load(y_ptr + (layer - 1) * D + rd, cache_modifier=".cg"))
            _cta_barrier()
        for c in gl.static_range(NC):
            s = layer * NC + c
            slot = s % NBUF
            if XS:
                xv = xs.slice(c * CK, CK).load(gl.SliceLayout(0, blk))
            elif layer == 0:
                xv = gl.load(x_ptr + c * CK + rk)
            else:
                xv = gl.load(y_ptr + (layer - 1) * D + c * CK + rk, cache_modifier=".cg")
            mbarrier.wait(ready.index(slot), (s // NBUF) & 1)
            w = ring.index(slot).load(blk)
            y += gl.sum(w.to(gl.float32) * xv[None, :], axis=1)
            _cta_barrier()
            mbarrier.arrive(empty.index(slot))
        gl.store(y_ptr + layer * D + rr, y)
        _gl_arrive(ctr_ptr)
    gl.store(fail_ptr + pid, failed)


@gluon.jit
def _ws_chain_kernel(x_ptr, w_ptr, y_ptr, ctr_ptr, fail_ptr, L: gl.constexpr, D: gl.constexpr,
                     ROWS: gl.constexpr, CK: gl.constexpr, P: gl.constexpr, NBUF: gl.constexpr,
                     SPIN: gl.constexpr, WARPS: gl.constexpr, WC: gl.constexpr, PW: gl.constexpr,
                     EMPTY_COUNT: gl.constexpr, READY_COUNT: gl.constexpr,
                     XS: gl.constexpr):  # fmt: skip
    """The ring with a producer partition (``PW`` warps) and the chain's math in the default
    warps: the copies stay in flight across the consumers' grid-barrier arrivals."""
    sh: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    ring = gl.allocate_shared_memory(gl.bfloat16, [NBUF, ROWS, CK], sh)
    ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    xs = gl.allocate_shared_memory(gl.float32, [D], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    for i in gl.static_range(NBUF):
        mbarrier.init(ready.index(i), count=READY_COUNT)
        mbarrier.init(empty.index(i), count=EMPTY_COUNT)
    gl.warp_specialize(
        [(_ws_consumer, (ring, ready, empty, xs, x_ptr, y_ptr, ctr_ptr, fail_ptr, L, D, ROWS, CK,
                         P, NBUF, SPIN, WARPS, WC, XS)),
         (_ws_producer, (ring, ready, empty, w_ptr, L, D, ROWS, CK, NBUF, PW))],
        [PW], [48],
    )  # fmt: skip


def gluon_chain(
    x_d: jax.Array, w_ldd: jax.Array, *, programs: int, ring: int, chunk: int, mode: str = "ring",
    warps: int = 8, producer_warps: int = 1, warp_cols: int | None = None, spin: int = SPIN,
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """All L phases in one Gluon launch: ``(y_ld f32, fail_p i32)``. ``mode``: ``ring`` (every
    warp copies, N-1 chunks ahead), ``after`` (a 2-slot ring of whole phases, the next one
    copied after the arrival), ``ws`` (``producer_warps`` warps copy, the others compute;
    ``wsx``: and load the whole activation row once a phase, into shared memory),
    ``warp_cols``: warps along the columns (default ``chunk / 256`` up to ``warps``; 1 puts
    every warp on its own rows, each loading the whole activation). ``regs`` (the Triton
    chain's form in Gluon: the next phase's rows loaded into registers
    after the arrival), ``nobar`` (the ring without the grid barrier: a wrong result, timed
    only as the stream's own rate)."""
    n_layers, d, _ = w_ldd.shape
    rows = d // programs
    if d % programs or rows & (rows - 1) or d % chunk or ring < 2 or mode not in MODES:
        raise ValueError(f"d {d}, {programs} programs, chunk {chunk}, ring {ring}, mode {mode}")
    if mode in ("after", "regs") and (ring != 2 or chunk != d):
        raise ValueError(f"mode {mode!r} moves whole phases (2 slots): ring 2, chunk d")
    gluon_launch.install()
    # Warps side by side along the columns by default (each loads only its columns of the
    # activation, not all of it: 8x less L2 -> SM traffic for x at 8 warps), rows over the rest.
    wc = min(warps, max(1, chunk // 256)) if warp_cols is None else warp_cols
    meta = dict(L=n_layers, D=d, ROWS=rows, CK=chunk, P=programs, NBUF=ring, SPIN=spin,
                WARPS=warps, WC=wc)  # fmt: skip
    if mode in ("ws", "wsx"):
        kernel = _ws_chain_kernel
        meta.update(PW=producer_warps, READY_COUNT=WS_READY_PER_WARP * producer_warps,
                    EMPTY_COUNT=WS_EMPTY_COUNT, XS=mode == "wsx")  # fmt: skip
    else:
        kernel = _gl_chain_kernel
        meta.update(AFTER=mode in ("after", "regs"), REGS=mode == "regs", NOBAR=mode == "nobar")
    y, _, fail = jt.triton_call(
        kernel, x_d.astype(jnp.float32), w_ldd,
        out_shape=[jax.ShapeDtypeStruct((n_layers, d), jnp.float32),
                   jax.ShapeDtypeStruct((1,), jnp.int32),
                   jax.ShapeDtypeStruct((programs,), jnp.int32)],
        zeroed_outputs=(0, 1), grid=(programs,), num_warps=warps, num_stages=1, **meta,
    )  # fmt: skip
    return y, fail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, nargs="+", default=[2048])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--programs", type=int, default=128)
    ap.add_argument("--warps", type=int, default=8)
    ap.add_argument("--rings", help="comma list of mode:slots:chunk[:warps along columns"
                    "[:producer warps]]",
                    default="ring:2:2048,ws:2:2048,ws:3:1024,wsx:2:2048,wsx:3:1024,wsx:4:512,"
                            "wsx:6:512,wsx:8:256,wsx:12:256,wsx:3:1024::2,wsx:6:512::2,"
                            "wsx:12:256::2")  # fmt: skip
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="results/gluon_chain.jsonl")
    a = ap.parse_args()
    head = {**header(), "bench": "gluon_chain_probe", "layers": a.layers}
    bw = max(copy_bandwidth().values())
    rows = []
    for d in a.d:
        kx, kw = jax.random.split(jax.random.key(d))
        w = (jax.random.normal(kw, (a.layers, d, d)) * d**-0.5).astype(jnp.bfloat16)
        x = jax.random.normal(kx, (d,), jnp.float32)
        want = reference_chain(x, w)
        fns = {"xla": (jax.jit(xla_chain), (x, jnp.swapaxes(w, 1, 2).copy()))}
        bk = min(d, 2048)
        for v in ("mega", "mega_prefetch"):
            fns[v] = (jax.jit(lambda x, w, v=v, bk=bk: megakernel_chain(
                x, w, programs=a.programs, prefetch=v == "mega_prefetch", block_k=bk,
                warps=a.warps)), (x, w))  # fmt: skip
        for spec in a.rings.split(","):
            mode, n, ck, *more = spec.split(":")
            n, ck = int(n), min(int(ck), d)
            wc = int(more[0]) if more and more[0] else None
            pw = int(more[1]) if len(more) > 1 else 1
            if d // a.programs * ck * 2 * n > 200 * 1024 or (mode in ("after", "regs") and ck != d):
                continue  # past the shared memory a block may have
            name = f"{mode}{n}_ck{ck}" + (f"_wc{wc}" if wc else "") + (f"_pw{pw}" if pw > 1 else "")
            fns[name] = (jax.jit(lambda x, w, n=n, ck=ck, m=mode, wc=wc, pw=pw: gluon_chain(
                x, w, programs=a.programs, ring=n, chunk=ck, mode=m, warps=a.warps,
                warp_cols=wc, producer_warps=pw)),
                (x, w))  # fmt: skip
        rows += chain_rows(
            fns, want, {**head, "d": d}, a.layers, d * d * 2, bw, a.iters, catch=True
        )
    write_rows(a.out, rows)


if __name__ == "__main__":
    main()
