"""Each PrunePath FFN's input over calibration text, from the dense-equivalent forward pass.

The first step of training-free router initialisation (`router_init`), separate because it is
the only part that runs the whole model: a merged *copy* of the model runs once inside one
``jit`` with every expert active and no gate scaling (τ = 1.05, gate ``"none"``, the masked path:
exactly the dense model), every FFN wrapped by a recording tap, so the caller's model (its gate
mode included) is never touched. What is recorded is the FFN's input proper (after the block's
norm), at the real tokens only.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prunepath_jax.convert import layer_list
from prunepath_jax.nn import PrunePathFFN, RouteArgs

_ALL_EXPERTS_TAU = 1.05


class _Tap:
    """Stands in for one layer's FFN inside the capture trace: records the input, then runs it.

    Not a `PrunePathFFN`, so a Llama block normalises before calling it (it hands the norm only
    to a real PrunePath FFN): the tap records the FFN's input proper, after the norm.
    """

    def __init__(self, mlp: PrunePathFFN, sink: list):
        self.mlp, self.sink = mlp, sink

    def __call__(self, x_btd, arg):
        self.sink.append(x_btd)
        return self.mlp(x_btd, arg)


@functools.partial(jax.jit, static_argnums=0)
def _capture_step(graphdef, state, tokens_bt, mask_bt):
    """FFN inputs `[L][b, t, d]` of the dense-equivalent forward pass of a merged model copy."""
    model = nnx.merge(graphdef, state)
    sink: list = []
    for layer in layer_list(model):
        mlp = layer.mlp
        # Dense-equivalent on the copy only: every expert, scale 1, no k clamp, masked path.
        mlp.gate_mode, mlp.k_min, mlp.k_max, mlp.compute = "none", 1, None, "masked"
        object.__setattr__(layer, "mlp", _Tap(mlp, sink))
    args = tuple(
        RouteArgs(jnp.float32(_ALL_EXPERTS_TAU), mask_bt) for _ in range(model.cfg.n_layers)
    )
    if model.cfg.family == "bert":
        model.encode(tokens_bt, mask_bt, ffn_args=args)
    else:  # causal LM: one logit row per sequence keeps the vocabulary projection cheap
        zeros_b = jnp.zeros((tokens_bt.shape[0],), jnp.int32)
        model(tokens_bt, ffn_args=args, logit_index_b=zeros_b)
    return [x.astype(jnp.float32) for x in sink]


def prunepath_ffns(model: nnx.Module) -> list[PrunePathFFN]:
    """Every layer's PrunePath FFN, in layer order (raises for a dense model)."""
    if model.cfg.prunepath is None:
        raise ValueError("init_routers needs a PrunePath model: convert it with to_prunepath")
    return [layer.mlp for layer in layer_list(model)]


def capture_ffn_inputs(
    model: nnx.Module,
    token_batches: Iterable[tuple[Any, Any]],
    *,
    max_tokens: int | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """Each layer's FFN input at the real tokens of `token_batches`, from the dense forward pass.

    Args:
        model: a PrunePath model (not modified).
        token_batches: `(tokens_bt, mask_bt)` pairs; mask 1 marks real tokens (None: all real).
            Batches of one shape share one compile.
        max_tokens: keep at most this many tokens (a seeded random subset, the same tokens for
            every layer), so memory stays `L · max_tokens · d` floats.
        seed: subsampling seed.

    Returns:
        One float32 `[n, d]` array per layer.
    """
    prunepath_ffns(model)
    graphdef, state = nnx.split(model)
    per_layer: list[list[np.ndarray]] = []
    for tokens_bt, mask_bt in token_batches:
        tokens_bt = jnp.asarray(tokens_bt, jnp.int32)
        mask_bt = jnp.ones(tokens_bt.shape, jnp.float32) if mask_bt is None else mask_bt
        keep = np.asarray(mask_bt).astype(bool).reshape(-1)
        xs = _capture_step(graphdef, state, tokens_bt, jnp.asarray(mask_bt, jnp.float32))
        if not per_layer:
            per_layer = [[] for _ in xs]
        for acc, x_btd in zip(per_layer, xs, strict=True):
            acc.append(np.asarray(x_btd).reshape(-1, x_btd.shape[-1])[keep])
    if not per_layer:
        raise ValueError("token_batches is empty")
    out = [np.concatenate(acc) for acc in per_layer]
    n = out[0].shape[0]
    if n == 0:
        raise ValueError("the calibration batches contain no real token (mask all zero)")
    if max_tokens is not None and n > max_tokens:
        idx = np.sort(np.random.default_rng(seed).choice(n, max_tokens, replace=False))
        out = [x[idx] for x in out]
    return out
