"""`flatjit.bind`: the compiled call on a model split once (graph hashed once, state flattened)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prunepath_jax import flatjit


class _Affine(nnx.Module):
    def __init__(self, d: int, rngs: nnx.Rngs):
        self.lin = nnx.Linear(d, d, rngs=rngs)
        self.scale = nnx.Param(jnp.full((d,), 2.0))


def _apply(graphdef, state, x, y, *, twice: bool):
    m = nnx.merge(graphdef, state)
    out = m.lin(x) * m.scale[...] + y
    return m.lin(out) if twice else out


def test_bind_computes_what_the_merged_model_does_and_reuses_one_jit():
    m = _Affine(8, nnx.Rngs(0))
    graphdef, state = nnx.split(m)
    x, y = jnp.arange(8.0)[None], jnp.ones((1, 8))
    fn, leaves = flatjit.bind(_apply, graphdef, state, twice=True)
    assert isinstance(leaves, list) and len(leaves) == len(jax.tree.leaves(state))
    np.testing.assert_allclose(fn(leaves, x, y), _apply(graphdef, state, x, y, twice=True),
                               rtol=1e-6)  # fmt: skip
    again, _ = flatjit.bind(_apply, *nnx.split(m), twice=True)  # a new split of the same model
    assert again is fn
    other, _ = flatjit.bind(_apply, graphdef, state, twice=False)
    assert other is not fn
    np.testing.assert_allclose(other(leaves, x, y), _apply(graphdef, state, x, y, twice=False),
                               rtol=1e-6)  # fmt: skip


def test_bind_donates_the_positions_it_is_given_and_rejects_unhashable_static():
    m = _Affine(4, nnx.Rngs(1))
    graphdef, state = nnx.split(m)
    fn, leaves = flatjit.bind(_apply, graphdef, state, donate_argnums=(2,), twice=False)
    text = fn.lower(leaves, jnp.ones((1, 4)), jnp.ones((1, 4))).as_text()
    assert text.count("tf.aliasing_output") + text.count("jax.buffer_donor") == 1  # y only
    with pytest.raises(TypeError):
        flatjit.bind(_apply, graphdef, state, twice=[True])  # a list cannot key the cache
