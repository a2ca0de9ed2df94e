"""One-token expert kernel with work-balanced persistent programs (``experts="balanced"``).

Why. The block kernel of ``pallas_experts.py`` gives each (expert, neuron block) one program,
which streams its ``3·G·d`` weight bytes in a serial chain of tile loads. At one token one
program fills one SM, and an SM streams ~32-34 GB/s that way (H200, BENCHMARKS.md): 45 experts
at 10% of the Llama-3-8B layer run on 45 of 132 SMs (22.8 µs for 35 MB, 1.5 TB/s), 112 at 25%
on 112 (27.8 µs, 75% of copy). The bytes are there to share, not the programs.

How. ``P`` programs (default: two per SM with ``block_n ≤ 2``, else one) split the union's neuron
rows evenly: the union of ``n_used`` experts is ``n_used·G/bn`` units of ``bn`` neurons (a unit
never straddles two experts), and program ``p`` takes units ``[p·U/P, (p+1)·U/P)`` — loads that
differ by at most one unit, whatever k is. A unit reads its ``bn`` W_gate/W_up rows whole
(``[bn, bc]`` chunks of d), reduces them against x in fp32 (broadcast multiply + row sums: no 16-row
tensor-core padding for one token), applies ``silu(gate)·up·σ(g)``, and adds its ``bn`` W_out rows
times those activations into a register accumulator ``[d]``. A program adds its accumulator to the
output once, with relaxed fp32 atomics: at most ``P·d`` atomics per layer, whatever k is (the block
kernel pays ``k·d``).

Neurons are independent until the down-projection sums them, so any split of the rows gives the
same sum up to order; the result equals the reference within the dtype's tolerance.

Prefetch (``prefetch=1``, the default, with 2-neuron units): the unit loop is software-pipelined
in registers, so the next unit's W_gate/W_up rows are in flight while this unit is reduced and
its W_out rows load. Without it each unit costs two dependent DRAM round trips, which is why
small units were slow (4-neuron units: 45.2 µs at 8B / 25%) and 16-neuron units were the best
unprefetched size; with it small units balance finely and hide that latency. Bigger units with
prefetch hold two units' rows in registers and spill (8 neurons: 2×, 16: 30× slower); 2-neuron
units need few enough registers that two programs share an SM (``block_n ≤ 2`` launches two per
SM), which ncu showed is what the one-program-per-SM kernels lacked. Each unit's expert (two
reductions over the gate table) is looked up once, by the iteration that prefetches it.

Measured (H200, device µs per call, one run, BENCHMARKS.md tenth session): 8B layer at k/E 10 /
25 / 50% 15.0 / 27.6 / 49.1 (the default: 2-neuron units, two programs per SM; 76% / 85% of the
copy bandwidth at 25 / 50%), 4-neuron units at one per SM 15.9 / 30.7 / 55.9, the block kernel
22.9 / 28.0 / 52.7; 1B layer at 10 / 25% 7.3 / 12.2 (4-neuron: 6.5 / 13.2; blocks 12.5 / 14.4).
Looking each unit up once instead of twice: 15.0 / 27.6 / 49.1 vs 15.0 / 28.3 / 50.3. Under ncu
the 4-neuron form is latency-bound at one program per SM (249 registers a thread), its top stall
the cross-warp row sums. Tried and reverted (twelfth session, 8B 10 / 25 / 50%, 1B 10 / 25%):
carrying the next unit's W_out rows too (2-neuron units 18.5 / 34.1 / 60.4 µs: past two programs'
registers per SM; 1-neuron units 15.3 / 27.4 / 49.1, a tie; 1B 6.9 / 11.4, a tie) and masking off
the last iteration's reload of its unit (28.4 vs 27.4 µs at 8B / 25%, 12.2 vs 11.4 at 1B / 25%).
``pallas_plan._experts_form`` picks the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from prunepath_jax.kernels import pallas_atomic, pallas_pdl
from prunepath_jax.kernels.jt import next_pow2
from prunepath_jax.kernels.pallas_experts import accumulator_shape, load_cols, union

try:  # The Triton backend module imports on CPU jaxlib too; guard anyway (it is deprecated).
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - only on a jax without Pallas-Triton
    plgpu = None


def chunking(d: int, block_d: int) -> tuple[int, int]:
    """``(bc, n_c)``: d read in ``n_c`` power-of-two chunks of ``bc`` columns (last one masked)."""
    bc = min(next_pow2(d), next_pow2(block_d))
    return bc, -(-d // bc)


def _unit(u, *, per, bn, g, gate_e, cnt_e, iota_e):
    """Unit ``u``'s first neuron row and its expert's gate: union slot ``u // per``, block
    ``u % per`` of that expert's neurons."""
    slot, nb = u // per, u % per
    e = jnp.sum((cnt_e <= slot).astype(jnp.int32))  # expert of union slot `slot`
    g_e = jnp.sum(jnp.where(iota_e == e, gate_e, 0.0))
    return e * g + nb * bn, g_e


def _kernel(gate_ref, x_ref, w_in_ref, w_out_ref, y_in_ref, y_ref, *, d, f, g, bn, bc, n_c,
            n_prog, atomics, prefetch):  # fmt: skip
    """Program p: units ``[p·U/P, (p+1)·U/P)``. With ``prefetch`` the unit loop is software-
    pipelined in registers: iteration u issues unit u+1's W_gate/W_up loads and its own W_out
    loads before it reduces unit u's rows (loaded by the previous iteration), so the next unit's
    DRAM round trip overlaps this unit's work instead of following it."""
    del y_in_ref  # aliased to y_ref (the zeroed fp32 accumulator)
    tail = bc * n_c != d
    p = pl.program_id(0)
    # Chunk starts as traced values: a masked last chunk reaches past d, which Pallas' bound
    # check of static slices rejects (the load's mask keeps it in bounds).
    c0s = [p * 0 + c * bc for c in range(n_c)]
    # x does not depend on the routing: its loads go out first, beside the gate table's.
    xs = [
        load_cols(x_ref.at[:, pl.ds(c0s[c], bc)], (1, bc), c * bc, d, tail).astype(jnp.float32)
        for c in range(n_c)
    ]  # [1, bc] each
    gate_e, cnt_e, n_used = union(gate_ref)  # [1, ep] gates, prefix count of the selected
    iota_e = jax.lax.broadcasted_iota(jnp.int32, gate_e.shape, 1)
    per = g // bn
    n_units = n_used * per
    u0 = p * n_units // n_prog
    u1 = (p + 1) * n_units // n_prog
    unit_of = functools.partial(_unit, per=per, bn=bn, g=g, gate_e=gate_e, cnt_e=cnt_e,
                                iota_e=iota_e)  # fmt: skip

    def rows_in(ref, r0, c):  # [bn, bc] rows r0.. of chunk c
        rows = pl.ds(pl.multiple_of(r0, bn), bn)
        return load_cols(ref.at[rows, pl.ds(c0s[c], bc)], (bn, bc), c * bc, d, tail)

    def load_up(row0):  # W_gate rows then W_up rows (w_in viewed as [2f, d]), every chunk
        return tuple(rows_in(w_in_ref, row0, c) for c in range(n_c)) + tuple(
            rows_in(w_in_ref, f + row0, c) for c in range(n_c)
        )

    def load_out(row0):  # W_out rows, every chunk
        return tuple(rows_in(w_out_ref, row0, c) for c in range(n_c))

    @pl.when(u1 > u0)
    def _():
        def compute(up, g_e, wo, accs):
            h_g = jnp.zeros((bn,), jnp.float32)
            h_u = jnp.zeros((bn,), jnp.float32)
            for c in range(n_c):
                h_g += jnp.sum(up[c].astype(jnp.float32) * xs[c], axis=1)
                h_u += jnp.sum(up[n_c + c].astype(jnp.float32) * xs[c], axis=1)
            a_n = h_g / (1.0 + jnp.exp(-h_g)) * h_u * g_e  # silu(gate)·up·σ(g), fp32 [bn]
            return tuple(
                accs[c] + jnp.sum(a_n[:, None] * wo[c].astype(jnp.float32), axis=0)
                for c in range(n_c)
            )

        zero = tuple(jnp.zeros((bc,), jnp.float32) for _ in range(n_c))
        if prefetch:
            # The carry holds unit u's rows and its (first row, gate), found by the previous
            # iteration: each unit's expert lookup (two reductions over the gate table) runs once.
            def unit(u, carry):
                (row0, g_e), accs, up = carry[0], carry[1 : 1 + n_c], carry[1 + n_c :]
                wo = load_out(row0)
                nxt = unit_of(jnp.minimum(u + 1, u1 - 1))  # the last unit: a harmless reload
                return (nxt,) + compute(up, g_e, wo, accs) + load_up(nxt[0])

            first = unit_of(u0)
            init = (first,) + zero + load_up(first[0])
            accs = jax.lax.fori_loop(u0, u1, unit, init)[1 : 1 + n_c]
        else:

            def unit(u, accs):
                row0, g_e = unit_of(u)
                return compute(load_up(row0), g_e, load_out(row0), accs)

            accs = jax.lax.fori_loop(u0, u1, unit, zero)
        for c in range(n_c):  # columns past d add zeros to the accumulator's padding
            idx = (pl.ds(0, 1), pl.ds(c * bc, bc))
            if atomics == "relaxed":
                pallas_atomic.atomic_add(y_ref, idx, accs[c][None, :])
            else:
                plgpu.atomic_add(y_ref, idx, accs[c][None, :])


def balanced_expert_ffn(gate_pe, x_pd, w_in_cfd, w_out_fd, *, group_size, plan, interpret, y0):
    """fp32 ``[1, d]`` FFN output of one token from its gate table ``[1, ep]`` and x ``[1, d]``.

    ``plan`` (``pallas_plan._plan_balanced``, which checks it) keys used: ``bn`` (neurons per
    unit, a power of two dividing G), ``bc`` / ``n_c`` (columns per chunk of d, chunks),
    ``programs``, ``num_warps``, ``num_stages``, ``atomics``, ``prefetch``. ``y0``: the zeroed
    ``[1, bc·n_c]`` accumulator (the selection kernel's), or None for a fresh memset.
    """
    if gate_pe.shape[0] != 1 or x_pd.shape[0] != 1:
        raise ValueError(f"the balanced kernel takes one token: {gate_pe.shape}, {x_pd.shape}")
    f, d = w_out_fd.shape
    g, bn, bc, n_c = group_size, plan["bn"], plan["bc"], plan["n_c"]
    acc_shape = accumulator_shape(1, d, g, 0, plan)  # (1, bc·n_c): whole chunks of d
    if y0 is None:
        y0 = jnp.zeros(acc_shape, jnp.float32)
    elif y0.shape != acc_shape:
        raise ValueError(f"accumulator {y0.shape} != {acc_shape}")
    n_prog = plan["programs"]
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    kernel = functools.partial(_kernel, d=d, f=f, g=g, bn=bn, bc=bc, n_c=n_c, n_prog=n_prog,
                               atomics=plan["atomics"], prefetch=plan["prefetch"])  # fmt: skip
    out = pl.pallas_call(
        pallas_pdl.early_launch(kernel, interpret=interpret, tag="experts"),
        out_shape=jax.ShapeDtypeStruct(acc_shape, jnp.float32),
        grid=(n_prog,),
        in_specs=[
            pl.BlockSpec(gate_pe.shape, lambda *_: (0, 0)),  # small: every program reads it
            any_spec,  # x [1, d]
            any_spec,  # w_in [2f, d]: gate rows then up rows (a free reshape)
            any_spec,  # w_out [f, d]
            any_spec,  # y0 [1, bc·n_c] fp32 zeros (aliased to the output)
        ],
        out_specs=any_spec,
        input_output_aliases={4: 0},
        compiler_params=plgpu.CompilerParams(
            num_warps=plan["num_warps"], num_stages=plan["num_stages"]
        ),
        interpret=interpret,
        name="prunepath_sparse_ffn_balanced",
    )(gate_pe, x_pd, w_in_cfd.reshape(2 * f, d), w_out_fd, y0)
    return out[:, :d]
