"""Tiny random Hugging Face checkpoints written locally (torch CPU + transformers), never fetched.

Each builder returns (directory, torch model in eval mode) so tests can compare our logits with
transformers' on the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _randomise(model, seed: int) -> None:
    """Fresh non-trivial values for every tensor, norms included (defaults are all ones/zeros)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if ("norm" in name and "weight" in name) else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)


def save_tiny(model, directory: Path, seed: int = 0):
    """Randomises, saves as safetensors and returns the eval-mode model."""
    _randomise(model, seed)
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


# Shapes every tiny causal LM shares; each builder adds what its architecture needs.
_TINY_DECODER = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def _tiny_causal_lm(config_name: str, model_name: str, directory, seed, defaults, overrides):
    import torch
    import transformers

    kw = {**_TINY_DECODER, **defaults, **overrides}
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**kw)
    return save_tiny(getattr(transformers, model_name)(config), directory, seed)


def tiny_llama(directory: Path, seed: int = 0, **overrides):
    defaults = dict(rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    return _tiny_causal_lm("LlamaConfig", "LlamaForCausalLM", directory, seed, defaults, overrides)


def tiny_qwen2(directory: Path, seed: int = 0, **overrides):
    defaults = dict(rope_theta=1e6, tie_word_embeddings=True)
    return _tiny_causal_lm("Qwen2Config", "Qwen2ForCausalLM", directory, seed, defaults, overrides)


def tiny_mistral(directory: Path, seed: int = 0, **overrides):
    defaults = dict(num_key_value_heads=1, head_dim=16, sliding_window=8)
    return _tiny_causal_lm(
        "MistralConfig", "MistralForCausalLM", directory, seed, defaults, overrides
    )


def torch_logits(model, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kw = {}
        if attention_mask is not None:
            kw["attention_mask"] = torch.tensor(attention_mask)
        return model(torch.tensor(ids), **kw).logits.float().numpy()


def edit_config(directory: Path, **changes) -> None:
    """Rewrites keys of a saved config.json (for bad-input tests)."""
    p = Path(directory) / "config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


def _save_tiny_layernorm(model, directory: Path, seed: int = 0):
    """`save_tiny` for models whose norms are named `ln_*`/`LayerNorm` (not matched by `norm`).

    `_randomise` would give those weights ~0.1 scale, shrinking every activation so that errors hide
    below the tolerance; here they are re-drawn around 1 like other families' norm weights.
    """
    import torch

    _randomise(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = any(k in name for k in ("ln_1.", "ln_2.", "ln_f.", "LayerNorm."))
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def _gpt2_config(**overrides):
    from transformers import GPT2Config

    kw = dict(
        vocab_size=97,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_inner=96,
        n_positions=64,
        layer_norm_epsilon=1e-5,
        activation_function="gelu_new",
    )
    kw.update(overrides)
    return GPT2Config(**kw)


def tiny_gpt2(directory: Path, seed: int = 0, **overrides):
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return _save_tiny_layernorm(GPT2LMHeadModel(_gpt2_config(**overrides)), directory, seed)


def tiny_gpt2_cls(directory: Path, seed: int = 0, **overrides):
    import torch
    from transformers import GPT2ForSequenceClassification

    overrides = {"num_labels": 3, "pad_token_id": 0, **overrides}
    torch.manual_seed(seed)
    model = GPT2ForSequenceClassification(_gpt2_config(**overrides))
    return _save_tiny_layernorm(model, directory, seed)


def _bert_kwargs(**overrides):
    kw = dict(
        vocab_size=97,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
    )
    kw.update(overrides)
    return kw


def tiny_bert(directory: Path, seed: int = 0, **overrides):
    """A bare `BertModel` (unprefixed tensor names, pooler included), like a sentence encoder."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    model = BertModel(BertConfig(**_bert_kwargs(**overrides)))
    return _save_tiny_layernorm(model, directory, seed)


def tiny_bert_cls(directory: Path, seed: int = 0, **overrides):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(**_bert_kwargs(**{"num_labels": 3, **overrides}))
    return _save_tiny_layernorm(BertForSequenceClassification(cfg), directory, seed)


def tiny_roberta(directory: Path, seed: int = 0, **overrides):
    """A bare `RobertaModel`; position ids depend on the pad id (1), table has pad+1 extra rows."""
    import torch
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(seed)
    kw = _bert_kwargs(**{"type_vocab_size": 1, "pad_token_id": 1, "max_position_embeddings": 66})
    kw.update(overrides)
    return _save_tiny_layernorm(RobertaModel(RobertaConfig(**kw)), directory, seed)


def tiny_roberta_cls(directory: Path, seed: int = 0, **overrides):
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    kw = _bert_kwargs(
        **{"type_vocab_size": 1, "pad_token_id": 1, "max_position_embeddings": 66, "num_labels": 3}
    )
    kw.update(overrides)
    return _save_tiny_layernorm(
        RobertaForSequenceClassification(RobertaConfig(**kw)), directory, seed
    )


# ----------------------------------------------------------------------------- tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer(template: str = CHATML):
    """Byte-level BPE with no merges (one token per byte: decodes exactly) + chat specials."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers

    from prunepath_jax.tokenizer import Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = HF(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<eos>", "<|im_start|>", "<|im_end|>"])
    return Tokenizer(tok, {"eos_token": "<eos>", "pad_token": "<pad>", "chat_template": template})
