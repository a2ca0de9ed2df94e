"""One launcher for `@triton.jit` kernels: jax-triton on the GPU, the Triton interpreter on CPU.

Why an adapter: jax-triton 0.3 takes ``out_shape=`` and 0.4 renamed it ``out_type=`` (0.4 needs
triton >= 3.7, the GPU machine has 3.6, so both versions are in use); and ``import jax_triton``
fails outright on a CPU jaxlib, so it must never happen at module import. The interpreter path
runs the *same* kernels on CPU for the tests: arrays become torch CPU tensors (the interpreter
rejects numpy arrays), outputs are poisoned with NaN / -1 before the launch so an unwritten
element cannot pass, and the results come back as jax arrays. It only works when
``TRITON_INTERPRET=1`` was set before triton was first imported (triton's own standard-library
functions are decorated at import), which is why the CPU tests run it in a subprocess.

Convention (jax-triton's): kernel parameters are the inputs, then the outputs, then the
``tl.constexpr`` meta-parameters passed by keyword.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@functools.cache
def jax_triton_module():
    """Imports jax_triton, or raises a clear error naming why it cannot run here."""
    if jax.default_backend() != "gpu":
        raise NotImplementedError(
            "the Triton backend needs a CUDA GPU (jax-triton cannot even be imported on a CPU "
            "jaxlib); use implementation='xla' or None, or interpret=True for the interpreter"
        )
    try:
        import jax_triton
    except Exception as err:  # ImportError, or a failing import on an unsupported stack
        raise NotImplementedError(
            f"jax-triton is not importable ({err!r}); install the `gpu` extra (jax-triton>=0.3.1)"
        ) from err
    return jax_triton


def available() -> bool:
    """True when Triton kernels can be launched from jitted JAX code on this machine."""
    try:
        jax_triton_module()
    except NotImplementedError:
        return False
    return True


@functools.cache
def _out_kwarg() -> str:
    params = inspect.signature(jax_triton_module().triton_call).parameters
    return "out_type" if "out_type" in params else "out_shape"


def _to_torch(a):
    import torch

    arr = np.asarray(a)
    if arr.dtype == jnp.bfloat16:
        return torch.from_numpy(arr.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(arr.copy())


def _from_torch(t, dtype) -> jax.Array:
    import torch

    if t.dtype == torch.bfloat16:
        return jnp.asarray(t.view(torch.uint16).numpy().view(jnp.bfloat16))
    return jnp.asarray(t.numpy()).astype(dtype)


def _poisoned(sds: jax.ShapeDtypeStruct):
    import torch

    dt = np.dtype(sds.dtype)
    if dt == jnp.bfloat16:
        return torch.full(sds.shape, float("nan"), dtype=torch.bfloat16)
    fill = float("nan") if np.issubdtype(dt, np.floating) else -1
    return torch.from_numpy(np.full(sds.shape, fill, dt))


def triton_call(
    kernel,
    *args,
    out_shape: Sequence[jax.ShapeDtypeStruct],
    grid: tuple[int, ...] | Callable,
    num_warps: int = 4,
    num_stages: int = 3,
    input_output_aliases: dict[int, int] | None = None,
    zeroed_outputs: Sequence[int] = (),
    interpret: bool = False,
    **meta,
) -> tuple[jax.Array, ...]:
    """Launches ``kernel`` on ``args`` and returns its outputs as a tuple of jax arrays.

    Args:
        kernel: a ``@triton.jit`` function defined in a real ``.py`` file.
        *args: input arrays (jax/numpy) in the kernel's parameter order.
        out_shape: one ShapeDtypeStruct per output parameter (after the inputs).
        grid: launch grid (static ints).
        num_warps, num_stages: Triton compile options (ignored by the interpreter).
        input_output_aliases: ``{input index: output index}``: the output starts as a copy of
            that input (jax-triton donates the buffer; the interpreter copies it).
        zeroed_outputs: indices of outputs that start as zeros: jax-triton clears them with
            a memset on the launch's stream, no XLA fusion writing a zeros array first.
        interpret: run under the Triton interpreter on CPU (eager, not under jit).
        **meta: the kernel's ``tl.constexpr`` parameters.
    """
    out_shape = list(out_shape)
    aliases = dict(input_output_aliases or {})
    if interpret:
        if type(kernel).__name__ != "InterpretedFunction":
            raise RuntimeError(
                "interpret=True needs TRITON_INTERPRET=1 in the environment before triton is "
                "first imported (run the interpreter in a fresh process)"
            )
        t_args = [_to_torch(a) for a in args]
        outs = [_poisoned(s) for s in out_shape]
        for i, o in aliases.items():
            outs[o] = t_args[i].clone()
        for o in zeroed_outputs:
            outs[o].zero_()
        kernel[grid](*t_args, *outs, **meta)
        return tuple(_from_torch(o, s.dtype) for o, s in zip(outs, out_shape, strict=True))
    jt = jax_triton_module()
    res = jt.triton_call(
        *args,
        kernel=kernel,
        grid=grid,
        num_warps=num_warps,
        num_stages=num_stages,
        input_output_aliases=aliases or None,
        zeroed_outputs=tuple(zeroed_outputs),
        **{_out_kwarg(): out_shape},
        **meta,
    )
    return tuple(res) if isinstance(res, list | tuple) else (res,)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# Programs when the device does not say how many SMs it has (an H200 has 132).
DEFAULT_PROGRAMS = 132


def default_programs() -> int:
    """The default device's SM count (its ``core_count``), else 132: persistent kernels
    (``pallas_balanced``, ``triton_balanced``) size their grids by it."""
    try:
        n = getattr(jax.devices()[0], "core_count", None)
    except RuntimeError:  # pragma: no cover - no backend at all
        n = None
    return int(n) if isinstance(n, int) and n > 0 else DEFAULT_PROGRAMS


def unit_programs(block_n: int) -> int:
    """Grid of a persistent one-token unit loop with ``block_n``-neuron units: two programs per
    SM for units of ≤ 2 neurons (few enough registers that two share an SM: measured faster for
    the Pallas and the Triton balanced kernels, BENCHMARKS.md tenth session), else one."""
    return (2 if block_n <= 2 else 1) * default_programs()
