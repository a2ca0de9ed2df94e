"""Gluon kernels through jax-triton (``kernels/gluon_launch.py``) and the shared-memory ring
probe (``scripts/gluon_chain_probe.py``).

Why here: Gluon is experimental and renames its builtins between triton releases (the H200
image runs 3.6, pip may resolve a newer one here), and a ring's mbarrier counts are only right
for the lowering they were written against. So the probe's kernels are lowered for sm_90 on
CPU with the installed triton, and the PTX is checked for what the counts assume; the result
against the float32 chain needs the GPU (``gpu`` marker).
"""

import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import triton
from helpers import assert_close

from prunepath_jax.kernels import gluon_launch
from prunepath_jax.kernels.sm90 import SMEM_LIMIT

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import gluon_chain_probe as gcp  # noqa: E402
import megakernel_probe  # noqa: E402

SIG = ["*fp32", "*bf16", "*fp32", "*i32", "*i32"]  # x, w, y, counter, fail
# the layer probe's: x, the three weight blocks, their outputs, counter, fail, stamps
LAYER_SIG = ["*fp32", *["*bf16"] * 3, *["*fp32"] * 3, "*i32", "*i32", "*i64"]
EIGHT_B = (4096, 6144, 4096, 10240)  # the layer probe's 8B width and QKV / O / expert rows
# The grid barrier's arrival: a GPU-scope release add (``atom`` in triton 3.6, ``red`` later).
RELEASE_ADD = re.compile(r"\b(atom|red)\.global\.gpu\.release\.add")


def _lower(kernel, **meta):
    """``(ptx, shared bytes, warps a block)`` of a probe kernel for sm_90."""
    _, shared, ptx, _, warps = gluon_launch.compile_gluon(
        kernel, SIG, set(), meta, warps=8, stages=1, ctas=1, cc=90
    )
    return ptx, shared, warps


def _lower_layer(**settings):
    """``(ptx, shared bytes)`` of the layer probe's kernel for sm_90, two 8B layers with
    ``gluon_layer_probe.layer_meta``'s ``settings`` (the constexprs it would launch)."""
    import gluon_layer_probe as glp

    meta = glp.layer_meta(2, *EIGHT_B, **settings)
    _, shared, ptx, _, _ = gluon_launch.compile_gluon(
        glp._layer_kernel, LAYER_SIG, set(), meta, warps=8, stages=1, ctas=1, cc=90
    )
    return ptx, shared


def _assert_no_spills(ptx):
    from prunepath_jax.kernels.sm90 import ptxas_info

    info = ptxas_info(ptx)
    assert info["spill_stores"] == 0 and info["spill_loads"] == 0, info


def _base(d=2048, ring=3, chunk=1024):
    return dict(L=4, D=d, ROWS=d // 128, CK=chunk, P=128, NBUF=ring, SPIN=gcp.SPIN, WARPS=8,
                WC=min(8, chunk // 256))  # fmt: skip


@pytest.mark.parametrize("xs", [False, True])
def test_ws_ring_lowers_with_the_counts_it_assumes(xs):
    """The warp-specialized ring: 16-byte cp.async into shared memory, every producer thread's
    completion arrives on ``ready`` (unpredicated ``.noinc``: WS_READY_PER_WARP a warp), one
    consumer thread frees a slot (predicated arrive: WS_EMPTY_COUNT 1), worker warps beside the
    8 default ones, and the grid barrier's release add."""
    meta = {**_base(), "PW": 1, "READY_COUNT": gcp.WS_READY_PER_WARP, "EMPTY_COUNT": 1, "XS": xs}
    ptx, shared, warps = _lower(gcp._ws_chain_kernel, **meta)
    assert re.search(r"cp\.async\.cg\.shared\.global \[[^]]+\], \[[^]]+\], 0x10, 0x10", ptx)
    noinc = [ln.strip() for ln in ptx.splitlines() if "cp.async.mbarrier.arrive.noinc" in ln]
    assert noinc and not any(ln.startswith("@") for ln in noinc), noinc
    assert gcp.WS_READY_PER_WARP == 32
    arrives = [
        ln.strip()
        for ln in ptx.splitlines()
        if re.search(r"\bmbarrier\.arrive\b", ln) and "cp.async" not in ln
    ]
    assert arrives and all(ln.startswith("@") for ln in arrives), arrives
    assert gcp.WS_EMPTY_COUNT == 1
    assert "setmaxnreg" in ptx and warps > 8
    assert RELEASE_ADD.search(ptx)
    assert shared <= SMEM_LIMIT


@pytest.mark.parametrize("mode", ["ring", "after", "regs", "nobar"])
def test_plain_ring_modes_lower(mode):
    chunk = 2048 if mode in ("after", "regs") else 1024
    meta = {**_base(ring=2 if chunk == 2048 else 3, chunk=chunk),
            "AFTER": mode in ("after", "regs"), "REGS": mode == "regs",
            "NOBAR": mode == "nobar"}  # fmt: skip
    ptx, shared, warps = _lower(gcp._gl_chain_kernel, **meta)
    assert warps == 8 and shared <= SMEM_LIMIT
    assert ("cp.async" in ptx) == (mode != "regs")
    assert bool(RELEASE_ADD.search(ptx)) == (mode != "nobar")


def test_compile_gluon_names_a_parameter_mismatch():
    with pytest.raises(ValueError, match="parameters"):
        gluon_launch.compile_gluon(gcp._ws_chain_kernel, SIG, set(), {"L": 1}, warps=8, stages=1,
                                   ctas=1, cc=90)  # fmt: skip


def test_is_gluon_tells_the_dialects_apart():
    assert gluon_launch.is_gluon(gcp._ws_chain_kernel)
    assert not gluon_launch.is_gluon(megakernel_probe._chain_kernel)
    assert isinstance(gcp._ws_chain_kernel, triton.JITFunction)  # jax-triton's own type check


def test_gluon_chain_rejects_bad_shapes():
    x, w = jnp.zeros((256,)), jnp.zeros((2, 256, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="mode"):
        gcp.gluon_chain(x, w, programs=128, ring=2, chunk=256, mode="fast")
    with pytest.raises(ValueError, match="ring 2, chunk d"):
        gcp.gluon_chain(x, w, programs=128, ring=3, chunk=256, mode="after")
    with pytest.raises(ValueError, match="programs"):
        gcp.gluon_chain(x, w, programs=96, ring=2, chunk=256)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU error")
def test_install_on_cpu_says_why():
    with pytest.raises(NotImplementedError, match="CUDA GPU"):
        gluon_launch.install.__wrapped__()


@pytest.mark.gpu
@pytest.mark.parametrize("mode,ring,chunk", [("ws", 3, 512), ("wsx", 4, 256), ("ring", 2, 1024),
                                             ("after", 2, 1024), ("regs", 2, 1024)])  # fmt: skip
def test_gluon_chain_matches_the_fp32_chain_on_gpu(mode, ring, chunk):
    """Every phase's output of the Gluon chain against float32 (bf16 weights), no barrier
    failures, on the real 128-program grid."""
    d, layers = 1024, 6
    kx, kw = jax.random.split(jax.random.key(0))
    w = (jax.random.normal(kw, (layers, d, d)) * d**-0.5).astype(jnp.bfloat16)
    x = jax.random.normal(kx, (d,), jnp.float32)
    y, fail = gcp.gluon_chain(x, w, programs=128, ring=ring, chunk=chunk, mode=mode)
    assert int(np.asarray(fail).sum()) == 0
    assert_close(y, megakernel_probe.reference_chain(x, w), "model_fp32", f"{mode} chain")


def test_layer_probe_lowers_without_spills():
    """The 8B layer's three streams through one ring: every ring shape of the default sweep
    fits the shared memory, and no thread spills (the producer's registers are set for that)."""
    for n, rb, ck in [(12, 16, 512), (3, 16, 2048)]:
        ptx, shared = _lower_layer(ring=n, rows=rb, chunk=ck, select=True, attention_ns=5000,
                                   select_ns=2500, nap_ns=200, stamps=True)  # fmt: skip
        assert shared <= SMEM_LIMIT
        _assert_no_spills(ptx)


def test_layer_probe_accumulating_consumer_lowers():
    """``accumulate``: one reduction a row block; its products stay in registers, so only the
    lowering and the shared memory are checked here (spills depend on the triton version)."""
    ptx, shared = _lower_layer(ring=12, rows=8, chunk=1024, accumulate=True)
    assert shared <= SMEM_LIMIT and "cp.async.mbarrier.arrive.noinc" in ptx


@pytest.mark.parametrize("sel", [False, True])
def test_layer_probe_l2_lookahead_lowers(sel):
    """``l2_ahead``: the producer's bulk L2 prefetch, lane 0 only, one request per 16 KB of a
    row block; with triton 3.6 (the H200 image's) no thread spills."""
    import gluon_layer_probe as glp

    ptx, shared = _lower_layer(ring=6, rows=16, chunk=1024, select=sel, attention_ns=5000,
                               select_ns=2500, l2_ahead=2)  # fmt: skip
    assert shared <= SMEM_LIMIT
    asks = re.findall(r"@p cp\.async\.bulk\.prefetch\.L2\.global", ptx)
    assert asks and len(asks) % (16 * 4096 * 2 // glp.L2_SEG_BYTES) == 0, len(asks)
    assert "%laneid" in ptx
    if triton.__version__.startswith("3.6"):
        _assert_no_spills(ptx)


def test_layer_probe_rejects_rows_that_do_not_split():
    import gluon_layer_probe as glp

    x = jnp.zeros((4096,))
    w = jnp.zeros((1, 4096 + 64, 4096), jnp.bfloat16)
    with pytest.raises(ValueError, match="rows over"):
        glp.gluon_layers(x, w, w, w)
    w = jnp.zeros((1, 4096, 4096), jnp.bfloat16)
    with pytest.raises(ValueError, match="l2_ahead -1"):
        glp.gluon_layers(x, w, w, w, l2_ahead=-1)
    with pytest.raises(ValueError, match="1-row blocks of whole 16384-byte requests"):
        glp.gluon_layers(x, w, w, w, rows=1, l2_ahead=1)
    with pytest.raises(ValueError, match="dynamic blocks take whole rows"):
        glp.gluon_layers(x, w, w, w, dynamic=True, chunk=1024)


@pytest.mark.parametrize("sel", [False, True])
def test_layer_probe_dynamic_blocks_lower(sel):
    """``dynamic``: each phase's blocks claimed with one thread's relaxed atomic add, and each
    slot's ``ready`` barrier opened by the copies' arrivals plus one plain arrival after its
    block index is written (the count the host sets: 32 a producer warp + 1)."""
    import gluon_layer_probe as glp

    settings = dict(ring=6, rows=4, chunk=4096, select=sel, attention_ns=5000, select_ns=2500,
                    stamps=True, dynamic=True)  # fmt: skip
    assert glp.layer_meta(2, *EIGHT_B, **settings)["READY_COUNT"] == gcp.WS_READY_PER_WARP + 1
    ptx, shared = _lower_layer(**settings)
    assert shared <= SMEM_LIMIT
    claims = re.findall(r"(@%p\d+ )?atom\.global\.gpu\.relaxed\.add", ptx)
    assert len(claims) == 6 and all(c for c in claims), claims  # 2 a phase, one thread each
    assert "cp.async.mbarrier.arrive.noinc" in ptx
    if triton.__version__.startswith("3.6"):
        _assert_no_spills(ptx)


def test_stamp_summary_reads_a_known_timeline():
    """Two programs, three layers, phases of 10 µs: barrier passed 1 µs after the previous
    phase, a 2 µs stand-in, the first chunk 0.5 µs later, the producer's first chunk 3 µs
    before the barrier."""
    import gluon_layer_probe as glp

    st = np.zeros((2, 3, 3, glp.NSLOT.value), np.int64)
    for p in range(2):
        for layer in range(3):
            for i in range(3):
                t0 = ((layer * 3 + i) * 10_000) + 1_000 + p * 100  # ns
                st[p, layer, i, :7] = [t0, t0 + 2_000, t0 + 2_500, t0 + 9_000, t0 - 5_000,
                                       t0 - 3_000, t0 + 6_000]  # fmt: skip
    got = glp.stamp_summary(st)
    for name in "qox":
        assert got[name]["standin"] == pytest.approx(2.0)
        assert got[name]["first_ready"] == pytest.approx(0.5)
        assert got[name]["consume"] == pytest.approx(7.0)
        assert got[name]["issued_first"] == pytest.approx(-3.0)
        assert got[name]["issued_last"] == pytest.approx(6.0)
        assert got[name]["span"] == pytest.approx(9.1)
    assert got["o"]["wait"] == pytest.approx(1.0) and got["x"]["wait"] == pytest.approx(1.0)
    assert got["q"]["wait"] == pytest.approx(1.0)  # layer 2's, from layer 1's last phase


@pytest.mark.gpu
@pytest.mark.parametrize(
    "held,accumulate,ahead,dyn",
    [(False, False, 0, False), (True, False, 0, False), (False, True, 0, False),
     (True, True, 2, False), (False, False, 0, True), (True, False, 0, True)],
)  # fmt: skip
def test_layer_probe_matches_the_fp32_chain_on_gpu(held, accumulate, ahead, dyn):
    """Both orders of the expert stream: prefetched freely, or held until the selection (with
    the stand-in latencies) — the same result, no barrier failures, no hang."""
    import gluon_layer_probe as glp

    ks = jax.random.split(jax.random.key(2), 4)
    ws = [(jax.random.normal(k, (2, n, 4096)) * 4096**-0.5).astype(jnp.bfloat16)
          for k, n in zip(ks[:3], glp.PHASE_ROWS, strict=True)]  # fmt: skip
    x = jax.random.normal(ks[3], (4096,), jnp.float32)
    lat = {"select": True, "attention_ns": 3000, "select_ns": 2000, "nap_ns": 200} if held else {}
    *got, fail, st = glp.gluon_layers(
        x,
        *ws,
        ring=6,
        rows=4 if dyn else 16,
        chunk=4096 if dyn else 1024,
        accumulate=accumulate,
        l2_ahead=ahead,
        stamps=True,
        dynamic=dyn,
        **lat,
    )
    assert int(np.asarray(fail).sum()) == 0
    st = np.asarray(st)  # every program's timeline runs forward, phase after phase
    for a, b in [(0, 1), (1, 2), (2, 3), (4, 5), (5, 6)]:
        assert (st[..., b] >= st[..., a]).all(), (a, b)
    assert (st[:, :, 1:, 0] >= st[:, :, :-1, 3]).all()
    for g, want, name in zip(got, glp.reference_layers(x, *ws), "qox", strict=True):
        assert_close(g, want, "model_fp32", f"layer probe phase {name}")
