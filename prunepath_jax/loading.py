"""`load_pretrained`: a Hugging Face directory, a GGUF file, a hub id or "default" -> our model.

The model is first built abstractly (`nnx.eval_shape`, no random init of big weights), then every
parameter is read from the checkpoint straight into its final placement: on one device, or, given
a mesh, sharded as it is read (each device's slice is read from disk on its own), so a checkpoint
never needs to fit on one device or in host memory twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from prunepath_jax import models, sharding
from prunepath_jax.config import ModelConfig
from prunepath_jax.hf.source import Source
from prunepath_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Tensors some checkpoints carry that no model of ours uses (precomputed buffers).
_IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias", "position_ids")


@dataclasses.dataclass
class Pretrained:
    """What `load_pretrained` returns."""

    model: nnx.Module
    config: ModelConfig
    tokenizer: Tokenizer | None
    source: str
    metadata: dict | None = None  # a restored checkpoint's metadata (source, conversion, ...)


def abstract_model(cfg: ModelConfig, dtype=jnp.float32) -> nnx.Module:
    """The model with `ShapeDtypeStruct` leaves: shapes without allocating or initialising."""
    cls = models.model_class(cfg)
    return nnx.eval_shape(lambda: cls(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def tree_items(tree, prefix=()):
    """`(path, leaf)` pairs of a nested dict (an `nnx.to_pure_dict` state)."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from tree_items(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def tree_set(tree, path, value):
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def fill_model(
    cfg: ModelConfig,
    read: Callable[[str, tuple | None], np.ndarray],
    shape_of: Callable[[str], tuple[int, ...]],
    names: set[str],
    *,
    dtype=jnp.float32,
    mesh: Mesh | None = None,
    progress: bool = True,
) -> nnx.Module:
    """Builds the model abstractly and fills every parameter from Hugging Face tensors.

    Args:
        cfg: the architecture.
        read: `read(hf_name, index)` returns the tensor (or its slice `index`, in HF layout).
        shape_of: HF tensor shape, read without loading the data.
        names: every tensor name the checkpoint holds (to report unused ones).
        dtype: parameter dtype.
        mesh: place parameters sharded on this mesh (see `prunepath_jax.sharding`).
        progress: show a progress bar.
    """
    abstract = abstract_model(cfg, dtype)
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    pmap = {path: Source.of(entry) for path, entry in models.hf_param_map(cfg).items()}
    leaves = list(tree_items(pure))
    missing = [n for p, _ in leaves if p in pmap for n in pmap[p].names if n not in names]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensor(s) needed: {missing[:4]}")
    for path, leaf in tqdm(leaves, desc="loading", disable=not progress, leave=False):
        if path not in pmap:
            raise ValueError(f"no checkpoint tensor mapped to parameter {path}")
        src = pmap[path]
        want = tuple(leaf.shape)
        got = src.shape([tuple(shape_of(n)) for n in src.names])
        if got != want:
            raise ValueError(f"tensor(s) {src.names}: shape {got} does not fit parameter {want}")
        if mesh is None:
            value = jnp.asarray(src.load(read, None, dtype))
        else:
            shd = sharding.param_sharding(path, want, mesh)
            value = jax.make_array_from_callback(
                want, shd, lambda idx, src=src: src.load(read, idx, dtype)
            )
        tree_set(pure, path, value)
    used = {n for src in pmap.values() for n in src.names}
    unused = sorted(n for n in names - used if not n.endswith(_IGNORED_TENSOR_SUFFIXES))
    if unused:
        log.warning("checkpoint tensors not used by the model: %s", unused[:10])
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _load_hf_dir(directory: Path, dtype, mesh, progress) -> Pretrained:
    from prunepath_jax.hf.safetensors_io import SafetensorsCheckpoint

    if not (directory / "config.json").exists():
        raise FileNotFoundError(
            f"{directory} is not a Hugging Face checkpoint directory (no config.json)"
        )
    try:
        hf_cfg = json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{directory / 'config.json'}: invalid JSON ({e})") from None
    cfg = models.config_from_hf(hf_cfg)
    ckpt = SafetensorsCheckpoint(directory)
    model = fill_model(
        cfg, ckpt.read, ckpt.shape, ckpt.names(), dtype=dtype, mesh=mesh, progress=progress
    )
    tok = Tokenizer.from_dir(directory) if (directory / "tokenizer.json").exists() else None
    return Pretrained(model, cfg, tok, str(directory))


def _load_gguf(path: Path, dtype, mesh, progress) -> Pretrained:
    from prunepath_jax.hf.gguf import read_gguf

    ck = read_gguf(path)
    cfg = models.config_from_hf(ck.config)
    tensors = ck.tensors
    model = fill_model(
        cfg,
        lambda n, idx: tensors[n] if idx is None else tensors[n][idx],
        lambda n: tensors[n].shape,
        set(tensors),
        dtype=dtype,
        mesh=mesh,
        progress=progress,
    )
    return Pretrained(model, cfg, Tokenizer(ck.tokenizer, ck.tokenizer_config), str(path))


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path, and huggingface_hub is not installed to fetch it "
            "from the hub (pip install 'prunepath_jax[hf]')"
        ) from None
    try:
        path = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"],
        )
    except Exception as e:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path and could not be fetched from the Hugging Face hub "
            f"(offline? {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    return Path(path)


def load_pretrained(
    path_or_id: str | os.PathLike | None = "default",
    *,
    dtype=jnp.float32,
    mesh: Mesh | None = None,
    progress: bool = True,
) -> Pretrained:
    """Loads a model, its config and tokenizer.

    Args:
        path_or_id: "default" or None (the embedded SmolLM2-135M-Instruct), a Hugging Face
            checkpoint directory (config.json + safetensors), a `.gguf` file, or a hub id
            (needs `huggingface_hub` and a network).
        dtype: parameter dtype (float32 for exactness on CPU, bfloat16 on GPU).
        mesh: shard parameters on this mesh while reading.
        progress: show progress bars.

    Returns:
        `Pretrained(model, config, tokenizer, source)`.
    """
    if path_or_id is None or str(path_or_id) == "default":
        from prunepath_jax import default

        path = default.ensure_cache(progress=progress)
        return _load_hf_dir(path, dtype, mesh, progress)
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return _load_hf_dir(path, dtype, mesh, progress)
    if path.is_file():
        if path.suffix == ".gguf":
            return _load_gguf(path, dtype, mesh, progress)
        raise ValueError(f"{path}: expected a checkpoint directory or a .gguf file")
    s = str(path_or_id)
    if s.count("/") == 1 and not s.startswith((".", "/", "~")):
        return _load_hf_dir(_download(s), dtype, mesh, progress)
    raise FileNotFoundError(f"{path_or_id}: no such file or directory")


def load_any(path_or_id: str | os.PathLike | None = "default", *, dtype=jnp.float32, mesh=None,
             progress: bool = True) -> Pretrained:  # fmt: skip
    """`load_pretrained`, or — for a prunepath_jax Orbax checkpoint directory (what `prunepath
    convert` and training write) — `checkpoint.restore_model`. The one entry point the CLI uses."""
    path = Path(str(path_or_id)).expanduser() if path_or_id is not None else None
    if path is not None and path.is_dir() and not (path / "config.json").exists():
        from prunepath_jax.checkpoint import latest_step, restore_model

        if latest_step(path) is not None:
            r = restore_model(path, dtype=dtype, mesh=mesh)
            return Pretrained(r.model, r.config, r.tokenizer, str(path), r.metadata)
    return load_pretrained(path_or_id, dtype=dtype, mesh=mesh, progress=progress)
