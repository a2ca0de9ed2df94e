"""Gluon kernels launched from jitted JAX code through jax-triton.

Why. Gluon (``triton.experimental.gluon``, triton >= 3.4) is Triton's lower-level dialect: the
kernel names its layouts, allocates shared memory itself and issues asynchronous copies into
it (``cp.async`` with commit / wait groups) that stay in flight across arbitrary code, e.g. a
grid barrier's spin loop. That is what the one-launch decode step cannot express in
``@triton.jit``: there a load in flight lives in registers (full at 254 a thread) and Triton's
software pipeliner only overlaps loads inside one loop. jax-triton 0.3.1 compiles only
``@triton.jit`` kernels (``ast_to_ttir`` then ``make_ttir`` / ``make_ttgir``: a Gluon module is
TTGIR already), but launches any cubin it is handed. So this module compiles Gluon kernels with
triton's own ``triton.compile`` (a ``GluonASTSource``, as ``kernels.sm90`` does for sm_90 on a
CPU) and gives jax-triton's lowering the compiled kernel, for Gluon functions only; every other
kernel goes through jax-triton unchanged.

Use ``jt.triton_call`` as for any kernel, after ``install()`` (idempotent). GPU only: there is
no interpreter for Gluon.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path


def is_gluon(fn) -> bool:
    """True for a ``@gluon.jit`` function (jax-triton's own path cannot compile those)."""
    return bool(getattr(fn, "is_gluon", lambda: False)())


def compile_gluon(fn, arg_dtypes, scalar_idx, constexprs: dict, *, warps, stages, ctas, cc):
    """``(name, shared bytes, ptx, attrs, warps a block)`` of a Gluon kernel for compute
    capability ``cc``.

    Args:
        fn: the ``@gluon.jit`` function; parameters are the arrays (and scalars), then the
            constexprs (jax-triton's convention).
        arg_dtypes: triton type strings of the non-constexpr parameters in order (``"*bf16"``).
        scalar_idx: indices of the scalar (non-pointer) parameters among them.
        constexprs: the constexpr parameters by name.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    names = list(fn.arg_names)
    if len(arg_dtypes) + len(constexprs) != len(names):
        raise ValueError(
            f"{fn.__name__}: {len(arg_dtypes)} arguments + {len(constexprs)} constexprs for "
            f"{len(names)} parameters"
        )
    sig = {n: (arg_dtypes[i] if i < len(arg_dtypes) else "constexpr") for i, n in enumerate(names)}
    const = {(names.index(k),): v for k, v in constexprs.items()}
    # jax-triton marks every array 16-byte aligned (XLA's buffers are); the same here, so the
    # copies compile to 16-byte cp.async.
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(arg_dtypes)) if i not in scalar_idx}
    src = GluonASTSource(fn, signature=sig, constexprs=const, attrs=attrs)
    if not os.environ.get("TRITON_CACHE_DIR"):
        # triton.compile always writes its file cache (jax-triton's own path does not); with
        # TRITON_CACHE_DIR set but empty (the GPU image) or a home it cannot write it fails
        # with "Could not create or locate cache dir".
        cache = Path.home() / ".triton" / "cache"
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError:
            cache = Path(tempfile.gettempdir()) / "triton_cache"
        os.environ["TRITON_CACHE_DIR"] = str(cache)
    ck = triton.compile(
        src,
        target=GPUTarget("cuda", cc, 32),
        options={"num_warps": warps, "num_stages": stages, "num_ctas": ctas},
    )
    # metadata.num_warps counts a warp-specialized kernel's worker warps too: the block size
    return ck.metadata.name, ck.metadata.shared, ck.asm["ptx"], attrs, ck.metadata.num_warps


@functools.cache
def install() -> None:
    """Routes Gluon kernels in jax-triton's lowering to ``compile_gluon`` (once a process)."""
    from prunepath_jax.kernels import jt

    jt.jax_triton_module()  # the clear error on a machine without a GPU
    import jax_triton.triton_lib as tlib

    original = tlib.get_or_create_triton_kernel
    cache: dict = {}

    def get_or_create(backend_init_func, platform, fn, arg_dtypes, scalar_args, **kw):
        if not is_gluon(fn):
            return original(backend_init_func, platform, fn, arg_dtypes, scalar_args, **kw)
        cc = kw["compute_capability"] or tlib.triton_kernel_call_lib.get_compute_capability(0)
        warps, stages, ctas = kw["num_warps"] or 4, kw["num_stages"] or 1, kw["num_ctas"] or 1
        meta = dict(kw["metaparams"])
        key = (fn, tuple(arg_dtypes), tuple(sorted(meta.items())), warps, stages, ctas, cc)
        if key not in cache:
            scalars = {i for i, _, _ in scalar_args}
            name, shared, ptx, attrs, block_warps = compile_gluon(
                fn, list(arg_dtypes), scalars, meta, warps=warps, stages=stages, ctas=ctas, cc=cc
            )
            kernel = tlib.triton_kernel_call_lib.TritonKernel(
                name, block_warps, ctas, shared, ptx, "", cc
            )
            cache[key] = (kernel, attrs)
        return cache[key]

    tlib.get_or_create_triton_kernel = get_or_create
