"""Registers, spills, shared memory and cross-thread instructions of the one-launch decode step
(``kernels/triton_megastep``) as compiled for the H200, on a machine without a GPU.

    python scripts/megastep_census.py --shapes smollm2-135m llama-3.2-1b llama-3-8b \
        --launches '{"default": {}, "t8k": {"tile_bytes": 8192}}'

Why: a GPU run is the only judge of speed, but whether a launch variant spills, how much shared
memory its pipelines take and how many CTA barriers and shuffles its phases chain are facts of
the compiled code. The launch is planned by ``triton_megastep.megastep`` itself (under
``jax.eval_shape``, its ``triton_call`` caught before it launches), so the numbers are for the
exact constexprs and pointer types a real call would compile. ``--launches`` takes
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
from functools import partial

import jax
import jax.numpy as jnp

from prunepath_jax.config import PRESETS
from prunepath_jax.kernels import jt
from prunepath_jax.kernels import triton_megastep as tm
from prunepath_jax.kernels.sm90 import compile_sm90, ptxas_info, sass_ops
from prunepath_jax.megastep import Launch

_NOT_CONSTEXPR = ("input_output_aliases", "zeroed_outputs", "interpret", "grid", "num_stages")
_PTR = {jnp.dtype(jnp.bfloat16): "*bf16", jnp.dtype(jnp.float16): "*fp16",
        jnp.dtype(jnp.float32): "*fp32", jnp.dtype(jnp.int32): "*i32",
        jnp.dtype(jnp.int64): "*i64"}  # fmt: skip


def _inputs(cfg, s_max: int, head_in: bool) -> list:
    """``megastep``'s array arguments as shapes: bf16 weights and cache, the fp32 router and
    its O-projection product, as ``megastep.pack`` lays them out."""
    n, d, hd, kv, hq = cfg.n_layers, cfg.d_model, cfg.head_dim, cfg.n_kv_heads, cfg.n_heads
    e = cfg.n_experts or cfg.d_ff // 32  # a dense preset: the conversion's 32-neuron experts
    f, v = cfg.d_ff, cfg.vocab_size
    s = jax.ShapeDtypeStruct
    bf, f32, i32 = jnp.bfloat16, jnp.float32, jnp.int32
    arrays = [s((v, d), bf), s((1,), i32), s((hd // 2,), f32), s((1,), i32), s((n,), f32),
              s((n, d), bf), s((n, d), bf), s((n, (hq + 2 * kv) * hd, d), bf),
              s((n, d, hq * hd), bf), s((n, e, d), f32), s((n, e, hq * hd), f32),
              s((n, 2, f, d), bf), s((n, f, d), bf), s((n, s_max, kv, hd), bf),
              s((n, s_max, kv, hd), bf)]  # fmt: skip
    heads = [s((v, d), bf), s((d,), bf)] if head_in else [None, None]
    return arrays, heads


def plan(cfg, launch: Launch, s_max: int = 256, programs: int = 132) -> tuple[dict, dict, int]:
    """``(signature, constexprs, warps)`` of the launch ``megastep`` would make for this model
    shape: its own checks and defaults, its ``triton_call`` intercepted."""
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

    opts = {k: v for k, v in launch._asdict().items() if v is not None}
    opts.setdefault("programs", programs)  # the H200's SMs; no GPU here to ask
    arrays, (head, norm) = _inputs(cfg, s_max, bool(opts.get("head_in")))
    real, jt.triton_call = jt.triton_call, fake_call
    try:
        call = partial(tm.megastep, eps=cfg.norm_eps, **opts)
        jax.eval_shape(lambda *a: call(*a, head_vd=head, norm_d=norm), *arrays)
    finally:
        jt.triton_call = real
    return caught["sig"], caught["const"], caught["warps"]


def census(cfg, launch: Launch, s_max: int = 256) -> dict:
    """Compiles the planned launch for sm_90 and reads it: registers a thread, spill bytes,
    stack, shared memory, SASS size, CTA barriers and shuffles, PTX L2 prefetches."""
    sig, const, warps = plan(cfg, launch, s_max)
    ck = compile_sm90(tm._megastep_kernel, sig, const, warps=warps, stages=1)
    ops = sass_ops(ck.asm["cubin"])
    return {
        **ptxas_info(ck.asm["ptx"]), "shared_bytes": ck.metadata.shared, "warps": warps,
        "sass": sum(ops.values()), "BAR": ops["BAR"], "SHFL": ops["SHFL"],
        "ptx_prefetch": ck.asm["ptx"].count("prefetch.global.L2"),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama-3.2-1b", "llama-3-8b"])
    ap.add_argument("--launches", default='{"default": {}}', help="JSON {label: Launch fields}")
    ap.add_argument("--cache-len", type=int, default=256, help="KV-cache positions (s_max)")
    ap.add_argument("--out", help="JSONL rows here as well")
    a = ap.parse_args()
    launches = {k: Launch(**v) for k, v in json.loads(a.launches).items()}
    cols = ["registers", "spill_stores", "spill_loads", "stack", "shared_bytes", "warps", "sass",
            "BAR", "SHFL", "ptx_prefetch"]  # fmt: skip
    import triton

    print(f"triton {triton.__version__}, sm_90, a {a.cache_len}-position cache")
    print("| shape | launch | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for shape in a.shapes:
        cfg = PRESETS[shape]
        for label, launch in launches.items():
            row = census(cfg, launch, a.cache_len)
            print(f"| {shape} | {label} | " + " | ".join(str(row[c]) for c in cols) + " |")
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps({"triton": triton.__version__, "shape": shape,
                                        "launch": label, **row}) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
