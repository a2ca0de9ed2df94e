"""The relaxed Pallas-Triton atomic add: same sums as Pallas' own, relaxed in the Triton IR."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close
from jax.experimental import pallas as pl

from prunepath_jax.kernels import pallas_atomic

plgpu = pytest.importorskip("jax.experimental.pallas.triton")


def _adder(relaxed: bool, interpret: bool, debug: bool = False):
    """Every program adds its own row of ``x`` [P, 16] into one [16] accumulator."""
    add = pallas_atomic.atomic_add if relaxed else plgpu.atomic_add

    def kernel(x_ref, y_in_ref, y_ref):
        del y_in_ref
        add(y_ref, (pl.ds(0, 16),), x_ref[0, :])

    def f(x):
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((16,), jnp.float32),
            grid=(x.shape[0],),
            in_specs=[pl.BlockSpec((1, 16), lambda i: (i, 0)), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=pl.BlockSpec(memory_space=pl.ANY),
            input_output_aliases={1: 0},
            interpret=interpret,
            debug=debug,
            compiler_params=plgpu.CompilerParams(num_warps=1),
        )(x, jnp.full((16,), 0.5, jnp.float32))

    return jax.jit(f)


def test_relaxed_add_sums_every_program_in_the_interpreter():
    x = jax.random.normal(jax.random.key(7), (5, 16), jnp.float32)
    y = _adder(relaxed=True, interpret=True)(x)
    assert_close(y, 0.5 + np.asarray(x).sum(0), "op_fp32", "relaxed add, interpreter")


@pytest.mark.skipif(not pallas_atomic.HAVE_RELAXED, reason="this jax moved the private hooks")
def test_triton_ir_is_relaxed_and_pallas_own_is_not(capsys):
    """The lowered Triton IR (``debug=True`` prints it) has a relaxed ``atomic_rmw``, while
    ``plgpu.atomic_add`` is acquire-release: the difference this module exists for."""
    spec = jax.ShapeDtypeStruct((3, 16), jnp.float32)
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    lines = {}
    for relaxed in (True, False):
        jax.export.export(
            _adder(relaxed, interpret=False, debug=True), platforms=["cuda"],
            disabled_checks=checks,
        )(spec)  # fmt: skip
        out = capsys.readouterr().out
        lines[relaxed] = [ln for ln in out.splitlines() if "tt.atomic_rmw" in ln]
    assert len(lines[True]) == 1 and "fadd, relaxed, gpu" in lines[True][0]
    assert len(lines[False]) == 1 and "fadd, acq_rel, gpu" in lines[False][0]
    # A patched helper must not leak into later lowerings.
    assert pallas_atomic._lowering._atomic_rmw is pallas_atomic._orig_rmw


@pytest.mark.gpu
def test_gpu_relaxed_add_matches_numpy():
    x = jax.random.normal(jax.random.key(8), (300, 16), jnp.float32)
    y = _adder(relaxed=True, interpret=False)(x)
    assert_close(y, 0.5 + np.asarray(x).sum(0), "op_fp32", "relaxed add, GPU")
