"""Which kernels of a jitted Pallas-Triton + XLA chain carry PDL instructions (H200 probe).

Why. XLA has a flag ``--xla_gpu_enable_pdl`` (Programmatic Dependent Launch: a kernel may start
while its predecessor drains and waits in ``griddepcontrol.wait``). The decode step's fixed costs
are per-kernel latency chains (BENCHMARKS.md, thirteenth session), the thing PDL overlaps. This
compiles a small chain (a Pallas kernel, an XLA GEMV, another Pallas kernel) with the XLA_FLAGS
it is given plus a dump, then counts ``griddepcontrol`` instructions per kernel entry in the
dumped PTX, so a run can tell whether XLA's own kernels and the Pallas custom calls get them.

    XLA_FLAGS=--xla_gpu_enable_pdl=true python scripts/pdl_check.py /tmp/dump
"""

import os
import re
import sys
from pathlib import Path

dump = Path(sys.argv[1])
os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump} --xla_gpu_dump_llvmir=true"
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402


def _scale(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2


def scale(x):
    return pl.pallas_call(
        _scale,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4),
        name="pdl_probe_scale",
    )(x)


@jax.jit
def chain(x, w):
    y = scale(x)
    z = jnp.dot(y, w, preferred_element_type=jnp.float32).astype(x.dtype)
    return scale(jnp.tanh(z) + 1)


x = jnp.ones((16, 256), jnp.bfloat16)
w = jnp.ones((256, 256), jnp.bfloat16) * 0.01
print("XLA_FLAGS", os.environ["XLA_FLAGS"])
print("result", float(chain(x, w).astype(jnp.float32).sum()))
exts = sorted({f.suffix for f in dump.iterdir()})
print("files", len(list(dump.iterdir())), "suffixes", exts)
for f in sorted(dump.iterdir()):
    try:
        text = f.read_text(errors="replace")
    except OSError:
        continue
    hits = {k: text.count(k) for k in ("griddepcontrol", "pdl.wait", "pdl.launch",
                                       "nvvm.griddep", "probe_scale", "xla.gpu.triton")}  # fmt: skip
    if any(hits.values()):
        print(f.name[:90], hits)
    for fn in re.split(r"\ndefine ", text)[1:]:  # LLVM IR kernels
        name = fn.split("(", 1)[0].split("@")[-1]
        print("  define", name[:50], "griddep calls",
              [ln.strip()[:90] for ln in fn.splitlines() if "griddep" in ln][:4])
