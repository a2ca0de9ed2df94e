"""Generation: greedy equals transformers' greedy on ragged batches, sampling obeys top-p, no
retracing per token, clear errors for prompts that do not fit."""

import numpy as np
import pytest

pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from helpers import assert_close, fresh_cache_prompt_passes  # noqa: E402
from hf_fixtures import tiny_llama  # noqa: E402

from prunepath_jax import generate as gen_mod  # noqa: E402
from prunepath_jax.generate import SamplingConfig, generate, sample_tokens  # noqa: E402
from prunepath_jax.loading import load_pretrained  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    torch_model = tiny_llama(d, seed=11)
    return load_pretrained(d, progress=False).model, torch_model


def test_greedy_matches_transformers_ragged_batch(tiny):
    import torch

    model, torch_model = tiny
    rng = np.random.default_rng(12)
    prompts = [rng.integers(3, 97, n).tolist() for n in (9, 2, 17)]
    ours = generate(model, prompts, 24, chunk=8)
    for p, o in zip(prompts, ours, strict=True):
        ref = torch_model.generate(
            torch.tensor([p]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
            pad_token_id=0,
        )[0, len(p):].tolist()  # fmt: skip
        assert o == ref


def test_stop_tokens_cut_each_sequence(tiny):
    model, _ = tiny
    prompts = [[5, 6, 7], [8, 9]]
    free = generate(model, prompts, 12)
    stop = free[0][3]  # a token the first sequence emits at step 3
    out = generate(model, prompts, 12, stop_ids=(stop,))
    assert out[0] == free[0][: free[0].index(stop) + 1]
    cut = free[1].index(stop) + 1 if stop in free[1] else len(free[1])
    assert out[1] == free[1][:cut]


def test_decode_compiles_once(tiny, monkeypatch):
    """One trace of the decode chunk for a whole generate call and none for a second call on
    the same model (``flatjit.bind`` keeps the compiled function per graph and tree)."""
    model, _ = tiny
    traces = []
    orig = gen_mod._decode_chunk_impl

    def counting(*a, **k):
        traces.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(gen_mod, "_decode_chunk_impl", counting)
    first = generate(model, [[5, 6, 7]], 40, chunk=4)  # 10 chunk calls
    assert generate(model, [[5, 6, 7]], 40, chunk=4) == first
    assert len(traces) == 1


def test_chunk_seconds_times_every_decode_chunk(tiny):
    """The direct decode timing (``scripts/smollm2_decode.py --direct``): one wall time per
    compiled decode chunk after the prefill's token, the same tokens as without it."""
    model, _ = tiny
    secs = []
    out = generate(model, [[5, 6, 7]], 17, chunk=4, chunk_seconds=secs)
    assert out == generate(model, [[5, 6, 7]], 17, chunk=4)
    assert len(secs) == 4 and all(t > 0 for t in secs)  # 16 tokens after the first, 4 a chunk


def test_sampling_is_seeded_and_varies(tiny):
    model, _ = tiny
    s1 = generate(model, [[5, 6, 7]], 16, sampling=SamplingConfig(1.0, 1.0, seed=1))
    s1b = generate(model, [[5, 6, 7]], 16, sampling=SamplingConfig(1.0, 1.0, seed=1))
    s2 = generate(model, [[5, 6, 7]], 16, sampling=SamplingConfig(1.0, 1.0, seed=2))
    assert s1 == s1b
    assert s1 != s2


def test_top_p_keeps_only_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.split(jax.random.key(0), 1)[0]
    toks = np.asarray(sample_tokens(logits, keys, 1.0, 0.7, greedy=False))
    # Mass before token 1 is 0.5 < 0.7, before token 2 it is 0.8 >= 0.7: only {0, 1} survive.
    assert set(np.unique(toks)) == {0, 1}
    frac0 = (toks == 0).mean()
    assert abs(frac0 - 0.5 / 0.8) < 0.05


def test_prompt_longer_than_cache(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="does not fit a KV cache"):
        generate(model, [list(range(3, 80))], 4, cache_len=64)


def test_prompt_longer_than_context(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(model, [list(range(3, 90))] * 1, 60)


def test_bad_chunk_and_implementation(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="chunk"):
        generate(model, [[5, 6, 7]], 4, chunk=0)
    with pytest.raises(ValueError, match="None, auto, megastep, xla, triton or pallas"):
        generate(model, [[5, 6, 7]], 4, implementation="cuda")


def test_bad_sampling_args():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)


def test_forced_logits_follow_the_decode_path(tiny):
    """Teacher-forced logits along a greedy output: their argmax is that output (the same
    prefill + decode steps), and they match one full forward pass over prompt + output."""
    model, _ = tiny
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    outs = generate(model, prompts, 12, chunk=4)
    lg = gen_mod.forced_logits(model, prompts, outs)
    assert lg.shape == (2, 12, model.cfg.vocab_size) and lg.dtype == np.float32
    np.testing.assert_array_equal(lg.argmax(-1), np.array(outs))
    for p, o, row in zip(prompts, outs, lg, strict=True):
        seq = jnp.asarray([p + o], jnp.int32)
        full = np.asarray(model(seq).logits[0, len(p) - 1 : -1], np.float32)
        assert_close(row, full, "model_fp32", "forced vs full forward")


def test_forced_logits_bad_input(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="one length"):
        gen_mod.forced_logits(model, [[1, 2], [3]], [[4, 5], [6]])
    with pytest.raises(ValueError, match="2 prompts but 1"):
        gen_mod.forced_logits(model, [[1, 2], [3]], [[4, 5]])
    with pytest.raises(ValueError, match="do not fit"):
        gen_mod.forced_logits(model, [[1, 2]], [[4] * 10], cache_len=8)


@pytest.mark.parametrize("window", [None, 6])
def test_prompt_pass_into_a_fresh_cache_equals_the_cached_path(tiny, window):
    """``fresh_cache=True`` (what `generate`'s prompt pass promises) attends causally within the
    prompt -- the fused kernel on GPU -- and must give the masked-over-the-cache path's logits at
    every position and write the same keys/values (layer 0 exactly, later layers up to the
    rounding of attention sums), right-padded rows included. Sliding-window models ignore the
    promise (same arrays exactly)."""
    model, _ = tiny
    model = nnx_replace_window(model, window)
    rng = np.random.default_rng(13)
    tokens = jnp.asarray(rng.integers(3, 97, (3, 32)), jnp.int32)
    fresh, masked = fresh_cache_prompt_passes(model, tokens, cache_len=48)
    if window is not None:
        np.testing.assert_array_equal(fresh.logits, masked.logits)


def nnx_replace_window(model, window):
    """The tiny model with ``sliding_window = window`` (the same weights)."""
    if window is None:
        return model
    from flax import nnx

    graphdef, state = nnx.split(model)
    clone = nnx.merge(graphdef, state)
    cfg = clone.cfg.replace(sliding_window=window)
    for _, m in nnx.iter_graph(clone):
        if hasattr(m, "cfg"):
            m.cfg = cfg
    return clone


def _gpu_prompt_model(family):
    """A 2-layer bf16 model of SmolLM2's (Llama) or GPT-2 small's width, random weights."""
    from flax import nnx

    from prunepath_jax.config import PRESETS, ModelConfig
    from prunepath_jax.models.gpt2 import GPT2Model
    from prunepath_jax.models.llama import LlamaModel

    if family == "llama":
        cfg = PRESETS["smollm2-135m"].replace(n_layers=2)
        return LlamaModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    cfg = ModelConfig(family="gpt2", model_type="gpt2", vocab_size=50257, d_model=768,
                      d_ff=3072, n_layers=2, n_heads=12, n_kv_heads=12, head_dim=64,
                      max_position=1024, norm_eps=1e-5, activation="gelu_new", qkv_bias=True,
                      o_bias=True, mlp_bias=True, tie_embeddings=True)  # fmt: skip
    return GPT2Model(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("t", [32, 96])
def test_fresh_cache_prompt_pass_on_gpu_matches_the_masked_path(t, family):
    """On the GPU the fresh-cache prompt pass runs cuDNN's flash attention (bf16, head_dim 64):
    its logits agree with the masked-over-the-cache path within the bf16 tolerance, at the
    prompt lengths `generate` pads to (multiples of 32), for Llama and GPT-2."""
    from prunepath_jax.models.layers import init_cache

    model = _gpu_prompt_model(family)
    cfg = model.cfg
    rng = np.random.default_rng(14)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, t)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
    fn = jax.jit(lambda tok, pos, c, f: model(tok, pos, cache=c, fresh_cache=f), static_argnums=3)
    hlo = (
        jax.jit(lambda tok, pos, c: model(tok, pos, cache=c, fresh_cache=True))
        .lower(tokens, positions, init_cache(cfg, 2, t + 64, jnp.bfloat16))
        .compile()
        .as_text()
    )
    assert "cudnn" in hlo.lower()  # the fused kernel really ran
    out = [fn(tokens, positions, init_cache(cfg, 2, t + 64, jnp.bfloat16), f) for f in (1, 0)]
    assert_close(out[0].logits, out[1].logits, "bf16", "fresh-cache logits on GPU")


class _FakeChunks:
    """A decode call that records how many chunks were issued and which were read back."""

    def __init__(self, rows):
        self.rows, self.issued, self.read = rows, 0, []

    def __call__(self, st):
        i, self.issued = self.issued, self.issued + 1
        tracker = self

        class Toks:  # np.asarray(toks) marks the chunk read
            def __array__(self, dtype=None, copy=None):
                tracker.read.append(i)
                return np.asarray(tracker.rows[i], dtype)

        return st, Toks()


def test_decode_loop_keeps_one_chunk_in_flight_and_stops_reading_after_every_stop():
    class Bar:
        n = 1

        def update(self, k):
            self.n += k

    stop = 9
    rows = [[[1, 2], [3, 4]], [[5, stop], [6, 7]], [[0, 0], [stop, 0]], [[0, 0], [0, 0]]]
    fake, secs = _FakeChunks(rows), []
    out, _ = gen_mod._decode_loop(fake, None, [False, False], 100, 2, (stop,), secs, Bar())
    assert [o.tolist() for o in out] == rows[:3]  # both sequences stopped in chunk 2
    assert fake.read == [0, 1, 2] and fake.issued == 4  # chunk 3 issued before 2 was read
    assert len(secs) == 3
    fake = _FakeChunks(rows)
    out, _ = gen_mod._decode_loop(fake, None, [False, False], 5, 2, (), None, Bar())
    assert fake.issued == len(fake.read) == 2 and len(out) == 2  # 1 + 2 · 2 ≥ 5 tokens
    fake = _FakeChunks(rows)
    assert gen_mod._decode_loop(fake, None, [True, True], 100, 2, (stop,), None, Bar())[0] == []
    assert fake.issued == 0  # the prefill's token already stopped every sequence
