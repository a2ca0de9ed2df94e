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

This module plans the static blocks (`_plan`, from the H200 sweeps), checks the input, runs the
routing and hands the gate table to the expert kernels. The layer works under ``jit`` with τ
traced, and under ``vmap`` (Pallas adds a grid axis to each kernel): a τ sweep of one checkpoint,
or independent token sets sharing the weights (interpreter, CUDA lowering and H200 tests).

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
from prunepath_jax.kernels.jt import default_programs, unit_programs
from prunepath_jax.kernels.jt import next_pow2 as _next_pow2
from prunepath_jax.kernels.pallas_experts import accumulator_shape
from prunepath_jax.kernels.pallas_logits import pow2_divisor as _pow2_divisor
from prunepath_jax.kernels.pallas_logits import (
    router_logits_pallas,
    router_logits_partials,
    router_logits_partials_normed,
)
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

MAX_TOKENS = 16
# One token at d up to this uses broadcast FMAs in 8-neuron blocks (`_plan` says why).
SMALL_D = 1024
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


def _tiles(d: int, cap: int, tail: str) -> tuple[int, int]:
    """``(block, n_tiles)`` over d: the largest power-of-two block ≤ ``cap`` dividing d, or, with
    ``tail="masked"`` where fewer tiles result, ``cap`` (≤ d's next power of two) with a masked
    last tile.

    Why: at one token a program's time is its chain of dependent tile loads, not its bytes. A
    d with a small power-of-two factor (SmolLM2-135M's 576 = 9·64, Qwen2-0.5B's 896 = 7·128)
    otherwise walks 7-15 small tiles twice (up and down); masked 512-wide tiles walk 2.
    """
    b = _pow2_divisor(d, cap)
    wide = min(cap, _next_pow2(d))
    if tail == "masked" and -(-d // wide) < d // b:
        return wide, -(-d // wide)
    return b, d // b


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


# Benchmark hook: tuning applied under every call's own options, keyed by token count (set once,
# before the first trace: the jitted layer caches its plan per static tuning).
TUNING_OVERRIDES: dict[int, dict] = {}


# Options only the block kernel takes: given one, "auto" keeps the block kernel.
_BLOCK_ONLY = frozenset({"use_dot", "block_d_out", "down", "up_splits", "down_chunks",
                         "block_d_down", "tail"})  # fmt: skip


def _experts_form(t: int, d: int, tuning: dict) -> str:
    """``"balanced"`` or ``"blocks"`` for ``experts="auto"`` (the default).

    One token with d > ``SMALL_D``: the balanced kernel (``pallas_balanced.py``), at every k.
    H200, device µs per call, one run (BENCHMARKS.md, tenth session): 8B layer at k/E 10 / 25 /
    50% balanced (2-neuron prefetched units, two programs per SM) 15.0 / 27.6 / 49.1 vs blocks
    22.9 / 28.0 / 52.7; 1B layer at 10 / 25%: 7.3 / 12.2 vs 12.5 / 14.4. (Until the 2-neuron
    default the block kernel won at a fixed k ≥ 0.75 experts per SM, and a k_min rule kept it
    there; the balanced kernel now wins or ties at every k measured, so the rule is gone.)
    """
    if t != 1 or d <= SMALL_D or _BLOCK_ONLY & set(tuning):
        return "blocks"
    return "balanced"


def _plan(t: int, d: int, g: int, dtype, tuning: dict) -> dict:
    """Static block sizes. ``use_dot`` picks tensor-core dots (tokens padded to 16 rows).

    Defaults from the H200 sweeps (BENCHMARKS.md, issue 5, Llama-3-8B layer, k/E = 25%): one
    token: tensor-core dots on 16 rows + atomic down-projection, 32-neuron blocks (device time
    from profiler traces, 2026-12-01: 27.8 µs vs 35.3 µs with 16-neuron blocks, 43.4 µs with
    broadcast FMAs, 38.3 µs split down-projection; a whole G = 32 expert per program streams
    its 768 KB with one prologue and half the atomics);
    2-16 tokens: dots + the split down-projection with 8 chunks (batch 16: 146 µs vs 470 µs with
    per-block atomics; batch 4: 112 µs vs 166 µs dot+atomics, 265 µs broadcast), 32-neuron
    blocks up to 4 tokens (104 µs vs 119 µs). Broadcast FMAs remain for G not a multiple of 16,
    and for one token with d ≤ ``SMALL_D``: there a layer is a few short dependent loads, so more
    programs with one (masked) d tile each win (SmolLM2-135M shape, 55% sparse, same run:
    970 µs/token with 8-neuron broadcast blocks vs 1109 with the 32-neuron dot blocks).
    """
    tuning = {**TUNING_OVERRIDES.get(t, {}), **tuning}
    common = _plan_common(dtype, tuning)
    experts = tuning.get("experts", "auto")
    if experts not in ("auto", "blocks", "balanced"):
        raise ValueError(f"experts must be 'auto', 'blocks' or 'balanced', got {experts!r}")
    if experts == "auto":
        experts = _experts_form(t, d, tuning)
    if experts == "balanced":
        return {**common, **_plan_balanced(t, d, g, tuning)}
    use_dot = tuning.get("use_dot")
    bn_default = 16 if g % 16 == 0 else _pow2_divisor(g, 16)
    small = t == 1 and d <= SMALL_D
    if use_dot is None:
        use_dot = g % 16 == 0 and not small
    if use_dot:
        if g % 16:
            raise NotImplementedError(f"dot path needs group_size % 16 == 0, got {g}")
        tp = MAX_TOKENS
        bn = tuning.get("block_n", 32 if t <= 4 and g % 32 == 0 else 16)
        if bn < 16:
            raise ValueError(f"dot path needs block_n >= 16, got {bn}")
    else:
        tp = _next_pow2(t)
        bn = tuning.get("block_n", min(bn_default, 8) if t > 1 or small else bn_default)
    _check_block_n(bn, g)
    one = not use_dot and tp == 1
    # Broadcast accumulators [tp, bn, bd] (two, fp32) live in registers: tp·bn·bd ≤ 16k
    # elements for one token at 8 warps (64 per thread), ≤ 4k otherwise (32 per thread, 4 warps).
    bd_cap = tuning.get("block_d", 512 if use_dot else (1024 if one else 4096 // (tp * bn)))
    stages = tuning.get("num_stages", 3)
    if use_dot and "block_d" not in tuning:
        bd_cap = _fit_smem(bd_cap, tp, bn, stages, jnp.dtype(dtype).itemsize)
    tail = tuning.get("tail", "masked")
    if tail not in ("masked", "divisor"):
        raise ValueError(f"tail must be 'masked' or 'divisor', got {tail!r}")
    bd, n_in = _tiles(d, max(bd_cap, 1), tail)
    bdo, n_out = _tiles(d, max(tuning.get("block_d_out", bd_cap), 1), tail)
    down = tuning.get("down", "split" if use_dot and t > 1 else "atomic")
    if down not in ("atomic", "split", "preact"):
        raise ValueError(f"down must be 'atomic', 'split' or 'preact', got {down!r}")
    up_splits = tuning.get("up_splits", 1)
    if up_splits != 1 and (down != "preact" or n_in % up_splits):
        raise ValueError(
            f"up_splits={up_splits} needs down='preact' and to divide the {n_in} tiles of d"
        )
    return {
        **common,
        "experts": "blocks",
        "use_dot": bool(use_dot),
        "tp": tp,
        "bn": bn,
        "bd": bd,
        "n_in": n_in,
        "bdo": bdo,
        "n_out": n_out,
        "num_warps": tuning.get("num_warps", 8 if one else 4),
        "num_stages": stages,
        "down": down,
        "up_splits": up_splits,
        "down_chunks": tuning.get("down_chunks", 8),
        "block_d_down": _pow2_divisor(d, tuning.get("block_d_down", 128)),
    }


# Shared memory the dot path's pipelined loads may take (the H200 allows 227 KB a program; the
# rest is Triton's own scratch).
SMEM_BYTES = 200 * 1024


def _fit_smem(bd: int, tp: int, bn: int, stages: int, itemsize: int) -> int:
    """Largest ``bd`` ≤ the given one whose pipelined tiles fit ``SMEM_BYTES``: Triton keeps
    ``stages - 1`` copies of the x tile ``[tp, bd]`` and the two weight tiles ``[bn, bd]`` in
    flight. Why: fp32 at 2-4 tokens (32-neuron blocks, 512 columns) asked for 320 KB and failed
    to launch on the H200 (RESOURCE_EXHAUSTED); bf16 defaults are unchanged (160 KB)."""
    while bd > 16 and max(stages - 1, 1) * (tp + 2 * bn) * bd * itemsize > SMEM_BYTES:
        bd //= 2
    return bd


def _check_block_n(bn: int, g: int) -> None:
    if g % bn or bn & (bn - 1):
        raise ValueError(f"block_n={bn} must be a power of 2 dividing group_size={g}")


def _plan_common(dtype, tuning: dict) -> dict:
    """The plan's keys shared by both expert forms: routing, glue, norm, atomics."""
    glue = tuning.get("glue", "fused")
    if glue not in ("fused", "xla"):
        raise ValueError(f"glue must be 'fused' or 'xla', got {glue!r}")
    norm = tuning.get("norm", "fused")
    if norm not in ("fused", "xla"):
        raise ValueError(f"norm must be 'fused' or 'xla', got {norm!r}")
    atomics = tuning.get("atomics", "relaxed")
    if atomics not in ("relaxed", "acq_rel"):
        raise ValueError(f"atomics must be 'relaxed' or 'acq_rel', got {atomics!r}")
    return {
        "fp32": jnp.dtype(dtype) == jnp.float32,
        "routing": tuning.get("routing", "pallas"),
        "logits": tuning.get("logits", "pallas"),
        "atomics": atomics,
        "glue": glue,
        "norm": norm,
        # Fused glue only: 16 splits of d, 32 experts a program (e2e 2026-12-01, batch 1, 75%:
        # 8B 2794 vs 2856 µs/token with 32 x 64, 1B 961 vs 965; 8 x 16: 2840 / 955).
        "logit_splits": tuning.get("logit_splits", 16),
        "logit_block_e": tuning.get("logit_block_e", 32),
        "logit_warps": _pow2_key(tuning, "logit_warps", 4),
        # The selection kernel: experts a program, warps (fused glue and XLA logits alike).
        "select_block_e": _pow2_key(tuning, "select_block_e", 16),
        "select_warps": _pow2_key(tuning, "select_warps", 4),
    }


def _pow2_key(tuning: dict, key: str, default: int) -> int:
    """``tuning[key]`` (or ``default``), checked to be a power of two (a Triton block)."""
    v = tuning.get(key, default)
    if not isinstance(v, int) or v < 1 or v & (v - 1):
        raise ValueError(f"{key} must be a power of two >= 1, got {v!r}")
    return v


def _plan_balanced(t: int, d: int, g: int, tuning: dict) -> dict:
    """Blocks of the one-token balanced kernel (``pallas_balanced.py``): ``block_n`` neurons a
    unit, d in ``block_d``-column chunks, ``programs`` persistent programs (default: two per SM
    for prefetched 2-neuron units, else one)."""
    if t != 1:
        raise ValueError(f"experts='balanced' is the one-token kernel, got {t} tokens")
    bad = _BLOCK_ONLY & set(tuning)
    if bad:
        raise ValueError(f"options {sorted(bad)} do not apply to experts='balanced'")
    # 2-neuron units with the next unit's rows prefetched, two programs per SM: H200 device µs
    # at 8B k/E 10 / 25 / 50% 15.0 / 27.6 / 49.1 vs 4-neuron units at one program per SM 15.9 /
    # 30.7 / 55.9; at 1B 12.2 vs 13.2 at 25%, but 7.3 vs 6.5 at 10%. 1-neuron units tie at 8B
    # and lose at 1B; 4 warps at four programs per SM lose (19.5 / 32.5 / 53.8 at 8B); 8- and
    # 16-neuron units with prefetch spill registers (33 / 460 µs at 8B 10%). BENCHMARKS.md,
    # tenth session.
    prefetch = tuning.get("prefetch", 1)
    if prefetch not in (0, 1):
        raise ValueError(f"prefetch must be 0 or 1, got {prefetch!r}")
    bn = tuning.get("block_n", _pow2_divisor(g, 2 if prefetch else 16))
    _check_block_n(bn, g)
    bc, n_c = pallas_balanced.chunking(d, tuning.get("block_d", 4096))
    # Two programs per SM need the prefetched loop's register budget at 2-neuron units.
    programs = tuning.get("programs") or (unit_programs(bn) if prefetch else default_programs())
    if programs < 1:
        raise ValueError(f"programs must be >= 1, got {programs}")
    return {
        "experts": "balanced",
        "prefetch": int(prefetch),
        "tp": 1,
        "bn": bn,
        "bc": bc,
        "n_c": n_c,
        "programs": int(programs),
        "num_warps": tuning.get("num_warps", 8),
        "num_stages": tuning.get("num_stages", 2),
    }


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
    acc_shape = accumulator_shape(t, d, group_size, n_slots, plan)
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
            zero = acc_shape if zeroable(acc_shape, ep, sel_kw["block_e"]) else None
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
        gate_pe = gate_re if tr in (1, tp) else jnp.pad(gate_re, ((0, tp - tr), (0, 0)))
    else:  # the reference's XLA ops (sort, cumsum, scatter)
        gate_te, k_t = route_gates(
            x_td, router_de, tau, rule=rule, gate=gate, k_min=k_min, k_max=k_max
        )
        gate_pe = jnp.zeros((tp, ep), jnp.float32).at[:t, :e].set(gate_te)
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
            ``experts="auto"`` (default: ``_experts_form`` picks by t and d),
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
