"""A whole one-token decode step of a PrunePath Llama in ONE Triton launch (batch 1).

Why. Every lever inside XLA-launched kernels was measured in issue 5's sessions 12-17: a
one-token layer is ~10 launches (1B: ~40 µs a layer for ~11 µs of bytes at 75% sparsity), each
a chain of dependent round trips that no kernel can start before its predecessor ends. A
persistent kernel can issue the *next* phase's weight loads before it waits at the grid
barrier, so weight streaming overlaps the barrier and the activations' round trip.

What. For every layer, four phases separated by grid barriers (one counter, release arrival,
acquire polls; a program that polls ``SPIN`` times without the barrier opening gives up and
sets its ``fail`` flag, so a scheduling surprise cannot hang the GPU):

* A: RMSNorm of the residual (``h`` plus the previous FFN's sum ``f``; every program reads the
  row from L2 and keeps it normalised in registers) and the QKV GEMV; each program owns
  ``ceil(N / P)`` contiguous output rows (weights ``[N, D]``). Above d 1024 it streams them in
  column chunks of all its rows and reduces once at the end (``_gemv_cols``, ``qkv_cols``),
  below in chunks of full rows, each reduced against the whole input row.
* B: attention over the KV cache, one work item per (KV head, key split)
  (``triton_megastep_attn``; pipelined 64-key blocks above 1024 positions or with 128-dim
  heads: ``default_attention``).
* C: the O projection and the residual add (``h[rows] += W_o[rows]·attn + f[rows]``, then
  ``f[rows] = 0``), and with ``RC`` (the default) this program's share of the router logits
  before the RMSNorm's scale (``Σ_rows W_r[:, r]·ln2[r]·h[r]``, relaxed atomics): the scale
  ``1 / rms(h)`` is common to all logits, so the router needs no barrier of its own (without
  ``RC``, a phase D: norm + router GEMV).
* F: every program normalises ``h`` and computes the token's selection itself
  (``triton_select._select_ranked``, ``routing.select`` + ``routing.gates``' k and set, the
  experts in rank order; ``_select`` with ``ranked_select=False``), then the work-balanced unit
  loop (``_unit_loop_piped``; each unit's expert from the program's unit table,
  ``_rank_table`` / ``_unit_table``) over the selected experts' rows, added into
  ``f`` with relaxed atomics — not into ``h``, which slower programs may still be reading.

Around the layers: layer 0 reads its residual row from the embedding table at the token (each
program writes its part into ``h`` before the first barrier), program 0 computes RoPE's cos and
sin at the position once (read after that barrier), and the residual, FFN sum, logits and
counters share one zeroed workspace (one memset before the launch). With ``HI`` (``head_in``)
one more barrier after the last layer, then the final RMSNorm and the LM head's rows, each
program ``ceil(V / P)`` of them: the step's logits come out of the launch.

With ``MBC`` (``merge_bc``; by default where measured faster, ``triton_megastep_plan``) B and C
are one phase, three barriers a layer: each program's item (KV head, row part) runs its head's
attention over the whole cache and adds its block of W_o into ``h`` (``triton_megastep_ao``);
the router logits come from phase A (``W_r·(ln2 ⊙ h)`` before attention, each program its
experts) plus each item's share of ``M·attn``, ``M = W_r·diag(ln2)·W_o``.

The GEMV phases' helpers live in ``triton_megastep_gemv``, the attention item in
``triton_megastep_attn``, the merged phase in ``triton_megastep_ao``, the launch's defaults and
constexprs in ``triton_megastep_plan``.

Weight streaming (BENCHMARKS.md, nineteenth and twentieth sessions). Right after arriving at a
barrier a program loads the first row chunk of its next GEMV into registers and asks L2 for the
next ``PF_*`` lines of its block (``prefetch.global.L2``, ``triton_l2``), the attention items
for their first cached keys; the rest of every GEMV and the unit loop stream through Triton's
software pipeliner (``tl.range(num_stages=STAGES)``: ``cp.async.cg`` into shared memory). Data
other programs wrote in this launch is read with ``.cg`` (L2, not a stale L1). Every phase walks
its work items with stride P, so any grid size computes the same result and the Triton
interpreter runs the whole step with one program (CPU tests).

The residual stream stays fp32 inside the launch (the XLA model rounds it to the model dtype
after every add), so bf16 results agree with the XLA path within the bf16 tolerance, fp32 ones
up to summation order (the atomics' order varies from run to run).

Limits (``check`` raises on anything else): Llama family without attention biases or a sliding
window, a PrunePath SwiGLU FFN, ``next_pow2(d) ≤ 4096``, G a multiple of 2, head_dim a power of
two, batch 1; launch: ``block_t`` a power of 2 ≥ 16 (the dot's key block).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from prunepath_jax.kernels import jt
from prunepath_jax.kernels.triton_balanced import _rank_table, _unit_loop_piped, _unit_table
from prunepath_jax.kernels.triton_grid import _arrive, _stamp, _wait
from prunepath_jax.kernels.triton_l2 import l2_lines
from prunepath_jax.kernels.triton_megastep_ao import (
    _attend_project,
    _part_rows,
    _pf_item,
    _router_base,
)
from prunepath_jax.kernels.triton_megastep_attn import _attend_split, _pf_kv
from prunepath_jax.kernels.triton_megastep_gemv import (
    _final_normed,
    _first_chunk,
    _first_rows,
    _gemv_cols,
    _gemv_rows,
    _normed,
    _pf_rows,
    _router_part,
)
from prunepath_jax.kernels.triton_megastep_plan import (  # noqa: F401 (the launch's API)
    ATTN_STAGES,
    BLOCK_T,
    BULK_PREFETCH_ABOVE_D,
    HEAD_IN,
    HEAD_STAGES,
    LONG_CACHE,
    MERGE_BLOCK_T,
    O_COLS,
    PREFETCH_AO_KB,
    PREFETCH_KB,
    PREFETCH_KEYS,
    PREFETCH_O_KB,
    PREFETCH_RB_KB,
    QKV_COLS,
    QKV_COLS_ABOVE_D,
    RANKED_SELECT,
    SPIN,
    STAGES,
    TILE_BYTES,
    UNIT_TABLE,
    WARPS,
    WIDE_HEAD,
    XLONG_BLOCK_BYTES,
    XLONG_BLOCK_T,
    XLONG_CACHE,
    check_launch,
    check_shapes,
    constants,
    default_attention,
    default_bulk_prefetch,
    default_merge,
    default_qkv_cols,
    default_splits,
    default_tile_bytes,
    default_warps,
    unsupported_shape,
)
from prunepath_jax.kernels.triton_select import _logits, _select, _select_ranked

# Timing events a layer (TIMING): A start/end, B start/end, C start/end, D start/end (with RC:
# C's end twice, then D's end after the router share, so D is that share without a barrier),
# F start, F selected, F's unit loop done, F end.
N_SLOTS = 12
SLOTS = tl.constexpr(N_SLOTS)


@triton.jit
def _megastep_kernel(
    x0_ptr,  # [V, D] the embedding table (or [1, D]: a given residual row), any float dtype
    tok_ptr,  # [1] i32 the token: layer 0's residual is row tok of x0
    inv_ptr,  # [HD/2] f32 RoPE inverse frequencies
    pos_ptr,  # [1] i32 the token's position (where its key/value go)
    tau_ptr,  # [L] f32 budgets
    ln1_ptr, ln2_ptr,  # [L, D] RMSNorm weights
    wqkv_ptr,  # [L, NQKV, D] QKV rows
    wo_ptr,  # [L, D, NA] O-projection rows
    wr_ptr,  # [L, E, D] f32 router rows
    wm_ptr,  # [L, E, NA] f32 M = W_r·diag(ln2)·W_o (MBC: the router's share of the O phase)
    w_in_ptr,  # [L, 2, F, D] gate rows, then up rows
    w_out_ptr,  # [L, F, D] down-projection rows
    hw_ptr,  # [V, D] LM head rows (with HI; else unread)
    nw_ptr,  # [D] final RMSNorm weights (with HI; else unread)
    kc_in_ptr, vc_in_ptr,  # [L, S_MAX, KV, HD] caches (aliased to kc_ptr, vc_ptr)
    ws_ptr,  # out, zeroed workspace (triton_megastep_plan.workspace): h | f | logits | counters
    kc_ptr, vc_ptr,  # out caches, this token's key/value written at pos
    rope_ptr,  # scratch [HD] f32: cos, then sin, of pos · inv_freq (program 0 writes them)
    qkv_ptr,  # scratch [NQKV] f32
    po_ptr,  # scratch [KV·S, GQ_PAD, HD] f32 attention partials
    pml_ptr,  # scratch [KV·S, 2, GQ_PAD] f32 their running max and sum
    att_ptr,  # scratch [NA] f32 attention output
    k_ptr,  # out [L] i32 experts selected per layer
    fail_ptr,  # out [P] i32 1 where the program gave up on a barrier
    tim_ptr,  # out [P, NT] i64 with TIMING: %globaltimer at the start and SLOTS events a layer
    tab_ptr,  # scratch [P, 2, E_PAD] i32 with UT: each program's unit table (_unit_table)
    out_ptr,  # out [V] f32 with HI: the logits
    xs_ptr,  # scratch [P, XS_W] f32 with KS or KSC: each program's GEMV input row (_gemv_cols)
    L: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, HQ: tl.constexpr, KV: tl.constexpr,
    HD: tl.constexpr, GQ_PAD: tl.constexpr, NA_PAD: tl.constexpr, E: tl.constexpr,
    E_PAD: tl.constexpr, G: tl.constexpr, BN: tl.constexpr, P: tl.constexpr, S: tl.constexpr,
    S_PAD: tl.constexpr, BT: tl.constexpr, S_MAX: tl.constexpr, R_A: tl.constexpr,
    BRC_A: tl.constexpr, R_C: tl.constexpr, BRC_C: tl.constexpr, R_D: tl.constexpr,
    BRC_D: tl.constexpr, GS: tl.constexpr, US: tl.constexpr, EPS: tl.constexpr,
    NUCLEUS: tl.constexpr, SIGMOID: tl.constexpr, K_MIN: tl.constexpr, K_MAX: tl.constexpr,
    SCALE: tl.constexpr, SPIN: tl.constexpr, TIMING: tl.constexpr, DOT_F32: tl.constexpr,
    RC: tl.constexpr, RC_PAD: tl.constexpr, RC_REGS: tl.constexpr, BE: tl.constexpr,
    PF_A: tl.constexpr,
    PF_C: tl.constexpr, PF_D: tl.constexpr, STEP_A: tl.constexpr, STEP_C: tl.constexpr,
    STEP_D: tl.constexpr, PF_KEYS: tl.constexpr, LPR: tl.constexpr, PF_R: tl.constexpr,
    UT: tl.constexpr, NIC_PAD: tl.constexpr, AST: tl.constexpr, MBC: tl.constexpr,
    NP: tl.constexpr, RB: tl.constexpr, RB_PAD: tl.constexpr, BRB: tl.constexpr, RE: tl.constexpr,
    RE_PAD: tl.constexpr, R_B: tl.constexpr, R_B_PAD: tl.constexpr, PF_OR: tl.constexpr,
    LPO: tl.constexpr, LPM: tl.constexpr, PF_RB: tl.constexpr, RBI: tl.constexpr,
    RBA: tl.constexpr, HS: tl.constexpr, R_Z: tl.constexpr, R_Z_PAD: tl.constexpr,
    RK: tl.constexpr, HI: tl.constexpr, V: tl.constexpr, R_H: tl.constexpr, BRC_H: tl.constexpr,
    PF_H: tl.constexpr, STEP_H: tl.constexpr, HST: tl.constexpr, WS_F: tl.constexpr,
    WS_LG: tl.constexpr, WS_CTR: tl.constexpr, WS_N: tl.constexpr, KS: tl.constexpr,
    RA_PAD: tl.constexpr, BK_A: tl.constexpr, KSC: tl.constexpr, BK_C: tl.constexpr,
    XS_W: tl.constexpr, PFB: tl.constexpr,
):  # fmt: skip
    NQKV: tl.constexpr = (HQ + 2 * KV) * HD
    NA: tl.constexpr = HQ * HD
    GQ: tl.constexpr = HQ // KV
    F: tl.constexpr = E * G
    PER: tl.constexpr = G // BN
    NT: tl.constexpr = L * SLOTS + 1
    pid = tl.program_id(0)
    _stamp(tim_ptr, pid, 0, NT, TIMING)
    failed = pid * 0
    ph = pid * 0  # barriers passed
    HALF: tl.constexpr = HD // 2
    # One zeroed workspace (one memset before the launch, not four): the residual, the FFN sum,
    # the router logits, then the barrier and split counters as int32.
    h_ptr = ws_ptr
    f_ptr = ws_ptr + WS_F
    lg_ptr = ws_ptr + WS_LG
    ctr_ptr = (ws_ptr + WS_CTR).to(tl.pointer_type(tl.int32))
    hcnt_ptr = ctr_ptr + 1
    pos = tl.load(pos_ptr)
    x0_row = x0_ptr + tl.load(tok_ptr).to(tl.int64) * D
    rd = tl.arange(0, D_PAD)
    dmask = rd < D
    rna = tl.arange(0, NA_PAD)
    wa = _first_chunk(wqkv_ptr, pid, R_A, NQKV, D, D_PAD, BRC_A, RA_PAD, BK_A, KS)
    _pf_rows(wqkv_ptr, pid, R_A, NQKV, D, BRC_A, PF_A, STEP_A, PFB)
    if RBA:  # the router rows of phase A
        _pf_rows(wr_ptr, pid, R_B, E, D, 0, PF_RB, STEP_D, PFB)
    if pid == 0:  # RoPE at this position, once a step (read after the first barrier)
        rh = tl.arange(0, HALF)
        ang = pos.to(tl.float32) * tl.load(inv_ptr + rh)
        tl.store(rope_ptr + rh, tl.cos(ang))
        tl.store(rope_ptr + HALF + rh, tl.sin(ang))
    # The token's embedding row into the residual, each program its part, then one barrier. (A
    # branch for layer 0 inside the layer loop instead, with .cg RoPE loads, made the step 1-2.6%
    # slower than XLA's gather before the launch; this version measured neutral. BENCHMARKS.md,
    # twenty-fifth session.)
    rz, zm = _part_rows(pid, R_Z, R_Z_PAD, D)
    tl.store(h_ptr + rz, tl.load(x0_row + rz, mask=zm, other=0.0).to(tl.float32), mask=zm)
    _arrive(ctr_ptr)
    ph += 1
    failed = _wait(ctr_ptr, P * ph, failed, SPIN)
    for layer in range(L):
        # int64 offsets: 8B's stacked w_in has 3.8e9 elements, past int32.
        lw = tl.full([], 0, tl.int64) + layer
        t = 1 + layer * SLOTS  # this layer's first timing slot
        # The residual and FFN sum buffers this layer reads (c) and writes (n): the same buffer
        # unless RBI double-buffers them (HS = D).
        hc = h_ptr + (layer % 2) * HS
        hn = h_ptr + ((layer + 1) % 2) * HS
        fc = f_ptr + (layer % 2) * HS
        fn = f_ptr + ((layer + 1) % 2) * HS
        _stamp(tim_ptr, pid, t, NT, TIMING)
        # A: norm (of h plus the previous FFN's sum) + QKV (its first chunk loaded already).
        x, _ = _normed(hc, fc, ln1_ptr + layer * D, D, D_PAD, EPS, True)
        if KS:
            _gemv_cols(wqkv_ptr + lw * NQKV * D, wa, x, xs_ptr + pid * XS_W, qkv_ptr, f_ptr, pid,
                       NQKV, D, R_A, RA_PAD, BK_A, GS, False)  # fmt: skip
        else:
            _gemv_rows(wqkv_ptr + lw * NQKV * D, wa, x, qkv_ptr, f_ptr, pid, NQKV, D, D_PAD, R_A,
                       BRC_A, False, GS, 1)  # fmt: skip
        if RBA:  # this program's experts' router logits of the residual before attention
            _router_base(wr_ptr + lw * E * D, ln2_ptr + layer * D, hc, fc, lg_ptr + layer * E,
                         pid, R_B, R_B_PAD, D, D_PAD, E, False)  # fmt: skip
        _stamp(tim_ptr, pid, t + 1, NT, TIMING)
        _arrive(ctr_ptr)
        if MBC:
            for item in range(pid, KV * NP, P):
                _pf_item(wo_ptr + lw * D * NA, wm_ptr + lw * E * NA, kc_ptr, vc_ptr, pos, lw,
                         item // NP, item % NP, D, NA, E, KV, HD, GQ, NP, RB, PF_OR, LPO, STEP_C,
                         RE, RE_PAD, LPM, STEP_D, BT, S_MAX, PF_KEYS, LPR)  # fmt: skip
                if RBI:  # the item's router rows
                    _pf_rows(wr_ptr + lw * E * D, item, R_B, E, D, 0, PF_RB, STEP_D, PFB)
        elif PF_KEYS > 0:
            if pid < KV * S:
                _pf_kv(kc_ptr, vc_ptr, pos, lw, pid // S, pid % S, KV, HD, S, BT, S_MAX, PF_KEYS,
                       LPR)  # fmt: skip
        ph += 1
        failed = _wait(ctr_ptr, P * ph, failed, SPIN)
        _stamp(tim_ptr, pid, t + 2, NT, TIMING)
        if MBC:  # B and C as one phase: attention + O projection + the router's O share
            for item in range(pid, KV * NP, P):
                _attend_project(qkv_ptr, kc_ptr, vc_ptr, rope_ptr, rope_ptr + HALF,
                                wo_ptr + lw * D * NA,
                                wm_ptr + lw * E * NA, wr_ptr + lw * E * D, ln2_ptr + layer * D,
                                hc, fc, hn, lg_ptr + layer * E, pos, lw, item // NP, item % NP, D,
                                D_PAD, E, HQ, KV, HD, GQ, GQ_PAD, BT, S_MAX, SCALE, DOT_F32, AST,
                                RB, RB_PAD, BRB, RE, RE_PAD, GS, RBI, NP, R_B,
                                R_B_PAD)  # fmt: skip
            for j in tl.static_range(3, 7):  # C and D take no time
                _stamp(tim_ptr, pid, t + j, NT, TIMING)
        else:
            # B: attention, one item per (KV head, split).
            for item in range(pid, KV * S, P):
                _attend_split(qkv_ptr, kc_ptr, vc_ptr, po_ptr, pml_ptr, att_ptr, hcnt_ptr,
                              rope_ptr, rope_ptr + HALF, pos, lw, item // S, item % S, HQ, KV,
                              HD, GQ,
                              GQ_PAD, S, S_PAD, BT, S_MAX, SCALE, DOT_F32, AST)  # fmt: skip
            _stamp(tim_ptr, pid, t + 3, NT, TIMING)
            _arrive(ctr_ptr)
            wo = _first_chunk(wo_ptr + lw * D * NA, pid, R_C, D, NA, NA_PAD, BRC_C, RC_PAD, BK_C,
                              KSC)  # fmt: skip
            _pf_rows(wo_ptr + lw * D * NA, pid, R_C, D, NA, BRC_C, PF_C, STEP_C, PFB)
            if PF_R > 0:  # the router columns of this program's rows (RC): one line a router row
                if pid * R_C < D:
                    l2_lines(wr_ptr + lw * E * D + tl.minimum(tl.arange(0, PF_R), E - 1) * D
                             + pid * R_C)  # fmt: skip
            ph += 1
            failed = _wait(ctr_ptr, P * ph, failed, SPIN)
            _stamp(tim_ptr, pid, t + 4, NT, TIMING)
            # C: O projection + residual (+ the previous FFN's sum, zeroed for this layer's).
            xa = tl.load(att_ptr + rna, mask=rna < NA, other=0.0, cache_modifier=".cg")
            if KSC:
                hv = _gemv_cols(wo_ptr + lw * D * NA, wo, xa, xs_ptr + pid * XS_W, h_ptr, f_ptr,
                                pid, D, NA, R_C, RC_PAD, BK_C, GS, True)  # fmt: skip
            else:
                hv = _gemv_rows(wo_ptr + lw * D * NA, wo, xa, h_ptr, f_ptr, pid, D, NA, NA_PAD,
                                R_C, BRC_C, True, GS, NIC_PAD)  # fmt: skip
            if RC:  # + this program's share of the router logits: no barrier, timed as D
                _stamp(tim_ptr, pid, t + 5, NT, TIMING)
                _stamp(tim_ptr, pid, t + 6, NT, TIMING)
                if pid * R_C < D:
                    _router_part(wr_ptr + lw * E * D, ln2_ptr + layer * D, h_ptr, hv,
                                 lg_ptr + layer * E, pid, R_C, RC_PAD, D, E, BE, GS,
                                 RC_REGS)  # fmt: skip
            else:
                _stamp(tim_ptr, pid, t + 5, NT, TIMING)
                _arrive(ctr_ptr)
                wr = _first_rows(wr_ptr + lw * E * D, pid, R_D, E, D, D_PAD, BRC_D)
                _pf_rows(wr_ptr + lw * E * D, pid, R_D, E, D, BRC_D, PF_D, STEP_D, PFB)
                ph += 1
                failed = _wait(ctr_ptr, P * ph, failed, SPIN)
                _stamp(tim_ptr, pid, t + 6, NT, TIMING)
                # D: the FFN's norm (every program keeps the row for phase F) + router logits.
                x2, _ = _normed(h_ptr, f_ptr, ln2_ptr + layer * D, D, D_PAD, EPS, False)
                _gemv_rows(wr_ptr + lw * E * D, wr, x2, lg_ptr + layer * E, f_ptr, pid, E, D, D_PAD,
                           R_D, BRC_D, False, GS, 1)  # fmt: skip
        _stamp(tim_ptr, pid, t + 7, NT, TIMING)
        _arrive(ctr_ptr)
        ph += 1
        failed = _wait(ctr_ptr, P * ph, failed, SPIN)
        _stamp(tim_ptr, pid, t + 8, NT, TIMING)
        # F: selection in every program, then the balanced unit loop into the FFN sum f (not h:
        # with RC other programs still read h here; the next O phase folds f into h).
        # The logits and τ are loaded before the norm's reduction (loads do not move past a
        # CTA barrier): one L2 round trip with h's instead of two more after it.
        lgv = _logits(lg_ptr + layer * E, E, E_PAD, ".cg")
        tau = tl.load(tau_ptr + layer)
        if RBI:  # this layer's read buffers are free again: zeroed for the next layer's writes
            rz, zm = _part_rows(pid, R_Z, R_Z_PAD, D)
            tl.store(hc + rz, tl.zeros([R_Z_PAD], tl.float32), mask=zm)
            tl.store(fc + rz, tl.zeros([R_Z_PAD], tl.float32), mask=zm)
        if RC:
            x2, rstd = _normed(hn, fn, ln2_ptr + layer * D, D, D_PAD, EPS, False)
            lgv *= rstd
        if RK:  # the selected experts in rank order: the table needs no scan
            expert, gate, k = _select_ranked(lgv, tau, E, E_PAD, NUCLEUS, SIGMOID, K_MIN, K_MAX)
            cnt = expert  # unread: the unit loop reads the table
        else:
            gate, k = _select(lgv, tau, E, E_PAD, NUCLEUS, SIGMOID, K_MIN, K_MAX)
            cnt = tl.cumsum((gate != 0.0).to(tl.int32), 0)
        if pid == 0:
            tl.store(k_ptr + layer, k)
        _stamp(tim_ptr, pid, t + 9, NT, TIMING)
        n_units = k * PER
        u0 = pid * n_units // P
        u1 = (pid + 1) * n_units // P
        if u1 > u0:
            if RK:
                _rank_table(tab_ptr + pid * 2 * E_PAD, expert, gate, E_PAD)
            elif UT:
                _unit_table(tab_ptr + pid * 2 * E_PAD, gate, cnt, E_PAD)
            acc = _unit_loop_piped(x2, w_in_ptr + lw * 2 * F * D, w_out_ptr + lw * F * D, gate,
                                   cnt, tab_ptr + pid * 2 * E_PAD, u0, u1, D, D_PAD, E_PAD, F,
                                   G, BN, US, UT)  # fmt: skip
            _stamp(tim_ptr, pid, t + 10, NT, TIMING)
            tl.atomic_add(fn + rd, acc, mask=dmask, sem="relaxed")
        else:
            _stamp(tim_ptr, pid, t + 10, NT, TIMING)
        _stamp(tim_ptr, pid, t + 11, NT, TIMING)
        if layer + 1 < L:
            _arrive(ctr_ptr)
            wa = _first_chunk(wqkv_ptr + (lw + 1) * NQKV * D, pid, R_A, NQKV, D, D_PAD, BRC_A,
                              RA_PAD, BK_A, KS)  # fmt: skip
            _pf_rows(wqkv_ptr + (lw + 1) * NQKV * D, pid, R_A, NQKV, D, BRC_A, PF_A,
                     STEP_A, PFB)  # fmt: skip
            if RBA:
                _pf_rows(wr_ptr + (lw + 1) * E * D, pid, R_B, E, D, 0, PF_RB, STEP_D, PFB)
            ph += 1
            failed = _wait(ctr_ptr, P * ph, failed, SPIN)
    if HI:  # the final norm and the LM head's rows: the step's logits without another launch
        _arrive(ctr_ptr)
        wh = _first_rows(hw_ptr, pid, R_H, V, D, D_PAD, BRC_H)
        _pf_rows(hw_ptr, pid, R_H, V, D, BRC_H, PF_H, STEP_H, PFB)
        ph += 1
        failed = _wait(ctr_ptr, P * ph, failed, SPIN)
        x = _final_normed(h_ptr + (L % 2) * HS, f_ptr + (L % 2) * HS, nw_ptr, D, D_PAD, EPS)
        _gemv_rows(hw_ptr, wh, x, out_ptr, f_ptr, pid, V, D, D_PAD, R_H, BRC_H, False, HST, 1)
    tl.store(fail_ptr + pid, failed)


def megastep(
    x0_vd, token, inv_freq_h, pos, tau_l, ln1_ld, ln2_ld, wqkv_lnd, wo_ldn, wr_led, wm_len,
    w_in_lcfd, w_out_lfd, kc_lskh, vc_lskh, *, eps: float, head_vd=None, norm_d=None,
    head_in: bool = False, head_stages: int = HEAD_STAGES, rule: str = "paper",
    gate: str = "sigmoid", k_min: int = 1, k_max: int | None = None, programs: int = 0,
    splits: int = 0, block_t: int | None = None, warps: int = WARPS, tile_bytes: int = 0,
    spin: int = SPIN, timing: int = 0, interpret: bool = False, gemv_stages: int = STAGES,
    unit_stages: int = STAGES, router_in_c: bool = True, prefetch_kb: int = PREFETCH_KB,
    prefetch_o_kb: int = PREFETCH_O_KB, prefetch_keys: int = PREFETCH_KEYS,
    unit_table: bool = UNIT_TABLE, attn_stages: int | None = None, merge_bc: bool | None = None,
    parts: int = 0, prefetch_ao_kb: int = PREFETCH_AO_KB, prefetch_rb_kb: int = PREFETCH_RB_KB,
    router_in_items: bool = False, ranked_select: bool = RANKED_SELECT,
    qkv_cols: int | None = None, o_cols: int | None = None,
    bulk_prefetch: bool | None = None,
):  # fmt: skip
    """Every layer of one token's decode step: ``(h_d f32, kc, vc, k_l i32, fail_p i32)``, or
    with ``head_in`` the logits ``[V]`` f32 instead of ``h_d``.

    Layer 0's residual is row ``token`` of ``x0_vd`` (the embedding table; or a ``[1, d]``
    residual row with token 0), read inside the launch; ``inv_freq_h`` the RoPE inverse
    frequencies ``[head_dim / 2]`` (cos and sin at ``pos`` are computed in the launch);
    ``pos`` an int32 scalar or ``[1]``; ``tau_l`` the per-layer budgets. Weights are stacked
    over layers and output-row-major (``models``' ``megastep.pack``); ``wm_len`` is
    ``W_r · diag(ln2) · W_o`` a layer (read with ``merge_bc``). ``head_in``: the final RMSNorm
    (``norm_d``) and the LM head (``head_vd``, rows ``[V, d]``) run as the launch's last phase.
    ``fail_p`` is nonzero where a program gave up on a grid barrier (its result is then wrong;
    ``megastep.decode_chunk`` raises). ``programs`` 0: one per SM (always co-resident);
    ``merge_bc`` None: ``default_merge``; ``block_t`` and ``attn_stages`` None:
    ``default_attention`` (by the phase, the cache length, the head width and the cache's
    dtype);
    ``tile_bytes`` 0: ``default_tile_bytes``; ``qkv_cols`` / ``o_cols`` None:
    ``default_qkv_cols`` / ``O_COLS``. ``timing`` 1: each program's stamps come last; 2 (a
    diagnostic): only their clock reads are compiled in, the returned stamps left unwritten.
    """
    n_layers, n_qkv, d = wqkv_lnd.shape
    _, s_max, kv, hd = kc_lskh.shape
    e = wr_led.shape[1]
    hq, g, vocab = check_shapes(
        x0_vd, token, inv_freq_h, pos, tau_l, ln1_ld, ln2_ld, wqkv_lnd, wo_ldn, wr_led, wm_len,
        w_in_lcfd, w_out_lfd, kc_lskh, vc_lskh, head_vd, norm_d, head_in,
    )  # fmt: skip
    merge_bc = default_merge(d, s_max) if merge_bc is None else bool(merge_bc)
    bt, ast = default_attention(merge_bc, s_max, hd, jnp.dtype(kc_lskh.dtype).itemsize)
    block_t = block_t or bt
    attn_stages = ast if attn_stages is None else attn_stages
    k_max = check_launch(
        e, merge_bc, router_in_items=router_in_items, block_t=block_t, k_min=k_min, k_max=k_max,
        rule=rule, gate=gate, programs=programs, splits=splits, parts=parts, warps=warps,
        tile_bytes=tile_bytes, qkv_cols=qkv_cols, o_cols=o_cols,
        stages=(gemv_stages, unit_stages, attn_stages, head_stages),
        prefetch=(prefetch_kb, prefetch_o_kb, prefetch_keys, prefetch_ao_kb, prefetch_rb_kb),
    )  # fmt: skip
    c = constants(
        n_layers, d, hq, kv, hd, e, g, s_max, programs=programs or jt.default_programs(),
        splits=splits, block_t=block_t, tile_bytes=tile_bytes or default_tile_bytes(d),
        itemsizes=[jnp.dtype(w.dtype).itemsize for w in (wqkv_lnd, wo_ldn, wr_led, kc_lskh)],
        eps=eps, rule=rule, gate=gate, k_min=k_min, k_max=k_max, spin=spin, timing=timing,
        gemv_stages=gemv_stages, unit_stages=unit_stages, router_in_c=router_in_c,
        prefetch_kb=prefetch_kb, prefetch_o_kb=prefetch_o_kb, prefetch_keys=prefetch_keys,
        unit_table=unit_table, attn_stages=attn_stages, merge_bc=merge_bc, parts=parts,
        prefetch_ao_kb=prefetch_ao_kb, prefetch_rb_kb=prefetch_rb_kb,
        router_in_items=router_in_items, ranked_select=ranked_select, interpret=interpret,
        vocab=vocab, head_itemsize=jnp.dtype(head_vd.dtype).itemsize if head_in else 2,
        head_stages=head_stages, qkv_cols=qkv_cols, o_cols=o_cols,
        bulk_prefetch=bulk_prefetch,
    )  # fmt: skip
    p, s, gq_pad = c["P"], c["S"], c["GQ_PAD"]
    f32 = jnp.float32
    out_shape = [
        jax.ShapeDtypeStruct((c["WS_N"],), f32),  # the zeroed workspace
        jax.ShapeDtypeStruct(kc_lskh.shape, kc_lskh.dtype),
        jax.ShapeDtypeStruct(vc_lskh.shape, vc_lskh.dtype),
        jax.ShapeDtypeStruct((hd,), f32),  # RoPE tables
        jax.ShapeDtypeStruct((n_qkv,), f32),  # qkv scratch
        jax.ShapeDtypeStruct((kv * s * gq_pad * hd,), f32),  # partials
        jax.ShapeDtypeStruct((kv * s * 2 * gq_pad,), f32),
        jax.ShapeDtypeStruct((hq * hd,), f32),  # attention output
        jax.ShapeDtypeStruct((n_layers,), jnp.int32),  # k
        jax.ShapeDtypeStruct((p,), jnp.int32),  # fail flags
        jax.ShapeDtypeStruct((p, n_layers * N_SLOTS + 1) if timing else (1,), jnp.int64),
        jax.ShapeDtypeStruct((p * 2 * c["E_PAD"] if unit_table else 1,), jnp.int32),  # tables
        jax.ShapeDtypeStruct((c["V"] if head_in else 1,), f32),  # logits
        jax.ShapeDtypeStruct((p * c["XS_W"] if c["KS"] or c["KSC"] else 1,), f32),  # GEMV rows
    ]
    outs = jt.triton_call(
        _megastep_kernel, x0_vd, jnp.reshape(jnp.asarray(token, jnp.int32), (1,)),
        jnp.asarray(inv_freq_h, f32), jnp.reshape(jnp.asarray(pos, jnp.int32), (1,)),
        jnp.asarray(tau_l, f32), ln1_ld, ln2_ld, wqkv_lnd, wo_ldn, wr_led, wm_len, w_in_lcfd,
        w_out_lfd, head_vd if head_in else x0_vd, norm_d if head_in else ln1_ld, kc_lskh,
        vc_lskh, out_shape=out_shape, input_output_aliases={15: 1, 16: 2}, zeroed_outputs=(0,),
        grid=(p,), num_warps=warps or default_warps(e), num_stages=1, interpret=interpret, **c,
    )  # fmt: skip
    kc, vc, k_l, fail = outs[1], outs[2], outs[8], outs[9]
    if head_in:
        y = outs[12]
    else:  # the last layer's residual buffer + its FFN sum
        h0 = c["HS"] * (n_layers % 2)  # RBI double-buffers them (HS = d), else HS = 0
        f0 = c["WS_F"] + h0
        y = outs[0][h0 : h0 + d] + outs[0][f0 : f0 + d]
    if timing:
        return y, kc, vc, k_l, fail, outs[10]
    return y, kc, vc, k_l, fail
