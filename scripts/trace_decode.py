"""Where a decode step's time goes on the GPU: every kernel of a few traced steps, and the idle.

Runs the production decode loop (as ``benchmarks/sparse_decode.py``: random weights at a real
shape, routers forced to k experts) under ``jax.profiler.trace`` and reads the Perfetto trace it
writes: per kernel name, launches per step and device µs per step; the sum of kernel time
against the step's wall time on the device timeline (the rest is launch gaps and ramp-up/drain
between dependent kernels). A kernel's duration here is its real one inside the step, not one
measured alone.

    python scripts/trace_decode.py --shape llama-3-8b --sparsity 0.75 --out results/trace_8b
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from common import apply_proj_tuning, device_events, summarize  # noqa: E402
from sparse_decode import fresh_decode_state, greedy_chunk_args, set_k  # noqa: E402

from prunepath_jax.config import PRESETS  # noqa: E402
from prunepath_jax.generate import decode_chunk_donating  # noqa: E402
from prunepath_jax.kernels.synthetic import sparse_llama  # noqa: E402
from prunepath_jax.models.decode_attention import set_attention  # noqa: E402
from prunepath_jax.models.decode_proj import set_projections  # noqa: E402
from prunepath_jax.models.llama import LlamaModel  # noqa: E402
from prunepath_jax.nn import route_args, set_compute  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--sparsity", type=float, default=0.75, help="0: the dense model")
    ap.add_argument("--impl", default="pallas")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--calls", type=int, default=1, help="compiled calls traced back to back")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--out", default="results/trace")
    ap.add_argument("--attn", default="xla", help="decode attention: xla or pallas")
    ap.add_argument("--ctx", type=int, default=0, help="cache length (default: just enough)")
    ap.add_argument("--tuning", default="{}", help="JSON {batch: tuning} for the --impl layer")
    ap.add_argument("--hlo", action="store_true", help="also write the optimized HLO (hlo.txt)")
    ap.add_argument("--proj", default="xla", help="attention projections: xla or pallas")
    ap.add_argument("--proj-tuning", default="{}", help="JSON pallas_proj tuning overrides")
    a = ap.parse_args()
    cfg = PRESETS[a.shape]
    over = {int(b): t for b, t in json.loads(a.tuning).items()}
    proj_tuning = json.loads(a.proj_tuning)
    if over:  # the layer of --impl (pallas_decode or triton_decode) under that tuning
        import importlib

        mod = importlib.import_module(f"prunepath_jax.kernels.{a.impl}_decode")
        mod.TUNING_OVERRIDES.update(over)
    if a.sparsity > 0:
        model = sparse_llama(cfg, 1, dtype=jnp.bfloat16)
        e = model.cfg.n_experts
        set_k(model, max(1, round((1 - a.sparsity) * e)))
        set_compute(model, "kernel", a.impl)
        ffn_args = route_args(model.cfg, 1.0)
    else:
        model, ffn_args = LlamaModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), None
    if a.attn != "xla":
        set_attention(model, a.attn)
    set_projections(model, a.proj, layout=apply_proj_tuning(proj_tuning))
    graphdef, state = nnx.split(model)
    ctx = a.ctx or -(-(a.prompt_len + (3 + a.calls) * a.steps + 1) // 256) * 256
    b = a.batch
    st = fresh_decode_state(model.cfg, b, a.prompt_len, ctx)
    args = greedy_chunk_args(ffn_args)
    kw = dict(n_steps=a.steps, greedy=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.hlo:
        hlo = decode_chunk_donating.lower(graphdef, state, st, *args, **kw).compile().as_text()
        (out / "hlo.txt").write_text(hlo)
    for _ in range(2):
        st, _ = decode_chunk_donating(graphdef, state, st, *args, **kw)
    jax.block_until_ready(st)
    with jax.profiler.trace(str(out / "trace"), create_perfetto_trace=True):
        for _ in range(a.calls):
            st, _ = decode_chunk_donating(graphdef, state, st, *args, **kw)
        jax.block_until_ready(st)
    s = summarize(device_events(out / "trace"), a.steps * a.calls)
    s.update(shape=a.shape, sparsity=a.sparsity, impl=a.impl, batch=b, n_layers=cfg.n_layers,
             attn=a.attn, proj=a.proj, proj_tuning=proj_tuning, ctx=ctx, calls=a.calls,
             tuning=over)  # fmt: skip
    (out / "summary.json").write_text(json.dumps(s, indent=1))
    print(json.dumps({k: v for k, v in s.items() if k != "kernels"}))
    for r in s.get("kernels", [])[:25]:
        print(f"{r['per_step']:8.1f} x {r['us_per_step']:9.1f} us  {r['name']}")


if __name__ == "__main__":
    main()
