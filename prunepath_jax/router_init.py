"""Training-free router initialisation: fit each PrunePath router to its FFN's expert norms.

The paper zero-initialises the routers and learns them by fine-tuning, so a freshly converted
model ranks experts by index (uniform ``p``, deterministic ties) and the τ knob is a blunt static
pruning. Here each router is fitted *locally* in seconds, without backpropagating through the
network:

1. **Capture.** Run the converted model once over calibration text with every expert active and
   no gate scaling (τ = 1.05, gate ``"none"``: exactly the dense model) and record each layer's
   FFN input ``x`` (the normed hidden state) at the real tokens. The forward pass runs on a
   merged *copy* of the model inside one ``jit``, with every FFN wrapped by a recording tap, so
   the caller's model (its gate mode included) is never touched during capture
   (`prunepath_jax.ffn_capture`).
2. **Targets.** For each token, expert e's contribution is ``n_e = ||FFN_e(x)||₂`` (its G neurons
   through its rows of ``w_out``, gate 1), computed exactly through the per-expert Gram matrices
   ``W_e W_eᵀ`` ``[G, G]`` (``O(N·f·G)``, cheaper than the down-projection itself). The target
   distribution is ``q ∝ n^(1/T)``. With ``p ≈ q`` and T = 1 the τ rule keeps the experts that
   carry a fraction τ of the token's summed contribution; a larger T flattens ``p`` towards a
   top-(τ·E) over the fitted ranking (k adapts less to the token and the layers stay evenly
   pruned). On SmolLM2 at matched sparsity T = 4 equals T = 1 at 25% and 50% and is far better
   at 75%, T = 0.5 is worse (results/router_init.jsonl), hence the default T = 4.
3. **Fit.** Minimise ``CE(q, softmax(x W))`` per layer: the least-squares fit of the centred
   ``log q`` in a whitened basis (``x`` of a trained LM is badly conditioned: a few "massive"
   dimensions dominate), then a few Adam steps on minibatches. The least-squares start is
   already within ~0.005 nats of what Adam reaches (the targets are flat, so the softmax is
   nearly linear in the logits); Adam from the raw basis, or at a large learning rate, is worse.
   One compile serves every layer of a shape.
4. **Gate level.** Softmax is shift-invariant but σ(g_e) is not, and the router has no bias.
   The hidden state nearly always has a direction ``u`` with ``x·u ≈ 1`` (fitted by ridge least
   squares), and adding ``c·u 1ᵀ`` to ``W`` shifts every logit of a token by the same
   ``c·(x·u)``: the routing is *unchanged* while the sigmoid gates move towards 1 as ``c``
   grows. ``gate_shift="auto"`` picks ``c`` per layer from a grid by the held-out output error of
   the gated sparse FFN at a few τ; it only matters for gate ``"sigmoid"``.

The report holds per-layer cross-entropies (fitted and held-out), top-1 agreement with the
largest-norm expert, the experts needed to reach 90% of the FFN output (index order = zero router,
fitted router order, norm oracle order), output error and mean k at a few τ, and timings.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from prunepath_jax import routing
from prunepath_jax.ffn_capture import capture_ffn_inputs, prunepath_ffns
from prunepath_jax.models.layers import activation
from prunepath_jax.nn import PrunePathFFN

_SHIFT_GRID = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)
_SHIFT_SLACK = 0.01  # "auto" takes the smallest shift within 1% of the best output error
REPORT_TAUS = (0.5, 0.7, 0.9)


def ffn_params(mlp: PrunePathFFN) -> dict[str, jax.Array | None]:
    """The arrays the pure functions below need, read from one PrunePath FFN.

    `w_in` is returned neuron-major `[c, f, d]`; a module still in the earlier `[d, c, f]` layout
    is transposed (the two are told apart by where the model width `d` sits).
    """
    d = mlp.router.shape[0]
    w_in = mlp.w_in[...]
    if not (w_in.shape[0] in (1, 2) and w_in.shape[2] == d):
        if not (w_in.shape[0] == d and w_in.shape[1] in (1, 2)):
            raise ValueError(f"unrecognised w_in layout {w_in.shape} for model width {d}")
        w_in = jnp.transpose(w_in, (1, 2, 0))
    return {
        "w_in": w_in,
        "b_in": None if mlp.b_in is None else mlp.b_in[...],
        "w_out": mlp.w_out[...],
    }


def expert_activations(params, x_nd, *, act_name: str, gated: bool) -> jax.Array:
    """Hidden activations `[n, f]` (float32) of the FFN at `x`, before the down-projection."""
    h_ncf = jnp.einsum(
        "nd,cfd->ncf",
        x_nd.astype(jnp.float32),
        params["w_in"].astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    if params["b_in"] is not None:
        h_ncf = h_ncf + params["b_in"].astype(jnp.float32)
    act = activation(act_name)
    return act(h_ncf[:, 0]) * h_ncf[:, 1] if gated else act(h_ncf[:, 0])


def expert_norms(params, x_nd, *, e: int, act_name: str, gated: bool) -> jax.Array:
    """`n_e(x) = ||FFN_e(x)||₂` `[n, e]`: expert e's neurons through its rows of `w_out`, gate 1.

    Uses `||a_e W_e||² = a_e (W_e W_eᵀ) a_eᵀ` with the per-expert Gram matrix `[g, g]`, which
    never materialises the `[n, e, d]` per-expert outputs.
    """
    a_neg = expert_activations(params, x_nd, act_name=act_name, gated=gated)
    a_neg = a_neg.reshape(a_neg.shape[0], e, -1)
    w_egd = params["w_out"].astype(jnp.float32).reshape(e, a_neg.shape[-1], -1)
    hp = jax.lax.Precision.HIGHEST
    gram_egh = jnp.einsum("egd,ehd->egh", w_egd, w_egd, precision=hp)
    sq_ne = jnp.sum(a_neg * jnp.einsum("neg,egh->neh", a_neg, gram_egh, precision=hp), axis=-1)
    return jnp.sqrt(jnp.maximum(sq_ne, 0.0))


def expert_outputs(params, x_nd, *, e: int, act_name: str, gated: bool) -> jax.Array:
    """Per-expert outputs `[n, e, d]` (no output bias): for diagnostics on a few tokens only."""
    a_neg = expert_activations(params, x_nd, act_name=act_name, gated=gated)
    a_neg = a_neg.reshape(a_neg.shape[0], e, -1)
    w_egd = params["w_out"].astype(jnp.float32).reshape(e, a_neg.shape[-1], -1)
    return jnp.einsum("neg,egd->ned", a_neg, w_egd, precision=jax.lax.Precision.HIGHEST)


def norm_targets(n_ne: jax.Array, temperature: float = 1.0) -> jax.Array:
    """`q ∝ n^(1/T)` per token; T < 1 sharpens. All-zero rows (dead tokens) become uniform."""
    logn_ne = jnp.log(jnp.maximum(n_ne, 1e-30)) / temperature
    return jax.nn.softmax(logn_ne, axis=-1)


def soft_ce(w_de: jax.Array, x_nd: jax.Array, q_ne: jax.Array) -> jax.Array:
    """Mean over tokens of `CE(q, softmax(x W))` in nats (the fitting loss)."""
    logp_ne = jax.nn.log_softmax(routing.router_logits(w_de, x_nd), axis=-1)
    return -jnp.mean(jnp.sum(q_ne * logp_ne, axis=-1))


def whitening(x_nd: jax.Array, ridge: float = 1e-3) -> jax.Array:
    """`P [d, d]` with `(x P)` having (about) identity second moment: a symmetric `C^{-1/2}`.

    Uncentred on purpose: the router has no bias, so the constant part of `x` is a feature it
    must keep. `ridge` (relative to the mean eigenvalue) caps the gain of near-null directions.
    """
    c_dd = jnp.einsum("nd,ne->de", x_nd, x_nd, precision=jax.lax.Precision.HIGHEST)
    c_dd = c_dd / x_nd.shape[0]
    lam_d, v_dd = jnp.linalg.eigh(c_dd)
    lam_d = jnp.maximum(lam_d, 0.0) + ridge * jnp.mean(lam_d)
    return (v_dd * lam_d**-0.5) @ v_dd.T


@functools.partial(jax.jit, static_argnames=("steps", "batch", "warm_start"))
def fit_router(
    x_nd: jax.Array,
    q_ne: jax.Array,
    key: jax.Array,
    *,
    steps: int,
    lr: float,
    batch: int,
    warm_start: bool = True,
    ridge: float = 1e-3,
    weight_decay: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Router `W [d, e]` minimising `CE(q, softmax(x W))`, and the loss per step `[steps]`.

    Adam in the whitened basis `z = x P` (a well-conditioned problem, so a few hundred steps of
    one learning rate suit every layer), warm started from the least-squares fit of the centred
    `log q` (exact when `q` is a softmax of a linear function of `x`).
    """
    n = x_nd.shape[0]
    p_dd = whitening(x_nd, ridge)
    z_nd = x_nd @ p_dd
    if warm_start:
        logq_ne = jnp.log(jnp.maximum(q_ne, 1e-30))
        logq_ne = logq_ne - jnp.mean(logq_ne, axis=-1, keepdims=True)
        v0_de = jnp.einsum("nd,ne->de", z_nd, logq_ne) / n
    else:
        v0_de = jnp.zeros((x_nd.shape[1], q_ne.shape[1]), jnp.float32)
    opt = optax.adamw(lr, weight_decay=weight_decay)

    def loss(v_de, z, q):
        logp = jax.nn.log_softmax(z @ v_de, axis=-1)
        return -jnp.mean(jnp.sum(q * logp, axis=-1))

    def step(carry, k):
        v_de, state = carry
        idx = jax.random.randint(k, (batch,), 0, n)
        val, grad = jax.value_and_grad(loss)(v_de, z_nd[idx], q_ne[idx])
        upd, state = opt.update(grad, state, v_de)
        return (optax.apply_updates(v_de, upd), state), val

    (v_de, _), losses = jax.lax.scan(step, (v0_de, opt.init(v0_de)), jax.random.split(key, steps))
    return p_dd @ v_de, losses


def constant_direction(x_nd: jax.Array, ridge: float = 1e-3) -> tuple[jax.Array, jax.Array]:
    """`u [d]` with `x·u ≈ 1` (ridge least squares) and the per-token values `x·u` `[n]`.

    Adding `c·u 1ᵀ` to a router shifts all of a token's logits by `c·(x·u)`: `p`, and with it the
    selection, does not change, only the sigmoid gates do.
    """
    c_dd = jnp.einsum("nd,ne->de", x_nd, x_nd, precision=jax.lax.Precision.HIGHEST)
    c_dd = c_dd / x_nd.shape[0]
    lam = ridge * jnp.trace(c_dd) / c_dd.shape[0]
    u_d = jnp.linalg.solve(c_dd + lam * jnp.eye(c_dd.shape[0]), jnp.mean(x_nd, axis=0))
    return u_d, x_nd @ u_d


def sparse_output_error(
    w_de: jax.Array, x_nd: jax.Array, y_ned: jax.Array, tau, *, gate_mode: str, rule: str
) -> tuple[jax.Array, jax.Array]:
    """Relative output error `Σ||y − ŷ_τ||² / Σ||y||²` of the routed FFN, and the mean k."""
    logits = routing.router_logits(w_de, x_nd)
    sel = routing.select(logits, tau, rule=rule)
    return _gated_error(routing.gates(logits, sel.mask_te, gate_mode), y_ned), jnp.mean(
        sel.k_t.astype(jnp.float32)
    )


def _gated_error(g_ne: jax.Array, y_ned: jax.Array) -> jax.Array:
    y_nd = jnp.sum(y_ned, axis=1)
    return jnp.sum((y_nd - jnp.einsum("ne,ned->nd", g_ne, y_ned)) ** 2) / jnp.sum(y_nd**2)


def experts_for_fraction(order_ne: jax.Array, y_ned: jax.Array, frac: float = 0.9) -> jax.Array:
    """Mean number of experts, taken in `order`, until `||y − ŷ_k|| ≤ (1 − frac)·||y||`."""
    y_nd = jnp.sum(y_ned, axis=1)
    ys_ned = jnp.take_along_axis(y_ned, order_ne[..., None], axis=1)
    resid_nk = jnp.linalg.norm(y_nd[:, None] - jnp.cumsum(ys_ned, axis=1), axis=-1)
    ok_nk = resid_nk <= (1.0 - frac) * jnp.linalg.norm(y_nd, axis=-1, keepdims=True)
    return jnp.mean(jnp.argmax(ok_nk, axis=1).astype(jnp.float32) + 1.0)


def _order(score_ne: jax.Array) -> jax.Array:
    return jnp.argsort(-score_ne, axis=-1, stable=True)


@functools.partial(jax.jit, static_argnames=("e", "act_name", "gated", "gate_mode", "rule"))
def _diagnose(params, w0_de, w_de, u_d, x_nd, *, e, act_name, gated, gate_mode, rule):
    """Held-out diagnostics of one layer (per-expert outputs of a few hundred tokens).

    k90 of three orders (expert index = the zero router's ties, fitted router, norm oracle); the
    output error and mean k at `REPORT_TAUS` with gate "none", with sigmoid gates for every shift
    of `_SHIFT_GRID` (the selection is shift-invariant, so it is made once per τ), and for the
    router the layer had before (with the layer's gate mode); top-1 agreement with the norms.
    """
    y_ned = expert_outputs(params, x_nd, e=e, act_name=act_name, gated=gated)
    n_ne = jnp.linalg.norm(y_ned, axis=-1)
    logits = routing.router_logits(w_de, x_nd)
    index_ne = jnp.broadcast_to(jnp.arange(e), n_ne.shape)
    out = {
        "k90": {
            "index": experts_for_fraction(index_ne, y_ned),
            "router": experts_for_fraction(_order(logits), y_ned),
            "oracle": experts_for_fraction(_order(n_ne), y_ned),
        },
        "top1": jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(n_ne, -1)),
    }
    xu_n = x_nd @ u_d
    err_none, k_mean, err_sig = [], [], []
    for tau in REPORT_TAUS:
        sel = routing.select(logits, tau, rule=rule)
        err_none.append(_gated_error(sel.mask_te.astype(jnp.float32), y_ned))
        k_mean.append(jnp.mean(sel.k_t.astype(jnp.float32)))
        err_sig.append(
            jnp.stack(
                [
                    _gated_error(
                        jnp.where(sel.mask_te, jax.nn.sigmoid(logits + c * xu_n[:, None]), 0.0),
                        y_ned,
                    )
                    for c in _SHIFT_GRID
                ]
            )
        )
    zero = [
        sparse_output_error(w0_de, x_nd, y_ned, t, gate_mode=gate_mode, rule=rule)
        for t in REPORT_TAUS
    ]
    out.update(
        err_sigmoid_ct=jnp.stack(err_sig, axis=1),
        err_none_t=jnp.stack(err_none),
        k_t=jnp.stack(k_mean),
        err_before_t=jnp.stack([v[0] for v in zero]),
        k_before_t=jnp.stack([v[1] for v in zero]),
    )
    return out


@functools.partial(jax.jit, static_argnames=("e", "act_name", "gated", "temperature"))
def router_targets(params, x_nd, *, e, act_name, gated, temperature=1.0):
    """Target distributions `q [n, e]`, `q ∝ ||FFN_e(x)||^(1/T)`, from the FFN at `x`."""
    score_ne = expert_norms(params, x_nd, e=e, act_name=act_name, gated=gated)
    return norm_targets(score_ne, temperature)


def init_routers(
    model: nnx.Module,
    token_batches: Iterable[tuple[Any, Any]],
    *,
    max_tokens: int | None = 16384,
    seed: int = 0,
    **fit_kwargs,
) -> tuple[nnx.Module, dict]:
    """Captures calibration FFN inputs and fits every router (`capture_ffn_inputs`, then
    `fit_routers`, whose keyword arguments it forwards). Modifies `model` in place.

    Args:
        model: a PrunePath model (from `to_prunepath`), any family.
        token_batches: calibration `(tokens_bt, mask_bt)` pairs (mask 1 = real token).
        max_tokens: calibration tokens kept (seeded subsample), None for all.
        seed: subsampling, held-out split and minibatch seed (same seed, same routers).
        **fit_kwargs: `steps`, `lr`, `temperature`, `gate_shift`, ... of `fit_routers`.

    Returns:
        `(model, report)` as `fit_routers`, with the capture time in `report["seconds"]`.
    """
    t0 = time.perf_counter()
    xs = capture_ffn_inputs(model, token_batches, max_tokens=max_tokens, seed=seed)
    t_capture = time.perf_counter() - t0
    model, report = fit_routers(model, xs, seed=seed, **fit_kwargs)
    report["options"]["max_tokens"] = max_tokens
    report["seconds"]["capture"] = t_capture
    report["seconds"]["total"] = time.perf_counter() - t0
    return model, report


def fit_routers(
    model: nnx.Module,
    xs: Sequence[np.ndarray],
    *,
    steps: int = 100,
    lr: float = 1e-3,
    batch: int = 1024,
    target: str = "norm",
    temperature: float = 4.0,
    heldout: float = 0.1,
    gate_shift: str | float | None = "auto",
    warm_start: bool = True,
    ridge: float = 1e-2,
    n_diag: int = 512,
    seed: int = 0,
) -> tuple[nnx.Module, dict]:
    """Fits every PrunePath router of `model` to its FFN's expert norms (in place).

    Each layer is fitted on its own captured inputs (no backpropagation through the network):
    the targets cost one FFN forward over the calibration tokens, the fit a least-squares solve
    plus `steps` small Adam steps, one compile for all layers of a shape. Only `router` changes;
    the gate mode, k clamps and compute path of the FFNs are left as they are.

    Args:
        model: a PrunePath model (from `to_prunepath`), any family.
        xs: per-layer FFN inputs `[n, d]` from `capture_ffn_inputs` (same tokens every layer).
        steps: Adam steps per layer after the least-squares warm start (0: the warm start only).
        lr: Adam learning rate, in the whitened basis (so one value suits every layer).
        batch: tokens per Adam step (capped at the number of fitting tokens).
        target: `"norm"`, `q ∝ ||FFN_e(x)||^(1/T)` (the one implemented target).
        temperature: T. Larger T flattens p, so k depends less on the token and τ acts more
            like a top-(τ·E) over the fitted ranking; T < 1 sharpens. See the module docstring
            for why the default is 4. The ranking (and k90) hardly depends on T.
        heldout: fraction of the tokens kept out of the fit, for the report's held-out numbers
            and the gate-shift choice.
        gate_shift: gate "sigmoid" only. "auto": per layer, the smallest shift `c` of the grid
            whose held-out sparse-output error is within 1% of the best (gates as close to 1 as
            needed, but not saturated further, which would kill the sigmoid's gradient in later
            fine-tuning); a number: that `c`; None: no shift (gates σ(g) straight from the fit).
            Ignored for gate "none", where a shift changes nothing.
        warm_start: start Adam from the least-squares fit of the centred `log q`.
        ridge: relative ridge of the whitening and of the constant direction.
        n_diag: held-out tokens for the per-expert-output diagnostics.
        seed: held-out split and minibatch seed (same seed, same routers).

    Returns:
        `(model, report)`: the same model object with fitted routers, and a dict with `layers`
        (one dict per layer, see the module docstring), `seconds` and `options`.
    """
    if target != "norm":
        raise ValueError(f"target must be 'norm', got {target!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t_start = time.perf_counter()
    ffns = prunepath_ffns(model)
    if len(xs) != len(ffns):
        raise ValueError(f"got inputs for {len(xs)} layers, the model has {len(ffns)}")
    n = xs[0].shape[0]
    n_hold = int(round(heldout * n)) if n >= 4 else 0
    perm = np.random.default_rng(seed).permutation(n)
    fit_idx, hold_idx = np.sort(perm[n_hold:]), np.sort(perm[:n_hold])
    key = jax.random.key(seed)
    layers = []
    for i, (mlp, x_all) in enumerate(zip(ffns, xs, strict=True)):
        t0 = time.perf_counter()
        params = ffn_params(mlp)
        static = {"e": mlp.e, "act_name": mlp.act_name, "gated": mlp.gated}
        x_fit, x_hold = jnp.asarray(x_all[fit_idx]), jnp.asarray(x_all[hold_idx])
        q_fit = router_targets(params, x_fit, temperature=temperature, **static)
        w0_de = jnp.asarray(mlp.router[...], jnp.float32)
        w_de, losses = fit_router(
            x_fit,
            q_fit,
            jax.random.fold_in(key, i),
            steps=steps,
            lr=lr,
            batch=min(batch, x_fit.shape[0]),
            warm_start=warm_start,
            ridge=ridge,
        )
        u_d, xu_n = constant_direction(x_fit, ridge)
        row: dict[str, Any] = {
            "layer": i,
            "ce_before": float(soft_ce(w0_de, x_fit, q_fit)),
            "ce_after": float(soft_ce(w_de, x_fit, q_fit)),
            "ce_min": float(jnp.mean(-jnp.sum(q_fit * jnp.log(jnp.maximum(q_fit, 1e-30)), -1))),
            "xu_mean_std": [float(jnp.mean(xu_n)), float(jnp.std(xu_n))],
        }
        shift = 0.0
        if mlp.gate_mode == "sigmoid" and isinstance(gate_shift, (int, float)):
            shift = float(gate_shift)
        if n_hold:
            q_hold = router_targets(params, x_hold, temperature=temperature, **static)
            row["ce_before_heldout"] = float(soft_ce(w0_de, x_hold, q_hold))
            row["ce_after_heldout"] = float(soft_ce(w_de, x_hold, q_hold))
            rules = {"gate_mode": mlp.gate_mode, "rule": mlp.rule, **static}
            diag = jax.device_get(_diagnose(params, w0_de, w_de, u_d, x_hold[:n_diag], **rules))
            err_c = diag["err_sigmoid_ct"].mean(axis=1)
            if mlp.gate_mode == "sigmoid" and gate_shift == "auto":
                ok = np.flatnonzero(err_c <= (1.0 + _SHIFT_SLACK) * err_c.min())
                shift = float(_SHIFT_GRID[int(ok[0])])
            row.update(
                top1_agreement=float(diag["top1"]),
                k90={k: float(v) for k, v in diag["k90"].items()},
                taus=list(REPORT_TAUS),
                k_mean=diag["k_t"].tolist(),
                err_none=diag["err_none_t"].tolist(),
                err_sigmoid_by_shift={
                    str(c): diag["err_sigmoid_ct"][j].tolist() for j, c in enumerate(_SHIFT_GRID)
                },
                k_mean_before=diag["k_before_t"].tolist(),
                err_before=diag["err_before_t"].tolist(),
            )
        elif gate_shift == "auto" and mlp.gate_mode == "sigmoid":
            raise ValueError('gate_shift="auto" needs held-out tokens (heldout > 0)')
        row["gate_shift"] = shift
        mlp.router[...] = (w_de + shift * u_d[:, None]).astype(mlp.router[...].dtype)
        row["seconds"] = time.perf_counter() - t0
        layers.append(row)
    total = time.perf_counter() - t_start
    options = dict(
        steps=steps, lr=lr, batch=batch, target=target, temperature=temperature, heldout=heldout,
        gate_shift=gate_shift, warm_start=warm_start, ridge=ridge, seed=seed,
    )  # fmt: skip
    report = {
        "n_tokens": int(n),
        "n_fit": int(len(fit_idx)),
        "n_heldout": int(n_hold),
        "seconds": {"capture": 0.0, "fit": total, "total": total},
        "options": options,
        "layers": layers,
    }
    return model, report


def summarise(report: dict) -> dict[str, float]:
    """Layer means of the report's main numbers (for a one-line log)."""
    rows = report["layers"]

    def mean(f: str):
        vals = [r[f] for r in rows if f in r]
        return float(np.mean(vals)) if vals else float("nan")

    out = {f: mean(f) for f in ("ce_before", "ce_after", "ce_after_heldout", "top1_agreement")}
    for k in ("index", "router", "oracle"):
        vals = [r["k90"][k] for r in rows if "k90" in r]
        out[f"k90_{k}"] = float(np.mean(vals)) if vals else float("nan")
    out["seconds"] = report["seconds"]["total"]
    return out
