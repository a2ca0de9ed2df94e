"""Runs the grouped up kernel with float8 rows of x (``x_fp8``) under the Triton interpreter.

Started by tests/test_grouped_fp8.py in a fresh process with TRITON_INTERPRET=1. Writes each
grouped case's ``y`` and ``k``, and the message the kernel path raises under ``jax.grad``.
Usage: ``python tests/fp8_interp_runner.py OUT.npz``.
"""

import os
import sys
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before starting"
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from kernel_cases import GROUPED_CASES, grad_loss, inputs, kwargs  # noqa: E402

from prunepath_jax.kernels.triton_grouped import sparse_ffn_grouped  # noqa: E402


def main(out: str) -> None:
    res = {}
    for i, c in enumerate(GROUPED_CASES):  # the default selection, and XLA's on one case
        sel = {"selection": "xla"} if i == 1 else {}
        y, k = sparse_ffn_grouped(*inputs(c), c.tau, interpret=True, **kwargs(c), block_m=16,
                                  x_fp8=True, **sel)  # fmt: skip
        res[f"{c.name}/y"] = np.asarray(y.astype(np.float32))
        res[f"{c.name}/k"] = np.asarray(k)
    c = GROUPED_CASES[0]
    fn = lambda *a, **kw: sparse_ffn_grouped(*a, interpret=True, block_m=16, x_fp8=True, **kw)  # noqa: E731
    try:
        jax.grad(grad_loss(fn, c))(*inputs(c))
        res["grad_error"] = np.array("no error")
    except ValueError as err:
        res["grad_error"] = np.array(str(err))
    np.savez(out, **res)


if __name__ == "__main__":
    main(sys.argv[1])
