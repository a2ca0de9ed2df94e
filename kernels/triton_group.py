"""The grouped prefill's token lists by expert, written by one Triton launch after the selection.

Why: `triton_grouped.group_by_expert` builds the lists in XLA from the ``[t, E]`` mask: a
transpose, a cumsum over the tokens for every expert, a scatter of the token ids. In the 8B
prefill layer (4096 tokens x 448 experts, H100, fifty-sixth session) those are ~40 µs of fusions
next to a 26 µs selection kernel. The selection kernel already holds its ``BLOCK_T`` tokens'
selections; with its per-program counts (``select_gates(counts="table")``: ``cnt [P, E]``, P
programs) the first slot of program p's tokens in expert e's list is
``off_e + Σ_{q < p} cnt[q, e]``, a cumsum over P = t / BLOCK_T rows instead of t, and each program
of this kernel writes its own block's slots: a token's rank among the block's tokens that took e
is a cumsum over ``BLOCK_T`` rows in registers. Within an expert the tokens come in ascending
order, as XLA's lists have them, so the two groupings are equal slot for slot.

Only the slots ``[off_e, off_e + cnt_e)`` are written; the rest of ``tok`` is left as it was
allocated (the up and backward kernels read a tile's rows under ``rows < cnt_e``; the interpreter
poisons the rest with -1, so a read of one would fail the tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from prunepath_jax.kernels import jt


@triton.jit
def _slots_kernel(mask_ptr, base_ptr, tok_ptr, T: tl.constexpr, E: tl.constexpr,
                  E_PAD: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
    """Program p: tokens ``[p * BLOCK_T, +BLOCK_T)`` of the ``[T, E]`` mask (nonzero:
    selected) into their slots of ``tok``, from ``base [P, E]``, program p's first slot in each
    expert's list."""
    p = tl.program_id(0)
    tt = p * BLOCK_T + tl.arange(0, BLOCK_T)
    re = tl.arange(0, E_PAD)
    inside = (tt[:, None] < T) & (re[None, :] < E)
    m = tl.load(mask_ptr + tt[:, None] * E + re[None, :], mask=inside, other=0)
    m = (m != 0).to(tl.int32)
    rank = tl.cumsum(m, 0) - m  # among the block's tokens that took the same expert
    base = tl.load(base_ptr + p * E + re, mask=re < E, other=0)
    tok = tt[:, None] + 0 * re[None, :]
    tl.store(tok_ptr + base[None, :] + rank, tok, mask=inside & (m != 0))


def kernel_slots(mask_te: jax.Array, cnt_pe: jax.Array, block_t: int, k_max: int,
                 interpret: bool = False):  # fmt: skip
    """``(tok [t * k_max] i32, off_e [E] i32, cnt_e [E] i32)`` as `group_by_expert`'s first three
    outputs, from the selection kernel's mask ``[t, E]`` (any dtype, nonzero = selected) and its
    per-program counts ``cnt_pe [P, E]`` at ``block_t`` tokens a program."""
    t, e = mask_te.shape
    n_prog = -(-t // block_t)
    if cnt_pe.shape != (n_prog, e):
        raise ValueError(f"cnt_pe must be [{n_prog}, {e}] (one row a program of {block_t} "
                         f"tokens), got {cnt_pe.shape}")  # fmt: skip
    cnt_e = jnp.sum(cnt_pe, axis=0, dtype=jnp.int32)
    off_e = jnp.cumsum(cnt_e, dtype=jnp.int32) - cnt_e
    base_pe = off_e[None, :] + jnp.cumsum(cnt_pe, axis=0, dtype=jnp.int32) - cnt_pe
    (tok,) = jt.triton_call(
        _slots_kernel, mask_te, base_pe.astype(jnp.int32),
        out_shape=[jax.ShapeDtypeStruct((t * k_max,), jnp.int32)], grid=(n_prog,),
        num_warps=4, num_stages=1, interpret=interpret, T=t, E=e,
        E_PAD=max(16, jt.next_pow2(e)), BLOCK_T=block_t,
    )  # fmt: skip
    return tok, off_e, cnt_e
