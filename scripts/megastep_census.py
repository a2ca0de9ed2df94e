"""Registers, spills, shared memory and cross-thread instructions of the one-launch decode step
(``kernels/triton_megastep``) as compiled for the H200, on a machine without a GPU.

    python scripts/megastep_census.py --shapes smollm2-135m llama-3.2-1b llama-3-8b \
        --launches '{"default": {}, "t8k": {"tile_bytes": 8192}}'
    python scripts/megastep_census.py --batch 16   # the batched launch (2-16 sequences)

Why: a GPU run is the only judge of speed, but whether a launch variant spills, how much shared
memory its pipelines take and how many CTA barriers and shuffles its phases chain are facts of
the compiled code. The launch is planned by the decode step itself (``megastep.pack`` and
``megastep.step`` of an abstract model under ``jax.eval_shape``, ``triton_call`` caught before
it launches), so the numbers are for the exact constexprs and pointer types a real call would
compile. ``--launches`` takes
``megastep.Launch`` fields, as ``benchmarks/megastep_decode.py`` does; ``--interpret`` is not a
thing here (the interpreter drops the L2 prefetch lines).

The numbers belong to the installed triton and the ``ptxas`` it assembles sm_90 with: the H200
image runs triton 3.6 (CUDA 12 ``ptxas``), so ``PYTHONPATH`` a triton 3.6 there to read what
the device runs. Triton 3.9 (CUDA 13 ``ptxas``) allocates differently: no spills at the 8B
width where 3.6 spills 120 bytes (BENCHMARKS.md, twenty-seventh session).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from flax import nnx

from prunepath_jax import megastep
from prunepath_jax.config import PRESETS
from prunepath_jax.kernels import jt
from prunepath_jax.kernels import triton_megastep as tm
from prunepath_jax.kernels import triton_megastep_batch as tb
from prunepath_jax.kernels.sm90 import compile_sm90, ptxas_info, sass_ops
from prunepath_jax.kernels.synthetic import sparse_llama

_NOT_CONSTEXPR = ("input_output_aliases", "zeroed_outputs", "interpret", "grid", "num_stages")
_PTR = {jnp.dtype(jnp.bfloat16): "*bf16", jnp.dtype(jnp.float16): "*fp16",
        jnp.dtype(jnp.float32): "*fp32", jnp.dtype(jnp.int32): "*i32",
        jnp.dtype(jnp.int64): "*i64"}  # fmt: skip


def plan(
    cfg, launch: megastep.Launch, s_max: int = 256, programs: int = 132, dtype=jnp.bfloat16,
    batch: int = 1, timing: bool = False,
) -> tuple[dict, dict, int]:  # fmt: skip
    """``(signature, constexprs, warps)`` of the launch one decode step makes for this model
    shape and ``batch`` sequences (2-16: the batched launch, ``triton_megastep_batch``; with
    ``timing``, its phase stamps): an abstract PrunePath model (``nnx.eval_shape``, no weights
    allocated; weights and cache in ``dtype``) through ``megastep.pack`` and ``megastep.step``
    under ``jax.eval_shape``, with ``triton_call`` caught, so the kernel's own checks, defaults
    and weight layout decide everything."""
    caught = {}

    def fake_call(kernel, *args, out_shape, num_warps, **kw):
        types = [a.dtype for a in args] + [o.dtype for o in out_shape]
        caught["sig"] = {f"p{i}": _PTR[jnp.dtype(t)] for i, t in enumerate(types)}
        caught["const"] = {k: v for k, v in kw.items() if k not in _NOT_CONSTEXPR}
        caught["warps"] = num_warps
        # stand-ins of the outputs' shapes (the timing stamps' int64 as int32: x64 is off and
        # megastep only slices them)
        return [jnp.zeros(o.shape, jnp.int32 if o.dtype == jnp.int64 else o.dtype)
                for o in out_shape]  # fmt: skip

    launch = launch._replace(programs=launch.programs or programs)  # no GPU here to ask
    graphdef, state = nnx.split(nnx.eval_shape(lambda: sparse_llama(cfg, None, dtype=dtype)))
    n = cfg.n_layers

    def one_step(state):
        model = nnx.merge(graphdef, state)
        seqs = (batch,) if batch > 1 else ()
        kc = jnp.zeros((n, *seqs, s_max, cfg.n_kv_heads, cfg.head_dim), dtype)
        ib = jnp.zeros((batch,), jnp.int32)
        mw = megastep.pack(
            model, head=bool(launch.head_in), router_de=batch > 1 and launch.router_de is not False
        )  # as generate
        tau = jnp.ones((n,), jnp.float32)
        return megastep.step(model, mw, ib, ib, kc, kc, tau, launch, timing=timing)

    real, jt.triton_call = jt.triton_call, fake_call
    try:
        jax.eval_shape(one_step, state)
    finally:
        jt.triton_call = real
    return caught["sig"], caught["const"], caught["warps"]


def kernel(batch: int):
    """The launch's kernel for ``batch`` sequences."""
    return tm._megastep_kernel if batch == 1 else tb._batch_kernel


def census(
    cfg, launch: megastep.Launch, s_max: int = 256, dtype=jnp.bfloat16, batch: int = 1
) -> dict:
    """Compiles the planned launch for sm_90 and reads it: registers a thread, spill bytes,
    stack, shared memory, SASS size, CTA barriers and shuffles, PTX L2 prefetches."""
    sig, const, warps = plan(cfg, launch, s_max, dtype=dtype, batch=batch)
    ck = compile_sm90(kernel(batch), sig, const, warps=warps, stages=1)
    ops = sass_ops(ck.asm["cubin"])
    return {
        **ptxas_info(ck.asm["ptx"]), "shared_bytes": ck.metadata.shared, "warps": warps,
        "sass": sum(ops.values()), "BAR": ops["BAR"], "SHFL": ops["SHFL"],
        "ptx_prefetch": ck.asm["ptx"].count("prefetch.global.L2"),
        "ptx_bulk_prefetch": ck.asm["ptx"].count("cp.async.bulk.prefetch.L2"),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama-3.2-1b", "llama-3-8b"])
    ap.add_argument("--launches", default='{"default": {}}', help="JSON {label: Launch fields}")
    ap.add_argument("--cache-len", type=int, default=256, help="KV-cache positions (s_max)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="weights and KV cache (auto takes both)")  # fmt: skip
    ap.add_argument("--batch", type=int, default=1, help="sequences (2-16: the batched launch)")
    ap.add_argument("--out", help="JSONL rows here as well")
    a = ap.parse_args()
    launches = {k: megastep.Launch(**v) for k, v in json.loads(a.launches).items()}
    cols = ["registers", "spill_stores", "spill_loads", "stack", "shared_bytes", "warps", "sass",
            "BAR", "SHFL", "ptx_prefetch", "ptx_bulk_prefetch"]  # fmt: skip
    import triton

    print(f"triton {triton.__version__}, sm_90, a {a.cache_len}-position cache, {a.dtype}, "
          f"{a.batch} sequence(s)")  # fmt: skip
    print("| shape | launch | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for shape in a.shapes:
        cfg = PRESETS[shape]
        for label, launch in launches.items():
            row = census(cfg, launch, a.cache_len, jnp.dtype(a.dtype), a.batch)
            print(f"| {shape} | {label} | " + " | ".join(str(row[c]) for c in cols) + " |")
            if a.out:
                with open(a.out, "a") as f:
                    meta = {"triton": triton.__version__, "shape": shape, "launch": label}
                    meta["batch"] = a.batch
                    f.write(json.dumps({**meta, "dtype": a.dtype, **row}) + "\n")


if __name__ == "__main__":
    main()
