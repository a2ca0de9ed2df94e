"""Runs the batched one-launch decode step (``kernels.triton_megastep_batch`` through
``prunepath_jax.megastep.step``) under the Triton interpreter and the model's XLA decode step on
the same sequences; writes both to an .npz file.

Started by tests/test_megastep_batch.py in a fresh process with TRITON_INTERPRET=1. Usage:
``python tests/megastep_batch_runner.py OUT.npz``.
"""

import os
import sys
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before starting"
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from megastep_cases import BATCH_CASES, as_fp32, build_batch  # noqa: E402

from prunepath_jax import megastep  # noqa: E402


def main(out: str) -> None:
    res = {}
    for c in BATCH_CASES:
        model, args, cache, tok_b, pos_b = build_batch(c)
        ref = model(tok_b[:, None], pos_b[:, None], cache=cache, ffn_args=args)
        mw = c.mw(model)
        kc, vc = megastep.stack_cache(cache)
        tau_l = jnp.stack([a.tau for a in args])
        logits, kc2, vc2, k_lb, fail = megastep.step(model, mw, tok_b, pos_b, kc, vc, tau_l,
                                                     c.launch(programs=1),
                                                     interpret=True)  # fmt: skip
        rows = np.arange(len(c.lengths))
        p = np.asarray(pos_b)
        res[f"{c.name}/logits"] = np.asarray(logits, np.float32)
        res[f"{c.name}/ref_logits"] = np.asarray(ref.logits[:, 0], np.float32)
        res[f"{c.name}/k"] = np.asarray(k_lb)
        res[f"{c.name}/ref_k"] = np.stack([np.asarray(s.k_t).reshape(-1) for s in ref.ffn_stats])
        res[f"{c.name}/kv"] = np.asarray(jnp.stack([kc2[:, rows, p], vc2[:, rows, p]]), np.float32)
        res[f"{c.name}/ref_kv"] = np.asarray(
            jnp.stack([jnp.stack([lc.k[rows, p] for lc in ref.cache]),
                       jnp.stack([lc.v[rows, p] for lc in ref.cache])]), np.float32)  # fmt: skip
        # Every cache row but each sequence's own position is what it was.
        written = np.zeros(kc.shape[1:3], bool)
        written[rows, p] = True
        same = [np.array_equal(np.asarray(a)[:, ~written], np.asarray(b)[:, ~written])
                for a, b in ((kc2, kc), (vc2, vc))]  # fmt: skip
        res[f"{c.name}/old_kv_same"] = np.asarray(all(same))
        res[f"{c.name}/fail"] = np.asarray(fail)
        if c.case.dtype != "float32":
            m32, cache32 = as_fp32(model, cache)
            ref32 = m32(tok_b[:, None], pos_b[:, None], cache=cache32, ffn_args=args)
            res[f"{c.name}/ref32_logits"] = np.asarray(ref32.logits[:, 0])
        print(c.name, "done", flush=True)
    np.savez(out, **res)


if __name__ == "__main__":
    jax.config.update("jax_platforms", "cpu")
    main(sys.argv[1])
