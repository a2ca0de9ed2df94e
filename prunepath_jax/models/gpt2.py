"""GPT-2: learned absolute positions, pre-LayerNorm blocks, fused QKV, GELU MLP, tied LM head.

Follows the Llama template: the FFN is its own module (`GeluMLP`) with the shared signature
`ffn(x_btd, ffn_arg) -> (y_btd, stats)` so PrunePath can swap exactly that piece, and the forward
returns statistics instead of storing them. The fused `c_attn` projection stays fused in our
parameters (one `[d, 3d]` matmul, as in the checkpoint) and is split after the matmul.

Checkpoint layout: transformers saves `GPT2LMHeadModel` and `GPT2ForSequenceClassification` with a
`transformer.` prefix (the tied `lm_head.weight` is not saved), and `GPT2Model` without one.
`hf_param_map` only sees the config, so the prefix is inferred from `architectures` here; a
checkpoint whose tensor names disagree with its `architectures` (the original OpenAI `gpt2` upload
stores unprefixed names under `GPT2LMHeadModel`) fails loudly at load time with the missing names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from prunepath_jax.config import ModelConfig
from prunepath_jax.hf import configs as hfc
from prunepath_jax.models.common import ModelOutput, ffn_arg_for_layer, select_positions
from prunepath_jax.models.layers import (
    Dense,
    Embed,
    LayerCache,
    LayerNorm,
    activation,
    attention,
    cache_write,
    call_mask,
)
from prunepath_jax.nn import PrunePathFFN

MODEL_TYPES = ("gpt2",)

_HANDLED = frozenset(
    {
        "vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "n_ctx",
        "layer_norm_epsilon", "activation_function", "resid_pdrop", "embd_pdrop", "attn_pdrop",
        "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
        "tie_word_embeddings", "n_special", "predict_special_tokens", "num_labels",
    }
)  # fmt: skip

# Activations `layers.activation` implements with GPT-2's meaning (SiLU would be mistaken for a
# gated SwiGLU FFN elsewhere, so it is not offered here).
_ACTIVATIONS = {"gelu_new", "gelu", "gelu_pytorch_tanh"}

# architectures entry -> (tensor-name prefix, has a sequence-classification head)
_ARCHITECTURES = {
    "GPT2LMHeadModel": ("transformer.", False),
    "GPT2ForSequenceClassification": ("transformer.", True),
}
_DEFAULT_ARCHITECTURE = "GPT2LMHeadModel"


def _architecture(cfg: dict) -> str:
    archs = cfg.get("architectures") or [_DEFAULT_ARCHITECTURE]
    for arch in archs:
        if arch in _ARCHITECTURES:
            return arch
    raise hfc.UnsupportedConfigError(
        f"config key 'architectures' = {archs!r} is not supported by the gpt2 loader "
        f"(supported: {sorted(_ARCHITECTURES)})"
    )


def from_hf_config(cfg: dict) -> ModelConfig:
    """Builds a `ModelConfig` from a GPT-2 `config.json` dict, or raises naming the bad key."""
    family = "gpt2"
    hfc.check_keys(cfg, _HANDLED, family)
    hfc.require(cfg, "activation_function", _ACTIVATIONS, family)
    hfc.require(cfg, "scale_attn_weights", {True}, family)
    hfc.require(cfg, "scale_attn_by_inverse_layer_idx", {False}, family)
    hfc.require(cfg, "add_cross_attention", {False}, family)
    hfc.require(cfg, "tie_word_embeddings", {True}, family)
    hfc.require(cfg, "n_special", {0}, family)
    # reorder_and_upcast_attn only changes precision; our scores are always float32.
    classify = _ARCHITECTURES[_architecture(cfg)][1]
    d = cfg.get("n_embd", 768)
    n_heads = cfg.get("n_head", 12)
    if d % n_heads:
        raise hfc.UnsupportedConfigError(f"config key 'n_embd' = {d} is not a multiple of n_head")
    return ModelConfig(
        family="gpt2",
        model_type="gpt2",
        vocab_size=cfg.get("vocab_size", 50257),
        d_model=d,
        d_ff=cfg.get("n_inner") or 4 * d,
        n_layers=cfg.get("n_layer", 12),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=d // n_heads,
        max_position=cfg.get("n_positions", 1024),
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        activation=cfg.get("activation_function", "gelu_new"),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_embeddings=True,
        pad_token_id=cfg.get("pad_token_id"),
        num_labels=hfc.num_labels(cfg) if classify else 0,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=hfc.eos_ids(cfg),
    )


def hf_param_map(cfg: ModelConfig) -> dict[tuple, tuple[str, bool]]:
    """Our parameter path -> (Hugging Face tensor name, transpose?). Conv1D is already [in, out]."""
    pre = "transformer."
    m: dict[tuple, tuple[str, bool]] = {
        ("wte", "embedding"): (f"{pre}wte.weight", False),
        ("wpe", "embedding"): (f"{pre}wpe.weight", False),
        ("ln_f", "weight"): (f"{pre}ln_f.weight", False),
        ("ln_f", "bias"): (f"{pre}ln_f.bias", False),
    }
    for i in range(cfg.n_layers):
        hf = f"{pre}h.{i}"
        for mod in ("ln_1", "ln_2"):
            for p in ("weight", "bias"):
                m[("h", i, mod, p)] = (f"{hf}.{mod}.{p}", False)
        for sub, names in (("attn", ("c_attn", "c_proj")), ("mlp", ("c_fc", "c_proj"))):
            for name in names:
                m[("h", i, sub, name, "kernel")] = (f"{hf}.{sub}.{name}.weight", False)
                m[("h", i, sub, name, "bias")] = (f"{hf}.{sub}.{name}.bias", False)
    if cfg.num_labels:
        m[("score", "kernel")] = ("score.weight", True)  # nn.Linear, [labels, d]
    return m


def last_non_pad_index(tokens_bt: jax.Array, pad_token_id: int | None) -> jax.Array:
    """`[b]`: the rightmost non-pad position (left or right padding), as transformers pools.

    Without a pad id every row is taken to be full length. A row of only pads gives 0, matching
    transformers' argmax of an all-zero row.
    """
    b, t = tokens_bt.shape
    if pad_token_id is None:
        return jnp.full((b,), t - 1, jnp.int32)
    real_bt = (tokens_bt != pad_token_id).astype(jnp.int32)
    return jnp.argmax(jnp.arange(t, dtype=jnp.int32) * real_bt, axis=-1).astype(jnp.int32)


class GeluMLP(nnx.Module):
    """Dense GPT-2 FFN: `c_proj(act(c_fc(x)))`. The piece PrunePath replaces."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.c_fc = Dense(cfg.d_model, cfg.d_ff, bias=True, dtype=dtype, rngs=rngs)
        self.c_proj = Dense(cfg.d_ff, cfg.d_model, bias=True, dtype=dtype, rngs=rngs)
        self.act_name = cfg.activation

    def __call__(self, x_btd, ffn_arg=None):
        return self.c_proj(activation(self.act_name)(self.c_fc(x_btd))), None


class Attention(nnx.Module):
    """Multi-head causal attention with a fused QKV projection and an optional static KV cache."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.d_model
        self.c_attn = Dense(d, 3 * d, bias=True, dtype=dtype, rngs=rngs)
        self.c_proj = Dense(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.cfg = cfg

    def __call__(self, x_btd, positions_bt, allowed_bts, cache: LayerCache | None):
        """``allowed_bts``: the mask over this call's keys (the new tokens without a cache, the
        whole cache with one), or None for plain causal attention within this call's tokens (no
        cache, or a fresh one being filled from position 0): the fused kernel (cuDNN flash
        attention on GPU); the new keys/values are still written. Shared by every layer."""
        cfg = self.cfg
        b, t, _ = x_btd.shape
        qkv = self.c_attn(x_btd).reshape(b, t, 3, cfg.n_heads, cfg.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if cache is not None:
            cache = cache_write(cache, k, v, positions_bt)
        if cache is None or allowed_bts is None:
            out = attention(q, k, v, allowed_bts)
        else:
            out = attention(q, cache.k, cache.v, allowed_bts)
        return self.c_proj(out.reshape(b, t, -1)), cache


class Block(nnx.Module):
    """Pre-LayerNorm block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.ln_1 = LayerNorm(cfg.d_model, cfg.norm_eps, dtype=dtype)
        self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.ln_2 = LayerNorm(cfg.d_model, cfg.norm_eps, dtype=dtype)
        ffn = GeluMLP if cfg.prunepath is None else PrunePathFFN
        self.mlp = ffn(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, allowed, cache, ffn_arg):
        h, cache = self.attn(self.ln_1(x), positions, allowed, cache)
        x = x + h
        h, stats = self.mlp(self.ln_2(x), ffn_arg)
        return x + h, cache, stats


class GPT2Model(nnx.Module):
    """GPT-2 causal LM, or sequence classifier when `cfg.num_labels > 0` (`score` head)."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.wte = Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, rngs=rngs)
        self.wpe = Embed(cfg.max_position, cfg.d_model, dtype=dtype, rngs=rngs)
        self.h = nnx.List([Block(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.n_layers)])
        self.ln_f = LayerNorm(cfg.d_model, cfg.norm_eps, dtype=dtype)
        if cfg.num_labels:
            self.score = Dense(cfg.d_model, cfg.num_labels, bias=False, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        tokens_bt: jax.Array,
        positions_bt: jax.Array | None = None,
        *,
        cache: tuple[LayerCache, ...] | None = None,
        ffn_args=None,
        logit_index_b: jax.Array | None = None,
        fresh_cache: bool = False,
    ) -> ModelOutput:
        """Runs the decoder.

        Args:
            tokens_bt: token ids.
            positions_bt: absolute positions (default `arange(t)`): they index the learned
                position table `wpe`, and with a cache they are where new keys/values go.
            cache: per-layer KV caches to write into and attend over, or None.
            ffn_args: per-layer FFN arguments (see `ffn_arg_for_layer`), ignored by dense FFNs.
            logit_index_b: if given, logits only at `tokens_bt[b, logit_index_b[b]]`. For a
                classifier the default is each row's last non-pad token (transformers' pooling).
            fresh_cache: the caller's promise that ``cache`` holds nothing yet and
                ``positions_bt`` is ``arange(t)`` in every row (a prompt pass): attention is
                then causal within the call's tokens, as without a cache and positions, and runs
                as the fused kernel (cuDNN flash attention on GPU).

        Returns:
            `ModelOutput(logits, cache, ffn_stats per layer)`; logits are float32
            `[b, t or 1, vocab]` for the LM, `[b, num_labels]` for a classifier.
        """
        cfg = self.cfg
        b, t = tokens_bt.shape
        plain_causal = (positions_bt is None and cache is None) or (
            fresh_cache and cache is not None
        )
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        allowed = call_mask(positions_bt, cache, None, plain_causal)
        x = self.wte(tokens_bt) + self.wpe(positions_bt + cfg.position_offset)
        new_cache, stats = [], []
        for i, layer in enumerate(self.h):
            layer_cache = None if cache is None else cache[i]
            x, layer_cache, s = layer(
                x, positions_bt, allowed, layer_cache, ffn_arg_for_layer(ffn_args, i)
            )
            new_cache.append(layer_cache)
            stats.append(s)
        if cfg.num_labels and logit_index_b is None:
            logit_index_b = last_non_pad_index(tokens_bt, cfg.pad_token_id)
        x = self.ln_f(select_positions(x, logit_index_b))
        if cfg.num_labels:
            logits = jnp.einsum(
                "bd,dl->bl", x[:, 0], self.score.kernel[...], preferred_element_type=jnp.float32
            )
        else:
            logits = self.wte.attend(x)
        return ModelOutput(
            logits=logits,
            cache=None if cache is None else tuple(new_cache),
            ffn_stats=tuple(stats),
        )
