"""Split-K decode attention (kernels/pallas_attention.py) against `models.layers.attention`.

Interpreter on CPU, the real Triton lowering through ``jax.export(platforms=["cuda"])``, and the
compiled kernel on a GPU (``gpu`` marker), on one shared case list.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, cuda_triton_calls

from prunepath_jax.kernels.pallas_attention import decode_attention, decode_attention_rope
from prunepath_jax.models.layers import (
    LayerCache,
    apply_rope,
    attention,
    cache_write,
    rope_inv_freq,
    rope_tables,
)

# name, b, s, h, kv, hd, dtype, lengths, options
CASES = [
    ("gqa4_fp32_two_lengths", 2, 256, 8, 2, 64, jnp.float32, [256, 77],
     {"n_splits": 2, "block_s": 64}),
    ("gqa4_odd_heads_default_splits", 1, 512, 12, 3, 32, jnp.float32, [300], {"block_s": 32}),
    ("bf16_len1_and_full", 2, 128, 4, 4, 16, jnp.bfloat16, [1, 128],
     {"n_splits": 4, "block_s": 16}),
]  # fmt: skip


def _check(case, interpret):
    name, b, s, h, kv, hd, dtype, lens, opts = case
    k = jax.random.split(jax.random.key(len(name)), 3)
    q = jax.random.normal(k[0], (b, h, hd), jnp.float32).astype(dtype)
    kc = jax.random.normal(k[1], (b, s, kv, hd), jnp.float32).astype(dtype)
    vc = jax.random.normal(k[2], (b, s, kv, hd), jnp.float32).astype(dtype)
    lens = jnp.asarray(lens, jnp.int32)
    out = decode_attention(q, kc, vc, lens, interpret=interpret, **opts)
    allowed = jnp.arange(s)[None, None, :] < lens[:, None, None]
    # Full-precision reference: on the H200, XLA's default fp32 dot is TF32 (its error, ~1e-4,
    # failed the fp32 tolerance against this kernel's IEEE dots there).
    with jax.default_matmul_precision("highest"):
        ref = attention(q[:, None], kc, vc, allowed)[:, 0]
    assert out.shape == (b, h, hd) and out.dtype == dtype
    assert_close(out, ref, "bf16" if dtype == jnp.bfloat16 else "op_fp32", name)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_interpret_matches_xla_attention(case):
    _check(case, interpret=True)


@pytest.mark.parametrize(
    "shape", [(1, 4096, 32, 8, 128), (8, 32768, 32, 8, 128)], ids=["8b_4k_b1", "8b_32k_b8"]
)
def test_triton_lowering_exports_for_cuda(shape):
    b, s, h, kv, hd = shape
    specs = (
        jax.ShapeDtypeStruct((b, h, hd), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, s, kv, hd), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, s, kv, hd), jnp.bfloat16),
        jax.ShapeDtypeStruct((b,), jnp.int32),
    )
    assert cuda_triton_calls(jax.jit(decode_attention), *specs) == 1


def test_lowering_with_a_split_count_that_is_no_power_of_two():
    """The model's plan for a 33024-position cache (43 splits of 12 blocks) lowers: the split
    count is a grid axis, never a Triton block shape."""
    f = jax.ShapeDtypeStruct
    b, s, h, kv, hd = 1, 33024, 32, 8, 128
    specs = (f((b, h, hd), jnp.bfloat16), f((b, s, kv, hd), jnp.bfloat16),
             f((b, s, kv, hd), jnp.bfloat16), f((b,), jnp.int32))  # fmt: skip
    fn = jax.jit(lambda *a: decode_attention(*a, n_splits=43, block_s=64))
    assert cuda_triton_calls(fn, *specs) == 1
    rope_specs = (f((b, h + 2 * kv, hd), jnp.bfloat16), f((b, hd // 2), jnp.float32),
                  f((b, hd // 2), jnp.float32), specs[1], specs[2], specs[3])  # fmt: skip
    fn = jax.jit(lambda *a: decode_attention_rope(*a, n_heads=h, n_splits=43, block_s=64))
    assert cuda_triton_calls(fn, *rope_specs) == 1


def test_rejects_unsupported_shapes():
    q = jnp.ones((1, 6, 32))
    kc = jnp.ones((1, 64, 4, 32))
    with pytest.raises(NotImplementedError, match="h % kv"):
        decode_attention(q, kc, kc, jnp.array([64]), interpret=True)
    with pytest.raises(ValueError, match="chunks"):
        decode_attention(q[:, :4], kc, kc, jnp.array([64]), n_splits=3, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gpu_matches_xla_attention(case):
    _check(case, interpret=False)


@pytest.mark.gpu
def test_gpu_llama8b_long_context():
    _check(("8b_32k", 2, 32768, 32, 8, 128, jnp.bfloat16, [32768, 20000], {}), interpret=False)


# The kernel with the step's prologue (`decode_attention_rope`): name, b, s, h, kv, hd, dtype,
# positions (>= s: the write is dropped and the whole cache attended), options
ROPE_CASES = [
    ("rope_gqa4_fp32_ragged_dropped", 3, 128, 8, 2, 32, jnp.float32, [5, 127, 130],
     {"n_splits": 4, "block_s": 16}),
    ("rope_gqa3_bf16_default_splits", 2, 256, 9, 3, 64, jnp.bfloat16, [0, 200], {}),
    ("rope_mha_fp32_one_split", 1, 64, 4, 4, 32, jnp.float32, [63], {"n_splits": 1}),
]  # fmt: skip


def _check_rope(case, interpret):
    name, b, s, h, kv, hd, dtype, pos, opts = case
    k = jax.random.split(jax.random.key(len(name)), 3)
    qkv = jax.random.normal(k[0], (b, 1, h + 2 * kv, hd), jnp.float32).astype(dtype)
    kc = jax.random.normal(k[1], (b, s, kv, hd), jnp.float32).astype(dtype)
    vc = jax.random.normal(k[2], (b, s, kv, hd), jnp.float32).astype(dtype)
    pos = jnp.asarray(pos, jnp.int32)
    cos, sin = rope_tables(pos[:, None], rope_inv_freq(hd, 1e4, None))
    qk = apply_rope(qkv[:, :, : h + kv], cos, sin)
    ref_cache = cache_write(LayerCache(kc, vc), qk[:, :, h:], qkv[:, :, h + kv :], pos[:, None])
    allowed = jnp.arange(s)[None, None, :] < jnp.minimum(pos + 1, s)[:, None, None]
    with jax.default_matmul_precision("highest"):  # not TF32 on the GPU (see _check)
        ref = attention(qk[:, :, :h], ref_cache.k, ref_cache.v, allowed)[:, 0]
    out, k2, v2 = jax.jit(
        lambda *a: decode_attention_rope(*a, n_heads=h, interpret=interpret, **opts),
        donate_argnums=(3, 4),
    )(qkv[:, 0], cos[:, 0, 0], sin[:, 0, 0], jnp.copy(kc), jnp.copy(vc), pos)
    tol = "bf16" if dtype == jnp.bfloat16 else "op_fp32"
    assert out.shape == (b, h, hd) and out.dtype == dtype
    assert_close(out, ref, tol, name)
    np.testing.assert_array_equal(v2, ref_cache.v)  # v is copied, not computed
    assert_close(k2.astype(jnp.float32), ref_cache.k.astype(jnp.float32), tol, f"{name} k")
    untouched = np.ones((b, s), bool)
    for i, p in enumerate(np.asarray(pos)):
        if p < s:
            untouched[i, p] = False
    np.testing.assert_array_equal(np.asarray(k2)[untouched], np.asarray(kc)[untouched])


@pytest.mark.parametrize("case", ROPE_CASES, ids=[c[0] for c in ROPE_CASES])
def test_rope_kernel_interpret_matches_rope_write_attention(case):
    _check_rope(case, interpret=True)


@pytest.mark.parametrize(
    "shape", [(1, 256, 32, 8, 128), (8, 4096, 32, 8, 64), (1, 1024, 9, 3, 64)],
    ids=["8b_b1", "1b_4k_b8", "smollm2_b1"],
)  # fmt: skip
def test_rope_kernel_lowering_exports_for_cuda(shape):
    b, s, h, kv, hd = shape
    f = jax.ShapeDtypeStruct
    specs = (f((b, h + 2 * kv, hd), jnp.bfloat16), f((b, hd // 2), jnp.float32),
             f((b, hd // 2), jnp.float32), f((b, s, kv, hd), jnp.bfloat16),
             f((b, s, kv, hd), jnp.bfloat16), f((b,), jnp.int32))  # fmt: skip
    fn = jax.jit(lambda *a: decode_attention_rope(*a, n_heads=h), donate_argnums=(3, 4))
    assert cuda_triton_calls(fn, *specs) == 1


def test_rope_kernel_rejects_what_it_cannot_compute():
    kc = jnp.ones((1, 64, 2, 32))
    cs = jnp.ones((1, 16))
    with pytest.raises(NotImplementedError, match="qkv rows"):
        decode_attention_rope(jnp.ones((1, 7, 32)), cs, cs, kc, kc, jnp.array([3]), n_heads=4)
    with pytest.raises(NotImplementedError, match="head_dim"):
        kc16 = jnp.ones((1, 64, 2, 16))
        decode_attention_rope(jnp.ones((1, 8, 16)), cs[:, :8], cs[:, :8], kc16, kc16,
                              jnp.array([3]), n_heads=4)  # fmt: skip
    with pytest.raises(ValueError, match="cos/sin"):
        decode_attention_rope(jnp.ones((1, 8, 32)), cs[:, :8], cs, kc, kc, jnp.array([3]),
                              n_heads=4)  # fmt: skip
    with pytest.raises(ValueError, match="must match"):
        decode_attention_rope(jnp.ones((1, 8, 32), jnp.bfloat16), cs, cs, kc, kc, jnp.array([3]),
                              n_heads=4)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("case", ROPE_CASES, ids=[c[0] for c in ROPE_CASES])
def test_gpu_rope_kernel_matches_rope_write_attention(case):
    _check_rope(case, interpret=False)
