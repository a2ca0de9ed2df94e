"""The host-side probe of scripts/dispatch_probe.py: per-call dispatch against device time."""

from __future__ import annotations

import time

import jax.numpy as jnp
from helpers import load_script


def test_probe_times_calls_pipelined_and_serially():
    calls = []

    def call(st):  # a 2-token "chunk" whose host part takes ~2 ms
        time.sleep(0.002)
        calls.append(1)
        return st + 1, jnp.zeros(2)

    r = load_script("dispatch_probe").probe(call, lambda: jnp.int32(0), steps=2, n=3)
    assert len(calls) == 1 + 3 + 3  # warm-up, pipelined, serial
    assert len(r["dispatch_us_per_call"]) == 3
    assert all(d >= 2000 for d in r["dispatch_us_per_call"])
    assert r["pipelined_us_per_token"] >= 1000  # ≥ 2 ms a call over 2 tokens
    assert r["serial_us_per_token_median"] >= 1000
