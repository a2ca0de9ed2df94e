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


def _kernel(x_ref, r_ref, out_ref, *, stride, p):
    """Program (s, j): partial logits of columns j·be.. over router rows of split s, stored at
    columns ``s·stride + j·be`` (``stride`` ≥ E leaves each split's padding columns unwritten)."""
    s, j = pl.program_id(0), pl.program_id(1)
    tp = x_ref.shape[0]
    be, bdi, steps = p["be"], p["bdi"], p["steps"]
    cols = pl.ds(pl.multiple_of(j * be, be), be)

    def body(i, acc):
        rows = pl.ds(pl.multiple_of((s * steps + i) * bdi, bdi), bdi)
        x = plgpu.load(x_ref.at[:, rows]).astype(jnp.float32)  # [tp, bdi]
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
    part = pl.pallas_call(
        functools.partial(_kernel, stride=stride, p=p),
        out_shape=jax.ShapeDtypeStruct((t, p["s"] * stride), jnp.float32),
        grid=(p["s"], e // p["be"]),
        in_specs=[any_spec, any_spec],
        out_specs=any_spec,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="prunepath_router_logits",
    )(x_td, router_de)
    return part, p["s"]


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
