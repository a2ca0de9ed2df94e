"""The kernel path routes from the model layer's own router logits (t > 16 tokens).

`PrunePathFFN.__call__` computes the logits for its routing statistics; before the fifty-second
session the registry computed them a second time, so a training step through the kernels had
two logits products per layer and two backward pairs (the statistics' cotangent in one, the
gates' in the other). Now the layer hands its logits to `api.sparse_ffn(logits_te=...)`.
"""

import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from helpers import assert_close, zeros_triton_call  # noqa: E402
from kernel_cases import GROUPED_CASES, inputs, kwargs  # noqa: E402

from prunepath_jax import nn, routing  # noqa: E402
from prunepath_jax.config import PRESETS, PrunePathConfig  # noqa: E402
from prunepath_jax.kernels import api, jt  # noqa: E402
from prunepath_jax.nn import PrunePathFFN, RouteArgs  # noqa: E402

E, T = 13, 40  # an expert count no other dimension of the layer has (d 64, f 208, t 40)


def _fake_triton(monkeypatch):
    """The registry's Triton path on a CPU: ready, with every launch returning zeros (shapes
    and the XLA graph around the kernels are what these tests read)."""

    monkeypatch.setattr(jt, "triton_call", zeros_triton_call())
    monkeypatch.setattr(api, "_backend_ready", lambda impl: None)


def test_registry_routes_from_the_given_logits():
    """The XLA path with the router's own logits equals the path without them; with other
    logits it routes by those (so the argument is read, not ignored)."""
    c = GROUPED_CASES[0]
    x, r, wi, wo = inputs(c)
    kw = dict(**kwargs(c), implementation="xla")
    y0, k0 = api.sparse_ffn(x, r, wi, wo, c.tau, **kw)
    y1, k1 = api.sparse_ffn(x, r, wi, wo, c.tau, **kw, logits_te=routing.router_logits(r, x))
    np.testing.assert_array_equal(k1, k0)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y0))
    flat = jnp.zeros((c.t, c.e), jnp.float32)  # uniform: the same k for every token
    _, k2 = api.sparse_ffn(x, r, wi, wo, c.tau, **kw, logits_te=flat)
    assert not np.array_equal(np.asarray(k2), np.asarray(k0))
    want = routing.select(flat, c.tau, rule=c.rule, k_min=c.k_min, k_max=c.k_max).k_t
    np.testing.assert_array_equal(k2, want)
    assert len(set(np.asarray(k2).tolist())) == 1


def test_registry_refuses_logits_it_cannot_use():
    c = GROUPED_CASES[0]
    x, r, wi, wo = inputs(c)
    good = routing.router_logits(r, x)
    with pytest.raises(ValueError, match=r"float32 \[t, E\] = \[40, 8\]"):
        api.sparse_ffn(x, r, wi, wo, 0.6, **kwargs(c), logits_te=good[:, :7])
    with pytest.raises(ValueError, match="float32"):
        api.sparse_ffn(x, r, wi, wo, 0.6, **kwargs(c), logits_te=good.astype(jnp.bfloat16))
    few = slice(0, 4)  # a decode batch: the kernels route inside their launch
    for impl in ("pallas", "triton"):
        with pytest.raises(ValueError, match="decode kernel"):
            api.sparse_ffn(x[few], r, wi, wo, 0.6, **kwargs(c), implementation=impl,
                           logits_te=good[few])  # fmt: skip


def test_grouped_routes_from_the_given_logits(monkeypatch):
    """With ``logits_te`` the grouped GEMM computes no logits of its own (its k are the given
    logits' -- by the XLA selection here, since the fake launches would return the Triton
    selection's k as zeros); a logits mode other than the shared one contradicts the given
    logits and is refused."""
    from prunepath_jax.kernels import triton_grouped as tg

    _fake_triton(monkeypatch)
    c = GROUPED_CASES[1]
    x, r, wi, wo = inputs(c)
    logits = routing.router_logits(r, x)

    def boom(*a):
        raise AssertionError("the grouped GEMM recomputed the logits")

    monkeypatch.setitem(tg._LOGITS, "shared", boom)
    y, k = tg.sparse_ffn_grouped(x, r, wi, wo, c.tau, **kwargs(c), logits_te=logits,
                                 selection="xla")  # fmt: skip
    assert y.shape == x.shape
    _, _, _, k_ref = api.route_reference(x, r, c.tau, **{n: v for n, v in kwargs(c).items()
                                                         if n != "group_size"})  # fmt: skip
    np.testing.assert_array_equal(k, k_ref)
    with pytest.raises(AssertionError, match="recomputed"):
        tg.sparse_ffn_grouped(x, r, wi, wo, c.tau, **kwargs(c))
    with pytest.raises(ValueError, match="computes none"):
        tg.sparse_ffn_grouped(x, r, wi, wo, c.tau, **kwargs(c), logits_te=logits,
                              router_logits="fp32")  # fmt: skip
    with pytest.raises(ValueError, match=r"float32 \[t, E\]"):
        tg.sparse_ffn_grouped(x, r, wi, wo, c.tau, **kwargs(c), logits_te=logits.T)


def _layer(compute: str, implementation: str | None):
    cfg = PRESETS["llama-3.2-1b"].replace(d_model=64, d_ff=16 * E,
                                          prunepath=PrunePathConfig(group_size=16))  # fmt: skip
    mlp = PrunePathFFN(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    mlp.router[...] = 0.3 * jax.random.normal(jax.random.key(1), mlp.router.shape)
    mlp.compute, mlp.implementation = compute, implementation
    return mlp


def _training_loss(mlp):
    """Output and routing statistics both in the loss, as in the training objective; the
    layer gets the residual stream and the block's pre-FFN RMSNorm, as in the model."""
    graphdef, params, rest = nnx.split(mlp, nnx.Param, ...)
    dy = jax.random.normal(jax.random.key(9), (2, T // 2, 64))
    norm = (1.0 + 0.1 * jax.random.normal(jax.random.key(8), (64,)), 1e-6)

    def loss(params, x_btd):
        y, stats = nnx.merge(graphdef, params, rest)(x_btd, RouteArgs(jnp.float32(0.7)), norm)
        return jnp.sum(y * dy) + routing.entropy_loss(stats) + routing.balance_loss(stats)

    return loss, params


def _router_products(loss, params, x) -> list[str]:
    """The ``dot_general``s of the lowered gradient that touch the E dimension: the router's
    logits product and its backward pair (nothing else in the layer has a dimension of E)."""
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).as_text()
    dots = [ln for ln in text.splitlines() if "stablehlo.dot_general" in ln]
    return [d for d in dots if re.search(rf"tensor<(\d+x)*{E}x", d)]


@pytest.mark.parametrize("implementation", ["xla", "triton"])
def test_kernel_layer_has_one_router_product_and_one_backward_pair(implementation, monkeypatch):
    """A training step's layer on the registry: one logits product and one backward pair (three
    products touching E, as on the masked path), not two of each."""
    if implementation == "triton":
        _fake_triton(monkeypatch)
    x = jax.random.normal(jax.random.key(2), (2, T // 2, 64))
    masked_loss, params = _training_loss(_layer("masked", None))
    assert len(_router_products(masked_loss, params, x)) == 3
    loss, params = _training_loss(_layer("kernel", implementation))
    found = _router_products(loss, params, x)
    assert len(found) == 3, "\n".join(found)
    # the benchmarks' A/B switch: the registry's own logits again, two of each
    monkeypatch.setattr(nn, "SHARE_KERNEL_LOGITS", False)
    assert len(_router_products(loss, params, x)) == 6


def test_kernel_layer_normalises_once():
    """The registry gets the layer's normalised tokens (the decode kernels aside): the compiled
    training gradient has one RMSNorm, as the masked layer's, where XLA kept two (it does not
    merge the layer's norm over ``[b, t, d]`` with the registry's over ``[b t, d]``)."""
    x = jax.random.normal(jax.random.key(2), (2, T // 2, 64))

    def rsqrts(mlp):
        loss, params = _training_loss(mlp)
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
        return len(re.findall(r"= \S+ rsqrt\(", text))

    assert rsqrts(_layer("masked", None)) == 1
    assert rsqrts(_layer("kernel", "xla")) == 1


@pytest.mark.parametrize("implementation", ["xla", pytest.param("triton", marks=pytest.mark.gpu)])
def test_kernel_layer_gradients_equal_the_masked_layer(implementation):
    """The shared logits change where the router's gradient is summed, not its value: the
    layer's training gradients (output and statistics in the loss) through the registry equal
    the masked layer's, on a GPU through the grouped Triton GEMM and its backward kernel."""
    x = jax.random.normal(jax.random.key(2), (2, T // 2, 64))
    grads = []
    for compute, impl in (("masked", None), ("kernel", implementation)):
        loss, params = _training_loss(_layer(compute, impl))
        with jax.default_matmul_precision("highest"):
            grads.append(jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x))
    assert float(jnp.abs(grads[0][0]["router"]).max()) > 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads[1]),
                            jax.tree.leaves(grads[0]), strict=True):  # fmt: skip
        assert_close(a, b, "model_fp32", jax.tree_util.keystr(path))
