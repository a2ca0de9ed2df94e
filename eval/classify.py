"""Classification accuracy with the realised PrunePath sparsity alongside, and a tau sweep of it.

Works for BERT/RoBERTa classifiers (logits from `[CLS]`/`<s>`, padding masked in attention, token
types when the batches carry them) and for decoders with a sequence-classification head (logits
at each row's `last_index`). Batches follow `train.data`'s contract. As in `eval.perplexity`, one
jitted forward per batch returns only sums (correct, NLL, confusion counts, per-layer k sums and
k histograms over real tokens); tau travels as traced arrays, so a whole sweep compiles once per
batch shape. Rows with `example_mask` 0 (the filler rows of `TaskData.eval_batches`) count
nowhere, their tokens included.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from prunepath_jax import flatjit
from prunepath_jax.runinfo import run_header

from .perplexity import _args_builder, routing_sums, summarize
from .sweep import STATIC_TAU, _fmt, check_sweep_args, static_top_k

# Incremented each time `_cls_sums` is traced; tests prove a sweep compiles once with it.
_TRACES = [0]
SUMMARY_COLS = [
    "label", "accuracy", "nll", "sparsity", "k_mean", "k_p50", "k_p90", "k_p99",
    "flop_fraction", "n", "n_tokens", "seconds",
]  # fmt: skip
_LIST_FIELDS = ("sparsity_per_layer", "k_mean_per_layer", "k_hist", "confusion")


def trace_count() -> int:
    """How many times the classification forward has been traced in this process."""
    return _TRACES[0]


def _cls_sums(graphdef, state, batch: dict, ffn_args) -> dict:
    """Sums of one batch: correct predictions, NLL, confusion counts and routing aggregates."""
    _TRACES[0] += 1
    model = nnx.merge(graphdef, state)
    tokens_bt = batch["tokens"]
    w_b = batch.get("example_mask", jnp.ones(tokens_bt.shape[:1], jnp.float32))
    mask_bt = batch["token_mask"] * w_b[:, None]
    if model.cfg.family == "bert":
        out = model(
            tokens_bt, mask_bt.astype(jnp.int32), batch.get("token_types"), ffn_args=ffn_args
        )
    else:
        out = model(tokens_bt, ffn_args=ffn_args, logit_index_b=batch["last_index"])
    logits_bl = out.logits.astype(jnp.float32)
    labels_b = batch["labels"]
    n_labels = logits_bl.shape[-1]
    nll_b = (
        jax.nn.logsumexp(logits_bl, -1)
        - jnp.take_along_axis(logits_bl, labels_b[:, None], -1)[:, 0]
    )
    pred_b = jnp.argmax(logits_bl, -1)
    conf_ll = jnp.einsum(
        "b,bi,bj->ij",
        w_b,
        jax.nn.one_hot(labels_b, n_labels, dtype=jnp.float32),
        jax.nn.one_hot(pred_b, n_labels, dtype=jnp.float32),
    )
    sums = {
        "n": jnp.sum(w_b),
        "correct": jnp.sum(w_b * (pred_b == labels_b)),
        "nll_sum": jnp.sum(w_b * nll_b),
        "confusion": conf_ll,
        "nll": jnp.float32(0.0),  # `summarize` wants these two names (token NLL: none here)
        "count": jnp.sum(mask_bt),
    }
    return {**sums, **routing_sums(out.ffn_stats, mask_bt, model.cfg.n_experts)}


def evaluate_classification(
    model: nnx.Module,
    batches: Iterable[dict],
    tau=None,
    *,
    ffn_args_fn: Callable[[jax.Array], Any] | None = None,
    progress: bool = False,
) -> dict:
    """Accuracy, mean NLL and realised sparsity of a classifier over `batches`.

    Args:
        model: `BertModel` with a head (`num_labels > 0`) or a decoder classifier (GPT-2 `score`
            head), dense or PrunePath.
        batches: `train.data` batches (`TaskData.eval_batches()` for a one-pass evaluation).
        tau: PrunePath budget, scalar or per-layer `[L]` (validated); ignored for a dense model.
        ffn_args_fn: instead of tau, `token_mask_bt -> ffn_args`.
        progress: a progress bar over batches.

    Returns:
        `accuracy`, `nll` (mean cross-entropy), `n` (examples), `confusion` (`[labels][labels]`,
        rows true, columns predicted), `n_tokens`, and the routing fields of
        `eval.perplexity.summarize` (`sparsity`, `sparsity_per_layer`, `k_mean`, `k_p50/90/99`,
        `k_hist`, `flop_fraction`, `n_experts`), `seconds`, `compiled`.
    """
    cfg = model.cfg
    if not cfg.num_labels:
        raise ValueError("evaluate_classification needs a classifier (model.cfg.num_labels > 0)")
    make_args = _args_builder(cfg, tau, ffn_args_fn)
    fn, leaves = flatjit.bind(_cls_sums, *nnx.split(model))  # the graph hashed once
    traces0, t0 = trace_count(), time.perf_counter()
    totals: dict[str, Any] = {}

    def add(sums):  # host sums in float64
        for key, val in jax.device_get(sums).items():
            totals[key] = totals.get(key, 0.0) + np.asarray(val, np.float64)

    pending = None
    for batch in tqdm(batches, disable=not progress, desc="eval cls", leave=False):
        dev = {k: jnp.asarray(v) for k, v in batch.items()}
        w_b = dev.get("example_mask", jnp.ones(dev["tokens"].shape[:1], jnp.float32))
        sums = fn(leaves, dev, make_args(dev["token_mask"] * w_b[:, None]))
        if pending is not None:
            add(pending)
        pending = sums
    if pending is not None:
        add(pending)
    n = float(totals.get("n", 0.0))
    if n <= 0:
        raise ValueError("no example was evaluated (empty batches?)")
    res = summarize(cfg, totals, None)
    for key in ("ppl", "nll", "bpb", "n_bytes"):
        res.pop(key)
    res.update(
        accuracy=float(totals["correct"]) / n,
        nll=float(totals["nll_sum"]) / n,
        n=int(round(n)),
        confusion=np.rint(totals["confusion"]).astype(np.int64).tolist(),
        seconds=time.perf_counter() - t0,
        compiled=trace_count() > traces0,
    )
    return res


def classification_sweep(
    model: nnx.Module,
    data,
    taus: Sequence[float],
    *,
    static_k: Sequence[int] = (),
    reference: nnx.Module | None = None,
    out_dir: str | os.PathLike = "results/cls_sweep",
    meta: dict | None = None,
    progress: bool = True,
) -> list[dict]:
    """Accuracy against realised sparsity over a tau sweep (plus static top-k and dense rows).

    Args:
        model: a PrunePath classifier.
        data: a `train.data.TaskData` (its `eval_batches()` are used) or a sequence of batches.
        taus: budgets, all validated before any work.
        static_k: k values of static top-k baselines (same experts and router, k fixed).
        reference: the dense classifier, evaluated on the same batches as a "dense" row.
        out_dir: where `cls_sweep.{jsonl,csv,md,png}` go (overwritten).
        meta: extra fields for every row (e.g. the model and data source).
        progress: print a line per setting.

    Returns:
        One dict per setting (dense first if given, then taus, then static k).
    """
    check_sweep_args(model, taus, static_k)
    batches = list(data.eval_batches() if hasattr(data, "eval_batches") else data)
    extra = {}
    if hasattr(data, "config"):
        extra = {"data_kind": data.kind, "seq_len": data.seq_len, "batch_size": data.batch_size}
    common = run_header(**extra, **(meta or {}))
    rows: list[dict] = []

    def add(setting, label, res, tau=None, k=None):
        rows.append({**common, "setting": setting, "label": label, "tau": tau, "k": k, **res})
        if progress:
            note = " (compiled)" if res["compiled"] else ""
            print(f"{label}: accuracy {res['accuracy']:.4f}, sparsity {res['sparsity']:.3f}, "
                  f"{res['seconds']:.1f} s{note}")  # fmt: skip

    if reference is not None:
        add("dense", "dense", evaluate_classification(reference, batches))
    for tau in taus:
        tau_v = np.asarray(tau, np.float64)
        tau_row = float(tau_v) if tau_v.ndim == 0 else tau_v.tolist()
        label = "tau=" + ",".join(f"{x:g}" for x in tau_v.reshape(-1))
        add("tau", label, evaluate_classification(model, batches, tau=tau), tau=tau_row)
    for k in static_k:
        with static_top_k(model, int(k)):
            res = evaluate_classification(model, batches, tau=STATIC_TAU)
        add("static_k", f"top-{k}", res, tau=STATIC_TAU, k=int(k))
    write_artifacts(rows, out_dir)
    return rows


def write_artifacts(rows: list[dict], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes `cls_sweep.jsonl` (everything), `.csv` (scalars), `.md` (table) and `.png`."""
    import csv

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"cls_sweep.{ext}" for ext in ("jsonl", "csv", "md", "png")}
    with paths["jsonl"].open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    cols = [c for c in rows[0] if c not in _LIST_FIELDS] if rows else []
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    paths["md"].write_text(markdown_report(rows))
    _plot(rows, paths["png"])
    return paths


def markdown_report(rows: list[dict]) -> str:
    """The table under a header naming what produced it."""
    first = rows[0] if rows else {}
    head = ["# PrunePath classification sweep", ""] + [
        f"- {key}: `{first.get(key)}`"
        for key in ("date", "commit", "device", "host", "command", "model", "data", "split")
        if key in first
    ]
    head.append(f"- examples: {first.get('n')}, batch {first.get('batch_size')}")
    lines = ["| " + " | ".join(SUMMARY_COLS) + " |", "|" + "---|" * len(SUMMARY_COLS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in SUMMARY_COLS) + " |" for r in rows]
    return "\n".join(head + ["", *lines, ""])


def _plot(rows: list[dict], path: Path) -> None:
    """Accuracy against realised sparsity (Agg canvas, no pyplot global state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.add_subplot()
    taus = sorted((r for r in rows if r["setting"] == "tau"), key=lambda r: r["sparsity"])
    if taus:
        ax.plot([r["sparsity"] for r in taus], [r["accuracy"] for r in taus], "o-",
                label="PrunePath (tau sweep)")  # fmt: skip
    static = [r for r in rows if r["setting"] == "static_k"]
    if static:
        ax.plot([r["sparsity"] for r in static], [r["accuracy"] for r in static], "s",
                label="static top-k")  # fmt: skip
    for r in rows:
        if r["setting"] == "dense":
            ax.axhline(r["accuracy"], color="gray", linestyle="--", label="dense")
    ax.set_xlabel("realised FFN sparsity (1 - mean k/E)")
    ax.set_ylabel("accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
