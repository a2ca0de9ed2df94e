"""Training throughput and MFU of the sharded PrunePath step (random weights, named shapes).

Times the real `prunepath_jax.train` step (objective, tau schedule, two optimiser groups, NaN
guard; bf16 compute, fp32 master weights and Adam state) on every visible device, full vs
router-only training. Model FLOPs per token follow PaLM's count, `6 N + 12 L H Q T` (N = matmul
weights incl. the LM head, H Q = attention width, T = sequence): the masked PrunePath FFN still
computes every expert during training, so the dense count is the work done. MFU is against the
bf16 dense peak given by `--peak-tflops` (H100/H200 SXM datasheet: 989). Router-only mode skips
weight gradients (~4N of work), but its MFU is reported on the same 6N basis: it is a speed, not
a utilisation claim.

    python benchmarks/train_step.py --preset smollm2-135m llama-3.2-1b --batch 16 --seq 2048
    python benchmarks/train_step.py --preset llama-3.2-1b --batch 8 --tau-target 0.5 \
        --ffn masked kernels kernels-xla-bwd
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    GROUPED_PATHS,
    backward_precision,
    grouped_tuning,
    header,
    kernel_logits,
    markdown_table,
    router_logits_mode,
    write_rows,
)

from prunepath_jax.config import PRESETS, PrunePathConfig  # noqa: E402
from prunepath_jax.nn import set_compute  # noqa: E402
from prunepath_jax.train import parallel  # noqa: E402
from prunepath_jax.train import state as st  # noqa: E402
from prunepath_jax.train.config import TrainConfig  # noqa: E402
from prunepath_jax.train.ffn_choice import PathChooser  # noqa: E402


def flops_per_token(cfg, seq: int) -> float:
    d, f, L = cfg.d_model, cfg.d_ff, cfg.n_layers
    attn_w = d * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    n = L * (attn_w + 3 * d * f + d * cfg.n_experts) + cfg.vocab_size * d
    return 6.0 * n + 12.0 * L * cfg.n_heads * cfg.head_dim * seq


def pp_config(name: str):
    return PRESETS[name].replace(prunepath=PrunePathConfig(group_size=32))


def build(name: str, mesh, seed: int = 0, router_scale: float = 0.1):
    """Random fp32 weights created in place on the mesh, with a live router (real selections;
    the larger ``router_scale``, the more peaked its softmax and the sparser a given tau)."""
    return parallel.init_sharded(
        pp_config(name), jnp.float32, mesh, seed=seed, router_scale=router_scale
    )


FFN_MODES = {"masked": None, **GROUPED_PATHS, "auto": {}}  # auto: TrainConfig.ffn_kernels_auto


def ffn_tuning(ffn: str, expert_group: int | None = None) -> dict:
    """The grouped GEMM's tuning for one ``--ffn`` mode: its backward form, and the program
    order ``expert_group`` (None keeps the shipped one)."""
    tn = dict(FFN_MODES[ffn] or {})
    return tn if expert_group is None else {**tn, "expert_group": expert_group}


def bench(name, mode, batch, seq, steps, mesh, peak, ffn="masked", tau=0.5, router_scale=0.1):
    model = build(name, mesh, router_scale=router_scale)
    masked_graphdef = st.split_model(model, mode)[0] if ffn == "auto" else None
    if ffn != "masked":  # what TrainConfig.ffn_kernels does: the grouped GEMM's kernels
        set_compute(model, "kernel", mesh=mesh)
    # tau at its target from the first step: the kernels' cost depends on it (the masked
    # path's does not), so every timed step runs at the sparsity the row reports.
    tcfg = TrainConfig(mode=mode, batch_size=batch, seq_len=seq, compute_dtype="bfloat16",
                       warmup_steps=0, decay_steps=0, hold_steps=1000, tau_target=tau,
                       progress=False)  # fmt: skip
    graphdef, tr, fr = st.split_model(model, mode)
    opt = st.make_optimizer(tcfg, tr)
    s = st.init_state(tcfg, tr, opt)
    ssh, fsh = parallel.tree_shardings(s, mesh), parallel.tree_shardings(fr, mesh)
    s, fr = parallel.place(s, ssh), parallel.place(fr, fsh)
    del model, tr
    rng = np.random.default_rng(0)
    toks = rng.integers(0, PRESETS[name].vocab_size, (batch, seq + 1)).astype(np.int32)
    ones = np.ones((batch, seq), np.float32)
    local = {"tokens": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": ones,
             "token_mask": ones, "labels": np.zeros(batch, np.int32),
             "last_index": np.full(batch, seq - 1, np.int32)}  # fmt: skip
    fn = parallel.jit_train_step(tcfg, graphdef, opt, mesh, ssh, fsh, local)
    b = parallel.put_batch(local, mesh)
    auto = {}
    if ffn == "auto":  # the training loop's choice (train/ffn_choice.py), then its steps timed
        fns = {"masked": parallel.jit_train_step(tcfg, masked_graphdef, opt, mesh, ssh, fsh,
                                                 local), "kernels": fn}  # fmt: skip
        chooser = PathChooser(tuple(fns))
        while chooser.trying:
            path, t0 = chooser.next(), time.perf_counter()
            s, m = fns[path](s, fr, b)
            sparsity = float(m["sparsity"])  # waits for the step, as the loop's metrics do
            chooser.record(path, time.perf_counter() - t0, sparsity)
        fn = fns[chooser.choice]
        auto = {"chosen": chooser.choice, "trial_ms": {p: t * 1e3 for p, t in
                                                       chooser.medians.items()}}  # fmt: skip
    t0 = time.perf_counter()
    s, m = fn(s, fr, b)
    loss_first = float(m["loss"])  # same weights and batch on every mesh: comparable
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        s, m = fn(s, fr, b)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        s, m = fn(s, fr, b)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    tok_s = batch * seq / dt
    cfg = pp_config(name)
    mfu = flops_per_token(cfg, seq) * tok_s / (peak * 1e12 * len(mesh.devices.flat))
    mem = jax.devices()[0].memory_stats() or {}
    row = {
        **header(), "bench": "train_step", "preset": name, "mode": mode, "batch": batch,
        "seq": seq, "devices": len(mesh.devices.flat), "mesh": dict(mesh.shape), "ffn": ffn,
        "step_ms": dt * 1e3, "tokens_per_s": tok_s, "mfu": mfu, "compile_s": compile_s,
        "loss_first": loss_first, "loss": float(m["loss"]), "sparsity": float(m["sparsity"]),
        "tau": float(m["tau"]), "router_scale": router_scale,
        "trainable_params": int(sum(x.size for x in jax.tree.leaves(s.params))),
        "opt_state_bytes": st.tree_bytes(s.opt_state),
        "peak_mem_gib": mem.get("peak_bytes_in_use", 0) / 2**30, **auto,
    }  # fmt: skip
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", nargs="+", default=["smollm2-135m", "llama-3.2-1b"])
    ap.add_argument("--modes", nargs="+", default=["full", "router"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--mesh", type=int, nargs=3, default=[-1, 1, 1], help="data fsdp model")
    ap.add_argument("--peak-tflops", type=float, default=989.0)

    def a_b(flag: str, shipped: str, before: str, help: str):
        """A switch timing the shipped form against the one it replaced, side by side."""
        ap.add_argument(flag, nargs="+", choices=[shipped, before], default=[shipped], help=help)

    a_b("--router-logits", "shared", "fp32", "shared: routing.router_logits as shipped (bf16 "
        "tensor-core split on CUDA); fp32: the fp32 GEMM at every size (as before)")  # fmt: skip
    a_b("--backward", "shipped", "fp32", "shipped: the router split's and the LM head's "
        "backward on bf16 tensor cores; fp32: the float32 products they replaced (fifty-first "
        "session)")  # fmt: skip
    ap.add_argument(
        "--ffn",
        nargs="+",
        choices=list(FFN_MODES),
        default=["masked"],
        help="masked: every expert computed, then masked (the default training path); kernels: "
        "the kernel registry (`TrainConfig.ffn_kernels`: on a GPU the grouped Triton GEMM and "
        "its backward kernel, per device under shard_map; weight gradients as dense GEMMs); "
        "kernels-dw: the weight gradients by the grouped kernel too; kernels-xla-bwd: the same "
        "forward with the backward's dy W_out^T and SwiGLU derivative in XLA; auto: the "
        "training loop's ffn_kernels_auto (masked and kernels timed, the faster one kept)",
    )
    a_b(
        "--kernel-logits",
        "shared",
        "recomputed",
        "the kernel modes' router logits and "
        "norm: shared (the registry routes from the layer's own, as shipped) or recomputed (a "
        "second logits product and RMSNorm per layer, before the fifty-second session)",
    )
    ap.add_argument("--tau-target", type=float, nargs="+", default=[0.5])
    ap.add_argument(
        "--expert-group",
        type=lambda v: v if v == "auto" else int(v),
        nargs="+",
        default=[None],
        help="the kernel modes once per grouped-GEMM program order (triton_grouped."
        "group_by_expert; 0 = expert by expert); default: the shipped order",
    )
    ap.add_argument(
        "--router-scale",
        type=float,
        default=0.1,
        help="std of the random routers: 0.1 makes them peaked (1B: ~88%% sparsity at tau "
        "0.97), smaller values spread the softmax, so tau reaches moderate sparsities",
    )
    ap.add_argument("--out", default="results/train_step.jsonl")
    a = ap.parse_args(argv)
    mesh = parallel.mesh_from_config(
        TrainConfig(mesh_data=a.mesh[0], mesh_fsdp=a.mesh[1], mesh_model=a.mesh[2])
    )
    rows = []
    for name in a.preset:
        for mode in a.modes:
            for logits, bwd in itertools.product(a.router_logits, a.backward):
                runs = [(t, f, eg, kl) for t, f in itertools.product(a.tau_target, a.ffn)
                        for eg in (a.expert_group if FFN_MODES[f] else [None])
                        for kl in (a.kernel_logits if FFN_MODES[f] else ["shared"])]  # fmt: skip
                for tau, ffn, eg, kl in runs:
                    with router_logits_mode(logits), grouped_tuning(**ffn_tuning(ffn, eg)), \
                            backward_precision(bwd), kernel_logits(kl):  # fmt: skip
                        row = bench(name, mode, a.batch, a.seq, a.steps, mesh, a.peak_tflops,
                                    ffn, tau, a.router_scale)  # fmt: skip
                    row["router_logits"], row["backward"] = logits, bwd
                    if eg is not None:
                        row["ffn"] = f"{ffn}@eg{eg}"
                    if kl != "shared":
                        row["ffn"] += f"+{kl}"
                    print(row, flush=True)
                    rows.append(row)
    write_rows(a.out, rows)
    cols = ["preset", "mode", "ffn", "tau", "sparsity", "router_logits", "backward", "devices",
            "batch", "seq", "step_ms", "tokens_per_s", "mfu", "trainable_params",
            "opt_state_bytes", "peak_mem_gib", "chosen"]  # fmt: skip
    print(markdown_table(rows, cols))


if __name__ == "__main__":
    main()
