"""One token's PrunePath selection inside a Triton kernel (sorted), and a launcher for tests.

Why a file of its own: the fused one-token kernel (``triton_balanced``) and the one-launch decode
step (``triton_megastep``) run the selection in *every* program (identical inputs, identical
operations, so no program waits for another), which makes its latency a fixed cost of each
layer (4.1 / 4.5 µs a layer at the 1B / 8B shape in the megastep's timeline, BENCHMARKS.md).

``_select`` returns ``(gate [E_PAD] f32, 0 where unselected; k)`` exactly as ``routing.select``
+ ``routing.gates`` decide them: ``k = clip(#{r : c_r < τ}, k_min, k_max)`` over the ranks by
(p descending, index ascending), ``c`` the cumulative mass divided by the total (paper rule:
inclusive, nucleus: exclusive), τ > 1 every expert; the selected set is the top k by the same
order — every expert with ``p > v_k`` (the k-th largest p) plus the lowest-index ties.
It takes the logits and τ as *values*: a caller issues their loads together with its other
loads after a grid barrier instead of one dependent L2 round trip each after the reductions.

A sort-free form (a 16-way radix search for the cumulative-mass boundary: 8 rounds of a
``[E_PAD, 16]`` masked sum) was exact on every case here but measured 6.95 vs 4.08 µs a layer
in the 1B megastep (BENCHMARKS.md, twenty-first session): each block-wide reduction costs
~0.1-0.2 µs, and it needs ~16 more than the bitonic sort's few cross-warp stages; removed.

``_select_ranked`` decides the same k and set but returns the selected experts in *rank*
order (expert ids and gates, slot r the r-th): it sorts 64-bit keys (the logit's order-preserving
bits, then the index) so each rank carries its expert, which drops ``_select``'s way back to
index order (the k-th value, the count above it, a scan of the ties) and the caller's scan that
numbers the selected experts (what the unit table needs, ``triton_balanced._rank_table``). Ties
in p that are not ties in the logit (two logits whose p round to the same float) order by logit
rather than index; the cumulative masses, hence k, are the same, and the set differs only if
such a pair straddles the boundary.

Rounding: the cumulative mass is a Triton scan here and XLA's scan in the reference, so a mass
within ~1 float32 ulp of τ may fall on the other side (``routing``'s docstring says the same of
itself); the tests compare k and the sets on random logits, ties, τ = 1, τ > 1 and clamped k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from prunepath_jax.kernels import jt

# A selected gate never reads as 0 (see pallas_routing); constexpr: a jit function reads globals
# only as constexprs.
TINY = tl.constexpr(float(jnp.finfo(jnp.float32).tiny))


@triton.jit
def _logits(logits_ptr, E: tl.constexpr, E_PAD: tl.constexpr, CACHE: tl.constexpr):
    """The ``[E_PAD]`` f32 logits, -inf past E. ``CACHE`` ".cg": logits other programs of this
    launch wrote (read from L2, not a stale L1)."""
    re = tl.arange(0, E_PAD)
    return tl.load(logits_ptr + re, mask=re < E, other=float("-inf"), cache_modifier=CACHE)


@triton.jit
def _gates(lg, sel, SIGMOID: tl.constexpr):
    """σ(logit) (kept ≥ the smallest normal float) or 1 where selected, else 0."""
    if SIGMOID:
        g = tl.maximum(1.0 / (1.0 + tl.exp(-lg)), TINY)
    else:
        g = tl.full(lg.shape, 1.0, tl.float32)
    return tl.where(sel, g, 0.0)


@triton.jit
def _along(x, AXIS: tl.constexpr):
    """A reduction over ``AXIS`` broadcast back against the array it came from: as it is for one
    token (AXIS 0, a scalar), as a column for a ``[BLOCK_T, E_PAD]`` block (AXIS 1)."""
    if AXIS == 1:
        return x[:, None]
    else:
        return x


@triton.jit
def _prefix_k(ps, tau, E: tl.constexpr, E_PAD: tl.constexpr, NUCLEUS: tl.constexpr,
              K_MIN: tl.constexpr, K_MAX: tl.constexpr, AXIS: tl.constexpr = 0):  # fmt: skip
    """k, the length of the selected prefix of the probabilities ``ps`` in rank order (padding
    zeros last) along ``AXIS``: the budget rule on their scan, clamped to ``[K_MIN, K_MAX]``."""
    re = tl.arange(0, E_PAD)
    cum = tl.cumsum(ps, AXIS)
    # the scan's last entry, as the ref
    total = _along(tl.sum(tl.where(re == E_PAD - 1, cum, 0.0), AXIS), AXIS)
    if NUCLEUS:
        c = (cum - ps) / total
    else:
        c = cum / total
    thr = tl.where(tau > 1.0, 3.0, tau)  # τ > 1 selects every expert (masses are ≤ 1)
    ok = (re < K_MIN) | ((re < K_MAX) & (c < thr))  # a prefix of the ranks
    return tl.sum((ok & (re < E)).to(tl.int32), AXIS)


@triton.jit
def _select(lg, tau, E: tl.constexpr, E_PAD: tl.constexpr, NUCLEUS: tl.constexpr,
            SIGMOID: tl.constexpr, K_MIN: tl.constexpr, K_MAX: tl.constexpr,
            AXIS: tl.constexpr = 0):  # fmt: skip
    """``(gate, k)`` of one token from its logits ``lg`` (``_logits``, already times any scale
    > 0: ``triton_megastep`` sums them before the RMSNorm's scale is known) and budget ``tau``,
    by a descending ``tl.sort`` of the probabilities and its scan.

    ``AXIS`` 1: a block of tokens at once, ``lg [BLOCK_T, E_PAD]`` -> ``(gate [BLOCK_T, E_PAD],
    k [BLOCK_T])``. Why: a program that sorts one token's 448 probabilities with 8 warps spends
    its time in the sort's cross-warp stages, and prefill runs thousands of such programs
    (`triton_grouped`'s selection); several tokens a program keep more of the sort inside each
    warp. AXIS 0 compiles to the same code as before the block form existed (the one-token
    kernels' launches were tuned with it)."""
    re = tl.arange(0, E_PAD)
    emask = re < E
    ex = tl.where(emask, tl.exp(lg - _along(tl.max(lg, AXIS), AXIS)), 0.0)
    p = ex / _along(tl.sum(ex, AXIS), AXIS)  # padding: exactly 0
    ps = tl.sort(p, AXIS, descending=True)  # rank order; padding zeros last
    k = _prefix_k(ps, tau, E, E_PAD, NUCLEUS, K_MIN, K_MAX, AXIS)
    # the k-th largest probability
    v_k = _along(tl.sum(tl.where(re == _along(k, AXIS) - 1, ps, 0.0), AXIS), AXIS)
    above = (p > v_k) & emask
    tie = (p == v_k) & emask
    tie_rank = tl.cumsum(tie.to(tl.int32), AXIS) - tie.to(tl.int32)  # lower index first
    n_tie = _along(k - tl.sum(above.to(tl.int32), AXIS), AXIS)
    sel = above | (tie & (tie_rank < n_tie))
    return _gates(lg, sel, SIGMOID), k


@triton.jit
def _order_bits(x):
    """An int32 whose signed order is the f32 ``x``'s (-0 as +0; an involution on the bits, so
    ``_from_order_bits`` undoes it): negative floats get all bits but the sign flipped."""
    b = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _from_order_bits(b):
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _select_ranked(lg, tau, E: tl.constexpr, E_PAD: tl.constexpr, NUCLEUS: tl.constexpr,
                   SIGMOID: tl.constexpr, K_MIN: tl.constexpr, K_MAX: tl.constexpr):  # fmt: skip
    """``(expert [E_PAD] i32, gate [E_PAD] f32, k)`` in rank order (by p descending, index
    ascending; gate 0 from rank k on): ``_select``'s k and set from one sort of (logit, index)
    keys. Each rank's p is computed from its own logit exactly as ``_select`` computes it, so
    the scan sees the same values in the same order."""
    re = tl.arange(0, E_PAD)
    m = tl.max(lg, 0)
    s = tl.sum(tl.where(re < E, tl.exp(lg - m), 0.0), 0)
    key = (_order_bits(lg).to(tl.int64) << 32) | (E_PAD - 1 - re).to(tl.int64)
    ks = tl.sort(key, 0, descending=True)  # padding (-inf, highest index) last
    ls = _from_order_bits((ks >> 32).to(tl.int32))
    expert = E_PAD - 1 - ks.to(tl.int32)  # the low word
    ps = tl.where(re < E, tl.exp(ls - m) / s, 0.0)
    k = _prefix_k(ps, tau, E, E_PAD, NUCLEUS, K_MIN, K_MAX)
    return expert, _gates(ls, re < k, SIGMOID), k


@triton.jit
def _store_counts(cnt_ptr, row, idx, c, E: tl.constexpr, COUNTS: tl.constexpr):
    """A program's per-expert counts ``c`` of experts ``idx``: added into ``cnt [E]`` (``COUNTS``
    1) or stored as row ``row`` of ``cnt [P, E]`` (2); nothing with 0."""
    if COUNTS == 1:
        tl.atomic_add(cnt_ptr + idx, c, mask=idx < E)
    elif COUNTS == 2:
        tl.store(cnt_ptr + row * E + idx, c, mask=idx < E)


@triton.jit
def _select_kernel(logits_ptr, tau_ptr, gate_ptr, k_ptr, cnt_ptr, T: tl.constexpr,
                   E: tl.constexpr, E_PAD: tl.constexpr, NUCLEUS: tl.constexpr,
                   SIGMOID: tl.constexpr, K_MIN: tl.constexpr, K_MAX: tl.constexpr,
                   RANKED: tl.constexpr, BLOCK_T: tl.constexpr, COUNTS: tl.constexpr):  # fmt: skip
    """Tokens ``[BLOCK_T * program_id, +BLOCK_T)`` of ``[T, E]`` logits: their gates ``[T, E]``
    (stored as the output's dtype) and k ``[T]``. ``COUNTS`` 1: each program also adds its
    tokens' selections into the per-expert counts ``cnt [E]`` (zeroed before the launch); 2:
    each program stores its own tokens' counts as row ``program_id`` of ``cnt [P, E]``.
    ``BLOCK_T`` 1: ``_select`` (``RANKED``: ``_select_ranked``, scattered back to index order);
    more: ``_select`` along axis 1."""
    re = tl.arange(0, E_PAD)
    if BLOCK_T == 1:
        t = tl.program_id(0)
        lg = _logits(logits_ptr + t * E, E, E_PAD, "")
        if RANKED:
            expert, g, k = _select_ranked(lg, tl.load(tau_ptr), E, E_PAD, NUCLEUS, SIGMOID,
                                          K_MIN, K_MAX)  # fmt: skip
            out = gate_ptr.dtype.element_ty
            tl.store(gate_ptr + t * E + expert, g.to(out), mask=expert < E)  # a permutation
            _store_counts(cnt_ptr, t, expert, (g != 0).to(tl.int32), E, COUNTS)
        else:
            g, k = _select(lg, tl.load(tau_ptr), E, E_PAD, NUCLEUS, SIGMOID, K_MIN, K_MAX)
            tl.store(gate_ptr + t * E + re, g.to(gate_ptr.dtype.element_ty), mask=re < E)
            _store_counts(cnt_ptr, t, re, (g != 0).to(tl.int32), E, COUNTS)
        tl.store(k_ptr + t, k)
    else:
        tt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        row, col = tt[:, None] < T, re[None, :] < E
        off = tt[:, None] * E + re[None, :]
        lg = tl.load(logits_ptr + off, mask=row & col, other=float("-inf"))
        lg = tl.where(row, lg, 0.0)  # rows past T: finite, never stored
        g, k = _select(lg, tl.load(tau_ptr), E, E_PAD, NUCLEUS, SIGMOID, K_MIN, K_MAX, 1)
        tl.store(gate_ptr + off, g.to(gate_ptr.dtype.element_ty), mask=row & col)
        tl.store(k_ptr + tt, k, mask=tt < T)
        if COUNTS:  # one count an expert a program, not one a token
            c = tl.sum(((g != 0) & row).to(tl.int32), 0)
            _store_counts(cnt_ptr, tl.program_id(0), re, c, E, COUNTS)


# ``select_gates``' counts argument -> the kernel's COUNTS (0 none, 1 atomic, 2 a row a program;
# "table" returns those rows, "partial" their sum).
_COUNTS = {False: 0, True: 1, "atomic": 1, "partial": 2, "table": 2}


def select_gates(
    logits_te: jax.Array, tau, *, rule: str = "paper", gate: str = "sigmoid", k_min: int = 1,
    k_max: int | None = None, ranked: bool = False, block_t: int = 1, warps: int = 8,
    out_dtype=jnp.float32, counts: bool | str = False, interpret: bool = False,
) -> tuple[jax.Array, ...]:  # fmt: skip
    """``(gates [t, E] out_dtype, k [t] i32)``: the kernels' selection on its own (what the
    tests run; ``ranked``: ``_select_ranked``), and the grouped prefill's selection. With
    ``counts`` also ``cnt [E] i32``, the tokens each expert took: the grouping's per-expert
    counts without another pass over the mask. "atomic" (or True): each program adds its
    counts into ``cnt`` in the launch; "partial": each program stores its own row of a
    ``[programs, E]`` table, which XLA sums (no atomics); "table": that table itself, ``cnt
    [programs, E] i32`` (what `triton_group.kernel_slots` takes). Measured (H100, 4096 x 448,
    8 tokens a program, s74a): the launch takes 25.9 µs without counts, 46.0 with the atomics,
    40.7 with the rows, so most of the cost is the column sum over each block's tokens.

    ``block_t`` tokens a program (a power of 2; above 1 through ``_select`` along axis 1,
    which has no ranked form) and ``warps`` a program are the launch's layout. ``out_dtype``
    int8 with gate "none" stores the selection mask as 1 / 0 bytes, a quarter of the float32
    gates' writes."""
    t, e = logits_te.shape
    k_max = e if k_max is None else min(k_max, e)
    if not 1 <= k_min <= k_max:
        raise ValueError(f"need 1 <= k_min <= k_max, got {k_min}, {k_max}")
    if rule not in ("paper", "nucleus") or gate not in ("sigmoid", "none"):
        raise ValueError(f"rule must be paper|nucleus and gate sigmoid|none: {rule!r}, {gate!r}")
    if block_t < 1 or block_t & (block_t - 1) or (ranked and block_t > 1):
        raise ValueError(f"block_t must be a power of 2 (1 when ranked), got {block_t}")
    if counts not in _COUNTS:
        raise ValueError(f"counts must be one of {list(_COUNTS)}, got {counts!r}")
    mode, n_prog = _COUNTS[counts], -(-t // block_t)
    cnt_shape = {0: (1,), 1: (e,), 2: (n_prog, e)}[mode]
    e_pad = max(16, jt.next_pow2(e))
    g, k, cnt = jt.triton_call(
        _select_kernel, logits_te.astype(jnp.float32),
        jnp.reshape(jnp.asarray(tau, jnp.float32), (1,)),
        out_shape=[jax.ShapeDtypeStruct((t, e), out_dtype), jax.ShapeDtypeStruct((t,), jnp.int32),
                   jax.ShapeDtypeStruct(cnt_shape, jnp.int32)],
        zeroed_outputs=(2,) if mode == 1 else (), grid=(n_prog,), num_warps=warps,
        num_stages=1, interpret=interpret, T=t, E=e, E_PAD=e_pad, NUCLEUS=rule == "nucleus",
        SIGMOID=gate == "sigmoid", K_MIN=k_min, K_MAX=k_max, RANKED=bool(ranked),
        BLOCK_T=block_t, COUNTS=mode,
    )  # fmt: skip
    if counts == "partial":
        cnt = jnp.sum(cnt, axis=0, dtype=jnp.int32)
    return (g, k, cnt) if mode else (g, k)
