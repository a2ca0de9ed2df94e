"""Split-K router logits kernel (kernels/pallas_logits.py) against ``routing.router_logits``.

Interpreter on CPU, the Triton lowering through ``jax.export(platforms=["cuda"])``, and the
compiled kernel on a GPU (``gpu`` marker): batch 1 and > 1, odd d and E (blocks of one column),
the dot form (16 rows), bf16 and fp32 activations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from helpers import assert_close, cuda_triton_calls

from prunepath_jax import routing
from prunepath_jax.kernels.pallas_logits import (
    plan,
    router_logits_pallas,
    router_logits_partials,
    router_logits_partials_normed,
)
from prunepath_jax.models.layers import rms_norm

# name, t, d, E, x dtype
CASES = [
    ("b1_bf16", 1, 256, 48, jnp.bfloat16),
    ("b4_odd_fp32", 4, 96, 7, jnp.float32),
    ("b16_dot_fp32", 16, 128, 64, jnp.float32),
    ("b8_smollm2_bf16", 8, 576, 48, jnp.bfloat16),
    ("b2_one_expert", 2, 64, 1, jnp.float32),
    ("b16_dot_8b_bf16", 16, 4096, 448, jnp.bfloat16),
]


def _check(case, interpret):
    name, t, d, e, dtype = case
    kx, kr = jax.random.split(jax.random.key(d + e + t))
    x = jax.random.normal(kx, (t, d)).astype(dtype)
    r = jax.random.normal(kr, (d, e)) * d**-0.5
    got = jax.jit(lambda x, r: router_logits_pallas(x, r, interpret=interpret))(x, r)
    assert_close(got, routing.router_logits(r, x), "op_fp32", name)


@pytest.mark.parametrize("case", CASES[:-1], ids=[c[0] for c in CASES[:-1]])
def test_interpret_matches_router_logits(case):
    _check(case, interpret=True)


def test_unreduced_partials_sum_to_the_logits_and_leave_padding_alone():
    """``router_logits_partials`` with a stride past E: each split's first E columns add up to
    ``x @ router``; the padding columns are the kernel's to leave unwritten."""
    kx, kr = jax.random.split(jax.random.key(4))
    t, d, e, stride = 2, 1024, 40, 64
    x = jax.random.normal(kx, (t, d))
    r = jax.random.normal(kr, (d, e)) * d**-0.5
    part, n = router_logits_partials(x, r, stride=stride, splits=4, interpret=True)
    assert n == plan(t, d, e, splits=4)["s"] == 4 and part.shape == (t, n * stride)
    got = jnp.sum(part.reshape(t, n, stride)[:, :, :e], axis=1)
    assert_close(got, routing.router_logits(r, x), "op_fp32", "partials")
    with pytest.raises(ValueError, match="stride"):
        router_logits_partials(x, r, stride=e - 1, interpret=True)


def test_plan_spreads_the_8b_router_over_many_programs():
    p = plan(1, 4096, 448)
    assert p["be"] == 64 and p["s"] * p["steps"] * p["bdi"] == 4096
    assert p["s"] * (448 // p["be"]) >= 132  # at least one program per H200 SM
    assert plan(16, 4096, 448)["use_dot"] and not plan(1, 4096, 448)["use_dot"]


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="router rows"):
        router_logits_pallas(jnp.zeros((1, 8)), jnp.zeros((16, 4)), interpret=True)
    with pytest.raises(ValueError, match="power-of-two"):
        router_logits_pallas(jnp.zeros((3, 8)), jnp.zeros((8, 4)), interpret=True)
    with pytest.raises(ValueError, match="splits and block_e"):
        router_logits_pallas(jnp.zeros((1, 8)), jnp.zeros((8, 4)), splits=0, interpret=True)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_lowering_exports_for_cuda(case):
    _, t, d, e, dtype = case
    specs = (jax.ShapeDtypeStruct((t, d), dtype), jax.ShapeDtypeStruct((d, e), jnp.float32))
    assert cuda_triton_calls(jax.jit(lambda x, r: router_logits_pallas(x, r)), *specs) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gpu_matches_router_logits(case):
    _check(case, interpret=False)


# name, t, d, E, x dtype: the RMSNorm fused into the kernel (decode layers of 1-2 tokens).
NORM_CASES = [
    ("b1_smollm2_bf16", 1, 576, 48, jnp.bfloat16),  # d = 9·64: the row's mean reads 1024 masked
    ("b2_fp32", 2, 256, 40, jnp.float32),
    ("b1_8b_bf16", 1, 4096, 448, jnp.bfloat16),
]


def _check_normed(case, interpret):
    name, t, d, e, dtype = case
    kx, kr, kw = jax.random.split(jax.random.key(d + e), 3)
    x = (3 * jax.random.normal(kx, (t, d))).astype(dtype)  # a residual stream, RMS far from 1
    r = jax.random.normal(kr, (d, e)) * d**-0.5
    w = (1 + 0.2 * jax.random.normal(kw, (d,))).astype(dtype)
    stride = 64 if e <= 64 else 512
    part, n, xn = jax.jit(
        lambda x, r, w: router_logits_partials_normed(
            x, r, w, 1e-5, stride=stride, splits=16, block_e=32, interpret=interpret
        )
    )(x, r, w)
    want = rms_norm(x, w, 1e-5)
    assert xn.dtype == dtype and xn.shape == (t, d)
    # Same operations and roundings as rms_norm; only mean(x²)'s summation order may differ.
    assert_close(xn, want, "op_fp32", f"{name} normalised rows")
    got = jnp.sum(part.reshape(t, n, stride)[:, :, :e], axis=1)
    assert_close(got, routing.router_logits(r, want), "op_fp32", f"{name} logits")


@pytest.mark.parametrize("case", NORM_CASES, ids=[c[0] for c in NORM_CASES])
def test_normed_partials_match_rms_norm_then_logits(case):
    _check_normed(case, interpret=True)


def test_normed_partials_reject_a_wrong_norm_weight():
    with pytest.raises(ValueError, match="norm weight"):
        router_logits_partials_normed(
            jnp.zeros((1, 8)), jnp.zeros((8, 4)), jnp.ones((4,)), 1e-6, interpret=True
        )


@pytest.mark.parametrize("case", NORM_CASES, ids=[c[0] for c in NORM_CASES])
def test_normed_kernel_lowers_for_cuda(case):
    _, t, d, e, dtype = case
    specs = (
        jax.ShapeDtypeStruct((t, d), dtype),
        jax.ShapeDtypeStruct((d, e), jnp.float32),
        jax.ShapeDtypeStruct((d,), dtype),
    )
    fn = jax.jit(lambda x, r, w: router_logits_partials_normed(x, r, w, 1e-5, splits=16)[::2])
    assert cuda_triton_calls(fn, *specs) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("case", NORM_CASES, ids=[c[0] for c in NORM_CASES])
def test_gpu_normed_partials_match_rms_norm_then_logits(case):
    _check_normed(case, interpret=False)
