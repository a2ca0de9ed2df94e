"""What XLA runs around the one-launch decode step: the optimized HLO of one compiled decode
chunk (``megastep.decode_chunk``, greedy, random weights at a real shape) and the kernels of its
loop body, one line each (fusion name, its root instruction, its output shape).

The device trace names ~15 small XLA kernels beside the launch and the LM head GEMM (1B: ~18 µs
of kernels a token plus their gaps, BENCHMARKS.md); this says which ops they are, so the glue can
be folded away deliberately. GPU only (the launch is a Triton custom call).

    python scripts/step_hlo.py --shape llama-3.2-1b --out results/step_hlo
    python scripts/step_hlo.py --module ppold.megastep --xla-dump   # an older commit, thunks
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import sys
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from megastep_decode import chunk_inputs, mega_state  # noqa: E402
from sparse_decode import set_k  # noqa: E402

from prunepath_jax.config import PRESETS  # noqa: E402
from prunepath_jax.kernels.synthetic import sparse_llama  # noqa: E402
from prunepath_jax.nn import route_args, set_compute  # noqa: E402

KERNEL_OPS = "fusion|custom-call|copy|copy-start|dynamic-update-slice|reduce|sort|rng-bit-generator"


def body_kernels(hlo: str) -> list[str]:
    """One line per kernel-launching instruction of the while loop's body computation (fusions,
    custom calls, copies): ``name = shape op(...)`` shortened to name, shape and op."""
    bodies = re.findall(r"body=(%?[\w.\-]+)", hlo)
    out = []
    for name in dict.fromkeys(b.lstrip("%") for b in bodies):
        m = re.search(rf"^%?{re.escape(name)} .*?\{{\n(.*?)\n\}}", hlo, re.S | re.M)
        if not m:
            continue
        for line in m.group(1).splitlines():
            op = re.search(rf"=\s*(\(.*?\)|\S+)\s+({KERNEL_OPS})\(", line)  # tuple shapes too
            if op:
                lhs = line.split("=")[0].strip()
                tag = re.search(r"kind=(\w+)", line) or re.search(
                    r'custom_call_target="([^"]+)"', line
                )
                out.append(f"{name}: {lhs} {op.group(1)} {op.group(2)} {tag[1] if tag else ''}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--out", default="results/step_hlo")
    ap.add_argument(
        "--module",
        default="prunepath_jax.megastep",
        help="the megastep module whose decode chunk compiles (e.g. an older commit "
        "installed beside this one as ppold.megastep, scripts/make_baseline.sh)",
    )
    ap.add_argument(
        "--xla-dump",
        action="store_true",
        help="also XLA's dump of the chunk's module: its thunk sequence before and "
        "after the thunk passes, which show how the body was cut into command buffers",
    )
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    label = f"{a.shape}.{a.module.split('.')[0]}"
    if a.xla_dump:  # read when the backend starts, which nothing above has done yet
        dump = (out / f"{label}.xla_dump").resolve()
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump}"
    megastep = importlib.import_module(a.module)
    cfg = PRESETS[a.shape]
    model = sparse_llama(cfg, 1, dtype=jnp.bfloat16)
    e = model.cfg.n_experts
    set_k(model, max(1, round((1 - a.sparsity) * e)))
    set_compute(model, "kernel", "pallas")
    mw = megastep.pack(model)
    tau_l = jnp.stack([x.tau for x in route_args(model.cfg, 1.0)])
    graphdef, state = nnx.split(model)
    args, kw = chunk_inputs(tau_l, a.steps, megastep.Launch())
    st = mega_state(model, 64, a.ctx, megastep)
    lowered = megastep.decode_chunk.lower(graphdef, state, mw, st, *args, **kw)
    hlo = lowered.compile().as_text()
    (out / f"{label}.hlo.txt").write_text(hlo)
    lines = body_kernels(hlo)
    (out / f"{label}.body.txt").write_text("\n".join(lines) + "\n")
    if a.xla_dump:  # keep the decode chunk's thunk sequences, drop the rest of the dump
        for f in sorted(dump.glob("*decode_chunk*thunk_sequence*.txt")):
            shutil.copy(f, out / f"{label}.{f.name.split('.', 2)[-1]}")
        shutil.rmtree(dump, ignore_errors=True)
    print(f"{label}: {len(lines)} kernel instructions in the loop body")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
