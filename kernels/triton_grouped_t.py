"""The grouped up kernel with the expert's rows as the tensor-core tile's M (tuning
``up_form="wx"``; written in the fifty-seventh session, not yet timed on a GPU).

Why: `triton_grouped._grouped_up_kernel` multiplies a gathered token tile ``x [128, d]`` by the
expert's interleaved slab ``[2G, d]`` as ``x · Wᵀ``: with 8 warps each warpgroup runs
``wgmma m64n64k16``, whose operands (2 KB + 2 KB from shared memory) feed only 64 × 64 × 16
products. Float8 rows of x (half the gathered L2 bytes) made that kernel slower (823 vs 691 µs
at the 8B prefill, H100, BENCHMARKS.md fifty-seventh session), so its limit is not the gathers'
L2 traffic alone; shared-memory traffic per product is the next candidate. Here the product is
``W · xᵀ``: the ``2G = 64`` expert rows are wgmma's M and the token tile its N, so one
warpgroup runs ``m64n128k16`` (128-token tiles) or ``m64n256k16`` (256), reading 3 or 2.5 KB of
shared memory per 64 × 64 × 16 products instead of 4 (the sm_90 lowering test pins the shape).

The expert's gate rows and up rows are read as two contiguous G-row blocks (rows ``[0, G)`` of
the tile are gate, ``[G, 2G)`` up). Inference only: the training forward's kernel (which also
keeps the pre-activations) stays `triton_grouped`'s.
"""

from __future__ import annotations

import triton
import triton.language as tl

from prunepath_jax.kernels.triton_decode import dot_f32
from prunepath_jax.kernels.triton_grouped import tile_tokens


@triton.jit
def grouped_up_t_kernel(
    x_ptr,  # [T, D] activations
    w_in_ptr,  # [2, F, D] gate/up weights, neuron-major
    gate_ptr,  # [T, E] f32 gates (0 where unselected)
    tok_ptr, off_ptr, cnt_ptr, tile_e_ptr, tile_m_ptr,  # `group_by_expert`'s lists and tiles
    a_ptr,  # out [T, F] gate * silu(g) * u in token order (zeroed by jax-triton's memset)
    T: tl.constexpr, D: tl.constexpr, E: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    F: tl.constexpr = E * G
    i = tl.program_id(0)
    e = tl.load(tile_e_ptr + i)
    if e < E:
        tok, rmask, gate = tile_tokens(gate_ptr, tok_ptr, off_ptr, cnt_ptr, tile_m_ptr, i, e, E,
                                       BLOCK_M)  # fmt: skip
        rn = tl.arange(0, 2 * G)
        w_row = (rn // G) * F * D + (e * G + rn % G) * D  # G gate rows, then G up rows
        acc = tl.zeros((2 * G, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_D):
            rk = k0 + tl.arange(0, BLOCK_D)
            kmask = rk < D
            wk = tl.load(w_in_ptr + w_row[:, None] + rk[None, :], mask=kmask[None, :], other=0.0)
            xk = tl.load(x_ptr + tok[:, None] * D + rk[None, :],
                         mask=rmask[:, None] & kmask[None, :], other=0.0)  # fmt: skip
            acc += dot_f32(wk, tl.trans(xk), DOT_F32, IEEE)
        g, u = tl.split(tl.permute(tl.reshape(acc, (2, G, BLOCK_M)), (1, 2, 0)))  # [G, M] each
        a = g / (1.0 + tl.exp(-g)) * u * gate[None, :]
        rg = tl.arange(0, G)
        tl.store(a_ptr + tok[None, :] * F + e * G + rg[:, None], a.to(a_ptr.dtype.element_ty),
                 mask=rmask[None, :])  # fmt: skip
