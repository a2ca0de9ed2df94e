"""Split-K decode attention (flash-decoding) as one Pallas-Triton kernel plus an XLA combine.

Why. At decode one query row per head meets the whole KV cache: the work is ~1 FLOP per byte, so
the step is bound by reading K and V once. XLA's attention (``models.layers.attention``) runs
it as several fusions over the cache with the scores materialised between them, and with one
query row it has little parallelism per (batch, KV head). Here the cache of each (batch, KV
head) is cut into ``n_splits`` chunks; program ``(b, kv head, chunk)`` streams its chunk once
(K and V tiles of ``block_s`` positions) with an online softmax for all the query heads of its
GQA group at once (the group is padded to 16 rows so both products are tensor-core dots), and
writes an unnormalised partial output with its running max and sum. A single XLA fusion then
rescales and sums the partials (the combine of flash-decoding).

Semantics: ``models.layers.attention(q, k, v, allowed)`` with ``allowed[b, 0, s] = s < len[b]``
(each sequence attends to its first ``len[b] ≥ 1`` cache positions); softmax in float32, the
probabilities cast to the cache dtype before the value product, as there.

``decode_attention_rope`` is the same kernel with the step's prologue inside: it takes the
QKV projection's output as it is, rotates q and the new k (RoPE, fp32, cast back as
``models.layers.apply_rope`` does), writes the new k and v into the cache in place (the cache is
aliased to an output; only the program whose chunk holds the position writes, after its loop,
which took the new row from registers) and attends. Why: in the Llama
decode step those were four or five small XLA launches per layer (RoPE for q and k, the
16-row q padding, two cache updates) on the critical path of a launch-bound step
(BENCHMARKS.md, issue 5).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from prunepath_jax.kernels import pallas_pdl

try:
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

ROWS = 16  # query rows per program (GQA group padded): the minimum dot dimension
NEG = -1e30


def _kernel(
    q_ref, k_ref, v_ref, len_ref, o_ref, m_ref, den_ref, *, s, kv, hd, chunk, bs, scale, prec
):
    """q ``[b·kv·16, hd]``; k, v ``[b·s, kv·hd]``; len ``[b]``; outputs: acc ``[16, hd]``, m and
    den ``[1, 16]`` blocks of this (b, kv head, chunk)."""
    bi, hi, ci = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n = jnp.sum(plgpu.load(len_ref.at[pl.ds(bi, 1)]))  # valid cache length of sequence bi
    q = plgpu.load(q_ref.at[pl.ds((bi * kv + hi) * ROWS, ROWS), :])  # [16, hd]
    cols = pl.ds(pl.multiple_of(hi * hd, hd), hd)
    start = ci * chunk

    def body(i, carry):
        p0 = start + i * bs
        rows = pl.ds(pl.multiple_of(bi * s + p0, bs), bs)
        k = plgpu.load(k_ref.at[rows, cols])  # [bs, hd]
        v = plgpu.load(v_ref.at[rows, cols])  # [bs, hd]
        sc = plgpu.dot(q, k, trans_b=True, precision=prec) * scale  # [16, bs] fp32
        return _online_softmax_step(carry, sc, v, p0, n, prec)

    m, den, acc = jax.lax.fori_loop(0, chunk // bs, body, _init(hd))
    o_ref[...] = acc
    m_ref[...] = m[None, :]
    den_ref[...] = den[None, :]


def _init(hd):
    return (
        jnp.full((ROWS,), NEG, jnp.float32),
        jnp.zeros((ROWS,), jnp.float32),
        jnp.zeros((ROWS, hd), jnp.float32),
    )


def _online_softmax_step(carry, sc, v, p0, n, prec):
    """One block of flash-decoding: scores ``sc [16, bs]`` (scaled) of positions ``p0 + j``
    (attended iff ``< n``) and their values ``v [bs, hd]`` into ``(max, sum, acc)``."""
    m, den, acc = carry
    bs = sc.shape[1]
    valid = (p0 + jax.lax.broadcasted_iota(jnp.int32, (ROWS, bs), 1)) < n
    sc = jnp.where(valid, sc, NEG)
    m_new = jnp.maximum(m, jnp.max(sc, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(valid, jnp.exp(sc - m_new[:, None]), 0.0)
    den = den * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=prec)
    return m_new, den, acc


def _rope_rows(ref, rows, half, cos, sin, dtype, mask=None):
    """Loads ``rows`` of ``ref`` in two halves and rotates them like ``apply_rope`` (fp32, then
    cast): ``(x1·cos − x2·sin, x2·cos + x1·sin)``, each ``[n_rows, half]``."""
    kw = {} if mask is None else {"mask": mask, "other": 0.0}
    x1 = plgpu.load(ref.at[rows, pl.ds(0, half)], **kw).astype(jnp.float32)
    x2 = plgpu.load(ref.at[rows, pl.ds(half, half)], **kw).astype(jnp.float32)
    return (x1 * cos - x2 * sin).astype(dtype), (x2 * cos + x1 * sin).astype(dtype)


def _rope_kernel(qkv_ref, cos_ref, sin_ref, pos_ref, k_in_ref, v_in_ref, o_ref, m_ref, den_ref,
                 k_ref, v_ref, *, s, h, kv, hd, chunk, bs, scale, prec):  # fmt: skip
    """qkv ``[b·(h + 2kv) + 16, hd]`` (pre-RoPE, padded by 16 rows so the 16-row q block of the
    last head group stays in bounds); cos, sin ``[b, hd/2]``; pos ``[b]``; k, v ``[b·s, kv·hd]``
    (aliased: written at ``pos``); outputs as in :func:`_kernel`.

    The cache is read through the input refs and the new row is stored last, after the loop:
    the loop takes the new row from registers, so nothing orders its loads after that store
    (a store first, to the same buffer the loop streams, would keep the compiler from issuing
    the first tiles' loads early)."""
    bi, hi, ci = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    half, grp, dt = hd // 2, h // kv, k_ref.dtype
    pos = jnp.sum(plgpu.load(pos_ref.at[pl.ds(bi, 1)]))  # the new token's position
    n = jnp.minimum(pos + 1, s)  # attended prefix; pos >= s: the write is dropped
    cos = plgpu.load(cos_ref.at[pl.ds(bi, 1), :])  # [1, half] fp32
    sin = plgpu.load(sin_ref.at[pl.ds(bi, 1), :])
    r0 = bi * (h + 2 * kv)
    q_ok = jax.lax.broadcasted_iota(jnp.int32, (ROWS, half), 0) < grp
    qa, qb = _rope_rows(qkv_ref, pl.ds(r0 + hi * grp, ROWS), half, cos, sin, dt, q_ok)
    ka, kb = _rope_rows(qkv_ref, pl.ds(r0 + h + hi, 1), half, cos, sin, dt)  # [1, half]
    v_new = plgpu.load(qkv_ref.at[pl.ds(r0 + h + kv + hi, 1), :])  # [1, hd]
    c_a = pl.ds(pl.multiple_of(hi * hd, half), half)
    c_b = pl.ds(pl.multiple_of(hi * hd + half, half), half)
    c_v = pl.ds(pl.multiple_of(hi * hd, hd), hd)
    start = ci * chunk

    def body(i, carry):
        p0 = start + i * bs
        rows = pl.ds(pl.multiple_of(bi * s + p0, bs), bs)
        new = (p0 + jax.lax.broadcasted_iota(jnp.int32, (bs, half), 0)) == pos
        k_a = jnp.where(new, ka, plgpu.load(k_in_ref.at[rows, c_a]))  # [bs, half]
        k_b = jnp.where(new, kb, plgpu.load(k_in_ref.at[rows, c_b]))
        new_v = (p0 + jax.lax.broadcasted_iota(jnp.int32, (bs, hd), 0)) == pos
        v = jnp.where(new_v, v_new, plgpu.load(v_in_ref.at[rows, c_v]))  # [bs, hd]
        sc = plgpu.dot(qa, k_a, trans_b=True, precision=prec)
        sc = (sc + plgpu.dot(qb, k_b, trans_b=True, precision=prec)) * scale  # [16, bs] fp32
        return _online_softmax_step(carry, sc, v, p0, n, prec)

    m, den, acc = jax.lax.fori_loop(0, chunk // bs, body, _init(hd))
    o_ref[...] = acc
    m_ref[...] = m[None, :]
    den_ref[...] = den[None, :]

    @pl.when((pos >= start) & (pos < start + chunk))
    def _():
        row = pl.ds(bi * s + pos, 1)
        plgpu.store(k_ref.at[row, c_a], ka)
        plgpu.store(k_ref.at[row, c_b], kb)
        plgpu.store(v_ref.at[row, c_v], v_new)


def decode_attention(
    q_bhd: jax.Array,
    k_bskd: jax.Array,
    v_bskd: jax.Array,
    lengths_b: jax.Array,
    *,
    n_splits: int | None = None,
    block_s: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool = False,
) -> jax.Array:
    """One decode step of GQA attention over a KV cache: ``[b, h, hd]`` in q's dtype.

    Args:
        q_bhd: the new token's queries (h heads).
        k_bskd, v_bskd: the cache ``[b, s, kv, hd]`` (h % kv == 0, h/kv ≤ 16, hd a power of 2).
        lengths_b: int32 ``[b]``, positions ``< len`` are attended (``1 ≤ len ≤ s``).
        n_splits: chunks per (batch, KV head); default fills ~2 programs per SM of an H200.
        block_s: cache positions per inner step (power of 2, divides the chunk).
    """
    b, h, hd = q_bhd.shape
    _, s, kv, _ = k_bskd.shape
    grp = _check_heads(h, kv, hd, min_hd=16)
    n_splits, chunk = _splits(b, kv, s, n_splits, block_s)
    q = q_bhd.reshape(b, kv, grp, hd)
    q = jnp.zeros((b, kv, ROWS, hd), q.dtype).at[:, :, :grp].set(q).reshape(b * kv * ROWS, hd)
    k2 = k_bskd.reshape(b * s, kv * hd)  # free reshapes: rows = (b, s), cols = (kv, hd)
    v2 = v_bskd.reshape(b * s, kv * hd)
    p_total = b * kv * n_splits
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    acc, m, den = pl.pallas_call(
        pallas_pdl.early_launch(
            functools.partial(_kernel, **_static(s, kv, hd, chunk, block_s, q_bhd.dtype)),
            interpret=interpret,
            tag="attention",
        ),
        out_shape=_partial_specs(p_total, hd),
        grid=(b, kv, n_splits),
        in_specs=[any_spec, any_spec, any_spec, any_spec],
        out_specs=_partial_block_specs(kv, n_splits, hd),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="prunepath_decode_attention",
    )(q, k2, v2, lengths_b.astype(jnp.int32))
    return _combine(acc, m, den, b, kv, n_splits, grp, q_bhd.dtype)


def _check_heads(h: int, kv: int, hd: int, *, min_hd: int) -> int:
    """The query heads per KV head (≤ 16, one padded dot block); raises for a head layout the
    kernels cannot take (``min_hd``: the smallest dot dimension the kernel's products see)."""
    if h % kv or h // kv > ROWS:
        raise NotImplementedError(f"need h % kv == 0 and h/kv <= {ROWS}, got h={h}, kv={kv}")
    if hd & (hd - 1) or hd < min_hd:
        raise NotImplementedError(f"head_dim must be a power of 2 >= {min_hd}, got {hd}")
    return h // kv


def _combine(acc, m, den, b, kv, n_splits, grp, dtype):
    """The chunks' partials -> ``[b, h, hd]`` (one XLA fusion): rescale to the global max."""
    hd = acc.shape[-1]
    acc = acc.reshape(b, kv, n_splits, ROWS, hd)[:, :, :, :grp]
    m = m.reshape(b, kv, n_splits, ROWS)[..., :grp]
    den = den.reshape(b, kv, n_splits, ROWS)[..., :grp]
    w = jnp.exp(m - jnp.max(m, axis=2, keepdims=True))
    out = jnp.sum(acc * w[..., None], axis=2) / jnp.sum(den * w, axis=2)[..., None]
    return out.reshape(b, kv * grp, hd).astype(dtype)


def _splits(b, kv, s, n_splits, block_s):
    if n_splits is None:
        n_splits = 1
        while b * kv * n_splits < 256 and s // (n_splits * 2) >= block_s:
            n_splits *= 2
    chunk = s // n_splits
    if s % n_splits or chunk % block_s or block_s & (block_s - 1):
        raise ValueError(
            f"cache length {s} must split into {n_splits} chunks of a multiple of "
            f"block_s={block_s} (a power of 2)"
        )
    return n_splits, chunk


def _static(s, kv, hd, chunk, block_s, dtype) -> dict:
    """The kernels' static arguments; fp32 inputs get IEEE dots, not TF32."""
    prec = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    return dict(s=s, kv=kv, hd=hd, chunk=chunk, bs=block_s, scale=1.0 / math.sqrt(hd), prec=prec)


def _partial_specs(p_total, hd):
    return (
        jax.ShapeDtypeStruct((p_total * ROWS, hd), jnp.float32),
        jax.ShapeDtypeStruct((p_total, ROWS), jnp.float32),
        jax.ShapeDtypeStruct((p_total, ROWS), jnp.float32),
    )


def _partial_block_specs(kv, n_splits, hd):
    def lin(i, j, c):
        return (i * kv + j) * n_splits + c

    return (
        pl.BlockSpec((ROWS, hd), lambda i, j, c: (lin(i, j, c), 0)),
        pl.BlockSpec((1, ROWS), lambda i, j, c: (lin(i, j, c), 0)),
        pl.BlockSpec((1, ROWS), lambda i, j, c: (lin(i, j, c), 0)),
    )


def decode_attention_rope(
    qkv_bnd: jax.Array,
    cos_bh: jax.Array,
    sin_bh: jax.Array,
    k_bskd: jax.Array,
    v_bskd: jax.Array,
    positions_b: jax.Array,
    *,
    n_heads: int,
    n_splits: int | None = None,
    block_s: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode step from the QKV projection: RoPE, the cache write and the attention.

    Equals ``apply_rope`` on q and k, ``cache_write`` at ``positions_b`` (dropped at or past the
    cache end) and :func:`decode_attention` with lengths ``min(pos + 1, s)``.

    Args:
        qkv_bnd: ``[b, h + 2kv, hd]`` queries, keys, values of the new token, before RoPE.
        cos_bh, sin_bh: fp32 ``[b, hd/2]`` RoPE tables at ``positions_b``.
        k_bskd, v_bskd: the cache ``[b, s, kv, hd]`` (donate it: it is updated in place).
        positions_b: int32 ``[b]`` positions of the new tokens.
        n_heads: h (the rest of ``qkv_bnd``'s rows are 2·kv).

    Returns:
        ``(out [b, h, hd], k_bskd, v_bskd)``: the attention output and the updated cache.
    """
    b, nq, hd = qkv_bnd.shape
    _, s, kv, _ = k_bskd.shape
    h = n_heads
    if nq != h + 2 * kv:
        raise NotImplementedError(f"need qkv rows h + 2kv = {h + 2 * kv}, got {qkv_bnd.shape}")
    grp = _check_heads(h, kv, hd, min_hd=32)  # two half-width products: hd/2 >= 16
    dt = qkv_bnd.dtype
    if k_bskd.dtype != dt or v_bskd.dtype != dt or v_bskd.shape != k_bskd.shape:
        raise ValueError(f"cache {k_bskd.dtype}/{v_bskd.dtype} must match qkv {dt}")
    if cos_bh.shape != (b, hd // 2) or sin_bh.shape != (b, hd // 2):
        raise ValueError(f"cos/sin must be [b, hd/2] = {(b, hd // 2)}: {cos_bh.shape}")
    n_splits, chunk = _splits(b, kv, s, n_splits, block_s)
    qkv = jnp.pad(qkv_bnd.reshape(b * nq, hd), ((0, ROWS), (0, 0)))
    p_total = b * kv * n_splits
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    acc, m, den, k2, v2 = pl.pallas_call(
        pallas_pdl.early_launch(
            functools.partial(_rope_kernel, h=h, **_static(s, kv, hd, chunk, block_s, dt)),
            interpret=interpret,
            tag="attention",
        ),
        out_shape=(
            *_partial_specs(p_total, hd),
            jax.ShapeDtypeStruct((b * s, kv * hd), dt),
            jax.ShapeDtypeStruct((b * s, kv * hd), dt),
        ),
        grid=(b, kv, n_splits),
        in_specs=[any_spec] * 6,
        out_specs=(*_partial_block_specs(kv, n_splits, hd), any_spec, any_spec),
        input_output_aliases={4: 3, 5: 4},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="prunepath_decode_attention_rope",
    )(
        qkv,
        cos_bh.astype(jnp.float32),
        sin_bh.astype(jnp.float32),
        positions_b.astype(jnp.int32),
        k_bskd.reshape(b * s, kv * hd),
        v_bskd.reshape(b * s, kv * hd),
    )
    out = _combine(acc, m, den, b, kv, n_splits, grp, dt)
    return out, k2.reshape(b, s, kv, hd), v2.reshape(b, s, kv, hd)
