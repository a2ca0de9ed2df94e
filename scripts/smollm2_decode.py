"""Real SmolLM2-135M end to end on the GPU: dense vs PrunePath decode through each backend.

The shipped Q4_1 GGUF (the embedded default model) is converted to PrunePath (balanced k-means
experts, G = 32, routers initialised from shipped training text), then for each tau: greedy
generation from real prompts through the masked XLA path and the kernels, comparing tokens, and
decode tokens/s from two forced generation lengths ((N2 − N1) / (t2 − t1): prefill and set-up
cancel; the median of 7 paired repeats, with their range). The FFN sparsity is measured on the
generated text (routing statistics of a forward pass over prompt + output).

    python scripts/smollm2_decode.py --gguf path/to/SmolLM2-135M-Instruct.Q4_1.gguf
    python scripts/smollm2_decode.py --gguf ... --batches 1 --impls xla pallas megastep
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from common import header, write_rows  # noqa: E402

from prunepath_jax.config import PrunePathConfig  # noqa: E402
from prunepath_jax.convert import to_prunepath  # noqa: E402
from prunepath_jax.demo import calibration_batches  # noqa: E402
from prunepath_jax.generate import forced_logits, generate  # noqa: E402
from prunepath_jax.loading import load_any  # noqa: E402
from prunepath_jax.nn import route_args, set_compute  # noqa: E402
from prunepath_jax.router_init import init_routers  # noqa: E402
from prunepath_jax.text import read_texts  # noqa: E402


def converted(path: str, dtype, calib_tokens: int, **fit_kwargs):
    """``(pretrained, PrunePath model)``: G = 32 balanced k-means experts, paper rule, sigmoid
    gates, routers initialised from ``calib_tokens`` shipped training tokens (``fit_kwargs``:
    `router_init.fit_routers` options such as ``temperature``)."""
    pre = load_any(path, dtype=dtype)
    model, _ = to_prunepath(pre.model, PrunePathConfig(32, "paper", "sigmoid", 1, None), seed=0)
    batches = calibration_batches(pre.tokenizer, calib_tokens)
    model, _ = init_routers(model, batches, seed=0, **fit_kwargs)
    return pre, model


def prompts(tok, n: int, length: int = 32) -> list[list[int]]:
    """``n`` windows of ``length`` tokens from held-out (validation) documents, in order."""
    out = []
    for doc in read_texts("shipped", "validation"):
        ids = tok.encode(doc, add_special_tokens=False)
        for i in range(0, len(ids) - length + 1, length):
            out.append(ids[i : i + length])
            if len(out) == n:
                return out
    raise ValueError(f"the validation text has only {len(out)} windows of {length} tokens")


def prefill_check(model, ps, tau, impls) -> list[dict]:
    """Last-position logits of one forward pass over the prompts through each FFN backend,
    against the first: max |Δ|, whether the argmax agrees, and the first's top-2 gap (a greedy
    token can only flip where that gap is below the difference)."""
    x = jnp.asarray(ps, jnp.int32)
    args = route_args(model.cfg, tau)
    rows, ref = [], None
    for impl in impls:
        if impl in ("megastep", "auto"):  # decode-only choices: their prefill is "auto"'s
            continue
        set_compute(model, "kernel", impl)
        res = model(x, ffn_args=args)
        lg = np.asarray(res.logits[:, -1].astype(jnp.float32))
        k = [np.asarray(s.k_t) for s in res.ffn_stats if s is not None]
        if ref is None:
            ref = (lg, k)
            top2 = np.sort(lg, axis=-1)[:, -2:]
        rows.append({
            "impl": impl, "tau": tau, "max_abs_dlogit": float(np.max(np.abs(lg - ref[0]))),
            "argmax_agree": float(np.mean(lg.argmax(-1) == ref[0].argmax(-1))),
            "ref_top2_gap_min": float(np.min(top2[:, 1] - top2[:, 0])),
            "k_t_equal_layers": int(sum(map(np.array_equal, k, ref[1]))),
            "n_layers": len(k),
        })  # fmt: skip
    set_compute(model, "auto")
    return rows


def forced_parity(model, ps, conts, paths, tau=None) -> list[dict]:
    """Teacher-forced next-token logits along ``conts`` through each ``(label, implementation,
    attn_impl or None)`` path, against the first: top-1 agreement over all steps, max and median
    (over steps) of the per-step max |Δlogit|. ``attn_impl`` set means: FFNs through the XLA
    kernel path and attention forced to that impl (an attention-only change, the control)."""
    from prunepath_jax.models import decode_attention as da
    from prunepath_jax.nn import PrunePathFFN

    rows, ref = [], None
    has_ffn = any(isinstance(m, PrunePathFFN) for _, m in nnx.iter_graph(model))
    for label, impl, attn in paths:
        if attn is None:
            lg = forced_logits(model, ps, conts, implementation=impl, tau=tau)
        else:
            if has_ffn:
                set_compute(model, "kernel", "xla")
            da.set_attention(model, attn)
            try:
                lg = forced_logits(model, ps, conts, tau=tau)
            finally:
                da.set_attention(model, "xla")
                if has_ffn:
                    set_compute(model, "auto")
        if ref is None:
            ref = lg
        step_max = np.abs(lg - ref).max(-1)  # [b, n]
        rows.append({
            "what": "forced_logits", "path": label, "tau": tau, "steps": int(step_max.size),
            "top1_agree": float(np.mean(lg.argmax(-1) == ref.argmax(-1))),
            "max_abs_dlogit": float(step_max.max()),
            "median_step_max_abs_dlogit": float(np.median(step_max)),
        })  # fmt: skip
    return rows


def decode_tps(
    model, ps, n1, n2, repeats=7, chunk=8, direct=False, **kw
) -> tuple[float, list[float], list[list[int]]]:
    """Decode tokens/s per sequence from two forced lengths, and the longer greedy output.

    ``direct``: instead, the ``n2``-token generation ``repeats`` times, each of its decode chunks
    timed by ``generate``'s ``chunk_seconds`` (one compiled call of ``chunk`` steps and its
    tokens to the host): the median and range of ``chunk / seconds`` over all chunks. No set-up
    or prefill inside the difference of two timings (their spread made paired estimates range
    over 2-9×, twenty-fifth session).

    Each repeat times the two lengths back to back and gives one paired estimate
    ``(n2 − n1) / (t2 − t1)`` (prefill and set-up cancel); the median of the repeats is returned
    with their ``[min, max]``. Why not the difference of the best times: in this launch-bound
    model that estimate moved by ±25% between processes (BENCHMARKS.md, fifth session), and a
    spread says how far a single number can be trusted.
    """
    for n in (n2,) if direct else (n1, n2):  # compile (and warm) what is timed first
        generate(model, ps, n, chunk=chunk, **kw)
    if direct:
        secs: list[float] = []
        for _ in range(repeats):
            out = generate(model, ps, n2, chunk=chunk, chunk_seconds=secs, **kw)
        rates = [chunk / t for t in secs]
        return float(np.median(rates)), [min(rates), max(rates)], out
    rates = []
    for _ in range(repeats):
        t = {}
        for n in (n1, n2):
            t0 = time.perf_counter()
            out = generate(model, ps, n, chunk=chunk, **kw)
            t[n] = time.perf_counter() - t0
        rates.append((n2 - n1) / (t[n2] - t[n1]))
    return float(np.median(rates)), [min(rates), max(rates)], out


def measured_sparsity(model, ps, outs, tau) -> float:
    """1 − mean(k)/E over prompt + generated tokens (one forward pass, routing statistics)."""
    ids = [p + o for p, o in zip(ps, outs, strict=True)]
    n = min(len(s) for s in ids)
    x = jnp.asarray([s[:n] for s in ids], jnp.int32)
    res = model(x, ffn_args=route_args(model.cfg, tau))
    ks = [float(s.k_mean) for s in res.ffn_stats if s is not None]
    return 1.0 - float(np.mean(ks)) / model.cfg.n_experts


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default="default", help="a .gguf file, or 'default' (the package)")
    ap.add_argument("--taus", nargs="+", type=float, default=[0.9, 0.7, 0.5])
    ap.add_argument("--impls", nargs="+", default=["xla", "pallas", "triton"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--lengths", nargs=2, type=int, default=[16, 80])
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=7, help="paired timings per rate (median)")
    ap.add_argument(
        "--chunk", type=int, default=8, help="decode steps per compiled call (host checks between)"
    )
    ap.add_argument(
        "--cache-len",
        type=int,
        default=None,
        help="one KV-cache length for both forced lengths (one compiled program each path: with "
        "--chunk C and --lengths N N+C the paired difference is one C-step compiled call)",
    )
    ap.add_argument(
        "--direct",
        action="store_true",
        help="time every decode chunk of the longer generation instead of two lengths' difference",
    )
    ap.add_argument("--out", default="results/smollm2_decode.jsonl")
    ap.add_argument(
        "--parity",
        action="store_true",
        help="also teacher-forced logits of every path along the first's tokens",
    )
    ap.add_argument("--parity-taus", nargs="*", type=float, default=[0.5])
    a = ap.parse_args()
    head = header()
    t0 = time.perf_counter()
    pre, model = converted(a.gguf, jnp.bfloat16, a.calib_tokens)
    print(f"converted in {time.perf_counter() - t0:.1f} s: E = {model.cfg.n_experts}", flush=True)
    rows = []

    def emit(r):
        rows.append({**head, "model": "SmolLM2-135M-Instruct Q4_1 (bf16)", **r})
        write_rows(a.out, rows[-1:])
        print(json.dumps(r), flush=True)

    n1, n2 = a.lengths
    for b in a.batches:
        ps = prompts(pre.tokenizer, b)
        # Our dense decode at its fastest ("auto": the attention kernel where it measured
        # faster), the baseline of every ratio; dense with XLA attention too, for reference.
        dense_tps, rng, _ = decode_tps(pre.model, ps, n1, n2, a.repeats, a.chunk, a.direct,
                                       implementation="auto", cache_len=a.cache_len)  # fmt: skip
        emit({"batch": b, "impl": "dense", "tau": None, "tok_s_per_seq": dense_tps,
              "tok_s_range": rng})  # fmt: skip
        xla_tps, rng, dense_out = decode_tps(pre.model, ps, n1, n2, a.repeats, a.chunk, a.direct,
                                             cache_len=a.cache_len)  # fmt: skip
        emit({"batch": b, "impl": "dense_xla_attention", "tau": None, "tok_s_per_seq": xla_tps,
              "tok_s_range": rng, "speedup_vs_dense": xla_tps / dense_tps})  # fmt: skip
        if a.parity:  # the bf16 noise floor: dense, XLA vs kernel attention, same tokens
            for r in forced_parity(
                pre.model,
                ps,
                dense_out,
                [("dense_xla", None, None), ("dense_pallas_attn", None, "pallas")],
            ):
                emit({"batch": b, **r})  # fmt: skip
        for tau in a.taus:
            for r in prefill_check(model, ps, tau, a.impls):
                emit({"batch": b, "what": "prefill_logits", **r})
            base = None
            for impl in a.impls:
                try:
                    tps, rng, out = decode_tps(
                        model,
                        ps,
                        n1,
                        n2,
                        a.repeats,
                        a.chunk,
                        a.direct,
                        tau=tau,
                        implementation=impl,
                        cache_len=a.cache_len,
                    )
                except Exception as err:  # an unsupported backend is a row too
                    emit({"batch": b, "impl": impl, "tau": tau, "error": repr(err)[:300]})
                    continue
                if base is None:
                    base = out
                    sp = measured_sparsity(model, ps, out, tau)
                    if a.parity and tau in a.parity_taus:
                        paths = [(f"sparse_{i}", i, None) for i in a.impls]
                        paths.append(("sparse_xla_ffn_pallas_attn", None, "pallas"))
                        for r in forced_parity(model, ps, out, paths, tau):
                            emit({"batch": b, **r})
                same = float(np.mean([o == r for o, r in zip(out, base, strict=True)]))
                first = [
                    next((i for i, (u, v) in enumerate(zip(o, r, strict=False)) if u != v), None)
                    for o, r in zip(out, base, strict=True)
                ]
                emit({"batch": b, "impl": impl, "tau": tau, "sparsity": sp,
                      "tok_s_per_seq": tps, "tok_s_range": rng,
                      "speedup_vs_dense": tps / dense_tps,
                      "same_tokens_as_first_impl": same, "first_divergence": first})  # fmt: skip
    print("\n| batch | impl | tau | sparsity | tok/s/seq | vs dense | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("what"):
            continue
        print(f"| {r['batch']} | {r['impl']} | {r['tau']} | {r.get('sparsity', '')} | "
              f"{r.get('tok_s_per_seq', r.get('error', ''))} | {r.get('speedup_vs_dense', '')} | "
              f"{r.get('same_tokens_as_first_impl', '')} |")  # fmt: skip


if __name__ == "__main__":
    main()
