"""PrunePath FFNs in every family: exact dense equivalence at tau > 1 with gate "none", the sigmoid
gate scaling, gathered == masked compute, one compile per tau sweep, and bad input."""

import numpy as np
import pytest

pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from helpers import assert_close  # noqa: E402
from hf_fixtures import tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_qwen2  # noqa: E402

from prunepath_jax.config import PrunePathConfig  # noqa: E402
from prunepath_jax.convert import layer_list, to_prunepath  # noqa: E402
from prunepath_jax.generate import generate  # noqa: E402
from prunepath_jax.loading import load_pretrained  # noqa: E402
from prunepath_jax.models.layers import activation  # noqa: E402
from prunepath_jax.nn import PrunePathFFN, RouteArgs, route_args, set_compute  # noqa: E402

FAMILIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2, "bert": tiny_bert_cls}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def dense(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    FAMILIES[request.param](d, seed=7)
    return request.param, load_pretrained(d, progress=False).model


def _forward(model, ids, ffn_args=None):
    if model.cfg.family == "bert":
        return model.encode(ids, ffn_args=ffn_args)[0]
    return model(ids, ffn_args=ffn_args).logits


def _random_routers(model, seed):
    key = jax.random.key(seed)
    for layer in layer_list(model):
        key, sub = jax.random.split(key)
        r = layer.mlp.router
        r[...] = jax.random.normal(sub, r.shape) * 2.0


def test_all_experts_gate_none_is_dense(dense):
    name, model = dense
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 90, (2, 13)))
    ref = _forward(model, ids)
    pp_model, info = to_prunepath(
        model, PrunePathConfig(group_size=16, gate="none"), progress=False
    )
    _random_routers(pp_model, 2)  # the router must not matter when every expert is active
    out = _forward(pp_model, ids, route_args(pp_model.cfg, 1.05))
    assert_close(out, ref, "op_fp32", f"{name} tau>1 gate none")
    assert len(info["cosine"]) == model.cfg.n_layers


def test_permutation_is_kept(dense):
    _, model = dense
    pp_model, _ = to_prunepath(model, PrunePathConfig(group_size=16), progress=False)
    for dense_layer, layer in zip(layer_list(model), layer_list(pp_model), strict=True):
        perm = np.asarray(layer.mlp.perm[...])
        assert sorted(perm.tolist()) == list(range(model.cfg.d_ff))
        w_out = np.asarray(layer.mlp.w_out[...])
        down = dense_layer.mlp
        ref = down.down_proj.kernel if hasattr(down, "down_proj") else (
            down.c_proj.kernel if hasattr(down, "c_proj") else down.output.kernel
        )  # fmt: skip
        np.testing.assert_array_equal(w_out, np.asarray(ref[...])[perm])


def _explicit_ffn(mlp: PrunePathFFN, x_td: np.ndarray, tau: float) -> np.ndarray:
    """sum over selected e of sigmoid(g_e) * FFN_e(x), written out expert by expert in float64."""
    w_in = np.asarray(mlp.w_in[...], np.float64)
    w_out = np.asarray(mlp.w_out[...], np.float64)
    b_in = None if mlp.b_in is None else np.asarray(mlp.b_in[...], np.float64)
    act = activation(mlp.act_name)
    logits = x_td @ np.asarray(mlp.router[...], np.float64)
    y = np.zeros((x_td.shape[0], w_out.shape[1]))
    for t in range(x_td.shape[0]):
        p = np.exp(logits[t] - logits[t].max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        chosen = [order[0]] + [order[i] for i in range(1, len(order)) if cum[i] < tau]
        for e in chosen:
            sl = slice(e * mlp.g, (e + 1) * mlp.g)
            h = np.einsum("d,cgd->cg", x_td[t], w_in[:, sl])
            if b_in is not None:
                h = h + b_in[:, sl]
            a = np.asarray(act(jnp.asarray(h[0])), np.float64)
            if mlp.gated:
                a = a * h[1]
            y[t] += (1 / (1 + np.exp(-logits[t, e]))) * (a @ w_out[sl])
    if mlp.b_out is not None:
        y += np.asarray(mlp.b_out[...])
    return y


def test_sigmoid_gates_scale_each_expert(dense):
    name, model = dense
    pp_model, _ = to_prunepath(model, PrunePathConfig(group_size=16), progress=False)
    _random_routers(pp_model, 3)
    mlp = layer_list(pp_model)[0].mlp
    x = np.random.default_rng(4).normal(size=(5, model.cfg.d_model)).astype(np.float32)
    for tau in (0.3, 0.7, 1.05):
        y, stats = mlp(jnp.asarray(x)[None], RouteArgs(jnp.float32(tau)))
        assert_close(y[0], _explicit_ffn(mlp, x.astype(np.float64), tau), "op_fp32", name)
        assert stats.k_t.shape == (1, 5)


@pytest.mark.parametrize("b, t", [(1, 1), (3, 1), (2, 5)])
def test_gathered_equals_masked(dense, b, t):
    name, model = dense
    pp_model, _ = to_prunepath(model, PrunePathConfig(group_size=16, k_max=3), progress=False)
    _random_routers(pp_model, 5)
    mlp = layer_list(pp_model)[1].mlp
    x = jnp.asarray(np.random.default_rng(6).normal(size=(b, t, model.cfg.d_model)), jnp.float32)
    for tau in (0.2, 0.6, 1.05):
        mlp.compute = "masked"
        ref, _ = mlp(x, RouteArgs(jnp.float32(tau)))
        mlp.compute = "gather"
        got, stats = mlp(x, RouteArgs(jnp.float32(tau)))
        assert int(stats.k_t.max()) <= 3
        assert_close(got, ref, "op_fp32", f"{name} gather b={b} t={t} tau={tau}")


def test_tau_sweep_compiles_once(tmp_path):
    tiny_llama(tmp_path, seed=8)
    model = load_pretrained(tmp_path, progress=False).model
    pp_model, _ = to_prunepath(model, PrunePathConfig(group_size=16), progress=False)
    _random_routers(pp_model, 9)
    graphdef, state = nnx.split(pp_model)
    traces = []

    @jax.jit
    def k_mean(state, ids, ffn_args):
        traces.append(1)
        out = nnx.merge(graphdef, state)(ids, ffn_args=ffn_args)
        return jnp.stack([s.k_mean for s in out.ffn_stats])

    ids = jnp.asarray(np.random.default_rng(10).integers(3, 90, (2, 9)))
    ks = [k_mean(state, ids, route_args(pp_model.cfg, tau)) for tau in (0.2, 0.5, 0.8, 1.05)]
    per_layer = k_mean(state, ids, route_args(pp_model.cfg, np.array([0.3, 0.9], np.float32)))
    assert len(traces) == 1
    ks = np.stack([np.asarray(k) for k in ks])
    assert (np.diff(ks, axis=0) >= 0).all() and ks[-1].min() == pp_model.cfg.n_experts
    assert per_layer[0] <= per_layer[1]


def test_generation_with_prunepath(tmp_path):
    tiny_llama(tmp_path, seed=11)
    model = load_pretrained(tmp_path, progress=False).model
    pp_model, _ = to_prunepath(model, PrunePathConfig(group_size=16, gate="none"), progress=False)
    prompts = [[5, 6, 7, 8], [9, 10]]
    ref = generate(model, prompts, 10)
    assert generate(pp_model, prompts, 10, ffn_args=route_args(pp_model.cfg, 1.05)) == ref
    sparse = generate(pp_model, prompts, 10, ffn_args=route_args(pp_model.cfg, 0.3))
    assert all(len(s) == 10 for s in sparse)


@pytest.mark.parametrize("tau", [0.0, -0.5, float("nan"), float("inf"), [0.5, 0.5, 0.5]])
def test_bad_tau(tmp_path, tau):
    tiny_llama(tmp_path)
    model = load_pretrained(tmp_path, progress=False).model
    pp_model, _ = to_prunepath(model, PrunePathConfig(group_size=16), progress=False)
    with pytest.raises(ValueError, match="tau|τ"):
        route_args(pp_model.cfg, tau)


def test_group_size_must_divide_ffn(tmp_path):
    tiny_llama(tmp_path)  # d_ff = 96
    model = load_pretrained(tmp_path, progress=False).model
    with pytest.raises(ValueError, match="does not divide"):
        to_prunepath(model, PrunePathConfig(group_size=20), progress=False)


def test_missing_route_args(tmp_path):
    tiny_llama(tmp_path)
    model = load_pretrained(tmp_path, progress=False).model
    pp_model, _ = to_prunepath(model, PrunePathConfig(group_size=16), progress=False)
    with pytest.raises(ValueError, match="RouteArgs"):
        pp_model(jnp.ones((1, 3), jnp.int32))
    set_compute(pp_model, "gather")
    with pytest.raises(ValueError, match="compute mode"):
        set_compute(pp_model, "fast")


def test_checkpoint_round_trip_at_three_taus(tmp_path):
    """convert -> save -> restore (abstract target) gives identical logits at three tau values."""
    from prunepath_jax.checkpoint import restore_model, save_model

    tiny_llama(tmp_path / "hf", seed=12)
    model = load_pretrained(tmp_path / "hf", progress=False).model
    pp_model, _ = to_prunepath(model, PrunePathConfig(group_size=16), progress=False)
    _random_routers(pp_model, 13)
    save_model(tmp_path / "ck", pp_model, pp_model.cfg, metadata={"source": str(tmp_path)})
    restored = restore_model(tmp_path / "ck")
    assert restored.config == pp_model.cfg
    ids = jnp.asarray(np.random.default_rng(14).integers(3, 90, (2, 10)))
    for tau in (0.3, 0.7, 1.05):
        a = pp_model(ids, ffn_args=route_args(pp_model.cfg, tau))
        b = restored.model(ids, ffn_args=route_args(restored.config, tau))
        np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))
        np.testing.assert_array_equal(
            np.asarray(a.ffn_stats[0].k_t), np.asarray(b.ffn_stats[0].k_t)
        )
    np.testing.assert_array_equal(
        np.asarray(layer_list(pp_model)[1].mlp.perm[...]),
        np.asarray(layer_list(restored.model)[1].mlp.perm[...]),
    )
