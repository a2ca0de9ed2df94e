"""Small Gluon device functions the ring probes share: the GPU clock, a timed busy wait (a
stand-in for compute whose latency a weight stream should hide), and L2 prefetch requests
ahead of a ring (``gluon_layer_probe --l2-ahead``).

Why a file of its own: they are not the ring (``gluon_chain_probe``) or one probe's layer
schedule (``gluon_layer_probe``), and Gluon functions can only call Gluon functions, so the
Triton versions (``kernels/triton_l2.py``) cannot be reused.
"""

from __future__ import annotations

import sys
from pathlib import Path

import triton.experimental.gluon.language as gl
from triton.experimental import gluon

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gluon_chain_probe import _nap  # noqa: E402


@gluon.jit
def _gl_now(dummy):
    """``%globaltimer`` (ns); ``dummy`` is the asm's operand (impure: read again each call)."""
    return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dummy],
                                     dtype=gl.int64, is_pure=False, pack=1)  # fmt: skip


@gluon.jit
def _spin_ns(dummy, NS: gl.constexpr, NAP: gl.constexpr):
    """Busy for ``NS`` ns: stands in for work whose latency the ring should hide (attention)
    or cannot (the selection the expert stream waits for); with ``NAP`` it sleeps between its
    clock reads (an idle stand-in, not a busy one)."""
    t0 = _gl_now(dummy)
    t = t0
    while t - t0 < NS:
        _nap(dummy, NAP)
        t = _gl_now(dummy)


# bytes of one bulk L2 prefetch request (``triton_l2.BULK_SEG``)
L2_SEG_BYTES = 16 * 1024
L2_SEG = gl.constexpr(L2_SEG_BYTES)


@gluon.jit
def _l2_bulk(ptr, NBYTES: gl.constexpr):
    """``cp.async.bulk.prefetch.L2`` of ``NBYTES`` contiguous bf16 bytes at ``ptr``, asked by
    lane 0 only (the producer partition is one warp): fire-and-forget, no ring slot, so DRAM
    can keep streaming while the ring is full and the compute warps are busy elsewhere."""
    for i in gl.static_range(NBYTES // L2_SEG):
        gl.inline_asm_elementwise(
            "{ .reg .pred p; .reg .u32 t; mov.u32 t, %laneid; setp.eq.u32 p, t, 0; "
            "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [ptr + i * (L2_SEG // 2), NBYTES * 0 + L2_SEG], dtype=gl.int32,
            is_pure=False, pack=1,
        )  # fmt: skip
