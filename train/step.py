"""The pure training step: PrunePath's objective under the progressive tau schedule.

`L = L_task + eta * L_ent + lam * L_bal + mu * L_gate`, the auxiliary terms from the routing
statistics the forward pass returns (averaged over layers, masked to real tokens). tau comes from
the step counter inside the step (a traced scalar), so the whole schedule is one compiled program.

The hard expert selection is not differentiated (as in the paper): routers learn through the
sigmoid gates of selected experts (task loss) and through p in L_ent / L_bal.

Gradient accumulation splits the batch into `grad_accum` micro-batches scanned in order; the task
loss is normalised by the token count of the *whole* batch, so the accumulated gradient equals the
one-batch gradient (the auxiliary losses are averaged over micro-batches, which differs from the
whole-batch value only through the nonlinearity of L_bal in p-bar).

A step whose loss or gradient norm is not finite leaves the state unchanged and reports `ok = 0`;
the loop stops there with a checkpoint of the last good state.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from prunepath_jax import routing
from prunepath_jax.config import ModelConfig
from prunepath_jax.nn import route_args
from prunepath_jax.train.config import TrainConfig
from prunepath_jax.train.state import TrainState, compute_model

_AUX_MEANS = ("ent", "bal", "gate", "k_mean", "sparsity")  # averaged over micro-batches
_SUMS = ("nll", "count", "correct")  # added over micro-batches


def tau_at(step: jax.Array, cfg: TrainConfig) -> jax.Array:
    """The schedule: `warmup_tau` for `warmup_steps`, then 1.0 -> tau_target linearly over
    `decay_steps`, then held. Static top-k and dense runs hold `warmup_tau` (every expert passes
    the budget; static top-k's k_max clamp then picks exactly k)."""
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.float32(cfg.warmup_tau)
    if cfg.sparse != "prunepath":
        return warm
    t = step - cfg.warmup_steps
    frac = jnp.clip(t / max(cfg.decay_steps, 1), 0.0, 1.0) if cfg.decay_steps else 1.0
    tau = 1.0 - (1.0 - cfg.tau_target) * frac
    return jnp.where(step < cfg.warmup_steps, warm, tau).astype(jnp.float32)


def forward_sums(model: nnx.Module, batch: dict, tau, task: str) -> tuple[dict, tuple]:
    """Task-loss sums (nll sum, count, correct) and per-layer routing stats of one batch."""
    mcfg: ModelConfig = model.cfg
    mask_bt = batch["token_mask"].astype(jnp.float32)
    args = route_args(mcfg, tau, mask_bt) if mcfg.prunepath is not None else None
    if task == "cls":
        if mcfg.family == "bert":
            types_bt = batch.get("token_types")  # sentence pairs (e.g. MNLI) only
            out = model(batch["tokens"], mask_bt.astype(jnp.int32), types_bt, ffn_args=args)
        else:
            out = model(batch["tokens"], ffn_args=args, logit_index_b=batch["last_index"])
        logits_bl = out.logits.astype(jnp.float32)
        labels_b = batch["labels"]
        nll_b = (
            jax.nn.logsumexp(logits_bl, -1)
            - jnp.take_along_axis(logits_bl, labels_b[:, None], -1)[:, 0]
        )
        # Evaluation batches pad the last one with filler rows (example_mask 0).
        ex_b = batch.get("example_mask", jnp.ones(nll_b.shape, jnp.float32))
        hit_b = (jnp.argmax(logits_bl, -1) == labels_b).astype(jnp.float32)
        sums = {
            "nll": jnp.sum(nll_b * ex_b),
            "count": jnp.sum(ex_b),
            "correct": jnp.sum(hit_b * ex_b),
        }
    else:
        out = model(batch["tokens"], ffn_args=args)
        logits_btv = out.logits.astype(jnp.float32)
        lm_bt = batch["loss_mask"].astype(jnp.float32)
        lse_bt = jax.nn.logsumexp(logits_btv, -1)
        tgt_bt = jnp.take_along_axis(logits_btv, batch["targets"][..., None], -1)[..., 0]
        sums = {"nll": jnp.sum((lse_bt - tgt_bt) * lm_bt), "count": jnp.sum(lm_bt)}
        sums["correct"] = jnp.float32(0.0)
    stats = tuple(s for s in out.ffn_stats if s is not None)
    return sums, stats


def aux_terms(stats: tuple, mcfg: ModelConfig) -> dict:
    """Layer-averaged auxiliary losses and sparsity figures (zeros for a dense model)."""
    if not stats:
        z = jnp.float32(0.0)
        return {"ent": z, "bal": z, "gate": z, "k_mean": z, "sparsity": z}
    st = routing.stack_stats(stats)
    k_mean = jnp.mean(st.k_mean)
    return {
        "ent": routing.entropy_loss(st),
        "bal": routing.balance_loss(st),
        "gate": routing.gate_loss(st),
        "k_mean": k_mean,
        "sparsity": 1.0 - k_mean / mcfg.n_experts,
    }


def _loss(params, frozen, graphdef, batch, tau, n_task, aux_scale, cfg: TrainConfig):
    model = compute_model(graphdef, params, frozen, cfg.compute_dtype)
    sums, stats = forward_sums(model, batch, tau, cfg.task)
    aux = aux_terms(stats, model.cfg)
    task = sums["nll"] / n_task
    weighted = cfg.eta * aux["ent"] + cfg.lam * aux["bal"] + cfg.mu * aux["gate"]
    return task + aux_scale * weighted, {**aux, **{k: sums[k] for k in _SUMS}}


def _split_micro(batch: dict, a: int) -> dict:
    return {k: v.reshape(a, v.shape[0] // a, *v.shape[1:]) for k, v in batch.items()}


def train_step(
    state: TrainState,
    frozen: Any,
    batch: dict,
    *,
    graphdef: Any,
    optimizer: optax.GradientTransformation,
    cfg: TrainConfig,
) -> tuple[TrainState, dict]:
    """One optimiser step. Pure: jit it with `static` graphdef/optimizer/cfg (see loop.py).

    Returns:
        `(new_state, metrics)`; metrics are float32 scalars: loss, task_loss, ent, bal, gate,
        k_mean, sparsity, tau, grad_norm, lr-free `ok` (1 if the update was applied), tokens.
    """
    tau = tau_at(state.step, cfg)
    if cfg.task == "cls":
        n_task = jnp.float32(batch["tokens"].shape[0])
    else:
        n_task = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    grad_fn = jax.value_and_grad(_loss, has_aux=True)
    a = cfg.grad_accum
    if a == 1:
        (loss, aux), grads = grad_fn(state.params, frozen, graphdef, batch, tau, n_task, 1.0, cfg)
    else:
        # Each micro-batch's task term is divided by the whole batch's count and its auxiliary
        # term by `a`, so the summed losses and gradients are the one-batch ones (see above).
        def body(carry, mb):
            g_acc, l_acc, aux_acc = carry
            (loss_i, aux), g = grad_fn(
                state.params, frozen, graphdef, mb, tau, n_task, 1.0 / a, cfg
            )
            g_acc = jax.tree.map(jnp.add, g_acc, g)
            aux_acc = jax.tree.map(jnp.add, aux_acc, aux)
            return (g_acc, l_acc + loss_i, aux_acc), None

        zeros_g = jax.tree.map(jnp.zeros_like, state.params)
        aux0 = {k: jnp.float32(0.0) for k in (*_AUX_MEANS, *_SUMS)}
        (grads, loss, aux_sum), _ = jax.lax.scan(
            body, (zeros_g, jnp.float32(0.0), aux0), _split_micro(batch, a)
        )
        mean_aux = {k: aux_sum[k] / a for k in _AUX_MEANS}
        aux = {**aux_sum, **mean_aux}

    grad_norm = jnp.sqrt(
        sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads))
    )
    updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def keep(new, old):
        return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

    new_state = TrainState(
        step=state.step + ok.astype(jnp.int32),
        params=keep(new_params, state.params),
        opt_state=keep(new_opt, state.opt_state),
        rng=state.rng,
    )
    metrics = {
        "loss": loss,
        "task_loss": aux["nll"] / n_task,
        "ent": aux["ent"],
        "bal": aux["bal"],
        "gate": aux["gate"],
        "k_mean": aux["k_mean"],
        "sparsity": aux["sparsity"],
        "tau": tau,
        "grad_norm": grad_norm,
        "ok": ok.astype(jnp.float32),
        "count": aux["count"],
        "correct": aux["correct"],
    }
    return new_state, metrics
