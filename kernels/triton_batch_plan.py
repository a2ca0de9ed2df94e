"""The batched one-launch decode step's plan (``triton_megastep_batch``): its sizes, defaults,
shape limits and the kernel's constexprs.

Why a file of its own: what a launch will be is decided here from shapes alone, without
Triton's kernel, so the sm_90 census and the lowering tests (``scripts/megastep_census.py``)
read the same numbers the launch uses, and the kernel's file stays the kernel.
"""

from __future__ import annotations

from prunepath_jax.kernels import jt
from prunepath_jax.kernels.triton_megastep_plan import (
    LINE,
    PREFETCH_KB,
    PREFETCH_O_KB,
    SPIN,
    STAGES,
    _pf_lines,
    default_attention,
    default_bulk_prefetch,
    default_splits,
    unsupported_shape,
)

MAX_TOKENS = 16  # the tokens padded to one tl.dot's 16 columns
# ... in the A and C products by default (``Launch.skinny_tp``: 32). Why 32 might pay: with 8
# warps and a 64-row tile Triton gives each of the two warpgroups half of the 16 columns
# (wgmma m64n8k16, each reading the whole weight tile from shared memory); at 32 each takes
# m64n16k16, the shape the 4-warp launch gets, whose products alone ran 1.15-1.35× faster
# (H100, forty-sixth / forty-seventh sessions). The padding columns cost registers and shared
# memory, not bytes: their loads are masked. Not timed yet (stages ``s63a``-``s63c``).
SKINNY_TP = (16, 32)
BN = 16  # neurons a unit: the down projection's K, tl.dot's smallest
# Input columns a chunk of the A and C products (256 spilled 0.6-0.9 KB a thread). The A and C
# chunks sized to ~16 KB weight tiles instead (1B: 256 / 512 columns) were slower, A 21 ->
# 26 µs a layer at 1B (BENCHMARKS.md, forty-first session): ``Launch(skinny_bk=)`` to measure.
BK = 128
BE = 64  # router rows a chunk of the router share
# ... streamed through this many pipeline stages by default (``Launch.router_stages``): 3 was
# 3% a step faster than a plain loop at 1B (forty-third session) and 0.5-3.5% at 8B (1.077 /
# 0.960× dense against 1.041 / 0.939× at 4 / 16 sequences; H100, forty-sixth session).
ROUTER_STAGES = 3
# Copies of the router logits a layer (``Launch.router_copies``): program p adds its share into
# copy ``(p + layer) % RCP`` and the selection sums the copies. Why more than one: every
# program adds its ``T · E`` partials into the same ``[T, E]`` lines, P relaxed atomics deep at
# each address; with RCP copies each queue is P / RCP deep, for RCP ``[E]`` loads a token in
# phase S and RCP times the zeroed logits. 1 until timed (stage ``s63a``).
ROUTER_COPIES = 1
# The fused expert phase (``_unit_ffn``): at most this many units a group, tiles of about this
# many bytes a stream (gate and up each; ``[128, 64]`` bf16 at 8 units).
FFN_UNITS_MAX = 8
FFN_TILE_BYTES = 16 * 1024


def check(t: int, d: int, head_dim: int, group_size: int) -> None:
    """Raises ValueError unless the batched step runs these sizes."""
    why = unsupported_shape(d, head_dim, group_size)
    if why:
        raise ValueError(why)
    if not 1 <= t <= MAX_TOKENS:
        raise ValueError(f"the batched one-launch step takes 1-{MAX_TOKENS} sequences, got {t}")
    if group_size % BN:
        raise ValueError(
            f"the batched one-launch step takes a group size that is a multiple of {BN} (its "
            f"units are {BN} neurons, tl.dot's smallest K), got {group_size}"
        )


def default_ffn_units(e: int, g: int, p: int) -> int:
    """Units a group of the fused expert phase (``_unit_ffn``): a program's share of every
    expert's units (what it gets when the union is all of E), as a power of 2, at most 8 (128
    rows: the gate and up accumulators ``[UF · BN, 16]`` f32 stay at 16 registers a thread at
    8 warps). One group a program at the 1B and 8B widths, so one ``T · D`` add a program."""
    return min(FFN_UNITS_MAX, jt.next_pow2(-(-e * (g // BN) // p)))


def default_skinny(r_a: int) -> int:
    """``skinny_rows`` by the A phase's rows a program (``ceil(N_qkv / P)``): where its tile is
    under 64 rows (the 1B width: 32, and C's 16), pad the A and C tiles to 64 (wgmma instead of
    mma.sync), measured with the router share's 3 stages 1.17× faster at 1B with 4 and 16
    sequences; where it is 64 already (8B) the padded C tile was 2-5% slower (BENCHMARKS.md,
    forty-third session)."""
    return 64 if jt.next_pow2(r_a) < 64 else 16


def _rows(rows: int | None, default: int) -> int:
    """A / C tile's least rows: None is ``default``, 0 is 16 (no padding)."""
    return default if rows is None else rows or 16


def _ffn_block(uf: int, itemsize: int) -> int:
    """Columns of a fused expert phase's tile: ``[UF · BN, ·]`` of about ``FFN_TILE_BYTES``
    (16-256)."""
    n = FFN_TILE_BYTES // (uf * BN * itemsize)
    return max(16, min(256, 1 << (n.bit_length() - 1)))


def constants(t, n_layers, d, hq, kv, hd, e, g, s_max, *, programs, splits=0, block_t=None,
              attn_stages=None, cache_itemsize=2, eps=1e-5, rule="paper", gate="sigmoid",
              k_min=1, k_max=None, spin=SPIN, gemv_stages=STAGES, unit_stages=STAGES,
              ffn_units=None, skinny_bk=0, skinny_bk_c=None, skinny_tp=None, stagger=True,
              skinny_stage=False,
              skinny_rows=None,
              skinny_rows_c=None, router_stages=None, router_de=False, router_copies=None,
              prefetch_kb=PREFETCH_KB, prefetch_o_kb=PREFETCH_O_KB, bulk_prefetch=None,
              weight_itemsize=2, timing=0, interpret=False) -> dict:  # fmt: skip
    """The kernel's constexprs (also what the sm_90 lowering test compiles). The L2 prefetch
    at a barrier arrival (of the program's next QKV, and W_o, rows; the batch-1 step's measured
    defaults) is none under the interpreter (inline PTX)."""
    p = programs
    bt, ast = default_attention(False, s_max, hd, cache_itemsize)
    bt = block_t or bt
    s = splits or default_splits(max(1, p // t), kv, hq // kv, hd, s_max, bt)
    nqkv = (hq + 2 * kv) * hd
    r_a, r_c, r_z = (-(-n // p) for n in (nqkv, d, d))
    e_pad = max(16, jt.next_pow2(e))
    ws_lg = t * d
    w = weight_itemsize
    rows = _rows(skinny_rows, default_skinny(r_a))  # A's tile's least rows (64: wgmma)
    rows_c = _rows(skinny_rows_c, rows)  # C's (and the router share's)
    rs = ROUTER_STAGES if router_stages is None else router_stages
    rcp = ROUTER_COPIES if router_copies is None else router_copies
    pf_a = 0 if interpret else _pf_lines(prefetch_kb * 1024 // LINE, r_a, 0, d, w)
    pf_c = 0 if interpret else _pf_lines(prefetch_o_kb * 1024 // LINE, r_c, 0, hq * hd, w)
    bulk = default_bulk_prefetch(d) if bulk_prefetch is None else bool(bulk_prefetch)
    uf = default_ffn_units(e, g, p) if ffn_units is None else ffn_units
    bkf = _ffn_block(uf, w)
    return dict(
        UF=uf, BKF=bkf, CWF=min(256, 2 * bkf),
        BKS=skinny_bk or BK, BKC=skinny_bk_c or skinny_bk or BK, TPS=skinny_tp or MAX_TOKENS,
        STAGGER=int(bool(stagger)),
        SX=int(bool(skinny_stage)),
        KX=max(d, hq * hd), RS=rs, RDE=int(bool(router_de)), RCP=rcp,
        PF_A=pf_a, PF_C=pf_c, STEP_A=LINE // w, STEP_C=LINE // w, TIMING=int(timing),
        PFB=bulk and not interpret and (d * w) % 16 == 0 and (hq * hd * w) % 16 == 0,
        T=t, TP=MAX_TOKENS, L=n_layers, D=d, HQ=hq, KV=kv, HD=hd,
        GQ_PAD=jt.next_pow2(hq // kv), E=e, E_PAD=e_pad, G=g, BN=BN, P=p, S=s,
        S_PAD=jt.next_pow2(s), BT=bt, S_MAX=s_max, R_A=r_a, RA_PAD=max(rows, jt.next_pow2(r_a)),
        R_C=r_c, RC_PAD=max(rows_c, jt.next_pow2(r_c)), R_Z=r_z, RZ_PAD=jt.next_pow2(r_z),
        D_PAD=jt.next_pow2(d), BE=min(BE, e_pad),
        EPS=float(eps), NUCLEUS=rule == "nucleus",
        SIGMOID=gate == "sigmoid", K_MIN=k_min, K_MAX=e if k_max is None else k_max,
        SCALE=float(hd**-0.5), SPIN=spin, DOT_F32=bool(interpret),
        AST=int(ast if attn_stages is None else attn_stages), GS=gemv_stages, US=unit_stages,
        WS_LG=ws_lg, WS_CTR=ws_lg + n_layers * rcp * t * e,
    )  # fmt: skip


def workspace_size(c: dict) -> int:
    """Elements of the zeroed workspace: h, the logits, the barrier and split counters."""
    return c["WS_CTR"] + 1 + c["L"] * c["T"] * c["KV"]
