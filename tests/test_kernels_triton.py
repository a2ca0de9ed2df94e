"""Triton kernels on CPU: the interpreter vs the reference, and real GPU compiles without a GPU.

Every ``@triton.jit`` kernel runs under ``TRITON_INTERPRET=1`` on torch CPU tensors (in one
subprocess: the variable must be set before triton is imported) on the shared case list of
``kernel_cases.py`` and must match `kernels.reference` (k exactly, y within the tolerance of
its dtype). The compile test lowers each kernel to PTX and cubin for sm_90 (the H200) with
triton's own compiler, which catches GPU-only errors (layouts, shared memory, unsupported ops)
on a machine without a GPU. The ``gpu`` tests run the same cases through jax-triton.
"""

import functools

import jax
import numpy as np
import pytest
from helpers import (
    assert_close,
    interpreted_npz,
    run_triton_interpreted,
    sm90_compile,
    zeros_triton_call,
)
from kernel_cases import (
    ALL_CASES,
    DECODE_CASES,
    GRAD_ARGS,
    GROUPED_BACKWARDS,
    GROUPED_CASES,
    ONE_TOKEN_TUNINGS,
    grad_loss,
    inputs,
    kwargs,
)

from prunepath_jax.kernels.reference import sparse_ffn_reference


@pytest.fixture(scope="module")
def interp_results(tmp_path_factory):
    return interpreted_npz(tmp_path_factory, "triton_interp_runner")


def _check(c, y, k):
    x, router, w_in, w_out = inputs(c)
    y_ref, k_ref = sparse_ffn_reference(x, router, w_in, w_out, c.tau, **kwargs(c))
    np.testing.assert_array_equal(np.asarray(k), np.asarray(k_ref), err_msg=f"{c.name}: k")
    tol = "op_fp32" if c.dtype == "float32" else "bf16"
    assert_close(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), tol, c.name)
    return np.asarray(k_ref)


def test_cases_cover_the_contract():
    ks = {}
    for c in ALL_CASES:
        x, router, w_in, w_out = inputs(c)
        _, k = sparse_ffn_reference(x, router, w_in, w_out, c.tau, **kwargs(c))
        ks[c.name] = np.asarray(k)
    assert any(c.t == 1 for c in DECODE_CASES) and any(c.t > 1 for c in DECODE_CASES)
    assert any((k == 1).all() for k in ks.values()), "a case with k = 1"
    assert any((k == c.e).all() for c, k in zip(ALL_CASES, ks.values(), strict=True)), "k = E"
    assert any(1 < k.min() < c.e for c, k in zip(ALL_CASES, ks.values(), strict=True))
    assert {c.dtype for c in ALL_CASES} == {"float32", "bfloat16"}


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.name)
def test_interpreter_matches_reference(case, interp_results):
    _check(case, interp_results[f"{case.name}/y"], interp_results[f"{case.name}/k"])


@pytest.mark.parametrize("label", list(ONE_TOKEN_TUNINGS))
@pytest.mark.parametrize("case", [c for c in DECODE_CASES if c.t == 1], ids=lambda c: c.name)
def test_one_token_forms_match_reference(case, label, interp_results):
    """The per-expert kernels and the fused kernel at other grids / units, one token."""
    _check(case, interp_results[f"{case.name}+{label}/y"], interp_results[f"{case.name}+{label}/k"])


@pytest.mark.parametrize("case", GROUPED_CASES, ids=lambda c: c.name)
def test_grouped_bf16x3_router_logits_match_reference(case, interp_results):
    """Opt-in tensor-core router logits: the same experts on these inputs (no token sits within
    an fp32 rounding of its threshold) and outputs within the tolerance of the dtype."""
    _check(case, interp_results[f"{case.name}+bf16x3/y"], interp_results[f"{case.name}+bf16x3/k"])


@pytest.mark.parametrize("case", GROUPED_CASES, ids=lambda c: c.name)
def test_grouped_wx_form_matches_reference(case, interp_results):
    """``up_form="wx"`` (`_grouped_up_t_kernel`: W · xᵀ, the inference up kernel), forward."""
    _check(case, interp_results[f"{case.name}+wx/y"], interp_results[f"{case.name}+wx/k"])


@pytest.mark.parametrize("case", GROUPED_CASES, ids=lambda c: c.name)
def test_grouped_triton_selection_matches_reference(case, interp_results):
    """``selection="triton"``: the selection kernel's experts (k exactly: no token of these
    cases sits within an ulp of τ), the outputs and the training gradients (the gates still
    differentiable through the logits) as the reference's; the default (8 tokens a program,
    the token lists from `triton_group.kernel_slots`), one token a program with the atomic
    counts and XLA's lists, and 4 tokens a program with the per-program counts."""
    _check(case, interp_results[f"{case.name}+tsel/y"], interp_results[f"{case.name}+tsel/k"])
    _check_grads(case, [interp_results[f"{case.name}+tsel/grad_{n}"] for n in GRAD_ARGS])


def test_grouped_rejects_an_unknown_selection():
    from prunepath_jax.kernels.triton_grouped import sparse_ffn_grouped

    c = GROUPED_CASES[0]
    with pytest.raises(ValueError, match="selection must be one of"):
        sparse_ffn_grouped(*inputs(c), c.tau, interpret=True, **kwargs(c), selection="sort")


def _check_grads(c, grads):
    """The training forward's gradients against ``jax.grad`` of the float32 reference (the
    routing is the same, so only the experts' arithmetic differs)."""
    want = jax.grad(grad_loss(sparse_ffn_reference, c), argnums=(0, 1, 2, 3))(*inputs(c))
    tol = "op_fp32" if c.dtype == "float32" else "bf16"
    for name, got, ref in zip(GRAD_ARGS, grads, want, strict=True):
        ref = np.asarray(ref, np.float32)
        assert np.abs(ref).max() > 0 or (name == "router" and c.gate == "none"), (c.name, name)
        assert_close(np.asarray(got, np.float32), ref, tol, f"{c.name}: d{name}")


@pytest.mark.parametrize("backward", GROUPED_BACKWARDS)
@pytest.mark.parametrize("case", GROUPED_CASES, ids=lambda c: c.name)
def test_grouped_gradients_match_reference(case, backward, interp_results):
    """The grouped GEMM as a training forward (custom VJP: the up kernel keeps the selected
    slots' pre-activations; the backward kernel or XLA), under the interpreter. With gate
    "none" the task loss gives the router no gradient, in both."""
    got = [interp_results[f"{case.name}+{backward}/grad_{n}"] for n in GRAD_ARGS]
    _check_grads(case, got)


def test_grouped_gradient_launches(monkeypatch):
    """Differentiated, the layer's forward is one Triton launch — the up kernel that also
    writes the pre-activations — and its backward the grouped backward and weight-gradient
    kernels (the weight-gradient kernel only with ``weight_grads="grouped"``, none with
    ``backward="xla"``); the primal alone launches the plain up kernel; each form after the
    selection and the token-list kernels when those are the defaults (``triton_call`` caught under
    ``jax.eval_shape``: jax-triton cannot be imported on a CPU jaxlib)."""
    from prunepath_jax.kernels import jt
    from prunepath_jax.kernels import triton_grouped as tg
    from prunepath_jax.kernels.triton_group import _slots_kernel
    from prunepath_jax.kernels.triton_select import _select_kernel

    sel = [_select_kernel] if tg.DEFAULT_TUNING["selection"] == "triton" else []
    sel += [_slots_kernel] if tg.DEFAULT_TUNING["grouping"] in ("auto", "triton") else []

    calls = []
    monkeypatch.setattr(jt, "triton_call", zeros_triton_call(calls))
    c = GROUPED_CASES[1]
    loss = grad_loss(tg.sparse_ffn_grouped, c)
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in inputs(c)]
    jax.eval_shape(loss, *args)
    assert [k for k, _ in calls] == [*sel, tg._grouped_up_kernel]
    from prunepath_jax.kernels import triton_grouped_bwd as tgb

    up, bwd, dw = tg._grouped_up_h_kernel, tgb._grouped_bwd_kernel, tgb._grouped_dw_kernel
    want = {"grouped": [*sel, up, bwd], "grouped-dw": [*sel, up, bwd, dw], "xla": [*sel, up]}
    for label, tuning in GROUPED_BACKWARDS.items():
        calls.clear()
        fn = functools.partial(tg.sparse_ffn_grouped, **tuning)
        grads = jax.eval_shape(jax.grad(grad_loss(fn, c), argnums=(0, 1, 2, 3)), *args)
        assert [k for k, _ in calls] == want[label], label
        assert [(g.shape, g.dtype) for g in grads] == [(a.shape, a.dtype) for a in args]
    with pytest.raises(ValueError, match="backward must be one of"):
        tg.sparse_ffn_grouped(*inputs(c), c.tau, **kwargs(c), backward="dense")
    with pytest.raises(ValueError, match="weight_grads must be one of"):
        tg.sparse_ffn_grouped(*inputs(c), c.tau, **kwargs(c), weight_grads="dense")


def test_grouped_auto_up_form_launches(monkeypatch):
    """``up_form="auto"``: a 16-bit prompt of at least ``WX_MIN_TOKENS`` tokens
    launches the W · xᵀ up kernel at ``WX_LAYOUT``'s tiles (its grid counted in those tiles);
    differentiated, the same call keeps the x · Wᵀ kernels at the tuning's own tiles for the
    forward and the backward; one token fewer, fp32, or an explicit ``up_form`` keep the
    tuning's kernel and tiles."""
    import dataclasses

    from prunepath_jax.kernels import jt
    from prunepath_jax.kernels import triton_grouped as tg
    from prunepath_jax.kernels import triton_grouped_bwd as tgb

    calls = []
    monkeypatch.setattr(jt, "triton_call", zeros_triton_call(calls))
    base = GROUPED_CASES[1]  # bf16, 12 experts of 16, k_max 3

    def ups(case, grad=False, **tuning):
        calls.clear()
        fn = functools.partial(tg.sparse_ffn_grouped, **{"up_form": "auto", **tuning})
        args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in inputs(case)]
        loss = grad_loss(fn, case)
        jax.eval_shape(jax.grad(loss, argnums=(0,)) if grad else loss, *args)
        return [(k, kw["BLOCK_M"], kw["num_warps"], kw["num_stages"], kw["grid"][0])
                for k, kw in calls if "BLOCK_M" in kw]  # fmt: skip

    t = tg.WX_MIN_TOKENS
    lay, dflt = tg.WX_LAYOUT, tg.DEFAULT_TUNING
    wx_tiles = -(-t * 3 // lay["block_m"]) + 12
    tiles = -(-t * 3 // dflt["block_m"]) + 12
    own = (dflt["block_m"], dflt["warps"], dflt["stages"], tiles)
    assert ups(dataclasses.replace(base, t=t)) == [
        (tg._grouped_up_t_kernel, lay["block_m"], lay["warps"], lay["stages"], wx_tiles)
    ]
    assert ups(dataclasses.replace(base, t=t), grad=True) == [
        (tg._grouped_up_h_kernel, *own),
        (tgb._grouped_bwd_kernel, *own),
    ]
    own_small = (*own[:3], -(-(t - 1) * 3 // dflt["block_m"]) + 12)
    assert ups(dataclasses.replace(base, t=t - 1)) == [(tg._grouped_up_kernel, *own_small)]
    f32 = dataclasses.replace(base, t=t, dtype="float32")
    assert ups(f32) == [(tg._grouped_up_kernel, *own)]
    assert ups(dataclasses.replace(base, t=t), up_form="xw") == [(tg._grouped_up_kernel, *own)]
    assert ups(dataclasses.replace(base, t=t), up_form="wx") == [(tg._grouped_up_t_kernel, *own)]


def test_grouped_h_is_zeroed_only_where_read_densely(monkeypatch):
    """The forward's pre-activations ``h [2, t, f]`` are zeroed (a memset of 512 MB a 1B layer
    at 16 384 tokens) only for ``backward="xla"``, whose elementwise passes read every slot;
    the dense weight gradients give the same result whatever the unselected slots hold (NaN
    there: the activation is selected by the gate, not multiplied by it)."""
    import jax.numpy as jnp

    from prunepath_jax.kernels import jt
    from prunepath_jax.kernels import triton_grouped as tg

    calls = []
    monkeypatch.setattr(jt, "triton_call", zeros_triton_call(calls))
    c = GROUPED_CASES[1]
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in inputs(c)]
    want = {"grouped": (0,), "grouped-dw": (0,), "xla": (0, 1)}
    for label, tuning in GROUPED_BACKWARDS.items():
        calls.clear()
        fn = functools.partial(tg.sparse_ffn_grouped, **tuning)
        jax.eval_shape(jax.grad(grad_loss(fn, c), argnums=(0, 1, 2, 3)), *args)
        up = [kw.get("zeroed_outputs", ()) for k, kw in calls if k is tg._grouped_up_h_kernel]
        assert up == [want[label]], label

    t, e, g, d = 20, 4, 16, 32
    ks = jax.random.split(jax.random.key(0), 6)
    mask_te = jax.random.bernoulli(ks[0], 0.5, (t, e))
    gate_te = jnp.where(mask_te, jax.nn.sigmoid(jax.random.normal(ks[1], (t, e))), 0.0)
    sel_tf = jnp.repeat(mask_te, g, axis=-1)
    h = jax.random.normal(ks[2], (2, t, e * g)).astype(jnp.bfloat16)
    dh = jnp.where(sel_tf[:, None], jax.random.normal(ks[3], (t, 2, e * g)), 0.0)
    x, dy = (jax.random.normal(k, (t, d)).astype(jnp.bfloat16) for k in ks[4:])
    grads = [tg._dense_weight_grads(x, dy, jnp.where(sel_tf, h, fill), dh.astype(jnp.bfloat16),
                                    gate_te, g, (jnp.bfloat16, jnp.bfloat16))
             for fill in (0.0, jnp.nan)]  # fmt: skip
    for zero, nan in zip(*grads, strict=True):
        assert np.isfinite(np.asarray(nan, np.float32)).all()
        np.testing.assert_array_equal(np.asarray(nan, np.float32), np.asarray(zero, np.float32))


def test_grouped_bf16_products_write_bf16(monkeypatch):
    """bf16 and differentiated, the grouped path's dense GEMMs (the down projection, ``dW_out``,
    ``dW_in``, ``dx``) write bf16 from their fp32 accumulators: no float32 result and a convert
    pass after each (exported for CUDA; the router's exact split alone keeps float32 results)."""
    from helpers import exported_dots

    from prunepath_jax.kernels import jt
    from prunepath_jax.kernels import triton_grouped as tg

    monkeypatch.setattr(jt, "triton_call", zeros_triton_call())
    c = GROUPED_CASES[1]
    assert c.dtype == "bfloat16"
    f = c.e * c.g
    loss = grad_loss(tg.sparse_ffn_grouped, c)  # its value keeps the down projection
    dots = exported_dots(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)), *inputs(c))
    ffn = [d for d in dots if f"{f}x" in d.split(" -> ")[0]]
    assert len(ffn) == 4, dots
    assert all(d.endswith("xbf16>") for d in ffn), ffn


def test_grouped_rejects_a_bad_expert_group():
    from prunepath_jax.kernels.triton_grouped import sparse_ffn_grouped

    c = GROUPED_CASES[0]
    for bad in (-1, 2.0, "4", True):
        with pytest.raises(ValueError, match="expert_group must be an int"):
            sparse_ffn_grouped(*inputs(c), c.tau, interpret=True, **kwargs(c), expert_group=bad)


def test_auto_expert_group_follows_the_l2_model():
    """``expert_group="auto"``: expert by expert while x fits in ~0.64 of L2, else the largest
    power-of-two group whose slabs fit there (the shapes of `scripts/l2_order_model.py`'s
    table in `auto_expert_group`'s docstring)."""
    from prunepath_jax.kernels.triton_grouped import auto_expert_group, resolve_expert_group

    assert auto_expert_group(4096, 4096, 32) == 0  # 8B prefill: x 32 MB
    assert auto_expert_group(16384, 2048, 32) == 128  # 1B training: x 64 MB, slabs 256 KB
    assert auto_expert_group(32768, 2048, 32) == 128
    assert auto_expert_group(8192, 4096, 32) == 64  # 8B: slabs 512 KB
    assert auto_expert_group(16384, 4096, 32, itemsize=4) == 32  # fp32: half the bf16 group
    assert auto_expert_group(10**6, 2**16, 512, l2_bytes=2**20) == 1  # never below 1
    assert resolve_expert_group("auto", 16384, 2048, 32, 2) == 128
    assert resolve_expert_group("auto", 64, 2048, 32, 2) == 0
    assert resolve_expert_group(7, 64, 2048, 32, 2) == 7
    with pytest.raises(ValueError, match="or 'auto'"):
        resolve_expert_group("Auto", 64, 2048, 32, 2)


def test_grouped_rejects_unknown_router_logits():
    from prunepath_jax.kernels.triton_grouped import sparse_ffn_grouped

    c = GROUPED_CASES[0]
    with pytest.raises(ValueError, match="router_logits"):
        sparse_ffn_grouped(*inputs(c), c.tau, interpret=True, **kwargs(c), router_logits="bf16")


def test_split_k_router_logits_in_the_interpreter():
    """The Triton router GEMV (odd d and E, several splits, 1 and 16 tokens) in the interpreter."""
    code = (
        "import jax, jax.numpy as jnp, numpy as np\n"
        "from prunepath_jax.kernels.triton_decode import router_logits_triton\n"
        "from prunepath_jax import routing\n"
        "for t, d, e in [(1, 256, 48), (3, 96, 7), (16, 200, 70)]:\n"
        "    x = jax.random.normal(jax.random.key(t), (t, d)).astype(jnp.bfloat16)\n"
        "    r = jax.random.normal(jax.random.key(d), (d, e)) * d**-0.5\n"
        "    got = router_logits_triton(r, x, splits=4, interpret=True)\n"
        "    want = routing.router_logits(r, x)\n"
        "    print(float(jnp.max(jnp.abs(got - want))), float(jnp.max(jnp.abs(want))))\n"
    )
    lines = run_triton_interpreted(["-c", code], timeout=300).split("\n")[:3]
    for line in lines:
        err, scale = map(float, line.split())
        assert_close(np.array([err]), np.array([0.0]), "op_fp32", f"scale {scale}")


def test_dead_expert_is_skipped():
    """The dead-expert cases really leave expert 1 unselected (so early exits are exercised)."""
    from prunepath_jax.kernels.reference import route_reference

    for c in (c for c in ALL_CASES if c.dead_expert):
        x, router, _, _ = inputs(c)
        _, mask, _, _ = route_reference(x, router, c.tau, rule=c.rule, k_max=c.k_max)
        assert not np.asarray(mask)[:, 1].any(), c.name


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_sm90(dtype):
    """Real Triton lowering to PTX/cubin for the H200 at the Llama-3-8B layer shape."""
    from prunepath_jax.kernels import jt
    from prunepath_jax.kernels import triton_balanced as tb
    from prunepath_jax.kernels import triton_decode as td
    from prunepath_jax.kernels import triton_grouped as tg

    dims = dict(D=4096, E=448, G=32)
    ieee = dict(DOT_F32=False, IEEE=dtype == "fp32")
    sm90_compile(td._up_kernel,
             {"x": f"*{dtype}", "l": "*fp32", "tau": "*fp32", "w": f"*{dtype}", "a": "*fp32",
              "s": "*i32"},
             dict(T=4, **dims, T_PAD=16, E_PAD=512, BLOCK_D=256, NUCLEUS=False, SIGMOID=True,
                  K_MIN=1, K_MAX=448, **ieee))  # fmt: skip
    sm90_compile(td._down_kernel,
             {"a": "*fp32", "s": "*i32", "w": f"*{dtype}", "y": "*fp32", "l": "*i32"},
             dict(T=4, **dims, T_PAD=16, E_PAD=512, BLOCK_D=128, SPLIT=8, **ieee),
             stages=4)  # fmt: skip
    sm90_compile(td._logits_kernel, {"x": f"*{dtype}", "r": "*fp32", "o": "*fp32"},
             dict(T=1, D=4096, E=448, T_PAD=16, BLOCK_R=64, BLOCK_E=64, ROWS=128,
                  DOT_F32=False), stages=2)  # fmt: skip
    for d, e in ((4096, 448), (2048, 256), (576, 48)):  # the fused one-token kernel
        sm90_compile(tb._balanced_kernel,
                 {"x": f"*{dtype}", "l": "*fp32", "tau": "*fp32", "wi": f"*{dtype}",
                  "wo": f"*{dtype}", "yi": "*fp32", "y": "*fp32", "k": "*i32"},
                 dict(D=d, E=e, G=32, E_PAD=jt.next_pow2(e), D_PAD=jt.next_pow2(d), BN=2, P=264,
                      NUCLEUS=False, SIGMOID=True, K_MIN=1, K_MAX=e),
                 warps=8, stages=1)  # fmt: skip
    if dtype == "bf16":  # the grouped GEMM's kernels at the tiles the registry launches
        from prunepath_jax.kernels import triton_grouped_bwd as tgb

        tn = tg.DEFAULT_TUNING
        grouping = {"tok": "*i32", "off": "*i32", "cnt": "*i32"}
        tiles = {**grouping, "te": "*i32", "tm": "*i32"}
        up = {"x": "*bf16", "w": "*bf16", "g": "*fp32", **tiles, "a": "*bf16"}
        for kernel, sig in (
            (tg._grouped_up_kernel, up),
            (tg._grouped_up_h_kernel, {**up, "h": "*bf16"}),
            (tgb._grouped_bwd_kernel, {"dy": "*bf16", "w": "*bf16", "h": "*bf16", "g": "*fp32",
                                       **tiles, "dh": "*bf16", "dg": "*fp32"}),
            (tgb._grouped_dw_kernel, {"x": "*bf16", "dy": "*bf16", "h": "*bf16", "dh": "*bf16",
                                      "g": "*fp32", **grouping, "dwi": "*bf16", "dwo": "*bf16"}),
        ):  # fmt: skip
            ck = sm90_compile(kernel, sig,
                     dict(T=4096, **dims, BLOCK_M=tn["block_m"], BLOCK_D=tn["block_d"], **ieee),
                     warps=tn["warps"], stages=tn["stages"])  # fmt: skip
            ptx = ck.asm["ptx"]  # the gathers are software-pipelined copies, not scalar loads
            assert "cp.async" in ptx, kernel
            if kernel is tg._grouped_up_kernel:
                assert "ld.global.b16" not in ptx
        lay = tg.WX_LAYOUT  # up_form="auto"'s prefill tiles: two warpgroups of m64n128k16
        for bm, warps, stages, shape in ((128, 4, 4, "m64n128k16"), (256, 4, 3, "m64n256k16"),
                                         (lay["block_m"], lay["warps"], lay["stages"],
                                          "m64n128k16")):  # fmt: skip
            ck = sm90_compile(tg._grouped_up_t_kernel, up, dict(T=4096, **dims, BLOCK_M=bm,
                              BLOCK_D=64, **ieee), warps=warps, stages=stages)  # fmt: skip
            ptx = ck.asm["ptx"]  # the expert's 2G rows as wgmma's M, the token tile as its N
            assert f"wgmma.mma_async.sync.aligned.{shape}" in ptx and "cp.async" in ptx


@pytest.mark.gpu
@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.name)
def test_jax_triton_matches_reference_on_gpu(case):
    from prunepath_jax.kernels.triton_decode import sparse_ffn_decode
    from prunepath_jax.kernels.triton_grouped import sparse_ffn_grouped

    fn = sparse_ffn_decode if case in DECODE_CASES else sparse_ffn_grouped
    x, router, w_in, w_out = inputs(case)
    jitted = jax.jit(lambda *a: fn(*a, **kwargs(case)))
    y, k = jitted(x, router, w_in, w_out, np.float32(case.tau))
    _check(case, y, k)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GROUPED_CASES, ids=lambda c: c.name)
def test_grouped_triton_selection_on_gpu(case):
    """``selection="triton"`` through jax-triton under jit, with and without the kernel's
    per-expert counts (atomic and per program), with the token lists from
    `triton_group.kernel_slots` (the default) and from XLA: the reference's experts and
    outputs."""
    from prunepath_jax.kernels.triton_grouped import sparse_ffn_grouped

    x, router, w_in, w_out = inputs(case)
    for tn in ({}, {"grouping": "xla"}, {"select_counts": "atomic"},
               {"select_counts": "partial"}):  # fmt: skip
        fn = jax.jit(lambda *a, tn=tn: sparse_ffn_grouped(
            *a, **kwargs(case), selection="triton", **tn))  # fmt: skip
        y, k = fn(x, router, w_in, w_out, np.float32(case.tau))
        _check(case, y, k)


@pytest.mark.gpu
@pytest.mark.parametrize("label", ["default", *ONE_TOKEN_TUNINGS])
def test_one_token_real_widths_on_gpu(label):
    """One token at the 8B, 1B and SmolLM2 layer widths, 10% to all experts, every one-token
    form (by default the fused kernel at d 4096 and 2048) through jax-triton under jit."""
    from kernel_cases import Case

    from prunepath_jax.kernels.triton_decode import sparse_ffn_decode

    tuning = {} if label == "default" else ONE_TOKEN_TUNINGS[label]
    for d, e, tau in ((4096, 448, 0.5), (2048, 256, 0.2), (576, 48, 1.05), (4096, 448, 0.05)):
        case = Case(f"gpu_b1_d{d}_tau{tau}_{label}", 1, d, e, 32, "bfloat16", tau, seed=d)
        x, router, w_in, w_out = inputs(case)
        jitted = jax.jit(lambda *a: sparse_ffn_decode(*a, **kwargs(case), **tuning))  # noqa: B023
        y, k = jitted(x, router, w_in, w_out, np.float32(case.tau))
        _check(case, y, k)


def test_one_token_auto_form():
    """The fused kernel for one token at 1024 < d ≤ 4096, else the per-expert kernels;
    "balanced" forces it, "blocks" never takes it."""
    from prunepath_jax.kernels.triton_decode import DEFAULT_TUNING, use_fused

    tn = dict(DEFAULT_TUNING)
    assert use_fused(1, 4096, 32, tn) and use_fused(1, 2048, 32, tn)
    assert not use_fused(1, 576, 32, tn)  # small: measured slower end to end
    assert not use_fused(1, 8192, 32, tn)  # wider than one register chunk
    assert not use_fused(2, 4096, 32, tn)
    assert use_fused(1, 576, 32, {**tn, "experts": "balanced"})
    assert not use_fused(1, 4096, 32, {**tn, "experts": "blocks"})


def test_fused_one_token_rejects_bad_input():
    """Shapes, clamps, rules and grids outside the fused kernel: a clear error before launch."""
    from prunepath_jax.kernels.triton_balanced import balanced_ffn_decode

    c = next(c for c in DECODE_CASES if c.t == 1)
    x, _, w_in, w_out = inputs(c)
    lg = np.zeros((1, c.e), np.float32)
    kw = dict(group_size=c.g, interpret=True)
    bad = [
        (dict(x_td=np.zeros((2, c.d), np.float32)), "t = 1"),
        (dict(x_td=np.zeros((1, 8192), np.float32)), "next_pow2"),
        (dict(logits_te=np.zeros((1, c.e + 1), np.float32)), "logits must be"),
        (dict(k_min=3, k_max=2), "k_min"),
        (dict(rule="top"), "rule must be"),
        (dict(gate="softmax"), "rule must be"),
        (dict(programs=-1), "programs"),
        (dict(block_n=3), "power of two"),
    ]
    for over, msg in bad:
        args = {"x_td": x, "logits_te": lg, "tau": 0.5, "w_in_cfd": w_in, "w_out_fd": w_out}
        args.update({k: v for k, v in over.items() if k in args})
        opts = {**kw, **{k: v for k, v in over.items() if k not in args}}
        with pytest.raises(ValueError, match=msg):
            balanced_ffn_decode(**args, **opts)


GROUPED_TUNINGS = {  # the grouped kernel's measured alternatives (BENCHMARKS.md, issue 5)
    "m256": {"block_m": 256, "warps": 8, "stages": 3},
    "m64_d32": {"block_m": 64, "block_d": 32, "warps": 4, "stages": 4},
    "eg4": {"expert_group": 4},
    "wx": {"up_form": "wx", "warps": 4},  # W · xᵀ: m64n128k16
    "wx_m256": {"up_form": "wx", "block_m": 256, "warps": 4, "stages": 3},  # m64n256k16
    "wx_m256w8": {"up_form": "wx", "block_m": 256, "warps": 8, "stages": 3},  # WX_LAYOUT
}


@pytest.mark.gpu
@pytest.mark.parametrize("label", list(GROUPED_TUNINGS))
@pytest.mark.parametrize("case", GROUPED_CASES, ids=lambda c: c.name)
def test_grouped_tunings_on_gpu(case, label):
    """The grouped kernel at other tiles than the default (which ``test_jax_triton_matches_
    reference_on_gpu`` runs) matches the reference through jax-triton under jit."""
    from prunepath_jax.kernels.triton_grouped import sparse_ffn_grouped

    x, router, w_in, w_out = inputs(case)
    tn = GROUPED_TUNINGS[label]
    jitted = jax.jit(lambda *a: sparse_ffn_grouped(*a, **kwargs(case), **tn))
    y, k = jitted(x, router, w_in, w_out, np.float32(case.tau))
    _check(case, y, k)


@pytest.mark.gpu
@pytest.mark.parametrize("backward", GROUPED_BACKWARDS)
@pytest.mark.parametrize("case", GROUPED_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("expert_group", [0, 4])
def test_grouped_gradients_on_gpu(case, backward, expert_group):
    """The training forward's gradients through jax-triton under jit (the default tiles, in
    both program orders)."""
    from prunepath_jax.kernels.triton_grouped import sparse_ffn_grouped

    fn = functools.partial(sparse_ffn_grouped, **GROUPED_BACKWARDS[backward],
                           expert_group=expert_group)  # fmt: skip
    _check_grads(case, jax.jit(jax.grad(grad_loss(fn, case), argnums=(0, 1, 2, 3)))(*inputs(case)))


@pytest.mark.gpu
@pytest.mark.parametrize("size", ["xw", "wx"])
def test_grouped_prefill_selects_the_xla_paths_experts_on_gpu(size, monkeypatch):
    """At prefill size in bf16 both the masked XLA path and the grouped GEMM take the shared
    router logits (the tensor-core split on a GPU), so they select the same experts for every
    token, and their outputs agree within the bf16 tolerance; at 256 tokens (the x · Wᵀ up
    kernel) and at ``WX_MIN_TOKENS`` (``up_form="auto"``'s W · xᵀ at ``WX_LAYOUT``), both
    through the registry with ``up_form="auto"``."""
    import jax.numpy as jnp
    from kernel_cases import Case

    from prunepath_jax import routing
    from prunepath_jax.kernels import api
    from prunepath_jax.kernels import triton_grouped as tg

    monkeypatch.setitem(tg.DEFAULT_TUNING, "up_form", "auto")  # read when traced, below
    t = 4 * routing.BF16X3_MIN_TOKENS if size == "xw" else tg.WX_MIN_TOKENS
    assert tg.auto_up_form(t, 2) == size
    c = Case(f"t{t}_bf16_prefill", t, 256, 32, 16, "bfloat16", 0.6, seed=11)
    x, r, wi, wo = inputs(c)
    runs = {
        impl: jax.jit(lambda *a, impl=impl: api.sparse_ffn(*a, **kwargs(c), implementation=impl))(
            x, r, wi, wo, jnp.float32(c.tau)
        )
        for impl in ("xla", "triton")
    }
    np.testing.assert_array_equal(runs["triton"][1], runs["xla"][1])
    assert 1 < float(np.mean(runs["xla"][1])) < 32
    y = {k: np.asarray(v[0].astype(jnp.float32)) for k, v in runs.items()}
    assert np.isfinite(y["triton"]).all()
    assert_close(y["triton"], y["xla"], "bf16", "grouped vs XLA path")
