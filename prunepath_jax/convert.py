"""Dense model -> PrunePath model: balanced k-means experts per FFN, neurons permuted into
contiguous expert blocks, a zero-initialised router per layer (DESIGN.md section 2).

Everything outside the FFNs is copied unchanged, so with every expert active and gate "none" the
converted model computes the dense model's function (up to summation order).
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from prunepath_jax import experts
from prunepath_jax.config import ModelConfig, PrunePathConfig
from prunepath_jax.loading import abstract_model, tree_items, tree_set
from prunepath_jax.nn import ffn_weights


def layer_list(model: nnx.Module):
    """The list of transformer blocks, whatever the family calls it."""
    return model.h if model.cfg.family == "gpt2" else model.layers


def cluster_layer(w_in_cfd: np.ndarray, g: int, seed: int) -> np.ndarray:
    """Permutation for one FFN: balanced k-means on the first projection's neuron rows (gate_proj
    for SwiGLU, c_fc / intermediate.dense for GELU MLPs), L2-normalised inside."""
    rows_fd = jnp.asarray(w_in_cfd[0], jnp.float32)
    labels = experts.balanced_kmeans(rows_fd, g, seed=seed)
    return experts.permutation_from_labels(np.asarray(labels), g)


def to_prunepath(
    model: nnx.Module,
    pp: PrunePathConfig | None = None,
    *,
    seed: int = 0,
    progress: bool = True,
) -> tuple[nnx.Module, dict]:
    """Converts a dense model into a PrunePath model.

    Args:
        model: a dense model of any family (`LlamaModel`, `GPT2Model`, `BertModel`).
        pp: expert size, selection rule, gate mode and k clamps.
        seed: k-means seed (same seed, same experts).
        progress: show a progress bar over layers.

    Returns:
        `(model, info)`: the PrunePath model (same dtype, router zero) and per-layer conversion
        info (within-expert cosine similarity, seconds).
    """
    cfg: ModelConfig = model.cfg
    pp = pp or PrunePathConfig()
    if cfg.prunepath is not None:
        raise ValueError("model is already a PrunePath model")
    new_cfg = cfg.replace(prunepath=pp)  # validates that G divides d_ff
    old_pure = nnx.to_pure_dict(nnx.state(model))
    dtype = np.asarray(next(v for _, v in tree_items(old_pure))).dtype
    graphdef, state = nnx.split(abstract_model(new_cfg, jnp.dtype(dtype)))
    pure = nnx.to_pure_dict(state)
    info = {"cosine": [], "seconds": []}
    layers = layer_list(model)
    name = "h" if cfg.family == "gpt2" else "layers"
    for i in tqdm(range(cfg.n_layers), desc="clustering experts", disable=not progress):
        t0 = time.perf_counter()
        w = ffn_weights(cfg, layers[i].mlp)
        perm = cluster_layer(w["w_in"], pp.group_size, seed + i)
        mlp = pure[name][i]["mlp"]
        mlp["w_in"] = jnp.asarray(w["w_in"][:, perm])
        mlp["w_out"] = jnp.asarray(w["w_out"][perm])
        if w["b_in"] is not None:
            mlp["b_in"] = jnp.asarray(w["b_in"][:, perm])
            mlp["b_out"] = jnp.asarray(w["b_out"])
        mlp["router"] = jnp.zeros(mlp["router"].shape, jnp.float32)
        mlp["perm"] = jnp.asarray(perm)
        info["seconds"].append(time.perf_counter() - t0)
        labels = np.repeat(np.arange(len(perm) // pp.group_size), pp.group_size)
        rows = w["w_in"][0, perm]
        info["cosine"].append(experts.within_cluster_cosine(rows, labels))
    for path, leaf in tree_items(pure):
        if len(path) > 2 and path[2] == "mlp":
            continue
        value = old_pure
        for key in path:
            value = value[key]
        if tuple(value.shape) != tuple(leaf.shape):
            raise ValueError(f"{path}: {value.shape} vs {leaf.shape}")
        tree_set(pure, path, value)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state), info
