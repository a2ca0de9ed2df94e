"""One token's PrunePath selection inside a Triton kernel: sorted, or sort-free by radix search.

Why a file of its own: the fused one-token kernel (``triton_balanced``) and the one-launch decode
step (``triton_megastep``) run the selection in *every* program (identical inputs, identical
operations, so no program waits for another), which makes its latency a fixed cost of each
layer: 4.1 / 4.5 µs a layer at the 1B / 8B shape in the megastep's timeline (BENCHMARKS.md,
twentieth session), most of it a 256/512-wide bitonic ``tl.sort`` (~45 dependent stages).

Both forms return ``(gate [E_PAD] f32, 0 where unselected; k)`` exactly as ``routing.select``
+ ``routing.gates`` decide them: ``k = clip(#{r : c_r < τ}, k_min, k_max)`` over the ranks by
(p descending, index ascending), ``c`` the cumulative mass divided by the total (paper rule:
inclusive, nucleus: exclusive), τ > 1 every expert; the selected set is the top k by the same
order.

``_select_sorted``: sort the probabilities, scan them, compare.

``_select``: no sort. For ``p ≥ 0`` the float's bit pattern orders like the value, so the
value ``v*`` of the first rank whose inclusive mass reaches ``τ·Z`` is the largest bit pattern
``b`` with ``Σ_{bits ≥ b} p ≥ τ·Z`` (a monotone predicate): ``_radix_max`` finds it four bits
a round — 16 candidates, one ``[E_PAD, 16]`` masked sum — in 8 rounds. Every expert with
``p > v*`` is ahead of that rank; of the ``p == v*`` ties (index order) those whose mass
``Σ_{p > v*} p + (i + 1)·v*`` stays below ``τ·Z`` count too. The top k is then
``{p > v*}`` plus the first ``k − #{p > v*}`` ties, unless ``k_min``/``k_max`` (or the nucleus
rule's +1) put k outside that tie group: a second search finds the k-th largest value by count.

Rounding: the masses here are tree sums of subsets, the reference's a sequential scan, so a mass
within ~1 float32 ulp of τ may fall on the other side — as between any two of the project's
selections (``routing``'s docstring); the tests compare k and the sets on random logits, ties,
τ ≥ 1, τ ≤ 0 and clamped k.
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
def _probs(logits_ptr, scale, E: tl.constexpr, E_PAD: tl.constexpr, CACHE: tl.constexpr):
    """``(logits, softmax p, valid)`` ``[E_PAD]`` of ``scale ·`` the logits; padding p is 0."""
    re = tl.arange(0, E_PAD)
    emask = re < E
    lg = tl.load(logits_ptr + re, mask=emask, other=float("-inf"), cache_modifier=CACHE) * scale
    ex = tl.where(emask, tl.exp(lg - tl.max(lg, 0)), 0.0)
    return lg, ex / tl.sum(ex, 0), emask


@triton.jit
def _gates(lg, sel, SIGMOID: tl.constexpr):
    """σ(logit) (kept ≥ the smallest normal float) or 1 where selected, else 0."""
    if SIGMOID:
        g = tl.maximum(1.0 / (1.0 + tl.exp(-lg)), TINY)
    else:
        g = tl.full(lg.shape, 1.0, tl.float32)
    return tl.where(sel, g, 0.0)


@triton.jit
def _select_sorted(logits_ptr, scale, tau_ptr, E: tl.constexpr, E_PAD: tl.constexpr,
                   NUCLEUS: tl.constexpr, SIGMOID: tl.constexpr, K_MIN: tl.constexpr,
                   K_MAX: tl.constexpr, CACHE: tl.constexpr):  # fmt: skip
    """``(gate, k)`` by a descending ``tl.sort`` and its scan, from the logits at
    ``logits_ptr`` times ``scale`` (> 0; ``triton_megastep`` sums them before the RMSNorm's
    scale is known). ``CACHE`` ".cg": logits other programs of this launch wrote (read from L2,
    not a stale L1)."""
    re = tl.arange(0, E_PAD)
    lg, p, emask = _probs(logits_ptr, scale, E, E_PAD, CACHE)
    ps = tl.sort(p, 0, descending=True)  # rank order; padding zeros last
    cum = tl.cumsum(ps, 0)
    total = tl.sum(tl.where(re == E_PAD - 1, cum, 0.0), 0)  # the scan's last entry, as the ref
    if NUCLEUS:
        c = (cum - ps) / total
    else:
        c = cum / total
    tau = tl.load(tau_ptr)
    thr = tl.where(tau > 1.0, 3.0, tau)  # τ > 1 selects every expert (masses are ≤ 1)
    ok = (re < K_MIN) | ((re < K_MAX) & (c < thr))  # a prefix of the ranks
    k = tl.sum((ok & emask).to(tl.int32), 0)
    v_k = tl.sum(tl.where(re == k - 1, ps, 0.0), 0)  # the k-th largest probability
    above = (p > v_k) & emask
    tie = (p == v_k) & emask
    tie_rank = tl.cumsum(tie.to(tl.int32), 0) - tie.to(tl.int32)  # lower index first
    sel = above | (tie & (tie_rank < k - tl.sum(above.to(tl.int32), 0)))
    return _gates(lg, sel, SIGMOID), k


@triton.jit
def _radix_round(bits, w, target, b, SH: tl.constexpr, N: tl.constexpr):
    """``b`` plus the largest ``j < N`` (0 if none) with ``Σ_{bits ≥ b + j·2^SH} w ≥ target``."""
    rj = tl.arange(0, 16)
    cand = b + (rj << SH)
    s = tl.sum(tl.where(bits[:, None] >= cand[None, :], w[:, None], 0.0), 0)  # non-increasing
    s = tl.where(rj < N, s, float("-inf"))
    j = tl.sum((s >= target).to(tl.int32), 0) - 1
    return b + (tl.maximum(j, 0) << SH)


@triton.jit
def _radix_max(bits, w, target):
    """The largest ``b ≥ 0`` with ``Σ_{bits ≥ b} w ≥ target`` (0 if none), ``bits`` int32 ≥ 0
    (−1: never counted), ``w ≥ 0``: bits 27-30 and then four at a time in 16-candidate rounds,
    the last round bits 0-2 (bit 31 is a non-negative float's sign)."""
    b = tl.zeros([], tl.int32)
    for i in tl.static_range(7):
        b = _radix_round(bits, w, target, b, 27 - 4 * i, 16)
    return _radix_round(bits, w, target, b, 0, 8)


@triton.jit
def _tie_rank(tie):
    """Each tie's position among the ties (index order); the scan only when there are two."""
    t = tie.to(tl.int32)
    r = tl.zeros_like(t)
    if tl.sum(t, 0) > 1:
        r = tl.cumsum(t, 0) - t
    return r


@triton.jit
def _top(bits, valid, k):
    """The top ``k`` by (bits descending, index ascending): the k-th largest by a count search."""
    v = _radix_max(bits, valid.to(tl.float32), k.to(tl.float32))
    gt = bits > v
    tie = bits == v
    return gt | (tie & (_tie_rank(tie) < k - tl.sum(gt.to(tl.int32), 0)))


@triton.jit
def _select(logits_ptr, scale, tau_ptr, E: tl.constexpr, E_PAD: tl.constexpr,
            NUCLEUS: tl.constexpr, SIGMOID: tl.constexpr, K_MIN: tl.constexpr,
            K_MAX: tl.constexpr, CACHE: tl.constexpr):  # fmt: skip
    """``_select_sorted``'s ``(gate, k)`` without a sort (module docstring)."""
    lg, p, emask = _probs(logits_ptr, scale, E, E_PAD, CACHE)
    bits = tl.where(emask, p.to(tl.int32, bitcast=True), -1)  # p ≥ 0: orders like p
    total = tl.sum(p, 0)
    tau = tl.load(tau_ptr)
    v = _radix_max(bits, p, tau * total)  # the first rank reaching τ has p == v
    gt = bits > v
    tie = bits == v
    n_gt = tl.sum(gt.to(tl.int32), 0)
    m_gt = tl.sum(tl.where(gt, p, 0.0), 0)
    tie_rank = _tie_rank(tie)
    cum = (m_gt + (tie_rank + 1).to(tl.float32) * v.to(tl.float32, bitcast=True)) / total
    m = n_gt + tl.sum((tie & (cum < tau)).to(tl.int32), 0)  # ranks with c < τ (paper rule)
    m = tl.where(tau > 1.0, E, tl.minimum(m, E - 1))  # τ ≤ 1: the last rank's c is 1
    if NUCLEUS:  # ranks whose exclusive mass is < τ: one more
        m = tl.minimum(m + 1, E)
    m = tl.where(tau > 0.0, m, 0)  # τ ≤ 0 or NaN: no rank is below it
    k = tl.minimum(tl.maximum(m, K_MIN), K_MAX)
    n_tie = tl.sum(tie.to(tl.int32), 0)
    if (k >= n_gt) & (k <= n_gt + n_tie):  # the usual case: k ends inside v's ties
        sel = gt | (tie & (tie_rank < k - n_gt))
    else:  # clamped (or the nucleus' +1) past them
        sel = _top(bits, emask, k)
    return _gates(lg, sel, SIGMOID), k


@triton.jit
def _select_kernel(logits_ptr, tau_ptr, gate_ptr, k_ptr, E: tl.constexpr, E_PAD: tl.constexpr,
                   NUCLEUS: tl.constexpr, SIGMOID: tl.constexpr, K_MIN: tl.constexpr,
                   K_MAX: tl.constexpr, SORTED: tl.constexpr):  # fmt: skip
    """Token ``program_id`` of ``[T, E]`` logits: its gates ``[T, E_PAD]`` and k ``[T]``
    (what the tests and ``benchmarks/select_kernel.py`` run)."""
    t = tl.program_id(0)
    if SORTED:
        g, k = _select_sorted(logits_ptr + t * E, 1.0, tau_ptr, E, E_PAD, NUCLEUS, SIGMOID, K_MIN,
                              K_MAX, "")  # fmt: skip
    else:
        g, k = _select(logits_ptr + t * E, 1.0, tau_ptr, E, E_PAD, NUCLEUS, SIGMOID, K_MIN,
                       K_MAX, "")  # fmt: skip
    tl.store(gate_ptr + t * E_PAD + tl.arange(0, E_PAD), g)
    tl.store(k_ptr + t, k)


def select_gates(
    logits_te: jax.Array, tau, *, rule: str = "paper", gate: str = "sigmoid", k_min: int = 1,
    k_max: int | None = None, sort: bool = False, interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """``(gates [t, E] f32, k [t] i32)``, one program a token: the kernels' selection on its
    own (tests; ``benchmarks/select_kernel.py``). ``sort``: the sorted form."""
    t, e = logits_te.shape
    k_max = e if k_max is None else min(k_max, e)
    if not 1 <= k_min <= k_max:
        raise ValueError(f"need 1 <= k_min <= k_max, got {k_min}, {k_max}")
    if rule not in ("paper", "nucleus") or gate not in ("sigmoid", "none"):
        raise ValueError(f"rule must be paper|nucleus and gate sigmoid|none: {rule!r}, {gate!r}")
    e_pad = max(16, jt.next_pow2(e))
    g, k = jt.triton_call(
        _select_kernel, logits_te.astype(jnp.float32),
        jnp.reshape(jnp.asarray(tau, jnp.float32), (1,)),
        out_shape=[jax.ShapeDtypeStruct((t, e_pad), jnp.float32),
                   jax.ShapeDtypeStruct((t,), jnp.int32)],
        grid=(t,), num_warps=8, num_stages=1, interpret=interpret, E=e, E_PAD=e_pad,
        NUCLEUS=rule == "nucleus", SIGMOID=gate == "sigmoid", K_MIN=k_min, K_MAX=k_max,
        SORTED=bool(sort),
    )  # fmt: skip
    return g[:, :e], k
