"""Per-token float8 activations for the grouped prefill GEMM (tuning ``x_fp8``, opt-in).

Why: the grouped up kernel gathers each token's row of x once per selected expert (112 times at
the 8B shape and k/E 0.25, ~3.7 GB through L2 for 4 096 tokens), and that traffic, not the
tensor cores, bounds it. Stored as float8 e4m3 with one float32 scale a row, x's rows are half
the bytes; the kernel widens each tile to the weights' dtype before the dot (the products stay
in bf16 on the tensor cores, fp32-accumulated) and multiplies the row's scale into the
accumulator. This changes the numbers: e4m3 keeps 3 mantissa bits, so each element of x
carries a relative rounding of up to 2^-4 (BENCHMARKS.md gives the perplexity it costs).

`dequantize_rows` is the reference's view of the same input: the XLA path run on it gives what
the kernel should give, within the weights' dtype tolerance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FP8 = jnp.float8_e4m3fn
# e4m3fn's largest finite value: each row is scaled so its largest |x| lands there.
FP8_MAX = 448.0


def quantize_rows(x_td: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x8_td float8_e4m3fn, s_t float32)`` with ``x_td ≈ x8_td · s_t[:, None]``.

    The scale is the row's largest magnitude over 448 (a zero row gets scale 1 and zeros), so
    no element overflows. A row holding a NaN or an infinity gets a non-finite scale and comes
    back all NaN: bad input is never rounded into finite numbers.
    """
    amax_t = jnp.max(jnp.abs(x_td.astype(jnp.float32)), axis=-1)
    s_t = jnp.where(amax_t == 0, 1.0, amax_t / FP8_MAX)
    x8_td = (x_td.astype(jnp.float32) / s_t[:, None]).astype(FP8)
    return x8_td, s_t


def dequantize_rows(x8_td: jax.Array, s_t: jax.Array, dtype) -> jax.Array:
    """``x8_td · s_t[:, None]`` in ``dtype``: the activations the fp8 kernel multiplies."""
    return (x8_td.astype(jnp.float32) * s_t[:, None]).astype(dtype)
