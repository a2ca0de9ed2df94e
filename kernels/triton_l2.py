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


@triton.jit
def l2_prefetch(ptr, n, LINES: tl.constexpr, STEP: tl.constexpr):
    """L2 prefetch of ``ptr[0:n]`` (``n`` > 0), at most ``LINES`` lines of ``STEP`` elements
    (``STEP`` = 128 bytes / element size) from the start."""
    l2_lines(ptr + tl.minimum(tl.arange(0, LINES) * STEP, n - 1))  # no address past the range
