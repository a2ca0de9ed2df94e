"""Decode with PrunePath experts sharded over the mesh's `model` axis (expert parallel), against
one GPU: the Llama-3-8B shape, random bf16 weights, batch 1.

Each PrunePath FFN's neurons — whole experts, as they are contiguous blocks — live on the
`model` axis (`sharding.param_spec`: w_in (-, model, fsdp), w_out (model, fsdp)); attention heads
and the vocabulary are split the same way, so each GPU reads 1/N of the weights per token and
the partial FFN/attention outputs are summed across GPUs (one all-reduce per projection back).
Times `decode_chunk` (the jitted fori_loop of `--steps` decode steps) per mesh size.

    python scripts/ep_decode.py --preset llama-3-8b --devices 1 2 --tau 0.5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import header, markdown_table, write_rows  # noqa: E402

from prunepath_jax.config import PRESETS, PrunePathConfig  # noqa: E402
from prunepath_jax.generate import decode_chunk, prefill  # noqa: E402
from prunepath_jax.models.layers import init_cache  # noqa: E402
from prunepath_jax.nn import route_args, set_compute  # noqa: E402
from prunepath_jax.sharding import make_mesh  # noqa: E402
from prunepath_jax.train.parallel import init_sharded  # noqa: E402


def bench(preset, n_dev, tau, compute, prompt_len, steps, chunks, router_scale):
    mesh = make_mesh(1, 1, n_dev, devices=jax.devices()[:n_dev])
    cfg = PRESETS[preset].replace(prunepath=PrunePathConfig(group_size=32))
    model = init_sharded(cfg, jnp.bfloat16, mesh, seed=0, router_scale=router_scale)
    set_compute(model, compute)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, prompt_len)), jnp.int32)
    lengths = jnp.full((1,), prompt_len, jnp.int32)
    args = (jnp.float32(0), jnp.float32(1), jnp.zeros((0,), jnp.int32))
    ffn_args = route_args(cfg, tau)
    cache = init_cache(cfg, 1, prompt_len + steps * (chunks + 2) + 1, jnp.bfloat16)
    st = prefill(graphdef, state, tokens, lengths, cache, jax.random.key(0), *args,
                 ffn_args=ffn_args, greedy=True)  # fmt: skip
    for _ in range(2):
        st, _ = decode_chunk(graphdef, state, st, *args, jnp.int32(0), ffn_args,
                             n_steps=steps, greedy=True)  # fmt: skip
    jax.block_until_ready(st)
    t0 = time.perf_counter()
    for _ in range(chunks):
        st, _ = decode_chunk(graphdef, state, st, *args, jnp.int32(0), ffn_args,
                             n_steps=steps, greedy=True)  # fmt: skip
    jax.block_until_ready(st)
    dt = (time.perf_counter() - t0) / (chunks * steps)
    return {**header(), "bench": "ep_decode", "preset": preset, "devices": n_dev,
            "mesh": dict(mesh.shape), "tau": tau, "compute": compute,
            "us_per_token": dt * 1e6, "tok_s": 1.0 / dt}  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tau", type=float, default=0.5)
    ap.add_argument("--compute", nargs="+", default=["masked"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--router-scale", type=float, default=1.0)
    ap.add_argument("--out", default="results/ep_decode.jsonl")
    a = ap.parse_args(argv)
    rows = []
    for compute in a.compute:
        for n in a.devices:
            row = bench(a.preset, n, a.tau, compute, a.prompt_len, a.steps, a.chunks,
                        a.router_scale)  # fmt: skip
            print(row, flush=True)
            rows.append(row)
    base = {r["compute"]: r["tok_s"] for r in rows if r["devices"] == 1}
    for r in rows:
        if r["compute"] in base:
            r["speedup_vs_1gpu"] = r["tok_s"] / base[r["compute"]]
    write_rows(a.out, rows)
    print(markdown_table(rows, ["preset", "compute", "devices", "tau", "us_per_token", "tok_s",
                                "speedup_vs_1gpu"]))  # fmt: skip


if __name__ == "__main__":
    main()
