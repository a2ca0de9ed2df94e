"""`python -m prunepath_jax.train <preset | config.json> [--field value ...]`, or `prunepath train`.

The first argument picks a named preset (`train/config.py: PRESETS`) or a JSON file of
`TrainConfig` fields (strictly checked: unknown names and wrong types are errors); flags override
single fields. Running the same command again resumes from the newest checkpoint in `--out-dir`.

Multi-host: start the same command on every host with `--distributed` (and `--coordinator
host:port --num-processes N --process-id i`, or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID environment variables, or a cluster JAX detects itself, such as SLURM).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import tyro

from prunepath_jax.train.config import PRESETS, TrainConfig

USAGE = (
    "usage: prunepath train <preset | config.json> [--field value ...]\n"
    f"presets: {', '.join(PRESETS)}\n"
    "fields: prunepath train <preset> --help"
)


def parse(argv: list[str]) -> TrainConfig:
    """The config named by argv[0] with argv[1:] applied as field overrides."""
    if not argv or argv[0] in ("-h", "--help"):
        raise SystemExit(USAGE)
    name, rest = argv[0], argv[1:]
    if name in PRESETS:
        base = PRESETS[name]
    elif name.endswith(".json"):
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such config file")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object of TrainConfig fields")
        base = TrainConfig.from_dict(raw)
    else:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)} (or a .json)")
    return tyro.cli(TrainConfig, default=base, args=rest, prog=f"prunepath train {name}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from prunepath_jax.train.loop import TrainingDiverged, run

    try:
        cfg = parse(argv)
        summary = run(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"prunepath train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingDiverged as e:
        print(f"prunepath train: stopped: {e}", file=sys.stderr)
        raise SystemExit(3) from None
    print(json.dumps({k: summary[k] for k in ("status", "step", "out_dir", "eval")}, indent=1))
    if summary["status"] == "preempted":
        raise SystemExit(143)


if __name__ == "__main__":
    main()
