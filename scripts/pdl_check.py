"""Does XLA's Programmatic Dependent Launch reach Pallas-Triton kernels? (H200 probe)

Why. XLA has a flag ``--xla_gpu_enable_pdl`` (Programmatic Dependent Launch: a kernel may start
while its predecessor drains and waits in ``griddepcontrol.wait``); on by default in jax 0.11 and
worth 6-12% of the batch-1 decode step (BENCHMARKS.md, fourteenth session). The step's fixed
costs are per-kernel latency chains, the thing PDL overlaps, and the sparse step has four Pallas
kernels a layer where the dense one has one.

* ``--dump DIR``: compiles a small chain (a Pallas kernel, an XLA GEMV, another Pallas kernel)
  with a dump (and LLVM IR) and lists every dumped file that mentions ``griddepcontrol`` or PDL.
* ``--time``: per-launch µs of chains of 32 dependent tiny kernels — XLA fusions (separated by
  optimisation barriers), Pallas kernels, and Pallas kernels that signal early
  (``kernels/pallas_pdl.py``). Run it under ``XLA_FLAGS=--xla_gpu_enable_pdl=false`` and
  without: if the Pallas rows move with the flag as the XLA row does, XLA launches our kernels
  with PDL too.
* ``--race``: does a kernel start before its predecessor's writes land? Kernel B (Pallas-Triton
  or Mosaic GPU, no wait of its own) reads the output of a ~30 µs streaming kernel A that writes
  at its end; a stale read means B ran early.

    python scripts/pdl_check.py --time --out results/pdl.jsonl
    XLA_FLAGS=--xla_gpu_enable_pdl=false python scripts/pdl_check.py --time
"""

import argparse
import os
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import write_rows  # noqa: E402

N_CHAIN = 32
KEYS = (
    "griddepcontrol",
    "pdl.wait",
    "pdl.launch",
    "nvvm.griddep",
    "probe_kernel",
    "xla.gpu.triton",
)


def dump_check(dump: Path) -> None:
    import jax
    import jax.numpy as jnp

    @jax.jit
    def chain(x, w):
        y = _pallas(x, signal=False)
        z = jnp.dot(y, w, preferred_element_type=jnp.float32).astype(x.dtype)
        return _pallas(jnp.tanh(z) + 1, signal=False)

    x = jnp.ones((16, 256), jnp.float32)
    w = jnp.ones((256, 256), jnp.float32) * 0.01
    print("result", float(chain(x, w).sum()))
    print(
        "files", len(list(dump.iterdir())), "suffixes", sorted({f.suffix for f in dump.iterdir()})
    )
    for f in sorted(dump.iterdir()):
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        hits = {k: text.count(k) for k in KEYS}
        if any(hits.values()):
            print(f.name[:90], hits)
        for fn in re.split(r"\ndefine ", text)[1:]:  # LLVM IR kernels
            name = fn.split("(", 1)[0].split("@")[-1]
            print("  define", name[:50], "griddep calls",
                  [ln.strip()[:90] for ln in fn.splitlines() if "griddep" in ln][:4])  # fmt: skip


def _body(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 0.5 + 1.0


def _pallas(x, *, signal: bool):
    """``x·0.5 + 1`` as one Pallas-Triton kernel of 8-row programs, optionally signalling."""
    import jax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    from prunepath_jax.kernels import pallas_pdl

    return pl.pallas_call(
        pallas_pdl.signalling(_body) if signal else _body,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(x.shape[0] // 8,),
        in_specs=[pl.BlockSpec((8, x.shape[1]), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((8, x.shape[1]), lambda i: (i, 0)),
        compiler_params=plgpu.CompilerParams(num_warps=4),
        name="probe_kernel",
    )(x)


def _mosaic(x, fn=lambda v: v * 0.5 + 1.0, rows: int = 8):
    """``fn(x)`` as one Mosaic GPU kernel of ``rows``-row programs over ``x`` viewed as
    ``[-1, 256]`` (a TMA box is at most 256 elements a dimension), each copying its rows through
    shared memory, with no ``griddepcontrol.wait`` of its own. Written with ``plgpu.kernel``:
    jax 0.11 lowers ``pallas_call`` only for the Triton backend."""
    import jax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def body(x_ref, o_ref, x_smem, o_smem, bar):
        blk = pl.ds(jax.lax.axis_index("p") * rows, rows)
        plgpu.copy_gmem_to_smem(x_ref.at[blk], x_smem, bar)
        plgpu.barrier_wait(bar)
        o_smem[...] = fn(x_smem[...])
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[blk])
        plgpu.wait_smem_to_gmem(0)

    x2 = x.reshape(-1, 256)
    tile = plgpu.SMEM((rows, 256), x.dtype)
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(x2.shape, x.dtype),
        scratch_types=[tile, tile, plgpu.Barrier(num_arrivals=1)],
        grid=(x2.shape[0] // rows,),
        grid_names=("p",),
    )(x2).reshape(x.shape)


def time_chains(out: str | None) -> None:
    import jax
    import jax.numpy as jnp

    def xla_step(x):
        return jax.lax.optimization_barrier(x * 0.5 + 1.0)  # one fusion per step

    steps = {
        "xla": xla_step,
        "pallas": lambda x: _pallas(x, signal=False),
        "pallas_signal": lambda x: _pallas(x, signal=True),
        "mosaic": _mosaic,
    }
    x = jnp.ones((64, 512), jnp.float32)  # 8 programs
    rows = []
    for name, step in steps.items():

        def chain(v, step=step):
            for _ in range(N_CHAIN):
                v = step(v)
            return v

        fn = jax.jit(chain)
        want = 2.0 + (1.0 - 2.0) * 0.5**N_CHAIN  # fixed point 2 of v -> v/2 + 1, from 1
        got = fn(x)
        assert abs(float(got[0, 0]) - want) < 1e-5, (name, float(got[0, 0]))
        ts = []
        for _ in range(30):
            t0 = time.perf_counter()
            for _ in range(20):
                got = fn(x)
            got.block_until_ready()
            ts.append((time.perf_counter() - t0) / 20)
        us = statistics.median(ts) * 1e6 / N_CHAIN
        row = {"chain": name, "us_per_launch": us, "xla_flags": os.environ.get("XLA_FLAGS", ""),
               "device": jax.devices()[0].device_kind, "jax": jax.__version__}  # fmt: skip
        rows.append(row)
        print(row, flush=True)
    if out:
        write_rows(out, rows)


def _streamer(buf, init, *, signal: bool):
    """Kernel A: 256 programs each sum their 512 KB of ``buf`` ([128·1024, 512] bf16 ones), then
    write ``sum + 1`` into ``init`` (prefilled with −1, aliased): the writes land at the end of a
    ~30 µs kernel. With ``signal`` its programs let the next kernel launch at their start."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    from prunepath_jax.kernels import pallas_pdl

    rows = buf.shape[0] // init.shape[0]

    def body(b_ref, i_ref, o_ref):
        del i_ref
        pid = pl.program_id(0)

        def step(k, acc):
            blk = plgpu.load(b_ref.at[pl.ds(pid * rows + k * 16, 16), :])
            return acc + blk.astype(jnp.float32)

        acc = jax.lax.fori_loop(0, rows // 16, step, jnp.zeros((16, 512), jnp.float32))
        plgpu.store(o_ref.at[pl.ds(pid, 1)], jnp.full((1,), jnp.sum(acc) + 1.0, jnp.float32))

    anyspec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        pallas_pdl.signalling(body) if signal else body,
        out_shape=jax.ShapeDtypeStruct(init.shape, jnp.float32),
        grid=(init.shape[0],),
        in_specs=[anyspec, anyspec],
        out_specs=anyspec,
        input_output_aliases={1: 0},
        compiler_params=plgpu.CompilerParams(num_warps=4),
        name="probe_streamer",
    )(buf, init)


def race_check(out: str | None, trials: int = 50) -> None:
    """Does a successor start before kernel A's writes land? Kernel B copies A's output right
    after A; a −1 in B's copy means B read before A wrote: B was launched with PDL and ran
    without waiting. B as a Mosaic GPU kernel (jaxlib's launch, no wait unless the kernel has
    one) and as a Pallas-Triton kernel (XLA compiles it and may insert the wait); A with and
    without the early signal."""
    import jax
    import jax.numpy as jnp

    buf = jnp.ones((128 * 1024, 512), jnp.bfloat16)
    rows = []
    copies = {  # kernel B and what it computes from A's output when it reads it in time
        "mosaic": (lambda x: _mosaic(x, lambda v: v, rows=1), lambda a: a),  # a copy
        "triton": (lambda x: _pallas(x.reshape(32, 8), signal=False).reshape(-1),
                   lambda a: a * 0.5 + 1.0),
    }  # fmt: skip
    for b_name, (b_fn, want_fn) in copies.items():
        for signal in (False, True):

            def pair(buf, init, b_fn=b_fn, signal=signal):
                a = _streamer(buf, init, signal=signal)
                return a, b_fn(a)

            try:
                fn = jax.jit(pair, donate_argnums=(1,))
                stale = 0
                for _ in range(trials):
                    a, b = fn(buf, jnp.full((256,), -1.0, jnp.float32))
                    assert float(a.min()) > 0, "kernel A did not write every slot"
                    stale += int(not bool(jnp.allclose(b, want_fn(a))))
                row = {"b": b_name, "a_signals": signal, "trials": trials, "stale_trials": stale}
            except Exception as err:  # a backend that does not lower here: say so, go on
                msg = f"{type(err).__name__}: {err} | {traceback.format_exc()[-700:]}"
                row = {"b": b_name, "a_signals": signal, "error": msg}
            row.update(xla_flags=os.environ.get("XLA_FLAGS", ""), jax=jax.__version__)
            rows.append(row)
            print(row, flush=True)
    if out:
        write_rows(out, rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dump", type=Path, help="dump directory for the dump check")
    ap.add_argument("--time", action="store_true", help="time chains of tiny kernels")
    ap.add_argument("--race", action="store_true", help="does a successor read before A wrote?")
    ap.add_argument("--out", help="JSONL file to append the rows to")
    a = ap.parse_args()
    if a.dump:
        flags = f"--xla_dump_to={a.dump} --xla_gpu_dump_llvmir=true"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}"
        dump_check(a.dump)
    if a.time:
        time_chains(a.out)
    if a.race:
        race_check(a.out)
    if not (a.dump or a.time or a.race):
        sys.exit("nothing to do: pass --dump DIR, --time and/or --race")


if __name__ == "__main__":
    main()
