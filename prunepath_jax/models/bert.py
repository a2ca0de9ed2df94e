"""BERT and RoBERTa encoders: learned positions + token types, post-LayerNorm blocks, GELU FFN.

The FFN module (`GeluFFN`) is only `output.dense(act(intermediate.dense(x)))`; the residual add and
the LayerNorm that follow it in BERT stay in the block, so PrunePath replaces exactly the FFN and
keeps the shared signature `ffn(x_btd, ffn_arg) -> (y_btd, stats)`.

Two entry points, because an encoder has no vocabulary logits: `encode` gives the final hidden
states (what sentence-embedding models use), `__call__` gives the sequence-classification logits
of a `*ForSequenceClassification` checkpoint as a `ModelOutput`.

Checkpoint layout: a bare `BertModel`/`RobertaModel` save has unprefixed tensor names (e.g. the
sentence-transformers MiniLM), a `*ForSequenceClassification` save prefixes the encoder with
`bert.`/`roberta.`. `hf_param_map` only sees the config, so `from_hf_config` reads the layout from
`architectures` and records it as `num_labels` (> 0 exactly when the checkpoint is a prefixed
classifier); other heads (masked LM, ...) are refused rather than half-loaded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from prunepath_jax.config import ModelConfig
from prunepath_jax.hf import configs as hfc
from prunepath_jax.models.common import ModelOutput, ffn_arg_for_layer
from prunepath_jax.models.layers import Dense, Embed, LayerNorm, activation, attention
from prunepath_jax.nn import PrunePathFFN

MODEL_TYPES = ("bert", "roberta")

_HANDLED = frozenset(
    {
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "intermediate_size", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
        "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "position_embedding_type",
        "num_labels", "tie_word_embeddings",
    }
)  # fmt: skip

_ACTIVATIONS = {"gelu", "gelu_new", "gelu_pytorch_tanh"}

# architectures entry -> has a sequence-classification head (and so a `<model_type>.` prefix)
_ARCHITECTURES = {
    "bert": {"BertModel": False, "BertForSequenceClassification": True},
    "roberta": {"RobertaModel": False, "RobertaForSequenceClassification": True},
}


def _is_classifier(cfg: dict, model_type: str) -> bool:
    known = _ARCHITECTURES[model_type]
    archs = cfg.get("architectures") or [next(iter(known))]
    for arch in archs:
        if arch in known:
            return known[arch]
    raise hfc.UnsupportedConfigError(
        f"config key 'architectures' = {archs!r} is not supported by the {model_type} loader "
        f"(supported: {sorted(known)})"
    )


def from_hf_config(cfg: dict) -> ModelConfig:
    """Builds a `ModelConfig` from a BERT/RoBERTa `config.json` dict, or raises naming the key."""
    model_type = cfg.get("model_type", "bert")
    if model_type not in MODEL_TYPES:
        raise hfc.UnsupportedConfigError(f"config key 'model_type' = {model_type!r} is not bert")
    family = model_type
    hfc.check_keys(cfg, _HANDLED, family)
    hfc.require(cfg, "hidden_act", _ACTIVATIONS, family)
    hfc.require(cfg, "position_embedding_type", {"absolute"}, family)
    hfc.require(cfg, "is_decoder", {False}, family)
    hfc.require(cfg, "add_cross_attention", {False}, family)
    # tie_word_embeddings only concerns a masked-LM head, which we do not build.
    classify = _is_classifier(cfg, model_type)
    n_labels = hfc.num_labels(cfg) if classify else 0
    if classify and n_labels <= 0:
        raise hfc.UnsupportedConfigError("config key 'num_labels' must be > 0 for a classifier")
    d = cfg.get("hidden_size", 768)
    n_heads = cfg.get("num_attention_heads", 12)
    if d % n_heads:
        raise hfc.UnsupportedConfigError(
            f"config key 'hidden_size' = {d} is not a multiple of num_attention_heads"
        )
    pad = cfg.get("pad_token_id", 1 if model_type == "roberta" else 0)
    n_pos = cfg.get("max_position_embeddings", 512)
    offset = 0
    if model_type == "roberta":
        if pad is None:
            raise hfc.UnsupportedConfigError("config key 'pad_token_id' is required for roberta")
        # Position ids start after the padding row: real tokens use rows pad+1, pad+2, ...
        offset = pad + 1
    return ModelConfig(
        family="bert",
        model_type=model_type,
        vocab_size=cfg.get("vocab_size", 30522),
        d_model=d,
        d_ff=cfg.get("intermediate_size", 3072),
        n_layers=cfg.get("num_hidden_layers", 12),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=d // n_heads,
        max_position=n_pos - offset,
        norm_eps=cfg.get("layer_norm_eps", 1e-12),
        activation=cfg.get("hidden_act", "gelu"),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_embeddings=False,
        type_vocab_size=cfg.get("type_vocab_size", 2),
        position_offset=offset,
        pad_token_id=pad,
        num_labels=n_labels,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=hfc.eos_ids(cfg),
    )


def hf_param_map(cfg: ModelConfig) -> dict[tuple, tuple[str, bool]]:
    """Our parameter path -> (Hugging Face tensor name, transpose?). nn.Linear is [out, in]."""
    pre = f"{cfg.model_type}." if cfg.num_labels else ""
    m: dict[tuple, tuple[str, bool]] = {}

    def linear(path: tuple, hf: str) -> None:
        m[(*path, "kernel")] = (f"{hf}.weight", True)
        m[(*path, "bias")] = (f"{hf}.bias", False)

    def norm(path: tuple, hf: str) -> None:
        m[(*path, "weight")] = (f"{hf}.weight", False)
        m[(*path, "bias")] = (f"{hf}.bias", False)

    for ours in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        m[("embeddings", ours, "embedding")] = (f"{pre}embeddings.{ours}.weight", False)
    norm(("embeddings", "norm"), f"{pre}embeddings.LayerNorm")
    for i in range(cfg.n_layers):
        hf = f"{pre}encoder.layer.{i}"
        for name in ("query", "key", "value"):
            linear(("layers", i, "attention", name), f"{hf}.attention.self.{name}")
        linear(("layers", i, "attention", "output"), f"{hf}.attention.output.dense")
        norm(("layers", i, "attention_norm"), f"{hf}.attention.output.LayerNorm")
        linear(("layers", i, "mlp", "intermediate"), f"{hf}.intermediate.dense")
        linear(("layers", i, "mlp", "output"), f"{hf}.output.dense")
        norm(("layers", i, "output_norm"), f"{hf}.output.LayerNorm")
    if cfg.num_labels and cfg.model_type == "bert":
        linear(("pooler",), f"{pre}pooler.dense")
        linear(("classifier",), "classifier")
    elif cfg.num_labels:
        linear(("classifier", "dense"), "classifier.dense")
        linear(("classifier", "out_proj"), "classifier.out_proj")
    return m


def position_ids(cfg: ModelConfig, tokens_bt: jax.Array) -> jax.Array:
    """Rows of the learned position table to use, `[b, t]`.

    BERT: `arange(t)`. RoBERTa (transformers' `create_position_ids_from_input_ids`): real tokens
    count up from `pad + 1` and pad tokens (found by id, not by the attention mask) use row `pad`.
    """
    b, t = tokens_bt.shape
    if cfg.model_type != "roberta":
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) + cfg.position_offset
    real_bt = (tokens_bt != cfg.pad_token_id).astype(jnp.int32)
    return (jnp.cumsum(real_bt, axis=1) * real_bt - 1) + cfg.position_offset


def _logits32(x_bd: jax.Array, dense: Dense) -> jax.Array:
    """A head's final projection with float32 accumulation, as every family's logits are."""
    y = jnp.einsum("bd,dl->bl", x_bd, dense.kernel[...], preferred_element_type=jnp.float32)
    return y + dense.bias[...].astype(jnp.float32)


class GeluFFN(nnx.Module):
    """Dense BERT FFN: `output(act(intermediate(x)))`, no residual/norm. PrunePath replaces it."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.intermediate = Dense(cfg.d_model, cfg.d_ff, bias=True, dtype=dtype, rngs=rngs)
        self.output = Dense(cfg.d_ff, cfg.d_model, bias=True, dtype=dtype, rngs=rngs)
        self.act_name = cfg.activation

    def __call__(self, x_btd, ffn_arg=None):
        return self.output(activation(self.act_name)(self.intermediate(x_btd))), None


class SelfAttention(nnx.Module):
    """Bidirectional multi-head attention over non-padding keys, with its output projection."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.d_model
        self.query = Dense(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.key = Dense(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.value = Dense(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.output = Dense(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.cfg = cfg

    def __call__(self, x_btd, allowed_bts):
        cfg = self.cfg
        b, t, _ = x_btd.shape
        q = self.query(x_btd).reshape(b, t, cfg.n_heads, cfg.head_dim)
        k = self.key(x_btd).reshape(b, t, cfg.n_heads, cfg.head_dim)
        v = self.value(x_btd).reshape(b, t, cfg.n_heads, cfg.head_dim)
        return self.output(attention(q, k, v, allowed_bts).reshape(b, t, -1))


class Block(nnx.Module):
    """Post-LayerNorm block: x = norm(x + attn(x)); x = norm(x + ffn(x))."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.attention = SelfAttention(cfg, dtype=dtype, rngs=rngs)
        self.attention_norm = LayerNorm(cfg.d_model, cfg.norm_eps, dtype=dtype)
        ffn = GeluFFN if cfg.prunepath is None else PrunePathFFN
        self.mlp = ffn(cfg, dtype=dtype, rngs=rngs)
        self.output_norm = LayerNorm(cfg.d_model, cfg.norm_eps, dtype=dtype)

    def __call__(self, x, allowed_bts, ffn_arg):
        x = self.attention_norm(x + self.attention(x, allowed_bts))
        h, stats = self.mlp(x, ffn_arg)
        return self.output_norm(x + h), stats


class Embeddings(nnx.Module):
    """Word + learned position + token-type embeddings, then LayerNorm."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.d_model
        n_pos = cfg.max_position + cfg.position_offset
        self.word_embeddings = Embed(cfg.vocab_size, d, dtype=dtype, rngs=rngs)
        self.position_embeddings = Embed(n_pos, d, dtype=dtype, rngs=rngs)
        self.token_type_embeddings = Embed(max(cfg.type_vocab_size, 1), d, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(d, cfg.norm_eps, dtype=dtype)

    def __call__(self, tokens_bt, positions_bt, token_types_bt):
        x = self.word_embeddings(tokens_bt) + self.token_type_embeddings(token_types_bt)
        return self.norm(x + self.position_embeddings(positions_bt))


class RobertaClassificationHead(nnx.Module):
    """RoBERTa's head on `<s>`: `out_proj(tanh(dense(h[:, 0])))`."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.dense = Dense(cfg.d_model, cfg.d_model, bias=True, dtype=dtype, rngs=rngs)
        self.out_proj = Dense(cfg.d_model, cfg.num_labels, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, hidden_btd):
        return _logits32(jnp.tanh(self.dense(hidden_btd[:, 0])), self.out_proj)


class BertModel(nnx.Module):
    """BERT/RoBERTa encoder; with `cfg.num_labels > 0` also its sequence-classification head."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Block(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.n_layers)])
        if cfg.num_labels and cfg.model_type == "bert":
            self.pooler = Dense(cfg.d_model, cfg.d_model, bias=True, dtype=dtype, rngs=rngs)
            self.classifier = Dense(cfg.d_model, cfg.num_labels, bias=True, dtype=dtype, rngs=rngs)
        elif cfg.num_labels:
            self.classifier = RobertaClassificationHead(cfg, dtype=dtype, rngs=rngs)

    def encode(
        self,
        tokens_bt: jax.Array,
        attention_mask_bt: jax.Array | None = None,
        token_type_ids_bt: jax.Array | None = None,
        *,
        ffn_args=None,
    ) -> tuple[jax.Array, tuple]:
        """Final hidden states.

        Args:
            tokens_bt: token ids (RoBERTa derives position ids from which of them are padding).
            attention_mask_bt: 1 for real tokens, 0 for padding (padding keys are never attended;
                padded query rows are computed but meaningless). Default: all real.
            token_type_ids_bt: segment ids, default zeros.
            ffn_args: per-layer FFN arguments (see `ffn_arg_for_layer`), ignored by dense FFNs.

        Returns:
            `(hidden [b, t, d] in the parameter dtype, ffn_stats per layer)`.
        """
        b, t = tokens_bt.shape
        if token_type_ids_bt is None:
            token_type_ids_bt = jnp.zeros((b, t), jnp.int32)
        if attention_mask_bt is None:
            attention_mask_bt = jnp.ones((b, t), jnp.int32)
        allowed_bts = jnp.broadcast_to(attention_mask_bt[:, None, :] != 0, (b, t, t))
        x = self.embeddings(tokens_bt, position_ids(self.cfg, tokens_bt), token_type_ids_bt)
        stats = []
        for i, layer in enumerate(self.layers):
            x, s = layer(x, allowed_bts, ffn_arg_for_layer(ffn_args, i))
            stats.append(s)
        return x, tuple(stats)

    def __call__(
        self,
        tokens_bt: jax.Array,
        attention_mask_bt: jax.Array | None = None,
        token_type_ids_bt: jax.Array | None = None,
        *,
        ffn_args=None,
    ) -> ModelOutput:
        """Sequence-classification logits (pooled from the first token, `[CLS]`/`<s>`).

        Returns:
            `ModelOutput(logits [b, num_labels] float32, cache None, ffn_stats per layer)`.

        Raises:
            ValueError: the checkpoint has no classification head; use `encode` instead.
        """
        if not self.cfg.num_labels:
            raise ValueError(
                f"this {self.cfg.model_type} checkpoint has no classification head "
                "(num_labels = 0); use .encode(...) for hidden states"
            )
        hidden, stats = self.encode(
            tokens_bt, attention_mask_bt, token_type_ids_bt, ffn_args=ffn_args
        )
        if self.cfg.model_type == "bert":
            pooled = jnp.tanh(self.pooler(hidden[:, 0]))
            logits = _logits32(pooled, self.classifier)
        else:
            logits = self.classifier(hidden)
        return ModelOutput(logits=logits, cache=None, ffn_stats=stats)
