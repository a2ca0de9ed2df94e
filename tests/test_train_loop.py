"""The training loop end to end on a tiny random Llama (and BERT): exact resume after SIGTERM in
either stage, a corrupted latest checkpoint skipped, the final checkpoint restored with one call,
a diverging run stopped with a checkpoint, the CLI, and bad input."""

import json
import os
import signal
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from helpers import assert_close  # noqa: E402
from hf_fixtures import byte_tokenizer, tiny_bert, tiny_llama  # noqa: E402

from prunepath_jax import checkpoint as ckpt  # noqa: E402
from prunepath_jax.loading import load_any, tree_items  # noqa: E402
from prunepath_jax.train.config import TrainConfig  # noqa: E402
from prunepath_jax.train.loop import TrainingDiverged, run  # noqa: E402
from prunepath_jax.train.metrics import read_metrics  # noqa: E402

WORDS = "thee thou art hath doth love night king lord sweet fair death crown sea".split()


def _text(rng, n_docs):
    return "\n\f\n".join(
        " ".join(rng.choice(WORDS, size=rng.integers(20, 60))) for _ in range(n_docs)
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_world")
    tiny_llama(d / "llama", seed=5, vocab_size=260)
    byte_tokenizer().save(d / "llama")
    rng = np.random.default_rng(0)
    (d / "train.txt").write_text(_text(rng, 30))
    (d / "empty.txt").write_text("")
    rows = [{"text": " ".join(rng.choice(WORDS[:7] if i % 2 else WORDS[7:], size=8)),
             "label": i % 2} for i in range(40)]  # fmt: skip
    (d / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = [{"messages": [{"role": "user", "content": " ".join(rng.choice(WORDS, size=6))},
                         {"role": "assistant", "content": " ".join(rng.choice(WORDS, size=4))}]}
           for _ in range(24)]  # fmt: skip
    (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    tiny_bert(d / "bert", seed=6, vocab_size=260)
    byte_tokenizer().save(d / "bert")
    return d


def _cfg(world, out, **kw):
    base = dict(
        source=str(world / "llama"), out_dir=str(out), data=str(world / "train.txt"),
        seq_len=16, batch_size=4, warmup_steps=2, decay_steps=4, hold_steps=2, tau_target=0.6,
        router_init_tokens=0, group_size=16, save_every=3, keep=3, eval_every=4,
        eval_tokens=128, progress=False, tensorboard=False, lr_backbone=1e-3, lr_router=1e-2,
        mesh_data=2, mesh_fsdp=2, mesh_model=2,  # the 8 fake CPU devices of conftest
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _losses(out):
    return [r["loss"] for r in read_metrics(out)]


def _params(out):
    r = ckpt.restore_model(out)
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(r.model))), r


def _sigterm_at(steps):
    def hook(step, _row):
        if step in steps:
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def test_resume_after_sigterm_equals_uninterrupted(world, tmp_path):
    ref = run(_cfg(world, tmp_path / "a"), report=lambda m: None)
    assert ref["status"] == "finished" and ref["step"] == 8
    messages = []
    out = tmp_path / "b"
    # Stop in stage 1 (warm-up, step 1) and mid stage 2 (decay, step 5), by SIGTERM.
    for stop in (1, 5):
        r = run(_cfg(world, out), on_step=_sigterm_at({stop}), report=messages.append)
        assert r["status"] == "preempted" and r["step"] == stop
        assert stop in ckpt.list_steps(out)
    r = run(_cfg(world, out), report=messages.append)
    assert r["status"] == "finished" and r["step"] == 8
    assert any("resumed" in m and "step 5" in m for m in messages)
    got, want = _losses(out), _losses(tmp_path / "a")
    assert len(got) == len(want) == 8
    assert_close(got, want, "op_fp32", "loss sequence after two resumes")
    pa, _ = _params(out)
    pb, restored = _params(tmp_path / "a")
    for (path, a), b in zip(tree_items(pa), [v for _, v in tree_items(pb)], strict=True):
        assert_close(a, b, "op_fp32", str(path))
    # The final checkpoint restores with the one call that reads converted models too.
    loaded = load_any(tmp_path / "a")
    assert loaded.config.prunepath is not None and loaded.tokenizer is not None
    assert restored.metadata["training"]["step"] == 8


def test_corrupted_latest_checkpoint_is_skipped(world, tmp_path):
    out = tmp_path / "run"
    run(_cfg(world, out), report=lambda m: None)
    assert ckpt.list_steps(out) == [3, 6, 8]
    # An interrupted save leaves only Orbax's temporary directory: never a step.
    (out / "11.orbax-checkpoint-tmp-1234").mkdir()
    # Corrupt the newest complete step: truncate every data file of its state.
    for f in (out / "8" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "manifest" not in f.name:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    before = sorted(p.name for p in out.iterdir())
    messages = []
    r = run(_cfg(world, out, hold_steps=3), report=messages.append)  # a longer hold: 9 steps
    assert r["status"] == "finished" and r["step"] == 9
    skipped = [m for m in messages if "step 8" in m and "cannot be restored" in m]
    assert skipped, messages
    assert any("resumed" in m and "step 6" in m for m in messages)
    aside = [p for p in out.iterdir() if p.name.startswith("8.unreadable-")]
    assert len(aside) == 1  # moved aside, not deleted
    assert all((out / n).exists() or n == "8" for n in before)


def test_diverging_run_stops_with_checkpoint(world, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match="not finite.*last good state"):
        run(_cfg(world, out, lr_backbone=1e30, clip_norm=0.0, b1=0.0, b2=0.0),
            report=lambda m: None)  # fmt: skip
    steps = ckpt.list_steps(out)
    assert steps, "no checkpoint was written before stopping"
    params, _ = _params(out)
    assert all(np.isfinite(v).all() for _, v in tree_items(params) if v.dtype.kind == "f")


def test_router_only_run_and_cli(world, tmp_path):
    from prunepath_jax.train.__main__ import main

    cfg = _cfg(world, tmp_path / "cli", mode="router", warmup_steps=1, decay_steps=2,
               hold_steps=0, eval_every=0)  # fmt: skip
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg.to_dict()))
    main([str(path)])
    r = ckpt.restore_model(tmp_path / "cli")
    src = load_any(world / "llama").model
    # Backbone (attention, norms, embeddings) bit-identical to the source after training.
    a = np.asarray(r.model.layers[0].self_attn.qkv_proj.kernel[...])
    b = np.asarray(src.layers[0].self_attn.qkv_proj.kernel[...])
    np.testing.assert_array_equal(a, b)
    with pytest.raises(SystemExit) as e:
        main([str(path), "--seq-len", "4096"])  # longer than the model's context (128)
    assert e.value.code == 2


def test_ffn_kernels_run_on_the_mesh(world, tmp_path):
    """``ffn_kernels`` on the 2 x 2 x 2 mesh (shard_map over data x fsdp; on CPU the registry's
    XLA backend): the same losses as the masked run, and the checkpoint restores."""
    kw = dict(warmup_steps=1, decay_steps=2, hold_steps=0, eval_every=0)
    run(_cfg(world, tmp_path / "masked", **kw), report=lambda m: None)
    run(_cfg(world, tmp_path / "kernels", ffn_kernels=True, **kw), report=lambda m: None)
    want, got = _losses(tmp_path / "masked"), _losses(tmp_path / "kernels")
    assert len(got) == 3 and np.isfinite(got).all()
    assert_close(got, want, "model_fp32", "losses")
    assert ckpt.restore_model(tmp_path / "kernels").model is not None


def test_ffn_kernels_auto_times_both_paths_and_trains_as_masked(world, tmp_path):
    """``ffn_kernels_auto``: the first steps run the masked and the kernel step alternately (each
    compiled once, then three timed steps each), every one of them a training step: the losses
    are the masked run's. The choice is reported and the path of each step is in the metrics."""
    kw = dict(warmup_steps=2, decay_steps=6, hold_steps=2, eval_every=0)
    run(_cfg(world, tmp_path / "masked", **kw), report=lambda m: None)
    said = []
    run(_cfg(world, tmp_path / "auto", ffn_kernels_auto=True, **kw), report=said.append)
    rows = read_metrics(tmp_path / "auto")
    assert len(rows) == 10
    assert [r["ffn_kernels"] for r in rows[:8]] == [0.0, 1.0] * 4
    chosen = [m for m in said if m.startswith("ffn_kernels_auto at step 8,")]
    assert len(chosen) == 1 and "masked" in chosen[0] and "kernels" in chosen[0], said
    picked = 1.0 if chosen[0].endswith("-> kernels") else 0.0
    assert [r["ffn_kernels"] for r in rows[8:]] == [picked, picked]
    assert_close([r["loss"] for r in rows], _losses(tmp_path / "masked"), "model_fp32", "losses")
    with pytest.raises(ValueError, match="set one of them"):
        _cfg(world, tmp_path / "both", ffn_kernels=True, ffn_kernels_auto=True)


def test_bad_input(world, tmp_path, capsys):
    with pytest.raises(ValueError, match="(?i)empty|no text|no doc"):
        run(_cfg(world, tmp_path / "e", data=str(world / "empty.txt")), report=lambda m: None)
    with pytest.raises(ValueError, match="context"):
        run(_cfg(world, tmp_path / "l", seq_len=512), report=lambda m: None)
    with pytest.raises(FileNotFoundError):
        run(_cfg(world, tmp_path / "m", data=str(world / "missing.txt")), report=lambda m: None)
    # A resumed run must keep its settings.
    out = tmp_path / "r"
    run(_cfg(world, out, warmup_steps=1, decay_steps=1, hold_steps=0), report=lambda m: None)
    with pytest.raises(ValueError, match="tau_target"):
        run(_cfg(world, out, warmup_steps=1, decay_steps=1, hold_steps=1, tau_target=0.3),
            report=lambda m: None)  # fmt: skip


def test_classification_run(world, tmp_path):
    cfg = _cfg(world, tmp_path / "cls", source=str(world / "bert"), task="cls",
               data=str(world / "cls.jsonl"), seq_len=16, batch_size=8, gate="none",
               eval_every=4, tensorboard=True)  # fmt: skip
    r = run(cfg, report=lambda m: None)
    assert r["status"] == "finished"
    assert list((tmp_path / "cls" / "tensorboard").glob("events.out.tfevents.*"))
    evals = read_metrics(tmp_path / "cls", "eval")
    assert [e["step"] for e in evals] == [4, 8] and all("accuracy" in e for e in evals)
    assert 0.0 <= r["eval"]["accuracy"] <= 1.0 and "sparsity" in r["eval"]
    restored = ckpt.restore_model(tmp_path / "cls")
    assert restored.config.num_labels == 2 and restored.config.prunepath is not None


def test_classification_head_reuses_a_saved_pooler(world):
    from safetensors.numpy import load_file

    from prunepath_jax.train.prepare import add_classification_head

    model = load_any(world / "bert").model  # encoder only: the pooler is not loaded
    assert model.cfg.num_labels == 0
    with_head = add_classification_head(model, 3, seed=0, source_dir=str(world / "bert"))
    saved = load_file(str(world / "bert" / "model.safetensors"))
    np.testing.assert_array_equal(
        np.asarray(with_head.pooler.kernel[...]), saved["pooler.dense.weight"].T
    )
    assert with_head.classifier.kernel.shape == (model.cfg.d_model, 3)
    # Encoder weights are kept as they were.
    np.testing.assert_array_equal(
        np.asarray(with_head.layers[0].mlp.intermediate.kernel[...]),
        np.asarray(model.layers[0].mlp.intermediate.kernel[...]),
    )


def test_sft_run_trains_on_responses(world, tmp_path):
    cfg = _cfg(world, tmp_path / "sft", task="sft", data=str(world / "sft.jsonl"), seq_len=96,
               warmup_steps=1, decay_steps=2, hold_steps=1, eval_every=2)  # fmt: skip
    r = run(cfg, report=lambda m: None)
    assert r["status"] == "finished" and r["step"] == 4
    rows = read_metrics(tmp_path / "sft")
    # Only assistant tokens count: far fewer than the padded batch's positions.
    assert all(0 < row["count"] < cfg.batch_size * cfg.seq_len / 2 for row in rows)
    assert np.isfinite(r["eval"]["loss"])
