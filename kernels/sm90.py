"""Triton kernels lowered for the H200 (sm_90) on a machine without a GPU: the cubin, and what
``ptxas`` and ``nvdisasm`` say about it.

Why. A GPU is a lent, contended resource here (30 minutes a session), while registers, spills,
shared memory and the instruction mix of a kernel are properties of its compiled code: the
triton wheel bundles ``ptxas`` and ``nvdisasm``, so they can be read on any CPU machine. The
tests use ``compile_sm90`` to catch Triton-only errors (non-power-of-2 blocks, shared memory
past the limit); ``scripts/megastep_census.py`` reports the one-launch step's numbers at each
model width before a GPU run decides anything.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile

SMEM_LIMIT = 227 * 1024  # bytes of shared memory a block may use on sm_90


def compile_sm90(kernel, sig: dict, const: dict, warps: int = 4, stages: int = 3):
    """Lowers a ``@triton.jit`` kernel to PTX and cubin for sm_90 with triton's own compiler,
    as jax-triton would. ``sig``: the pointer parameters' types in order (``"*bf16"``...);
    ``const``: the constexprs by name. Raises ValueError if there is no cubin or the kernel
    needs more shared memory than a block may have."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(kernel.arg_names)  # pointer parameters first, then the constexprs
    full = dict(
        zip(names, [*sig.values(), *(["constexpr"] * (len(names) - len(sig)))], strict=True)
    )
    constexprs = {(names.index(k),): v for k, v in const.items()}
    # jax-triton marks every array argument 16-byte aligned (XLA's buffers are): without it the
    # loads compile to 2-byte scalars and no cp.async pipeline, a different kernel.
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(sig))}
    src = ASTSource(fn=kernel, signature=full, constexprs=constexprs, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": warps, "num_stages": stages})  # fmt: skip
    if "cubin" not in ck.asm:
        raise ValueError(f"{kernel.fn.__name__}: no sm_90 cubin")
    if ck.metadata.shared > SMEM_LIMIT:
        raise ValueError(
            f"{kernel.fn.__name__}: {ck.metadata.shared} bytes of shared memory > {SMEM_LIMIT}"
        )
    return ck


def _run_on_file(data: str | bytes, suffix: str, argv: list[str]) -> subprocess.CompletedProcess:
    """Runs ``argv + [a temporary file holding data]`` (the tools read files, not stdin)."""
    with tempfile.NamedTemporaryFile("wb" if isinstance(data, bytes) else "w", suffix=suffix,
                                     delete=False) as f:  # fmt: skip
        f.write(data)
    try:
        return subprocess.run([*argv, f.name], capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)


def ptxas_info(ptx: str) -> dict:
    """``ptxas -v`` of the PTX for sm_90a, by the ``ptxas`` triton itself assembles sm_90 with
    (its bundled CUDA 12 one up to triton 3.6, the CUDA 13 ``ptxas-blackwell`` from 3.7 on):
    registers a thread, spill store / load bytes and the stack frame, as ints."""
    from triton.backends.nvidia.compiler import get_ptxas

    argv = [get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", "-o", os.devnull]
    out = _run_on_file(ptx, ".ptx", argv)

    def grab(pattern: str) -> int:
        m = re.search(pattern, out.stderr)
        return int(m.group(1)) if m else 0

    return {
        "registers": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "stack": grab(r"(\d+) bytes stack frame"),
    }


def sass_ops(cubin: bytes) -> collections.Counter:
    """SASS opcode counts of a cubin (``nvdisasm``), by base opcode (``SHFL.BFLY`` -> ``SHFL``):
    static counts, not executed ones, but the cross-thread ones (``BAR``, ``SHFL``) mark a
    latency chain's steps."""
    from triton import knobs

    sass = _run_on_file(cubin, ".cubin", [knobs.nvidia.nvdisasm.path]).stdout
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            ops[m.group(1).split(".")[0]] += 1
    return ops
