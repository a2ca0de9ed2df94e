"""Metric sinks for training: JSONL (always), TensorBoard (tensorboardX) and wandb (optional).

Only process 0 writes. JSONL lines are appended and flushed per write, so a preempted run keeps
everything logged before the signal; on resume, lines past the restored step are dropped first so
the file holds one uninterrupted history.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax

log = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, out_dir: str | Path, *, tensorboard: bool, wandb_project: str = "",
                 config: dict | None = None, resume_step: int = 0):  # fmt: skip
        self.active = jax.process_index() == 0
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_after(self.path, resume_step)
        self.file = self.path.open("a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:
                log.warning("tensorboardX is not installed: TensorBoard logging is off")
        if wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=wandb_project, config=config, resume="allow")
            except ImportError:
                log.warning("wandb is not installed: wandb logging is off")

    def write(self, step: int, row: dict, prefix: str = "train") -> None:
        if not self.active:
            return
        clean = {k: _plain(v) for k, v in row.items()}
        self.file.write(json.dumps({"step": step, "split": prefix, **clean}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, int | float):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in clean.items()}, step=step)

    def close(self) -> None:
        if not self.active:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _plain(v):
    """JSON-ready: numpy / JAX scalars become Python numbers."""
    return v.item() if hasattr(v, "item") else v


def truncate_after(path: Path, step: int) -> None:
    """Drops lines logged after `step` (they belong to steps the resumed run will redo)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    path.write_text("".join(x + "\n" for x in keep))


def read_metrics(out_dir: str | Path, split: str = "train") -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if r.get("split") == split]
