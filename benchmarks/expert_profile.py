"""Profile target for the decode expert kernel: each variant runs a few times, nothing else.

Run under Nsight Compute on the GPU machine to read each variant's duration, DRAM throughput and
warp-stall reasons at one shape (default: one Llama-3-8B layer, batch 1, k/E = 25%)::

    ncu --clock-control none -k regex:prunepath --section SpeedOfLight \
        --section WarpStateStats --csv --page details \
        python3 benchmarks/expert_profile.py --variants default split

With ``--time`` (no ncu) it measures each variant two ways on a chain of calls in one jit
(rotated weight sets, interleaved rounds so drift hits every variant alike): the device time of
its kernels per call from a ``jax.profiler`` trace (precise), and wall time per call (includes
launch gaps; noisy).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import copy_bandwidth, header, kernel_durations, time_fn, write_rows  # noqa: E402
from pallas_decode import Layer, after, empty_jit_time  # noqa: E402

from prunepath_jax.kernels import jt  # noqa: E402
from prunepath_jax.kernels import pallas_decode as pd  # noqa: E402


def _bal(prefetch: int, **kw) -> dict:
    """A balanced-kernel variant: unit loop with (1) or without (0) prefetch, plus ``kw``."""
    return {"experts": "balanced", "prefetch": prefetch, **kw}


# Named tunings of the expert kernel (see ``pallas_plan.plan``).
# ``*_acq_rel``: Pallas' own fenced atomics instead of the relaxed ones (``pallas_atomic.py``).
VARIANTS = {
    "default": {},  # the plan's default: one token at a large d takes the balanced kernel
    "blocks": {"experts": "blocks"},  # the block kernel's own defaults
    "default_acq_rel": {"atomics": "acq_rel"},
    "split": {"down": "split"},
    "split_acq_rel": {"down": "split", "atomics": "acq_rel"},
    "preact": {"down": "preact", "block_d_down": 512, "down_chunks": 32},
    "bcast": {"use_dot": False},
    "bcast_acq_rel": {"use_dot": False, "atomics": "acq_rel"},
    "bcast_split": {"use_dot": False, "down": "split"},
    "bn32": {"block_n": 32},
    "bn32_w8": {"block_n": 32, "num_warps": 8},
    "stages4": {"num_stages": 4},
    "bd256": {"block_d": 256},
    "bd1024": {"block_d": 1024},
    "gate16": {"_gate_rows": 16},  # one token, but the gate table padded to the 16 dot rows
    # One token, balanced persistent programs (pallas_balanced.py): defaults 2-neuron units
    # with the next unit prefetched, whole-d chunks (≤ 4096), two programs per SM, 8 warps, 2
    # stages; the bal_* variants without "pf" in their name are the unit loop without prefetch.
    "balanced": {"experts": "balanced"},
    "bal_bn2": _bal(0, block_n=2),
    "bal_bn8": _bal(0, block_n=8),
    "bal_bn16": _bal(0, block_n=16),
    "bal_p2x": _bal(0, _programs_x=2),
    "bal_p4x": _bal(0, _programs_x=4),
    "bal_s1": _bal(0, num_stages=1),
    "bal_s3": _bal(0, num_stages=3),
    "bal_w4": _bal(0, num_warps=4),
    "bal_bd1024": _bal(0, block_d=1024),
    "bal_bd1024_s3": _bal(0, block_d=1024, num_stages=3),
    "bal_bn8_p2x": _bal(0, block_n=8, _programs_x=2),
    "bal_bn16_p2x": _bal(0, block_n=16, _programs_x=2),
    "bal_bn16_p4x": _bal(0, block_n=16, _programs_x=4),
    "bal_bn16_bd2048": _bal(0, block_n=16, block_d=2048),
    "bal_bn16_w16": _bal(0, block_n=16, num_warps=16),
    "bal_bn32": _bal(0, block_n=32),
    "bal_bn32_p2x": _bal(0, block_n=32, _programs_x=2),
    # Software-pipelined unit loop (the next unit's W_gate/W_up rows in flight meanwhile).
    "bal_pf_bn16": _bal(1, block_n=16),
    "bal_pf_bn4": _bal(1, block_n=4),
    "bal_pf_bn8": _bal(1, block_n=8),
    "bal_pf_bn8_w16": _bal(1, block_n=8, num_warps=16),
    "bal_pf_bn4_p2x": _bal(1, block_n=4, _programs_x=2),
    "bal_pf_bn4_w4": _bal(1, block_n=4, num_warps=4),
    "bal_pf_bn2": _bal(1, block_n=2, _programs_x=1),
    "bal_pf_bn2_p2x": _bal(1, block_n=2, _programs_x=2),
    "bal_pf_bn2_p4x_w4": _bal(1, block_n=2, _programs_x=4, num_warps=4),
    "bal_pf_bn1_p2x": _bal(1, block_n=1, _programs_x=2),
    "bal_pf_bn1_p4x_w4": _bal(1, block_n=1, _programs_x=4, num_warps=4),
    "bal_pf_bn4_bd2048": _bal(1, block_n=4, block_d=2048),
    "bal_pf_bn4_bd1024": _bal(1, block_n=4, block_d=1024),
}


def variant_tuning(name: str) -> dict:
    """A variant's tuning: its public keys, ``_programs_x`` as a multiple of the SM count."""
    v = VARIANTS[name]
    tuning = {k: val for k, val in v.items() if not k.startswith("_")}
    if "_programs_x" in v:
        tuning["programs"] = v["_programs_x"] * jt.default_programs()
    return tuning


def gate_table(lay, t, k, rows, seed=3):
    """A gate table with k random experts per token (what routing would hand the kernel)."""
    ep = max(pd._next_pow2(lay.e), 16)
    rng = np.random.default_rng(seed)
    g = np.zeros((rows, ep), np.float32)
    for i in range(t):
        g[i, rng.choice(lay.e, k, replace=False)] = rng.uniform(0.2, 0.9, k)
    return jnp.asarray(g)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--kfrac", type=float, nargs="+", default=[0.25])
    ap.add_argument("--shape", default="4096,14336,32", help="d,f,G")
    ap.add_argument("--time", action="store_true", help="time (no ncu): chains, interleaved")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--out", default="results/expert_profile.jsonl")
    a = ap.parse_args()
    d, f, g = (int(v) for v in a.shape.split(","))
    t = a.batch
    lay = Layer(d, f, g, jnp.bfloat16, 4 if a.time else 1)
    xs = lay.xs(a.n, t)
    rows, head = [], header()
    bw = max(copy_bandwidth().values()) if a.time else None
    if bw:
        print(f"copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
        print(f"SMs: {jt.default_programs()} (the balanced kernel's grid unit)", flush=True)
    for kf in a.kfrac:
        k = max(1, round(kf * lay.e))
        fns, datas = {}, {}
        for name in a.variants:
            tuning = variant_tuning(name)
            plan = pd._plan(t, d, g, lay.dtype, tuning)
            tp = plan["tp"]
            gt = gate_table(lay, t, k, VARIANTS[name].get("_gate_rows", 1 if t == 1 else tp))
            x_p = [  # one token is passed unpadded (the kernel broadcasts it), as the layer does
                xs[j] if t in (1, tp) else jnp.zeros((tp, d), lay.dtype).at[:t].set(xs[j])
                for j in range(a.n)
            ]
            n_slots = min(lay.e, t * k)
            if not a.time:  # ncu: two plain calls per variant, the second one is the reading
                fn = jax.jit(
                    lambda gt_, x_, wi, wo, plan=plan, n_slots=n_slots: pd.expert_ffn(
                        gt_, x_, wi, wo, t=t, group_size=g, n_slots=n_slots, plan=plan,
                        interpret=False,
                    )
                )  # fmt: skip
                _, wi, wo = lay.sets[0]
                for _ in range(2):
                    jax.block_until_ready(fn(gt, x_p[0], wi, wo))
                print(f"ran {name} k={k}", flush=True)
                continue

            def make(n, plan=plan, n_slots=n_slots):
                def chain(data):
                    sets, gt_, xps = data
                    outs = [None]
                    for j in range(n):
                        _, wi, wo = sets[j % len(sets)]
                        outs.append(pd.expert_ffn(
                            gt_, after(xps[j], outs[-1]), wi, wo, t=t, group_size=g,
                            n_slots=n_slots, plan=plan, interpret=False,
                        ))  # fmt: skip
                    return outs[1:]

                return jax.jit(chain)

            fn, inputs = make(a.n), (lay.sets, gt, x_p)
            try:  # compile now (timing reuses it): a tiling past the GPU's resources skips
                jax.block_until_ready(fn(inputs))
            except Exception as err:  # noqa: BLE001 - reported, the sweep goes on
                print(f"skip {name} k={k}: {type(err).__name__}: {str(err)[:300]}", flush=True)
                continue
            fns[name], datas[name] = fn, inputs
        if not a.time:
            continue
        t_empty = empty_jit_time(a.n, 20)
        per = {name: [] for name in fns}
        dev = {name: [] for name in fns}
        names = {}
        for _ in range(a.rounds):
            for name, fn in fns.items():
                s = time_fn(fn, datas[name], warmup=1, iters=10)
                per[name].append((s - t_empty) / a.n * 1e6)
                # Device time of every kernel of the chain (the variant's kernels, the zeroed
                # accumulators), per call: no launch gaps, no host noise.
                if len(dev[name]) < 2:  # two traces suffice (device times hardly vary)
                    durs = kernel_durations(fn, datas[name])
                    dev[name].append(sum(sum(v) for v in durs.values()) / a.n)
                    names[name] = sorted(durs)
        mb = min(lay.e, t * k) * 3 * g * d * 2 / 1e6  # upper bound on the union's bytes
        for name, us in per.items():
            med = float(np.median(dev[name]))
            r = {**head, "what": "expert_kernel", "variant": name, "tuning": VARIANTS[name],
                 "batch": t, "k": k, "k_frac": kf, "shape": a.shape, "device_us": med,
                 "device_us_rounds": dev[name], "wall_us_median": float(np.median(us)),
                 "wall_us_rounds": us, "MB_max": mb, "copy_TB_s": bw / 1e12,
                 "frac_of_copy": mb * 1e6 / (med * 1e-6) / bw,
                 "kernels": names[name]}  # fmt: skip
            rows.append(r)
            print(json.dumps({k_: r[k_] for k_ in ("variant", "k", "device_us", "wall_us_median",
                                                   "frac_of_copy")}), flush=True)  # fmt: skip
    if rows:
        write_rows(a.out, rows)


if __name__ == "__main__":
    main()
