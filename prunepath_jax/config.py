"""Model configuration: one frozen dataclass shared by every family.

Hugging Face configs are translated into this (see `prunepath_jax.hf.configs`) so model code never
reads a raw config dict; that keeps the allowlist of handled keys in one place per family.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. Only types whose math we implement exist here.

    Attributes:
        kind: "linear" (positions divided by `factor`) or "llama3" (Llama 3.1 band-wise scaling).
        factor: the scaling factor.
        low_freq_factor: llama3 only.
        high_freq_factor: llama3 only.
        original_max_position: llama3 only, the pre-training context length.
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class PrunePathConfig:
    """How a model's FFNs are split into routed experts (DESIGN.md section 2).

    Attributes:
        group_size: neurons per expert G (E = d_ff / G experts per layer).
        rule: "paper" (top-1, then experts while the cumulative mass stays below tau) or
            "nucleus" (smallest prefix whose mass reaches tau).
        gate: "sigmoid" (each selected expert scaled by sigmoid of its raw router logit, as in the
            paper) or "none" (scale 1: exactly the dense FFN when every expert is active).
        k_min: fewest experts per token.
        k_max: most experts per token (None: all); the gathered compute path needs it static.
    """

    group_size: int = 32
    rule: str = "paper"
    gate: str = "sigmoid"
    k_min: int = 1
    k_max: int | None = None

    def __post_init__(self):
        if self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        if self.rule not in ("paper", "nucleus"):
            raise ValueError(f"rule must be 'paper' or 'nucleus', got {self.rule!r}")
        if self.gate not in ("sigmoid", "none"):
            raise ValueError(f"gate must be 'sigmoid' or 'none', got {self.gate!r}")
        if self.k_min < 1 or (self.k_max is not None and self.k_max < self.k_min):
            raise ValueError(f"need 1 <= k_min <= k_max, got {self.k_min}, {self.k_max}")

    def n_experts(self, d_ff: int) -> int:
        if d_ff % self.group_size:
            raise ValueError(
                f"group_size {self.group_size} does not divide the FFN width {d_ff}; choose a "
                "divisor"
            )
        return d_ff // self.group_size


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a transformer we can run.

    Attributes:
        family: which module implements it: "llama" (Llama/Mistral/Qwen2/SmolLM), "gpt2", "bert".
        model_type: the Hugging Face `model_type` it came from (llama, qwen2, mistral, gpt2, bert,
            roberta), kept for conversion back and for messages.
        vocab_size: rows of the token embedding.
        d_model: hidden width d.
        d_ff: FFN width f.
        n_layers: number of transformer blocks L.
        n_heads: query heads.
        n_kv_heads: key/value heads (GQA when < n_heads).
        head_dim: per-head width.
        max_position: longest context the checkpoint supports.
        norm_eps: RMSNorm/LayerNorm epsilon.
        activation: "silu" (SwiGLU), "gelu" (erf), "gelu_new" (tanh approximation).
        rope_theta: RoPE base; None for learned/absolute positions.
        rope_scaling: optional RoPE scaling.
        qkv_bias: q/k/v projections carry a bias (Qwen2, GPT-2, BERT).
        o_bias: output projection carries a bias.
        mlp_bias: FFN projections carry biases.
        tie_embeddings: the LM head reuses the token embedding.
        sliding_window: attend only to the last `sliding_window` keys (Mistral), or None.
        type_vocab_size: BERT token-type embeddings (0 when absent).
        position_offset: added to position ids before the learned position lookup (RoBERTa:
            padding_idx + 1).
        pad_token_id: padding id (RoBERTa position ids depend on it).
        num_labels: classification head outputs (0: no head).
        bos_token_id: beginning-of-sequence id or None.
        eos_token_ids: ids that end generation.
        prunepath: None for dense FFNs; otherwise every FFN is a PrunePath routed-expert FFN.
    """

    family: str
    model_type: str
    vocab_size: int
    d_model: int
    d_ff: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_position: int
    norm_eps: float
    activation: str
    rope_theta: float | None = None
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None
    type_vocab_size: int = 0
    position_offset: int = 0
    pad_token_id: int | None = None
    num_labels: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    prunepath: PrunePathConfig | None = None

    def __post_init__(self):
        if self.prunepath is not None:
            self.prunepath.n_experts(self.d_ff)
        if self.d_model <= 0 or self.d_ff <= 0 or self.n_layers <= 0:
            raise ValueError(f"bad sizes in {self}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv={self.n_kv_heads}")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        if d.get("prunepath") is not None:
            d["prunepath"] = PrunePathConfig(**d["prunepath"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    @property
    def n_experts(self) -> int:
        """Experts per FFN layer (0 for a dense model)."""
        return 0 if self.prunepath is None else self.prunepath.n_experts(self.d_ff)

    @property
    def n_params(self) -> int:
        """Approximate parameter count (weights only), for messages and FLOP estimates."""
        d, f, L = self.d_model, self.d_ff, self.n_layers
        attn = d * self.head_dim * (self.n_heads * 2 + self.n_kv_heads * 2)
        ffn = d * f * (3 if self.activation == "silu" else 2)
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return L * (attn + ffn) + self.vocab_size * d + head


def _llama_preset(**kw) -> ModelConfig:
    base = dict(
        family="llama", model_type="llama", max_position=8192, norm_eps=1e-5, activation="silu"
    )
    base.update(kw)
    return ModelConfig(**base)


# Named architectures (random-weight benchmarks and GPU-sized training presets). Real weights come
# from checkpoints; these only fix shapes.
PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": _llama_preset(
        vocab_size=49152, d_model=576, d_ff=1536, n_layers=30, n_heads=9, n_kv_heads=3,
        head_dim=64, rope_theta=1e5, tie_embeddings=True, eos_token_ids=(2,),
    ),
    "llama-3.2-1b": _llama_preset(
        vocab_size=128256, d_model=2048, d_ff=8192, n_layers=16, n_heads=32, n_kv_heads=8,
        head_dim=64, rope_theta=5e5, tie_embeddings=True,
        rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
    ),
    "llama-3-8b": _llama_preset(
        vocab_size=128256, d_model=4096, d_ff=14336, n_layers=32, n_heads=32, n_kv_heads=8,
        head_dim=128, rope_theta=5e5, tie_embeddings=False,
    ),
}  # fmt: skip
