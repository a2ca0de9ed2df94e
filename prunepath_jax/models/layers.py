"""Building blocks shared by every family: pure math functions and thin NNX shells around them.

Layouts: a dense kernel is stored `[in, out]` so `y = x @ kernel`; Hugging Face `nn.Linear`
weights (`[out, in]`) are transposed on load, GPT-2 `Conv1D` weights are already `[in, out]`.
Normalisation and softmax run in float32 whatever the parameter dtype, as transformers does.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prunepath_jax.config import RopeScaling

# ----------------------------------------------------------------------------- pure functions


def rms_norm(x_btd: jax.Array, w_d: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32, scaled by the weight and cast back (Llama's order of operations)."""
    x32 = x_btd.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w_d * x32.astype(x_btd.dtype)


# `logits_einsum`'s backward in the operands' dtype; False: the float32 backward it replaced, for
# benchmarks that time both side by side (`benchmarks/train_step.py --backward`). Read when traced.
LOGITS_BACKWARD_IN_OPERAND_DTYPE = True


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def logits_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``einsum(spec, a, b)`` accumulated and returned in float32 (output logits), with a
    backward in the operands' dtype.

    Why: the loss wants float32 logits, and JAX's transpose of a float32-output product of bf16
    operands multiplies the float32 cotangent by the operands upcast to float32 — for the LM
    head, the step's largest GEMMs (2 x 8.6 TFLOP for Llama-3.2-1B over 16 384 tokens) off the
    bf16 tensor-core path. Here the cotangent is rounded to the operands' dtype first, as
    mixed-precision training does (PyTorch's autocast, the bf16 path of most trainers); the
    gradients reach the bf16 operands in their dtype either way. float32 operands keep the
    exact float32 backward.
    """
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _logits_fwd(spec, a, b):
    return logits_einsum(spec, a, b), (a, b)


def _logits_bwd(spec, res, ct):
    a, b = res
    if not LOGITS_BACKWARD_IN_OPERAND_DTYPE:
        f32 = functools.partial(jnp.einsum, spec, preferred_element_type=jnp.float32)
        return jax.vjp(f32, a, b)[1](ct)
    _, vjp = jax.vjp(functools.partial(jnp.einsum, spec), a, b)
    return vjp(ct.astype(jnp.result_type(a, b)))


logits_einsum.defvjp(_logits_fwd, _logits_bwd)


def layer_norm(x_btd: jax.Array, w_d: jax.Array, b_d: jax.Array, eps: float) -> jax.Array:
    """LayerNorm computed in float32 and cast back to the input dtype."""
    x32 = x_btd.astype(jnp.float32)
    mu = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mu), axis=-1, keepdims=True)
    y = (x32 - mu) * jax.lax.rsqrt(var + eps) * w_d.astype(jnp.float32) + b_d.astype(jnp.float32)
    return y.astype(x_btd.dtype)


def activation(name: str):
    """The elementwise nonlinearity named by a Hugging Face config."""
    if name == "silu":
        return jax.nn.silu
    if name == "gelu":  # exact erf form (BERT, RoBERTa)
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):  # tanh approximation (GPT-2)
        return lambda x: jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unsupported activation {name!r}; supported: silu, gelu, gelu_new")


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    """Inverse frequencies `[head_dim // 2]` in float32, with Llama-3 or linear scaling applied.

    Computed on the host in float32 (numpy), so a jitted caller embeds them as a constant: as a
    `jnp` computation they were one small kernel inside every decode step's loop body, which XLA
    did not hoist (`scripts/step_hlo.py`)."""
    return jnp.asarray(_inv_freq_host(head_dim, theta, scaling))


def _inv_freq_host(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    f32 = np.float32
    inv_freq = f32(1.0) / (f32(theta) ** (np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim)))
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / f32(scaling.factor)
    if scaling.kind == "llama3":
        factor, old = f32(scaling.factor), f32(scaling.original_max_position)
        low, high = f32(scaling.low_freq_factor), f32(scaling.high_freq_factor)
        wavelen = f32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / f32(scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return np.where(medium, smoothed, scaled).astype(f32)
    raise ValueError(f"unsupported rope scaling kind {scaling.kind!r}")


def rope_tables(positions_bt: jax.Array, inv_freq_h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(cos, sin)`, each `[b, t, 1, head_dim // 2]` float32; computed once per forward, shared by
    every layer (fewer kernels per decode step)."""
    angles_bth = positions_bt.astype(jnp.float32)[..., None] * inv_freq_h
    return jnp.cos(angles_bth)[:, :, None, :], jnp.sin(angles_bth)[:, :, None, :]


def apply_rope(x_bthd: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates query/key heads by their positions (the "rotate half" layout of HF Llama)."""
    x32 = x_bthd.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_bthd.dtype)


def attention(
    q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, allowed_bts: jax.Array | None
) -> jax.Array:
    """Scaled dot-product attention with grouped KV heads.

    Args:
        q_bthd: queries, h heads.
        k_bskd: keys over s positions, k = n_kv heads (h % k == 0).
        v_bskd: values.
        allowed_bts: True where query t may attend key s; None means plain causal attention of
            t queries over the same t keys, which runs as a fused kernel on GPU (cuDNN flash
            attention for 16-bit inputs) and as XLA's reference elsewhere.

    Returns:
        `[b, t, h, d]` in the query dtype; softmax in float32.
    """
    if allowed_bts is None:
        return causal_attention(q_bthd, k_bskd, v_bskd)
    b, t, h, hd = q_bthd.shape
    n_kv = k_bskd.shape[2]
    q = q_bthd.reshape(b, t, n_kv, h // n_kv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k_bskd, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(hd)
    scores = jnp.where(allowed_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskd.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_bskd, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, hd).astype(q_bthd.dtype)


def causal_attention(q_bthd: jax.Array, k_btkd: jax.Array, v_btkd: jax.Array) -> jax.Array:
    """Causal self-attention: cuDNN's fused kernel on GPU for bf16/fp16, else the masked einsum."""
    fused = (
        jax.default_backend() == "gpu"
        and q_bthd.dtype in (jnp.bfloat16, jnp.float16)
        and q_bthd.shape[-1] in (64, 128, 256)  # flash-attention head sizes
    )
    if fused:
        return jax.nn.dot_product_attention(
            q_bthd, k_btkd, v_btkd, is_causal=True, implementation="cudnn"
        )
    t = q_bthd.shape[1]
    allowed_bts = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (q_bthd.shape[0], t, t))
    return attention(q_bthd, k_btkd, v_btkd, allowed_bts)


def causal_mask(positions_bt: jax.Array, key_positions_bs: jax.Array, window: int | None):
    """`[b, t, s]`: key position <= query position (and within the sliding window if any)."""
    q = positions_bt[:, :, None]
    k = key_positions_bs[:, None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    return allowed


def call_mask(positions_bt: jax.Array, cache, window: int | None, plain_causal: bool):
    """The attention mask of one model call, shared by every layer: None for plain causal
    attention within the call's tokens (the fused kernel), else `causal_mask` over the call's
    own keys (no cache) or over the whole cache (`cache`: the per-layer caches)."""
    if plain_causal:
        return None
    if cache is None:
        return causal_mask(positions_bt, positions_bt, window)
    b, s = positions_bt.shape[0], cache[0].k.shape[1]
    key_pos = jnp.broadcast_to(jnp.arange(s, dtype=positions_bt.dtype), (b, s))
    return causal_mask(positions_bt, key_pos, window)


# Measured on the H200 (jax 0.11.2): XLA strength-reduces a one-row product with a large weight
# into an elementwise multiply that writes a weight-sized temporary, then a reduction that reads it
# back (three passes over the weight instead of one). Feeding two copies of the row keeps it a
# GEMM: Llama-3.2-1B batch-1 decode went from 1471 to 1125 us/token. Small weights are
# launch-bound and do not gain, so only large kernels take the two-row form.
_TWO_ROW_MIN_ELEMENTS = 1 << 21


def matvec_safe_matmul(x: jax.Array, w_io: jax.Array) -> jax.Array:
    """`x @ w`, avoiding XLA's materialised matrix-vector strength reduction on GPU."""
    rows = math.prod(x.shape[:-1])
    if rows != 1 or w_io.size < _TWO_ROW_MIN_ELEMENTS or jax.default_backend() != "gpu":
        return x @ w_io
    x2 = jnp.concatenate([x.reshape(1, -1)] * 2, axis=0)
    return (x2 @ w_io)[:1].reshape(*x.shape[:-1], w_io.shape[-1])


# ----------------------------------------------------------------------------- KV cache


class LayerCache(NamedTuple):
    """One layer's static-size KV cache: `k`, `v` are `[b, s_max, n_kv, head_dim]`."""

    k: jax.Array
    v: jax.Array


def init_cache(cfg, batch: int, length: int, dtype) -> tuple[LayerCache, ...]:
    """Per-layer caches (separate arrays, not one stacked array: decode updates stay in place)."""
    shape = (batch, length, cfg.n_kv_heads, cfg.head_dim)
    return tuple(
        LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.n_layers)
    )


def cache_write(cache: LayerCache, k_btkd, v_btkd, positions_bt) -> LayerCache:
    """Writes new keys/values at each sequence's own positions (batches of ragged lengths)."""
    b_idx = jnp.arange(k_btkd.shape[0])[:, None]
    return LayerCache(
        cache.k.at[b_idx, positions_bt].set(k_btkd.astype(cache.k.dtype), mode="drop"),
        cache.v.at[b_idx, positions_bt].set(v_btkd.astype(cache.v.dtype), mode="drop"),
    )


# ----------------------------------------------------------------------------- NNX shells


class Dense(nnx.Module):
    """`y = x @ kernel (+ bias)` with the kernel stored `[in, out]`."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        std = 1.0 / math.sqrt(d_in)
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (d_in, d_out), dtype) * std)
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = matvec_safe_matmul(x, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class Kernel(nnx.Module):
    """A bare weight of any shape (e.g. the fused `[d, 2, f]` gate/up kernel); the caller does the
    contraction."""

    def __init__(self, shape: tuple[int, ...], *, dtype, rngs: nnx.Rngs):
        std = 1.0 / math.sqrt(shape[0])
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), shape, dtype) * std)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale."""

    def __init__(self, d: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((d,), dtype))
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias."""

    def __init__(self, d: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((d,), dtype))
        self.bias = nnx.Param(jnp.zeros((d,), dtype))
        self.eps = eps

    def __call__(self, x):
        return layer_norm(x, self.weight[...], self.bias[...], self.eps)


class Embed(nnx.Module):
    """Token (or position) embedding table `[n, d]`; `attend` gives tied output logits."""

    def __init__(self, n: int, d: int, *, dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (n, d), dtype) * 0.02)

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x_btd):
        return logits_einsum("btd,vd->btv", x_btd, self.embedding[...])
