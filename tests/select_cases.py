"""Router-logit cases for the in-kernel selection (``kernels/triton_select.py``): random
spreads at the real expert counts, exact ties, τ at 1 and above, clamped k, zero-mass experts."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SelCase:
    name: str
    t: int
    e: int
    tau: float
    kind: str = "normal"  # normal | spread (N(0, 0.02): near-uniform p) | zeros | steps | dead
    rule: str = "paper"
    gate: str = "sigmoid"
    k_min: int = 1
    k_max: int | None = None
    seed: int = 0


def logits(c: SelCase) -> np.ndarray:
    """``[t, e]`` float32 logits of a case (seeded)."""
    rng = np.random.default_rng(c.seed)
    x = rng.standard_normal((c.t, c.e)).astype(np.float32)
    if c.kind == "spread":
        x *= 0.02
    elif c.kind == "zeros":  # every expert tied (the zero-initialised router)
        x[:] = 0.0
    elif c.kind == "steps":  # many exact ties at several values
        x = np.round(x * 2.0) / 2.0
    elif c.kind == "dead":  # a third of the experts get exactly zero probability
        x[:, : c.e // 3] = -1e4
    return x


# The launch forms each case runs in: one token a program (sorted / ranked) and 4 a program.
FORMS = ("sorted", "ranked", "blocked")

CASES = [
    SelCase("e8_paper", 4, 8, 0.6, seed=1),
    SelCase("e8_nucleus", 4, 8, 0.6, rule="nucleus", seed=1),
    SelCase("e12_low_tau", 3, 12, 0.3, seed=2),
    SelCase("e256_spread_75", 4, 256, 0.25, kind="spread", seed=3),
    SelCase("e256_spread_nucleus", 4, 256, 0.5, kind="spread", rule="nucleus", seed=4),
    SelCase("e448_spread", 2, 448, 0.6, kind="spread", seed=5),
    SelCase("e448_normal_gate_none", 2, 448, 0.9, gate="none", seed=6),
    SelCase("e8_zeros", 2, 8, 0.5, kind="zeros"),
    SelCase("e6_zeros_nucleus", 2, 6, 0.55, kind="zeros", rule="nucleus"),
    SelCase("e16_steps", 4, 16, 0.7, kind="steps", seed=7),
    SelCase("e16_steps_nucleus", 4, 16, 0.4, kind="steps", rule="nucleus", seed=8),
    SelCase("e12_tau1", 3, 12, 1.0, seed=9),
    SelCase("e12_tau1_nucleus", 3, 12, 1.0, rule="nucleus", seed=9),
    SelCase("e12_all", 3, 12, 1.05, seed=10),
    SelCase("e12_dead_tau1", 3, 12, 1.0, kind="dead", seed=11),
    SelCase("e12_dead_nucleus", 3, 12, 0.999, kind="dead", rule="nucleus", seed=11),
    SelCase("e16_kmin3", 3, 16, 0.05, k_min=3, seed=12),
    SelCase("e16_kmax2", 3, 16, 0.9, k_max=2, seed=13),
    SelCase("e16_steps_kmax3", 3, 16, 0.9, kind="steps", k_max=3, seed=14),
    SelCase("e16_zeros_kmin5_nucleus", 2, 16, 0.1, kind="zeros", rule="nucleus", k_min=5),
]
