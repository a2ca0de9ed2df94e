"""Orbax plumbing shared by model and training checkpoints: quiet logs, one manager per call,
failed reads reported once, errors as one-line messages.

Separate from `checkpoint` (the on-disk layout, save and restore) because `train.checkpointing`
needs the same managers and log handling for its own items.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from absl import logging as absl_logging


@contextlib.contextmanager
def quiet():
    """Orbax logs every save/restore at INFO and read-only managers at WARNING; errors still show.

    The level is restored afterwards because absl's verbosity is process-wide.
    """
    old = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(old)


def _is_read_noise(unraisable) -> bool:
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True
    name = getattr(unraisable.object, "__qualname__", "")
    return "_read_array_index" in name or str(exc).startswith("Encountered error while reading")


@contextlib.contextmanager
def read_noise_filter():
    """Drops the echoes of a failed Orbax read, passing every other unraisable exception on.

    When one array read fails, Orbax abandons the other reads' coroutines and closes their event
    loop; their finalisers then print dozens of tracebacks (each with a full TensorStore spec)
    through `sys.unraisablehook`, possibly long after the real error. We report that error once;
    `flush_failed_reads` makes the echoes happen while this filter is installed.
    """
    prev = sys.unraisablehook

    def hook(unraisable):
        if not _is_read_noise(unraisable):
            prev(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = prev


def flush_failed_reads() -> None:
    """Finalises the abandoned read coroutines of a failed restore now, inside the filter; their
    "coroutine ... was never awaited" RuntimeWarnings are the same echo and are dropped too."""
    time.sleep(0.05)  # in-flight TensorStore reads finish (local files: well under this)
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="coroutine '_read_array_index", category=RuntimeWarning
        )
        gc.collect()


def first_line(e: BaseException, limit: int = 300) -> str:
    """One line describing `e` by its root cause: Orbax wraps the informative TensorStore error
    ("OUT_OF_RANGE: Error reading "layers.0..." ...") in a generic one that dumps a whole spec."""
    seen = set()
    while id(e) not in seen and (e.__cause__ or e.__context__) is not None:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def handlers(items: Mapping[str, Any]) -> dict:
    """A handler per item: lets `item_metadata` read items this manager never saved."""
    return {name: ocp.args.get_registered_handler_cls(args)() for name, args in items.items()}


def manager(
    directory: Path,
    items: Mapping[str, Any],
    *,
    keep: int | None = None,
    read_only: bool = False,
) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, create=not read_only, read_only=read_only
    )
    return ocp.CheckpointManager(directory, item_handlers=handlers(items), options=options)
