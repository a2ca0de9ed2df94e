"""The one-launch decode step's launch plan (``triton_megastep``): its measured defaults and the
kernel's constexprs for a model shape and launch.

Why a file of its own: the host-side arithmetic (rows a program, chunk sizes, key splits, L2
prefetch lines) and the reasons behind each default are a different thing to read from the
kernel's phase order; ``triton_megastep`` re-exports what callers use.
"""

from __future__ import annotations

import numpy as np

from prunepath_jax.kernels import jt
from prunepath_jax.kernels.triton_balanced import MAX_D

SPIN = 1_000_000  # polls before a program gives up on a barrier (~0.2 s on the H200)
TILE_BYTES = 32 * 1024  # one GEMV row chunk (the prefetched one in registers, the rest in smem)
# ... at the Llama-3.2-1B width (1024 < d <= 2048): 8 KB chunks, 675.0 vs 697.8 µs a token at 75%
# (2 paired rounds, ranges 672-678 vs 692-703): the QKV phase wakes 0.9 µs a layer sooner after
# the expert phase and the merged attention + O phase is 1.2 µs shorter — fewer registers held
# across the barriers by the chunk loaded before them (4 warps: 64 registers a thread for 32 KB;
# ptxas: 80 spilled bytes at 32 KB, none at 8 KB). Measured with the merged phase (a 256-position
# cache). Other widths keep 32 KB, measured (75%, 2 paired rounds, µs a token): SmolLM2 497.0
# vs 516.4 with 8 KB; 8B 2583 vs 2590 with 16 KB + 6 stages; 4 KB at 1B 770.9 (BENCHMARKS.md,
# twenty-sixth and twenty-seventh sessions).
TILE_BYTES_1B = 8 * 1024
# Software-pipeline stages of the GEMV and unit loops (cp.async into shared memory). More GEMV
# stages measured slower at the 1B width's 8 KB chunks (669.3 µs a token at 3, 671.8 / 685.6 /
# 707.9 at 4 / 6 / 8) and a tie at 8B (2583 vs 2572 at 4); unit-loop stages 4 / 5 at 1B tie
# (687.6 / 693.8 vs 687.6); twenty-seventh session.
STAGES = 3
BLOCK_T = 32  # cached keys a split attention work item reads at once
# Warps a program: 0 picks by the expert count — 4 up to 256 experts (1B at 75%: 722 vs 748 µs a
# token; the selection and unit loop faster, the attention slower), 8 above (8B: 4 warps tie,
# the 512-wide selection 5.6 vs 4.4 µs a layer); BENCHMARKS.md, twenty-first session.
WARPS = 0


def default_tile_bytes(d: int) -> int:
    """A GEMV chunk's bytes by default: ``TILE_BYTES_1B`` where measured faster (the 1B width),
    ``TILE_BYTES`` elsewhere."""
    return TILE_BYTES_1B if 1024 < d <= 2048 else TILE_BYTES


def default_warps(e: int) -> int:
    """The launch's warps a program for ``e`` experts (``WARPS`` 0)."""
    return 4 if max(16, jt.next_pow2(e)) <= 256 else 8


LINE = 128  # bytes of an L2 prefetch line
# L2 prefetch at a program's barrier arrival (BENCHMARKS.md, twentieth session: 4-6% faster at
# 1B, neutral within noise at 8B with 4 key splits): KB of its next QKV (and router) block, of
# its W_o block (32: the whole rest of a 1B block; 0 measured the same at 8B), and cached keys
# (and values) of an attention item. Measured and not kept (twenty-seventh session, 75%): the
# next QKV block's lines asked for before the expert phase's selection instead (1B 672.6 vs
# 669.3 µs a token, the wake-up 0.5 µs shorter but the QKV phase 0.8 longer; 8B and SmolLM2
# ties), with 128 KB or L2 priority evict_last (1B 679.3 / 682.2), and the whole W_o block during
# the 8B attention phase (prefetch_o_kb 256: 2603 vs 2583).
PREFETCH_KB = 64
PREFETCH_O_KB = 32
# The GEMV blocks' L2 prefetch as bulk requests (``triton_l2.l2_bulk``: thread 0 asks the copy
# engine for 16 KB at a time) instead of one ``prefetch.global.L2`` a line, above d
# BULK_PREFETCH_ABOVE_D (``default_bulk_prefetch``). Measured (75%, paired rounds, µs a token):
# 8B 2379.0 vs 2407.2 (2 rounds, thirty-second session), 1B 672.9 [670.9-673.3] vs 677.2
# [676.4-678.4] (3 rounds, thirty-third). SmolLM2 (d 576) is not measured and keeps the lines.
BULK_PREFETCH_ABOVE_D = 1024


def default_bulk_prefetch(d: int) -> bool:
    """Whether the GEMV blocks' L2 prefetch is bulk requests by default at width ``d``."""
    return d > BULK_PREFETCH_ABOVE_D


PREFETCH_KEYS = 64
# Each program looks its units' experts up in a table (_unit_table) instead of two block-wide
# reductions a unit: the 1B unit loop 9.1 vs 10.8 µs a layer, 8B (bound by bytes) the same
# (BENCHMARKS.md, twenty-first session).
UNIT_TABLE = True
# The table filled from a ranked selection (triton_select._select_ranked: one sort of 64-bit
# (logit, index) keys, no way back to index order, no scan to number the experts) instead of the
# sorted one's index-order table: faster at every shape measured (75%, 3 paired rounds, µs a
# token: SmolLM2 497.9 vs 505.6, 1B 691.8 vs 698.2, 8B 2580 vs 2605; BENCHMARKS.md,
# twenty-fourth session).
RANKED_SELECT = True
# Software-pipeline stages of the attention items' key-block loop: 1, a plain loop. 2-3 (cp.async
# into shared memory, blocks loaded ahead) measured a wash with the split phases (1B 710.9 /
# 710.8 / 713.5 µs a token at 1 / 2 / 3, 8B 2622 / 2610 / 2605; 5 paired rounds) and slower
# with the merged phase and 64-key blocks (1B 706.8 vs 687.6; BENCHMARKS.md, twenty-third
# session).
ATTN_STAGES = 1
# Attention and the O projection as one phase (``triton_megastep_ao``) where it measured faster
# (twenty-third session, 75%, a 256-position cache, 3 paired rounds): 1B 687.6 vs 716.2 µs a
# token with 64-key blocks (32-key blocks slower); at 8B slower (2717-2775 vs 2603: its QKV phase
# grows 7 µs a layer with the router rows). Its items read their head's whole cache, so long
# caches keep the split phases (1B with a 400-token prompt, 512 positions: merged 821.4 vs split
# 718.9; twenty-fourth session).
MERGE_MAX_D = 2048
MERGE_MAX_CACHE = 256
MERGE_BLOCK_T = 64  # cached keys a merged item reads at once
# Split-phase attention above LONG_CACHE positions: 64-key blocks through a 3-stage cp.async
# pipeline (``tl.range(num_stages=3)``). At 256 positions an item reads one or two blocks (the
# plain loop measured the same, see ATTN_STAGES); at long caches it reads dozens, one L2/HBM
# round trip after another without the pipeline. Measured (75%, a 1000 / 4000 / 32000-token
# prompt, 2 paired rounds, µs a token; BENCHMARKS.md, twenty-ninth and thirtieth sessions): 8B
# 2792 vs 3029 at 4352 positions (two runs), 3829 vs 6221 at 32256 (the default kernels 4050;
# in another run 3815 vs dense 5609); 1B 740.0 vs 756.0 at 1280, 787.3 vs 916.5 at 4352, 1187
# vs 2433 at 32256 (default kernels 1231); SmolLM2 573.7 vs 624.3 at 1280, 639.8 vs 896.7 at
# 4352.
LONG_CACHE = 1024
LONG_BLOCK_T = 64
LONG_ATTN_STAGES = 3
# ... and at every length for heads of WIDE_HEAD dims or more (the 8B's 128), whose 64-key
# blocks are 16 KB: 8B 2446.0 vs 2470.6 at 256 positions, 2486.0 / 2505.8 vs 2552.2 / 2572.6 at
# 512 (two runs), 2539.5 vs 2643.5 at 768. With 64-dim heads (8 KB blocks) it measured slower
# below LONG_CACHE although the attention phase itself got faster: 1B 731.1 / 741.0 vs 725.5 /
# 720.8 at 512, 755.7 vs 749.9 at 768 (thirtieth session). Nor do 128-key blocks generalise
# the 16 KB rule to 64-dim heads: 1B 1128.8 vs 1175.9 at 32256, but SmolLM2 663.6 vs 573.7 at
# 1280 and 660.4 vs 639.8 at 4352; not taken.
WIDE_HEAD = 128
# From XLONG_CACHE positions on, key blocks of XLONG_BLOCK_BYTES (64-dim bf16 heads: 128 keys;
# at most XLONG_BLOCK_T, at least LONG_BLOCK_T): 1B 939.5 vs 955.8 at 16384 positions, 1126.4
# vs 1171.6 at 32256; SmolLM2 894.1 vs 919.9 and 1240.7 vs 1323.6 (thirty-first session; and
# 1B 1128.8 vs 1175.9 at 32256 in the thirtieth). Not below: SmolLM2 slower at 1280 and 4352
# (thirtieth session); 4352-16384 is not measured. The 8B's 128-dim heads keep 64 keys (16 KB
# already; 128-key blocks through 2 stages 4003.5 vs 3814.9 at 32256).
XLONG_CACHE = 16384
XLONG_BLOCK_BYTES = 16 * 1024
XLONG_BLOCK_T = 128
PREFETCH_AO_KB = 256  # L2 prefetch of a merged item's W_o block at barrier arrival (KB)
# ... and of a program's router rows for phase A (KB; all of them at 1B and 8B). Not the cause
# of the 8B phase A's 7 µs growth: 0 measured the same (2768 vs 2781 µs a token, phase A 22.7
# vs 24.2 µs a layer; twenty-fourth session).
PREFETCH_RB_KB = 64
# Software-pipeline stages of the LM head's rows when the launch runs the head (``head_in``): a
# long stream (1B: ~970 rows of 4 KB a program), not a few chunks like the layers' GEMVs.
HEAD_STAGES = 4
# Columns a chunk of the QKV phase's GEMV over column chunks of all the program's rows
# (``_gemv_cols``: one reduction after the stream) instead of chunks of full rows (one
# block-wide reduction each), above d 1024. Measured (75%, paired rounds, µs a token;
# BENCHMARKS.md, twenty-eighth session): 1B 668.3 vs 678.5 at 256 columns (32 rows × 16 KB;
# 718.1 / 751.0 at 128 / 64), 8B 2460 vs 2596 at 256 (64 rows × 32 KB; 2653 at 128: a row's
# 256 contiguous bytes a chunk are too few). SmolLM2's QKV block is one chunk of full rows.
QKV_COLS = 256
QKV_COLS_ABOVE_D = 1024
# ... and of the O phase's GEMV with its residual update (``_gemv_cols`` with ``RESID``; split
# phases only: the merged phase has no O GEMV of its own). Measured slower, so off (75%, 3 paired
# rounds, µs a token; BENCHMARKS.md, thirty-first session): 8B 2512.3 at 256 columns, 2647.9 at
# 128, 2458.1 at 256 with 4 GEMV stages vs row chunks' 2451.6 (its phase C 15.0 / 18.1 / 13.4
# vs 13.3 µs a layer); 1B at 512 positions 724.2 vs 717.4.
O_COLS = 0
# Whether the O phase's router share (``router_in_c``) takes the program's new residual rows from
# the O GEMV's registers (``_router_part``'s ``REGS``) instead of storing them, a CTA barrier and
# reading them back from L2. Measured slower, so off (BENCHMARKS.md, thirty-third session; the
# reshape to the router tile's layout costs more than the read-back): alone (gemv_phase.py, 7
# launches) the share took 2.14 vs 1.73 µs at 8B, 1.07 vs 0.87 at 1B's width; in the 8B step
# (75%, 3 paired rounds) 2451.6 vs 2441.0 µs a token. (The 1B step runs the merged phase, which
# has no router share.)
ROUTER_FROM_REGS = False
HEAD_IN = False  # whether megastep.step runs the final norm and the LM head in the launch


def check_launch(
    e: int, merge_bc: bool, *, router_in_items: bool, block_t: int, k_min: int,
    k_max: int | None, rule: str, gate: str, programs: int, splits: int, parts: int, warps: int,
    tile_bytes: int, stages: tuple, prefetch: tuple, qkv_cols: int | None = None,
    o_cols: int | None = None,
) -> int:  # fmt: skip
    """Raises ValueError on a launch the kernel cannot run; returns ``k_max`` with its default
    filled in (all ``e`` experts). ``block_t`` and the stages come with their defaults filled
    in already (``default_attention``)."""
    if router_in_items and not merge_bc:
        raise ValueError("router_in_items computes the router inside the merged phase: merge_bc")
    k_max = e if k_max is None else min(k_max, e)
    if not 1 <= k_min <= k_max:
        raise ValueError(f"need 1 <= k_min <= k_max, got {k_min}, {k_max}")
    if rule not in ("paper", "nucleus") or gate not in ("sigmoid", "none"):
        raise ValueError(f"rule must be paper|nucleus and gate sigmoid|none: {rule!r}, {gate!r}")
    bad_warps = warps < 0 or warps & (warps - 1)
    bad_t = block_t < 16 or block_t & (block_t - 1)
    bad_cols = any(c < 0 or (c and (c < 16 or c & (c - 1))) for c in (qkv_cols or 0, o_cols or 0))
    if min(programs, splits, parts, tile_bytes) < 0 or bad_t or bad_warps or bad_cols:
        raise ValueError(
            f"bad launch sizes: programs={programs}, splits={splits}, parts={parts}, "
            f"tile_bytes={tile_bytes} (0: by the width), qkv_cols={qkv_cols} and "
            f"o_cols={o_cols} (0: row chunks, else a power of 2 >= 16), "
            f"warps={warps} (0: by the expert count, else a power of 2), block_t={block_t} (a "
            "power of 2 >= 16: the attention's dot needs 16 keys)"
        )
    if min(stages) < 1:
        raise ValueError(f"pipeline stages must be >= 1 (gemv, unit, attention, head): {stages}")
    if min(prefetch) < 0:
        raise ValueError(
            "prefetch sizes must be >= 0 (KB of QKV, of W_o, keys, KB of a merged item's W_o, of "
            f"the router rows): {prefetch}"
        )
    return k_max


def default_attention(
    merge_bc: bool, s_max: int, head_dim: int, itemsize: int = 2
) -> tuple[int, int]:
    """``(block_t, attn_stages)`` by default: ``MERGE_BLOCK_T`` keys in a plain loop for the
    merged phase; ``LONG_BLOCK_T`` keys through ``LONG_ATTN_STAGES`` stages for split phases over
    more than ``LONG_CACHE`` positions or with heads of ``WIDE_HEAD`` dims or more, blocks of
    ``XLONG_BLOCK_BYTES`` (cache elements of ``itemsize`` bytes) from ``XLONG_CACHE`` on; else
    ``BLOCK_T`` keys in a plain loop (each where it measured fastest)."""
    if merge_bc:
        return MERGE_BLOCK_T, ATTN_STAGES
    if s_max >= XLONG_CACHE:
        keys = XLONG_BLOCK_BYTES // (head_dim * itemsize)
        return min(XLONG_BLOCK_T, max(LONG_BLOCK_T, keys)), LONG_ATTN_STAGES
    if s_max > LONG_CACHE or head_dim >= WIDE_HEAD:
        return LONG_BLOCK_T, LONG_ATTN_STAGES
    return BLOCK_T, ATTN_STAGES


def default_merge(d: int, s_max: int) -> bool:
    """Whether the attention and the O projection run as one phase by default: where measured
    faster (``MERGE_MAX_D``, ``MERGE_MAX_CACHE``)."""
    return d <= MERGE_MAX_D and s_max <= MERGE_MAX_CACHE


def unsupported_shape(d: int, head_dim: int, group_size: int) -> str | None:
    """Why the kernel cannot run these widths, or None (``megastep.check`` asks too)."""
    hd, g = head_dim, group_size
    if jt.next_pow2(d) > MAX_D or hd & (hd - 1) or hd < 2 or g % 2:
        return (
            f"megastep takes next_pow2(d) <= {MAX_D}, a power-of-2 head_dim and an even group "
            f"size; got d={d}, head_dim={hd}, G={g}"
        )
    return None


def check_shapes(
    x0_vd, token, inv_freq_h, pos, tau_l, ln1_ld, ln2_ld, wqkv_lnd, wo_ldn, wr_led, wm_len,
    w_in_lcfd, w_out_lfd, kc_lskh, vc_lskh, head_vd, norm_d, head_in: bool,
) -> tuple[int, int, int]:  # fmt: skip
    """``(hq, G, vocab)`` of ``triton_megastep.megastep``'s operands, or a ValueError naming
    every operand whose shape does not fit (a wrong shape would read out of bounds on the GPU,
    not fail)."""
    n_layers, n_qkv, d = wqkv_lnd.shape
    _, s_max, kv, hd = kc_lskh.shape
    e, f = wr_led.shape[1], w_out_lfd.shape[1]
    hq = n_qkv // hd - 2 * kv
    want = {
        "ln1": (ln1_ld.shape, (n_layers, d)), "ln2": (ln2_ld.shape, (n_layers, d)),
        "wo": (wo_ldn.shape, (n_layers, d, hq * hd)), "router": (wr_led.shape, (n_layers, e, d)),
        "router @ wo": (wm_len.shape, (n_layers, e, hq * hd)),
        "w_in": (w_in_lcfd.shape, (n_layers, 2, f, d)),
        "w_out": (w_out_lfd.shape, (n_layers, f, d)),
        "k cache": (kc_lskh.shape, (n_layers, s_max, kv, hd)), "v cache": (vc_lskh.shape,
        kc_lskh.shape), "x0 [V, d]": ((np.ndim(x0_vd), np.shape(x0_vd)[-1]), (2, d)),
        "inv_freq": (np.shape(inv_freq_h), (hd // 2,)), "tau": (np.shape(tau_l), (n_layers,)),
        "token, pos": ((np.size(token), np.size(pos)), (1, 1)),
    }  # fmt: skip
    vocab = 0
    if head_in:
        if head_vd is None or norm_d is None:
            raise ValueError("head_in needs the LM head's rows (head_vd) and norm weights (norm_d)")
        vocab = np.shape(head_vd)[0]
        want["head"] = (np.shape(head_vd), (vocab, d))
        want["norm"] = (np.shape(norm_d), (d,))
    bad = {k: v for k, v in want.items() if tuple(v[0]) != tuple(v[1])}
    if bad:
        raise ValueError(f"megastep shapes do not fit (got, want): {bad}")
    g = f // e if e else 0
    if hq <= 0 or hq % kv or n_qkv != (hq + 2 * kv) * hd or f != e * g:
        raise ValueError(f"inconsistent heads/experts: qkv rows {n_qkv}, kv {kv}, hd {hd}, f {f}")
    why = unsupported_shape(d, hd, g)
    if why:
        raise ValueError(why)
    return hq, g, vocab


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _pf_lines(cap: int, r: int, brc: int, k: int, itemsize: int) -> int:
    """L2 prefetch lines for a GEMV block past its first chunk: a power of 2, at most ``cap``
    and no more than the rest of the block needs (more would only repeat its last line)."""
    need = -(-max(0, r - brc) * k * itemsize // LINE)
    return min(_pow2_floor(cap), jt.next_pow2(need)) if cap and need else 0


def router_chunk(e_pad: int, r_pad: int, tile_bytes: int) -> int:
    """Experts a tile of the O phase's router share holds (``_router_part``'s ``BE``): as many
    rows of ``r_pad`` f32 columns as ``tile_bytes`` allow, a power of 2, at most ``e_pad``."""
    return min(e_pad, _pow2_floor(max(1, tile_bytes // (r_pad * 4))))


def _row_chunk(r: int, k: int, itemsize: int, tile_bytes: int = TILE_BYTES) -> int:
    """Full rows a GEMV chunk holds: a power of 2 within ``tile_bytes``, at most ``r``'s."""
    rows = max(1, tile_bytes // (jt.next_pow2(k) * itemsize))
    return min(_pow2_floor(rows), jt.next_pow2(r))


def default_splits(programs: int, kv: int, gq: int, head_dim: int, s_max: int, bt: int) -> int:
    """Key splits per KV head: as many as programs allow, at most 16, at least ``2·bt`` cache
    rows each (4·bt until the twentieth session: 4 splits of a 256-row cache beat 2 by 1-2%
    at 1B and 8B), and few enough that the combine's ``[splits, gq, hd]`` partials fit
    registers."""
    by_regs = max(1, 8192 // (jt.next_pow2(gq) * head_dim))
    by_rows = max(1, s_max // (2 * bt))
    s = max(1, min(16, programs // kv, by_regs, by_rows))
    return 1 << (s.bit_length() - 1)


def constants(
    n_layers: int, d: int, hq: int, kv: int, hd: int, e: int, g: int, s_max: int, *,
    programs: int, splits: int = 0, block_t: int = BLOCK_T, tile_bytes: int = TILE_BYTES,
    itemsizes=(2, 2, 4, 2), eps: float = 1e-5, rule: str = "paper", gate: str = "sigmoid",
    k_min: int = 1, k_max: int | None = None, spin: int = SPIN, timing: int = 0,
    gemv_stages: int = STAGES, unit_stages: int = STAGES, router_in_c: bool = True,
    prefetch_kb: int = PREFETCH_KB, prefetch_o_kb: int = PREFETCH_O_KB,
    prefetch_keys: int = PREFETCH_KEYS, unit_table: bool = UNIT_TABLE,
    attn_stages: int = ATTN_STAGES, merge_bc: bool = False, parts: int = 0,
    prefetch_ao_kb: int = PREFETCH_AO_KB, prefetch_rb_kb: int = PREFETCH_RB_KB,
    router_in_items: bool = False, ranked_select: bool = RANKED_SELECT, interpret: bool = False,
    vocab: int = 0, head_itemsize: int = 2, head_stages: int = HEAD_STAGES,
    qkv_cols: int | None = None, o_cols: int | None = None,
    bulk_prefetch: bool | None = None,
) -> dict:  # fmt: skip
    """The kernel's constexprs for a model shape and launch (``itemsizes``: bytes per element of
    W_qkv, W_o, the router and the KV cache); also what the sm_90 lowering test compiles. A GEMV
    phase gives each program ``ceil(N / P)`` contiguous output rows (the P programs cover N in
    one round). The interpreter gets no L2 prefetch (inline PTX). ``vocab`` > 0: the launch
    ends with the final norm and the LM head's ``vocab`` rows (``HI``)."""
    p = programs
    s = splits or default_splits(p, kv, hq // kv, hd, s_max, block_t)
    r_a, r_c, r_d = (-(-n // p) for n in ((hq + 2 * kv) * hd, d, e))
    rc_pad = jt.next_pow2(r_c)
    brc_a = _row_chunk(r_a, d, itemsizes[0], tile_bytes)
    brc_c = _row_chunk(r_c, hq * hd, itemsizes[1], tile_bytes)
    brc_d = _row_chunk(r_d, d, itemsizes[2], tile_bytes)
    e_pad = max(16, jt.next_pow2(e))

    def lines(kb: int) -> int:  # L2 prefetch lines; none under the interpreter (inline PTX)
        return 0 if interpret else kb * 1024 // LINE

    pf_keys = 0 if interpret else prefetch_keys
    # Bulk requests need 16-byte aligned starts and sizes: every GEMV row's bytes a multiple of
    # 16 (row starts are whole rows from 16-byte aligned buffers).
    rows_bytes = (d * itemsizes[0], hq * hd * itemsizes[1], d * itemsizes[2], d * head_itemsize)
    if bulk_prefetch is None:
        bulk_prefetch = default_bulk_prefetch(d)
    pfb = bool(bulk_prefetch) and not interpret and all(b % 16 == 0 for b in rows_bytes)
    return dict(
        PFB=pfb,
        RC=bool(router_in_c or merge_bc), RC_PAD=rc_pad, RC_REGS=ROUTER_FROM_REGS,
        BE=router_chunk(e_pad, rc_pad, tile_bytes),
        PF_A=_pf_lines(lines(prefetch_kb), r_a, brc_a, d, itemsizes[0]),
        PF_C=_pf_lines(lines(prefetch_o_kb), r_c, brc_c, hq * hd, itemsizes[1]),
        PF_D=_pf_lines(lines(prefetch_kb), r_d, brc_d, d, itemsizes[2]),
        STEP_A=LINE // itemsizes[0], STEP_C=LINE // itemsizes[1], STEP_D=LINE // itemsizes[2],
        PF_KEYS=min(_pow2_floor(pf_keys), jt.next_pow2(s_max)) if pf_keys else 0,
        PF_R=e_pad if lines(prefetch_kb) and router_in_c else 0,
        LPR=max(1, hd * itemsizes[3] // LINE),
        L=n_layers, D=d, D_PAD=jt.next_pow2(d), HQ=hq, KV=kv, HD=hd,
        GQ_PAD=jt.next_pow2(hq // kv), NA_PAD=jt.next_pow2(hq * hd), E=e,
        E_PAD=e_pad, G=g, BN=2, P=p, S=s, S_PAD=jt.next_pow2(s), BT=block_t,
        S_MAX=s_max, R_A=r_a, BRC_A=brc_a, R_C=r_c, BRC_C=brc_c, R_D=r_d, BRC_D=brc_d,
        GS=gemv_stages, US=unit_stages,
        EPS=float(eps), NUCLEUS=rule == "nucleus", SIGMOID=gate == "sigmoid", K_MIN=k_min,
        K_MAX=e if k_max is None else k_max, SCALE=float(hd**-0.5), SPIN=spin,
        TIMING=int(timing), DOT_F32=bool(interpret), UT=bool(unit_table),
        RK=bool(unit_table and ranked_select),
        AST=int(attn_stages), NIC_PAD=jt.next_pow2(-(-r_c // brc_c)),
        **_cols_constants(r_a, d, hq * hd,
                          default_qkv_cols(d) if qkv_cols is None else qkv_cols,
                          O_COLS if o_cols is None else o_cols),
        **_ao_constants(d, hq, kv, hd, e, p, merge_bc, parts, tile_bytes, itemsizes,
                       lines(prefetch_ao_kb), lines(prefetch_rb_kb), router_in_items),
        **_head_constants(vocab, d, p, tile_bytes, head_itemsize, lines(prefetch_kb),
                          head_stages),
        **workspace(n_layers, d, e, kv, bool(merge_bc and router_in_items)),
    )  # fmt: skip


def default_qkv_cols(d: int) -> int:
    """The QKV GEMV's column chunk by default (``QKV_COLS`` above ``QKV_COLS_ABOVE_D``; 0: row
    chunks)."""
    return QKV_COLS if d > QKV_COLS_ABOVE_D else 0


def _cols_constants(r_a: int, d: int, na: int, cols: int, o_cols: int) -> dict:
    """The column-chunk GEMVs: the QKV phase's (``KS`` when ``cols``; ``RA_PAD`` rows, the
    program's ``R_A`` padded, ``BK_A`` columns a chunk, at most ``D_PAD``) and the O phase's
    (``KSC`` when ``o_cols``; its ``R_C`` rows padded to the router's ``RC_PAD``, ``BK_C``
    columns a chunk, at most ``NA_PAD``). ``XS_W``: a program's scratch row, wide enough for
    either input."""
    return dict(
        KS=cols > 0, RA_PAD=jt.next_pow2(r_a), BK_A=min(max(cols, 16), jt.next_pow2(d)),
        KSC=o_cols > 0, BK_C=min(max(o_cols, 16), jt.next_pow2(na)),
        XS_W=max(jt.next_pow2(d), jt.next_pow2(na)),
    )  # fmt: skip


def workspace(n_layers: int, d: int, e: int, kv: int, double: bool) -> dict:
    """The launch's one zeroed f32 workspace (one memset): the residual ``[NB, d]``, the FFN sum
    ``[NB, d]`` (``NB`` 2 when ``double``: ``router_in_items``' double buffers), the router
    logits ``[L, E]``, then int32 the barrier counter and the split counters ``[L, KV]``.
    ``WS_F``, ``WS_LG``, ``WS_CTR`` are offsets (floats), ``WS_N`` the size: the kernel and the
    host read the same layout from here."""
    nb = 2 if double else 1
    return dict(WS_F=nb * d, WS_LG=2 * nb * d, WS_CTR=2 * nb * d + n_layers * e,
                WS_N=2 * nb * d + n_layers * e + 1 + n_layers * kv)  # fmt: skip


def _head_constants(vocab, d, p, tile_bytes, itemsize, pf_lines, stages) -> dict:
    """The LM head phase's constexprs (``HI`` when ``vocab``): ``R_H`` rows a program,
    ``BRC_H`` a chunk, ``PF_H`` L2 prefetch lines at barrier arrival, ``HST`` stages."""
    r_h = -(-vocab // p) if vocab else 1
    brc_h = _row_chunk(r_h, d, itemsize, tile_bytes)
    return dict(
        HI=bool(vocab),
        V=max(1, vocab),
        R_H=r_h,
        BRC_H=brc_h,
        PF_H=_pf_lines(pf_lines, r_h, brc_h, d, itemsize) if vocab else 0,
        STEP_H=LINE // itemsize,
        HST=int(stages),
    )


def _ao_constants(d, hq, kv, hd, e, p, merge_bc, parts, tile_bytes, itemsizes, ao_lines,
                  r_lines, router_in_items) -> dict:  # fmt: skip
    """The merged phase's constexprs (``triton_megastep_ao``): ``NP`` row parts a KV head
    (``parts``, or as many as ``p`` programs allow), ``RB`` W_o rows and ``RE`` rows of M a part,
    ``BRB`` rows a chunk (within ``tile_bytes``), ``R_B`` router rows a program in the QKV phase
    (``RBA``) or, with ``router_in_items`` (``RBI``), a merged item (then ``HS``, the residual's
    second buffer, is ``d`` and ``R_Z`` the rows a program zeroes); L2 prefetch lines at barrier
    arrival (at most ``ao_lines``/``r_lines``, 0 under the interpreter): ``PF_OR`` W_o rows of
    ``LPO`` lines, ``LPM`` lines a row of M, ``PF_RB`` for the router rows."""
    n_p = parts or max(1, p // kv)
    rbi = bool(merge_bc and router_in_items)
    r_b = -(-e // (kv * n_p)) if rbi else -(-e // p)
    rb, re_, w = -(-d // n_p), -(-e // n_p), (hq // kv) * hd
    row_bytes = w * itemsizes[1]
    on = bool(merge_bc)
    return dict(
        MBC=on, RBI=rbi, RBA=on and not rbi, HS=d if rbi else 0, R_Z=-(-d // p),
        R_Z_PAD=jt.next_pow2(-(-d // p)), NP=n_p, RB=rb, RB_PAD=jt.next_pow2(rb), RE=re_,
        RE_PAD=jt.next_pow2(re_), R_B=r_b, R_B_PAD=jt.next_pow2(r_b),
        BRB=_row_chunk(rb, jt.next_pow2(hq // kv) * hd, itemsizes[1], tile_bytes),
        PF_OR=min(jt.next_pow2(rb), _pow2_floor(max(1, ao_lines * LINE // row_bytes)))
        if on and ao_lines else 0,
        LPO=jt.next_pow2(-(-row_bytes // LINE)),
        LPM=jt.next_pow2(-(-w * itemsizes[2] // LINE)) if on and ao_lines else 0,
        PF_RB=min(jt.next_pow2(-(-r_b * d * itemsizes[2] // LINE)), _pow2_floor(r_lines))
        if on and r_lines else 0,
    )  # fmt: skip
