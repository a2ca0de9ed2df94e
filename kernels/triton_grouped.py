"""Thresholded grouped GEMM for many tokens (prefill, training forward): tokens grouped by expert.

Routing runs in XLA (`routing.select`: a sort per token is cheap next to the FFN at this size;
the router logits are `routing.router_logits`, the XLA path's own function: fp32-accurate, on
tensor cores for bf16 prompts on a GPU).
The grouping is computed on the device from the selection mask with prefix sums -- no host
synchronisation, so it works under jit -- and gives, per expert, the ascending list of tokens
that chose it, padded to ``BLOCK_M`` tiles. ``_grouped_up_kernel`` runs one program per
(expert, token tile): it gathers the tile's token rows of x, multiplies them with the expert's
interleaved gate/up slab ``[2G, d]`` (fp32 accumulation), applies ``gate * silu(g) * u`` and
scatters the result back into token order, ``a_tf[token, e*G:(e+1)*G]`` (every (token, expert)
slot is written by exactly one program, so no atomics; unselected slots stay 0: jax-triton
clears the output with a memset on the launch's stream, 27.5 µs at 4096 x 14336 bf16 on the
H200 against 70 µs for an XLA zeros fusion aliased into the kernel). The down projection is then
one dense GEMM ``a_tf @ W_out`` in XLA. (Zero programs in this kernel that wrote the unselected
slots instead of a memset were measured slower on the H200: the kernel went from 621 to 750 µs.)

Why the down projection is dense: a sparse down over random per-token expert sets has no
block structure to skip (a 64-token tile at 25% uses ~every expert), and per-(token, expert)
output rows would be k times the activation size. So the ideal speedup of this scheme is
3 / (2 * k/E + 1): 2x at k/E = 25%, not 4x.

x's rows in float8 e4m3 with a scale a row (half the gathered bytes; the kernel widened each
tile to bf16 before the dot) made this kernel slower, not faster: 823 against 691 µs at the 8B
prefill on an H100, plus 36 µs of quantizing (fifty-seventh session, `git show
3df5487:kernels/fp8_rows.py`). The gathers' L2 bytes alone do not bound it; removed.

Program count is static (jit): ``ceil(t * k_max / BLOCK_M) + E`` tiles bound the real count;
programs past the real tile count exit at once.

The training forward (`_experts`, a custom VJP): differentiated, the up kernel also scatters
the selected slots' gate and up pre-activations into a ``[2, t, f]`` array
(``_grouped_up_h_kernel``; zeroed only for ``backward="xla"``, see `_up`). The backward
computes ``dy W_outᵀ`` at the selected slots only, fused with the SwiGLU derivative and the
gates' gradient (`triton_grouped_bwd`, by default; ``backward="xla"``: a dense GEMM and
elementwise passes). The weight gradients are dense GEMMs over ``dh`` and the activations, 0
outside the selected slots (``weight_grads="grouped"``: each
expert's summed over its own tokens by `triton_grouped_bwd`'s kernel: 7.4 of the 13.2 ms of a
1B layer's full gradient where measured, more than the masked path's whole 8.2 ms). ``dx`` stays
a dense GEMM, as the forward's down projection. The undifferentiated call (prefill) launches
the plain kernel.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from prunepath_jax import routing
from prunepath_jax.kernels import jt
from prunepath_jax.kernels.reference import check_logits
from prunepath_jax.kernels.triton_decode import (
    expert_gate_up_cols,
    expert_gate_up_rows,
    expert_swiglu_rows,
)
from prunepath_jax.kernels.triton_group import (
    expert_tiles,
    kernel_slots,
    token_lists,
)
from prunepath_jax.kernels.triton_select import select_gates


@triton.jit
def tile_tokens(gate_ptr, tok_ptr, off_ptr, cnt_ptr, tile_m_ptr, i, e, E: tl.constexpr,
                BLOCK_M: tl.constexpr):  # fmt: skip
    """Program ``i``'s token tile of expert ``e`` (`group_by_expert`'s lists): ``(tok [M] i32,
    rmask [M], gate [M] f32)``; rows past the expert's count are masked (token 0, gate 0)."""
    m = tl.load(tile_m_ptr + i)
    cnt = tl.load(cnt_ptr + e)
    off = tl.load(off_ptr + e)
    rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < cnt
    tok = tl.load(tok_ptr + off + rows, mask=rmask, other=0)
    gate = tl.load(gate_ptr + tok * E + e, mask=rmask, other=0.0)
    return tok, rmask, gate


@triton.jit
def _grouped_tile(
    x_ptr, w_in_ptr, gate_ptr, tok_ptr, off_ptr, cnt_ptr, tile_e_ptr, tile_m_ptr, a_ptr, h_ptr,
    T: tl.constexpr, D: tl.constexpr, E: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    SAVE_H: tl.constexpr, W_FIRST: tl.constexpr,
):  # fmt: skip
    """One (expert, token tile) program of the up kernels; with ``SAVE_H`` it also scatters the
    pre-activations into ``h_ptr [2, T, F]`` (gate, up) for the training backward; with
    ``W_FIRST`` (inference) it takes the product as ``W · xᵀ`` (``up_form="wx"``)."""
    F: tl.constexpr = E * G
    i = tl.program_id(0)
    e = tl.load(tile_e_ptr + i)
    if e < E:
        tok, rmask, gate = tile_tokens(gate_ptr, tok_ptr, off_ptr, cnt_ptr, tile_m_ptr, i, e, E,
                                       BLOCK_M)  # fmt: skip
        rg = tl.arange(0, G)
        if SAVE_H:
            g, u = expert_gate_up_rows(x_ptr, tok, rmask, w_in_ptr, e, D, F, G, BLOCK_M,
                                       BLOCK_D, DOT_F32, IEEE)  # fmt: skip
            ty = h_ptr.dtype.element_ty
            h_g = h_ptr + tok[:, None] * F + e * G + rg[None, :]
            tl.store(h_g, g.to(ty), mask=rmask[:, None])
            tl.store(h_g + T * F, u.to(ty), mask=rmask[:, None])
            a = g / (1.0 + tl.exp(-g)) * u * gate[:, None]
        elif W_FIRST:
            g, u = expert_gate_up_cols(x_ptr, tok, rmask, w_in_ptr, e, D, F, G, BLOCK_M,
                                       BLOCK_D, DOT_F32, IEEE)  # fmt: skip
            a = tl.trans(g / (1.0 + tl.exp(-g)) * u) * gate[:, None]
        else:
            a = expert_swiglu_rows(x_ptr, tok, rmask, w_in_ptr, e, gate, D, F, G, BLOCK_M,
                                   BLOCK_D, DOT_F32, IEEE)  # fmt: skip
        tl.store(a_ptr + tok[:, None] * F + e * G + rg[None, :], a.to(a_ptr.dtype.element_ty),
                 mask=rmask[:, None])  # fmt: skip


@triton.jit
def _grouped_up_kernel(
    x_ptr,  # [T, D] activations
    w_in_ptr,  # [2, F, D] gate/up weights, neuron-major
    gate_ptr,  # [T, E] f32 gates (0 where unselected)
    tok_ptr,  # [T * K_MAX] i32 token ids grouped by expert
    off_ptr,  # [E] i32 start of each expert's group in tok
    cnt_ptr,  # [E] i32 tokens per expert
    tile_e_ptr,  # [N_TILES] i32 expert of each tile (E past the last real tile)
    tile_m_ptr,  # [N_TILES] i32 tile index inside its expert's group
    a_ptr,  # out [T, F] gate * silu(g) * u in token order (zeroed by jax-triton's memset)
    T: tl.constexpr, D: tl.constexpr, E: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    _grouped_tile(x_ptr, w_in_ptr, gate_ptr, tok_ptr, off_ptr, cnt_ptr, tile_e_ptr, tile_m_ptr,
                  a_ptr, a_ptr, T, D, E, G, BLOCK_M, BLOCK_D, DOT_F32, IEEE, False,
                  False)  # fmt: skip


@triton.jit
def _grouped_up_t_kernel(
    x_ptr, w_in_ptr, gate_ptr, tok_ptr, off_ptr, cnt_ptr, tile_e_ptr, tile_m_ptr,
    a_ptr,  # out [T, F] as `_grouped_up_kernel`
    T: tl.constexpr, D: tl.constexpr, E: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """`_grouped_up_kernel` with the product as ``W · xᵀ`` (``up_form="wx"``): the expert's
    ``2G = 64`` rows are wgmma's M and the token tile its N, so one warpgroup runs
    ``m64n128k16`` (128-token tiles) or ``m64n256k16`` (256) in place of ``m64n64k16``, reading
    3 or 2.5 KB of shared memory per 64 × 64 × 16 products instead of 4. Why it was tried:
    float8 rows of x (half the gathered L2 bytes) made the kernel slower, so the gathers'
    bytes are not its limit alone. Measured (H100, 8B prefill, 4096 tokens): 256-token tiles
    at 8 warps (two warpgroups of m64n128k16, `WX_LAYOUT`) 2.4% faster than `_grouped_up_kernel`
    (675 against 691-695 µs); one warpgroup of m64n256k16 702 µs and 128-token tiles 707-713,
    slower. So shared-memory reads per product do not bound it either."""
    _grouped_tile(x_ptr, w_in_ptr, gate_ptr, tok_ptr, off_ptr, cnt_ptr, tile_e_ptr, tile_m_ptr,
                  a_ptr, a_ptr, T, D, E, G, BLOCK_M, BLOCK_D, DOT_F32, IEEE, False,
                  True)  # fmt: skip


@triton.jit
def _grouped_up_h_kernel(
    x_ptr, w_in_ptr, gate_ptr, tok_ptr, off_ptr, cnt_ptr, tile_e_ptr, tile_m_ptr,
    a_ptr,  # out [T, F] as `_grouped_up_kernel`
    h_ptr,  # out [2, T, F] the selected slots' gate / up pre-activations (others: see `_up`)
    T: tl.constexpr, D: tl.constexpr, E: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    _grouped_tile(x_ptr, w_in_ptr, gate_ptr, tok_ptr, off_ptr, cnt_ptr, tile_e_ptr, tile_m_ptr,
                  a_ptr, h_ptr, T, D, E, G, BLOCK_M, BLOCK_D, DOT_F32, IEEE, True,
                  False)  # fmt: skip


# The fastest of the measured tunings (H200, 4096 tokens, 8B shape, k/E = 25%, BENCHMARKS.md
# issue 5): 128-token tiles, 64-wide d steps, 4 stages (2102 µs per layer vs 2325 with 64-token
# tiles and 3 stages); 8 warps over 4: the grouped kernel 605.8 vs 618.0 device µs (2026-12-01,
# one run; 738 vs 750 in another with a since-reverted variant of the kernel).
# ``router_logits``: "shared" (`routing.router_logits`, the function every path calls: the XLA
# path's logits bit for bit at the same input, so the same experts; on a GPU, bf16 activations of
# >= 64 tokens take its tensor-core split: 69 instead of 332 µs at 4096 tokens), or, for
# measurements, "fp32" (always the fp32 GEMM) and "bf16x3" (always the split). A logits function
# other than the XLA path's sums in another order, which can move a token across its τ
# boundary; through the layers the prompts' selections then drift apart (measured on SmolLM2 at
# τ = 0.5, batch 8: equal k_t in 11 of 30 layers when only this path took the split).
# ``expert_group``: the programs' order (`group_by_expert`); 0 = expert by expert, "auto" =
# `auto_expert_group` (from the shapes and the L2 size). Measured (H200, fiftieth session): 8B
# prefill at 4096 tokens (auto: 0), the up kernel 607.6 µs expert by expert, 615.5 / 635.8 in
# groups of 32 / 112; a 1B layer at 16384 tokens (auto: 128), expert by expert / groups of 128:
# up 984 / 874 µs, up with h 1052 / 914, backward 1068 / 786.
# ``weight_grads`` (with ``backward="grouped"``): the weight gradients as dense XLA GEMMs over
# dh / the activations (0 outside the selected slots, so the same sums), "xla", or by the
# grouped weight-gradient kernel, "grouped". Measured (H200, 1B layer, 16384 tokens, k/E 0.33,
# fiftieth session): the kernel takes 7.39 ms of the full gradient's 13.2 ms, while the masked
# path's whole full gradient, dense weight-gradient GEMMs included, takes 8.2 ms.
# ``selection``: who decides each token's experts from the logits. "xla" (`routing.select`: a
# per-token sort of the probabilities, its scan, the mask built by XLA; 74 µs for the sort alone
# at 4096 tokens x 448 experts on an H100) or "triton" (`triton_select.select_gates`, the decode
# kernels' selection: one program a token, softmax, `tl.sort`, scan and clamps in registers).
# Both apply the same rule; their sums run in different orders, so a token whose mass sits within
# ~1 float32 ulp of τ may take one expert more or less (decode already selects this way). The
# default since the fifty-fifth session (H100, 8B layer, 4096 tokens, k/E 0.25: 1459.6 device
# µs against 1524.3 with XLA's sort; fp32 generation gives XLA's tokens exactly, GPU tests).
# ``select_block_t`` / ``select_warps``: the Triton selection's launch layout, tokens and warps a
# program (`benchmarks/select_kernel.py`, H100, µs at 4096 x 448 / 16384 x 256 / 4096 x 48:
# 1 x 8 warps 52.4 / 109.2 / 20.4, 4 x 4 31.1 / 47.6 / 6.9, 8 x 8 29.6 / 48.1 / 6.9; XLA's
# selection 122.1 / 228.6 / 29.3). ``select_counts``: the selection kernel also counts each
# expert's tokens (atomic adds), which `group_by_expert` then takes instead of reducing the mask
# itself: "atomic" (adds into one [E] row; H100, 8B layer: removes the 37 µs mask reduction
# `input_compare_reduce_fusion`, costs the selection kernel 20 µs, net 14.6 µs, s73a) or "partial"
# (a row a program, summed by XLA). ``grouping``: who writes the token lists, "xla"
# (`group_by_expert`: transpose, cumsum over the tokens, scatter) or "triton"
# (`triton_group.kernel_slots`, from the selection kernel's per-program counts; H100, 8B layer,
# 1431.7 device µs against 1466.7 with XLA's lists, at 8 tokens a selection program; 1425.3 at
# 16; whole 8B prompt pass 83.5 ms against 84.2-86.6, s74b), or "auto" (the default since the
# fifty-sixth session): "triton" where it can run (the Triton selection, ``select_counts`` off),
# else "xla". (The per-program counts summed by XLA instead of the selection kernel were 47 µs
# slower, a 62 µs reduction fusion against the kernel's 15 µs column sum, s74b; removed.)
# ``up_form``: the up kernel's product, "xw" (`_grouped_up_kernel`: x · Wᵀ) or "wx"
# (`_grouped_up_t_kernel`: W · xᵀ, the expert's rows as the tensor-core tile's M; inference
# only: the training forward keeps "xw"), both at the tuning's tiles, or "auto": the
# undifferentiated call (prefill) as `auto_up_form` says, "wx" at `WX_LAYOUT`'s tiles instead of
# the tuning's; the training forward "xw" at the tuning's. The default is "xw": "auto" was the
# default in the fifty-eighth session (1.3% faster whole 8B prompt pass), but `WX_LAYOUT`'s own
# GPU tests (`test_grouped_tunings_on_gpu[*-wx_m256w8]`, `..._selects_the_xla_paths_experts_on_
# gpu[wx]`) have not run: no device could be had in the fifty-ninth session. Stage s76b runs
# them; once they pass, "auto" can be the default again.
DEFAULT_TUNING = {"block_m": 128, "block_d": 64, "warps": 8, "stages": 4, "router_logits": "shared",
                  "backward": "grouped", "weight_grads": "xla", "expert_group": "auto",
                  "selection": "triton", "select_block_t": 8, "select_warps": 8,
                  "select_counts": False, "grouping": "auto", "up_form": "xw"}  # fmt: skip
_BACKWARDS = ("grouped", "xla")
_GROUPINGS = ("auto", "xla", "triton")
_UP_FORMS = ("auto", "xw", "wx")
# ``up_form="auto"``'s prefill tiles for "wx": 256 tokens, 8 warps (two warpgroups of wgmma
# m64n128k16, each half the token tile), 3 stages. H100, 8B prefill layer at 4096 tokens, k/E
# 0.25, three runs: up kernel 674.5-676.8 device µs against 691.0-695.1 for "xw" at 128 / 8
# warps, layer 1407-1413 against 1426-1428, prompt pass 81.2-82.5 ms against 81.8-84.4 (s75c,
# s76a). At 4 warps (one warpgroup of m64n256k16): 701.6 µs, slower.
WX_LAYOUT = {"block_m": 256, "warps": 8, "stages": 3}
WX_MIN_TOKENS = 4096  # the measured size; see `auto_up_form`
_SELECTIONS = ("xla", "triton")
_WEIGHT_GRADS = ("xla", "grouped")
_LOGITS = {
    "shared": routing.router_logits,
    "fp32": routing.router_logits_fp32,
    "bf16x3": routing.router_logits_bf16x3,
}


# The L2 cache of the GPUs the grouped kernels were measured on (H100 and H200: 50 MB).
L2_BYTES = 50 * 2**20


def auto_expert_group(t: int, d: int, g: int, itemsize: int = 2, l2_bytes: int = L2_BYTES) -> int:
    """The program order that keeps the up kernel's reads in L2 (``expert_group`` "auto").

    Why: while x [t, d] fits in L2 with room for the weights in flight, expert by expert (0)
    reads x once from HBM and each slab once. Past that, groups of G experts ordered by token
    read x once a group, if the group's slabs (2 G rows of d each) stay in L2 meanwhile. An LRU
    model of a 50 MB L2 (`scripts/l2_order_model.py`) puts the best G where a group's slabs take
    ~32 MB: 1B (d 2048) at 16384 / 32768 tokens, G 128: 0.20 / 0.34 GB from HBM against 1.81 /
    7.69 expert by expert; 8B (d 4096) at 8192 / 16384 tokens, G 64: 0.70 / 1.17 GB against
    2.65 (G 128: 3.53, its slabs 64 MB). At 8B and 4096 tokens (x 32 MB) expert by expert is
    the least (0.27 GB). So: 0 while x takes at most 0.64 of L2, else the largest power of two
    G whose slabs take at most 0.64 of L2 (at least 1).
    """
    budget = int(0.64 * l2_bytes)
    if t * d * itemsize <= budget:
        return 0
    slab = 2 * g * d * itemsize
    return 1 << max(0, (budget // slab).bit_length() - 1)


def resolve_expert_group(expert_group, t: int, d: int, g: int, itemsize: int) -> int:
    """The tuning's ``expert_group`` as the int `group_by_expert` takes ("auto": from the
    shapes), or a ValueError for anything else (a bool or a float included)."""
    eg = auto_expert_group(t, d, g, itemsize) if expert_group == "auto" else expert_group
    if not isinstance(eg, int) or isinstance(eg, bool) or eg < 0:
        raise ValueError(f"expert_group must be an int >= 0 or 'auto', got {expert_group!r}")
    return eg


class _Launch(NamedTuple):
    """The static part of one grouped-GEMM call (hashable: `_experts`' nondiff argument)."""

    g: int
    block_m: int
    block_d: int
    warps: int
    stages: int
    interpret: bool
    backward: str
    weight_grads: str
    up_form: str = "xw"
    expert_group: int = 0


def auto_up_form(t: int, itemsize: int) -> str:
    """``up_form="auto"``'s prefill product: "wx" (at `WX_LAYOUT`) for 16-bit inputs of at
    least `WX_MIN_TOKENS` tokens, else "xw".

    Why not below: each expert's last tile is padded, on average half a tile. At 4096 tokens
    and k/E 0.25 an expert has ~1024 tokens, so 256-token tiles do ~12.5% padding work against
    ~6% at 128, and "wx" still wins by 2.4% (measured); that makes it ~8% faster per useful
    token, and the padding alone would cancel that near 2900 tokens (not measured). More
    tokens only favour it. fp32 inputs double the tile's registers and shared memory
    (untimed), so they keep "xw"."""
    return "wx" if itemsize == 2 and t >= WX_MIN_TOKENS else "xw"


def _up(st: _Launch, x_td, w_in_cfd, gate_te, grouping, save_h: bool):
    """The grouped up kernel: ``(a_tf,)``, or ``(a_tf, h_ctf)`` with ``save_h``.

    ``a_tf`` is zeroed first (the dense down projection reads every slot). ``h_ctf`` only for
    ``backward="xla"``, whose elementwise passes read every slot: the grouped backward kernels
    read the selected slots alone, and `_dense_weight_grads` selects rather than multiplies by
    the gates, so the other slots may hold anything (a 512 MB memset fewer per 1B layer at
    16 384 tokens)."""
    t, d = x_td.shape
    f = w_in_cfd.shape[1]
    is_f32 = x_td.dtype == jnp.float32
    out = [jax.ShapeDtypeStruct((t, f), x_td.dtype)]
    if save_h:
        out.append(jax.ShapeDtypeStruct((2, t, f), x_td.dtype))
    if save_h:  # the training forward: its launch is always "xw" (`sparse_ffn_grouped`)
        kernel = _grouped_up_h_kernel
    else:
        kernel = _grouped_up_t_kernel if st.up_form == "wx" else _grouped_up_kernel
    return jt.triton_call(
        kernel, x_td, w_in_cfd, gate_te,
        *grouping, out_shape=out, zeroed_outputs=(0, 1) if st.backward == "xla" else (0,),
        grid=(grouping[3].shape[0],), num_warps=st.warps, num_stages=st.stages,
        interpret=st.interpret, T=t, D=d, E=f // st.g, G=st.g, BLOCK_M=st.block_m,
        BLOCK_D=st.block_d, DOT_F32=st.interpret, IEEE=is_f32 and not st.interpret,
    )  # fmt: skip


def _mm(spec: str, a, b, out=None):
    """fp32-accumulated matmul in the operands' dtype (``HIGHEST`` for fp32, as the XLA path).

    ``out``: the result's dtype (None: float32). Where it is the operands' own dtype, the GEMM
    writes it from its fp32 accumulator directly: the same rounding as a float32 result and a
    convert, without the convert's pass over the result (in a 1B layer's kernel-path gradient
    at 16 384 tokens on an H100, three such passes of up to 128 MB each: the forward's ``y``,
    ``dx`` and ``dW_in``, from the optimized HLO)."""
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    direct = out is not None and a.dtype == b.dtype == jnp.dtype(out)
    y = jnp.einsum(spec, a, b, precision=prec,
                   preferred_element_type=out if direct else jnp.float32)  # fmt: skip
    return y if out is None or direct else y.astype(out)


def _grouping(st: _Launch, lists, t: int):
    """`group_by_expert`'s five arrays: the token lists ``(tok, off_e, cnt_e)`` and the
    (expert, token tile) of each program at ``st``'s tile height and program order."""
    return (*lists, *expert_tiles(*lists, t, st.block_m, st.expert_group))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _experts(st: _Launch, infer: _Launch, x_td, gate_te, w_in_cfd, w_out_fd, lists):
    """``Σ_e gate_te · W_out[e]ᵀ (silu(x W_gate[e]ᵀ) ⊙ x W_up[e]ᵀ)`` over each token's selected
    experts (``lists``: `token_lists`' output): ``y_td`` in x's dtype.

    ``infer``: the undifferentiated call's launch (prefill), ``st`` the training forward's
    and backward's. They may differ (``up_form="auto"``), so each tiles the lists itself."""
    grouping = _grouping(infer, lists, x_td.shape[0])
    (a_tf,) = _up(infer, x_td, w_in_cfd, gate_te, grouping, save_h=False)
    return _mm("tf,fd->td", a_tf, w_out_fd, out=x_td.dtype)


def _experts_fwd(st, infer, x_td, gate_te, w_in_cfd, w_out_fd, lists):
    # Under differentiation the up kernel also scatters the selected slots' pre-activations:
    # the backward then needs no second pass over W_in (unselected slots stay 0).
    grouping = _grouping(st, lists, x_td.shape[0])
    a_tf, h_ctf = _up(st, x_td, w_in_cfd, gate_te, grouping, save_h=True)
    y_td = _mm("tf,fd->td", a_tf, w_out_fd, out=x_td.dtype)
    return y_td, (x_td, gate_te, w_in_cfd, w_out_fd, h_ctf, grouping)


def _dense_weight_grads(x_td, dy_td, h_ctf, dh_tcf, gate_te, g: int, w_dtypes):
    """``(dW_in [2, f, d], dW_out [f, d])`` as dense GEMMs: ``dh`` and the gated activation
    are 0 outside the selected slots, so summing over every token gives each expert's sum over
    its own tokens (cuBLAS at full tensor-core rate beats the grouped kernel's gathered rows
    down to a low k/E). ``h`` is not zeroed outside them (`_up`): the activation is selected
    where the gate is nonzero, never multiplied by a 0 gate (0 * NaN is NaN)."""
    hg = h_ctf[0].astype(jnp.float32)
    gate_tf = jnp.repeat(gate_te, g, axis=-1)
    a_tf = hg * jax.nn.sigmoid(hg) * h_ctf[1].astype(jnp.float32) * gate_tf
    a_tf = jnp.where(gate_tf != 0, a_tf, 0.0).astype(x_td.dtype)
    dw_out = _mm("tf,td->fd", a_tf, dy_td, out=w_dtypes[1])
    return _mm("tcf,td->cfd", dh_tcf, x_td, out=w_dtypes[0]), dw_out


def _experts_bwd(st, infer, res, dy_td):
    """``dh`` and the gates' gradient from the grouped backward kernel (``backward="grouped"``,
    `triton_grouped_bwd`: ``dy W_outᵀ`` at the selected slots) or in XLA (``"xla"``: a dense
    GEMM and elementwise passes over ``[t, f]``); the weights' as dense GEMMs
    (`_dense_weight_grads`) or, with ``weight_grads="grouped"`` and the grouped backward, each
    expert's summed over its tokens by a kernel; then ``dx = dh W_in``, a dense GEMM over an
    array that is 0 outside the selected slots (the down projection's argument: no block to
    skip). The gates' gradient is 0 where unselected: the forward never reads those gates."""
    x_td, gate_te, w_in_cfd, w_out_fd, h_ctf, grouping = res
    t, e = gate_te.shape
    dt = x_td.dtype
    if st.backward == "grouped":
        from prunepath_jax.kernels import triton_grouped_bwd as bwd  # it imports this module

        kw = dict(g=st.g, block_m=st.block_m, block_d=st.block_d, warps=st.warps,
                  stages=st.stages, interpret=st.interpret)  # fmt: skip
        dh_tcf, dgate_te = bwd.grouped_backward(dy_td, w_out_fd, h_ctf, gate_te, grouping, **kw)
    else:
        hg, hu = h_ctf[0].astype(jnp.float32), h_ctf[1].astype(jnp.float32)
        sg = jax.nn.sigmoid(hg)
        act_tf = hg * sg
        u_tf = act_tf * hu  # the ungated activation: 0 at unselected slots
        da_tf = _mm("td,fd->tf", dy_td, w_out_fd)
        dgate_te = jnp.sum((da_tf * u_tf).reshape(t, e, st.g), axis=-1)
        dga_tf = da_tf * jnp.repeat(gate_te, st.g, axis=-1)
        # token-major, as the kernel's: dx's GEMM below then needs no transpose
        dh_tcf = jnp.stack([dga_tf * hu * sg * (1.0 + hg * (1.0 - sg)), dga_tf * act_tf], axis=1)
        dh_tcf = dh_tcf.astype(dt)
    w_dtypes = (w_in_cfd.dtype, w_out_fd.dtype)
    if st.backward == "grouped" and st.weight_grads == "grouped":
        dw_in, dw_out = bwd.grouped_weight_grads(x_td, dy_td, h_ctf, dh_tcf, gate_te, grouping,
                                                 w_dtypes, **kw)  # fmt: skip
    else:
        dw_in, dw_out = _dense_weight_grads(x_td, dy_td, h_ctf, dh_tcf, gate_te, st.g, w_dtypes)
    dx = _mm("tcf,cfd->td", dh_tcf, w_in_cfd, out=dt)
    return dx, dgate_te, dw_in, dw_out, None


_experts.defvjp(_experts_fwd, _experts_bwd)


def kernel_selection(logits_te, tau, rule, k_min: int, k_max: int, interpret: bool,
                     block_t: int = 1, warps: int = 8, counts: bool | str = False):  # fmt: skip
    """``(mask8_te i8 [t, E], k_t i32 [t], cnt)`` from the Triton selection kernel (tuning
    ``selection="triton"``, launched ``block_t`` tokens and ``warps`` warps a program): the
    mask as 1 / 0 bytes; ``cnt`` the per-expert counts ``i32 [E]`` with ``counts`` "atomic" or
    "partial", their per-program table ``[programs, E]`` with "table", else None. The
    selection is discrete, so its input is cut from the gradient (jax-triton's call has no JVP
    rule); the gates stay differentiable through the caller's `routing.gates`. With gate "none"
    the kernel writes exactly 1 where selected, 0 elsewhere, as int8 bytes."""
    out = select_gates(jax.lax.stop_gradient(logits_te), tau, rule=rule, gate="none",
                       k_min=k_min, k_max=k_max, block_t=block_t, warps=warps,
                       out_dtype=jnp.int8, counts=counts, interpret=interpret)  # fmt: skip
    return out[0], out[1], out[2] if counts else None


def sparse_ffn_grouped(
    x_td: jax.Array,
    router_de: jax.Array,
    w_in_cfd: jax.Array,
    w_out_fd: jax.Array,
    tau,
    *,
    group_size: int,
    rule: routing.Rule = "paper",
    gate: routing.GateMode = "sigmoid",
    k_min: int = 1,
    k_max: int | None = None,
    interpret: bool = False,
    logits_te: jax.Array | None = None,
    **tuning,
) -> tuple[jax.Array, jax.Array]:
    """One SwiGLU PrunePath FFN layer for any number of tokens: ``(y_td, k_t int32)``.

    Differentiable (the training forward): ``y_td``'s gradients reach ``x_td``, ``router_de``
    (through the sigmoid gates and the router logits), ``w_in_cfd`` and ``w_out_fd``; see
    `_experts`. ``tau`` and the selection are discrete and get none, as in the XLA path.

    ``logits_te`` (float32 ``[t, E]``): the router logits of ``x_td`` when the caller has them
    (the model layer computes them for its routing statistics). The training step then has one
    logits product per layer, and its backward one pair, fed the statistics' and the gates'
    cotangents summed, instead of two (``router_de`` gets its gradient through the caller's
    logits).
    """
    t, d = x_td.shape
    c, f, _ = w_in_cfd.shape
    g = group_size
    e = f // g
    if c != 2:
        raise ValueError("the grouped GEMM is SwiGLU only (w_in [2, f, d])")
    if t * f >= 2**31:  # the kernel's token-order offsets are int32
        raise ValueError(f"the grouped GEMM takes t * f < 2**31 ({t} tokens x {f}): split the "
                         "tokens into smaller calls")  # fmt: skip
    tn = {**DEFAULT_TUNING, **tuning}
    unknown = set(tn) - set(DEFAULT_TUNING)
    if unknown:
        raise ValueError(f"unknown tuning keys {sorted(unknown)}")
    k_max = e if k_max is None else min(k_max, e)
    if tn["router_logits"] not in _LOGITS:
        raise ValueError(f"router_logits must be one of {sorted(_LOGITS)}: {tn['router_logits']!r}")
    if logits_te is None:
        logits_te = _LOGITS[tn["router_logits"]](router_de, x_td)
    elif tn["router_logits"] != "shared":
        raise ValueError(f"router_logits={tn['router_logits']!r} picks how the layer computes its "
                         "logits; with logits_te given it computes none")  # fmt: skip
    else:
        check_logits(logits_te, t, e)
    if tn["selection"] not in _SELECTIONS:
        raise ValueError(f"selection must be one of {_SELECTIONS}, got {tn['selection']!r}")
    if tn["backward"] not in _BACKWARDS:
        raise ValueError(f"backward must be one of {_BACKWARDS}, got {tn['backward']!r}")
    if tn["weight_grads"] not in _WEIGHT_GRADS:
        raise ValueError(f"weight_grads must be one of {_WEIGHT_GRADS}, got "
                         f"{tn['weight_grads']!r}")  # fmt: skip
    eg = resolve_expert_group(tn["expert_group"], t, d, g, x_td.dtype.itemsize)  # validates
    if tn["grouping"] not in _GROUPINGS:
        raise ValueError(f"grouping must be one of {_GROUPINGS}, got {tn['grouping']!r}")
    if tn["up_form"] not in _UP_FORMS:
        raise ValueError(f"up_form must be one of {_UP_FORMS}, got {tn['up_form']!r}")
    fits = tn["selection"] == "triton" and not tn["select_counts"]
    by_kernel = tn["grouping"] == "triton" or (tn["grouping"] == "auto" and fits)
    if by_kernel and not fits:
        raise ValueError("grouping='triton' takes the Triton selection's per-program counts: it "
                         "needs selection='triton' and select_counts False")  # fmt: skip
    if tn["selection"] == "triton":
        mask8_te, k_t, cnt = kernel_selection(
            logits_te, tau, rule, k_min, k_max, interpret, tn["select_block_t"], tn["select_warps"],
            "table" if by_kernel else tn["select_counts"],
        )  # fmt: skip
        mask_te = mask8_te != 0
    else:
        sel = routing.select(logits_te, tau, rule=rule, k_min=k_min, k_max=k_max)
        mask_te, k_t, cnt = sel.mask_te, sel.k_t, None
    gate_te = routing.gates(logits_te, mask_te, gate)  # differentiable: σ of the logits
    # the training launch: "wx" is inference only
    static = _Launch(g, tn["block_m"], min(tn["block_d"], max(16, jt.next_pow2(d))), tn["warps"],
                     tn["stages"], interpret, tn["backward"], tn["weight_grads"], "xw",
                     eg)  # fmt: skip
    form, layout = tn["up_form"], {}  # the prefill launch: "auto" also picks its tiles
    if form == "auto":
        form = auto_up_form(t, x_td.dtype.itemsize)
        layout = WX_LAYOUT if form == "wx" else {}
    infer = static._replace(up_form=form, **layout)
    if by_kernel:
        lists = kernel_slots(mask8_te, cnt, tn["select_block_t"], k_max, interpret)
    else:
        lists = token_lists(mask_te, k_max, cnt)
    return _experts(static, infer, x_td, gate_te, w_in_cfd, w_out_fd, lists), k_t
