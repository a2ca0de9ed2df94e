"""The weight-streaming phases of the one-launch decode step (``triton_megastep``): the GEMVs
over a program's contiguous output rows, the RMSNorm of the residual row, L2 prefetch of a
block, and a program's share of the router logits.

Why a file of its own: these are the phases bounded by bytes (every program streams its own
block of rows), a different problem from the barriers and the phase order (``triton_megastep``)
and from the latency-bound attention (``triton_megastep_attn``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from prunepath_jax.kernels.triton_l2 import l2_prefetch


@triton.jit
def _rows(w_ptr, r0, i, r1, K: tl.constexpr, K_PAD: tl.constexpr, BRC: tl.constexpr):
    """Row chunk ``i`` of a program's rows ``[r0, r1)`` of a row-major ``[N, K]`` matrix: rows
    ``r0 + i·BRC + [0, BRC)``, full width (contiguous rows), zeros outside."""
    rb = r0 + i * BRC + tl.arange(0, BRC)
    rk = tl.arange(0, K_PAD)
    m = (rb[:, None] < r1) & (rk[None, :] < K)
    return tl.load(w_ptr + rb[:, None] * K + rk[None, :], mask=m, other=0.0)


@triton.jit
def _first_rows(w_ptr, pid, R: tl.constexpr, N, K: tl.constexpr, K_PAD: tl.constexpr,
                BRC: tl.constexpr):  # fmt: skip
    """Program ``pid``'s first row chunk of a GEMV phase: what it loads before a barrier."""
    return _rows(w_ptr, pid * R, 0, tl.minimum(pid * R + R, N), K, K_PAD, BRC)


@triton.jit
def _gemv_rows(w_ptr, w0, x, out_ptr, f_ptr, pid, N, K: tl.constexpr, K_PAD: tl.constexpr,
               R: tl.constexpr, BRC: tl.constexpr, RESID: tl.constexpr,
               ST: tl.constexpr, NI_PAD: tl.constexpr):  # fmt: skip
    """A GEMV phase over the program's ``R`` contiguous output rows, ``BRC`` full rows at a time
    against the whole input ``x`` (f32 ``[K_PAD]``, zero past K, held in registers): chunk 0 from
    the tile ``w0`` the program loaded before the barrier, the rest streamed by Triton's
    software pipeliner (``ST`` stages of ``cp.async`` into shared memory, so ``ST - 1`` chunks are
    in flight without registers).

    ``RESID``: the residual update ``out[rows] += y + f[rows]`` (``f``: the previous FFN's sum,
    zeroed here): every chunk's residual rows are loaded once, before the first reduction, as
    ``[NI_PAD, BRC]`` (``NI_PAD = next_pow2(NI)``), and the results stored once after the loop
    — not an L2 round trip after each chunk's reduction, which a load issued behind the
    reduction's CTA barrier would be (1B: 706 vs 723 µs a token; BENCHMARKS.md, twenty-second
    session). Returns the new residual rows as ``[NI_PAD·BRC]`` = ``[next_pow2(R)]`` f32 (zero
    past the block), for the router share to use without reading them back (``[BRC]`` zeros
    without ``RESID``)."""
    NI: tl.constexpr = (R + BRC - 1) // BRC
    r0 = pid * R
    r1 = tl.minimum(r0 + R, N)
    rc = tl.arange(0, BRC)
    if RESID:
        ri = tl.arange(0, NI_PAD)
        rows2 = r0 + ri[:, None] * BRC + rc[None, :]
        m2 = (rows2 < r1) & (ri[:, None] < NI)
        hf = tl.load(out_ptr + rows2, mask=m2, other=0.0, cache_modifier=".cg")
        hf += tl.load(f_ptr + rows2, mask=m2, other=0.0, cache_modifier=".cg")
        y2 = tl.where(ri[:, None] == 0, tl.sum(w0.to(tl.float32) * x[None, :], 1)[None, :], 0.0)
        for i in tl.range(1, NI, num_stages=ST):
            w = _rows(w_ptr, r0, i, r1, K, K_PAD, BRC)
            y2 = tl.where(ri[:, None] == i, tl.sum(w.to(tl.float32) * x[None, :], 1)[None, :], y2)
        tl.store(f_ptr + rows2, tl.zeros_like(hf), mask=m2)
        hv = y2 + hf
        tl.store(out_ptr + rows2, hv, mask=m2)
        hv = tl.reshape(hv, [NI_PAD * BRC])  # rows in order: chunk i's row c is i·BRC + c
    else:
        hv = tl.zeros([BRC], tl.float32)
        rm = r0 + rc < r1
        tl.store(out_ptr + r0 + rc, tl.sum(w0.to(tl.float32) * x[None, :], 1), mask=rm)
        for i in tl.range(1, NI, num_stages=ST):
            w = _rows(w_ptr, r0, i, r1, K, K_PAD, BRC)
            rows = r0 + i * BRC + rc
            tl.store(out_ptr + rows, tl.sum(w.to(tl.float32) * x[None, :], 1), mask=rows < r1)
    return hv


@triton.jit
def _cols(w_ptr, r0, r1, k0, K: tl.constexpr, R_PAD: tl.constexpr, BK: tl.constexpr):
    """Columns ``[k0, k0 + BK)`` of a program's rows ``[r0, r1)`` of a row-major ``[N, K]``
    matrix: ``[R_PAD, BK]``, zeros outside (``_gemv_cols``' chunk)."""
    rr = r0 + tl.arange(0, R_PAD)
    rk = k0 + tl.arange(0, BK)
    m = (rr[:, None] < r1) & (rk[None, :] < K)
    return tl.load(w_ptr + rr[:, None] * K + rk[None, :], mask=m, other=0.0)


@triton.jit
def _first_chunk(w_ptr, pid, R: tl.constexpr, N, K: tl.constexpr, K_PAD: tl.constexpr,
                 BRC: tl.constexpr, R_PAD: tl.constexpr, BK: tl.constexpr,
                 COLS: tl.constexpr):  # fmt: skip
    """Program ``pid``'s first chunk of a GEMV phase, loaded before a barrier: with ``COLS``
    ``_gemv_cols``' first column chunk, else ``_gemv_rows``' first chunk of full rows."""
    if COLS:
        w = _cols(w_ptr, pid * R, tl.minimum(pid * R + R, N), 0, K, R_PAD, BK)
    else:
        w = _first_rows(w_ptr, pid, R, N, K, K_PAD, BRC)
    return w


@triton.jit
def _gemv_cols(w_ptr, w0, x, xs_ptr, out_ptr, f_ptr, pid, N, K: tl.constexpr, R: tl.constexpr,
               R_PAD: tl.constexpr, BK: tl.constexpr, ST: tl.constexpr,
               RESID: tl.constexpr):  # fmt: skip
    """``_gemv_rows``' product over column chunks: each chunk is all ``R`` of the program's
    rows × ``BK`` columns, multiplied into an ``[R_PAD, BK]`` f32 accumulator, and the rows are
    reduced once after the loop — not one block-wide reduction (shared memory and a CTA barrier)
    per chunk of full rows, which sits between every two chunks of the stream.

    The input's column slices come from this program's scratch row ``xs_ptr`` (``x`` stored
    there first: a register tensor cannot be sliced; the program's own stores, read back after
    a CTA barrier, so no other program's data and no stale L1 line). Chunk 0 is ``w0``.

    ``RESID``: ``_gemv_rows``' residual update ``out[rows] += y + f[rows]`` (``f`` zeroed), its
    rows loaded before the stream, not behind the reduction's CTA barrier. Returns the rows
    stored, ``[R_PAD]`` f32 (zero past the block)."""
    NK: tl.constexpr = (K + BK - 1) // BK
    r0 = pid * R
    r1 = tl.minimum(r0 + R, N)
    rr = r0 + tl.arange(0, R_PAD)
    rm = rr < r1
    if RESID:
        hf = tl.load(out_ptr + rr, mask=rm, other=0.0, cache_modifier=".cg")
        hf += tl.load(f_ptr + rr, mask=rm, other=0.0, cache_modifier=".cg")
    else:
        hf = tl.zeros([R_PAD], tl.float32)
    rd = tl.arange(0, x.shape[0])
    tl.store(xs_ptr + rd, x)
    tl.debug_barrier()
    rk = tl.arange(0, BK)
    acc = w0.to(tl.float32) * tl.load(xs_ptr + rk)[None, :]
    for i in tl.range(1, NK, num_stages=ST):
        w = _cols(w_ptr, r0, r1, i * BK, K, R_PAD, BK)
        acc += w.to(tl.float32) * tl.load(xs_ptr + i * BK + rk)[None, :]
    if RESID:
        tl.store(f_ptr + rr, tl.zeros_like(hf), mask=rm)
    y = tl.where(rm, tl.sum(acc, 1) + hf, 0.0)
    tl.store(out_ptr + rr, y, mask=rm)
    return y


@triton.jit
def _normed(h_ptr, f_ptr, ln_ptr, D: tl.constexpr, D_PAD: tl.constexpr, EPS: tl.constexpr,
            WITH_F: tl.constexpr):  # fmt: skip
    """``(RMSNorm of the residual row, its 1 / rms)``, f32 ``[D_PAD]`` and a scalar; the row is
    what other programs wrote (``.cg``), plus the FFN sum ``f`` not yet folded in (``WITH_F``).
    The weights are loaded first, with the row: loaded after the reduction they were a second
    L2 round trip behind its CTA barrier (which no load crosses), on the path to the first
    product of every phase that starts with a norm. (Loading them before the grid barrier
    instead measured no faster at 1B and 49 µs a token slower at 8B, twenty-second session.)"""
    rd = tl.arange(0, D_PAD)
    w = tl.load(ln_ptr + rd, mask=rd < D, other=0.0)
    h = tl.load(h_ptr + rd, mask=rd < D, other=0.0, cache_modifier=".cg")
    if WITH_F:
        h += tl.load(f_ptr + rd, mask=rd < D, other=0.0, cache_modifier=".cg")
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / D + EPS)
    return h * rstd * w.to(tl.float32), rstd


@triton.jit
def _final_normed(h_ptr, f_ptr, nw_ptr, D: tl.constexpr, D_PAD: tl.constexpr,
                  EPS: tl.constexpr):  # fmt: skip
    """The LM head's input: the final RMSNorm of the residual ``h + f`` with the XLA step's
    roundings (the residual, the normalised row and its product with the weights each rounded
    to the weights' dtype, as ``models.layers.rms_norm`` of a model-dtype row does), f32
    ``[D_PAD]``, zero past D."""
    dt = nw_ptr.dtype.element_ty
    rd = tl.arange(0, D_PAD)
    m = rd < D
    w = tl.load(nw_ptr + rd, mask=m, other=0.0).to(tl.float32)  # with the row (``_normed``)
    h = tl.load(h_ptr + rd, mask=m, other=0.0, cache_modifier=".cg")
    h = (h + tl.load(f_ptr + rd, mask=m, other=0.0, cache_modifier=".cg")).to(dt).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / D + EPS)
    return ((h * rstd).to(dt).to(tl.float32) * w).to(dt).to(tl.float32)


@triton.jit
def _pf_rows(w_ptr, pid, R: tl.constexpr, N, K: tl.constexpr, BRC: tl.constexpr,
             PF: tl.constexpr, STEP: tl.constexpr, PFB: tl.constexpr):  # fmt: skip
    """L2 prefetch of up to ``PF`` lines of a GEMV block's rows after the first chunk (which the
    program loads into registers itself): the block is contiguous, ``[pid·R, pid·R + R)``; with
    ``PFB`` as bulk requests (``triton_l2.l2_bulk``)."""
    if PF > 0:
        r1 = tl.minimum(pid * R + R, N)
        if pid * R + BRC < r1:
            start = (pid * R + BRC) * K
            l2_prefetch(w_ptr + start, r1 * K - start, PF, STEP, PFB)


@triton.jit
def _router_part(wr_ptr, ln_ptr, h_ptr, h_rows, lg_ptr, pid, R: tl.constexpr,
                 R_PAD: tl.constexpr, D: tl.constexpr, E: tl.constexpr, BE: tl.constexpr,
                 ST: tl.constexpr, REGS: tl.constexpr):  # fmt: skip
    """Program ``pid``'s share of the router logits before the RMSNorm's scale:
    ``lg[e] += Σ_r W_r[e, r]·ln2[r]·h[r]`` over its residual rows ``[pid·R, pid·R + R)`` (those
    the O phase just wrote), added with relaxed atomics. The scale ``1 / rms(h)`` is common to
    every logit, so the expert phase applies it: the router needs no grid barrier of its own.

    ``REGS``: the rows are ``h_rows`` (``[R_PAD]``, what the O GEMV returned), not read back
    from ``h_ptr`` behind a CTA barrier (an L2 round trip before the first product)."""
    rr = pid * R + tl.arange(0, R_PAD)
    rm = rr < tl.minimum(pid * R + R, D)
    if REGS:
        hv = h_rows
    else:
        tl.debug_barrier()  # the rows this program's threads just stored
        hv = tl.load(h_ptr + rr, mask=rm, other=0.0, cache_modifier=".cg")
    hv *= tl.load(ln_ptr + rr, mask=rm, other=0.0).to(tl.float32)
    re = tl.arange(0, BE)
    for e0 in tl.range(0, E, BE, num_stages=ST):
        em = e0 + re < E
        w = tl.load(wr_ptr + (e0 + re)[:, None] * D + rr[None, :], mask=em[:, None] & rm[None, :],
                    other=0.0)  # fmt: skip
        part = tl.sum(w.to(tl.float32) * hv[None, :], 1)
        tl.atomic_add(lg_ptr + e0 + re, part, mask=em, sem="relaxed")
