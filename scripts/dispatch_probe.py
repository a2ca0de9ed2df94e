"""Is the timed decode loop bound by the host? Per-call host time against device time.

Why. At the 1B shape the one-launch step's timed wall (``megastep_decode.py``) is ~5% above the
device span of the same calls in a trace (664 vs 631 µs a token, thirty-fifth session). A
16-token chunk is ~10 ms of device work; if issuing one compiled call (pytree flattening, the
static ``graphdef``'s hash, XLA's host-side thunk execution) takes about as long, the device
waits for the host. This probe times, for the one-launch step and for the dense XLA step:

- ``pipelined``: ``n`` calls issued back to back, then one wait (what the benchmarks time): wall
  µs a token and the host µs each call took to return (its dispatch);
- ``serial``: a wait after every call (device time + dispatch, nothing overlapped);
- the same two through the ahead-of-time ``Compiled`` object (``jit(...).lower().compile()``:
  no static-argument hashing, no jit cache lookup), and through ``flatjit.bind`` (what
  ``generate`` calls: the graph hashed once, the state passed as a flat list).

    python scripts/dispatch_probe.py --shape llama-3.2-1b --out results/dispatch.jsonl
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

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from common import header, write_rows  # noqa: E402
from megastep_decode import chunk_inputs, mega_state  # noqa: E402
from sparse_decode import (  # noqa: E402
    decode_cache_len,
    fresh_decode_state,
    greedy_chunk_args,
    set_k,
)

from prunepath_jax import megastep  # noqa: E402
from prunepath_jax.config import PRESETS  # noqa: E402
from prunepath_jax.generate import bind_decode_chunk, decode_chunk_donating  # noqa: E402
from prunepath_jax.kernels.synthetic import sparse_llama  # noqa: E402
from prunepath_jax.models.llama import LlamaModel  # noqa: E402
from prunepath_jax.nn import route_args, set_compute  # noqa: E402


def probe(call, fresh, steps: int, n: int) -> dict:
    """Timings of ``call`` (``state -> (state, tokens)``, ``steps`` tokens a call) from
    ``fresh()`` states: pipelined (one wait after ``n`` calls) and serial (a wait after each)."""
    st, _ = call(fresh())  # warm
    jax.block_until_ready(st)
    ret_us = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        st, _ = call(st)
        ret_us.append((time.perf_counter() - t) * 1e6)
    jax.block_until_ready(st)
    piped = (time.perf_counter() - t0) / (n * steps) * 1e6
    serial = []
    for _ in range(n):
        t = time.perf_counter()
        st, _ = call(st)
        jax.block_until_ready(st)
        serial.append((time.perf_counter() - t) / steps * 1e6)
    return {
        "pipelined_us_per_token": piped,
        "dispatch_us_per_call": [round(x, 1) for x in ret_us],
        "serial_us_per_token_median": float(np.median(serial)),
    }


def mega_calls(cfg, sparsity, prompt_len, ctx, steps):
    """The one-launch step's ``(fresh, {name: call})``: through ``jit`` and through AOT."""
    sparse = sparse_llama(cfg, 1, dtype=jnp.bfloat16)
    set_k(sparse, max(1, round((1 - sparsity) * sparse.cfg.n_experts)))
    set_compute(sparse, "kernel", "pallas")
    mw = megastep.pack(sparse)
    tau_l = jnp.stack([x.tau for x in route_args(sparse.cfg, 1.0)])
    graphdef, state = nnx.split(sparse)
    args, kw = chunk_inputs(tau_l, steps, megastep.DEFAULT_LAUNCH)
    fresh = lambda: mega_state(sparse, prompt_len, ctx)  # noqa: E731
    comp = megastep.decode_chunk.lower(graphdef, state, mw, fresh(), *args, **kw).compile()
    fn, leaves = megastep.bind_decode_chunk(graphdef, state, **kw)
    return fresh, {
        "megastep_jit": lambda st: megastep.decode_chunk(graphdef, state, mw, st, *args, **kw),
        "megastep_aot": lambda st: comp(state, mw, st, *args),
        "megastep_flat": lambda st: fn(leaves, mw, st, *args),
    }


def dense_calls(cfg, prompt_len, ctx, steps):
    """The dense XLA step's ``(fresh, {name: call})``: through ``jit`` and through AOT."""
    dense = LlamaModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(dense)
    fresh = lambda: fresh_decode_state(cfg, 1, prompt_len, ctx)  # noqa: E731
    args = greedy_chunk_args(None)
    kw = dict(n_steps=steps, greedy=True)
    comp = decode_chunk_donating.lower(graphdef, state, fresh(), *args, **kw).compile()
    fn, leaves = bind_decode_chunk(graphdef, state, **kw)
    return fresh, {
        "dense_jit": lambda st: decode_chunk_donating(graphdef, state, st, *args, **kw),
        "dense_aot": lambda st: comp(state, st, *args),
        "dense_flat": lambda st: fn(leaves, st, *args),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--calls", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--out", default="results/dispatch.jsonl")
    a = ap.parse_args()
    cfg = PRESETS[a.shape]
    ctx = decode_cache_len(a.prompt_len, a.steps, 2 * a.calls)
    head = {**header(), "bench": "dispatch_probe", "shape": a.shape, "steps": a.steps}
    rows = []
    for make in (
        lambda: mega_calls(cfg, a.sparsity, a.prompt_len, ctx, a.steps),
        lambda: dense_calls(cfg, a.prompt_len, ctx, a.steps),
    ):
        fresh, calls = make()
        for name, call in calls.items():
            rows.append({**head, "path": name, **probe(call, fresh, a.steps, a.calls)})
            print(rows[-1], flush=True)
        del fresh, calls
    write_rows(a.out, rows)


if __name__ == "__main__":
    main()
