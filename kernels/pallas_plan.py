"""Static block plans of the Pallas decode layer (``pallas_decode.py``), from the H200 sweeps.

Why a module of its own: the plan is pure Python over shapes and a tuning dict (no arrays), read
by the layer, its tests and the benchmarks, and it is where every measured default lives with the
numbers that chose it. ``pallas_decode.sparse_ffn_decode`` validates the tuning keys, calls
:func:`plan` under jit with the static shapes, and hands the result to the kernels.
"""

from __future__ import annotations

import jax.numpy as jnp

from prunepath_jax.kernels import pallas_balanced
from prunepath_jax.kernels.jt import default_programs, unit_programs
from prunepath_jax.kernels.jt import next_pow2 as _next_pow2
from prunepath_jax.kernels.pallas_logits import pow2_divisor as _pow2_divisor

MAX_TOKENS = 16
# One token at d up to this uses broadcast FMAs in 8-neuron blocks (`plan` says why).
SMALL_D = 1024


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


def plan(t: int, d: int, g: int, dtype, tuning: dict) -> dict:
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
    if experts not in ("auto", "blocks", "balanced", "dense"):
        raise ValueError(
            f"experts must be 'auto', 'blocks', 'balanced' or 'dense', got {experts!r}"
        )
    if experts == "auto":
        experts = _experts_form(t, d, tuning)
    if experts == "dense":  # no expert kernel: XLA's dense matmuls over the gate table
        return {**common, "experts": "dense", "tp": _next_pow2(t)}
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
