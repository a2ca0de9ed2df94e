"""Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2): RMSNorm, RoPE, GQA, SwiGLU FFN.

The FFN is its own module (`SwiGLU`) with the call signature every FFN shares:
`ffn(x_btd, ffn_arg) -> (y_btd, stats)`. Dense FFNs ignore `ffn_arg` and return `stats=None`;
PrunePath FFNs take routing arguments (tau, ...) and return routing statistics, so the model
forward stays a pure function of (params, inputs) with statistics returned, never stored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from prunepath_jax.config import ModelConfig, RopeScaling
from prunepath_jax.hf import configs as hfc
from prunepath_jax.hf.source import Source
from prunepath_jax.models import decode_proj as dp
from prunepath_jax.models.common import ModelOutput, ffn_arg_for_layer, select_positions
from prunepath_jax.models.decode_attention import cached_attention, rope_step
from prunepath_jax.models.layers import (
    Dense,
    Embed,
    Kernel,
    LayerCache,
    RMSNorm,
    apply_rope,
    attention,
    cache_write,
    call_mask,
    logits_einsum,
    rope_inv_freq,
    rope_tables,
)
from prunepath_jax.nn import PrunePathFFN

MODEL_TYPES = ("llama", "mistral", "qwen2")

_HANDLED = frozenset(
    {
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
        "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
        "rope_parameters", "attention_bias", "attention_dropout", "mlp_bias",
        "tie_word_embeddings", "pretraining_tp", "sliding_window", "use_sliding_window",
        "max_window_layers", "layer_types", "num_labels",
    }
)  # fmt: skip


def _rope(cfg: dict) -> tuple[float, RopeScaling | None]:
    """RoPE theta and scaling from either the transformers-4 or the transformers-5 layout."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    spec = {**scaling, **{k: v for k, v in params.items() if k != "rope_theta"}}
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", float(spec["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3",
            float(spec["factor"]),
            float(spec["low_freq_factor"]),
            float(spec["high_freq_factor"]),
            int(spec["original_max_position_embeddings"]),
        )
    raise hfc.UnsupportedConfigError(
        f"config key 'rope_scaling' type {kind!r} is not supported (supported: default, linear, "
        "llama3)"
    )


def from_hf_config(cfg: dict) -> ModelConfig:
    """Builds a `ModelConfig` from a Llama/Mistral/Qwen2 `config.json` dict, or raises."""
    model_type = cfg.get("model_type", "llama")
    family = f"llama-family ({model_type})"
    hfc.check_keys(cfg, _HANDLED, family)
    hfc.require(cfg, "hidden_act", {"silu"}, family)
    hfc.require(cfg, "pretraining_tp", {1}, family)
    hfc.require(cfg, "mlp_bias", {False}, family)
    window = cfg.get("sliding_window")
    if model_type == "qwen2":
        # Qwen2 applies its window only to some layers; we implement full attention only.
        if cfg.get("use_sliding_window"):
            raise hfc.UnsupportedConfigError(
                "config key 'use_sliding_window' = True is not supported for qwen2"
            )
        types = set(cfg.get("layer_types") or ["full_attention"])
        if types != {"full_attention"}:
            raise hfc.UnsupportedConfigError(f"config key 'layer_types' = {sorted(types)}")
        window = None
    elif "use_sliding_window" in cfg or "layer_types" in cfg:
        hfc.require(cfg, "use_sliding_window", {False}, family)
        hfc.require(cfg, "layer_types", {None}, family)
    theta, scaling = _rope(cfg)
    n_heads = cfg["num_attention_heads"]
    d = cfg["hidden_size"]
    return ModelConfig(
        family="llama",
        model_type=model_type,
        vocab_size=cfg["vocab_size"],
        d_model=d,
        d_ff=cfg["intermediate_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or d // n_heads,
        max_position=cfg.get("max_position_embeddings", 2048),
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        activation="silu",
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        o_bias=bool(cfg.get("attention_bias", False)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=window,
        pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=hfc.eos_ids(cfg),
    )


def hf_param_map(cfg: ModelConfig) -> dict[tuple, Source | tuple[str, bool]]:
    """Our parameter path -> where it comes from in a Hugging Face checkpoint.

    q/k/v are read into one `qkv_proj` kernel `[d, (h + 2 kv) * hd]` and gate/up into one
    `gate_up_proj` kernel `[d, 2, f]`: one matrix-vector product per group instead of three/two,
    which matters for launch-bound decode of small models. The `[d, 2, f]` layout keeps each
    neuron's gate and up columns side by side for the PrunePath expert blocks.
    """
    m: dict[tuple, Source | tuple[str, bool]] = {
        ("embed_tokens", "embedding"): ("model.embed_tokens.weight", False)
    }
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}"
        m[("layers", i, "input_layernorm", "weight")] = (f"{pre}.input_layernorm.weight", False)
        m[("layers", i, "post_attention_layernorm", "weight")] = (
            f"{pre}.post_attention_layernorm.weight",
            False,
        )
        attn = f"{pre}.self_attn"
        qkv = tuple(f"{attn}.{n}_proj" for n in "qkv")
        m[("layers", i, "self_attn", "qkv_proj", "kernel")] = Source(
            tuple(f"{n}.weight" for n in qkv), True, "concat", 1
        )
        if cfg.qkv_bias:
            m[("layers", i, "self_attn", "qkv_proj", "bias")] = Source(
                tuple(f"{n}.bias" for n in qkv), False, "concat", 0
            )
        m[("layers", i, "self_attn", "o_proj", "kernel")] = (f"{attn}.o_proj.weight", True)
        if cfg.o_bias:
            m[("layers", i, "self_attn", "o_proj", "bias")] = (f"{attn}.o_proj.bias", False)
        m[("layers", i, "mlp", "gate_up_proj", "kernel")] = Source(
            (f"{pre}.mlp.gate_proj.weight", f"{pre}.mlp.up_proj.weight"), True, "stack", 1
        )
        m[("layers", i, "mlp", "down_proj", "kernel")] = (f"{pre}.mlp.down_proj.weight", True)
    m[("norm", "weight")] = ("model.norm.weight", False)
    if not cfg.tie_embeddings:
        m[("lm_head", "kernel")] = ("lm_head.weight", True)
    return m


class SwiGLU(nnx.Module):
    """Dense SwiGLU FFN: `down(silu(x @ Wg) * (x @ Wu))`. The piece PrunePath replaces.

    `gate_up_proj.kernel` is `[d, 2, f]` (index 0 gate, 1 up) so one product computes both.
    """

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.gate_up_proj = Kernel((cfg.d_model, 2, cfg.d_ff), dtype=dtype, rngs=rngs)
        self.down_proj = Dense(cfg.d_ff, cfg.d_model, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x_btd, ffn_arg=None):
        h_btcf = jnp.einsum("btd,dcf->btcf", x_btd, self.gate_up_proj.kernel[...])
        h = jax.nn.silu(h_btcf[:, :, 0]) * h_btcf[:, :, 1]
        return self.down_proj(h), None


class Attention(nnx.Module):
    """Grouped-query attention with RoPE and an optional static KV cache.

    `attn_impl` (static, see `models.decode_attention`) picks how decode steps attend over the
    cache: "xla" (default), or "pallas" for the split-K kernel where it can run.
    """

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d, hd = cfg.d_model, cfg.head_dim
        n_qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * hd
        self.qkv_proj = Dense(d, n_qkv, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Dense(cfg.n_heads * hd, d, bias=cfg.o_bias, dtype=dtype, rngs=rngs)
        self.cfg = cfg
        self.attn_impl = "xla"
        self.proj_impl = "xla"  # see models.decode_proj
        # The transposed DecodeWeight copies set_projections makes for the kernel (None: none).
        self.qkv_nd, self.o_nd = nnx.data(None), nnx.data(None)

    def __call__(self, x_btd, positions_bt, rope, allowed_bts, cache: LayerCache | None):
        """`rope` = (cos, sin) tables, `allowed_bts` = mask over this call's keys (the new tokens
        without a cache, the whole cache with one: `causal_mask(positions_bt, arange(s),
        window)`, which the decode kernel rebuilds from `positions_bt`), or None for plain causal
        attention within this call's tokens (no cache, or a fresh one being filled from
        position 0: the new keys/values are still written); both shared by every layer."""
        b, t, _ = x_btd.shape
        out, cache = self._attend(self.qkv_proj(x_btd), positions_bt, rope, allowed_bts, cache)
        return self.o_proj(out.reshape(b, t, -1)), cache

    def residual_step(self, x_btd, norm, positions_bt, rope, allowed_bts, cache):
        """``x + attn(rms_norm(x, *norm))`` of a one-token step with both projections in the
        projection kernel (`models.decode_proj`: the norm, bias and residual inside), or None
        where it cannot run (the block then takes the XLA path)."""
        b, t, d = x_btd.shape
        x_td = x_btd.reshape(b * t, d)
        qkv = None
        if t == 1:
            qkv = dp.project(self.proj_impl, x_td, self.qkv_proj, self.qkv_nd, norm=norm)
        if qkv is None:
            return None
        out, cache = self._attend(qkv.reshape(b, t, -1), positions_bt, rope, allowed_bts, cache)
        o_td = out.reshape(b * t, -1)
        y = dp.project(self.proj_impl, o_td, self.o_proj, self.o_nd, resid_tn=x_td)
        if y is None:  # e.g. a cache dtype other than the weights' (attention output): XLA
            y = x_td + self.o_proj(o_td)
        return y.reshape(b, t, d), cache

    def _attend(self, qkv_btn, positions_bt, rope, allowed_bts, cache):
        """Attention from the QKV projection's output: ``(out [b, t, h, hd], cache)``."""
        cfg = self.cfg
        b, t, _ = qkv_btn.shape
        h, kv = cfg.n_heads, cfg.n_kv_heads
        qkv = qkv_btn.reshape(b, t, h + 2 * kv, cfg.head_dim)
        if cache is not None and t == 1 and allowed_bts is not None:  # decode: RoPE + write +
            step = rope_step(qkv, rope, cache, positions_bt, impl=self.attn_impl,
                             window=cfg.sliding_window, n_heads=h)  # fmt: skip
            if step is not None:
                return step
        qk = apply_rope(qkv[:, :, : h + kv], *rope)  # one rotation for q and k together
        q, k, v = qk[:, :, :h], qk[:, :, h:], qkv[:, :, h + kv :]
        if cache is not None:
            cache = cache_write(cache, k, v, positions_bt)
        if cache is None or allowed_bts is None:  # None: causal within this call (fused kernel)
            out = attention(q, k, v, allowed_bts)
        else:
            out = cached_attention(
                q, cache, allowed_bts, positions_bt, impl=self.attn_impl, window=cfg.sliding_window
            )
        return out, cache


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)); x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype=dtype)
        ffn = SwiGLU if cfg.prunepath is None else PrunePathFFN
        self.mlp = ffn(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, rope, allowed, cache, ffn_arg):
        ln = self.input_layernorm
        step = self.self_attn.residual_step(
            x, (ln.weight[...], ln.eps), positions, rope, allowed, cache
        )
        if step is not None:  # decode through the projection kernels (models.decode_proj)
            x, cache = step
        else:
            h, cache = self.self_attn(ln(x), positions, rope, allowed, cache)
            x = x + h
        norm = self.post_attention_layernorm
        if isinstance(self.mlp, PrunePathFFN):  # the FFN may fuse its norm (decode kernels)
            h, stats = self.mlp(x, ffn_arg, norm=(norm.weight[...], norm.eps))
        else:
            h, stats = self.mlp(norm(x), ffn_arg)
        return x + h, cache, stats


class LlamaModel(nnx.Module):
    """Causal LM. `__call__(tokens, positions, cache=None, ffn_args=None) -> ModelOutput`."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Block(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype=dtype)
        if not cfg.tie_embeddings:
            self.lm_head = Dense(cfg.d_model, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs)

    def head(self, x_btd: jax.Array) -> jax.Array:
        """Final norm and output logits ``[b, t, vocab]`` float32 of residual rows (shared by
        the forward and the one-launch decode step, ``prunepath_jax.megastep``)."""
        x = self.norm(x_btd)
        if self.cfg.tie_embeddings:
            return self.embed_tokens.attend(x)
        return logits_einsum("btd,dv->btv", x, self.lm_head.kernel[...])

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
            positions_bt: absolute positions (default `arange(t)`); with a cache these are also
                where the new keys/values are written.
            cache: per-layer KV caches to write into and attend over, or None (causal attention
                within `tokens_bt` only).
            ffn_args: per-layer FFN arguments (see `ffn_arg_for_layer`), ignored by dense FFNs.
            logit_index_b: if given, logits only at `tokens_bt[b, logit_index_b[b]]` (prefill).
            fresh_cache: the caller's promise that ``cache`` holds nothing yet and
                ``positions_bt`` is ``arange(t)`` in every row (a prompt pass). Attention over the
                cache is then causal attention within the call's tokens, which runs as the fused
                kernel (cuDNN flash attention on GPU) instead of materialising ``[t, s]`` scores
                per head; the keys/values are written as usual. Ignored for sliding-window
                models.

        Returns:
            `ModelOutput(logits [b, t or 1, vocab] float32, cache, ffn_stats per layer)`.
        """
        cfg = self.cfg
        b, t = tokens_bt.shape
        # Plain causal attention over the call's own tokens goes to the fused kernel (cuDNN flash
        # attention on GPU; training and long prefill never materialise [t, t] scores there).
        plain_causal = cfg.sliding_window is None and (
            (positions_bt is None and cache is None) or (fresh_cache and cache is not None)
        )
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        rope = rope_tables(
            positions_bt, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        )
        allowed = call_mask(positions_bt, cache, cfg.sliding_window, plain_causal)
        x = self.embed_tokens(tokens_bt)
        new_cache, stats = [], []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache[i]
            x, layer_cache, s = layer(
                x, positions_bt, rope, allowed, layer_cache, ffn_arg_for_layer(ffn_args, i)
            )
            new_cache.append(layer_cache)
            stats.append(s)
        return ModelOutput(
            logits=self.head(select_positions(x, logit_index_b)),
            cache=None if cache is None else tuple(new_cache),
            ffn_stats=tuple(stats),
        )
