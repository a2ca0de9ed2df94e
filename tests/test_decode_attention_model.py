"""The split-K decode attention wired into the Llama model (`models/decode_attention.py`).

On CPU the kernel runs through the Pallas interpreter (``attn_impl="pallas_interpret"``): a decode
step gives the XLA path's logits over ragged batches (GQA, MQA, MHA, a full and an overflowed
cache), and every case the kernel cannot express (prefill, a sliding window, no GPU, odd shapes)
runs XLA by an explicit check. A spy on the kernel proves which path ran. The ``gpu`` test
compares `generate(implementation="pallas")` with "xla" on a random bf16 model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close, cuda_triton_calls, fresh_traces, prefill_cache

from prunepath_jax import generate as gen_mod
from prunepath_jax.config import PRESETS
from prunepath_jax.generate import generate
from prunepath_jax.kernels import pallas_attention
from prunepath_jax.models import decode_attention as da
from prunepath_jax.models.layers import causal_mask, init_cache
from prunepath_jax.models.llama import LlamaModel

ON_GPU = jax.default_backend() == "gpu"


def _model(n_heads, n_kv, *, dtype=jnp.float32, window=None, head_dim=16, vocab=97, seed=0):
    cfg = PRESETS["smollm2-135m"].replace(
        vocab_size=vocab, d_model=64, d_ff=96, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim, sliding_window=window, tie_embeddings=False,
    )  # fmt: skip
    return LlamaModel(cfg, dtype=dtype, rngs=nnx.Rngs(seed))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls (traces under jit) of the split-K kernels, then runs them; each call's
    kwargs get ``"fn"``: which entry point ran (``decode_attention``: the plain kernel after
    XLA's RoPE and cache write; ``decode_attention_rope``: all three in the kernel)."""
    fresh_traces()  # a cached trace from an earlier test would hide the calls
    calls = []
    for name in ("decode_attention", "decode_attention_rope"):
        real = getattr(pallas_attention, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append({**kwargs, "fn": _name})
            return _real(*args, **kwargs)

        monkeypatch.setattr(pallas_attention, name, spy)
    return calls


def _prefilled(model, lengths, s, seed=0):
    """A cache after an XLA prefill of random prompts of ``lengths`` (right-padded)."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(1, model.cfg.vocab_size, (len(lengths), max(lengths)))
    return prefill_cache(model, jnp.asarray(toks, jnp.int32), s)


def _decode_logits(model, impl, cache, positions_b, seed=1):
    """Logits and cache of one decode step at ``positions_b`` with ``attn_impl=impl``."""
    rng = np.random.default_rng(seed)
    toks = jnp.asarray(rng.integers(1, model.cfg.vocab_size, (len(positions_b), 1)), jnp.int32)
    da.set_attention(model, impl)
    try:
        out = model(toks, jnp.asarray(positions_b, jnp.int32)[:, None], cache=cache)
    finally:
        da.set_attention(model, "xla")
    return out.logits, out.cache


# name, n_heads, n_kv, dtype, cache length, prompt lengths, decode positions (>= s: writes
# dropped), head_dim (16: XLA's RoPE + cache write, then the plain kernel; >= 32: all in the
# kernel, `decode_attention_rope`)
CASES = [
    ("gqa2_fp32_ragged_full", 4, 2, jnp.float32, 64, [5, 17, 20], [5, 17, 63], 16),
    ("mqa8_fp32_s48_len1_overflow", 8, 1, jnp.float32, 48, [1, 9, 30], [0, 47, 50], 16),
    ("mha_bf16_ragged", 4, 4, jnp.bfloat16, 64, [3, 30], [3, 30], 16),
    ("rope_gqa2_fp32_ragged_full", 4, 2, jnp.float32, 64, [5, 17, 20], [5, 17, 63], 32),
    ("rope_mqa8_fp32_overflow", 8, 1, jnp.float32, 48, [1, 9, 30], [0, 47, 50], 32),
    ("rope_gqa3_bf16_hd64", 9, 3, jnp.bfloat16, 64, [3, 30], [3, 30], 64),
    # A cache of 5 blocks: 5 splits, a grid axis that is no power of two.
    ("gqa2_bf16_s320_5splits", 4, 2, jnp.bfloat16, 320, [70, 301], [70, 319], 16),
    ("rope_gqa2_fp32_s320_5splits", 4, 2, jnp.float32, 320, [130, 7], [200, 7], 32),
]  # fmt: skip


def test_split_plan_uses_any_divisor_of_the_block_count():
    """~256 programs from any divisor of the cache's blocks; powers of two as before."""
    assert da._plan(1, 8, 32768) == (32, 64)  # 512 blocks: 8 heads x 32 splits
    assert da._plan(1, 8, 33024) == (43, 64)  # 516 = 4·129 blocks: was 4 splits (32 programs)
    assert da._plan(4, 8, 4160) == (13, 64)  # 65 blocks, 8 splits wanted: was 1
    assert da._plan(1, 3, 192) == (3, 64)  # fewer blocks than wanted: one each
    assert da._plan(16, 8, 256) == (2, 64)  # enough programs from batch x heads
    assert da._plan(1, 8, 40) is None  # no power-of-two block of 16 divides 40


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_interpreted_kernel_decode_step_matches_xla(case, kernel_calls):
    name, h, kv, dtype, s, lengths, positions, hd = case
    model = _model(h, kv, dtype=dtype, head_dim=hd)
    cache = _prefilled(model, lengths, s)
    ref, ref_cache = _decode_logits(model, "xla", cache, positions)
    assert not kernel_calls
    out, out_cache = _decode_logits(model, "pallas_interpret", cache, positions)
    assert len(kernel_calls) == model.cfg.n_layers  # a kernel ran in every layer
    fused = hd >= 32
    assert {c["fn"] for c in kernel_calls} == {
        "decode_attention_rope" if fused else "decode_attention"
    }
    tol = "bf16" if dtype == jnp.bfloat16 else "model_fp32"
    assert_close(out, ref, tol, name)
    if not fused:  # XLA's own write; the kernel's RoPE may round an fp32 ulp differently
        np.testing.assert_array_equal(out_cache[0].k, ref_cache[0].k)
    for a, b in zip(jax.tree.leaves(out_cache), jax.tree.leaves(ref_cache), strict=True):
        assert_close(a.astype(jnp.float32), b.astype(jnp.float32), tol, f"{name} cache")
    changed = np.asarray(out_cache[0].v != cache[0].v).any(axis=(2, 3))  # [b, s] rows written
    in_cache = np.asarray(positions) < s
    np.testing.assert_array_equal(changed.sum(axis=1), in_cache.astype(int))


def test_rope_step_only_where_the_fused_kernel_runs():
    """`rope_step` declines (None: XLA's RoPE and cache write, then `cached_attention`) for
    "pallas_plain", head_dim 16 (too small for its half-width products), XLA, and prefill."""
    cache = init_cache(_model(4, 2, head_dim=32).cfg, 1, 64, jnp.float32)[0]
    qkv = jnp.ones((1, 1, 8, 32))
    rope = (jnp.ones((1, 1, 1, 16)), jnp.zeros((1, 1, 1, 16)))
    pos = jnp.array([[3]], jnp.int32)

    def step(impl, qkv=qkv, cache=cache, rope=rope, pos=pos):
        return da.rope_step(qkv, rope, cache, pos, impl=impl, window=None, n_heads=4)

    assert step("pallas_interpret") is not None
    for impl in ("pallas_plain", "xla"):
        assert step(impl) is None
    cache16 = init_cache(_model(4, 2).cfg, 1, 64, jnp.float32)[0]
    assert step("pallas_interpret", jnp.ones((1, 1, 8, 16)), cache16) is None
    assert step("pallas_interpret", jnp.ones((1, 2, 8, 32)), pos=jnp.array([[3, 4]])) is None


def test_prefix_lengths_are_the_decode_mask():
    s = 48
    pos_b = jnp.arange(s + 4, dtype=jnp.int32)
    mask_bs = causal_mask(pos_b[:, None], jnp.broadcast_to(jnp.arange(s), (s + 4, s)), None)[:, 0]
    lens = da.prefix_lengths(pos_b, s)
    np.testing.assert_array_equal(jnp.arange(s)[None] < lens[:, None], mask_bs)


def _same_as_xla_without_kernel(model, impl, kernel_calls, s=64):
    cache = _prefilled(model, [4, 11], s)
    ref, _ = _decode_logits(model, "xla", cache, [4, 11])
    out, _ = _decode_logits(model, impl, cache, [4, 11])
    assert not kernel_calls
    np.testing.assert_array_equal(out, ref)


def test_sliding_window_falls_back_to_xla(kernel_calls):
    _same_as_xla_without_kernel(_model(4, 2, window=8), "pallas_interpret", kernel_calls)


@pytest.mark.skipif(ON_GPU, reason="the compiled kernel runs on a GPU")
def test_pallas_without_gpu_falls_back_to_xla(kernel_calls):
    _same_as_xla_without_kernel(_model(4, 2), "pallas", kernel_calls)
    assert "CUDA GPU" in da.kernel_ready()


def test_prefill_stays_on_xla(kernel_calls):
    model = _model(4, 2)
    da.set_attention(model, "pallas_interpret")
    _prefilled(model, [3, 7], 64)
    assert not kernel_calls


def test_unsupported_reasons():
    q = jnp.zeros((2, 1, 4, 16), jnp.float32)
    kc = jnp.zeros((2, 64, 2, 16), jnp.float32)

    def why(q_, k_, window=None):
        return da.unsupported_reason("pallas_interpret", q_, k_, k_, window)

    assert why(q, kc) is None
    assert "decode steps" in why(jnp.zeros((2, 3, 4, 16)), kc)
    assert "sliding window" in why(q, kc, window=8)
    assert "float16" in why(q.astype(jnp.float16), kc.astype(jnp.float16))
    assert "differs" in why(q, kc.astype(jnp.bfloat16))
    assert "head_dim" in why(jnp.zeros((2, 1, 4, 24)), jnp.zeros((2, 64, 2, 24)))
    assert "h/kv" in why(jnp.zeros((2, 1, 32, 16)), jnp.zeros((2, 64, 1, 16)))
    assert "multiple of 16" in why(q, jnp.zeros((2, 40, 2, 16)))
    assert da.unsupported_reason("xla", q, kc, kc, None) == "attn_impl is 'xla'"
    with pytest.raises(ValueError, match="attn_impl must be"):
        da.unsupported_reason("cuda", q, kc, kc, None)
    with pytest.raises(ValueError, match="attn_impl must be"):
        da.set_attention(_model(4, 2), "triton")


def test_generate_with_interpreted_kernel_matches_xla(kernel_calls):
    model = _model(4, 2, vocab=89, seed=3)
    prompts = [[5, 9, 2, 7, 1], [3], [8, 8, 4, 2, 6, 1, 9, 3, 3, 2, 5]]
    ref = generate(model, prompts, 12, chunk=4)
    da.set_attention(model, "pallas_interpret")  # implementation=None keeps the model's own path
    assert generate(model, prompts, 12, chunk=4) == ref
    assert kernel_calls


def test_generate_implementation_switches_attention_in_the_graphdef_only():
    model = _model(4, 2)
    graphdef, state = gen_mod._split(model, "pallas")
    assert {m.attn_impl for m in da.attention_modules(nnx.merge(graphdef, state))} == {"pallas"}
    assert {m.attn_impl for m in da.attention_modules(model)} == {"xla"}
    auto = nnx.merge(*gen_mod._split(model, "auto"))
    assert {m.attn_impl for m in da.attention_modules(auto)} == {"xla"}  # no cache length given
    prompts = [[1, 2, 3, 4], [5, 6]]
    assert generate(model, prompts, 6, implementation="pallas") == generate(model, prompts, 6)
    with pytest.raises(ValueError, match="no PrunePath FFN"):
        generate(model, prompts, 2, implementation="triton")


def test_model_decode_step_lowers_the_kernel_for_cuda(monkeypatch):
    """The compiled path (no GPU needed): one Triton custom call per layer in the exported step
    of a SmolLM2-shaped bf16 model (9 query heads over 3 KV heads, head_dim 64)."""
    monkeypatch.setattr(da, "kernel_ready", lambda: None)
    cfg = PRESETS["smollm2-135m"].replace(n_layers=2, vocab_size=512)
    model = LlamaModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    da.set_attention(model, "pallas")
    graphdef, state = nnx.split(model)

    def step(state, toks_b1, pos_b1, cache):
        return nnx.merge(graphdef, state)(toks_b1, pos_b1, cache=cache).logits

    zeros = jnp.zeros((4, 1), jnp.int32)
    cache = init_cache(cfg, 4, 256, jnp.bfloat16)
    assert cuda_triton_calls(jax.jit(step), state, zeros, zeros, cache) == cfg.n_layers


def test_auto_uses_the_kernel_only_where_it_measured_faster(monkeypatch):
    """ "auto": the kernel for up to 8 sequences and a short cache (faster in the 1B and 8B decode
    steps), XLA for longer caches (a tie at 4k, slower at 32k), unmeasured batches, sharded
    weights, and where the kernel cannot run; "pallas" always asks for it (BENCHMARKS.md)."""
    model = _model(4, 2)
    monkeypatch.setattr(da, "kernel_ready", lambda: "no GPU")
    assert da.impl_for("auto", model, 256, 1) == "xla"
    monkeypatch.setattr(da, "kernel_ready", lambda: None)
    assert da.impl_for("pallas", model) == "pallas"
    assert da.impl_for("pallas_plain", model) == "pallas_plain"
    assert da.impl_for("auto", model, 256, 1) == "pallas"
    assert da.impl_for("auto", model, da.AUTO_MAX_CACHE, 1) == "pallas"
    assert da.impl_for("auto", model, da.AUTO_MAX_CACHE + 64, 1) == "xla"
    assert da.impl_for("auto", model, 256, da.AUTO_MAX_BATCH) == "pallas"
    assert da.impl_for("auto", model, 256, da.AUTO_MAX_BATCH + 1) == "xla"
    assert da.impl_for("auto", model) == "xla"
    for impl in ("xla", "triton"):
        assert da.impl_for(impl, model, 256, 1) == "xla"
    if len(jax.devices()) > 1:  # weights on several devices: the cache would be gathered
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        nnx.update(model, jax.device_put(nnx.state(model), rep))
        assert da.impl_for("auto", model, 256, 1) == "xla"


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4])
def test_gpu_generate_pallas_attention_matches_xla(batch, kernel_calls):
    """SmolLM2-shaped random bf16 weights (9 query heads over 3 KV heads, head_dim 64): the same
    greedy tokens, or, where a near-tie flips one, decode-step logits within bf16 tolerance."""
    model = LlamaModel(PRESETS["smollm2-135m"].replace(n_layers=4), dtype=jnp.bfloat16,
                       rngs=nnx.Rngs(batch))  # fmt: skip
    rng = np.random.default_rng(batch)
    prompts = [rng.integers(0, 49152, 5 + 37 * i).tolist() for i in range(batch)]
    ref = generate(model, prompts, 24, implementation="xla")
    assert not kernel_calls
    out = generate(model, prompts, 24, implementation="pallas")
    assert kernel_calls  # the compiled kernel ran, no fallback
    if out != ref:
        lengths = [len(p) for p in prompts]
        cache = _prefilled(model, lengths, 256)
        lx, _ = _decode_logits(model, "xla", cache, lengths)
        lk, _ = _decode_logits(model, "pallas", cache, lengths)
        assert_close(lk, lx, "bf16", "decode-step logits")


def test_sparse_decode_step_fuses_the_ffn_norm_for_cuda(monkeypatch):
    """The exported batch-1 decode step of a sparse SmolLM2-shaped model with the Pallas FFN:
    three Triton kernels (router logits, selection, experts; one shared function for the
    layers) and the pre-FFN RMSNorm inside the first -- the step's XLA ops keep one ``rsqrt``
    per layer (the attention norm) plus the final norm's. An XLA FFN norm would add one (checked
    by hand in a fresh process with ``norm="xla"``: 4 instead of 3; the layer's plan is cached
    per process, so this test cannot switch it); a norm kept alive for the routing statistics
    (unused at decode) one per layer."""
    from prunepath_jax.kernels import api
    from prunepath_jax.kernels.synthetic import sparse_llama
    from prunepath_jax.nn import route_args, set_compute

    monkeypatch.setattr(api, "_backend_ready", lambda impl: None)
    monkeypatch.setattr(api.jax, "default_backend", lambda: "gpu")  # export for CUDA from a CPU
    cfg = PRESETS["smollm2-135m"].replace(n_layers=2, vocab_size=512)
    model = sparse_llama(cfg, 12, dtype=jnp.bfloat16, group_size=32)
    set_compute(model, "kernel", "pallas")
    graphdef, state = nnx.split(model)
    args = route_args(model.cfg, 0.5)

    def step(state, toks_b1, pos_b1, cache):
        return nnx.merge(graphdef, state)(toks_b1, pos_b1, cache=cache, ffn_args=args).logits

    zeros = jnp.zeros((1, 1), jnp.int32)
    call = "__gpu$xla.gpu.triton"
    exp = jax.export.export(
        jax.jit(step), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(call)],
    )(state, zeros, zeros, init_cache(cfg, 1, 256, jnp.bfloat16))  # fmt: skip
    text = exp.mlir_module()
    assert text.count(f"custom_call @{call}") == 3
    assert text.count("stablehlo.rsqrt") == cfg.n_layers + 1
