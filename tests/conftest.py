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


# On the lent GPU machine pytest has hung after printing its summary (until the caller's
# timeout, burning device time). With PRUNEPATH_HARD_EXIT=1 (set by scripts/gpu_kernels.sh) the
# process leaves right after the summary with pytest's own exit status.
_EXIT = {"status": None}


def pytest_sessionfinish(session, exitstatus):
    _EXIT["status"] = int(exitstatus)


def pytest_unconfigure(config):
    import os
    import sys

    if os.environ.get("PRUNEPATH_HARD_EXIT") == "1" and _EXIT["status"] is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT["status"])
