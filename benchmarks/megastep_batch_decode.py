"""Batched decode (2-16 sequences) with every layer in one Triton launch
(``kernels.triton_megastep_batch`` through ``prunepath_jax.megastep``) vs the registry's default
for 2-16 tokens (the Triton kernels, launches a layer) and our dense decode, in one process.

Random weights at real shapes, exactly k experts per token (``kernels.synthetic.sparse_llama``),
``sparse_decode.py``'s loop shape: ``steps`` tokens per compiled call from a cache at
``prompt_len`` positions, the mean over ``chunks`` calls after a warm-up. The sequences start
from distinct tokens, so they route apart; the union of experts the launch actually read is
its own count (``step_batch``'s ``union_l``, mean over layers and the check's steps). Before
timing, a teacher-forced check against the model's own decode step (the Triton kernels): logits,
greedy tokens and every token's k per layer, ``check_steps`` steps from the same cache. And
each of the launch's five phases' µs a layer from its programs' %globaltimer stamps.

    python benchmarks/megastep_batch_decode.py --shapes llama-3.2-1b llama-3-8b --batches 2 4 8 16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from common import copy_bandwidth, header, markdown_table, row_emitter  # noqa: E402
from megastep_decode import mega_state, mega_timer, phase_stats  # noqa: E402
from sparse_decode import decode_cache_len, set_k, time_decode  # noqa: E402

from prunepath_jax import megastep  # noqa: E402
from prunepath_jax.config import PRESETS  # noqa: E402
from prunepath_jax.kernels.synthetic import sparse_llama  # noqa: E402
from prunepath_jax.models.layers import init_cache  # noqa: E402
from prunepath_jax.models.llama import LlamaModel  # noqa: E402
from prunepath_jax.nn import route_args, set_compute  # noqa: E402


def timeline(t_ps: np.ndarray, n_layers: int) -> dict:
    """Per-phase µs a layer from every program's stamps ``[P, 1 + N_SLOTS·L]`` (ns; each
    phase's start and end a layer, ``triton_megastep_batch.PHASES``), as
    ``megastep_decode.phase_stats`` reads a timeline."""
    from prunepath_jax.kernels.triton_megastep_batch import N_SLOTS, PHASES

    s = t_ps[:, 1:].reshape(t_ps.shape[0], n_layers, N_SLOTS).astype(np.float64) / 1e3  # µs
    out = phase_stats(s[:, :, 0::2], s[:, :, 1::2], t_ps[:, 0].min() / 1e3, PHASES)
    out["layers_us"] = round(out["layers_us"], 2)
    return out


def phase_times(model, mw, tau_l, batch, prompt_len, ctx, launch) -> dict:
    """``timeline`` of one stamped step (the last of three calls: warm caches, as in decode)."""
    st = mega_state(model, prompt_len, ctx, batch=batch)
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, mw, kc):
        return megastep.step_batch(nnx.merge(graphdef, state), mw, st.token_b, st.pos_b, kc, kc,
                                   tau_l, launch, timing=True)[-1]  # fmt: skip

    for _ in range(3):
        t = np.asarray(f(state, mw, st.kc)).astype(np.int64)
    return timeline(t, model.cfg.n_layers)


def check(model, mw, ffn_args, tau_l, batch, prompt_len, n_steps, launch) -> dict:
    """Teacher-forced parity with the model's own step from the same prefilled cache (each
    sequence its own random prompt), and the union of experts the launch read."""
    if n_steps < 1:  # no check (long caches: the XLA prefill of b · prompt_len tokens)
        return {"check_steps": 0}
    cfg = model.cfg
    ctx = decode_cache_len(prompt_len, n_steps, 1)
    rng = np.random.default_rng(0)
    toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, prompt_len)), jnp.int32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, toks, cache):
        return nnx.merge(graphdef, state)(toks, cache=cache, ffn_args=ffn_args,
                                          fresh_cache=True).cache  # fmt: skip

    @jax.jit
    def ref_step(state, tok_b, pos_b, cache):
        out = nnx.merge(graphdef, state)(tok_b[:, None], pos_b[:, None], cache=cache,
                                         ffn_args=ffn_args)  # fmt: skip
        return out.logits[:, 0], out.cache, jnp.stack([s.k_t.reshape(-1) for s in out.ffn_stats])

    @jax.jit
    def mega_step(state, mw, tok_b, pos_b, kc, vc):
        return megastep.step_batch(nnx.merge(graphdef, state), mw, tok_b, pos_b, kc, vc, tau_l,
                                   launch)  # fmt: skip

    cache = prefill(state, toks, init_cache(cfg, batch, ctx, jnp.bfloat16))
    kc, vc = megastep.stack_cache(cache)
    tok = toks[:, -1]
    errs, agree, k_same, fails, unions = [], 0, 0, 0, []
    for i in range(n_steps):
        pos = jnp.full((batch,), prompt_len + i, jnp.int32)
        want, cache, k_ref = ref_step(state, tok, pos, cache)
        got, kc, vc, k_lb, union_l, fail = mega_step(state, mw, tok, pos, kc, vc)
        want, got = np.asarray(want, np.float32), np.asarray(got, np.float32)
        errs.append(float(np.abs(got - want).max() / max(1.0, np.abs(want).max())))
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        k_same += int(np.array_equal(np.asarray(k_lb), np.asarray(k_ref)))
        fails += int(np.asarray(fail).sum())
        unions.append(np.asarray(union_l).mean() / cfg.n_experts)
        tok = jnp.asarray(want.argmax(-1), jnp.int32)
    return {"check_steps": n_steps, "max_rel_logit_err": max(errs),
            "argmax_agree": f"{agree}/{n_steps * batch}", "k_equal_steps": k_same,
            "check_barrier_failures": fails,
            "union_frac": float(np.mean(unions))}  # fmt: skip


# Per-layer registry rows (`--ffn-impls`): name -> (implementation, Pallas tuning).
REGISTRY_ROWS = {
    "xla": ("xla", {}),
    "pallas": ("pallas", {}),
    "pallas_dense": ("pallas", {"experts": "dense"}),
}


def time_registry_row(model, name, batch, a, ffn_args) -> dict:
    """``time_decode`` with every FFN layer on one registry backend (and Pallas tuning, applied
    through ``pallas_plan.TUNING_OVERRIDES`` with the jitted layer's cache cleared, since the
    plan is read at trace time); the model is set back to the Triton kernels after."""
    from prunepath_jax.kernels import pallas_plan

    impl, tuning = REGISTRY_ROWS[name]
    set_compute(model, "kernel", impl)
    pallas_plan.TUNING_OVERRIDES[batch] = dict(tuning)
    jax.clear_caches()
    try:
        return time_decode(model, batch, a.prompt_len, a.steps, a.chunks, ffn_args, "auto")
    finally:
        pallas_plan.TUNING_OVERRIDES.pop(batch, None)
        jax.clear_caches()
        set_compute(model, "kernel", "triton")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["llama-3.2-1b", "llama-3-8b"])
    ap.add_argument("--batches", nargs="+", type=int, default=[2, 4, 8, 16])
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--check-steps", type=int, default=4)
    ap.add_argument(
        "--launches",
        default='{"default": {}}',
        help='JSON {label: Launch fields}, each checked and timed, e.g. {"w4": {"warps": 4}}',
    )
    ap.add_argument("--no-default", action="store_true", help="skip the Triton kernels' rows")
    ap.add_argument(
        "--ffn-impls",
        nargs="*",
        default=[],
        choices=sorted(REGISTRY_ROWS),
        help="more per-layer registry rows beside the Triton kernels' (e.g. pallas_dense: the "
        "Pallas selection kernel's gates into XLA's dense matmuls)",
    )
    ap.add_argument("--out", default="results/megastep_batch_decode.jsonl")
    a = ap.parse_args()
    head = {**header(), "bench": "megastep_batch_decode"}
    bw = max(copy_bandwidth(2 << 30).values())
    launches = {k: megastep.Launch(**v) for k, v in json.loads(a.launches).items()}
    rows, emit = row_emitter(head, a.out, copy_TB_s=bw / 1e12)

    for shape in a.shapes:
        cfg = PRESETS[shape]
        dense = {}
        model = LlamaModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        for b in a.batches:
            dense[b] = time_decode(model, b, a.prompt_len, a.steps, a.chunks, None, "auto")
            emit({"shape": shape, "impl": "dense", "batch": b, "sparsity": 0.0,
                  "us_per_step": dense[b]["us_per_step"]})  # fmt: skip
        del model
        sparse = sparse_llama(cfg, 1, dtype=jnp.bfloat16)
        e = sparse.cfg.n_experts
        k = max(1, round((1 - a.sparsity) * e))
        set_k(sparse, k)
        args = route_args(sparse.cfg, 1.0)
        tau_l = jnp.stack([x.tau for x in args])
        set_compute(sparse, "kernel", "triton")
        mw = megastep.pack(sparse, router_de=True)  # as generate packs it (2+ sequences)
        for b in a.batches:
            base = {"shape": shape, "batch": b, "sparsity": 1 - k / e, "k": k, "E": e}
            for label, launch in launches.items():
                try:
                    chk = check(sparse, mw, args, tau_l, b, a.prompt_len, a.check_steps, launch)
                    us, fails = mega_timer(sparse, mw, tau_l, a.prompt_len, a.steps, a.chunks,
                                           launch, batch=b)()  # fmt: skip
                    r = {"us_per_step": us, "barrier_failures": fails}
                    ctx = decode_cache_len(a.prompt_len, a.steps, a.chunks)
                    tl_ = phase_times(sparse, mw, tau_l, b, a.prompt_len, ctx, launch)
                    speedup = dense[b]["us_per_step"] / us
                    emit({**base, "impl": f"megastep_batch_{label}", "launch": launch._asdict(),
                          **chk, **r, **tl_, "speedup_vs_dense": speedup})  # fmt: skip
                except Exception as err:  # report and go on
                    print(f"{shape} b{b} {label}: {type(err).__name__}: {err}"[:800], flush=True)
            if not a.no_default:
                r = time_decode(sparse, b, a.prompt_len, a.steps, a.chunks, args, "auto")
                emit({**base, "impl": "triton_default", "us_per_step": r["us_per_step"],
                      "speedup_vs_dense": dense[b]["us_per_step"] / r["us_per_step"]})  # fmt: skip
            for name in a.ffn_impls:
                try:
                    r = time_registry_row(sparse, name, b, a, args)
                    us = r["us_per_step"]
                    emit({**base, "impl": name, "us_per_step": us,
                          "speedup_vs_dense": dense[b]["us_per_step"] / us})  # fmt: skip
                except Exception as err:  # report and go on
                    print(f"{shape} b{b} {name}: {type(err).__name__}: {err}"[:800], flush=True)
        del sparse, mw
    cols = ["shape", "impl", "batch", "union_frac", "us_per_step", "speedup_vs_dense",
            "max_rel_logit_err", "argmax_agree", "k_equal_steps", "barrier_failures"]  # fmt: skip
    print(
        f"\n{head['date']} commit {head['commit']} on {head['device']}; copy {bw / 1e12:.2f} TB/s"
    )
    print(markdown_table(rows, cols))


if __name__ == "__main__":
    main()
