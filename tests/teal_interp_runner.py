"""Runs the TEAL decode kernels (``kernels/triton_teal.py``) under the Triton interpreter on
CPU and writes their outputs to an .npz file. Started by tests/test_teal_kernel.py in a fresh
process with TRITON_INTERPRET=1. Usage: ``python tests/teal_interp_runner.py OUT.npz``.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from teal_kernel_cases import FFN_CASES, GEMV_CASES, ffn_inputs, gemv_inputs  # noqa: E402


def main(out: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before starting"
    from prunepath_jax.kernels.triton_teal import masked_gemv, teal_ffn_decode

    res = {}
    for c in GEMV_CASES:
        x, w = (jnp.asarray(v, c.dtype) for v in gemv_inputs(c))
        for compacted, key in ((True, c.name), (False, f"{c.name}/masked")):
            y = masked_gemv(x, w, c.t, block_n=16, block_k=16, split_k=c.split_k,
                            compacted=compacted, interpret=True)  # fmt: skip
            res[key] = np.asarray(y, np.float32)
    for c in FFN_CASES:
        x, w_in, w_out = (jnp.asarray(v, c.dtype) for v in ffn_inputs(c))
        w_in_dn = jnp.concatenate(list(w_in), axis=0).T  # [d, c·f]: gate columns, then up
        y = teal_ffn_decode(x, w_in_dn, w_out, c.t_x, c.t_a,
                            act_name="silu" if c.c == 2 else "gelu_new", interpret=True,
                            block_n=16, block_k=16)  # fmt: skip
        res[c.name] = np.asarray(y.astype(jnp.float32))
    np.savez(out, **res)


if __name__ == "__main__":
    main(sys.argv[1])
