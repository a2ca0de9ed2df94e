"""A decode step's attention projections through `kernels.pallas_proj`, norm and residual inside.

Why. In a Llama decode layer the QKV and O projections are XLA GEMMs surrounded by small fusions
(the input RMSNorm's reduction, a two-row padding of the GEMV input, the residual add), each a
~1.1-2.4 µs launch on the H200 for a few KB of data. The projection kernel reads its row whole,
so it normalises it, adds the bias and the residual itself: one launch per projection.

Which path runs is a static attribute of every Llama-family `Attention` module, ``proj_impl``
(part of the graphdef, like ``attn_impl``):

- ``"xla"`` (default): `Dense` after `rms_norm`, then the block's residual add.
- ``"pallas"``: the kernels for one-token steps of at most 16 sequences on a CUDA GPU; prefill,
  other backends and unsupported shapes or dtypes run the XLA path, by an explicit check
  (`unsupported_reason`), never something else.
- ``"pallas_interpret"``: as ``"pallas"`` through the Pallas interpreter on any backend (CPU
  tests of the wiring; slow).
"""

from __future__ import annotations

import jax
from flax import nnx

from prunepath_jax.models.decode_attention import attention_modules

PROJ_IMPLS = ("xla", "pallas", "pallas_interpret")


def unsupported_reason(impl: str, x_td: jax.Array, w_dn: jax.Array) -> str | None:
    """Why ``impl`` cannot run this projection (None when it can)."""
    if impl not in PROJ_IMPLS:
        raise ValueError(f"proj_impl must be one of {PROJ_IMPLS}, got {impl!r}")
    if impl == "xla":
        return "proj_impl is 'xla'"
    if impl == "pallas" and jax.default_backend() != "gpu":
        return f"the projection kernel needs a CUDA GPU (backend is {jax.default_backend()!r})"
    from prunepath_jax.kernels import pallas_proj

    return pallas_proj.unsupported_reason(x_td, w_dn)


def project(impl: str, x_td, dense, *, norm=None, resid_tn=None) -> jax.Array | None:
    """``[resid +] dense(rms_norm(x) | x)`` through the kernel, or None where it cannot run."""
    w_dn = dense.kernel[...]
    if unsupported_reason(impl, x_td, w_dn) is not None:
        return None
    from prunepath_jax.kernels import pallas_proj

    bias = None if dense.bias is None else dense.bias[...]
    return pallas_proj.projection(
        x_td, w_dn, norm=norm, bias_n=bias, resid_tn=resid_tn,
        interpret=impl == "pallas_interpret",
    )  # fmt: skip


def set_projections(model: nnx.Module, impl: str) -> None:
    """Sets ``proj_impl`` (``PROJ_IMPLS``) on every Llama-family attention module of ``model``;
    raises ValueError for a model without any."""
    if impl not in PROJ_IMPLS:
        raise ValueError(f"proj_impl must be one of {PROJ_IMPLS}, got {impl!r}")
    mods = attention_modules(model)
    if not mods:
        raise ValueError("set_projections applies to Llama-family models only")
    for m in mods:
        m.proj_impl = impl
