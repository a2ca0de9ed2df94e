"""Router math: cumulative-mass selection rules, clamps, ties, jit/vmap, gates, stats and losses."""

import functools
import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, exported_dots
from hypothesis import given, settings
from hypothesis import strategies as st

from prunepath_jax import routing as R

_select_jit = jax.jit(R.select, static_argnames=("rule", "k_min", "k_max"))


@jax.jit
def _stats_jit(logits, tau, mask):
    return R.route_stats(R.select(logits, tau), logits, mask)


# Few distinct shapes: every new (shape, rule, clamp) costs a ~0.4 s compile on this CPU.
_T = 4
_E_CHOICES = (1, 3, 8)


@st.composite
def logits_and_tau(draw, e_choices=_E_CHOICES):
    t = _T
    e = draw(st.sampled_from(e_choices))
    # Half the draws come from a tiny value set so ties (and equal probabilities) are common.
    if draw(st.booleans()):
        elements = st.floats(-8.0, 8.0, width=32, allow_nan=False, allow_infinity=False)
    else:
        elements = st.sampled_from([-1.0, 0.0, 0.5, 2.0])
    logits = draw(hnp.arrays(np.float32, (t, e), elements=elements))
    tau = draw(st.floats(0.015625, 1.25, width=32))
    return logits, np.float32(tau)


def _check_prefix(sel):
    """The selected set is exactly the first k experts of the order; returns numpy views."""
    mask = np.asarray(sel.mask_te)
    k = np.asarray(sel.k_t)
    order = np.asarray(sel.order_te)
    for i in range(mask.shape[0]):
        assert mask[i, order[i, : k[i]]].all()
        assert not mask[i, order[i, k[i] :]].any()
        assert mask[i].sum() == k[i]
    return mask, k, order


def _check_order(sel):
    p = np.asarray(sel.probs_te)
    order = np.asarray(sel.order_te)
    for i in range(p.shape[0]):
        ps = p[i, order[i]]
        assert (np.diff(ps) <= 0).all(), "order is not by descending probability"
        ties = np.diff(ps) == 0
        assert (np.diff(order[i])[ties] > 0).all(), "equal probabilities must keep index order"
        assert sorted(order[i].tolist()) == list(range(p.shape[1]))


@settings(max_examples=60, deadline=None)
@given(logits_and_tau())
def test_paper_rule_properties(data):
    logits, tau = data
    e = logits.shape[1]
    sel = _select_jit(logits, tau, rule="paper")
    _check_order(sel)
    _, k, _ = _check_prefix(sel)
    cum = np.asarray(sel.cum_te)
    assert (k >= 1).all()
    for i in range(logits.shape[0]):
        if tau > 1:
            assert k[i] == e
            continue
        assert (cum[i, 1 : k[i]] < tau).all(), "a selected rank > 1 reached tau"
        if k[i] < e:
            assert cum[i, k[i]] >= tau, "the first excluded expert stays below tau"


@settings(max_examples=60, deadline=None)
@given(logits_and_tau())
def test_nucleus_rule_properties(data):
    logits, tau = data
    e = logits.shape[1]
    sel = _select_jit(logits, tau, rule="nucleus")
    _check_order(sel)
    _, k, _ = _check_prefix(sel)
    cum = np.asarray(sel.cum_te)
    assert (k >= 1).all()
    for i in range(logits.shape[0]):
        if k[i] < e:
            assert cum[i, k[i] - 1] >= tau, "selected mass is below tau yet experts remain"
        if k[i] >= 2:
            assert cum[i, k[i] - 2] < tau, "removing the last selected keeps mass >= tau"


@settings(max_examples=40, deadline=None)
@given(logits_and_tau(), st.floats(0.015625, 1.25, width=32), st.sampled_from(["paper", "nucleus"]))
def test_k_monotone_in_tau(data, tau2, rule):
    logits, tau1 = data
    lo, hi = sorted([tau1, np.float32(tau2)])
    k_lo = np.asarray(_select_jit(logits, lo, rule=rule).k_t)
    k_hi = np.asarray(_select_jit(logits, hi, rule=rule).k_t)
    assert (k_lo <= k_hi).all()
    # The nucleus set contains the paper set (it adds at most the crossing expert).
    k_p = np.asarray(_select_jit(logits, lo, rule="paper").k_t)
    k_n = np.asarray(_select_jit(logits, lo, rule="nucleus").k_t)
    assert (k_p <= k_n).all() and (k_n <= k_p + 1).all()


@settings(max_examples=30, deadline=None)
@given(logits_and_tau(e_choices=(8,)))
def test_clamps(data):
    logits, tau = data
    free = np.asarray(_select_jit(logits, tau).k_t)
    for k_min, k_max in [(1, 3), (2, 5), (3, 3), (4, 12)]:
        sel = _select_jit(logits, tau, k_min=k_min, k_max=k_max)
        _check_prefix(sel)
        np.testing.assert_array_equal(np.asarray(sel.k_t), np.clip(free, k_min, min(k_max, 8)))


def test_cum_matches_float64_cumsum():
    logits = np.random.default_rng(0).normal(size=(16, 48)).astype(np.float32) * 3
    sel = _select_jit(logits, np.float32(0.9))
    p = np.asarray(sel.probs_te, np.float64)
    order = np.asarray(sel.order_te)
    ref = np.cumsum(np.take_along_axis(p, order, axis=1), axis=1)
    assert_close(sel.cum_te, ref, "op_fp32", "cumulative mass")
    assert (np.asarray(sel.cum_te)[:, -1] == 1.0).all()


def test_uniform_boundaries_and_ties():
    """Zero logits: every p = 1/4, so the boundary falls exactly on c_i = tau."""
    logits = np.zeros((3, 4), np.float32)
    paper = _select_jit(logits, np.float32(0.5))
    nucleus = _select_jit(logits, np.float32(0.5), rule="nucleus")
    np.testing.assert_array_equal(paper.order_te, np.tile(np.arange(4), (3, 1)))
    assert (np.asarray(paper.k_t) == 1).all()  # c_2 = 0.5 reaches tau: excluded
    assert (np.asarray(nucleus.k_t) == 2).all()  # c_2 = 0.5 reaches tau: included
    np.testing.assert_array_equal(paper.mask_te[0], [True, False, False, False])
    np.testing.assert_array_equal(nucleus.mask_te[0], [True, True, False, False])
    # tau = 1: the paper rule drops the expert that completes the mass, nucleus keeps all.
    assert (np.asarray(_select_jit(logits, np.float32(1.0)).k_t) == 3).all()
    assert (np.asarray(_select_jit(logits, np.float32(1.0), rule="nucleus").k_t) == 4).all()
    assert (np.asarray(_select_jit(logits, np.float32(1.05)).k_t) == 4).all()
    # Equal logits among non-uniform ones: the lower index ranks first.
    sel = _select_jit(np.array([[0.0, 3.0, 1.0, 3.0, 1.0]], np.float32), np.float32(1.05))
    np.testing.assert_array_equal(sel.order_te[0], [1, 3, 2, 4, 0])


def test_mask_is_the_sorts_prefix_with_ties_zeros_and_nans():
    """``select``'s mask (a threshold on the k-th sorted probability plus an index rule for ties,
    no scatter) equals the first k_t entries of its own sort, also where probabilities tie,
    underflow to exactly 0, or are NaN (which ``lax.sort`` places after every number), under
    clamps and at every k."""
    rng = np.random.default_rng(11)
    rows = [
        rng.normal(size=12) * 3,
        np.repeat([2.0, 0.0, -1.0], 4),  # three tie groups
        np.array([0.0, -300.0, 5.0, -300.0, 5.0, -400.0, 0.0, 1.0, -500.0, 5.0, 2.0, -300.0]),
        np.where(np.arange(12) % 3 == 0, np.nan, rng.normal(size=12)),  # NaN rows: all NaN p
        np.array([1.0, 2.0] + [-1000.0] * 10),  # ten exact zeros after two experts
    ]
    logits = np.stack(rows).astype(np.float32)
    logits[3, 5] = -np.nan  # a NaN with the sign bit set
    for tau in (0.05, 0.3, 0.7, 0.999, 1.0, 1.05):
        for rule in ("paper", "nucleus"):
            for k_min, k_max in ((1, None), (3, 3), (2, 9), (11, 12)):
                _check_prefix(
                    _select_jit(logits, np.float32(tau), rule=rule, k_min=k_min, k_max=k_max)
                )


def test_tau_above_one_selects_all_even_with_underflow():
    logits = np.array([[0.0, -200.0, -300.0, 50.0]], np.float32)  # p underflows to 0
    for rule in ("paper", "nucleus"):
        sel = _select_jit(logits, np.float32(1.0000001), rule=rule)
        assert int(sel.k_t[0]) == 4 and bool(sel.mask_te.all())


def test_jit_vmap_eager_agree():
    rng = np.random.default_rng(1)
    logits_bte = rng.normal(size=(3, 5, 16)).astype(np.float32) * 2
    taus = np.array([0.3, 0.6, 0.9], np.float32)
    for rule in ("paper", "nucleus"):
        f = functools.partial(R.select, rule=rule, k_max=12)
        batched = jax.jit(jax.vmap(f))(logits_bte, taus)
        jitted = [jax.jit(f)(logits_bte[b], taus[b]) for b in range(3)]
        pairs = [(jax.tree.map(lambda x, b=b: x[b], batched), jitted[b]) for b in range(3)]
        if rule == "paper":  # op-by-op dispatch is slow on this CPU: check eager once
            pairs.append((f(logits_bte[1], taus[1]), jitted[1]))
        for got, ref in pairs:
            np.testing.assert_array_equal(got.mask_te, ref.mask_te)
            np.testing.assert_array_equal(got.k_t, ref.k_t)
            np.testing.assert_array_equal(got.order_te, ref.order_te)
            assert_close(got.probs_te, ref.probs_te, "op_fp32", "probs")
    # A tau sweep as a vmapped axis over the same logits.
    sweep = jax.jit(jax.vmap(R.select, in_axes=(None, 0)))(logits_bte[0], taus)
    for i, tau in enumerate(taus):
        np.testing.assert_array_equal(sweep.k_t[i], _select_jit(logits_bte[0], tau).k_t)


def test_tau_sweep_compiles_once():
    traces = []

    @jax.jit
    def fwd(logits, tau):
        traces.append(1)  # Python side effect: runs once per trace
        return R.select(logits, tau).k_t

    logits = np.random.default_rng(2).normal(size=(8, 16)).astype(np.float32)
    ks = [np.asarray(fwd(logits, jnp.float32(tau))) for tau in (0.2, 0.5, 0.8, 0.95, 1.05)]
    assert len(traces) == 1
    assert all((a <= b).all() for a, b in zip(ks, ks[1:], strict=False))
    assert (ks[-1] == 16).all()


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), [0.5, float("nan")]])
def test_check_tau_rejects(bad):
    with pytest.raises(ValueError, match="tau"):
        R.check_tau(bad)


def test_check_tau_per_layer():
    np.testing.assert_array_equal(R.check_tau(0.5, n_layers=3), np.full(3, 0.5, np.float32))
    assert R.check_tau([0.5, 0.7], n_layers=2).dtype == np.float32
    assert R.check_tau(1.05).shape == ()
    with pytest.raises(ValueError, match="length 2 but the model has 3 layers"):
        R.check_tau([0.5, 0.7], n_layers=3)
    with pytest.raises(ValueError, match="scalar or a per-layer vector"):
        R.check_tau(np.ones((2, 2)))


def test_select_argument_errors():
    logits = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="rule"):
        R.select(logits, 0.5, rule="topk")
    with pytest.raises(ValueError, match="k_min"):
        R.select(logits, 0.5, k_min=0)
    with pytest.raises(ValueError, match="k_max"):
        R.select(logits, 0.5, k_min=3, k_max=2)
    with pytest.raises(ValueError, match="scalar per call"):
        R.select(logits, np.full(4, 0.5, np.float32))
    with pytest.raises(TypeError, match="outside|before jit"):
        jax.jit(R.check_tau)(0.5)


def test_init_and_logits_dtype():
    w = R.init_router(8, 5, jnp.bfloat16)
    assert w.shape == (8, 5) and w.dtype == jnp.bfloat16 and not np.asarray(w, np.float32).any()
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 8)).astype(np.float32)
    w = rng.normal(size=(8, 5)).astype(np.float32)
    out = R.router_logits(jnp.asarray(w, jnp.bfloat16), jnp.asarray(x, jnp.bfloat16))
    assert out.dtype == jnp.float32
    assert_close(out, x @ w, "bf16", "bf16 router logits")
    assert_close(R.router_logits(w, x), x.astype(np.float64) @ w, "op_fp32", "fp32 logits")


def test_bf16x3_logits_are_fp32_accurate():
    """The tensor-core router split (prefill path) is as close to the float64 product as the
    fp32 GEMM, over a wide range of router magnitudes; bf16 routers alone would be ~1e3x
    worse (so the test would catch a lost split term); non-bf16 inputs take the fp32 GEMM."""
    kx, kw = jax.random.split(jax.random.key(5))
    x = jax.random.normal(kx, (3, 40, 384)).astype(jnp.bfloat16)  # leading dims pass through
    w = jax.random.normal(kw, (384, 72)) * jnp.logspace(-3, 1, 72)  # per-expert scales
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    got = R.router_logits_bf16x3(w, x)
    assert got.dtype == jnp.float32 and got.shape == (3, 40, 72)
    assert_close(got, ref, "op_fp32", "bf16x3 logits")
    err_fp32 = np.abs(np.asarray(R.router_logits_fp32(w, x), np.float64) - ref).max()
    assert np.abs(np.asarray(got, np.float64) - ref).max() <= 4 * err_fp32 + 1e-9
    w_bf16 = np.asarray(w.astype(jnp.bfloat16), np.float64)
    assert np.abs(np.asarray(x, np.float64) @ w_bf16 - ref).max() > 100 * err_fp32
    x32 = x.astype(jnp.float32) + 1e-3  # not exact in bf16: the fp32 GEMM itself
    np.testing.assert_array_equal(R.router_logits_bf16x3(w, x32), R.router_logits_fp32(w, x32))


def test_router_logits_takes_the_split_only_for_bf16_prefill_on_cuda():
    """The shared logits function lowers to one bf16 tensor-core GEMM for bf16 activations of
    >= BF16X3_MIN_TOKENS tokens on CUDA, and to the fp32 GEMM otherwise (decode sizes, fp32
    activations, other platforms), so every path that calls it gets the same logits."""
    w = jax.random.normal(jax.random.key(0), (64, 24))
    n = R.BF16X3_MIN_TOKENS
    x = jax.random.normal(jax.random.key(1), (2, n // 2, 64)).astype(jnp.bfloat16)
    split = "(tensor<2x32x64xbf16>, tensor<64x72xbf16>) -> tensor<2x32x72xf32>"
    assert exported_dots(R.router_logits, w, x, platform="cuda") == [split]
    (cpu,) = exported_dots(R.router_logits, w, x, platform="cpu")
    assert "xf32>, tensor<64x24xf32>" in cpu
    (short,) = exported_dots(R.router_logits, w, x[:, : n // 2 - 1], platform="cuda")
    assert "bf16" not in short
    (f32,) = exported_dots(R.router_logits, w, x.astype(jnp.float32), platform="cuda")
    assert "bf16" not in f32


def test_bf16x3_backward_matches_the_fp32_gemms():
    """The split's gradients: ``dW`` as close to the float64 product as the fp32 GEMM's (a lost
    split term of the cotangent would be ~1e3x worse); ``dx``, rounded to x's bf16, equal to
    the fp32 GEMM's but for rounding-boundary ties (at most one bf16 ulp); fp32 activations
    keep the fp32 GEMM's gradients bit for bit; gradients flow through the platform dispatch
    under jit."""
    kx, kw, kg = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(kx, (2, 80, 48)).astype(jnp.bfloat16)  # leading dims pass through
    w = jax.random.normal(kw, (48, 12)) * jnp.logspace(-3, 1, 12)
    g = jax.random.normal(kg, (2, 80, 12)) * jnp.logspace(-2, 2, 80)[:, None]
    gw, gx = jax.vjp(R.router_logits_bf16x3, w, x)[1](g)
    fw, fx = jax.vjp(R.router_logits_fp32, w, x)[1](g)
    assert (gw.dtype, gx.dtype, gx.shape) == (fw.dtype, fx.dtype, x.shape)
    x64, g64 = np.asarray(x, np.float64).reshape(-1, 48), np.asarray(g, np.float64).reshape(-1, 12)
    dw_ref = x64.T @ g64
    assert_close(gw, dw_ref, "op_fp32", "dw")
    err_fp32 = np.abs(np.asarray(fw, np.float64) - dw_ref).max()
    assert np.abs(np.asarray(gw, np.float64) - dw_ref).max() <= 4 * err_fp32 + 1e-9
    g_bf16 = np.asarray(g.astype(jnp.bfloat16), np.float64).reshape(-1, 12)
    assert np.abs(x64.T @ g_bf16 - dw_ref).max() > 100 * err_fp32
    a, b = np.asarray(gx, np.float32), np.asarray(fx, np.float32)
    ulp = np.spacing(np.abs(b)) * 2**16  # b is bf16-valued: one bf16 ulp
    assert np.all(np.abs(a - b) <= ulp), "dx beyond one bf16 ulp of the fp32 GEMM's"
    assert np.mean(a != b) < 0.01, "dx differs from the fp32 GEMM's in more than 1% of entries"
    x32 = x.astype(jnp.float32) + 1e-3  # not exact in bf16: the fp32 GEMM's gradients
    for got, want in zip(jax.vjp(R.router_logits_bf16x3, w, x32)[1](g),
                         jax.vjp(R.router_logits_fp32, w, x32)[1](g), strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    dw = jax.jit(jax.grad(lambda w, x: jnp.sum(R.router_logits(w, x) * g)))(w, x)
    assert_close(dw, dw_ref, "op_fp32", "dw under jit")


def test_bf16x3_backward_switch_gives_the_fp32_gemms(monkeypatch):
    """``BF16X3_BACKWARD = False`` (the benchmarks' baseline) restores the fp32 GEMMs'
    gradients bit for bit; the default split differs from them (so the switch is live)."""
    kx, kw, kg = jax.random.split(jax.random.key(4), 3)
    x = jax.random.normal(kx, (96, 40)).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (40, 16))
    g = jax.random.normal(kg, (96, 16))
    want = jax.vjp(R.router_logits_fp32, w, x)[1](g)
    split = jax.vjp(R.router_logits_bf16x3, w, x)[1](g)
    assert not np.array_equal(np.asarray(split[0]), np.asarray(want[0]))
    monkeypatch.setattr(R, "BF16X3_BACKWARD", False)
    for got, ref in zip(jax.vjp(R.router_logits_bf16x3, w, x)[1](g), want, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def _fp32_sequential_dot_nt(a, b) -> np.ndarray:
    """``a bᵀ`` accumulated term by term in float32 (each product and each sum rounded, numpy's
    IEEE elementwise ops): an fp32 GEMM's error without any BLAS's blocking, so the same on every
    machine (XLA's CPU dot of one machine came out 5x more accurate than another's)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    acc = np.zeros((a.shape[0], b.shape[0]), np.float32)
    for k in range(a.shape[1]):
        acc = acc + a[:, k, None] * b[None, :, k]
    return acc.astype(np.float64)


def test_bf16x3_dx_product_is_fp32_accurate():
    """``dx = g Wᵀ`` from the six split products, before its rounding to bf16: as close to the
    float64 product as an fp32 accumulation of those 6k exact bf16 x bf16 products (so the
    split itself loses nothing), and 30x closer than the three first-order products alone (a
    dropped second-order product, e.g. g2w2, would show)."""
    kg, kw = jax.random.split(jax.random.key(3))
    g = jax.random.normal(kg, (64, 40)) * jnp.logspace(-2, 2, 64)[:, None]
    w = jax.random.normal(kw, (96, 40)) * jnp.logspace(-3, 1, 40)
    got = np.asarray(R._split_product_nt(g, w), np.float64)
    ref = np.asarray(g, np.float64) @ np.asarray(w, np.float64).T
    assert_close(got, ref, "op_fp32", "split dx")
    (g1, g2, g3), (w1, w2, w3) = R._split3(g), R._split3(w)
    terms = _fp32_sequential_dot_nt(jnp.concatenate([g1, g1, g2, g1, g2, g3], -1),
                                    jnp.concatenate([w1, w2, w1, w3, w2, w1], -1))  # fmt: skip
    assert np.abs(got - ref).max() <= 4 * np.abs(terms - ref).max() + 1e-9
    err_fp32 = np.abs(_fp32_sequential_dot_nt(g, w) - ref).max()  # a k-term fp32 GEMM's
    three = sum(
        np.asarray(R._mm_f32(p, q.T), np.float64) for p, q in ((g1, w1), (g1, w2), (g2, w1))
    )
    assert np.abs(three - ref).max() > 30 * err_fp32


def test_bf16x3_backward_lowers_to_bf16_gemms_on_cuda():
    """Under ``jax.grad`` on CUDA every dot of the split (forward and both gradients) is a bf16
    tensor-core GEMM: no fp32 GEMM is left to run without tensor cores."""
    w = jax.random.normal(jax.random.key(0), (64, 24))
    x = jax.random.normal(jax.random.key(1), (2, R.BF16X3_MIN_TOKENS, 64)).astype(jnp.bfloat16)

    def loss(w, x):
        return jnp.sum(jnp.sin(R.router_logits(w, x)))

    dots = exported_dots(jax.grad(loss, argnums=(0, 1)), w, x, platform="cuda")
    assert len(dots) == 3
    assert all(d.count("bf16") == 2 and d.endswith("xf32>") for d in dots), dots


def test_gates_and_top_k():
    logits = np.random.default_rng(4).normal(size=(5, 8)).astype(np.float32)
    sel = _select_jit(logits, np.float32(0.7), k_max=4)
    mask = np.asarray(sel.mask_te)
    sig = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    assert_close(R.gates(logits, sel.mask_te), np.where(mask, sig, 0.0), "op_fp32", "gates")
    assert (np.asarray(R.gates(logits, sel.mask_te))[~mask] == 0).all()
    np.testing.assert_array_equal(R.gates(logits, sel.mask_te, "none"), mask.astype(np.float32))
    with pytest.raises(ValueError, match="gate mode"):
        R.gates(logits, sel.mask_te, "softmax")
    idx, valid = R.top_k_indices(sel, 4)
    assert idx.shape == (5, 4) and valid.dtype == jnp.bool_
    for i in range(5):
        chosen = np.asarray(idx[i])[np.asarray(valid[i])]
        np.testing.assert_array_equal(np.sort(chosen), np.flatnonzero(mask[i]))
    with pytest.raises(ValueError, match="k_max"):
        R.top_k_indices(sel, 9)


def test_uniform_losses():
    e = 16
    logits = np.zeros((7, e), np.float32)
    stats = _stats_jit(logits, np.float32(0.5), np.ones(7, np.float32))
    assert_close(R.balance_loss([stats, stats]), 1.0, "op_fp32", "balance at uniform")
    assert_close(R.entropy_loss([stats]), math.log(e), "op_fp32", "entropy at uniform")
    assert_close(R.gate_loss(stats), 0.25, "op_fp32", "sigma(0)^2")
    assert_close(stats.p_mean_e, np.full(e, 1 / e), "op_fp32", "p_mean")


def test_stats_mask_padding_and_stacking():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(6, 8)).astype(np.float32)
    mask = np.array([1, 1, 1, 1, 0, 0], np.float32)
    poisoned = logits.copy()
    poisoned[4:] = 1e3 * rng.normal(size=(2, 8))  # padding must not influence the stats
    a = _stats_jit(logits, np.float32(0.8), mask)
    b = _stats_jit(poisoned, np.float32(0.8), mask)
    for name in ("k_mean", "p_mean_e", "entropy_mean", "gate_sq_mean"):
        assert_close(getattr(a, name), getattr(b, name), "op_fp32", name)
    assert float(a.n_tokens) == 4.0
    p = np.asarray(_select_jit(logits, np.float32(0.8)).probs_te, np.float64)[:4]
    assert_close(a.entropy_mean, -(p * np.log(p)).sum(1).mean(), "op_fp32", "entropy")
    stacked = R.stack_stats([a, b])
    assert stacked.p_mean_e.shape == (2, 8)
    assert_close(R.balance_loss(stacked), R.balance_loss([a, b]), "op_fp32", "stacked")
    empty = _stats_jit(logits, np.float32(0.8), np.zeros(6, np.float32))
    assert np.isfinite(np.asarray(empty.entropy_mean)) and float(empty.k_mean) == 0.0


def test_loss_gradients_follow_the_documented_path():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(10, 12)).astype(np.float32)
    w = rng.normal(size=(12, 6)).astype(np.float32) * 0.3
    mask = np.ones(10, np.float32)

    def aux(w):
        logits = R.router_logits(w, x)
        stats = R.route_stats(R.select(logits, 0.6), logits, mask)
        return R.entropy_loss([stats]) + R.balance_loss([stats]) + R.gate_loss([stats])

    grad = jax.jit(jax.grad(aux))(w)
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).max() > 0

    # Task-loss path: only the selected experts' sigmoid gates carry gradient to the logits.
    logits = jax.jit(R.router_logits)(w, x)
    sel = _select_jit(logits, np.float32(0.6))
    g_logits = jax.jit(jax.grad(lambda z, m: jnp.sum(R.gates(z, m) * 2.0)))(logits, sel.mask_te)
    g_logits = np.asarray(g_logits)
    mask_te = np.asarray(sel.mask_te)
    assert (g_logits[~mask_te] == 0).all() and (g_logits[mask_te] != 0).all()
    # Entropy with -inf logits (p = 0) stays finite, value and gradient.
    z = jnp.array([[0.0, -jnp.inf, 1.0]], jnp.float32)
    ent = jax.jit(jax.grad(lambda z: R.route_stats(R.select(z, 0.9), z).entropy_mean))(z)
    assert np.isfinite(np.asarray(ent)).all()


def test_sparsity_formula():
    k = np.array([[1, 2, 4, 8], [8, 8, 1, 1]], np.int32)  # [L, t]
    mask = np.array([1, 1, 1, 0], np.float32)
    expected = 1.0 - np.mean(k[:, :3] / 8.0)
    assert_close(R.sparsity(k, 8, mask), expected, "op_fp32", "masked sparsity")
    assert_close(R.sparsity(k[0], 8), 1.0 - np.mean(k[0] / 8.0), "op_fp32", "sparsity")
