"""Runs the Triton kernels under the interpreter on CPU; writes their outputs to an .npz file.

Started by tests/test_kernels_triton.py in a fresh process with TRITON_INTERPRET=1 (the
interpreter only works when that is set before triton is first imported). Usage:
``python tests/triton_interp_runner.py OUT.npz``.
"""

import functools
import itertools
import os
import sys
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before starting"
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from kernel_cases import (  # noqa: E402
    DECODE_CASES,
    GRAD_ARGS,
    GROUPED_BACKWARDS,
    GROUPED_CASES,
    ONE_TOKEN_TUNINGS,
    grad_loss,
    inputs,
    kwargs,
)

from prunepath_jax.kernels.triton_decode import sparse_ffn_decode  # noqa: E402
from prunepath_jax.kernels.triton_grouped import sparse_ffn_grouped  # noqa: E402


def main(out: str) -> None:
    res = {}
    for fn, cases, tuning in (
        (sparse_ffn_decode, DECODE_CASES, {}),
        (sparse_ffn_grouped, GROUPED_CASES, {"block_m": 16}),
    ):
        for c in cases:
            y, k = fn(*inputs(c), c.tau, interpret=True, **kwargs(c), **tuning)
            res[f"{c.name}/y"] = np.asarray(y.astype(np.float32))
            res[f"{c.name}/k"] = np.asarray(k)
    for c in (c for c in DECODE_CASES if c.t == 1):
        for label, tuning in ONE_TOKEN_TUNINGS.items():
            y, k = sparse_ffn_decode(*inputs(c), c.tau, interpret=True, **kwargs(c), **tuning)
            res[f"{c.name}+{label}/y"] = np.asarray(y.astype(np.float32))
            res[f"{c.name}+{label}/k"] = np.asarray(k)
    for c in GROUPED_CASES:  # the up kernel as W · xᵀ (`_grouped_up_t_kernel`)
        y, k = sparse_ffn_grouped(*inputs(c), c.tau, interpret=True, **kwargs(c), block_m=16,
                                  up_form="wx")  # fmt: skip
        res[f"{c.name}+wx/y"] = np.asarray(y.astype(np.float32))
        res[f"{c.name}+wx/k"] = np.asarray(k)
    for c in GROUPED_CASES:  # the opt-in tensor-core router logits
        y, k = sparse_ffn_grouped(*inputs(c), c.tau, interpret=True, **kwargs(c), block_m=16,
                                  router_logits="bf16x3")  # fmt: skip
        res[f"{c.name}+bf16x3/y"] = np.asarray(y.astype(np.float32))
        res[f"{c.name}+bf16x3/k"] = np.asarray(k)
    for i, c in enumerate(GROUPED_CASES):  # the selection by the Triton kernel, forward and
        # gradients: the default (8 tokens a program, the token lists written by
        # `triton_group.kernel_slots` from the selection's counts), one token a program with
        # the atomic counts and XLA's lists, 4 tokens a program with the per-program counts
        layout = ({}, {"select_block_t": 1, "select_counts": "atomic"},
                  {"select_block_t": 4, "select_counts": "partial"})[i % 3]  # fmt: skip
        fn = functools.partial(sparse_ffn_grouped, interpret=True, block_m=16, selection="triton",
                               **layout)  # fmt: skip
        y, k = fn(*inputs(c), c.tau, **kwargs(c))
        res[f"{c.name}+tsel/y"] = np.asarray(y.astype(np.float32))
        res[f"{c.name}+tsel/k"] = np.asarray(k)
        grads = jax.grad(grad_loss(fn, c), argnums=(0, 1, 2, 3))(*inputs(c))
        for name, gr in zip(GRAD_ARGS, grads, strict=True):
            res[f"{c.name}+tsel/grad_{name}"] = np.asarray(gr.astype(np.float32))
    for c, bwd in itertools.product(GROUPED_CASES, GROUPED_BACKWARDS):  # the training forward
        fn = functools.partial(sparse_ffn_grouped, interpret=True, block_m=16,
                               **GROUPED_BACKWARDS[bwd])  # fmt: skip
        grads = jax.grad(grad_loss(fn, c), argnums=(0, 1, 2, 3))(*inputs(c))
        for name, gr in zip(GRAD_ARGS, grads, strict=True):
            res[f"{c.name}+{bwd}/grad_{name}"] = np.asarray(gr.astype(np.float32))
    np.savez(out, **res)


if __name__ == "__main__":
    main(sys.argv[1])
