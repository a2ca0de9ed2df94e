"""The batched step's QKV / O product alone (benchmarks/skinny_phase.py): its kernel -- the
step's own ``_skinny`` in a persistent grid with a barrier a layer -- against numpy under the
Triton interpreter (the norm on and off, 16 tokens, chunks that wrap round a staggered start,
several layers and weight sets), and a variant key it does not know refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import TOL, run_triton_interpreted

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import skinny_phase  # noqa: E402


def test_interpreted_product_matches_numpy(tmp_path):
    variants = {
        "default": {},
        "t16_nonorm": {"tokens": 16, "norm": False},
        "layers_bk32": {"layers": 3, "sets": 2, "bk": 32},
        "in_step": {"layers": 2, "bk": 32, "stagger": False},
    }
    out = run_triton_interpreted(
        [
            str(ROOT / "benchmarks" / "skinny_phase.py"),
            "--interpret",
            "--shapes",
            "llama-3.2-1b-qkv",
            "--variants",
            json.dumps(variants),
            "--out",
            str(tmp_path / "rows.jsonl"),
        ],  # fmt: skip
        timeout=600,
    )
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["variant"] for r in rows] == list(variants)
    for r in rows:
        assert r["barrier_failures"] == 0 and r["rel_err"] <= TOL["bf16"], r
    assert skinny_phase.TOL_BF16 == TOL["bf16"]


def test_a_variant_key_it_does_not_know_is_refused():
    with pytest.raises(ValueError, match="unknown variant keys"):
        skinny_phase.plan((48, 160), {"stage": 4}, 1, True)
