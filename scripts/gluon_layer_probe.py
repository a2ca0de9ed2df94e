"""An 8B decode layer's weight streams through one warp-specialized shared-memory ring (Gluon):
what the one-launch step's GEMV bytes would cost at the ring's speed.

Why. ``scripts/gluon_chain_probe.py`` measured square ``d x d`` GEMV chains: at d 4096 a ring
fed by a producer warp reaches ~89% of copy per barrier phase, where the Triton chain reaches
63% (BENCHMARKS.md, thirty-seventh session). The decode step's layer is three weight streams of
different sizes with a grid barrier between them: the QKV rows ``[6144, 4096]`` (50.3 MB), the O
rows ``[4096, 4096]`` (33.5 MB) and the selected experts (88 MB at 25% of the 8B experts).
This probe streams exactly that shape, L layers, one barrier before each phase, with the
experts as a dense ``[X, 4096]`` block of about their bytes (no selection, no attention: those
are latency the bytes would have to hide). Each phase's input is the previous phase's first
4096 outputs, so the result is checked against the float32 chain. Against it, the same GEMVs as
XLA kernels (the dense step's form), and the real step's phase times for the same bytes (A + C
+ F's unit loop: ~51 µs a layer at 75%, thirty-fourth / thirty-sixth sessions).

    python scripts/gluon_layer_probe.py --layers 8 --out results/gluon_layer.jsonl
    python scripts/gluon_layer_probe.py --shape 1b --layers 16 --latency 0:0,5.5:2.6

Measured (H200, BENCHMARKS.md thirty-seventh and thirty-eighth sessions): 8B 43.5-44.2 µs a
layer (90-93% of copy; XLA's GEMVs 46.9-47.5), 40.9-41.6 (95-97%) with one reduction a row block
(``--accumulate 1``); 1B 15.0 (72%; XLA 23.0). Stand-ins for today's attention and selection
latencies (``--latency``) add their full time (8B 52-58, 1B 23-26), whatever the consumer. The
timeline (``--stamps``) says why: a program waits 3-4 µs at every 8B barrier (the programs'
spread), and meanwhile the producer fills the whole ring, so the ring is full when the barrier
opens and a stand-in finds nothing left to bank. An L2 lookahead past the ring (``--l2-ahead``)
is 5-57% slower.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import triton.experimental.gluon.language as gl
from triton.experimental import gluon
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.ampere import mbarrier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth, header, time_fn, write_rows  # noqa: E402
from gluon_chain_probe import (  # noqa: E402
    SPIN,
    WS_EMPTY_COUNT,
    WS_READY_PER_WARP,
    _async_load,
    _cta_barrier,
    _gl_arrive,
    _gl_wait,
)
from gluon_dynamic import _consume_dyn, _produce_dyn  # noqa: E402
from gluon_ops import L2_SEG_BYTES, _gl_now, _l2_bulk, _spin_ns  # noqa: E402
from megakernel_probe import device_span  # noqa: E402

from prunepath_jax.kernels import gluon_launch, jt  # noqa: E402

# (width, rows of QKV, O and the experts' stand-in): the 8B's 80 MB ~ 22.8% of its FFN, the 1B's
# 25.2 MB = 64 of its 256 experts (75% sparsity).
SHAPES = {"8b": (4096, (6144, 4096, 10240)), "1b": (2048, (3072, 2048, 6144))}
PHASE_ROWS = SHAPES["8b"][1]
PRODUCER_REGS = 96  # a producer thread's registers (48 and 64 spilled the unrolled row copies)


# ``%globaltimer`` stamps a (program, layer, phase) with ``stamps``: 0-3 the compute warps'
# (barrier passed, stand-in done, first chunk ready, phase done), 4-6 the producer's (waiting
# for the phase's first slot, its first chunk issued, its last chunk issued), 7 unused.
NSLOT = gl.constexpr(8)


@gluon.jit
def _produce_phase(ring, ready, empty, w_ptr, s, NR: gl.constexpr, D: gl.constexpr,
                   RB: gl.constexpr, CK: gl.constexpr, NBUF: gl.constexpr, P: gl.constexpr,
                   PW: gl.constexpr, nxt_ptr, has_nxt, NNR: gl.constexpr,
                   L2A: gl.constexpr, st_ptr, ST: gl.constexpr,
                   DYN: gl.constexpr, claims, cl_ptr):  # fmt: skip
    """Copies this program's ``NR / P`` rows of one phase's ``[NR, D]`` block into the ring,
    ``[RB, CK]`` chunks in (row block, column chunk) order; returns the stream index after it.

    ``L2A`` > 0: before each row block, the row block ``L2A`` ahead goes to L2 (bulk prefetch),
    from the next phase's block ``nxt_ptr`` (``[NNR, D]``) past this one's end where
    ``has_nxt``: DRAM then has work queued beyond the ring's slots. ``ST``: stamps
    (``%globaltimer``) at ``st_ptr``: slot 4 before the phase's first slot is waited for, 5 its
    first chunk issued, 6 its last chunk issued.
    ``DYN``: the blocks are claimed from the phase's counter ``cl_ptr`` instead, each slot's
    block index in ``claims`` (``gluon_dynamic._produce_dyn``)."""
    if ST:
        gl.store(st_ptr + 4, _gl_now(s))
    if DYN:  # blocks claimed from the phase's counter (``gluon_dynamic``)
        s = _produce_dyn(ring, ready, empty, claims, w_ptr, cl_ptr, s, NR, D, RB, NBUF, PW,
                         st_ptr, ST)  # fmt: skip
    else:
        row: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [1, PW], [1, 0])
        rk = gl.arange(0, CK, layout=gl.SliceLayout(0, row))[None, :]
        NRB: gl.constexpr = NR // P // RB
        r0 = gl.program_id(0) * (NR // P)
        for rb in range(NRB):
            if L2A > 0:
                ahead = rb + L2A
                if ahead < NRB:
                    _l2_bulk(w_ptr + (r0 + ahead * RB) * D, RB * D * 2)
                elif has_nxt & (ahead - NRB < NNR // P // RB):
                    rn = gl.program_id(0) * (NNR // P) + (ahead - NRB) * RB
                    _l2_bulk(nxt_ptr + rn * D, RB * D * 2)
            for kc in gl.static_range(D // CK):
                slot = s % NBUF
                if s >= NBUF:
                    mbarrier.wait(empty.index(slot), ((s // NBUF) - 1) & 1)
                base = w_ptr + (r0 + rb * RB) * D + kc * CK
                dst = ring.index(slot)
                for r in gl.static_range(RB):
                    _async_load(dst.slice(r, 1), base + r * D + rk, cache_modifier=".cg")
                cp.mbarrier_arrive(ready.index(slot), increment_count=False)
                if ST & (kc == 0):
                    if rb == 0:
                        gl.store(st_ptr + 5, _gl_now(s))
                s += 1
        if ST:
            gl.store(st_ptr + 6, _gl_now(s))
    return s


@gluon.jit
def _producer(ring, ready, empty, wq_ptr, wo_ptr, wx_ptr, L: gl.constexpr, D: gl.constexpr,
              RB: gl.constexpr, CK: gl.constexpr, NBUF: gl.constexpr, P: gl.constexpr,
              PW: gl.constexpr, NQ: gl.constexpr, NO: gl.constexpr, NX: gl.constexpr, sel,
              SEL: gl.constexpr, L2A: gl.constexpr, st_ptr,
              ST: gl.constexpr, DYN: gl.constexpr, claims, ctr_ptr):  # fmt: skip
    """The layers' three streams in order. With ``SEL`` the expert rows wait for the selection,
    and the L2 lookahead (``L2A``) does not run from the O rows into them either (the expert
    list is not known there); it does run from the experts into the next layer's QKV rows."""
    s = gl.program_id(0) * 0
    for layer in range(L):
        st = st_ptr + (gl.program_id(0) * L + layer) * (3 * NSLOT)
        cl = ctr_ptr + 1 + 3 * layer  # the phases' block counters (DYN)
        s = _produce_phase(ring, ready, empty, wq_ptr + layer * NQ * D, s, NQ, D, RB, CK, NBUF, P,
                           PW, wo_ptr + layer * NO * D, layer >= 0, NO, L2A, st,
                           ST, DYN, claims, cl)  # fmt: skip
        # the lookahead runs from the O rows into the experts' unless SEL (layer >= L: never)
        s = _produce_phase(ring, ready, empty, wo_ptr + layer * NO * D, s, NO, D, RB, CK, NBUF, P,
                           PW, wx_ptr + layer * NX * D, layer >= SEL * L, NX, L2A,
                           st + NSLOT, ST, DYN, claims, cl + 1)  # fmt: skip
        if SEL:  # the experts are known only after the selection (the consumers' arrival)
            mbarrier.wait(sel.index(0), layer & 1)
        s = _produce_phase(ring, ready, empty, wx_ptr + layer * NX * D, s, NX, D, RB, CK, NBUF, P,
                           PW, wq_ptr + (layer + 1) * NQ * D, layer + 1 < L, NQ, L2A,
                           st + 2 * NSLOT, ST, DYN, claims, cl + 2)  # fmt: skip


@gluon.jit
def _consume_phase(ring, ready, empty, xs, x_src, y_ptr, ctr_ptr, s, ph, failed, sel,
                   NR: gl.constexpr, D: gl.constexpr, RB: gl.constexpr, CK: gl.constexpr,
                   NBUF: gl.constexpr, P: gl.constexpr, SPIN: gl.constexpr, WARPS: gl.constexpr,
                   WC: gl.constexpr, DELAY_NS: gl.constexpr, SEL_ARRIVE: gl.constexpr,
                   NAP: gl.constexpr, ACC: gl.constexpr, st_ptr,
                   ST: gl.constexpr, DYN: gl.constexpr, claims):  # fmt: skip
    """One phase: wait for the barrier (``ph`` phases done), ``DELAY_NS`` of stand-in work
    (then, with ``SEL_ARRIVE``, let the producer start this phase's stream), the input row into
    shared memory, this program's rows chunk by chunk from the ring, stored, the arrival.
    ``DYN``: whichever blocks the producer claimed, read from ``claims``
    (``gluon_dynamic._consume_dyn``)."""
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [WARPS // WC, WC], [1, 0])
    if ph > 0:
        failed = _gl_wait(ctr_ptr, P * ph, failed, SPIN, NAP)
    if ST:  # slots 0-3: barrier passed, stand-in done, first chunk ready, phase done
        gl.store(st_ptr, _gl_now(failed))
    if DELAY_NS > 0:
        _spin_ns(failed, DELAY_NS, NAP)
    if ST:
        gl.store(st_ptr + 1, _gl_now(failed))
    if SEL_ARRIVE:
        mbarrier.arrive(sel.index(0))
    rd = gl.arange(0, D, layout=gl.BlockedLayout([4], [32], [WARPS], [0]))
    xs.store(gl.load(x_src + rd, cache_modifier=".cg"))
    _cta_barrier()
    if DYN:  # claimed blocks, one slot each (``gluon_dynamic``)
        s = _consume_dyn(ring, ready, empty, claims, xs, y_ptr, s, failed, D, RB, NBUF, WARPS,
                         WC, st_ptr, ST)  # fmt: skip
    else:
        r0 = gl.program_id(0) * (NR // P)
        rr = gl.arange(0, RB, layout=gl.SliceLayout(1, blk))
        for rb in range(NR // P // RB):
            y = gl.zeros([RB], gl.float32, layout=gl.SliceLayout(1, blk))
            acc = gl.zeros([RB, CK], gl.float32, layout=blk)
            for kc in gl.static_range(D // CK):
                slot = s % NBUF
                xv = xs.slice(kc * CK, CK).load(gl.SliceLayout(0, blk))
                mbarrier.wait(ready.index(slot), (s // NBUF) & 1)
                if ST & (kc == 0):
                    if rb == 0:
                        gl.store(st_ptr + 2, _gl_now(failed))
                w = ring.index(slot).load(blk)
                if ACC:  # products only: one reduction a row block, after its last chunk
                    acc += w.to(gl.float32) * xv[None, :]
                else:
                    y += gl.sum(w.to(gl.float32) * xv[None, :], axis=1)
                _cta_barrier()
                mbarrier.arrive(empty.index(slot))
                s += 1
            if ACC:
                y = gl.sum(acc, axis=1)
            gl.store(y_ptr + r0 + rb * RB + rr, y)
    if ST:
        gl.store(st_ptr + 3, _gl_now(failed))
    _gl_arrive(ctr_ptr)
    return s, failed


@gluon.jit
def _consumer(ring, ready, empty, xs, x_ptr, yq_ptr, yo_ptr, yx_ptr, ctr_ptr, fail_ptr,
              L: gl.constexpr, D: gl.constexpr, RB: gl.constexpr, CK: gl.constexpr,
              NBUF: gl.constexpr, P: gl.constexpr, SPIN: gl.constexpr, WARPS: gl.constexpr,
              WC: gl.constexpr, NQ: gl.constexpr, NO: gl.constexpr, NX: gl.constexpr, sel,
              SEL: gl.constexpr, ATT_NS: gl.constexpr, SEL_NS: gl.constexpr,
              NAP: gl.constexpr, ACC: gl.constexpr, st_ptr, ST: gl.constexpr,
              DYN: gl.constexpr, claims):  # fmt: skip
    pid = gl.program_id(0)
    s = pid * 0
    failed = pid * 0
    for layer in range(L):
        st = st_ptr + (pid * L + layer) * (3 * NSLOT)
        if layer == 0:
            src = x_ptr
        else:
            src = yx_ptr + (layer - 1) * NX
        s, failed = _consume_phase(ring, ready, empty, xs, src, yq_ptr + layer * NQ, ctr_ptr,
                                   s, 3 * layer, failed, sel, NQ, D, RB, CK, NBUF, P, SPIN,
                                   WARPS, WC, 0, False, NAP, ACC, st, ST, DYN,
                                   claims)  # fmt: skip
        s, failed = _consume_phase(ring, ready, empty, xs, yq_ptr + layer * NQ, yo_ptr + layer * NO,
                                   ctr_ptr, s, 3 * layer + 1, failed, sel, NO, D, RB, CK, NBUF, P,
                                   SPIN, WARPS, WC, ATT_NS, False, NAP, ACC, st + NSLOT,
                                   ST, DYN, claims)  # fmt: skip
        s, failed = _consume_phase(ring, ready, empty, xs, yo_ptr + layer * NO, yx_ptr + layer * NX,
                                   ctr_ptr, s, 3 * layer + 2, failed, sel, NX, D, RB, CK, NBUF, P,
                                   SPIN, WARPS, WC, SEL_NS, SEL, NAP, ACC, st + 2 * NSLOT,
                                   ST, DYN, claims)  # fmt: skip
    gl.store(fail_ptr + pid, failed)


@gluon.jit
def _layer_kernel(x_ptr, wq_ptr, wo_ptr, wx_ptr, yq_ptr, yo_ptr, yx_ptr, ctr_ptr, fail_ptr, st_ptr,
                  L: gl.constexpr, D: gl.constexpr, RB: gl.constexpr, CK: gl.constexpr,
                  NBUF: gl.constexpr, P: gl.constexpr, SPIN: gl.constexpr, WARPS: gl.constexpr,
                  WC: gl.constexpr, PW: gl.constexpr, NQ: gl.constexpr, NO: gl.constexpr,
                  NX: gl.constexpr, READY_COUNT: gl.constexpr, EMPTY_COUNT: gl.constexpr,
                  PR: gl.constexpr, SEL: gl.constexpr, ATT_NS: gl.constexpr,
                  SEL_NS: gl.constexpr, NAP: gl.constexpr, ACC: gl.constexpr,
                  L2A: gl.constexpr, ST: gl.constexpr,
                  DYN: gl.constexpr):  # fmt: skip
    sh: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    ring = gl.allocate_shared_memory(gl.bfloat16, [NBUF, RB, CK], sh)
    ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    xs = gl.allocate_shared_memory(gl.float32, [D], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    sel = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    # each slot's block (DYN); a power-of-2 allocation, so up to 16 slots
    claims = gl.allocate_shared_memory(gl.int32, [16, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    for i in gl.static_range(NBUF):
        mbarrier.init(ready.index(i), count=READY_COUNT)
        mbarrier.init(empty.index(i), count=EMPTY_COUNT)
    mbarrier.init(sel.index(0), count=1)
    gl.warp_specialize(
        [(_consumer, (ring, ready, empty, xs, x_ptr, yq_ptr, yo_ptr, yx_ptr, ctr_ptr, fail_ptr, L,
                      D, RB, CK, NBUF, P, SPIN, WARPS, WC, NQ, NO, NX, sel, SEL, ATT_NS, SEL_NS,
                      NAP, ACC, st_ptr, ST, DYN, claims)),
         (_producer, (ring, ready, empty, wq_ptr, wo_ptr, wx_ptr, L, D, RB, CK, NBUF, P, PW, NQ, NO,
                      NX, sel, SEL, L2A, st_ptr, ST, DYN, claims, ctr_ptr))],
        [PW], [PR],
    )  # fmt: skip


def layer_meta(n_layers, d, nq, no, nx, *, programs=128, ring=12, rows=16, chunk=1024,
               warps=8, producer_warps=1, select: bool = False, attention_ns: int = 0,
               select_ns: int = 0, nap_ns: int = 0, accumulate: bool = False,
               l2_ahead: int = 0, stamps: bool = False,
               dynamic: bool = False, spin=SPIN) -> dict:  # fmt: skip
    """``_layer_kernel``'s constexprs for ``n_layers`` layers of ``[nq | no | nx, d]`` blocks,
    checked: what ``gluon_layers`` launches and the tests lower.

    ``select``: the producer streams a layer's experts only after the consumers passed the
    barrier before them (and ``select_ns`` of stand-in selection work), as a data-dependent
    expert list forces; ``attention_ns``: stand-in attention work before the O phase's GEMV
    (the ring may stream W_o meanwhile); ``nap_ns``: the consumers sleep that long between
    barrier polls and in the stand-ins (0: they spin, as the Triton step's barrier does);
    ``accumulate``: the compute warps keep a row block's products and reduce once after its
    last chunk, not once a chunk (fewer cross-warp reductions, so they may run ahead of DRAM);
    ``l2_ahead``: the producer also asks L2 for the row block that many blocks ahead of the one
    it copies (0: off; bulk requests); ``stamps``:
    the timeline (``stamp_summary``); ``dynamic``: the programs claim ``rows``-row blocks from
    a counter per phase (``gluon_dynamic``; needs ``chunk == d``)."""
    for n in (nq, no, nx):
        if n % (programs * rows) or d % chunk:
            raise ValueError(
                f"{n} rows over {programs} programs in {rows}-row blocks, chunk {chunk}"
            )
    if l2_ahead < 0 or (l2_ahead and rows * d * 2 % L2_SEG_BYTES):
        raise ValueError(f"l2_ahead {l2_ahead}: needs >= 0 and {rows}-row blocks of whole "
                         f"{L2_SEG_BYTES}-byte requests")  # fmt: skip
    if dynamic and (chunk != d or l2_ahead or ring > 16):
        raise ValueError(f"dynamic blocks take whole rows (chunk {chunk}, d {d}), no L2 "
                         f"lookahead (l2_ahead {l2_ahead}), <= 16 slots ({ring})")  # fmt: skip
    if ring * rows * chunk * 2 > 200 * 1024:
        raise ValueError(f"a {ring} x {rows} x {chunk} bf16 ring is past the shared memory")
    return dict(
        L=n_layers, D=d, RB=rows, CK=chunk, NBUF=ring, P=programs, SPIN=spin, WARPS=warps,
        WC=min(warps, chunk // 256), PW=producer_warps, NQ=nq, NO=no, NX=nx,
        READY_COUNT=WS_READY_PER_WARP * producer_warps + int(dynamic),
        EMPTY_COUNT=WS_EMPTY_COUNT,
        PR=PRODUCER_REGS, SEL=bool(select), ATT_NS=int(attention_ns), SEL_NS=int(select_ns),
        NAP=int(nap_ns), ACC=bool(accumulate), L2A=int(l2_ahead),
        ST=bool(stamps), DYN=bool(dynamic),
    )  # fmt: skip


def gluon_layers(x_d, wq, wo, wx, **settings):
    """Every layer's three phases in one launch: ``(yq, yo, yx, fail)``, and with ``stamps``
    the timeline ``[P, L, 3, NSLOT]`` int64 too; ``settings``: ``layer_meta``'s."""
    n_layers, nq, d = wq.shape
    no, nx = wo.shape[1], wx.shape[1]
    if wo.shape[2] != d or wx.shape[2] != d or min(nq, no) < d:
        raise ValueError(f"phases {wq.shape}, {wo.shape}, {wx.shape}: need [L, >= d, d] blocks")
    meta = layer_meta(n_layers, d, nq, no, nx, **settings)
    gluon_launch.install()
    f32 = jnp.float32
    p = meta["P"]
    n_st = p * n_layers * 3 * NSLOT.value if meta["ST"] else 1
    yq, yo, yx, _, fail, st = jt.triton_call(
        _layer_kernel, x_d.astype(f32), wq, wo, wx,
        out_shape=[jax.ShapeDtypeStruct((n_layers, nq), f32),
                   jax.ShapeDtypeStruct((n_layers, no), f32),
                   jax.ShapeDtypeStruct((n_layers, nx), f32),
                   jax.ShapeDtypeStruct((1 + 3 * n_layers,), jnp.int32),  # barrier, claims
                   jax.ShapeDtypeStruct((p,), jnp.int32),
                   jax.ShapeDtypeStruct((n_st,), jnp.int64)],
        zeroed_outputs=(0, 1, 2, 3), grid=(p,), num_warps=meta["WARPS"], num_stages=1, **meta,
    )  # fmt: skip
    if meta["ST"]:
        return yq, yo, yx, fail, st.reshape(p, n_layers, 3, NSLOT.value)
    return yq, yo, yx, fail


def stamp_summary(st) -> dict:
    """Medians over programs and layers 1.. (layer 0 starts cold) of each phase's timeline, µs:
    ``wait`` (previous phase done → barrier passed), ``standin``, ``first_ready`` (stand-in done
    → first chunk ready: ~0 when the ring had it banked), ``consume`` (stand-in done → phase
    done), ``issued_first`` / ``issued_last`` (the producer's first / last chunk issued,
    relative to the barrier passed: negative = before it opened), and ``span`` (the phase's
    slowest program done minus the fastest program past its barrier)."""
    full = np.asarray(st, np.int64).astype(np.float64) / 1e3  # [P, L, 3, NSLOT], µs
    done = full[..., 3].reshape(full.shape[0], -1)  # phases in stream order
    prev_done = np.concatenate([np.full_like(done[:, :1], np.nan), done[:, :-1]], axis=1)
    prev_done = prev_done.reshape(full.shape[:3])[:, 1:]
    t = full[:, 1:]
    out = {}
    for i, name in enumerate("qox"):
        ph = t[:, :, i]
        b = ph[..., 0]
        out[name] = {
            "wait": float(np.nanmedian(b - prev_done[:, :, i])),
            "standin": float(np.median(ph[..., 1] - b)),
            "first_ready": float(np.median(ph[..., 2] - ph[..., 1])),
            "consume": float(np.median(ph[..., 3] - ph[..., 1])),
            "issued_first": float(np.median(ph[..., 5] - b)),
            "issued_last": float(np.median(ph[..., 6] - b)),
            "span": float(np.median(ph[..., 3].max(0) - b.min(0))),
        }
    return out


def xla_layers(x_d, wq_t, wo_t, wx_t):
    """The same chain as XLA GEMVs (bf16 activations, the dense step's form); ``w_t`` is
    ``[L, in, out]``."""
    from prunepath_jax.models.layers import matvec_safe_matmul

    h, d = x_d.astype(jnp.bfloat16)[None, :], wq_t.shape[1]
    for layer in range(wq_t.shape[0]):
        q = matvec_safe_matmul(h, wq_t[layer])
        o = matvec_safe_matmul(q[:, :d], wo_t[layer])
        h = matvec_safe_matmul(o[:, :d], wx_t[layer])[:, :d]
    return h[0]


def reference_layers(x_d, wq, wo, wx):
    """Float32 chain (bf16 weights): every phase's output."""
    hi = jax.lax.Precision.HIGHEST
    x, yq, yo, yx, d = x_d.astype(jnp.float32), [], [], [], wq.shape[2]
    for layer in range(wq.shape[0]):
        yq.append(jnp.dot(wq[layer].astype(jnp.float32), x, precision=hi))
        yo.append(jnp.dot(wo[layer].astype(jnp.float32), yq[-1][:d], precision=hi))
        yx.append(jnp.dot(wx[layer].astype(jnp.float32), yo[-1][:d], precision=hi))
        x = yx[-1][:d]
    return jnp.stack(yq), jnp.stack(yo), jnp.stack(yx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rings", default="12:16:512,6:16:1024,12:8:1024,3:16:2048",
                    help="comma list of slots:rows:chunk")  # fmt: skip
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--accumulate", type=int, nargs="+", choices=(0, 1), default=[0],
                    help="1: one reduction a row block, 0: one a chunk (both: each variant "
                         "twice)")  # fmt: skip
    ap.add_argument(
        "--naps",
        type=int,
        nargs="+",
        default=[0],
        help="ns the consumers sleep between polls and in the stand-ins (0: spin)",
    )
    ap.add_argument(
        "--l2-ahead",
        type=int,
        nargs="+",
        default=[0],
        help="row blocks the producer's L2 prefetch runs ahead (0: none)",
    )
    ap.add_argument("--latency", default="0:0",
                    help="comma list of attention_us:selection_us stand-ins; each also with "
                         "the expert stream held until the selection")  # fmt: skip
    ap.add_argument("--dynamic", type=int, nargs="+", choices=(0, 1), default=[0],
                    help="1: row blocks claimed from a counter (rings whose chunk is the "
                         "width)")  # fmt: skip
    ap.add_argument(
        "--stamps",
        action="store_true",
        help="each Gluon variant also once with its timeline (stamp_summary)",
    )
    ap.add_argument("--out", default="results/gluon_layer.jsonl")
    a = ap.parse_args()
    head = {**header(), "bench": "gluon_layer_probe", "layers": a.layers, "shape": a.shape}
    d, phase_rows = SHAPES[a.shape]
    bw = max(copy_bandwidth().values())
    ks = jax.random.split(jax.random.key(1), 4)
    ws = [(jax.random.normal(k, (a.layers, n, d)) * d**-0.5).astype(jnp.bfloat16)
          for k, n in zip(ks[:3], phase_rows, strict=True)]  # fmt: skip
    x = jax.random.normal(ks[3], (d,), jnp.float32)
    want = reference_layers(x, *ws)
    layer_bytes = sum(n * d * 2 for n in phase_rows)
    wts = [jnp.swapaxes(w, 1, 2).copy() for w in ws]
    fns, stamped = {"xla": (jax.jit(xla_layers), wts)}, {}
    accs, dyns = [bool(v) for v in a.accumulate], [bool(v) for v in a.dynamic]
    for spec in a.rings.split(","):
        n, rows, ck = (int(v) for v in spec.split(":"))
        for lat in a.latency.split(","):
            att, sel = (float(v) for v in lat.split(":"))
            helds = (False, True) if att or sel else (False,)
            combos = itertools.product(helds, a.naps, accs, a.l2_ahead, dyns)
            for held, nap, acc, ahead, dyn in combos:
                if dyn and (ck != d or ahead):  # dynamic blocks are whole rows, no lookahead
                    continue
                name = f"ws{n}_rb{rows}_ck{ck}"
                name += f"_att{att:g}_sel{sel:g}" if att or sel else ""
                name += ("_held" if held else "") + (f"_nap{nap}" if nap else "")
                name += ("_acc" if acc else "") + (f"_l2a{ahead}" if ahead else "")
                name += "_dyn" if dyn else ""
                kw = dict(ring=n, rows=rows, chunk=ck, select=held, attention_ns=int(att * 1e3),
                          select_ns=int(sel * 1e3), nap_ns=nap, accumulate=acc, l2_ahead=ahead,
                          dynamic=dyn)  # fmt: skip
                fns[name] = (jax.jit(partial(gluon_layers, **kw)), ws)
                if a.stamps:
                    stamped[name] = jax.jit(partial(gluon_layers, **kw, stamps=True))
    rows_out = []
    for name, (fn, w) in fns.items():
        try:
            out = jax.block_until_ready(fn(x, *w))
        except Exception as err:  # a variant that does not compile or launch: say so
            print({"variant": name, "error": repr(err)[:400]}, flush=True)
            continue
        if name == "xla":
            got, ref, fails = np.asarray(out, np.float32), np.asarray(want[2][-1][:d]), 0
        else:
            got = np.concatenate([np.asarray(o).ravel() for o in out[:3]])
            ref = np.concatenate([np.asarray(o).ravel() for o in want])
            fails = int(np.asarray(out[3]).sum())
        err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
        t = time_fn(fn, x, *w, warmup=2, iters=a.iters)
        busy, span, _ = device_span(fn, x, *w)
        row = {**head, "variant": name, "us_per_layer": span / a.layers,
               "wall_us_per_layer": t * 1e6 / a.layers,
               "floor_us_per_layer": layer_bytes / bw * 1e6,
               "pct_copy_bw": layer_bytes / (span / a.layers * 1e-6) / bw * 100,
               "rel_err_vs_fp32": err, "failed_programs": fails,
               "copy_TB_s": bw / 1e12}  # fmt: skip
        if name in stamped:  # one more call with the timeline compiled in (not the timed one)
            row["timeline_us"] = stamp_summary(jax.block_until_ready(stamped[name](x, *w))[4])
        rows_out.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
               if k not in head}, flush=True)  # fmt: skip
    write_rows(a.out, rows_out)


if __name__ == "__main__":
    main()
