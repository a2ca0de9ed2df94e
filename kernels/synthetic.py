"""Random-weight PrunePath models with an exact number of experts per token, for kernel
benchmarks and GPU tests (no real weights of these shapes exist on the GPU machine).

The target k goes through the *real* routing path: random router weights (so each token ranks
the experts differently, as a trained router does) and ``k_min = k_max = k`` with tau = 1.0, so
`routing.select` keeps exactly the top-k experts of every token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from prunepath_jax.config import ModelConfig, PrunePathConfig
from prunepath_jax.models.llama import LlamaModel
from prunepath_jax.nn import PrunePathFFN


def sparse_llama(
    cfg: ModelConfig, k: int | None, *, dtype=jnp.bfloat16, group_size: int = 32, seed: int = 0
) -> LlamaModel:
    """A Llama-family model of ``cfg``'s shape whose FFNs each select exactly ``k`` experts per
    token at tau = 1.0 (``k=None``: a free k, bounded by nothing). Routers are random
    ``N(0, 1/d)``."""
    pp = PrunePathConfig(group_size, "paper", "sigmoid", k or 1, k)
    model = LlamaModel(cfg.replace(prunepath=pp), dtype=dtype, rngs=nnx.Rngs(seed))
    key = jax.random.key(seed + 1)
    for _, m in nnx.iter_graph(model):
        if isinstance(m, PrunePathFFN):
            key, sub = jax.random.split(key)
            d, e = m.router.shape
            m.router[...] = jax.random.normal(sub, (d, e), jnp.float32) * d**-0.5
    return model
