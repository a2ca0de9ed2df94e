"""Training state: which parameters train, their optimiser, and the precision policy.

The model is split once with NNX filters into `(graphdef, trainable, frozen)`:
- full mode: every `nnx.Param` trains (backbone and routers, two optax groups);
- router mode: only router weights train. The backbone is *frozen* state: it gets neither
  gradients nor optimiser state, and is passed through the step unchanged (bit-identical).
Non-parameter state (the neuron permutation) is always frozen.

Everything here is a pure function of pytrees so the step can be jitted with explicit shardings.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from prunepath_jax.train.config import TrainConfig

ROUTER = "router"


class TrainState(NamedTuple):
    """What changes every step (a pytree; donated to the jitted step).

    Attributes:
        step: int32 scalar, optimiser steps done.
        params: trainable parameters (`nnx.State`), in the master dtype.
        opt_state: optax state of exactly `params`.
        rng: uint32 `[2]` raw key data (kept for stochastic extensions; saved with the run).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def trainable_filter(mode: str):
    """NNX filter of the parameters that train in `mode` ("full" or "router")."""
    if mode == "full":
        return nnx.Param
    if mode == "router":
        return nnx.All(nnx.Param, nnx.PathContains(ROUTER))
    raise ValueError(f"mode must be 'full' or 'router', got {mode!r}")


def split_model(model: nnx.Module, mode: str):
    """`(graphdef, trainable, frozen)`; raises when router mode finds no router."""
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(mode), ...)
    if not jax.tree.leaves(trainable):
        raise ValueError(
            f"mode={mode!r}: the model has no trainable parameters"
            + (" (no PrunePath routers: convert it first)" if mode == "router" else "")
        )
    return graphdef, trainable, frozen


def is_router_path(path) -> bool:
    return any(getattr(k, "key", getattr(k, "name", k)) == ROUTER for k in path)


def param_labels(params) -> Any:
    """ "router" or "backbone" per leaf (the two optimiser groups of the paper)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: ROUTER if is_router_path(p) else "backbone", params
    )


def lr_schedule(peak: float, warmup: int):
    if warmup <= 0:
        return optax.constant_schedule(peak)
    return optax.linear_schedule(0.0, peak, warmup)


def make_optimizer(cfg: TrainConfig, params) -> optax.GradientTransformation:
    """AdamW with the paper's two groups (backbone lr 1e-4 wd 0; router lr 1e-3 wd 1e-2 by
    default) behind one global-norm clip. Only the groups present in `params` get state."""

    def adamw(lr, wd):
        return optax.adamw(lr_schedule(lr, cfg.lr_warmup_steps), b1=cfg.b1, b2=cfg.b2,
                           weight_decay=wd)  # fmt: skip

    groups = {
        "backbone": adamw(cfg.lr_backbone, cfg.wd_backbone),
        ROUTER: adamw(cfg.lr_router, cfg.wd_router),
    }
    labels = param_labels(params)
    present = set(jax.tree.leaves(labels))
    groups = {k: v for k, v in groups.items() if k in present}
    opt = optax.multi_transform(groups, labels)
    if cfg.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return opt


def init_state(cfg: TrainConfig, params, optimizer: optax.GradientTransformation) -> TrainState:
    rng = jax.random.key_data(jax.random.key(cfg.seed))
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng)


def cast_floating(tree, dtype, keep_router_fp32: bool = True):
    """Casts floating leaves to the compute dtype (routers stay float32: the softmax and the
    cumulative-mass selection are precision-sensitive and the router is tiny)."""
    dtype = jnp.dtype(dtype)

    def cast(path, x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
            return x
        if keep_router_fp32 and is_router_path(path):
            return x
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, tree)


def compute_model(graphdef, params, frozen, compute_dtype) -> nnx.Module:
    """The model to run forward: trainable and frozen state merged, cast to the compute dtype
    (the cast is inside the differentiated function, so gradients reach the master weights)."""
    return nnx.merge(
        graphdef, cast_floating(params, compute_dtype), cast_floating(frozen, compute_dtype)
    )


def tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def tree_size(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))
