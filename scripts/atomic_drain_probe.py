"""What the expert phase's fp32 atomics cost the next grid barrier of the one-launch step.

Why. In the one-launch decode step (``kernels/triton_megastep.py``) every program ends its
expert phase with one relaxed fp32 atomic add of its whole ``[d]`` partial sum into the FFN sum
``f``, then arrives at a barrier with a GPU-scope release, which waits until those adds are
performed at L2. All P programs add into the same d addresses, so L2 serialises P adds an
address. The per-program timeline sees only the adds' issue (0.1 µs); their drain shows up as the
next phase's wake-up after the barrier (1B: 2.2-2.7 µs a layer, SmolLM2 1.1-1.7, 8B 1.4;
BENCHMARKS.md, twenty-fourth and twenty-fifth sessions). This probe separates it: R rounds of
"write d floats, barrier, read f back (.cg) and reduce it", the read feeding the next round's
values (the step's chain), in three modes:

* ``barrier``: no writes, the barrier and the read alone;
* ``atomic``: every program adds its vector into ``f`` (relaxed atomics), as the step does;
* ``rows``: every program stores its vector into its own row of a ``[P, d]`` scratch (plain
  stores, no two programs on one address): what an expert phase without atomics would write.

``atomic − barrier`` is the drain; ``rows − barrier`` what plain stores of the same bytes cost.
With ``--copies C`` the atomic mode adds into ``C`` copies of ``f`` (program p into copy
``p % C``) and the read-back sums them: if the drain is L2 serialising the adds to one address
(P of them), C copies cut it C-fold at the price of C reads; if it is the atomics' total
throughput, copies change nothing.

    python scripts/atomic_drain_probe.py --d 576 2048 4096 --programs 132 --rounds 2000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import header, write_rows  # noqa: E402

from prunepath_jax.kernels import jt  # noqa: E402
from prunepath_jax.kernels.triton_megastep import _arrive, _wait  # noqa: E402

SPIN = 200_000  # polls before a program gives up on a barrier (~40 ms on the H200)
MODES = ("barrier", "atomic", "rows")


@triton.jit
def _drain_kernel(f_ptr, rows_ptr, sink_ptr, ctr_ptr, fail_ptr, R: tl.constexpr,
                  D: tl.constexpr, D_PAD: tl.constexpr, P: tl.constexpr, MODE: tl.constexpr,
                  SPIN: tl.constexpr, C: tl.constexpr):  # fmt: skip
    """``R`` rounds of: write ``[D]`` ones (MODE 1 atomics into copy ``pid % C`` of f, 2 plain
    stores into this program's row), a grid barrier, the ``C`` copies of ``f`` read back from L2
    and reduced; the reduction feeds the next round's values (times 0: the values stay 1, the
    chain stays). With atomics the copies of ``f`` sum to ``R·P`` exactly (integers below
    2^24)."""
    pid = tl.program_id(0)
    rd = tl.arange(0, D_PAD)
    m = rd < D
    v = tl.zeros([D_PAD], tl.float32) + 1.0
    acc = tl.sum(v, 0) * 0.0
    failed = pid * 0
    for r in range(R):
        if MODE == 1:
            tl.atomic_add(f_ptr + (pid % C) * D + rd, v, mask=m, sem="relaxed")
        elif MODE == 2:
            tl.store(rows_ptr + pid * D + rd, v, mask=m)
        _arrive(ctr_ptr)
        failed = _wait(ctr_ptr, P * (r + 1), failed, SPIN)
        for c in tl.static_range(C):
            x = tl.load(f_ptr + c * D + rd, mask=m, other=0.0, cache_modifier=".cg")
            acc += tl.sum(x, 0)
        v += tl.minimum(acc, 0.0) * 0.0  # the next write waits for this read
    tl.store(sink_ptr + pid, acc)
    tl.store(fail_ptr + pid, failed)


def drain_rounds(d: int, *, programs: int, rounds: int, mode: str, warps: int = 4,
                 spin: int = SPIN, copies: int = 1, interpret: bool = False):  # fmt: skip
    """One launch of ``rounds`` rounds: ``(f [d] summed over its copies, rows [programs, d],
    fail [programs])``."""
    if (mode not in MODES or min(d, programs, rounds, copies) < 1 or copies > programs
            or rounds * programs >= 2**24):  # fmt: skip
        raise ValueError(f"mode one of {MODES}; d, programs, rounds, copies >= 1, copies <= "
                         f"programs, rounds · programs < 2^24 (exact sums): {mode!r}, {d}, "
                         f"{programs}, {rounds}, {copies}")  # fmt: skip
    f32 = jnp.float32
    f, rows, _, _, fail = jt.triton_call(
        _drain_kernel,
        out_shape=[jax.ShapeDtypeStruct((copies * d,), f32),
                   jax.ShapeDtypeStruct((programs * d,), f32),
                   jax.ShapeDtypeStruct((programs,), f32),
                   jax.ShapeDtypeStruct((1,), jnp.int32),
                   jax.ShapeDtypeStruct((programs,), jnp.int32)],
        zeroed_outputs=(0, 3), grid=(programs,), num_warps=warps, num_stages=1,
        interpret=interpret, R=rounds, D=d, D_PAD=jt.next_pow2(d), P=programs,
        MODE=MODES.index(mode), SPIN=spin, C=copies,
    )  # fmt: skip
    return f.reshape(copies, d).sum(0), rows.reshape(programs, d), fail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, nargs="+", default=[576, 2048, 4096])
    ap.add_argument("--programs", type=int, nargs="+", default=[132])
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument(
        "--copies",
        type=int,
        nargs="+",
        default=[1],
        help="atomic mode: copies of f the programs spread their adds over",
    )
    ap.add_argument("--out", default="results/atomic_drain.jsonl")
    a = ap.parse_args()
    head = {**header(), "bench": "atomic_drain_probe", "rounds": a.rounds}
    for d in a.d:
        for p in a.programs:
            for w in a.warps:
                runs = [(m, 1) for m in MODES if m != "atomic"]
                runs += [("atomic", c) for c in a.copies]
                for mode, c in runs:
                    fn = jax.jit(lambda d=d, p=p, w=w, mode=mode, c=c: drain_rounds(
                        d, programs=p, rounds=a.rounds, mode=mode, warps=w, copies=c))  # fmt: skip
                    f, _, fail = jax.block_until_ready(fn())
                    ok = mode != "atomic" or bool(np.all(np.asarray(f) == a.rounds * p))
                    ts = []
                    for _ in range(a.iters):
                        t0 = time.perf_counter()
                        jax.block_until_ready(fn())
                        ts.append(time.perf_counter() - t0)
                    row = {
                        **head,
                        "d": d,
                        "programs": p,
                        "warps": w,
                        "mode": mode,
                        "copies": c,
                        "us_per_round": float(np.median(ts)) * 1e6 / a.rounds,
                        "sums_exact": ok,
                        "failed_programs": int(np.asarray(fail).sum()),
                    }
                    write_rows(a.out, [row])  # row by row: a cut run keeps what it measured
                    print({k: v for k, v in row.items() if k not in head}, flush=True)


if __name__ == "__main__":
    main()
