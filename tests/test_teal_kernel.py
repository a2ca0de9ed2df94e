"""TEAL's decode kernels (``kernels/triton_teal.py``): the interpreter against float64 and
against ``eval.teal.teal_ffn`` (the quality baseline's own math), the sm_90 lowering at the 8B
shapes, bad input, and the same cases on a GPU (``gpu`` marker).
"""

import math
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, interpreted_npz, sm90_compile
from teal_kernel_cases import FFN_CASES, GEMV_CASES, ffn_inputs, gemv_inputs

from prunepath_jax.eval.teal import teal_ffn

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def interp_results(tmp_path_factory):
    return interpreted_npz(tmp_path_factory, "teal_interp_runner")


def _gemv_ref(c):
    x, w = gemv_inputs(c)
    if c.dtype == "bfloat16":  # the kernel reads bf16 inputs
        x, w = (np.asarray(jnp.asarray(v, jnp.bfloat16), np.float64) for v in (x, w))
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    return np.where(np.abs(x) >= c.t, x, 0.0) @ w


def _ffn_ref(c):
    """``eval.teal.teal_ffn`` (the baseline's math) on the case, in the case's dtype."""
    x, w_in, w_out = (jnp.asarray(v, c.dtype) for v in ffn_inputs(c))
    act = "silu" if c.c == 2 else "gelu_new"
    y, _, _ = teal_ffn(x[None, None], w_in, w_out, None, None, act, jnp.float32(c.t_x),
                       jnp.float32(c.t_a))  # fmt: skip
    return np.asarray(y[0, 0].astype(jnp.float32))


@pytest.mark.parametrize("kind", ["", "/masked"], ids=["compacted", "masked"])
@pytest.mark.parametrize("case", GEMV_CASES, ids=lambda c: c.name)
def test_masked_gemv_in_the_interpreter(case, kind, interp_results):
    """Both kernels: over the kept rows' index list (the default) and over every row."""
    y = interp_results[case.name + kind]
    tol = "op_fp32" if case.dtype == "float32" else "bf16"
    assert_close(y, _gemv_ref(case), tol, case.name + kind)
    if math.isinf(case.t):
        assert not y.any()


def test_compact_lists_the_kept_inputs_in_order():
    from prunepath_jax.kernels.triton_teal import compact

    x = jnp.asarray([0.1, -2.0, 0.0, 3.0, -0.4, 0.5], jnp.bfloat16)
    idx, n, xk = compact(x, 0.45)
    assert int(n[0]) == 3
    np.testing.assert_array_equal(np.asarray(idx[:3]), [1, 3, 5])
    np.testing.assert_array_equal(np.asarray(xk), [-2.0, 3.0, 0.5, 0.0, 0.0, 0.0])
    assert int(compact(x, float("inf"))[1][0]) == 0


@pytest.mark.parametrize("case", FFN_CASES, ids=lambda c: c.name)
def test_ffn_in_the_interpreter_matches_the_baseline(case, interp_results):
    tol = "op_fp32" if case.dtype == "float32" else "bf16"
    assert_close(interp_results[case.name], _ffn_ref(case), tol, case.name)


def test_thresholds_change_the_result(interp_results):
    """Not vacuous: the thresholded FFN differs from the dense one on the same shape."""
    dense, sparse = FFN_CASES[0], FFN_CASES[1]
    assert (dense.d, dense.f) == (sparse.d, sparse.f) and sparse.t_x > 0
    gap = np.abs(interp_results[dense.name] - interp_results[sparse.name]).max()
    assert gap > 10 * np.abs(interp_results[dense.name]).max() * 1e-5


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_lowers_for_sm90_at_the_8b_shapes(dtype):
    """The two GEMVs of an 8B layer (gate/up: 4096 inputs x 28672 outputs; down: 14336 x 4096,
    split) for the H200: the row loads go through cp.async (the software pipeline), no spills."""
    from prunepath_jax.kernels import triton_teal as tt
    from prunepath_jax.kernels.sm90 import ptxas_info

    for k, n in ((4096, 28672), (14336, 4096)):
        splits, ks = tt._split(k, n, tt.BLOCK_N, tt.BLOCK_K, None)
        masked = sm90_compile(tt._masked_rows_kernel,
                              {"x": f"*{dtype}", "w": f"*{dtype}", "t": "*fp32", "y": "*fp32"},
                              dict(K=k, N=n, KS=ks, BK=tt.BLOCK_K, BN=tt.BLOCK_N,
                                   ATOMIC=splits > 1, STAGES=tt.STAGES),
                              warps=tt.WARPS, stages=tt.STAGES)  # fmt: skip
        kept = sm90_compile(tt._kept_rows_kernel,
                            {"idx": "*i32", "n": "*i32", "xk": "*fp32", "w": f"*{dtype}",
                             "y": "*fp32"},
                            dict(N=n, S=splits, BK=tt.BLOCK_K, BN=tt.BLOCK_N, ATOMIC=splits > 1,
                                 STAGES=tt.STAGES), warps=tt.WARPS, stages=tt.STAGES)  # fmt: skip
        for name, ck in (("masked", masked), ("kept", kept)):
            ptx = ck.asm["ptx"]
            assert "cp.async" in ptx, (name, k, n)
            atomics = re.search(r"\b(red|atom)\.global", ptx) is not None
            assert atomics == (splits > 1), (name, k, n, splits)
            assert ptxas_info(ptx)["spill_stores"] == 0, (name, k, n)


def test_bad_input():
    from prunepath_jax.kernels import triton_teal as tt

    x, w_in, w_out = jnp.ones(8), jnp.ones((8, 32)), jnp.ones((16, 8))
    with pytest.raises(ValueError, match="one token"):
        tt.teal_ffn_decode(jnp.ones((2, 8)), w_in, w_out, 0.1, 0.1)
    with pytest.raises(ValueError, match="inconsistent"):
        tt.teal_ffn_decode(x, jnp.ones((8, 31)), w_out, 0.1, 0.1)
    with pytest.raises(ValueError, match="bf16, f16 or f32"):
        tt.teal_ffn_decode(x, w_in.astype(jnp.int8), w_out, 0.1, 0.1)
    with pytest.raises(ValueError, match="x \\[K\\] and W \\[K, N\\]"):
        tt.masked_gemv(x, jnp.ones((9, 4)), 0.1)
    with pytest.raises(ValueError, match="power of 2"):
        tt.masked_gemv(x, jnp.ones((8, 4)), 0.1, block_n=24)
    with pytest.raises(ValueError, match="split_k"):
        tt.masked_gemv(x, jnp.ones((8, 4)), 0.1, split_k=0)
    with pytest.raises(ValueError, match="programs"):
        tt.masked_gemv(x, jnp.ones((8, 4)), 0.1, programs=0)


@pytest.mark.gpu
@pytest.mark.parametrize("case", FFN_CASES, ids=lambda c: c.name)
def test_ffn_on_gpu_matches_the_baseline(case):
    from prunepath_jax.kernels.triton_teal import teal_ffn_decode

    x, w_in, w_out = (jnp.asarray(v, case.dtype) for v in ffn_inputs(case))
    y = teal_ffn_decode(x, jnp.concatenate(list(w_in), axis=0).T, w_out, case.t_x, case.t_a,
                        act_name="silu" if case.c == 2 else "gelu_new")  # fmt: skip
    tol = "op_fp32" if case.dtype == "float32" else "bf16"
    assert_close(np.asarray(y.astype(jnp.float32)), _ffn_ref(case), tol, case.name)


def test_benchmark_calibration_hits_its_targets():
    """``benchmarks/teal_decode.py``'s thresholds: on the dense chain they were taken from, each
    layer keeps ``1 - p`` of its inputs and activations (within one entry of the quantile)."""
    import sys

    sys.path.insert(0, str(HERE.parent / "benchmarks"))
    import teal_decode
    from ffn_kernels import make_layers

    d, f, n = 64, 128, 3
    layers = [(r, wi, wo, jnp.concatenate(list(wi), axis=0).T)
              for r, wi, wo in make_layers(n, d, f, f // 16, jnp.float32)]  # fmt: skip
    x = jnp.asarray(np.random.default_rng(0).standard_normal(d), jnp.float32)
    t, kept = teal_decode.calibrate(x, layers, [0.25, 0.75])
    assert t[0.25].shape == (n, 2) and np.all(t[0.75] > t[0.25])
    for p in (0.25, 0.75):
        kx, ka = kept[p]
        assert abs(kx - (1 - p)) <= 2 / d and abs(ka - (1 - p)) <= 2 / f, (p, kx, ka)
