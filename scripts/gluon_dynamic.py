"""Dynamic row blocks for the Gluon layer probe (``gluon_layer_probe --dynamic``): the programs
claim a phase's row blocks from one counter instead of owning a fixed share.

Why. The probe's timeline (BENCHMARKS.md, thirty-eighth session) shows every program waiting
3-4 µs at each 8B grid barrier for the slowest one (static row blocks, unevenly served by DRAM).
Meanwhile its producer warp fills the whole shared-memory ring, so a stand-in for the attention
or the selection after the barrier finds nothing left to bank and adds its full time. With
claimed blocks the programs finish a phase together: less waiting, and a ring that is not full
when the barrier opens.

How. A block is ``RB`` full rows (one ring slot, the chunk is the whole row). The producer
claims blocks with a relaxed atomic add, one claim in flight while it issues the current block's
copies, and writes each slot's block index into ``claims``; after the last block it sends one
end slot (index -1). The slot's ``ready`` barrier counts the copies' arrivals plus one plain
arrival (release) after the index is written, so the compute warps read the index after their
wait (acquire). They compute every slot's rows against the whole input row and stop at -1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import triton.experimental.gluon.language as gl
from triton.experimental import gluon
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.ampere import mbarrier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gluon_chain_probe import _async_load, _cta_barrier  # noqa: E402
from gluon_ops import _gl_now  # noqa: E402


@gluon.jit
def _send(ready, claims, slot, c, PW: gl.constexpr):
    """Slot ``slot`` carries block ``c`` (-1: the phase's end): the index, then the plain
    arrival that (with the copies' own arrivals) opens its ``ready`` barrier."""
    one: gl.constexpr = gl.BlockedLayout([1], [32], [PW], [0])
    claims.index(slot).store(gl.zeros([1], gl.int32, layout=one) + c)
    cp.mbarrier_arrive(ready.index(slot), increment_count=False)
    mbarrier.arrive(ready.index(slot))


@gluon.jit
def _produce_dyn(ring, ready, empty, claims, w_ptr, cl_ptr, s, NR: gl.constexpr,
                 D: gl.constexpr, RB: gl.constexpr, NBUF: gl.constexpr, PW: gl.constexpr,
                 st_ptr, ST: gl.constexpr):  # fmt: skip
    """Claims ``RB``-row blocks of the phase's ``[NR, D]`` rows from the counter ``cl_ptr`` (all
    programs share it) until none is left, one ring slot each; then the end slot. Returns the
    stream index after it. ``ST``: stamps 5 (first block issued) and 6 (last)."""
    row: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [1, PW], [1, 0])
    rk = gl.arange(0, D, layout=gl.SliceLayout(0, row))[None, :]
    s0 = s
    c = gl.atomic_add(cl_ptr, 1, sem="relaxed", scope="gpu")
    while c < NR // RB:
        nxt = gl.atomic_add(cl_ptr, 1, sem="relaxed", scope="gpu")  # in flight meanwhile
        slot = s % NBUF
        if s >= NBUF:
            mbarrier.wait(empty.index(slot), ((s // NBUF) - 1) & 1)
        base = w_ptr + c * RB * D
        dst = ring.index(slot)
        for r in gl.static_range(RB):
            _async_load(dst.slice(r, 1), base + r * D + rk, cache_modifier=".cg")
        _send(ready, claims, slot, c, PW)
        if ST:
            if s == s0:
                gl.store(st_ptr + 5, _gl_now(s))
        s += 1
        c = nxt
    if ST:
        t = _gl_now(s)
        if s == s0:  # no block left for this program: its first and last stamps coincide
            gl.store(st_ptr + 5, t)
        gl.store(st_ptr + 6, t)
    slot = s % NBUF
    if s >= NBUF:
        mbarrier.wait(empty.index(slot), ((s // NBUF) - 1) & 1)
    _send(ready, claims, slot, -1, PW)
    return s + 1


@gluon.jit
def _consume_dyn(ring, ready, empty, claims, xs, y_ptr, s, failed, D: gl.constexpr,
                 RB: gl.constexpr, NBUF: gl.constexpr, WARPS: gl.constexpr, WC: gl.constexpr,
                 st_ptr, ST: gl.constexpr):  # fmt: skip
    """Every slot until the end slot: its block's ``RB`` rows against the whole input row
    ``xs``, stored at the block's rows. Returns the stream index after the end slot. ``ST``:
    stamp 2 (the first slot ready)."""
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [WARPS // WC, WC], [1, 0])
    one: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    xv = xs.load(gl.SliceLayout(0, blk))
    rr = gl.arange(0, RB, layout=gl.SliceLayout(1, blk))
    slot = s % NBUF
    mbarrier.wait(ready.index(slot), (s // NBUF) & 1)
    if ST:
        gl.store(st_ptr + 2, _gl_now(failed))
    c = gl.max(claims.index(slot).load(one), axis=0)
    while c >= 0:
        w = ring.index(slot).load(blk)
        y = gl.sum(w.to(gl.float32) * xv[None, :], axis=1)
        _cta_barrier()
        mbarrier.arrive(empty.index(slot))
        gl.store(y_ptr + c * RB + rr, y)
        s += 1
        slot = s % NBUF
        mbarrier.wait(ready.index(slot), (s // NBUF) & 1)
        c = gl.max(claims.index(slot).load(one), axis=0)
    _cta_barrier()
    mbarrier.arrive(empty.index(slot))  # the end slot
    return s + 1
