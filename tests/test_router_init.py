"""Training-free router initialisation on tiny random Llama and GPT-2 models: the fit moves the
routers and lowers the cross-entropy, touches nothing else, ranks experts better than chance on
held-out tokens, is deterministic, and the capture is the dense forward pass whatever the router,
gate mode or k clamp."""

import numpy as np
import pytest

pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from helpers import assert_close  # noqa: E402
from hf_fixtures import tiny_gpt2, tiny_llama  # noqa: E402

from prunepath_jax import router_init, routing  # noqa: E402
from prunepath_jax.config import PrunePathConfig  # noqa: E402
from prunepath_jax.convert import layer_list, to_prunepath  # noqa: E402
from prunepath_jax.loading import load_pretrained  # noqa: E402
from prunepath_jax.models.layers import (  # noqa: E402
    activation,
    causal_mask,
    rope_inv_freq,
    rope_tables,
)

G = 16
FIT = {"steps": 60, "batch": 256, "seed": 3, "temperature": 1.0}


@pytest.fixture(scope="module")
def dense_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    tiny_llama(d, seed=5, intermediate_size=256)
    return load_pretrained(d, progress=False).model


@pytest.fixture(scope="module")
def dense_gpt2(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    tiny_gpt2(d, seed=6, n_inner=128)
    return load_pretrained(d, progress=False).model


def _convert(dense, gate="sigmoid", **kw):
    return to_prunepath(dense, PrunePathConfig(group_size=G, gate=gate, **kw), progress=False)[0]


def _batches(seed, n=4, b=4, t=32, vocab=90):
    """Random token batches; the last position of every row is padding (mask 0)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        mask = np.ones((b, t), np.float32)
        mask[:, -1] = 0.0
        out.append((rng.integers(3, vocab, (b, t)).astype(np.int32), mask))
    return out


def _non_router_state(model):
    flat = nnx.to_flat_state(nnx.state(model))
    return {k: np.asarray(v.get_value()) for k, v in flat if k[-1] != "router"}


@pytest.fixture(scope="module")
def fitted(dense_llama):
    model = _convert(dense_llama)
    before = _non_router_state(model)
    model, report = router_init.init_routers(model, _batches(0), **FIT)
    return model, report, before


def test_routers_move_and_ce_drops(fitted):
    model, report, _ = fitted
    for mlp, row in zip(router_init.prunepath_ffns(model), report["layers"], strict=True):
        assert np.abs(np.asarray(mlp.router[...])).max() > 0
        assert row["ce_after"] < row["ce_before"] - 0.01
        assert row["ce_after_heldout"] < row["ce_before_heldout"]
        assert row["ce_after"] >= row["ce_min"] - 1e-4  # cross-entropy never beats the entropy
    assert report["n_tokens"] == 4 * 4 * 31  # padding (mask 0) is not captured
    assert set(report["seconds"]) == {"capture", "fit", "total"}


def test_only_routers_change(fitted):
    model, _, before = fitted
    after = _non_router_state(model)
    assert after.keys() == before.keys()
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v, err_msg=str(k))


def test_module_settings_kept(dense_llama):
    model = _convert(dense_llama, k_max=3)
    ffns = router_init.prunepath_ffns(model)
    ffns[0].compute = "gather"
    settings = [(m.gate_mode, m.k_min, m.k_max, m.compute) for m in ffns]
    router_init.init_routers(model, _batches(1, n=1), **FIT)
    assert [(m.gate_mode, m.k_min, m.k_max, m.compute) for m in ffns] == settings
    assert settings[0] == ("sigmoid", 1, 3, "gather")


def test_capture_is_the_dense_pass(dense_llama):
    """Whatever the router, gate mode and k clamp, the capture sees the dense model's FFN inputs."""
    batches = _batches(2, n=2)
    plain = router_init.capture_ffn_inputs(_convert(dense_llama, gate="none"), batches)
    odd = _convert(dense_llama, gate="sigmoid", k_max=2)
    for i, layer in enumerate(layer_list(odd)):
        r = layer.mlp.router
        r[...] = jax.random.normal(jax.random.key(i), r.shape) * 3.0
    other = router_init.capture_ffn_inputs(odd, batches)
    for a, b in zip(plain, other, strict=True):
        assert_close(b, a, "model_fp32", "captured x")
    # Layer 0's FFN input is computable by hand from the dense model: norm(x + attn(norm(x))).
    layer = dense_llama.layers[0]
    tokens = jnp.asarray(batches[0][0])
    x = dense_llama.embed_tokens(tokens)
    b, t = tokens.shape
    cfg = dense_llama.cfg
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    rope = rope_tables(pos, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    h, _ = layer.self_attn(layer.input_layernorm(x), pos, rope, causal_mask(pos, pos, None), None)
    ref = np.asarray(layer.post_attention_layernorm(x + h))
    keep = batches[0][1].astype(bool)
    assert_close(plain[0][: keep.sum()], ref[keep], "model_fp32", "layer-0 FFN input")


def _explicit_norms(mlp, x_nd):
    """||FFN_e(x)|| written out expert by expert in float64 (no Gram-matrix trick)."""
    p = router_init.ffn_params(mlp)
    w_in = np.asarray(p["w_in"], np.float64)  # [c, f, d]
    w_out = np.asarray(p["w_out"], np.float64)
    h = np.einsum("nd,cfd->ncf", np.asarray(x_nd, np.float64), w_in)
    if p["b_in"] is not None:
        h = h + np.asarray(p["b_in"], np.float64)
    act = lambda v: np.asarray(activation(mlp.act_name)(jnp.asarray(v)), np.float64)
    a = act(h[:, 0]) * h[:, 1] if mlp.gated else act(h[:, 0])
    return np.stack(
        [
            np.linalg.norm(a[:, e * G : (e + 1) * G] @ w_out[e * G : (e + 1) * G], axis=-1)
            for e in range(mlp.e)
        ],
        axis=-1,
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_expert_norms_explicit(family, dense_llama, dense_gpt2):
    model = _convert(dense_llama if family == "llama" else dense_gpt2)
    xs = router_init.capture_ffn_inputs(model, _batches(4, n=1))
    mlp = router_init.prunepath_ffns(model)[1]
    p = router_init.ffn_params(mlp)
    got = router_init.expert_norms(p, xs[1], e=mlp.e, act_name=mlp.act_name, gated=mlp.gated)
    ref = _explicit_norms(mlp, xs[1])
    assert_close(got, ref, "op_fp32", f"{family} expert norms")
    y = router_init.expert_outputs(p, xs[1], e=mlp.e, act_name=mlp.act_name, gated=mlp.gated)
    assert_close(np.linalg.norm(np.asarray(y), axis=-1), ref, "op_fp32", "expert outputs")


def _top1_agreement(model, batches):
    xs = router_init.capture_ffn_inputs(model, batches)
    out = []
    for mlp, x in zip(router_init.prunepath_ffns(model), xs, strict=True):
        p = router_init.ffn_params(mlp)
        n = router_init.expert_norms(p, x, e=mlp.e, act_name=mlp.act_name, gated=mlp.gated)
        logits = routing.router_logits(mlp.router[...], jnp.asarray(x))
        out.append(float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(n, -1))))
    return out


def test_ranks_experts_on_new_tokens(fitted):
    model, _, _ = fitted
    e = router_init.prunepath_ffns(model)[0].e
    for agree in _top1_agreement(model, _batches(99, n=2)):  # tokens never seen by the fit
        assert agree > 3.0 / e, agree


def test_deterministic(dense_llama):
    runs = []
    for _ in range(2):
        model, _ = router_init.init_routers(_convert(dense_llama), _batches(0, n=2), **FIT)
        runs.append([np.asarray(m.router[...]) for m in router_init.prunepath_ffns(model)])
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_gate_shift_keeps_selection(dense_llama):
    """Shifting by c·u leaves p (so the selection) unchanged and only raises the sigmoid gates."""
    batches = _batches(0, n=2)
    xs = router_init.capture_ffn_inputs(_convert(dense_llama), batches)
    base, _ = router_init.fit_routers(_convert(dense_llama), xs, gate_shift=None, **FIT)
    shifted, rep = router_init.fit_routers(_convert(dense_llama), xs, gate_shift=4.0, **FIT)
    assert all(r["gate_shift"] == 4.0 for r in rep["layers"])
    for m0, m1, x in zip(
        router_init.prunepath_ffns(base), router_init.prunepath_ffns(shifted), xs, strict=True
    ):
        g0 = routing.router_logits(m0.router[...], jnp.asarray(x))
        g1 = routing.router_logits(m1.router[...], jnp.asarray(x))
        assert_close(jax.nn.softmax(g1), jax.nn.softmax(g0), "op_fp32", "p under a shift")
        assert float(jnp.mean(jax.nn.sigmoid(g1))) > float(jnp.mean(jax.nn.sigmoid(g0))) + 0.2


def test_gate_none_gets_no_shift(dense_llama):
    model, rep = router_init.init_routers(_convert(dense_llama, gate="none"), _batches(0), **FIT)
    assert all(r["gate_shift"] == 0.0 for r in rep["layers"])
    assert all(m.gate_mode == "none" for m in router_init.prunepath_ffns(model))


def test_gpt2(dense_gpt2):
    model = _convert(dense_gpt2)
    before = _non_router_state(model)
    model, report = router_init.init_routers(model, _batches(7, t=24), **FIT)
    for row in report["layers"]:
        assert row["ce_after"] < row["ce_before"] - 0.01
    after = _non_router_state(model)
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v, err_msg=str(k))
    e = router_init.prunepath_ffns(model)[0].e
    assert min(_top1_agreement(model, _batches(98, n=2, t=24))) > 3.0 / e


def test_targets():
    n = jnp.array([[1.0, 3.0, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    q = router_init.norm_targets(n, 1.0)
    np.testing.assert_allclose(q[0], [0.125, 0.375, 0.0, 0.5], atol=1e-6)
    np.testing.assert_allclose(q[1], [0.25] * 4, atol=1e-6)  # a dead token: no preference
    q2 = router_init.norm_targets(n, 0.5)
    np.testing.assert_allclose(q2[0], np.array([1, 9, 0, 16]) / 26, atol=1e-6)


def test_bad_input(dense_llama):
    with pytest.raises(ValueError, match="PrunePath"):
        router_init.init_routers(dense_llama, _batches(0, n=1))
    with pytest.raises(ValueError, match="empty"):
        router_init.capture_ffn_inputs(_convert(dense_llama), [])
    model = _convert(dense_llama)
    xs = router_init.capture_ffn_inputs(model, _batches(0, n=1))
    with pytest.raises(ValueError, match="layers"):
        router_init.fit_routers(model, xs[:1])
    with pytest.raises(ValueError, match="target"):
        router_init.fit_routers(model, xs, target="bogus", **FIT)


def test_warm_start_only_and_default_temperature(dense_llama):
    """steps=0 is the least-squares fit alone; the default (flatter) targets still rank."""
    xs = router_init.capture_ffn_inputs(_convert(dense_llama), _batches(0))
    model, rep = router_init.fit_routers(_convert(dense_llama), xs, steps=0)
    assert rep["options"]["temperature"] == 4.0
    for row in rep["layers"]:
        assert row["ce_after"] < row["ce_before"]
        assert row["k90"]["router"] <= row["k90"]["index"]
