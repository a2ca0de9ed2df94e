"""The training loop: resume-or-start, sharded steps, evaluation, checkpoints, signals, metrics.

`run(cfg)` is the whole job (`prunepath train` and `python -m prunepath_jax.train` call it):

1. Devices: `jax.distributed.initialize` when asked (multi-host), the (data, fsdp, model) mesh.
2. State: the newest readable checkpoint of `cfg.out_dir` (model, optimiser state, step, rng,
   data position, metrics so far), else the source model — converted, with a task head and the
   fast router initialisation when the config asks — and a fresh optimiser.
3. Steps: one jitted, sharded program per step (tau from the step counter inside it). Every
   `save_every` steps, at the end, on SIGTERM/SIGINT (preemption) and on a non-finite loss, an
   Orbax checkpoint; the non-finite case keeps the last good state and stops with a clear error.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from prunepath_jax import checkpoint as ckpt
from prunepath_jax.loading import abstract_model
from prunepath_jax.nn import set_compute
from prunepath_jax.train import parallel, prepare
from prunepath_jax.train import state as st
from prunepath_jax.train.checkpointing import (
    OPT,
    TRAIN,
    TrainCheckpointer,
    restore_latest,
    with_shardings,
)
from prunepath_jax.train.config import TrainConfig
from prunepath_jax.train.ffn_choice import PathChooser
from prunepath_jax.train.metrics import MetricsWriter
from prunepath_jax.train.step import forward_sums

log = logging.getLogger(__name__)

# Fields a resumed run may change; any other difference is refused (it would be another run).
RUNTIME_FIELDS = {
    "out_dir", "progress", "log_every", "eval_every", "save_every", "keep", "tensorboard",
    "wandb", "eval_tokens", "distributed", "coordinator", "num_processes", "process_id",
    "mesh_data", "mesh_fsdp", "mesh_model", "hold_steps", "source", "ffn_kernels",
    "ffn_kernels_auto",
}  # fmt: skip


class TrainingDiverged(RuntimeError):
    """A step produced a non-finite loss or gradient; the last good state was checkpointed."""


def _compatible(saved: dict, cfg: TrainConfig, where: Path) -> None:
    now = cfg.to_dict()
    for k in sorted(set(saved) | set(now)):
        if k in RUNTIME_FIELDS:
            continue
        if saved.get(k) != now.get(k):
            raise ValueError(
                f"{where}: this run was started with {k}={saved.get(k)!r}, not {now.get(k)!r}; "
                "resume with the same settings or use another out_dir"
            )


def _make_data(cfg: TrainConfig, tokenizer, split: str, seed: int, max_context: int):
    from prunepath_jax.train import data

    source = cfg.data if split == "train" or not cfg.eval_data else cfg.eval_data
    return data.make_data(
        cfg.task,
        tokenizer,
        source,
        split,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        seed=seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        max_context=max_context,
    )


def _calibration(cfg: TrainConfig, data):
    """(tokens, mask) batches of the task's training data for the router initialisation: the
    same examples as training, in another order, without moving the training iterator."""
    n = -(-cfg.router_init_tokens // (cfg.batch_size * cfg.seq_len))
    it = data.with_seed(cfg.seed + 1)
    return [(b["tokens"], b["token_mask"]) for b in itertools.islice(it, max(1, n))]


@dataclasses.dataclass
class Run:
    """Everything the loop holds (returned for tests and scripts)."""

    cfg: TrainConfig
    mesh: Any
    graphdef: Any
    state: st.TrainState
    frozen: Any
    optimizer: Any
    tokenizer: Any
    metadata: dict
    data: Any
    history: list
    model_cfg: Any
    kernel_graphdef: Any = None
    """With ``ffn_kernels_auto``: the model with its FFNs on the kernel registry (``graphdef``
    keeps the masked path); the same parameters fit both."""

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.state.params, self.frozen)


def setup(cfg: TrainConfig, *, pretrained=None, report=print) -> Run:
    """Devices, model, optimiser, data — resumed from `cfg.out_dir` when it holds a checkpoint."""
    parallel.init_distributed(cfg)
    mesh = parallel.mesh_from_config(cfg)
    parallel.check_batch(cfg.batch_size, mesh, cfg.grad_accum)
    out = Path(cfg.out_dir).expanduser().absolute()
    pdtype = jnp.dtype(cfg.param_dtype)

    def abstract_opt(mcfg):
        _, tr, _ = st.split_model(abstract_model(mcfg, pdtype), cfg.mode)
        abstract = jax.eval_shape(st.make_optimizer(cfg, tr).init, tr)
        return with_shardings(abstract, parallel.tree_shardings(abstract, mesh))

    restored = restore_latest(out, abstract_opt_state=abstract_opt, mesh=mesh, dtype=pdtype,
                              report=report)  # fmt: skip
    data = None
    if restored is not None:
        train_json = restored.extra[TRAIN]
        _compatible(train_json["train_config"], cfg, out)
        model, tokenizer = restored.model, restored.tokenizer
        meta = {k: v for k, v in restored.metadata.items() if k not in ckpt._RESERVED_METADATA}
        if tokenizer is None:
            raise ValueError(f"{out}: the checkpoint has no tokenizer directory")
    else:
        pre = pretrained if pretrained is not None else prepare.load_source(cfg, pdtype)
        if pre.tokenizer is None:
            raise ValueError(f"{pre.source}: no tokenizer found next to the model")
        tokenizer = pre.tokenizer
        # Conversion and a task head keep the context length: the data is built once, here.
        data = _make_data(cfg, tokenizer, "train", cfg.seed, pre.config.max_position)
        num_labels = cfg.num_labels or (data.info["n_labels"] if cfg.task == "cls" else 0)
        calib = None
        if cfg.router_init_tokens > 0 and cfg.sparse != "dense":
            calib = _calibration(cfg, data)
        model, meta = prepare.prepare_model(cfg, pre, num_labels=num_labels, calibration=calib)
    mcfg = model.cfg
    if cfg.seq_len > mcfg.max_position:
        raise ValueError(
            f"seq_len {cfg.seq_len} is longer than the model's context ({mcfg.max_position})"
        )

    if cfg.ffn_kernels:
        set_compute(model, "kernel", mesh=mesh)
    graphdef, trainable, frozen = st.split_model(model, cfg.mode)
    kernel_graphdef = None
    if cfg.ffn_kernels_auto:
        set_compute(model, "kernel", mesh=mesh)
        kernel_graphdef = st.split_model(model, cfg.mode)[0]
    optimizer = st.make_optimizer(cfg, trainable)
    trainable = parallel.place(trainable, parallel.tree_shardings(trainable, mesh))
    frozen = parallel.place(frozen, parallel.tree_shardings(frozen, mesh))
    if data is None:
        data = _make_data(cfg, tokenizer, "train", cfg.seed, mcfg.max_position)
    if restored is not None:
        state = st.TrainState(
            jnp.asarray(train_json["step"], jnp.int32),
            trainable,
            restored.extra[OPT],
            jnp.asarray(np.asarray(train_json["rng"], np.uint32)),
        )
        data.set_state(train_json["data"])
        history = list(train_json.get("history", []))
        report(f"resumed {out} at step {train_json['step']}")
    else:
        state = st.init_state(cfg, trainable, optimizer)
        history = []
    state = parallel.place(state, parallel.tree_shardings(state, mesh))
    return Run(cfg, mesh, graphdef, state, frozen, optimizer, tokenizer, meta, data, history, mcfg,
               kernel_graphdef)  # fmt: skip


def agree_on_process0(paths: tuple[str, ...]):
    """``ffn_kernels_auto``'s choice made once for every process: process 0's (processes time
    their own steps, and all of them must run the same program)."""

    def agree(path: str) -> str:
        if jax.process_count() == 1:
            return path
        from jax.experimental import multihost_utils

        i = multihost_utils.broadcast_one_to_all(np.int32(paths.index(path)))
        return paths[int(i)]

    return agree


def _save(run: Run, saver: TrainCheckpointer, step: int, *, wait: bool) -> None:
    train_json = {
        "step": step,
        "rng": np.asarray(jax.device_get(run.state.rng)).tolist(),
        "data": run.data.get_state(),
        "train_config": run.cfg.to_dict(),
        "history": run.history,
    }
    meta = {**run.metadata, "training": {"step": step, "config": run.cfg.to_dict()}}
    saver.save(step, run.model(), run.model_cfg, opt_state=run.state.opt_state,
               train=train_json, metadata=meta, tokenizer=run.tokenizer, wait=wait)  # fmt: skip


def _eval_fn(graphdef, cfg: TrainConfig):
    @jax.jit
    def sums(params, frozen, batch, tau):
        model = st.compute_model(graphdef, params, frozen, cfg.compute_dtype)
        s, stats = forward_sums(model, batch, tau, cfg.task)
        mask = batch["token_mask"].astype(jnp.float32)
        if stats:
            k = jnp.mean(jnp.stack([x.k_t for x in stats]).astype(jnp.float32), axis=0)
            s["k_sum"] = jnp.sum(k * mask)
        s["tokens"] = jnp.sum(mask)
        return s

    return sums


def evaluate(run: Run, batches: list[dict], fn) -> dict:
    """Held-out loss (and accuracy for cls) at the run's target budget."""
    cfg = run.cfg
    tau = jnp.float32(cfg.tau_target if cfg.sparse == "prunepath" else cfg.warmup_tau)
    tot: dict[str, float] = {}
    for local in batches:
        s = jax.device_get(
            fn(run.state.params, run.frozen, parallel.put_batch(local, run.mesh), tau)
        )
        for k, v in s.items():
            tot[k] = tot.get(k, 0.0) + float(v)
    out = {"loss": tot["nll"] / max(tot["count"], 1.0), "tau": float(tau)}
    if cfg.task == "cls":
        out["accuracy"] = tot["correct"] / max(tot["count"], 1.0)
    else:
        out["ppl"] = float(np.exp(out["loss"]))
    e = run.model_cfg.n_experts
    if "k_sum" in tot and e:
        out["k_mean"] = tot["k_sum"] / max(tot["tokens"], 1.0)
        out["sparsity"] = 1.0 - out["k_mean"] / e
    return out


def _eval_batches(run: Run) -> list[dict]:
    """The held-out batches (one pass in data order, capped at `eval_tokens` for lm/sft)."""
    cfg = run.cfg
    if cfg.eval_every == 0:
        return []
    it = _make_data(cfg, run.tokenizer, "validation", cfg.seed, run.model_cfg.max_position)
    batches = it.eval_batches()
    if cfg.task != "cls" and cfg.eval_tokens > 0:
        n = max(1, -(-cfg.eval_tokens // (cfg.batch_size * cfg.seq_len)))
        batches = itertools.islice(batches, n)
    return list(batches)


def run(cfg: TrainConfig, *, pretrained=None, on_step=None, report=print) -> dict:
    """Trains to `cfg.total_steps` (resuming if possible). Returns a summary dict.

    Args:
        cfg: the run.
        pretrained: an already loaded source (`loading.Pretrained`), e.g. in tests.
        on_step: `callback(step, row)` after every step (tests use it to send signals).
        report: one-line messages (resume, skipped checkpoints, preemption).

    Raises:
        TrainingDiverged: a non-finite loss; the last good state is checkpointed first.
    """
    r = setup(cfg, pretrained=pretrained, report=report)
    out = Path(cfg.out_dir).expanduser().absolute()
    start = int(jax.device_get(r.state.step))
    saver = TrainCheckpointer(out, keep=cfg.keep)
    writer = MetricsWriter(out, tensorboard=cfg.tensorboard, wandb_project=cfg.wandb,
                           config=cfg.to_dict(), resume_step=start)  # fmt: skip
    if jax.process_index() == 0:
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    first = next(r.data)
    graphdefs = {"kernels" if cfg.ffn_kernels else "masked": r.graphdef}
    if r.kernel_graphdef is not None:
        graphdefs["kernels"] = r.kernel_graphdef
    shardings = (
        parallel.tree_shardings(r.state, r.mesh),
        parallel.tree_shardings(r.frozen, r.mesh),
    )
    step_fns = {
        path: parallel.jit_train_step(cfg, g, r.optimizer, r.mesh, *shardings, first)
        for path, g in graphdefs.items()
    }
    paths = tuple(step_fns)
    chooser = PathChooser(paths, agree=agree_on_process0(paths)) if len(paths) > 1 else None
    eval_batches = _eval_batches(r)
    eval_fn = _eval_fn(r.graphdef, cfg)
    stop: dict[str, int | None] = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    status, last, ev = "finished", {}, {}
    quiet = not cfg.progress or jax.process_index() > 0
    bar = tqdm(
        total=cfg.total_steps, initial=start, disable=quiet, desc="train", dynamic_ncols=True
    )
    step, local = start, first
    try:
        while step < cfg.total_steps:
            t0 = time.perf_counter()
            path = chooser.next() if chooser else paths[0]
            batch = parallel.put_batch(local, r.mesh)
            r.state, m = step_fns[path](r.state, r.frozen, batch)
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            dt = time.perf_counter() - t0
            if m["ok"] == 0.0:
                _save(r, saver, step, wait=True)
                raise TrainingDiverged(
                    f"step {step + 1}: the loss ({m['loss']}) or gradient norm "
                    f"({m['grad_norm']}) is not finite; the update was not applied and step "
                    f"{step} (the last good state) is saved in {out}. Lower the learning rates "
                    "or check the data, then resume."
                )
            step += 1
            tokens = float(local["token_mask"].sum()) * jax.process_count()
            row = {**m, "tokens_per_s": tokens / dt, "seconds": dt}
            if chooser is not None:
                row["ffn_kernels"] = float(path == "kernels")
                if chooser.record(path, dt, m["sparsity"]) is not None:
                    times = ", ".join(f"{p} {t * 1e3:.1f} ms" for p, t in chooser.medians.items())
                    report(f"ffn_kernels_auto at step {step}, sparsity {m['sparsity']:.2f}: "
                           f"{times} a step (median) -> {chooser.choice}")  # fmt: skip
            r.history.append(
                {k: row[k] for k in ("loss", "task_loss", "tau", "sparsity", "k_mean")}
            )
            if step % cfg.log_every == 0 or step == cfg.total_steps:
                writer.write(step, row)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.3f}", tau=f"{m['tau']:.3f}",
                            sparsity=f"{max(m['sparsity'], 0.0):.2f}", k=f"{m['k_mean']:.1f}",
                            tok_s=f"{row['tokens_per_s']:.0f}")  # fmt: skip
            last = row
            if on_step is not None:
                on_step(step, row)
            if eval_batches and (step % cfg.eval_every == 0 or step == cfg.total_steps):
                ev = evaluate(r, eval_batches, eval_fn)
                writer.write(step, ev, "eval")
            final = step == cfg.total_steps or stop["signal"] is not None
            if step % cfg.save_every == 0 or final:
                _save(r, saver, step, wait=final)
            if stop["signal"] is not None:
                status = "preempted"
                report(f"received signal {stop['signal']}: saved step {step} in {out}; "
                       "run the same command again to resume")  # fmt: skip
                break
            if step < cfg.total_steps:  # after saving: the saved data position is this batch's
                local = next(r.data)
    finally:
        bar.close()
        for s, h in old.items():
            signal.signal(s, h)
        saver.close()
        writer.close()
    return {"status": status, "step": step, "out_dir": str(out), "last": last, "eval": ev}
