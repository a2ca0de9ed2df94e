"""The batched one-launch step's QKV / O product (``triton_batch_phases._skinny``), alone.

Why. Inside the batched step (``kernels/triton_megastep_batch.py``) the QKV and O phases run
at 0.6-0.7 TB/s at the Llama-3.2-1B width (21 and 15 µs a layer for 12.6 and 8.4 MB) and
2.2 / 1.5 TB/s at 8B. Neither larger chunks, deeper pipelines nor staggered chunk orders moved
them (BENCHMARKS.md, forty-first session); the batch-1 step's QKV GEMV takes 6-7.5 µs at 1B.
This runs the *same* device function in a persistent grid of its own: L "layers" of the phase,
a grid barrier before each (``triton_grid``), each program stamping ``%globaltimer`` when the
barrier opens and when its rows are done. So one run says whether the product itself is slow
(then: which of the tokens, the norm, the chunk, the weights in DRAM or L2 matter) or only in
the step (registers, what runs before it).

Three variants put back what surrounds the phase in the step, one at a time: ``atomics``, the
expert phase's relaxed atomics into the tokens' inputs before the barrier (the step's F phase
adds ``P · T · d`` of them into the residual that phase A then reads; here they add 0.0, so the
check stands); ``prefetch``, the next layer's rows asked into L2 while the barrier waits (the
step's ``PREFETCH_KB`` at a barrier arrival, ``bulk`` requests above d 1024); ``xdtype``, the
inputs in bf16 (half the L2 bytes a chunk; the step reads the f32 residual). ``stage``: the
inputs once into each program's scratch, normed and in bf16, before the weight loop
(``_stage_tokens``; the step's ``Launch(skinny_stage=True)``). ``rpad``: the tile's least rows
(64: wgmma, as the expert phase's tiles, instead of mma.sync; the step's ``skinny_rows``).
``tp``: the tokens' padded columns, 32 instead of 16 (the step's ``skinny_tp``: each of 8
warps' two warpgroups a wgmma m64n16 instead of m64n8).
``router``: phase C's router share after the product (``_router_share``, the step's code: each
program's rows times the routers' columns, E · T logit partials added by relaxed atomics), into
one shared ``[T, E]`` (``"shared"``, as the step: every program adds into the same lines) or a
``[T, E]`` of each program's own (``"private"``: the same atomics without contention), so the
difference is what the programs' atomics queueing at the same addresses costs;
``router_copies`` n shared copies (the step's ``Launch.router_copies``: program p adds into
copy ``(p + layer) % n``); ``router_de`` reads the routers' ``[d, E]`` copy, ``router_stages``
its pipeline. Why: the 1B O product alone
takes 8.9 µs a layer, the step's C phase 14.3 (H100, forty-seventh session).

The result is checked against numpy: ``out[l] = W_l · (ln ⊙ x) · rsqrt(mean(x²) + eps)`` per
token (without the norm: ``W_l · x``); with ``router`` also the logits summed over the layers
(and the programs' own copies), ``Σ_l Wr_l · (ln2 ⊙ out[l])``.

    python3 benchmarks/skinny_phase.py --out results/skinny_phase.jsonl \
        --variants '{"t16": {"tokens": 16}, "hot": {"sets": 1}, "nonorm": {"norm": false}}'
    TRITON_INTERPRET=1 python3 benchmarks/skinny_phase.py --interpret   # CPU smoke run
"""

from __future__ import annotations

import argparse
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
from prunepath_jax.kernels.triton_batch_phases import (  # noqa: E402
    _router_share,
    _skinny,
    _staggered,
)
from prunepath_jax.kernels.triton_batch_plan import (  # noqa: E402
    BE,
    BK,
    MAX_TOKENS,
    ROUTER_STAGES,
    SKINNY_TP,
)
from prunepath_jax.kernels.triton_grid import _arrive, _stamp, _wait  # noqa: E402
from prunepath_jax.kernels.triton_megastep_gemv import _pf_rows  # noqa: E402
from prunepath_jax.kernels.triton_megastep_plan import (  # noqa: E402
    LINE,
    SPIN,
    STAGES,
    _pf_lines,
    default_bulk_prefetch,
)

SHAPES = {  # name: (output rows N, input width K)
    "llama-3.2-1b-qkv": (3072, 2048),
    "llama-3.2-1b-o": (2048, 2048),
    "llama-3-8b-qkv": (6144, 4096),
    "llama-3-8b-o": (4096, 4096),
}
EXPERTS = {"llama-3.2-1b": 256, "llama-3-8b": 448}  # the router's E at each width (G 32)
ROUTER_MODES = (None, False, "shared", "private")  # private: a copy of the logits a program
# The check's tolerance: tests/helpers.py's TOL["bf16"] (the product's input is rounded to bf16;
# the interpreter's rounding differs from the GPU's), times max(1, max |expected|).
TOL_BF16 = 2e-2
VARIANT_KEYS = {"tokens", "norm", "bk", "stages", "stagger", "sets", "layers", "warps",
                "programs", "atomics", "prefetch", "bulk", "xdtype", "stage", "rpad", "router",
                "router_de", "router_stages", "router_copies", "tp"}  # fmt: skip
ATOMIC_COLS = 256  # columns a relaxed atomic of the ``atomics`` variant (the F phase's CWF)
X_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


@triton.jit
def _skinny_kernel(w_ptr, x_ptr, ln_ptr, wr_ptr, ln2_ptr, out_ptr, ctr_ptr, tim_ptr, fail_ptr,
                   xs_ptr, lg_ptr,
                   L: tl.constexpr, SETS: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
                   K: tl.constexpr, T: tl.constexpr, TP: tl.constexpr, R: tl.constexpr,
                   R_PAD: tl.constexpr, BK: tl.constexpr, ST: tl.constexpr, NORM: tl.constexpr,
                   STAGGER: tl.constexpr, TIMING: tl.constexpr, SPIN: tl.constexpr,
                   NT: tl.constexpr, DOT_F32: tl.constexpr, ATOM: tl.constexpr,
                   AC: tl.constexpr, PF: tl.constexpr, STEP: tl.constexpr,
                   PFB: tl.constexpr, SX: tl.constexpr, ROUTER: tl.constexpr,
                   E: tl.constexpr, BE: tl.constexpr, RS: tl.constexpr, RCP: tl.constexpr,
                   RDE: tl.constexpr):  # fmt: skip
    """L layers of ``out[l, rows] = W_l[rows] · x`` (the batched step's phase A with ``NORM``,
    phase C's product without), program ``pid`` owning rows ``[pid·R, pid·R + R)``, a grid
    barrier before each layer; stamps: the barrier's opening and the rows' end. Between the
    rows' end and the barrier, with ``ATOM``: ``x += 0`` by relaxed atomics ``[T, AC]``
    over all of ``x`` (the step's expert phase into the residual); with ``PF`` lines: the next
    layer's rows into L2 (``_pf_rows``, the step's form). With ``ROUTER`` the rows' router
    share into copy ``(pid + layer) % RCP`` of the ``[T, E]`` logits at ``lg_ptr`` before the
    stamp, as the step's phase C adds it."""
    pid = tl.program_id(0)
    failed = pid * 0
    r0 = pid * R
    r1 = tl.minimum(r0 + R, N)
    rt = tl.arange(0, TP)
    rr = r0 + tl.arange(0, R_PAD)
    for layer in range(L):
        failed = _wait(ctr_ptr, P * layer, failed, SPIN)
        _stamp(tim_ptr, pid, 2 * layer, NT, TIMING)
        if r0 < N:
            wl = w_ptr + (tl.full([], 0, tl.int64) + layer % SETS) * N * K
            acc, ss = _skinny(wl, x_ptr, ln_ptr, xs_ptr + pid * K * TP * SX, r0, r1,
                              (pid + layer) * STAGGER, K, T, TP, R_PAD, BK, ST, NORM, SX,
                              DOT_F32)  # fmt: skip
            if NORM:
                acc = acc * tl.rsqrt(ss / K + 1e-5)[None, :]
            tl.store(out_ptr + layer * N * TP + rr[:, None] * TP + rt[None, :], acc,
                     mask=(rr < r1)[:, None] & (rt < T)[None, :])  # fmt: skip
            if ROUTER:
                wr = wr_ptr + (tl.full([], 0, tl.int64) + layer % SETS) * N * E
                lgc = lg_ptr + ((pid + layer) % RCP) * T * E
                _router_share(wr, ln2_ptr, acc, lgc, r0, r1, (pid + layer) * STAGGER, N, E, T,
                              TP, R_PAD, BE, RS, DOT_F32, RDE)  # fmt: skip
        _stamp(tim_ptr, pid, 2 * layer + 1, NT, TIMING)
        if ATOM:
            NC: tl.constexpr = (K + AC - 1) // AC
            rc = tl.arange(0, AC)
            for j in range(0, NC):
                cols = _staggered(j, pid * STAGGER, NC) * AC + rc
                cm = (rt < T)[:, None] & (cols < K)[None, :]
                tl.atomic_add(x_ptr + rt[:, None] * K + cols[None, :],
                              tl.zeros([TP, AC], tl.float32), mask=cm, sem="relaxed")  # fmt: skip
        if layer + 1 < L:
            nxt = w_ptr + (tl.full([], 0, tl.int64) + (layer + 1) % SETS) * N * K
            _pf_rows(nxt, pid, R, N, K, 0, PF, STEP, PFB)
        _arrive(ctr_ptr)
    tl.store(fail_ptr + pid, failed)


def plan(shape: tuple, v: dict, n_sm: int, interpret: bool, experts: int | None = 20) -> dict:
    """The kernel's constexprs (the batched step's defaults where ``v`` is silent);
    ``experts`` the router's E (None: a shape without one)."""
    bad = set(v) - VARIANT_KEYS
    if bad:
        raise ValueError(f"unknown variant keys {sorted(bad)}; known: {sorted(VARIANT_KEYS)}")
    if v.get("tp", MAX_TOKENS) not in SKINNY_TP:
        raise ValueError(f"tp {v['tp']!r}: the token columns, one of {SKINNY_TP}")
    if v.get("router") not in ROUTER_MODES:
        raise ValueError(f"router {v['router']!r}: one of 'shared', 'private' (or false)")
    if ({"router_de", "router_stages", "router_copies"} & set(v)) and not v.get("router"):
        raise ValueError("router_de / _stages / _copies time the router share: add router")
    if "router_copies" in v and v["router"] != "shared":
        raise ValueError("router_copies: with router 'shared' (private is a copy a program)")
    if v.get("router") and not experts:
        raise ValueError(f"the router share needs E: shapes {sorted(EXPERTS)} have one")
    if v.get("xdtype", "f32") not in X_DTYPES:
        raise ValueError(f"xdtype {v['xdtype']!r}: one of {sorted(X_DTYPES)}")
    if v.get("atomics") and v.get("xdtype", "f32") != "f32":
        raise ValueError("the atomics variant adds f32 into the inputs: xdtype f32 only")
    n, k = shape
    p = v.get("programs", n_sm)
    r = -(-n // p)
    layers = v.get("layers", 1 if interpret else 32)
    return dict(
        L=layers,
        SETS=v.get("sets", 8),
        P=p,
        N=n,
        K=k,
        T=v.get("tokens", 4),
        TP=v.get("tp", MAX_TOKENS),
        R=r,
        R_PAD=max(v.get("rpad", 16), jt.next_pow2(r)),
        BK=v.get("bk", BK),
        ST=v.get("stages", STAGES),
        NORM=bool(v.get("norm", True)),
        STAGGER=int(bool(v.get("stagger", True))),
        TIMING=not interpret,
        SPIN=SPIN,
        NT=2 * layers,
        DOT_F32=interpret,  # the interpreter's 16-bit dot is wrong
        ATOM=bool(v.get("atomics", False)),
        AC=ATOMIC_COLS,
        PF=0 if interpret else _pf_lines(v.get("prefetch", 0) * 1024 // LINE, r, 0, k, 2),
        STEP=LINE // 2,
        PFB=bool(v.get("bulk", default_bulk_prefetch(k))) and not interpret,
        SX=int(bool(v.get("stage", False))),
        ROUTER=bool(v.get("router")),
        RCP=p if v.get("router") == "private" else v.get("router_copies", 1),
        E=experts or 1,
        BE=BE,
        RS=v.get("router_stages", ROUTER_STAGES),
        RDE=int(bool(v.get("router_de", False))),
    )


def run(c: dict, warps: int, w, x, ln, wr, ln2, interpret: bool):
    """One launch (fresh outputs: the barrier counter and the logits start at zero)."""
    lg_n = c["RCP"] * c["T"] * c["E"] if c["ROUTER"] else 1
    out_shape = [
        jax.ShapeDtypeStruct((c["L"] * c["N"] * c["TP"],), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.int32),
        jax.ShapeDtypeStruct((c["P"], c["NT"]) if c["TIMING"] else (1,), jnp.int64),
        jax.ShapeDtypeStruct((c["P"],), jnp.int32),
        jax.ShapeDtypeStruct((c["P"] * c["K"] * c["TP"] if c["SX"] else 1,), w.dtype),
        jax.ShapeDtypeStruct((lg_n,), jnp.float32),
    ]
    return jt.triton_call(_skinny_kernel, w, x, ln, wr, ln2, out_shape=out_shape,
                          zeroed_outputs=(1, 5),
                          grid=(c["P"],), num_warps=warps, num_stages=1, interpret=interpret,
                          **c)  # fmt: skip


def reference(w, x, ln, c: dict) -> np.ndarray:
    """``[L, N, T]`` in float64 from the same bf16 weights, the product's input rounded to bf16
    (round to nearest, as the GPU rounds it) and the norm's scale applied after, as the kernel
    does."""
    w64 = np.asarray(w, np.float64).reshape(c["SETS"], c["N"], c["K"])
    x32 = np.asarray(x, np.float32)[: c["T"]]
    scale = np.ones(c["T"])
    if c["NORM"]:
        scale = 1 / np.sqrt((x32.astype(np.float64) ** 2).mean(1) + 1e-5)
        x32 = x32 * np.asarray(ln, np.float32)[None, :]
    xb = np.asarray(jnp.asarray(x32, jnp.bfloat16), np.float64)
    return np.stack([(w64[i % c["SETS"]] @ xb.T) * scale for i in range(c["L"])])


def router_weights(rng, c: dict):
    """``(wr_sen, wr, ln2)``: SETS routers ``[E, N]`` f32 (float64 for the reference), the
    kernel's copy of them (each ``[N, E]`` with ``RDE``, the step's ``router_de`` copy) and
    the norm weights ``[N]``."""
    wr_sen = (rng.standard_normal((c["SETS"], c["E"], c["N"])) * 0.02).astype(np.float32)
    wr = wr_sen.transpose(0, 2, 1) if c["RDE"] else wr_sen
    ln2 = jnp.asarray(1 + 0.1 * rng.standard_normal(c["N"]), jnp.bfloat16)
    return wr_sen.astype(np.float64), jnp.asarray(wr.reshape(-1, wr.shape[-1])), ln2


def router_reference(wr_sen: np.ndarray, ln2, out_lnt: np.ndarray, c: dict) -> np.ndarray:
    """``[T, E]`` float64: ``Σ_l Wr_l · (ln2 ⊙ out[l])``, the logits every layer's share
    adds."""
    g = np.asarray(ln2, np.float64)[:, None]
    return sum(wr_sen[i % c["SETS"]] @ (g * out_lnt[i]) for i in range(c["L"])).T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["llama-3.2-1b-qkv", "llama-3-8b-qkv"])
    ap.add_argument("--variants", default='{"default": {}}', help="JSON {label: {key: value}}")
    ap.add_argument("--interpret", action="store_true", help="one program, one layer, no stamps")
    ap.add_argument("--out", default="results/skinny_phase.jsonl")
    a = ap.parse_args()
    variants = json.loads(a.variants)
    n_sm = 1 if a.interpret else jt.default_programs()
    head = {**header(), "bench": "skinny_phase"}
    if not a.interpret:
        head["copy_TB_s"] = max(copy_bandwidth(2 << 30).values()) / 1e12
    rows = []
    for name in a.shapes:
        shape = SHAPES[name] if not a.interpret else (48, 160)
        experts = 20 if a.interpret else EXPERTS.get(name.rsplit("-", 1)[0])
        for label, v in variants.items():
            c = plan(shape, v, n_sm, a.interpret, experts)
            rng = np.random.default_rng(0)
            w = jnp.asarray(rng.standard_normal((c["SETS"] * c["N"], c["K"])) * 0.02,
                            jnp.bfloat16)  # fmt: skip
            x = jnp.asarray(rng.standard_normal((MAX_TOKENS, c["K"])),
                            X_DTYPES[v.get("xdtype", "f32")])  # fmt: skip
            ln = jnp.asarray(1 + 0.1 * rng.standard_normal(c["K"]), jnp.bfloat16)
            wr_sen, wr, ln2 = router_weights(rng, c)
            warps = v.get("warps", 8)
            try:
                for _ in range(1 if a.interpret else 3):  # the last call's stamps: warm
                    out, _, stamps, fail, _, lg = run(c, warps, w, x, ln, wr, ln2, a.interpret)
            except jax.errors.JaxRuntimeError as e:
                write_rows(a.out, rows)  # the variants timed so far are kept
                hint = ""
                if "CUDA_ERROR_INVALID_VALUE" in str(e):  # (512 columns at 64 rows, H100)
                    hint = (f": most likely the pipeline's shared memory ({c['ST']} stages of a "
                            f"[{c['R_PAD']}, {c['BK']}] weight tile and the inputs) is over the "
                            "SM's limit; take fewer columns, rows or stages")  # fmt: skip
                raise SystemExit(f"{name} {label}: the launch failed{hint} ({e})") from e
            got = np.asarray(out).reshape(c["L"], c["N"], c["TP"])[:, :, : c["T"]]
            ref = reference(w, x, ln, c)
            err = float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))
            if c["ROUTER"]:  # the logits too (each program's own copies summed)
                lg_ref = router_reference(wr_sen, ln2, ref, c)
                lg_got = np.asarray(lg, np.float64).reshape(-1, c["T"], c["E"]).sum(0)
                err = max(
                    err, float(np.abs(lg_got - lg_ref).max() / max(1.0, np.abs(lg_ref).max()))
                )
            r = {**head, "shape": name, "variant": label, **v, "rel_err": err,
                 "barrier_failures": int(np.asarray(fail).sum())}  # fmt: skip
            if not a.interpret:
                s = np.asarray(stamps).reshape(c["P"], c["L"], 2).astype(np.float64) / 1e3
                layer_us = (s[:, 1:, 1].max(0) - s[:, 1:, 0].min(0)).mean()  # skip layer 0
                mb = (c["N"] * c["K"] * 2 + (c["E"] * c["N"] * 4 if c["ROUTER"] else 0)) / 1e6
                r.update(us_per_layer=layer_us, work_mean_us=(s[:, 1:, 1] - s[:, 1:, 0]).mean(),
                         TB_s=mb / layer_us)  # MB a µs = TB/s  # fmt: skip
            rows.append(r)
            print(json.dumps({k: r[k] for k in r if k not in head}), flush=True)
            if err > TOL_BF16:
                write_rows(a.out, rows)  # (this variant's row among them, with its error)
                raise SystemExit(f"{name} {label}: relative error {err:.2e} against numpy")
    write_rows(a.out, rows)
    cols = ["shape", "variant", "us_per_layer", "work_mean_us", "TB_s", "rel_err"]
    print(markdown_table(rows, cols))


if __name__ == "__main__":
    main()
