"""Pure-jnp ground truth for the sparse FFN kernels (the masked XLA math of `PrunePathFFN`).

Every kernel backend (Triton through jax-triton, Pallas on the Triton backend) computes one
PrunePath FFN layer on a flat batch of tokens and must match :func:`sparse_ffn_reference`:

    logits_te = x_td @ router_de                       (float32)
    sel       = routing.select(logits_te, tau, ...)     (cumulative softmax mass under tau)
    gate_te   = routing.gates(logits_te, sel.mask_te)   (sigmoid of the raw logit, 0 if unselected)
    y_td      = sum_e gate_te[:, e] * act(x W_in[e]) @ W_out[e]

with expert e the neurons ``[e*G, (e+1)*G)``. The reference upcasts everything to float32 and
runs the matmuls at HIGHEST precision, so it is the "fp32 accumulation everywhere" result the
kernels aim for; the output is cast back to x's dtype, as the kernels do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prunepath_jax import routing
from prunepath_jax.models.layers import activation as _activation

_HI = jax.lax.Precision.HIGHEST


def check_logits(logits_te: jax.Array, t: int, e: int) -> None:
    """A caller's precomputed router logits must be the float32 ``[t, E]`` the router makes:
    anything else would route from the wrong numbers silently."""
    if logits_te.shape != (t, e) or logits_te.dtype != jnp.float32:
        raise ValueError(f"logits_te must be float32 [t, E] = [{t}, {e}], got "
                         f"{logits_te.dtype} {list(logits_te.shape)}")  # fmt: skip


def route_reference(
    x_td: jax.Array,
    router_de: jax.Array,
    tau,
    *,
    rule: routing.Rule = "paper",
    gate: routing.GateMode = "sigmoid",
    k_min: int = 1,
    k_max: int | None = None,
    logits_te: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The routing half of the layer, as the kernels must reproduce it.

    ``logits_te``: the router logits of ``x_td`` when the caller has them already (the model
    layer computes them for its routing statistics); computed here otherwise.

    Returns:
        ``(logits_te f32, mask_te bool, gate_te f32 (0 where unselected), k_t int32)``.
    """
    if logits_te is None:
        logits_te = routing.router_logits(router_de, x_td)
    sel = routing.select(logits_te, tau, rule=rule, k_min=k_min, k_max=k_max)
    gate_te = routing.gates(logits_te, sel.mask_te, gate)
    return logits_te, sel.mask_te, gate_te, sel.k_t


def expert_ffn_reference(
    x_td: jax.Array,
    gate_te: jax.Array,
    w_in_cfd: jax.Array,
    w_out_fd: jax.Array,
    *,
    group_size: int,
    activation: str = "silu",
    b_in_cf: jax.Array | None = None,
) -> jax.Array:
    """``sum_e gate_te[:, e] * act(x W_in[e]) @ W_out[e]`` in float32 (no output bias).

    The experts half alone, so a kernel can be checked with the gates it was given.
    """
    x = x_td.astype(jnp.float32)
    h_tcf = jnp.einsum("td,cfd->tcf", x, w_in_cfd.astype(jnp.float32), precision=_HI)
    if b_in_cf is not None:
        h_tcf = h_tcf + b_in_cf.astype(jnp.float32)
    act = _activation(activation)
    a_tf = act(h_tcf[:, 0]) * h_tcf[:, 1] if h_tcf.shape[1] == 2 else act(h_tcf[:, 0])
    scale_tf = jnp.repeat(gate_te.astype(jnp.float32), group_size, axis=-1)
    return jnp.matmul(a_tf * scale_tf, w_out_fd.astype(jnp.float32), precision=_HI)


def sparse_ffn_reference(
    x_td: jax.Array,
    router_de: jax.Array,
    w_in_cfd: jax.Array,
    w_out_fd: jax.Array,
    tau,
    *,
    group_size: int,
    activation: str = "silu",
    b_in_cf: jax.Array | None = None,
    b_out_d: jax.Array | None = None,
    rule: routing.Rule = "paper",
    gate: routing.GateMode = "sigmoid",
    k_min: int = 1,
    k_max: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One PrunePath FFN layer on ``x_td [t, d]``: ``(y_td in x's dtype, k_t int32 [t])``.

    Same signature as `prunepath_jax.kernels.api.sparse_ffn` minus ``implementation``. Works
    under jit with tau traced; handles every family (GELU with biases too).
    """
    c, f, d = w_in_cfd.shape
    if f % group_size:
        raise ValueError(f"group_size {group_size} does not divide the FFN width {f}")
    if x_td.ndim != 2 or x_td.shape[1] != d or router_de.shape != (d, f // group_size):
        raise ValueError(
            f"shape mismatch: x {x_td.shape}, router {router_de.shape}, w_in {w_in_cfd.shape}"
        )
    _, _, gate_te, k_t = route_reference(
        x_td, router_de, tau, rule=rule, gate=gate, k_min=k_min, k_max=k_max
    )
    y = expert_ffn_reference(
        x_td, gate_te, w_in_cfd, w_out_fd, group_size=group_size, activation=activation,
        b_in_cf=b_in_cf,
    )  # fmt: skip
    if b_out_d is not None:
        y = y + b_out_d.astype(jnp.float32)
    return y.astype(x_td.dtype), k_t
