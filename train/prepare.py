"""The model a run starts from: load the source, add a task head, convert, initialise routers.

A source may already be a prunepath_jax checkpoint (converted or trained: used as is) or a dense
model (Hugging Face directory, GGUF, hub id, "default", "minilm"), which is converted here with the
run's settings; what was done is returned as metadata and recorded in every checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from prunepath_jax.config import ModelConfig, PrunePathConfig
from prunepath_jax.loading import Pretrained, load_any, tree_items, tree_set
from prunepath_jax.train.config import TrainConfig


def add_classification_head(
    model: nnx.Module, num_labels: int, seed: int, source_dir: str | None = None
) -> nnx.Module:
    """The same model with a freshly initialised `num_labels`-way sequence-classification head.

    Encoders get BERT's pooler + classifier (RoBERTa's dense + out_proj); decoders that have a
    classification variant (GPT-2) get its `score` head. Every existing parameter is kept, and a
    BERT pooler saved next to the encoder (sentence-transformer checkpoints keep it: pre-trained
    on next-sentence prediction) is loaded from `source_dir` instead of initialised.
    """
    cfg: ModelConfig = model.cfg
    if cfg.num_labels == num_labels:
        return model
    if cfg.num_labels:
        raise ValueError(
            f"the model already has a {cfg.num_labels}-way head; the task has {num_labels} labels"
        )
    if cfg.family == "llama":
        raise ValueError(
            "Llama-family models have no sequence-classification head here; use task='lm'/'sft' "
            "or an encoder (BERT/RoBERTa) or GPT-2 for task='cls'"
        )
    new_cfg = cfg.replace(num_labels=num_labels)
    old = nnx.to_pure_dict(nnx.state(model))
    dtype = next(v for _, v in tree_items(old)).dtype
    from prunepath_jax import models

    fresh = models.model_class(new_cfg)(new_cfg, dtype=dtype, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(fresh)
    pure = nnx.to_pure_dict(state)
    for path, value in tree_items(old):
        tree_set(pure, path, value)
    if new_cfg.model_type == "bert" and source_dir is not None:
        pooler = _saved_pooler(Path(source_dir))
        if pooler is not None:
            w_oi, b_o = pooler
            pure["pooler"]["kernel"] = jnp.asarray(w_oi.T, dtype)
            pure["pooler"]["bias"] = jnp.asarray(b_o, dtype)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _saved_pooler(directory: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(weight [out, in], bias) of a BERT checkpoint's pooler, or None."""
    if not (directory / "config.json").exists():
        return None
    from prunepath_jax.hf.safetensors_io import SafetensorsCheckpoint

    try:
        ck = SafetensorsCheckpoint(directory)
    except (FileNotFoundError, ValueError):
        return None
    for pre in ("", "bert."):
        w, b = f"{pre}pooler.dense.weight", f"{pre}pooler.dense.bias"
        if w in ck.names() and b in ck.names():
            return ck.read(w), ck.read(b)
    return None


def prunepath_config(cfg: TrainConfig) -> PrunePathConfig:
    if cfg.sparse == "static_topk":
        return PrunePathConfig(cfg.group_size, cfg.rule, cfg.gate, cfg.static_k, cfg.static_k)
    return PrunePathConfig(cfg.group_size, cfg.rule, cfg.gate)


def load_source(cfg: TrainConfig, dtype) -> Pretrained:
    source = cfg.source
    if source == "minilm":
        from prunepath_jax.default import minilm_dir

        source = str(minilm_dir())
    return load_any(source, dtype=dtype, progress=cfg.progress)


def prepare_model(
    cfg: TrainConfig,
    pre: Pretrained,
    *,
    num_labels: int = 0,
    calibration: Any = None,
) -> tuple[nnx.Module, dict]:
    """Head, conversion and router initialisation as the config asks.

    Args:
        cfg: the run.
        pre: the loaded source.
        num_labels: classification labels (task "cls").
        calibration: iterable of `(tokens_bt, mask_bt)` for the router initialisation.

    Returns:
        `(model, metadata)`; metadata records the source and what was done to it.
    """
    model = pre.model
    meta: dict = {"source": pre.source, "source_metadata": pre.metadata or {}}
    if cfg.task == "cls":
        model = add_classification_head(model, num_labels, cfg.seed, pre.source)
        meta["classification_head"] = num_labels
    if cfg.sparse == "dense":
        if model.cfg.prunepath is not None:
            raise ValueError("sparse='dense' needs a dense source; this one is a PrunePath model")
        return model, meta
    if model.cfg.prunepath is not None:
        meta["conversion"] = "already a PrunePath model"
        if cfg.sparse == "static_topk":
            raise ValueError("sparse='static_topk' needs a dense source (it sets k_min=k_max=k)")
        return model, meta
    from prunepath_jax.convert import to_prunepath

    t0 = time.perf_counter()
    pp = prunepath_config(cfg)
    model, info = to_prunepath(model, pp, seed=cfg.convert_seed, progress=cfg.progress)
    conv = {
        "group_size": pp.group_size,
        "n_experts": model.cfg.n_experts,
        "rule": pp.rule,
        "gate": pp.gate,
        "k_min": pp.k_min,
        "k_max": pp.k_max,
        "seed": cfg.convert_seed,
        "within_expert_cosine": [float(c) for c in info["cosine"]],
        "router_init_tokens": 0,
    }
    if cfg.router_init_tokens > 0:
        if calibration is None:
            raise ValueError("router_init_tokens > 0 needs calibration batches")
        from prunepath_jax.router_init import init_routers

        model, report = init_routers(
            model, calibration, max_tokens=cfg.router_init_tokens, seed=cfg.seed
        )
        conv["router_init_tokens"] = cfg.router_init_tokens
        conv["router_init_seconds"] = float(report["seconds"]["total"])
    conv["seconds"] = time.perf_counter() - t0
    meta["conversion"] = conv
    return model, meta
