"""The batched one-launch decode step's phases (``triton_megastep_batch``): skinny GEMMs of a
few tokens against weight rows, and the union-of-experts unit loop.

Why a file of its own: at batch 1 the step's phases are GEMVs (``triton_megastep_gemv``, one
row reduced against one input row); with T = 2-16 tokens the same weight rows serve every
token, so each phase is a ``[rows, K] · [K, T]`` product on the tensor cores (the tokens padded
to ``TP`` = 16 columns, what ``tl.dot`` needs), and the expert phase runs over the *union* of
the tokens' experts, each unit's rows read once for the whole batch (a token that did not
select the unit's expert gets gate 0, as ``routing.gates`` gives it).

The inputs of every product are activations other programs of the launch wrote (the residual,
the attention output, the normalised FFN inputs), read ``.cg`` from L2 in ``[TP, BK]`` chunks
next to the weights' ``[R, BK]`` chunks: per chunk the L2 bytes are ``T · BK`` elements
against ``R · BK`` weight elements, which is why a program's rows and the units are at least
16 wide.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, w, DOT_F32: tl.constexpr):
    """``a [M, K] · b [K, N]`` in f32, both rounded to the weights ``w``'s dtype first (bf16:
    the tensor cores, as the XLA step's bf16 matmuls; f32: exact ``ieee``). The interpreter
    (``DOT_F32``: its 16-bit dot is wrong, its f32 one exact) gets the same roundings in f32."""
    if DOT_F32:
        a32 = a.to(w.dtype).to(tl.float32)
        return tl.dot(a32, b.to(w.dtype).to(tl.float32), input_precision="ieee")
    elif w.dtype == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(w.dtype), b.to(w.dtype))


@triton.jit
def _tokens_chunk(x_ptr, kk, km, T: tl.constexpr, TP: tl.constexpr, K: tl.constexpr):
    """``[TP, BK]`` f32 columns ``kk`` of the ``[T, K]`` rows at ``x_ptr``, zero past T and K,
    read from L2 (other programs wrote them)."""
    rt = tl.arange(0, TP)
    m = (rt[:, None] < T) & km[None, :]
    x = tl.load(x_ptr + rt[:, None] * K + kk[None, :], mask=m, other=0.0, cache_modifier=".cg")
    return x.to(tl.float32)  # (the step's are f32; benchmarks/skinny_phase.py tries bf16)


@triton.jit
def _staggered(j, rot, N: tl.constexpr):
    """Chunk ``j`` of a loop over ``N`` chunks, counted from chunk ``rot`` (a program's id, or
    0) round the end. Why: right after a grid barrier every program walks its loop in step, and
    each chunk's activations (the same ``[T, BK]`` lines for all P programs) or its atomics (the
    same residual columns) then queue at one L2 slice, P requests deep; started at different
    chunks, the programs spread over the slices. (Sums then run in a different order each
    program: the results move within the fp32 rounding.)"""
    return (j + rot) % N


@triton.jit
def _normed(x, ln_ptr, kk, km, sq, NORM: tl.constexpr):
    """``(x, sq)``: with ``NORM``, the ``[TP, BK]`` input chunk times the RMSNorm weights of its
    columns ``kk`` and ``sq`` ``[TP, BK]`` plus the chunk's squares, elementwise; without, both
    as they came. The caller sums ``sq`` over its columns once, after its loop (``tl.sum(sq,
    1)``: each token's sum of squares; the norm's scale ``1 / rms`` is applied after the
    product). Why not a sum a chunk: a row sum of a ``[TP, BK]`` tile spread over the warps
    goes through shared memory and a CTA barrier, every chunk, inside the weight stream. The
    1B QKV product alone with the step's 64-row tiles: 11.06 µs a layer with a sum a chunk,
    9.90 with one sum, 9.50 without the norm (H100, forty-sixth session,
    ``benchmarks/skinny_phase.py``); with 16-row tiles 17.3 / 16.5 / 9.4, so there most of
    the norm's cost is elsewhere."""
    if NORM:
        sq += x * x
        x = x * tl.load(ln_ptr + kk, mask=km, other=0.0).to(tl.float32)[None, :]
    return x, sq


@triton.jit
def _stage_tokens(x_ptr, ln_ptr, xs_ptr, rot, K: tl.constexpr, T: tl.constexpr,
                  TP: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
                  NORM: tl.constexpr):  # fmt: skip
    """``ss [TP] f32``: the tokens' inputs ``x [T, K]`` (f32, other programs wrote them, read
    from L2) once into this program's own scratch ``xs [K, TP]`` in its element type (the
    weights'), times the RMSNorm weights with ``NORM`` (``ss`` then each token's sum of squares,
    else 0). Columns of tokens past T are not stored; a CTA barrier at the end makes the
    stores visible to all of the program's threads."""
    rt = tl.arange(0, TP)
    rk = tl.arange(0, BK)
    sq = tl.zeros([TP, BK], tl.float32)
    NCH: tl.constexpr = (K + BK - 1) // BK
    for j in tl.range(0, NCH, num_stages=STAGES):
        kk = _staggered(j, rot, NCH) * BK + rk
        km = kk < K
        x, sq = _normed(_tokens_chunk(x_ptr, kk, km, T, TP, K), ln_ptr, kk, km, sq, NORM)
        tl.store(xs_ptr + kk[:, None] * TP + rt[None, :], tl.trans(x).to(xs_ptr.dtype.element_ty),
                 mask=km[:, None] & (rt < T)[None, :])  # fmt: skip
    tl.debug_barrier()
    return tl.sum(sq, 1)


@triton.jit
def _skinny(w_ptr, x_ptr, ln_ptr, xs_ptr, r0, r1, rot, K: tl.constexpr, T: tl.constexpr,
            TP: tl.constexpr, R_PAD: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
            NORM: tl.constexpr, STAGE: tl.constexpr, DOT_F32: tl.constexpr):  # fmt: skip
    """``(acc [R_PAD, TP] f32, ss [TP] f32)``: weight rows ``[r0, r1)`` (``[N, K]`` row-major)
    times the tokens' inputs ``x [T, K]`` at ``x_ptr``, the rows past r1 zero. With ``NORM`` the
    input (the residual) is multiplied by the RMSNorm weights ``ln_ptr`` and ``ss`` is its sum
    of squares a token: the caller scales ``acc`` by ``1 / rms`` (RMSNorm is linear in x but for
    that scale), so the norm costs no pass of its own over the residual. The chunks run from
    chunk ``rot`` on, round the end (``_staggered``).

    ``STAGE``: the inputs go first, normed and rounded to the weights' dtype, into the
    program's scratch ``xs_ptr`` (``_stage_tokens``), and the weight loop reads its ``[BK, TP]``
    input chunks from there: no f32 activations, norm weights or sums of squares inside the
    weight stream, as the batch-1 step's column-chunk GEMV reads its input from a scratch row
    of its own (``triton_megastep_gemv._gemv_cols``). The roundings are the same either way
    (the product's input in the weights' dtype)."""
    rr = r0 + tl.arange(0, R_PAD)
    rmask = rr < r1
    rk = tl.arange(0, BK)
    rt = tl.arange(0, TP)
    acc = tl.zeros([R_PAD, TP], tl.float32)
    sq = tl.zeros([TP, BK], tl.float32)
    if STAGE:
        ss = _stage_tokens(x_ptr, ln_ptr, xs_ptr, rot, K, T, TP, BK, STAGES, NORM)
    NCH: tl.constexpr = (K + BK - 1) // BK
    for j in tl.range(0, NCH, num_stages=STAGES):
        kk = _staggered(j, rot, NCH) * BK + rk
        km = kk < K
        w = tl.load(w_ptr + rr[:, None].to(tl.int64) * K + kk[None, :],
                    mask=rmask[:, None] & km[None, :], other=0.0)  # fmt: skip
        if STAGE:
            xt = tl.load(xs_ptr + kk[:, None] * TP + rt[None, :],
                         mask=km[:, None] & (rt < T)[None, :], other=0.0)  # fmt: skip
        else:
            x, sq = _normed(_tokens_chunk(x_ptr, kk, km, T, TP, K), ln_ptr, kk, km, sq, NORM)
            xt = tl.trans(x)
        acc += _dot(w, xt, w, DOT_F32)
    if not STAGE:
        ss = tl.sum(sq, 1)
    return acc, ss


@triton.jit
def _router_share(wr_ptr, ln_ptr, hv, lg_ptr, r0, r1, rot, D: tl.constexpr, E: tl.constexpr,
                  T: tl.constexpr, TP: tl.constexpr, R_PAD: tl.constexpr, BE: tl.constexpr,
                  STAGES: tl.constexpr, DOT_F32: tl.constexpr, RDE: tl.constexpr):  # fmt: skip
    """Adds this program's share of the router logits before the RMSNorm's scale,
    ``lg[t, e] += Σ_{r in [r0, r1)} W_r[e, r]·ln2[r]·h[t, r]``, into ``lg_ptr`` ``[T, E]`` with
    relaxed atomics; ``hv [R_PAD, TP]`` the new residual's rows (zero past r1). The scale
    ``1 / rms(h[t])`` is common to a token's logits, so the selection applies it
    (``triton_megastep``'s ``RC``, batched).

    ``STAGES`` > 1 streams the router rows through Triton's pipeliner (``cp.async``), as the
    batch-1 step's ``_router_part`` does; 1 is a plain loop, each chunk's rows one synchronous
    load (a DRAM round trip) before its product and atomics: 4 chunks a layer at the 1B
    width, 7 at 8B.

    ``RDE``: the router at ``wr_ptr`` is ``[D, E]`` (the model's layout), so a chunk's rows are
    ``R_PAD`` runs of ``BE`` contiguous experts; else ``[E, D]``, ``BE`` runs of the program's
    few columns each (64 B at 1B)."""
    rr = r0 + tl.arange(0, R_PAD)
    rmask = rr < r1
    xr = hv * tl.load(ln_ptr + rr, mask=rmask, other=0.0).to(tl.float32)[:, None]
    rt = tl.arange(0, TP)
    NE: tl.constexpr = (E + BE - 1) // BE
    for j in tl.range(0, NE, num_stages=STAGES):  # from chunk ``rot`` on (``_staggered``)
        re = _staggered(j, rot, NE) * BE + tl.arange(0, BE)
        if RDE:
            off = rr[None, :] * E + re[:, None]
        else:
            off = re[:, None] * D + rr[None, :]
        w = tl.load(wr_ptr + off, mask=(re[:, None] < E) & rmask[None, :], other=0.0)
        part = _dot(w, xr, w, DOT_F32)  # [BE, TP]
        off = rt[None, :] * E + re[:, None]
        tl.atomic_add(lg_ptr + off, part, mask=(re[:, None] < E) & (rt[None, :] < T),
                      sem="relaxed")  # fmt: skip


@triton.jit
def _union(gs_ptr, tab_ptr, T: tl.constexpr, TP: tl.constexpr, E_PAD: tl.constexpr):
    """The number of experts any token selected (gates ``[T, E_PAD]`` at ``gs_ptr``, 0 where
    unselected); their ids in index order go to the program's table at ``tab_ptr`` (slot i the
    i-th), read back by its own threads after the CTA barrier here."""
    rt = tl.arange(0, TP)
    re = tl.arange(0, E_PAD)
    g = tl.load(gs_ptr + rt[:, None] * E_PAD + re[None, :], mask=(rt < T)[:, None], other=0.0,
                cache_modifier=".cg")  # fmt: skip
    uni = tl.max((g != 0.0).to(tl.int32), 0)
    tl.store(tab_ptr + tl.cumsum(uni, 0) - 1, re, mask=uni != 0)
    tl.debug_barrier()
    return tl.sum(uni, 0)


@triton.jit
def _block_acts(xn_ptr, gs_ptr, w_in_ptr, tab_ptr, g0, u1, rot, D: tl.constexpr,
                F: tl.constexpr, G: tl.constexpr, E_PAD: tl.constexpr, T: tl.constexpr,
                TP: tl.constexpr, BN: tl.constexpr, UF: tl.constexpr, BK: tl.constexpr,
                STAGES: tl.constexpr, DOT_F32: tl.constexpr):  # fmt: skip
    """``(rows [UF·BN] i64, um [UF·BN], a [UF·BN, TP] f32)``: units ``[g0, min(g0 + UF, u1))``
    as one block of rows, ``silu(x·W_gate)·(x·W_up)·σ(g_t)`` for every token, ``x`` the
    tokens' normalised FFN inputs ``[T, D]`` at ``xn_ptr`` (the selection phase wrote them in
    the weights' dtype: half the L2 bytes of the f32 residual). ``rows`` are the block's row
    offsets (``row · D``) into W_gate / W_out, ``um`` which rows are units below ``u1``. Each
    row's expert is one load of the program's union table (``_union``; counting it from the
    union's prefix was a block-wide reduction a unit, ~0.1-0.2 µs, BENCHMARKS.md twenty-first
    session). A token that did not select a unit's expert has gate 0: its column is 0, as are
    the rows past ``u1``. The chunks run from chunk ``rot`` on (``_staggered``)."""
    RB: tl.constexpr = UF * BN
    PER: tl.constexpr = G // BN
    NK: tl.constexpr = (D + BK - 1) // BK
    rr = tl.arange(0, RB)
    rt = tl.arange(0, TP)
    rk = tl.arange(0, BK)
    uu = g0 + rr // BN  # each row's unit
    um = uu < u1
    e = tl.load(tab_ptr + uu // PER, mask=um, other=0)
    rows = (e * G + (uu % PER) * BN + rr % BN).to(tl.int64) * D
    gt = tl.load(gs_ptr + rt[None, :] * E_PAD + e[:, None], mask=um[:, None] & (rt < T)[None, :],
                 other=0.0, cache_modifier=".cg")  # [RB, TP]  # fmt: skip
    ag = tl.zeros([RB, TP], tl.float32)
    au = tl.zeros([RB, TP], tl.float32)
    for j in tl.range(0, NK, num_stages=STAGES):
        kk = _staggered(j, rot, NK) * BK + rk
        km = kk < D
        wm = um[:, None] & km[None, :]
        wg = tl.load(w_in_ptr + rows[:, None] + kk[None, :], mask=wm, other=0.0)
        wu = tl.load(w_in_ptr + F * D + rows[:, None] + kk[None, :], mask=wm, other=0.0)
        x = tl.load(xn_ptr + rt[None, :] * D + kk[:, None],
                    mask=(rt < T)[None, :] & km[:, None], other=0.0,
                    cache_modifier=".cg")  # [BK, TP]  # fmt: skip
        ag += _dot(wg, x, wg, DOT_F32)
        au += _dot(wu, x, wu, DOT_F32)
    return rows, um, ag / (1.0 + tl.exp(-ag)) * au * gt


@triton.jit
def _unit_ffn(xn_ptr, gs_ptr, w_in_ptr, w_out_ptr, h_ptr, tab_ptr, u0, u1, rot,
              D: tl.constexpr, F: tl.constexpr, G: tl.constexpr, E_PAD: tl.constexpr,
              T: tl.constexpr, TP: tl.constexpr, BN: tl.constexpr, UF: tl.constexpr,
              BKF: tl.constexpr, CWF: tl.constexpr, STAGES: tl.constexpr,
              DOT_F32: tl.constexpr):  # fmt: skip
    """The expert phase in one piece: the program's units ``[u0, u1)``, ``UF`` at a
    time as one ``[UF · BN, ·]`` block of rows, gate/up for every token, then their down rows
    into the residual ``h [T, D]`` with one relaxed atomic ``[T, CWF]`` a column chunk.

    Why one piece: the first form's two phases (gate/up into an activations scratch, a grid
    barrier, then (unit group, column block) items of the down projection) walked hundreds of
    units through a table load each (0.37 TB/s at 8B, BENCHMARKS.md fortieth session) and
    restarted the gate/up pipeline every 16-row unit with 8 KB a stage: 1.2-2.6× slower
    (forty-first session). Here the rows' addresses are found once, before the streams, each
    stage moves a ``[UF · BN, BKF]`` (or ``[UF · BN, CWF]``) tile of about 16 KB, and a unit's
    down rows are one contiguous ``BN · D`` block. The price is ``T · D`` atomics a group
    (``P · T · D`` a layer with one group a program), and no activations scratch or barrier
    between the halves. Both loops start at chunk ``rot`` (``_staggered``)."""
    NC: tl.constexpr = (D + CWF - 1) // CWF
    rt = tl.arange(0, TP)
    rc = tl.arange(0, CWF)
    for g0 in range(u0, u1, UF):
        rows, um, a = _block_acts(xn_ptr, gs_ptr, w_in_ptr, tab_ptr, g0, u1, rot, D, F, G, E_PAD,
                                  T, TP, BN, UF, BKF, STAGES, DOT_F32)  # fmt: skip
        a_tr = tl.trans(a)  # [TP, UF·BN]; 0 past u1 and T
        for j in tl.range(0, NC, num_stages=STAGES):
            cols = _staggered(j, rot, NC) * CWF + rc
            cm = cols < D
            wo = tl.load(w_out_ptr + rows[:, None] + cols[None, :], mask=um[:, None] & cm[None, :],
                         other=0.0)  # fmt: skip
            acc = _dot(a_tr, wo, wo, DOT_F32)  # [TP, CWF]
            tl.atomic_add(h_ptr + rt[:, None] * D + cols[None, :], acc,
                          mask=(rt < T)[:, None] & cm[None, :], sem="relaxed")  # fmt: skip
