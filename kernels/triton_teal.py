"""TEAL's batch-1 decode FFN in Triton: the baseline's speed on the same GPU as ours.

Why. Issue 5 compares our decode speedups with TEAL's *published* 1.53× / 1.8× (7B, batch 1,
another GPU and code base), and ``eval/teal.py`` showed TEAL keeping more quality per byte
than training-free PrunePath. Measuring TEAL's kind of kernel here, beside ours, on the same
shapes, turns the comparison into one run's ratio.

What. TEAL skips the weights of small activations: a GEMV ``y = x W`` reads only the rows
``W[j, :]`` whose input passes the threshold, ``|x_j| >= t``. The weights are laid out
input-major (``W[K, N]``: row j is input j's weights for every output, contiguous), so a
skipped input is a skipped row. By default (TEAL's own way) XLA first lists the kept inputs'
indices (``compact``: a prefix sum and a scatter), and ``_kept_rows_kernel`` walks that list:
each program ``BN`` outputs and a stretch of the list (split-K, fp32 atomics when there is more
than one stretch), ``BK`` rows a load through Triton's software pipeline, so the loop's trip
count falls with the sparsity. ``_masked_rows_kernel`` (``compacted=False``) walks every row
with the mask instead: measured latency-bound, 168-349 µs an 8B layer at any sparsity against
dense 147 (BENCHMARKS.md, fortieth session). The compacted kernel is correct under the
interpreter and lowers for sm_90, but is **not yet timed on a GPU**. ``teal_ffn_decode`` is the
FFN: gate/up as one GEMV over ``W_in[d, c·f]`` (input-major), the activation in XLA, then the
down projection over ``W_out[f, d]`` (already input-major) thresholded at ``|a| >= t_a``: the
same math as ``eval.teal.teal_ffn``.

Batch 1 only (TEAL's own setting): at several tokens the union of their kept inputs is what
must be read, and it fills up fast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from prunepath_jax.kernels import jt
from prunepath_jax.models.layers import activation

# Outputs a program (a 256-byte bf16 row segment a row), rows a load, software-pipeline stages.
BLOCK_N = 128
BLOCK_K = 32
STAGES = 3
WARPS = 4
# Programs to aim for: two waves of the H200's 132 SMs (split-K adds programs where the
# output is narrow: the down projection's 4096 outputs are 32 blocks).
TARGET_PROGRAMS = 264


@triton.jit
def _masked_rows_kernel(
    x_ptr,  # [K] the input (any float dtype)
    w_ptr,  # [K, N] input-major weights
    t_ptr,  # [1] f32 threshold
    y_ptr,  # out [N] f32 (zeroed when split: the stretches add with atomics)
    K: tl.constexpr, N: tl.constexpr, KS: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
    ATOMIC: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """``y[n] += Σ_{j in stretch, |x_j| >= t} x_j · W[j, n]`` for this program's ``BN``
    outputs (axis 0) and ``KS`` inputs (axis 1)."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    nm = rn < N
    k_lo = tl.program_id(1) * KS
    t = tl.load(t_ptr)
    acc = tl.zeros([BN], tl.float32)
    for k0 in tl.range(k_lo, k_lo + KS, BK, num_stages=STAGES):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
        keep = (rk < K) & (tl.abs(x) >= t)
        w = tl.load(w_ptr + rk.to(tl.int64)[:, None] * N + rn[None, :],
                    mask=keep[:, None] & nm[None, :], other=0.0)  # fmt: skip
        acc += tl.sum(w.to(tl.float32) * x[:, None], 0)
    if ATOMIC:
        tl.atomic_add(y_ptr + rn, acc, mask=nm, sem="relaxed")
    else:
        tl.store(y_ptr + rn, acc, mask=nm)


@triton.jit
def _kept_rows_kernel(
    idx_ptr,  # [K] i32 the kept inputs' indices, in order, then padding
    n_ptr,  # [1] i32 how many are kept
    xk_ptr,  # [K] f32 the kept inputs' values, in the same order
    w_ptr,  # [K, N] input-major weights
    y_ptr,  # out [N] f32 (zeroed when split: the stretches add with atomics)
    N: tl.constexpr, S: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
    ATOMIC: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """``y[n] += Σ_i xk_i · W[idx_i, n]`` over this program's share of the ``n`` kept rows: the
    list cut into ``S`` stretches of whole ``BK`` chunks, so the loop's trip count falls with
    the sparsity (``_masked_rows_kernel`` walks every row, kept or not)."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    nm = rn < N
    n = tl.load(n_ptr)
    per = ((n + S - 1) // S + BK - 1) // BK * BK
    lo = tl.program_id(1) * per
    hi = tl.minimum(lo + per, n)
    acc = tl.zeros([BN], tl.float32)
    for i0 in tl.range(lo, hi, BK, num_stages=STAGES):
        ri = i0 + tl.arange(0, BK)
        im = ri < hi
        rk = tl.load(idx_ptr + ri, mask=im, other=0)
        x = tl.load(xk_ptr + ri, mask=im, other=0.0)
        w = tl.load(w_ptr + rk.to(tl.int64)[:, None] * N + rn[None, :],
                    mask=im[:, None] & nm[None, :], other=0.0)  # fmt: skip
        acc += tl.sum(w.to(tl.float32) * x[:, None], 0)
    if ATOMIC:
        tl.atomic_add(y_ptr + rn, acc, mask=nm, sem="relaxed")
    else:
        tl.store(y_ptr + rn, acc, mask=nm)


def compact(x_k: jax.Array, t) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(idx [K] i32, n [1] i32, xk [K] f32)``: the inputs with ``|x| >= t``, their indices in
    order (TEAL's own first step), in XLA: a prefix sum and a scatter, no host sync."""
    x_f = x_k.astype(jnp.float32)
    keep = jnp.abs(x_f) >= jnp.asarray(t, jnp.float32)
    (idx,) = jnp.nonzero(keep, size=x_k.shape[0], fill_value=0)
    n = keep.sum(dtype=jnp.int32)
    xk = jnp.where(jnp.arange(x_k.shape[0]) < n, x_f[idx], 0.0)
    return idx.astype(jnp.int32), n.reshape(1), xk


def _split(
    k: int, n: int, block_n: int, block_k: int, split_k: int | None,
    programs: int = TARGET_PROGRAMS,
) -> tuple[int, int]:  # fmt: skip
    """``(splits, KS)``: input stretches (``split_k``, or enough for about ``programs``
    programs) of a multiple of ``block_k`` rows."""
    n_blocks = -(-n // block_n)
    s = split_k or max(1, min(-(-k // block_k), programs // n_blocks))
    ks = -(-k // s)
    ks = -(-ks // block_k) * block_k
    return -(-k // ks), ks


def masked_gemv(
    x_k: jax.Array,
    w_kn: jax.Array,
    t,
    *,
    block_n: int = BLOCK_N,
    block_k: int = BLOCK_K,
    split_k: int | None = None,
    programs: int = TARGET_PROGRAMS,
    warps: int = WARPS,
    stages: int = STAGES,
    compacted: bool = True,
    interpret: bool = False,
) -> jax.Array:
    """``Σ_{j: |x_j| >= t} x_j W[j, :]`` in f32, reading only the kept rows of ``w_kn``
    (``split_k`` input stretches, or as many as bring the grid to about ``programs``).
    ``compacted``: over the kept rows' index list (``compact``, ``_kept_rows_kernel``); else
    every row with a mask (``_masked_rows_kernel``: its time does not fall with the sparsity,
    BENCHMARKS.md fortieth session)."""
    if x_k.ndim != 1 or w_kn.ndim != 2 or w_kn.shape[0] != x_k.shape[0]:
        raise ValueError(f"masked_gemv needs x [K] and W [K, N]: {x_k.shape}, {w_kn.shape}")
    for name, v in (("block_n", block_n), ("block_k", block_k)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of 2 >= 16, got {v}")
    if (split_k is not None and split_k < 1) or programs < 1:
        raise ValueError(f"split_k and programs must be >= 1, got {split_k}, {programs}")
    k, n = w_kn.shape
    splits, ks = _split(k, n, block_n, block_k, split_k, programs)
    if compacted:
        kernel, args, sizes = _kept_rows_kernel, (*compact(x_k, t), w_kn), dict(S=splits)
    else:
        t_1 = jnp.reshape(jnp.asarray(t, jnp.float32), (1,))
        kernel, args, sizes = _masked_rows_kernel, (x_k, w_kn, t_1), dict(K=k, KS=ks)
    (y,) = jt.triton_call(
        kernel, *args, out_shape=[jax.ShapeDtypeStruct((n,), jnp.float32)],
        zeroed_outputs=(0,) if splits > 1 else (), grid=(-(-n // block_n), splits),
        num_warps=warps, num_stages=stages, interpret=interpret, N=n, BK=block_k, BN=block_n,
        ATOMIC=splits > 1, STAGES=stages, **sizes,
    )  # fmt: skip
    return y


def teal_ffn_decode(
    x_d: jax.Array,
    w_in_dn: jax.Array,
    w_out_fd: jax.Array,
    t_x,
    t_a,
    *,
    act_name: str = "silu",
    interpret: bool = False,
    **tuning,
) -> jax.Array:
    """One token's FFN with TEAL's thresholds, ``y [d]`` in ``x_d``'s dtype.

    ``w_in_dn``: the input projections input-major, ``[d, c·f]`` (c = 2: gate columns, then
    up; ``eval.teal``'s ``w_in [c, f, d]`` transposed and joined); ``w_out_fd``: ``[f, d]``.
    The activation is rounded to the weights' dtype before the down projection, as the XLA
    FFN's bf16 matmul input is.
    """
    d = x_d.shape[-1]
    f = w_out_fd.shape[0]
    if x_d.ndim != 1:
        raise ValueError(f"teal_ffn_decode takes one token, x [d]; got {x_d.shape}")
    floats = (jnp.bfloat16, jnp.float16, jnp.float32)
    if any(v.dtype not in floats for v in (x_d, w_in_dn, w_out_fd)):
        raise ValueError(f"bf16, f16 or f32 only: x {x_d.dtype}, w_in {w_in_dn.dtype}, "
                         f"w_out {w_out_fd.dtype}")  # fmt: skip
    if w_in_dn.shape[0] != d or w_in_dn.shape[1] not in (f, 2 * f) or w_out_fd.shape[1] != d:
        raise ValueError(f"inconsistent shapes: x {x_d.shape}, w_in {w_in_dn.shape}, "
                         f"w_out {w_out_fd.shape}")  # fmt: skip
    h = masked_gemv(x_d, w_in_dn, t_x, interpret=interpret, **tuning)
    act = activation(act_name)
    a = act(h[:f]) * h[f:] if w_in_dn.shape[1] == 2 * f else act(h)
    y = masked_gemv(a.astype(w_out_fd.dtype), w_out_fd, t_a, interpret=interpret, **tuning)
    return y.astype(x_d.dtype)
