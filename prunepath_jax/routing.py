"""Pure router math for PrunePath: logits, cumulative-mass selection, gates, statistics, losses.

Everything here is a pure function over explicit arrays so that the same code serves the NNX
shells, the training step, the kernels' reference and the tests. τ is always an *argument*
(a traced float32 scalar per call), never a Python constant, so a τ sweep compiles once; a
per-layer τ vector ``[L]`` is indexed by the caller, one scalar per layer call.

Selection (DESIGN.md section 2): ``p = softmax(g)`` in float32, experts sorted by descending
``p`` with ties broken towards the lower expert index, ``c_i`` the inclusive cumulative mass.

* rule ``"paper"`` (default, the official code): rank 1 plus every rank with ``c_i < τ``. The
  expert whose addition first reaches τ is *excluded*.
* rule ``"nucleus"``: the smallest prefix with mass ``≥ τ``, i.e. ranks with ``c_{i-1} < τ``
  (``c_0 = 0``), so the expert that reaches τ is *included*.

Floating-point behaviour at the boundary: the float32 cumsum of a softmax need not end at exactly
1 (it can be 1 ± a few ulp). We divide ``c`` by its last entry so ``c_E == 1`` exactly, which
makes τ = 1 behave as in exact arithmetic: the paper rule drops at least the last expert (and any
trailing experts whose mass is below float32 resolution, since their ``c_i`` rounds to 1), the
nucleus rule keeps every expert up to the one whose cumulative mass rounds to 1. τ > 1 selects
every expert for both rules by an explicit ``τ > 1`` test, independent of rounding; use τ = 1.05
(as the paper does) when "all experts" is meant. Elsewhere a ``c_i`` within ~1 ulp of τ may fall
on either side; the returned ``cum_te`` is the exact array the decision was made on.

Gradient path (there is no straight-through estimator, as in the paper): the hard mask, the order
and ``k`` carry no gradient. The router learns through ``σ(g_e)`` of the selected experts (the
task loss, via :func:`gates`) and through ``p`` in the entropy and balance losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Rule = Literal["paper", "nucleus"]
GateMode = Literal["sigmoid", "none"]


class Selection(NamedTuple):
    """Per-token expert choice. Leading dims ``...`` are whatever the logits had (usually t).

    Attributes:
        mask_te: bool ``[..., e]``, True for the selected experts.
        k_t: int32 ``[...]``, number of selected experts (``k_min ≤ k ≤ k_max``).
        probs_te: float32 ``[..., e]``, the softmax that ranked the experts.
        order_te: int32 ``[..., e]``, expert ids by descending probability (ties: lower id first).
        cum_te: float32 ``[..., e]``, cumulative mass by *rank* (``cum[..., i]`` is ``c_{i+1}``),
            normalised so the last entry is exactly 1 — the values the τ test was made on.
    """

    mask_te: jax.Array
    k_t: jax.Array
    probs_te: jax.Array
    order_te: jax.Array
    cum_te: jax.Array


class RouteStats(NamedTuple):
    """Routing statistics of one layer (or a stack of layers with a leading ``[L]``).

    Returned from the forward pass as a pytree, never mutated inside it. The float fields that
    come from ``p`` (``p_mean_e``, ``entropy_mean``, ``gate_sq_mean``) are differentiable w.r.t.
    the logits; ``k_mean`` and ``k_t`` are counts.

    Attributes:
        k_mean: float32 scalar, masked mean of ``k`` over real tokens.
        k_t: int32 ``[...]``, ``k`` per token (padding included; pair it with the token mask).
        p_mean_e: float32 ``[e]``, masked mean routing probability per expert (``p̄_e``).
        entropy_mean: float32 scalar, masked mean over tokens of ``H(p)``.
        n_tokens: float32 scalar, number of real tokens (sum of the mask).
        gate_sq_mean: float32 scalar, masked mean over tokens of the mean over selected experts
            of ``σ(g_e)²`` — the input of :func:`gate_loss`.
    """

    k_mean: jax.Array
    k_t: jax.Array
    p_mean_e: jax.Array
    entropy_mean: jax.Array
    n_tokens: jax.Array
    gate_sq_mean: jax.Array


def init_router(d: int, e: int, dtype=jnp.float32) -> jax.Array:
    """Zero router weights ``[d, e]``: the paper zero-initialises, so every expert starts tied.

    With zero logits all gates are σ(0) = 0.5 and p is uniform; the deterministic tie rule then
    ranks experts by index until training separates them.
    """
    return jnp.zeros((d, e), dtype=dtype)


# From this many tokens per call, bf16 activations on a CUDA GPU take the tensor-core split
# (`router_logits_bf16x3`). Below it (decode: 1-16 tokens) the router GEMV is bound by bytes, and
# the split's three bf16 copies would read 1.5x the fp32 router's.
BF16X3_MIN_TOKENS = 64
# The split's backward on tensor cores (`_bf16x3_bwd`); False: the fp32 GEMMs' backward, for
# benchmarks that time both side by side (`benchmarks/ffn_grad.py --router-bwd`). Read when traced.
BF16X3_BACKWARD = True


def router_logits(w_de: jax.Array, x_td: jax.Array) -> jax.Array:
    """Logits ``[t, e]`` (any leading dims) in float32, whatever the input dtype.

    The ranking compares probabilities that can differ by less than a bf16 ulp, so the logits
    are fp32-accurate even for bf16 activations and weights. Every path calls this one function
    (the masked XLA path, the grouped-GEMM prefill, training, router initialisation), so at the
    same input they get the same logits bit for bit and select the same experts. How:
    ``router_logits_fp32`` (an fp32 GEMM at ``Precision.HIGHEST``) in general;
    ``router_logits_bf16x3`` (the same logits up to summation order, forward and backward on
    tensor cores) for bf16 activations of at least ``BF16X3_MIN_TOKENS`` tokens lowered for CUDA,
    where the fp32 GEMM runs without tensor cores (335 of 2200 µs of a 4096-token Llama-3-8B
    grouped-GEMM layer on the H200, BENCHMARKS.md).
    """
    n_tokens = int(np.prod(x_td.shape[:-1]))
    if x_td.dtype != jnp.bfloat16 or n_tokens < BF16X3_MIN_TOKENS:
        return router_logits_fp32(w_de, x_td)
    return jax.lax.platform_dependent(
        w_de, x_td, cuda=router_logits_bf16x3, default=router_logits_fp32
    )


def router_logits_fp32(w_de: jax.Array, x_td: jax.Array) -> jax.Array:
    """``x @ w`` as an fp32 GEMM at ``Precision.HIGHEST`` (no TF32): the portable logits."""
    return jnp.matmul(
        x_td.astype(jnp.float32),
        w_de.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )


def _split3(a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """bf16 ``(a1, a2, a3)`` with ``a1 + a2 + a3 == a`` for fp32 ``a``: 8 + 8 + 8 bits of its
    24-bit significand, exact wherever the remainders stay above bf16's (fp32's) underflow."""
    a = a.astype(jnp.float32)
    a1 = a.astype(jnp.bfloat16)
    r1 = a - a1.astype(jnp.float32)
    a2 = r1.astype(jnp.bfloat16)
    return a1, a2, (r1 - a2.astype(jnp.float32)).astype(jnp.bfloat16)


def _mm_f32(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` of bf16 operands with fp32 accumulation (one tensor-core GEMM)."""
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def _times_split3(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` for bf16 ``a`` and fp32 ``b`` ``[k, n]`` to fp32 accuracy from one bf16 GEMM:
    against ``[b1 | b2 | b3]`` (`_split3`), the three blocks summed (bf16 x bf16 products are
    exact in fp32, so this is ``a @ b`` up to summation order)."""
    n = b.shape[-1]
    parts = _mm_f32(a, jnp.concatenate(_split3(b), axis=-1))
    return parts[..., :n] + parts[..., n : 2 * n] + parts[..., 2 * n :]


def _split_product_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a bᵀ`` of two fp32 arrays (``[..., k]``, ``[n, k]``) to fp32 accuracy from one bf16
    GEMM: of the nine products of their splits (`_split3`), the six of order ``i + j ≤ 4``
    (``a1b1, a1b2, a2b1, a1b3, a2b2, a3b1``, K = 6k); those left out are at or below fp32's
    last bit."""
    a1, a2, a3 = _split3(a)
    b1, b2, b3 = _split3(b)
    lhs = jnp.concatenate([a1, a1, a2, a1, a2, a3], axis=-1)
    rhs = jnp.concatenate([b1, b2, b1, b3, b2, b1], axis=-1)
    return _mm_f32(lhs, rhs.T)


@jax.custom_vjp
def router_logits_bf16x3(w_de: jax.Array, x_td: jax.Array) -> jax.Array:
    """fp32-accurate router logits for bf16 activations from one bf16 tensor-core GEMM.

    Why it is exact up to summation order: a bf16 ``x`` is exact in bf16, and an fp32 router is
    exactly ``w1 + w2 + w3`` up to its last bit (`_split3`); bf16 x bf16 products are exact in
    fp32, so one bf16 GEMM against ``[w1 | w2 | w3]`` with fp32 accumulation and a sum of the
    three blocks gives the fp32 logits up to summation order (~1e-7 relative, the same order as
    two fp32 GEMMs that sum differently). Other activation dtypes (fp16, fp32: not exact in
    bf16) take ``router_logits_fp32``. The backward (`_bf16x3_bwd`) is split the same way.
    """
    if x_td.dtype != jnp.bfloat16:
        return router_logits_fp32(w_de, x_td)
    return _times_split3(x_td, w_de)


def _bf16x3_fwd(w_de, x_td):
    return router_logits_bf16x3(w_de, x_td), (w_de, x_td)


def _bf16x3_bwd(res, g_te):
    """The fp32 GEMMs' gradients, on tensor cores. Why: as fp32 GEMMs at ``HIGHEST`` they ran
    without tensor cores (~390 + ~340 µs in a 1B layer's gradient over 16 384 tokens on an
    H100); split, the layer's full gradient took 7.57 instead of 8.14 ms and the 1B training
    step 268 instead of 304 ms with the LM head's bf16 backward (BENCHMARKS.md, fifty-second
    session).

    * ``dW = xᵀ g``: x is exact in bf16, so `_times_split3` against the cotangent's split gives
      it up to summation order, as the forward.
    * ``dx = g Wᵀ``: both factors are fp32, so the six leading products of their splits
      (`_split_product_nt`); the result is rounded to x's bf16 anyway.
    """
    w_de, x_td = res
    if x_td.dtype != jnp.bfloat16 or not BF16X3_BACKWARD:  # (the forward: the fp32 GEMM)
        return jax.vjp(router_logits_fp32, w_de, x_td)[1](g_te)
    d, e = w_de.shape
    dw = _times_split3(x_td.reshape(-1, d).T, g_te.reshape(-1, e))
    dx = _split_product_nt(g_te, w_de)
    return dw.astype(w_de.dtype), dx.astype(x_td.dtype)


router_logits_bf16x3.defvjp(_bf16x3_fwd, _bf16x3_bwd)


def check_tau(tau, n_layers: int | None = None) -> np.ndarray:
    """Validates τ outside jit and returns it as float32 (scalar, or ``[n_layers]``).

    Inside jit τ is traced and cannot be inspected, so bad values (≤ 0 selects only top-1 and
    hides a bug; NaN selects nothing consistent) must be caught here, at the API boundary.

    Args:
        tau: a number, or a per-layer sequence/array of numbers.
        n_layers: when given, a vector must have exactly this length and a scalar is broadcast
            to ``[n_layers]``.

    Returns:
        A float32 numpy array of shape ``()`` or ``[n_layers]``.

    Raises:
        ValueError: τ is not finite, is ≤ 0, has more than one dimension, or a per-layer
            vector's length differs from ``n_layers``.
        TypeError: τ is a tracer (called inside jit).
    """
    if isinstance(tau, jax.core.Tracer):
        raise TypeError("check_tau validates concrete values: call it before jit, not inside")
    try:
        arr = np.asarray(tau, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"tau must be a number or a per-layer vector of numbers, got {tau!r}"
        ) from err
    if arr.ndim > 1:
        raise ValueError(f"tau must be a scalar or a per-layer vector, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"tau must be finite, got {arr.tolist()}")
    if (arr <= 0).any():
        raise ValueError(
            f"tau must be > 0 (use tau > 1, e.g. 1.05, for all experts), got {arr.tolist()}"
        )
    if n_layers is not None:
        if arr.ndim == 0:
            arr = np.full((n_layers,), arr)
        elif arr.shape[0] != n_layers:
            raise ValueError(
                f"per-layer tau has length {arr.shape[0]} but the model has {n_layers} layers"
            )
    elif arr.ndim == 1 and arr.shape[0] == 0:
        raise ValueError("per-layer tau is empty")
    return arr.astype(np.float32)


def select(
    logits_te: jax.Array,
    tau,
    *,
    rule: Rule = "paper",
    k_min: int = 1,
    k_max: int | None = None,
) -> Selection:
    """Chooses each token's experts by cumulative softmax mass under the budget τ.

    Works under ``jit`` (τ traced: no Python branch depends on it) and ``vmap`` (over tokens,
    batches, or a τ sweep). The selected set is always a prefix of ``order_te``, also after the
    clamps, so gathered-expert kernels can read ``order_te[..., :k_max]``.

    Args:
        logits_te: router logits ``[..., e]`` (any float dtype; promoted to float32).
        tau: float scalar (Python or traced 0-d array). τ > 1 selects every expert.
        rule: ``"paper"`` (exclude the expert that reaches τ; default) or ``"nucleus"``
            (include it). See the module docstring.
        k_min: static lower clamp on k (≥ 1).
        k_max: static upper clamp on k (kernels need a static bound); None means e.

    Returns:
        A :class:`Selection`.
    """
    e = logits_te.shape[-1]
    k_max = e if k_max is None else k_max
    if rule not in ("paper", "nucleus"):
        raise ValueError(f"rule must be 'paper' or 'nucleus', got {rule!r}")
    if not 1 <= k_min <= e:
        raise ValueError(f"k_min must be in [1, {e}], got {k_min}")
    if not k_min <= k_max:
        raise ValueError(f"k_max must be >= k_min={k_min}, got {k_max}")
    k_max = min(k_max, e)

    tau = jnp.asarray(tau, jnp.float32)
    if tau.ndim != 0:  # a [L] vector would broadcast silently against [..., e]
        raise ValueError(
            f"tau must be a scalar per call (index a per-layer vector), got {tau.shape}"
        )
    probs_te = jax.nn.softmax(logits_te.astype(jnp.float32), axis=-1)
    # Stable sort on -p: equal probabilities keep ascending expert index (deterministic ties).
    order_te = jnp.argsort(-probs_te, axis=-1, stable=True).astype(jnp.int32)
    sorted_te = jnp.take_along_axis(probs_te, order_te, axis=-1)
    cum_te = jnp.cumsum(sorted_te, axis=-1)
    cum_te = cum_te / cum_te[..., -1:]  # c_E == 1 exactly; see the module docstring.
    if rule == "paper":
        below_te = cum_te < tau
    else:
        prev_te = jnp.concatenate([jnp.zeros_like(cum_te[..., :1]), cum_te[..., :-1]], axis=-1)
        below_te = prev_te < tau
    # Non-negative summands make c non-decreasing, so the count is the length of a prefix.
    k_t = jnp.sum(below_te, axis=-1, dtype=jnp.int32)
    k_t = jnp.where(tau > 1.0, e, k_t)
    k_t = jnp.clip(k_t, k_min, k_max).astype(jnp.int32)  # k_min ≥ 1 keeps the top-1 (paper)
    mask_te = _rank_below(probs_te, sorted_te, k_t)
    return Selection(mask_te, k_t, probs_te, order_te, cum_te)


def _rank_below(probs_te, sorted_te, k_t):
    """``rank(e) < k_t`` in expert space, where rank is the position in the stable descending
    sort (``order_te``), without inverting the sort or scattering into it.

    Why: ``put_along_axis`` is a scatter, 33.6 µs plus its index and zero fusions at 4096
    tokens x 448 experts on an H200, paid by every prefill and training layer; this form
    measured 31-32 µs less device time per such layer (BENCHMARKS.md, sixteenth session).
    How: with ``p*`` the k-th sorted probability, e ranks before k iff ``p_e`` sorts ahead of
    ``p*``, or ties it and is among the first ``k − #ahead`` of those ties by index (the stable
    sort keeps ties in index order). Sort order is ``lax.sort``'s: ±0 equal, NaN after every
    number (NaNs tie with each other), so ``p`` ahead of ``p*`` means ``p > p*`` or ``p*`` NaN
    and ``p`` not."""
    p_star = jnp.take_along_axis(sorted_te, k_t[..., None] - 1, axis=-1)  # [..., 1]
    nan_p, nan_s = jnp.isnan(probs_te), jnp.isnan(p_star)
    ahead = (probs_te > p_star) | (nan_s & ~nan_p)
    tie = (probs_te == p_star) | (nan_s & nan_p)
    n_ahead = jnp.sum(ahead, axis=-1, keepdims=True, dtype=jnp.int32)
    tie_before = jnp.cumsum(tie, axis=-1, dtype=jnp.int32) - tie.astype(jnp.int32)
    return ahead | (tie & (tie_before < k_t[..., None] - n_ahead))


def gates(logits_te: jax.Array, mask_te: jax.Array, mode: GateMode = "sigmoid") -> jax.Array:
    """Per-expert output scale ``[..., e]`` in float32, zero for unselected experts.

    ``"sigmoid"`` (paper): σ of the *raw logit* — independent of how many experts are active,
    unlike ``p_e``, and the only path by which the task loss trains the router. Its cost: with
    the zero-initialised router every gate is 0.5, so a freshly converted model is not the dense
    one until fine-tuned. ``"none"``: scale 1, so τ > 1 reproduces the dense FFN exactly, but
    the task loss then gives the router no gradient (only the auxiliary losses do).
    """
    if mode == "sigmoid":
        return jnp.where(mask_te, jax.nn.sigmoid(logits_te.astype(jnp.float32)), 0.0)
    if mode == "none":
        return mask_te.astype(jnp.float32)
    raise ValueError(f"gate mode must be 'sigmoid' or 'none', got {mode!r}")


def top_k_indices(selection: Selection, k_max: int) -> tuple[jax.Array, jax.Array]:
    """The first ``k_max`` experts of the order and which of them are selected.

    Gathered-expert compute needs a static width; slots past a token's ``k`` are marked invalid
    (their index is still a real expert, so gathers stay in bounds).

    Returns:
        ``(idx_tk int32 [..., k_max], valid_tk bool [..., k_max])``.
    """
    e = selection.order_te.shape[-1]
    if not 1 <= k_max <= e:
        raise ValueError(f"k_max must be in [1, {e}], got {k_max}")
    idx_tk = selection.order_te[..., :k_max]
    valid_tk = jnp.arange(k_max, dtype=jnp.int32) < selection.k_t[..., None]
    return idx_tk, valid_tk


def _masked_mean(v_t: jax.Array, m_t: jax.Array, n: jax.Array) -> jax.Array:
    return jnp.sum(v_t * m_t) / n


def route_stats(
    sel: Selection, logits_te: jax.Array, mask_t: jax.Array | None = None
) -> RouteStats:
    """Statistics of one layer's routing over the real tokens (``mask_t`` = 1).

    ``p`` is recomputed from ``logits_te`` (not taken from ``sel``) so the differentiable fields
    always have a gradient path to the logits, even if ``sel`` was computed elsewhere. A mask of
    all zeros gives zeros, not NaN (the denominator is clamped to 1).

    Args:
        sel: the :class:`Selection` made from ``logits_te``.
        logits_te: router logits ``[..., e]``.
        mask_t: ``[...]`` token mask (1 real, 0 padding); None means all real.
    """
    logits_te = logits_te.astype(jnp.float32)
    m_t = (
        jnp.ones(logits_te.shape[:-1], jnp.float32)
        if mask_t is None
        else mask_t.astype(jnp.float32)
    )
    m_t = jnp.broadcast_to(m_t, logits_te.shape[:-1])
    n_tokens = jnp.sum(m_t)
    n = jnp.maximum(n_tokens, 1.0)

    logp_te = jax.nn.log_softmax(logits_te, axis=-1)
    p_te = jnp.exp(logp_te)
    # 0 · log 0 := 0; the where keeps -inf logits (p = 0) from producing 0 · -inf = NaN.
    ent_t = -jnp.sum(p_te * jnp.where(p_te > 0, logp_te, 0.0), axis=-1)
    p_mean_e = jnp.sum(p_te * m_t[..., None], axis=tuple(range(p_te.ndim - 1))) / n

    mask_te = jax.lax.stop_gradient(sel.mask_te)
    k_f = sel.k_t.astype(jnp.float32)
    gsq_t = jnp.sum(jnp.where(mask_te, jax.nn.sigmoid(logits_te) ** 2, 0.0), axis=-1) / k_f
    return RouteStats(
        k_mean=_masked_mean(k_f, m_t, n),
        k_t=sel.k_t,
        p_mean_e=p_mean_e,
        entropy_mean=_masked_mean(ent_t, m_t, n),
        n_tokens=n_tokens,
        gate_sq_mean=_masked_mean(gsq_t, m_t, n),
    )


def stack_stats(stats: RouteStats | Sequence[RouteStats]) -> RouteStats:
    """Stacks per-layer stats into one :class:`RouteStats` with a leading ``[L]`` axis.

    Already stacked stats (e.g. from a ``lax.scan`` over layers) are returned unchanged.
    """
    if isinstance(stats, RouteStats):
        return stats
    stats = list(stats)
    if not stats:
        raise ValueError("need the stats of at least one layer")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *stats)


def entropy_loss(stats: RouteStats | Sequence[RouteStats]) -> jax.Array:
    """``L_ent``: mean over layers of the masked token mean of ``H(p)``.

    Sharper routing reaches τ with fewer experts, which is how the paper drives sparsity.
    """
    return jnp.mean(stack_stats(stats).entropy_mean)


def balance_loss(stats: RouteStats | Sequence[RouteStats]) -> jax.Array:
    """``L_bal``: mean over layers of ``E · Σ_e p̄_e²`` (Switch-style; minimum 1 when uniform).

    Counters the entropy term, which alone would let every token collapse onto a few experts.
    """
    p_le = stack_stats(stats).p_mean_e
    e = p_le.shape[-1]
    return jnp.mean(e * jnp.sum(p_le**2, axis=-1))


def gate_loss(stats: RouteStats | Sequence[RouteStats]) -> jax.Array:
    """``L_gate``: mean over layers of the masked token mean of ``mean_{e∈A} σ(g_e)²``.

    The paper uses a gate-magnitude penalty for instruction tuning but its formula was not
    recovered; this is our definition. It shrinks the sigmoid gates of the experts a token
    actually uses, narrowing the gap between the all-expert and the sparse outputs. Default
    weight μ = 0.
    """
    return jnp.mean(stack_stats(stats).gate_sq_mean)


def sparsity(k_t: jax.Array, e: int, mask_t: jax.Array | None = None) -> jax.Array:
    """``s = 1 − mean k/E`` over real tokens: the fraction of FFN neurons skipped.

    Experts are equal-sized, so the fraction of experts skipped is the fraction of neurons.
    ``k_t`` may carry a leading layer axis ``[L, ...]``; ``mask_t`` broadcasts against it.
    """
    k_f = k_t.astype(jnp.float32)
    m = (
        jnp.ones_like(k_f)
        if mask_t is None
        else jnp.broadcast_to(mask_t.astype(jnp.float32), k_f.shape)
    )
    return 1.0 - jnp.sum(m * k_f / e) / jnp.maximum(jnp.sum(m), 1.0)
