"""The decode-step trace summary (scripts/trace_decode.py) that BENCHMARKS.md's breakdowns read."""

from __future__ import annotations

from helpers import load_script


def _module():
    return load_script("trace_decode")


def test_summary_counts_launches_and_merges_overlapping_intervals():
    ev = [  # two steps: kernels a (2 µs), b (3 µs, overlapping a by 1 µs), then a gap, then c
        {"name": "a", "ts": 0.0, "dur": 2.0},
        {"name": "b", "ts": 1.0, "dur": 3.0},
        {"name": "c", "ts": 10.0, "dur": 1.0},
        {"name": "a", "ts": 20.0, "dur": 2.0},
    ]
    s = _module().summarize(ev, steps=2)
    assert s["launches_per_step"] == 2.0
    assert s["span_us_per_step"] == 11.0  # 0 .. 22
    assert s["busy_us_per_step"] == (4.0 + 1.0 + 2.0) / 2  # [0, 4] ∪ [10, 11] ∪ [20, 22]
    by = {k["name"]: k for k in s["kernels"]}
    assert by["a"]["per_step"] == 1.0 and by["a"]["us_per_step"] == 2.0
    assert [k["name"] for k in s["kernels"]] == ["a", "b", "c"]  # by device µs per step
    assert _module().summarize([], steps=1) == {"error": "no device events in the trace"}


def test_idle_gaps_are_grouped_by_the_kernels_around_them_largest_first():
    ev = [  # two steps of: a, b (inside a: no gap), 1 µs gap, c, 5 µs gap, next step's a
        {"name": "a", "ts": 0.0, "dur": 4.0},
        {"name": "b", "ts": 1.0, "dur": 2.0},
        {"name": "c", "ts": 5.0, "dur": 1.0},
        {"name": "a", "ts": 11.0, "dur": 4.0},
        {"name": "b", "ts": 12.0, "dur": 2.0},
        {"name": "c", "ts": 16.0, "dur": 1.0},
    ]
    summary = _module().summarize(ev, steps=2)
    g = summary["gaps"]
    assert [(r["after"], r["before"]) for r in g] == [("c", "a"), ("a", "c")]
    assert g[0]["us_per_step"] == 2.5 and g[0]["per_step"] == 0.5  # one 5 µs gap in 2 steps
    assert g[1]["us_per_step"] == 1.0 and g[1]["per_step"] == 1.0  # after a, not after b
    assert sum(r["us_per_step"] for r in g) == (
        summary["span_us_per_step"] - summary["busy_us_per_step"]
    )
    assert summary["largest_gap"] == {"after": "c", "before": "a", "us": 5.0}
