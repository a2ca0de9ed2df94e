"""The grouped prefill GEMM with float8 rows of x (tuning ``x_fp8``, `kernels/fp8_rows.py`).

The kernel must equal the XLA path run on the rounded activations (the experts chosen from the
unrounded ones, as the kernel path routes), within the weights' dtype tolerance; the rounding
itself is bounded by e4m3's 3 mantissa bits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, interpreted_npz, sm90_compile
from kernel_cases import GROUPED_CASES, inputs, kwargs

from prunepath_jax.kernels import fp8_rows


@pytest.fixture(scope="module")
def fp8_results(tmp_path_factory):
    return interpreted_npz(tmp_path_factory, "fp8_interp_runner")


def _reference(c):
    """``(y, k)``: the experts and gates of the unrounded x, the FFN of the rounded x."""
    from prunepath_jax.kernels.reference import expert_ffn_reference, route_reference

    x, router, w_in, w_out = inputs(c)
    kw = kwargs(c)
    g = kw.pop("group_size")
    _, _, gate_te, k_t = route_reference(x, router, c.tau, **kw)
    xq = fp8_rows.dequantize_rows(*fp8_rows.quantize_rows(x), x.dtype)
    y = expert_ffn_reference(xq, gate_te, w_in, w_out, group_size=g)
    return np.asarray(y.astype(x.dtype), np.float32), np.asarray(k_t)


def _check(c, y, k):
    y_ref, k_ref = _reference(c)
    np.testing.assert_array_equal(np.asarray(k), k_ref, err_msg=f"{c.name}: k")
    tol = "op_fp32" if c.dtype == "float32" else "bf16"
    assert_close(np.asarray(y, np.float32), y_ref, tol, c.name)


def test_quantize_rows_is_within_e4m3_rounding():
    """Each element within half an e4m3 step of the row-scaled value: 2^-4 relative for normal
    numbers, 2^-10 scales below 2^-6 (subnormals); the row's largest |x| maps to 448; a zero
    row gives zeros with scale 1, a row with a NaN or an infinity comes back all NaN."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 300)) * np.logspace(-3, 3, 7)[:, None]
    x[2] = 0.0
    x[3, 7] = np.nan
    x[6, 0] = -np.inf
    x8, s = fp8_rows.quantize_rows(jnp.asarray(x, jnp.float32))
    back = np.asarray(fp8_rows.dequantize_rows(x8, s, jnp.float32))
    s = np.asarray(s)
    ok = np.isfinite(x).all(axis=1)
    err = np.abs(back - x)[ok]
    bound = np.maximum(2.0**-4 * np.abs(x), 2.0**-10 * s[:, None])[ok]
    assert (err <= bound * (1 + 1e-6)).all()
    assert err.max() > 0  # the rounding is real: the check above can fail
    x8 = np.asarray(x8.astype(jnp.float32))
    assert (np.abs(x8[ok]).max(axis=1)[[0, 1, 3, 4]] == 448.0).all()
    assert s[2] == 1.0 and (back[2] == 0).all()
    assert np.isnan(back[3]).all() and np.isnan(back[6]).all()


@pytest.mark.parametrize("case", GROUPED_CASES, ids=lambda c: c.name)
def test_fp8_kernel_matches_the_reference_on_rounded_x(case, fp8_results):
    """Under the interpreter: the Triton selection (two cases) and XLA's (one)."""
    y, k = fp8_results[f"{case.name}/y"], fp8_results[f"{case.name}/k"]
    _check(case, y, k)


def test_fp8_kernel_differs_from_the_unrounded_layer(fp8_results):
    """The kernel really reads rounded rows (else the comparison above would not tell them
    apart): on the bf16 case it is further from the unrounded layer than bf16's tolerance."""
    from prunepath_jax.kernels.reference import sparse_ffn_reference

    c = GROUPED_CASES[1]
    y0, _ = sparse_ffn_reference(*inputs(c), c.tau, **kwargs(c))
    err = np.abs(fp8_results[f"{c.name}/y"] - np.asarray(y0, np.float32)).max()
    assert err > 2 * 2.0**-8 * np.abs(np.asarray(y0, np.float32)).max()


def test_x_fp8_refuses_gradients(fp8_results):
    assert "x_fp8" in str(fp8_results["grad_error"]) and "inference" in str(
        fp8_results["grad_error"]
    )


def test_x_fp8_must_be_a_bool():
    from prunepath_jax.kernels.triton_grouped import sparse_ffn_grouped

    c = GROUPED_CASES[0]
    with pytest.raises(ValueError, match="x_fp8 must be True or False"):
        sparse_ffn_grouped(*inputs(c), c.tau, **kwargs(c), x_fp8=1)


def test_fp8_kernel_compiles_for_sm90():
    """The 8B prefill shape at the default tiles: the float8 gathers stay a cp.async pipeline
    (1-byte rows, so half the bytes of the bf16 kernel's per tile)."""
    from prunepath_jax.kernels import triton_grouped as tg

    tn = tg.DEFAULT_TUNING
    tiles = {"tok": "*i32", "off": "*i32", "cnt": "*i32", "te": "*i32", "tm": "*i32"}
    sig = {"x": "*fp8e4nv", "xs": "*fp32", "w": "*bf16", "g": "*fp32", **tiles, "a": "*bf16"}
    ck = sm90_compile(tg._grouped_up_fp8_kernel, sig,
                      dict(T=4096, D=4096, E=448, G=32, BLOCK_M=tn["block_m"],
                           BLOCK_D=tn["block_d"], DOT_F32=False, IEEE=False),
                      warps=tn["warps"], stages=tn["stages"])  # fmt: skip
    assert "cp.async" in ck.asm["ptx"]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GROUPED_CASES, ids=lambda c: c.name)
def test_fp8_kernel_matches_the_reference_on_gpu(case):
    from prunepath_jax.kernels.triton_grouped import sparse_ffn_grouped

    fn = jax.jit(lambda *a: sparse_ffn_grouped(*a, **kwargs(case), x_fp8=True))
    y, k = fn(*inputs(case), np.float32(case.tau))
    _check(case, y, k)
