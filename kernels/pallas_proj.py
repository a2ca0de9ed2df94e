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

from prunepath_jax.kernels.pallas_logits import normed, pow2_divisor, row_scale

try:
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - only on a jax without Pallas-Triton
    plgpu = None

# Per weight layout: output columns (rows of W for "nd") per block, d per step, slabs per step,
# register prefetch of the next step's slabs, warps, Triton pipeline stages, programs (0: one per
# block, else a persistent grid-stride over the blocks). Measured on the H200 (BENCHMARKS.md,
# issue 5, proj_gemv.py): "dn" best of 18 tunings 0.9-1.5 TB/s (XLA's GEMMs 1.2-2.75 with their
# glue); "nd" 2.0 (1B QKV) to 2.85 TB/s (8B O) at 8 rows x 512 columns.
DEFAULT_TUNING = {
    "nd": {"block_n": 8, "block_d": 512, "loads": 1, "prefetch": 1, "num_warps": 4,
           "num_stages": 1, "programs": 0, "dot": 0},
    "dn": {"block_n": 32, "block_d": 128, "loads": 2, "prefetch": 1, "num_warps": 4,
           "num_stages": 1, "programs": 0, "dot": 0},
}  # fmt: skip
TUNING_OVERRIDES: dict = {}
MAX_ROWS = 16  # decode batches; the broadcast accumulator is [rows, BN, BD] (or [rows, BD, BN])


def plan(tp: int, d: int, n: int, tuning: dict | None = None, layout: str = "nd") -> dict:
    """Static blocks: ``bn`` output columns per program (a power of two dividing n), ``bd`` rows
    of W per step (a power of two dividing d, with ``tp·bd·bn ≤ 4096`` accumulator elements, 32
    fp32 registers a thread at 4 warps), ``steps``."""
    tn = {**DEFAULT_TUNING[layout], **TUNING_OVERRIDES, **(tuning or {})}
    unknown = set(tn) - set(DEFAULT_TUNING[layout])
    if unknown:
        raise ValueError(f"unknown projection tuning keys {sorted(unknown)}")
    flags = ("prefetch", "programs", "dot")
    if min(v for k, v in tn.items() if k not in flags) < 1 or min(tn[k] for k in flags) < 0:
        raise ValueError(f"projection tuning values must be >= 1 (flags >= 0): {tn}")
    bn = pow2_divisor(n, tn["block_n"])
    # "dot": rows padded to 16 for a tensor-core product per step, whose W tiles Triton can
    # pipeline through shared memory (num_stages); needs 16 | bn and 16 | bd.
    dot = bool(tn["dot"]) and bn >= 16 and pow2_divisor(d, tn["block_d"]) >= 16
    bd = pow2_divisor(d, tn["block_d"] if dot else min(tn["block_d"], max(1, 4096 // (tp * bn))))
    steps = d // bd
    loads = pow2_divisor(steps, tn["loads"])  # slabs per iteration: a divisor of the steps
    n_blocks = n // bn
    progs = min(tn["programs"], n_blocks) or n_blocks  # 0: one program per block
    return {"bn": bn, "bd": bd, "steps": steps, "loads": loads, "prefetch": bool(tn["prefetch"]),
            "warps": tn["num_warps"], "stages": tn["num_stages"], "blocks": n_blocks,
            "programs": progs, "dot": dot}  # fmt: skip


def _kernel(x_ref, w_ref, *refs, p, eps, norm, bias, resid, nd):
    """Program j: columns ``j·bn..`` of every row. ``refs``: [norm weight ``[d]``], [bias ``[n]``],
    [residual ``[tp, n]``], then the output ``[tp, n]``. ``nd``: W is stored ``[n, d]`` (each
    output's weights one contiguous row) instead of ``[d, n]``."""
    it = iter(refs)
    nw_ref = next(it) if norm else None
    b_ref = next(it) if bias else None
    r_ref = next(it) if resid else None
    out_ref = next(it)
    tp, d = x_ref.shape
    scale = None
    if norm:
        scale = _scale16(x_ref, p, eps) if p["dot"] and tp > 1 else row_scale(x_ref, d, eps)
    pid, n_prog = pl.program_id(0), p["programs"]
    block = functools.partial(_block, x_ref, w_ref, nw_ref, b_ref, r_ref, out_ref, p=p, nd=nd,
                              scale=scale)  # fmt: skip
    if n_prog == p["blocks"]:
        block(pid)
    else:  # grid-stride: blocks pid, pid + P, ...

        def one(i, c):
            block(pid + i * n_prog)
            return c

        jax.lax.fori_loop(0, (p["blocks"] - pid + n_prog - 1) // n_prog, one, 0)


def _rows16(ref, cols, zero, width):
    """``ref[0:16, cols]`` with rows past ``ref``'s count read as 0 (the start is traced: Pallas
    rejects a static slice past the bounds; the mask keeps the load inside them)."""
    ok = jax.lax.broadcasted_iota(jnp.int32, (16, width), 0) < ref.shape[0]
    return ref.at[pl.ds(zero, 16), cols], ok


def _scale16(x_ref, p, eps):
    """``rsqrt(mean(x²) + eps)`` ``[16, 1]`` of the 16-row padded x (padding rows: finite), summed
    in ``bd`` steps: a ``[16, d]`` tile at once would not fit in registers."""
    d, bd = x_ref.shape[1], p["bd"]
    zero = pl.program_id(0) * 0

    def body(i, acc):
        ref, ok = _rows16(x_ref, pl.ds(pl.multiple_of(i * bd, bd), bd), zero, bd)
        x = plgpu.load(ref, mask=ok, other=0).astype(jnp.float32)
        return acc + jnp.sum(x * x, axis=1, keepdims=True)

    ss = jax.lax.fori_loop(0, p["steps"], body, jnp.zeros((16, 1), jnp.float32))
    return jax.lax.rsqrt(ss / d + eps)


def _block(x_ref, w_ref, nw_ref, b_ref, r_ref, out_ref, j, *, p, nd, scale):
    """Output columns ``[j·bn, (j+1)·bn)`` of every row, stored."""
    norm, bias, resid = nw_ref is not None, b_ref is not None, r_ref is not None
    tp = x_ref.shape[0]
    bn, bd, dot = p["bn"], p["bd"], p["dot"]
    cols = pl.ds(pl.multiple_of(j * bn, bn), bn)
    n_u, steps = p["loads"], p["steps"]
    zero = j * 0  # a traced 0 (see _rows16)

    def x_at(i):  # [tp or 16, bd] rows of step i, normalised when the norm is fused
        rows = pl.ds(pl.multiple_of(i * bd, bd), bd)
        if dot:
            ref, ok = _rows16(x_ref, rows, zero, bd)
            x = plgpu.load(ref, mask=ok, other=0)
        else:
            x = plgpu.load(x_ref.at[:, rows])
        return normed(x, plgpu.load(nw_ref.at[rows]), scale) if norm else x

    def w_at(i):  # the [bd, bn] ([bn, bd]) slabs of steps i·U .. i·U + U - 1 (past the end: a
        i = jnp.minimum(i, steps // n_u - 1)  # harmless reload)
        rows = [pl.ds(pl.multiple_of((i * n_u + u) * bd, bd), bd) for u in range(n_u)]
        return tuple(plgpu.load(w_ref.at[(cols, r) if nd else (r, cols)]) for r in rows)

    prec = jax.lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None

    def fma(i, ws, acc):  # broadcast form: reduced once, after the loop
        for u in range(n_u):
            x = x_at(i * n_u + u)
            if dot:
                acc = acc + plgpu.dot(x.astype(ws[u].dtype), ws[u], trans_b=nd, precision=prec)
                continue
            x = x.astype(jnp.float32)
            x = x[:, None, :] if nd else x[:, :, None]
            acc = acc + x * ws[u].astype(jnp.float32)[None]
        return acc

    acc0 = jnp.zeros((16, bn) if dot else (tp, bn, bd) if nd else (tp, bd, bn), jnp.float32)
    if p["prefetch"]:  # the next U slabs are in flight while this iteration multiplies

        def body(i, carry):
            acc, ws = carry[0], carry[1:]
            nxt = w_at(i + 1)
            return (fma(i, ws, acc),) + nxt

        acc = jax.lax.fori_loop(0, steps // n_u, body, (acc0,) + w_at(0))[0]
    else:
        acc = jax.lax.fori_loop(0, steps // n_u, lambda i, acc: fma(i, w_at(i), acc), acc0)
    dt, f32 = out_ref.dtype, jnp.float32
    # [tp or 16, bn]: Dense's product, rounded
    y = (acc if dot else jnp.sum(acc, axis=2 if nd else 1)).astype(dt)
    if bias:
        y = (y.astype(f32) + plgpu.load(b_ref.at[cols]).astype(f32)[None]).astype(dt)
    if dot:  # padding rows: never stored
        ref, ok = _rows16(r_ref, cols, zero, bn) if resid else (None, None)
        if resid:
            y = (plgpu.load(ref, mask=ok, other=0).astype(f32) + y.astype(f32)).astype(dt)
        ref, ok = _rows16(out_ref, cols, zero, bn)
        plgpu.store(ref, y, mask=ok)
        return
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
        w_layout: ``"dn"`` (``Dense.kernel``) or ``"nd"``: ``w_dn`` is the transposed ``[n, d]``
            weight (each output's weights one contiguous row; measured as an alternative).
        interpret: run under the Pallas interpreter (CPU tests).

    Equals the XLA path (``Dense`` after ``rms_norm``, then the residual add) up to fp32
    summation order, which can move a result by one rounding of x's dtype.
    """
    if w_layout not in ("dn", "nd"):
        raise ValueError(f"w_layout must be 'dn' or 'nd', got {w_layout!r}")
    nd = w_layout == "nd"
    why = unsupported_reason(x_td, w_dn.T if nd else w_dn)
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
        kernel,
        out_shape=jax.ShapeDtypeStruct((t, n), x_td.dtype),
        grid=(p["programs"],),
        in_specs=[any_spec] * (2 + len(extra)),
        out_specs=any_spec,
        compiler_params=plgpu.CompilerParams(num_warps=p["warps"], num_stages=p["stages"]),
        interpret=interpret,
        name="prunepath_decode_proj",
    )(x_td, w_dn, *extra)
