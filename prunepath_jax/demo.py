"""The README's main job on the embedded default model.

Today: load SmolLM2-135M-Instruct (converting the shipped GGUF on first use), answer two chat
prompts of different lengths as one batch, and report decode speed. Later stages (convert to
PrunePath, initialise routers, sweep tau) extend this same command.
"""

from __future__ import annotations

import time

from rich.console import Console

PROMPTS = (
    "What is the capital of France?",
    "Write two sentences about the sea, in the style of Shakespeare.",
)


def run_demo(model: str = "default", max_new_tokens: int = 48) -> dict:
    import jax

    from prunepath_jax.cli import _prompts
    from prunepath_jax.generate import generate
    from prunepath_jax.loading import load_pretrained

    con = Console()
    t0 = time.perf_counter()
    pre = load_pretrained(model)
    cfg, tok = pre.config, pre.tokenizer
    con.print(
        f"[bold]loaded[/] {pre.source}: {cfg.model_type}, {cfg.n_layers} layers, d={cfg.d_model}, "
        f"f={cfg.d_ff}, ~{cfg.n_params / 1e6:.0f}M params in {time.perf_counter() - t0:.1f} s "
        f"on {jax.default_backend()}"
    )
    ids = _prompts(tok, list(PROMPTS), chat=True)
    kw = dict(stop_ids=tok.stop_ids(cfg.eos_token_ids), pad_id=tok.pad_id)
    t0 = time.perf_counter()
    out = generate(pre.model, ids, max_new_tokens, **kw)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = generate(pre.model, ids, max_new_tokens, **kw)
    second = time.perf_counter() - t0
    for p, o in zip(PROMPTS, out, strict=True):
        con.print(f"[bold cyan]user:[/] {p}\n[bold green]assistant:[/] {tok.decode(o).strip()}\n")
    n = sum(map(len, out))
    con.print(
        f"greedy batch of {len(ids)}: {n} new tokens; first call {first:.1f} s (compiles), "
        f"second call {second:.2f} s = {n / second:.1f} tokens/s"
    )
    return {"outputs": [tok.decode(o) for o in out], "tokens_per_s": n / second}
