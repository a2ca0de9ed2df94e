"""Translating Hugging Face `config.json` dicts into `ModelConfig`, failing loudly.

Every family lists the keys it handles. A key outside that list and outside the generic keys below
is an error naming the key, because a silently ignored key (a new RoPE scaling, a sliding window)
gives a model that runs and is wrong. Keys whose only effect is training-time dropout or bookkeeping
are in `GENERIC_KEYS`.
"""

from __future__ import annotations

from typing import Any

# Keys every PretrainedConfig may carry that do not change inference math.
GENERIC_KEYS = frozenset(
    {
        "_name_or_path", "_attn_implementation", "_attn_implementation_autoset",
        "_commit_hash", "add_cross_attention", "architectures", "bad_words_ids",
        "begin_suppress_tokens", "bos_token_id", "chunk_size_feed_forward",
        "cross_attention_hidden_size",
        "decoder_start_token_id", "diversity_penalty", "do_sample", "dtype", "early_stopping",
        "encoder_no_repeat_ngram_size", "eos_token_id", "exponential_decay_length_penalty",
        "finetuning_task", "forced_bos_token_id", "forced_eos_token_id", "gradient_checkpointing",
        "id2label", "initializer_range", "is_decoder", "is_encoder_decoder", "label2id",
        "length_penalty", "max_length", "min_length", "model_type", "no_repeat_ngram_size",
        "num_beam_groups", "num_beams", "num_return_sequences", "output_attentions",
        "output_hidden_states", "output_scores", "pad_token_id", "prefix", "problem_type",
        "pruned_heads", "remove_invalid_values", "repetition_penalty", "return_dict",
        "return_dict_in_generate", "sep_token_id", "suppress_tokens", "task_specific_params",
        "temperature", "tf_legacy_loss", "tie_encoder_decoder", "tokenizer_class", "top_k",
        "top_p", "torch_dtype", "torchscript", "transformers_version", "typical_p",
        "use_bfloat16", "use_cache", "transformers.js_config", "unsloth_version",
        "keys_to_ignore_at_inference", "classifier_dropout", "summary_type",
        "summary_use_proj", "summary_activation", "summary_proj_to_labels",
        "summary_first_dropout", "torch_compile", "base_model_tp_plan", "base_model_pp_plan",
    }
)  # fmt: skip


class UnsupportedConfigError(ValueError):
    """A Hugging Face config asks for something this loader does not implement."""


def check_keys(cfg: dict, handled: set[str] | frozenset[str], family: str) -> None:
    """Raises `UnsupportedConfigError` naming the first key neither handled nor generic."""
    for key in sorted(cfg):
        if key not in handled and key not in GENERIC_KEYS:
            raise UnsupportedConfigError(
                f"config key {key!r} (= {cfg[key]!r}) is not handled by the {family} loader; "
                "refusing to build a model that might silently ignore it"
            )


def require(cfg: dict, key: str, allowed: Any, family: str) -> None:
    """Raises unless `cfg[key]` is absent or one of the values our math implements."""
    if key in cfg and cfg[key] not in allowed:
        raise UnsupportedConfigError(
            f"config key {key!r} = {cfg[key]!r} is not supported by the {family} loader "
            f"(supported: {sorted(map(repr, allowed))})"
        )


def eos_ids(cfg: dict) -> tuple[int, ...]:
    """`eos_token_id` as a tuple (configs store an int, a list or null)."""
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)


def num_labels(cfg: dict) -> int:
    """Classification labels, from `id2label` when present."""
    if "id2label" in cfg and cfg["id2label"]:
        return len(cfg["id2label"])
    return int(cfg.get("num_labels", 0))
