"""Shared pytest set-up: fake CPU devices for sharding tests, markers, GPU skipping."""

import contextlib
import sys
from pathlib import Path

import jax
import pytest

# `python -m pytest` puts the repository root on sys.path, where the top-level kernels/ folder
# (installed as prunepath_jax.kernels) shadows Hugging Face's `kernels` package, which
# transformers (5.25 and later) imports with its models: every Hugging Face fixture would fail.
# The package is installed, so the root is not needed there.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

# Eight fake CPU devices for the sharding tests; must happen before JAX initialises its backends
# (a plugin that already did so leaves the default device count).
with contextlib.suppress(RuntimeError):
    jax.config.update("jax_num_cpu_devices", 8)


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
