"""The grouped GEMM's backward kernel: ``dy W_outᵀ`` only at the selected slots, fused with the
SwiGLU derivative and the gates' gradient.

Why. Differentiated, the training forward (`triton_grouped._experts`) leaves the selected
slots' gate / up pre-activations ``h [2, t, f]`` (0 elsewhere). The XLA backward then computes
``da = dy W_outᵀ`` as a dense ``[t, f]`` float32 GEMM and several elementwise passes over
``[t, f]`` float32 arrays, though only k/E of the slots matter. This kernel runs on the forward's
grouping (one program per (expert, token tile), as the up kernel): it gathers the tile's rows of
``dy``, multiplies them with the expert's ``[G, d]`` rows of ``W_out`` (fp32 accumulation), and
with the tile's ``h`` writes

* ``dh [t, 2, f]``: ``da · gate · u · silu'(g)`` and ``da · gate · silu(g)`` (x's dtype; 0 at the
  unselected slots: jax-triton's memset), the operand of ``dx = dh W_in``, which stays a dense
  GEMM (random per-token expert sets leave it no block to skip, as the forward's down
  projection). Token-major, so that GEMM contracts one contiguous ``2f`` axis against
  ``W_in [2f, d]``: laid out ``[2, t, f]`` as ``h``, XLA transposed it first (363 µs of a 1B
  layer's gradient at 16 384 tokens on an H100, fifty-first session's profiles);
* ``dgate [t, E]``: ``Σ_g da · silu(g) · u`` (float32; 0 where unselected, where the forward never
  read the gate).

Every (token, expert) slot is written by exactly one program: no atomics.

The weight gradients (``_grouped_dw_kernel``, full training): one program per (expert, column
block) sums ``dhᵀ x`` and ``aᵀ dy`` (``a`` recomputed from ``h``) over that expert's tokens only —
the reduction runs over the grouping's token list, so each weight element is one program's.
Router-only training never reads them, and under jit the launch is dropped. ``dx = dh W_in``
stays a dense XLA GEMM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from prunepath_jax.kernels import jt
from prunepath_jax.kernels.triton_decode import dot_f32, gathered_rows_dot
from prunepath_jax.kernels.triton_grouped import tile_tokens


@triton.jit
def dh_slots(tok, e, F: tl.constexpr, G: tl.constexpr):
    """``[M, G]`` offsets of expert e's gate-half slots of ``dh [T, 2, F]`` for tokens ``tok``
    (the up half is ``+ F``). int64: ``2 t f`` may pass 2³¹ where the guard's ``t f`` does not."""
    return tok[:, None].to(tl.int64) * (2 * F) + e * G + tl.arange(0, G)[None, :]


@triton.jit
def _grouped_bwd_kernel(
    dy_ptr,  # [T, D] the output's cotangent
    w_out_ptr,  # [F, D] down weights, neuron-major
    h_ptr,  # [2, T, F] the forward's gate / up pre-activations (read at the selected slots)
    gate_ptr,  # [T, E] f32 gates
    tok_ptr,  # [T * K_MAX] i32 token ids grouped by expert (`group_by_expert`)
    off_ptr,  # [E] i32 start of each expert's group in tok
    cnt_ptr,  # [E] i32 tokens per expert
    tile_e_ptr,  # [N_TILES] i32 expert of each tile (E past the last real tile)
    tile_m_ptr,  # [N_TILES] i32 tile index inside its expert's group
    dh_ptr,  # out [T, 2, F] (zeroed by jax-triton's memset)
    dgate_ptr,  # out [T, E] f32 (zeroed)
    T: tl.constexpr, D: tl.constexpr, E: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    F: tl.constexpr = E * G
    i = tl.program_id(0)
    e = tl.load(tile_e_ptr + i)
    if e < E:
        tok, rmask, gate = tile_tokens(gate_ptr, tok_ptr, off_ptr, cnt_ptr, tile_m_ptr, i, e, E,
                                       BLOCK_M)  # fmt: skip
        rg = tl.arange(0, G)
        da = gathered_rows_dot(dy_ptr, tok, rmask, w_out_ptr, (e * G + rg) * D, D, BLOCK_M, G,
                               BLOCK_D, DOT_F32, IEEE)  # fmt: skip
        slot = h_ptr + tok[:, None] * F + e * G + rg[None, :]
        hg = tl.load(slot, mask=rmask[:, None], other=0.0).to(tl.float32)
        hu = tl.load(slot + T * F, mask=rmask[:, None], other=0.0).to(tl.float32)
        sg = 1.0 / (1.0 + tl.exp(-hg))
        act = hg * sg
        tl.store(dgate_ptr + tok * E + e, tl.sum(da * act * hu, axis=1), mask=rmask)
        dga = da * gate[:, None]
        ty = dh_ptr.dtype.element_ty
        out = dh_ptr + dh_slots(tok, e, F, G)
        tl.store(out, (dga * hu * sg * (1.0 + hg * (1.0 - sg))).to(ty), mask=rmask[:, None])
        tl.store(out + F, (dga * act).to(ty), mask=rmask[:, None])


@triton.jit
def _grouped_dw_kernel(
    x_ptr,  # [T, D] the forward's input
    dy_ptr,  # [T, D] the output's cotangent
    h_ptr,  # [2, T, F] the forward's pre-activations
    dh_ptr,  # [T, 2, F] their cotangents (`_grouped_bwd_kernel`)
    gate_ptr,  # [T, E] f32 gates
    tok_ptr,  # [T * K_MAX] i32 token ids grouped by expert
    off_ptr,  # [E] i32 start of each expert's group in tok
    cnt_ptr,  # [E] i32 tokens per expert
    dw_in_ptr,  # out [2, F, D]
    dw_out_ptr,  # out [F, D]
    T: tl.constexpr, D: tl.constexpr, E: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Program (e, j): expert e's weight gradients on columns ``[j·BLOCK_D, (j+1)·BLOCK_D)``,
    ``dW_in[:, e] = dhᵀ x`` and ``dW_out[e] = aᵀ dy`` summed over the expert's tokens only (an
    expert no token chose gets zeros); every output element is one program's."""
    F: tl.constexpr = E * G
    e = tl.program_id(0)
    rk = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    kmask = rk < D
    cnt = tl.load(cnt_ptr + e)
    off = tl.load(off_ptr + e)
    rg = tl.arange(0, G)
    acc_g = tl.zeros((G, BLOCK_D), dtype=tl.float32)
    acc_u = tl.zeros((G, BLOCK_D), dtype=tl.float32)
    acc_o = tl.zeros((G, BLOCK_D), dtype=tl.float32)
    for m0 in range(0, cnt, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < cnt
        tok = tl.load(tok_ptr + off + rows, mask=rmask, other=0)
        gate = tl.load(gate_ptr + tok * E + e, mask=rmask, other=0.0)
        slot = tok[:, None] * F + e * G + rg[None, :]
        dslot = dh_slots(tok, e, F, G)
        dhg = tl.load(dh_ptr + dslot, mask=rmask[:, None], other=0.0)
        dhu = tl.load(dh_ptr + F + dslot, mask=rmask[:, None], other=0.0)
        hg = tl.load(h_ptr + slot, mask=rmask[:, None], other=0.0).to(tl.float32)
        hu = tl.load(h_ptr + T * F + slot, mask=rmask[:, None], other=0.0).to(tl.float32)
        a = (hg / (1.0 + tl.exp(-hg)) * hu * gate[:, None]).to(dhg.dtype)
        tmask = rmask[:, None] & kmask[None, :]
        xk = tl.load(x_ptr + tok[:, None] * D + rk[None, :], mask=tmask, other=0.0)
        dyk = tl.load(dy_ptr + tok[:, None] * D + rk[None, :], mask=tmask, other=0.0)
        acc_g += dot_f32(tl.trans(dhg), xk, DOT_F32, IEEE)
        acc_u += dot_f32(tl.trans(dhu), xk, DOT_F32, IEEE)
        acc_o += dot_f32(tl.trans(a), dyk, DOT_F32, IEEE)
    w = (e * G + rg[:, None]) * D + rk[None, :]
    ty = dw_in_ptr.dtype.element_ty
    tl.store(dw_in_ptr + w, acc_g.to(ty), mask=kmask[None, :])
    tl.store(dw_in_ptr + F * D + w, acc_u.to(ty), mask=kmask[None, :])
    tl.store(dw_out_ptr + w, acc_o.to(dw_out_ptr.dtype.element_ty), mask=kmask[None, :])


def grouped_weight_grads(
    x_td: jax.Array, dy_td: jax.Array, h_ctf: jax.Array, dh_tcf: jax.Array, gate_te: jax.Array,
    grouping, w_dtypes, *, g: int, block_m: int, block_d: int, warps: int, stages: int,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """``(dW_in [2, f, d], dW_out [f, d])`` in ``w_dtypes`` (the weights' own), each expert's
    summed over its tokens only (``grouping``: the forward's `group_by_expert` output)."""
    t, d = x_td.shape
    f = h_ctf.shape[2]
    tok, off, cnt = grouping[:3]
    is_f32 = x_td.dtype == jnp.float32
    return jt.triton_call(
        _grouped_dw_kernel, x_td, dy_td, h_ctf, dh_tcf, gate_te, tok, off, cnt,
        out_shape=[jax.ShapeDtypeStruct((2, f, d), w_dtypes[0]),
                   jax.ShapeDtypeStruct((f, d), w_dtypes[1])],
        grid=(f // g, -(-d // block_d)), num_warps=warps, num_stages=stages,
        interpret=interpret, T=t, D=d, E=f // g, G=g, BLOCK_M=block_m, BLOCK_D=block_d,
        DOT_F32=interpret, IEEE=is_f32 and not interpret,
    )  # fmt: skip


def grouped_backward(
    dy_td: jax.Array, w_out_fd: jax.Array, h_ctf: jax.Array, gate_te: jax.Array, grouping,
    *, g: int, block_m: int, block_d: int, warps: int, stages: int, interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """``(dh_tcf in h's dtype, dgate_te f32)`` of one grouped-GEMM layer (module docstring);
    ``grouping`` is the forward's `group_by_expert` output at the same ``block_m``."""
    t, d = dy_td.shape
    f = w_out_fd.shape[0]
    is_f32 = dy_td.dtype == jnp.float32
    return jt.triton_call(
        _grouped_bwd_kernel, dy_td, w_out_fd, h_ctf, gate_te, *grouping,
        out_shape=[jax.ShapeDtypeStruct((t, 2, f), h_ctf.dtype),
                   jax.ShapeDtypeStruct(gate_te.shape, jnp.float32)],
        zeroed_outputs=(0, 1), grid=(grouping[3].shape[0],), num_warps=warps,
        num_stages=stages, interpret=interpret, T=t, D=d, E=f // g, G=g, BLOCK_M=block_m,
        BLOCK_D=block_d, DOT_F32=interpret, IEEE=is_f32 and not interpret,
    )  # fmt: skip
