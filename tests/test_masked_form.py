"""The masked SwiGLU layer's gate and up products as one GEMM or two (`nn.SPLIT_GATE_UP`).

Two products give the backward ``dh`` as two ``[b, t, f]`` arrays, which XLA can write in the
pass that computes the gates' gradient; one product's ``dh [b, t, 2, f]`` takes a second pass.
Either form is the same function: these tests hold them equal, values and gradients.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from helpers import assert_close, exported_dots  # noqa: E402

from prunepath_jax import nn, routing  # noqa: E402
from prunepath_jax.config import PRESETS, PrunePathConfig  # noqa: E402
from prunepath_jax.nn import PrunePathFFN, RouteArgs  # noqa: E402

D, G, E = 48, 8, 7  # f = 56: no other dimension of the layer is 56


def _layer(bias: bool):
    cfg = PRESETS["llama-3.2-1b"].replace(d_model=D, d_ff=G * E, mlp_bias=bias,
                                          prunepath=PrunePathConfig(group_size=G))  # fmt: skip
    mlp = PrunePathFFN(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    mlp.router[...] = 0.3 * jax.random.normal(jax.random.key(1), mlp.router.shape)
    if bias:
        mlp.b_in[...] = 0.1 * jax.random.normal(jax.random.key(3), mlp.b_in.shape)
    mlp.compute = "masked"
    return mlp


def _loss(mlp):
    """Output and routing statistics in the loss, as the training objective has them."""
    graphdef, params, rest = nnx.split(mlp, nnx.Param, ...)
    dy = jax.random.normal(jax.random.key(9), (2, 12, D))

    def loss(params, x_btd):
        y, stats = nnx.merge(graphdef, params, rest)(x_btd, RouteArgs(jnp.float32(0.6)))
        return jnp.sum(y * dy) + routing.entropy_loss(stats) + routing.balance_loss(stats)

    return loss, params


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_split_gate_up_equals_one_product(bias, monkeypatch):
    """Loss and every gradient (input, router, both weights, the biases) agree in float32."""
    x = jax.random.normal(jax.random.key(2), (2, 12, D))
    out = []
    for split in (False, True):
        monkeypatch.setattr(nn, "SPLIT_GATE_UP", split)
        loss, params = _loss(_layer(bias))
        with jax.default_matmul_precision("highest"):
            out.append(jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x))
    (l0, g0), (l1, g1) = out
    assert_close(l1, l0, "op_fp32", "loss")
    assert float(jnp.abs(g0[0]["w_in"][0]).max()) > 0 and float(jnp.abs(g0[1]).max()) > 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g0),
                            strict=True):  # fmt: skip
        assert_close(a, b, "model_fp32", jax.tree_util.keystr(path))


def test_split_gate_up_is_two_products(monkeypatch):
    """The switch changes the program: one product against ``w_in [2, f, d]``, or two against
    its ``[f, d]`` halves (so the benchmarks' A/B compares two different graphs)."""
    x = jax.random.normal(jax.random.key(2), (2, 12, D))
    f = G * E

    def forward_dots(split):
        monkeypatch.setattr(nn, "SPLIT_GATE_UP", split)
        mlp = _layer(False)
        graphdef, params, rest = nnx.split(mlp, nnx.Param, ...)
        fwd = lambda p, x: nnx.merge(graphdef, p, rest)(x, RouteArgs(jnp.float32(0.6)))[0]  # noqa: E731
        dots = exported_dots(fwd, params, x, platform="cpu")
        return [d for d in dots if d.endswith(f"x{f}xf32>")]  # the products giving h

    joint, split = forward_dots(False), forward_dots(True)
    assert len(joint) == 1 and f"2x{f}x{D}" in joint[0], joint
    assert len(split) == 2 and all(f"2x{f}x{D}" not in d for d in split), split
