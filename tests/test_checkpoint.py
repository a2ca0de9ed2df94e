"""save_model / restore_model: exact round trips (fp32, bf16, sharded), tokenizer and metadata,
retention, extra items, and a clear one-line error for every kind of bad input."""

import json
import logging
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from flax import nnx  # noqa: E402
from helpers import assert_close  # noqa: E402
from hf_fixtures import tiny_llama  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import models as tok_models  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402

from prunepath_jax.checkpoint import latest_step, list_steps, restore_model, save_model  # noqa: E402
from prunepath_jax.loading import load_pretrained  # noqa: E402
from prunepath_jax.sharding import make_mesh, param_spec  # noqa: E402
from prunepath_jax.tokenizer import Tokenizer  # noqa: E402

IDS = np.random.default_rng(0).integers(0, 97, (2, 12)).astype(np.int32)


@nnx.jit
def _forward(model, ids):
    return model(ids).logits


def _logits(model) -> np.ndarray:
    return np.asarray(_forward(model, jnp.asarray(IDS)))


def _tiny_tokenizer() -> Tokenizer:
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "prune": 5}
    tok = HFTokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    return Tokenizer(tok, {**config, "chat_template": "{{ messages[0]['content'] }}"})


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_llama")
    tiny_llama(d, seed=3)
    return load_pretrained(d, progress=False)


@pytest.fixture(scope="module")
def saved(pre, tmp_path_factory):
    """One checkpoint (step 0, with tokenizer) that the bad-input tests copy and damage."""
    d = tmp_path_factory.mktemp("ckpt") / "run"
    save_model(
        d, pre.model, pre.config, tokenizer=_tiny_tokenizer(), metadata={"source": "tiny", "n": 1}
    )
    return d


def _copy(saved, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


def test_fp32_round_trip_is_exact(pre, saved):
    r = restore_model(saved)
    assert r.step == 0
    assert r.config == pre.config
    np.testing.assert_array_equal(_logits(r.model), _logits(pre.model))
    for a, b in zip(
        jax.tree.leaves(nnx.state(r.model)), jax.tree.leaves(nnx.state(pre.model)), strict=True
    ):
        assert a.dtype == b.dtype == jnp.float32
        assert len(a.sharding.device_set) == 1
    meta = r.metadata
    assert meta["n"] == 1 and meta["source"] == "tiny"
    assert meta["versions"]["jax"] == jax.__version__
    assert set(meta["versions"]) >= {"prunepath_jax", "flax", "orbax_checkpoint"}
    assert meta["created"] and meta["param_dtype"] == "float32"
    tok = r.tokenizer
    assert tok is not None and tok.encode("hello prune world") == [1, 3, 5, 4]
    assert tok.eos_id == 2 and tok.apply_chat_template([{"content": "hi"}]) == "hi"
    assert r.extra == {}


def test_bf16_round_trip_and_cast(pre, tmp_path):
    model = load_pretrained(pre.source, dtype=jnp.bfloat16, progress=False).model
    save_model(tmp_path / "bf16", model, pre.config)
    r = restore_model(tmp_path / "bf16")  # dtype defaults to the saved one
    assert {a.dtype for a in jax.tree.leaves(nnx.state(r.model))} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(_logits(r.model), _logits(model))
    assert r.tokenizer is None and r.metadata["param_dtype"] == "bfloat16"
    r32 = restore_model(tmp_path / "bf16", dtype=jnp.float32)
    assert {a.dtype for a in jax.tree.leaves(nnx.state(r32.model))} == {jnp.dtype(jnp.float32)}


def test_restore_sharded_on_mesh(pre, saved):
    mesh = make_mesh(data=2, fsdp=2, model=2, devices=jax.devices()[:8])
    r = restore_model(saved, mesh=mesh)
    kernel = r.model.layers[0].mlp.gate_up_proj.kernel[...]
    path = ("layers", 0, "mlp", "gate_up_proj", "kernel")
    assert kernel.sharding.spec == param_spec(path, kernel.shape, mesh)
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    assert_close(_logits(r.model), _logits(pre.model), "model_fp32", "sharded restore")


def test_keep_last_two_steps_and_extra_items(pre, tmp_path):
    d = tmp_path / "train"
    assert list_steps(d) == [] and latest_step(d) is None
    for step in range(3):
        extra = {
            "opt_state": ocp.args.StandardSave({"mu": jnp.full((3,), step, jnp.float32)}),
            "progress": ocp.args.JsonSave({"tokens_seen": 100 * step}),
        }
        save_model(d, pre.model, pre.config, step=step, keep=2, extra_items=extra)
    assert list_steps(d) == [1, 2] and latest_step(d) == 2
    target = {"mu": jax.ShapeDtypeStruct((3,), jnp.float32)}
    r = restore_model(
        d,
        step=1,
        extra_items={
            "opt_state": ocp.args.StandardRestore(target),
            "progress": ocp.args.JsonRestore(),
        },
    )
    assert r.step == 1 and r.extra["progress"] == {"tokens_seen": 100}
    np.testing.assert_array_equal(r.extra["opt_state"]["mu"], np.ones(3, np.float32))
    assert restore_model(d).step == 2


class Perm(nnx.Variable):
    """A non-Param integer variable, like the neuron permutation a converted FFN carries."""


def test_non_param_variables_round_trip(pre, tmp_path, monkeypatch):
    from prunepath_jax import models
    from prunepath_jax.models.llama import LlamaModel

    class WithPerm(LlamaModel):
        def __init__(self, cfg, *, dtype=jnp.float32, rngs):
            super().__init__(cfg, dtype=dtype, rngs=rngs)
            self.perm = Perm(jnp.zeros((cfg.d_ff,), jnp.int32))

    monkeypatch.setattr(models, "model_class", lambda cfg: WithPerm)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: WithPerm(pre.config, rngs=nnx.Rngs(0))))
    perm = np.random.default_rng(0).permutation(pre.config.d_ff).astype(np.int32)
    pure = {**nnx.to_pure_dict(nnx.state(pre.model)), "perm": jnp.asarray(perm)}
    nnx.replace_by_pure_dict(state, pure)  # (random init of a model eagerly is slow on CPU)
    model = nnx.merge(graphdef, state)
    save_model(tmp_path / "perm", model, pre.config)
    r = restore_model(tmp_path / "perm", dtype=jnp.bfloat16)  # casts floating leaves only
    assert type(r.model.perm) is Perm and r.model.perm[...].dtype == jnp.int32
    np.testing.assert_array_equal(r.model.perm[...], perm)
    assert r.model.norm.weight[...].dtype == jnp.bfloat16
    with pytest.raises(FileNotFoundError, match=r"no item\(s\) \['opt'\] in this step"):
        restore_model(tmp_path / "perm", extra_items={"opt": ocp.args.JsonRestore()})


def test_orbax_logs_stay_quiet(pre, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    save_model(tmp_path / "q", pre.model, pre.config)
    restore_model(tmp_path / "q")
    noisy = [r for r in caplog.records if r.name == "absl" and r.levelno < logging.ERROR]
    assert not noisy, [r.getMessage() for r in noisy[:3]]


# --- bad input ----------------------------------------------------------------------------------


def test_missing_and_empty_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        restore_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: holds no checkpoint"):
        restore_model(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        restore_model(tmp_path / "file")


def test_missing_step_lists_available(saved):
    with pytest.raises(FileNotFoundError, match=r"no step 7; available steps: \[0\]"):
        restore_model(saved, step=7)


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_corrupted_array_file(saved, tmp_path, damage):
    d = _copy(saved, tmp_path)
    files = [p for p in (d / "0" / "state").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)  # the array data
    if damage == "delete":
        biggest.unlink()
    else:
        biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 3])
    with pytest.raises(ValueError, match=rf"{d / '0'}: checkpoint state is corrupted") as e:
        restore_model(d)
    assert "\n" not in str(e.value)


def test_deleted_state_metadata(saved, tmp_path):
    d = _copy(saved, tmp_path)
    (d / "0" / "state" / "_METADATA").unlink()
    with pytest.raises(ValueError, match=rf"{d / '0'}: checkpoint state is corrupted"):
        restore_model(d)


def _config_file(d):
    files = [p for p in (d / "0" / "config").iterdir() if p.name != "commit_success.txt"]
    assert len(files) == 1, files
    return files[0]


def test_garbage_config_json(saved, tmp_path):
    d = _copy(saved, tmp_path)
    _config_file(d).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{d / '0' / 'config'}: checkpoint config is corrupted"):
        restore_model(d)


def test_config_with_unknown_field(saved, tmp_path):
    d = _copy(saved, tmp_path)
    f = _config_file(d)
    f.write_text(json.dumps({**json.loads(f.read_text()), "bogus": 1}))
    with pytest.raises(ValueError, match=r"config: not a valid model config .*bogus"):
        restore_model(d)


def test_expect_config_names_first_difference(pre, saved):
    assert restore_model(saved, expect_config=pre.config).config == pre.config
    other = pre.config.replace(rope_theta=123.0, d_ff=128)
    with pytest.raises(ValueError, match=r"differs from the expected one \(d_ff: 96 != 128\)"):
        restore_model(saved, expect_config=other)


def test_saved_shapes_not_matching_the_config(saved, tmp_path):
    d = _copy(saved, tmp_path)
    f = _config_file(d)
    f.write_text(json.dumps({**json.loads(f.read_text()), "d_ff": 128}))
    with pytest.raises(
        ValueError,
        match=r"layers\.0\.mlp\.down_proj\.kernel has saved shape \(96, 64\) but the "
        r"model expects \(128, 64\)",
    ):
        restore_model(d)


def test_save_refuses_bad_input(pre, saved, tmp_path):
    with pytest.raises(ValueError, match=r"step 0 already exists \(steps: \[0\]\)"):
        save_model(saved, pre.model, pre.config)
    with pytest.raises(ValueError, match=r"config does not describe this model .*d_ff: 96 != 128"):
        save_model(tmp_path / "a", pre.model, pre.config.replace(d_ff=128))
    with pytest.raises(ValueError, match=r"model's cfg vs given: rope_theta"):
        save_model(tmp_path / "b", pre.model, pre.config.replace(rope_theta=1.0))
    with pytest.raises(ValueError, match="reserved"):
        save_model(tmp_path / "c", pre.model, pre.config, metadata={"versions": 1})
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        save_model(tmp_path / "d", pre.model, pre.config, metadata={"x": object()})
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_relative_directory_round_trip(tmp_path, monkeypatch):
    """Orbax wants absolute paths; a relative one (e.g. runs/demo/checkpoint) must still work."""
    from hf_fixtures import tiny_llama

    from prunepath_jax.checkpoint import restore_model, save_model
    from prunepath_jax.loading import load_pretrained

    tiny_llama(tmp_path / "hf", seed=3)
    pre = load_pretrained(tmp_path / "hf", progress=False)
    monkeypatch.chdir(tmp_path)
    save_model("runs/ck", pre.model, pre.config)
    restored = restore_model("runs/ck")
    assert restored.config == pre.config
