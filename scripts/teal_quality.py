"""Quality per weight byte: PrunePath, TEAL, and TEAL's down-row threshold inside PrunePath's
experts, on one checkpoint and the shipped held-out text.

    python scripts/teal_quality.py --checkpoint runs/demo/checkpoint   # after `make demo`
    python scripts/teal_quality.py --checkpoint runs/smollm2-lm/checkpoints --out results/x.jsonl

Why: the sweep's TEAL rows (`prunepath sweep --teal`) showed plain TEAL keeping far more
quality than training-free PrunePath at every sparsity (BENCHMARKS.md, fortieth session). TEAL's
threshold on the intermediate activation skips whole rows of W_down, which are contiguous, so
the same threshold inside PrunePath's selected experts (``eval.teal.teal_model(route=True)``:
t_x = 0, t_a calibrated on the dense model) is a kernel-friendly way to read fewer bytes. This
script measures what it costs: perplexity against the fraction of FFN weight bytes not read.

Rows (JSONL, one per setting; a markdown table on stdout): ``dense``, ``prunepath`` at each τ,
``teal`` at each target, ``prunepath+down`` at each (τ, down target).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from prunepath_jax import text
from prunepath_jax.checkpoint import restore_model
from prunepath_jax.demo import calibration_batches
from prunepath_jax.eval import teal
from prunepath_jax.eval.perplexity import evaluate_lm
from prunepath_jax.eval.sweep import tokenize_stream
from prunepath_jax.runinfo import run_header


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="runs/demo/checkpoint")
    ap.add_argument("--taus", nargs="+", type=float, default=[1.05, 0.9, 0.8, 0.7, 0.6, 0.5])
    ap.add_argument("--teal", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    ap.add_argument("--down", nargs="+", type=float, default=[0.5, 0.75],
                    help="down-row threshold targets inside PrunePath's experts")  # fmt: skip
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--out", help="JSONL rows here as well")
    a = ap.parse_args()
    teal.check_sparsities([*a.teal, *a.down])
    restored = restore_model(a.checkpoint)
    model, tok = restored.model, restored.tokenizer
    docs = text.read_texts("shipped", split="validation")
    stream, n_bytes = tokenize_stream(tok, docs, max_tokens=a.eval_tokens, sep_id=tok.eos_id)
    t_by_p = teal.thresholds(model, calibration_batches(tok, a.calib_tokens), [*a.teal, *a.down])
    head = run_header(checkpoint=a.checkpoint, eval_tokens=a.eval_tokens)
    kw = dict(seq_len=512, batch_size=4, n_bytes=n_bytes)
    rows = []

    def add(method, res, **extra):
        row = {**head, "method": method, **extra, "ppl": res["ppl"], "bpb": res["bpb"],
               "sparsity": res["sparsity"], "n_tokens": res["n_tokens"]}  # fmt: skip
        rows.append(row)
        print(f"{method} {extra}: ppl {row['ppl']:.2f}, sparsity {row['sparsity']:.3f}",
              flush=True)  # fmt: skip
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    for tau in a.taus:
        add("prunepath", evaluate_lm(model, stream, tau=tau, **kw), tau=tau)
    for p in a.teal:
        with teal.teal_model(model, t_by_p[p]):
            add("teal", evaluate_lm(model, stream, tau=1.05, **kw), target=p)
    for p in a.down:
        t_l2 = np.stack([np.zeros(model.cfg.n_layers), t_by_p[p][:, 1]], axis=-1)
        with teal.teal_model(model, t_l2, route=True):
            for tau in a.taus:
                add("prunepath+down", evaluate_lm(model, stream, tau=tau, **kw), tau=tau, target=p)
    print("\n| method | τ | TEAL target | FFN bytes not read | perplexity |")
    print("|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["method"], r["sparsity"])):
        print(f"| {r['method']} | {r.get('tau', '')} | {r.get('target', '')} | "
              f"{r['sparsity']:.3f} | {r['ppl']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
