"""Decode and prefill speed of our dense model (the baseline every sparse path is compared to).

For each shape: prefill a random prompt, then time the jitted decode loop (`decode_chunk`, `steps`
tokens per compiled call, the KV cache growing as in real generation). Reports µs per decode step
next to the bytes-read floor (weights + KV cache at the mean context, over the copy bandwidth
measured in the same run on GPU), and prefill tokens/s.

    python benchmarks/decode.py --shapes smollm2-135m llama-3.2-1b llama-3-8b --dtype bfloat16
    python benchmarks/decode.py --model default --batch 1 8 --dtype float32     # 2-core CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from common import copy_bandwidth, header, markdown_table, write_rows  # noqa: E402

from prunepath_jax.config import PRESETS  # noqa: E402
from prunepath_jax.generate import decode_chunk, decode_chunk_donating, prefill  # noqa: E402
from prunepath_jax.models.layers import init_cache  # noqa: E402
from prunepath_jax.models.llama import LlamaModel  # noqa: E402


def weight_bytes(model) -> int:
    """Bytes a decode step must read: every parameter except the embedding rows it looks up
    (a tied embedding is read whole by the LM head, so it counts)."""
    _, state = nnx.split(model)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    cfg = model.cfg
    if not cfg.tie_embeddings:
        emb = model.embed_tokens.embedding[...]
        total -= emb.size * emb.dtype.itemsize
    return total


def bench_one(model, name, batch, prompt_len, steps, chunks, bw, dtype) -> dict:
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    s = prompt_len + steps * (chunks + 2) + 1
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, prompt_len)), jnp.int32)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    args = (jnp.float32(0), jnp.float32(1), jnp.zeros((0,), jnp.int32))

    def run_prefill():
        cache = init_cache(cfg, batch, s, dtype)
        return prefill(graphdef, state, tokens, lengths, cache, jax.random.key(0), *args,
                       greedy=True)  # fmt: skip

    st = jax.block_until_ready(run_prefill())  # compile
    t0 = time.perf_counter()
    st = jax.block_until_ready(run_prefill())
    t_prefill = time.perf_counter() - t0
    fn = decode_chunk if jax.default_backend() == "cpu" else decode_chunk_donating
    hlo = fn.lower(graphdef, state, st, *args, jnp.int32(0), n_steps=steps, greedy=True)
    hlo = hlo.compile().as_text()
    if os.environ.get("DUMP_HLO_DIR"):
        Path(os.environ["DUMP_HLO_DIR"], f"{name}_b{batch}_s{steps}.hlo.txt").write_text(hlo)
    kernels = {k: hlo.count(k) for k in (" fusion(", " custom-call(", " while(", " scatter(")}
    for _ in range(2):  # compile + warm
        st, _ = fn(graphdef, state, st, *args, jnp.int32(0), n_steps=steps, greedy=True)
    jax.block_until_ready(st)
    t0 = time.perf_counter()
    for _ in range(chunks):
        st, _ = fn(graphdef, state, st, *args, jnp.int32(0), n_steps=steps, greedy=True)
    jax.block_until_ready(st)
    dt = (time.perf_counter() - t0) / (chunks * steps)
    mean_ctx = prompt_len + steps * (2 + chunks / 2)
    kv_bytes = 2 * cfg.n_layers * batch * mean_ctx * cfg.n_kv_heads * cfg.head_dim
    kv_bytes *= jnp.dtype(dtype).itemsize
    wb = weight_bytes(model)
    row = {
        "shape": name,
        "batch": batch,
        "dtype": jnp.dtype(dtype).name,
        "us_per_step": dt * 1e6,
        "tok_s_per_seq": 1.0 / dt,
        "tok_s_total": batch / dt,
        "prefill_tok_s": batch * prompt_len / t_prefill,
        "weight_MB": wb / 1e6,
        "kv_MB": kv_bytes / 1e6,
        "achieved_GB_s": (wb + kv_bytes) / dt / 1e9,
        "steps_per_call": steps,
        "hlo_ops": kernels,
    }
    if bw:
        row["floor_us"] = (wb + kv_bytes) / bw * 1e6
        row["x_floor"] = row["us_per_step"] / row["floor_us"]
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=[], choices=sorted(PRESETS))
    ap.add_argument("--model", default=None, help="also time a real checkpoint (e.g. default)")
    ap.add_argument("--batch", nargs="+", type=int, default=[1])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per compiled call")
    ap.add_argument("--chunks", type=int, default=8, help="timed calls")
    ap.add_argument("--out", default="results/decode.jsonl")
    a = ap.parse_args()
    dtype = getattr(jnp, a.dtype)
    head = header()
    bw = None
    if jax.default_backend() == "gpu":
        bws = copy_bandwidth()
        print({k: f"{v / 1e12:.2f} TB/s" for k, v in bws.items()}, flush=True)
        bw = max(bws.values())
    models = []
    if a.model:
        from prunepath_jax.loading import load_pretrained

        models.append((a.model, load_pretrained(a.model, dtype=dtype, progress=False).model))
    for name in a.shapes:
        models.append((name, LlamaModel(PRESETS[name], dtype=dtype, rngs=nnx.Rngs(0))))
    rows = []
    for name, model in models:
        for b in a.batch:
            row = {**head, **bench_one(model, name, b, a.prompt_len, a.steps, a.chunks, bw, dtype)}
            if bw:
                row["copy_TB_s"] = bw / 1e12
            rows.append(row)
            print(row, flush=True)
        del model
    write_rows(a.out, rows)
    cols = ["shape", "batch", "dtype", "us_per_step", "tok_s_per_seq", "tok_s_total",
            "prefill_tok_s", "achieved_GB_s", "floor_us", "x_floor"]  # fmt: skip
    print(f"\n{head['date']} commit {head['commit']} on {head['device']} (jax {head['jax']})")
    print(markdown_table(rows, cols))


if __name__ == "__main__":
    main()
