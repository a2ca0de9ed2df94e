"""Shared pytest set-up: fake CPU devices for sharding tests, markers, GPU skipping."""

import contextlib

import jax
import pytest

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
