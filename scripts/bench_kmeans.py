"""Times balanced k-means per layer and compares its clusters with random and contiguous groups.

Usage (random rows of a given shape):

    python scripts/bench_kmeans.py --f 1536 --d 576 --g 32 --layers 30 [--out results.jsonl]

``kmeans_report(rows_list)`` is the importable core: feed it real per-layer weight rows (e.g.
SmolLM2's ``gate_proj``) to get the same table for a real model. The first layer's time
includes the one compilation that every layer of the same shape shares; it is reported apart.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np

from prunepath_jax.experts import balanced_kmeans, within_cluster_cosine


def kmeans_report(
    rows_list: Sequence[np.ndarray],
    g: int = 32,
    *,
    seed: int = 0,
    n_iter: int = 25,
) -> list[dict]:
    """Clusters every layer's rows ``[f, d]`` and measures the result.

    Args:
        rows_list: one ``[f, d]`` array per layer (neuron rows of the first FFN projection).
        g: neurons per expert.
        seed: k-means seed; the random baseline uses ``seed + 1``.
        n_iter: maximum k-means iterations.

    Returns:
        One dict per layer: shape, seconds (wall, ``includes_compile`` on the first call of a
        shape), and mean within-cluster cosine of k-means, random equal-size groups and the
        contiguous split (the grouping the model would get without clustering).
    """
    rng = np.random.default_rng(seed + 1)
    seen_shapes = set()
    rows_out = []
    for layer, rows_fd in enumerate(rows_list):
        rows_fd = np.asarray(rows_fd, np.float32)
        f, d = rows_fd.shape
        e = f // g
        t0 = time.perf_counter()
        labels_f = np.asarray(
            jax.block_until_ready(balanced_kmeans(rows_fd, g, seed=seed, n_iter=n_iter))
        )
        seconds = time.perf_counter() - t0
        sizes_ok = bool((np.bincount(labels_f, minlength=e) == g).all())
        rows_out.append(
            {
                "layer": layer,
                "f": f,
                "d": d,
                "g": g,
                "e": e,
                "seconds": seconds,
                "includes_compile": (f, d) not in seen_shapes,
                "sizes_exact": sizes_ok,
                "kmeans_cos": within_cluster_cosine(rows_fd, labels_f),
                "random_cos": within_cluster_cosine(rows_fd, rng.permutation(f) % e),
                "contiguous_cos": within_cluster_cosine(rows_fd, np.arange(f) // g),
            }
        )
        seen_shapes.add((f, d))
    return rows_out


def summarise(rows: list[dict]) -> dict:
    """Totals and means over layers; steady-state time excludes compiling calls."""
    warm = [r["seconds"] for r in rows if not r["includes_compile"]]
    return {
        "layers": len(rows),
        "total_s": sum(r["seconds"] for r in rows),
        "first_s": rows[0]["seconds"],
        "per_layer_warm_s": float(np.mean(warm)) if warm else float("nan"),
        "kmeans_cos": float(np.mean([r["kmeans_cos"] for r in rows])),
        "random_cos": float(np.mean([r["random_cos"] for r in rows])),
        "contiguous_cos": float(np.mean([r["contiguous_cos"] for r in rows])),
        "all_sizes_exact": all(r["sizes_exact"] for r in rows),
    }


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--f", type=int, default=1536, help="FFN width (neurons)")
    parser.add_argument("--d", type=int, default=576, help="model width (row length)")
    parser.add_argument("--g", type=int, default=32, help="neurons per expert")
    parser.add_argument("--layers", type=int, default=4, help="number of random layers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-iter", type=int, default=25)
    parser.add_argument("--out", default=None, help="append one JSON summary row to this file")
    parser.add_argument(
        "--model", default=None, help="cluster a real model's FFNs instead (e.g. default)"
    )
    args = parser.parse_args(argv)

    if args.model:
        from prunepath_jax.convert import layer_list
        from prunepath_jax.loading import load_pretrained
        from prunepath_jax.nn import ffn_weights

        pre = load_pretrained(args.model, progress=False)
        rows_list = [
            ffn_weights(pre.config, layer.mlp)["w_in"][0] for layer in layer_list(pre.model)
        ]
    else:
        rng = np.random.default_rng(args.seed)
        rows_list = [
            rng.standard_normal((args.f, args.d), dtype=np.float32) for _ in range(args.layers)
        ]
    rows = kmeans_report(rows_list, args.g, seed=args.seed, n_iter=args.n_iter)
    print(f"{'layer':>5} {'seconds':>8} {'kmeans':>8} {'random':>8} {'contig':>8}")
    for r in rows:
        flag = "*" if r["includes_compile"] else " "
        print(
            f"{r['layer']:>5} {r['seconds']:>7.2f}{flag} {r['kmeans_cos']:>8.4f} "
            f"{r['random_cos']:>8.4f} {r['contiguous_cos']:>8.4f}"
        )
    summary = summarise(rows)
    print("* includes compilation")
    print(json.dumps(summary, indent=1))
    if args.out:
        record = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": _commit(),
            "machine": f"{platform.node()} {jax.devices()[0].device_kind} x{jax.device_count()}",
            "command": " ".join([sys.executable, *sys.argv]),
            **vars(args),
            **summary,
        }
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
