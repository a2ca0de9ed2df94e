"""Pieces every model family shares: the output pytree and per-layer FFN argument plumbing."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class ModelOutput(NamedTuple):
    """What a forward pass returns.

    Attributes:
        logits: `[b, t, vocab]` (or `[b, 1, vocab]` with `logit_index_b`, or `[b, labels]` for
            classifiers), float32.
        cache: updated per-layer KV caches, or None.
        ffn_stats: one entry per layer: None for dense FFNs, routing statistics for PrunePath FFNs.
            Returned, never stored in the module, so a jitted forward stays pure.
    """

    logits: jax.Array
    cache: Any
    ffn_stats: tuple


def ffn_arg_for_layer(ffn_args: Any, i: int) -> Any:
    """Layer `i`'s FFN argument: `ffn_args` is None, or a sequence with one entry per layer."""
    if ffn_args is None:
        return None
    return ffn_args[i]


def select_positions(x_btd: jax.Array, index_b: jax.Array | None) -> jax.Array:
    """`x[b, index_b[b]]` as `[b, 1, d]` (e.g. each prompt's last real token), or `x` unchanged."""
    if index_b is None:
        return x_btd
    return jnp.take_along_axis(x_btd, index_b[:, None, None].astype(jnp.int32), axis=1)
