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

from prunepath_jax.kernels import pallas_pdl

try:
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

NEG = -1e30  # padding logit: exp() underflows to exactly 0, no inf - inf = NaN
TINY = float(jnp.finfo(jnp.float32).tiny)  # smallest normal float32


def _logits(lg_ref, c0, w, *, n_part, stride, e):
    """Logits ``[tp, w]`` of experts ``[c0, c0 + w)``: the sum of the ``n_part`` partials
    (split ``s`` at columns ``s·stride + c``), experts ≥ E set to NEG. The partials are added
    elementwise in the same order everywhere, so an expert's logit is bitwise the same in every
    tile that holds it (the rank's tie rule compares them with ``==``)."""
    acc = plgpu.load(lg_ref.at[:, pl.ds(c0, w)])
    for s in range(1, n_part):
        acc = acc + plgpu.load(lg_ref.at[:, pl.ds(s * stride + c0, w)])
    col = c0 + jax.lax.broadcasted_iota(jnp.int32, acc.shape, 1)
    return jnp.where(col < e, acc, NEG)  # padding columns: zeros, or unwritten partials


def _route_kernel(lg_ref, tau_ref, *out_refs, t, e, ep, be, bj, n_part, rule, gate, k_min,
                  k_max):  # fmt: skip
    """Program j: experts ``[j*be, (j+1)*be)`` of every token (``tp ≤ 16`` rows).

    ``out_refs``: the gate table ``[tp, ep]``, and optionally a ``[rows, cols]`` fp32 buffer this
    kernel zeroes (program j its ``cols/n_programs`` columns) for the expert kernel's atomic
    accumulator: one memset launch fewer per layer."""
    gate_ref = out_refs[0]
    ld = functools.partial(_logits, lg_ref, n_part=n_part, stride=ep, e=e)
    lg_te = ld(0, ep)  # [tp, ep], small
    tp = lg_te.shape[0]
    pid = pl.program_id(0)
    m_t = jnp.max(lg_te, axis=1)
    z_t = jnp.sum(jnp.exp(lg_te - m_t[:, None]), axis=1)  # Σ exp; p = exp / z

    c_own = pl.multiple_of(pid * be, be)
    lg_tb = ld(c_own, be)  # [tp, be] own experts
    p_tb = jnp.exp(lg_tb - m_t[:, None]) / z_t[:, None]
    e_b = pid * be + jax.lax.broadcasted_iota(jnp.int32, (tp, be), 1)  # expert ids

    def body(i, carry):
        rank, mass = carry
        p_tj = jnp.exp(ld(pl.multiple_of(i * bj, bj), bj) - m_t[:, None]) / z_t[:, None]
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
    tau = jnp.sum(plgpu.load(tau_ref.at[pl.ds(0, 1)]))  # [1] -> scalar
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
    plgpu.store(gate_ref.at[:, pl.ds(c_own, be)], g_tb.astype(jnp.float32))
    if len(out_refs) > 1:
        z_ref = out_refs[1]
        zr, zc = z_ref.shape[0], z_ref.shape[1] // (ep // be)
        cols = pl.ds(pl.multiple_of(pid * zc, zc), zc)
        plgpu.store(z_ref.at[:, cols], jnp.zeros((zr, zc), jnp.float32))


def zeroable(shape: tuple[int, int], ep: int, block_e: int = 16) -> bool:
    """Whether the selection kernel can zero a ``shape`` fp32 buffer: its columns split into
    one power-of-two share per program."""
    n_prog = ep // min(block_e, ep)
    zc = shape[1] // n_prog
    return (
        shape[1] % n_prog == 0 and zc >= 1 and zc & (zc - 1) == 0 and shape[0] & (shape[0] - 1) == 0
    )


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
    The logits are one "partial" (the kernel masks the padding columns itself).
    """
    t, e = logits_te.shape
    lg = jnp.pad(logits_te.astype(jnp.float32), ((0, tp - t), (0, ep - e)))
    gate_te, k_t, _ = route_gates_from_partials(
        lg, 1, tau, t=t, e=e, ep=ep, rule=rule, gate=gate, k_min=k_min, k_max=k_max,
        interpret=interpret, block_e=block_e, num_warps=num_warps,
    )  # fmt: skip
    return gate_te, k_t


def route_gates_from_partials(
    part_tp: jax.Array,
    n_part: int,
    tau: jax.Array,
    *,
    t: int,
    e: int,
    ep: int,
    rule: str = "paper",
    gate: str = "sigmoid",
    k_min: int = 1,
    k_max: int | None = None,
    zeros: tuple[int, int] | None = None,
    interpret: bool = False,
    block_e: int = 16,
    num_warps: int = 4,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """As ``route_gates_pallas``, from the router-logit kernel's unreduced partials.

    Args:
        part_tp: ``[tp, n_part·ep]`` fp32 from ``pallas_logits.router_logits_partials(...,
            stride=ep)``: rows ≥ t and columns ``[e, ep)`` of each split are ignored.
        zeros: optional ``(rows, cols)`` of an fp32 buffer to return zeroed (the expert
            kernel's atomic accumulator), so the layer needs no separate memset.

    Returns:
        ``(gate_te [tp, ep], k_t [t], zeros buffer or None)``.

    Why: the layer's XLA reduction of the partials and the NEG-padding of the logits were two
    launches per decode layer (~1.3 µs each on an H200) between the logits and the selection
    kernel; the partials are small (``n_part·ep`` floats a token), so adding them here is free.
    """
    tp = part_tp.shape[0]
    if part_tp.shape[1] != n_part * ep:
        raise ValueError(f"partials {part_tp.shape} do not hold {n_part} splits of {ep} columns")
    if rule not in ("paper", "nucleus"):
        raise ValueError(f"rule must be 'paper' or 'nucleus', got {rule!r}")
    if gate not in ("sigmoid", "none"):
        raise ValueError(f"gate mode must be 'sigmoid' or 'none', got {gate!r}")
    k_max = e if k_max is None else min(k_max, e)
    if not 1 <= k_min <= k_max:
        raise ValueError(f"need 1 <= k_min <= k_max, got {k_min}, {k_max}")
    be = min(block_e, ep)
    bj = max(1, min(ep, 4096 // (tp * be)))  # [tp, be, bj] compare tile in registers
    kern = functools.partial(
        _route_kernel, t=t, e=e, ep=ep, be=be, bj=bj, n_part=n_part, rule=rule, gate=gate,
        k_min=k_min, k_max=k_max,
    )  # fmt: skip
    out_shape = [jax.ShapeDtypeStruct((tp, ep), jnp.float32)]
    if zeros is not None:
        if not zeroable(zeros, ep, block_e):
            raise ValueError(f"cannot split a {zeros} buffer over {ep // be} programs")
        out_shape.append(jax.ShapeDtypeStruct(zeros, jnp.float32))
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    outs = pl.pallas_call(
        pallas_pdl.early_launch(kern, interpret=interpret, tag="select"),
        out_shape=out_shape,
        grid=(ep // be,),
        in_specs=[any_spec, any_spec],  # logits (or their partials), tau [1]
        out_specs=[any_spec] * len(out_shape),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="prunepath_route_select",
    )(part_tp, jnp.reshape(jnp.asarray(tau, jnp.float32), (1,)))
    k_t = jnp.sum(outs[0][:t] != 0.0, axis=1, dtype=jnp.int32)
    return outs[0], k_t, (outs[1] if zeros is not None else None)
