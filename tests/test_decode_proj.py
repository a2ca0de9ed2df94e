"""The attention-projection kernel (`kernels/pallas_proj.py`) and its wiring (`models/decode_proj`).

On CPU the kernel runs through the Pallas interpreter against the XLA path (norm, bias, residual;
batch 1 and > 1; odd sizes; bf16 and fp32), its Triton lowering is checked through
``jax.export(platforms=["cuda"])``, and a decode step with ``proj_impl="pallas_interpret"`` gives
the XLA path's logits. The ``gpu`` tests run the compiled kernel at the 1B / 8B widths and
compare greedy generation with XLA's.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close, cuda_triton_calls, fresh_traces, prefill_cache

from prunepath_jax.config import PRESETS
from prunepath_jax.generate import generate
from prunepath_jax.kernels import pallas_proj
from prunepath_jax.kernels.pallas_proj import plan, projection
from prunepath_jax.models import decode_attention as da
from prunepath_jax.models import decode_proj as dp
from prunepath_jax.models.layers import init_cache, rms_norm
from prunepath_jax.models.llama import LlamaModel

ON_GPU = jax.default_backend() == "gpu"

# name, rows, d, n, dtype, norm, bias, residual
CASES = [
    ("b1_bf16_norm", 1, 256, 384, jnp.bfloat16, True, False, False),
    ("b1_bf16_resid", 1, 256, 256, jnp.bfloat16, False, False, True),
    ("b4_fp32_all", 4, 576, 192, jnp.float32, True, True, True),
    ("b2_odd_bf16_bias", 2, 96, 40, jnp.bfloat16, True, True, False),
    ("b16_fp32_plain", 16, 128, 64, jnp.float32, False, False, False),
    ("b1_bf16_one_col_block", 1, 64, 24, jnp.bfloat16, False, True, True),
]
# (label, w_layout, tuning): both layouts at their defaults; several tiles per step with and
# without the register prefetch.
FORMS = [
    ("dn", "dn", {}),
    ("nd", "nd", {}),
    ("dn_l2_pf0", "dn", {"loads": 2, "prefetch": 0, "block_n": 16}),
    ("nd_l2_pf1", "nd", {"loads": 2, "prefetch": 1, "block_n": 4, "block_d": 64}),
]


def _operands(case):
    _, t, d, n, dtype, norm, bias, resid = case
    k = jax.random.split(jax.random.key(t * 1000 + d + n), 5)
    x = jax.random.normal(k[0], (t, d)).astype(dtype)
    w = (jax.random.normal(k[1], (d, n)) * d**-0.5).astype(dtype)
    nw = (1 + 0.2 * jax.random.normal(k[2], (d,))).astype(dtype) if norm else None
    b = jax.random.normal(k[3], (n,)).astype(dtype) if bias else None
    r = jax.random.normal(k[4], (t, n)).astype(dtype) if resid else None
    return x, w, nw, b, r


def _xla(x, w, nw, b, r, eps=1e-5):
    """The model's XLA path: rms_norm, Dense (product rounded, + bias), residual add."""
    h = rms_norm(x, nw, eps) if nw is not None else x
    y = h @ w
    y = y + b if b is not None else y
    return r + y if r is not None else y


def _tol(dtype):
    return "bf16" if dtype == jnp.bfloat16 else "op_fp32"


@pytest.mark.parametrize("form", FORMS, ids=[f[0] for f in FORMS])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_interpret_matches_the_xla_path(case, form):
    _, layout, tuning = form
    x, w, nw, b, r = _operands(case)
    w_in = w.T if layout == "nd" else w
    got = jax.jit(
        lambda x, w, nw, b, r: projection(
            x,
            w,
            norm=None if nw is None else (nw, 1e-5),
            bias_n=b,
            resid_tn=r,
            tuning=tuning,
            w_layout=layout,
            interpret=True,
        )
    )(x, w_in, nw, b, r)
    assert got.dtype == x.dtype
    assert_close(got, _xla(x, w, nw, b, r), _tol(x.dtype), f"{case[0]} {form[0]}")


def test_plan_blocks_divide_and_bound_the_accumulator():
    for (t, d, n), lay in itertools.product(
        [(1, 4096, 6144), (16, 2048, 2048), (8, 576, 960), (2, 96, 40), (1, 5, 3)], ("nd", "dn")
    ):
        p = plan(t, d, n, layout=lay)
        assert n % p["bn"] == 0 and d % p["bd"] == 0 and p["steps"] * p["bd"] == d
        assert t * p["bd"] * p["bn"] <= 4096
    assert plan(1, 4096, 6144, {"block_n": 16})["bn"] == 16
    with pytest.raises(ValueError, match="unknown projection tuning"):
        plan(1, 64, 64, {"block_m": 4})
    with pytest.raises(ValueError, match=">= 1"):
        plan(1, 64, 64, {"num_warps": 0})
    with pytest.raises(ValueError, match=">= 0"):
        plan(1, 64, 64, {"prefetch": -1})
    with pytest.raises(ValueError, match="unknown projection tuning"):
        plan(1, 64, 64, {"dot": 1})  # the measured-and-removed tensor-core form


def test_bad_operands_raise_before_launch():
    x = jnp.ones((1, 64), jnp.bfloat16)
    w = jnp.ones((64, 32), jnp.bfloat16)
    with pytest.raises(ValueError, match="power-of-two row count"):
        projection(jnp.ones((3, 64), jnp.bfloat16), w)
    with pytest.raises(ValueError, match="power-of-two row count"):
        projection(jnp.ones((32, 64), jnp.bfloat16), w)
    with pytest.raises(ValueError, match="do not make"):
        projection(x, jnp.ones((48, 32), jnp.bfloat16))
    with pytest.raises(ValueError, match="share one float dtype"):
        projection(x, w.astype(jnp.float32))
    with pytest.raises(ValueError, match="norm weight"):
        projection(x, w, norm=(jnp.ones((32,), jnp.bfloat16), 1e-5))
    with pytest.raises(ValueError, match="bias"):
        projection(x, w, bias_n=jnp.ones((64,), jnp.bfloat16))
    with pytest.raises(ValueError, match="residual"):
        projection(x, w, resid_tn=jnp.ones((2, 32), jnp.bfloat16))
    with pytest.raises(ValueError, match="w_layout"):
        projection(x, w, w_layout="td")
    with pytest.raises(ValueError, match="do not make"):
        projection(x, w, w_layout="nd")  # [64, 32] read as [n, d]: d = 32 != 64


@pytest.mark.parametrize(
    "t,d,n,fused,layout,tuning",
    [
        (1, 4096, 6144, "norm", "dn", {}),
        (1, 4096, 4096, "resid", "nd", {}),
        (1, 4096, 6144, "norm", "nd", {"prefetch": 1}),
        (8, 576, 960, "bias", "nd", {}),
        (8, 576, 960, "bias", "dn", {"loads": 2, "prefetch": 0}),
    ],
)
def test_kernel_lowers_for_cuda(t, d, n, fused, layout, tuning):
    """Triton-only errors (non-power-of-2 blocks, ops Triton cannot lower) fail here, no GPU."""
    bf = jnp.bfloat16
    S = jax.ShapeDtypeStruct
    extra = {"norm": S((d,), bf), "resid": S((t, n), bf), "bias": S((n,), bf)}[fused]

    def f(x, w, e):
        kw = {"norm": {"norm": (e, 1e-5)}, "resid": {"resid_tn": e}, "bias": {"bias_n": e}}
        return projection(x, w, **kw[fused], w_layout=layout, tuning=tuning)

    w = S((n, d) if layout == "nd" else (d, n), bf)
    assert cuda_triton_calls(jax.jit(f), S((t, d), bf), w, extra) == 1


def _model(dtype, *, bias=False, layers=2, seed=0):
    cfg = PRESETS["smollm2-135m"].replace(
        vocab_size=97, d_model=64, d_ff=96, n_layers=layers, n_heads=4, n_kv_heads=2,
        head_dim=32, tie_embeddings=False, qkv_bias=bias,
    )  # fmt: skip
    model = LlamaModel(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
    if bias:  # Qwen2-style QKV bias, non-zero so a dropped bias would show
        for m in da.attention_modules(model):
            m.qkv_proj.bias[...] = jax.random.normal(
                jax.random.key(7), m.qkv_proj.bias.shape, dtype
            )
    return model


@pytest.fixture
def proj_calls(monkeypatch):
    """Counts (traces of) the projection kernel's calls, then runs it."""
    fresh_traces()  # a cached trace from an earlier test would hide the calls
    calls = []
    real = pallas_proj.projection

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(pallas_proj, "projection", spy)
    return calls


@pytest.mark.parametrize(
    "dtype,bias,attn,layout",
    [
        (jnp.float32, False, "xla", "dn"),
        (jnp.bfloat16, True, "pallas_interpret", "nd"),
        (jnp.float32, True, "xla", "nd"),
    ],
    ids=["fp32_xla_attention_dn", "bf16_bias_kernel_attention_nd", "fp32_bias_nd"],
)
def test_decode_step_matches_xla(dtype, bias, attn, layout, proj_calls):
    """One decode step of a ragged batch of 2 over a prefilled cache: the same logits and cache
    as the XLA projections; both projections of both layers ran in the kernel (norm in the QKV
    call, residual in the O call)."""
    model = _model(dtype, bias=bias)
    cfg = model.cfg
    rng = np.random.default_rng(0)
    toks = jnp.asarray(rng.integers(1, cfg.vocab_size, (2, 9)), jnp.int32)
    cache = prefill_cache(model, toks, 64)
    step_toks, step_pos = jnp.array([[5], [11]], jnp.int32), jnp.array([[9], [4]], jnp.int32)
    da.set_attention(model, attn)
    ref = model(step_toks, step_pos, cache=cache)
    assert not proj_calls
    dp.set_projections(model, "pallas_interpret", layout=layout)
    got = model(step_toks, step_pos, cache=cache)
    assert len(proj_calls) == 2 * cfg.n_layers
    assert {c["w_layout"] for c in proj_calls} == {layout}
    assert sum(c["norm"] is not None for c in proj_calls) == cfg.n_layers
    assert sum(c["resid_tn"] is not None for c in proj_calls) == cfg.n_layers
    tol = _tol(dtype)
    assert_close(got.logits, ref.logits, tol, "decode logits")
    for lg, lr in zip(got.cache, ref.cache, strict=True):
        assert_close(lg.k, lr.k, tol, "cache k")
        assert_close(lg.v, lr.v, tol, "cache v")


def test_prefill_odd_batches_and_cpu_pallas_stay_on_xla(proj_calls):
    """Prefill (t > 1), a batch of 3 (not a power of two) and ``"pallas"`` without a GPU run
    the XLA path, by the explicit check, not by computing something else."""
    model = _model(jnp.float32)
    dp.set_projections(model, "pallas_interpret")
    toks = jnp.ones((3, 4), jnp.int32)
    model(toks)  # prefill
    model(
        toks[:, :1], jnp.zeros((3, 1), jnp.int32), cache=init_cache(model.cfg, 3, 16, jnp.float32)
    )
    assert not proj_calls
    if not ON_GPU:
        dp.set_projections(model, "pallas")
        model(toks[:1, :1], jnp.zeros((1, 1), jnp.int32),
              cache=init_cache(model.cfg, 1, 16, jnp.float32))  # fmt: skip
        assert not proj_calls
        x, w = jnp.ones((1, 64)), jnp.ones((64, 8))
        assert "CUDA GPU" in dp.unsupported_reason("pallas", x, w)
    assert dp.unsupported_reason("xla", jnp.ones((1, 4)), jnp.ones((4, 4))) == "proj_impl is 'xla'"
    with pytest.raises(ValueError, match="proj_impl must be"):
        dp.set_projections(model, "triton")
    with pytest.raises(ValueError, match="proj_impl must be"):
        dp.unsupported_reason("cuda", jnp.ones((1, 4)), jnp.ones((4, 4)))


GPU_FORMS = [("dn", {}), ("nd", {}), ("nd", {"prefetch": 1})]


@pytest.mark.gpu
@pytest.mark.parametrize("form", GPU_FORMS, ids=["dn", "nd", "nd_prefetch"])
@pytest.mark.parametrize("shape", ["llama-3.2-1b", "llama-3-8b"])
def test_gpu_kernel_at_real_widths(shape, form):
    """The compiled kernel at a real layer's QKV (norm) and O (residual) widths, batch 1 and 8,
    in both weight layouts."""
    layout, tuning = form
    cfg = PRESETS[shape]
    d, hd = cfg.d_model, cfg.head_dim
    n_qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * hd
    for t in (1, 8):
        for n, fused in ((n_qkv, "norm"), (d, "resid")):
            case = (f"{shape}_b{t}_{fused}", t, d, n, jnp.bfloat16, fused == "norm", False,
                    fused == "resid")  # fmt: skip
            x, w, nw, b, r = _operands(case)
            norm = None if nw is None else (nw, 1e-5)
            got = jax.jit(
                lambda x, w, r, norm=norm: projection(
                    x, w, norm=norm, resid_tn=r, tuning=tuning, w_layout=layout
                )
            )(x, w.T if layout == "nd" else w, r)
            assert_close(got, _xla(x, w, nw, b, r), "bf16", case[0])


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8])
def test_gpu_generate_with_projection_kernels_matches_xla(batch, proj_calls):
    """SmolLM2-shaped random bf16 weights, the attention kernel on: the same greedy tokens with
    and without the projection kernels, or decode-step logits within the bf16 tolerance."""
    model = LlamaModel(PRESETS["smollm2-135m"].replace(n_layers=4), dtype=jnp.bfloat16,
                       rngs=nnx.Rngs(batch))  # fmt: skip
    rng = np.random.default_rng(batch)
    prompts = [rng.integers(0, 49152, 5 + 11 * i).tolist() for i in range(batch)]
    ref = generate(model, prompts, 24, implementation="pallas")
    assert not proj_calls
    dp.set_projections(model, "pallas")
    out = generate(model, prompts, 24, implementation="pallas")
    assert proj_calls  # the compiled kernel ran
    if out != ref:
        lengths = [len(p) for p in prompts]
        t = max(lengths)
        toks = jnp.asarray([p + [0] * (t - len(p)) for p in prompts], jnp.int32)
        cache = prefill_cache(model, toks, 256)
        step = jnp.asarray(lengths, jnp.int32)[:, None]
        got = model(toks[:, :1], step, cache=cache).logits
        dp.set_projections(model, "xla")
        want = model(toks[:, :1], step, cache=cache).logits
        assert_close(got, want, "bf16", "decode-step logits")


def test_transposed_copies_are_made_dropped_and_not_checkpointed(tmp_path):
    """``set_projections(.., "pallas")`` stores ``[out, in]`` copies as `DecodeWeight`s, ``"xla"``
    drops them, and `save_model` of a model holding them writes (and restores) the plain model."""
    from prunepath_jax.checkpoint import restore_model, save_model

    model = _model(jnp.float32, bias=True)
    dp.set_projections(model, "pallas_interpret")
    att = da.attention_modules(model)[0]
    assert isinstance(att.qkv_nd, dp.DecodeWeight)
    np.testing.assert_array_equal(att.qkv_nd[...], att.qkv_proj.kernel[...].T)
    np.testing.assert_array_equal(att.o_nd[...], att.o_proj.kernel[...].T)
    save_model(tmp_path / "ck", model, model.cfg)
    restored = restore_model(tmp_path / "ck").model
    assert all(m.qkv_nd is None for m in da.attention_modules(restored))
    want = nnx.to_pure_dict(nnx.split(model, dp.DecodeWeight, ...)[2])
    got = nnx.to_pure_dict(nnx.state(restored))
    jax.tree.map(np.testing.assert_array_equal, got, want)
    dp.set_projections(model, "xla")
    assert all(m.qkv_nd is None and m.o_nd is None for m in da.attention_modules(model))
    with pytest.raises(ValueError, match="layout must be"):
        dp.set_projections(model, "pallas", layout="td")
    with pytest.raises(ValueError, match="set_projections applies to Llama-family"):
        dp.set_projections(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), "pallas")


def test_generate_xla_is_the_reference_and_keeps_the_models_setting(proj_calls):
    """``generate(implementation="xla")`` runs XLA's projections even on a model set to the
    kernel (the graphdef only: the model keeps ``proj_impl``); other values keep the model's
    choice, so the kernel runs (interpreted here) and gives the same greedy tokens."""
    model = _model(jnp.float32, layers=1)
    dp.set_projections(model, "pallas_interpret")
    prompts = [[3, 5, 7], [11, 2]]
    ref = generate(model, prompts, 4, implementation="xla")
    assert not proj_calls
    assert {m.proj_impl for m in da.attention_modules(model)} == {"pallas_interpret"}
    out = generate(model, prompts, 4, implementation=None)
    assert proj_calls and out == ref
