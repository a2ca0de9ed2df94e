"""Training configuration: one frozen dataclass, named presets, strict validation.

A `TrainConfig` says everything a run needs (source model, conversion, task and data, the paper's
objective and progressive schedule, optimiser groups, precision, mesh, checkpoint and logging
cadence). It is saved in every checkpoint, so a resumed run can refuse to continue under different
settings. Presets are plain `TrainConfig`s; the CLI (tyro) overrides their fields by name.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Literal

TASKS = ("lm", "cls", "sft")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run (DESIGN.md section 2: objective and schedule).

    Schedule: `warmup_steps` at tau = `warmup_tau` (every expert), then tau decays linearly from
    1.0 to `tau_target` over `decay_steps`, then holds for `hold_steps`. Total steps = the sum.
    """

    # What to train.
    source: str = "default"
    """"default" (embedded SmolLM2), a Hugging Face directory, a .gguf, a hub id, or a
    prunepath_jax checkpoint directory (converted or trained)."""
    out_dir: str = "runs/train"
    """Checkpoints, metrics.jsonl and TensorBoard events go here; an existing run is resumed."""
    task: Literal["lm", "cls", "sft"] = "lm"
    mode: Literal["full", "router"] = "full"
    """full: backbone and routers; router: routers only (backbone frozen, no optimiser state)."""
    sparse: Literal["prunepath", "static_topk", "dense"] = "prunepath"
    """prunepath: the tau schedule; static_topk: MoEfication baseline with a fixed k per token
    (`static_k`, tau held above 1); dense: no conversion (fine-tuning baseline)."""
    static_k: int = 0

    # Conversion (when the source is a dense model).
    group_size: int = 32
    rule: Literal["paper", "nucleus"] = "paper"
    gate: Literal["sigmoid", "none"] = "sigmoid"
    router_init_tokens: int = 0
    """Calibration tokens for the training-free router initialisation (0: zero routers)."""
    convert_seed: int = 0

    # Data.
    data: str = "shipped"
    """"shipped" (the corpus in the package), a .txt/.jsonl path, or a dataset name (online)."""
    eval_data: str = ""
    """Held-out data; empty: the validation split of `data`."""
    seq_len: int = 256
    batch_size: int = 8
    """Global batch (sequences per optimiser step, all devices and hosts together)."""
    grad_accum: int = 1
    """Micro-batches per step (the batch is split; one optimiser update)."""
    num_labels: int = 0
    """Classification: labels of the task (0: from the data)."""

    # Schedule.
    warmup_steps: int = 20
    warmup_tau: float = 1.05
    decay_steps: int = 60
    hold_steps: int = 20
    tau_target: float = 0.5

    # Objective.
    eta: float = 3e-4
    """Entropy weight."""
    lam: float = 1e-3
    """Balance weight."""
    mu: float = 0.0
    """Gate-magnitude weight."""

    # Optimiser.
    lr_backbone: float = 1e-4
    wd_backbone: float = 0.0
    lr_router: float = 1e-3
    wd_router: float = 1e-2
    lr_warmup_steps: int = 0
    clip_norm: float = 1.0
    """Global gradient-norm clip (0: off)."""
    b1: float = 0.9
    b2: float = 0.999

    # Precision.
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    """Master weights and optimiser state."""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """Forward/backward matmuls (routers and softmax stay float32)."""
    ffn_kernels: bool = False
    """Run the PrunePath FFNs through the kernel registry (`kernels.api`): on a GPU the grouped
    Triton GEMM and its backward kernel compute only the selected experts' up projection and
    `dy W_outᵀ` (`kernels/triton_grouped.py`); on a CPU the masked XLA path, as without it. On
    a mesh each device runs its rows of the batch under shard_map with the whole FFN weights
    (gathered, as FSDP does for the masked path; a `model` axis computes the FFN redundantly).
    Off by default because it pays only at high sparsity: on an H100 the 1B step was 0.96× the
    masked path at 45% FFN sparsity and 1.25× at 97% (BENCHMARKS.md, fifty-third session)."""
    ffn_kernels_auto: bool = False
    """Compile both steps, the masked one and `ffn_kernels`'s, time a few steps of each at the
    run's sparsity and run the faster one; time them again whenever the sparsity has moved by
    0.1 since (`train/ffn_choice.py`). Every step trains, whichever path runs it. Costs a
    second compile and a few steps of the slower path."""

    # Devices.
    mesh_data: int = -1
    """-1: every device not used by fsdp/model."""
    mesh_fsdp: int = 1
    mesh_model: int = 1
    distributed: bool = False
    """Call jax.distributed.initialize() (multi-host; coordinator from flags or environment)."""
    coordinator: str = ""
    num_processes: int = 0
    process_id: int = -1

    # Cadence.
    seed: int = 0
    save_every: int = 50
    keep: int = 3
    eval_every: int = 50
    eval_tokens: int = 8192
    log_every: int = 1
    tensorboard: bool = True
    wandb: str = ""
    """A wandb project name to log to (empty: off)."""
    progress: bool = True

    def __post_init__(self):
        validate(self)

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.decay_steps + self.hold_steps

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Strict: unknown names and values of the wrong type raise ValueError naming the field."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"unknown training config field(s): {unknown}")
        hints = typing.get_type_hints(cls)
        for name, value in d.items():
            _check_type(name, value, hints[name])
        return cls(**d)


def _check_type(name: str, value, hint) -> None:
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"{name}: must be one of {typing.get_args(hint)}, got {value!r}")
        return
    if origin in (typing.Union, types.UnionType):
        for h in typing.get_args(hint):
            try:
                _check_type(name, value, h)
                return
            except ValueError:
                pass
        raise ValueError(f"{name}: {value!r} does not have type {hint}")
    if hint is type(None):
        if value is not None:
            raise ValueError(f"{name}: expected None, got {value!r}")
        return
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }[hint](value)
    if not ok:
        raise ValueError(
            f"{name}: expected {hint.__name__}, got {type(value).__name__} ({value!r})"
        )


def validate(c: TrainConfig) -> None:
    """Raises ValueError naming the first bad field (called on construction)."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(msg)

    for f in dataclasses.fields(c):
        v = getattr(c, f.name)
        if isinstance(v, float):
            need(math.isfinite(v), f"{f.name} must be finite, got {v}")
    need(c.task in TASKS, f"task must be one of {TASKS}, got {c.task!r}")
    need(c.seq_len > 1, f"seq_len must be > 1, got {c.seq_len}")
    need(c.batch_size >= 1, f"batch_size must be >= 1, got {c.batch_size}")
    need(c.grad_accum >= 1, f"grad_accum must be >= 1, got {c.grad_accum}")
    need(
        c.batch_size % c.grad_accum == 0,
        f"batch_size {c.batch_size} is not divisible by grad_accum {c.grad_accum}",
    )
    for name in ("warmup_steps", "decay_steps", "hold_steps", "lr_warmup_steps", "static_k"):
        need(getattr(c, name) >= 0, f"{name} must be >= 0, got {getattr(c, name)}")
    need(c.total_steps >= 1, "the schedule has no steps (warmup + decay + hold = 0)")
    need(c.warmup_tau > 1.0, f"warmup_tau must be > 1 (all experts), got {c.warmup_tau}")
    need(0.0 < c.tau_target <= 1.05, f"tau_target must be in (0, 1.05], got {c.tau_target}")
    need(c.group_size >= 1, f"group_size must be >= 1, got {c.group_size}")
    for name in ("eta", "lam", "mu", "wd_backbone", "wd_router", "clip_norm"):
        need(getattr(c, name) >= 0, f"{name} must be >= 0, got {getattr(c, name)}")
    for name in ("lr_backbone", "lr_router"):
        need(getattr(c, name) > 0, f"{name} must be > 0, got {getattr(c, name)}")
    need(c.save_every >= 1 and c.keep >= 1, "save_every and keep must be >= 1")
    need(c.eval_every >= 0 and c.log_every >= 1, "eval_every must be >= 0, log_every >= 1")
    need(
        c.sparse != "static_topk" or c.static_k >= 1,
        "sparse='static_topk' needs static_k >= 1 (experts per token)",
    )
    need(
        not (c.sparse == "dense" and c.mode == "router"),
        "mode='router' trains only routers; a dense model (sparse='dense') has none",
    )
    for name in ("mesh_data", "mesh_fsdp", "mesh_model"):
        v = getattr(c, name)
        need(v == -1 or v >= 1, f"{name} must be >= 1 or -1, got {v}")
    for name in ("ffn_kernels", "ffn_kernels_auto"):
        need(
            not (getattr(c, name) and c.sparse == "dense"),
            f"{name} runs PrunePath FFNs; a dense model (sparse='dense') has none",
        )
    need(
        not (c.ffn_kernels and c.ffn_kernels_auto),
        "ffn_kernels runs every step through the kernels, ffn_kernels_auto times both paths "
        "and picks: set one of them",
    )


# Named presets. CPU-sized ones run on the shipped text; GPU-sized ones take a user's checkpoint.
PRESETS: dict[str, TrainConfig] = {
    # The README's training job on a CPU: SmolLM2-135M, shipped text, routers only, ~5 min.
    "smollm2-lm": TrainConfig(
        source="default", task="lm", mode="router", seq_len=128, batch_size=4, warmup_steps=5,
        decay_steps=20, hold_steps=5, tau_target=0.6, router_init_tokens=4096,
        save_every=10, eval_every=15, eval_tokens=2048, out_dir="runs/smollm2-lm",
    ),
    # The same on a GPU: full training, the quality table's settings (scripts/train_quality.py).
    "smollm2-lm-gpu": TrainConfig(
        source="default", task="lm", seq_len=256, batch_size=16, warmup_steps=60,
        decay_steps=240, hold_steps=100, tau_target=0.5, router_init_tokens=8192,
        compute_dtype="bfloat16", save_every=100, eval_every=100, eval_tokens=32768,
        out_dir="runs/smollm2-lm-gpu",
    ),
    "smollm2-sft": TrainConfig(
        source="default", task="sft", seq_len=256, batch_size=8, warmup_steps=20,
        decay_steps=60, hold_steps=20, tau_target=0.5, router_init_tokens=8192, mu=1e-3,
        out_dir="runs/smollm2-sft",
    ),
    "minilm-cls": TrainConfig(
        source="minilm", task="cls", seq_len=128, batch_size=32, warmup_steps=30,
        decay_steps=90, hold_steps=30, tau_target=0.5, lr_backbone=5e-5, gate="none",
        eval_tokens=0, out_dir="runs/minilm-cls",
    ),
    "llama-3.2-1b-lm": TrainConfig(
        source="meta-llama/Llama-3.2-1B", task="lm", seq_len=2048, batch_size=64,
        warmup_steps=500, decay_steps=2000, hold_steps=500, tau_target=0.5,
        router_init_tokens=65536, compute_dtype="bfloat16", save_every=250, eval_every=250,
        out_dir="runs/llama-3.2-1b-lm", mesh_fsdp=-1, mesh_data=1,
    ),
    "llama-3-8b-lm": TrainConfig(
        source="meta-llama/Meta-Llama-3-8B", task="lm", seq_len=4096, batch_size=64,
        grad_accum=4, warmup_steps=500, decay_steps=2000, hold_steps=500, tau_target=0.5,
        router_init_tokens=65536, compute_dtype="bfloat16", save_every=200, eval_every=200,
        out_dir="runs/llama-3-8b-lm", mesh_fsdp=-1, mesh_data=1,
    ),
}  # fmt: skip
