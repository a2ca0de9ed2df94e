"""A one-token sparse FFN layer as one Pallas-Triton launch: logits, selection, experts.

Why. A one-token decode layer of ``pallas_decode.py`` is three launches (router logits, the
selection kernel, the balanced expert kernel), and each carries 3-5 µs beyond its bytes on the
H200 (8B layer: logits 4.9 µs for 1.8 µs of router bytes, selection 4.7 µs for a few KB, the
expert kernel ~5 µs of fixed cost; BENCHMARKS.md, twelfth session). The three depend on each
other only through small buffers (the logits' partial sums, the gate table), so one launch can
run them as phases of a persistent grid, separated by grid-wide barriers.

How. The grid is the balanced kernel's (two programs per SM for 2-neuron units), every program
resident. Phase 1: programs ``pid < n1`` compute one (split of d, block of experts) of the
router GEMV each (``pallas_logits.logits_program``; with the block's RMSNorm weight they also
normalise x, and column block 0 stores it for phase 3). Barrier. Phase 2: programs
``pid < n2`` select their ``be`` experts (``pallas_routing.select_program``: the sort-free rank
and cumulative mass) and write the gate table. Barrier. Phase 3: every program takes its share
of the union's neuron units (``pallas_balanced.balanced_program``) and adds it into the fp32
accumulator with relaxed atomics. The code of each phase is the code of the three-launch layer,
so the results are the same bit for bit up to the atomics' summation order.

The barrier. One fp32 flag per arriving program in a buffer that starts at zero (the same XLA
memset that zeroes the accumulator: one ``jnp.zeros`` per layer): every thread of the program
finishes its stores (``debug_barrier``), the program sets its flag with an acquire-release
exchange (a release fence first), then spins on volatile loads of the flags until all are set,
and one acquire-release atomic orders what it reads next after them (the scheme of CUDA's
cooperative grid sync). Setting a flag is idempotent, so it does not matter how many threads of
a program perform the store. A spin needs every program resident at once: the grid is at most
two programs per SM, the first ``n1`` / ``n2`` (≤ the SM count where possible) are the ones
waited for, and a spin gives up after ``SPIN_LIMIT`` polls and poisons the output with NaN, so a
residency failure shows as NaN, never as a silently wrong sum.

The interpreter runs programs one after another, so a spin would never end there:
``interpret=True`` runs the same kernel body three times, one phase per launch, with the
buffers passed along (CPU tests check the phases and their wiring; the barrier itself runs
only on a GPU, where the tests compare the one-launch layer with the three-launch one).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from prunepath_jax.kernels import pallas_logits
from prunepath_jax.kernels.jt import next_pow2
from prunepath_jax.kernels.pallas_balanced import balanced_program
from prunepath_jax.kernels.pallas_logits import logits_program
from prunepath_jax.kernels.pallas_routing import select_config, select_program

try:  # The Triton backend module imports on CPU jaxlib too; guard anyway (it is deprecated).
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - only on a jax without Pallas-Triton
    plgpu = None

# Polls of the flags before a program gives up (≈ 1 s at ~1 µs per L2 round trip).
SPIN_LIMIT = 1 << 20


def _grid_barrier(buf_ref, base: int, n: int, fp: int, pid) -> jax.Array:
    """Waits until programs ``0..n-1`` have set their flags ``buf[0, base + p]``; returns
    whether they all did (False only after ``SPIN_LIMIT`` polls)."""
    plgpu.debug_barrier()  # every thread of this program has issued its stores

    @pl.when(pid < n)
    def _():
        flag = (pl.ds(0, 1), pl.ds(base + pid, 1))
        plgpu.atomic_xchg(buf_ref, flag, jnp.ones((1, 1), jnp.float32))  # release, then set

    live = jax.lax.broadcasted_iota(jnp.int32, (1, fp), 1) < n
    flags = buf_ref.at[pl.ds(0, 1), pl.ds(base, fp)]

    def poll(c):
        v = plgpu.load(flags, mask=live, other=0.0, volatile=True)
        return jnp.sum(v), c[1] + 1

    def waiting(c):
        return (c[0] < n) & (c[1] < SPIN_LIMIT)

    count, _ = jax.lax.while_loop(waiting, poll, (jnp.float32(0.0), jnp.int32(0)))
    # Acquire: an acquire-release atomic (adding 0 to a set flag) orders the reads after it.
    plgpu.atomic_add(buf_ref, (pl.ds(0, 1), pl.ds(base, 1)), jnp.zeros((1, 1), jnp.float32))
    plgpu.debug_barrier()
    return count >= n


def _counter_barrier(buf_ref, slot: int, n: int, pid) -> jax.Array:
    """As :func:`_grid_barrier` with one fp32 counter at ``buf[0, slot]``: programs ``0..n-1``
    add 1 (an acquire-release atomic: their stores are visible first), every program polls the
    one word (no cross-warp sum a poll) and a CTA barrier keeps the later loads after the loop.
    No acquire atomic after the wait: nothing on this SM read the data behind the barrier
    before (so no stale L1 line), and the data's writers fenced before arriving."""
    plgpu.debug_barrier()
    ctr = (pl.ds(0, 1), pl.ds(slot, 1))

    @pl.when(pid < n)
    def _():
        plgpu.atomic_add(buf_ref, ctr, jnp.ones((1, 1), jnp.float32))

    def poll(c):
        return jnp.max(plgpu.load(buf_ref.at[ctr], volatile=True)), c[1] + 1

    def waiting(c):
        return (c[0] < n) & (c[1] < SPIN_LIMIT)

    count, _ = jax.lax.while_loop(waiting, poll, (jnp.float32(0.0), jnp.int32(0)))
    plgpu.debug_barrier()
    return count >= n


def _kernel(*refs, norm, phases, n1, nj, n2, fp, acc_cols, ep, lp, sel, bal, eps, barrier):
    """Inputs ``x, router, [norm_w], tau, w_in, w_out, buf`` (+ ``part, gate, [xn]`` when run
    one phase a launch, aliased to the outputs); outputs ``buf, part, gate, [xn]``."""
    x_ref, r_ref = refs[0], refs[1]
    nw_ref = refs[2] if norm else None
    tau_ref, w_in_ref, w_out_ref = refs[2 + norm : 5 + norm]
    outs = refs[len(refs) - (3 + norm) :]
    buf_ref, part_ref, gate_ref = outs[:3]
    xn_ref = outs[3] if norm else None
    pid = pl.program_id(0)
    sync = len(phases) == 3
    ok = True
    if 1 in phases:

        @pl.when(pid < n1)
        def _():
            logits_program(x_ref, r_ref, nw_ref, part_ref, xn_ref, pid // nj, pid % nj,
                           stride=ep, p=lp, eps=eps)  # fmt: skip

    if barrier == "counter":  # two counters, a cache line apart
        wait1 = functools.partial(_counter_barrier, buf_ref, acc_cols, n1, pid)
        wait2 = functools.partial(_counter_barrier, buf_ref, acc_cols + 32, n2, pid)
    else:
        wait1 = functools.partial(_grid_barrier, buf_ref, acc_cols, n1, fp, pid)
        wait2 = functools.partial(_grid_barrier, buf_ref, acc_cols + fp, n2, fp, pid)
    if sync:
        ok = wait1()
    if 2 in phases:

        @pl.when(pid < n2)
        def _():
            select_program(part_ref, tau_ref, gate_ref, pid, **sel)

    if sync:
        ok = ok & wait2()
    if 3 in phases:
        x_in = xn_ref if norm else x_ref
        balanced_program(
            lambda: plgpu.load(gate_ref), x_in, w_in_ref, w_out_ref, buf_ref, pid, **bal
        )
    if sync:

        @pl.when(jnp.logical_not(ok))
        def _():  # a program gave up waiting: make the failure visible
            nan = jnp.full((1, 1), jnp.nan, jnp.float32)
            plgpu.atomic_add(buf_ref, (pl.ds(0, 1), pl.ds(0, 1)), nan)


def fused_ffn(x_td, router_de, norm_d, tau, w_in_cfd, w_out_fd, *, group_size, ep, plan,
              select, eps, interpret):  # fmt: skip
    """One token's FFN layer in one launch: ``(y [1, d] fp32, gate_te [1, ep] fp32)``.

    Args:
        x_td: ``[1, d]``: the residual stream when ``norm_d`` is given, else the FFN input.
        router_de: ``[d, E]`` fp32. norm_d: ``[d]`` RMSNorm weight or None. tau: fp32 scalar.
        w_in_cfd, w_out_fd: ``[2, f, d]`` / ``[f, d]`` expert weights (x's dtype).
        group_size: G. ep: E padded to a power of two (≥ 16).
        plan: ``pallas_plan._plan_balanced`` (+ ``_plan_common``'s ``logit_splits``,
            ``logit_block_e``, ``select_block_e``).
        select: ``rule``, ``gate``, ``k_min``, ``k_max`` of the selection.
        eps: the RMSNorm epsilon. interpret: one phase a launch in the Pallas interpreter.

    Raises:
        ValueError: a grid too small for the router GEMV's or the selection's programs.
    """
    t, d = x_td.shape
    f = w_out_fd.shape[0]
    e = router_de.shape[1]
    lp = pallas_logits.plan(1, d, e, splits=plan["logit_splits"], block_e=plan["logit_block_e"])
    nj = e // lp["be"]
    n1 = lp["s"] * nj
    sel = select_config(1, 1, e, ep, lp["s"], block_e=plan["select_block_e"], **select)
    n2 = ep // sel["be"]
    n_prog = plan["programs"]
    if t != 1 or max(n1, n2) > n_prog:
        raise ValueError(
            f"the one-launch layer takes one token and needs programs ({n_prog}) >= the router "
            f"GEMV's {n1} and the selection's {n2}; got {t} tokens"
        )
    bc, n_c = plan["bc"], plan["n_c"]
    acc_cols = bc * n_c
    fp = max(next_pow2(max(n1, n2)), 32)  # flag row width (≥ the counters' cache line)
    bal = dict(d=d, f=f, g=group_size, bn=plan["bn"], bc=bc, n_c=n_c, n_prog=n_prog,
               atomics=plan["atomics"], prefetch=plan["prefetch"])  # fmt: skip
    norm = norm_d is not None
    ins = (
        [x_td, router_de]
        + ([norm_d] if norm else [])
        + [
            jnp.reshape(jnp.asarray(tau, jnp.float32), (1,)),
            w_in_cfd.reshape(2 * f, d),
            w_out_fd,
            jnp.zeros((1, acc_cols + 2 * fp), jnp.float32),  # accumulator, then the two flag rows
        ]
    )
    out_shape = [
        jax.ShapeDtypeStruct((1, acc_cols + 2 * fp), jnp.float32),
        jax.ShapeDtypeStruct((1, lp["s"] * ep), jnp.float32),
        jax.ShapeDtypeStruct((1, ep), jnp.float32),
    ] + ([jax.ShapeDtypeStruct((1, d), x_td.dtype)] if norm else [])
    kern = functools.partial(
        _kernel, norm=norm, n1=n1, nj=nj, n2=n2, fp=fp, acc_cols=acc_cols, ep=ep, lp=lp,
        sel=sel, bal=bal, eps=float(eps), barrier=plan["barrier"],
    )  # fmt: skip
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    call = functools.partial(
        pl.pallas_call,
        out_shape=out_shape,
        out_specs=[any_spec] * len(out_shape),
        compiler_params=plgpu.CompilerParams(
            num_warps=plan["num_warps"], num_stages=plan["num_stages"]
        ),
        interpret=interpret,
        name="prunepath_sparse_ffn_fused",
    )
    n_buf = len(ins) - 1
    if not interpret:
        outs = call(
            functools.partial(kern, phases=(1, 2, 3)),
            grid=(n_prog,),
            in_specs=[any_spec] * len(ins),
            input_output_aliases={n_buf: 0},
        )(*ins)
    else:  # one phase a launch: the interpreter runs programs in turn (no spin can end)
        outs = [ins[-1]] + [jnp.zeros(s.shape, s.dtype) for s in out_shape[1:]]
        aliases = {n_buf + i: i for i in range(len(out_shape))}
        for phase, grid in ((1, n1), (2, n2), (3, n_prog)):
            outs = call(
                functools.partial(kern, phases=(phase,)),
                grid=(grid,),
                in_specs=[any_spec] * (len(ins) - 1 + len(outs)),
                input_output_aliases=aliases,
            )(*ins[:-1], *outs)
    return outs[0][:, :d], outs[2]
