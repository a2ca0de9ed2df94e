"""Attention and the O projection as ONE phase of the one-launch decode step (``triton_megastep``
with ``MBC``): no grid barrier between them, and the O weights stream while the attention waits.

Why. Split, the attention phase is a chain of dependent L2 round trips on 16-32 of 132 programs
(1B: 7 µs a layer, the other programs idle and DRAM with them), then a barrier, then the O
GEMV streams W_o on every program (5 µs). Merged, every program gets a work item (KV head g,
row part p): it asks L2 for its slice of W_o at barrier arrival, runs head g's attention over
the whole cache (the parts of one head repeat it: a few KB of keys each from L2 at short
contexts), and multiplies its ``[rows of part p, columns of head g]`` block of W_o into the
residual with relaxed atomics.

The router logits then have no residual row to read after the O phase (the items' sums land in
any order), so they are split by linearity: ``W_r·(ln2 ⊙ h_new) = W_r·(ln2 ⊙ h_old) +
M·attn`` with ``M = W_r · diag(ln2) · W_o`` (``[E, NA]``, float32, made once by
``megastep.pack``). The first term each program computes for its share of experts in the QKV
phase (``_router_base``, reading ``h_old`` again after the QKV GEMV); the second each item adds
for its columns (``M``'s rows of part p). The expert phase scales the sum by ``1 / rms(h_new)``
as before. Costs: ``W_r``'s bytes once more a layer (in the QKV phase: measured 1.5 µs a layer
at 1B, 7.2 at 8B, where the merged phase is therefore off), the attention repeated per part (L2
reads, ~16 items a head), and fp32 atomics on the residual (summation order varies from run to
run, like the FFN's).

``router_in_items`` (``RBI``, off by default) moves the first term into the merged items, where
the attention's latency could hide it: each item adds its experts' share. Measured in the
twenty-fourth session it did not hide it: phase A lost its 7 µs a layer at 8B, the items gained
8.4 (2739 vs the split phases' 2608 µs a token), and at 1B it was 2% slower than the merged phase
without it (707.7 vs 693.4). The items cannot read
the residual they add into, so it is double-buffered (``HS``): layer l reads ``h[l % 2]`` and
``f[l % 2]``, its items write ``h[(l + 1) % 2]``, its expert phase writes ``f[(l + 1) % 2]`` and
zeroes the buffers it read, for layer l + 1 to write.

At long contexts each item reads the whole cache of its head, so the split phases stay the
choice there (``merge_bc`` in the launch).
"""

from __future__ import annotations

import triton
import triton.language as tl

from prunepath_jax.kernels.triton_l2 import l2_lines
from prunepath_jax.kernels.triton_megastep_attn import (
    _group_qkv,
    _group_rows,
    _online,
    _pf_kv,
    _with_new,
    _write_new,
)


@triton.jit
def _part_rows(p, R: tl.constexpr, R_PAD: tl.constexpr, N):
    """Rows ``[p·R, min(p·R + R, N))`` of part p as an ``R_PAD`` index vector and its mask."""
    r = p * R + tl.arange(0, R_PAD)
    return r, (r < tl.minimum(p * R + R, N)) & (tl.arange(0, R_PAD) < R)


@triton.jit
def _pf_item(wo_ptr, wm_ptr, kc_ptr, vc_ptr, pos, layer, g, p, D: tl.constexpr, NA: tl.constexpr,
             E: tl.constexpr, KV: tl.constexpr, HD: tl.constexpr, GQ: tl.constexpr,
             NP: tl.constexpr, RB: tl.constexpr, PF_OR: tl.constexpr, LPO: tl.constexpr,
             STEP_O: tl.constexpr, RE: tl.constexpr, RE_PAD: tl.constexpr, LPM: tl.constexpr,
             STEP_M: tl.constexpr, BT: tl.constexpr,
             S_MAX: tl.constexpr, PF_KEYS: tl.constexpr, LPR: tl.constexpr):  # fmt: skip
    """L2 prefetch of item (g, p)'s inputs, issued at barrier arrival (none of them changes in
    the phase before): the first ``PF_OR`` rows of its W_o block (``LPO`` lines a row), its rows
    of M (``LPM`` lines a row) and part p's share of head g's cached keys and values."""
    c0 = g * GQ * HD
    if PF_OR > 0:
        if p * RB < D:
            r, rm = _part_rows(p, RB, PF_OR, D)
            r = tl.where(rm, r, p * RB)  # every address inside the block
            lo = tl.minimum(tl.arange(0, LPO) * STEP_O, GQ * HD - 1)
            l2_lines(wo_ptr + r[:, None] * NA + c0 + lo[None, :])
    if LPM > 0:
        e, em = _part_rows(p, RE, RE_PAD, E)
        if p * RE < E:
            e = tl.where(em, e, p * RE)
            lm = tl.minimum(tl.arange(0, LPM) * STEP_M, GQ * HD - 1)
            l2_lines(wm_ptr + e[:, None] * NA + c0 + lm[None, :])
    if PF_KEYS > 0:
        _pf_kv(kc_ptr, vc_ptr, pos, layer, g, p, KV, HD, NP, BT, S_MAX, PF_KEYS, LPR)


@triton.jit
def _attend_project(qkv_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, wo_ptr, wm_ptr, wr_ptr, ln_ptr,
                    hc_ptr, fc_ptr, hn_ptr, lg_ptr, pos, layer, g, p, D: tl.constexpr,
                    D_PAD: tl.constexpr, E: tl.constexpr,
                    HQ: tl.constexpr, KV: tl.constexpr, HD: tl.constexpr, GQ: tl.constexpr,
                    GQ_PAD: tl.constexpr, BT: tl.constexpr, S_MAX: tl.constexpr,
                    SCALE: tl.constexpr, DOT_F32: tl.constexpr, AST: tl.constexpr,
                    RB: tl.constexpr, RB_PAD: tl.constexpr, BRB: tl.constexpr,
                    RE: tl.constexpr, RE_PAD: tl.constexpr, ST: tl.constexpr, RBI: tl.constexpr,
                    NP: tl.constexpr, R_B: tl.constexpr, R_B_PAD: tl.constexpr):  # fmt: skip
    """Work item (KV head g, row part p): head g's attention over every cached key and the new
    one, then ``h[rows] += W_o[rows, cols]·attn[cols]`` (rows: part p's ``RB``; cols: head g's
    ``GQ·HD``, ``BRB`` rows at a time through the software pipeliner) and
    ``lg[e] += M[e, cols]·attn[cols]`` for part p's ``RE`` experts, relaxed atomics. Head 0's
    item also folds the previous FFN's sum ``f`` into its rows and zeroes them (nothing else
    reads ``f`` in this phase; ``hn_ptr`` is ``hc_ptr`` then). With ``RBI`` the residual is
    double-buffered: the items add into the zeroed next buffer ``hn`` (head 0's the current
    ``hc + fc`` of its rows) and each also adds its ``R_B`` experts' share of the router logits
    of the residual before attention, ``W_r·(ln2 ⊙ (hc + fc))`` — which nothing writes in this
    phase — so phase A has no router rows."""
    QM: tl.constexpr = 16 if GQ_PAD < 16 else GQ_PAD
    NA: tl.constexpr = HQ * HD
    W: tl.constexpr = GQ_PAD * HD  # the block's columns, padded
    NB: tl.constexpr = (RB + BRB - 1) // BRB
    if g == 0:  # independent of the attention: issued first
        r, rm = _part_rows(p, RB, RB_PAD, D)
        fv = tl.load(fc_ptr + r, mask=rm, other=0.0, cache_modifier=".cg")
        if RBI:
            fv += tl.load(hc_ptr + r, mask=rm, other=0.0, cache_modifier=".cg")
        tl.atomic_add(hn_ptr + r, fv, mask=rm, sem="relaxed")
        if not RBI:
            tl.store(fc_ptr + r, tl.zeros_like(fv), mask=rm)
    q, k_new, v_new = _group_qkv(qkv_ptr, kc_ptr, cos_ptr, sin_ptr, g, HQ, KV, HD, GQ, QM, SCALE)
    m, lsum, acc = _online(q, kc_ptr, vc_ptr, layer, g, 0, tl.minimum(pos, S_MAX), KV, HD, QM,
                           BT, S_MAX, DOT_F32, AST)  # fmt: skip
    m, lsum, acc = _with_new(q, k_new, v_new, m, lsum, acc)
    if p == 0:
        _write_new(kc_ptr, vc_ptr, k_new, v_new, pos, layer, g, KV, HD, S_MAX)
    acc, m, lsum = _group_rows(acc, m, lsum, HD, GQ_PAD, QM)
    rq = tl.arange(0, GQ_PAD)
    o = tl.reshape(tl.where(rq[:, None] < GQ, acc / lsum[:, None], 0.0), [W])  # [W] f32
    rc = tl.arange(0, W)
    cols = g * GQ * HD + rc
    cm = rc < GQ * HD
    rb = tl.arange(0, BRB)
    r1 = tl.minimum(p * RB + RB, D)
    for i in tl.range(0, NB, num_stages=ST):
        rows = p * RB + i * BRB + rb
        rm = (rows < r1) & (i * BRB + rb < RB)
        w = tl.load(wo_ptr + rows[:, None] * NA + cols[None, :], mask=rm[:, None] & cm[None, :],
                    other=0.0)  # fmt: skip
        tl.atomic_add(hn_ptr + rows, tl.sum(w.to(tl.float32) * o[None, :], 1), mask=rm,
                      sem="relaxed")  # fmt: skip
    e, em = _part_rows(p, RE, RE_PAD, E)
    wm = tl.load(wm_ptr + e[:, None] * NA + cols[None, :], mask=em[:, None] & cm[None, :],
                 other=0.0)  # fmt: skip
    tl.atomic_add(lg_ptr + e, tl.sum(wm.to(tl.float32) * o[None, :], 1), mask=em, sem="relaxed")
    if RBI:
        _router_base(wr_ptr, ln_ptr, hc_ptr, fc_ptr, lg_ptr, g * NP + p, R_B, R_B_PAD, D, D_PAD, E,
                     True)  # fmt: skip


@triton.jit
def _router_base(wr_ptr, ln_ptr, h_ptr, f_ptr, lg_ptr, pid, R: tl.constexpr, R_PAD: tl.constexpr,
                 D: tl.constexpr, D_PAD: tl.constexpr, E: tl.constexpr,
                 ATOMIC: tl.constexpr):  # fmt: skip
    """Program ``pid``'s experts ``[pid·R, pid·R + R)``: ``lg[e] = W_r[e]·(ln2 ⊙ h_old)``, with
    ``h_old = h + f`` as the QKV phase read it (nothing writes either in that phase). Its rows as
    one ``[R_PAD, D_PAD]`` tile and one reduction (a row at a time, each row's block-wide
    reduction is a round trip of its own), and the residual loaded again here rather than kept
    from the norm (carried through the QKV GEMV it costs registers there: 8B's QKV phase 6.5 µs
    a layer longer, not the 1.7 µs of the bytes; BENCHMARKS.md, twenty-third session)."""
    rd = tl.arange(0, D_PAD)
    dm = rd < D
    e, em = _part_rows(pid, R, R_PAD, E)
    w = tl.load(wr_ptr + e[:, None] * D + rd[None, :], mask=em[:, None] & dm[None, :], other=0.0)
    x = tl.load(h_ptr + rd, mask=dm, other=0.0, cache_modifier=".cg")
    x += tl.load(f_ptr + rd, mask=dm, other=0.0, cache_modifier=".cg")
    x *= tl.load(ln_ptr + rd, mask=dm, other=0.0).to(tl.float32)
    lg = tl.sum(w.to(tl.float32) * x[None, :], 1)
    if ATOMIC:  # a merged item's share (RBI): the other items add theirs in any order
        tl.atomic_add(lg_ptr + e, lg, mask=em, sem="relaxed")
    else:
        tl.store(lg_ptr + e, lg, mask=em)
