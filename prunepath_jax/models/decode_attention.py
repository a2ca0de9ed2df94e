"""Decode attention over the KV cache: XLA, or the Pallas split-K kernel where it can run.

Why. A decode step is one query row per head against the whole cache, bound by reading K and V
once; the split-K kernel (`prunepath_jax.kernels.pallas_attention`) streams the cache in parallel
chunks and measured 1.66-1.97x faster than XLA's attention at batch 8 on an H200 (BENCHMARKS.md).
Prefill (t > 1) stays on XLA / cuDNN. For head_dim >= 32 the decode step's RoPE and cache write
run inside the kernel too (`rope_step`), which removes four or five small launches per layer.

Which one runs is a static attribute of every Llama-family `Attention` module, ``attn_impl``
(part of the graphdef, so a jitted step compiles the chosen path once):

- ``"xla"`` (default): `models.layers.attention` over the masked cache.
- ``"pallas"``: the kernel for decode steps it supports, on a CUDA GPU; every other case -- prefill,
  no GPU, a sliding window, unsupported shapes or dtypes -- runs the XLA path, by an explicit
  check (`unsupported_reason`) rather than by computing something else.
- ``"pallas_plain"``: as ``"pallas"`` but always with XLA's RoPE and cache write before the
  kernel (no `rope_step`): the form before the fused prologue, kept to measure the difference.
- ``"pallas_interpret"``: as ``"pallas"`` but through the Pallas interpreter on any backend; for
  CPU tests of the wiring, slow.

The kernel masks by length (key ``s`` is attended iff ``s < len[b]``). The model's decode mask is
``causal_mask(positions, arange(s), window)``: with no window and one query per sequence that is
exactly ``s < min(pos[b] + 1, s_max)`` (`prefix_lengths`); a window is not a prefix, so it falls
back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from prunepath_jax.models.layers import LayerCache, attention

ATTN_IMPLS = ("xla", "pallas", "pallas_plain", "pallas_interpret")
_ROWS = 16  # the kernel's query rows per program: at most 16 query heads per KV head
_MAX_BLOCK = 64  # cache positions per inner step (the measured default)
_MIN_BLOCK = 16  # the smallest dot dimension of a Triton tensor-core product
_TARGET_PROGRAMS = 256  # ~2 programs per SM of an H200 (the kernel's own default)


def kernel_ready() -> str | None:
    """Why the compiled kernel cannot run on this platform (None when it can)."""
    backend = jax.default_backend()
    if backend != "gpu":
        return f"the Pallas decode attention needs a CUDA GPU (backend is {backend!r})"
    from prunepath_jax.kernels import pallas_attention

    if pallas_attention.plgpu is None:
        return "jax.experimental.pallas.triton is not importable"
    return None


def _plan(b: int, kv: int, s: int) -> tuple[int, int] | None:
    """``(n_splits, block_s)`` for a cache of ``s`` positions, or None when no power-of-two block
    of at least 16 positions divides it.

    Splits: the smallest divisor of the block count giving ~256 programs (the largest divisor
    when none does), so every chunk is whole blocks. For power-of-two lengths that is the
    doubling the kernel's own default does. Why any divisor: with powers of two only, a cache
    of 33024 positions (129·256: a 32k prompt plus a few steps, rounded) split 4 ways -- 32
    programs on 132 SMs -- and an 8B decode step took 10.0 ms end to end (H200, 2026-12-01)
    against ~5.9 ms of device time per step from 32768 positions (32 splits); 43 splits of 12
    blocks keep the programs at that count.
    """
    block = min(_MAX_BLOCK, s & -s)  # the largest power of two dividing s, capped
    if block < _MIN_BLOCK:
        return None
    n_blocks = s // block
    target = min(n_blocks, -(-_TARGET_PROGRAMS // (b * kv)))
    return next(n for n in range(target, n_blocks + 1) if n_blocks % n == 0), block


def unsupported_reason(
    impl: str, q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, window: int | None
) -> str | None:
    """Why ``impl`` does not run the kernel for this call (None when it does). Shapes and
    dtypes only, so it is decided at trace time."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
    if impl == "xla":
        return "attn_impl is 'xla'"
    b, t, h, hd = q_bthd.shape
    s, kv = k_bskd.shape[1], k_bskd.shape[2]
    if t != 1:
        return f"the kernel is for decode steps (one query per sequence), got t={t}"
    if window is not None:
        return f"a sliding window ({window}) is not a length mask"
    if impl in ("pallas", "pallas_plain"):
        why = kernel_ready()
        if why is not None:
            return why
    if q_bthd.dtype not in (jnp.bfloat16, jnp.float32):
        return f"the kernel takes bfloat16 or float32, got {q_bthd.dtype}"
    if k_bskd.dtype != q_bthd.dtype or v_bskd.dtype != q_bthd.dtype:
        return f"cache dtype ({k_bskd.dtype}, {v_bskd.dtype}) differs from q's {q_bthd.dtype}"
    if h % kv or h // kv > _ROWS:
        return f"needs h % kv == 0 and h/kv <= {_ROWS}, got h={h}, kv={kv}"
    if hd < 16 or hd & (hd - 1):
        return f"head_dim must be a power of 2 >= 16, got {hd}"
    if _plan(b, kv, s) is None:
        return f"cache length {s} is not a multiple of {_MIN_BLOCK}"
    return None


def prefix_lengths(positions_b: jax.Array, s: int) -> jax.Array:
    """int32 ``[b]``: how many cache positions a query at ``positions_b`` attends without a
    window. ``causal_mask`` allows key ``j <= pos``; past the cache end (writes dropped) every
    key is allowed, hence the clip to ``s``."""
    return jnp.minimum(positions_b.astype(jnp.int32) + 1, s)


def cached_attention(
    q_bthd: jax.Array,
    cache: LayerCache,
    allowed_bts: jax.Array,
    positions_bt: jax.Array,
    *,
    impl: str,
    window: int | None,
) -> jax.Array:
    """Attention of the new queries over the (already written) cache: ``[b, t, h, hd]``.

    Args:
        q_bthd: queries at ``positions_bt``.
        cache: this layer's cache after writing the new keys/values.
        allowed_bts: the XLA path's mask; must be ``causal_mask(positions_bt, arange(s),
            window)``, the mask the kernel path rebuilds from the positions.
        positions_bt: the queries' absolute positions.
        impl: an ``attn_impl`` value (``ATTN_IMPLS``).
        window: the model's sliding window, or None.
    """
    if unsupported_reason(impl, q_bthd, cache.k, cache.v, window) is not None:
        return attention(q_bthd, cache.k, cache.v, allowed_bts)
    from prunepath_jax.kernels import pallas_attention

    _, s, kv, _ = cache.k.shape
    n_splits, block_s = _plan(q_bthd.shape[0], kv, s)
    out_bhd = pallas_attention.decode_attention(
        q_bthd[:, 0], cache.k, cache.v, prefix_lengths(positions_bt[:, 0], s),
        n_splits=n_splits, block_s=block_s, interpret=impl == "pallas_interpret",
    )  # fmt: skip
    return out_bhd[:, None]


def rope_step(
    qkv_bthd: jax.Array,
    rope: tuple[jax.Array, jax.Array],
    cache: LayerCache,
    positions_bt: jax.Array,
    *,
    impl: str,
    window: int | None,
    n_heads: int,
) -> tuple[jax.Array, LayerCache] | None:
    """A decode step from the QKV projection in one kernel: RoPE, the cache write and the
    attention (`pallas_attention.decode_attention_rope`), or None where it cannot run (the
    caller then rotates, writes and calls `cached_attention`, which may still use the plain
    kernel: head_dim 16 is too small for the kernel's two half-width products).

    Args:
        qkv_bthd: ``[b, 1, h + 2kv, hd]``, q, k, v of the new tokens before RoPE.
        rope: the model's ``(cos, sin)`` tables, ``[b, 1, 1, hd/2]``.
        cache: this layer's cache before the write.
        positions_bt: ``[b, 1]`` positions of the new tokens.
        impl, window: as for `cached_attention`.
        n_heads: query heads h.

    Returns:
        ``(out [b, 1, h, hd], cache after the write)``, or None.
    """
    b, t, _, hd = qkv_bthd.shape
    if impl == "pallas_plain" or hd < 2 * _MIN_BLOCK:
        return None
    q_spec = jax.ShapeDtypeStruct((b, t, n_heads, hd), qkv_bthd.dtype)
    if unsupported_reason(impl, q_spec, cache.k, cache.v, window) is not None:
        return None
    from prunepath_jax.kernels import pallas_attention

    _, s, kv, _ = cache.k.shape
    n_splits, block_s = _plan(b, kv, s)
    cos, sin = (jnp.broadcast_to(r[:, 0, 0], (b, hd // 2)) for r in rope)
    out_bhd, k, v = pallas_attention.decode_attention_rope(
        qkv_bthd[:, 0], cos, sin, cache.k, cache.v, positions_bt[:, 0].astype(jnp.int32),
        n_heads=n_heads, n_splits=n_splits, block_s=block_s,
        interpret=impl == "pallas_interpret",
    )  # fmt: skip
    return out_bhd[:, None], LayerCache(k, v)


def attention_modules(model: nnx.Module, *, required_by: str | None = None) -> list[nnx.Module]:
    """Every Llama-family attention module of ``model`` (empty for other families; with
    ``required_by``, the name of the caller, a ValueError instead)."""
    from prunepath_jax.models.llama import Attention

    mods = [m for _, m in nnx.iter_graph(model) if isinstance(m, Attention)]
    if required_by is not None and not mods:
        raise ValueError(f"{required_by} applies to Llama-family models only")
    return mods


def set_attention(model: nnx.Module, impl: str) -> None:
    """Sets ``attn_impl`` (``ATTN_IMPLS``) on every Llama-family attention module of ``model``;
    raises ValueError for a model without any."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
    for m in attention_modules(model, required_by="set_attention"):
        m.attn_impl = impl


# "auto" uses the kernel up to this many cache positions and sequences (measured, below).
AUTO_MAX_CACHE = 17 * 1024
AUTO_MAX_BATCH = 8


def impl_for(
    implementation: str, model: nnx.Module, cache_len: int | None = None, batch: int | None = None
) -> str:
    """The ``attn_impl`` a `generate(implementation=...)` value asks for: "pallas" -> the kernel
    ("pallas_plain", for benchmarks: the kernel without its RoPE / cache-write prologue);
    "auto" -> the kernel for at most ``AUTO_MAX_BATCH`` sequences with a cache of at most
    ``AUTO_MAX_CACHE`` positions on a GPU that can run it, with the weights on one device (a
    sharded cache would be gathered for the custom call), XLA otherwise; anything else -> XLA.

    Why, measured in the model's decode step on the H200 (BENCHMARKS.md, issue 5, batch 1):
    with a 256-position cache the kernel makes a token faster -- Llama-3.2-1B 1114 vs 1188 µs
    dense, 934 vs 1021 µs at 75% FFN sparsity; Llama-3-8B 4340 vs 4565 dense, 2863 vs 3068
    sparse -- because it replaces ~5 small XLA launches per layer. Long caches, 8B, one run
    (2026-12-01, after the split plan took any divisor of the block count): 4352 positions 4709
    vs 4795 µs dense, 3089 vs 3260 sparse; 16640: 5226 vs 5194 dense, 3616 vs 3684 sparse;
    33024: 5760 vs 5764 dense, 4280 vs 4205 sparse (XLA ahead by 1.8%), so the kernel up to
    ~17k positions. (Before that fix a 33024-position cache split only 4 ways and the kernel
    took 10040 µs.) Batch 4 / 8, 256-position cache (8B, 2026-12-01, separate runs): dense 4334
    vs 4765 µs and 4469 vs 4843; 75% sparse 4757 vs 5112 and 5801 vs 6297 -- the kernel also
    wins there; larger batches are not measured, so XLA.
    "auto" means the fastest measured path.
    """
    if implementation in ("pallas", "pallas_plain"):
        return implementation
    if (
        implementation != "auto"
        or cache_len is None
        or cache_len > AUTO_MAX_CACHE
        or batch is None
        or not 1 <= batch <= AUTO_MAX_BATCH
        or kernel_ready() is not None
    ):
        return "xla"
    leaves = jax.tree.leaves(nnx.state(model))
    one_device = all(len(x.sharding.device_set) == 1 for x in leaves if hasattr(x, "sharding"))
    return "pallas" if one_device else "xla"
