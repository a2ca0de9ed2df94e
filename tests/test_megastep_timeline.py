"""The one-launch step's per-phase timeline (benchmarks/megastep_decode.py ``timeline``) that
BENCHMARKS.md's phase tables read: barrier openings, wake-up and work times from the stamps."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from megastep_decode import round_stats, stamps_vs_kernel, timeline  # noqa: E402

from prunepath_jax.kernels.triton_megastep import N_SLOTS  # noqa: E402


def test_timeline_reads_barrier_openings_wake_and_work():
    # Two programs, one layer; stamps in ns. Slots: A0 A1 B0 B1 C0 C1 D0 D1 F0 Fsel Floop F1.
    p0 = [0, 1000, 1500, 2000, 2600, 4000, 4000, 4000, 4500, 5000, 8000, 8100]
    p1 = [0, 1200, 1400, 2500, 2700, 3900, 3900, 3900, 4400, 4900, 7000, 7100]
    assert len(p0) == N_SLOTS
    t = np.array([[0, *p0], [0, *p1]], np.int64)
    r = timeline(t, 1)
    ph = r["phase_us_per_layer"]
    # A ends when its last program arrives (1.2 µs), B at 2.5, C and D at 4.0, F at 8.1.
    assert [ph[k] for k in ph] == pytest.approx([1.2, 1.3, 1.5, 0.0, 4.1])
    assert r["wake_us"]["B attention"] == pytest.approx(0.25)  # (0.3 + 0.2) / 2 after 1.2
    assert r["work_mean_us"]["A norm+qkv"] == pytest.approx(1.1)
    assert r["work_max_us"]["F experts"] == pytest.approx(3.6)  # 8.1 - 4.5
    assert (r["F_select_us"], r["F_units_us"], r["F_atomics_us"]) == pytest.approx((0.5, 2.55, 0.1))
    assert r["layers_us"] == pytest.approx(8.1)
    # the expert stream: the first selection's end (4.9) to the last unit loop's end (8.0)
    assert r["F_units_span_us"] == pytest.approx(3.1)


def test_round_stats_pairs_each_round_with_the_first_variant():
    """A drift that slows round 2 for everyone leaves the paired ratio alone."""
    us = {"base": [100.0, 130.0, 101.0], "new": [98.0, 127.4, 99.0]}
    r = round_stats(us)
    assert r["base"]["vs_first"] == 1.0 and r["base"]["rounds"] == 3
    assert r["new"]["us_per_step"] == 99.0 and r["new"]["us_range"] == [98.0, 127.4]
    assert r["new"]["vs_first"] == pytest.approx(0.98)  # ratios 0.98, 0.98, 0.980...


def test_stamps_vs_kernel_reads_what_lies_outside_the_stamps():
    """Programs start 0.2 µs apart; the traced launch is 1.5 µs longer than its stamps span."""
    t = np.array([[1000, 5000, 9000], [1200, 6000, 10000]], np.int64)  # ns: start .. last stamp
    ev = [{"name": "gemm_fusion", "dur": 3.0}, {"name": "_megastep_kernel_0d1d", "dur": 10.5}]
    r = stamps_vs_kernel(t, ev)
    assert r["kernel_us"] == 10.5 and r["stamped_us"] == 9.0 and r["unstamped_us"] == 1.5
    assert (r["first_stamp_spread_us"], r["last_stamp_spread_us"]) == (0.2, 1.0)
    assert stamps_vs_kernel(t, ev[:1])["kernel_us"] is None  # no launch in the trace


def test_batched_timeline_reads_five_phases_over_two_layers():
    """The batched launch's stamps (``benchmarks/megastep_batch_decode.timeline``): two
    programs, two layers, every phase 1 µs of work for program 0 and 2 µs for program 1, which
    leaves each barrier 0.5 µs after the other's arrival."""
    from megastep_batch_decode import timeline as batch_timeline

    from prunepath_jax.kernels.triton_megastep_batch import N_SLOTS as SLOTS5
    from prunepath_jax.kernels.triton_megastep_batch import PHASES

    assert SLOTS5 == 2 * len(PHASES) == 10
    # The barrier before phase j opens at the slower program's end (2.5 µs a
    # phase after the first: 0.5 wake + 2.0 work); both programs wake 0.5 µs after it.
    rows = []
    for work in (1.0, 2.0):
        row, opened = [0.0], 0.0
        for _ in range(2 * len(PHASES)):
            start = opened + 0.5
            row += [start, start + work]
            opened = start + 2.0
        rows.append(row)
    t_ps = (np.array(rows) * 1000).astype(np.int64)
    r = batch_timeline(t_ps, 2)
    assert list(r["phase_us_per_layer"].values()) == pytest.approx([2.5] * 5)
    assert list(r["wake_us"].values()) == pytest.approx([0.5] * 5)
    assert list(r["work_mean_us"].values()) == pytest.approx([1.5] * 5)
    assert list(r["work_max_us"].values()) == pytest.approx([2.0] * 5)
    assert r["layers_us"] == pytest.approx(10 * 2.5)
