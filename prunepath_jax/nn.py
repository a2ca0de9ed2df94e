"""PrunePath routed-expert FFN: a thin NNX shell over the pure math in `routing.py`.

One module serves every family: SwiGLU (Llama, Mistral, Qwen2, SmolLM2) with a fused gate/up
weight `w_in [2, f, d]`, and GELU MLPs (GPT-2, BERT, RoBERTa) with `w_in [1, f, d]` plus biases.
Both weights are neuron-major (`w_in [c, f, d]`, `w_out [f, d]`, as Hugging Face stores gate/up
rows) and neurons are permuted so expert e is the contiguous block `[e*G, (e+1)*G)` of the f axis:
each expert's weights are then contiguous `[G, d]` slabs, which is what a gather (and a decode
kernel) wants to read. The permutation (`perm`, original neuron index per position) is kept in
the checkpoint.

Router state is functional: tau arrives as an argument (`RouteArgs`, one per layer, traced under
jit so a sweep compiles once) and the routing statistics are *returned* with the output, never
stored on the module.

Two XLA compute paths (the Triton kernels of a later issue must match them):
- "masked": the dense FFN with each neuron scaled by its expert's gate (0 when unselected). Exact
  and differentiable; the training and prefill path.
- "gather": reads only the first `k_max` experts of each token's order (static `k_max`), so it does
  less work; the small-batch decode path.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prunepath_jax import routing
from prunepath_jax.config import ModelConfig
from prunepath_jax.models.layers import activation, rms_norm
from prunepath_jax.sharding import BATCH_AXES


class RouteArgs(NamedTuple):
    """One layer's routing argument (a pytree of arrays: traced under jit, never recompiled).

    Attributes:
        tau: float32 scalar budget; tau > 1 selects every expert.
        token_mask: float32 `[b, t]`, 1 for real tokens (statistics only), or None.
    """

    tau: jax.Array
    token_mask: jax.Array | None = None


def route_args(cfg: ModelConfig, tau, token_mask_bt=None) -> tuple[RouteArgs, ...]:
    """Per-layer `RouteArgs` from a scalar tau or a per-layer `[L]` vector.

    Concrete tau values are validated here (tau <= 0, NaN, a vector of the wrong length raise
    ValueError); traced values pass through, so build these outside jit and pass them in.
    """
    if isinstance(tau, jax.core.Tracer):
        tau_l = jnp.broadcast_to(jnp.asarray(tau, jnp.float32), (cfg.n_layers,))
    else:
        tau_l = routing.check_tau(tau, cfg.n_layers)
    mask = None if token_mask_bt is None else jnp.asarray(token_mask_bt, jnp.float32)
    return tuple(RouteArgs(jnp.asarray(tau_l[i], jnp.float32), mask) for i in range(cfg.n_layers))


# Above the decode kernels' token count the kernel path routes from the layer's own logits and
# normalised tokens; False: the registry computes both again (before the fifty-second session),
# for benchmarks that time both side by side (`benchmarks/train_step.py --kernel-logits`). Read
# when traced.
SHARE_KERNEL_LOGITS = True


class Permutation(nnx.Variable):
    """Integer neuron permutation (not trained, but saved with the weights)."""


class PrunePathFFN(nnx.Module):
    """Routed-expert FFN. `__call__(x_btd, RouteArgs, norm=None) -> (y_btd, RouteStats)`.

    `norm=(weight_d, eps)` hands the block's pre-FFN RMSNorm to the layer: x is then the
    residual stream and the layer computes FFN(rms_norm(x)). Every path normalises in XLA first
    except the Pallas decode kernels, whose router-logits kernel normalises the row it reads
    anyway (two launches fewer per decode layer).
    """

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        pp = cfg.prunepath
        if pp is None:
            raise ValueError("PrunePathFFN needs cfg.prunepath")
        d, f = cfg.d_model, cfg.d_ff
        self.e = pp.n_experts(f)
        self.g = pp.group_size
        self.gated = cfg.activation == "silu"
        n_in = 2 if self.gated else 1
        self.act_name = cfg.activation
        self.rule, self.gate_mode = pp.rule, pp.gate
        self.k_min, self.k_max = pp.k_min, pp.k_max
        self.compute = "auto"
        self.implementation = None  # kernel registry backend when compute == "kernel"
        self.kernel_mesh = None  # with compute == "kernel": tokens sharded over its batch axes
        std = d**-0.5
        self.router = nnx.Param(routing.init_router(d, self.e, jnp.float32))
        self.w_in = nnx.Param(jax.random.normal(rngs.params(), (n_in, f, d), dtype) * std)
        self.w_out = nnx.Param(jax.random.normal(rngs.params(), (f, d), dtype) * f**-0.5)
        has_bias = cfg.mlp_bias or not self.gated
        self.b_in = nnx.Param(jnp.zeros((n_in, f), dtype)) if has_bias else None
        self.b_out = nnx.Param(jnp.zeros((d,), dtype)) if has_bias else None
        self.perm = Permutation(jnp.arange(f, dtype=jnp.int32))

    def _act(self, h_btcf):
        act = activation(self.act_name)
        if self.gated:
            return act(h_btcf[..., 0, :]) * h_btcf[..., 1, :]
        return act(h_btcf[..., 0, :])

    def _path(self, n_tokens: int) -> str:
        if self.compute != "auto":
            return self.compute
        # Gathering pays off only for a few tokens and a real bound on k.
        return (
            "gather"
            if self.k_max is not None and self.k_max < self.e and n_tokens <= 16
            else "masked"
        )

    def __call__(self, x_btd: jax.Array, arg: RouteArgs | None, norm=None):
        if arg is None:
            raise ValueError("a PrunePath FFN needs a RouteArgs (tau) per layer: pass ffn_args")
        x_raw = x_btd
        if norm is not None:  # under jit, dead code on the fused kernel path when stats are unused
            x_btd = rms_norm(x_btd, *norm)
        logits_bte = routing.router_logits(self.router[...], x_btd)
        sel = routing.select(
            logits_bte, arg.tau, rule=self.rule, k_min=self.k_min, k_max=self.k_max
        )
        gate_bte = routing.gates(logits_bte, sel.mask_te, self.gate_mode)
        b, t, _ = x_btd.shape
        if self._path(b * t) == "kernel":
            y = self._kernel(x_raw, x_btd, arg, norm, logits_bte)
            return y, routing.route_stats(sel, logits_bte, arg.token_mask)
        if self._path(b * t) == "gather":
            y = self._gathered(x_btd, sel, gate_bte)
        else:
            y = self._masked(x_btd, gate_bte)
        if self.b_out is not None:
            y = y + self.b_out[...]
        return y, routing.route_stats(sel, logits_bte, arg.token_mask)

    def _kernel(self, x_raw, x_btd, arg, norm, logits_bte):
        """The registry path (`prunepath_jax.kernels.api`); the stats above stay in XLA and are
        dead code under jit when unused (decode).

        Above the decode kernels' token count the registry routes from the layer's own
        ``logits_bte``: in training the statistics' and the gates' cotangents then meet in one
        logits backward (one pair of router GEMMs per layer, not two; the decode kernels compute
        their logits inside the launch), and from the layer's normalised ``x_btd`` (one RMSNorm
        and its backward, not two: XLA does not merge a norm over ``[b, t, d]`` with one over
        ``[b t, d]``). The decode kernels take the raw ``x_raw`` and ``norm`` (the Pallas
        kernels normalise inside their logits kernel).

        With a ``kernel_mesh`` of several devices the layer runs under ``shard_map``: each
        device routes and computes its own rows of the batch (sharded over the mesh's batch
        axes, ``data`` and ``fsdp``) with the whole weights, because a Triton call has no
        sharding rule and GSPMD would otherwise run the whole batch on every device."""
        from prunepath_jax.kernels import api

        opt = lambda p: None if p is None else p[...]  # noqa: E731
        norm_d, norm_eps = (None, 1e-6) if norm is None else norm
        weights = {"router": self.router[...], "w_in": self.w_in[...], "w_out": self.w_out[...],
                   "b_in": opt(self.b_in), "b_out": opt(self.b_out), "norm": norm_d}  # fmt: skip

        def layer(x_raw, x_btd, logits_bte, w, tau):
            b, t, d = x_btd.shape
            shared = SHARE_KERNEL_LOGITS and b * t > api.DECODE_MAX_TOKENS
            x_in, norm_in = (x_btd, None) if shared else (x_raw, w["norm"])
            y_td, _ = api.sparse_ffn(
                x_in.reshape(b * t, d), w["router"], w["w_in"], w["w_out"], tau,
                group_size=self.g, activation=self.act_name, b_in_cf=w["b_in"],
                b_out_d=w["b_out"], rule=self.rule, gate=self.gate_mode, k_min=self.k_min,
                k_max=self.k_max, implementation=api.for_model(self.implementation, b * t),
                norm_d=norm_in, norm_eps=norm_eps,
                logits_te=logits_bte.reshape(b * t, -1) if shared else None,
            )  # fmt: skip
            return y_td.reshape(b, t, d)

        mesh = self.kernel_mesh
        if mesh is None or mesh.size == 1:
            return layer(x_raw, x_btd, logits_bte, weights, arg.tau)
        rows = jax.sharding.PartitionSpec(BATCH_AXES, None, None)
        whole = jax.sharding.PartitionSpec()
        sharded = jax.shard_map(layer, mesh=mesh, in_specs=(rows, rows, rows, whole, whole),
                                out_specs=rows, check_vma=False)  # fmt: skip
        return sharded(x_raw, x_btd, logits_bte, weights, arg.tau)

    def _masked(self, x_btd, gate_bte):
        h = jnp.einsum("btd,cfd->btcf", x_btd, self.w_in[...])
        if self.b_in is not None:
            h = h + self.b_in[...]
        a_btf = self._act(h)
        scale_btf = jnp.repeat(gate_bte, self.g, axis=-1).astype(a_btf.dtype)
        return (a_btf * scale_btf) @ self.w_out[...]

    def _gathered(self, x_btd, sel, gate_bte):
        k = self.k_max if self.k_max is not None else self.e
        idx_btk, valid_btk = routing.top_k_indices(sel, k)
        g_btk = jnp.take_along_axis(gate_bte, idx_btk, axis=-1) * valid_btk
        c, _, d = self.w_in.shape
        w_in_cegd = self.w_in[...].reshape(c, self.e, self.g, d)
        w_sel = jnp.take(w_in_cegd, idx_btk, axis=1)  # [c, b, t, k, g, d]: contiguous slabs
        h = jnp.einsum("btd,cbtkgd->btkcg", x_btd, w_sel)
        if self.b_in is not None:
            b_ceg = self.b_in[...].reshape(c, self.e, self.g)
            h = h + jnp.moveaxis(jnp.take(b_ceg, idx_btk, axis=1), 0, -2)  # [b, t, k, c, g]
        a_btkg = self._act(h) * g_btk[..., None].astype(h.dtype)
        w_out_egd = self.w_out[...].reshape(self.e, self.g, -1)
        return jnp.einsum("btkg,btkgd->btd", a_btkg, jnp.take(w_out_egd, idx_btk, axis=0))


def set_compute(model: nnx.Module, mode: str, implementation: str | None = None, mesh=None) -> None:
    """Forces every PrunePath FFN of `model` to "masked", "gather", "kernel" (the kernel
    registry, `prunepath_jax.kernels.api`, with `implementation` "xla" | "triton" | "pallas" |
    None = fastest available) or back to "auto". With "kernel", a ``mesh`` (the one the batch
    is sharded on: rows over its ``data`` and ``fsdp`` axes) runs each layer per device under
    ``shard_map``."""
    if mode not in ("auto", "masked", "gather", "kernel"):
        raise ValueError(f"compute mode must be auto, masked, gather or kernel, got {mode!r}")
    if mesh is not None and not set(BATCH_AXES) <= set(mesh.shape):
        raise ValueError(f"the mesh needs axes {BATCH_AXES}, has {tuple(mesh.shape)}")
    for _, m in nnx.iter_graph(model):
        if isinstance(m, PrunePathFFN):
            m.compute = mode
            m.implementation = implementation if mode == "kernel" else None
            m.kernel_mesh = mesh if mode == "kernel" else None


def ffn_weights(cfg: ModelConfig, mlp: nnx.Module) -> dict[str, np.ndarray | None]:
    """A dense FFN module's weights in the PrunePath layout: w_in `[c, f, d]` (neuron-major),
    b_in `[c, f]`, w_out `[f, d]`, b_out `[d]`."""

    def arr(p):
        return None if p is None else np.asarray(p[...])

    if cfg.family == "llama":
        return {
            "w_in": arr(mlp.gate_up_proj.kernel).transpose(1, 2, 0),
            "b_in": None,
            "w_out": arr(mlp.down_proj.kernel),
            "b_out": None,
        }
    first, second = (
        (mlp.c_fc, mlp.c_proj) if cfg.family == "gpt2" else (mlp.intermediate, mlp.output)
    )
    return {
        "w_in": arr(first.kernel).T[None],
        "b_in": arr(first.bias)[None, :],
        "w_out": arr(second.kernel),
        "b_out": arr(second.bias),
    }
