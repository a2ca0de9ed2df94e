"""The grouped GEMM's token lists by expert and its programs' (expert, token tile) order.

Two ways to write the lists: `group_by_expert` in XLA from the ``[t, E]`` mask (a transpose, a
cumsum over the tokens for every expert, a scatter of the token ids), and `kernel_slots`, one
Triton launch after the selection kernel; `expert_tiles` orders the programs for either. In the 8B
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


def group_by_expert(mask_te: jax.Array, k_max: int, block_m: int, expert_group: int = 0,
                    cnt_e: jax.Array | None = None):  # fmt: skip
    """Device-side grouping of (token, expert) pairs by expert, with prefix sums (``cnt_e``:
    the per-expert counts when the selection kernel already made them).

    Returns ``(tok [t*k_max] i32, off_e, cnt_e, tile_e [n_tiles], tile_m [n_tiles])``; tiles
    past the real count have ``tile_e == E`` (and come last).

    ``expert_group`` sets the order the programs run in (program i takes tile i). 0: expert
    by expert (every tile of expert 0, then of expert 1, ...). G > 0: in groups of G
    consecutive experts, and inside a group by each tile's first token, so the programs on
    the GPU at one time read the rows of one window of tokens and the slabs of G experts. Why:
    expert by expert, the ~132 programs in flight cover all the tokens of a few experts,
    which are rows spread over all of x; once x outgrows the L2 cache (16384 tokens of d 2048
    are 64 MB), every expert reads its rows from HBM again.
    """
    tok, off_e, cnt_e = token_lists(mask_te, k_max, cnt_e)
    return tok, off_e, cnt_e, *expert_tiles(tok, off_e, cnt_e, mask_te.shape[0], block_m,
                                            expert_group)  # fmt: skip


def token_lists(mask_te: jax.Array, k_max: int, cnt_e: jax.Array | None = None):
    """``(tok [t*k_max] i32, off_e [E] i32, cnt_e [E] i32)``: `group_by_expert`'s token lists
    without its tiles (they depend on ``block_m``, which the caller may pick later)."""
    t, e = mask_te.shape
    m_et = mask_te.T.astype(jnp.int32)
    if cnt_e is None:
        cnt_e = jnp.sum(m_et, axis=1, dtype=jnp.int32)
    off_e = jnp.cumsum(cnt_e, dtype=jnp.int32) - cnt_e
    pos_et = jnp.cumsum(m_et, axis=1, dtype=jnp.int32) - 1
    n_slots = t * k_max
    slot_et = jnp.where(m_et > 0, off_e[:, None] + pos_et, n_slots)
    tok_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (e, t))
    tok = jnp.zeros((n_slots,), jnp.int32).at[slot_et.ravel()].set(tok_ids.ravel(), mode="drop")
    return tok, off_e, cnt_e


def expert_tiles(tok, off_e, cnt_e, t: int, block_m: int, expert_group: int = 0):
    """``(tile_e [n_tiles], tile_m [n_tiles])``: the (expert, token tile) of each program, in
    `group_by_expert`'s order, from the token lists ``tok [t * k_max]`` (``off_e``, ``cnt_e``:
    each expert's start and length in them)."""
    e = cnt_e.shape[0]
    n_slots = tok.shape[0]
    tiles_e = (cnt_e + block_m - 1) // block_m
    tile_end_e = jnp.cumsum(tiles_e, dtype=jnp.int32)
    n_tiles = -(-n_slots // block_m) + e
    idx = jnp.arange(n_tiles, dtype=jnp.int32)
    # searchsorted(tile_end_e, idx, side="right") as one compare-and-count fusion: jnp's
    # searchsorted is a device while loop on GPU (~9 steps of small kernels at E = 448).
    tile_e = jnp.sum(tile_end_e[None, :] <= idx[:, None], axis=1, dtype=jnp.int32)
    start = jnp.take(tile_end_e - tiles_e, jnp.minimum(tile_e, e - 1))
    tile_m = idx - start
    if expert_group > 0:
        real = tile_e < e
        first = jnp.take(tok, jnp.where(real, jnp.take(off_e, jnp.minimum(tile_e, e - 1))
                                        + tile_m * block_m, 0))  # fmt: skip
        key = jnp.where(real, (tile_e // expert_group) * t + first, (e // expert_group + 1) * t)
        order = jnp.argsort(key, stable=True)  # ties (one token, several experts): by expert
        tile_e, tile_m = tile_e[order], tile_m[order]
    return tile_e, tile_m


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
