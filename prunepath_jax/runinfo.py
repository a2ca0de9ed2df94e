"""Provenance of a result: date, commit, machine and command (every result row carries it)."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import jax


def run_header(**extra) -> dict:
    """Date, commit, machine and command of this run; every artifact row carries it.

    Shared by the evaluation artifacts and the benchmark scripts. The commit is read from the
    repository this file lives in, so running from another directory still names the code that
    produced the numbers (`$PRUNEPATH_COMMIT` where there is no git, e.g. on the GPU machine).
    """
    repo = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=repo,
        ).stdout.strip()
    except OSError:
        commit = ""
    dev = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit or os.environ.get("PRUNEPATH_COMMIT", "?"),
        "device": getattr(dev, "device_kind", dev.platform),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "host": f"{platform.machine()} {os.cpu_count()} cpus",
        "command": " ".join(sys.argv),
        **extra,
    }
