"""Exact perplexity of a whole token stream, with the realised PrunePath sparsity alongside.

The stream is cut into non-overlapping windows (`text.eval_windows`), so every target is scored
exactly once and the reported perplexity is that of the whole stream, not an average of window
averages. One jitted forward per batch returns only *sums* (masked NLL, token count, per-layer
sum of k and a per-layer histogram of k); the host adds them up in float64. Because tau travels
in `ffn_args` as traced arrays and the batch shape is fixed (the last batch is padded with fully
masked rows), a whole tau sweep compiles the forward once. Changing a static module attribute
(e.g. the k clamps of a static top-k baseline) changes the graphdef and compiles once more.

Routing statistics are taken over the *scored* positions only (mask = 1): padding never counts,
and neither would context re-read by an overlapping stride. The k histogram is exact, so the
percentiles computed from it on the host are exact too (no sampling, no streaming estimate).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from prunepath_jax import flatjit, text
from prunepath_jax.config import ModelConfig
from prunepath_jax.nn import route_args

PERCENTILES = (50, 90, 99)

# Incremented each time `_batch_sums` is traced (i.e. compiled for a new graphdef or shape).
# Tests read it through `trace_count()` to prove a tau sweep compiles the forward once.
_TRACES = [0]


def trace_count() -> int:
    """How many times the evaluation forward has been traced in this process."""
    return _TRACES[0]


def _batch_sums(graphdef, state, inputs_bt, targets_bt, mask_bt, ffn_args) -> dict:
    """Masked NLL sum, token count and routing aggregates of one batch (all sums, no means).

    Sums rather than means so that the host can add batches exactly; the histogram has E + 1
    bins (k = 0..E) so that percentiles of k are exact on the host. Compiled through
    `flatjit.bind` (the graph hashed once per evaluation, not once per batch).
    """
    _TRACES[0] += 1
    model = nnx.merge(graphdef, state)
    out = model(inputs_bt, ffn_args=ffn_args)
    m_bt = mask_bt.astype(jnp.float32)
    logits_btv = out.logits.astype(jnp.float32)
    # logsumexp - target logit: the same value as -log_softmax[target], without a second
    # vocabulary-sized array.
    lse_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    tgt_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    sums = {"nll": jnp.sum((lse_bt - tgt_bt) * m_bt), "count": jnp.sum(m_bt)}
    return {**sums, **routing_sums(out.ffn_stats, m_bt, model.cfg.n_experts)}


def routing_sums(ffn_stats, mask_bt: jax.Array, e: int) -> dict:
    """Per-layer k sums and k histograms (E + 1 bins) over the real tokens of one batch; empty
    for a dense model. `summarize` turns the totals into sparsity and exact k percentiles.
    TEAL layers (`teal.TealStats`) give per-layer sums of the weight-byte fraction read."""
    stats = [s for s in ffn_stats if s is not None]
    if not stats:
        return {}
    if hasattr(stats[0], "read_t"):
        read_lbt = jnp.stack([s.read_t for s in stats])
        return {"read_sum_l": jnp.sum(read_lbt * mask_bt, axis=(1, 2))}
    k_lbt = jnp.stack([s.k_t for s in stats])
    onehot_lbtk = jax.nn.one_hot(k_lbt, e + 1, dtype=jnp.float32)
    return {
        "k_sum_l": jnp.sum(k_lbt.astype(jnp.float32) * mask_bt, axis=(1, 2)),
        "k_hist_lk": jnp.sum(onehot_lbtk * mask_bt[None, ..., None], axis=(1, 2)),
    }


def _is_prunepath(model: nnx.Module) -> bool:
    return model.cfg.prunepath is not None


def _args_builder(
    cfg: ModelConfig, tau, ffn_args_fn: Callable[[jax.Array], Any] | None
) -> Callable[[jax.Array], Any]:
    """`mask_bt -> ffn_args`. tau is validated once here, so a bad value fails before any work."""
    if cfg.prunepath is None:
        return lambda mask_bt: None
    if (tau is None) == (ffn_args_fn is None):
        raise ValueError("a PrunePath model needs exactly one of tau or ffn_args_fn")
    if ffn_args_fn is not None:
        return ffn_args_fn
    base = route_args(cfg, tau)  # validates tau (ValueError on <= 0, NaN, wrong length)
    return lambda mask_bt: tuple(a._replace(token_mask=mask_bt) for a in base)


def k_percentile(hist_k: np.ndarray, q: float) -> int:
    """Nearest-rank percentile of k from a histogram over k = 0..E: the smallest k whose
    cumulative count reaches q% of the tokens (an actual k value, never an interpolation)."""
    cum = np.cumsum(hist_k)
    if cum[-1] <= 0:
        raise ValueError("empty histogram")
    return int(np.searchsorted(cum, q / 100.0 * cum[-1], side="left"))


def ffn_flop_fraction(cfg: ModelConfig, k_mean: float) -> float:
    """Executed FFN FLOPs (experts + router) over the dense FFN's FLOPs, per token.

    Dense FFN: `c*d*f + f*d` multiply-adds (c = 2 for SwiGLU's gate and up, 1 for a GELU MLP).
    PrunePath runs k of E equal experts, `k/E` of that, plus the router's `d*E`. This is the
    work a kernel that skips unselected experts does; the XLA "masked" path computes all of it.
    """
    if cfg.prunepath is None:
        return 1.0
    d, f, e = cfg.d_model, cfg.d_ff, cfg.n_experts
    c = 2 if cfg.activation == "silu" else 1
    return k_mean / e + d * e / (c * d * f + f * d)


def summarize(cfg: ModelConfig, totals: dict, n_bytes: int | None) -> dict:
    """Turns the summed aggregates into the reported metrics (pure host arithmetic)."""
    n = float(totals["count"])
    if n <= 0:
        raise ValueError("no token was scored (empty or one-token stream?)")
    nll = float(totals["nll"]) / n
    res = {
        "ppl": math.exp(nll),
        "nll": nll,
        "bpb": None if n_bytes is None else float(totals["nll"]) / math.log(2) / n_bytes,
        "n_tokens": int(round(n)),
        "n_bytes": n_bytes,
        "n_experts": cfg.n_experts,
    }
    if "read_sum_l" in totals:  # TEAL: the FFN weight bytes not read, no experts
        read_l = np.asarray(totals["read_sum_l"], np.float64) / n
        res.update(
            sparsity=float(1.0 - read_l.mean()),
            sparsity_per_layer=[float(1.0 - r) for r in read_l],
            k_mean=None,
            k_mean_per_layer=None,
            **{f"k_p{q}": None for q in PERCENTILES},
            k_hist=None,
            flop_fraction=float(read_l.mean()),
        )
        return res
    if "k_sum_l" not in totals:
        res.update(
            sparsity=0.0,
            sparsity_per_layer=[0.0] * cfg.n_layers,
            k_mean=None,
            k_mean_per_layer=None,
            **{f"k_p{q}": None for q in PERCENTILES},
            k_hist=None,
            flop_fraction=1.0,
        )
        return res
    e = cfg.n_experts
    k_mean_l = np.asarray(totals["k_sum_l"], np.float64) / n
    hist_lk = np.rint(np.asarray(totals["k_hist_lk"], np.float64)).astype(np.int64)
    k_mean = float(k_mean_l.mean())  # every layer sees the same tokens: the mean of means
    res.update(
        sparsity=1.0 - k_mean / e,
        sparsity_per_layer=[float(1.0 - k / e) for k in k_mean_l],
        k_mean=k_mean,
        k_mean_per_layer=[float(k) for k in k_mean_l],
        **{f"k_p{q}": k_percentile(hist_lk.sum(0), q) for q in PERCENTILES},
        k_hist=hist_lk.tolist(),
        flop_fraction=ffn_flop_fraction(cfg, k_mean),
    )
    return res


def check_windows(seq_len: int, batch_size: int, max_tokens: int | None = None) -> None:
    """Raises ValueError unless the windows score something: a window needs a token and its
    successor (seq_len ≥ 2), a batch a window, a token cap two tokens. (seq_len 0 was a
    ZeroDivisionError deep in the window loop.)"""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a token and the one it predicts), got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be None or >= 2, got {max_tokens}")


def evaluate_lm(
    model: nnx.Module,
    token_ids_1d: np.ndarray | Sequence[int],
    *,
    seq_len: int = 512,
    batch_size: int = 4,
    tau=None,
    ffn_args_fn: Callable[[jax.Array], Any] | None = None,
    n_bytes: int | None = None,
    bos_id: int | None = None,
    pad_id: int = 0,
    progress: bool = False,
) -> dict:
    """Exact masked NLL, perplexity, bits per byte and realised sparsity over a token stream.

    Args:
        model: a causal LM (`LlamaModel`, `GPT2Model`), dense or PrunePath.
        token_ids_1d: the whole stream (documents already joined with their separators).
        seq_len: window length; windows do not overlap, so the first token of each window is
            predicted without context from the previous one (as in the usual "chunked" ppl).
        batch_size: windows per forward; the last batch is padded with masked rows.
        tau: PrunePath budget, a scalar or a per-layer `[L]` vector (validated here: <= 0 or
            NaN raise ValueError). Ignored for a dense model.
        ffn_args_fn: instead of tau, `mask_bt -> ffn_args` for custom routing arguments; keep
            its pytree structure fixed or each new structure compiles again.
        n_bytes: UTF-8 byte count of the evaluated text; gives bits per byte (`bpb`), which is
            comparable across tokenizers, unlike perplexity.
        bos_id: prepended so that the stream's first token is also scored.
        pad_id: filler id of padded positions (never scored).
        progress: show a progress bar over batches.

    Returns:
        A dict: `ppl`, `nll` (nats/token), `bpb` (None without n_bytes), `n_tokens`, `n_bytes`,
        `sparsity` and `sparsity_per_layer`, `k_mean`, `k_mean_per_layer`, `k_p50`, `k_p90`,
        `k_p99`, `k_hist` (`[L][E+1]` counts), `flop_fraction`, `n_experts`, `seconds` (wall,
        compilation included when it happened) and `compiled` (whether this call traced).
    """
    cfg: ModelConfig = model.cfg
    check_windows(seq_len, batch_size)
    if seq_len > cfg.max_position:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_position {cfg.max_position}")
    make_args = _args_builder(cfg, tau, ffn_args_fn)
    fn, leaves = flatjit.bind(_batch_sums, *nnx.split(model))
    traces0, t0 = trace_count(), time.perf_counter()
    batches = text.iterate_windows(token_ids_1d, seq_len, batch_size, pad_id=pad_id, bos_id=bos_id)
    n_targets = len(token_ids_1d) - (bos_id is None)
    n_batches = -(-max(1, -(-n_targets // seq_len)) // batch_size)
    totals: dict[str, Any] = {"nll": 0.0, "count": 0.0}

    def add(sums):  # host sums in float64
        for key, val in jax.device_get(sums).items():
            totals[key] = totals.get(key, 0.0) + np.asarray(val, np.float64)

    pending = None
    for win in tqdm(batches, total=n_batches, disable=not progress, desc="eval", leave=False):
        mask_bt = jnp.asarray(win.mask, jnp.float32)
        sums = fn(
            leaves,
            jnp.asarray(win.inputs),
            jnp.asarray(win.targets),
            mask_bt,
            make_args(mask_bt),
        )
        # Dispatch is asynchronous: batch i is dispatched before batch i - 1 is fetched, so the
        # host prepares the next batch while the device works, and the progress bar is honest.
        if pending is not None:
            add(pending)
        pending = sums
    if pending is not None:
        add(pending)
    res = summarize(cfg, totals, n_bytes)
    res["seconds"] = time.perf_counter() - t0
    res["compiled"] = trace_count() > traces0
    return res
