"""The quality table's arithmetic (scripts/train_quality.py): which sweep row lands in which
column at each target sparsity."""

import json
import math

from helpers import load_script

tq = load_script("train_quality")


def _rows():
    """A sweep's rows as `eval.sweep.sweep` writes them (48 experts, ppl falling with k)."""
    rows = [{"setting": "dense", "label": "dense", "sparsity": 0.0, "ppl": 10.0}]
    for tau, s, ppl in ((0.9, 0.2, 12.0), (0.7, 0.4, 20.0), (0.5, 0.6, 40.0), (0.3, 0.8, 160.0)):
        rows.append({"setting": "tau", "label": f"tau-{tau}", "sparsity": s, "ppl": ppl})
    for k, ppl in ((36, 13.0), (24, 30.0), (12, 200.0)):
        rows.append({"setting": "static_k", "label": f"top-{k}", "k": k,
                     "sparsity": 1 - k / 48, "ppl": ppl})  # fmt: skip
    for p, ppl in ((0.25, 11.0), (0.5, 15.0), (0.75, 90.0)):
        rows.append({"setting": "teal", "label": f"teal-{p:g}", "sparsity": p, "ppl": ppl})
    for r in rows:
        r["n_experts"] = 48
    return rows


def test_tau_curve_is_interpolated_in_log_ppl_and_none_outside():
    out = tq.interpolate(_rows(), "ppl", log=True)
    assert math.isclose(out[0.5], math.sqrt(20.0 * 40.0), rel_tol=1e-9)  # halfway in log space
    assert math.isclose(out[0.25], 12.0**0.75 * 20.0**0.25, rel_tol=1e-9)
    short = [r for r in _rows() if r["setting"] != "tau" or r["sparsity"] < 0.7]
    assert tq.interpolate(short, "ppl", log=True)[0.75] is None  # past the measured curve


def test_static_and_teal_points_are_exact_rows():
    rows = _rows()
    assert tq.static_points(rows, "ppl", 48) == {0.25: 13.0, 0.5: 30.0, 0.75: 200.0}
    assert tq.teal_points(rows, "ppl") == {0.25: 11.0, 0.5: 15.0, 0.75: 90.0}
    no_teal = [r for r in rows if r["setting"] != "teal"]
    assert tq.teal_points(no_teal, "ppl") == {0.25: None, 0.5: None, 0.75: None}


def test_record_writes_every_column_and_the_raw_rows(tmp_path):
    table = []
    tq.record(table, tmp_path, "lm", "init_only (training-free)", _rows(), "ppl", True, 10.0)
    assert [r["target_sparsity"] for r in table] == [0.25, 0.5, 0.75]
    mid = table[1]
    assert mid["ppl_static_k"] == 30.0 and mid["ppl_teal"] == 15.0 and mid["dense_ppl"] == 10.0
    assert math.isclose(mid["ppl_tau"], math.sqrt(800.0), rel_tol=1e-9)
    raw = (tmp_path / "lm_init_only.jsonl").read_text().splitlines()
    assert [json.loads(line)["label"] for line in raw] == [r["label"] for r in _rows()]
