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
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

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
        m, den, acc = carry
        p0 = start + i * bs
        rows = pl.ds(pl.multiple_of(bi * s + p0, bs), bs)
        k = plgpu.load(k_ref.at[rows, cols])  # [bs, hd]
        v = plgpu.load(v_ref.at[rows, cols])  # [bs, hd]
        sc = plgpu.dot(q, k, trans_b=True, precision=prec) * scale  # [16, bs] fp32
        valid = (p0 + jax.lax.broadcasted_iota(jnp.int32, (ROWS, bs), 1)) < n
        sc = jnp.where(valid, sc, NEG)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(valid, jnp.exp(sc - m_new[:, None]), 0.0)
        den = den * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=prec)
        return m_new, den, acc

    init = (
        jnp.full((ROWS,), NEG, jnp.float32),
        jnp.zeros((ROWS,), jnp.float32),
        jnp.zeros((ROWS, hd), jnp.float32),
    )
    m, den, acc = jax.lax.fori_loop(0, chunk // bs, body, init)
    o_ref[...] = acc
    m_ref[...] = m[None, :]
    den_ref[...] = den[None, :]


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
    grp = h // kv
    if h % kv or grp > ROWS:
        raise NotImplementedError(f"need h % kv == 0 and h/kv <= {ROWS}, got h={h}, kv={kv}")
    if hd & (hd - 1) or hd < 16:
        raise NotImplementedError(f"head_dim must be a power of 2 >= 16, got {hd}")
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
    q = q_bhd.reshape(b, kv, grp, hd)
    q = jnp.zeros((b, kv, ROWS, hd), q.dtype).at[:, :, :grp].set(q).reshape(b * kv * ROWS, hd)
    k2 = k_bskd.reshape(b * s, kv * hd)  # free reshapes: rows = (b, s), cols = (kv, hd)
    v2 = v_bskd.reshape(b * s, kv * hd)
    p_total = b * kv * n_splits
    any_spec = pl.BlockSpec(memory_space=pl.ANY)

    def lin(i, j, c):
        return (i * kv + j) * n_splits + c

    acc, m, den = pl.pallas_call(
        functools.partial(
            _kernel,
            s=s,
            kv=kv,
            hd=hd,
            chunk=chunk,
            bs=block_s,
            scale=1.0 / math.sqrt(hd),
            prec=jax.lax.Precision.HIGHEST if q_bhd.dtype == jnp.float32 else None,
        ),  # fp32: IEEE dots, not TF32
        out_shape=(
            jax.ShapeDtypeStruct((p_total * ROWS, hd), jnp.float32),
            jax.ShapeDtypeStruct((p_total, ROWS), jnp.float32),
            jax.ShapeDtypeStruct((p_total, ROWS), jnp.float32),
        ),
        grid=(b, kv, n_splits),
        in_specs=[any_spec, any_spec, any_spec, any_spec],
        out_specs=(
            pl.BlockSpec((ROWS, hd), lambda i, j, c: (lin(i, j, c), 0)),
            pl.BlockSpec((1, ROWS), lambda i, j, c: (lin(i, j, c), 0)),
            pl.BlockSpec((1, ROWS), lambda i, j, c: (lin(i, j, c), 0)),
        ),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="prunepath_decode_attention",
    )(q, k2, v2, lengths_b.astype(jnp.int32))
    # Combine the chunks (one XLA fusion): rescale each partial to the global max.
    acc = acc.reshape(b, kv, n_splits, ROWS, hd)[:, :, :, :grp]
    m = m.reshape(b, kv, n_splits, ROWS)[..., :grp]
    den = den.reshape(b, kv, n_splits, ROWS)[..., :grp]
    w = jnp.exp(m - jnp.max(m, axis=2, keepdims=True))
    out = jnp.sum(acc * w[..., None], axis=2) / jnp.sum(den * w, axis=2)[..., None]
    return out.reshape(b, h, hd).astype(q_bhd.dtype)
