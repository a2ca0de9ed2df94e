"""Sparse-expert decode FFN (1-16 tokens) as Pallas kernels on the Triton backend.

Why this shape. At decode the FFN is bound by the bytes of the selected experts' weights, and
for small models by launches (DESIGN.md §4). So the layer is: the router logits (the split-K
GEMV kernel of ``pallas_logits.py``; XLA's narrow GEMV was ~2x slower inside the layer), the
sort-free selection kernel (``pallas_routing.py``: softmax, the paper's cumulative-mass rule,
sigmoid gates → a gate table ``[t, E]``), and the expert kernel(s) (``pallas_experts.py``: the
union of the tokens' experts, neuron blocks, the atomic or split down-projection; or, for one
token, ``pallas_balanced.py``: one program per SM sharing the union's neurons evenly). For one or
two tokens the selection kernel also adds the logits kernel's unreduced split-K partials and
zeroes the expert kernel's atomic accumulator (``glue="fused"``), so a one-token layer is
exactly three launches with nothing between them (measured: 2 XLA launches fewer per 8B layer,
1 per 1B layer; 1-3% of an end-to-end token, BENCHMARKS.md). Given the block's RMSNorm weight
(``norm_d``), the logits kernel of such a layer also normalises the residual-stream row it reads
and stores it for the expert kernel, so the norm's two XLA launches go too (H200, 75% sparse,
same run: 8B 2699 vs 2754 µs/token, 1B 865 vs 873, SmolLM2 shape 1008 either way).

This module checks the input, takes the static blocks from ``pallas_plan.plan`` (the H200
sweeps' defaults), runs the routing and hands the gate table to the expert kernels. The layer
works under ``jit`` with τ traced, and under ``vmap`` (Pallas adds a grid axis to each kernel): a
τ sweep of one checkpoint, or independent token sets sharing the weights (interpreter, CUDA
lowering and H200 tests).

The result equals ``prunepath_jax.kernels.reference.sparse_ffn_reference`` (the masked XLA math
of ``PrunePathFFN``) up to summation order, and ``k_t`` exactly (see ``pallas_routing.py`` for
the one float-boundary caveat of sort-free selection).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from prunepath_jax import routing
from prunepath_jax.kernels import pallas_balanced, pallas_experts
from prunepath_jax.kernels.api import xla_masked
from prunepath_jax.kernels.jt import next_pow2 as _next_pow2
from prunepath_jax.kernels.pallas_experts import accumulator_shape
from prunepath_jax.kernels.pallas_logits import (
    router_logits_pallas,
    router_logits_partials,
    router_logits_partials_normed,
)
from prunepath_jax.kernels.pallas_plan import (  # noqa: F401 - re-exported for tests/benchmarks
    MAX_TOKENS,
    SMALL_D,
    SMEM_BYTES,
    TUNING_OVERRIDES,
    _experts_form,
    _plan_balanced,
    _tiles,
)
from prunepath_jax.kernels.pallas_plan import plan as _plan
from prunepath_jax.kernels.pallas_routing import (
    route_gates_from_partials,
    route_gates_pallas,
    zeroable,
)
from prunepath_jax.kernels.reference import route_reference
from prunepath_jax.models.layers import rms_norm

try:  # The Triton backend module imports on CPU jaxlib too; guard anyway (it is deprecated).
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - only on a jax without Pallas-Triton
    plgpu = None

# Up to this many (power-of-two padded) tokens the selection kernel adds the router logits'
# partials itself; each of its programs re-reads them (tp·S·E floats), so for more tokens one XLA
# reduction first is cheaper.
FUSED_GLUE_MAX_TOKENS = 2
_SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32), jnp.dtype(jnp.float16))


def _pad_rows(x_td: jax.Array, n: int) -> jax.Array:
    """``x_td`` with zero rows appended up to ``n`` (itself when it has ``n`` rows)."""
    t, d = x_td.shape
    return x_td if t == n else jnp.zeros((n, d), x_td.dtype).at[:t].set(x_td)


def route_gates(x_td, router_de, tau, *, rule="paper", gate="sigmoid", k_min=1, k_max=None):
    """Gate table ``gate_te`` (fp32, zero for unselected experts) and ``k_t`` with XLA ops.

    Exactly the reference's routing (``routing.select`` + ``routing.gates``); the kernel skips an
    expert whose selected gate underflowed to exactly 0, which changes nothing (it adds 0).
    """
    _, _, gate_te, k_t = route_reference(
        x_td, router_de, tau, rule=rule, gate=gate, k_min=k_min, k_max=k_max
    )
    return gate_te, k_t


def check_inputs(x_td, router_de, w_in_cfd, w_out_fd, group_size: int) -> None:
    """Raises ValueError/NotImplementedError for anything this kernel cannot compute exactly."""
    if x_td.ndim != 2:
        raise ValueError(f"x_td must be [t, d], got shape {x_td.shape}")
    t, d = x_td.shape
    if not 1 <= t <= MAX_TOKENS:
        raise NotImplementedError(
            f"the Pallas decode kernel takes 1..{MAX_TOKENS} tokens, got {t}; "
            "use the grouped GEMM or the XLA path for more"
        )
    if w_in_cfd.ndim != 3 or w_in_cfd.shape[0] != 2:
        raise NotImplementedError(
            f"the Pallas decode kernel is SwiGLU only (w_in [2, f, d]), got w_in {w_in_cfd.shape}"
        )
    f = w_in_cfd.shape[1]
    if w_in_cfd.shape[2] != d or w_out_fd.shape != (f, d):
        raise ValueError(
            f"shape mismatch: x {x_td.shape}, w_in {w_in_cfd.shape}, w_out {w_out_fd.shape}"
        )
    if f % group_size:
        raise ValueError(f"f={f} is not a multiple of group_size={group_size}")
    if router_de.shape != (d, f // group_size):
        raise ValueError(f"router must be [d, E] = {(d, f // group_size)}, got {router_de.shape}")
    dt = jnp.dtype(x_td.dtype)
    if dt not in _SUPPORTED_DTYPES:
        raise NotImplementedError(f"unsupported dtype {dt} (bf16, fp16 or fp32)")
    if jnp.dtype(w_in_cfd.dtype) != dt or jnp.dtype(w_out_fd.dtype) != dt:
        raise ValueError(
            f"x, w_in, w_out must share a dtype: {dt}, {w_in_cfd.dtype}, {w_out_fd.dtype}"
        )


def expert_ffn(gate_pe, x_pd, w_in_cfd, w_out_fd, *, t, group_size, n_slots, plan, interpret,
               y0=None):  # fmt: skip
    """The plan's expert kernel(s) alone: ``pallas_balanced.balanced_expert_ffn`` for
    ``experts="balanced"``, else ``pallas_experts.expert_ffn`` (same arguments, same output)."""
    if plan["experts"] == "balanced":
        return pallas_balanced.balanced_expert_ffn(
            gate_pe, x_pd, w_in_cfd, w_out_fd, group_size=group_size, plan=plan,
            interpret=interpret, y0=y0,
        )  # fmt: skip
    return pallas_experts.expert_ffn(
        gate_pe, x_pd, w_in_cfd, w_out_fd, t=t, group_size=group_size, n_slots=n_slots,
        plan=plan, interpret=interpret, y0=y0,
    )  # fmt: skip


@functools.partial(
    jax.jit,
    static_argnames=(
        "group_size", "rule", "gate", "k_min", "k_max", "interpret", "tuning", "norm_eps",
    ),
)  # fmt: skip
def _decode_jit(
    x_td, router_de, w_in_cfd, w_out_fd, tau, norm_d, *, group_size, rule, gate, k_min, k_max,
    interpret, tuning, norm_eps,
):  # fmt: skip
    t, d = x_td.shape
    f = w_in_cfd.shape[1]
    e = f // group_size
    k_cap = e if k_max is None else min(k_max, e)
    plan = _plan(t, d, group_size, x_td.dtype, dict(tuning))
    tp = plan["tp"]
    ep = max(_next_pow2(e), 16)
    tr = _next_pow2(t)  # routing rows: the real tokens padded to a power of two
    fused_glue = (
        plan["routing"] == "pallas" and plan["logits"] == "pallas" and plan["glue"] == "fused"
        and tr <= FUSED_GLUE_MAX_TOKENS
    )  # fmt: skip
    # With a norm, x is the residual stream: the fused-glue logits kernel normalises it itself.
    fuse_norm = norm_d is not None and fused_glue and plan["norm"] == "fused"
    if norm_d is not None and not fuse_norm:
        x_td = rms_norm(x_td, norm_d, norm_eps)
    n_slots = min(e, t * k_cap)
    dense = plan["experts"] == "dense"  # XLA's dense matmuls consume the gate table
    acc_shape = None if dense else accumulator_shape(t, d, group_size, n_slots, plan)
    y0 = None
    if plan["routing"] == "pallas":  # one selection launch: softmax, rank-based choice, gates
        # Routing runs on the real tokens padded to a power of two, not on the expert kernel's
        # 16 dot rows: the selection kernel's work grows with its rows (tp·E² compares).
        if fused_glue:
            # The selection kernel adds the partials and zeroes the expert kernel's accumulator.
            kw = dict(stride=ep, splits=plan["logit_splits"], block_e=plan["logit_block_e"],
                      num_warps=plan["logit_warps"], interpret=interpret)  # fmt: skip
            if fuse_norm:  # the logits kernel normalises the rows (tr == t here) for the experts
                part, n_part, x_td = router_logits_partials_normed(
                    x_td, router_de, norm_d, norm_eps, **kw
                )
            else:
                part, n_part = router_logits_partials(_pad_rows(x_td, tr), router_de, **kw)
            sel_kw = dict(block_e=plan["select_block_e"], num_warps=plan["select_warps"])
            zero = acc_shape if not dense and zeroable(acc_shape, ep, sel_kw["block_e"]) else None
            gate_re, k_t, y0 = route_gates_from_partials(
                part, n_part, tau, t=t, e=e, ep=ep, rule=rule, gate=gate, k_min=k_min,
                k_max=k_max, zeros=zero, interpret=interpret, **sel_kw,
            )  # fmt: skip
        else:
            if plan["logits"] == "pallas":  # the split-K GEMV kernel + one small XLA sum
                logits_te = router_logits_pallas(
                    _pad_rows(x_td, tr), router_de, interpret=interpret
                )[:t]
            else:
                logits_te = routing.router_logits(router_de, x_td)
            gate_re, k_t = route_gates_pallas(
                logits_te, tau, tp=tr, ep=ep, rule=rule, gate=gate, k_min=k_min, k_max=k_max,
                interpret=interpret, block_e=plan["select_block_e"],
                num_warps=plan["select_warps"],
            )  # fmt: skip
    else:  # the reference's XLA ops (sort, cumsum, scatter): gates [t, E]
        gate_re, k_t = route_gates(
            x_td, router_de, tau, rule=rule, gate=gate, k_min=k_min, k_max=k_max
        )
    if dense:
        y_td = xla_masked(x_td, gate_re[:t, :e], w_in_cfd, w_out_fd, group_size=group_size)
        return y_td, k_t
    if plan["routing"] == "pallas":  # [tr, ep] rows padded to the expert kernel's tp
        gate_pe = gate_re if tr in (1, tp) else jnp.pad(gate_re, ((0, tp - tr), (0, 0)))
    else:
        gate_pe = jnp.zeros((tp, ep), jnp.float32).at[:t, :e].set(gate_re)
    # One token is never padded: the expert kernel broadcasts its row to the 16 dot rows (a pad
    # was one more XLA launch per layer, ~1.3 µs on the H200, for 32 KB of zeros).
    x_pd = x_td if t == 1 else _pad_rows(x_td, tp)
    y_pd = expert_ffn(
        gate_pe, x_pd, w_in_cfd, w_out_fd, t=t, group_size=group_size, n_slots=n_slots,
        plan=plan, interpret=interpret, y0=y0,
    )  # fmt: skip
    return y_pd[:t].astype(x_td.dtype), k_t


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
    norm_d: jax.Array | None = None,
    norm_eps: float = 1e-6,
    interpret: bool = False,
    **tuning,
) -> tuple[jax.Array, jax.Array]:
    """One PrunePath SwiGLU FFN layer for 1..16 tokens: ``(y_td [t, d] x.dtype, k_t int32 [t])``.

    Args:
        x_td: ``[t, d]`` FFN input (after the norm, or before it with ``norm_d``), bf16/fp16/fp32.
        router_de: ``[d, E]`` fp32 router.
        w_in_cfd: ``[2, f, d]`` gate/up rows, neuron-major, expert e = rows ``[e*G, (e+1)*G)``.
        w_out_fd: ``[f, d]`` down-projection rows.
        tau: fp32 scalar budget (may be traced); τ > 1 selects every expert.
        group_size: G, neurons per expert.
        rule, gate, k_min, k_max: as in ``routing.select`` / ``routing.gates``.
        norm_d: ``[d]`` RMSNorm weight (x's dtype), or None: the layer computes
            ``FFN(rms_norm(x_td, norm_d, norm_eps))``; for 1-2 tokens the router-logits kernel
            normalises the rows itself (two XLA launches fewer per layer; tuning ``norm="xla"``
            keeps the XLA norm, to measure the difference).
        norm_eps: the RMSNorm epsilon.
        interpret: run the kernel in the Pallas interpreter (CPU tests).
        **tuning: ``use_dot``, ``block_n``, ``block_d``, ``block_d_out``, ``num_warps``,
            ``num_stages`` (static; defaults chosen from t, G and d); ``routing="pallas"``
            (default: one sort-free selection kernel) or ``"xla"`` (the reference's ops);
            ``logits="pallas"`` (default with Pallas routing: the split-K router GEMV of
            ``pallas_logits.py``) or ``"xla"`` (one XLA dot);
            ``down="atomic"`` (default: the down-projection in the expert kernel, fp32 atomics
            per neuron block) or ``"split"`` (a second kernel over output columns, ``down_chunks``
            atomic adds per output element; ``block_d_down`` columns per program) or
            ``"preact"`` (as split, but the up kernel may be split over d into ``up_splits``
            programs that add pre-activations; the down kernel applies the activation);
            ``atomics="relaxed"`` (default; partial sums need no ordering) or ``"acq_rel"``
            (Pallas' fenced atomics, kept to measure the difference); ``glue="fused"``
            (default: for ≤ 2 tokens the selection kernel adds the logits' partials and zeroes
            the expert kernel's accumulator) or ``"xla"`` (an XLA reduction, padding and memset
            between the kernels, kept to measure the difference); ``logit_splits`` /
            ``logit_block_e`` (fused glue: splits of d and experts per program of the router
            GEMV; the selection kernel re-reads the splits' partials); ``select_block_e`` /
            ``select_warps`` (the selection kernel's experts per program and warps: 16 / 4);
            ``logit_warps`` (the fused-glue router GEMV's warps: 4);
            ``tail="masked"``
            (default: where d has a small power-of-two factor, ``block_d``-wide tiles with a
            masked last one) or ``"divisor"`` (the largest power-of-two block dividing d);
            ``experts="auto"`` (default: ``_experts_form`` picks by t and d), ``"dense"`` (no
            expert kernel: the gate table into XLA's dense matmuls, ``api.xla_masked``; kept to
            measure: at 2-16 distinct sequences, where the union is 43-99% of E, it measured
            slower than the expert kernels and the batched one-launch step, H100, forty-fifth
            session),
            ``"blocks"`` (``pallas_experts.py``: a program per expert and neuron block) or
            ``"balanced"`` (one token: ``pallas_balanced.py``, ``programs`` persistent programs
            sharing the union's neurons in ``block_n``-neuron units; ``prefetch=1`` software-
            pipelines its unit loop: the next unit's W_gate/W_up rows load while this one
            computes).

    Raises:
        NotImplementedError/ValueError: input outside what the kernel computes exactly
            (token count, GELU/bias layouts, dtype, shapes).
    """
    check_inputs(x_td, router_de, w_in_cfd, w_out_fd, group_size)
    if norm_d is not None and (norm_d.shape != (x_td.shape[1],) or norm_d.dtype != x_td.dtype):
        raise ValueError(
            f"norm_d must be [d] = {(x_td.shape[1],)} in x's dtype {x_td.dtype}, "
            f"got {norm_d.shape} {norm_d.dtype}"
        )
    if plgpu is None:
        raise NotImplementedError("this jax has no Pallas Triton backend")
    if not interpret and jax.default_backend() != "gpu":
        raise NotImplementedError(
            "the Pallas-Triton decode kernel needs a CUDA GPU (pass interpret=True on CPU)"
        )
    unknown = set(tuning) - {
        "use_dot", "block_n", "block_d", "block_d_out", "num_warps", "num_stages", "routing",
        "logits", "down", "down_chunks", "block_d_down", "up_splits", "atomics", "glue",
        "logit_splits", "logit_block_e", "tail", "norm", "experts", "programs", "prefetch",
        "select_block_e", "select_warps", "logit_warps",
    }  # fmt: skip
    if unknown:
        raise TypeError(f"unknown tuning options {sorted(unknown)}")
    return _decode_jit(
        x_td, router_de, w_in_cfd, w_out_fd, jnp.asarray(tau, jnp.float32), norm_d,
        group_size=group_size, rule=rule, gate=gate, k_min=k_min, k_max=k_max,
        interpret=interpret, tuning=tuple(sorted(tuning.items())), norm_eps=float(norm_eps),
    )  # fmt: skip
