"""The H200 probes' kernels (scripts/mosaic_prefetch.py, scripts/pdl_check.py,
scripts/megakernel_probe.py, scripts/atomic_drain_probe.py) build here.

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
from helpers import (
    TRITON_CALL,
    assert_close,
    cuda_export_text,
    run_triton_interpreted,
    sm90_compile,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import atomic_drain_probe  # noqa: E402
import megakernel_probe  # noqa: E402
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


_MEGA_INTERP = """
import sys; sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np
import megakernel_probe as mp
for programs, d, layers, block_k in [(1, 32, 4, None), (1, 64, 3, 16), (2, 64, 3, 32)]:
    w = (jax.random.normal(jax.random.key(d), (layers, d, d)) * d**-0.5).astype(jnp.bfloat16)
    x = jax.random.normal(jax.random.key(layers), (d,))
    want = mp.reference_chain(x, w)
    for prefetch in (False, True):
        y, fail = mp.megakernel_chain(x, w, programs=programs, prefetch=prefetch,
                                      block_k=block_k, spin=5, interpret=True)
        err = float(jnp.max(jnp.abs(y - want))) if programs == 1 else -1.0
        print(programs, int(np.asarray(fail).sum()), err, float(jnp.max(jnp.abs(want))))
"""


def test_megakernel_probe_chain_in_the_interpreter():
    """One program: every phase's output is the fp32 chain's, whole rows and 16-column chunks,
    with and without the prefetch. Two programs in the sequential interpreter: the first
    cannot see the second arrive, so its barrier gives up after ``spin`` polls and reports it
    (the guard that keeps a scheduling surprise from hanging the GPU)."""
    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    out = run_triton_interpreted(["-c", _MEGA_INTERP, scripts], timeout=300)
    lines = [line.split() for line in out.strip().split("\n")]
    assert len(lines) == 6
    for programs, failed, err, scale in lines:
        if programs == "1":
            assert failed == "0"
            assert_close(np.array([float(err)]), np.array([0.0]), "op_fp32", f"scale {scale}")
        else:
            assert failed == "1"


def test_megakernel_probe_rejects_bad_shapes():
    w = jnp.zeros((2, 64, 64), jnp.bfloat16)
    x = jnp.zeros((64,), jnp.float32)
    for kw in ({"programs": 3}, {"programs": 2, "block_k": 48}, {"programs": 128}):
        with pytest.raises(ValueError, match="power-of-2"):
            megakernel_probe.megakernel_chain(x, w, prefetch=True, **kw)
    with pytest.raises(ValueError, match="power-of-2"):
        megakernel_probe.megakernel_chain(x, jnp.zeros((2, 64, 32)), programs=2, prefetch=True)


@pytest.mark.parametrize(("d", "programs", "block_k"), [(2048, 128, 2048), (4096, 128, 1024)])
def test_megakernel_probe_compiles_for_sm90(d, programs, block_k):
    """The probe's shapes compile for the H200, its barrier a GPU-scope release add and
    acquire polls."""
    ck = sm90_compile(
        megakernel_probe._chain_kernel,
        {"x": "*fp32", "w": "*bf16", "y": "*fp32", "c": "*i32", "f": "*i32"},
        dict(L=4, D=d, ROWS=d // programs, BLOCK_K=block_k, P=programs, PREFETCH=True,
             SPIN=megakernel_probe.SPIN),
        warps=8, stages=1,
    )  # fmt: skip
    ptx = ck.asm["ptx"]
    assert "red.global.gpu.release.add" in ptx or "atom.global.gpu.release.add" in ptx
    assert ".gpu.acquire" in ptx


_DRAIN_INTERP = """
import sys; sys.path.insert(0, sys.argv[1])
import numpy as np
import atomic_drain_probe as ap
for mode in ap.MODES:
    f, rows, fail = ap.drain_rounds(40, programs=1, rounds=5, mode=mode, interpret=True)
    rows = float(np.asarray(rows).sum()) if mode == "rows" else 0.0  # (not zeroed otherwise)
    print(mode, int(np.asarray(fail).sum()), float(np.asarray(f).sum()), rows)
f, rows, fail = ap.drain_rounds(8, programs=2, rounds=2, mode="atomic", spin=5, interpret=True)
print("two", int(np.asarray(fail).sum()), float(np.asarray(f).sum()), 0.0)
f, rows, fail = ap.drain_rounds(8, programs=2, rounds=2, mode="atomic", spin=5, copies=2,
                                interpret=True)
print("copies", int(np.asarray(fail).sum()), float(np.asarray(f).min()),
      float(np.asarray(f).max()))
"""


def test_atomic_drain_probe_in_the_interpreter():
    """One program, 5 rounds of 40 floats: the atomics sum to 5 an address, the plain stores
    fill the program's row with ones, the barrier-only mode adds nothing. Two programs in the
    sequential interpreter: the first gives up on its barrier and says so; with two copies of
    the sum (one a program) the copies still add to 2 rounds × 2 programs at every address."""
    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    out = run_triton_interpreted(["-c", _DRAIN_INTERP, scripts], timeout=300)
    got = {ln.split()[0]: [float(x) for x in ln.split()[1:]] for ln in out.strip().split("\n")}
    assert got["barrier"] == [0, 0.0, 0.0]
    assert got["atomic"] == [0, 5 * 40.0, 0.0]
    assert got["rows"] == [0, 0.0, 40.0]
    assert got["two"][0] >= 1
    assert got["copies"][1:] == [4.0, 4.0]


def test_atomic_drain_probe_compiles_for_sm90_and_rejects_bad_sizes():
    """At the 1B width over 132 programs: relaxed fp32 atomics only in the atomic mode, the
    barrier's release arrival and acquire polls in every mode."""
    sig = {"f": "*fp32", "rows": "*fp32", "sink": "*fp32", "ctr": "*i32", "fail": "*i32"}
    for i, mode in enumerate(atomic_drain_probe.MODES):
        const = dict(R=4, D=2048, D_PAD=2048, P=132, MODE=i, SPIN=atomic_drain_probe.SPIN, C=4)
        ptx = sm90_compile(atomic_drain_probe._drain_kernel, sig, const, warps=4, stages=1)
        ptx = ptx.asm["ptx"]
        assert ("gpu.relaxed.add" in ptx) == (mode == "atomic"), mode  # (.v4).f32 atomics
        assert ".gpu.acquire" in ptx and ".gpu.release" in ptx
    bad = ({"mode": "fence"}, {"rounds": 0}, {"rounds": 2**17, "programs": 132}, {"copies": 3})
    for kw in bad:
        with pytest.raises(ValueError, match="mode one of"):
            atomic_drain_probe.drain_rounds(
                64, **{"programs": 2, "rounds": 2, "mode": "rows", **kw}
            )
