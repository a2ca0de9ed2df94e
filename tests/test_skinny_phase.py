"""The batched step's QKV / O product alone (benchmarks/skinny_phase.py): its kernel -- the
step's own ``_skinny`` in a persistent grid with a barrier a layer -- against numpy under the
Triton interpreter (the norm on and off, 16 tokens, chunks that wrap round a staggered start,
several layers and weight sets, phase C's router share into shared or private logits), and a
variant key it does not know refused."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from helpers import TOL, run_triton_interpreted, sm90_compile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import skinny_phase  # noqa: E402


def test_interpreted_product_matches_numpy(tmp_path):
    variants = {
        "default": {},
        "t16_nonorm": {"tokens": 16, "norm": False},
        "layers_bk32": {"layers": 3, "sets": 2, "bk": 32},
        "in_step": {"layers": 2, "bk": 32, "stagger": False},
        "atomics": {"layers": 2, "bk": 32, "atomics": True},
        "x_bf16": {"tokens": 5, "xdtype": "bf16"},
        "staged": {"tokens": 3, "stage": True},
        "staged_nonorm_wrap": {"tokens": 16, "norm": False, "stage": True, "bk": 64, "layers": 2},
        "staged_rows64": {"tokens": 2, "stage": True, "rpad": 64},
        "router_shared": {"tokens": 3, "norm": False, "router": "shared", "layers": 2, "sets": 2},
        "router_copies": {"norm": False, "router": "shared", "router_copies": 2, "layers": 3},
        "tp32_router": {"tokens": 7, "tp": 32, "rpad": 64, "router": "shared", "stage": True},
        "router_private_de": {
            "tokens": 16,
            "router": "private",
            "router_de": True,
            "router_stages": 1,
            "rpad": 64,
        },
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
        skinny_phase.plan((48, 160), {"depth": 4}, 1, True)
    with pytest.raises(ValueError, match="xdtype"):
        skinny_phase.plan((48, 160), {"xdtype": "f16"}, 1, True)
    with pytest.raises(ValueError, match="f32 only"):
        skinny_phase.plan((48, 160), {"atomics": True, "xdtype": "bf16"}, 1, True)
    with pytest.raises(ValueError, match="'shared', 'private'"):
        skinny_phase.plan((48, 160), {"router": "all"}, 1, True)
    with pytest.raises(ValueError, match="token columns"):
        skinny_phase.plan((48, 160), {"tp": 64}, 1, True)
    with pytest.raises(ValueError, match="with router 'shared'"):
        skinny_phase.plan((48, 160), {"router": "private", "router_copies": 2}, 1, True)
    with pytest.raises(ValueError, match="add router"):
        skinny_phase.plan((48, 160), {"router_de": True}, 1, True)
    with pytest.raises(ValueError, match="needs E"):
        skinny_phase.plan((48, 160), {"router": "shared"}, 1, True, experts=None)


@pytest.mark.parametrize(
    "variant",
    [
        {"atomics": True, "prefetch": 64},
        {"xdtype": "bf16"},
        {"stage": True},
        {"stage": True, "rpad": 64},
        {"router": "shared", "norm": False, "rpad": 64},
    ],
)
def test_probe_lowers_for_sm90(variant):
    """The probe as the H200 runs it (132 programs, the 1B QKV shape, stamps on): the product
    on the tensor cores as a cp.async pipeline, the surroundings each variant adds (relaxed
    atomics, bulk L2 prefetch of the next layer's rows above d 1024) in the PTX."""
    c = skinny_phase.plan(skinny_phase.SHAPES["llama-3.2-1b-qkv"], variant, 132, False, 256)
    c["DOT_F32"] = False
    x = "*bf16" if variant.get("xdtype") == "bf16" else "*fp32"
    sig = {"w": "*bf16", "x": x, "ln": "*bf16", "wr": "*fp32", "ln2": "*bf16", "out": "*fp32",
           "ctr": "*i32", "tim": "*i64", "fail": "*i32", "xs": "*bf16", "lg": "*fp32"}  # fmt: skip
    ptx = sm90_compile(skinny_phase._skinny_kernel, sig, c, warps=8, stages=1).asm["ptx"]
    assert "cp.async.wait_group" in ptx and "%globaltimer" in ptx
    relaxed_f32 = re.search(r"(red|atom)\.global\.gpu\.relaxed\.add(\.v\d)?\.f32", ptx)
    assert bool(relaxed_f32) == bool(variant.get("atomics") or variant.get("router"))
    assert ("cp.async.bulk.prefetch.L2" in ptx) == bool(variant.get("prefetch"))
    wgmma = variant.get("rpad") == 64  # 64-row tiles: wgmma; the 1B QKV's 24 rows: mma.sync
    assert ("wgmma" in ptx, "mma.sync" in ptx) == (wgmma, not wgmma)
