"""Saving and restoring prunepath_jax models: one Orbax `CheckpointManager` layout for everything.

Converted PrunePath models are saved with `save_model` and read back with `restore_model`; training
checkpoints reuse the same layout and add their own items (optimizer state, data position) through
`extra_items`, so one directory can hold both and every reader knows where the model is.

On disk (Orbax's default step naming, one directory per saved step)::

    directory/
      <step>/                  one finished save (Orbax writes it to a temporary name, then renames)
        state/                 the model's whole NNX state (all variable types) as a pure-dict
                               pytree of arrays (`StandardSave`: OCDBT + zarr under TensorStore)
        config/                `ModelConfig.to_dict()` (`JsonSave`)
        metadata/              user metadata + versions, creation date, source (`JsonSave`)
        <extra item>/          anything passed as `extra_items` (e.g. "opt_state")
      tokenizer/               tokenizer.json + tokenizer_config.json, shared by every step

The state is stored as plain nested dicts (`nnx.to_pure_dict`), not as `nnx.State`, so the files do
not depend on how a Flax version represents variables, and restoring is `nnx.replace_by_pure_dict`
on an abstract model (`abstract_model`): every array is read straight into its final placement
(one device, or sharded on a mesh), never through host memory as a whole.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import traceback
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

import prunepath_jax
from prunepath_jax import orbax_io, sharding
from prunepath_jax.config import ModelConfig
from prunepath_jax.loading import abstract_model
from prunepath_jax.models.decode_proj import DecodeWeight
from prunepath_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)

STATE, CONFIG, METADATA = "state", "config", "metadata"
_OWN_ITEMS = (STATE, CONFIG, METADATA)
TOKENIZER_DIR = "tokenizer"
LAYOUT_VERSION = 1
# Keys of the metadata item that we write; user metadata may not use them (except "source").
_RESERVED_METADATA = ("layout", "versions", "created", "param_dtype", "items")


@dataclasses.dataclass
class Restored:
    """What `restore_model` returns. `extra` holds the restored `extra_items`, by name."""

    model: nnx.Module
    config: ModelConfig
    tokenizer: Tokenizer | None
    metadata: dict
    step: int
    extra: dict = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Listing steps.


def _check_directory(directory: str | os.PathLike) -> Path:
    path = Path(directory).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory (expected a checkpoint directory)")
    return path


def list_steps(directory: str | os.PathLike) -> list[int]:
    """Steps of every finished save under `directory`, ascending ([] when there are none, or when
    the directory does not exist yet, so training can resume-or-start with one call)."""
    path = Path(directory).expanduser().absolute()
    if not path.exists():
        return []
    path = _check_directory(path)
    with orbax_io.quiet():
        mngr = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True))
        try:
            return sorted(mngr.all_steps())
        finally:
            mngr.close()


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest step under `directory`, or None when it holds no checkpoint."""
    steps = list_steps(directory)
    return steps[-1] if steps else None


# --------------------------------------------------------------------------------------------------
# Saving.


def _versions() -> dict:
    out = {"prunepath_jax": prunepath_jax.__version__, "jax": jax.__version__}
    for name, dist in (("flax", "flax"), ("orbax_checkpoint", "orbax-checkpoint")):
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return {**out, "python": sys.version.split()[0]}


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _key(entry):
    """A jax key-path entry -> the dict key, list index or attribute name it stands for."""
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def _leaves_by_path(tree, is_leaf=None) -> dict[tuple, Any]:
    """{path of keys: leaf} for a nested pytree (dict keys, list indices)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {tuple(_key(k) for k in p): v for p, v in flat}


def _param_dtype(leaves: Mapping[tuple, Any]) -> str:
    """The floating dtype most parameters have (what `abstract_model` should build with)."""
    counts: dict[str, int] = {}
    for v in leaves.values():
        if jnp.issubdtype(v.dtype, jnp.floating):
            counts[jnp.dtype(v.dtype).name] = counts.get(jnp.dtype(v.dtype).name, 0) + v.size
    return max(counts, key=counts.get) if counts else "float32"


def config_difference(saved: Any, expected: Any, prefix: str = "") -> str | None:
    """The first field where two configs differ ("d_model: 64 != 128"), or None when equal."""
    if dataclasses.is_dataclass(saved) and type(saved) is type(expected):
        for f in dataclasses.fields(saved):
            diff = config_difference(
                getattr(saved, f.name), getattr(expected, f.name), f"{prefix}{f.name}."
            )
            if diff is not None:
                return diff
        return None
    if saved != expected:
        return f"{prefix.rstrip('.')}: {saved!r} != {expected!r}"
    return None


def _check_matches_config(pure: dict, config: ModelConfig, model) -> None:
    """Refuses to save a model under a config it was not built from: it could never be restored."""
    own = getattr(model, "cfg", None)
    if isinstance(own, ModelConfig):
        diff = config_difference(own, config)
        if diff is not None:
            raise ValueError(f"config does not describe this model (model's cfg vs given: {diff})")
    want = _leaves_by_path(nnx.to_pure_dict(nnx.split(abstract_model(config))[1]))
    have = _leaves_by_path(pure)
    if set(want) != set(have):
        path = min(set(want) ^ set(have), key=str)
        where = "config's model" if path in want else "model"
        raise ValueError(f"parameter {_path_str(path)} exists only in the {where}")
    for path, leaf in have.items():
        if tuple(leaf.shape) != tuple(want[path].shape):
            raise ValueError(
                f"parameter {_path_str(path)} has shape {tuple(leaf.shape)} but the config "
                f"builds {tuple(want[path].shape)}"
            )


def write_tokenizer(directory: Path, tokenizer: Tokenizer) -> None:
    """Writes `directory/tokenizer` atomically: a reader sees the old files or the new ones."""
    final = directory / TOKENIZER_DIR
    tmp = directory / f".{TOKENIZER_DIR}.tmp-{uuid.uuid4().hex}"
    old = directory / f".{TOKENIZER_DIR}.old-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        tokenizer.save(tmp)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def model_items(
    model: nnx.Module,
    config: ModelConfig,
    metadata: dict | None = None,
    extra_items: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The Orbax save args of one step in our layout (state, config, metadata + extras).

    Shared by `save_model` and the training checkpointer, so a training checkpoint restores with
    the same `restore_model` call as a converted one. Validates what `save_model` documents.
    """
    extra = dict(extra_items or {})
    clash = sorted(set(extra) & set(_OWN_ITEMS))
    if clash:
        raise ValueError(f"extra item names {clash} are reserved for the model checkpoint")
    user = dict(metadata or {})
    reserved = sorted(set(user) & set(_RESERVED_METADATA))
    if reserved:
        raise ValueError(f"metadata keys {reserved} are reserved (written by save_model)")
    _, _, state = nnx.split(model, DecodeWeight, ...)  # decode-only copies are not the model
    pure = nnx.to_pure_dict(state)
    leaves = _leaves_by_path(pure)
    for path, leaf in leaves.items():
        if not hasattr(leaf, "dtype") or jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            raise ValueError(
                f"state leaf {_path_str(path)} ({type(leaf).__name__}) is not an array of numbers; "
                "save_model stores arrays only (PRNG key state is not supported)"
            )
    _check_matches_config(pure, config, model)
    meta = {
        **user,
        "source": user.get("source"),
        "layout": LAYOUT_VERSION,
        "versions": _versions(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "param_dtype": _param_dtype(leaves),
        "items": sorted([*_OWN_ITEMS, *extra]),
    }
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata is not JSON-serialisable: {e}") from None

    return {
        STATE: ocp.args.StandardSave(pure),
        CONFIG: ocp.args.JsonSave(config.to_dict()),
        METADATA: ocp.args.JsonSave(meta),
        **extra,
    }


def save_model(
    directory: str | os.PathLike,
    model: nnx.Module,
    config: ModelConfig,
    *,
    tokenizer: Tokenizer | None = None,
    metadata: dict | None = None,
    step: int = 0,
    keep: int | None = None,
    extra_items: Mapping[str, Any] | None = None,
) -> Path:
    """Saves the model's whole NNX state, its config and metadata as step `step` of `directory`.

    Args:
        directory: the checkpoint directory (created if missing).
        model: the model; every variable is saved (parameters and any other state).
        config: the config the model was built from (checked against the model's shapes).
        tokenizer: written to `directory/tokenizer` (shared by all steps; an earlier one is kept
            when None).
        metadata: JSON-serialisable user data; "source" (where the weights came from) is recorded
            next to our own keys (versions, created date).
        step: the step number; must not exist yet.
        keep: keep only the newest `keep` steps (older ones are deleted); None keeps all.
        extra_items: more Orbax items to save in the same step, e.g.
            `{"opt_state": ocp.args.StandardSave(opt_state)}` (training checkpoints).

    Returns:
        The step directory.
    """
    directory = Path(directory).expanduser().absolute()  # Orbax needs absolute paths
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory}: not a directory (expected a checkpoint directory)")
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    items = model_items(model, config, metadata, extra_items)
    with orbax_io.quiet():
        mngr = orbax_io.manager(directory, items, keep=keep)
        try:
            if step in mngr.all_steps():
                raise ValueError(
                    f"{directory}: step {step} already exists (steps: {sorted(mngr.all_steps())}); "
                    "pass another step= or directory"
                )
            if not mngr.save(step, args=ocp.args.Composite(**items), force=True):
                raise RuntimeError(f"{directory}: Orbax declined to save step {step}")
            mngr.wait_until_finished()
        finally:
            mngr.close()
    if tokenizer is not None:
        write_tokenizer(directory, tokenizer)
    return directory / str(step)


# --------------------------------------------------------------------------------------------------
# Restoring.


def _restore(mngr, step: int, what: str, where: Path, args: Mapping[str, Any]) -> Any:
    """`mngr.restore` of some items, with Orbax's failure turned into one clear line."""
    with orbax_io.quiet(), orbax_io.read_noise_filter():
        try:
            return mngr.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # Orbax/TensorStore raise bare Exception, ValueError, OSError...
            message = orbax_io.first_line(e)
            # Logged as text, not as exc_info: a kept traceback would keep Orbax's abandoned
            # coroutines alive past the filter (see `orbax_io.read_noise_filter`).
            log.debug("restoring %s from %s failed:\n%s", what, where, traceback.format_exc())
        orbax_io.flush_failed_reads()
    raise ValueError(f"{where}: checkpoint {what} is corrupted or unreadable ({message})")


def _saved_shapes(mngr, step: int, step_dir: Path) -> dict[tuple, Any]:
    """{path (strings): array metadata with .shape/.dtype} of the saved state, read from Orbax's
    metadata only (no array data)."""
    try:
        with orbax_io.quiet():
            meta = mngr.item_metadata(step)[STATE]
        tree = getattr(meta, "tree", meta)
        if tree is None:
            raise ValueError("no state metadata")
        leaves = _leaves_by_path(tree, lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    except Exception as e:
        raise ValueError(
            f"{step_dir}: checkpoint state is corrupted or unreadable ({orbax_io.first_line(e)})"
        ) from None
    return {tuple(str(k) for k in p): v for p, v in leaves.items()}


def _restore_target(abstract: dict, saved: dict, step_dir: Path, dtype, mesh: Mesh | None) -> dict:
    """Per-leaf `ShapeDtypeStruct` targets (shape checked against the saved state, dtype the
    requested one or else the saved one, placement single-device or sharded on `mesh`)."""
    want = _leaves_by_path(abstract)
    want_str = {tuple(str(k) for k in p): p for p in want}
    unknown = sorted(set(saved) - set(want_str))
    if unknown:
        raise ValueError(
            f"{step_dir}: saved parameter {_path_str(unknown[0])} does not exist in the model "
            "built from the saved config"
        )
    device = SingleDeviceSharding(jax.devices()[0])
    target = {}
    for key, path in want_str.items():
        if key not in saved:
            raise ValueError(f"{step_dir}: the saved state lacks parameter {_path_str(key)}")
        leaf, have = want[path], saved[key]
        if tuple(have.shape) != tuple(leaf.shape):
            raise ValueError(
                f"{step_dir}: parameter {_path_str(key)} has saved shape {tuple(have.shape)} but "
                f"the model expects {tuple(leaf.shape)}"
            )
        shd = device if mesh is None else sharding.param_sharding(path, tuple(leaf.shape), mesh)
        leaf_dtype = leaf.dtype if dtype is not None else have.dtype
        target[path] = jax.ShapeDtypeStruct(tuple(leaf.shape), leaf_dtype, sharding=shd)
    return jax.tree_util.tree_map_with_path(lambda p, _: target[tuple(map(_key, p))], abstract)


def read_config(directory: str | os.PathLike, step: int) -> ModelConfig:
    """The `ModelConfig` saved with step `step` (reads only the small JSON item)."""
    directory = _check_directory(directory)
    with orbax_io.quiet():
        mngr = orbax_io.manager(directory, {CONFIG: ocp.args.JsonRestore()}, read_only=True)
    try:
        where = directory / str(step) / CONFIG
        d = _restore(mngr, step, "config", where, {CONFIG: ocp.args.JsonRestore()})[CONFIG]
    finally:
        with orbax_io.quiet():
            mngr.close()
    try:
        return ModelConfig.from_dict(d)
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{where}: not a valid model config ({e})") from None


def restore_model(
    directory: str | os.PathLike,
    *,
    step: int | None = None,
    dtype=None,
    mesh: Mesh | None = None,
    expect_config: ModelConfig | None = None,
    extra_items: Mapping[str, Any] | None = None,
) -> Restored:
    """Restores a model saved with `save_model`.

    Args:
        directory: the checkpoint directory.
        step: which step (default: the latest).
        dtype: cast floating parameters to this dtype (default: exactly the saved dtypes).
        mesh: place parameters sharded on this mesh (`sharding.param_sharding` rules); default
            one device.
        expect_config: raise (naming the first differing field) unless the saved config equals
            this one, before any array is read.
        extra_items: restore args for items saved with `save_model(extra_items=...)`, e.g.
            `{"opt_state": ocp.args.StandardRestore(abstract_opt_state)}`.

    Returns:
        `Restored(model, config, tokenizer, metadata, step, extra)`.
    """
    directory = _check_directory(directory)
    extra = dict(extra_items or {})
    handlers = {
        STATE: ocp.args.StandardRestore(),
        CONFIG: ocp.args.JsonRestore(),
        METADATA: ocp.args.JsonRestore(),
        **extra,
    }
    with orbax_io.quiet():
        mngr = orbax_io.manager(directory, handlers, read_only=True)
    try:
        steps = sorted(mngr.all_steps())
        if not steps:
            raise FileNotFoundError(
                f"{directory}: holds no checkpoint (no finished step directory)"
            )
        step = steps[-1] if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"{directory}: no step {step}; available steps: {steps}")
        step_dir = directory / str(step)  # Orbax's default step naming
        missing = sorted(name for name in extra if not (step_dir / name).is_dir())
        if missing:
            have = sorted(p.name for p in step_dir.iterdir() if p.is_dir())
            raise FileNotFoundError(f"{step_dir}: no item(s) {missing} in this step (has {have})")
        cfg_dict = _restore(
            mngr, step, "config", step_dir / CONFIG, {CONFIG: ocp.args.JsonRestore()}
        )
        try:
            config = ModelConfig.from_dict(cfg_dict[CONFIG])
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{step_dir / CONFIG}: not a valid model config ({e})") from None
        if expect_config is not None:
            diff = config_difference(config, expect_config)
            if diff is not None:
                raise ValueError(f"{step_dir}: saved config differs from the expected one ({diff})")
        meta = _restore(mngr, step, "metadata", step_dir / METADATA, {METADATA: handlers[METADATA]})
        meta = dict(meta[METADATA] or {})
        saved = _saved_shapes(mngr, step, step_dir)
        build_dtype = dtype if dtype is not None else jnp.dtype(meta.get("param_dtype", "float32"))
        graphdef, state = nnx.split(abstract_model(config, build_dtype))
        abstract = nnx.to_pure_dict(state)
        target = _restore_target(abstract, saved, step_dir, dtype, mesh)
        args = {STATE: ocp.args.StandardRestore(target), **extra}
        restored = _restore(mngr, step, "state", step_dir, args)
    finally:
        with orbax_io.quiet():
            mngr.close()
    nnx.replace_by_pure_dict(state, restored[STATE])
    model = nnx.merge(graphdef, state)
    tokenizer = None
    if (directory / TOKENIZER_DIR / "tokenizer.json").exists():
        try:
            tokenizer = Tokenizer.from_dir(directory / TOKENIZER_DIR)
        except Exception as e:
            raise ValueError(
                f"{directory / TOKENIZER_DIR}: tokenizer is unreadable ({orbax_io.first_line(e)})"
            ) from None
    return Restored(model, config, tokenizer, meta, step, {name: restored[name] for name in extra})
