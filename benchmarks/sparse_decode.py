"""End-to-end sparse decode: µs per generated token, PrunePath kernels vs our dense decode.

Random weights at real model shapes (no real weights of these sizes are on the GPU machine).
The target k per layer goes through the real routing path: random routers and
``k_min = k_max = k`` at tau = 1.0 (`kernels.synthetic.sparse_llama`), so every token of every
layer uses exactly k of E experts (FFN sparsity 1 - k/E). Decode runs the production loop
(`generate.decode_chunk`: ``steps`` tokens per compiled call, KV cache of ``ctx`` positions, the
whole step one program) from a cache filled to ``prompt_len`` positions (zeros: attention reads
the same bytes whatever they hold), timed over ``chunks`` calls after a warm-up.

Also: the union-of-experts fraction that bounds batched speedups (random hidden states through
layer 0's router), launches per decode step (custom calls and fusions in the compiled step),
and the compiled step's device memory (arguments + temporaries) sparse vs dense.

    python benchmarks/sparse_decode.py --shapes llama-3.2-1b llama-3-8b
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    apply_proj_tuning,
    copy_bandwidth,
    header,
    markdown_table,
    row_emitter,
)

from prunepath_jax import routing  # noqa: E402
from prunepath_jax.config import PRESETS  # noqa: E402
from prunepath_jax.generate import (  # noqa: E402
    _STATIC,
    DecodeState,
    _decode_chunk_impl,
    bind_decode_chunk,
)
from prunepath_jax.kernels.synthetic import sparse_llama  # noqa: E402
from prunepath_jax.models import decode_attention as da  # noqa: E402
from prunepath_jax.models.decode_proj import set_projections  # noqa: E402
from prunepath_jax.models.layers import init_cache  # noqa: E402
from prunepath_jax.models.llama import LlamaModel  # noqa: E402
from prunepath_jax.nn import PrunePathFFN, route_args, set_compute  # noqa: E402

# The production decode loop compiled without XLA's command buffers (CUDA graphs), to measure
# what they cost or save by cache length (`--command-buffers on off`; BENCHMARKS.md, issue 5:
# e2e they never lost on the 8B shape, 4k-32k caches, so generation keeps them).
decode_chunk_plain = jax.jit(
    _decode_chunk_impl,
    static_argnames=_STATIC,
    donate_argnums=(2,),
    compiler_options={"xla_gpu_enable_command_buffer": ""},
)

PEERS = "paper 1.046x (GPT-2 Medium, b1); TEAL 1.53x @40% / 1.8x @50% model-wide (7B, b1, fp16)"


def decode_cache_len(prompt_len: int, steps: int, chunks: int) -> int:
    """KV-cache positions for a timed decode loop (warm-up included), in the attention
    kernel's 256-position tiles."""
    return -(-(prompt_len + steps * (chunks + 3) + 1) // 256) * 256


def fresh_decode_state(cfg, batch: int, prompt_len: int, ctx: int) -> DecodeState:
    """A timed decode loop's start: tokens 1, 2, ... at ``prompt_len`` for ``batch`` sequences,
    an empty bf16 cache of ``ctx`` positions. Distinct tokens: with one token for all (before
    the thirty-ninth session) every sequence was the same sequence, routed to the same experts,
    so the batched sparse rows were timed at a union of k / E, not the ``union_frac`` beside
    them."""
    return DecodeState(
        token_b=(1 + jnp.arange(batch, dtype=jnp.int32)) % cfg.vocab_size,
        pos_b=jnp.full((batch,), prompt_len, jnp.int32),
        done_b=jnp.zeros((batch,), bool),
        cache=init_cache(cfg, batch, ctx, jnp.bfloat16),
        rng=jax.random.key(0),
    )


def greedy_chunk_args(ffn_args) -> tuple:
    """The decode chunk's arguments after the state for greedy decoding: temperature, top-p, no
    stop ids, pad id, ``ffn_args``."""
    return jnp.float32(0), jnp.float32(1), jnp.zeros((0,), jnp.int32), jnp.int32(0), ffn_args


def time_decode(
    model, batch, prompt_len, steps, chunks, ffn_args, attn=None, command_buffers=True
) -> dict:
    """µs per decode step of ``model``; ``attn`` (an ``--attn`` value) sets its decode attention
    for this cache length and batch first, None keeps the model's own; ``command_buffers=False``
    times the loop compiled without XLA's command buffers (``decode_chunk_plain``)."""
    cfg = model.cfg
    ctx = decode_cache_len(prompt_len, steps, chunks)
    if attn is not None:
        da.set_attention(model, da.impl_for(attn, model, ctx, batch))
    attn_used = da.attention_modules(model)[0].attn_impl
    graphdef, state = nnx.split(model)
    st = fresh_decode_state(cfg, batch, prompt_len, ctx)
    args = greedy_chunk_args(ffn_args)
    kw = dict(n_steps=steps, greedy=True)
    if command_buffers:  # generate's call: the graph hashed once, the state a flat list
        fn, leaves = bind_decode_chunk(graphdef, state, **kw)
        step_fn = lambda st: fn(leaves, st, *args)  # noqa: E731
        compiled = fn.lower(leaves, st, *args).compile()
    else:
        step_fn = lambda st: decode_chunk_plain(graphdef, state, st, *args, **kw)  # noqa: E731
        compiled = decode_chunk_plain.lower(graphdef, state, st, *args, **kw).compile()
    txt = compiled.as_text()
    mem = compiled.memory_analysis()
    for _ in range(2):
        st, _ = step_fn(st)
    jax.block_until_ready(st)
    t0 = time.perf_counter()
    for _ in range(chunks):
        st, _ = step_fn(st)
    jax.block_until_ready(st)
    dt = (time.perf_counter() - t0) / (chunks * steps)
    return {
        "attention": attn_used,
        "command_buffers": command_buffers,
        "us_per_step": dt * 1e6,
        "custom_calls_per_layer": txt.count(" custom-call(") / cfg.n_layers,
        "fusions_per_step": txt.count(" fusion("),
        "args_MB": getattr(mem, "argument_size_in_bytes", 0) / 1e6,
        "temp_MB": getattr(mem, "temp_size_in_bytes", 0) / 1e6,
    }


def union_fraction(model, batch, k, draws=20) -> float:
    ffn = next(m for _, m in nnx.iter_graph(model) if isinstance(m, PrunePathFFN))
    d, e = ffn.router.shape
    fr = []
    for i in range(draws):
        x = jax.random.normal(jax.random.key(i), (batch, d), jnp.float32)
        sel = routing.select(routing.router_logits(ffn.router[...], x), 1.0, k_min=k, k_max=k)
        fr.append(float(jnp.mean(jnp.any(sel.mask_te, axis=0))))
    return float(np.mean(fr))


def pick_logits(emit, n_layers=8) -> str:
    """Per-layer cost of two router-logit forms (8B layer shape, batch 1): the split-K Triton
    kernel and XLA's dot; the winner becomes the default of this run.

    Also the XLA router GEMV alone, to split the fixed per-layer cost."""
    from common import time_fn
    from ffn_kernels import chain_fn, make_layers

    from prunepath_jax.kernels import triton_decode

    layers = make_layers(n_layers, 4096, 14336, 448, jnp.bfloat16, seed=3)
    x = jax.random.normal(jax.random.key(0), (1, 4096), jnp.float32).astype(jnp.bfloat16)
    best = {}
    for how in ("triton", "dot"):
        lg = jax.jit(
            lambda x, ls, how=how: sum(
                jnp.sum(triton_decode.router_logits(r, x, how)) for r, _, _ in ls
            )
        )
        t_lg = time_fn(lg, x, layers, warmup=3, iters=20) / n_layers
        emit({"bench": "breakdown", "impl": f"logits_only_{how}", "batch": 1, "us": t_lg * 1e6})
        triton_decode.DEFAULT_TUNING["logits"] = how
        for k in (1, 112):
            t = time_fn(chain_fn("triton", 32, k), x, layers, warmup=3, iters=20) / n_layers
            emit({"bench": "breakdown", "impl": f"triton_layer_logits_{how}", "batch": 1, "k": k,
                  "us": t * 1e6})  # fmt: skip
            best.setdefault(how, 0.0)
            best[how] += t
    how = min(best, key=best.get)
    triton_decode.DEFAULT_TUNING["logits"] = how
    return how


def long_context(a, impl, emit) -> None:
    """Batch-1 decode from long caches: XLA attention vs the Pallas split-K kernel
    (`models.decode_attention`), dense and sparse, on the last shape."""
    shape = a.shapes[-1]
    cfg = PRESETS[shape]
    dense = LlamaModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    models = [("dense", dense, None)]
    e = k = 1
    if a.long_ctx_sparse:
        sparse = sparse_llama(cfg, 1, dtype=jnp.bfloat16)
        e = sparse.cfg.n_experts
        k = max(1, round((1 - a.all_impl_sparsity) * e))
        set_k(sparse, k)
        set_compute(sparse, "kernel", impl)
        models.append((impl, sparse, route_args(sparse.cfg, 1.0)))
    for ctx in a.long_ctx:
        base = {}
        for (name, model, ffn_args), attn, cb in itertools.product(
            models, ("xla", "pallas"), [m == "on" for m in a.command_buffers]
        ):
            da.set_attention(model, attn)
            r = time_decode(model, 1, ctx, a.steps, a.chunks, ffn_args, command_buffers=cb)
            base.setdefault("dense_xla", r["us_per_step"])
            emit({"bench": "long_ctx", "shape": shape, "impl": name, "batch": 1, "ctx": ctx,
                  "attention": attn, "sparsity": 0.0 if ffn_args is None else 1 - k / e,
                  "speedup_vs_dense": base["dense_xla"] / r["us_per_step"], **r})  # fmt: skip
    del dense, models


def time_variants(model, shape, variants, a, args, dense_us, e, k, emit) -> None:
    """The decode layer under other tunings (``TUNING_OVERRIDES`` of ``pallas_decode``, or of
    ``triton_decode`` for a variant with ``"impl": "triton"``), batch 1. The jit caches are
    cleared around each one: the layer's plan is fixed at trace time."""
    from prunepath_jax.kernels import pallas_decode, triton_decode

    mods = {"pallas": pallas_decode, "triton": triton_decode}
    saved = {impl: dict(m.TUNING_OVERRIDES) for impl, m in mods.items()}
    for label, (impl, over) in variants.items():
        set_compute(model, "kernel", impl)
        mods[impl].TUNING_OVERRIDES.clear()
        mods[impl].TUNING_OVERRIDES.update({**saved[impl], **over})
        jax.clear_caches()
        r = time_decode(model, 1, a.prompt_len, a.steps, a.chunks, args, a.attn)
        emit({"shape": shape, "impl": f"{impl}[{label}]", "batch": 1, "sparsity": 1 - k / e,
              "k": k, "E": e, "variant": over,
              "speedup_vs_dense": dense_us / r["us_per_step"], **r})  # fmt: skip
        mods[impl].TUNING_OVERRIDES.clear()
        mods[impl].TUNING_OVERRIDES.update(saved[impl])
    jax.clear_caches()


def set_k(model, k):
    for _, m in nnx.iter_graph(model):
        if isinstance(m, PrunePathFFN):
            m.k_min = m.k_max = k


def _tuning_file(path: str) -> dict:
    """The JSON tuning a sweep wrote (``--best-out``), or ``{}`` (the defaults) with a warning when
    the file is missing: a GPU stage runs the end-to-end study even if its sweep failed."""
    if not Path(path).exists():
        print(f"warning: tuning file {path} not found; timing the defaults", file=sys.stderr)
        return {}
    return json.loads(Path(path).read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["llama-3.2-1b", "llama-3-8b"])
    ap.add_argument("--sparsities", nargs="*", type=float, default=[0.5, 0.75, 0.9])
    ap.add_argument("--impls", nargs="+", default=["triton", "pallas"])
    ap.add_argument(
        "--all-impl-sparsity",
        type=float,
        default=0.75,
        help="sparsity at which every impl runs (others: the first impl only)",
    )
    ap.add_argument(
        "--batches",
        nargs="*",
        type=int,
        default=[4, 8, 16],
        help="batched study (first impl, --all-impl-sparsity) on the last shape",
    )
    ap.add_argument("--batch-shape", default="llama-3-8b")
    ap.add_argument(
        "--batch-all-impls",
        action="store_true",
        help="the batched study for every impl, not only the first (registry defaults by batch)",
    )
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument(
        "--pick-logits",
        action="store_true",
        help="time both router-logit forms first and use the faster",
    )
    ap.add_argument("--out", default="results/sparse_decode.jsonl")
    ap.add_argument(
        "--long-ctx",
        type=int,
        nargs="*",
        default=[],
        help="also decode the last shape from caches of these lengths with XLA vs the Pallas "
        "split-K attention (dense, and sparse at --all-impl-sparsity with the first impl)",
    )
    ap.add_argument(
        "--long-ctx-sparse",
        type=int,
        default=1,
        help="0: the long-context study times the dense model only",
    )
    ap.add_argument(
        "--command-buffers",
        nargs="+",
        default=["on"],
        choices=["on", "off"],
        help="long-context study: with and/or without XLA's command buffers, side by side",
    )
    ap.add_argument(
        "--pallas-tuning",
        help="JSON {batch: tuning} for the Pallas decode layer (e.g. pallas_decode.py --best-out)",
    )
    ap.add_argument(
        "--variants",
        default="{}",
        help="JSON {label: {batch: tuning}}: also time the Pallas layer (or the Triton one, with "
        '"impl": "triton") with these tunings (batch 1, every sparsity), side by side with the '
        "default in the same run, e.g. "
        '\'{"xla_glue": {"1": {"glue": "xla"}}, "tri_blocks": {"impl": "triton", '
        '"1": {"experts": "blocks"}}}\'',
    )
    ap.add_argument(
        "--projs",
        nargs="+",
        default=["xla"],
        choices=["xla", "pallas"],
        help="attention projections of every model timed (models.decode_proj), each in turn",
    )
    ap.add_argument(
        "--proj-tuning", help='JSON file of pallas_proj tuning overrides (+ "w_layout")'
    )
    ap.add_argument(
        "--attn",
        default="auto",
        choices=["xla", "pallas", "pallas_plain", "auto"],
        help="decode attention of every model timed (auto: `decode_attention.impl_for`'s rule)",
    )
    a = ap.parse_args()
    head = {**header(), "peers": PEERS, "attn": a.attn}
    variants = {
        lab: (v.get("impl", "pallas"), {int(b): t for b, t in v.items() if b != "impl"})
        for lab, v in json.loads(a.variants).items()
    }
    if a.pallas_tuning:
        from prunepath_jax.kernels import pallas_decode

        over = {int(b): tun for b, tun in _tuning_file(a.pallas_tuning).items()}
        pallas_decode.TUNING_OVERRIDES.update(over)
        head["pallas_tuning"] = over
    layout = "nd"
    if a.proj_tuning:
        tn = _tuning_file(a.proj_tuning)
        layout = apply_proj_tuning(tn)
        head["proj_tuning"] = {**tn, "w_layout": layout}
    impls = [i for i in a.impls if i != "pallas" or
             importlib.util.find_spec("prunepath_jax.kernels.pallas_decode")]  # fmt: skip
    bws = copy_bandwidth(2 << 30)
    bw = max(bws.values())
    print({k: f"{v / 1e12:.2f} TB/s" for k, v in bws.items()}, flush=True)
    rows, emit = row_emitter(head, a.out, copy_TB_s=bw / 1e12)

    if a.pick_logits and jax.default_backend() == "gpu":
        head["logits"] = pick_logits(emit)

    for shape, proj in itertools.product(a.shapes, a.projs):
        head["proj"] = proj
        cfg = PRESETS[shape]
        batches = [1] + (a.batches if shape == a.batch_shape else [])
        dense = LlamaModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        set_projections(dense, proj, layout=layout)
        dense_us = {}
        for b in batches:
            r = time_decode(dense, b, a.prompt_len, a.steps, a.chunks, None, a.attn)
            dense_us[b] = r["us_per_step"]
            emit({"shape": shape, "impl": "dense", "batch": b, "sparsity": 0.0, **r})
        del dense
        if not a.sparsities:
            continue
        sparse = sparse_llama(cfg, 1, dtype=jnp.bfloat16)
        set_projections(sparse, proj, layout=layout)
        e = sparse.cfg.n_experts
        args = route_args(sparse.cfg, 1.0)
        for s in a.sparsities:
            k = max(1, round((1 - s) * e))
            set_k(sparse, k)
            for impl in impls:
                if impl != impls[0] and abs(s - a.all_impl_sparsity) > 1e-6:
                    continue
                first = impl == impls[0] or a.batch_all_impls
                bs = batches if (first and abs(s - a.all_impl_sparsity) < 1e-6) else [1]
                set_compute(sparse, "kernel", impl)
                for b in bs:
                    try:
                        r = time_decode(sparse, b, a.prompt_len, a.steps, a.chunks, args, a.attn)
                    except Exception as err:
                        print(f"{shape} {impl} s{s} b{b}: {type(err).__name__}: {err}"[:400])
                        continue
                    emit({"shape": shape, "impl": impl, "batch": b, "sparsity": 1 - k / e,
                          "k": k, "E": e, "union_frac": union_fraction(sparse, b, k),
                          "speedup_vs_dense": dense_us[b] / r["us_per_step"], **r})  # fmt: skip
            if variants:  # every sparsity: tunings can flip with k
                time_variants(sparse, shape, variants, a, args, dense_us[1], e, k, emit)
        del sparse
    if a.long_ctx:
        long_context(a, impls[0], emit)
    cols = ["bench", "shape", "impl", "batch", "k", "us", "sparsity", "ctx", "attention",
            "union_frac", "us_per_step", "speedup_vs_dense", "custom_calls_per_layer",
            "fusions_per_step", "args_MB", "temp_MB"]  # fmt: skip
    print(f"\n{head['date']} commit {head['commit']} on {head['device']}; copy "
          f"{bw / 1e12:.2f} TB/s; peers: {PEERS}")  # fmt: skip
    print(markdown_table(rows, cols))


if __name__ == "__main__":
    main()
