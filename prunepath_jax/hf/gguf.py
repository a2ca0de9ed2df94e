"""Read a llama.cpp GGUF checkpoint into Hugging Face form: config, tensors, tokenizer.

A GGUF file carries everything a Hugging Face checkpoint does, but in llama.cpp's vocabulary:
tensor names like `blk.3.attn_q.weight`, block-quantised weights, Q/K rows reordered for
llama.cpp's interleaved RoPE kernel, hyper-parameters as `llama.*` metadata keys, and the
tokenizer as token/merge lists. `read_gguf` undoes each of those so the rest of the project only
ever sees Hugging Face names, layouts (`[out, in]` float32 matrices), a `config.json`-style dict
and a `tokenizers.Tokenizer`.

Anything that would silently change the model's math if ignored (RoPE scaling we do not
translate, per-frequency RoPE factors, unknown tensors, partial rotary) raises instead.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import gguf
import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
SUPPORTED_TOKENIZER_MODELS = ("gpt2",)

# general.architecture -> (HF model_type, HF architectures entry, whether llama.cpp permuted Q/K).
# llama.cpp runs Llama with its "normal" (interleaved-pair) RoPE, so its converter reorders Q/K
# rows; Qwen2 runs with the NEOX (half-split) RoPE Hugging Face also uses, so it is stored as is.
_ARCHS = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
}

_TOKEN_CONTROL = 3  # llama.cpp token_type for special tokens like <|im_start|>
_TOKEN_USER_DEFINED = 4  # added tokens matched whole in text but not special

# Split regexes of llama.cpp's llama-vocab.cpp, in its own spelling. GPT-2's regex is the one
# ByteLevel(use_regex=True) already applies, so it needs no string here.
_LLAMA3_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (how llama.cpp splits text before BPE, whether it takes a whole pre-token
# that is itself in the vocabulary without merging: llama.cpp's ignore_merges).
_PRE_TOKENIZERS = {
    **dict.fromkeys(("gpt-2", "phi-2", "olmo", "jais", "exaone4"), ("gpt2", False)),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"),
        ("digits+gpt2", False),
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
        ("llama3", True),
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe"), ("llama3", False)),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"), ("qwen2", False)),
}
SUPPORTED_PRE_TOKENIZERS = tuple(_PRE_TOKENIZERS)

_GGUF_MAGIC = b"GGUF"


@dataclasses.dataclass
class GGUFCheckpoint:
    """A GGUF checkpoint translated to what `from_pretrained` would see in a HF directory.

    Attributes:
        config: A Hugging Face `config.json` dict (LlamaConfig / Qwen2Config style).
        tensors: HF tensor name -> float32 array in HF layout (`[out, in]` for projections).
            Tied checkpoints have no `lm_head.weight`; `config["tie_word_embeddings"]` says so.
        tokenizer: The tokenizer rebuilt from the GGUF vocabulary, merges and token types.
        tokenizer_config: `tokenizer_config.json`-style dict (chat template, special tokens).
    """

    config: dict
    tensors: dict[str, np.ndarray]
    tokenizer: tokenizers.Tokenizer
    tokenizer_config: dict


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Read a GGUF file and translate it to Hugging Face config, tensors and tokenizer.

    Args:
        path: The `.gguf` file.

    Returns:
        The checkpoint, with every weight dequantised to float32 in HF layout.

    Raises:
        FileNotFoundError: `path` is not an existing file.
        ValueError: not a GGUF file, or an architecture, tokenizer, tensor or RoPE setting this
            reader does not translate faithfully.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (starts with {magic!r}, not {_GGUF_MAGIC!r})")
    reader = gguf.GGUFReader(path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch not in _ARCHS:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; "
            f"supported: {list(SUPPORTED_ARCHITECTURES)}"
        )
    raw = {t.name: _tensor_f32(t) for t in reader.tensors}
    config = _hf_config(meta, arch, raw)
    tensors = _hf_tensors(raw, config, permuted_qk=_ARCHS[arch][2])
    tokenizer, tokenizer_config = _hf_tokenizer(meta)
    return GGUFCheckpoint(config, tensors, tokenizer, tokenizer_config)


def unpermute_rope_rows(w_rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's `LlamaModel.permute` on Q or K rows (weight `[n*hd, d]` or bias `[n*hd]`).

    llama.cpp computes `w.reshape(n, 2, hd // 2, ...).swapaxes(1, 2)`: within each head, HF row
    `j * hd/2 + i` (first or second rotary half) moves to row `2 * i + j`, so that rotary pairs are
    adjacent for its interleaved RoPE. Reading rows back as `(n, hd // 2, 2)` and swapping the two
    middle axes sends row `2 * i + j` back to `j * hd/2 + i`, HF's half-split layout.
    """
    rows = w_rows.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(f"cannot un-permute {rows} rows into {n_heads} heads of even size")
    head_dim = rows // n_heads
    w_n_half_2 = w_rows.reshape(n_heads, head_dim // 2, 2, *w_rows.shape[1:])
    return np.ascontiguousarray(w_n_half_2.swapaxes(1, 2).reshape(w_rows.shape))


def _tensor_f32(tensor: Any) -> np.ndarray:
    """Dequantise one GGUF tensor to a float32 array of its numpy shape.

    GGUF lists dimensions fastest-varying first (`ne0, ne1, ...`), the reverse of numpy's
    row-major order, so `token_embd` listed as `[d, vocab]` is a `[vocab, d]` array.
    """
    shape = tuple(int(n) for n in reversed(tensor.shape))
    values = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    if not values.flags.writeable:
        # F32 comes back as a view of the read-only memory map: copy so callers own the memory.
        values = values.copy()
    return values.reshape(shape)


def _key(meta: Mapping[str, Any], key: str) -> Any:
    if key not in meta:
        raise ValueError(f"GGUF metadata lacks required key {key!r}")
    return meta[key]


def _rope_scaling(meta: Mapping[str, Any], arch: str) -> dict | None:
    """Translate llama.cpp RoPE scaling keys to HF `rope_scaling`, or raise for the others."""
    kind_key, factor_key = f"{arch}.rope.scaling.type", f"{arch}.rope.scaling.factor"
    kind = meta.get(kind_key)
    factor = meta.get(factor_key, meta.get(f"{arch}.rope.scale_linear"))
    if kind in (None, "none") and factor in (None, 0.0, 1.0):
        return None
    if kind == "none":
        return None  # llama.cpp ignores the factor when the type says none
    if kind in (None, "linear"):
        if factor is None:
            raise ValueError(
                f"GGUF metadata key {kind_key!r} = 'linear' but {factor_key!r} is missing"
            )
        # llama.cpp's freq_scale = 1 / factor scales positions, exactly HF's linear RoPE.
        return {"rope_type": "linear", "factor": float(factor)}
    raise ValueError(
        f"GGUF metadata key {kind_key!r} = {kind!r}: this RoPE scaling is not translated "
        "(supported: 'none', 'linear')"
    )


def _hf_config(meta: Mapping[str, Any], arch: str, raw: Mapping[str, np.ndarray]) -> dict:
    """Build a HF `config.json` dict from `{arch}.*` and `tokenizer.ggml.*` metadata."""
    model_type, hf_arch, _ = _ARCHS[arch]
    d = int(_key(meta, f"{arch}.embedding_length"))
    n_heads = int(_key(meta, f"{arch}.attention.head_count"))
    n_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_heads))
    head_dim = int(meta.get(f"{arch}.attention.key_length", d // n_heads))
    value_dim = int(meta.get(f"{arch}.attention.value_length", head_dim))
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if value_dim != head_dim:
        raise ValueError(f"key_length {head_dim} != value_length {value_dim} is not supported")
    if rope_dim != head_dim:
        raise ValueError(
            f"{arch}.rope.dimension_count = {rope_dim} != head_dim {head_dim}: "
            "partial rotary embeddings are not supported"
        )
    if int(meta.get(f"{arch}.expert_count", 0)) > 0:
        raise ValueError(f"{arch}.expert_count > 0: mixture-of-experts GGUFs are not supported")
    if arch == "qwen2" and head_dim * n_heads != d:
        raise ValueError(f"qwen2 needs head_dim * heads == hidden size, got {head_dim}*{n_heads}")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(meta.get(f"{arch}.vocab_size", len(tokens) if tokens is not None else 0))
    embed_rows = raw["token_embd.weight"].shape[0] if "token_embd.weight" in raw else vocab
    if vocab != embed_rows:
        raise ValueError(f"vocab size {vocab} != token_embd rows {embed_rows}")
    config = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": d,
        "intermediate_size": int(_key(meta, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_key(meta, f"{arch}.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(_key(meta, f"{arch}.context_length")),
        "rms_norm_eps": float(_key(meta, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),  # llama.cpp default
        "rope_scaling": _rope_scaling(meta, arch),
        "tie_word_embeddings": "output.weight" not in raw,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if arch == "llama":
        has_bias = "blk.0.attn_q.bias" in raw
        config.update(attention_bias=has_bias, mlp_bias=False, pretraining_tp=1)
    else:
        config.update(use_sliding_window=False, sliding_window=None)
    for name in ("bos", "eos", "pad"):
        key = f"tokenizer.ggml.{'padding' if name == 'pad' else name}_token_id"
        config[f"{name}_token_id"] = int(meta[key]) if key in meta else None
    return config


_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _hf_name(gguf_name: str) -> str | None:
    """HF name for a GGUF tensor name, or None if it is not a tensor we map."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    prefix, _, rest = gguf_name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix == "blk" and layer.isdigit() and suffix in _LAYER_NAMES:
        return f"model.layers.{int(layer)}.{_LAYER_NAMES[suffix]}"
    return None


def _hf_tensors(raw: Mapping[str, np.ndarray], config: dict, permuted_qk: bool) -> dict:
    """Rename to HF, undo llama.cpp's Q/K row order, and reject tensors we cannot account for."""
    out, unknown = {}, []
    for name, value in raw.items():
        if name == "rope_freqs.weight":
            # llama.cpp stores Llama-3 style RoPE scaling as per-frequency divisors; all ones is
            # a no-op, anything else changes the math and has no exact HF translation here.
            if not np.all(value == 1.0):
                raise ValueError(
                    "tensor 'rope_freqs.weight' holds non-trivial per-frequency RoPE factors "
                    "(Llama-3 style scaling), which this reader does not translate"
                )
            continue
        hf_name = _hf_name(name)
        if hf_name is None:
            unknown.append(name)
            continue
        if permuted_qk and (".attn_q." in name or ".attn_k." in name):
            heads = config["num_attention_heads" if ".attn_q." in name else "num_key_value_heads"]
            value = unpermute_rope_rows(value, heads)
        out[hf_name] = value
    if unknown:
        raise ValueError(f"GGUF tensors with no Hugging Face mapping: {sorted(unknown)[:8]}")
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


def _pre_tokenizer(split: str) -> pre_tokenizers.PreTokenizer:
    """llama.cpp's split for one `_PRE_TOKENIZERS` kind, followed by the byte mapping."""
    if split == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split == "digits+gpt2":
        # llama.cpp isolates every digit (\p{N}) before the GPT-2 regex, as SmolLM2/StarCoder's
        # own tokenizer.json does with Digits(individual_digits=True).
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    regex = {"llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}[split]
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _hf_tokenizer(meta: Mapping[str, Any]) -> tuple[tokenizers.Tokenizer, dict]:
    """Rebuild the byte-level BPE tokenizer and its tokenizer_config from `tokenizer.*` keys."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZER_MODELS:
        raise ValueError(
            f"tokenizer.ggml.model = {kind!r} is not supported; "
            f"supported: {list(SUPPORTED_TOKENIZER_MODELS)} (byte-level BPE)"
        )
    pre = _key(meta, "tokenizer.ggml.pre")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"tokenizer.ggml.pre = {pre!r} is not supported; supported: {SUPPORTED_PRE_TOKENIZERS}"
        )
    split, ignore_merges = _PRE_TOKENIZERS[pre]
    tokens = list(_key(meta, "tokenizer.ggml.tokens"))
    types = np.asarray(meta.get("tokenizer.ggml.token_type") or np.ones(len(tokens)), np.int64)
    merges = [tuple(m.split(" ")) for m in _key(meta, "tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise ValueError(
            "tokenizer.ggml.merges has an entry that is not two space-separated tokens"
        )
    byte_chars = _bytes_to_unicode()
    alphabet = frozenset(byte_chars.values())
    is_added = (types == _TOKEN_CONTROL) | (types == _TOKEN_USER_DEFINED)
    added = frozenset(np.flatnonzero(is_added).tolist())
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if i not in added and not alphabet.issuperset(token):
            # A normal token in raw text: respell it in the byte alphabet BPE works in.
            token = "".join(byte_chars[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, i)
    bpe = models.BPE(
        vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges
    )
    tokenizer = tokenizers.Tokenizer(bpe)
    tokenizer.pre_tokenizer = _pre_tokenizer(split)
    tokenizer.decoder = decoders.ByteLevel()
    # Added tokens keep their raw spelling and so their ids; control ones are special (skipped by
    # decode(skip_special_tokens=True)), user-defined ones are only matched whole.
    by_type = {_TOKEN_CONTROL: [], _TOKEN_USER_DEFINED: []}
    for i in sorted(added):
        by_type[int(types[i])].append(tokens[i])
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in by_type[_TOKEN_CONTROL]]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in by_type[_TOKEN_USER_DEFINED]]
    )

    def special(key: str) -> tuple[str, int] | None:
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        return (tokens[int(token_id)], int(token_id)) if token_id is not None else None

    def token_for(key: str) -> str | None:
        return special(key)[0] if special(key) else None

    # Without the key llama.cpp adds BOS for Llama-3 style vocabularies only.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", split == "llama3" and ignore_merges))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    post = _post_processor(special("bos") if add_bos else None, special("eos") if add_eos else None)
    if post is not None:
        tokenizer.post_processor = post
    bos, eos = token_for("bos"), token_for("eos")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": token_for("padding"),
        "unk_token": token_for("unknown"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    return tokenizer, tokenizer_config


def _post_processor(
    bos: tuple[str, int] | None, eos: tuple[str, int] | None
) -> processors.PostProcessor | None:
    """A post-processor adding BOS/EOS exactly when the GGUF says llama.cpp adds them.

    Args:
        bos: `(token, id)` to prepend, or None.
        eos: `(token, id)` to append, or None.
    """
    if bos is None and eos is None:
        return None
    head, tail = ([bos[0]] if bos else []), ([eos[0]] if eos else [])
    return processors.TemplateProcessing(
        single=[*head, "$A:0", *tail],
        pair=[*head, "$A:0", *tail, *head, "$B:1", *tail],
        special_tokens=list(dict.fromkeys(t for t in (bos, eos) if t is not None)),
    )
