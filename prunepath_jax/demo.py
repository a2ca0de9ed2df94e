"""The README's main job on the embedded default model, end to end on a CPU in minutes:

1. load SmolLM2-135M-Instruct (the shipped GGUF, converted into a cache on first use);
2. convert it to PrunePath (balanced k-means experts, G = 32 -> 48 experts per layer);
3. initialise every router without training (fit to expert contribution norms on shipped
   training text) and save the result as an Orbax checkpoint;
4. sweep tau on held-out shipped text: realised sparsity, perplexity and bits per byte next to
   the dense model and to the zero (untrained) router, with a table, CSV/JSONL and a plot;
5. answer chat prompts at two tau values with the KV cache.

Everything lands in `out_dir` (default `runs/demo`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flax import nnx
from rich.console import Console

PROMPTS = (
    "What is the capital of France?",
    "Write two sentences about the sea, in the style of Shakespeare.",
)


def calibration_batches(tok, n_tokens: int, seq_len: int = 256, batch: int = 8):
    """Packed windows of shipped *training* text (the sweep evaluates held-out validation text)."""
    from prunepath_jax.text import pack_tokens, read_texts

    docs, total = [], 0
    for doc in read_texts("shipped", "train"):
        ids = tok.encode(doc, add_special_tokens=False)
        docs.append(ids)
        total += len(ids)
        if total >= n_tokens + seq_len:
            break
    rows = pack_tokens(docs, seq_len, tok.eos_id)[: max(1, n_tokens // seq_len)]
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        yield chunk, np.ones_like(chunk)


def run_demo(
    model: str = "default",
    max_new_tokens: int = 48,
    out_dir: str = "runs/demo",
    calib_tokens: int = 8192,
    eval_tokens: int = 4096,
    taus: tuple[float, ...] = (1.05, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4),
    static_k: tuple[int, ...] = (36, 24, 12),
    teal: tuple[float, ...] = (0.25, 0.5, 0.75),
    teal_down: tuple[float, ...] = (0.5,),
    sample_taus: tuple[float, float] = (1.05, 0.7),
    gate: str = "none",
) -> dict:
    import jax

    from prunepath_jax.checkpoint import latest_step, save_model
    from prunepath_jax.cli import _prompts
    from prunepath_jax.config import PrunePathConfig
    from prunepath_jax.convert import to_prunepath
    from prunepath_jax.eval.sweep import sweep
    from prunepath_jax.generate import generate
    from prunepath_jax.loading import load_pretrained
    from prunepath_jax.nn import route_args
    from prunepath_jax.router_init import init_routers

    con = Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    t0 = time.perf_counter()
    pre = load_pretrained(model)
    cfg, tok = pre.config, pre.tokenizer
    timings["load"] = time.perf_counter() - t0
    con.rule("1. dense model")
    con.print(
        f"{pre.source}: {cfg.model_type}, {cfg.n_layers} layers, d={cfg.d_model}, f={cfg.d_ff}, "
        f"~{cfg.n_params / 1e6:.0f}M params, {timings['load']:.1f} s on {jax.default_backend()}"
    )

    con.rule("2. PrunePath conversion (balanced k-means experts)")
    t0 = time.perf_counter()
    pp_model, info = to_prunepath(pre.model, PrunePathConfig(group_size=32, gate=gate))
    zero_model = nnx.clone(pp_model)  # same experts, router left at zero (the paper's init)
    timings["convert"] = time.perf_counter() - t0
    con.print(
        f"{cfg.n_layers} layers x {pp_model.cfg.n_experts} experts of 32 neurons; mean "
        f"within-expert cosine {np.mean(info['cosine']):.4f}; {timings['convert']:.1f} s"
    )

    con.rule("3. router initialisation (no training)")
    t0 = time.perf_counter()
    pp_model, report = init_routers(pp_model, calibration_batches(tok, calib_tokens))
    timings["router_init"] = time.perf_counter() - t0
    last = latest_step(out / "checkpoint")  # a re-run adds a step (keeping two), loses nothing
    ckpt = save_model(
        out / "checkpoint",
        pp_model,
        pp_model.cfg,
        tokenizer=tok,
        metadata={"source": pre.source, "router_init": {"calib_tokens": calib_tokens}},
        step=0 if last is None else last + 1,
        keep=2,
    )
    con.print(f"{calib_tokens} calibration tokens, {timings['router_init']:.1f} s -> {ckpt}")

    con.rule("4. tau sweep on held-out shipped text")
    t0 = time.perf_counter()
    common = dict(max_tokens=eval_tokens, seq_len=512, batch_size=4, progress=False)
    # TEAL (magnitude thresholds on the same FFN weights, no router) calibrated on the same
    # shipped training text as the routers: the baseline a user would otherwise pick; and its
    # down-row threshold inside PrunePath's experts, at every tau.
    rows = sweep(pp_model, tok, "shipped", taus, out_dir=out / "sweep", reference=pre.model,
                 static_k=static_k, teal=teal, teal_down=teal_down,
                 teal_calib=calibration_batches(tok, calib_tokens),
                 meta={"router": "initialised"}, **common)  # fmt: skip
    zero_taus = tuple(t for t in taus if t <= 1.0)[::2]
    zero_rows = sweep(zero_model, tok, "shipped", zero_taus, out_dir=out / "sweep_zero_router",
                      meta={"router": "zero"}, **common)  # fmt: skip
    timings["sweep"] = time.perf_counter() - t0
    con.print(f"artifacts: {out / 'sweep'} (sweep.md/.csv/.jsonl/.png), {timings['sweep']:.0f} s")
    zero_by_tau = {r.get("tau"): r for r in zero_rows}
    con.print("zero-router perplexity at the same tau (uniform routing = static pruning):")
    for r in (r for r in rows if r["setting"] == "tau"):
        z = zero_by_tau.get(r.get("tau"))
        if z is not None:
            con.print(
                f"  tau {r['tau']}: initialised {r['ppl']:.1f} (s={r['sparsity']:.2f}) | "
                f"zero router {z['ppl']:.3g} (s={z['sparsity']:.2f})"
            )
    con.print("TEAL (magnitude thresholds, no router) and its down rows inside the experts:")
    for r in (r for r in rows if r["setting"] in ("teal", "teal_down")):
        con.print(f"  {r['label']}: perplexity {r['ppl']:.1f} at sparsity {r['sparsity']:.2f}")

    con.rule("5. generation at two tau values")
    ids = _prompts(tok, list(PROMPTS), chat=True)
    samples = {}
    for tau in sample_taus:
        t0 = time.perf_counter()
        gen = generate(pp_model, ids, max_new_tokens, stop_ids=tok.stop_ids(cfg.eos_token_ids),
                       pad_id=tok.pad_id, ffn_args=route_args(pp_model.cfg, tau))  # fmt: skip
        dt = time.perf_counter() - t0
        samples[str(tau)] = [tok.decode(g).strip() for g in gen]
        con.print(f"[bold]tau = {tau}[/] ({sum(map(len, gen))} tokens, {dt:.1f} s with compile)")
        for p, a in zip(PROMPTS, samples[str(tau)], strict=True):
            con.print(f"  [cyan]user:[/] {p}\n  [green]assistant:[/] {a}")
    summary = {"timings_s": timings, "samples": samples, "sweep": rows, "zero_router": zero_rows}
    (out / "demo.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary
