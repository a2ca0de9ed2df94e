"""Batch-1 decode with every layer in one Triton launch (``prunepath_jax.megastep``) vs our
default sparse decode (the Pallas kernels, ~10 launches a layer) and our dense decode
(``generate(..., implementation="auto")``'s: the decode attention kernel where it measured
faster; the model's own XLA attention is timed beside it, ``dense_xla_attention``).

Random weights at real shapes, exactly k experts per token (``kernels.synthetic.sparse_llama``),
the same loop shape as ``sparse_decode.py`` (``steps`` tokens per compiled call from a cache
filled to ``prompt_len`` positions, the mean over ``chunks`` calls after a warm-up). With
``--rounds R`` the launch variants are timed R times each, interleaved (every variant once a
round), and each row gives the median, the range and the median ratio to the first variant
within a round: on this noisy machine (±1-2% between processes) that separates 1% effects. Before
timing, a teacher-forced check: ``check_steps`` decode steps through both paths from the same
cache, fed the same tokens, comparing logits, greedy tokens and experts per layer.

    python benchmarks/megastep_decode.py --shapes llama-3.2-1b llama-3-8b --sparsities 0.75
    python benchmarks/megastep_decode.py --shapes llama-3-8b --no-dense --rounds 5 \
        --launches '{"base": {}, "w4": {"warps": 4}}'

``--baseline MODULE`` times another version of ``prunepath_jax.megastep`` in the same rounds,
first in each (so ``vs_first`` is every variant's ratio to it): an older checkout installed under
another package name, e.g. ``git archive <commit>`` with ``prunepath_jax`` renamed to ``ppold``,
then ``--baseline ppold.megastep``. Code changes that no launch field switches are compared so,
side by side in one process.
"""

from __future__ import annotations

import argparse
import importlib
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
    copy_bandwidth,
    header,
    markdown_table,
    row_emitter,
    summarize,
    traced_events,
)
from sparse_decode import decode_cache_len, greedy_chunk_args, set_k, time_decode  # noqa: E402

from prunepath_jax import flatjit, megastep  # noqa: E402
from prunepath_jax.config import PRESETS  # noqa: E402
from prunepath_jax.kernels.synthetic import sparse_llama  # noqa: E402
from prunepath_jax.models.layers import init_cache  # noqa: E402
from prunepath_jax.models.llama import LlamaModel  # noqa: E402
from prunepath_jax.nn import route_args, set_compute  # noqa: E402


def mega_state(model, prompt_len, ctx, mod=megastep, batch: int = 1):
    """A fresh one-launch decode state: tokens 1..b at ``prompt_len`` (distinct, so a batch's
    sequences route apart), empty bf16 caches of ``ctx`` positions, stacked as the launch takes
    them (``[L, ctx, kv, hd]`` for one sequence, ``[L, b, ctx, kv, hd]`` for 2-16)."""
    cfg = model.cfg
    shape = (cfg.n_layers, *((batch,) if batch > 1 else ()), ctx, cfg.n_kv_heads, cfg.head_dim)
    return mod.MegaState(
        token_b=(1 + jnp.arange(batch, dtype=jnp.int32)) % cfg.vocab_size,
        pos_b=jnp.full((batch,), prompt_len, jnp.int32), done_b=jnp.zeros((batch,), bool),
        kc=jnp.zeros(shape, jnp.bfloat16), vc=jnp.zeros(shape, jnp.bfloat16),
        rng=jax.random.key(0), fail=jnp.int32(0),
    )  # fmt: skip


def chunk_inputs(tau_l, steps, launch) -> tuple[tuple, dict]:
    """``decode_chunk``'s arguments after the state (temperature, top-p, no stop ids, pad id,
    budgets) and its static keywords, for ``steps`` greedy one-launch steps."""
    return greedy_chunk_args(tau_l), dict(n_steps=steps, greedy=True, launch=launch)


def _chunk_call(model, mw, tau_l, steps, launch, mod=megastep):
    """``state -> (state, tokens)``: one compiled call of ``steps`` greedy one-launch steps
    (``mod``: the ``megastep`` module whose decode loop runs), called as ``generate`` calls it
    (``flatjit.bind``)."""
    args, kw = chunk_inputs(tau_l, steps, launch)
    # `megastep.bind_decode_chunk`'s call, spelt out: a `--baseline` module older than it has
    # only `_decode_chunk_impl` (same signature, the MegaState third after the flat state).
    fn, leaves = flatjit.bind(mod._decode_chunk_impl, *nnx.split(model), donate_argnums=(2,),
                              **kw)  # fmt: skip
    return lambda st: fn(leaves, mw, st, *args)


def mega_timer(model, mw, tau_l, prompt_len, steps, chunks, launch, mod=megastep, batch=1):
    """A compiled, warmed ``() -> (µs per step, barrier failures)`` of the one-launch path
    (same loop shape as ``time_decode``; ``batch`` sequences): each call times ``chunks`` calls
    of ``steps`` tokens
    from a fresh cache at ``prompt_len`` after one untimed call, so every call sees the same
    context lengths and calls of several variants can interleave (``round_stats``)."""
    ctx = decode_cache_len(prompt_len, steps, chunks)
    call = _chunk_call(model, mw, tau_l, steps, launch, mod)

    def run() -> tuple[float, int]:
        st, _ = call(mega_state(model, prompt_len, ctx, mod, batch))
        jax.block_until_ready(st)
        t0 = time.perf_counter()
        for _ in range(chunks):
            st, _ = call(st)
        jax.block_until_ready(st)
        return (time.perf_counter() - t0) / (chunks * steps) * 1e6, int(np.asarray(st.fail))

    run()  # compile
    return run


def round_stats(us: dict[str, list[float]]) -> dict[str, dict]:
    """Per variant, from ``rounds`` interleaved timings each (``us[label][r]``, every variant
    timed once in round r before any in round r + 1): the median µs per step, the range, and
    the median over rounds of the ratio to the first variant's time in the same round — a
    drift of the machine between rounds moves both sides of each ratio alike."""
    first = next(iter(us.values()))
    out = {}
    for label, t in us.items():
        t = np.asarray(t, np.float64)
        out[label] = {
            "us_per_step": float(np.median(t)),
            "us_range": [float(t.min()), float(t.max())],
            "rounds": len(t),
            "vs_first": float(np.median(t / np.asarray(first, np.float64))),
        }
    return out


def trace_mega(model, mw, tau_l, prompt_len, steps, launch) -> dict:
    """Every kernel's device µs a step in one traced pair of calls: what runs outside the one
    launch (embedding, LM head, sampling), the launch itself, and the idle gaps (two calls back
    to back, as the timed loop issues them, so the gap between calls shows too)."""
    call = _chunk_call(model, mw, tau_l, steps, launch)
    st, _ = call(mega_state(model, prompt_len, decode_cache_len(prompt_len, steps, 1)))
    tr = summarize(traced_events(lambda s: call(call(s)[0]), st), 2 * steps)
    rnd = lambda g: {k: round(v, 2) if isinstance(v, float) else v for k, v in g.items()}  # noqa: E731
    return {
        "trace_us_per_step": {k["name"]: round(k["us_per_step"], 2) for k in tr["kernels"]},
        "trace_busy_span_us_per_step": [tr["busy_us_per_step"], tr["span_us_per_step"]],
        "trace_gaps": [rnd(g) for g in tr["gaps"]],
        "trace_largest_gap": rnd(tr["largest_gap"]),
    }


PHASE_NAMES = ("A norm+qkv", "B attention", "C o+residual", "D norm+router", "F experts")


def timeline(t_ps: np.ndarray, n_layers: int) -> dict:
    """Per-phase µs a layer from every program's %globaltimer stamps ``[P, 1 + SLOTS·L]``
    (``triton_megastep``: a start and an end stamp per phase, F also after its selection and
    after its unit loop). A phase's time runs from the moment the previous phase's last
    program arrived (its barrier opened) to its own last arrival; ``wake`` is how long after
    that opening a program starts the phase (the barrier's latency), ``work`` (mean and max
    over programs) what it spends in it. Means over layers. With the router in the O phase
    (``router_in_c``, the split phases' default) D is the router share after the O GEMV, with no
    barrier before it: its "opening" is the O GEMV's last end."""
    from prunepath_jax.kernels.triton_megastep import N_SLOTS

    s = t_ps[:, 1:].reshape(t_ps.shape[0], n_layers, N_SLOTS).astype(np.float64) / 1e3  # µs
    starts, ends = s[:, :, [0, 2, 4, 6, 8]], s[:, :, [1, 3, 5, 7, 11]]  # [P, L, 5]: A B C D F
    out = phase_stats(starts, ends, t_ps[:, 0].min() / 1e3, PHASE_NAMES)
    out["F_select_us"] = round(float((s[:, :, 9] - s[:, :, 8]).mean()), 2)
    out["F_units_us"] = round(float((s[:, :, 10] - s[:, :, 9]).mean()), 2)
    out["F_atomics_us"] = round(float((s[:, :, 11] - s[:, :, 10]).mean()), 2)
    # The expert stream as a whole: the first program's start of its unit loop to the last
    # program's end of it (what ``expert_GB_s`` divides the selected experts' bytes by).
    out["F_units_span_us"] = round(float((s[:, :, 10].max(0) - s[:, :, 9].min(0)).mean()), 2)
    return out


def phase_stats(starts, ends, t0_us: float, names) -> dict:
    """The timeline's figures from each program's phase starts and ends ``[P, L, phases]``
    (µs; ``t0_us`` the first program's first stamp): a phase runs from the moment the barrier
    before it opened (the previous phase's last arrival) to its own last arrival, ``wake`` is
    how long after that opening a program starts it, ``work`` (mean and max over programs) what
    it spends in it; means over layers, by phase name. ``layers_us``: first stamp to the last
    phase's last arrival."""
    n_layers, n = starts.shape[1:]
    opened = ends.max(axis=0).reshape(-1)  # [L·phases] the moments the barriers opened
    prev = np.concatenate([[t0_us], opened[:-1]]).reshape(n_layers, n)
    work = ends - starts
    out = {
        "phase_us_per_layer": (opened.reshape(n_layers, n) - prev).mean(0),
        "wake_us": (starts - prev[None]).mean((0, 1)),
        "work_mean_us": work.mean((0, 1)),
        "work_max_us": work.max(0).mean(0),
    }
    out = {k: dict(zip(names, np.round(v, 2).tolist(), strict=True)) for k, v in out.items()}
    out["layers_us"] = float(opened[-1] - t0_us)
    return out


def phase_times(model, mw, tau_l, prompt_len, steps, chunks, launch, trace=False) -> dict:
    """``timeline`` of one step (the last of three calls: warm caches, as in decode). With
    ``trace``, that same stamped call also runs under the profiler: the launch's device time
    against its stamps (``stamps_vs_kernel``) says how much of the kernel lies before the first
    program's first stamp or after the last one's end, which the timeline cannot see."""
    kc = mega_state(model, prompt_len, decode_cache_len(prompt_len, steps, chunks)).kc
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, mw, kc):
        out = megastep.step(nnx.merge(graphdef, state), mw, jnp.ones((1,), jnp.int32),
                            jnp.full((1,), prompt_len, jnp.int32), kc, kc, tau_l, launch,
                            timing=True)  # fmt: skip
        return out[-1]

    for _ in range(3):
        t = np.asarray(f(state, mw, kc)).astype(np.int64)
    out = timeline(t, model.cfg.n_layers)
    if trace:
        out["stamps_vs_kernel"] = stamps_vs_kernel(t, traced_events(f, state, mw, kc))
    return out


def stamps_vs_kernel(t_ps: np.ndarray, events: list[dict]) -> dict:
    """The one-launch kernel's traced device µs next to what its programs' stamps span
    (``[P, NT]`` ns: first start stamp to last stamp of any program), and how far apart the
    programs' first stamps are (all programs must be resident before the first barrier opens)."""
    durs = [float(e["dur"]) for e in events if "_megastep_kernel" in e["name"]]
    first, last = t_ps[:, 0].astype(np.float64), t_ps[:, -1].astype(np.float64)
    stamped = (last.max() - first.min()) / 1e3
    return {
        "kernel_us": round(durs[0], 2) if durs else None,
        "stamped_us": round(stamped, 2),
        "unstamped_us": round(durs[0] - stamped, 2) if durs else None,
        "first_stamp_spread_us": round((first.max() - first.min()) / 1e3, 2),
        "last_stamp_spread_us": round((last.max() - last.min()) / 1e3, 2),
    }


def check(model, mw, ffn_args, tau_l, prompt_len, n_steps, launch, fp32=False) -> dict:
    """Teacher-forced parity with the model's own decode step (the default kernels); with
    ``fp32``, also both paths' distance from the same model in fp32 (its own cache, the same
    tokens): which of the two the bf16 difference comes from."""
    if n_steps == 0:  # no check (a 32k prompt's XLA prefill would not fit the device)
        return {"check_steps": 0, "check_barrier_failures": 0}
    cfg = model.cfg
    ctx = decode_cache_len(prompt_len, n_steps, 1)
    rng = np.random.default_rng(0)
    toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, prompt_len)), jnp.int32)
    cache = init_cache(cfg, 1, ctx, jnp.bfloat16)
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, toks, cache):
        return nnx.merge(graphdef, state)(toks, cache=cache, ffn_args=ffn_args,
                                          fresh_cache=True).cache  # fmt: skip

    @jax.jit
    def ref_step(state, tok, pos, cache):
        out = nnx.merge(graphdef, state)(tok[None, None], pos[None, None], cache=cache,
                                         ffn_args=ffn_args)  # fmt: skip
        return out.logits[0, 0], out.cache, jnp.stack([s.k_t.reshape(-1)[0] for s in out.ffn_stats])

    @jax.jit
    def mega_step(state, mw, tok, pos, kc, vc):  # weights as arguments, not captured constants
        lg, kc, vc, k_l, fail = megastep.step(nnx.merge(graphdef, state), mw, tok[None],
                                              pos[None], kc, vc, tau_l, launch)  # fmt: skip
        return lg[0], kc, vc, k_l, jnp.sum(fail)

    def rel(a, b):
        return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))

    cache = prefill(state, toks, cache)
    kc, vc = megastep.stack_cache(cache)
    if fp32:
        state32 = jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a,
                               state)  # fmt: skip
        cache32 = prefill(state32, toks, init_cache(cfg, 1, ctx, jnp.float32))
    tok = jnp.int32(int(toks[0, -1]))
    errs, errs32, agree, k_same, fails = [], {"megastep": [], "default": []}, 0, 0, 0
    for i in range(n_steps):
        pos = jnp.int32(prompt_len + i)
        want, cache, k_ref = ref_step(state, tok, pos, cache)
        got, kc, vc, k_l, fail = mega_step(state, mw, tok, pos, kc, vc)
        want, got = np.asarray(want, np.float32), np.asarray(got, np.float32)
        errs.append(rel(got, want))
        if fp32:
            w32, cache32, _ = ref_step(state32, tok, pos, cache32)
            w32 = np.asarray(w32, np.float32)
            errs32["megastep"].append(rel(got, w32))
            errs32["default"].append(rel(want, w32))
        agree += int(got.argmax() == want.argmax())
        k_same += int(np.array_equal(np.asarray(k_l), np.asarray(k_ref)))
        fails += int(fail)
        tok = jnp.int32(int(want.argmax()))
    out = {"check_steps": n_steps, "max_rel_logit_err": max(errs), "argmax_agree": agree,
           "k_equal_steps": k_same, "check_barrier_failures": fails}  # fmt: skip
    if fp32:
        out["max_rel_err_vs_fp32"] = {k: max(v) for k, v in errs32.items()}
    return out


def ratio(dense_us, r) -> float | None:
    return dense_us / r["us_per_step"] if dense_us else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["llama-3.2-1b", "llama-3-8b"])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.75, 0.9])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="timings per variant, interleaved across variants (median, range, paired ratio)",
    )
    ap.add_argument("--check-steps", type=int, default=8)
    ap.add_argument(
        "--launches",
        default='{"default": {}}',
        help='JSON {label: Launch fields}, each timed, e.g. {"p264": {"programs": 264}}',
    )
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--no-default", action="store_true", help="skip the default kernels' row")
    ap.add_argument("--baseline", help="another megastep module, timed first in every round")
    ap.add_argument("--trace", action="store_true", help="per-kernel device µs of one chunk")
    ap.add_argument("--fp32-check", action="store_true", help="parity against the fp32 model too")
    ap.add_argument("--out", default="results/megastep_decode.jsonl")
    a = ap.parse_args()
    head = {**header(), "bench": "megastep_decode"}
    bw = max(copy_bandwidth(2 << 30).values())
    launches = {k: megastep.Launch(**v) for k, v in json.loads(a.launches).items()}
    rows, emit = row_emitter(head, a.out, copy_TB_s=bw / 1e12)

    for shape in a.shapes:
        cfg = PRESETS[shape]
        dense = {}  # attention ("auto" | "xla") -> µs a token
        if not a.no_dense:
            # Our dense decode as `generate(..., implementation="auto")` runs it (the decode
            # attention kernel where it measured faster): the baseline of every ratio. Until the
            # thirty-sixth session the ratios were against the model's own XLA attention, the
            # slower of the two (1B 1082 vs 959.6 µs in one run); that one is still timed.
            model = LlamaModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
            for attn in ("auto", "xla"):
                r = time_decode(model, 1, a.prompt_len, a.steps, a.chunks, None, attn)
                dense[attn] = r["us_per_step"]
                emit({"shape": shape, "impl": "dense" if attn == "auto" else "dense_xla_attention",
                      "sparsity": 0.0, "us_per_step": r["us_per_step"],
                      "attention": r["attention"]})  # fmt: skip
            del model
        dense_us, dense_xla_us = dense.get("auto"), dense.get("xla")
        sparse = sparse_llama(cfg, 1, dtype=jnp.bfloat16)
        e = sparse.cfg.n_experts
        args = route_args(sparse.cfg, 1.0)
        tau_l = jnp.stack([x.tau for x in args])
        for s in a.sparsities:
            k = max(1, round((1 - s) * e))
            set_k(sparse, k)
            set_compute(sparse, "kernel", "pallas")
            mw = megastep.pack(sparse, head=any(x.head_in for x in launches.values()))
            prepared = {}  # label -> (timer, the check's and timeline's fields)
            if a.baseline:
                try:
                    old = importlib.import_module(a.baseline)
                    timer = mega_timer(sparse, old.pack(sparse), tau_l, a.prompt_len, a.steps,
                                       a.chunks, old.Launch(), old)  # fmt: skip
                    prepared["baseline"] = (timer, {"module": a.baseline})
                except Exception as err:
                    print(f"{shape} s{s} baseline: {type(err).__name__}: {err}"[:600], flush=True)
            for label, launch in launches.items():
                try:
                    chk = check(sparse, mw, args, tau_l, a.prompt_len, a.check_steps, launch,
                                a.fp32_check)  # fmt: skip
                    if chk["check_barrier_failures"]:  # not co-resident: every barrier times out
                        emit({"shape": shape, "impl": f"megastep_{label}", **chk})
                        continue
                    fields = {**chk, **phase_times(sparse, mw, tau_l, a.prompt_len, a.steps,
                                                   a.chunks, launch, a.trace)}  # fmt: skip
                    if a.trace:
                        fields.update(trace_mega(sparse, mw, tau_l, a.prompt_len, a.steps, launch))
                    timer = mega_timer(sparse, mw, tau_l, a.prompt_len, a.steps, a.chunks, launch)
                    prepared[label] = (timer, fields)
                except Exception as err:  # report and go on with the next variant
                    print(f"{shape} s{s} {label}: {type(err).__name__}: {err}"[:600], flush=True)
            us = {label: [] for label in prepared}
            fails = dict.fromkeys(prepared, 0)
            for _ in range(a.rounds):  # interleaved: each variant once a round
                for label, (timer, _) in prepared.items():
                    t, f = timer()
                    us[label].append(t)
                    fails[label] += f
            stats = round_stats(us) if us else {}
            for label, (_, fields) in prepared.items():
                r = stats[label]
                lch = launches[label]._asdict() if label in launches else {}
                span = fields.get("F_units_span_us")
                # bytes the unit loop must read: k experts' gate, up and down rows (bf16)
                x_bytes = k * (sparse.cfg.d_ff // e) * sparse.cfg.d_model * 3 * 2
                emit({"shape": shape, "impl": f"megastep_{label}", "sparsity": 1 - k / e, "k": k,
                      "E": e, "launch": lch, **fields, **r,
                      "expert_GB_s": x_bytes / span / 1e3 if span else None,
                      "expert_pct_copy": 100 * x_bytes / span * 1e6 / bw if span else None,
                      "barrier_failures": fails[label],
                      "speedup_vs_dense": ratio(dense_us, r),
                      "speedup_vs_dense_xla_attention": ratio(dense_xla_us, r)})  # fmt: skip
            del mw
            if a.no_default:
                continue
            set_compute(sparse, "kernel", "pallas")
            r = time_decode(sparse, 1, a.prompt_len, a.steps, a.chunks, args, "auto")
            emit({"shape": shape, "impl": "pallas_default", "sparsity": 1 - k / e, "k": k,
                  "E": e, "us_per_step": r["us_per_step"], "attention": r["attention"],
                  "speedup_vs_dense": ratio(dense_us, r),
                  "speedup_vs_dense_xla_attention": ratio(dense_xla_us, r)})  # fmt: skip
        del sparse
    cols = ["shape", "impl", "sparsity", "k", "us_per_step", "vs_first", "speedup_vs_dense",
            "speedup_vs_dense_xla_attention",
            "max_rel_logit_err", "argmax_agree", "k_equal_steps", "barrier_failures"]  # fmt: skip
    print(
        f"\n{head['date']} commit {head['commit']} on {head['device']}; copy {bw / 1e12:.2f} TB/s"
    )
    print(markdown_table(rows, cols))


if __name__ == "__main__":
    main()
