"""Whole-model prefill (time to first token): PrunePath kernels vs our dense model.

The kernel micro-benchmark (`ffn_kernels.py --prefill-*`) times one FFN layer; this times the real
prompt pass of `generate` (`generate._prompt_pass`: every layer, attention, norms, the LM head at
each prompt's last position, the KV cache written) on a random-weight model at a real shape,
where per-call launch overhead is amortised over the layers. Routers are random with
``k_min = k_max = k`` at tau = 1.0 (`kernels.synthetic.sparse_llama`), so every token of every
layer uses exactly k of E experts. Paths: the dense model, the masked XLA path, the Triton
grouped GEMM (the registry's prefill default), and with ``--router-ab`` both sparse paths again
with the fp32 router GEMM (what every path used before the shared tensor-core split).

    python benchmarks/sparse_prefill.py --shapes llama-3-8b --batch 1 --prompt-len 4096
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    grouped_tuning,
    header,
    markdown_table,
    router_logits_mode,
    write_rows,
)
from sparse_decode import set_k  # noqa: E402

from prunepath_jax.config import PRESETS  # noqa: E402
from prunepath_jax.generate import _prompt_pass  # noqa: E402
from prunepath_jax.kernels.synthetic import sparse_llama  # noqa: E402
from prunepath_jax.models.layers import init_cache  # noqa: E402
from prunepath_jax.models.llama import LlamaModel  # noqa: E402
from prunepath_jax.nn import route_args, set_compute  # noqa: E402


def time_prefill(model, batch: int, prompt_len: int, ffn_args, iters: int) -> dict:
    """Median wall ms of the jitted prompt pass over ``iters`` calls after a compile + warm-up.

    A fresh ``jax.jit`` per call of this function: the router-logits switch is read at trace
    time, so a cached trace of another variant must not be reused."""

    @functools.partial(jax.jit, static_argnames="graphdef")
    def run(graphdef, state, tokens_bt, lengths_b, cache, ffn_args):
        out = _prompt_pass(nnx.merge(graphdef, state), tokens_bt, lengths_b, cache, ffn_args)
        return out.logits, out.cache

    cfg = model.cfg
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, prompt_len)), jnp.int32)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    cache = init_cache(cfg, batch, prompt_len, jnp.bfloat16)
    t0 = time.perf_counter()
    logits, _ = jax.block_until_ready(run(graphdef, state, tokens, lengths, cache, ffn_args))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(run(graphdef, state, tokens, lengths, cache, ffn_args))
        times.append(time.perf_counter() - t0)
    ms = float(np.median(times)) * 1e3
    lg = np.asarray(logits[:, 0].astype(jnp.float32))
    if not np.isfinite(lg).all():
        raise FloatingPointError("non-finite prefill logits")
    return {"ms": ms, "ms_range": [min(times) * 1e3, max(times) * 1e3], "compile_s": compile_s,
            "tok_s": batch * prompt_len / ms * 1e3, "argmax": lg.argmax(-1).tolist()}  # fmt: skip


# ``--selections``' last field: the grouped-GEMM tuning keys it names.
_SUFFIXES = {
    "atomic": {"select_counts": "atomic"},
    "partial": {"select_counts": "partial"},
    "lists": {"grouping": "triton"},
    "xla": {"grouping": "xla"},
    "xw": {"up_form": "xw"},
    "wx": {"up_form": "wx", "warps": 4},
    "wx256": {"up_form": "wx", "block_m": 256, "warps": 4, "stages": 3},
    "wx256w8": {"up_form": "wx", "block_m": 256, "warps": 8, "stages": 3},
}


def selection_tuning(label: str) -> dict:
    """``--selections``' label as grouped-GEMM tuning keys."""
    name, *layout = label.split(":")
    counts = layout.pop() if len(layout) == 3 else None
    if (name not in ("xla", "triton") or len(layout) not in (0, 2) or (layout and name != "triton")
            or counts not in (None, *_SUFFIXES)):  # fmt: skip
        raise SystemExit("--selections: xla, triton or triton:BLOCK_T:WARPS[:"
                         f"{'|'.join(_SUFFIXES)}], got {label!r}")  # fmt: skip
    keys = ("select_block_t", "select_warps")  # zip: layout's length is 0 or 2 (checked)
    extra = _SUFFIXES.get(counts, {})
    return {"selection": name, **dict(zip(keys, map(int, layout), strict=False)), **extra}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["llama-3-8b"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=4096)
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--impls", nargs="+", default=["xla", "triton"])
    ap.add_argument("--router-ab", action="store_true", help="also each path with fp32 logits")
    ap.add_argument("--selections", nargs="+", default=["xla"],
                    help="the grouped path's selection tunings to time (xla: routing.select's "
                    "sort; triton: the selection kernel at the default layout; "
                    "triton:BLOCK_T:WARPS at that layout, :atomic or :partial with the kernel's "
                    "per-expert counts, :lists / :xla with the token lists by "
                    "triton_group from the kernel's counts, or by XLA, :xw with the up kernel "
                    "as x · Wᵀ at every size, :wx / :wx256 / "
                    ":wx256w8 with the up kernel as W · xᵀ at 128- / 256-token tiles, 4 warps "
                    "(8 for w8))")  # fmt: skip
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default="results/sparse_prefill.jsonl")
    a = ap.parse_args(argv)
    head = {**header(), "bench": "prefill_model", "batch": a.batch, "prompt_len": a.prompt_len}
    rows = []

    def emit(row):
        rows.append({**head, **row})
        write_rows(a.out, rows[-1:])
        print({k: v for k, v in rows[-1].items() if k not in header()}, flush=True)

    for shape in a.shapes:
        cfg = PRESETS[shape]
        dense = LlamaModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        base = time_prefill(dense, a.batch, a.prompt_len, None, a.iters)
        emit({"shape": shape, "impl": "dense", "sparsity": 0.0, **base})
        del dense
        sparse = sparse_llama(cfg, 1, dtype=jnp.bfloat16)
        e = sparse.cfg.n_experts
        k = max(1, round((1 - a.sparsity) * e))
        set_k(sparse, k)
        args = route_args(sparse.cfg, 1.0)
        for logits in ["shared"] + (["fp32"] if a.router_ab else []):
            for impl in a.impls:
                set_compute(sparse, "kernel", impl)
                for sel in a.selections if impl == "triton" else [None]:
                    tuning = selection_tuning(sel) if sel else {}
                    tag = {"shape": shape, "impl": impl, "router_logits": logits, **tuning}
                    try:  # the grouped GEMM's default logits are the shared function too
                        with router_logits_mode(logits), grouped_tuning(**tuning):
                            r = time_prefill(sparse, a.batch, a.prompt_len, args, a.iters)
                    except Exception as err:  # an unsupported backend is a row too
                        emit({**tag, "error": repr(err)[:300]})
                        continue
                    emit({**tag, "k": k, "E": e, "sparsity": 1 - k / e,
                          "speedup_vs_dense": base["ms"] / r["ms"], **r})  # fmt: skip
        del sparse
    cols = ["shape", "impl", "router_logits", "selection", "select_block_t", "select_counts",
            "grouping", "up_form", "block_m", "sparsity", "ms", "tok_s", "speedup_vs_dense",
            "compile_s"]  # fmt: skip
    print(f"\n{head['date']} commit {head['commit']} on {head['device']}; batch {a.batch} x "
          f"{a.prompt_len} tokens")  # fmt: skip
    print(markdown_table(rows, cols))


if __name__ == "__main__":
    main()
