"""Shared benchmark plumbing: machine/commit header, timing, copy bandwidth, result rows."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from prunepath_jax import routing
from prunepath_jax.runinfo import run_header


def header() -> dict:
    """Date, commit, machine and command of this run (every result row carries it)."""
    return run_header()


# The kernel paths' grouped-GEMM backward tunings, by the label the training benchmarks use
# (`ffn_grad.py --paths`, `train_step.py --ffn`): weight gradients as dense GEMMs (the shipped
# form), by the grouped kernel, or the whole backward in XLA.
GROUPED_PATHS = {
    "kernels": {"backward": "grouped"},
    "kernels-dw": {"backward": "grouped", "weight_grads": "grouped"},
    "kernels-xla-bwd": {"backward": "xla"},
}


@contextlib.contextmanager
def _patched(obj, name: str, value):
    """``obj.name = value`` inside the block, the shipped value back afterwards."""
    shipped = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, shipped)


def router_logits_mode(mode: str):
    """Every path's router logits, for an A/B within one run: ``"shared"`` is
    `routing.router_logits` as shipped (the tensor-core split for bf16 prefill on CUDA),
    ``"fp32"`` the fp32 GEMM at every size (what every path used before the split). Read when a
    function is traced: trace (jit) inside the block."""
    if mode not in ("shared", "fp32"):
        raise ValueError(f"router logits mode must be 'shared' or 'fp32', got {mode!r}")
    shipped = routing.BF16X3_MIN_TOKENS
    return _patched(routing, "BF16X3_MIN_TOKENS", shipped if mode == "shared" else 1 << 62)


def router_backward(mode: str):
    """The bf16 router logits' backward, for an A/B within one run: ``"split"`` as shipped
    (tensor-core GEMMs, `routing._bf16x3_bwd`), ``"fp32"`` the fp32 GEMMs it replaced. Read
    when a function is traced: trace (jit) inside the block."""
    if mode not in ("split", "fp32"):
        raise ValueError(f"router backward must be 'split' or 'fp32', got {mode!r}")
    return _patched(routing, "BF16X3_BACKWARD", mode == "split")


def kernel_logits(mode: str):
    """The kernel path's router logits, for an A/B within one run: ``"shared"`` as shipped (the
    registry routes from the layer's own logits and normalised tokens), ``"recomputed"`` the
    registry's second logits product, RMSNorm and their backward per layer they replaced. Read
    when a function is traced."""
    from prunepath_jax import nn

    if mode not in ("shared", "recomputed"):
        raise ValueError(f"kernel logits must be 'shared' or 'recomputed', got {mode!r}")
    return _patched(nn, "SHARE_KERNEL_LOGITS", mode == "shared")


@contextlib.contextmanager
def backward_precision(mode: str):
    """The bf16 training step's backward products, for an A/B within one run: ``"shipped"``
    (the router split's and the LM head's backward on bf16 tensor cores), ``"fp32"`` the float32
    products both replaced (before the fifty-first session). Read when a function is traced."""
    from prunepath_jax.models import layers

    if mode not in ("shipped", "fp32"):
        raise ValueError(f"backward precision must be 'shipped' or 'fp32', got {mode!r}")
    with _patched(layers, "LOGITS_BACKWARD_IN_OPERAND_DTYPE", mode == "shipped"), \
            router_backward("split" if mode == "shipped" else "fp32"):  # fmt: skip
        yield


@contextlib.contextmanager
def grouped_tuning(**tuning):
    """`triton_grouped.DEFAULT_TUNING` with ``tuning`` on top (a backward form, a program
    order, tiles), the shipped values back afterwards. Read when a function is traced: trace
    (jit) inside the block."""
    from prunepath_jax.kernels import triton_grouped

    shipped = dict(triton_grouped.DEFAULT_TUNING)
    triton_grouped.DEFAULT_TUNING.update(tuning)
    try:
        yield
    finally:
        triton_grouped.DEFAULT_TUNING.clear()
        triton_grouped.DEFAULT_TUNING.update(shipped)


def apply_proj_tuning(tuning: dict) -> str:
    """Makes ``tuning`` (``kernels.pallas_proj`` keys, plus an optional ``"w_layout"``, as
    ``benchmarks/proj_gemv.py --best-out`` writes it) the projection kernel's overrides; returns
    the weight layout to pass to ``set_projections``."""
    from prunepath_jax.kernels import pallas_proj

    tn = dict(tuning)
    layout = tn.pop("w_layout", "nd")
    pallas_proj.TUNING_OVERRIDES.update(tn)
    return layout


def time_fn(fn, *args, warmup: int = 2, iters: int = 10) -> float:
    """Median wall seconds of `fn(*args)` with `block_until_ready` (device work included)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def device_events(trace_dir: str | os.PathLike) -> list[dict]:
    """Complete ('X') events on the GPU kernel timelines of the Perfetto trace that
    ``jax.profiler.trace(..., create_perfetto_trace=True)`` wrote under ``trace_dir``; each
    carries its ``thread`` name. Kernel timelines are the "Stream" threads (other GPU lines, XLA
    ops and modules, span them); all GPU events if a trace names no streams."""
    import gzip

    files = sorted(Path(trace_dir).rglob("*.trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"the profiler wrote no *.trace.json.gz under {trace_dir}")
    data = json.loads(gzip.open(files[-1]).read())
    events = data["traceEvents"] if isinstance(data, dict) else data
    meta = [e for e in events if e.get("ph") == "M"]
    gpu = {e["pid"] for e in meta if e.get("name") == "process_name" and "GPU" in e["args"]["name"]}
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"] for e in meta if e.get("name") == "thread_name"
    }
    dev = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e]
    for e in dev:
        e["thread"] = threads.get((e["pid"], e["tid"]), "?")
    return [e for e in dev if "Stream" in e["thread"]] or dev


def traced_events(fn, *args, log_dir: str = "/tmp/prunepath_trace") -> list[dict]:
    """The device kernel events (:func:`device_events`) of one call ``fn(*args)`` under the
    profiler. ``fn`` should be compiled and warm already."""
    import shutil

    shutil.rmtree(log_dir, ignore_errors=True)
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        jax.block_until_ready(fn(*args))
    return device_events(log_dir)


def busy_and_span(events: list[dict]) -> tuple[float, float]:
    """``(busy, span)`` µs of kernel events: their own durations summed, and the first start to
    the last end (what a chain takes on the device, launch gaps included, host noise not)."""
    busy = sum(float(e["dur"]) for e in events)
    span = max(float(e["ts"]) + float(e["dur"]) for e in events) - min(
        float(e["ts"]) for e in events
    )
    return busy, span


def summarize(events: list[dict], steps: int) -> dict:
    """Per-name launches and µs per step; busy (union of kernel intervals) vs span."""
    if not events:
        return {"error": "no device events in the trace"}
    per = defaultdict(lambda: [0, 0.0])
    for e in events:
        per[e["name"]][0] += 1
        per[e["name"]][1] += float(e["dur"])
    iv = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events)
    busy, cur_s, cur_e = 0.0, iv[0][0], iv[0][1]
    for s, t in iv[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, t
        else:
            cur_e = max(cur_e, t)
    busy += cur_e - cur_s
    span = iv[-1][1] - iv[0][0]
    kernels = sorted(
        ({"name": n[:90], "per_step": c / steps, "us_per_step": d / steps}
         for n, (c, d) in per.items()),
        key=lambda r: -r["us_per_step"],
    )  # fmt: skip
    threads = defaultdict(int)
    for e in events:
        threads[e.get("thread", "?")] += 1
    return {
        "threads": dict(threads),
        "launches_per_step": len(events) / steps,
        "busy_us_per_step": busy / steps,
        "span_us_per_step": span / steps,
        "idle_frac": 1 - busy / span,
        "kernels": kernels,
        **idle_gaps(events, steps),
    }


def idle_gaps(events: list[dict], steps: int, top: int = 6) -> dict:
    """Where the span's idle time lies: ``gaps``, the device's idle gaps grouped by the kernel
    that ended last before them and the one that starts after, largest first (µs and gaps per
    step), and ``largest_gap``, the longest single one. A host round trip inside a loop (a
    while loop's predicate read each iteration) shows as one large gap per step before the same
    kernel; launch latency between XLA kernels as many small ones; a host-bound gap between two
    compiled calls as one large gap."""
    ev = sorted(events, key=lambda e: float(e["ts"]))
    per = defaultdict(lambda: [0, 0.0])
    largest = {"after": None, "before": None, "us": 0.0}
    last, end = ev[0]["name"], float(ev[0]["ts"]) + float(ev[0]["dur"])
    for e in ev[1:]:
        t0, t1 = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        if t0 > end:
            key = (last[:60], e["name"][:60])
            per[key][0] += 1
            per[key][1] += t0 - end
            if t0 - end > largest["us"]:
                largest = {"after": key[0], "before": key[1], "us": t0 - end}
        if t1 >= end:
            last, end = e["name"], t1
    rows = sorted(per.items(), key=lambda kv: -kv[1][1])[:top]
    gaps = [
        {"after": a, "before": b, "per_step": c / steps, "us_per_step": g / steps}
        for (a, b), (c, g) in rows
    ]
    return {"gaps": gaps, "largest_gap": largest}


def kernel_durations(fn, *args, log_dir: str = "/tmp/prunepath_trace") -> dict[str, list[float]]:
    """Device µs of every kernel ``fn(*args)`` launches, by kernel name, read from a
    ``jax.profiler`` trace: each kernel's own duration, without the launch gaps or host noise of
    wall-clock timing. ``fn`` should be compiled and warm already."""
    out: dict[str, list[float]] = {}
    for e in traced_events(fn, *args, log_dir=log_dir):
        out.setdefault(e["name"], []).append(float(e["dur"]))
    return out


def copy_bandwidth(n_bytes: int = 4 << 30) -> dict:
    """Device copy bandwidth in bytes/s (bytes read + written per second), two ways: an XLA
    elementwise pass, and a plain device-to-device copy through torch when torch sees the GPU
    (the higher one is the ceiling for memory-bound kernels)."""
    x = jnp.ones((n_bytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a + jnp.bfloat16(1))
    out = {"xla": 2 * n_bytes / time_fn(f, x, warmup=5, iters=30)}
    del x
    try:
        import torch

        if torch.cuda.is_available():
            src = torch.ones(n_bytes // 2, dtype=torch.bfloat16, device="cuda")
            dst = torch.empty_like(src)
            for _ in range(5):
                dst.copy_(src)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ts = []
            for _ in range(30):
                start.record()
                dst.copy_(src)
                end.record()
                end.synchronize()
                ts.append(start.elapsed_time(end) / 1e3)
            out["torch_copy"] = 2 * n_bytes / float(np.median(ts))
            del src, dst
            torch.cuda.empty_cache()
    except ImportError:
        pass
    return out


def write_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def row_emitter(head: dict, path: str | os.PathLike, **fixed) -> tuple[list[dict], Callable]:
    """``(rows, emit)``: ``emit(row)`` adds ``head`` and ``fixed`` to a result row, keeps it in
    ``rows``, appends it to ``path`` at once (a run cut short keeps what it measured) and prints
    it without ``head``."""
    rows = []

    def emit(row: dict) -> None:
        row = {**head, **fixed, **row}
        rows.append(row)
        write_rows(path, [row])
        print({k: v for k, v in row.items() if k not in head}, flush=True)

    return rows, emit


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
