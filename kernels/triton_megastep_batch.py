"""A whole decode step of T = 2-16 sequences of a PrunePath Llama in ONE Triton launch.

Why. At batch 2-16 the registry's default (the Triton kernels, a launch or more each phase of
each layer through jax-triton, ~6 µs a launch) is slower than dense with distinct sequences
(1B 0.68-0.86×, 8B 0.78-0.87×, BENCHMARKS.md fortieth session). The batch-1 step's answer,
every layer in one persistent launch between grid barriers (``triton_megastep``), applies to a
batch too: the weights are read once for all T tokens on the tensor cores.

What. For every layer, five phases separated by grid barriers (``triton_grid``):

* A: the QKV product of the T tokens' normalised residuals (``_skinny`` with the norm folded
  in: each program owns ``ceil(N / P)`` contiguous rows of W_qkv, sums the tokens' squares as
  it streams the residual, and scales its ``[rows, T]`` block by ``1 / rms`` at the end).
* B: attention, one work item per (token, KV head, key split): the batch-1 step's item
  (``triton_megastep_attn._attend_split``) on the token's query row, cache and RoPE tables.
  Each sequence has its own position (``generate``'s right-padded prompts).
* C: the O projection and the residual add (``h += W_o·attn``) for the program's rows, and its
  share of the T tokens' router logits before the RMSNorm's scale (``_router_share``, relaxed
  atomics).
* S: program t (< T) selects token t's experts (``triton_select._select``, the router logits
  times its ``1 / rms``), writes its gates, k and its normalised FFN input (in the weights'
  dtype, what the expert phase reads). A phase of its own because every program needs every
  token's selection to split the union (sorting T rows in every program costs T sorts a
  layer; here it is one, and a barrier).
* F: the union of the tokens' experts cut into 16-neuron units, split evenly over the programs
  (each lists the union's experts in a table of its own, ``_union``: one scatter). A program
  takes its units ``UF`` at a time as one block of rows (``_unit_ffn``): gate/up for all T
  tokens, then the block's down rows (one contiguous ``16 · d`` block a unit) into the residual
  ``h`` with one relaxed atomic ``[T, CWF]`` a column chunk (nothing reads ``h`` between the
  selection and the next layer). ``P · T · d`` atomics a layer. The first form (the
  activations into a scratch, a barrier, then a phase G of (unit group, column block) items
  that walked hundreds of units through a table load each: 0.37 TB/s at 8B) was 1.2-2.6×
  slower in every measured row and is gone (BENCHMARKS.md, forty-first and forty-second
  sessions).

The A, C, router-share and expert loops start at a chunk of each program's own
(``triton_batch_phases._staggered``), so the programs do not all ask for the same activation
lines, or add into the same residual columns, at once (1-4% at 1B and 8B with 16 sequences,
3% slower at 8B with 4: BENCHMARKS.md, forty-first session).

A and C's launch choices (their phases ran at 0.6-2.2 TB/s, forty-first session):
``skinny_rows`` pads their tiles to 64 rows so that Triton takes wgmma, the expert phase's
instruction, instead of mma.sync (1B: 32 / 16-row tiles; ptxas spills 12 bytes a thread, not
204), ``skinny_rows_c`` C's alone; ``router_stages`` pipelines C's router share (else a plain
loop of synchronous loads: 4 DRAM round trips a layer at 1B, 7 at 8B). The 64-row tiles where
A's tile is under 64 rows (``default_skinny``: the 1B width; A 21 -> 12 µs a layer, C +2.5;
C at its own 16 rows measured 0.5-1.2% slower a step), the router share's 3 stages at every
width (1B 3%, 8B 0.5-3.5% a step; forty-third and forty-sixth sessions). ``skinny_stage``
stages the inputs once into each program's scratch (normed, in the weights' dtype;
``_stage_tokens``) so the weight loop carries no norm: neutral (0-2%), off. A's norm adds the
squares elementwise and sums them once after the loop (``triton_batch_phases._normed``; the
1B product alone at 64-row tiles: 11.06 µs a layer with a row sum a chunk, 9.90 with one,
9.50 without the norm; forty-sixth session).

Right after arriving at a barrier a program asks L2 for the first rows of its next QKV or W_o
block (the batch-1 step's measured prefetch sizes and forms, ``triton_megastep_plan``).

Around the layers: layer 0's residual rows are the tokens' embedding rows (each program copies
its part before the first barrier), program 0 computes each token's RoPE tables there, and the
residual, logits and counters share one zeroed workspace. The launch returns the last layer's
residual (``[T, d]`` f32); the final norm and the LM head run in XLA.

The residual stream stays fp32 inside the launch (the XLA model rounds it to the model dtype
after every add), so bf16 results agree with the fp32 model within the bf16 tolerance and fp32
ones with the XLA step up to summation order (the atomics' order varies from run to run).

Measured (BENCHMARKS.md; 75%, distinct sequences): on the H200 (forty-third session) 1B 1146 /
1385 µs a step at 4 / 16 sequences against dense 926 / 1149 (0.81 / 0.83×), 8B 4537 / 5422
against 4148 / 4841 (0.91 / 0.89×); on an H100 (forty-fifth session) at 64 cache positions 1B
0.92-1.00× dense at 2-16 sequences and 8B 1.07 / 0.94× at 4 / 16, at 4352 positions 1B 0.97 /
1.15× and 8B 1.08 / 1.16× at 4 / 16 — ahead of the per-layer Triton kernels in every row;
(forty-sixth session, H100, the norm's sums and 8B's router stages) 1B 0.93 / 0.96× at 4 /
16, 8B 1.05-1.07 / 0.97-0.99×; (forty-seventh, H100, the router share from the ``[L, d, E]``
copy) 1B 0.937 / 0.971×, 8B 1.085 / 0.965×. The
union of the sequences' experts (43% of E at 2, 66% at 4, 98% at 16) leaves the bytes little
to skip at short caches; at long ones the attention's cache reads dominate both steps. Correct
on the GPU: its fp32 logits match XLA's (at "highest" precision) within the fp32 tolerance and
its greedy tokens equal XLA's. ``prunepath_jax.megastep`` takes it for
``generate(..., implementation="megastep")`` with 2-16 prompts, ``"auto"`` too up to 4352 cache
positions (``megastep.AUTO_BATCH_MIN``: ahead of the per-layer kernels there, at the 1B, 8B
and SmolLM2-135M shapes).

Limits (``check`` raises): those of the batch-1 step, and 1 ≤ T ≤ 16, G a multiple of 16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from prunepath_jax.kernels import jt
from prunepath_jax.kernels.triton_batch_phases import (
    _router_share,
    _skinny,
    _union,
    _unit_ffn,
)
from prunepath_jax.kernels.triton_batch_plan import (
    BK,
    MAX_TOKENS,
    ROUTER_COPIES,
    SKINNY_TP,
    check,
    constants,
    workspace_size,
)
from prunepath_jax.kernels.triton_grid import _arrive, _stamp, _wait
from prunepath_jax.kernels.triton_megastep_attn import _attend_split
from prunepath_jax.kernels.triton_megastep_gemv import _pf_rows
from prunepath_jax.kernels.triton_megastep_plan import (
    PREFETCH_KB,
    PREFETCH_O_KB,
    SPIN,
    STAGES,
    check_launch,
    default_attention,
)
from prunepath_jax.kernels.triton_select import _logits, _select

# Timing stamps a layer (TIMING): each phase's start and end (a phase starts when its program
# leaves the barrier before it, ends at its arrival).
PHASES = ("A norm+qkv", "B attention", "C o+residual+router", "S select", "F experts")
N_SLOTS = 2 * len(PHASES)
SLOTS = tl.constexpr(N_SLOTS)


@triton.jit
def _batch_kernel(
    x0_ptr,  # [V, D] the embedding table
    tok_ptr,  # [T] i32 the tokens
    inv_ptr,  # [HD/2] f32 RoPE inverse frequencies
    pos_ptr,  # [T] i32 each token's position (where its key/value go)
    tau_ptr,  # [L] f32 budgets
    ln1_ptr, ln2_ptr,  # [L, D] RMSNorm weights
    wqkv_ptr,  # [L, NQKV, D] QKV rows
    wo_ptr,  # [L, D, NA] O-projection rows
    wr_ptr,  # [L, E, D] f32 router rows ([L, D, E] with RDE)
    w_in_ptr,  # [L, 2, F, D] gate rows, then up rows
    w_out_ptr,  # [L, F, D] down-projection rows
    kc_in_ptr, vc_in_ptr,  # [L, T, S_MAX, KV, HD] caches (aliased to kc_ptr, vc_ptr)
    ws_ptr,  # out, zeroed workspace: h [T, D] | logits [L, RCP, T, E] | counters
    kc_ptr, vc_ptr,  # out caches, each token's key/value written at its position
    rope_ptr,  # scratch [T, HD] f32: cos, then sin, of pos_t · inv_freq (program 0 writes them)
    qkv_ptr,  # scratch [T, NQKV] f32
    po_ptr,  # scratch [T, KV·S, GQ_PAD, HD] f32 attention partials
    pml_ptr,  # scratch [T, KV·S, 2, GQ_PAD] f32 their running max and sum
    att_ptr,  # scratch [T, NA] f32 attention output
    gs_ptr,  # scratch [T, E_PAD] f32 this layer's gates (phase S)
    xn_ptr,  # scratch [T, D] this layer's normalised FFN inputs, in the weights' dtype (S)
    k_ptr,  # out [L, T] i32 experts selected a token
    nu_ptr,  # out [L] i32 experts in the union
    fail_ptr,  # out [P] i32 1 where the program gave up on a barrier
    tim_ptr,  # out [P, NT] i64 with TIMING: %globaltimer at the start, then SLOTS a layer
    tab_ptr,  # scratch [P, E_PAD] i32 each program's table of the union's experts (phase F)
    xs_ptr,  # scratch [P, KX, TPS] (weights' dtype) with SX: each program's A / C inputs
    T: tl.constexpr, TP: tl.constexpr, L: tl.constexpr, D: tl.constexpr, HQ: tl.constexpr,
    KV: tl.constexpr, HD: tl.constexpr, GQ_PAD: tl.constexpr, E: tl.constexpr,
    E_PAD: tl.constexpr, G: tl.constexpr, BN: tl.constexpr, P: tl.constexpr, S: tl.constexpr,
    S_PAD: tl.constexpr, BT: tl.constexpr, S_MAX: tl.constexpr, R_A: tl.constexpr,
    RA_PAD: tl.constexpr, R_C: tl.constexpr, RC_PAD: tl.constexpr, R_Z: tl.constexpr,
    RZ_PAD: tl.constexpr, D_PAD: tl.constexpr, BE: tl.constexpr, EPS: tl.constexpr,
    NUCLEUS: tl.constexpr,
    SIGMOID: tl.constexpr, K_MIN: tl.constexpr, K_MAX: tl.constexpr, SCALE: tl.constexpr,
    SPIN: tl.constexpr, DOT_F32: tl.constexpr, AST: tl.constexpr, GS: tl.constexpr,
    US: tl.constexpr, WS_LG: tl.constexpr, WS_CTR: tl.constexpr,
    PF_A: tl.constexpr, PF_C: tl.constexpr, STEP_A: tl.constexpr, STEP_C: tl.constexpr,
    PFB: tl.constexpr, TIMING: tl.constexpr, UF: tl.constexpr, BKF: tl.constexpr,
    CWF: tl.constexpr, BKS: tl.constexpr, STAGGER: tl.constexpr, SX: tl.constexpr,
    KX: tl.constexpr, RS: tl.constexpr, RDE: tl.constexpr, RCP: tl.constexpr,
    BKC: tl.constexpr, TPS: tl.constexpr,
):  # fmt: skip
    NQKV: tl.constexpr = (HQ + 2 * KV) * HD
    NA: tl.constexpr = HQ * HD
    GQ: tl.constexpr = HQ // KV
    F: tl.constexpr = E * G
    PER: tl.constexpr = G // BN
    HALF: tl.constexpr = HD // 2
    NT: tl.constexpr = 1 + L * SLOTS
    pid = tl.program_id(0)
    _stamp(tim_ptr, pid, 0, NT, TIMING)
    failed = pid * 0
    ph = pid * 0  # barriers passed
    h_ptr = ws_ptr
    lg_ptr = ws_ptr + WS_LG
    ctr_ptr = (ws_ptr + WS_CTR).to(tl.pointer_type(tl.int32))
    hcnt_ptr = ctr_ptr + 1  # [L·T, KV] the key splits' counters
    if pid == 0:  # each token's RoPE tables, once a step (read after the first barrier)
        rh = tl.arange(0, HALF)
        inv = tl.load(inv_ptr + rh)
        for t in range(T):
            ang = tl.load(pos_ptr + t).to(tl.float32) * inv
            tl.store(rope_ptr + t * HD + rh, tl.cos(ang))
            tl.store(rope_ptr + t * HD + HALF + rh, tl.sin(ang))
    # The tokens' embedding rows into the residual, each program its columns.
    rz = pid * R_Z + tl.arange(0, RZ_PAD)
    zm = (rz < (pid + 1) * R_Z) & (rz < D)
    for t in range(T):
        row = x0_ptr + tl.load(tok_ptr + t).to(tl.int64) * D
        tl.store(h_ptr + t * D + rz, tl.load(row + rz, mask=zm, other=0.0).to(tl.float32),
                 mask=zm)  # fmt: skip
    _arrive(ctr_ptr)
    _pf_rows(wqkv_ptr, pid, R_A, NQKV, D, 0, PF_A, STEP_A, PFB)  # L2, while the barrier waits
    ph += 1
    failed = _wait(ctr_ptr, P * ph, failed, SPIN)
    a0 = pid * R_A
    a1 = tl.minimum(a0 + R_A, NQKV)
    c0 = pid * R_C
    c1 = tl.minimum(c0 + R_C, D)
    rt = tl.arange(0, TPS)  # the A and C products' token columns (TPS: 16 or 32)
    tmask = rt < T
    xs = xs_ptr + pid * KX * TPS * SX  # (SX 0: never read)
    for layer in range(L):
        rot = (pid + layer) * STAGGER  # where the A, C and expert loops start (``_staggered``)
        lw = tl.full([], 0, tl.int64) + layer  # 8B's stacked w_in has 3.8e9 elements
        t0 = 1 + layer * SLOTS  # this layer's first stamp: phase j starts at t0 + 2j
        _stamp(tim_ptr, pid, t0, NT, TIMING)
        # A: the residual's norm folded into the QKV product.
        if a0 < NQKV:  # (programs past the rows would stream the residual for nothing)
            qa, ss = _skinny(wqkv_ptr + lw * NQKV * D, h_ptr, ln1_ptr + layer * D, xs, a0, a1,
                             rot, D, T, TPS, RA_PAD, BKS, GS, True, SX, DOT_F32)  # fmt: skip
            qa = qa * tl.rsqrt(ss / D + EPS)[None, :]
            ra = a0 + tl.arange(0, RA_PAD)
            tl.store(qkv_ptr + rt[None, :] * NQKV + ra[:, None], qa,
                     mask=(ra < a1)[:, None] & tmask[None, :])  # fmt: skip
        _stamp(tim_ptr, pid, t0 + 1, NT, TIMING)
        _arrive(ctr_ptr)
        ph += 1
        failed = _wait(ctr_ptr, P * ph, failed, SPIN)
        _stamp(tim_ptr, pid, t0 + 2, NT, TIMING)
        # B: attention, one item per (token, KV head, split).
        for item in range(pid, T * KV * S, P):
            t = item // (KV * S)
            _attend_split(qkv_ptr + t * NQKV, kc_ptr, vc_ptr, po_ptr + t * KV * S * GQ_PAD * HD,
                          pml_ptr + t * KV * S * 2 * GQ_PAD, att_ptr + t * NA, hcnt_ptr,
                          rope_ptr + t * HD, rope_ptr + t * HD + HALF, tl.load(pos_ptr + t),
                          lw * T + t, (item // S) % KV, item % S, HQ, KV, HD, GQ, GQ_PAD, S,
                          S_PAD, BT, S_MAX, SCALE, DOT_F32, AST)  # fmt: skip
        _stamp(tim_ptr, pid, t0 + 3, NT, TIMING)
        _arrive(ctr_ptr)
        _pf_rows(wo_ptr + lw * D * NA, pid, R_C, D, NA, 0, PF_C, STEP_C, PFB)
        ph += 1
        failed = _wait(ctr_ptr, P * ph, failed, SPIN)
        _stamp(tim_ptr, pid, t0 + 4, NT, TIMING)
        # C: O projection + residual + this program's share of the router logits.
        if c0 < D:
            oc, _ = _skinny(wo_ptr + lw * D * NA, att_ptr, ln1_ptr, xs, c0, c1, rot, NA, T, TPS,
                            RC_PAD, BKC, GS, False, SX, DOT_F32)  # fmt: skip
            rc = c0 + tl.arange(0, RC_PAD)
            off = rt[None, :] * D + rc[:, None]
            m = (rc < c1)[:, None] & tmask[None, :]
            hv = oc + tl.load(h_ptr + off, mask=m, other=0.0, cache_modifier=".cg")
            tl.store(h_ptr + off, hv, mask=m)
            lgc = lg_ptr + (layer * RCP + (pid + layer) % RCP) * T * E  # this program's copy
            _router_share(wr_ptr + lw * E * D, ln2_ptr + layer * D, hv, lgc, c0, c1, rot, D, E,
                          T, TPS, RC_PAD, BE, RS, DOT_F32, RDE)  # fmt: skip
        _stamp(tim_ptr, pid, t0 + 5, NT, TIMING)
        _arrive(ctr_ptr)
        ph += 1
        failed = _wait(ctr_ptr, P * ph, failed, SPIN)
        _stamp(tim_ptr, pid, t0 + 6, NT, TIMING)
        # S: token t's selection in program t.
        rd = tl.arange(0, D_PAD)
        for t in range(pid, T, P):
            x = tl.load(h_ptr + t * D + rd, mask=rd < D, other=0.0, cache_modifier=".cg")
            rstd = tl.rsqrt(tl.sum(x * x, 0) / D + EPS)
            lgv = _logits(lg_ptr + (layer * RCP * T + t) * E, E, E_PAD, ".cg")
            for cp in range(1, RCP):  # the other copies' partial sums
                lgv += _logits(lg_ptr + ((layer * RCP + cp) * T + t) * E, E, E_PAD, ".cg")
            lgv = lgv * rstd
            gate, k = _select(lgv, tl.load(tau_ptr + layer), E, E_PAD, NUCLEUS, SIGMOID, K_MIN,
                              K_MAX)  # fmt: skip
            tl.store(gs_ptr + t * E_PAD + tl.arange(0, E_PAD), gate)
            ln2 = tl.load(ln2_ptr + layer * D + rd, mask=rd < D, other=0.0).to(tl.float32)
            xn = (x * rstd * ln2).to(xn_ptr.dtype.element_ty)  # the FFN's input, as XLA rounds it
            tl.store(xn_ptr + t * D + rd, xn, mask=rd < D)
            tl.store(k_ptr + layer * T + t, k)
        _stamp(tim_ptr, pid, t0 + 7, NT, TIMING)
        _arrive(ctr_ptr)
        ph += 1
        failed = _wait(ctr_ptr, P * ph, failed, SPIN)
        _stamp(tim_ptr, pid, t0 + 8, NT, TIMING)
        # F: the union's units, evenly over the programs, gate/up then down (``_unit_ffn``).
        tab = tab_ptr + pid * E_PAD
        n_union = _union(gs_ptr, tab, T, TP, E_PAD)
        if pid == 0:
            tl.store(nu_ptr + layer, n_union)
        n_units = n_union * PER
        u0 = pid * n_units // P
        u1 = (pid + 1) * n_units // P
        if u1 > u0:
            _unit_ffn(xn_ptr, gs_ptr, w_in_ptr + lw * 2 * F * D, w_out_ptr + lw * F * D, h_ptr,
                      tab, u0, u1, rot, D, F, G, E_PAD, T, TP, BN, UF, BKF, CWF, US,
                      DOT_F32)  # fmt: skip
        _stamp(tim_ptr, pid, t0 + 9, NT, TIMING)
        _arrive(ctr_ptr)
        if layer + 1 < L:
            _pf_rows(wqkv_ptr + (lw + 1) * NQKV * D, pid, R_A, NQKV, D, 0, PF_A, STEP_A, PFB)
        ph += 1
        failed = _wait(ctr_ptr, P * ph, failed, SPIN)
    tl.store(fail_ptr + pid, failed)


def megastep_batch(
    x0_vd, tokens_t, inv_freq_h, pos_t, tau_l, ln1_ld, ln2_ld, wqkv_lnd, wo_ldn, wr_led,
    w_in_lcfd, w_out_lfd, kc_ltskh, vc_ltskh, *, eps: float, rule: str = "paper",
    gate: str = "sigmoid", k_min: int = 1, k_max: int | None = None, programs: int = 0,
    splits: int = 0, block_t: int | None = None, attn_stages: int | None = None,
    warps: int = 8, spin: int = SPIN, gemv_stages: int = STAGES, unit_stages: int = STAGES,
    ffn_units: int | None = None, skinny_bk: int = 0, skinny_bk_c: int | None = None,
    skinny_tp: int | None = None, stagger: bool = True,
    skinny_stage: bool = False, skinny_rows: int | None = None,
    skinny_rows_c: int | None = None, router_stages: int | None = None,
    router_de: bool = False, router_copies: int | None = None, prefetch_kb: int = PREFETCH_KB,
    prefetch_o_kb: int = PREFETCH_O_KB, bulk_prefetch: bool | None = None, timing: int = 0,
    interpret: bool = False,
):  # fmt: skip
    """Every layer of T tokens' decode step: ``(h_td f32, kc, vc, k_lt i32, union_l i32,
    fail_p i32)``, plus with ``timing`` (GPU) each program's %globaltimer stamps
    ``[P, 1 + N_SLOTS · L]`` (ns: the start, then each phase's start and end a layer).

    ``tokens_t`` / ``pos_t`` ``[T]`` int32: each sequence's token and its position;
    ``kc_ltskh`` / ``vc_ltskh`` ``[L, T, S_MAX, KV, HD]`` the stacked caches (each token's key
    and value land at its position; a full cache drops them, as ``cache_write``). Weights as
    ``triton_megastep.megastep`` takes them (``megastep.pack``). ``h_td`` is the last layer's
    residual (the final norm and the LM head are the caller's); ``union_l`` the experts any
    token selected, a layer; ``fail_p`` nonzero where a program gave up on a grid barrier (its
    result is then wrong; ``megastep.check_fail`` raises). ``programs`` 0: one per SM.
    ``router_de``: ``wr_led`` is the routers as ``[L, D, E]`` (``megastep.pack(router_de=
    True)``), read so by the router share (``_router_share``'s ``RDE``). ``router_copies``:
    the copies of the logits the programs add into (``ROUTER_COPIES``)."""
    n_layers, n_qkv, d = wqkv_lnd.shape
    _, t, s_max, kv, hd = kc_ltskh.shape
    if wr_led.ndim != 3 or wr_led.shape[1 if router_de else 2] != d:
        want_r = "[L, d, E] (router_de)" if router_de else "[L, E, d]"
        raise ValueError(f"megastep_batch: router has shape {wr_led.shape}, expected {want_r}")
    e = wr_led.shape[2] if router_de else wr_led.shape[1]
    g = w_in_lcfd.shape[2] // e
    hq = wo_ldn.shape[2] // hd
    check(t, d, hd, g)
    bt, ast = default_attention(False, s_max, hd, jnp.dtype(kc_ltskh.dtype).itemsize)
    block_t = block_t or bt
    attn_stages = ast if attn_stages is None else attn_stages
    warps = warps or 8
    try:  # the batch-1 launch's checks, for the fields the two launches share
        if ffn_units is not None and ffn_units not in (1, 2, 4, 8):
            raise ValueError(
                f"ffn_units must be None (by the shape) or 1, 2, 4, 8 (units a group of the "
                f"expert phase), got {ffn_units}"
            )
        if router_stages is not None and not 1 <= router_stages <= 6:
            raise ValueError(
                f"router_stages must be None (by the shape) or 1 (a plain loop) to 6, got "
                f"{router_stages}"
            )
        for name, rows in (("skinny_rows", skinny_rows), ("skinny_rows_c", skinny_rows_c)):
            if rows not in (None, 0, 16, 32, 64, 128):
                raise ValueError(
                    f"{name} must be None (by the shape), 0 (16) or 16, 32, 64, 128, got {rows}"
                )
        if router_copies is not None and router_copies not in (1, 2, 4, 8, 16, 32):
            raise ValueError(
                f"router_copies must be None ({ROUTER_COPIES}) or 1, 2, 4, 8, 16, 32 (copies of "
                f"the router logits the programs add into), got {router_copies}"
            )
        if skinny_tp not in (None, *SKINNY_TP):
            raise ValueError(
                f"skinny_tp must be None ({MAX_TOKENS}) or one of {SKINNY_TP} (the A and C "
                f"products' token columns), got {skinny_tp}"
            )
        for name, bk in (("skinny_bk", skinny_bk), ("skinny_bk_c", skinny_bk_c or 0)):
            if bk not in (0, 32, 64, 128, 256, 512):
                raise ValueError(
                    f"{name} must be 0 ({BK}) or a power of 2 from 32 to 512, got {bk}"
                )
        k_max = check_launch(
            e, False, router_in_items=False, block_t=block_t, k_min=k_min, k_max=k_max,
            rule=rule, gate=gate, programs=programs, splits=splits, parts=0, warps=warps,
            tile_bytes=0, stages=(gemv_stages, unit_stages, attn_stages),
            prefetch=(prefetch_kb, prefetch_o_kb),
        )  # fmt: skip
    except ValueError as err:
        raise ValueError(f"megastep_batch: need a launch the kernel runs: {err}") from err
    want = {
        "tokens_t": (jnp.shape(tokens_t), (t,)), "pos_t": (jnp.shape(pos_t), (t,)),
        "tau_l": (jnp.shape(tau_l), (n_layers,)), "vc": (vc_ltskh.shape, kc_ltskh.shape),
        "wqkv": (n_qkv, (hq + 2 * kv) * hd), "w_out": (w_out_lfd.shape, (n_layers, e * g, d)),
        "router": (wr_led.shape[0], n_layers),
    }  # fmt: skip
    for name, (got, need) in want.items():
        if got != need:
            raise ValueError(f"megastep_batch: {name} has shape {got}, expected {need}")
    c = constants(t, n_layers, d, hq, kv, hd, e, g, s_max,
                  programs=programs or jt.default_programs(), splits=splits, block_t=block_t,
                  attn_stages=attn_stages, cache_itemsize=jnp.dtype(kc_ltskh.dtype).itemsize,
                  eps=eps, rule=rule, gate=gate, k_min=k_min, k_max=k_max, spin=spin,
                  gemv_stages=gemv_stages, unit_stages=unit_stages, ffn_units=ffn_units,
                  skinny_bk=skinny_bk, skinny_bk_c=skinny_bk_c, skinny_tp=skinny_tp,
                  stagger=stagger, skinny_stage=skinny_stage, skinny_rows=skinny_rows,
                  skinny_rows_c=skinny_rows_c,
                  router_stages=router_stages, router_de=router_de, router_copies=router_copies,
                  prefetch_kb=prefetch_kb, prefetch_o_kb=prefetch_o_kb, bulk_prefetch=bulk_prefetch,
                  weight_itemsize=jnp.dtype(wqkv_lnd.dtype).itemsize, timing=timing,
                  interpret=interpret)  # fmt: skip
    p, s, gq_pad = c["P"], c["S"], c["GQ_PAD"]
    f32, i32 = jnp.float32, jnp.int32
    out_shape = [
        jax.ShapeDtypeStruct((workspace_size(c),), f32),
        jax.ShapeDtypeStruct(kc_ltskh.shape, kc_ltskh.dtype),
        jax.ShapeDtypeStruct(vc_ltskh.shape, vc_ltskh.dtype),
        jax.ShapeDtypeStruct((t * hd,), f32),  # RoPE tables
        jax.ShapeDtypeStruct((t * n_qkv,), f32),
        jax.ShapeDtypeStruct((t * kv * s * gq_pad * hd,), f32),  # attention partials
        jax.ShapeDtypeStruct((t * kv * s * 2 * gq_pad,), f32),
        jax.ShapeDtypeStruct((t * hq * hd,), f32),  # attention output
        jax.ShapeDtypeStruct((t * c["E_PAD"],), f32),  # gates
        jax.ShapeDtypeStruct((t * d,), w_in_lcfd.dtype),  # the FFN's normalised inputs
        jax.ShapeDtypeStruct((n_layers * t,), i32),  # k
        jax.ShapeDtypeStruct((n_layers,), i32),  # union
        jax.ShapeDtypeStruct((p,), i32),  # fail flags
        jax.ShapeDtypeStruct((p, 1 + n_layers * N_SLOTS) if timing else (1,), jnp.int64),
        jax.ShapeDtypeStruct((p * c["E_PAD"],), i32),  # the union tables
        jax.ShapeDtypeStruct((p * c["KX"] * c["TPS"] if c["SX"] else 1,), wqkv_lnd.dtype),
    ]
    outs = jt.triton_call(
        _batch_kernel, x0_vd, jnp.asarray(tokens_t, i32), jnp.asarray(inv_freq_h, f32),
        jnp.asarray(pos_t, i32), jnp.asarray(tau_l, f32), ln1_ld, ln2_ld, wqkv_lnd, wo_ldn,
        wr_led, w_in_lcfd, w_out_lfd, kc_ltskh, vc_ltskh, out_shape=out_shape,
        input_output_aliases={12: 1, 13: 2}, zeroed_outputs=(0,), grid=(p,), num_warps=warps,
        num_stages=1, interpret=interpret, **c,
    )  # fmt: skip
    ws = outs[0]
    y = ws[: t * d].reshape(t, d)
    res = (y, outs[1], outs[2], outs[10].reshape(n_layers, t), outs[11], outs[12])
    return (*res, outs[13]) if timing else res
