"""Runs the one-launch decode step (``prunepath_jax.megastep``) under the Triton interpreter and
the model's XLA decode step on the same inputs; writes both to an .npz file.

Started by tests/test_megastep.py in a fresh process with TRITON_INTERPRET=1. Usage:
``python tests/megastep_interp_runner.py OUT.npz``.
"""

import os
import sys
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before starting"
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from megastep_cases import CASES, as_fp32, build  # noqa: E402

from prunepath_jax import megastep  # noqa: E402
from prunepath_jax.kernels import triton_megastep as tm  # noqa: E402


def main(out: str) -> None:
    res = {}
    for c in CASES:
        model, args, cache, tok, pos = build(c)
        ref = model(tok[None, None], pos[None, None], cache=cache, ffn_args=args)
        mw = megastep.pack(model, head=c.head_in)
        kc, vc = megastep.stack_cache(cache)
        tau_l = jnp.stack([a.tau for a in args])
        launch = megastep.Launch(programs=1, splits=c.splits, block_t=c.block_t,
                                 router_in_c=c.router_in_c, unit_table=c.unit_table,
                                 merge_bc=c.merge_bc, parts=c.parts,
                                 router_in_items=c.router_in_items,
                                 ranked_select=c.ranked_select,
                                 head_in=c.head_in, qkv_cols=c.qkv_cols,
                                 o_cols=c.o_cols)  # fmt: skip
        logits, kc2, vc2, k_l, fail = megastep.step(model, mw, tok[None], pos[None], kc, vc,
                                                    tau_l, launch, interpret=True)  # fmt: skip
        p = int(pos)
        res[f"{c.name}/logits"] = np.asarray(logits[0], np.float32)
        res[f"{c.name}/ref_logits"] = np.asarray(ref.logits[0, 0], np.float32)
        res[f"{c.name}/k"] = np.asarray(k_l)
        res[f"{c.name}/ref_k"] = np.asarray([int(s.k_t.reshape(-1)[0]) for s in ref.ffn_stats])
        res[f"{c.name}/kv"] = np.asarray(jnp.stack([kc2[:, p], vc2[:, p]]), np.float32)
        res[f"{c.name}/ref_kv"] = np.asarray(
            jnp.stack([jnp.stack([lc.k[0, p] for lc in ref.cache]),
                       jnp.stack([lc.v[0, p] for lc in ref.cache])]), np.float32)  # fmt: skip
        res[f"{c.name}/old_kv_same"] = np.asarray(
            bool(jnp.all(kc2[:, :p] == kc[:, :p]) & jnp.all(vc2[:, p + 1 :] == vc[:, p + 1 :]))
        )
        res[f"{c.name}/fail"] = np.asarray(fail)
        if c.dtype != "float32":  # the same weights in fp32: what bf16 rounding is measured from
            m32, cache32 = as_fp32(model, cache)
            ref32 = m32(tok[None, None], pos[None, None], cache=cache32, ffn_args=args)
            res[f"{c.name}/ref32_logits"] = np.asarray(ref32.logits[0, 0])
        print(c.name, "done", flush=True)
    # The barrier guard: two programs run one after the other here, so program 0 waits for an
    # arrival that cannot come, gives up after `spin` polls and must say so.
    c = CASES[0]
    model, args, cache, tok, pos = build(c)
    kc, vc = megastep.stack_cache(cache)
    h = model.embed_tokens(tok[None])  # [1, d]: a given residual row, token 0
    inv = jnp.ones((c.head_dim // 2,))
    guard = tm.megastep(h, 0, inv, pos, jnp.full((c.layers,), c.tau),
                        *megastep.pack(model).layers(), kc, vc, eps=1e-5, programs=2, splits=1,
                        spin=20, interpret=True)  # fmt: skip
    res["guard/fail"] = np.asarray(guard[4])
    np.savez(out, **res)


if __name__ == "__main__":
    jax.config.update("jax_platforms", "cpu")
    main(sys.argv[1])
