"""Triton decode kernels (t = 1..16 tokens): fused routing + union-of-experts sparse FFN.

One token at 1024 < d ≤ 4096 (decode at batch 1 of 1B-8B-class models): the split-K router
logits kernel below (+ one XLA sum), then one launch of ``triton_balanced.py`` (selection and
the work-balanced expert loop fused). Otherwise (2-16 tokens, small or wide layers, or
``experts="blocks"``) two launches per layer plus two tiny XLA fusions:

1. XLA: ``logits_te = x @ router`` (float32; a GEMV XLA already runs at bandwidth).
2. ``_up_kernel``, grid ``(E,)``: program e decides *for every token* whether expert e is
   selected -- without sorting: e's rank is the number of experts with a larger probability
   (ties: lower index first) and its inclusive cumulative mass is the sum of those experts'
   probabilities plus its own, an O(t*E) pass instead of a sort -- writes that column of the
   selection, and, if at least one token chose e, reads the expert's interleaved gate/up slab
   ``[2G, d]`` *once for all tokens* and writes ``a_tf[:, e*G:(e+1)*G] = gate * silu(g) * u``
   (exactly 0 for the tokens that did not choose e). Programs of experts no token chose only
   write their selection column and exit. So weights are read once per union member, never
   once per (token, expert).
3. ``_down_kernel``, grid ``(d / BLOCK_D, SPLIT)``: compacts the union of selected experts into
   an ascending active list (prefix sum over the selection, in each program: no host sync, no
   extra launch), then loops over its share of the active experts reading only their
   ``W_out`` rows, ``acc[t, d-tile] += a[t, G] @ W_out[e][G, d-tile]`` in float32.
4. XLA: ``y = sum of the SPLIT partials``, cast; ``k_t = row sums of the selection``.

The selection decides exactly like `routing.select` (same rank order and tie rule, the
``tau > 1`` rule, ``k_min``/``k_max`` clamps as a rank bound); only the float32 summation order
of the cumulative mass differs, so a token whose mass lands within ~1 ulp of tau can differ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from prunepath_jax import routing
from prunepath_jax.kernels import jt, triton_balanced

MAX_TOKENS = 16


@triton.jit
def expert_swiglu_rows(
    x_ptr,  # [T, D] activations
    rows,  # [M] i32 token rows to compute
    rmask,  # [M] which of them are real
    w_in_ptr,  # [2, F, D] gate/up weights, neuron-major
    e,  # the expert
    gate,  # [M] f32 per-token gate of expert e (0: not selected)
    D: tl.constexpr, F: tl.constexpr, G: tl.constexpr, M: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """``gate * silu(x W_gate[e]^T) * (x W_up[e]^T)`` for M token rows: ``[M, G]`` float32.

    Shared by the decode and the grouped (prefill) up kernels.
    """
    g, u = expert_gate_up_rows(x_ptr, rows, rmask, w_in_ptr, e, D, F, G, M, BLOCK_D, DOT_F32,
                               IEEE)  # fmt: skip
    return g / (1.0 + tl.exp(-g)) * u * gate[:, None]


@triton.jit
def expert_gate_up_rows(
    x_ptr,  # [T, D] activations
    rows,  # [M] i32 token rows to compute
    rmask,  # [M] which of them are real
    w_in_ptr,  # [2, F, D] gate/up weights, neuron-major
    e,  # the expert
    D: tl.constexpr, F: tl.constexpr, G: tl.constexpr, M: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """The pre-activations ``(x W_gate[e]^T, x W_up[e]^T)`` for M token rows: two ``[M, G]``
    float32 tiles (the grouped GEMM's training forward keeps them for the backward).

    Expert e's gate and up rows are read as one interleaved ``[2G, d]`` slab (even rows gate
    neuron n//2, odd rows up neuron), so one dot per d-tile serves both projections.
    """
    rn = tl.arange(0, 2 * G)
    w_row = (rn % 2) * F * D + (e * G + rn // 2) * D
    acc = gathered_rows_dot(x_ptr, rows, rmask, w_in_ptr, w_row, D, M, 2 * G, BLOCK_D, DOT_F32,
                            IEEE)  # fmt: skip
    g, u = tl.split(tl.reshape(acc, (M, G, 2)))
    return g, u


@triton.jit
def expert_gate_up_cols(
    x_ptr, rows, rmask, w_in_ptr, e,  # as `expert_gate_up_rows`
    D: tl.constexpr, F: tl.constexpr, G: tl.constexpr, M: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """`expert_gate_up_rows` transposed: two ``[G, M]`` float32 tiles, the product taken as
    ``W · xᵀ`` so that the expert's ``2G`` rows are the tensor-core tile's M and the tokens its
    N (the grouped up kernel's ``up_form="wx"``). The slab is read as G gate rows, then G up
    rows (each a contiguous block of ``w_in``)."""
    rn = tl.arange(0, 2 * G)
    w_row = (rn // G) * F * D + (e * G + rn % G) * D
    acc = gathered_rows_dot(x_ptr, rows, rmask, w_in_ptr, w_row, D, M, 2 * G, BLOCK_D, DOT_F32,
                            IEEE, True)  # fmt: skip
    g, u = tl.split(tl.permute(tl.reshape(acc, (2, G, M)), (1, 2, 0)))
    return g, u


@triton.jit
def gathered_rows_dot(
    x_ptr,  # [T, D] activations
    rows,  # [M] i32 rows of x to gather
    rmask,  # [M] which of them are real
    w_ptr,  # weights, D columns a row
    w_row,  # [N] each weight row's element offset
    D: tl.constexpr, M: tl.constexpr, N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, IEEE: tl.constexpr, W_FIRST: tl.constexpr = False,
):  # fmt: skip
    """``x[rows] · W[w_row]ᵀ``: ``[M, N]`` float32, streamed over D in ``BLOCK_D`` chunks (the
    up kernels' gate / up slabs, the grouped backward's ``dy W_outᵀ``). With ``W_FIRST`` the
    transposed product ``W[w_row] · x[rows]ᵀ``, ``[N, M]``: the weight rows become the
    tensor-core tile's M (`expert_gate_up_cols`)."""
    if W_FIRST:
        acc = tl.zeros((N, M), dtype=tl.float32)
    else:
        acc = tl.zeros((M, N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        rk = k0 + tl.arange(0, BLOCK_D)
        kmask = rk < D
        xk = tl.load(x_ptr + rows[:, None] * D + rk[None, :],
                     mask=rmask[:, None] & kmask[None, :], other=0.0)  # fmt: skip
        wk = tl.load(w_ptr + w_row[:, None] + rk[None, :], mask=kmask[None, :], other=0.0)
        if W_FIRST:
            acc += dot_f32(wk, tl.trans(xk), DOT_F32, IEEE)
        else:
            acc += dot_f32(xk, tl.trans(wk), DOT_F32, IEEE)
    return acc


@triton.jit
def dot_f32(a, b, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    """``a · b`` accumulated in float32: in float32 under the interpreter (``DOT_F32``: its
    16-bit dot is wrong, its float32 one exact), exact ``ieee`` for float32 inputs on a GPU
    (``IEEE``: no TF32), else on the tensor cores in the inputs' dtype."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _up_kernel(
    x_ptr,  # [T, D] bf16/f32 activations
    logits_ptr,  # [T, E] f32 router logits
    tau_ptr,  # [1] f32 budget
    w_in_ptr,  # [2, F, D] gate/up weights, neuron-major
    a_ptr,  # out [T, F] f32: gate * silu(g) * u, written for selected experts only
    sel_ptr,  # out [T, E] i32: 1 where token t selected expert e
    T: tl.constexpr, D: tl.constexpr, E: tl.constexpr, G: tl.constexpr,
    T_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    NUCLEUS: tl.constexpr, SIGMOID: tl.constexpr, K_MIN: tl.constexpr, K_MAX: tl.constexpr,
    DOT_F32: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    F: tl.constexpr = E * G
    e = tl.program_id(0)
    rt = tl.arange(0, T_PAD)
    re = tl.arange(0, E_PAD)
    tmask = rt < T
    emask = re < E
    # --- routing for expert e, every token at once ---------------------------------------
    lg = tl.load(logits_ptr + rt[:, None] * E + re[None, :], mask=tmask[:, None] & emask[None, :],
                 other=0.0)  # fmt: skip
    lg = tl.where(emask[None, :], lg, float("-inf"))
    mx = tl.max(lg, 1)
    ex = tl.exp(lg - mx[:, None])
    p = ex / tl.sum(ex, 1)[:, None]
    total = tl.sum(p, 1)
    is_e = re[None, :] == e
    p_e = tl.sum(tl.where(is_e, p, 0.0), 1)
    l_e = tl.sum(tl.where(is_e, lg, 0.0), 1)
    before = (p > p_e[:, None]) | ((p == p_e[:, None]) & (re[None, :] < e))
    before = before & emask[None, :]
    mass_before = tl.sum(tl.where(before, p, 0.0), 1)
    rank = tl.sum(before.to(tl.int32), 1)
    tau = tl.load(tau_ptr)
    thr = tl.where(tau > 1.0, 3.0, tau)  # tau > 1 selects every expert (masses are <= 1)
    if NUCLEUS:
        under = (mass_before / total) < thr
    else:
        under = ((mass_before + p_e) / total) < thr
    sel = ((rank < K_MIN) | (under & (rank < K_MAX))) & tmask
    tl.store(sel_ptr + rt * E + e, sel.to(tl.int32), mask=tmask)
    if SIGMOID:
        gate = tl.where(sel, 1.0 / (1.0 + tl.exp(-l_e)), 0.0)
    else:
        gate = tl.where(sel, 1.0, 0.0)
    # --- expert e's gate/up GEMV, only if some token chose it -----------------------------
    if tl.sum(sel.to(tl.int32), 0) > 0:
        a = expert_swiglu_rows(x_ptr, rt, tmask, w_in_ptr, e, gate, D, F, G, T_PAD, BLOCK_D,
                               DOT_F32, IEEE)  # fmt: skip
        rg = tl.arange(0, G)
        tl.store(a_ptr + rt[:, None] * F + e * G + rg[None, :], a, mask=tmask[:, None])


@triton.jit
def _down_kernel(
    a_ptr,  # [T, F] f32 activations of the selected experts (from _up_kernel)
    sel_ptr,  # [T, E] i32 selection
    w_out_ptr,  # [F, D] down weights, neuron-major
    y_ptr,  # out [SPLIT, T, D] f32 partial outputs
    list_ptr,  # out [n_programs, E_PAD] i32 scratch: each program's active-expert list
    T: tl.constexpr, D: tl.constexpr, E: tl.constexpr, G: tl.constexpr,
    T_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr,
    DOT_F32: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    F: tl.constexpr = E * G
    pd = tl.program_id(0)
    s = tl.program_id(1)
    pid = pd * SPLIT + s
    rt = tl.arange(0, T_PAD)
    re = tl.arange(0, E_PAD)
    tmask = rt < T
    sel = tl.load(sel_ptr + rt[:, None] * E + re[None, :],
                  mask=tmask[:, None] & (re < E)[None, :], other=0)  # fmt: skip
    flag = tl.max(sel, 0)  # union over the batch
    pos = tl.cumsum(flag, 0) - flag
    n_active = tl.sum(flag, 0)
    tl.store(list_ptr + pid * E_PAD + pos, re, mask=flag > 0)
    tl.debug_barrier()  # the list is read back by other threads of this program
    rd = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = rd < D
    rg = tl.arange(0, G)
    acc = tl.zeros((T_PAD, BLOCK_D), dtype=tl.float32)
    for i in range(s, n_active, SPLIT):
        e = tl.load(list_ptr + pid * E_PAD + i)
        a = tl.load(a_ptr + rt[:, None] * F + e * G + rg[None, :], mask=tmask[:, None], other=0.0)
        w = tl.load(w_out_ptr + (e * G + rg)[:, None] * D + rd[None, :], mask=dmask[None, :],
                    other=0.0)  # fmt: skip
        if DOT_F32:
            acc += tl.dot(a, w.to(tl.float32))
        elif IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a.to(w.dtype), w)
    tl.store(y_ptr + s * T * D + rt[:, None] * D + rd[None, :], acc,
             mask=tmask[:, None] & dmask[None, :])  # fmt: skip


@triton.jit
def _logits_kernel(
    x_ptr,  # [T, D] activations
    r_ptr,  # [D, E] f32 router
    out_ptr,  # out [S, T, E] f32 partial logits, one slab per split of D
    T: tl.constexpr, D: tl.constexpr, E: tl.constexpr, T_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, ROWS: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """Split-K router GEMV: program (s, j) multiplies rows ``[s·ROWS, (s+1)·ROWS)`` of router
    columns ``[j·BLOCK_E, ...)``. XLA's own ``[t, d] @ [d, E]`` at t = 1 reads the fp32 router at
    ~0.3 TB/s (BENCHMARKS.md); spread over ~200 programs the same bytes stream at bandwidth. The
    S partials are summed by one small XLA reduction (deterministic, unlike atomics)."""
    s = tl.program_id(0)
    j = tl.program_id(1)
    rt = tl.arange(0, T_PAD)
    re = j * BLOCK_E + tl.arange(0, BLOCK_E)
    tmask = rt < T
    emask = re < E
    acc = tl.zeros((T_PAD, BLOCK_E), dtype=tl.float32)
    for r0 in range(s * ROWS, s * ROWS + ROWS, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        rmask = rr < D
        x = tl.load(x_ptr + rt[:, None] * D + rr[None, :], mask=tmask[:, None] & rmask[None, :],
                    other=0.0).to(tl.float32)  # fmt: skip
        w = tl.load(r_ptr + rr[:, None] * E + re[None, :], mask=rmask[:, None] & emask[None, :],
                    other=0.0)  # fmt: skip
        if DOT_F32:  # the interpreter's numpy dot is exact float32 already
            acc += tl.dot(x, w)
        else:  # exact float32 (no TF32): routing ranks probabilities closer than a bf16 ulp
            acc += tl.dot(x, w, input_precision="ieee")
    tl.store(out_ptr + s * T * E + rt[:, None] * E + re[None, :], acc,
             mask=tmask[:, None] & emask[None, :])  # fmt: skip


def router_logits_triton(router_de, x_td, *, splits=32, block_r=64, block_e=64, num_warps=4,
                         interpret=False):  # fmt: skip
    """``x @ router`` ``[t, E]`` fp32 through the split-K Triton GEMV (t ≤ 16)."""
    t, d = x_td.shape
    e = router_de.shape[1]
    block_r = min(block_r, max(16, jt.next_pow2(d)))
    block_e = min(block_e, max(16, jt.next_pow2(e)))
    n_blocks = -(-d // block_r)
    rows = -(-n_blocks // min(splits, n_blocks)) * block_r  # rows per split, whole blocks
    n_s = -(-d // rows)
    (part,) = jt.triton_call(
        _logits_kernel, x_td, router_de,
        out_shape=[jax.ShapeDtypeStruct((n_s, t, e), jnp.float32)],
        grid=(n_s, -(-e // block_e)), num_warps=num_warps, num_stages=2, interpret=interpret,
        T=t, D=d, E=e, T_PAD=16, BLOCK_R=block_r, BLOCK_E=block_e, ROWS=rows,
        DOT_F32=bool(interpret),
    )  # fmt: skip
    return jnp.sum(part, axis=0)


# ``experts``: "auto" (one token at SMALL_D < d ≤ 4096: the fused one-token kernel of
# ``triton_balanced.py``, one launch after the logits; else the per-expert kernels), "balanced"
# or "blocks" (the two launches above). ``bal_*``: that kernel's neurons per unit, programs (0:
# two per SM) and warps.
# At d ≤ SMALL_D the fused kernel lost end to end (H200, batch 1, 75% sparse, µs per token,
# one run: SmolLM2-135M shape 1180 fused vs 1049 per-expert kernels; 1B 907 vs 1073; 8B 3186 vs
# 3400; BENCHMARKS.md tenth session): its per-program selection (a sort, a dozen block-wide
# reductions) is a fixed ~5 µs that small layers do not amortise. 4 warps: device µs per layer
# at 75% (traces, one run) 8B 31.1 vs 37.1 with 8 warps, 1B 13.2 vs 13.0.
SMALL_D = 1024
DEFAULT_TUNING = {
    "experts": "auto",
    "bal_block_n": 2,
    "bal_programs": 0,
    "bal_warps": 4,
    "block_d_up": 256,
    "block_d_down": 128,
    "split": 8,
    "warps_up": 4,
    "warps_down": 4,
    "stages_up": 3,
    "stages_down": 4,
    # "auto": the split-K Triton GEMV before the fused one-token kernel, XLA's dot otherwise.
    # Before the fused kernel (H200, batch 1, 75%, µs/token, one process): 8B 2964 with the
    # Triton GEMV vs 3150 with XLA's one-row fp32 dot (which XLA turns into a multiply + reduce
    # pair, 12.3 µs per layer) and 3008 with the dot fed two rows; 1B 958 vs 1000 / 1002.
    "logits": "auto",
}


# Per-token-count tuning applied before the caller's (benchmarks time variants of the whole
# model's layers with it; the jitted step fixes its tuning at trace time).
TUNING_OVERRIDES: dict[int, dict] = {}


def router_logits(
    router_de: jax.Array, x_td: jax.Array, how: str = "reduce", interpret: bool = False
) -> jax.Array:
    """``x @ router`` in float32 for a few tokens.

    ``"dot"`` is `routing.router_logits` (a HIGHEST-precision float32 dot); ``"reduce"`` writes
    the same product as a multiply + sum over d, which XLA emits as one column-reduction fusion
    spread over the whole GPU instead of a GEMV library call; ``"dot2"`` feeds the dot two copies
    of a single row, which keeps XLA from rewriting a one-row product into a multiply that writes
    a weight-sized temporary (`models.layers.matvec_safe_matmul`). Measured in
    benchmarks/sparse_decode.py --pick-logits (H200, 8B layer, batch 1): all three ~22 us per
    layer ("reduce" may materialise a [t, d, E] product at larger t). ``"triton"`` is the
    split-K kernel above (`router_logits_triton`): in the same comparison (2026-11-30, H200) it
    was no faster inside the per-expert Triton layer (8B, k = 1: 69 vs 91 us; k = 112: 156 vs
    132 us; the jax-triton launch costs ~6 us), so ``"dot"`` stays that layer's default; before
    the fused one-token kernel it is faster end to end (see ``DEFAULT_TUNING``) and the
    default. The Pallas path, whose launches are cheap, uses its own split-K kernel
    (`pallas_logits.py`).
    """
    if how == "triton":
        return router_logits_triton(router_de, x_td, interpret=interpret)
    if how == "dot":
        return routing.router_logits(router_de, x_td)
    if how == "dot2":
        if x_td.shape[0] != 1:
            return routing.router_logits(router_de, x_td)
        return routing.router_logits(router_de, jnp.concatenate([x_td, x_td], axis=0))[:1]
    if how != "reduce":
        raise ValueError(f"logits must be 'triton', 'dot', 'dot2' or 'reduce', got {how!r}")
    prod_tde = x_td.astype(jnp.float32)[:, :, None] * router_de.astype(jnp.float32)[None]
    return jnp.sum(prod_tde, axis=1)


def use_fused(t: int, d: int, group_size: int, tuning: dict) -> bool:
    """Whether the layer runs as the fused one-token kernel (``triton_balanced.py``)."""
    if tuning["experts"] == "balanced":
        return True
    return (
        tuning["experts"] == "auto" and d > SMALL_D
        and triton_balanced.supported(t, d, group_size, tuning["bal_block_n"])
    )  # fmt: skip


def sparse_ffn_decode(
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
    **tuning,
) -> tuple[jax.Array, jax.Array]:
    """One SwiGLU PrunePath FFN layer for t <= 16 tokens: ``(y_td in x's dtype, k_t int32)``.

    Same semantics as `kernels.reference.sparse_ffn_reference` (no biases, SiLU). Works under
    jit with tau traced; ``interpret=True`` runs the same kernels on CPU (eagerly).
    Tuning keys: see ``DEFAULT_TUNING``.
    """
    t, d = x_td.shape
    c, f, _ = w_in_cfd.shape
    g = group_size
    e = f // g
    if not 1 <= t <= MAX_TOKENS:
        raise ValueError(f"the decode kernel takes 1..{MAX_TOKENS} tokens, got {t}")
    if c != 2:
        raise ValueError("the decode kernel is SwiGLU only (w_in [2, f, d])")
    k_max = e if k_max is None else min(k_max, e)
    tn = {**DEFAULT_TUNING, **TUNING_OVERRIDES.get(t, {}), **tuning}
    unknown = set(tn) - set(DEFAULT_TUNING)
    if unknown:
        raise ValueError(f"unknown tuning keys {sorted(unknown)}")
    if tn["experts"] not in ("auto", "balanced", "blocks"):
        raise ValueError(f"experts must be 'auto', 'balanced' or 'blocks', got {tn['experts']!r}")
    fused = use_fused(t, d, g, tn)
    how = tn["logits"]
    if how == "auto":  # see DEFAULT_TUNING
        how = "triton" if fused else "dot"
    logits_te = router_logits(router_de, x_td, how, interpret)
    if fused:
        return triton_balanced.balanced_ffn_decode(
            x_td, logits_te, tau, w_in_cfd, w_out_fd, group_size=g, rule=rule, gate=gate,
            k_min=k_min, k_max=k_max, block_n=tn["bal_block_n"], programs=tn["bal_programs"],
            num_warps=tn["bal_warps"], interpret=interpret,
        )  # fmt: skip
    is_f32 = x_td.dtype == jnp.float32
    common = dict(T=t, D=d, E=e, G=g, T_PAD=16, E_PAD=max(16, jt.next_pow2(e)),
                  DOT_F32=bool(interpret), IEEE=bool(is_f32 and not interpret))  # fmt: skip
    tau_1 = jnp.reshape(jnp.asarray(tau, jnp.float32), (1,))
    a_tf, sel_te = jt.triton_call(
        _up_kernel, x_td, logits_te, tau_1, w_in_cfd,
        out_shape=[jax.ShapeDtypeStruct((t, f), jnp.float32),
                   jax.ShapeDtypeStruct((t, e), jnp.int32)],
        grid=(e,), num_warps=tn["warps_up"], num_stages=tn["stages_up"], interpret=interpret,
        BLOCK_D=min(tn["block_d_up"], max(16, jt.next_pow2(d))), NUCLEUS=rule == "nucleus",
        SIGMOID=gate == "sigmoid", K_MIN=k_min, K_MAX=k_max, **common,
    )  # fmt: skip
    block_d = min(tn["block_d_down"], max(16, jt.next_pow2(d)))
    n_d = -(-d // block_d)
    split = tn["split"]
    y_std, _ = jt.triton_call(
        _down_kernel, a_tf, sel_te, w_out_fd,
        out_shape=[jax.ShapeDtypeStruct((split, t, d), jnp.float32),
                   jax.ShapeDtypeStruct((n_d * split, common["E_PAD"]), jnp.int32)],
        grid=(n_d, split), num_warps=tn["warps_down"], num_stages=tn["stages_down"],
        interpret=interpret, BLOCK_D=block_d, SPLIT=split, **common,
    )  # fmt: skip
    y_td = jnp.sum(y_std, axis=0).astype(x_td.dtype)
    return y_td, jnp.sum(sel_te, axis=-1, dtype=jnp.int32)
