"""GPT-2, BERT and RoBERTa against transformers on tiny random checkpoints (and the real MiniLM).

Every comparison uses fresh seeded weights (LayerNorm weights around 1, biases non-zero) so a
missing bias, a wrong norm order or an off-by-one position row shows up as a large error.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close, fresh_cache_prompt_passes
from hf_fixtures import (
    edit_config,
    tiny_bert,
    tiny_bert_cls,
    tiny_gpt2,
    tiny_gpt2_cls,
    tiny_roberta,
    tiny_roberta_cls,
    torch_logits,
)

from prunepath_jax import models
from prunepath_jax.hf.configs import UnsupportedConfigError
from prunepath_jax.loading import load_pretrained
from prunepath_jax.models import layers

VOCAB = 97


def _ids(b: int, t: int, seed: int = 0, low: int = 3) -> np.ndarray:
    """Random ids avoiding the low ids used as pad/special tokens."""
    return np.random.default_rng(seed).integers(low, VOCAB, (b, t))


def _ragged(ids: np.ndarray, lengths: list[int], pad: int, left: bool = False):
    """Pads row i after `lengths[i]` real tokens (or before them); returns (ids, mask)."""
    ids = ids.copy()
    mask = np.zeros_like(ids)
    t = ids.shape[1]
    for i, n in enumerate(lengths):
        real = slice(t - n, t) if left else slice(0, n)
        mask[i, real] = 1
    ids[mask == 0] = pad
    return ids, mask


def _torch_hidden(tm, ids, mask=None, token_types=None) -> np.ndarray:
    import torch

    kw = {}
    if mask is not None:
        kw["attention_mask"] = torch.tensor(mask)
    if token_types is not None:
        kw["token_type_ids"] = torch.tensor(token_types)
    with torch.no_grad():
        return tm(torch.tensor(ids), **kw).last_hidden_state.float().numpy()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    tm = tiny_gpt2(d, seed=1)
    return d, tm, load_pretrained(d, progress=False)


# ----------------------------------------------------------------------------- GPT-2


@pytest.mark.parametrize("act", ["gelu_new", "gelu"])
def test_gpt2_lm_logits_match_transformers(tmp_path, act):
    tm = tiny_gpt2(tmp_path, seed=2, activation_function=act)
    p = load_pretrained(tmp_path, progress=False)
    assert p.config.family == "gpt2" and p.config.activation == act
    ids = _ids(2, 24, seed=3)
    out = p.model(jnp.asarray(ids))
    assert_close(out.logits, torch_logits(tm, ids), "model_fp32", f"gpt2 {act} logits")
    assert out.cache is None and out.ffn_stats == (None, None)


def test_gpt2_logit_index_selects_positions(gpt2):
    _, tm, p = gpt2
    ids = _ids(2, 12, seed=4)
    full = torch_logits(tm, ids)
    index = np.array([5, 11])
    out = p.model(jnp.asarray(ids), logit_index_b=jnp.asarray(index)).logits
    assert_close(out[:, 0], full[np.arange(2), index], "model_fp32", "gpt2 logit_index")


def test_gpt2_fresh_cache_prompt_pass_equals_the_cached_path(gpt2):
    """``fresh_cache=True`` (generate's prompt pass) attends causally within the prompt: the
    same logits as attending over the masked cache, the same keys/values written (up to the
    rounding of attention sums over t instead of s keys in later layers)."""
    _, _, p = gpt2
    fresh_cache_prompt_passes(p.model, jnp.asarray(_ids(2, 16, seed=8)), cache_len=32)


def test_gpt2_kv_cache_decoding_matches_full_recompute(gpt2):
    """Prefill, then one token at a time through a jitted step: same logits as one full pass."""
    _, _, p = gpt2
    model, cfg = p.model, p.config
    b, t, prefill = 2, 16, 6
    ids = jnp.asarray(_ids(b, t, seed=5))
    full = model(ids).logits

    @nnx.jit
    def step(model, ids_bt, pos_bt, cache):
        out = model(ids_bt, pos_bt, cache=cache)
        return out.logits, out.cache

    cache = layers.init_cache(cfg, b, 32, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(prefill, dtype=jnp.int32), (b, prefill))
    logits, cache = step(model, ids[:, :prefill], pos, cache)
    steps = [logits]
    for i in range(prefill, t):
        logits, cache = step(model, ids[:, i : i + 1], jnp.full((b, 1), i, jnp.int32), cache)
        steps.append(logits)
    assert_close(jnp.concatenate(steps, axis=1), full, "model_fp32", "gpt2 cached decode")


def test_gpt2_bf16_params(gpt2):
    d, tm, _ = gpt2
    p = load_pretrained(d, dtype=jnp.bfloat16, progress=False)
    ids = _ids(2, 16, seed=16)
    out = p.model(jnp.asarray(ids)).logits
    assert out.dtype == jnp.float32
    assert_close(out, torch_logits(tm, ids), "bf16", "gpt2 bf16 logits")


@pytest.mark.parametrize("left", [False, True])
def test_gpt2_classification_pools_last_real_token(tmp_path, left):
    tm = tiny_gpt2_cls(tmp_path, seed=6)
    p = load_pretrained(tmp_path, progress=False)
    assert p.config.num_labels == 3
    ids, _ = _ragged(_ids(3, 14, seed=7), [14, 9, 4], pad=0, left=left)
    # transformers pools at the rightmost non-pad id; no attention mask in either run (with left
    # padding a mask would also shift transformers' default positions, a separate concern).
    out = p.model(jnp.asarray(ids)).logits
    assert out.shape == (3, 3)
    assert_close(out, torch_logits(tm, ids), "model_fp32", "gpt2 classification")


# ----------------------------------------------------------------------------- BERT / RoBERTa


def test_bert_hidden_states_match_transformers(tmp_path):
    tm = tiny_bert(tmp_path, seed=8)
    p = load_pretrained(tmp_path, progress=False)
    assert p.config.num_labels == 0 and p.config.position_offset == 0
    ids, mask = _ragged(_ids(3, 20, seed=9), [20, 13, 5], pad=0)
    types = np.zeros_like(ids)
    types[:, 8:] = 1
    hidden, stats = p.model.encode(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    ref = _torch_hidden(tm, ids, mask, types)
    real = mask.astype(bool)
    assert_close(np.asarray(hidden)[real], ref[real], "model_fp32", "bert hidden states")
    assert stats == (None, None)
    with pytest.raises(ValueError, match="no classification head"):
        p.model(jnp.asarray(ids))


def test_bert_classification_logits_match_transformers(tmp_path):
    tm = tiny_bert_cls(tmp_path, seed=10)
    p = load_pretrained(tmp_path, progress=False)
    assert p.config.num_labels == 3
    ids, mask = _ragged(_ids(3, 18, seed=11), [18, 11, 3], pad=0)
    types = np.zeros_like(ids)
    types[0, 9:] = 1
    out = p.model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    import torch

    with torch.no_grad():
        ref = tm(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        ).logits.numpy()
    assert out.logits.shape == (3, 3) and out.cache is None
    assert_close(out.logits, ref, "model_fp32", "bert classification logits")


def test_roberta_classification_padded_batch(tmp_path):
    tm = tiny_roberta_cls(tmp_path, seed=12)
    p = load_pretrained(tmp_path, progress=False)
    assert p.config.position_offset == 2 and p.config.pad_token_id == 1
    ids, mask = _ragged(_ids(3, 22, seed=13), [22, 10, 4], pad=1)
    out = p.model(jnp.asarray(ids), jnp.asarray(mask)).logits
    assert_close(out, torch_logits(tm, ids, mask), "model_fp32", "roberta classification")
    # Padding must not change a row's logits: row 1 alone, unpadded, gives the same answer.
    alone = p.model(jnp.asarray(ids[1:2, :10])).logits
    assert_close(alone, np.asarray(out[1:2]), "model_fp32", "roberta padding invariance")


def test_roberta_hidden_states_padded_batch(tmp_path):
    tm = tiny_roberta(tmp_path, seed=14)
    p = load_pretrained(tmp_path, progress=False)
    ids, mask = _ragged(_ids(2, 16, seed=15), [16, 7], pad=1)
    hidden, _ = p.model.encode(jnp.asarray(ids), jnp.asarray(mask))
    ref = _torch_hidden(tm, ids, mask)
    real = mask.astype(bool)
    assert_close(np.asarray(hidden)[real], ref[real], "model_fp32", "roberta hidden states")


# ----------------------------------------------------------------------------- bad configs


@pytest.fixture(scope="module")
def saved_configs(tmp_path_factory):
    out = {}
    for name, build in [("gpt2", tiny_gpt2), ("bert", tiny_bert_cls), ("roberta", tiny_roberta)]:
        d = tmp_path_factory.mktemp(name)
        build(d, n_layer=1) if name == "gpt2" else build(d, num_hidden_layers=1)
        out[name] = json.loads((d / "config.json").read_text())
    return out


@pytest.mark.parametrize(
    "family, key, value",
    [
        ("gpt2", "scale_attn_by_inverse_layer_idx", True),
        ("gpt2", "scale_attn_weights", False),
        ("gpt2", "add_cross_attention", True),
        ("gpt2", "tie_word_embeddings", False),
        ("gpt2", "activation_function", "relu"),
        ("gpt2", "architectures", ["GPT2DoubleHeadsModel"]),
        ("gpt2", "some_new_attention_trick", 3),
        ("bert", "position_embedding_type", "relative_key"),
        ("bert", "is_decoder", True),
        ("bert", "hidden_act", "relu"),
        ("bert", "architectures", ["BertForMaskedLM"]),
        ("bert", "some_new_attention_trick", 3),
        ("roberta", "position_embedding_type", "relative_key_query"),
        ("roberta", "some_new_attention_trick", 3),
    ],
)
def test_unsupported_config_names_the_key(saved_configs, family, key, value):
    cfg = {**saved_configs[family], key: value}
    with pytest.raises(UnsupportedConfigError, match=key):
        models.config_from_hf(cfg)


def test_unsupported_key_fails_at_load(tmp_path):
    tiny_gpt2(tmp_path, n_layer=1)
    edit_config(tmp_path, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(UnsupportedConfigError, match="scale_attn_by_inverse_layer_idx"):
        load_pretrained(tmp_path, progress=False)


def test_old_style_gpt2_config_keys_are_accepted(saved_configs):
    cfg = {**saved_configs["gpt2"], "n_ctx": 64, "n_inner": None}
    got = models.config_from_hf(cfg)
    assert got.d_ff == 4 * got.d_model and got.max_position == 64 and got.rope_theta is None


# ----------------------------------------------------------------------------- real MiniLM


@pytest.mark.slow
def test_real_minilm_hidden_states_match_transformers():
    from prunepath_jax.default import minilm_dir

    try:
        d = minilm_dir()
    except FileNotFoundError as e:  # the package is installed by `make test`; say why if not
        pytest.skip(str(e))
    if not (d / "tokenizer.json").exists():
        pytest.skip("MiniLM directory has no tokenizer.json")
    import torch
    from tokenizers import Tokenizer
    from transformers import BertModel

    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(
        [
            "The quick brown fox jumps over the lazy dog near the riverbank.",
            "Pruning feed-forward paths keeps accuracy.",
        ]
    )
    ids = np.array([e.ids for e in enc])
    mask = np.array([e.attention_mask for e in enc])
    assert mask[1].sum() < mask[0].sum()
    p = load_pretrained(d, progress=False)
    assert p.config.family == "bert" and p.config.num_labels == 0
    hidden, _ = p.model.encode(jnp.asarray(ids), jnp.asarray(mask))
    tm = BertModel.from_pretrained(str(d)).eval()
    with torch.no_grad():
        ref = tm(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    real = mask.astype(bool)
    assert_close(np.asarray(hidden)[real], ref[real], "model_fp32", "MiniLM hidden states")
