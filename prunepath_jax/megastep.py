"""One-token decode of a PrunePath Llama with every layer in ONE Triton launch.

Why: a batch-1 decode step is ~10 kernel launches a layer, each a chain of dependent memory
round trips that XLA cannot overlap (BENCHMARKS.md, issue 5, sessions 12-17); the persistent
kernel ``kernels.triton_megastep`` runs all layers' phases between grid barriers and loads the
next phase's weights while it waits. The launch also reads the token's embedding row and computes
RoPE at its position itself (no XLA kernels before it); the final norm and the LM head run in
XLA, or as the launch's last phase with ``Launch(head_in=True)``; sampling stays in XLA.

The kernel reads weights stacked over layers and output-row-major, so ``pack`` makes a copy of
the model's layer weights once (the model's own arrays are per layer; memory: the layer
weights twice while both are alive). The KV cache is stacked too: ``stack_cache`` turns the
per-layer caches a prefill filled into ``[L, s, kv, hd]`` arrays (batch 1), or
``[L, b, s, kv, hd]`` for 2-16 sequences, which ``kernels.triton_megastep_batch`` decodes in one
launch a step (``step`` picks the kernel by the cache's rank; ``"auto"`` takes the batched one
for 2-16 prompts with caches up to 4352 positions, where it measured faster than the default
kernels: ``AUTO_BATCH_MIN``).

    tokens = generate(model, [prompt], 64, tau=0.5, implementation="megastep")  # packs itself
    mw = megastep.pack(model)  # or step by step: megastep.step / decode_chunk
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prunepath_jax import flatjit
from prunepath_jax.models.layers import rope_inv_freq
from prunepath_jax.nn import PrunePathFFN


class MegaWeights(NamedTuple):
    """Layer weights stacked over layers, output-row-major (what the kernel streams)."""

    ln1: jax.Array  # [L, d]
    ln2: jax.Array  # [L, d]
    wqkv: jax.Array  # [L, (h + 2 kv) hd, d]
    wo: jax.Array  # [L, d, h hd]
    router: jax.Array  # [L, E, d] float32
    router_o: jax.Array  # [L, E, h hd] float32: router · diag(ln2) · wo (the merged O phase's)
    w_in: jax.Array  # [L, 2, f, d]
    w_out: jax.Array  # [L, f, d]
    # [V, d] the LM head's rows for a launch that runs the head (``Launch.head_in``): the
    # embedding itself when tied, else a transposed copy of ``lm_head`` (``pack(head=True)``;
    # None without it).
    head: jax.Array | None = None
    # [L, d, E] float32: the routers in the model's own layout, for the batched launch's
    # ``Launch(router_de=True)`` (``pack(router_de=True)``; None without it). Why a second copy:
    # the batched step's C phase gives each program a few rows of d, and in ``router``'s
    # ``[E, d]`` rows those are E pieces of ``4 · rows`` bytes (64 B at 1B, 128 at 8B); here
    # they are one contiguous ``rows × E`` block.
    router_de: jax.Array | None = None

    def layers(self) -> tuple:
        """The stacked layer arrays, in ``triton_megastep.megastep``'s argument order."""
        return tuple(getattr(self, f) for f in _LAYER_FIELDS)


# the stacked layer arrays every launch reads
_LAYER_FIELDS = tuple(f for f in MegaWeights._fields if f not in ("head", "router_de"))


class Launch(NamedTuple):
    """Static launch choices: ``triton_megastep.megastep``'s keywords; None (and 0 for programs
    and splits) leaves its default. (This module imports without triton: ``generate`` checks
    the model before it looks for a GPU.)"""

    programs: int = 0
    splits: int = 0
    block_t: int | None = None
    warps: int | None = None
    tile_bytes: int | None = None
    gemv_stages: int | None = None
    unit_stages: int | None = None
    router_in_c: bool | None = None
    prefetch_kb: int | None = None
    prefetch_o_kb: int | None = None
    prefetch_keys: int | None = None
    unit_table: bool | None = None
    attn_stages: int | None = None
    merge_bc: bool | None = None
    parts: int | None = None
    prefetch_ao_kb: int | None = None
    prefetch_rb_kb: int | None = None
    router_in_items: bool | None = None
    ranked_select: bool | None = None
    head_in: bool | None = None
    head_stages: int | None = None
    qkv_cols: int | None = None
    o_cols: int | None = None
    bulk_prefetch: bool | None = None
    # The batched launch's expert phase (``triton_megastep_batch``): units a group, 1, 2, 4 or 8
    # (None: ``default_ffn_units``); the batch-1 launch has no such phase.
    ffn_units: int | None = None
    # The batched launch's A and C products: input columns a chunk (0: 128).
    skinny_bk: int | None = None
    # ... C's alone (None: as ``skinny_bk``). At 1B 256-column chunks made C 1.1-1.3 µs a layer
    # faster but A 2.1-2.2 slower (H100, forty-seventh session, stage s61a); not timed alone
    # yet (stage ``s63b``).
    skinny_bk_c: int | None = None
    # The batched launch's A and C products' token columns, 16 or 32 (None: 16; at 32 each of
    # the 8 warps' two warpgroups takes a wgmma m64n16 instead of m64n8;
    # ``triton_batch_plan.SKINNY_TP``; not timed yet, stages ``s63a``-``s63c``).
    skinny_tp: int | None = None
    # The batched launch's A, C and expert loops started at a chunk of each program's own
    # (``triton_batch_phases._staggered``; None: on).
    stagger: bool | None = None
    # The batched launch's A and C inputs staged once a phase into each program's scratch in the
    # weights' dtype, the norm applied there (``triton_batch_phases._stage_tokens``; None: off).
    skinny_stage: bool | None = None
    # The batched launch's A and C tiles padded to at least this many weight rows (0: 16; at
    # 64 Triton takes wgmma, the expert phase's instruction, instead of mma.sync; None: by the
    # shape, ``triton_batch_plan.default_skinny``: 64 at the 1B width, 16 at 8B).
    skinny_rows: int | None = None
    # ... C's tile (and the router share's) alone (None: as ``skinny_rows``). At 1B the 64-row
    # C tile was 2.5 µs a layer slower than its own 16 rows, while A's took 8.6 µs less
    # (BENCHMARKS.md, forty-third session); 0 here with A at 64 made the step 0.5-1.2% slower
    # (forty-sixth).
    skinny_rows_c: int | None = None
    # The batched launch's router share streamed through this many pipeline stages (1: a plain
    # loop of synchronous loads; None: ``triton_batch_plan.ROUTER_STAGES``, 3).
    router_stages: int | None = None
    # The batched launch's router share read from the routers' ``[L, d, E]`` copy
    # (``MegaWeights.router_de``, ``pack(router_de=True)``): each program's rows of d one
    # contiguous block, not E pieces of a few rows each. None: the copy wherever the packed
    # weights carry it (``generate`` packs it for 2+ sequences); False: the ``[L, E, d]``
    # routers. On an H100 the copy made the step 0.8-2.7% faster at 1B and 8B with 4 and 16
    # sequences (BENCHMARKS.md, forty-seventh session).
    router_de: bool | None = None
    # The batched launch's copies of the router logits (program p adds into copy
    # (p + layer) % n, the selection sums them): n times fewer programs queueing at each
    # address's atomics (None: ``triton_batch_plan.ROUTER_COPIES``, 1; not timed yet,
    # stage ``s63a``).
    router_copies: int | None = None
    # Diagnostic: the timeline's %globaltimer stamps compiled in, their output discarded (1), or
    # only their clock reads (2: the stores predicated off), to time what the stamps themselves
    # change in the step (BENCHMARKS.md, thirty-sixth session).
    stamps: int | None = None


def check(model: nnx.Module, batch: int = 1) -> PrunePathFFN:
    """Raises ValueError unless the one-launch step computes this model for ``batch``
    sequences; returns an FFN (every layer's routing settings are the same config)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or cfg.family != "llama":
        raise ValueError("the one-launch decode step takes Llama-family models only")
    if cfg.prunepath is None:
        raise ValueError("the one-launch decode step needs a PrunePath model (routed FFNs)")
    if cfg.qkv_bias or cfg.o_bias or cfg.sliding_window is not None:
        raise ValueError(
            "the one-launch decode step has no attention biases (Qwen2) nor sliding window "
            f"(Mistral); got qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}, "
            f"sliding_window={cfg.sliding_window}"
        )
    ffn = model.layers[0].mlp
    if not ffn.gated or ffn.b_in is not None:
        raise ValueError("the one-launch decode step takes SwiGLU FFNs without biases")
    _check_batch(batch)
    try:
        from prunepath_jax.kernels import triton_batch_plan as bp
        from prunepath_jax.kernels.triton_megastep import unsupported_shape
    except ImportError:  # no triton here: generate's GPU check names what is missing
        return ffn
    shape = (cfg.d_model, cfg.head_dim, cfg.prunepath.group_size)
    if batch > 1:
        bp.check(batch, *shape)  # the batch-1 launch's limits and the batched one's
    elif why := unsupported_shape(*shape):
        raise ValueError(why)
    return ffn


def _check_batch(b: int) -> None:
    if not 1 <= b <= MAX_BATCH:
        raise ValueError(f"the one-launch decode step takes 1-{MAX_BATCH} sequences, got {b}")


# Sequences the batched launch takes (``triton_batch_plan.MAX_TOKENS``; here so that this
# module imports without triton).
MAX_BATCH = 16
# "auto" takes the one-launch step up to this KV-cache length: measured faster than the default
# kernels at 75% (µs a token) at 256 positions at every shape (twenty-second session), and, since
# long caches get pipelined 64-key attention blocks (``triton_megastep_plan.default_attention``),
# at 4352 positions (8B 2792 vs 3002; 1B 787 vs 946, separate runs) and at 32256 (8B 3829 vs
# 4050, 1B 1187 vs 1231): BENCHMARKS.md, twenty-ninth and thirtieth sessions. The margin shrinks
# with the cache (8B 7% at 4k, 5% at 32k); longer caches were not measured.
AUTO_MAX_CACHE = 32 * 1024
# ... and when its stacked copies (layer weights, KV cache) fit in this share of the free memory.
AUTO_MEMORY_SHARE = 0.5
# "auto" takes the batched launch (``kernels.triton_megastep_batch``) for 2-16 prompts with a
# cache of up to 4352 positions, where it measured ahead of the registry's per-layer kernels (75%,
# distinct sequences, µs a step, one process a shape; BENCHMARKS.md, forty-fifth session, H100):
# 1B at 64 positions, 2 / 4 / 8 / 16 sequences: 1158 / 1263 / 1403 / 1560 against the Triton
# kernels' 1196 / 1359 / 1558 / 1834 (dense 1152 / 1161 / 1184 / 1497); 8B at 4 / 16: 5200 / 6542
# against 5515 / 7255 (dense 5574 / 6151); at 4352 positions 1B 1495 / 2375 against 1741 / 3189
# and 8B 6093 / 9295 against 6814 / 12165 at 4 / 16 (1.08-1.16x dense from 8B at 4 and 1B at 16);
# the SmolLM2-135M shape (d 576) at 2 / 4 / 8 / 16: 854 / 886 / 928-933 / 1025 against the
# Triton kernels' 1190 / 1202 / 1154-1158 / 1425 and, at 8 / 16, the Pallas kernels' (the
# registry's default at that width) 1076 / 1347. On the H200 the 8B at 4 / 16 and the 1B at
# 4 / 16 agreed (fortieth to forty-third sessions). Longer caches were not measured.
AUTO_BATCH_MIN = 2
AUTO_MAX_CACHE_BATCH = 4352


def _layer_vars(b) -> tuple:
    """One layer's weights in ``MegaWeights`` order, as the model's variables (their shapes
    and dtypes are there for abstract models too)."""
    return (b.input_layernorm.weight, b.post_attention_layernorm.weight,
            b.self_attn.qkv_proj.kernel, b.self_attn.o_proj.kernel, b.mlp.router, b.mlp.w_in,
            b.mlp.w_out)  # fmt: skip


def packed_bytes(model: nnx.Module, cache_len: int, head: bool = False, batch: int = 1) -> int:
    """Bytes of ``pack``'s copy (the router in float32; ``head``: the LM head's transposed
    rows of an untied model; with ``batch`` > 1 the routers' ``[L, d, E]`` copy too, as
    ``generate`` packs it) plus the stacked KV cache of ``batch`` sequences; from shapes
    only, so an abstract model (``nnx.eval_shape``) plans its memory too."""
    cfg = model.cfg
    n = 0
    if head and not cfg.tie_embeddings:
        v = model.lm_head.kernel
        n += int(np.prod(v.shape)) * jnp.dtype(v.dtype).itemsize
    fields = [f for f in _LAYER_FIELDS if f != "router_o"]
    for b in model.layers:
        for name, v in zip(fields, _layer_vars(b), strict=True):
            dtype = jnp.float32 if name == "router" else v.dtype
            n += int(np.prod(v.shape)) * jnp.dtype(dtype).itemsize
        n += 4 * b.mlp.router.shape[-1] * cfg.n_heads * cfg.head_dim  # router_o
        if batch > 1:  # router_de
            n += 4 * int(np.prod(b.mlp.router.shape))
    item = jnp.dtype(model.embed_tokens.embedding.dtype).itemsize
    return n + 2 * batch * cfg.n_layers * cache_len * cfg.n_kv_heads * cfg.head_dim * item


def _free_bytes(leaves) -> int:
    """Free bytes on the device holding the weights (0 where it reports no figures)."""
    placed = [x for x in leaves if hasattr(x, "sharding")]
    dev = next(iter(placed[0].sharding.device_set)) if placed else jax.devices()[0]
    stats = dev.memory_stats() or {}
    return stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)


def auto_ok(
    model: nnx.Module, n_prompts: int, ffn_args, cache_len: int, cache_dtype=None
) -> str | None:
    """Why ``generate(..., implementation="auto")`` does not take the one-launch step, or None
    when it does: one prompt, or ``AUTO_BATCH_MIN``-``MAX_BATCH`` prompts (the batched
    launch), of a PrunePath Llama it computes, a budget, a GPU with jax-triton, bf16 or fp32
    weights and cache (``cache_dtype``: the embedding's when None; the dtypes it was measured
    and tested with), a cache of at most ``AUTO_MAX_CACHE`` positions (``AUTO_MAX_CACHE_BATCH``
    with several prompts), weights on one device, and its stacked copies within
    ``AUTO_MEMORY_SHARE`` of that device's free memory (it doubles the layer weights while it
    decodes; where the device reports no memory figures, it is not taken)."""
    if ffn_args is None:
        return "a budget tau"
    if n_prompts != 1 and not AUTO_BATCH_MIN <= n_prompts <= MAX_BATCH:
        return (
            f"one prompt or {AUTO_BATCH_MIN}-{MAX_BATCH} prompts (measured faster than the "
            f"default kernels there), got {n_prompts}"
        )
    if jax.default_backend() != "gpu":
        return "a GPU"
    try:
        check(model, n_prompts)
        from prunepath_jax.kernels import jt

        jt.jax_triton_module()
    except (ValueError, NotImplementedError) as err:
        return str(err)
    weights = jnp.dtype(model.embed_tokens.embedding.dtype)
    dtypes = {weights, jnp.dtype(cache_dtype or weights)}
    if not dtypes <= {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}:
        return f"bfloat16 or float32 weights and cache, got {sorted(map(str, dtypes))}"
    max_cache = AUTO_MAX_CACHE if n_prompts == 1 else AUTO_MAX_CACHE_BATCH
    if cache_len > max_cache:
        return (
            f"a KV cache of at most {max_cache} positions (measured) with {n_prompts} "
            f"prompt(s), got {cache_len}"
        )
    leaves = jax.tree.leaves(nnx.state(model))
    if any(len(x.sharding.device_set) > 1 for x in leaves if hasattr(x, "sharding")):
        return "weights on one device (the launch runs on one GPU; these are sharded)"
    free = _free_bytes(leaves)
    need = packed_bytes(model, cache_len, batch=n_prompts)
    if need > AUTO_MEMORY_SHARE * free:
        return f"{need / 2**30:.1f} GiB of stacked copies, {free / 2**30:.1f} GiB free"
    return None


def _router_o(router_de, ln2_d, o_nd) -> jax.Array:
    """``M = W_r·diag(ln2)·W_o`` ``[E, h·hd]`` in float32 from the model's ``[d, E]`` router,
    ``[d]`` norm weights and ``[h·hd, d]`` O kernel: the merged O phase's router share."""
    f32 = jnp.float32
    return jnp.einsum("de,d,nd->en", router_de.astype(f32), ln2_d.astype(f32), o_nd.astype(f32),
                      precision=jax.lax.Precision.HIGHEST)  # fmt: skip


@jax.jit
def _stacked(layers) -> MegaWeights:
    """One compiled program for the whole copy (eagerly it was ~7 dispatches a layer)."""
    ln1, ln2, wqkv, wo, router, w_in, w_out = zip(*layers, strict=True)
    f32 = jnp.float32
    return MegaWeights(
        ln1=jnp.stack(ln1),
        ln2=jnp.stack(ln2),
        wqkv=jnp.stack([w.T for w in wqkv]),
        wo=jnp.stack([w.T for w in wo]),
        router=jnp.stack([w.T.astype(f32) for w in router]),
        router_o=jnp.stack([_router_o(*rno) for rno in zip(router, ln2, wo, strict=True)]),
        w_in=jnp.stack(w_in),
        w_out=jnp.stack(w_out),
    )


def pack(model: nnx.Module, head: bool = False, router_de: bool = False) -> MegaWeights:
    """The kernel's copy of the layer weights (made once; see the module docstring), and the LM
    head's rows for ``Launch.head_in``: a tied model's embedding (no copy), an untied model's
    ``lm_head`` transposed only with ``head`` (a copy: 1 GB at 8B; the default step does not
    read it — ``head_in`` measured slower, BENCHMARKS.md, twenty-fifth session). ``router_de``:
    also the routers as ``[L, d, E]`` float32 (``MegaWeights.router_de``; 32 MB at 1B, 235 MB
    at 8B) for the batched launch's ``Launch(router_de=True)``."""
    check(model)
    mw = _stacked([tuple(v[...] for v in _layer_vars(b)) for b in model.layers])
    if router_de:  # the packed [L, E, d] float32 routers, back in the model's layout
        mw = mw._replace(router_de=jnp.swapaxes(mw.router, 1, 2))
    if model.cfg.tie_embeddings:
        return mw._replace(head=model.embed_tokens.embedding[...])
    return mw._replace(head=_transposed(model.lm_head.kernel[...])) if head else mw


@jax.jit
def _transposed(w):
    return w.T


def stack_cache(cache) -> tuple[jax.Array, jax.Array]:
    """Per-layer ``LayerCache``s -> stacked ``(k, v)``: ``[L, s, kv, hd]`` for batch 1 (the
    batch-1 kernel's layout), ``[L, b, s, kv, hd]`` for 2-16 sequences (the batched one's)."""
    b = cache[0].k.shape[0]
    _check_batch(b)
    return _stack_kv([(c.k, c.v) for c in cache], b == 1)


@functools.partial(jax.jit, static_argnums=1)
def _stack_kv(kv, squeeze: bool) -> tuple[jax.Array, jax.Array]:
    if squeeze:
        return jnp.stack([k[0] for k, _ in kv]), jnp.stack([v[0] for _, v in kv])
    return jnp.stack([k for k, _ in kv]), jnp.stack([v for _, v in kv])


DEFAULT_LAUNCH = Launch()


def step(model, mw: MegaWeights, token_1, pos_1, kc, vc, tau_l, launch: Launch = DEFAULT_LAUNCH,
         interpret: bool = False, timing: bool = False):  # fmt: skip
    """One token: ``(logits [1, vocab] f32, kc, vc, k_l [L] int32, fail_p [P] int32)``, plus
    each program's %globaltimer stamps ``[P, N_SLOTS · L + 1]`` with ``timing`` (GPU; the
    benchmark's per-phase breakdown). The launch reads the token's embedding row and computes
    RoPE itself; with ``head_in`` (``Launch``; default ``triton_megastep.HEAD_IN``) it also
    runs the final norm and the LM head, else XLA does (``model.head``). With batched caches
    ``[L, b, s, kv, hd]`` (``stack_cache`` of 2-16 sequences) it is ``step_batch``'s launch:
    one token a sequence, logits ``[b, vocab]``, ``k_l`` ``[L, b]``."""
    from prunepath_jax.kernels import triton_megastep as tm

    if kc.ndim == 5:  # [L, b, s, kv, hd]: the batched launch
        logits, kc, vc, k_lb, _, fail, *stamps = step_batch(
            model, mw, token_1, pos_1, kc, vc, tau_l, launch, interpret, timing
        )  # fmt: skip
        return (logits, kc, vc, k_lb, fail, *stamps)
    ffn = check(model)
    cfg = model.cfg
    opts = {k: v for k, v in launch._asdict().items() if v is not None}
    for name in BATCH_ONLY:
        if name in opts:
            raise ValueError(f"Launch.{name} is the batched launch's (2-16 sequences)")
    head_in = opts.pop("head_in", tm.HEAD_IN)
    stamped = opts.pop("stamps", 0)  # compiled in; returned only with timing
    if stamped not in (0, 1, 2):
        raise ValueError(f"Launch.stamps must be 0, 1 or 2, got {stamped!r}")
    if head_in and mw.head is None:
        raise ValueError("Launch(head_in=True) needs the head's rows: megastep.pack(head=True)")
    y, kc, vc, k_l, fail, *stamps = tm.megastep(
        model.embed_tokens.embedding[...], token_1, rope_inv_freq(cfg.head_dim, cfg.rope_theta,
        cfg.rope_scaling), pos_1, tau_l, *mw.layers(), kc, vc, eps=cfg.norm_eps,
        head_vd=mw.head, norm_d=model.norm.weight[...], head_in=head_in, rule=ffn.rule,
        gate=ffn.gate_mode, k_min=ffn.k_min, k_max=ffn.k_max, timing=1 if timing else stamped,
        interpret=interpret, **opts,
    )  # fmt: skip
    stamps = stamps if timing else []
    if head_in:
        return (y[None], kc, vc, k_l, fail, *stamps)
    x = y.astype(model.embed_tokens.embedding.dtype)[None, None]
    return (model.head(x)[:, 0], kc, vc, k_l, fail, *stamps)


# The launch choices only the batched kernel takes, and all it takes
# (``triton_megastep_batch.megastep_batch``'s).
BATCH_ONLY = ("ffn_units", "skinny_bk", "skinny_bk_c", "skinny_tp", "stagger", "skinny_stage",
              "skinny_rows", "skinny_rows_c", "router_stages", "router_de",
              "router_copies")  # fmt: skip
BATCH_LAUNCH = ("programs", "splits", "block_t", "warps", "attn_stages", "gemv_stages",
                "unit_stages", *BATCH_ONLY, "prefetch_kb", "prefetch_o_kb",
                "bulk_prefetch")  # fmt: skip


def step_batch(model, mw: MegaWeights, tokens_b, pos_b, kc, vc, tau_l,
               launch: Launch = DEFAULT_LAUNCH, interpret: bool = False,
               timing: bool = False):  # fmt: skip
    """One token of each of 2-16 sequences (``kernels.triton_megastep_batch``): ``(logits
    [b, vocab] f32, kc, vc, k_lb [L, b] int32, union_l [L] int32, fail_p [P] int32)``, plus
    each program's %globaltimer stamps with ``timing`` (GPU); the caches ``[L, b, s, kv, hd]``
    (``stack_cache``), ``union_l`` the experts any of the tokens selected, a layer (what bounds
    the batch's expert bytes)."""
    from prunepath_jax.kernels import triton_megastep_batch as tb

    ffn = check(model, kc.shape[1])
    cfg = model.cfg
    opts = {k: v for k, v in launch._asdict().items() if v is not None}
    other = sorted(set(opts) - set(BATCH_LAUNCH))
    if other:
        raise ValueError(
            f"the batched one-launch step takes only Launch({', '.join(BATCH_LAUNCH)}); got "
            f"{', '.join(other)}"
        )
    if opts.get("router_de") and mw.router_de is None:
        raise ValueError(
            "Launch(router_de=True) reads the routers' [L, d, E] copy: megastep.pack(model, "
            "router_de=True)"
        )
    opts.setdefault("router_de", mw.router_de is not None)  # None: the copy where packed
    router = mw.router_de if opts["router_de"] else mw.router
    y, kc, vc, k_lb, union_l, fail, *stamps = tb.megastep_batch(
        model.embed_tokens.embedding[...], tokens_b, rope_inv_freq(cfg.head_dim, cfg.rope_theta,
        cfg.rope_scaling), pos_b, tau_l, mw.ln1, mw.ln2, mw.wqkv, mw.wo, router, mw.w_in,
        mw.w_out, kc, vc, eps=cfg.norm_eps, rule=ffn.rule, gate=ffn.gate_mode, k_min=ffn.k_min,
        k_max=ffn.k_max, timing=int(timing), interpret=interpret, **opts,
    )  # fmt: skip
    x = y.astype(model.embed_tokens.embedding.dtype)[:, None]
    return (model.head(x)[:, 0], kc, vc, k_lb, union_l, fail, *stamps)


class MegaState(NamedTuple):
    """Decode state between chunks; ``fail`` counts barrier give-ups (must stay 0)."""

    token_b: jax.Array  # [b]
    pos_b: jax.Array  # [b]
    done_b: jax.Array  # [b]
    kc: jax.Array
    vc: jax.Array
    rng: jax.Array
    fail: jax.Array  # [] int32


def _decode_chunk_impl(graphdef, state, mw, st: MegaState, temperature, top_p, stop_ids,
                       pad_id, tau_l, *, n_steps: int, greedy: bool, launch: Launch):  # fmt: skip
    from prunepath_jax.generate import next_tokens

    model = nnx.merge(graphdef, state)

    def body(i, carry):
        st, out_bn = carry
        logits, kc, vc, _, fail = step(model, mw, st.token_b, st.pos_b, st.kc, st.vc, tau_l,
                                       launch)  # fmt: skip
        nxt, done, rng = next_tokens(logits, st, temperature, top_p, stop_ids, pad_id, greedy)
        st = MegaState(nxt, st.pos_b + 1, done, kc, vc, rng, st.fail + jnp.sum(fail))
        return st, out_bn.at[:, i].set(nxt)

    out_bn = jnp.zeros((st.token_b.shape[0], n_steps), jnp.int32)
    return jax.lax.fori_loop(0, n_steps, body, (st, out_bn))


_STATIC = ("graphdef", "n_steps", "greedy", "launch")
decode_chunk = jax.jit(_decode_chunk_impl, static_argnames=_STATIC, donate_argnums=(3,))


def bind_decode_chunk(graphdef, state, *, n_steps: int, greedy: bool,
                      launch: Launch = DEFAULT_LAUNCH, donate: bool = True):  # fmt: skip
    """``generate``'s compiled one-launch decode chunk (``flatjit.bind``): ``(fn, leaves)``,
    ``fn(leaves, mw, st, temperature, top_p, stop_ids, pad_id, tau_l) -> (st, tokens
    [b, n_steps])``, the ``MegaState`` donated with ``donate``."""
    return flatjit.bind(_decode_chunk_impl, graphdef, state, donate_argnums=(2,) if donate else (),
                        n_steps=n_steps, greedy=greedy, launch=launch)  # fmt: skip


def check_fail(st: MegaState) -> None:
    """Raises if any program gave up on a grid barrier (the tokens since are not to be trusted:
    the grid did not fit on the GPU at once)."""
    n = int(np.asarray(st.fail))
    if n:
        raise RuntimeError(
            f"{n} program(s) of the one-launch decode step gave up waiting at a grid barrier: "
            "the grid was not co-resident; use fewer programs (Launch(programs=...))"
        )


def from_decode_state(st) -> MegaState:
    """A prefill's ``generate.DecodeState`` (1-16 sequences) as a ``MegaState``."""
    kc, vc = stack_cache(st.cache)
    return MegaState(st.token_b, st.pos_b, st.done_b, kc, vc, st.rng, jnp.int32(0))
