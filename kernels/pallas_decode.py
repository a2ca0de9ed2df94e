"""Sparse-expert decode FFN (1-16 tokens) as Pallas kernels on the Triton backend.

Why this shape. At decode the FFN is bound by the bytes of the selected experts' weights, and
for small models by launches (DESIGN.md §4). So the layer is: the router logits (the split-K
GEMV kernel of ``pallas_logits.py``; XLA's narrow GEMV was ~2x slower inside the layer), the
sort-free selection kernel (``pallas_routing.py``: softmax, the paper's cumulative-mass rule,
sigmoid gates → a gate table ``[t, E]``), and the expert kernel(s). For one or two tokens the
selection kernel also adds the logits kernel's unreduced split-K partials and zeroes the expert
kernel's atomic accumulator (``glue="fused"``), so a one-token layer is exactly three launches
with nothing between them (measured: 2 XLA launches fewer per 8B layer, 1 per 1B layer; 1-3%
of an end-to-end token, BENCHMARKS.md):

* Union of experts, in the kernel. Every program reads the small gate table (zero for experts a
  token did not select), takes the union over tokens and its prefix count, and finds the expert
  of its slot by one reduction. No host sync, no scatter, no extra launch; an expert that several
  tokens chose is read once, and each token's contribution is masked by its own gate.
* Neuron blocks, not experts, are the unit of work. An FFN neuron is independent of the others
  until the down-projection sums them, so program ``(slot, nb)`` owns neurons
  ``[e*G + nb*BN, e*G + (nb+1)*BN)`` of expert ``e``: it reads their W_gate/W_up rows
  (contiguous ``[BN, d]`` slabs, in ``[BN, BD]`` tiles from HBM with ``pl.ds``) and applies
  ``silu(gate)·up·σ(g)`` in fp32. Splitting G gives the GPU enough programs at batch 1 and low k
  (45 experts at 10% of E = 448 would occupy a third of an H200's 132 SMs).
* Down-projection, two forms. ``down="atomic"`` (default for one token): the same program reads
  its W_out rows and adds its ``[t, d]`` share with relaxed fp32 atomics (``pallas_atomic.py``:
  Pallas' own are acquire-release, 12-17% slower here) — one launch; one token adds one row
  and is never padded (its row is broadcast to the dot's 16 inside). ``down="split"``
  (default for 2-16 tokens): the program stores its activations and a second kernel, whose
  programs own output columns, sums over the union's experts in registers and adds once per
  chunk; measured on the H200 at batch 16 it is 3.2× faster than per-block atomics
  (BENCHMARKS.md, issue 5).
* Programs past the union count return at once, so the grid is static
  (``min(E, t·k_max) · G/BN`` programs) while the work follows the traced τ.

Two inner-product forms: ``plgpu.dot`` (tensor cores; needs every dim ≥ 16, so tokens are padded
to 16 rows and BN ≥ 16) and broadcast-multiply + sum (no minimum; the one-token path). Both
accumulate in fp32; fp32 weights use IEEE (not TF32) dots.

The result equals ``prunepath_jax.kernels.reference.sparse_ffn_reference`` (the masked XLA math
of ``PrunePathFFN``) up to summation order, and ``k_t`` exactly (see ``pallas_routing.py`` for
the one float-boundary caveat of sort-free selection).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from prunepath_jax import routing
from prunepath_jax.kernels import pallas_atomic
from prunepath_jax.kernels.pallas_logits import pow2_divisor as _pow2_divisor
from prunepath_jax.kernels.pallas_logits import router_logits_pallas, router_logits_partials
from prunepath_jax.kernels.pallas_routing import (
    route_gates_from_partials,
    route_gates_pallas,
    zeroable,
)
from prunepath_jax.kernels.reference import route_reference

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


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


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


# Benchmark hook: tuning applied under every call's own options, keyed by token count (set once,
# before the first trace: the jitted layer caches its plan per static tuning).
TUNING_OVERRIDES: dict[int, dict] = {}


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
    if g % bn or bn & (bn - 1):
        raise ValueError(f"block_n={bn} must be a power of 2 dividing group_size={g}")
    one = not use_dot and tp == 1
    # Broadcast accumulators [tp, bn, bd] (two, fp32) live in registers: tp·bn·bd ≤ 16k
    # elements for one token at 8 warps (64 per thread), ≤ 4k otherwise (32 per thread, 4 warps).
    bd_cap = tuning.get("block_d", 512 if use_dot else (1024 if one else 4096 // (tp * bn)))
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
    glue = tuning.get("glue", "fused")
    if glue not in ("fused", "xla"):
        raise ValueError(f"glue must be 'fused' or 'xla', got {glue!r}")
    atomics = tuning.get("atomics", "relaxed")
    if atomics not in ("relaxed", "acq_rel"):
        raise ValueError(f"atomics must be 'relaxed' or 'acq_rel', got {atomics!r}")
    return {
        "use_dot": bool(use_dot),
        "tp": tp,
        "bn": bn,
        "bd": bd,
        "n_in": n_in,
        "bdo": bdo,
        "n_out": n_out,
        "num_warps": tuning.get("num_warps", 8 if one else 4),
        "num_stages": tuning.get("num_stages", 3),
        "fp32": jnp.dtype(dtype) == jnp.float32,
        "routing": tuning.get("routing", "pallas"),
        "logits": tuning.get("logits", "pallas"),
        "down": down,
        "up_splits": up_splits,
        "atomics": atomics,
        "glue": glue,
        # Fused glue only: 16 splits of d, 32 experts a program (e2e 2026-12-01, batch 1, 75%:
        # 8B 2794 vs 2856 µs/token with 32 x 64, 1B 961 vs 965; 8 x 16: 2840 / 955).
        "logit_splits": tuning.get("logit_splits", 16),
        "logit_block_e": tuning.get("logit_block_e", 32),
        "down_chunks": tuning.get("down_chunks", 8),
        "block_d_down": _pow2_divisor(d, tuning.get("block_d_down", 128)),
    }


def _atomic_add(plan, ref, idx, val, mask=None):
    """Partial-sum atomics: relaxed by default (``pallas_atomic.py`` says why); ``atomics=
    "acq_rel"`` keeps Pallas' own (fenced) atomics, for measuring the difference."""
    if plan["atomics"] == "relaxed":
        return pallas_atomic.atomic_add(ref, idx, val, mask=mask)
    return plgpu.atomic_add(ref, idx, val, mask=mask)


def _load_cols(ref, shape, c0, d, tail: bool):
    """A ``shape`` tile whose columns start at ``c0``; with ``tail``, columns ≥ d read as 0."""
    if not tail:
        return plgpu.load(ref)
    ok = (c0 + jax.lax.broadcasted_iota(jnp.int32, shape, 1)) < d
    return plgpu.load(ref, mask=ok, other=0)


def _union(gate_ref):
    """Union of the tokens' experts from the gate table: ``(gate_te, cnt_e, n_used)``."""
    gate_te = gate_ref[...]  # [tp or 1, ep] fp32, zero rows/cols for padding
    used_e = jnp.max((gate_te != 0.0).astype(jnp.int32), axis=0)  # [ep]
    return gate_te, jnp.cumsum(used_e), jnp.sum(used_e)  # inclusive prefix count of the union


def _kernel(
    gate_ref, x_ref, w_in_ref, w_out_ref, y_in_ref, y_ref, *, t, d, f, g, ep, plan, interpret
):
    """One program = one (union slot, neuron block[, d split]). With ``plan["down"] == "split"``
    the program stores its activations ``[tp, bn]`` into ``y_ref`` (``[tp, n_slots·G]``,
    slot-major) for :func:`_down_kernel` instead of doing the down-projection with atomics.

    ``"preact"``: the program adds its gate and up pre-activations over its share of d (one of
    ``up_splits``) into ``y_ref`` (``[tp, n_slots·2G]``: a slot's G gate then G up columns) with
    fp32 atomics, and :func:`_down_kernel` applies ``silu(g)·u·σ`` when it reads them. Why: at
    one token and low k a program's serial chain of dependent loads, not the bytes, sets the
    time (the kernel's fixed cost was ~23 µs of a 38 µs call at 10% of the 8B layer); splitting
    d shortens every chain and multiplies the programs that stream in parallel."""
    del y_in_ref  # aliased to y_ref (the zeroed fp32 accumulator)
    tp, bn, bd, bdo = plan["tp"], plan["bn"], plan["bd"], plan["bdo"]
    splits, ks_n = g // bn, plan["up_splits"]
    n_in = plan["n_in"] // ks_n  # d tiles per program (the last of d may be partial: masked)
    in_tail, out_tail = bd * plan["n_in"] != d, bdo * plan["n_out"] != d
    pid = pl.program_id(0)
    ks = pid % ks_n
    slot = pid // ks_n // splits
    nb = pid // ks_n % splits

    gate_te, cnt_e, n_used = _union(gate_ref)

    @pl.when(slot < n_used)
    def _():
        # Expert of this slot: the first e with cnt_e == slot + 1 is #(cnt_e <= slot).
        e = jnp.sum((cnt_e <= slot).astype(jnp.int32))
        iota_e = jax.lax.broadcasted_iota(jnp.int32, gate_te.shape, 1)
        g_t = jnp.sum(jnp.where(iota_e == e, gate_te, 0.0), axis=1)  # [tp] or [1]
        row0 = e * g + nb * bn
        rows = pl.ds(pl.multiple_of(row0, bn), bn)
        rows_up = pl.ds(pl.multiple_of(f + row0, bn), bn)  # w_in is viewed as [2f, d]
        prec = jax.lax.Precision.HIGHEST if plan["fp32"] else None

        def in_body(i, carry):
            acc_g, acc_u = carry
            c0 = (ks * n_in + i) * bd
            cols = pl.ds(pl.multiple_of(c0, bd), bd)
            xr = x_ref.shape[0]
            x = _load_cols(x_ref.at[:, cols], (xr, bd), c0, d, in_tail)  # [tp or 1, bd]
            if xr != tp:  # one token on the dot path: 16 identical rows, no padding
                x = jnp.broadcast_to(x, (tp, bd))
            wg = _load_cols(w_in_ref.at[rows, cols], (bn, bd), c0, d, in_tail)
            wu = _load_cols(w_in_ref.at[rows_up, cols], (bn, bd), c0, d, in_tail)
            if plan["use_dot"]:
                acc_g += plgpu.dot(x, wg, trans_b=True, precision=prec)
                acc_u += plgpu.dot(x, wu, trans_b=True, precision=prec)
            else:  # elementwise FMAs into [tp, bn, bd]; one cross-thread reduction at the end
                x32 = x.astype(jnp.float32)[:, None, :]
                acc_g += x32 * wg.astype(jnp.float32)[None]
                acc_u += x32 * wu.astype(jnp.float32)[None]
            return acc_g, acc_u

        acc_shape = (tp, bn) if plan["use_dot"] else (tp, bn, bd)
        zero = jnp.zeros(acc_shape, jnp.float32)
        h_g, h_u = jax.lax.fori_loop(0, n_in, in_body, (zero, zero))
        if not plan["use_dot"]:
            h_g, h_u = jnp.sum(h_g, axis=-1), jnp.sum(h_u, axis=-1)  # [tp, bn]
        if plan["down"] == "preact":
            c0 = slot * 2 * g + nb * bn
            for c, h in ((c0, h_g), (c0 + g, h_u)):
                cols = (pl.ds(0, tp), pl.ds(pl.multiple_of(c, bn), bn))
                if ks_n == 1:
                    plgpu.store(y_ref.at[cols], h)
                else:
                    _atomic_add(plan, y_ref, cols, h)
            return
        a_tn = h_g / (1.0 + jnp.exp(-h_g)) * h_u * g_t[:, None]  # silu(gate)·up·σ(g), fp32
        if plan["down"] == "split":
            acols = pl.ds(pl.multiple_of(slot * g + nb * bn, bn), bn)
            plgpu.store(y_ref.at[:, acols], a_tn)
            return
        row_ok = jax.lax.broadcasted_iota(jnp.int32, (tp, bdo), 0) < t
        one_row = y_ref.shape[0] == 1 and tp > 1  # one token: its row alone goes out

        def out_body(i, carry):
            cols = pl.ds(pl.multiple_of(i * bdo, bdo), bdo)
            # [bn, bdo]; past d zeros, added to the accumulator's padding columns (no mask)
            wo = _load_cols(w_out_ref.at[rows, cols], (bn, bdo), i * bdo, d, out_tail)
            if plan["use_dot"]:
                lhs = a_tn if plan["fp32"] else a_tn.astype(wo.dtype)
                part = plgpu.dot(lhs, wo, precision=prec)  # [tp, bdo] fp32
            else:
                part = jnp.sum(a_tn[:, :, None] * wo.astype(jnp.float32)[None], axis=1)
            if one_row:  # the 16 rows are the same token's: any one is exact (max of equals)
                _atomic_add(plan, y_ref, (pl.ds(0, 1), cols), jnp.max(part, axis=0)[None, :])
                return carry
            # Rows past t are padding (zeros, or copies of the token); the mask skips their
            # atomics. The interpreter cannot discharge masked atomics: it adds them to rows
            # the caller drops.
            mask = None if interpret else row_ok
            _atomic_add(plan, y_ref, (pl.ds(0, tp), cols), part, mask=mask)
            return carry

        jax.lax.fori_loop(0, plan["n_out"], out_body, 0)


def _down_kernel(gate_ref, act_ref, w_out_ref, y_in_ref, y_ref, *, t, g, e, n_slots, plan,
                 interpret):  # fmt: skip
    """Down-projection without per-expert atomics: program ``(j, c)`` owns output columns
    ``[j·bdo, (j+1)·bdo)`` and union slots ``c, c + C, c + 2C, …``; it sums
    ``act[:, slot] @ W_out[expert(slot), cols]`` in registers and adds once (C chunks ⇒ C adds
    per output element instead of one per neuron block)."""
    del y_in_ref
    tp = plan["tp"]
    bdo, chunks = plan["block_d_down"], plan["down_chunks"]
    preact = plan["down"] == "preact"
    j, c = pl.program_id(0), pl.program_id(1)
    gate_te, cnt_e, n_used = _union(gate_ref)
    cols = pl.ds(pl.multiple_of(j * bdo, bdo), bdo)
    prec = jax.lax.Precision.HIGHEST if plan["fp32"] else None

    def body(i, acc):
        slot = c + i * chunks
        ok = slot < n_used  # a static trip count (pipelinable loads); dead slots load nothing
        ex = jnp.minimum(jnp.sum((cnt_e <= slot).astype(jnp.int32)), e - 1)
        if preact:  # [tp, g] gate and up pre-activations -> silu(g)·u·σ, fp32
            c0 = slot * 2 * g
            hg, hu = (
                plgpu.load(act_ref.at[:, pl.ds(pl.multiple_of(c0 + o, g), g)],
                           mask=jnp.full((tp, g), ok), other=0.0)
                for o in (0, g)
            )  # fmt: skip
            iota_e = jax.lax.broadcasted_iota(jnp.int32, gate_te.shape, 1)
            g_t = jnp.sum(jnp.where(iota_e == ex, gate_te, 0.0), axis=1)  # [tp] or [1]
            a = hg / (1.0 + jnp.exp(-hg)) * hu * g_t[:, None]
        else:
            a = plgpu.load(
                act_ref.at[:, pl.ds(pl.multiple_of(slot * g, g), g)],
                mask=jnp.full((tp, g), ok),
                other=0.0,
            )  # [tp, g] fp32
        wo = plgpu.load(
            w_out_ref.at[pl.ds(pl.multiple_of(ex * g, g), g), cols],
            mask=jnp.full((g, bdo), ok),
            other=0.0,
        )  # [g, bdo]
        if plan["use_dot"]:
            lhs = a if plan["fp32"] else a.astype(wo.dtype)
            return acc + plgpu.dot(lhs, wo, precision=prec)
        return acc + jnp.sum(a[:, :, None] * wo.astype(jnp.float32)[None], axis=1)

    n_iter = -(-n_slots // chunks)
    if preact:  # many chunks, few live slots each: stop at the union's end (a dynamic loop)
        n_iter = jnp.clip((n_used - c + chunks - 1) // chunks, 0, n_iter)
    acc = jax.lax.fori_loop(0, n_iter, body, jnp.zeros((tp, bdo), jnp.float32))
    row_ok = jax.lax.broadcasted_iota(jnp.int32, (tp, bdo), 0) < t
    _atomic_add(plan, y_ref, (pl.ds(0, tp), cols), acc, mask=None if interpret else row_ok)


def accumulator_shape(t: int, d: int, group_size: int, n_slots: int, plan: dict):
    """Shape of the expert kernel's fp32 output buffer (zeroed, aliased): ``[1 or tp, d']`` for
    the atomic down-projection (d' = d rounded up to whole output tiles), the activations
    ``[tp, n_slots·G(·2)]`` for the split forms."""
    tp = plan["tp"]
    if plan["down"] == "atomic":  # whole output tiles: a masked last tile adds to padding
        return (1 if t == 1 else tp, plan["bdo"] * plan["n_out"])
    return (tp, n_slots * group_size * (2 if plan["down"] == "preact" else 1))


def expert_ffn(
    gate_pe, x_pd, w_in_cfd, w_out_fd, *, t, group_size, n_slots, plan, interpret, y0=None
):
    """The expert kernel alone: fp32 ``[tp, d]`` from the gate table and padded x ``[tp, d]``.

    Separate so benchmarks can time the bytes-bound part without the routing launches.
    ``n_slots`` bounds the union size statically (``min(E, t·k_max)``). The gate table is
    ``[tp, ep]``, or ``[1, ep]`` for one token: every program reads it before its first weight
    load, so one token does not pay for 15 padding rows (32 KB at E = 448) in that prologue.
    ``y0``: the zeroed accumulator (``accumulator_shape``) if the caller has one (the selection
    kernel zeroes it on the way), else a fresh ``jnp.zeros`` (an XLA memset).
    """
    tp = plan["tp"]
    tg, ep = gate_pe.shape
    if tg not in (1, tp) or x_pd.shape[0] not in (1, tp):
        raise ValueError(f"gate table and x need 1 or {tp} rows: {gate_pe.shape}, {x_pd.shape}")
    f, d = w_out_fd.shape
    split = plan["down"] != "atomic"
    acc_shape = accumulator_shape(t, d, group_size, n_slots, plan)
    if y0 is None:
        y0 = jnp.zeros(acc_shape, jnp.float32)
    elif y0.shape != acc_shape:
        raise ValueError(f"accumulator {y0.shape} != {acc_shape}")
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    gate_spec = pl.BlockSpec((tg, ep), lambda *_: (0, 0))  # small: every program reads it
    params = plgpu.CompilerParams(num_warps=plan["num_warps"], num_stages=plan["num_stages"])
    out = pl.pallas_call(
        functools.partial(
            _kernel, t=t, d=d, f=f, g=group_size, ep=ep, plan=plan, interpret=interpret
        ),
        out_shape=jax.ShapeDtypeStruct(acc_shape, jnp.float32),
        grid=(n_slots * (group_size // plan["bn"]) * plan["up_splits"],),
        in_specs=[
            gate_spec,
            any_spec,  # x_td [tp, d]
            any_spec,  # w_in [2f, d]: gate rows then up rows (a free reshape)
            any_spec,  # w_out_fd [f, d]
            any_spec,  # y0 [tp, d] fp32 zeros (aliased to the output) / act [tp, a_cols]
        ],
        out_specs=any_spec,
        input_output_aliases={4: 0},
        compiler_params=params,
        interpret=interpret,
        name="prunepath_sparse_ffn_decode",
    )(gate_pe, x_pd, w_in_cfd.reshape(2 * f, d), w_out_fd, y0)
    if not split:
        return out[:, :d]  # a slice XLA fuses into the consumer
    bdo = plan["block_d_down"]
    chunks = min(plan["down_chunks"], n_slots)
    plan = {**plan, "down_chunks": chunks}
    return pl.pallas_call(
        functools.partial(
            _down_kernel,
            t=t,
            g=group_size,
            e=f // group_size,
            n_slots=n_slots,
            plan=plan,
            interpret=interpret,
        ),
        out_shape=jax.ShapeDtypeStruct((tp, d), jnp.float32),
        grid=(d // bdo, chunks),
        in_specs=[gate_spec, any_spec, any_spec, any_spec],  # gate, act, w_out, y0
        out_specs=any_spec,
        input_output_aliases={3: 0},
        compiler_params=params,
        interpret=interpret,
        name="prunepath_sparse_ffn_down",
    )(gate_pe, out, w_out_fd, jnp.zeros((tp, d), jnp.float32))


@functools.partial(
    jax.jit,
    static_argnames=("group_size", "rule", "gate", "k_min", "k_max", "interpret", "tuning"),
)
def _decode_jit(
    x_td, router_de, w_in_cfd, w_out_fd, tau, *, group_size, rule, gate, k_min, k_max, interpret,
    tuning,
):  # fmt: skip
    t, d = x_td.shape
    f = w_in_cfd.shape[1]
    e = f // group_size
    k_cap = e if k_max is None else min(k_max, e)
    plan = _plan(t, d, group_size, x_td.dtype, dict(tuning))
    tp = plan["tp"]
    ep = max(_next_pow2(e), 16)

    # One token is never padded: the expert kernel broadcasts its row to the 16 dot rows (a pad
    # was one more XLA launch per layer, ~1.3 µs on the H200, for 32 KB of zeros).
    x_pd = x_td if t in (1, tp) else jnp.zeros((tp, d), x_td.dtype).at[:t].set(x_td)
    n_slots = min(e, t * k_cap)
    acc_shape = accumulator_shape(t, d, group_size, n_slots, plan)
    y0 = None
    if plan["routing"] == "pallas":  # one selection launch: softmax, rank-based choice, gates
        # Routing runs on the real tokens padded to a power of two, not on the expert kernel's
        # 16 dot rows: the selection kernel's work grows with its rows (tp·E² compares).
        tr = _next_pow2(t)
        if plan["logits"] == "pallas":  # the split-K GEMV kernel
            x_rd = x_pd[:tr] if tr <= tp else jnp.zeros((tr, d), x_td.dtype).at[:t].set(x_td)
        if plan["logits"] == "pallas" and plan["glue"] == "fused" and tr <= FUSED_GLUE_MAX_TOKENS:
            # The selection kernel adds the partials and zeroes the expert kernel's accumulator.
            part, n_part = router_logits_partials(
                x_rd, router_de, stride=ep, splits=plan["logit_splits"],
                block_e=plan["logit_block_e"], interpret=interpret,
            )  # fmt: skip
            zero = acc_shape if zeroable(acc_shape, ep) else None
            gate_re, k_t, y0 = route_gates_from_partials(
                part, n_part, tau, t=t, e=e, ep=ep, rule=rule, gate=gate, k_min=k_min,
                k_max=k_max, zeros=zero, interpret=interpret,
            )  # fmt: skip
        else:
            if plan["logits"] == "pallas":  # + one small XLA sum of the partials
                logits_te = router_logits_pallas(x_rd, router_de, interpret=interpret)[:t]
            else:
                logits_te = routing.router_logits(router_de, x_td)
            gate_re, k_t = route_gates_pallas(
                logits_te, tau, tp=tr, ep=ep, rule=rule, gate=gate, k_min=k_min, k_max=k_max,
                interpret=interpret,
            )  # fmt: skip
        gate_pe = gate_re if tr in (1, tp) else jnp.pad(gate_re, ((0, tp - tr), (0, 0)))
    else:  # the reference's XLA ops (sort, cumsum, scatter)
        gate_te, k_t = route_gates(
            x_td, router_de, tau, rule=rule, gate=gate, k_min=k_min, k_max=k_max
        )
        gate_pe = jnp.zeros((tp, ep), jnp.float32).at[:t, :e].set(gate_te)
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
    interpret: bool = False,
    **tuning,
) -> tuple[jax.Array, jax.Array]:
    """One PrunePath SwiGLU FFN layer for 1..16 tokens: ``(y_td [t, d] x.dtype, k_t int32 [t])``.

    Args:
        x_td: ``[t, d]`` FFN input (after the norm), bf16/fp16/fp32.
        router_de: ``[d, E]`` fp32 router.
        w_in_cfd: ``[2, f, d]`` gate/up rows, neuron-major, expert e = rows ``[e*G, (e+1)*G)``.
        w_out_fd: ``[f, d]`` down-projection rows.
        tau: fp32 scalar budget (may be traced); τ > 1 selects every expert.
        group_size: G, neurons per expert.
        rule, gate, k_min, k_max: as in ``routing.select`` / ``routing.gates``.
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
            GEMV; the selection kernel re-reads the splits' partials); ``tail="masked"``
            (default: where d has a small power-of-two factor, ``block_d``-wide tiles with a
            masked last one) or ``"divisor"`` (the largest power-of-two block dividing d).

    Raises:
        NotImplementedError/ValueError: input outside what the kernel computes exactly
            (token count, GELU/bias layouts, dtype, shapes).
    """
    check_inputs(x_td, router_de, w_in_cfd, w_out_fd, group_size)
    if plgpu is None:
        raise NotImplementedError("this jax has no Pallas Triton backend")
    if not interpret and jax.default_backend() != "gpu":
        raise NotImplementedError(
            "the Pallas-Triton decode kernel needs a CUDA GPU (pass interpret=True on CPU)"
        )
    unknown = set(tuning) - {
        "use_dot", "block_n", "block_d", "block_d_out", "num_warps", "num_stages", "routing",
        "logits", "down", "down_chunks", "block_d_down", "up_splits", "atomics", "glue",
        "logit_splits", "logit_block_e", "tail",
    }  # fmt: skip
    if unknown:
        raise TypeError(f"unknown tuning options {sorted(unknown)}")
    return _decode_jit(
        x_td, router_de, w_in_cfd, w_out_fd, jnp.asarray(tau, jnp.float32),
        group_size=group_size, rule=rule, gate=gate, k_min=k_min, k_max=k_max,
        interpret=interpret, tuning=tuple(sorted(tuning.items())),
    )  # fmt: skip
