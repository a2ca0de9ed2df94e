"""The one shared case list for the sparse-FFN kernels (reference, interpreter, GPU backends).

Each case covers some of: batch 1 and > 1, k = 1 and k = E, an expert no token selects, odd
sizes (d not a multiple of the block, E not a power of two), bf16 and fp32, both rules and gate
modes. Inputs are drawn fresh from the case's seed (never zeros); the router is scaled so the
softmax is spread and tau gives k between 1 and E.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    t: int
    d: int
    e: int
    g: int
    dtype: str
    tau: float
    rule: str = "paper"
    gate: str = "sigmoid"
    k_min: int = 1
    k_max: int | None = None
    dead_expert: bool = False  # make expert 1 unreachable for every token
    seed: int = 0


DECODE_CASES = [
    Case("b1_f32_odd_d", 1, 96, 8, 32, "float32", 0.6, seed=1),
    Case("b5_bf16_e12_g16", 5, 100, 12, 16, "bfloat16", 0.6, dead_expert=True, seed=2),
    Case("b3_f32_all_experts_gate_none", 3, 64, 8, 32, "float32", 1.05, gate="none", seed=3),
    Case("b4_f32_k1", 4, 80, 8, 16, "float32", 0.9, k_max=1, seed=4),
    Case(
        "b16_bf16_nucleus_dead",
        16,
        64,
        8,
        16,
        "bfloat16",
        0.5,
        rule="nucleus",
        dead_expert=True,
        seed=5,
    ),  # fmt: skip
]
# One token (small d: the per-expert Triton kernels by default; every form below).
DECODE_CASES += [
    Case("b1_bf16_e12_g16_dead", 1, 100, 12, 16, "bfloat16", 0.6, dead_expert=True, seed=9),
    Case("b1_f32_k1", 1, 80, 8, 16, "float32", 0.9, k_max=1, seed=10),
    Case("b1_bf16_all_gate_none", 1, 64, 8, 32, "bfloat16", 1.05, gate="none", seed=11),
    Case("b1_f32_nucleus_kmin3", 1, 64, 12, 16, "float32", 0.3, rule="nucleus", k_min=3, seed=12),
]
# The forms of the one-token layer, run on every one-token case: the per-expert kernels, and
# the fused kernel (triton_balanced.py) with its default grid (two programs per SM: most idle
# here), few programs (several units each), many, and other unit sizes.
ONE_TOKEN_TUNINGS = {
    "blocks": {"experts": "blocks"},
    "bal": {"experts": "balanced"},
    "bal_p3": {"experts": "balanced", "bal_programs": 3},
    "bal_p64_bn1": {"experts": "balanced", "bal_programs": 64, "bal_block_n": 1},
    "bal_p5_bn4": {"experts": "balanced", "bal_programs": 5, "bal_block_n": 4},
}
GROUPED_CASES = [
    Case("t40_f32_odd_d", 40, 96, 8, 32, "float32", 0.6, dead_expert=True, seed=6),
    Case("t37_bf16_e12_kmax3", 37, 100, 12, 16, "bfloat16", 0.9, k_max=3, seed=7),
    Case("t20_f32_all_experts", 20, 64, 8, 16, "float32", 1.05, gate="none", seed=8),
]
ALL_CASES = DECODE_CASES + GROUPED_CASES


def inputs(c: Case):
    """``(x_td, router_de, w_in_cfd, w_out_fd)`` for a case (fresh, seeded, nonzero)."""
    k = jax.random.split(jax.random.key(c.seed), 4)
    dt = getattr(jnp, c.dtype)
    f = c.e * c.g
    x = jax.random.normal(k[0], (c.t, c.d), jnp.float32)
    router = jax.random.normal(k[1], (c.d, c.e), jnp.float32) * (0.3 / c.d**0.5)
    if c.dead_expert:
        x = x.at[:, 0].set(4.0)
        router = router.at[0, :].set(0.0).at[0, 1].set(-40.0)
    w_in = jax.random.normal(k[2], (2, f, c.d), jnp.float32) * c.d**-0.5
    w_out = jax.random.normal(k[3], (f, c.d), jnp.float32) * f**-0.5
    return x.astype(dt), router, w_in.astype(dt), w_out.astype(dt)


def kwargs(c: Case) -> dict:
    return dict(group_size=c.g, rule=c.rule, gate=c.gate, k_min=c.k_min, k_max=c.k_max)


GRAD_ARGS = ("x", "router", "w_in", "w_out")
# the grouped GEMM's backward forms: label -> its tuning (the first is the default)
GROUPED_BACKWARDS = {
    "grouped": {"backward": "grouped", "weight_grads": "xla"},
    "grouped-dw": {"backward": "grouped", "weight_grads": "grouped"},
    "xla": {"backward": "xla"},
}


def grad_loss(fn, c: Case):
    """``L(x, router, w_in, w_out) = Σ y ⊙ r`` for a seeded ``r [t, d]``: the training
    forward's gradients are ``jax.grad`` of it, whatever ``fn`` (reference or kernel) computes
    ``y``."""
    r_td = jax.random.normal(jax.random.key(c.seed + 1000), (c.t, c.d), jnp.float32)

    def loss(x, router, w_in, w_out):
        y, _ = fn(x, router, w_in, w_out, c.tau, **kwargs(c))
        return jnp.sum(y.astype(jnp.float32) * r_td)

    return loss
