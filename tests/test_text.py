"""Tests for the shipped corpus and the text loaders in ``prunepath_jax.text`` (CPU, fast)."""

from __future__ import annotations

import collections
import json
import random
import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prunepath_jax import text

VAL_WORKS = [
    "A MIDSUMMER NIGHT'S DREAM",
    "MACBETH",
    "RUTH",
    "ECCLESIASTES",
    "JONAH",
    "ROMANS",
    "JAMES",
]


@pytest.fixture(scope="module")
def train_text() -> str:
    return text.corpus_path("train").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def val_text() -> str:
    return text.corpus_path("validation").read_text(encoding="utf-8")


# --- shipped corpus ---------------------------------------------------------------------------


def test_shipped_files_exist_and_sizes_in_range():
    sizes = {name: text.corpus_path(name).stat().st_size for name in text.SHIPPED_NAMES}
    assert 2_000_000 <= sizes["train"] <= 3_000_000
    assert 200_000 <= sizes["validation"] <= 450_000
    assert sizes["train"] + sizes["validation"] <= 3_200_000
    assert sum(sizes.values()) <= 4_400_000
    assert (text.CORPUS_DIR / "README.md").is_file()


def test_corpus_path_names():
    assert text.corpus_path("train.txt") == text.corpus_path("train")
    assert text.corpus_path("sft_validation").suffix == ".jsonl"
    with pytest.raises(ValueError, match="known: train"):
        text.corpus_path("test")


def test_shipped_text_is_clean(train_text, val_text):
    for t in (train_text, val_text):  # fixtures decoded them as strict UTF-8 already
        assert "\r" not in t and "\t" not in t
        assert "gutenberg" not in t.lower()
        assert t.endswith("\n") and not t.endswith("\n\n")


def test_shipped_split_is_by_whole_works(train_text, val_text):
    val_docs = text.read_texts("shipped", "validation")
    assert [d.split("\n", 1)[0] for d in val_docs] == VAL_WORKS
    train_titles = {d.split("\n", 1)[0] for d in text.read_texts("default", "train")}
    assert len(train_titles) >= 15 and not train_titles & set(VAL_WORKS)
    assert text.read_texts("shipped") == text.read_texts("default", "train")


def test_train_validation_disjoint(train_text, val_text):
    rng = random.Random(0)
    for _ in range(300):
        i = rng.randrange(len(val_text) - 200)
        assert val_text[i : i + 200] not in train_text


def _check_balanced(rows, key):
    counts = collections.Counter(key(r) for r in rows)
    assert min(counts.values()) >= 0.8 * max(counts.values()), counts
    return counts


def test_source_classification_files(train_text):
    train = text.read_jsonl(text.corpus_path("source_train"))
    val = text.read_jsonl(text.corpus_path("source_validation"))
    assert len(train) >= 1500 and 800 <= len(val) <= 1200
    names = {}
    for row in train + val:
        assert set(row) >= {"text", "label", "label_name"}
        assert isinstance(row["text"], str) and 50 <= len(row["text"]) <= 600
        assert row["label"] in (0, 1, 2)
        assert names.setdefault(row["label"], row["label_name"]) == row["label_name"]
    assert _check_balanced(train, lambda r: r["label"]).keys() == {0, 1, 2}
    assert _check_balanced(val, lambda r: r["label"]).keys() == {0, 1, 2}
    assert not {r["work"] for r in train} & {r["work"] for r in val}
    flat_train = " ".join(train_text.split())
    for row in val[:100]:
        assert row["text"] not in flat_train


def test_sft_files():
    for name, lo in (("sft_train", 300), ("sft_validation", 100)):
        rows = text.read_jsonl(text.corpus_path(name))
        assert len(rows) >= lo
        for row in rows:
            msgs = row["messages"]
            assert [m["role"] for m in msgs] == ["user", "assistant"]
            assert all(isinstance(m["content"], str) and m["content"].strip() for m in msgs)
    assert text.read_texts("shipped", "source_validation")[0]


# --- loaders on temporary files ---------------------------------------------------------------


def test_read_texts_txt_form_feed_documents(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"first doc\r\n\r\nsame doc\r\n\f\r\nsecond\n\f\n\n\f\n")
    assert text.read_texts(str(p)) == ["first doc\n\nsame doc", "second"]
    q = tmp_path / "b.txt"
    q.write_text("one\n\nwhole\n\nfile\n", encoding="utf-8")
    assert text.read_texts(str(q)) == ["one\n\nwhole\n\nfile"]


def test_read_texts_jsonl(tmp_path):
    p = tmp_path / "a.jsonl"
    rows = [{"text": "hello", "body": "x"}, {"text": "  "}, {"text": "world", "body": "y"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert text.read_texts(str(p)) == ["hello", "world"]
    with pytest.raises(ValueError, match=r":2: record has no field 'body'"):
        text.read_texts(str(p), field="body")


def test_read_jsonl_broken_line_names_line_number(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": "oops"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        text.read_jsonl(p)
    p.write_text('{"text": "ok"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=":2: expected a JSON object"):
        text.read_texts(str(p))


def test_read_texts_errors(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        text.read_texts(str(missing))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        text.read_jsonl(tmp_path / "nope.jsonl")
    bad = tmp_path / "data.csv"
    bad.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\.txt, \.jsonl"):
        text.read_texts(str(bad))
    with pytest.raises(ValueError, match="directory"):
        text.read_texts(str(tmp_path))
    for name, content in (("empty.txt", ""), ("blank.txt", "\n \n\f\n"), ("empty.jsonl", "\n")):
        (tmp_path / name).write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match="no non-empty text"):
            text.read_texts(str(tmp_path / name))


def test_local_text_path_checks_without_reading(tmp_path):
    """What a command checks before it loads a model: the same file and the same errors as
    ``read_texts``, and None for a Hugging Face dataset name (nothing to check offline)."""
    assert text.local_text_path("shipped", "validation") == text.corpus_path("validation")
    ok = tmp_path / "eval.txt"
    ok.write_text("some text\n", encoding="utf-8")
    assert text.local_text_path(str(ok)) == ok
    assert text.local_text_path("wikitext:wikitext-2-raw-v1") is None
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        text.local_text_path(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="directory"):
        text.local_text_path(str(tmp_path))
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported file type"):
        text.local_text_path(str(tmp_path / "data.csv"))


def test_hf_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install"):
        text.read_texts("roneneldan/TinyStories")


def _fake_datasets(monkeypatch, load):
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load))


def test_hf_offline_is_one_clear_line(monkeypatch):
    def load(*args, **kwargs):
        raise OSError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)\nmore")

    _fake_datasets(monkeypatch, load)
    with pytest.raises(ConnectionError, match="network access") as info:
        text.read_texts("wikitext:wikitext-2-raw-v1", split="validation")
    assert "\n" not in str(info.value)


def test_hf_reads_field_and_config(monkeypatch):
    calls = []

    class FakeDataset:
        column_names = ["text", "id"]

        def __getitem__(self, key):
            return {"text": ["a", "", "b"], "id": [1, 2, 3]}[key]

    def load(path, config, split):
        calls.append((path, config, split))
        return FakeDataset()

    _fake_datasets(monkeypatch, load)
    assert text.read_texts("wikitext:wikitext-2-raw-v1", "test") == ["a", "b"]
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test")]
    with pytest.raises(ValueError, match="columns: text, id"):
        text.read_texts("org/name", field="story")


# --- packing and evaluation windows -----------------------------------------------------------

docs_st = st.lists(st.lists(st.integers(0, 1000), max_size=20), max_size=12)


@settings(max_examples=60, deadline=None)
@given(docs=docs_st, seq_len=st.integers(1, 16), eos=st.one_of(st.none(), st.integers(1001, 1002)))
def test_pack_tokens_is_prefix_of_stream(docs, seq_len, eos):
    stream = [t for d in docs for t in d + ([] if eos is None else [eos])]
    rows = text.pack_tokens(docs, seq_len, eos)
    assert rows.dtype == np.int32 and rows.shape == (len(stream) // seq_len, seq_len)
    assert rows.reshape(-1).tolist() == stream[: rows.size]
    assert np.array_equal(rows, text.pack_tokens(docs, seq_len, eos))


def test_pack_tokens_example():
    rows = text.pack_tokens([[1, 2, 3], [4], [5, 6]], 3, eos_id=0)
    assert rows.tolist() == [[1, 2, 3], [0, 4, 0], [5, 6, 0]]
    assert text.pack_tokens([[1, 2]], 4, None).shape == (0, 4)
    with pytest.raises(ValueError):
        text.pack_tokens([[1]], 0, None)


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(0, 60),
    seq_len=st.integers(1, 12),
    stride_frac=st.floats(0.01, 1.0),
    bos=st.booleans(),
)
def test_eval_windows_count_every_target_once(n, seq_len, stride_frac, bos):
    stride = max(1, int(round(stride_frac * seq_len)))
    tokens = list(range(10, 10 + n))
    w = text.eval_windows(tokens, seq_len, stride=stride, pad_id=-1, bos_id=5 if bos else None)
    stream = ([5] if bos else []) + tokens
    assert w.inputs.shape == w.targets.shape == w.mask.shape
    assert w.inputs.shape[1] == seq_len and w.mask.dtype == bool
    # Row-major masked targets are exactly the stream minus its first token, each once, in order.
    assert w.targets[w.mask].tolist() == stream[1:]
    assert w.inputs[w.mask].tolist() == stream[:-1]
    assert int(w.mask.sum()) == max(len(stream) - 1, 0)
    assert (w.targets[w.mask] != -1).all()  # padding is never scored


def test_eval_windows_stride_keeps_context():
    w = text.eval_windows(np.arange(10), 4, stride=2)
    assert w.inputs[1].tolist() == [2, 3, 4, 5]
    assert w.mask[1].tolist() == [False, False, True, True]
    with pytest.raises(ValueError):
        text.eval_windows(np.arange(10), 4, stride=5)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 50), seq_len=st.integers(1, 8), batch=st.integers(1, 5))
def test_iterate_windows_static_batches(n, seq_len, batch):
    tokens = np.arange(n) + 3
    batches = list(text.iterate_windows(tokens, seq_len, batch, pad_id=0))
    whole = text.eval_windows(tokens, seq_len, pad_id=0)
    assert len(batches) == -(-len(whole.inputs) // batch)
    for b in batches:
        assert b.inputs.shape == b.targets.shape == b.mask.shape == (batch, seq_len)
    if batches:
        mask = np.concatenate([b.mask for b in batches])
        targets = np.concatenate([b.targets for b in batches])
        assert targets[mask].tolist() == tokens[1:].tolist()
