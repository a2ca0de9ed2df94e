"""Early launch of the next kernel (Programmatic Dependent Launch) from Pallas-Triton kernels.

Why. On Hopper a kernel launched with the programmatic-serialization attribute may start while
the kernel before it is still running: its programs become resident and wait in
``griddepcontrol.wait`` until the predecessor has finished and its writes are visible. XLA
(jax 0.11) launches its kernels this way, Pallas custom calls included (``--xla_gpu_enable_pdl``,
on by default: turning it off made chains of tiny Pallas kernels 0.14-0.55 µs a launch slower
and the batch-1 decode step 6-12% slower, BENCHMARKS.md fourteenth session). The successor may
start only once every program of the running kernel has executed
``griddepcontrol.launch_dependents`` or exited; XLA's own kernels signal, ours did not, so the
next launch's latency stayed on the critical path. :func:`early_launch` makes each of our
programs signal at its start.

Correct by construction: the signal only lets the successor *start*; its
``griddepcontrol.wait`` still waits for this whole kernel to complete and flush its memory, so
what it reads is what this kernel wrote. A successor launched without the attribute ignores it.

How. Pallas has no primitive for the instruction; its inline-assembly op is pure, so the
instruction is paired with a ``mov`` of the program id and the kernel body runs under a branch
on the result, which keeps the instruction alive and ahead of the body. The interpreter (CPU)
gets the body unchanged.

Off by default. Measured on the H200 (batch-1 decode, 75%, alternating processes): in every
kernel, the 1B sparse step 1.8-2.8% slower, the 8B one −1.3% to +0.1%, the 1B dense step
0.7-2.0% faster; in a chain of tiny kernels −0.10 to +0.02 µs a launch. :data:`ENABLED` (env
``PRUNEPATH_PDL``, read at trace time: ``0`` none, ``all``, or comma-separated tags out of
:data:`TAGS`) picks the kernels that signal, for A/B runs.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

TAGS = ("attention", "logits", "select", "experts", "proj")


def _enabled(spec: str) -> frozenset[str]:
    if spec in ("", "0"):
        return frozenset()
    if spec in ("1", "all"):
        return frozenset(TAGS)
    tags = frozenset(t.strip() for t in spec.split(","))
    if not tags <= set(TAGS):
        raise ValueError(f"PRUNEPATH_PDL={spec!r}: tags must come from {TAGS}, '0' or 'all'")
    return tags


ENABLED = _enabled(os.environ.get("PRUNEPATH_PDL", "0"))
ASM = "griddepcontrol.launch_dependents;\n\tmov.b32 $0, $1;"


def _signal(pid: jax.Array) -> jax.Array:
    """``pid`` (a scalar) back, after this thread executed ``griddepcontrol.launch_dependents``
    (as a ``[1]`` vector: Pallas lowers a 0-d asm result as a tensor no scalar op accepts)."""
    [out] = plgpu.elementwise_inline_asm(
        ASM,
        args=[jnp.full((1,), pid, jnp.int32)],
        constraints="=r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct((1,), jnp.int32)],
    )
    return jnp.sum(out)


def early_launch(kernel, *, interpret: bool, tag: str):
    """``kernel`` (a Pallas-Triton body) whose programs first let the next kernel launch, if
    ``tag`` is in :data:`ENABLED`.

    Args:
        kernel: the body, called with the refs unchanged.
        interpret: the interpreter has no PTX: the body is returned as it is.
        tag: which decode kernel this is (one of :data:`TAGS`).
    """
    if tag not in TAGS:
        raise ValueError(f"unknown kernel tag {tag!r}, expected one of {TAGS}")
    if interpret or tag not in ENABLED or plgpu is None:
        return kernel
    return signalling(kernel)


def signalling(kernel):
    """``kernel`` with ``griddepcontrol.launch_dependents`` at the start of each program,
    unconditionally (CUDA only; :func:`early_launch` decides when the decode kernels use it)."""

    @functools.wraps(kernel)
    def body(*refs):
        @pl.when(_signal(pl.program_id(0)) >= 0)  # always true; the branch keeps the pure asm
        def _():
            kernel(*refs)

    return body
