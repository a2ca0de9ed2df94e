"""PrunePath selection + gates for a few tokens as one Pallas-Triton kernel, without a sort.

Why. XLA's version of ``routing.select`` is a softmax, a sort, a cumulative sum and a scatter:
several launches per layer, which at decode cost about as much as reading a sparse 8B layer's
experts (DESIGN.md §5). Here one launch turns the router logits into the gate table the expert
kernel consumes.

How, without sorting. Rank experts by (p descending, index ascending), as the reference's stable
sort does. For expert e and token t:

* ``rank(e)  = #{j : p_j > p_e or (p_j == p_e and j < e)}``
* ``S(e)     = Σ_j p_j [p_j > p_e or (p_j == p_e and j ≤ e)]``  (inclusive cumulative mass)
* ``S⁻(e)    = S(e) − p_e`` as a sum over the strictly-ahead experts (exclusive mass)

Both are O(E) per expert, so a program owning ``BE`` experts does ``t·BE·E`` compare-adds (a few
µs of ALU for the whole grid at E = 448, t = 16), and programs run in parallel. Because the
cumulative mass is non-decreasing in rank, ``rank(e) < #{i : c_i < τ}`` ⇔ ``S(e)/Z < τ``, so with
``k = clip(count, k_min, k_max)``:

    selected(e) ⇔ rank(e) < k_min  or  (rank(e) < k_max  and  (τ > 1  or  c(e) < τ))

with ``c = S/Z`` for the paper rule and ``S⁻/Z`` for the nucleus rule, ``Z = Σ_j p_j`` (the
reference normalises its cumulative sum by its last entry the same way). The sums here and the
reference's scan round differently, so a mass within ~1 float32 ulp of τ may fall on the other
side (the reference's own docstring says the same of itself); everywhere else the sets agree.

Output: the gate table ``[tp, ep]`` (σ(logit) or 1 for selected experts, 0 otherwise and for
padding); ``k_t`` is its count of non-zeros per token (a selected gate is kept ≥ the smallest
normal float, so it never reads as 0). An earlier version also returned ``k_t`` as a second,
aliased output accumulated with int32 atomics: on the H200 (jax 0.11.2) that output came back
all zeros while the interpreter was right, so the kernel has one output now.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

NEG = -1e30  # padding logit: exp() underflows to exactly 0, no inf - inf = NaN
TINY = float(jnp.finfo(jnp.float32).tiny)  # smallest normal float32


def _route_kernel(logits_ref, tau_ref, gate_ref, *, t, e, be, bj, rule, gate, k_min, k_max):
    """Program j: experts ``[j*be, (j+1)*be)`` of every token. logits ``[tp, ep]`` fp32."""
    tp, ep = logits_ref.shape
    pid = pl.program_id(0)
    lg_te = logits_ref[...]  # [tp, ep] (small: t ≤ 16 rows)
    m_t = jnp.max(lg_te, axis=1)
    z_t = jnp.sum(jnp.exp(lg_te - m_t[:, None]), axis=1)  # Σ exp; p = exp / z

    cols = pl.ds(pl.multiple_of(pid * be, be), be)
    lg_tb = plgpu.load(logits_ref.at[:, cols])  # [tp, be] own experts
    p_tb = jnp.exp(lg_tb - m_t[:, None]) / z_t[:, None]
    e_b = pid * be + jax.lax.broadcasted_iota(jnp.int32, (tp, be), 1)  # expert ids

    def body(i, carry):
        rank, mass = carry
        jcols = pl.ds(pl.multiple_of(i * bj, bj), bj)
        p_tj = jnp.exp(plgpu.load(logits_ref.at[:, jcols]) - m_t[:, None]) / z_t[:, None]
        j_idx = i * bj + jax.lax.broadcasted_iota(jnp.int32, (tp, be, bj), 2)
        pj = p_tj[:, None, :]
        pe = p_tb[:, :, None]
        ahead = (pj > pe) | ((pj == pe) & (j_idx < e_b[:, :, None]))  # strictly ahead
        rank += jnp.sum(ahead.astype(jnp.int32), axis=2)
        mass += jnp.sum(jnp.where(ahead, pj, 0.0), axis=2)
        return rank, mass

    init = (jnp.zeros((tp, be), jnp.int32), jnp.zeros((tp, be), jnp.float32))
    rank_tb, ahead_tb = jax.lax.fori_loop(0, ep // bj, body, init)
    zsum_t = jnp.sum(jnp.exp(lg_te - m_t[:, None]) / z_t[:, None], axis=1)  # Σ p (≈ 1)
    mass_tb = ahead_tb + p_tb if rule == "paper" else ahead_tb
    tau = jnp.sum(tau_ref[...])  # [1] -> scalar
    below = (mass_tb / zsum_t[:, None]) < tau
    sel = (rank_tb < k_min) | ((rank_tb < k_max) & ((tau > 1.0) | below))
    real = (e_b < e) & (jax.lax.broadcasted_iota(jnp.int32, (tp, be), 0) < t)
    sel = sel & real
    if gate == "sigmoid":
        # A selected gate never reads as 0 (σ underflows below logit ≈ -88): the table alone then
        # says which experts are selected, so k and the union need no second output. The
        # change is ≤ 1.2e-38 per gate, far below any tolerance.
        sig = jnp.maximum(1.0 / (1.0 + jnp.exp(-lg_tb)), TINY)
        g_tb = jnp.where(sel, sig, 0.0)
    else:
        g_tb = jnp.where(sel, 1.0, 0.0)
    gate_ref[...] = g_tb.astype(jnp.float32)


def route_gates_pallas(
    logits_te: jax.Array,
    tau: jax.Array,
    *,
    tp: int,
    ep: int,
    rule: str = "paper",
    gate: str = "sigmoid",
    k_min: int = 1,
    k_max: int | None = None,
    interpret: bool = False,
    block_e: int = 16,
    num_warps: int = 4,
) -> tuple[jax.Array, jax.Array]:
    """Gate table ``[tp, ep]`` fp32 and ``k_t`` int32 ``[t]`` from logits ``[t, e]`` (fp32).

    ``tp ≥ t`` and ``ep ≥ e`` are powers of two (padding rows/experts get gate 0). Same
    selection as ``routing.select`` + ``routing.gates`` (see the module docstring for the one
    rounding caveat). Must be called under jit with static ``tp, ep, rule, gate, k_min, k_max``.
    """
    t, e = logits_te.shape
    if rule not in ("paper", "nucleus"):
        raise ValueError(f"rule must be 'paper' or 'nucleus', got {rule!r}")
    if gate not in ("sigmoid", "none"):
        raise ValueError(f"gate mode must be 'sigmoid' or 'none', got {gate!r}")
    k_max = e if k_max is None else min(k_max, e)
    if not 1 <= k_min <= k_max:
        raise ValueError(f"need 1 <= k_min <= k_max, got {k_min}, {k_max}")
    be = min(block_e, ep)
    bj = max(1, min(ep, 4096 // (tp * be)))  # [tp, be, bj] compare tile in registers
    lg = jnp.full((tp, ep), NEG, jnp.float32).at[:t, :e].set(logits_te.astype(jnp.float32))
    tau_1 = jnp.reshape(jnp.asarray(tau, jnp.float32), (1,))
    kern = functools.partial(
        _route_kernel, t=t, e=e, be=be, bj=bj, rule=rule, gate=gate, k_min=k_min, k_max=k_max
    )
    gate_te = pl.pallas_call(
        kern,
        out_shape=jax.ShapeDtypeStruct((tp, ep), jnp.float32),
        grid=(ep // be,),
        in_specs=[
            pl.BlockSpec((tp, ep), lambda i: (0, 0)),  # logits, whole (small)
            pl.BlockSpec((1,), lambda i: (0,)),  # tau
        ],
        out_specs=pl.BlockSpec((tp, be), lambda i: (0, i)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="prunepath_route_select",
    )(lg, tau_1)
    k_t = jnp.sum(gate_te[:t] != 0.0, axis=1, dtype=jnp.int32)
    return gate_te, k_t
