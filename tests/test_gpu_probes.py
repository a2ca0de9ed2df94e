"""The H200 probes' kernels (scripts/mosaic_prefetch.py, scripts/pdl_check.py) build here.

Why: these scripts run only on the lent GPU, where a lowering error costs a device call; Pallas'
Mosaic GPU API moves between jax releases (jax 0.11 dropped ``pallas_call`` for it), so the CUDA
lowering of every probe kernel is checked on CPU, and the Pallas-Triton probe kernel's result
in the interpreter.
"""

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TRITON_CALL, assert_close, cuda_export_text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import mosaic_prefetch  # noqa: E402
import pdl_check  # noqa: E402

MOSAIC_CALL = "custom_call @mosaic_gpu_v2"


@pytest.mark.parametrize("variant", mosaic_prefetch.VARIANTS)
def test_mosaic_prefetch_chain_lowers_for_cuda(variant):
    """Every variant's chain lowers to one kernel of its backend per link, rows above one TMA
    box (256) included."""
    n, rows, programs = mosaic_prefetch.N_CHAIN, 512, 4
    fn = mosaic_prefetch.chain_fn(variant=variant, rows=rows, programs=programs)
    x = jax.ShapeDtypeStruct(
        (programs, mosaic_prefetch.OUT_ROWS, mosaic_prefetch.COLS), jnp.bfloat16
    )
    ws = jax.ShapeDtypeStruct((n, programs * rows, mosaic_prefetch.COLS), jnp.bfloat16)
    text = cuda_export_text(fn, x, ws)
    want = f"custom_call @{TRITON_CALL}" if variant == "pallas_triton" else MOSAIC_CALL
    assert text.count(want) == n


def test_mosaic_prefetch_rejects_bad_sizes():
    x = jnp.zeros((2, 8, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="variant"):
        mosaic_prefetch.mosaic_step(x, x, variant="late", rows=64, programs=2)
    with pytest.raises(ValueError, match="multiple"):
        mosaic_prefetch.mosaic_step(x, x, variant="no_wait", rows=300, programs=2)


def test_triton_probe_step_matches_its_formula(monkeypatch):
    """The Pallas-Triton probe kernel gives ``x[0] + w_block[:8]`` per program (interpreter)."""
    from jax.experimental import pallas as pl

    monkeypatch.setattr(pl, "pallas_call", functools.partial(pl.pallas_call, interpret=True))
    rng = np.random.default_rng(0)
    programs, rows = 3, 128
    x = jnp.asarray(rng.standard_normal((programs, 8, 128)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((programs * rows, 128)), jnp.float32)
    got = mosaic_prefetch.triton_step(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), rows=rows,
                                      programs=programs)  # fmt: skip
    xb, wb = (a.astype(jnp.bfloat16).astype(jnp.float32) for a in (x, w))
    want = xb[0][None] + wb.reshape(programs, rows, 128)[:, :8]
    assert_close(np.asarray(got, np.float32), want, "bf16", "probe kernel vs its formula")


def test_pdl_check_mosaic_kernels_lower_for_cuda():
    """The race probe's kernel B and the launch-cost chain's Mosaic step."""
    x = jax.ShapeDtypeStruct((64, 512), jnp.float32)
    assert cuda_export_text(jax.jit(pdl_check._mosaic), x).count(MOSAIC_CALL) == 1
    v = jax.ShapeDtypeStruct((256,), jnp.float32)
    copy = functools.partial(pdl_check._mosaic, fn=lambda a: a, rows=1)
    assert cuda_export_text(jax.jit(copy), v).count(MOSAIC_CALL) == 1
