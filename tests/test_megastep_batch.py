"""The batched one-launch decode step (``kernels.triton_megastep_batch``, 2-16 sequences).

CPU: the whole step under the Triton interpreter (one program walks every phase's work items)
through ``megastep.step`` against the model's own XLA decode step -- logits, the experts each
token chose per layer, the keys and values written at each sequence's own position and nothing
else; the sm_90 lowering at the 1B and 8B widths; clear errors. GPU: the real grid against XLA,
and generation through it token for token.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, interpreted_npz, sm90_compile

sys.path.insert(0, str(Path(__file__).parent))
from megastep_cases import BATCH_CASES, CASES, build, build_batch  # noqa: E402

from prunepath_jax import megastep  # noqa: E402
from prunepath_jax.config import PRESETS  # noqa: E402
from prunepath_jax.generate import SamplingConfig, generate  # noqa: E402
from prunepath_jax.kernels import jt  # noqa: E402
from prunepath_jax.kernels import triton_batch_plan as bp  # noqa: E402
from prunepath_jax.kernels import triton_megastep_batch as tb  # noqa: E402

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    return interpreted_npz(tmp_path_factory, "megastep_batch_runner", timeout=900)


def _case(interpreted, name):
    return {k.split("/", 1)[1]: v for k, v in interpreted.items() if k.startswith(name + "/")}


@pytest.mark.parametrize("case", BATCH_CASES, ids=[c.name for c in BATCH_CASES])
def test_interpreted_batch_step_matches_the_xla_decode_step(interpreted, case):
    r = _case(interpreted, case.name)
    np.testing.assert_array_equal(r["k"], r["ref_k"], err_msg="experts per layer and token")
    assert not r["fail"].any()
    assert bool(r["old_kv_same"]), "the step wrote outside the sequences' own cache rows"
    if case.case.dtype == "float32":
        assert_close(r["logits"], r["ref_logits"], "model_fp32", case.name)
        assert_close(r["kv"], r["ref_kv"], "model_fp32", f"{case.name} cache rows")
    else:  # fp32 residual inside the launch: held to the fp32 model at the bf16 tolerance
        assert_close(r["logits"], r["ref32_logits"], "bf16", case.name)
        assert_close(r["kv"], r["ref_kv"], "bf16", f"{case.name} cache rows")


def test_interpreted_batch_cases_cover_what_they_claim(interpreted):
    """Different k across a batch, every expert where tau > 1, the nucleus clamp at k_max, and
    a layer where the tokens' experts together leave some out (their units skipped)."""
    k = {c.name: _case(interpreted, c.name)["ref_k"] for c in BATCH_CASES}
    assert len(np.unique(k["b3_f32"])) > 1
    assert (k["b16_all"] == 256 // 32).all() and k["b16_all"].shape == (2, 16)
    assert (k["b2_bf16_nucleus"] <= 5).all()
    assert (k["b4_sparse"].sum(axis=1) < 512 // 16).all()


@pytest.mark.parametrize(
    "t,shape,timing,kw",
    [(4, "llama-3.2-1b", False, {}), (16, "llama-3.2-1b", True, {}), (8, "llama-3-8b", False, {}),
     (8, "llama-3-8b", False, {"ffn_units": 2}), (16, "llama-3-8b", False, {"skinny_stage": True}),
     (4, "llama-3.2-1b", False, {"skinny_stage": True, "skinny_rows": 64, "router_stages": 3}),
     (4, "llama-3.2-1b", False, {"skinny_rows_c": 0}),
     (8, "llama-3-8b", False, {"router_stages": 1}),
     (16, "llama-3.2-1b", False, {"router_de": False}),
     (16, "llama-3-8b", False, {"router_copies": 8}),
     (4, "llama-3.2-1b", False, {"skinny_bk_c": 256}),
     (16, "llama-3.2-1b", False, {"skinny_tp": 32})],
    ids=["1b_t4", "1b_t16_stamps", "8b_t8", "8b_t8_units2", "8b_t16_staged",
         "1b_t4_staged_rows64_rs3", "1b_t4_c16", "8b_t8_rs1", "1b_t16_router_ed",
         "8b_t16_rcp8", "1b_t4_bkc256", "1b_t16_tp32"],
)  # fmt: skip
def test_batch_step_lowers_for_sm90(t, shape, timing, kw):
    """The 1B and 8B models' launches over 132 programs, planned by ``megastep.step`` itself
    (``scripts/megastep_census.plan``: the exact pointer types and constexprs a call makes),
    compile for sm_90: tensor-core products (bf16 weights), grid barriers at GPU scope, what
    other programs wrote read from L2, the weight and unit loops as cp.async pipelines; the
    phase stamps only with ``timing``. (Registers: 255 a thread at 8 warps with 12-228 bytes of
    spills with triton 3.6; BENCHMARKS.md, thirty-ninth and forty-second sessions.)"""
    sys.path.insert(0, str(HERE.parent / "scripts"))
    import megastep_census

    cfg = PRESETS[shape]
    launch = megastep.Launch(**kw)
    ffn_units, stage, rows = kw.get("ffn_units"), kw.get("skinny_stage"), kw.get("skinny_rows")
    sig, c, warps = megastep_census.plan(cfg, launch, 512, batch=t, timing=timing)
    ck = sm90_compile(tb._batch_kernel, sig, c, warps=warps, stages=1)
    ptx = ck.asm["ptx"]
    assert "mma.sync" in ptx or "wgmma" in ptx
    assert "red.global.gpu.release.add" in ptx or "atom.global.gpu.release.add" in ptx
    assert "ld.global.gpu.acquire" in ptx or "atom.global.gpu.acquire" in ptx
    assert "ld.global.cg" in ptx or "cp.async.cg" in ptx
    assert "cp.async.wait_group" in ptx
    assert "cp.async.bulk.prefetch.L2" in ptx, "the next block's rows asked of L2 (d > 1024)"
    assert ck.metadata.num_warps == 8  # (shared memory: compile_sm90 checks the sm_90 limit)
    assert ("%globaltimer" in ptx) == bool(timing), "the phase stamps only when asked for"
    # The expert phase by default: a program's share of all of E's units in one group (1B: 512
    # units, 8B: 896, over 132 programs); tiles of 16 KB bf16 either way.
    units = cfg.d_ff // bp.BN
    assert c["UF"] == (ffn_units or min(8, jt.next_pow2(-(-units // 132))))
    assert c["UF"] * bp.BN * c["BKF"] * 2 == bp.FFN_TILE_BYTES
    assert c["CWF"] == min(256, 2 * c["BKF"])
    # Staged A / C inputs: each program's scratch as wide as the widest input (d or the heads').
    assert (c["SX"], c["KX"]) == (int(bool(stage)), max(cfg.d_model, cfg.n_heads * cfg.head_dim))
    # A / C tiles by the shape unless asked (1B: A's tile 32 rows, so 64; 8B: A's tile 64 rows
    # already, so 16); the router share in 3 pipeline stages at both unless asked.
    want_rows, want_rs = (64, 3) if shape == "llama-3.2-1b" else (16, 3)
    rows = want_rows if rows is None else rows
    rows_c = rows if kw.get("skinny_rows_c") is None else kw["skinny_rows_c"] or 16
    natural = {"llama-3.2-1b": (32, 16), "llama-3-8b": (64, 32)}[shape]  # A / C rows, pow 2
    assert (c["RA_PAD"], c["RC_PAD"]) == (max(rows, natural[0]), max(rows_c, natural[1]))
    if rows == 64:
        assert "wgmma" in ptx, "64-row A / C tiles on wgmma"
    assert c["RS"] == kw.get("router_stages", want_rs), "the router share's pipeline stages"
    # The router share reads the routers' [L, d, E] copy unless asked not to (the census packs
    # it, as generate does for 2+ sequences), into one copy of the logits unless asked.
    assert c["RDE"] == int(kw.get("router_de") is not False), "the router share's layout"
    assert c["RCP"] == kw.get("router_copies", bp.ROUTER_COPIES), "copies of the logits"
    assert (c["BKS"], c["BKC"]) == (bp.BK, kw.get("skinny_bk_c", bp.BK)), "A / C chunks"
    # A / C's token columns: at 16 the two warpgroups of 8 warps split them (wgmma m64n8), at 32
    # each takes 16 (m64n16). (At 1B the expert phase's 64-row blocks are m64n8 either way, at
    # 8B its 128-row blocks m64n16.)
    assert c["TPS"] == kw.get("skinny_tp", bp.MAX_TOKENS)
    if shape == "llama-3.2-1b" and rows == 64:
        assert ("m64n16k16" in ptx) == (c["TPS"] == 32), "the A / C products' wgmma shape"
    assert c["WS_CTR"] - c["WS_LG"] == c["L"] * c["RCP"] * t * c["E"]


def test_batch_bad_inputs_raise_clearly():
    c = BATCH_CASES[0]
    model, args, cache, tok_b, pos_b = build_batch(c)
    mw = megastep.pack(model)
    kc, vc = megastep.stack_cache(cache)
    m = c.case
    assert kc.shape == (m.layers, 3, m.cache_len, m.kv, m.head_dim)
    tau = jnp.full((m.layers,), 0.5)
    emb, inv = model.embed_tokens.embedding[...], jnp.zeros((m.head_dim // 2,))

    def call(tokens=tok_b, pos=pos_b, tau=tau, **kw):
        return tb.megastep_batch(emb, tokens, inv, pos, tau, mw.ln1, mw.ln2, mw.wqkv, mw.wo,
                                 mw.router, mw.w_in, mw.w_out, kc, vc, eps=1e-5,
                                 **kw)  # fmt: skip

    with pytest.raises(ValueError, match="tokens_t has shape"):
        call(tokens=tok_b[:2])
    with pytest.raises(ValueError, match="pos_t has shape"):
        call(pos=pos_b[None])
    with pytest.raises(ValueError, match="tau_l has shape"):
        call(tau=tau[:1])
    with pytest.raises(ValueError, match="k_min"):
        call(k_min=3, k_max=2)
    for bad in ({"prefetch_kb": -8}, {"warps": 6}, {"block_t": 8}, {"unit_stages": 0},
                {"ffn_units": 0}, {"ffn_units": 3}, {"ffn_units": 16},
                {"skinny_bk": 48}, {"skinny_rows": 48}, {"skinny_rows_c": 8}, {"router_stages": 0},
                {"router_stages": 7}, {"router_copies": 3}, {"router_copies": 64},
                {"skinny_bk_c": 48}, {"skinny_tp": 24}):  # fmt: skip
        with pytest.raises(ValueError, match="megastep_batch: need"):
            call(**bad)
    with pytest.raises(ValueError, match="1-16 sequences"):
        bp.check(17, 64, 16, 16)
    with pytest.raises(ValueError, match="multiple of 16"):
        bp.check(2, 64, 16, 24)
    with pytest.raises(ValueError, match="takes only Launch"):
        megastep.step(model, mw, tok_b, pos_b, kc, vc, tau, megastep.Launch(merge_bc=True))
    # The routers' [L, d, E] copy: asked for without it, or the other layout passed as it.
    with pytest.raises(ValueError, match=r"pack\(model, router_de=True\)"):
        megastep.step(model, mw, tok_b, pos_b, kc, vc, tau, megastep.Launch(router_de=True))
    with pytest.raises(ValueError, match="router has shape"):
        call(router_de=True)
    mw_de = megastep.pack(model, router_de=True)
    de = mw_de.router_de
    assert de.shape == (m.layers, m.d, mw.router.shape[1]) and de.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(de), np.asarray(mw.router).transpose(0, 2, 1))
    small, _, cache1, tok1, pos1 = build(CASES[0])  # G = 8: no 16-neuron units
    with pytest.raises(ValueError, match="multiple of 16"):
        megastep.check(small, 2)
    megastep.check(small, 1)  # the batch-1 launch takes it, but not the batched one's fields
    kc1, vc1 = megastep.stack_cache(cache1)
    tau1 = jnp.full((CASES[0].layers,), 0.5)
    for field, v in (("ffn_units", 2), ("skinny_bk", 64), ("stagger", False),
                     ("skinny_stage", True), ("skinny_rows", 64), ("skinny_rows_c", 64),
                     ("router_stages", 3), ("router_de", True), ("router_copies", 2),
                     ("skinny_bk_c", 256), ("skinny_tp", 32)):  # fmt: skip
        with pytest.raises(ValueError, match=f"{field} is the batched launch's"):
            megastep.step(small, megastep.pack(small), tok1[None], pos1[None], kc1, vc1, tau1,
                          megastep.Launch(**{field: v}))  # fmt: skip


def test_batch_step_reads_the_router_copy_where_packed(monkeypatch):
    """``Launch.router_de`` None takes the routers' ``[L, d, E]`` copy exactly when the packed
    weights carry it (what ``generate`` packs for 2+ sequences); False keeps ``[L, E, d]``."""
    c = BATCH_CASES[0]
    model, _, cache, tok_b, pos_b = build_batch(c)
    kc, vc = megastep.stack_cache(cache)
    tau = jnp.full((c.case.layers,), 0.5)
    seen = []

    def fake(*args, **kw):  # the launch's router argument and layout flag, then stop
        seen.append((args[9], kw["router_de"]))
        raise RuntimeError("stop")

    monkeypatch.setattr(tb, "megastep_batch", fake)
    plain, de = megastep.pack(model), megastep.pack(model, router_de=True)
    for mw, launch, want_de in ((plain, megastep.Launch(), False), (de, megastep.Launch(), True),
                                (de, megastep.Launch(router_de=False), False)):  # fmt: skip
        with pytest.raises(RuntimeError, match="stop"):
            megastep.step(model, mw, tok_b, pos_b, kc, vc, tau, launch)
        router, flag = seen.pop()
        assert flag is want_de
        assert router is (mw.router_de if want_de else mw.router)


@pytest.mark.gpu
@pytest.mark.skipif(not jt.available(), reason="needs a CUDA GPU with jax-triton")
@pytest.mark.parametrize("case", BATCH_CASES, ids=[c.name for c in BATCH_CASES])
def test_gpu_batch_step_matches_xla(case):
    """The real grid (one program per SM, every phase's barriers) on the interpreter's cases.
    The XLA reference at "highest" precision, as the batch-1 step's GPU tests: by default XLA's
    fp32 products on the H200 are TF32, ~1e-3 off (the first run of this test, fortieth
    session, compared against those)."""
    with jax.default_matmul_precision("highest"):
        model, args, cache, tok_b, pos_b = build_batch(case)
        ref = model(tok_b[:, None], pos_b[:, None], cache=cache, ffn_args=args)
        mw = case.mw(model)
        kc, vc = megastep.stack_cache(cache)
        tau_l = jnp.stack([a.tau for a in args])
        logits, _, _, k_lb, fail = jax.jit(megastep.step, static_argnums=(0, 7))(
            model, mw, tok_b, pos_b, kc, vc, tau_l, case.launch()
        )
    assert not np.asarray(fail).any()
    ref_k = np.stack([np.asarray(s.k_t).reshape(-1) for s in ref.ffn_stats])
    np.testing.assert_array_equal(np.asarray(k_lb), ref_k)
    tol = "model_fp32" if case.case.dtype == "float32" else "bf16"
    assert_close(logits, ref.logits[:, 0], tol, case.name)


@pytest.mark.gpu
@pytest.mark.skipif(not jt.available(), reason="needs a CUDA GPU with jax-triton")
def test_gpu_batched_generation_equals_xla_tokens():
    """Four prompts of different lengths through the batched launch: the XLA path's greedy
    tokens, in fp32."""
    case = BATCH_CASES[0]
    model, *_ = build_batch(case)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15, 16]]
    kw = dict(tau=0.9, sampling=SamplingConfig(), cache_len=64)
    want = generate(model, prompts, 24, **kw)
    got = generate(model, prompts, 24, implementation="megastep", **kw)
    assert got == want
