"""The one-GEMV-phase benchmark (benchmarks/gemv_phase.py): its timeline arithmetic, and its
kernel — the step's own GEMV, norm and router-share device functions in a persistent grid —
against float64 under the Triton interpreter, including the router share from the GEMV's
registers (``ROUTER_FROM_REGS``, off in the step) that no step case runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from gemv_phase import N_STAMPS, main, timeline  # noqa: E402
from helpers import run_triton_interpreted  # noqa: E402


def test_timeline_reads_openings_gemv_and_router_share():
    # Two programs, three layers; per layer: start, GEMV done, router share done (ns).
    p0 = [0, 1000, 3000, 4000, 4600, 7000, 8000, 8700, 11000, 12500]
    p1 = [0, 1200, 3500, 4200, 4500, 6500, 7600, 8800, 10500, 12000]
    t = np.array([p0, p1], np.int64)
    assert t.shape[1] == 1 + 3 * N_STAMPS
    r = timeline(t, 3)
    # Layer 0's barrier opens at the first start (1.0 µs); layers 1 and 2 are averaged: layer 1
    # opens at 4.2 (layer 0's last end) and ends at 8.0, layer 2 opens at 8.0 and ends at 12.5.
    assert r["phase_us"] == pytest.approx(((8.0 - 4.2) + (12.5 - 8.0)) / 2)
    assert r["gemv_us"] == pytest.approx(((7.0 - 4.2) + (11.0 - 8.0)) / 2)
    assert r["wake_us"] == pytest.approx(((0.4 + 0.3) / 2 + (0.7 + 0.8) / 2) / 2)
    assert r["gemv_work_max_us"] == pytest.approx((2.4 + 2.3) / 2)
    assert r["router_work_mean_us"] == pytest.approx(((1.0 + 1.1) / 2 + (1.5 + 1.5) / 2) / 2)


def test_interpreted_phase_matches_float64():
    """Row and column chunks, the router share read back and from registers, the QKV phase with
    its norm: each case's result against the float64 reference (the script exits non-zero on a
    mismatch; the rows say which case)."""
    variants = {
        "regs": {"regs": True},
        "cols_regs": {"cols": 32, "regs": True},
        "cols": {"cols": 32},
        "no_pre": {"pre": False},
    }
    out = run_triton_interpreted(
        [
            str(ROOT / "benchmarks" / "gemv_phase.py"),
            "--interpret",
            "--shapes",
            "llama-3-8b-o",
            "llama-3-8b-qkv",
            "--variants",
            json.dumps(variants),
        ],  # fmt: skip
        timeout=900,
    )
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == 2 * (1 + len(variants))
    for r in rows:
        assert r["ok"] and r["barrier_failures"] == 0, r
        assert r["max_abs_err_h"] < 1e-4, r
    assert any(r["launch"].get("regs") and r["max_abs_err_router"] > 0 for r in rows)


def test_a_variant_key_it_does_not_know_is_refused(monkeypatch, capsys):
    """A typo ("stage" for "stages") would otherwise time the default under another name."""
    argv = ["gemv_phase.py", "--interpret", "--variants", '{"typo": {"stage": 4}}']
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit):
        main()
    assert "variant 'typo'" in capsys.readouterr().err
