"""Lazy reading of Hugging Face safetensors checkpoints (single file or sharded with an index).

Tensors are read one at a time, and only the requested slice when a sharded placement asks for
one, so a checkpoint never has to sit in host memory whole. The `flax` framework of safetensors is
used because its numpy framework cannot represent bfloat16; reads are pinned to the CPU backend
and returned as numpy (ml_dtypes) arrays.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from safetensors import safe_open


class SafetensorsCheckpoint:
    """Name -> lazily read tensor over every safetensors file of a checkpoint directory."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        single = self.directory / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
            self._file_of = {name: self.directory / fname for name, fname in weight_map.items()}
        elif single.exists():
            self._file_of = None
            self._single = single
        else:
            raise FileNotFoundError(
                f"{self.directory}: no model.safetensors or model.safetensors.index.json"
            )
        self._handles: dict[Path, object] = {}
        self._cpu = jax.devices("cpu")[0]
        if self._file_of is None:
            self._file_of = {name: single for name in self._open(single).keys()}
        missing = {p for p in set(self._file_of.values()) if not p.exists()}
        if missing:
            raise FileNotFoundError(f"checkpoint shard(s) missing: {sorted(map(str, missing))}")

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="flax")
            except Exception as e:  # safetensors raises its own error types
                raise ValueError(f"{path}: cannot read safetensors file ({e})") from None
        return self._handles[path]

    def names(self) -> set[str]:
        return set(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._file_of[name]).get_slice(name).get_shape())

    def read(self, name: str, index: tuple | None = None) -> np.ndarray:
        """The tensor `name` (or `tensor[index]`), as a numpy array in its stored dtype."""
        if name not in self._file_of:
            raise KeyError(f"tensor {name!r} not in checkpoint {self.directory}")
        with jax.default_device(self._cpu):
            sl = self._open(self._file_of[name]).get_slice(name)
            arr = sl[index] if index is not None else sl[:]
            return np.asarray(arr)
