"""How many bytes the grouped up kernel reads from HBM in each program order: an LRU model of L2.

Why: `triton_group.group_by_expert` can run the (expert, token tile) programs expert by expert
or in groups of experts ordered by token (tuning ``expert_group``). Which order keeps the reads
in the L2 depends on whether x [t, d] fits there. This walks the programs in launch order and
feeds each one's reads (its expert's gate/up slab, then its tile's token rows of x) through an
LRU cache of ``--l2-mb`` at the granularity of one row of x, counting the misses. Programs that
run at the same time are treated as consecutive, so it is a model, not a measurement: the GPU
answers with ``benchmarks/ffn_grad.py --expert-groups`` / ``ffn_kernels.py --prefill-tunings``.

    python scripts/l2_order_model.py --shape 16384 2048 256 0.33 --shape 4096 4096 448 0.25
"""

from __future__ import annotations

import argparse
from collections import OrderedDict

import jax.numpy as jnp
import numpy as np

from prunepath_jax.kernels.triton_group import group_by_expert


def hbm_bytes(t, d, e, frac, expert_group, l2_mb=50.0, block_m=128, g=32, seed=0):
    """``(missed, touched)`` bytes of one layer's up kernel: k = frac * E random experts per
    token, bf16 rows of x and slabs of W_in [2, G, d]."""
    rng = np.random.default_rng(seed)
    k = max(1, round(frac * e))
    score_te = rng.random((t, e))
    mask_te = score_te >= np.sort(score_te, axis=1)[:, e - k][:, None]
    tok, off, cnt, tile_e, tile_m = map(
        np.asarray, group_by_expert(jnp.asarray(mask_te), k, block_m, expert_group)
    )
    row = 2 * d
    slab_rows = 2 * g  # a slab is 2G rows of d, as many bytes as 2G rows of x
    cap = int(l2_mb * 2**20) // row
    lru: OrderedDict = OrderedDict()
    missed = touched = 0
    for ex, m in zip(tile_e, tile_m, strict=True):
        if ex >= e:
            continue
        lo, hi = off[ex] + m * block_m, off[ex] + min(cnt[ex], (m + 1) * block_m)
        keys = [("w", int(ex), r) for r in range(slab_rows)] + [("x", int(r)) for r in tok[lo:hi]]
        for key in keys:
            touched += 1
            if key in lru:
                lru.move_to_end(key)
                continue
            missed += 1
            lru[key] = None
            if len(lru) > cap:
                lru.popitem(last=False)
    return missed * row, touched * row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", nargs=4, action="append", metavar=("T", "D", "E", "FRAC"),
                    help="tokens, d_model, experts, k/E (repeatable)")  # fmt: skip
    ap.add_argument("--expert-groups", nargs="+", type=int, default=[0, 16, 32, 64, 128])
    ap.add_argument("--l2-mb", type=float, default=50.0)
    a = ap.parse_args()
    for t, d, e, frac in a.shape or [("16384", "2048", "256", "0.33")]:
        t, d, e, frac = int(t), int(d), int(e), float(frac)
        for eg in a.expert_groups:
            missed, touched = hbm_bytes(t, d, e, frac, eg, a.l2_mb)
            print(f"t {t} d {d} E {e} k/E {frac} expert_group {eg}: {missed / 1e9:.2f} GB "
                  f"from HBM of {touched / 1e9:.2f} GB read", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
