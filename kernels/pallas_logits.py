"""Router logits ``x @ router`` for a few tokens as a split-K Pallas-Triton GEMV.

Why. The router is ``[d, E]`` float32 (7.3 MB per Llama-3-8B layer at E = 448). XLA runs this
``[t, d] @ [d, E]`` product at batch 1 as a narrow GEMV at ~0.25-0.33 TB/s: 22-30 µs per layer
on the H200, about 40% of a whole sparse decode layer (BENCHMARKS.md, issue 5). At the copy
bandwidth the same bytes take ~2 µs. The bytes are the whole cost, so the kernel spreads them
over many programs: program ``(s, j)`` reads rows ``[s·R, (s+1)·R)`` of router columns
``[j·BE, (j+1)·BE)`` — a ``[R, BE]`` slab — and writes its partial logits for those columns. The
``S`` partial sums per logit are added by one small XLA reduction, or by the selection kernel
itself (``router_logits_partials``; no atomics either way, so the result is deterministic: the
routing decision of a token never depends on the run).

Two inner products, both exact float32 (IEEE, never TF32, because routing ranks probabilities
that differ by less than a bf16 ulp): broadcast multiply + one reduction at the end (any token
count), or ``plgpu.dot`` at ``precision=HIGHEST`` when tokens are padded to 16 rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from prunepath_jax.kernels import pallas_pdl
from prunepath_jax.kernels.jt import next_pow2

try:
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - only on a jax without Pallas-Triton
    plgpu = None


def pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two dividing ``n`` and ≤ ``cap`` (Triton blocks are powers of two); shared
    with ``pallas_decode``."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def _largest_divisor(n: int, cap: int) -> int:
    return max(s for s in range(1, min(n, cap) + 1) if n % s == 0)


def plan(tp: int, d: int, e: int, *, splits: int = 32, block_e: int = 64) -> dict:
    """Static blocks: ``be`` columns (a power of two dividing E, so no program reads past the
    router), ``bdi`` rows per step, ``s`` splits of d, ``steps`` per program, ``use_dot``."""
    if splits < 1 or block_e < 1:
        raise ValueError(f"splits and block_e must be >= 1, got {splits}, {block_e}")
    be = pow2_divisor(e, block_e)
    use_dot = tp >= 16 and be >= 16
    # Broadcast accumulator [tp, bdi, be] fp32 stays ≤ 4k elements (32 registers a thread).
    bdi = pow2_divisor(d, 64 if use_dot else max(1, 4096 // (tp * be)))
    if use_dot and bdi < 16:
        use_dot, bdi = False, pow2_divisor(d, max(1, 4096 // (tp * be)))
    s = _largest_divisor(d // bdi, splits)
    return {"be": be, "bdi": bdi, "s": s, "steps": d // bdi // s, "use_dot": use_dot}


def row_scale(x_ref, d, eps):
    """``rsqrt(mean(x²) + eps)`` per row ``[tp, 1]`` over the whole (masked, power-of-two
    padded) row: every program needs it for its own slice of d, and re-reading a decode token's
    row (8 KB at d = 4096) from L2 is cheaper than one more launch. Shared with
    ``pallas_proj``."""
    tp = x_ref.shape[0]
    dp = next_pow2(d)
    ok = jax.lax.broadcasted_iota(jnp.int32, (tp, dp), 1) < d
    x = plgpu.load(x_ref.at[:, pl.ds(0, dp)], mask=ok, other=0).astype(jnp.float32)
    return jax.lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) / d + eps)


def normed(x_tk, w_k, scale_t1):
    """``models.layers.rms_norm`` of a ``[tp, k]`` slice given its rows' scale: ``w · bf16(x·r)``
    in that function's order and roundings (the product of two bf16 is exact in fp32, then
    rounded to x's dtype)."""
    xn = (x_tk.astype(jnp.float32) * scale_t1).astype(x_tk.dtype).astype(jnp.float32)
    return (w_k.astype(jnp.float32)[None] * xn).astype(x_tk.dtype)


def _kernel(x_ref, r_ref, *refs, stride, p, eps):
    """Program (s, j): partial logits of columns j·be.. over router rows of split s, stored at
    columns ``s·stride + j·be`` (``stride`` ≥ E leaves each split's padding columns unwritten).

    With an RMSNorm weight (``refs = (w_ref, out_ref, xn_ref)``) the program normalises its
    rows of x first, in ``models.layers.rms_norm``'s order of operations and roundings, and the
    programs of column block 0 store them: the expert kernel's input, with no XLA norm between.
    """
    norm = len(refs) == 3
    w_ref, out_ref, xn_ref = refs if norm else (None, refs[0], None)
    s, j = pl.program_id(0), pl.program_id(1)
    tp, d = x_ref.shape
    be, bdi, steps = p["be"], p["bdi"], p["steps"]
    cols = pl.ds(pl.multiple_of(j * be, be), be)
    scale = row_scale(x_ref, d, eps) if norm else None

    def body(i, acc):
        rows = pl.ds(pl.multiple_of((s * steps + i) * bdi, bdi), bdi)
        x = plgpu.load(x_ref.at[:, rows])  # [tp, bdi]
        if norm:
            x = normed(x, plgpu.load(w_ref.at[rows]), scale)

            @pl.when(j == 0)
            def _():
                plgpu.store(xn_ref.at[:, rows], x)

        x = x.astype(jnp.float32)
        w = plgpu.load(r_ref.at[rows, cols]).astype(jnp.float32)  # [bdi, be]
        if p["use_dot"]:
            return acc + plgpu.dot(x, w, precision=jax.lax.Precision.HIGHEST)
        return acc + x[:, :, None] * w[None]  # [tp, bdi, be]: reduced once, after the loop

    shape = (tp, be) if p["use_dot"] else (tp, bdi, be)
    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(shape, jnp.float32))
    if not p["use_dot"]:
        acc = jnp.sum(acc, axis=1)
    plgpu.store(out_ref.at[:, pl.ds(pl.multiple_of(s * stride + j * be, be), be)], acc)


def router_logits_partials(
    x_td: jax.Array,
    router_de: jax.Array,
    *,
    stride: int | None = None,
    splits: int = 32,
    block_e: int = 64,
    num_warps: int = 4,
    interpret: bool = False,
) -> tuple[jax.Array, int]:
    """The kernel's unreduced output: ``(part [t, S·stride] fp32, S)``; split ``s``'s partial
    logits of expert ``e`` sit at column ``s·stride + e`` and ``Σ_s`` of them is ``x @ router``.

    Why unreduced: the selection kernel (``pallas_routing.route_gates_from_partials``) can add
    the ``S`` partials itself, so a decode layer needs no XLA reduction (nor a padding fusion)
    between the two kernels -- two launches fewer per layer. ``stride`` (default E) may be
    larger, e.g. the selection kernel's power-of-two expert count; columns ``[E, stride)`` of
    each split are left unwritten (garbage) and must be masked by the reader.
    """
    part, n, _ = _call(x_td, router_de, None, 0.0, stride, splits, block_e, num_warps, interpret)
    return part, n


def router_logits_partials_normed(
    x_td: jax.Array,
    router_de: jax.Array,
    norm_d: jax.Array,
    eps: float,
    *,
    stride: int | None = None,
    splits: int = 32,
    block_e: int = 64,
    num_warps: int = 4,
    interpret: bool = False,
) -> tuple[jax.Array, int, jax.Array]:
    """As ``router_logits_partials`` of ``rms_norm(x_td, norm_d, eps)``, from the un-normalised
    residual stream: ``(part, S, xn_td)`` with ``xn_td`` the normalised rows (x's dtype).

    Why: a decode layer's RMSNorm before the FFN is two XLA launches (a reduction and a
    multiply, ~1.3 µs each on the H200) for 8 KB of data; this kernel already reads the row,
    so it normalises it and hands ``xn_td`` to the expert kernel. Equals
    ``models.layers.rms_norm`` up to the float32 summation order of ``mean(x²)``.
    """
    if norm_d.shape != (x_td.shape[1],):
        raise ValueError(f"norm weight must be [d] = {(x_td.shape[1],)}, got {norm_d.shape}")
    return _call(x_td, router_de, norm_d, eps, stride, splits, block_e, num_warps, interpret)


def _call(x_td, router_de, norm_d, eps, stride, splits, block_e, num_warps, interpret):
    t, d = x_td.shape
    if router_de.shape[0] != d:
        raise ValueError(f"router rows {router_de.shape[0]} != d = {d}")
    if t > 16 or t & (t - 1):
        raise ValueError(f"router_logits_pallas takes a power-of-two t <= 16, got {t}")
    if plgpu is None:
        raise NotImplementedError("this jax has no Pallas Triton backend")
    e = router_de.shape[1]
    stride = e if stride is None else stride
    if stride < e:
        raise ValueError(f"stride {stride} < E = {e}")
    p = plan(t, d, e, splits=splits, block_e=block_e)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    part_shape = jax.ShapeDtypeStruct((t, p["s"] * stride), jnp.float32)
    norm = norm_d is not None
    outs = pl.pallas_call(
        pallas_pdl.early_launch(
            functools.partial(_kernel, stride=stride, p=p, eps=float(eps)),
            interpret=interpret,
            tag="logits",
        ),
        out_shape=(part_shape, jax.ShapeDtypeStruct(x_td.shape, x_td.dtype))
        if norm
        else part_shape,
        grid=(p["s"], e // p["be"]),
        in_specs=[any_spec] * (3 if norm else 2),
        out_specs=(any_spec, any_spec) if norm else any_spec,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="prunepath_router_logits",
    )(x_td, router_de, *((norm_d,) if norm else ()))
    part, xn = outs if norm else (outs, None)
    return part, p["s"], xn


def router_logits_pallas(
    x_td: jax.Array,
    router_de: jax.Array,
    *,
    splits: int = 32,
    block_e: int = 64,
    num_warps: int = 4,
    interpret: bool = False,
) -> jax.Array:
    """``x_td @ router_de`` in exact float32: ``[t, E]``, for ``t ≤ 16`` (decode).

    Equals ``routing.router_logits`` up to float32 summation order. ``t`` is used as given
    (callers pad to a power of two; padded zero rows cost nothing but their logits).
    """
    t = x_td.shape[0]
    e = router_de.shape[1]
    part, n = router_logits_partials(
        x_td, router_de, splits=splits, block_e=block_e, num_warps=num_warps, interpret=interpret
    )
    return jnp.sum(part.reshape(t, n, e), axis=1)
