"""Split-K decode attention (kernels/pallas_attention.py) against `models.layers.attention`.

Interpreter on CPU, the real Triton lowering through ``jax.export(platforms=["cuda"])``, and the
compiled kernel on a GPU (``gpu`` marker), on one shared case list.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from prunepath_jax.kernels.pallas_attention import decode_attention
from prunepath_jax.models.layers import attention
from tests.helpers import assert_close

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
    exp = jax.export.export(
        jax.jit(decode_attention),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*specs)
    assert exp.mlir_module().count("custom_call @__gpu$xla.gpu.triton") == 1


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
