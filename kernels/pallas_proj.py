"""A decode step's attention projections as Pallas-Triton GEMVs with the block's norm and residual
inside: ``proj(x) = [r +] (rms_norm(x) | x) @ W [+ b]`` for a few rows.

Why. Around the QKV and O projections of a Llama decode layer XLA launches small fusions that move
a few KB each: the input RMSNorm (a reduction, its multiply folded into the GEMM's prologue), the
two-row padding that keeps XLA's one-row dot on its GEMM emitter (``matvec_safe_matmul``), and the
residual add after the O projection. Each costs ~1.1-2.4 µs on the H200 whatever its size
(BENCHMARKS.md, issue 5: ~8 µs of such glue per 8B layer, ~6 per 1B layer), which at 75%
sparsity is ~10% of a decode step. Here each projection is one kernel that reads its row(s)
whole, so it can normalise them itself, and adds the bias and the residual to its own output
columns before the store.

How. Program ``j`` owns output columns ``[j·BN, (j+1)·BN)`` and streams their weights in steps
of ``BD`` inputs, accumulating ``x · w`` in fp32 and reducing once after the loop (the
router-logits kernel's scheme, without its split of d: a split would need a reduction launch,
the glue this removes). Two weight layouts: ``"nd"``, W transposed to ``[n, d]`` (each output's
weights one contiguous row; ``[BN, BD]`` tiles), the fast one; and ``"dn"``, ``Dense.kernel``
as stored (``[d, BN]`` column slabs, 2·BN bytes a row), 2x slower than XLA's split-K GEMM on the
H200 whatever the slabs per step or prefetch (BENCHMARKS.md, issue 5), kept for callers without
a transposed copy (`models.decode_proj`). Rounding follows the XLA path: the product rounded to
the weight dtype, then ``+ b`` rounded, then ``r +`` rounded, as ``Dense`` and the block's
residual add do.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from prunepath_jax.kernels import pallas_pdl
from prunepath_jax.kernels.pallas_logits import normed, pow2_divisor, row_scale

try:
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - only on a jax without Pallas-Triton
    plgpu = None

# Per weight layout: output columns (rows of W for "nd") per program, d per step, W tiles per
# loop step, register prefetch of the next step's tiles, warps, Triton pipeline stages. Measured on
# the H200 (BENCHMARKS.md, issue 5, benchmarks/proj_gemv.py; device µs per 1B / 8B layer, QKV +
# O): "nd" 12.4 / 28.7 (no prefetch; 11.4 / 31.6 with it) vs XLA's GEMMs with their glue 16.8 /
# 30.6; "dn" 26 / 58 at best. Also tried and removed (slower at every shape, numbers there):
# persistent grid-stride programs, and a tensor-core form with the row padded to 16 so Triton
# pipelines the W tiles through shared memory (best 54.0 µs over the four shapes vs 41.1).
DEFAULT_TUNING = {
    "nd": {"block_n": 8, "block_d": 512, "loads": 1, "prefetch": 0, "num_warps": 4,
           "num_stages": 1},
    "dn": {"block_n": 32, "block_d": 128, "loads": 2, "prefetch": 1, "num_warps": 4,
           "num_stages": 1},
}  # fmt: skip
TUNING_OVERRIDES: dict = {}
MAX_ROWS = 16  # decode batches; the broadcast accumulator is [rows, BN, BD] (or [rows, BD, BN])


def plan(tp: int, d: int, n: int, tuning: dict | None = None, layout: str = "nd") -> dict:
    """Static blocks: ``bn`` output columns per program (a power of two dividing n), ``bd`` inputs
    per step (a power of two dividing d, with ``tp·bd·bn ≤ 4096`` accumulator elements, 32 fp32
    registers a thread at 4 warps), ``steps``, ``loads`` tiles per loop step (dividing steps)."""
    tn = {**DEFAULT_TUNING[layout], **TUNING_OVERRIDES, **(tuning or {})}
    unknown = set(tn) - set(DEFAULT_TUNING[layout])
    if unknown:
        raise ValueError(f"unknown projection tuning keys {sorted(unknown)}")
    if min(v for k, v in tn.items() if k != "prefetch") < 1 or tn["prefetch"] < 0:
        raise ValueError(f"projection tuning values must be >= 1 (prefetch >= 0): {tn}")
    bn = pow2_divisor(n, tn["block_n"])
    bd = pow2_divisor(d, min(tn["block_d"], max(1, 4096 // (tp * bn))))
    steps = d // bd
    return {"bn": bn, "bd": bd, "steps": steps, "loads": pow2_divisor(steps, tn["loads"]),
            "prefetch": bool(tn["prefetch"]), "warps": tn["num_warps"],
            "stages": tn["num_stages"]}  # fmt: skip


def _kernel(x_ref, w_ref, *refs, p, eps, norm, bias, resid, nd):
    """Program j: output columns ``[j·bn, (j+1)·bn)`` of every row. ``refs``: [norm weight
    ``[d]``], [bias ``[n]``], [residual ``[tp, n]``], then the output ``[tp, n]``. ``nd``: W is
    stored ``[n, d]`` (each output's weights one contiguous row) instead of ``[d, n]``."""
    it = iter(refs)
    nw_ref = next(it) if norm else None
    b_ref = next(it) if bias else None
    r_ref = next(it) if resid else None
    out_ref = next(it)
    tp, d = x_ref.shape
    scale = row_scale(x_ref, d, eps) if norm else None
    bn, bd, n_u, steps = p["bn"], p["bd"], p["loads"], p["steps"]
    cols = pl.ds(pl.multiple_of(pl.program_id(0) * bn, bn), bn)

    def x_at(i):  # [tp, bd] inputs of step i, normalised when the norm is fused
        rows = pl.ds(pl.multiple_of(i * bd, bd), bd)
        x = plgpu.load(x_ref.at[:, rows])
        return normed(x, plgpu.load(nw_ref.at[rows]), scale) if norm else x

    def w_at(i):  # the [bn, bd] ([bd, bn]) tiles of steps i·U .. i·U + U - 1 (past the end: a
        i = jnp.minimum(i, steps // n_u - 1)  # harmless reload)
        rows = [pl.ds(pl.multiple_of((i * n_u + u) * bd, bd), bd) for u in range(n_u)]
        return tuple(plgpu.load(w_ref.at[(cols, r) if nd else (r, cols)]) for r in rows)

    def fma(i, ws, acc):  # reduced once, after the loop
        for u in range(n_u):
            x = x_at(i * n_u + u).astype(jnp.float32)
            x = x[:, None, :] if nd else x[:, :, None]
            acc = acc + x * ws[u].astype(jnp.float32)[None]
        return acc

    acc0 = jnp.zeros((tp, bn, bd) if nd else (tp, bd, bn), jnp.float32)
    if p["prefetch"]:  # the next step's tiles are in flight while this one multiplies

        def body(i, carry):
            nxt = w_at(i + 1)
            return (fma(i, carry[1:], carry[0]),) + nxt

        acc = jax.lax.fori_loop(0, steps // n_u, body, (acc0,) + w_at(0))[0]
    else:
        acc = jax.lax.fori_loop(0, steps // n_u, lambda i, acc: fma(i, w_at(i), acc), acc0)
    dt, f32 = out_ref.dtype, jnp.float32
    y = jnp.sum(acc, axis=2 if nd else 1).astype(dt)  # [tp, bn]: Dense's product, rounded
    if bias:
        y = (y.astype(f32) + plgpu.load(b_ref.at[cols]).astype(f32)[None]).astype(dt)
    if resid:
        y = (plgpu.load(r_ref.at[:, cols]).astype(f32) + y.astype(f32)).astype(dt)
    plgpu.store(out_ref.at[:, cols], y)


def unsupported_reason(x_td, w_dn) -> str | None:
    """Why the kernel cannot take these operands (None when it can): the caller falls back to
    XLA for these, never to a wrong result."""
    if plgpu is None:
        return "this jax has no Pallas Triton backend"
    if x_td.ndim != 2 or w_dn.ndim != 2 or x_td.shape[1] != w_dn.shape[0]:
        return f"x {x_td.shape} and W {w_dn.shape} do not make a [t, d] @ [d, n] product"
    t = x_td.shape[0]
    if not 1 <= t <= MAX_ROWS or t & (t - 1):
        return f"the projection kernel takes a power-of-two row count <= {MAX_ROWS}, got {t}"
    if x_td.dtype != w_dn.dtype or not jnp.issubdtype(x_td.dtype, jnp.floating):
        return f"x and W must share one float dtype, got {x_td.dtype} and {w_dn.dtype}"
    return None


def projection(
    x_td: jax.Array,
    w_dn: jax.Array,
    *,
    norm: tuple[jax.Array, float] | None = None,
    bias_n: jax.Array | None = None,
    resid_tn: jax.Array | None = None,
    tuning: dict | None = None,
    w_layout: str = "dn",
    interpret: bool = False,
) -> jax.Array:
    """``[resid +] (rms_norm(x, *norm) | x) @ W [+ bias]`` in x's dtype, ``[t, n]``.

    Args:
        x_td: the rows (a decode step's tokens), ``t`` a power of two ≤ 16.
        w_dn: the weight, ``[d, n]`` (``Dense.kernel``), x's dtype.
        norm: ``(weight [d], eps)`` of an RMSNorm applied to x first, or None.
        bias_n: ``Dense.bias`` or None.
        resid_tn: a residual added last (the block's ``x + h``), or None.
        tuning: ``DEFAULT_TUNING[w_layout]`` keys to override.
        w_layout: ``"dn"`` (``Dense.kernel`` as stored) or ``"nd"``: ``w_dn`` is the transposed
            ``[n, d]`` weight (each output's weights one contiguous row: the fast layout, which
            `models.decode_proj` uses by default).
        interpret: run under the Pallas interpreter (CPU tests).

    Equals the XLA path (``Dense`` after ``rms_norm``, then the residual add) up to fp32
    summation order, which can move a result by one rounding of x's dtype.
    """
    if w_layout not in ("dn", "nd"):
        raise ValueError(f"w_layout must be 'dn' or 'nd', got {w_layout!r}")
    nd = w_layout == "nd"
    # The check takes the logical [d, n] shape: no transpose of the weight just to validate it.
    w_spec = jax.ShapeDtypeStruct(w_dn.shape[::-1] if nd else w_dn.shape, w_dn.dtype)
    why = unsupported_reason(x_td, w_spec)
    if why is not None:
        raise ValueError(why)
    t, d = x_td.shape
    n = w_dn.shape[0 if nd else 1]
    if norm is not None and norm[0].shape != (d,):
        raise ValueError(f"norm weight must be [d] = {(d,)}, got {norm[0].shape}")
    if bias_n is not None and bias_n.shape != (n,):
        raise ValueError(f"bias must be [n] = {(n,)}, got {bias_n.shape}")
    if resid_tn is not None and resid_tn.shape != (t, n):
        raise ValueError(f"residual must be [t, n] = {(t, n)}, got {resid_tn.shape}")
    p = plan(t, d, n, tuning, w_layout)
    extra = [a for a in (None if norm is None else norm[0], bias_n, resid_tn) if a is not None]
    kernel = functools.partial(
        _kernel, p=p, eps=0.0 if norm is None else float(norm[1]), norm=norm is not None,
        bias=bias_n is not None, resid=resid_tn is not None, nd=nd,
    )  # fmt: skip
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        pallas_pdl.early_launch(kernel, interpret=interpret, tag="proj"),
        out_shape=jax.ShapeDtypeStruct((t, n), x_td.dtype),
        grid=(n // p["bn"],),
        in_specs=[any_spec] * (2 + len(extra)),
        out_specs=any_spec,
        compiler_params=plgpu.CompilerParams(num_warps=p["warps"], num_stages=p["stages"]),
        interpret=interpret,
        name="prunepath_decode_proj",
    )(x_td, w_dn, *extra)
