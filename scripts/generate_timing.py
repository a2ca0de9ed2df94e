"""``generate``'s decode speed as a user gets it, this checkout against an older one, side by side.

Why. The decode benchmarks (``benchmarks/megastep_decode.py``, ``sparse_decode.py``) time
compiled chunks issued back to back; ``generate`` also reads every chunk's tokens back to check
for stops. Before the thirty-fifth session it read each chunk before issuing the next, so the
host's part of every call (2-5 ms at 1B on the H200's host) left the GPU idle. This script runs
``generate`` itself (random weights at a real shape, routers forced to k experts, greedy, no
stop ids) through the package of this checkout and through ``ppold`` (an older checkout built by
``scripts/make_baseline.sh``, when installed), interleaved round by round, and reports the decode
µs a token from ``chunk_seconds`` (prefill and set-up excluded). Each row also carries the
device's peak bytes in use so far (``peak_gib``, process-wide: run one path per process, as
``--paths dense`` then ``--paths megastep``, for a path's own peak).

    python scripts/generate_timing.py --shape llama-3.2-1b --paths megastep dense
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from common import header, write_rows  # noqa: E402


def build(pkg: str, shape: str, path: str, sparsity: float):
    """``(generate, model, kwargs)`` of package ``pkg`` for ``path`` "megastep" | "pallas" |
    "dense"."""
    gen = importlib.import_module(f"{pkg}.generate").generate
    cfg = importlib.import_module(f"{pkg}.config").PRESETS[shape]
    if path == "dense":
        llama = importlib.import_module(f"{pkg}.models.llama")
        # our dense decode as "auto" runs it (the decode attention kernel where it measured
        # faster); until the thirty-sixth session this path kept the model's XLA attention
        dense = llama.LlamaModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        return gen, dense, {"implementation": "auto"}
    model = importlib.import_module(f"{pkg}.kernels.synthetic").sparse_llama(
        cfg, 1, dtype=jnp.bfloat16
    )
    k = max(1, round((1 - sparsity) * model.cfg.n_experts))
    # sparse_decode.set_k's isinstance test names this package's class, not `ppold`'s
    for _, m in nnx.iter_graph(model):
        if type(m).__name__ == "PrunePathFFN":
            m.k_min = m.k_max = k
    return gen, model, {"implementation": path, "tau": 1.0}


def _peak_gib() -> float | None:
    """The device's peak bytes in use since the process started, GiB (None where the backend
    reports no memory figures, as on CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--paths", nargs="+", default=["megastep", "dense"])
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--chunks", type=int, default=8, help="decode chunks a generation")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="results/generate_timing.jsonl")
    a = ap.parse_args()
    pkgs = ["prunepath_jax"]
    try:
        importlib.import_module("ppold.generate")
        pkgs.append("ppold")
    except ImportError:
        print("ppold not installed: timing this checkout only", flush=True)
    prompt = np.random.default_rng(0).integers(3, 1000, a.prompt_len).tolist()
    n_new = 1 + a.chunk * a.chunks
    head = {**header(), "bench": "generate_timing", "shape": a.shape, "chunk": a.chunk}
    rows = []
    for path in a.paths:
        runs = {pkg: build(pkg, a.shape, path, a.sparsity) for pkg in pkgs}
        us = {pkg: [] for pkg in pkgs}
        for gen, model, kw in runs.values():  # compile and warm
            gen(model, [prompt], n_new, chunk=a.chunk, **kw)
        for _ in range(a.rounds):
            for pkg, (gen, model, kw) in runs.items():
                secs: list[float] = []
                gen(model, [prompt], n_new, chunk=a.chunk, chunk_seconds=secs, **kw)
                us[pkg].append(sum(secs) / (n_new - 1) * 1e6)
        for pkg in pkgs:
            rows.append({
                **head, "path": path, "package": pkg, "us_per_token": float(np.median(us[pkg])),
                "us_range": [min(us[pkg]), max(us[pkg])], "rounds": a.rounds,
                "vs_first": float(np.median(np.asarray(us[pkg]) / np.asarray(us[pkgs[0]]))),
                "peak_gib": _peak_gib(),
            })  # fmt: skip
            print(rows[-1], flush=True)
        del runs
    write_rows(a.out, rows)


if __name__ == "__main__":
    main()
