"""TEAL-style magnitude activation sparsity as a quality baseline for the same FFN weights.

Why. The kernel results compare PrunePath's decode speed with TEAL's published 1.53× / 1.8×
(Liu et al. 2024, "Training-Free Activation Sparsity in Large Language Models"), the baseline a
user would otherwise pick: no training, no routers, zero the small entries of each projection's
input and skip the matching weight columns. A speed ratio says little without the quality each
method keeps at the same fraction of weight bytes skipped, so the sweep can put TEAL's
perplexity next to PrunePath's, on the same model and text.

What. TEAL's uniform variant, restricted to the FFN (the part PrunePath sparsifies): per layer
two magnitude thresholds, one on the FFN input ``x`` (skips columns of W_gate and W_up) and one
on the intermediate activation ``a = act(x W_gate) * (x W_up)`` (skips rows of W_down), each the
``p``-quantile of that tensor's magnitudes over calibration text run through the dense model.
(TEAL proper also sparsifies the attention projections and allocates ``p`` per tensor
greedily; neither is here.) The FFN computes ``W_down (a * [|a| >= t_a])`` with
``a`` from ``x * [|x| >= t_x]``: the dense FFN when both thresholds are 0.

The sparsity reported is the fraction of the FFN's weight bytes a token does *not* read:
``(c·s_x + s_a) / (c + 1)`` with ``c`` input projections (2 for SwiGLU), ``s_x`` and ``s_a``
the fractions of zeroed entries, measured per token on the evaluated text. For PrunePath the
same fraction is ``1 - k/E``, so the two columns compare like for like. This module measures
quality; ``kernels/triton_teal.py`` is the same math as decode kernels (input-major weights,
the rows of small inputs not read), for the speed side.

``teal_model(route=True)`` keeps PrunePath's own selection and gates and applies the
thresholds inside the selected experts: with ``t_x = 0`` that is TEAL's down-row threshold on
PrunePath, whose skipped W_down rows are contiguous (``prunepath sweep --teal-down``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prunepath_jax import routing
from prunepath_jax.convert import layer_list
from prunepath_jax.ffn_capture import capture_ffn_inputs, prunepath_ffns
from prunepath_jax.models.layers import activation
from prunepath_jax.nn import PrunePathFFN


class TealStats(NamedTuple):
    """One layer's TEAL statistics, returned from the forward pass like ``RouteStats``.

    Attributes:
        read_t: float32 ``[b, t]``, the fraction of the FFN's weight bytes each token reads.
        kept_x_t: float32 ``[b, t]``, the fraction of the FFN input's entries kept (the rest of
            ``read_t`` is the intermediate activation's).
    """

    read_t: jax.Array
    kept_x_t: jax.Array


def check_sparsities(sparsities: Sequence[float]) -> None:
    """Raises ValueError unless every target sparsity is a finite number in [0, 1)."""
    bad = [p for p in sparsities if not (np.isfinite(p) and 0.0 <= float(p) < 1.0)]
    if bad:
        raise ValueError(f"TEAL sparsities must be in [0, 1), got {bad}")


def _intermediate(x_btd, w_in_cfd, b_in_cf, act_name: str) -> jax.Array:
    """The FFN's intermediate activation ``act(x W_gate) * (x W_up)`` (c = 2) or ``act(x W)``."""
    h = jnp.einsum("btd,cfd->btcf", x_btd, w_in_cfd)
    if b_in_cf is not None:
        h = h + b_in_cf
    act = activation(act_name)
    return act(h[..., 0, :]) * h[..., 1, :] if w_in_cfd.shape[0] == 2 else act(h[..., 0, :])


def teal_ffn(
    x_btd: jax.Array,
    w_in_cfd: jax.Array,
    w_out_fd: jax.Array,
    b_in_cf: jax.Array | None,
    b_out_d: jax.Array | None,
    act_name: str,
    t_x: jax.Array,
    t_a: jax.Array,
    route_btf: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The FFN with TEAL's two magnitude thresholds: ``(y_btd, read_bt, kept_x_bt)``.

    ``w_in_cfd`` holds the input projections neuron-major (``c`` = 2: gate then up, SwiGLU;
    1: a GELU MLP); ``read_bt`` is the fraction of the weight bytes the token reads,
    ``kept_x_bt`` the fraction of its input entries kept. ``route_btf`` = ``(selected,
    scale)`` per neuron (PrunePath's experts and gates, repeated over their neurons) keeps only
    the selected neurons, scaled: TEAL *within* PrunePath's experts. A token then reads its
    selected neurons' gate/up rows (at the kept input columns) and the down rows of those
    whose activation passes ``t_a``.
    """
    c = w_in_cfd.shape[0]
    keep_x = jnp.abs(x_btd) >= t_x
    a_btf = _intermediate(jnp.where(keep_x, x_btd, 0), w_in_cfd, b_in_cf, act_name)
    keep_a = jnp.abs(a_btf) >= t_a
    sel_frac = jnp.float32(1.0)
    if route_btf is not None:
        sel_btf, scale_btf = route_btf
        keep_a = keep_a & sel_btf
        a_btf = a_btf * scale_btf.astype(a_btf.dtype)
        sel_frac = jnp.mean(sel_btf.astype(jnp.float32), axis=-1)
    y = jnp.where(keep_a, a_btf, 0) @ w_out_fd
    if b_out_d is not None:
        y = y + b_out_d
    kept_x = jnp.mean(keep_x.astype(jnp.float32), axis=-1)
    kept_a = jnp.mean(keep_a.astype(jnp.float32), axis=-1)
    return y, (c * sel_frac * kept_x + kept_a) / (c + 1), kept_x


class TealFFN(nnx.Module):
    """A layer's FFN with TEAL thresholds: ``__call__(x_btd, arg) -> (y, TealStats)``.

    Holds the PrunePath FFN itself (its weight variables, no copy). Plain TEAL (``route``
    False) is the dense FFN and ignores the router, the gates and ``arg``; with ``route`` the
    PrunePath layer selects its experts at ``arg.tau`` and gates them as usual, and the
    thresholds act within the selected experts (``teal_ffn``'s ``route_btf``). The thresholds
    are variables, so evaluating another sparsity changes arrays, not the graph: one compile
    for every target.
    """

    def __init__(self, mlp: PrunePathFFN, t_x: float, t_a: float, route: bool = False):
        self.mlp, self.route = mlp, route
        self.t_x = nnx.Variable(jnp.float32(t_x))
        self.t_a = nnx.Variable(jnp.float32(t_a))

    def __call__(self, x_btd: jax.Array, arg: Any = None):
        m = self.mlp
        route_btf = None
        if self.route:
            logits_bte = routing.router_logits(m.router[...], x_btd)
            sel = routing.select(logits_bte, arg.tau, rule=m.rule, k_min=m.k_min, k_max=m.k_max)
            gate_bte = routing.gates(logits_bte, sel.mask_te, m.gate_mode)
            route_btf = (jnp.repeat(sel.mask_te, m.g, axis=-1), jnp.repeat(gate_bte, m.g, axis=-1))
        opt = lambda p: None if p is None else p[...]  # noqa: E731
        y, read_bt, kept_x_bt = teal_ffn(
            x_btd, m.w_in[...], m.w_out[...], opt(m.b_in), opt(m.b_out), m.act_name,
            self.t_x[...], self.t_a[...], route_btf,
        )  # fmt: skip
        return y, TealStats(read_bt, kept_x_bt)


def thresholds(
    model: nnx.Module,
    token_batches: Iterable[tuple[Any, Any]],
    sparsities: Sequence[float],
    *,
    max_tokens: int | None = 8192,
) -> dict[float, np.ndarray]:
    """Per-layer TEAL thresholds ``[L, 2]`` (``t_x``, ``t_a``) for each target sparsity.

    Calibrated on the dense model's FFN inputs (``ffn_capture``: every expert, no gates) at
    the real tokens of ``token_batches``; ``t`` is the ``p``-quantile of the magnitudes, so
    ``p`` of the calibration entries fall below it. (At inference the intermediate activation
    comes from the sparsified input, so its share below ``t_a`` moves a little from ``p``.)
    The model is not modified.
    """
    check_sparsities(sparsities)
    mlps = prunepath_ffns(model)
    xs = capture_ffn_inputs(model, token_batches, max_tokens=max_tokens)
    qs = np.asarray(sparsities, np.float64)
    t_lqs = []
    for mlp, x_nd in zip(mlps, xs, strict=True):
        b_in = None if mlp.b_in is None else mlp.b_in[...].astype(jnp.float32)
        a = _intermediate(jnp.asarray(x_nd)[None], mlp.w_in[...].astype(jnp.float32), b_in,
                          mlp.act_name)  # fmt: skip
        t_x = np.quantile(np.abs(x_nd), qs)
        t_a = np.quantile(np.abs(np.asarray(a[0])), qs)
        t_lqs.append(np.stack([t_x, t_a], axis=-1))  # [q, 2]
    t_lq2 = np.stack(t_lqs)  # [L, q, 2]
    return {float(p): t_lq2[:, i] for i, p in enumerate(sparsities)}


@contextlib.contextmanager
def teal_model(model: nnx.Module, t_l2: np.ndarray, route: bool = False) -> Iterator[None]:
    """Temporarily replaces every layer's PrunePath FFN by a ``TealFFN`` with thresholds
    ``t_l2`` (``[L, 2]``: ``t_x``, ``t_a``), within PrunePath's selected experts with
    ``route``; the originals come back on exit, errors included.

    A Llama block normalises before calling an FFN that is not a ``PrunePathFFN``, so the TEAL
    layer sees the FFN's input proper, as the calibration did.
    """
    layers = layer_list(model)
    mlps = prunepath_ffns(model)
    t_l2 = np.asarray(t_l2, np.float32)
    if t_l2.shape != (len(mlps), 2):
        raise ValueError(f"TEAL thresholds must be [{len(mlps)}, 2], got {t_l2.shape}")
    try:
        for layer, mlp, (t_x, t_a) in zip(layers, mlps, t_l2, strict=True):
            layer.mlp = TealFFN(mlp, float(t_x), float(t_a), route)
        yield
    finally:
        for layer, mlp in zip(layers, mlps, strict=True):
            layer.mlp = mlp
