"""Cases of the TEAL decode kernels (``kernels/triton_teal.py``), shared by the interpreter
runner and the tests: inputs from a seeded numpy generator, so both processes build the same."""

from typing import NamedTuple

import numpy as np


class GemvCase(NamedTuple):
    name: str
    k: int
    n: int
    t: float
    split_k: int | None
    dtype: str


class FfnCase(NamedTuple):
    name: str
    d: int
    f: int
    c: int  # input projections: 2 SwiGLU, 1 GELU
    t_x: float
    t_a: float
    dtype: str


GEMV_CASES = [
    GemvCase("dense_f32", 50, 70, 0.0, 1, "float32"),  # t 0: every row, odd sizes
    GemvCase("half_f32_split3", 50, 70, 0.6, 3, "float32"),  # atomics over 3 stretches
    GemvCase("none_f32", 48, 33, float("inf"), 2, "float32"),  # no row passes: y = 0
    GemvCase("bf16_auto_split", 64, 40, 0.3, None, "bfloat16"),
]
FFN_CASES = [
    FfnCase("swiglu_dense_f32", 24, 40, 2, 0.0, 0.0, "float32"),
    FfnCase("swiglu_f32", 24, 40, 2, 0.5, 0.05, "float32"),
    FfnCase("gelu_f32", 20, 36, 1, 0.4, 0.1, "float32"),
    FfnCase("swiglu_bf16", 32, 48, 2, 0.5, 0.05, "bfloat16"),
]


def gemv_inputs(c: GemvCase) -> tuple[np.ndarray, np.ndarray]:
    """``(x [k], w [k, n])`` float32 (cast to the case's dtype by the caller)."""
    rng = np.random.default_rng(len(c.name) * 7 + c.k)
    x = rng.standard_normal(c.k).astype(np.float32)
    return x, rng.standard_normal((c.k, c.n)).astype(np.float32)


def ffn_inputs(c: FfnCase) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x [d], w_in [c, f, d], w_out [f, d])`` float32."""
    rng = np.random.default_rng(c.d * 31 + c.f + c.c)
    x = rng.standard_normal(c.d).astype(np.float32)
    w_in = (rng.standard_normal((c.c, c.f, c.d)) * 0.3).astype(np.float32)
    w_out = (rng.standard_normal((c.f, c.d)) * 0.3).astype(np.float32)
    return x, w_in, w_out
