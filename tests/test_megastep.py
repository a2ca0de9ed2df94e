"""The one-launch decode step (``prunepath_jax.megastep``, ``kernels.triton_megastep``).

CPU: the whole step under the Triton interpreter (one program walks every phase's work items)
against the model's own XLA decode step -- logits, the experts chosen per layer, the key and
value written at the token's position and nothing else; the barrier guard; the sm_90 lowering
(barrier atomics, the timing stamps); clear errors. GPU: the real grid against XLA, and
generation through it token for token.
"""

import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close, interpreted_npz, sm90_compile

sys.path.insert(0, str(Path(__file__).parent))
from megastep_cases import BATCH_CASES, CASES, build  # noqa: E402

from prunepath_jax import megastep  # noqa: E402
from prunepath_jax.config import PRESETS  # noqa: E402
from prunepath_jax.generate import SamplingConfig, generate  # noqa: E402
from prunepath_jax.kernels import jt  # noqa: E402
from prunepath_jax.kernels import triton_megastep as tm  # noqa: E402
from prunepath_jax.kernels.synthetic import sparse_llama  # noqa: E402
from prunepath_jax.models.llama import LlamaModel  # noqa: E402

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    return interpreted_npz(tmp_path_factory, "megastep_interp_runner", timeout=900)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_interpreted_step_matches_the_xla_decode_step(interpreted, case):
    r = {k.split("/", 1)[1]: v for k, v in interpreted.items() if k.startswith(case.name + "/")}
    np.testing.assert_array_equal(r["k"], r["ref_k"], err_msg="experts per layer")
    assert not r["fail"].any()
    assert bool(r["old_kv_same"]), "the step wrote outside the token's cache row"
    if case.dtype == "float32":
        assert_close(r["logits"], r["ref_logits"], "model_fp32", case.name)
        assert_close(r["kv"], r["ref_kv"], "model_fp32", f"{case.name} cache row")
    else:  # fp32 residual inside the launch: held to the fp32 model at the bf16 tolerance
        assert_close(r["logits"], r["ref32_logits"], "bf16", case.name)
        assert_close(r["kv"], r["ref_kv"], "bf16", f"{case.name} cache row")


def test_interpreted_cases_cover_what_they_claim(interpreted):
    """Real sparsity somewhere, every expert where tau > 1, the nucleus clamp at k_max."""
    k = {c.name: interpreted[f"{c.name}/ref_k"] for c in CASES}
    assert (k["gqa2_f32"] < 16).all() and (k["first_token_all"] == 12).all()
    assert (k["gqa3_nucleus"] <= 5).all()


def test_a_grid_that_is_not_co_resident_is_flagged(interpreted):
    assert interpreted["guard/fail"].sum() > 0


def _signature(timing: bool):
    f32 = {"inv", "tau", "wr", "wm", "ws", "rope", "qkv", "po", "pml", "att", "out", "xs"}
    i32 = {"tok", "pos", "k", "fail", "tab"}
    names = ["x0", "tok", "inv", "pos", "tau", "ln1", "ln2", "wqkv", "wo", "wr", "wm", "w_in",
             "w_out", "hw", "nw", "kc_in", "vc_in", "ws", "kc", "vc", "rope", "qkv", "po", "pml",
             "att", "k", "fail", "tim", "tab", "out", "xs"]  # fmt: skip
    return {n: "*" + ("fp32" if n in f32 else "i32" if n in i32 else "i64" if n == "tim"
                      else "bf16") for n in names}  # fmt: skip


def _ca_copy_sizes(ptx: str) -> list[str]:
    """The byte counts of the PTX's ``cp.async.ca`` copies (L1-cached: only what the program
    itself wrote may be read that way)."""
    return [ln.split("], ")[2].split(",")[0] for ln in ptx.splitlines() if "cp.async.ca" in ln]


@pytest.mark.parametrize("timing,router_in_c", [(0, True), (1, False), (2, True)])
def test_lowers_for_sm90_with_gpu_scope_barriers(timing, router_in_c):
    """The Llama-3.2-1B layer shape over 132 programs compiles to a cubin whose barrier is a
    GPU-scope release add and acquire polls, which asks L2 for the next phase's weights while it
    waits; the timing stamps only when asked for (2: the clock reads with every store of them
    predicated). Both router placements compile, the second without the unit table."""
    const = tm.constants(2, 2048, 32, 8, 64, 256, 32, 512, programs=132, timing=timing,
                         router_in_c=router_in_c, unit_table=router_in_c,
                         qkv_cols=None if router_in_c else 0)  # fmt: skip
    warps = tm.default_warps(256) if router_in_c else 8  # the default (4 here), and 8
    ptx = sm90_compile(tm._megastep_kernel, _signature(timing), const, warps=warps, stages=1)
    ptx = ptx.asm["ptx"]
    assert "red.global.gpu.release.add" in ptx or "atom.global.gpu.release.add" in ptx
    assert "ld.global.gpu.acquire" in ptx or "atom.global.gpu.acquire" in ptx
    assert "atom.global.gpu.acq_rel.add" in ptx, "the last key split's counter"
    assert "ld.global.cg" in ptx, "data other programs wrote must be read from L2"
    assert ("%globaltimer" in ptx) == bool(timing)
    if timing == 2:  # each clock value's store sits behind its never-true predicate
        reads = [ln.split()[1].rstrip(",") for ln in ptx.splitlines() if "%globaltimer;" in ln]
        assert reads and all(re.search(rf"setp\.lt\.s64\s+%p\d+, {r}, 0;", ptx) for r in reads)
    assert "prefetch.global.L2" in ptx
    # The weight streams are Triton's cp.async pipelines (shared memory, not registers), and
    # every copy of what other programs wrote is .cg: nothing of theirs can sit stale in L1. The
    # only .ca copies read what the program itself wrote: its unit table (4 bytes a thread) and,
    # with the QKV GEMV in column chunks (the first case), its normed row's slices (8 bytes).
    assert "cp.async.wait_group" in ptx and "cp.async.cg" in ptx
    ca = _ca_copy_sizes(ptx)
    want = {"0x4"} if const["UT"] else set()
    assert set(ca) == (want | {"0x8"} if const["KS"] or const["KSC"] else want), set(ca)


@pytest.mark.parametrize("in_items", [False, True], ids=["router_in_a", "router_in_items"])
def test_merged_phase_lowers_for_sm90_and_is_the_measured_default(in_items):
    """The merged attention + O phase at the 1B shape compiles for sm_90: no split counter, the
    residual and the logits summed with relaxed atomics, its W_o blocks prefetched; by default
    it runs where measured faster (d <= 2048, a cache of <= 256 positions) with 64-key blocks.
    With the router's first term in the items, 2 of the 256 experts an item, none in phase A."""
    const = tm.constants(2, 2048, 32, 8, 64, 256, 32, 256, programs=132, merge_bc=True,
                         block_t=64, router_in_items=in_items)  # fmt: skip
    assert (const["NP"], const["RB"], const["RE"], const["R_B"]) == (16, 128, 16, 2)
    assert (const["RBA"], const["RBI"], const["HS"]) == (not in_items, in_items, 2048 * in_items)
    ptx = sm90_compile(tm._megastep_kernel, _signature(False), const, warps=4, stages=1)
    ptx = ptx.asm["ptx"]
    assert "atom.global.gpu.acq_rel.add" not in ptx, "no key splits to combine"
    assert "atom.global.gpu.relaxed.add.f32" in ptx or "red.global.gpu.relaxed.add.f32" in ptx
    assert "prefetch.global.L2" in ptx
    assert tm.default_merge(2048, 256) and not tm.default_merge(4096, 256)
    assert not tm.default_merge(2048, 512)


def test_small_tiles_at_the_1b_width_lower_for_sm90():
    """The 1B width takes 8 KB GEMV chunks by default (measured faster there; BENCHMARKS.md,
    twenty-sixth session): 2 QKV rows and 16 rows of a merged item's W_o block a chunk instead
    of 8 and 64, and the launch still compiles with its cp.async pipelines; the other widths keep
    32 KB."""
    assert [tm.default_tile_bytes(d) for d in (576, 2048, 4096)] == [32768, 8192, 32768]
    shape = (2, 2048, 32, 8, 64, 256, 32, 256)
    const = tm.constants(*shape, programs=132, merge_bc=True, block_t=64,
                         tile_bytes=tm.default_tile_bytes(2048))  # fmt: skip
    assert (const["BRC_A"], const["BRB"], const["BRC_C"]) == (2, 16, 2)
    ptx = sm90_compile(tm._megastep_kernel, _signature(False), const, warps=4, stages=1)
    assert "cp.async.cg" in ptx.asm["ptx"]


@pytest.mark.parametrize("d,q,kv,e", [(2048, 32, 8, 256), (4096, 32, 8, 448)], ids=["1b", "8b"])
def test_column_chunk_qkv_lowers_for_sm90(d, q, kv, e):
    """The QKV GEMV over column chunks (``qkv_cols``, the default above d 1024): every one of a
    program's rows (24 at 1B, 47 at 8B over 132 programs, padded to 32 / 64) × 256 columns a
    chunk, through the cp.async pipeline; the launch compiles at both widths. SmolLM2's width
    keeps chunks of full rows."""
    assert [tm.default_qkv_cols(w) for w in (576, 1024, 2048, 4096)] == [0, 0, 256, 256]
    shape = (2, d, q, kv, 128 if d == 4096 else 64, e, 32, 256)
    const = tm.constants(*shape, programs=132, merge_bc=d == 2048, block_t=64 if d == 2048 else 32,
                         tile_bytes=tm.default_tile_bytes(d))  # fmt: skip
    rows = -(-(q + 2 * kv) * shape[4] // 132)
    assert const["KS"] and const["RA_PAD"] == jt.next_pow2(rows) and const["BK_A"] == 256
    assert not tm.constants(*shape, programs=132, qkv_cols=0)["KS"]
    ptx = sm90_compile(tm._megastep_kernel, _signature(False), const,
                       warps=tm.default_warps(e), stages=1)  # fmt: skip
    assert "cp.async.cg" in ptx.asm["ptx"]


def test_column_chunk_o_gemv_lowers_for_sm90():
    """The O GEMV with its residual update over column chunks (``o_cols``) at the 8B width: 31
    rows a program (padded to 32) × 256 columns a chunk through the cp.async pipeline, the
    attention output staged in the program's scratch row as the QKV phase's normed row is, one
    scratch row wide enough for both inputs; off by default until measured. The only ``.ca``
    copies are 4 bytes a thread: the unit table's and, with 8 warps, both rows' 256-column
    slices (one float a thread) — nothing another program wrote."""
    shape = (2, 4096, 32, 8, 128, 448, 32, 256)
    const = tm.constants(*shape, programs=132, o_cols=256)
    assert const["KSC"] and const["RC_PAD"] == 32 and const["BK_C"] == 256
    assert const["XS_W"] == 4096 and not tm.constants(*shape, programs=132)["KSC"]
    assert tm.O_COLS == 0
    ptx = sm90_compile(tm._megastep_kernel, _signature(False), const, warps=8, stages=1)
    ptx = ptx.asm["ptx"]
    ca = _ca_copy_sizes(ptx)
    assert set(ca) == {"0x4"}, set(ca)


def test_bulk_prefetch_lowers_for_sm90():
    """``bulk_prefetch`` asks L2 for the GEMV blocks' lines as bulk copy-engine requests (thread 0
    only, 16 KB each, predicated off past the block) instead of one ``prefetch.global.L2`` a
    line: the 8B width compiles with them and without the line prefetches of those blocks; off
    by default above d 1024 (measured faster at 1B and 8B; SmolLM2's d 576 is not measured),
    and never under the interpreter (inline PTX)."""
    shape = (2, 4096, 32, 8, 128, 448, 32, 256)
    const = tm.constants(*shape, programs=132, bulk_prefetch=True, prefetch_o_kb=256)
    assert const["PFB"] and const["PF_C"] == 2048
    assert tm.constants(*shape, programs=132)["PFB"], "on by default at the 8B width"
    assert tm.default_bulk_prefetch(2048) and not tm.default_bulk_prefetch(576)
    assert not tm.constants(*shape, programs=132, bulk_prefetch=True, interpret=True)["PFB"]
    odd = tm.constants(2, 4100, 32, 8, 128, 448, 32, 256, programs=132, bulk_prefetch=True)
    assert not odd["PFB"], "rows of 8200 bytes: not 16-byte multiples"
    ptx = sm90_compile(tm._megastep_kernel, _signature(False), const, warps=8, stages=1)
    ptx = ptx.asm["ptx"]
    assert "cp.async.bulk.prefetch.L2.global" in ptx
    plain = sm90_compile(tm._megastep_kernel, _signature(False),
                         tm.constants(*shape, programs=132, bulk_prefetch=False), warps=8,
                         stages=1)  # fmt: skip
    assert "cp.async.bulk.prefetch" not in plain.asm["ptx"]


def test_census_compiles_the_launch_megastep_plans():
    """``scripts/megastep_census.py`` plans through ``megastep`` itself (its ``triton_call``
    caught under ``eval_shape``): at the 1B width the constexprs are the launch arithmetic's (8
    KB chunks: 2 QKV rows each; 32 KB: 8), the pointer types are the ones this file writes by
    hand, and the compiled kernel's report is filled in."""
    sys.path.insert(0, str(HERE.parent / "scripts"))
    import megastep_census

    cfg = PRESETS["llama-3.2-1b"]
    sig, const, warps = megastep_census.plan(cfg, megastep.Launch())
    assert (const["BRC_A"], const["P"], const["E"], warps) == (2, 132, 256, 4)
    assert list(sig.values()) == list(_signature(False).values())
    big = megastep_census.plan(cfg, megastep.Launch(tile_bytes=32768))[1]
    assert big["BRC_A"] == 8 and {k: v for k, v in big.items() if k != "BRC_A"} != const
    with pytest.raises(ValueError, match="tile_bytes"):  # megastep's own checks run
        megastep_census.plan(cfg, megastep.Launch(tile_bytes=-1))
    row = megastep_census.census(cfg, megastep.Launch())
    assert 64 <= row["registers"] <= 255 and row["shared_bytes"] > 0
    assert row["BAR"] > 0 and row["SHFL"] > 0 and row["ptx_prefetch"] > 0


def test_head_phase_lowers_for_sm90():
    """The launch that ends with the final norm and the LM head (the 1B shape, 128256 rows over
    132 programs: 972 a program, 8 a chunk) compiles for sm_90 with one more grid barrier, its
    rows through a cp.async pipeline of ``HEAD_STAGES`` and their first lines prefetched."""
    shape = (2, 2048, 32, 8, 64, 256, 32, 256)
    const = tm.constants(*shape, programs=132, merge_bc=True, block_t=64, vocab=128256)
    assert (const["HI"], const["R_H"], const["BRC_H"], const["HST"]) == (True, 972, 8, 4)
    assert const["PF_H"] == 512  # 64 KB of the program's rows past the first chunk
    off = tm.constants(*shape, programs=132, merge_bc=True, block_t=64)
    ptx = [sm90_compile(tm._megastep_kernel, _signature(False), c, warps=4, stages=1).asm["ptx"]
           for c in (off, const)]  # fmt: skip
    acquire = [p.count("ld.global.gpu.acquire") + p.count("atom.global.gpu.acquire") for p in ptx]
    assert acquire[1] > acquire[0], acquire  # the head's barrier
    assert ptx[1].count("cp.async.cg") > ptx[0].count("cp.async.cg")
    # The rows' L2 prefetch: per line, or bulk requests at this width (default_bulk_prefetch).
    pf = [p.count("prefetch.global.L2") + p.count("cp.async.bulk.prefetch.L2") for p in ptx]
    assert pf[1] > pf[0], pf


def test_attention_stages_pipeline_the_key_blocks_for_sm90():
    """``attn_stages`` > 1 turns the attention items' key/value loads into cp.async copies (more
    of them than in the plain loop); 1 is the plain loop the measurements were taken with."""
    shape = (2, 2048, 32, 8, 64, 256, 32, 512)
    counts = []
    for st in (1, 3):
        const = tm.constants(*shape, programs=132, attn_stages=st)
        ptx = sm90_compile(tm._megastep_kernel, _signature(False), const, warps=4, stages=1)
        counts.append(ptx.asm["ptx"].count("cp.async.cg"))
    assert counts[1] > counts[0], counts


def test_long_caches_and_wide_heads_pipeline_the_key_blocks_by_default():
    """Above ``LONG_CACHE`` positions, or with 128-dim heads at any length, the split phases'
    items read 64-key blocks through 3 cp.async stages (measured 8% / 38% faster at 8B with 4352
    / 32256 positions, 1-4% at 256-768; slower with the 1B's 64-dim heads below 1024 positions;
    BENCHMARKS.md, twenty-ninth and thirtieth sessions); from ``XLONG_CACHE`` positions on, 16 KB
    blocks (64-dim bf16 heads: 128 keys, 2-6% faster at 16k and 32k; fp32 caches and 128-dim
    heads: 64; thirty-first session); the merged phase and short caches of narrow heads keep
    the plain loop they were measured with, and a launch's own values win. Planned through
    ``megastep`` itself."""
    sys.path.insert(0, str(HERE.parent / "scripts"))
    import megastep_census

    assert tm.LONG_CACHE == 1024 and tm.WIDE_HEAD == 128
    assert tm.default_attention(False, tm.LONG_CACHE, 64) == (tm.BLOCK_T, tm.ATTN_STAGES)
    assert (tm.BLOCK_T, tm.ATTN_STAGES) == (32, 1)
    assert tm.default_attention(False, tm.LONG_CACHE + 1, 64) == (64, 3)
    assert tm.default_attention(False, 256, 128) == (64, 3)
    assert tm.default_attention(True, 4096, 128) == (tm.MERGE_BLOCK_T, 1)

    def attn(cfg, launch, s_max):
        const = megastep_census.plan(cfg, launch, s_max)[1]
        return const["MBC"], const["BT"], const["AST"]

    eight_b, one_b = PRESETS["llama-3-8b"], PRESETS["llama-3.2-1b"]
    assert attn(eight_b, megastep.Launch(), 256) == (False, 64, 3)
    assert attn(eight_b, megastep.Launch(), 4352) == (False, 64, 3)
    assert attn(eight_b, megastep.Launch(block_t=32, attn_stages=1), 4352) == (False, 32, 1)
    assert attn(eight_b, megastep.Launch(attn_stages=2), 1024) == (False, 64, 2)
    assert attn(one_b, megastep.Launch(), 256) == (True, 64, 1)
    assert attn(one_b, megastep.Launch(), 512) == (False, 32, 1)
    assert attn(one_b, megastep.Launch(), 1024) == (False, 32, 1)
    assert attn(one_b, megastep.Launch(), 4352) == (False, 64, 3)
    assert tm.XLONG_CACHE == 16384
    assert attn(one_b, megastep.Launch(), 16384 - 256) == (False, 64, 3)
    assert attn(one_b, megastep.Launch(), 16384) == (False, 128, 3)
    assert attn(PRESETS["smollm2-135m"], megastep.Launch(), 32256) == (False, 128, 3)
    assert attn(eight_b, megastep.Launch(), 32256) == (False, 64, 3)
    assert attn(one_b, megastep.Launch(block_t=64), 32256) == (False, 64, 3)
    f32 = megastep_census.plan(one_b, megastep.Launch(), 32256, dtype=jnp.float32)[1]
    assert (f32["BT"], f32["AST"]) == (64, 3), "16 KB blocks: 64 keys of fp32"
    assert tm.default_attention(False, 16384, 32) == (tm.XLONG_BLOCK_T, 3), "at most 128 keys"


def test_bad_inputs_raise_clearly():
    c = CASES[0]
    model, args, cache, tok, pos = build(c)
    mw = megastep.pack(model)
    kc, vc = megastep.stack_cache(cache)
    emb, inv = model.embed_tokens.embedding[...], jnp.zeros((c.head_dim // 2,))
    lw = mw.layers()
    tau = jnp.full((c.layers,), 0.5)

    def call(*layers, tau=tau, x0=emb, **kw):
        return tm.megastep(x0, tok, inv, pos, tau, *(layers or lw), kc, vc, eps=1e-5, **kw)

    with pytest.raises(ValueError, match="shapes do not fit"):
        call(mw.ln1[:, :-1], *lw[1:])
    with pytest.raises(ValueError, match="shapes do not fit"):
        call(tau=tau[:1])
    with pytest.raises(ValueError, match="shapes do not fit"):
        call(x0=emb[:, :-1])
    with pytest.raises(ValueError, match="shapes do not fit"):
        call(x0=emb[0])
    with pytest.raises(ValueError, match="needs the LM head"):
        call(head_in=True)
    with pytest.raises(ValueError, match="shapes do not fit"):
        call(head_in=True, head_vd=emb[:, :-1], norm_d=model.norm.weight[...])
    with pytest.raises(ValueError, match="needs the head's rows"):
        megastep.step(model, mw, tok[None], pos[None], kc, vc, tau, megastep.Launch(head_in=True))
    with pytest.raises(ValueError, match="stamps must be 0, 1 or 2"):
        megastep.step(model, mw, tok[None], pos[None], kc, vc, tau, megastep.Launch(stamps=3))
    with pytest.raises(ValueError, match="k_min"):
        call(k_min=3, k_max=2)
    with pytest.raises(ValueError, match="programs"):
        call(programs=-1)
    with pytest.raises(ValueError, match="warps"):
        call(warps=6)
    with pytest.raises(ValueError, match="tile_bytes"):
        call(tile_bytes=-1)
    for cols in (-16, 8, 48):
        with pytest.raises(ValueError, match="qkv_cols"):
            call(qkv_cols=cols)
        with pytest.raises(ValueError, match=f"o_cols={cols}"):
            call(o_cols=cols)
    assert (tm.default_warps(256), tm.default_warps(448)) == (4, 8)  # BENCHMARKS, 21st session
    with pytest.raises(ValueError, match="16 keys"):
        call(block_t=8)
    with pytest.raises(ValueError, match="stages"):
        call(unit_stages=0)
    with pytest.raises(ValueError, match="stages"):
        call(attn_stages=0)
    with pytest.raises(ValueError, match="stages"):
        call(head_stages=0)
    with pytest.raises(ValueError, match="prefetch sizes"):
        call(prefetch_keys=-1)
    with pytest.raises(ValueError, match="merge_bc"):
        call(merge_bc=False, router_in_items=True)
    many = jax.tree.map(lambda a: jnp.concatenate([a] * 17), cache)
    with pytest.raises(ValueError, match="1-16 sequences, got 17"):
        megastep.stack_cache(many)
    small = PRESETS["smollm2-135m"].replace(n_layers=1)
    with pytest.raises(ValueError, match="PrunePath"):
        megastep.check(LlamaModel(small, rngs=nnx.Rngs(0)))
    biased = sparse_llama(small.replace(qkv_bias=True), 1, dtype=jnp.float32)
    with pytest.raises(ValueError, match="biases"):
        megastep.check(biased)
    with pytest.raises(ValueError, match="multiple of 16"):  # G = 8: the batched launch's units
        generate(model, [[1, 2], [3]], 4, tau=0.5, implementation="megastep")
    if not jt.available():
        with pytest.raises(NotImplementedError, match="CUDA GPU"):
            generate(model, [[1, 2]], 4, tau=0.5, implementation="megastep")
    st = megastep.MegaState(*(jnp.zeros(1),) * 6, fail=jnp.int32(3))
    with pytest.raises(RuntimeError, match="gave up"):
        megastep.check_fail(st)
    odd = sparse_llama(small.replace(head_dim=48, d_model=432), 1, dtype=jnp.float32)
    with pytest.raises(ValueError, match="power-of-2 head_dim"):
        megastep.check(odd)


def test_auto_takes_the_one_launch_step_only_where_it_runs_and_fits(monkeypatch):
    """generate's "auto" decision: one prompt, a budget, a GPU with jax-triton, a measured cache
    length, the stacked copies within the memory share; every refusal says why."""
    model = build(CASES[0])[0]
    args = [0.5]
    assert "GPU" in megastep.auto_ok(model, 1, args, 64) or jt.available()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jt, "jax_triton_module", lambda: None)
    need = megastep.packed_bytes(model, 64)
    mw = megastep.pack(model)
    assert mw.head is None  # untied: no copy of the LM head unless asked for
    packed = sum(a.nbytes for a in mw.layers())
    assert need - packed == 2 * 2 * 64 * 2 * 16 * 4  # the stacked cache: k and v, fp32
    head = model.lm_head.kernel[...].nbytes  # untied: pack's transposed copy
    assert megastep.packed_bytes(model, 64, head=True) == need + head
    assert megastep.pack(model, head=True).head.shape == (50, CASES[0].d)
    assert megastep._free_bytes(jax.tree.leaves(nnx.state(model))) >= 0  # CPU: no figures
    monkeypatch.setattr(megastep, "_free_bytes", lambda leaves: 4 * need)
    assert megastep.auto_ok(model, 1, args, 64) is None
    assert "one prompt" in megastep.auto_ok(model, megastep.MAX_BATCH + 1, args, 64)
    assert "budget" in megastep.auto_ok(model, 1, None, 64)
    long = megastep.AUTO_MAX_CACHE + 64
    assert "cache" in megastep.auto_ok(model, 1, args, long)
    assert "float16" in megastep.auto_ok(model, 1, args, 64, jnp.float16)
    half = sparse_llama(PRESETS["smollm2-135m"].replace(n_layers=1), 1, dtype=jnp.float16)
    assert "float16" in megastep.auto_ok(half, 1, args, 64)  # the cache follows the weights
    assert megastep.auto_ok(model, 1, args, 64, jnp.bfloat16) is None
    monkeypatch.setattr(megastep, "_free_bytes", lambda leaves: need)  # over the share
    assert "GiB" in megastep.auto_ok(model, 1, args, 64)
    dense = LlamaModel(PRESETS["smollm2-135m"].replace(n_layers=1), rngs=nnx.Rngs(0))
    assert "PrunePath" in megastep.auto_ok(dense, 1, args, 64)
    mesh = jax.sharding.Mesh(np.array(jax.devices("cpu")[:2]), ("model",))  # conftest: 8
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    nnx.update(model, jax.device_put(nnx.state(model), spec))
    assert "one device" in megastep.auto_ok(model, 1, args, 64)


def test_auto_takes_the_batched_launch_for_its_measured_batches_and_caches(monkeypatch):
    """generate's "auto" with several prompts: the batched launch for ``AUTO_BATCH_MIN``-16
    prompts (a group size it runs) at any width, up to ``AUTO_MAX_CACHE_BATCH`` positions, with
    every sequence's stacked cache counted against the free memory; every refusal says why."""
    model = build(BATCH_CASES[0].case)[0]
    args = [0.5]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jt, "jax_triton_module", lambda: None)
    cfg = model.cfg
    lo, hi = megastep.AUTO_BATCH_MIN, megastep.MAX_BATCH
    need = megastep.packed_bytes(model, 64, batch=hi)
    per_seq = 2 * cfg.n_layers * 64 * cfg.n_kv_heads * cfg.head_dim * 4  # k and v, fp32
    de = 4 * sum(int(np.prod(b.mlp.router.shape)) for b in model.layers)  # router_de, f32
    assert need - megastep.packed_bytes(model, 64) == (hi - 1) * per_seq + de
    assert megastep.packed_bytes(model, 64, batch=lo) == need - (hi - lo) * per_seq
    monkeypatch.setattr(megastep, "_free_bytes", lambda leaves: 2 * need)
    assert megastep.auto_ok(model, lo, args, 64) is None
    assert megastep.auto_ok(model, hi, args, 64) is None
    assert megastep.auto_ok(model, 1, args, 64) is None
    assert f"{lo}-{hi} prompts" in megastep.auto_ok(model, hi + 1, args, 64)
    long = megastep.AUTO_MAX_CACHE_BATCH + 64
    assert "positions (measured)" in megastep.auto_ok(model, lo, args, long)
    assert "GiB" in megastep.auto_ok(model, hi, args, 64 * 3)  # 3× the cache: over the share
    odd = build(CASES[0])[0]  # 8-neuron experts: not the batched launch's 16-neuron units
    assert odd.cfg.prunepath.group_size % 16
    assert "multiple of 16" in megastep.auto_ok(odd, lo, args, 64)


def _gpu_step_vs_xla(cfg, launch, prompt: int = 40, cache_len: int = 128):
    """One decode step of a tau-0.5 fp32 model of ``cfg``'s shape through the real grid (one
    program per SM) after a ``prompt``-token prefill against the model's XLA decode step: the
    same k per layer, logits within the fp32 tolerance."""
    from prunepath_jax.models.layers import init_cache
    from prunepath_jax.nn import route_args

    model = sparse_llama(cfg, None, dtype=jnp.float32, seed=3)
    args = route_args(model.cfg, 0.5)
    with jax.default_matmul_precision("highest"):
        rng = np.random.default_rng(0)
        toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, prompt)), jnp.int32)
        # jitted: an eager prefill of 1100 tokens runs op by op
        prefill = nnx.jit(lambda m, t, c: m(t, cache=c, ffn_args=args, fresh_cache=True).cache)
        cache = prefill(model, toks, init_cache(model.cfg, 1, cache_len, jnp.float32))
        tok, pos = jnp.int32(7), jnp.int32(prompt)
        ref = model(tok[None, None], pos[None, None], cache=cache, ffn_args=args)
        kc, vc = megastep.stack_cache(cache)
        tau = jnp.stack([a.tau for a in args])
        # The model's arrays as arguments, not a static model: XLA would fold them into the
        # program as constants (a 4 GB HLO at two layers of the 8B width, minutes to compile).
        gd, st = nnx.split(model)
        step = jax.jit(lambda st, *a: megastep.step(nnx.merge(gd, st), *a, launch))
        lg, kc, vc, k_l, fail = step(st, megastep.pack(model), tok[None], pos[None], kc, vc, tau)
    assert not np.asarray(fail).any()
    k_ref = np.array([int(s.k_t.reshape(-1)[0]) for s in ref.ffn_stats])
    np.testing.assert_array_equal(np.asarray(k_l), k_ref)
    assert 1 < k_ref.mean() < 0.9 * model.cfg.n_experts, "tau 0.5 should leave real sparsity"
    assert_close(lg[0], ref.logits[0, 0], "model_fp32", "logits")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "merge_bc,head_in", [(False, False), (True, False), (True, True)],
    ids=["split", "merged", "merged_head"],
)  # fmt: skip
def test_gpu_step_matches_xla_at_the_smollm2_shape(merge_bc, head_in):
    """The whole SmolLM2 shape; with the attention and O projection as one phase too (44 row
    parts a KV head, the last two empty), and with the final norm and the LM head inside the
    launch (372 of the 49152 rows a program)."""
    _gpu_step_vs_xla(PRESETS["smollm2-135m"], megastep.Launch(merge_bc=merge_bc, head_in=head_in))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "launch", [{}, {"qkv_cols": 0}, {"tile_bytes": 32768, "qkv_cols": 0}],
    ids=["default", "row_chunks_8k", "row_chunks_32k"],
)  # fmt: skip
def test_gpu_step_matches_xla_at_the_1b_width(launch):
    """Two layers of the Llama-3.2-1B shape (d 2048, f 8192, 8 KV heads, 128k vocabulary):
    the default launch (8 KB GEMV chunks, the QKV GEMV in 256-column chunks), and the QKV
    GEMV in chunks of full rows of 8 KB and 32 KB."""
    assert tm.default_tile_bytes(2048) == 8192
    cfg = PRESETS["llama-3.2-1b"].replace(n_layers=2)
    _gpu_step_vs_xla(cfg, megastep.Launch(**launch))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "launch", [{}, {"o_cols": 256}, {"bulk_prefetch": True, "prefetch_o_kb": 256}],
    ids=["default", "o_cols_256", "bulk_prefetch"],
)  # fmt: skip
def test_gpu_step_matches_xla_at_the_8b_width(launch):
    """Two layers of the Llama-3-8B shape (d 4096, 128-dim heads, 448 experts, 8 warps) at a
    short cache: the split phases with the 128-dim-head default (64-key blocks through 3
    cp.async stages), the QKV GEMV in 256-column chunks; the O GEMV in column chunks too; and
    the GEMV blocks' L2 prefetch as bulk requests (the whole W_o block)."""
    assert tm.default_attention(False, 128, 128) == (64, 3)
    cfg = PRESETS["llama-3-8b"].replace(n_layers=2)
    _gpu_step_vs_xla(cfg, megastep.Launch(**launch))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["smollm2-135m", "llama-3.2-1b"])
def test_gpu_step_matches_xla_at_a_long_cache(shape):
    """Past ``LONG_CACHE`` positions (a 1100-token prompt in a 1280-position cache): the split
    phases with the long-cache default, 64-key blocks through 3 cp.async stages (8 splits a KV
    head of three blocks each: the sixth one partial, the last two empty but for the new
    token's own key in the last)."""
    cfg = PRESETS[shape]
    if shape != "smollm2-135m":
        cfg = cfg.replace(n_layers=2)
    assert tm.default_attention(False, 1280, 64) == (64, 3)
    _gpu_step_vs_xla(cfg, megastep.Launch(), prompt=1100, cache_len=1280)


@pytest.mark.gpu
def test_gpu_step_matches_xla_with_128_key_blocks():
    """The SmolLM2 shape through 128-key blocks in 3 stages, the default from ``XLONG_CACHE``
    positions with 64-dim bf16 heads (an XLA prefill that long does not fit the test, so the
    blocks are checked at 1280 positions)."""
    cfg = PRESETS["smollm2-135m"]
    launch = megastep.Launch(block_t=128, attn_stages=3)
    _gpu_step_vs_xla(cfg, launch, prompt=1100, cache_len=1280)


@pytest.mark.gpu
def test_gpu_generation_equals_xla_tokens():
    """Greedy and sampled generation through the one-launch step: exactly XLA's tokens (fp32,
    tau 0.5; see test_kernels_api's fp32 generation test for why fp32)."""
    model = sparse_llama(PRESETS["smollm2-135m"], None, dtype=jnp.float32, seed=3)
    prompt = [list(np.random.default_rng(5).integers(0, 49152, 9))]
    with jax.default_matmul_precision("highest"):
        for kw in ({}, {"sampling": SamplingConfig(temperature=1.0, seed=1)}):
            ref = generate(model, prompt, 24, tau=0.5, implementation="xla", **kw)
            out = generate(model, prompt, 24, tau=0.5, implementation="megastep", **kw)
            assert out == ref, f"{kw}: {out} vs {ref}"
    assert len(set(ref[0])) > 4, f"the sampled sequence should vary, got {ref[0]}"
