"""The checkout as an import environment: nothing of ours shadows a package we depend on."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_nothing_of_ours_shadows_hugging_faces_kernels():
    """transformers (5.25 and later) imports Hugging Face's ``kernels`` package with its models.
    A ``kernels`` module of ours on sys.path shadows it and breaks every Hugging Face fixture:
    ``benchmarks/kernels.py`` did (tests put benchmarks/ on sys.path), and the top-level
    kernels/ folder does wherever the repository root is on sys.path (``python -m pytest``;
    conftest takes it off)."""
    for folder in ("benchmarks", "scripts", "tests"):
        assert not (ROOT / folder / "kernels.py").exists(), folder
        assert not (ROOT / folder / "kernels").exists(), folder
    spec = importlib.util.find_spec("kernels")
    assert spec is None or ROOT not in Path(spec.origin).resolve().parents, spec.origin
