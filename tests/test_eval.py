"""Perplexity evaluation and the tau sweep (`prunepath_jax.eval`) on a tiny random Llama.

The evaluation must be *exact*: every target scored once, the same NLL as a direct float64
computation from the model's logits, and routing statistics over real tokens only. A tau sweep
must compile the forward once (tau is a traced argument), static top-k once per k.
"""

import csv
import json
import math

import numpy as np
import pytest
from flax import nnx

pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from helpers import assert_close  # noqa: E402
from hf_fixtures import tiny_llama  # noqa: E402

from prunepath_jax.config import PrunePathConfig  # noqa: E402
from prunepath_jax.convert import to_prunepath  # noqa: E402
from prunepath_jax.eval import perplexity, sweep  # noqa: E402
from prunepath_jax.loading import load_pretrained  # noqa: E402
from prunepath_jax.nn import route_args  # noqa: E402

VOCAB = 97


def _randomise_routers(model, seed: int, scale: float = 1.0):
    """Non-zero routers so that tau actually changes k token by token."""
    for i, m in enumerate(sweep.prunepath_ffns(model)):
        key = jax.random.key(seed + i)
        m.router[...] = jax.random.normal(key, m.router[...].shape, jnp.float32) * scale
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama_eval")
    tiny_llama(d, seed=3)
    dense = load_pretrained(d, progress=False).model
    pp, _ = to_prunepath(dense, PrunePathConfig(group_size=16), progress=False)
    routed, _ = to_prunepath(dense, PrunePathConfig(group_size=16), progress=False)
    exact, _ = to_prunepath(dense, PrunePathConfig(group_size=16, gate="none"), progress=False)
    return {
        "dense": dense,
        "pp": pp,
        "routed": _randomise_routers(routed, 11, scale=0.1),
        "exact": exact,
    }


def _stream(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, VOCAB, n).astype(np.int32)


def _direct_nll(model, stream: np.ndarray, seq_len: int, tau) -> tuple[float, int]:
    """Sum of -log p(target) in float64, one unpadded model call per window."""
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, x, a: nnx.merge(graphdef, st)(x, ffn_args=a).logits[0])
    args = None if model.cfg.prunepath is None else route_args(model.cfg, tau)
    total, count = 0.0, 0
    for start in range(0, len(stream) - 1, seq_len):
        chunk = stream[start : start + seq_len + 1]
        inputs, targets = chunk[:-1], chunk[1:]
        logits = np.asarray(fwd(state, jnp.asarray(inputs[None]), args), np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        total -= logp[np.arange(len(targets)), targets].sum()
        count += len(targets)
    return total, count


@pytest.mark.parametrize("kind,tau", [("dense", None), ("routed", 0.8), ("pp", 0.6)])
def test_nll_equals_direct_computation(models, kind, tau):
    model, seq_len = models[kind], 16
    stream = _stream(3 * seq_len - 5, seed=1)  # the last window is partly padding
    res = perplexity.evaluate_lm(model, stream, seq_len=seq_len, batch_size=2, tau=tau)
    total, count = _direct_nll(model, stream, seq_len, tau)
    assert res["n_tokens"] == count == len(stream) - 1
    assert_close(res["nll"], total / count, "model_fp32", "nll per token")
    assert_close(math.log(res["ppl"]), math.log(math.exp(total / count)), "model_fp32", "log ppl")


@pytest.mark.parametrize("n", [2, 16, 17, 33, 85])
def test_every_token_scored_once(models, n):
    stream = _stream(n, seed=n)
    res = perplexity.evaluate_lm(models["routed"], stream, seq_len=16, batch_size=3, tau=0.7)
    assert res["n_tokens"] == n - 1
    hist = np.asarray(res["k_hist"])
    assert hist.shape == (2, 6 + 1)  # L = 2 layers, k = 0..E with E = 96 / 16
    assert (hist.sum(axis=1) == n - 1).all(), "padding leaked into the routing statistics"
    with_bos = perplexity.evaluate_lm(
        models["routed"], stream, seq_len=16, batch_size=3, tau=0.7, bos_id=5
    )
    assert with_bos["n_tokens"] == n


def test_bits_per_byte(models):
    stream, n_bytes = _stream(40, seed=2), 123
    res = perplexity.evaluate_lm(models["dense"], stream, seq_len=16, n_bytes=n_bytes)
    want = res["nll"] * res["n_tokens"] / math.log(2) / n_bytes
    assert_close(res["bpb"], want, "op_fp32", "bits per byte")
    assert perplexity.evaluate_lm(models["dense"], stream, seq_len=16)["bpb"] is None


def test_dense_model_and_exact_conversion(models):
    stream = _stream(50, seed=4)
    dense = perplexity.evaluate_lm(models["dense"], stream, seq_len=16, batch_size=2)
    assert dense["sparsity"] == 0.0 and dense["flop_fraction"] == 1.0
    assert dense["k_mean"] is None and dense["n_experts"] == 0
    # Gate "none" with every expert active is the dense FFN: the same perplexity.
    exact = perplexity.evaluate_lm(models["exact"], stream, seq_len=16, batch_size=2, tau=1.05)
    assert exact["sparsity"] == 0.0 and exact["k_p50"] == exact["k_p99"] == 6
    assert_close(exact["nll"], dense["nll"], "model_fp32", "converted vs dense")
    # All experts plus the router: 1 + d*E / (2*d*f + f*d).
    assert exact["flop_fraction"] == pytest.approx(1 + 64 * 6 / (3 * 64 * 96))


def test_tau_sweep_compiles_once(models):
    model, stream = models["routed"], _stream(70, seed=5)
    before = perplexity.trace_count()
    results = [
        perplexity.evaluate_lm(model, stream, seq_len=13, batch_size=2, tau=tau)
        for tau in (1.05, 0.9, 0.7, 0.5, [0.6, 0.95])  # a per-layer vector too
    ]
    assert perplexity.trace_count() - before == 1
    assert [r["compiled"] for r in results] == [True, False, False, False, False]
    assert len({round(r["sparsity"], 6) for r in results}) > 2, "tau did not reach the router"


def test_sparsity_monotone_in_tau(models):
    stream = _stream(90, seed=6)
    taus = [0.05, 0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0, 1.05]
    res = [
        perplexity.evaluate_lm(models["routed"], stream, seq_len=16, batch_size=2, tau=t)
        for t in taus
    ]
    s = np.array([r["sparsity"] for r in res])
    s_l = np.array([r["sparsity_per_layer"] for r in res])
    assert (np.diff(s) <= 0).all(), s
    assert (np.diff(s_l, axis=0) <= 0).all(), s_l
    assert s[-1] == 0.0 and s[0] == pytest.approx(1 - 1 / 6)  # tau > 1: all; tiny tau: top-1
    assert s[0] > s[5] > s[-1], s
    # Pooled mean of k is the mean of the per-layer means (every layer sees the same tokens).
    for r in res:
        assert r["sparsity"] == pytest.approx(float(np.mean(r["sparsity_per_layer"])))


class CharTokenizer:
    """One token per ASCII character, decode gives one character per token (byte-exact)."""

    eos_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % (VOCAB - 1) + 1 for c in text]

    def decode(self, ids):
        return "x" * len(ids)


@pytest.fixture()
def text_file(tmp_path):
    docs = ["First document, some words here.\n" * 3, "Second one.\n" * 4, "Third.\n"]
    path = tmp_path / "val.txt"
    path.write_text("\n\f\n".join(docs))
    return path, docs


def test_tokenize_stream_cap_and_bytes(text_file):
    _, docs = text_file
    tok = CharTokenizer()
    full, n_bytes = sweep.tokenize_stream(tok, docs, sep_id=0)
    assert len(full) == sum(len(d) + 1 for d in docs) and n_bytes == sum(map(len, docs))
    capped, capped_bytes = sweep.tokenize_stream(tok, docs, max_tokens=110, sep_id=0)
    assert len(capped) == 110 and (capped == full[:110]).all()
    assert capped_bytes == 110 - 1  # one separator among the first 110 tokens
    with pytest.raises(ValueError):
        sweep.tokenize_stream(tok, docs, max_tokens=1)


def test_sweep_artifacts_and_static_top_k(models, text_file, tmp_path):
    path, _ = text_file
    model = models["routed"]
    ffns = sweep.prunepath_ffns(model)
    saved = [(m.k_min, m.k_max) for m in ffns]
    before = perplexity.trace_count()
    rows = sweep.sweep(
        model,
        CharTokenizer(),
        str(path),
        (1.05, 0.8, [0.5, 0.6]),
        seq_len=11,
        batch_size=2,
        max_tokens=150,
        static_k=(1, 4),
        out_dir=tmp_path / "out",
        reference=models["dense"],
        meta={"model": "tiny"},
        progress=False,
    )
    # dense + tau sweep + one per static k; restoring the clamps restores the compiled graph.
    assert perplexity.trace_count() - before == 1 + 1 + 2
    assert [(m.k_min, m.k_max) for m in ffns] == saved
    assert [r["setting"] for r in rows] == ["dense"] + ["tau"] * 3 + ["static_k"] * 2
    for r in rows[-2:]:
        assert r["k_mean"] == r["k_p50"] == r["k_p90"] == r["k_p99"] == r["k"]
        hist = np.asarray(r["k_hist"])
        assert (hist[:, r["k"]] == r["n_tokens"]).all() and hist.sum() == 2 * r["n_tokens"]
        assert r["sparsity"] == pytest.approx(1 - r["k"] / 6)
    assert all(r["n_tokens"] == 149 for r in rows)

    out = tmp_path / "out"
    lines = [json.loads(x) for x in (out / "sweep.jsonl").read_text().splitlines()]
    assert len(lines) == len(rows) and lines[1]["tau"] == 1.05 and lines[3]["tau"] == [0.5, 0.6]
    assert len(lines[2]["sparsity_per_layer"]) == 2 and lines[0]["model"] == "tiny"
    assert {"date", "commit", "host", "command"} <= set(lines[0])
    with (out / "sweep.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and float(table[3]["ppl"]) == pytest.approx(rows[3]["ppl"])
    assert "sparsity_per_layer" not in table[0]
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "sweep.md").read_text()
    assert rows[0]["commit"] in md and "| top-4 |" in md and "dense reference" in md


def test_static_top_k_restores_on_error(models):
    ffns = sweep.prunepath_ffns(models["routed"])
    saved = [(m.k_min, m.k_max) for m in ffns]
    with pytest.raises(RuntimeError), sweep.static_top_k(models["routed"], 2):
        assert all(m.k_min == m.k_max == 2 for m in ffns)
        raise RuntimeError("boom")
    assert [(m.k_min, m.k_max) for m in ffns] == saved
    with pytest.raises(ValueError), sweep.static_top_k(models["routed"], 7):
        pass
    with pytest.raises(ValueError), sweep.static_top_k(models["dense"], 1):
        pass


@pytest.mark.parametrize("tau", [0, 0.0, -0.5, float("nan"), float("inf"), [0.5, 0.5, 0.5]])
def test_bad_tau_raises(models, tau):
    with pytest.raises(ValueError):
        perplexity.evaluate_lm(models["routed"], _stream(20, 0), seq_len=8, tau=tau)


def test_bad_arguments_raise(models, text_file, tmp_path):
    stream = _stream(20, 0)
    with pytest.raises(ValueError, match="tau"):
        perplexity.evaluate_lm(models["routed"], stream, seq_len=8)  # no tau for a routed model
    with pytest.raises(ValueError, match="no token"):
        perplexity.evaluate_lm(models["dense"], stream[:1], seq_len=8)
    with pytest.raises(ValueError, match="max_position"):
        perplexity.evaluate_lm(models["dense"], stream, seq_len=4096)
    for kw, msg in [({"seq_len": 0}, "seq_len"), ({"seq_len": 1}, "seq_len"),
                    ({"seq_len": 8, "batch_size": 0}, "batch_size")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            perplexity.evaluate_lm(models["dense"], stream, **kw)
    with pytest.raises(ValueError, match="max_tokens"):
        sweep.sweep(
            models["routed"], CharTokenizer(), str(text_file[0]), (0.9,), max_tokens=1,
            out_dir=tmp_path, progress=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match="PrunePath"):
        sweep.sweep(models["dense"], CharTokenizer(), str(text_file[0]), (0.9,), progress=False)
    before = perplexity.trace_count()
    with pytest.raises(ValueError):  # a bad tau fails before any evaluation
        sweep.sweep(
            models["routed"], CharTokenizer(), str(text_file[0]), (0.9, float("nan")),
            out_dir=tmp_path, progress=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match="static k"):
        sweep.sweep(
            models["routed"], CharTokenizer(), str(text_file[0]), (0.9,), static_k=(2, 7),
            out_dir=tmp_path, progress=False,
        )  # fmt: skip
    assert perplexity.trace_count() == before
