"""A grid barrier and a timer for persistent Triton kernels (every program co-resident).

Why a file of its own: the one-launch decode step (``triton_megastep``) and the barrier probe
(``scripts/megakernel_probe.py``) share them, and what makes a grid barrier correct (a CTA
barrier before the release add, acquire polls, a bounded spin so that a grid that is not
co-resident reports failure instead of hanging the GPU) is a different thing to read from any
phase's arithmetic.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _arrive(ctr_ptr):
    """This program's arrival: its stores issued (CTA barrier), then a GPU-scope release add."""
    tl.debug_barrier()
    tl.atomic_add(ctr_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _now(pid):
    """``%globaltimer`` (ns, int64) as this program reads it (GPU only: inline PTX; ``pid`` is
    the asm's dummy operand; impure, so each call reads the clock again)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [pid], dtype=tl.int64,
                                     is_pure=False, pack=1)  # fmt: skip


@triton.jit
def _stamp(tim_ptr, pid, idx, NT: tl.constexpr, TIMING: tl.constexpr):
    """With TIMING, this program's %globaltimer (ns) at event ``idx`` (GPU only: inline PTX).
    TIMING 2 (diagnostic): the clock is read but its store is predicated off (a never-true
    mask), so the asm stays in the code without any memory traffic — what the stamps' code
    alone changes in a kernel's schedule."""
    if TIMING == 2:
        now = _now(pid)
        tl.store(tim_ptr + pid * NT + idx, now, mask=now < 0)
    elif TIMING:
        tl.store(tim_ptr + pid * NT + idx, _now(pid))


@triton.jit
def _wait(ctr_ptr, target, failed, SPIN: tl.constexpr):
    """Polls (acquire) until ``target`` arrivals; returns ``failed`` or 1 on giving up."""
    seen = tl.atomic_add(ctr_ptr, 0, sem="acquire", scope="gpu")
    n = target * 0
    while (seen < target) & (n < SPIN):
        seen = tl.atomic_add(ctr_ptr, 0, sem="acquire", scope="gpu")
        n += 1
    tl.debug_barrier()
    return tl.where(seen < target, 1, failed)
