"""The sharded training step as one process per device (the multi-host code path) or as one
process over all devices; prints the per-step losses as JSON so the two can be compared.

One process per device, on one host (GPU: one GPU each; CPU: one CPU device each, gloo
collectives)::

    for i in 0 1; do JAX_COORDINATOR_ADDRESS=localhost:12355 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$i \
      CUDA_VISIBLE_DEVICES=$i python scripts/multiprocess_step.py --distributed & done; wait

One process over the same devices: `python scripts/multiprocess_step.py`. On several hosts, run
the distributed form on each host with the coordinator's address (see `prunepath train --help`).
Each process feeds only its own rows of the global batch (`parallel.put_batch`).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def tiny_config():
    from prunepath_jax.config import ModelConfig, PrunePathConfig

    return ModelConfig(family="llama", model_type="llama", vocab_size=256, d_model=64, d_ff=128,
                       n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, max_position=128,
                       activation="silu", norm_eps=1e-5, rope_theta=1e4,
                       prunepath=PrunePathConfig(group_size=16))  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", help="tiny or a prunepath_jax.config preset")
    ap.add_argument("--distributed", action="store_true")
    ap.add_argument("--cpu-devices", type=int, default=0, help="CPU: fake devices per process")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mesh", type=int, nargs=3, default=[1, -1, 1], help="data fsdp model")
    ap.add_argument("--compute", default="float32")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)

    import jax

    if a.cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", a.cpu_devices)
        if a.distributed:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import jax.numpy as jnp
    import numpy as np

    from prunepath_jax.config import PRESETS, PrunePathConfig
    from prunepath_jax.train import parallel
    from prunepath_jax.train import state as st
    from prunepath_jax.train.config import TrainConfig

    cfg = TrainConfig(distributed=a.distributed, mesh_data=a.mesh[0], mesh_fsdp=a.mesh[1],
                      mesh_model=a.mesh[2], batch_size=a.batch, seq_len=a.seq,
                      compute_dtype=a.compute, warmup_steps=1, decay_steps=2, hold_steps=100,
                      tau_target=0.5, progress=False)  # fmt: skip
    parallel.init_distributed(cfg)
    mesh = parallel.mesh_from_config(cfg)
    mcfg = tiny_config() if a.preset == "tiny" else PRESETS[a.preset]
    if mcfg.prunepath is None:
        mcfg = mcfg.replace(prunepath=PrunePathConfig(group_size=32))
    model = parallel.init_sharded(mcfg, jnp.float32, mesh, seed=0, router_scale=0.1)
    graphdef, tr, fr = st.split_model(model, "full")
    opt = st.make_optimizer(cfg, tr)
    ssh = parallel.tree_shardings(jax.eval_shape(lambda p: st.init_state(cfg, p, opt), tr), mesh)
    state = jax.jit(lambda p: st.init_state(cfg, p, opt), out_shardings=ssh)(tr)
    fsh = parallel.tree_shardings(fr, mesh)

    rng = np.random.default_rng(0)  # the same global batch in every process
    toks = rng.integers(0, mcfg.vocab_size, (a.batch, a.seq + 1)).astype(np.int32)
    ones = np.ones((a.batch, a.seq), np.float32)
    glob = {"tokens": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": ones,
            "token_mask": ones, "labels": np.zeros(a.batch, np.int32),
            "last_index": np.full(a.batch, a.seq - 1, np.int32)}  # fmt: skip
    n, i = jax.process_count(), jax.process_index()
    rows = a.batch // n
    local = {k: v[i * rows : (i + 1) * rows] for k, v in glob.items()}
    fn = parallel.jit_train_step(cfg, graphdef, opt, mesh, ssh, fsh, local)
    losses, times = [], []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        state, m = fn(state, fr, parallel.put_batch(local, mesh))
        losses.append(float(m["loss"]))
        times.append(time.perf_counter() - t0)
    # ffn_kernels_auto's choice, each process proposing another path: all must run one
    from prunepath_jax.train.loop import agree_on_process0

    agreed = agree_on_process0(("masked", "kernels"))("kernels" if i % 2 else "masked")
    res = {"process": i, "processes": n, "devices": jax.device_count(),
           "mesh": dict(mesh.shape), "preset": a.preset, "losses": losses,
           "step_s": times, "backend": jax.default_backend(), "agreed": agreed}  # fmt: skip
    print("RESULT " + json.dumps(res), flush=True)
    if a.out and i == 0:
        with open(a.out, "a") as f:
            f.write(json.dumps(res) + "\n")
    if a.distributed:
        jax.distributed.shutdown()
    os._exit(0)  # skip slow interpreter teardown of the distributed runtime


if __name__ == "__main__":
    main()
