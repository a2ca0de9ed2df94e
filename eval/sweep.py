"""Perplexity against realised FFN sparsity over a tau sweep, with static top-k baselines.

One PrunePath checkpoint runs at any tau, so the interesting result is a curve, not a number:
for each tau the exact perplexity of a held-out text and the sparsity the router actually
achieved on it (which moves with the input, so it is measured, never assumed from tau). A
static top-k baseline (same experts, same router, k fixed) shows what the adaptive budget buys
at equal sparsity, and the dense model's perplexity is the line everything is compared to.

Artifacts (DESIGN.md: results are files that name commit, machine and command): `sweep.jsonl`
(every field, per-layer sparsity and k histograms included), `sweep.csv` (scalar fields),
`sweep.png` (perplexity vs sparsity) and `sweep.md` (a table under a header).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from flax import nnx

from prunepath_jax import text
from prunepath_jax.config import PrunePathConfig
from prunepath_jax.nn import PrunePathFFN
from prunepath_jax.routing import check_tau
from prunepath_jax.runinfo import run_header

from .perplexity import check_windows, evaluate_lm
from .teal import check_sparsities, teal_model, thresholds

DEFAULT_TAUS = (1.05, 0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5)
# Tau of the static top-k baseline: > 1 selects every expert, then the k_max clamp keeps the
# top k by router probability.
STATIC_TAU = 1.05
# Scalar columns of the CSV / markdown table, in order (per-layer lists live in the JSONL only).
SUMMARY_COLS = [
    "label", "ppl", "nll", "bpb", "sparsity", "k_mean", "k_p50", "k_p90", "k_p99",
    "flop_fraction", "n_tokens", "seconds",
]  # fmt: skip
_LIST_FIELDS = ("sparsity_per_layer", "k_mean_per_layer", "k_hist")


def tokenize_stream(
    tokenizer, docs: Sequence[str], *, max_tokens: int | None = None, sep_id: int | None = None
) -> tuple[np.ndarray, int]:
    """Joins tokenised documents into one stream, `sep_id` after each, capped at `max_tokens`.

    Returns the stream and the UTF-8 byte count of the text it covers (for bits per byte).
    Separators add tokens but no bytes. A document cut by the cap counts the bytes of its
    decoded prefix, which is exact for byte-level BPE up to a character split at the cut.
    """
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2 (one target needs two tokens), got {max_tokens}")
    parts, n_bytes, n = [], 0, 0
    for doc in docs:
        ids = list(tokenizer.encode(doc, add_special_tokens=False))
        if sep_id is not None:
            ids.append(sep_id)
        room = None if max_tokens is None else max_tokens - n
        if room is not None and len(ids) > room:
            ids = ids[:room]
            kept = ids[:-1] if sep_id is not None and ids and ids[-1] == sep_id else ids
            n_bytes += len(tokenizer.decode(kept).encode("utf-8"))
            parts.append(np.asarray(ids, np.int32))
            break
        n_bytes += len(doc.encode("utf-8"))
        parts.append(np.asarray(ids, np.int32))
        n += len(ids)
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return stream, n_bytes


def prunepath_ffns(model: nnx.Module) -> list[PrunePathFFN]:
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, PrunePathFFN)]


@contextlib.contextmanager
def static_top_k(model: nnx.Module, k: int) -> Iterator[None]:
    """Temporarily fixes every PrunePath FFN to exactly k experts (k_min = k_max = k).

    With tau > 1 the selection keeps every expert and the clamp cuts it to the top k by router
    probability: the classic static top-k router over the same experts. The clamps are static
    module attributes, so each k compiles once; the originals are restored on exit, errors
    included.
    """
    ffns = prunepath_ffns(model)
    if not ffns:
        raise ValueError("static top-k needs a PrunePath model")
    e = ffns[0].e
    if not 1 <= k <= e:
        raise ValueError(f"static k must be in [1, {e}], got {k}")
    saved = [(m.k_min, m.k_max) for m in ffns]
    try:
        for m in ffns:
            m.k_min = m.k_max = k
        yield
    finally:
        for m, (lo, hi) in zip(ffns, saved, strict=True):
            m.k_min, m.k_max = lo, hi


def check_sweep_args(
    model: nnx.Module, taus: Sequence[float], static_k: Sequence[int], teal: Sequence[float] = ()
) -> None:
    """Validates a sweep before minutes of evaluation, not in the middle: a PrunePath model,
    every tau valid (> 0, finite, right per-layer length), every static k in [1, E], every TEAL
    target sparsity in [0, 1)."""
    check_sparsities(teal)
    if model.cfg.prunepath is None:
        raise ValueError("a sweep needs a PrunePath model; convert it with to_prunepath first")
    for tau in taus:
        check_tau(tau, model.cfg.n_layers)
    e = model.cfg.n_experts
    bad_k = [k for k in static_k if not 1 <= int(k) <= e]
    if bad_k:
        raise ValueError(f"static k must be in [1, {e}], got {bad_k}")


def sweep(
    model: nnx.Module,
    tokenizer,
    text_source: str = "shipped",
    taus: Sequence[float] = DEFAULT_TAUS,
    *,
    split: str = "validation",
    seq_len: int = 512,
    batch_size: int = 4,
    max_tokens: int | None = None,
    static_k: Sequence[int] = (),
    teal: Sequence[float] = (),
    teal_down: Sequence[float] = (),
    teal_calib=None,
    out_dir: str | os.PathLike = "results/sweep",
    reference: nnx.Module | float | None = None,
    sep_id: int | None = None,
    meta: dict | None = None,
    progress: bool = True,
) -> list[dict]:
    """Evaluates a PrunePath model at every tau (and static k) and writes the artifacts.

    Args:
        model: a PrunePath causal LM.
        tokenizer: anything with `encode(text, add_special_tokens=False)`, `decode(ids)` and
            `eos_id` (our `Tokenizer`).
        text_source: a `text.read_texts` source ("shipped", a .txt/.jsonl path, a HF name).
        taus: budgets to evaluate, all validated before any work.
        split: the split of `text_source`.
        seq_len: evaluation window length.
        batch_size: windows per forward.
        max_tokens: cap on the stream length (CPU budgets); None evaluates the whole text.
        static_k: k values for static top-k baselines.
        teal: target sparsities of TEAL baselines (`teal`: magnitude thresholds on the same
            FFN weights, no router), calibrated on `teal_calib`.
        teal_down: targets of TEAL's down-row threshold inside PrunePath's selected experts
            (`teal.teal_model(route=True)`, no input threshold): each with every tau.
        teal_calib: `(tokens_bt, mask_bt)` calibration batches for `teal` (e.g.
            `demo.calibration_batches`: shipped training text, as the router initialisation).
        out_dir: where `sweep.{jsonl,csv,png,md}` go (overwritten).
        reference: the dense model (evaluated on the same stream, one "dense" row) or its
            perplexity; drawn as a horizontal line.
        sep_id: document separator token; default the tokenizer's EOS.
        meta: extra fields for every row (e.g. the model source).
        progress: progress bars and the final rich table.

    Returns:
        One dict per setting (dense first if evaluated, then taus, then static k, then TEAL).
    """
    check_sweep_args(model, taus, static_k, (*teal, *teal_down))
    if (teal or teal_down) and teal_calib is None:
        raise ValueError("TEAL baselines need calibration batches (teal_calib)")
    check_windows(seq_len, batch_size, max_tokens)
    docs = text.read_texts(text_source, split=split)
    sep = tokenizer.eos_id if sep_id is None else sep_id
    stream, n_bytes = tokenize_stream(tokenizer, docs, max_tokens=max_tokens, sep_id=sep)
    common = run_header(
        text=text_source,
        split=split,
        seq_len=seq_len,
        batch_size=batch_size,
        max_tokens=max_tokens,
        **(meta or {}),
    )
    kw = dict(seq_len=seq_len, batch_size=batch_size, n_bytes=n_bytes, progress=progress)
    rows = []

    def add(setting, label, res, tau=None, k=None):
        rows.append({**common, "setting": setting, "label": label, "tau": tau, "k": k, **res})
        if progress:
            note = " (compiled)" if res["compiled"] else ""
            print(
                f"{label}: ppl {res['ppl']:.3f}, sparsity {res['sparsity']:.3f}, "
                f"{res['seconds']:.1f} s{note}"
            )

    reference_ppl = reference if isinstance(reference, int | float) else None
    if isinstance(reference, nnx.Module):
        add("dense", "dense", evaluate_lm(reference, stream, **kw))
        reference_ppl = rows[-1]["ppl"]
    for tau in taus:
        res = evaluate_lm(model, stream, tau=tau, **kw)
        tau_row, label = _tau_label(tau)
        add("tau", label, res, tau=tau_row)
    for k in static_k:
        with static_top_k(model, int(k)):
            res = evaluate_lm(model, stream, tau=STATIC_TAU, **kw)
        add("static_k", f"top-{k}", res, tau=STATIC_TAU, k=int(k))
    targets = sorted({float(p) for p in (*teal, *teal_down)})
    t_by_p = thresholds(model, teal_calib, targets) if targets else {}
    for p in teal:
        with teal_model(model, t_by_p[float(p)]):
            res = evaluate_lm(model, stream, tau=STATIC_TAU, **kw)  # tau: unread by TEAL layers
        add("teal", teal_label(p), res)
    for p in teal_down:
        t_l2 = np.stack([np.zeros(model.cfg.n_layers), t_by_p[float(p)][:, 1]], axis=-1)
        with teal_model(model, t_l2, route=True):
            for tau in taus:
                res = evaluate_lm(model, stream, tau=tau, **kw)
                tau_row, label = _tau_label(tau)
                add("teal_down", f"{label}+down-{float(p):g}", res, tau=tau_row)
    write_artifacts(rows, out_dir, reference_ppl=reference_ppl)
    if progress:
        print_table(rows)
    return rows


def teal_label(target) -> str:
    """The label of TEAL's row at a target sparsity, ``teal-0.5`` (how callers find the row)."""
    return f"teal-{float(target):g}"


def _tau_label(tau) -> tuple[float | list[float], str]:
    """A row's tau (a per-layer tau as a list) and its label, ``tau=0.9`` or ``tau=0.9,0.8``."""
    tau_v = np.asarray(tau, np.float64)
    tau_row = float(tau_v) if tau_v.ndim == 0 else tau_v.tolist()
    return tau_row, "tau=" + ",".join(f"{x:g}" for x in tau_v.reshape(-1))


def write_artifacts(
    rows: list[dict], out_dir: str | os.PathLike, reference_ppl: float | None = None
) -> dict[str, Path]:
    """Writes `sweep.jsonl`, `sweep.csv`, `sweep.png` and `sweep.md`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"sweep.{ext}" for ext in ("jsonl", "csv", "png", "md")}
    with paths["jsonl"].open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    scalar_cols = [c for c in rows[0] if c not in _LIST_FIELDS] if rows else []
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=scalar_cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot_sweep(rows, paths["png"], reference_ppl=reference_ppl)
    paths["md"].write_text(markdown_report(rows, reference_ppl))
    return paths


def markdown_report(rows: list[dict], reference_ppl: float | None = None) -> str:
    """The table under a header naming what produced it."""
    first = rows[0] if rows else {}
    head = [
        "# PrunePath tau sweep",
        "",
        *(
            f"- {key}: `{first.get(key)}`"
            for key in ("date", "commit", "device", "host", "command", "model", "text", "split")
            if key in first
        ),
        f"- tokens scored: {first.get('n_tokens')}, bytes: {first.get('n_bytes')}, "
        f"window {first.get('seq_len')}, batch {first.get('batch_size')}",
    ]
    if reference_ppl is not None:
        head.append(f"- dense reference perplexity: {reference_ppl:.4f}")
    lines = ["| " + " | ".join(SUMMARY_COLS) + " |", "|" + "---|" * len(SUMMARY_COLS)]
    for r in rows:
        cells = [_fmt(r.get(c)) for c in SUMMARY_COLS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(head + ["", *lines, ""])


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def plot_sweep(rows: list[dict], path: str | os.PathLike, reference_ppl=None) -> None:
    """Perplexity (log scale: it grows fast at high sparsity) against realised sparsity."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.add_subplot()
    taus = sorted((r for r in rows if r["setting"] == "tau"), key=lambda r: r["sparsity"])
    if taus:
        xs, ys = [r["sparsity"] for r in taus], [r["ppl"] for r in taus]
        ax.plot(xs, ys, "o-", label="PrunePath (tau sweep)")
        for r in taus:
            ax.annotate(
                r["label"].removeprefix("tau="),
                (r["sparsity"], r["ppl"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    static = [r for r in rows if r["setting"] == "static_k"]
    if static:
        ax.plot(
            [r["sparsity"] for r in static], [r["ppl"] for r in static], "s", label="static top-k"
        )
        for r in static:
            ax.annotate(
                f"k={r['k']}",
                (r["sparsity"], r["ppl"]),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=7,
            )
    down = sorted((r for r in rows if r["setting"] == "teal_down"), key=lambda r: r["sparsity"])
    for target in sorted({r["label"].rsplit("+down-", 1)[1] for r in down}):
        pts = [r for r in down if r["label"].endswith(f"+down-{target}")]
        ax.plot([r["sparsity"] for r in pts], [r["ppl"] for r in pts], "o:",
                label=f"PrunePath + TEAL down rows ({target})")  # fmt: skip
    teal = sorted((r for r in rows if r["setting"] == "teal"), key=lambda r: r["sparsity"])
    if teal:
        ax.plot([r["sparsity"] for r in teal], [r["ppl"] for r in teal], "^--",
                label="TEAL (FFN, magnitude thresholds)")  # fmt: skip
    if reference_ppl is not None:
        ax.axhline(reference_ppl, color="gray", linestyle="--", label="dense")
    if any(r["ppl"] > 0 for r in rows):
        ax.set_yscale("log")
    ax.set_xlabel("realised FFN sparsity (weight bytes not read: 1 - mean k/E)")
    ax.set_ylabel("perplexity")
    first = rows[0] if rows else {}
    ax.set_title(
        f"{first.get('model', '')} on {first.get('text', '')} [{first.get('commit', '')}]",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="PrunePath sweep")
    for c in SUMMARY_COLS:
        table.add_column(c, justify="left" if c == "label" else "right")
    for r in rows:
        table.add_row(*(_fmt(r.get(c)) for c in SUMMARY_COLS))
    console = Console()
    if not console.is_terminal:  # logs and pipes: rich would squeeze the table into 80 columns
        console = Console(width=200)
    console.print(table)


@dataclasses.dataclass
class LoadedForSweep:
    """What the sweep needs from a checkpoint."""

    model: nnx.Module
    tokenizer: object
    source: str
    dense: nnx.Module | None  # the dense model it came from, when available (reference line)


def load_for_sweep(
    path: str, *, dtype: str = "float32", pp: PrunePathConfig | None = None
) -> LoadedForSweep:
    """Loads the model to sweep.

    A prunepath_jax checkpoint (`prunepath convert`, training) is restored as is; its dense
    reference is the `source` recorded in its metadata when that still loads (the embedded
    default, an HF directory or a GGUF file). A dense model is converted on the fly with `pp`
    (zero routers).
    """
    import jax.numpy as jnp

    from prunepath_jax.convert import to_prunepath
    from prunepath_jax.loading import load_any, load_pretrained

    pre = load_any(path, dtype=getattr(jnp, dtype))
    if pre.tokenizer is None:
        raise ValueError(f"{path}: no tokenizer found; the sweep needs one to tokenise text")
    if pre.config.prunepath is not None:
        dense = None
        source = (pre.metadata or {}).get("source")
        if source is not None:
            try:
                dense = load_pretrained(source, dtype=getattr(jnp, dtype), progress=False).model
            except (FileNotFoundError, ValueError):
                dense = None
        return LoadedForSweep(pre.model, pre.tokenizer, pre.source, dense)
    model, _ = to_prunepath(pre.model, pp)
    return LoadedForSweep(model, pre.tokenizer, pre.source, pre.model)


@dataclasses.dataclass
class SweepArgs:
    """Perplexity and realised FFN sparsity of a PrunePath model over a tau sweep."""

    checkpoint: str = "default"
    """Model to sweep: a prunepath_jax checkpoint (`prunepath convert`), or "default"
    (SmolLM2-135M-Instruct), an HF directory or a .gguf file, converted on the fly (zero routers;
    see group_size and gate)."""
    text: str = "shipped"
    """Evaluation text: "shipped", a .txt/.jsonl file, or a Hugging Face dataset name."""
    split: str = "validation"
    taus: tuple[float, ...] = DEFAULT_TAUS
    static_k: tuple[int, ...] = ()
    """k values of static top-k baselines (same experts and router, k fixed)."""
    teal: tuple[float, ...] = ()
    """Target sparsities of TEAL baselines (magnitude thresholds on the same FFN weights, no
    router; calibrated on shipped training text, as the router initialisation)."""
    teal_down: tuple[float, ...] = ()
    """Targets of TEAL's down-row threshold inside PrunePath's selected experts, each swept
    over every tau (contiguous W_down rows skipped: fewer bytes at nearly the same quality)."""
    teal_calib_tokens: int = 8192
    """Calibration tokens of the TEAL thresholds."""
    seq_len: int = 512
    batch_size: int = 4
    max_tokens: int | None = 16384
    """Cap on evaluated tokens (keeps CPU runs short); None evaluates the whole text."""
    out_dir: str = "results/sweep"
    dtype: Literal["float32", "bfloat16"] = "float32"
    group_size: int = 32
    """Neurons per expert when converting a dense model on the fly."""
    gate: Literal["sigmoid", "none"] = "none"
    """Gate of an on-the-fly conversion. "none" because an untrained zero router with sigmoid
    gates scales every expert by 0.5, which measures the missing fine-tuning, not the routing."""
    dense_reference: bool = True
    """Also evaluate the dense model (when available) for the reference line."""

    def run(self) -> list[dict]:
        # what can be checked without the model, before loading (and maybe converting) it
        check_windows(self.seq_len, self.batch_size, self.max_tokens)
        for tau in self.taus:
            check_tau(tau)
        text.local_text_path(self.text, self.split)  # a wrong path fails here, not after the load
        if any(int(k) < 1 for k in self.static_k):  # the upper bound (E) needs the model
            raise ValueError(f"static k must be >= 1, got {list(self.static_k)}")
        check_sparsities((*self.teal, *self.teal_down))
        if (self.teal or self.teal_down) and self.teal_calib_tokens < 1:
            raise ValueError(f"teal_calib_tokens must be >= 1, got {self.teal_calib_tokens}")
        pp = PrunePathConfig(group_size=self.group_size, gate=self.gate)
        loaded = load_for_sweep(self.checkpoint, dtype=self.dtype, pp=pp)
        teal_calib = None
        if self.teal or self.teal_down:
            from prunepath_jax.demo import calibration_batches

            teal_calib = calibration_batches(loaded.tokenizer, self.teal_calib_tokens)
        return sweep(
            loaded.model,
            loaded.tokenizer,
            self.text,
            self.taus,
            split=self.split,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            max_tokens=self.max_tokens,
            static_k=self.static_k,
            teal=self.teal,
            teal_down=self.teal_down,
            teal_calib=teal_calib,
            out_dir=self.out_dir,
            reference=loaded.dense if self.dense_reference else None,
            meta={"model": loaded.source, "dtype": self.dtype},
        )
