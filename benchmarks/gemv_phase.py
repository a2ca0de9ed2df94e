"""One GEMV phase of the one-launch decode step, alone: where its time goes.

Why. At the Llama-3-8B shape the step's O phase (``triton_megastep`` phase C: ``W_o·attn`` into
the residual, then the program's share of the router logits) takes ~13 µs a layer for 33.5 MB,
~60% of the copy bandwidth, and asking L2 for the whole W_o block beforehand did not shorten it
(BENCHMARKS.md, thirty-second session). This script runs the *same* device functions
(``triton_megastep_gemv``: ``_first_chunk``, ``_gemv_rows`` / ``_gemv_cols``, ``_pf_rows``,
``_router_part``; ``triton_grid``'s barrier and timer) in a persistent grid of their own: L
"layers" of the phase, a grid barrier before each, as in the step (the first chunk loaded and
the rest asked for in L2 before the barrier). Each program stamps ``%globaltimer`` at its
start, after the GEMV and after the router share, so a row says how long the phase took from
the barrier's opening, how much of that is the router share, and the GB/s the GEMV reached —
for launch variants (chunk bytes, pipeline stages, warps, column chunks, programs a SM) and with
the weights in DRAM (``sets`` weight sets, more bytes than L2) or already in L2 (one set).

The result is checked: after L layers the residual must be ``h0 + f0 + Σ_l W_l·x`` and each
layer's router logits ``W_r,l·(ln ⊙ h_l)``.

    python3 benchmarks/gemv_phase.py --shapes llama-3-8b-o --out results/gemv_phase.jsonl \
        --variants '{"w16": {"warps": 16}, "hot": {"sets": 1}}'
    TRITON_INTERPRET=1 python3 benchmarks/gemv_phase.py --interpret   # CPU smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
from common import copy_bandwidth, header, markdown_table, write_rows  # noqa: E402

from prunepath_jax.kernels import jt  # noqa: E402
from prunepath_jax.kernels.triton_grid import _arrive, _now, _stamp, _wait  # noqa: E402
from prunepath_jax.kernels.triton_l2 import l2_lines  # noqa: E402
from prunepath_jax.kernels.triton_megastep_gemv import (  # noqa: E402
    _first_chunk,
    _gemv_cols,
    _gemv_rows,
    _normed,
    _pf_rows,
    _router_part,
)
from prunepath_jax.kernels.triton_megastep_plan import (  # noqa: E402
    LINE,
    PREFETCH_O_KB,
    ROUTER_FROM_REGS,
    SPIN,
    STAGES,
    _pf_lines,
    _row_chunk,
    default_bulk_prefetch,
    default_tile_bytes,
    default_warps,
    router_chunk,
)

SHAPES = {  # name: (output rows N, input width K, router experts E, model width d)
    "llama-3-8b-o": (4096, 4096, 448, 4096),
    "llama-3-8b-qkv": (6144, 4096, 448, 4096),
    "llama-3.2-1b-o": (2048, 2048, 256, 2048),
    "llama-3.2-1b-qkv": (3072, 2048, 256, 2048),
}
# The ``-qkv`` shapes run the QKV phase (the norm, then the GEMV into its own output; no residual
# update, no router share); the ``-o`` shapes the O phase.
# The check's tolerance: tests/helpers.py's TOL["model_fp32"] (f32 sums in another order; the
# reference uses the same bf16 weights), times max(1, max |expected|).
TOL_FP32 = 1e-4
EPS = tl.constexpr(1e-5)  # the norm's epsilon (NORM)
N_STAMPS = 3  # a layer's stamps: start (barrier passed), GEMV done, router share done


@triton.jit
def _idle(pid, NS: tl.constexpr):
    """Spins until ``NS`` ns of ``%globaltimer`` have passed (GPU only: inline PTX)."""
    t0 = _now(pid)
    t = t0
    while t - t0 < NS:
        t = _now(pid)


@triton.jit
def _phase_kernel(w_ptr, x_ptr, h0_ptr, f0_ptr, wr_ptr, ln_ptr, lnk_ptr,
                  h_ptr, f_ptr, lg_ptr, ctr_ptr, tim_ptr, fail_ptr, xs_ptr,
                  L: tl.constexpr, SETS: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
                  K: tl.constexpr, K_PAD: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
                  BRC: tl.constexpr, NI_PAD: tl.constexpr, ST: tl.constexpr, COLS: tl.constexpr,
                  BK: tl.constexpr, PF: tl.constexpr, STEP: tl.constexpr, PFB: tl.constexpr,
                  PRE: tl.constexpr, ROUTER: tl.constexpr, REGS: tl.constexpr, E: tl.constexpr,
                  BE: tl.constexpr, PF_R: tl.constexpr, RESID: tl.constexpr, NORM: tl.constexpr,
                  IDLE_NS: tl.constexpr, TIMING: tl.constexpr, SPIN: tl.constexpr,
                  NT: tl.constexpr):  # fmt: skip
    """L layers of ``h[rows] += W_l[rows]·x + f[rows]`` (f zeroed) and, with ``ROUTER``,
    ``lg[l] += W_r,l[:, rows]·(ln ⊙ h)[rows]`` (``REGS``: h's rows from the GEMV's registers, as
    the step does, else read back), program ``pid`` owning rows
    ``[pid·R, pid·R + R)``; a grid barrier before each layer, the first chunk loaded (``PRE``)
    and ``PF`` lines of the rest asked for in L2 before it, as ``triton_megastep`` does.

    Without ``RESID``, the QKV phase instead: ``h[rows] = W_l[rows]·x`` (no router share); with
    ``NORM`` its input is the RMSNorm of the row ``x`` (weights ``lnk``), computed after each
    barrier as the step's phase A computes it (``_normed``).

    ``IDLE_NS`` > 0: every program waits that long after the barrier before it starts (and
    stamps its start), standing in for the step's attention phase, during which the L2 prefetch
    asked for at arrival can land: does a completed prefetch give the GEMV the speed it has
    with its block already in L2?"""
    pid = tl.program_id(0)
    rk = tl.arange(0, K_PAD)
    x = tl.load(x_ptr + rk, mask=rk < K, other=0.0)
    failed = pid * 0
    _stamp(tim_ptr, pid, 0, NT, TIMING)
    for layer in range(L):
        wl = w_ptr + (layer % SETS) * N * K
        wrl = wr_ptr + (layer % SETS) * E * N
        if PRE:
            w0 = _first_chunk(wl, pid, R, N, K, K_PAD, BRC, R_PAD, BK, COLS)
            _pf_rows(wl, pid, R, N, K, BRC, PF, STEP, PFB)
            if PF_R > 0:  # one line a router row: this program's columns of W_r
                if pid * R < N:
                    l2_lines(wrl + tl.minimum(tl.arange(0, PF_R), E - 1) * N + pid * R)
        failed = _wait(ctr_ptr, P * layer, failed, SPIN)
        if IDLE_NS > 0:  # a latency-bound phase's time, during which the prefetch can land
            _idle(pid, IDLE_NS)
        _stamp(tim_ptr, pid, 1 + 3 * layer, NT, TIMING)
        if not PRE:
            w0 = _first_chunk(wl, pid, R, N, K, K_PAD, BRC, R_PAD, BK, COLS)
        if NORM:
            xin, _ = _normed(x_ptr, x_ptr, lnk_ptr, K, K_PAD, EPS, False)
        else:
            xin = x
        if COLS:
            hv = _gemv_cols(wl, w0, xin, xs_ptr + pid * K_PAD, h_ptr, f_ptr, pid, N, K, R, R_PAD,
                            BK, ST, RESID)  # fmt: skip
        else:
            hv = _gemv_rows(wl, w0, xin, h_ptr, f_ptr, pid, N, K, K_PAD, R, BRC, RESID, ST,
                            NI_PAD)  # fmt: skip
        _stamp(tim_ptr, pid, 2 + 3 * layer, NT, TIMING)
        if ROUTER:
            if pid * R < N:
                _router_part(wrl, ln_ptr, h_ptr, hv, lg_ptr + layer * E, pid, R, R_PAD, N, E, BE,
                             ST, REGS)  # fmt: skip
        _stamp(tim_ptr, pid, 3 + 3 * layer, NT, TIMING)
        _arrive(ctr_ptr)
    tl.store(fail_ptr + pid, failed)


# A variant's keys (anything else is a typo, refused before any launch).
VARIANT_KEYS = {"programs", "tile_kb", "cols", "pf_kb", "qkv", "router", "layers", "sets",
                "stages", "bulk", "pre", "regs", "norm", "warps", "idle_us"}  # fmt: skip


def plan(shape: tuple, v: dict, n_sm: int, interpret: bool) -> dict:
    """The kernel's constexprs for a shape and a variant (the step's defaults where ``v`` is
    silent: ``triton_megastep_plan``'s chunk bytes, stages, warps and O-phase prefetch, bulk
    above d 1024; the runs in BENCHMARKS.md's thirty-third session predate that default and
    asked for the prefetch per line)."""
    n, k, e, d = shape
    p = v.get("programs", n_sm)
    r = -(-n // p)
    tile = v.get("tile_kb", default_tile_bytes(d) // 1024) * 1024
    brc = _row_chunk(r, k, 2, tile)
    cols = v.get("cols", 0)
    r_pad = jt.next_pow2(r)
    e_pad = max(16, jt.next_pow2(e))
    pf = 0 if interpret else v.get("pf_kb", PREFETCH_O_KB) * 1024 // LINE
    qkv = v.get("qkv", False)
    router = not qkv and bool(v.get("router", True))  # the QKV phase has no router share
    layers = v.get("layers", 32)
    return dict(
        RESID=not qkv, NORM=bool(v.get("norm", qkv)),
        L=layers, SETS=v.get("sets", 8), P=p, N=n, K=k, K_PAD=jt.next_pow2(k),
        R=r, R_PAD=r_pad, BRC=brc, NI_PAD=jt.next_pow2(-(-r // brc)), ST=v.get("stages", STAGES),
        COLS=cols > 0, BK=min(max(cols, 16), jt.next_pow2(k)),
        PF=_pf_lines(pf, r, brc, k, 2), STEP=LINE // 2,
        PFB=bool(v.get("bulk", default_bulk_prefetch(d))) and not interpret,
        PRE=bool(v.get("pre", True)), ROUTER=router, REGS=bool(v.get("regs", ROUTER_FROM_REGS)),
        E=e,
        BE=router_chunk(e_pad, r_pad, tile),
        PF_R=e_pad if router and pf and not interpret else 0,
        IDLE_NS=0 if interpret else int(v.get("idle_us", 0) * 1000),
        TIMING=not interpret, SPIN=SPIN, NT=1 + N_STAMPS * layers,
    )  # fmt: skip


def launch(c: dict, warps: int, args: tuple, interpret: bool):
    """One launch of ``_phase_kernel`` (fresh outputs: the barrier counter starts at zero)."""
    w, x, h0, f0, wr, ln, lnk = args
    f32 = jnp.float32
    out_shape = [
        jax.ShapeDtypeStruct((c["N"],), f32),  # h
        jax.ShapeDtypeStruct((c["N"],), f32),  # f
        jax.ShapeDtypeStruct((c["L"] * c["E"],), f32),  # router logits
        jax.ShapeDtypeStruct((1,), jnp.int32),  # barrier counter
        jax.ShapeDtypeStruct((c["P"] * c["NT"],), jnp.int64),
        jax.ShapeDtypeStruct((c["P"],), jnp.int32),  # barrier failures
        jax.ShapeDtypeStruct((c["P"] * c["K_PAD"] if c["COLS"] else 1,), f32),  # scratch
    ]
    return jt.triton_call(
        _phase_kernel, w, x, h0, f0, wr, ln, lnk, out_shape=out_shape,
        input_output_aliases={2: 0, 3: 1}, zeroed_outputs=(2, 3), grid=(c["P"],),
        num_warps=warps, num_stages=1, interpret=interpret, **c,
    )  # fmt: skip


@functools.cache
def inputs(n: int, k: int, e: int, s: int, seed: int = 0):
    """``s`` weight sets of W ``[n, k]`` and W_r ``[e, n]`` (flat, bf16), the input row, the
    residual, the FFN sum and the norm weights; cached: 8 sets at 8B are 268 MB to draw."""
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((s * n * k,), np.float32) * k**-0.5, jnp.bfloat16)
    wr = jnp.asarray(rng.standard_normal((s * e * n,), np.float32) * n**-0.5, jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((k,), np.float32))
    h0 = jnp.asarray(rng.standard_normal((n,), np.float32))
    f0 = jnp.asarray(rng.standard_normal((n,), np.float32))
    ln = jnp.asarray(1 + 0.1 * rng.standard_normal((n,), np.float32), jnp.bfloat16)
    lnk = jnp.asarray(1 + 0.1 * rng.standard_normal((k,), np.float32), jnp.bfloat16)
    return w, x, h0, f0, wr, ln, lnk


@functools.cache
def expected(
    n: int, k: int, e: int, s: int, layers: int, resid: bool, norm: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The residual after ``layers`` layers and every layer's router logits, in float64; without
    ``resid`` (the QKV phase) the last layer's output and no logits."""
    w, x, h0, f0, wr, ln, lnk = (np.asarray(a, np.float64) for a in inputs(n, k, e, s))
    w, wr = w.reshape(s, n, k), wr.reshape(s, e, n)
    if not resid:
        xn = x / np.sqrt(np.mean(x * x) + 1e-5) * lnk if norm else x
        return w[(layers - 1) % s] @ xn, np.zeros((layers, e))
    h, lg = h0 + f0, []
    for layer in range(layers):
        h = h + w[layer % s] @ x
        lg.append(wr[layer % s] @ (ln * h))
    return h, np.stack(lg)


def timeline(t_ps: np.ndarray, layers: int) -> dict:
    """µs a layer (means over layers 1..L-1): ``phase`` from the moment the previous layer's
    last program arrived (the barrier opened) to this layer's last arrival; ``gemv`` to the
    last program's end of the GEMV; ``wake`` a program's mean start after the opening (with
    ``idle_us``, after its idle wait); work (mean and max over programs) of the GEMV and of the
    router share."""
    s = t_ps[:, 1:].reshape(t_ps.shape[0], layers, N_STAMPS).astype(np.float64) / 1e3
    start, gemv, end = s[..., 0], s[..., 1], s[..., 2]
    opened = end.max(0)  # [L]
    prev = np.concatenate([[start[:, 0].min()], opened[:-1]])
    sl = slice(1, None)
    return {
        "phase_us": float((opened - prev)[sl].mean()),
        "gemv_us": float((gemv.max(0) - prev)[sl].mean()),
        "wake_us": float((start - prev[None]).mean(0)[sl].mean()),
        "gemv_work_mean_us": float((gemv - start).mean(0)[sl].mean()),
        "gemv_work_max_us": float((gemv - start).max(0)[sl].mean()),
        "router_work_mean_us": float((end - gemv).mean(0)[sl].mean()),
        "router_work_max_us": float((end - gemv).max(0)[sl].mean()),
    }


def run_case(head: dict, shape_name: str, label: str, v: dict, n_sm: int, interpret: bool,
             reps: int) -> dict:  # fmt: skip
    """One case's row (``head``: the run's provenance, ``header()``): its check against float64
    and, on the GPU, the median timeline of ``reps`` launches."""
    shape = SHAPES[shape_name] if not interpret else (96, 80, 24, 96)
    c = plan(shape, {"qkv": shape_name.endswith("-qkv"), **v}, n_sm, interpret)
    warps = v.get("warps", default_warps(shape[2]))
    dims = (c["N"], c["K"], c["E"], c["SETS"])
    args = inputs(*dims)
    outs = launch(c, warps, args, interpret)
    h_want, lg_want = expected(*dims, c["L"], c["RESID"], c["NORM"])
    h_err = float(np.max(np.abs(np.asarray(outs[0], np.float64) - h_want)))
    lg = np.asarray(outs[2], np.float64).reshape(c["L"], c["E"])
    lg_err = float(np.max(np.abs(lg - lg_want))) if c["ROUTER"] else 0.0
    fails = int(np.asarray(outs[5]).sum())
    row = {**head, "shape": shape_name, "variant": label, "launch": v, "programs": c["P"],
           "warps": warps, "rows_per_program": c["R"], "chunk_rows": c["BRC"],
           "stages": c["ST"], "sets": c["SETS"], "layers": c["L"], "max_abs_err_h": h_err,
           "max_abs_err_router": lg_err, "barrier_failures": fails}  # fmt: skip
    tol_h = TOL_FP32 * max(1.0, float(np.abs(h_want).max()))
    tol_lg = TOL_FP32 * max(1.0, float(np.abs(lg_want).max()))
    row["ok"] = bool(h_err <= tol_h and lg_err <= tol_lg and fails == 0)
    if interpret:
        return row
    per = []
    for _ in range(reps):  # fresh buffers each call (the barrier counter starts at zero)
        t = np.asarray(launch(c, warps, args, interpret)[4]).reshape(c["P"], c["NT"])
        per.append(timeline(t, c["L"]))
    med = {k: float(np.median([p[k] for p in per])) for k in per[0]}
    gb = c["N"] * c["K"] * 2 / 1e9  # W bytes a layer (GB)
    row.update({k: round(x, 3) for k, x in med.items()})
    row["gemv_GBps"] = round(gb / (med["gemv_us"] * 1e-6), 1)
    row["phase_GBps"] = round(gb / (med["phase_us"] * 1e-6), 1)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["llama-3-8b-o"], choices=list(SHAPES))
    ap.add_argument("--variants", default="{}", help='JSON {label: launch}; "default" always')
    ap.add_argument("--reps", type=int, default=5, help="timed launches a case (median)")
    ap.add_argument("--out", default="results/gemv_phase.jsonl")
    ap.add_argument("--interpret", action="store_true", help="CPU smoke run (TRITON_INTERPRET=1)")
    a = ap.parse_args()
    variants = {"default": {}, **json.loads(a.variants)}
    for label, v in variants.items():
        if not isinstance(v, dict) or set(v) - VARIANT_KEYS:
            ap.error(f"variant {label!r}: {v!r}; keys must be among {sorted(VARIANT_KEYS)}")
    if a.interpret:
        small = {"programs": 1, "layers": 3, "sets": 2, "tile_kb": 4}  # 16-row chunks: a loop
        variants = {k: {**small, **v} for k, v in variants.items()}
        n_sm = 1
    else:
        n_sm = jax.devices()[0].core_count
    rows, head = [], header()
    if not a.interpret:
        bw = copy_bandwidth()
        print(f"copy bandwidth: {json.dumps({k: round(v / 1e9, 1) for k, v in bw.items()})} GB/s")
    for s in a.shapes:
        for label, v in variants.items():
            row = run_case(head, s, label, v, n_sm, a.interpret, a.reps)
            if not a.interpret:
                row["copy_GBps"] = round(max(bw.values()) / 1e9, 1)
            rows.append(row)
            print(json.dumps({k: row[k] for k in row if k not in head}), flush=True)
    if not a.interpret:
        write_rows(a.out, rows)
    cols = ["shape", "variant", "ok", "phase_us", "gemv_us", "wake_us", "gemv_work_max_us",
            "router_work_max_us", "gemv_GBps", "copy_GBps"]  # fmt: skip
    print(markdown_table(rows, [c for c in cols if c in rows[0]]))
    if not all(r["ok"] for r in rows):
        sys.exit("a case's result did not match the float64 reference (see max_abs_err_*)")


if __name__ == "__main__":
    main()
