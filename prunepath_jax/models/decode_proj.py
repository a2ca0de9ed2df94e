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

Weight layout. ``Dense`` stores ``[in, out]``; a one-row GEMV over it reads ``[d, BN]`` column
slabs, 64 bytes per row, and measured 2x slower than XLA's split-K GEMM on the H200 whatever the
slab shape or prefetch (BENCHMARKS.md, issue 5). Over the transposed weight each output's
weights are one contiguous row and the kernel streams like the expert kernels. So
``set_projections(model, "pallas")`` also stores a transposed copy of each projection as a
`DecodeWeight` (``layout="nd"``, the default): extra memory of the attention weights (Llama-3-8B
+2.7 GB, 1B +0.34 GB), made once; call it again after the weights change (the copies are not
updated by training, and checkpoints skip them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from prunepath_jax.models.decode_attention import attention_modules

PROJ_IMPLS = ("xla", "pallas", "pallas_interpret")
LAYOUTS = ("nd", "dn")


class DecodeWeight(nnx.Variable):
    """A decode-only copy of a weight in the layout a decode kernel streams best (an attention
    projection transposed to ``[out, in]``). Not an ``nnx.Param``: optimisers skip it and
    `checkpoint.save_model` leaves it out."""


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


def project(impl: str, x_td, dense, w_nd=None, *, norm=None, resid_tn=None) -> jax.Array | None:
    """``[resid +] dense(rms_norm(x) | x)`` through the kernel, or None where it cannot run;
    ``w_nd``: the `DecodeWeight` copy of ``dense.kernel`` transposed, or None (``[d, n]`` read)."""
    w_dn = dense.kernel[...]
    if unsupported_reason(impl, x_td, w_dn) is not None:
        return None
    from prunepath_jax.kernels import pallas_proj

    bias = None if dense.bias is None else dense.bias[...]
    w, layout = (w_dn, "dn") if w_nd is None else (w_nd[...], "nd")
    return pallas_proj.projection(
        x_td, w, norm=norm, bias_n=bias, resid_tn=resid_tn, w_layout=layout,
        interpret=impl == "pallas_interpret",
    )  # fmt: skip


def set_projections(model: nnx.Module, impl: str, *, layout: str = "nd") -> None:
    """Sets ``proj_impl`` (``PROJ_IMPLS``) on every Llama-family attention module of ``model``
    and, for a kernel with ``layout="nd"``, stores the transposed `DecodeWeight` copies it reads
    (``"xla"`` drops them); raises ValueError for a model without any such module."""
    if impl not in PROJ_IMPLS:
        raise ValueError(f"proj_impl must be one of {PROJ_IMPLS}, got {impl!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    for m in attention_modules(model, required_by="set_projections"):
        m.proj_impl = impl
        copy = impl != "xla" and layout == "nd"
        m.qkv_nd = DecodeWeight(jnp.asarray(m.qkv_proj.kernel[...].T)) if copy else None
        m.o_nd = DecodeWeight(jnp.asarray(m.o_proj.kernel[...].T)) if copy else None
