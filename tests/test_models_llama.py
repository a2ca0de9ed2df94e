"""Llama family (Llama, Llama-3 rope scaling, Qwen2 biases, Mistral sliding window) vs transformers,
KV-cache decoding vs full recompute, sharded loading, and bad input."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from helpers import assert_close  # noqa: E402
from hf_fixtures import (  # noqa: E402
    edit_config,
    tiny_llama,
    tiny_mistral,
    tiny_qwen2,
    torch_logits,
)

from prunepath_jax.hf.configs import UnsupportedConfigError  # noqa: E402
from prunepath_jax.loading import load_pretrained  # noqa: E402
from prunepath_jax.models.layers import init_cache  # noqa: E402
from prunepath_jax.sharding import make_mesh  # noqa: E402

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

CASES = {
    "llama_untied": (tiny_llama, {}),
    "llama3_tied_scaled": (tiny_llama, dict(tie_word_embeddings=True, rope_scaling=LLAMA3_SCALING)),
    "llama_linear_rope": (tiny_llama, dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen2_bias_tied": (tiny_qwen2, {}),
    "mistral_window": (tiny_mistral, {}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    fn, kw = CASES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    torch_model = fn(d, seed=len(request.param), **kw)
    return d, torch_model


def test_logits_match_transformers(checkpoint):
    d, torch_model = checkpoint
    ids = np.random.default_rng(1).integers(0, 97, (2, 40))  # longer than window / rope orig len
    pre = load_pretrained(d, progress=False)
    ours = pre.model(jnp.asarray(ids)).logits
    assert_close(ours, torch_logits(torch_model, ids), "model_fp32", str(d))


def test_cached_decoding_equals_recompute(checkpoint):
    d, _ = checkpoint
    model = load_pretrained(d, progress=False).model
    rng = np.random.default_rng(2)
    lengths = np.array([7, 3, 12], np.int32)
    b, t_pad, s = 3, 16, 32
    full = rng.integers(0, 97, (b, 24)).astype(np.int32)
    tokens = np.where(np.arange(t_pad)[None] < lengths[:, None], full[:, :t_pad], 0)
    cache = init_cache(model.cfg, b, s, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t_pad, dtype=jnp.int32), (b, t_pad))
    out = model(jnp.asarray(tokens), pos, cache=cache, logit_index_b=jnp.asarray(lengths - 1))
    cache = out.cache
    for step in range(5):
        cur = lengths + step  # tokens [0, cur) are in the cache for each row
        # Full recompute of every prefix; causal attention makes the padding after cur-1 inert.
        ref = model(jnp.asarray(full), logit_index_b=jnp.asarray(cur - 1)).logits
        assert_close(out.logits, ref, "model_fp32", f"step {step}")
        nxt = full[np.arange(b), cur]
        out = model(jnp.asarray(nxt[:, None]), jnp.asarray(cur[:, None]), cache=cache)
        cache = out.cache


def test_sharded_load_equals_single_device(tmp_path):
    tiny_llama(tmp_path, seed=3, hidden_size=64, intermediate_size=128, vocab_size=128)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 128, (2, 9)))
    ref = load_pretrained(tmp_path, progress=False).model(ids).logits
    mesh = make_mesh(data=2, fsdp=2, model=2, devices=jax.devices("cpu"))
    sharded = load_pretrained(tmp_path, mesh=mesh, progress=False).model
    kernel = sharded.layers[0].mlp.gate_up_proj.kernel[...]
    assert len(kernel.sharding.device_set) > 1, kernel.sharding
    assert_close(sharded(ids).logits, ref, "model_fp32", "sharded load")


def test_bfloat16_load_runs(tmp_path):
    torch_model = tiny_llama(tmp_path, seed=5)
    ids = np.random.default_rng(5).integers(0, 97, (1, 12))
    pre = load_pretrained(tmp_path, dtype=jnp.bfloat16, progress=False)
    assert pre.model.layers[0].mlp.gate_up_proj.kernel[...].dtype == jnp.bfloat16
    assert_close(pre.model(jnp.asarray(ids)).logits, torch_logits(torch_model, ids), "bf16", "bf16")


# ----------------------------------------------------------------------------- bad input


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_pretrained("/nonexistent/dir/x", progress=False)


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Hugging Face checkpoint"):
        load_pretrained(tmp_path, progress=False)


def test_missing_weights(tmp_path):
    tiny_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(tmp_path, progress=False)


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(model_type="falcon"), "falcon"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "yarn"),
        (dict(some_new_math_key=3), "some_new_math_key"),
        (dict(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_unsupported_config(tmp_path, change, key):
    tiny_llama(tmp_path)
    edit_config(tmp_path, **change)
    with pytest.raises(UnsupportedConfigError, match=key):
        load_pretrained(tmp_path, progress=False)


def test_qwen2_sliding_window_rejected(tmp_path):
    tiny_qwen2(tmp_path)
    edit_config(tmp_path, use_sliding_window=True, sliding_window=4)
    with pytest.raises(UnsupportedConfigError, match="use_sliding_window"):
        load_pretrained(tmp_path, progress=False)


def test_shape_mismatch(tmp_path):
    tiny_llama(tmp_path)
    edit_config(tmp_path, intermediate_size=64)
    with pytest.raises(ValueError, match="does not fit"):
        load_pretrained(tmp_path, progress=False)
