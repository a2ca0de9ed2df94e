"""Training checkpoints: the model layout of `prunepath_jax.checkpoint` plus the run's own items.

Each saved step holds `state` (the whole model: backbone, routers, permutation — so
`restore_model(out_dir)` and every `--model` flag read a training run like a converted model),
`config`, `metadata` (source, conversion, training config), `opt_state` (optax state of the
trainable parameters only) and `train` (JSON: step, rng, data-iterator state, metrics so far).

Saves are asynchronous (Orbax writes in the background while training continues; a step directory
appears only when complete). Resuming takes the newest step that restores; a step that fails to
restore (truncated or corrupted files) is reported and moved aside to `<step>.unreadable-<time>`
(never deleted), and the previous step is used.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from prunepath_jax import checkpoint as ckpt
from prunepath_jax import orbax_io
from prunepath_jax.config import ModelConfig
from prunepath_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)
OPT, TRAIN = "opt_state", "train"


class TrainCheckpointer:
    """One Orbax `CheckpointManager` kept open for the run (async saves, keep the newest K)."""

    def __init__(self, directory: str | Path, *, keep: int, asynchronous: bool = True):
        self.directory = Path(directory).expanduser().absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        handlers = orbax_io.handlers({
            ckpt.STATE: ocp.args.StandardSave({}), ckpt.CONFIG: ocp.args.JsonSave({}),
            ckpt.METADATA: ocp.args.JsonSave({}), OPT: ocp.args.StandardSave({}),
            TRAIN: ocp.args.JsonSave({}),
        })  # fmt: skip
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous
        )
        with orbax_io.quiet():
            self.mngr = ocp.CheckpointManager(
                self.directory, item_handlers=handlers, options=options
            )

    def save(
        self,
        step: int,
        model: nnx.Module,
        config: ModelConfig,
        *,
        opt_state: Any,
        train: dict,
        metadata: dict,
        tokenizer: Tokenizer | None = None,
        wait: bool = False,
    ) -> None:
        """Starts saving step `step` (returns before the write ends unless `wait`)."""
        items = ckpt.model_items(
            model,
            config,
            metadata,
            {OPT: ocp.args.StandardSave(opt_state), TRAIN: ocp.args.JsonSave(train)},
        )
        with orbax_io.quiet():
            if step in self.mngr.all_steps():
                log.info("step %d is already saved", step)
            else:
                self.mngr.save(step, args=ocp.args.Composite(**items), force=True)
            if wait:
                self.mngr.wait_until_finished()
        if tokenizer is not None and not (self.directory / ckpt.TOKENIZER_DIR).exists():
            ckpt.write_tokenizer(self.directory, tokenizer)

    def wait(self) -> None:
        with orbax_io.quiet():
            self.mngr.wait_until_finished()

    def close(self) -> None:
        with orbax_io.quiet():
            self.mngr.wait_until_finished()
            self.mngr.close()

    def reload(self) -> None:
        """Re-reads the step list (after steps were moved aside)."""
        with orbax_io.quiet():
            self.mngr.reload()


def restore_latest(
    directory: str | Path,
    *,
    abstract_opt_state: Callable[[ModelConfig], Any],
    mesh=None,
    dtype=None,
    report=print,
) -> ckpt.Restored | None:
    """Restores the newest readable step (model, opt_state, train JSON), or None if there is none.

    Args:
        directory: the run directory.
        abstract_opt_state: `model_config -> ShapeDtypeStruct tree` (with shardings) of the
            optimiser state for a model of that config.
        mesh: place the model sharded on this mesh.
        dtype: model parameter dtype (None: as saved).
        report: where to say that a step was skipped (one clear line each).
    """
    directory = Path(directory).expanduser().absolute()
    for step in reversed(ckpt.list_steps(directory)):
        try:
            config = ckpt.read_config(directory, step)
            return ckpt.restore_model(
                directory,
                step=step,
                mesh=mesh,
                dtype=dtype,
                expect_config=config,
                extra_items={
                    OPT: ocp.args.StandardRestore(abstract_opt_state(config)),
                    TRAIN: ocp.args.JsonRestore(),
                },
            )
        except (ValueError, FileNotFoundError, KeyError) as e:
            aside = directory / f"{step}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
            (directory / str(step)).rename(aside)
            report(
                f"checkpoint step {step} in {directory} cannot be restored ({e}); "
                f"moved it to {aside.name} (nothing deleted) and trying the previous step"
            )
    return None


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """`ShapeDtypeStruct`s of `abstract` carrying the matching `shardings`."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
