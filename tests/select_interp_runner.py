"""Runs the in-kernel selection under the Triton interpreter on the cases of ``select_cases.py``,
sorted, ranked (``select_gates(ranked=...)``) and blocked (4 tokens a program, the gates stored
as int8 when the case's gate is "none", as the grouped prefill stores its mask); writes gates,
k and the per-expert counts (atomic and per-program), and the token lists by expert
`triton_group.kernel_slots` writes from them, to an .npz file. Started by
tests/test_select.py with TRITON_INTERPRET=1. Usage: ``python tests/select_interp_runner.py
OUT.npz``."""

import os
import sys
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before starting"
sys.path.insert(0, str(Path(__file__).parent))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from select_cases import CASES, FORMS, logits  # noqa: E402

from prunepath_jax.kernels.triton_group import kernel_slots  # noqa: E402
from prunepath_jax.kernels.triton_select import select_gates  # noqa: E402


def main(out: str) -> None:
    res = {}
    for i, c in enumerate(CASES):
        for form in FORMS:  # and the per-expert counts: atomic when ranked, else per program
            # (blocked: every other case atomic)
            counts = "atomic" if form == "ranked" or (form == "blocked" and i % 2) else "partial"
            got = select_gates(jnp.asarray(logits(c)), c.tau, rule=c.rule, gate=c.gate,
                               k_min=c.k_min, k_max=c.k_max, ranked=form == "ranked",
                               block_t=4 if form == "blocked" else 1,
                               out_dtype=jnp.int8 if form == "blocked" and c.gate == "none"
                               else jnp.float32, counts=counts,
                               interpret=True)  # fmt: skip
            for name, v in zip("gkc", got, strict=True):
                res[f"{c.name}/{form}/{name}"] = np.asarray(v)
    for c in CASES:  # the token lists by expert from the per-program counts, 1 and 4 tokens
        # a program (`triton_group.kernel_slots`)
        for bt in (1, 4):
            mask8, _, table = select_gates(jnp.asarray(logits(c)), c.tau, rule=c.rule,
                                           gate="none", k_min=c.k_min, k_max=c.k_max,
                                           block_t=bt, out_dtype=jnp.int8, counts="table",
                                           interpret=True)  # fmt: skip
            slots = kernel_slots(mask8, table, bt, c.k_max or c.e, interpret=True)
            for name, v in zip(("tok", "off", "cnt"), slots, strict=True):
                res[f"{c.name}/slots{bt}/{name}"] = np.asarray(v)
    np.savez(out, **res)


if __name__ == "__main__":
    main(sys.argv[1])
