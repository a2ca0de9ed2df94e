"""The sparse-FFN kernel registry: one entry point, several backends, explicit fallbacks.

``sparse_ffn(..., implementation=...)`` computes one PrunePath FFN layer on a flat batch of
tokens (the semantics of `kernels.reference.sparse_ffn_reference`) with:

- ``"xla"``: the masked dense FFN in XLA (weights in their own dtype, float32 accumulation).
  Runs everywhere and handles every family (GELU, biases); the CPU production path.
- ``"triton"``: ``@triton.jit`` kernels through jax-triton -- the fused routing + union-of-
  experts decode kernels for t <= 16 tokens (`triton_decode`), the grouped GEMM above
  (`triton_grouped`).
- ``"pallas"``: the Pallas decode kernel on the Triton backend (`pallas_decode`, t <= 16).
- ``None``: the fastest measured backend for the platform and token count (``DEFAULTS``),
  falling back to ``"xla"`` on CPU or for input the kernels do not support.

An explicitly requested backend that cannot run the input raises ``ValueError`` (unsupported
input: activation, biases, dtype, shapes) or ``NotImplementedError`` (no GPU / no jax-triton),
naming why -- never a silently different computation.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from prunepath_jax import routing
from prunepath_jax.kernels import jt
from prunepath_jax.kernels.reference import check_logits, route_reference
from prunepath_jax.models.layers import activation as _activation
from prunepath_jax.models.layers import logits_einsum, rms_norm

IMPLEMENTATIONS = ("xla", "triton", "pallas")
DECODE_MAX_TOKENS = 16
# Fastest measured on the H200 (BENCHMARKS.md, issue 5), by token-count regime, in order of
# preference (a backend that cannot run here is skipped; XLA is the last resort). Llama-3-8B end
# to end at 75% FFN sparsity, one run (2026-12-01, µs/token, dense 4191 / 4288 / 4408 / 4989 at
# batch 1 / 4 / 8 / 16): batch 1 Pallas 2705, Triton 3686, XLA 5470; batch 4 Triton 3677,
# Pallas 4956, XLA 5255; batch 8 Triton 3724, Pallas 5214, XLA 5258; batch 16 Triton 4304,
# XLA 5741, Pallas 7096; batch 2 (another run, dense 4260) Triton 3540, Pallas 3874. On the 1B
# shape batch 2 is the one cell where Pallas edges Triton (1071 vs 1117 µs, dense 1001); the
# 8B order is kept. Prefill: the grouped GEMM (1.06x the dense FFN vs the masked XLA path's
# 0.84x).
DEFAULTS = {
    "decode_one": ("pallas", "triton"),
    "decode_few": ("triton", "pallas"),  # 2-8 tokens
    "decode": ("triton",),  # 9-16 tokens: the masked XLA path beats Pallas at 16
    "prefill": ("triton",),
}
# Small layers (d ≤ SMALL_D, e.g. SmolLM2's 576) are launch-bound, and there the Pallas layer wins
# at every decode batch: SmolLM2-135M shape, 50% FFN sparsity, µs/token (2026-12-01, H200, one
# run): batch 2 / 4 / 8 / 16 Pallas 1133 / 1192 / 1104 / 1572, Triton 1285 / 1302 / 1244 / 1585,
# masked XLA 1405 / 1416 / 1352 / 1839 (the real model at batch 8 agreed: Pallas 545 vs Triton
# 475 tokens/s per sequence, seventh session).
# The registry's own bound (pallas_plan.SMALL_D, the Pallas plan's, was measured apart).
SMALL_D = 1024
SMALL_DEFAULTS = {"decode_few": ("pallas", "triton"), "decode": ("pallas", "triton")}


def unsupported_reason(
    implementation: str, x_td, w_in_cfd, w_out_fd, router_de, *, group_size, activation,
    b_in_cf, b_out_d,
) -> str | None:  # fmt: skip
    """Why ``implementation`` cannot run this input (None when it can). Shapes only: no GPU
    check here."""
    if implementation == "xla":
        return None
    t = x_td.shape[0]
    if activation != "silu" or w_in_cfd.shape[0] != 2:
        return f"kernels implement SwiGLU only (activation {activation!r}, c={w_in_cfd.shape[0]})"
    if b_in_cf is not None or b_out_d is not None:
        return "kernels take no FFN biases"
    if x_td.dtype not in (jnp.bfloat16, jnp.float32):
        return f"kernels take bfloat16 or float32 activations, got {x_td.dtype}"
    if w_in_cfd.dtype != x_td.dtype or w_out_fd.dtype != x_td.dtype:
        return f"weights ({w_in_cfd.dtype}, {w_out_fd.dtype}) must have x's dtype {x_td.dtype}"
    if router_de.dtype != jnp.float32:
        return f"router weights must be float32, got {router_de.dtype}"
    g = group_size
    if g < 16 or g & (g - 1):
        return f"kernels need a power-of-two group_size >= 16, got {g}"
    e = w_in_cfd.shape[1] // g
    if e > 4096:
        return f"kernels route at most 4096 experts per layer, got {e}"
    if implementation == "pallas" and t > DECODE_MAX_TOKENS:
        return f"the Pallas kernel is a decode kernel (t <= {DECODE_MAX_TOKENS}), got t={t}"
    return None


def _backend_ready(implementation: str) -> str | None:
    if implementation == "xla":
        return None
    if jax.default_backend() != "gpu":
        backend = jax.default_backend()
        return f"implementation={implementation!r} needs a CUDA GPU (backend is {backend!r})"
    if implementation == "triton" and not jt.available():
        return "jax-triton is not importable; install the `gpu` extra"
    if implementation == "pallas":
        try:
            mod = importlib.import_module("prunepath_jax.kernels.pallas_decode")
        except ImportError as err:
            return f"the Pallas decode kernel is not available ({err})"
        if mod.plgpu is None:  # the module imports without it; its kernels would raise
            return "this jax has no Pallas Triton backend (deprecated since JAX 0.11)"
    return None


def choose(n_tokens: int, implementation: str | None, d: int | None = None) -> str:
    """The backend ``implementation=None`` would use for ``n_tokens`` tokens of width ``d`` on
    this platform, before the input checks."""
    if implementation is not None:
        return implementation
    if jax.default_backend() != "gpu":
        return "xla"
    if n_tokens == 1:
        regime = "decode_one"
    elif n_tokens <= 8:
        regime = "decode_few"
    else:
        regime = "decode" if n_tokens <= DECODE_MAX_TOKENS else "prefill"
    order = DEFAULTS[regime]
    if d is not None and d <= SMALL_D:
        order = SMALL_DEFAULTS.get(regime, order)
    return next((b for b in order if _backend_ready(b) is None), "xla")


def xla_masked(
    x_td, gate_te, w_in_cfd, w_out_fd, *, group_size, activation="silu", b_in_cf=None,
    b_out_d=None,
):  # fmt: skip
    """The masked XLA FFN: dense matmuls in the weights' dtype, float32 accumulation.

    Differentiated (training through the registry where the kernels cannot run: GELU, biases)
    the bf16 products' backward stays on bf16 tensor cores (`layers.logits_einsum`: the float32
    cotangent rounded to bf16 first, as the masked model path computes in bf16 throughout);
    JAX's own transpose would multiply the float32 cotangent by the weights upcast to float32.
    """
    if x_td.dtype == jnp.float32:
        mm = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST,
                               preferred_element_type=jnp.float32)  # fmt: skip
    else:
        mm = logits_einsum
    h = mm("td,cfd->tcf", x_td, w_in_cfd)
    if b_in_cf is not None:
        h = h + b_in_cf.astype(jnp.float32)
    act = _activation(activation)
    a_tf = act(h[:, 0]) * h[:, 1] if h.shape[1] == 2 else act(h[:, 0])
    a_tf = (a_tf * jnp.repeat(gate_te, group_size, axis=-1)).astype(x_td.dtype)
    y = mm("tf,fd->td", a_tf, w_out_fd)
    if b_out_d is not None:
        y = y + b_out_d.astype(jnp.float32)
    return y.astype(x_td.dtype)


def sparse_ffn(
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
    implementation: str | None = None,
    norm_d: jax.Array | None = None,
    norm_eps: float = 1e-6,
    logits_te: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One PrunePath FFN layer on ``x_td [t, d]``: ``(y_td in x's dtype, k_t int32 [t])``.

    Works under jit with tau traced. See the module docstring for the backends. Differentiable
    with "xla" and the Triton grouped GEMM (t > 16: the training forward); the decode kernels
    (t <= 16) are inference-only and raise ``NotImplementedError`` under ``jax.grad``. With
    ``norm_d`` (an RMSNorm weight ``[d]``) ``x_td`` is the residual stream and the layer is
    ``FFN(rms_norm(x_td, norm_d, norm_eps))``: the Pallas decode path normalises inside its
    router-logits kernel, the others in XLA first.

    ``logits_te`` (float32 ``[t, E]``): the router logits of the (normalised) tokens when the
    caller has them already, as the model layer does for its routing statistics; the grouped
    GEMM and the XLA path then route from them (one logits product per layer in the training
    step instead of two). The decode kernels compute the logits inside their launch and refuse
    them (``ValueError``).
    """
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, "
                         f"got {implementation!r}")  # fmt: skip
    if norm_d is not None and norm_d.shape != x_td.shape[1:]:
        raise ValueError(f"norm_d must be [d] = {x_td.shape[1:]}, got {norm_d.shape}")
    if norm_d is not None and norm_d.dtype != x_td.dtype:
        # The norm's output takes the promoted dtype (as in the model): XLA first, as before.
        x_td, norm_d = rms_norm(x_td, norm_d, norm_eps), None
    t = x_td.shape[0]
    impl = choose(t, implementation, x_td.shape[1])
    why = unsupported_reason(
        impl, x_td, w_in_cfd, w_out_fd, router_de, group_size=group_size,
        activation=activation, b_in_cf=b_in_cf, b_out_d=b_out_d,
    )  # fmt: skip
    if why is not None:
        if implementation is not None:
            raise ValueError(f"implementation={implementation!r} cannot run this input: {why}")
        impl = "xla"
    if logits_te is not None:
        check_logits(logits_te, t, w_in_cfd.shape[1] // group_size)
        if impl == "pallas" or (impl == "triton" and t <= DECODE_MAX_TOKENS):
            raise ValueError(
                f"implementation={impl!r} at t={t} is a decode kernel, which computes the router "
                f"logits inside its launch: pass logits_te for t > {DECODE_MAX_TOKENS} or 'xla'"
            )
    if implementation is not None:
        not_ready = _backend_ready(impl)
        if not_ready is not None:
            raise NotImplementedError(not_ready)
    kw = dict(group_size=group_size, rule=rule, gate=gate, k_min=k_min, k_max=k_max)
    if impl == "pallas":
        mod = importlib.import_module("prunepath_jax.kernels.pallas_decode")
        fn = functools.partial(mod.sparse_ffn_decode, norm_d=norm_d, norm_eps=norm_eps, **kw)
        return _inference_only(fn, "the Pallas decode kernel")(
            x_td, router_de, w_in_cfd, w_out_fd, tau
        )
    if norm_d is not None:
        x_td = rms_norm(x_td, norm_d, norm_eps)
    if impl == "triton":
        if t <= DECODE_MAX_TOKENS:
            from prunepath_jax.kernels.triton_decode import sparse_ffn_decode

            fn = functools.partial(sparse_ffn_decode, **kw)
            return _inference_only(fn, "the Triton decode kernels")(
                x_td, router_de, w_in_cfd, w_out_fd, tau
            )
        from prunepath_jax.kernels.triton_grouped import sparse_ffn_grouped

        return sparse_ffn_grouped(x_td, router_de, w_in_cfd, w_out_fd, tau, logits_te=logits_te,
                                  **kw)  # fmt: skip
    _, _, gate_te, k_t = route_reference(
        x_td, router_de, tau, rule=rule, gate=gate, k_min=k_min, k_max=k_max, logits_te=logits_te
    )
    y = xla_masked(x_td, gate_te, w_in_cfd, w_out_fd, group_size=group_size,
                   activation=activation, b_in_cf=b_in_cf, b_out_d=b_out_d)  # fmt: skip
    return y, k_t


def _inference_only(fn, what: str):
    """``fn`` (a decode-kernel launch, no derivative) as a function whose gradient raises a clear
    error. Without it ``jax.grad`` fails inside JAX (jax-triton: no differentiation rule; Pallas:
    an internal assertion while it differentiates the kernel body)."""

    @jax.custom_vjp
    def call(*args):
        return fn(*args)

    def fwd(*args):
        return fn(*args), None

    def bwd(_res, _cotangents):
        raise NotImplementedError(
            f"{what} (t <= {DECODE_MAX_TOKENS} tokens) has no gradient: differentiate through "
            "implementation='xla', or with more than 16 tokens the Triton grouped GEMM"
        )

    call.defvjp(fwd, bwd)
    return call


def for_model(implementation: str | None, n_tokens: int) -> str | None:
    """The backend a model layer asks for: a decode-only backend ("pallas") serves prefill
    (t > 16) through the Triton grouped GEMM, or XLA when Triton cannot run here."""
    if implementation == "pallas" and n_tokens > DECODE_MAX_TOKENS:
        return "triton" if _backend_ready("triton") is None else "xla"
    return implementation
