"""The attention phase of the one-launch decode step (``triton_megastep``, phase B).

Why a file of its own: the phase is a different problem from the weight-streaming phases around
it — a few hundred KB of KV cache read by ``KV · S`` work items (KV head, key split), latency
bound, its splits combined without a grid barrier.

One work item: RoPE of the group's query heads and of the new key, online softmax over the
split's cached keys with the scores and the value sum as ``tl.dot`` (the group's query heads
padded to 16 rows; queries and probabilities rounded to the cache dtype, as the XLA step does),
the new token in the last split, the new key/value written to the cache by split 0 (after its
loop, so its cached keys' loads do not wait for the new key); the split that arrives last at its
head's counter (acq_rel) combines the splits.

Measured and not kept (BENCHMARKS.md, twenty-second session): the first key block's loads
issued before the query's (the next block's rows carried in registers), to take one L2 round
trip off the item: 1B 760 vs 723 µs a token (the kernel sits at 255 registers; the carried
rows grew its spills and slowed other phases), 8B 2576 vs 2588 (within noise).
"""

from __future__ import annotations

import triton
import triton.language as tl

from prunepath_jax.kernels.triton_l2 import l2_lines


@triton.jit
def _split_range(pos, s, S: tl.constexpr, BT: tl.constexpr, S_MAX: tl.constexpr):
    """Cached keys ``[t0, t1)`` of key split ``s``: the ``min(pos, S_MAX)`` cached keys in ``S``
    runs of whole ``BT`` blocks."""
    n_old = tl.minimum(pos, S_MAX)
    ts = tl.cdiv(tl.cdiv(n_old, S), BT) * BT
    t0 = s * ts
    return t0, tl.minimum(t0 + ts, n_old)


@triton.jit
def _pf_kv(kc_ptr, vc_ptr, pos, layer, g, s, KV: tl.constexpr, HD: tl.constexpr,
           S: tl.constexpr, BT: tl.constexpr, S_MAX: tl.constexpr, KEYS: tl.constexpr,
           LPR: tl.constexpr):  # fmt: skip
    """L2 prefetch of the first ``KEYS`` cached keys and values of item (head g, split s), each
    row ``LPR`` lines: issued before the grid barrier the item waits at (the old cache rows do
    not change in this step)."""
    t0, t1 = _split_range(pos, s, S, BT, S_MAX)
    if t1 > t0:
        tt = tl.minimum(t0 + tl.arange(0, KEYS), t1 - 1)
        off = ((layer * S_MAX + tt) * KV + g) * HD
        ln = tl.arange(0, LPR) * (HD // LPR)
        l2_lines(kc_ptr + off[:, None] + ln[None, :])
        l2_lines(vc_ptr + off[:, None] + ln[None, :])


@triton.jit
def _rope_rows(qkv_ptr, cos_ptr, sin_ptr, head, rows, rmask, HD: tl.constexpr):
    """RoPE ("rotate half") of heads ``head + rows`` as whole rows ``[n, HD]`` f32: element j
    is ``x_j cos_j - x_(j+HD/2) sin_j`` in the first half, ``x_j cos_j + x_(j-HD/2) sin_j`` in
    the second (the tables ``[HD / 2]``, repeated). Program 0 computes the tables once a launch,
    before the first barrier; nothing reads them before it, so no SM's L1 can hold a stale
    line and the plain (L1-cached) loads are safe — read ``.cg`` from L2 every layer they made
    the attention 0.5 µs a layer slower. Computing cos and sin of ``pos · inv_freq`` here
    instead (libdevice's, twice an item) made the SmolLM2-shape launch 41 µs a token slower
    (BENCHMARKS.md, twenty-fourth and twenty-fifth sessions)."""
    HALF: tl.constexpr = HD // 2
    rdh = tl.arange(0, HD)
    cs = tl.load(cos_ptr + rdh % HALF)
    sn = tl.load(sin_ptr + rdh % HALF) * tl.where(rdh < HALF, -1.0, 1.0)
    base = (head + rows)[:, None] * HD
    x = tl.load(qkv_ptr + base + rdh[None, :], mask=rmask[:, None], other=0.0, cache_modifier=".cg")
    xp = tl.load(qkv_ptr + base + ((rdh + HALF) % HD)[None, :], mask=rmask[:, None], other=0.0,
                 cache_modifier=".cg")  # fmt: skip
    return x * cs[None, :] + xp * sn[None, :]


@triton.jit
def _group_qkv(qkv_ptr, kc_ptr, cos_ptr, sin_ptr, g, HQ: tl.constexpr, KV: tl.constexpr,
               HD: tl.constexpr, GQ: tl.constexpr, QM: tl.constexpr,
               SCALE: tl.constexpr):  # fmt: skip
    """Head g's group: its query heads after RoPE, scaled and padded to ``QM`` rows, its new key
    ``[1, HD]`` (RoPE) and value ``[HD]``, all rounded to the cache dtype as the XLA step does."""
    kdt = kc_ptr.dtype.element_ty
    rq = tl.arange(0, QM)
    q = (_rope_rows(qkv_ptr, cos_ptr, sin_ptr, g * GQ, rq, rq < GQ, HD) * SCALE).to(kdt)
    one = tl.arange(0, 1)
    k_new = _rope_rows(qkv_ptr, cos_ptr, sin_ptr, HQ + g, one, one < 1, HD).to(kdt)  # [1, HD]
    v_new = tl.load(qkv_ptr + (HQ + KV + g) * HD + tl.arange(0, HD), cache_modifier=".cg")
    return q, k_new, v_new.to(kdt)


@triton.jit
def _online(q, kc_ptr, vc_ptr, layer, g, t0, t1, KV: tl.constexpr, HD: tl.constexpr,
            QM: tl.constexpr, BT: tl.constexpr, S_MAX: tl.constexpr, DOT_F32: tl.constexpr,
            AST: tl.constexpr):  # fmt: skip
    """Online softmax of the queries ``q`` ``[QM, HD]`` over head g's cached keys ``[t0, t1)``:
    ``(running max [QM], sum [QM], unnormalised value sum [QM, HD])``, the scores and the value
    sum as ``tl.dot`` (tensor cores for 16-bit caches, exact fp32 otherwise), the keys and
    values read as whole rows, probabilities rounded to the value dtype."""
    kdt = kc_ptr.dtype.element_ty
    PREC: tl.constexpr = "ieee" if kdt == tl.float32 else "tf32"
    rdh = tl.arange(0, HD)
    m = tl.full([QM], -1e30, tl.float32)
    lsum = tl.zeros([QM], tl.float32)
    acc = tl.zeros([QM, HD], tl.float32)
    rt = tl.arange(0, BT)
    for t in tl.range(t0, t1, BT, num_stages=AST):  # AST > 1: cp.async-pipelined key blocks
        tt = t + rt
        tm = tt < t1
        kb = ((layer * S_MAX + tt) * KV + g) * HD
        k = tl.load(kc_ptr + kb[:, None] + rdh[None, :], mask=tm[:, None], other=0.0)
        v = tl.load(vc_ptr + kb[:, None] + rdh[None, :], mask=tm[:, None], other=0.0)
        if DOT_F32:  # the interpreter: its 16-bit dot is wrong, its f32 one exact
            sc = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
        else:
            sc = tl.dot(q, tl.trans(k), input_precision=PREC)  # [QM, BT] f32
        sc = tl.where(tm[None, :], sc, -1e30)
        m_new = tl.maximum(m, tl.max(sc, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(sc - m_new[:, None])
        lsum = lsum * alpha + tl.sum(p, 1)
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p.to(kdt).to(tl.float32), v.to(tl.float32))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(kdt), v, input_precision=PREC)
        m = m_new
    return m, lsum, acc


@triton.jit
def _with_new(q, k_new, v_new, m, lsum, acc):
    """The online softmax's state after the new token's own key and value."""
    sn = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), 1)
    m_new = tl.maximum(m, sn)
    alpha = tl.exp(m - m_new)
    p = tl.exp(sn - m_new)
    lsum = lsum * alpha + p
    acc = acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)[None, :]
    return m_new, lsum, acc


@triton.jit
def _write_new(kc_ptr, vc_ptr, k_new, v_new, pos, layer, g, KV: tl.constexpr, HD: tl.constexpr,
               S_MAX: tl.constexpr):  # fmt: skip
    """The new key and value into head g's cache row ``pos``; a full cache drops the write
    (cache_write's mode="drop"). Callers write after their key loop: the cached keys' loads
    need not wait for k_new (no item reads row pos)."""
    rdh = tl.arange(0, HD)
    row = ((layer * S_MAX + pos) * KV + g) * HD
    ok = rdh * 0 + pos < S_MAX
    tl.store(kc_ptr + row + rdh[None, :], k_new, mask=ok[None, :])
    tl.store(vc_ptr + row + rdh, v_new, mask=ok)


@triton.jit
def _group_rows(acc, m, lsum, HD: tl.constexpr, GQ_PAD: tl.constexpr, QM: tl.constexpr):
    """The group's first ``GQ_PAD`` rows of the ``QM``-row state (``QM >= GQ_PAD``)."""
    rq = tl.arange(0, QM)
    keep = rq[:, None] < GQ_PAD
    acc = tl.reshape(tl.where(keep, acc, 0.0), [QM // GQ_PAD, GQ_PAD, HD])
    m = tl.max(tl.reshape(tl.where(rq < GQ_PAD, m, -1e30), [QM // GQ_PAD, GQ_PAD]), 0)
    lsum = tl.sum(tl.reshape(tl.where(rq < GQ_PAD, lsum, 0.0), [QM // GQ_PAD, GQ_PAD]), 0)
    return tl.sum(acc, 0), m, lsum


@triton.jit
def _attend_split(qkv_ptr, kc_ptr, vc_ptr, po_ptr, pml_ptr, att_ptr, hcnt_ptr, cos_ptr,
                      sin_ptr, pos, layer, g, s, HQ: tl.constexpr, KV: tl.constexpr,
                      HD: tl.constexpr, GQ: tl.constexpr, GQ_PAD: tl.constexpr, S: tl.constexpr,
                      S_PAD: tl.constexpr, BT: tl.constexpr, S_MAX: tl.constexpr,
                      SCALE: tl.constexpr, DOT_F32: tl.constexpr,
                      AST: tl.constexpr):  # fmt: skip
    """Work item (head g, key split s) over the group's query heads padded to 16 rows; the new
    token in the last split, written to the cache by split 0."""
    QM: tl.constexpr = 16 if GQ_PAD < 16 else GQ_PAD
    q, k_new, v_new = _group_qkv(qkv_ptr, kc_ptr, cos_ptr, sin_ptr, g, HQ, KV, HD, GQ, QM, SCALE)
    t0, t1 = _split_range(pos, s, S, BT, S_MAX)
    m, lsum, acc = _online(q, kc_ptr, vc_ptr, layer, g, t0, t1, KV, HD, QM, BT, S_MAX, DOT_F32,
                           AST)  # fmt: skip
    if s == S - 1:  # the new token's own key and value
        m, lsum, acc = _with_new(q, k_new, v_new, m, lsum, acc)
    if s == 0:
        _write_new(kc_ptr, vc_ptr, k_new, v_new, pos, layer, g, KV, HD, S_MAX)
    acc, m, lsum = _group_rows(acc, m, lsum, HD, GQ_PAD, QM)
    _finish_split(po_ptr, pml_ptr, att_ptr, hcnt_ptr, acc, m, lsum, layer, g, s, KV, HD, GQ,
                  GQ_PAD, S, S_PAD)  # fmt: skip


@triton.jit
def _finish_split(po_ptr, pml_ptr, att_ptr, hcnt_ptr, acc, m, lsum, layer, g, s,
                  KV: tl.constexpr, HD: tl.constexpr, GQ: tl.constexpr, GQ_PAD: tl.constexpr,
                  S: tl.constexpr, S_PAD: tl.constexpr):  # fmt: skip
    """Stores split s's partial output ``acc`` ``[GQ_PAD, HD]`` (unnormalised), running max
    ``m`` and sum ``lsum``; the split that arrives last at head g's counter combines them all."""
    rq = tl.arange(0, GQ_PAD)
    qmask = rq < GQ
    rdh = tl.arange(0, HD)
    slot = g * S + s
    tl.store(po_ptr + (slot * GQ_PAD + rq)[:, None] * HD + rdh[None, :], acc)
    tl.store(pml_ptr + slot * 2 * GQ_PAD + rq, m)
    tl.store(pml_ptr + slot * 2 * GQ_PAD + GQ_PAD + rq, lsum)
    tl.debug_barrier()
    done = tl.atomic_add(hcnt_ptr + layer * KV + g, 1, sem="acq_rel", scope="gpu")
    if done == S - 1:  # every split of head g has stored: combine them
        tl.debug_barrier()
        rs = tl.arange(0, S_PAD)
        sm = rs < S
        ml = pml_ptr + (g * S + rs)[:, None] * 2 * GQ_PAD + rq[None, :]
        ms = tl.load(ml, mask=sm[:, None], other=-1e30, cache_modifier=".cg")  # [S_PAD, GQ_PAD]
        ls = tl.load(ml + GQ_PAD, mask=sm[:, None], other=0.0, cache_modifier=".cg")
        mt = tl.max(ms, 0)
        w = tl.exp(ms - mt[None, :])
        lt = tl.sum(w * ls, 0)
        o_off = ((g * S + rs)[:, None, None] * GQ_PAD + rq[None, :, None]) * HD + rdh[None, None, :]
        os = tl.load(po_ptr + o_off, mask=sm[:, None, None], other=0.0, cache_modifier=".cg")
        o = tl.sum(w[:, :, None] * os, 0) / lt[:, None]
        out = (g * GQ + rq)[:, None] * HD + rdh[None, :]
        tl.store(att_ptr + out, o, mask=qmask[:, None])
