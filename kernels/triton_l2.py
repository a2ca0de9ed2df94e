"""L2 prefetch from Triton: cache lines asked for without registers or shared memory.

Why. A persistent kernel (``triton_megastep``) waits at a grid barrier between phases; what a
program loads into registers before it waits is limited by its register budget (one ~32 KB
chunk), and Triton's ``cp.async`` pipelines start only when the loop does. ``prefetch.global.L2``
is fire-and-forget: a program can ask for a few hundred KB of its next phase's weights (or KV
cache) right after it arrives, and DRAM streams them into L2 while the barrier is still closed.

GPU only (inline PTX): the callers turn it off for the Triton interpreter.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def l2_lines(ptrs):
    """``prefetch.global.L2`` of the line holding each address of the pointer tensor ``ptrs``
    (every address must be inside an allocation)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip


BULK_SEG = tl.constexpr(16 * 1024)  # bytes of one bulk prefetch request (l2_bulk)


@triton.jit
def l2_bulk(ptr, nbytes, LINES: tl.constexpr):
    """``cp.async.bulk.prefetch.L2`` of the first ``min(nbytes, LINES·128)`` bytes at ``ptr``:
    thread 0 hands ``BULK_SEG``-byte requests to the SM's copy engine (TMA), so the ask costs one
    instruction a request instead of one a line and no other thread does anything. ``ptr`` and
    ``nbytes`` must be multiples of 16 (the plan checks the rows' bytes)."""
    base = ptr.to(tl.pointer_type(tl.int8))
    want = tl.minimum(nbytes, LINES * 128)
    for i in tl.static_range((LINES * 128 + BULK_SEG - 1) // BULK_SEG):
        size = tl.minimum(want - i * BULK_SEG, BULK_SEG)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
            "setp.gt.and.s32 p, $2, 0, p; @p cp.async.bulk.prefetch.L2.global [$1], $2; "
            "mov.u32 $0, 0; }",
            "=r,l,r", [base + i * BULK_SEG, size], dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip


@triton.jit
def l2_prefetch(ptr, n, LINES: tl.constexpr, STEP: tl.constexpr, BULK: tl.constexpr):
    """L2 prefetch of ``ptr[0:n]`` (``n`` > 0), at most ``LINES`` lines of ``STEP`` elements
    (``STEP`` = 128 bytes / element size) from the start: one ``prefetch.global.L2`` a line, or
    with ``BULK`` as bulk requests (``l2_bulk``; sm_90)."""
    if BULK:
        l2_bulk(ptr, n * (128 // STEP), LINES)
    else:
        l2_lines(ptr + tl.minimum(tl.arange(0, LINES) * STEP, n - 1))  # nothing past the range
