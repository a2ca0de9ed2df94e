"""The TEAL baseline (`prunepath_jax.eval.teal`) on a tiny random Llama.

With both thresholds 0 a TEAL layer is the dense FFN (so the whole model is the dense model,
whatever the PrunePath gates); its zeroing and its read fraction match a float64 reference;
calibrated thresholds zero the target share of layer 0's entries on the calibration tokens
(layer 0's FFN input is the dense model's: nothing before it is sparsified); a sweep with TEAL
rows compiles the TEAL forward once for every target and restores the PrunePath layers.
"""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from helpers import assert_close  # noqa: E402
from hf_fixtures import tiny_gpt2, tiny_llama  # noqa: E402
from test_eval import VOCAB, CharTokenizer, _randomise_routers  # noqa: E402

from prunepath_jax.config import PrunePathConfig  # noqa: E402
from prunepath_jax.convert import to_prunepath  # noqa: E402
from prunepath_jax.eval import perplexity, sweep, teal  # noqa: E402
from prunepath_jax.ffn_capture import capture_ffn_inputs  # noqa: E402
from prunepath_jax.loading import load_pretrained  # noqa: E402
from prunepath_jax.nn import PrunePathFFN, route_args  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama_teal")
    tiny_llama(d, seed=5)
    dense = load_pretrained(d, progress=False).model
    pp, _ = to_prunepath(dense, PrunePathConfig(group_size=16), progress=False)  # sigmoid gates
    return {"dense": dense, "pp": _randomise_routers(pp, 7, scale=0.1)}


def _tokens(b: int, t: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, VOCAB, (b, t)).astype(np.int32)


def _reference(x, w_in, w_out, t_x, t_a, sel=None, scale=None):
    """float64 SwiGLU FFN with TEAL's zeroing (within the selected neurons, scaled, when
    given), and the read fraction per token."""
    x, w_in, w_out = (np.asarray(v, np.float64) for v in (x, w_in, w_out))
    kx = np.abs(x) >= t_x
    h = np.einsum("btd,cfd->btcf", np.where(kx, x, 0), w_in)
    g = h[..., 0, :]
    a = g / (1 + np.exp(-g)) * h[..., 1, :]
    ka = np.abs(a) >= t_a
    sel_frac = 1.0
    if sel is not None:
        ka, a = ka & np.asarray(sel), a * np.asarray(scale, np.float64)
        sel_frac = np.asarray(sel).mean(-1)
    return np.where(ka, a, 0) @ w_out, (2 * sel_frac * kx.mean(-1) + ka.mean(-1)) / 3


@pytest.mark.parametrize("t", [(0.0, 0.0), (0.5, 0.05), (1e9, 1e9)])
def test_teal_ffn_matches_reference(t):
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (2, 5, 24), jnp.float32)
    w_in = jax.random.normal(k[1], (2, 40, 24), jnp.float32) * 0.2
    w_out = jax.random.normal(k[2], (40, 24), jnp.float32) * 0.2
    y, read, kept_x = teal.teal_ffn(x, w_in, w_out, None, None, "silu", *map(jnp.float32, t))
    y_ref, read_ref = _reference(x, w_in, w_out, *t)
    assert_close(y, y_ref, "op_fp32", f"TEAL FFN at thresholds {t}")
    assert_close(read, read_ref, "op_fp32", "read fraction")
    assert_close(kept_x, np.mean(np.abs(np.asarray(x)) >= t[0], -1), "op_fp32", "kept input")
    if t[0] == 0.0:
        assert np.all(np.asarray(read) == 1.0)
    if t[0] > 1e8:
        assert np.all(np.asarray(read) == 0.0) and np.all(np.asarray(y) == 0.0)


@pytest.mark.parametrize("t", [(0.0, 0.0), (0.3, 0.05)])
def test_teal_within_experts_matches_reference(t):
    k = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(k[0], (2, 5, 24), jnp.float32)
    w_in = jax.random.normal(k[1], (2, 40, 24), jnp.float32) * 0.2
    w_out = jax.random.normal(k[2], (40, 24), jnp.float32) * 0.2
    sel = jnp.repeat(jax.random.bernoulli(k[3], 0.4, (2, 5, 5)), 8, axis=-1)  # 5 experts of 8
    scale = jnp.where(sel, jax.nn.sigmoid(jax.random.normal(k[4], sel.shape)), 0.0)
    y, read, _ = teal.teal_ffn(x, w_in, w_out, None, None, "silu", *map(jnp.float32, t),
                               (sel, scale))  # fmt: skip
    y_ref, read_ref = _reference(x, w_in, w_out, *t, sel, scale)
    assert_close(y, y_ref, "op_fp32", f"TEAL within experts at {t}")
    assert_close(read, read_ref, "op_fp32", "read fraction within experts")


def test_zero_thresholds_within_experts_are_prunepath(models):
    """``route``: at thresholds 0 the layer is the PrunePath layer (same NLL at a real τ), and
    its byte fraction is PrunePath's 1 - k/E."""
    stream = _tokens(1, 60, 9).reshape(-1)
    kw = dict(seq_len=16, batch_size=2, tau=0.6)
    ref = perplexity.evaluate_lm(models["pp"], stream, **kw)
    with teal.teal_model(models["pp"], np.zeros((2, 2)), route=True):
        res = perplexity.evaluate_lm(models["pp"], stream, **kw)
    assert 0.1 < ref["sparsity"] < 0.9  # τ 0.6 really drops experts here
    assert_close(res["nll"], ref["nll"], "model_fp32", "TEAL within experts at 0 vs PrunePath")
    assert_close(res["sparsity"], ref["sparsity"], "op_fp32", "sparsity = 1 - k/E")


def test_zero_thresholds_are_the_dense_model(models):
    """Whole model: TEAL at thresholds 0 over a sigmoid-gated PrunePath model gives the dense
    model's NLL (the gates and router are not used), and reads every weight byte."""
    stream = _tokens(1, 60, 1).reshape(-1)
    kw = dict(seq_len=16, batch_size=2)
    ref = perplexity.evaluate_lm(models["dense"], stream, **kw)
    with teal.teal_model(models["pp"], np.zeros((2, 2))):
        res = perplexity.evaluate_lm(models["pp"], stream, tau=1.05, **kw)
    assert_close(res["nll"], ref["nll"], "model_fp32", "TEAL at 0 vs dense NLL")
    assert res["sparsity"] == 0.0 and res["flop_fraction"] == 1.0 and res["k_mean"] is None
    assert all(isinstance(layer.mlp, PrunePathFFN) for layer in models["pp"].layers)


def test_zero_thresholds_are_the_dense_gpt2(tmp_path):
    """A GELU MLP with biases (GPT-2's pre-norm block hands the FFN its normalised input): TEAL
    at thresholds 0 is the dense model; above 0 it reads fewer bytes and predicts worse."""
    tiny_gpt2(tmp_path, seed=4)
    dense = load_pretrained(tmp_path, progress=False).model
    pp, _ = to_prunepath(dense, PrunePathConfig(group_size=16), progress=False)
    stream = _tokens(1, 60, 6).reshape(-1)
    kw = dict(seq_len=16, batch_size=2)
    ref = perplexity.evaluate_lm(dense, stream, **kw)
    t_half = teal.thresholds(pp, [(_tokens(2, 16, 8), None)], [0.5])[0.5]
    with teal.teal_model(pp, np.zeros((pp.cfg.n_layers, 2))):
        res = perplexity.evaluate_lm(pp, stream, tau=1.05, **kw)
    with teal.teal_model(pp, t_half):
        half = perplexity.evaluate_lm(pp, stream, tau=1.05, **kw)
    assert_close(res["nll"], ref["nll"], "model_fp32", "TEAL at 0 vs dense GPT-2 NLL")
    assert res["sparsity"] == 0.0 and 0.3 < half["sparsity"] < 0.7 and half["nll"] != ref["nll"]


@pytest.mark.parametrize("p", [0.25, 0.5, 0.75])
def test_calibrated_thresholds_hit_the_target_in_layer_0(models, p):
    model = models["pp"]
    tokens_bt = _tokens(4, 32, 2)
    t_by_p = teal.thresholds(model, [(tokens_bt, None)], [p, 0.1])
    assert set(t_by_p) == {p, 0.1} and t_by_p[p].shape == (2, 2)
    assert np.all(t_by_p[p] > t_by_p[0.1])  # a higher target, higher thresholds
    args = route_args(model.cfg, 1.05)
    with teal.teal_model(model, t_by_p[p]):
        out = model(jnp.asarray(tokens_bt), ffn_args=args)
    kept_x0 = float(np.mean(np.asarray(out.ffn_stats[0].kept_x_t)))
    read_0 = float(np.mean(np.asarray(out.ffn_stats[0].read_t)))
    # np.quantile interpolates between two order statistics: the share of the N calibration
    # entries below t_x is within 2 / N of p (N = 128 tokens x d). The intermediate's share
    # comes from the sparsified input here, so it is only near p.
    n_x = 128 * model.cfg.d_model
    assert abs(kept_x0 - (1 - p)) <= 2 / n_x, (kept_x0, 1 - p)
    # The intermediate's share comes from the sparsified input: exactly the float64 reference
    # on layer 0's dense input (what the calibration captured).
    (x0,) = capture_ffn_inputs(model, [(tokens_bt, None)])[:1]
    mlp = model.layers[0].mlp
    _, read_ref = _reference(x0[None], mlp.w_in[...], mlp.w_out[...], *t_by_p[p][0])
    assert_close(read_0, read_ref.mean(), "op_fp32", "layer 0's read fraction")


def test_sweep_with_teal_rows(models, tmp_path):
    path = tmp_path / "val.txt"
    path.write_text("First document, some words here.\n" * 6 + "\n\f\n" + "Second one.\n" * 8)
    model = models["pp"]
    calib = [(_tokens(2, 32, 3), None)]
    # seq_len 19: a window no other test module compiles, so the trace count below (and
    # test_eval's) does not depend on which module ran first
    before = perplexity.trace_count()
    rows = sweep.sweep(model, CharTokenizer(), str(path), (0.9,), seq_len=19, batch_size=2,
                       max_tokens=120, teal=(0.3, 0.6), teal_down=(0.5,), teal_calib=calib,
                       out_dir=tmp_path / "out", progress=False)  # fmt: skip
    # the tau row, both TEAL rows, the down-row threshold inside the experts: three graphs
    assert perplexity.trace_count() - before == 3
    assert [r["setting"] for r in rows] == ["tau", "teal", "teal", "teal_down"]
    assert [r["label"] for r in rows[1:]] == ["teal-0.3", "teal-0.6", "tau=0.9+down-0.5"]
    assert rows[3]["tau"] == 0.9 and 0.0 < rows[3]["sparsity"] < 1.0
    assert 0.0 < rows[1]["sparsity"] < rows[2]["sparsity"] < 1.0
    assert rows[2]["ppl"] > 0 and np.isfinite(rows[2]["ppl"])
    assert all(isinstance(layer.mlp, PrunePathFFN) for layer in model.layers)
    assert "| teal-0.6 |" in (tmp_path / "out" / "sweep.md").read_text()


def test_bad_input(models, tmp_path):
    model = models["pp"]
    for bad in ([1.0], [-0.1], [float("nan")]):
        with pytest.raises(ValueError, match="TEAL sparsities"):
            teal.thresholds(model, [(_tokens(1, 8, 0), None)], bad)
        with pytest.raises(ValueError, match="TEAL sparsities"):
            sweep.SweepArgs(teal=tuple(bad), out_dir=str(tmp_path)).run()
        with pytest.raises(ValueError, match="TEAL sparsities"):
            sweep.SweepArgs(teal_down=tuple(bad), out_dir=str(tmp_path)).run()
    for kw in ({"teal": (0.5,)}, {"teal_down": (0.5,)}):
        with pytest.raises(ValueError, match="calibration"):
            sweep.sweep(model, CharTokenizer(), "shipped", (0.9,), progress=False, **kw)
    with pytest.raises(ValueError, match=r"\[2, 2\]"), teal.teal_model(model, np.zeros((3, 2))):
        pass
    with pytest.raises(RuntimeError), teal.teal_model(model, np.zeros((2, 2))):
        assert all(isinstance(layer.mlp, teal.TealFFN) for layer in model.layers)
        raise RuntimeError("boom")
    assert all(isinstance(layer.mlp, PrunePathFFN) for layer in model.layers)
