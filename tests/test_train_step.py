"""The pure sharded training step: mesh equivalence, router-only mode, accumulation, NaN guard,
schedule and config validation (tiny random Llama converted to PrunePath, CPU fake devices)."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers import assert_close, exported_dots  # noqa: E402
from hf_fixtures import tiny_llama  # noqa: E402

from prunepath_jax.config import PrunePathConfig  # noqa: E402
from prunepath_jax.convert import to_prunepath  # noqa: E402
from prunepath_jax.loading import load_pretrained  # noqa: E402
from prunepath_jax.nn import set_compute  # noqa: E402
from prunepath_jax.sharding import make_mesh  # noqa: E402
from prunepath_jax.train import parallel  # noqa: E402
from prunepath_jax.train import state as st  # noqa: E402
from prunepath_jax.train.config import PRESETS, TrainConfig  # noqa: E402
from prunepath_jax.train.step import tau_at  # noqa: E402

B, T, V = 8, 16, 97


@pytest.fixture(scope="module")
def pp_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    tiny_llama(d, seed=3)
    model = load_pretrained(d, progress=False).model
    model, _ = to_prunepath(model, PrunePathConfig(group_size=16), progress=False)
    # A non-zero router so that selection, gates and the auxiliary losses all matter.
    from flax import nnx

    for i, layer in enumerate(model.layers):
        key = jax.random.key(100 + i)
        layer.mlp.router[...] = jax.random.normal(key, layer.mlp.router.shape) * 0.5
    return model, nnx


def _batch(seed: int = 0, b: int = B) -> dict:
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, V, (b, T + 1)).astype(np.int32)
    token_mask = np.ones((b, T), np.float32)
    token_mask[1, 11:] = 0.0  # a padded row: masked out of loss and routing statistics
    return {
        "tokens": toks[:, :-1],
        "targets": toks[:, 1:],
        "loss_mask": token_mask.copy(),
        "token_mask": token_mask,
        "labels": np.zeros(b, np.int32),
        "last_index": np.full(b, T - 1, np.int32),
    }


CFG = TrainConfig(warmup_steps=1, decay_steps=4, hold_steps=1, tau_target=0.6, batch_size=B,
                  seq_len=T, eta=0.3, lam=0.1, mu=0.05)  # fmt: skip


def _run_steps(model, cfg, mesh_shape, n_steps=2, mode="full", batches=None, kernel=False):
    mesh = make_mesh(*mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
    if kernel:  # what TrainConfig.ffn_kernels does (on CPU the registry's XLA backend)
        set_compute(model, "kernel", mesh=mesh)
    try:
        graphdef, tr, fr = st.split_model(model, mode)  # the graphdef keeps the compute mode
    finally:
        if kernel:
            set_compute(model, "auto")
    tr = jax.tree.map(jnp.array, tr)  # copies: the step donates its state
    fr = jax.tree.map(jnp.array, fr)
    opt = st.make_optimizer(cfg, tr)
    s = st.init_state(cfg, tr, opt)
    ssh, fsh = parallel.tree_shardings(s, mesh), parallel.tree_shardings(fr, mesh)
    s, fr = parallel.place(s, ssh), parallel.place(fr, fsh)
    batches = batches or [_batch(i) for i in range(n_steps)]
    fn = parallel.jit_train_step(cfg, graphdef, opt, mesh, ssh, fsh, batches[0])
    losses = []
    for b in batches:
        s, m = fn(s, fr, parallel.put_batch(b, mesh))
        losses.append(float(m["loss"]))
    return s, fr, losses, m


@pytest.mark.parametrize("mesh_shape", [(2, 2, 1), (1, 2, 2), (2, 2, 2), (1, 4, 2), (8, 1, 1)])
def test_sharded_step_equals_single_device(pp_model, mesh_shape):
    # One step, as the issue asks: a later step can legitimately differ by a selection flip
    # (a token whose cumulative mass sits within float rounding of tau picks one expert more).
    model, _ = pp_model
    ref, _, ref_losses, _ = _run_steps(model, CFG, (1, 1, 1), n_steps=1)
    got, _, losses, _ = _run_steps(model, CFG, mesh_shape, n_steps=1)
    assert_close(losses, ref_losses, "op_fp32", f"loss on mesh {mesh_shape}")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got.params),
                            jax.tree.leaves(ref.params), strict=True):  # fmt: skip
        assert_close(a, b, "op_fp32", f"{jax.tree_util.keystr(path)} on mesh {mesh_shape}")
    # Parameters really are distributed on the bigger meshes.
    if mesh_shape[1] * mesh_shape[2] > 1:
        w = got.params["layers"][0]["mlp"]["w_in"]
        assert len({str(s.index) for s in w[...].addressable_shards}) > 1


def test_router_only_mode_freezes_backbone_bitwise(pp_model):
    model, _ = pp_model
    cfg = CFG.replace(mode="router")
    s, fr, _, m = _run_steps(model, cfg, (1, 2, 1), n_steps=3, mode="router")
    _, full_tr, frozen0 = st.split_model(model, "router")
    # Backbone: passed through unchanged, bit for bit.
    for a, b in zip(jax.tree.leaves(fr), jax.tree.leaves(frozen0), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Only routers train, and only they have optimiser state.
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(s.params)]
    assert paths and all("router" in p for p in paths)
    n_router = st.tree_size(s.params)
    mu_nu = [x for x in jax.tree.leaves(s.opt_state) if x.ndim > 0]
    assert sum(x.size for x in mu_nu) == 2 * n_router  # Adam's two moments, routers only
    pairs = zip(jax.tree.leaves(s.params), jax.tree.leaves(full_tr), strict=True)
    changed = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs]
    assert all(changed)
    assert m["ok"] == 1.0


def test_grad_accumulation_matches_one_batch(pp_model):
    model, _ = pp_model
    # Auxiliary terms are nonlinear in the batch (balance); without them the split is exact.
    cfg = CFG.replace(eta=0.0, lam=0.0, mu=0.0)
    one, _, l1, _ = _run_steps(model, cfg, (1, 1, 1), n_steps=1)
    acc, _, l2, _ = _run_steps(model, cfg.replace(grad_accum=4), (2, 1, 1), n_steps=1)
    assert_close(l2, l1, "op_fp32", "accumulated loss")
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(one.params), strict=True):
        assert_close(a, b, "op_fp32", "accumulated update")


def test_non_finite_loss_leaves_state_unchanged(pp_model):
    model, nnx = pp_model
    poisoned = nnx.clone(model)
    w = poisoned.layers[0].mlp.w_out
    w[...] = w[...].at[0, 0].set(jnp.nan)
    s, _, losses, m = _run_steps(poisoned, CFG, (1, 1, 1), n_steps=1)
    assert not np.isfinite(losses[0]) and m["ok"] == 0.0
    assert int(s.step) == 0
    _, tr0, _ = st.split_model(poisoned, "full")
    for a, b in zip(jax.tree.leaves(s.params), jax.tree.leaves(tr0), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tau_schedule():
    cfg = TrainConfig(warmup_steps=10, decay_steps=20, hold_steps=5, tau_target=0.4)
    got = [float(tau_at(s, cfg)) for s in (0, 9, 10, 20, 30, 34)]
    np.testing.assert_allclose(got, [1.05, 1.05, 1.0, 0.7, 0.4, 0.4], atol=1e-6)
    static = cfg.replace(sparse="static_topk", static_k=3)
    assert float(tau_at(25, static)) == pytest.approx(1.05)


def test_router_loss_gradients_reach_routers(pp_model):
    """Zero task-loss path (gate none) still trains routers through L_ent/L_bal."""
    model, _ = pp_model
    s, _, _, m = _run_steps(model, CFG.replace(mode="router"), (1, 1, 1), n_steps=1, mode="router")
    assert m["grad_norm"] > 0 and m["ent"] > 0 and m["bal"] >= 1.0 - 1e-6


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 1), (1, 2, 2), (2, 2, 2)])
def test_ffn_kernels_step_equals_masked_path(pp_model, mesh_shape):
    """The FFNs on the kernel registry (what ``TrainConfig.ffn_kernels`` does; on CPU its XLA
    backend, differentiated end to end), on one device and under ``shard_map`` over the batch
    axes of bigger meshes: loss, grad norm and every updated weight equal the single-device
    masked step's in float32, full training and router-only."""
    model, _ = pp_model
    for mode in ("full", "router"):
        cfg = CFG.replace(mode=mode)
        ref, _, ref_losses, ref_m = _run_steps(model, cfg, (1, 1, 1), mode=mode)
        got, _, losses, m = _run_steps(model, cfg, mesh_shape, mode=mode, kernel=True)
        what = f"{mode} on {mesh_shape}"
        assert_close(losses, ref_losses, "model_fp32", f"{what}: losses")
        assert ref_m["grad_norm"] > 0
        assert_close(m["grad_norm"], ref_m["grad_norm"], "model_fp32", f"{what}: grad norm")
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got.params),
                                jax.tree.leaves(ref.params), strict=True):  # fmt: skip
            assert_close(a, b, "model_fp32", f"{what}: {jax.tree_util.keystr(path)}")


def test_kernel_compute_refuses_a_mesh_without_batch_axes(pp_model):
    import jax.sharding as jsh

    model, _ = pp_model
    mesh = jsh.Mesh(np.array(jax.devices()[:2]), ("batch",))
    with pytest.raises(ValueError, match="needs axes"):
        set_compute(model, "kernel", mesh=mesh)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown training config field"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="seq_len: expected int"):
        TrainConfig.from_dict({"seq_len": "long"})
    with pytest.raises(ValueError, match="task: must be one of"):
        TrainConfig.from_dict({"task": "translate"})
    with pytest.raises(ValueError, match="lr_router must be > 0"):
        TrainConfig(lr_router=0.0)
    with pytest.raises(ValueError, match="not divisible by grad_accum"):
        TrainConfig(batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match="static_k"):
        TrainConfig(sparse="static_topk")
    with pytest.raises(ValueError, match="finite"):
        TrainConfig(tau_target=float("nan"))
    with pytest.raises(ValueError, match="ffn_kernels"):
        TrainConfig(sparse="dense", mode="full", ffn_kernels=True)
    assert TrainConfig.from_dict(PRESETS["smollm2-lm"].to_dict()) == PRESETS["smollm2-lm"]


def test_cli_parse_rejects_bad_fields(tmp_path):
    from prunepath_jax.train.__main__ import parse

    cfg = parse(["smollm2-lm", "--seq-len", "64", "--mode", "router"])
    assert cfg.seq_len == 64 and cfg.mode == "router" and cfg.task == "lm"
    with pytest.raises(SystemExit):
        parse(["smollm2-lm", "--seq-len", "sixty"])
    with pytest.raises(SystemExit):
        parse(["smollm2-lm", "--no-such-field", "1"])
    with pytest.raises(ValueError, match="unknown preset"):
        parse(["gpt5"])
    bad = tmp_path / "c.json"
    bad.write_text('{"batch_size": 2.5}')
    with pytest.raises(ValueError, match="batch_size: expected int"):
        parse([str(bad)])
    good = tmp_path / "g.json"
    good.write_text('{"task": "sft", "seq_len": 32}')
    assert parse([str(good), "--batch-size", "4"]).batch_size == 4


def test_logits_einsum_backward_runs_in_the_operands_dtype():
    """The LM head's product: float32 logits; for bf16 operands the backward is the bf16
    product's with the cotangent rounded to bf16 (mixed-precision training), within the bf16
    tolerance of the float32 gradients; float32 operands keep the float32 backward bit for bit;
    under ``jax.grad`` lowered for CUDA no product has float32 operands."""
    from prunepath_jax.models.layers import logits_einsum

    kx, kw, kg = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(kx, (2, 24, 64))
    w = jax.random.normal(kw, (97, 64)) * 0.1
    ct = jax.random.normal(kg, (2, 24, 97))
    spec = "btd,vd->btv"
    x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    out = logits_einsum(spec, x16, w16)
    assert out.dtype == jnp.float32
    ref = jnp.einsum(spec, x16, w16, preferred_element_type=jnp.float32)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    got = jax.vjp(lambda a, b: logits_einsum(spec, a, b), x16, w16)[1](ct)
    want16 = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), x16, w16)[1](ct.astype(jnp.bfloat16))
    f32 = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), x16.astype(jnp.float32),
                  w16.astype(jnp.float32))[1](ct)  # fmt: skip
    for g, w_, r in zip(got, want16, f32, strict=True):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w_, np.float32))
        assert_close(g, r, "bf16", "bf16 logits gradient vs float32")
    got32 = jax.vjp(lambda a, b: logits_einsum(spec, a, b), x, w)[1](ct)
    want32 = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), x, w)[1](ct)
    for g, r in zip(got32, want32, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))

    def loss(a, b):
        return jnp.sum(jax.nn.log_softmax(logits_einsum(spec, a, b)))

    dots = exported_dots(jax.grad(loss, argnums=(0, 1)), x16, w16)
    assert len(dots) == 3 and all("f32>, tensor" not in d for d in dots), dots  # fwd + 2 bwd
