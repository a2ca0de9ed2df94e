"""Classification evaluation on tiny random BERT and GPT-2 classifiers: accuracy and NLL equal a
direct forward, filler rows never count, every expert at tau > 1 with gate "none" equals the dense
model, and a tau sweep compiles the forward once and writes its artifacts."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close
from hf_fixtures import tiny_bert_cls, tiny_gpt2_cls
from test_train_data import byte_tokenizer, sentence, write_jsonl

from prunepath_jax.config import PrunePathConfig
from prunepath_jax.convert import to_prunepath
from prunepath_jax.eval import classify
from prunepath_jax.loading import load_pretrained
from prunepath_jax.train import data


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cls")
    rng = np.random.default_rng(1)
    rows = [{"text": sentence(rng, 1, 5), "label": int(rng.integers(0, 3))} for _ in range(21)]
    tok = byte_tokenizer()
    return data.classification_data(tok, write_jsonl(d / "c.jsonl", rows), max_len=32,
                                    batch_size=8)  # fmt: skip


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    tiny_bert_cls(d, seed=2, vocab_size=300)
    dense = load_pretrained(d, progress=False).model
    pp, _ = to_prunepath(dense, PrunePathConfig(group_size=16, gate="none"), progress=False)
    return dense, pp


def direct(model, cls_data):
    """Accuracy and mean NLL from plain forwards over the real examples."""
    a = cls_data.arrays
    if model.cfg.family == "bert":
        logits = model(jnp.asarray(a["tokens"]), jnp.asarray(a["token_mask"], jnp.int32)).logits
    else:
        logits = model(jnp.asarray(a["tokens"]), logit_index_b=jnp.asarray(a["last_index"])).logits
    logits = np.asarray(logits, np.float64)
    nll = jax.nn.logsumexp(logits, -1) - logits[np.arange(len(logits)), a["labels"]]
    return float((logits.argmax(-1) == a["labels"]).mean()), float(np.mean(nll))


def test_bert_dense_matches_direct_forward(bert, cls_data):
    dense, _ = bert
    res = classify.evaluate_classification(dense, cls_data.eval_batches())
    acc, nll = direct(dense, cls_data)
    assert res["n"] == 21 and cls_data.n_examples % cls_data.batch_size  # filler rows exist
    assert res["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert_close(res["nll"], nll, "model_fp32", "mean NLL")
    assert np.sum(res["confusion"]) == 21 and res["sparsity"] == 0.0
    assert res["n_tokens"] == int(cls_data.arrays["token_mask"].sum())


def test_prunepath_all_experts_equals_dense_and_sparsity_drops(bert, cls_data):
    dense, pp = bert
    ref = classify.evaluate_classification(dense, cls_data.eval_batches())
    full = classify.evaluate_classification(pp, cls_data.eval_batches(), tau=1.05)
    assert full["k_mean"] == pp.cfg.n_experts and full["sparsity"] == 0.0
    assert full["accuracy"] == ref["accuracy"]
    assert_close(full["nll"], ref["nll"], "model_fp32", "all experts vs dense")
    low = classify.evaluate_classification(pp, cls_data.eval_batches(), tau=0.3)
    assert low["sparsity"] > 0.3 and low["k_mean"] < pp.cfg.n_experts
    assert low["n_tokens"] == full["n_tokens"]  # filler-row tokens never counted


def test_decoder_classifier_reads_last_index(tmp_path, cls_data):
    tiny_gpt2_cls(tmp_path, seed=3, vocab_size=300, pad_token_id=256)
    model = load_pretrained(tmp_path, progress=False).model
    res = classify.evaluate_classification(model, cls_data.eval_batches())
    acc, nll = direct(model, cls_data)
    assert res["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert_close(res["nll"], nll, "model_fp32", "gpt2 classifier NLL")


def test_sweep_compiles_once_and_writes_artifacts(bert, cls_data, tmp_path):
    dense, pp = bert
    classify.evaluate_classification(pp, cls_data.eval_batches(), tau=0.9)  # warm the cache
    before = classify.trace_count()
    rows = classify.classification_sweep(
        pp, cls_data, (1.05, 0.8, 0.5), static_k=(2,), reference=dense, out_dir=tmp_path,
        meta={"model": "tiny-bert"}, progress=False,
    )  # fmt: skip
    # Every tau reuses the warmed forward; only the static-k clamp (a static module attribute)
    # and, if no earlier test did, the dense model compile.
    assert [r["setting"] for r in rows] == ["dense", "tau", "tau", "tau", "static_k"]
    assert not any(r["compiled"] for r in rows[1:4]) and rows[-1]["compiled"]
    assert classify.trace_count() - before <= 2
    sp = [r["sparsity"] for r in rows[1:4]]
    assert sp == sorted(sp)
    assert rows[-1]["k_mean"] == 2
    for ext in ("jsonl", "csv", "md", "png"):
        assert (tmp_path / f"cls_sweep.{ext}").stat().st_size > 0
    first = json.loads((tmp_path / "cls_sweep.jsonl").read_text().splitlines()[0])
    assert first["label"] == "dense" and "commit" in first and "confusion" in first
    assert "| dense |" in (tmp_path / "cls_sweep.md").read_text()
    before = classify.trace_count()
    classify.classification_sweep(
        pp, cls_data, (0.7, 0.6), out_dir=tmp_path / "again", progress=False
    )
    assert classify.trace_count() == before


def test_errors(bert, cls_data):
    dense, pp = bert
    with pytest.raises(ValueError, match="PrunePath model"):
        classify.classification_sweep(dense, cls_data, (0.5,), progress=False)
    with pytest.raises(ValueError, match="tau"):
        classify.classification_sweep(pp, cls_data, (0.0,), progress=False)
    with pytest.raises(ValueError, match="no example"):
        classify.evaluate_classification(dense, [])
