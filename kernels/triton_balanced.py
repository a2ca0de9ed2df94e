"""One-token decode FFN in one Triton launch: the selection and the balanced expert loop fused.

Why. Through jax-triton every launch inside a jitted step costs ≈ 6 µs on the H200 (issue 5),
so the Triton backend's one-token layer (an XLA logits GEMV, the per-expert up kernel, the down
kernel, an XLA sum) paid two launches per layer and lost to dense decode at the 1B shape
(0.93×, BENCHMARKS.md). Here the whole FFN after the router logits is one launch, and it is the
work-balanced loop of ``pallas_balanced.py`` (the Pallas backend's one-token default), so the
Triton backend keeps that kernel if Pallas' deprecated Triton backend goes away.

How. Every program first computes the token's selection itself — identical in every program
(same inputs, same operations), so no program waits for another: softmax of the logits, a
descending ``tl.sort`` of the probabilities (raw Triton has a sort; Pallas-Triton does not,
which is why the Pallas path needs a separate selection kernel), their cumulative mass, and
``k = clip(#{r : c_r < τ}, k_min, k_max)`` as in ``routing.select``. The selected set is the
top k by (p descending, index ascending): every expert with ``p > v_k`` (the k-th largest p)
plus, among those with ``p == v_k``, the lowest indices. Then ``P`` programs split the union's
neuron rows into ``BN``-neuron units exactly as the Pallas kernel does (a unit never straddles
two experts; program p takes units ``[p·U/P, (p+1)·U/P)``), with the next unit's W_gate/W_up
rows loaded while the current one is reduced, and add their ``[d]`` fp32 sums into the output
with relaxed atomics. Program 0 writes k.

Rounding: the cumulative mass is a Triton scan here and XLA's scan in the reference, so a mass
within ~1 float32 ulp of τ may fall on the other side (as for every kernel's selection); the
expert sums are fp32 in any order, within the dtype's tolerance of the reference.

Measured (H200, device µs per layer inside the decode step, 75% sparse, 4 warps): 8B 31.1 (the
Pallas backend: balanced kernel 28.0 + selection kernel 4.7; 8 warps here: 37.1), 1B 13.2. End
to end the Triton backend still pays ≈ 6 µs per jax-triton launch and XLA's router logits
(12 µs per 8B layer), so Pallas stays the one-token default (BENCHMARKS.md, tenth session).

Limits: one token; ``next_pow2(d) ≤ 4096`` (one register chunk of d: every Llama-3 / Qwen2 /
Mistral / SmolLM2 width up to 4096); G a multiple of ``block_n``. ``triton_decode`` falls back to
its per-expert kernels otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from prunepath_jax.kernels import jt
from prunepath_jax.kernels.triton_select import _logits, _select

MAX_D = 4096  # one register chunk of d: [BN, next_pow2(d)] tiles, four of them in flight


@triton.jit
def _unit(u, cnt, gate, re, PER: tl.constexpr, BN: tl.constexpr, G: tl.constexpr):
    """Unit ``u``'s first neuron row and its expert's gate: union slot ``u // PER`` (the slot-th
    selected expert, from the inclusive prefix count ``cnt``), neuron block ``u % PER``."""
    e = tl.sum((cnt <= u // PER).to(tl.int32), 0)
    return e * G + (u % PER) * BN, tl.sum(tl.where(re == e, gate, 0.0), 0)


@triton.jit
def _unit_term(x, wg, wu, wo, g_e):
    """One unit's ``[D_PAD]`` f32 contribution: ``silu(x·W_gate)·(x·W_up)·σ(g)`` over its
    ``BN`` neuron rows (``[BN, D_PAD]`` tiles), times those rows of W_out."""
    h_g = tl.sum(wg.to(tl.float32) * x[None, :], 1)
    h_u = tl.sum(wu.to(tl.float32) * x[None, :], 1)
    a = h_g / (1.0 + tl.exp(-h_g)) * h_u * g_e  # [BN]
    return tl.sum(a[:, None] * wo.to(tl.float32), 0)


@triton.jit
def _unit_loop(x, w_in_ptr, w_out_ptr, gate, cnt, u0, u1, D: tl.constexpr,
               D_PAD: tl.constexpr, E_PAD: tl.constexpr, F: tl.constexpr, G: tl.constexpr,
               BN: tl.constexpr):  # fmt: skip
    """``[D_PAD]`` f32: the sum over units ``[u0, u1)`` (``u1 > u0``) of
    ``(silu(x·W_gate)·(x·W_up)·σ(g)) W_out`` over each unit's ``BN`` neuron rows; ``x`` f32
    ``[D_PAD]``, zero past D. The next unit's rows are held in registers (the standalone
    one-token kernel); ``_unit_loop_piped`` is the form for ``triton_megastep``."""
    PER: tl.constexpr = G // BN
    re = tl.arange(0, E_PAD)
    rd = tl.arange(0, D_PAD)
    dmask = rd < D
    rn = tl.arange(0, BN)
    row0, g_e = _unit(u0, cnt, gate, re, PER, BN, G)
    off = (row0 + rn)[:, None] * D + rd[None, :]
    wg = tl.load(w_in_ptr + off, mask=dmask[None, :], other=0.0)
    wu = tl.load(w_in_ptr + F * D + off, mask=dmask[None, :], other=0.0)
    acc = tl.zeros([D_PAD], tl.float32)
    for u in range(u0, u1):
        # Issue this unit's W_out rows and the next unit's W_gate/W_up rows before reducing
        # this unit: the next DRAM round trip overlaps this unit's work (the last unit
        # reloads itself, harmlessly).
        wo = tl.load(w_out_ptr + off, mask=dmask[None, :], other=0.0)
        n_row0, n_g = _unit(tl.minimum(u + 1, u1 - 1), cnt, gate, re, PER, BN, G)
        n_off = (n_row0 + rn)[:, None] * D + rd[None, :]
        n_wg = tl.load(w_in_ptr + n_off, mask=dmask[None, :], other=0.0)
        n_wu = tl.load(w_in_ptr + F * D + n_off, mask=dmask[None, :], other=0.0)
        acc += _unit_term(x, wg, wu, wo, g_e)
        off, g_e, wg, wu = n_off, n_g, n_wg, n_wu
    return acc


@triton.jit
def _unit_loop_piped(x, w_in_ptr, w_out_ptr, gate, cnt, tab_ptr, u0, u1, D: tl.constexpr,
                     D_PAD: tl.constexpr, E_PAD: tl.constexpr, F: tl.constexpr, G: tl.constexpr,
                     BN: tl.constexpr, ST: tl.constexpr, UT: tl.constexpr):  # fmt: skip
    """``_unit_loop``'s sum with the unit rows streamed by Triton's software pipeliner: ``ST``
    stages of ``cp.async`` copies into shared memory, so ``ST - 1`` units' rows (48 KB each at d
    4096) stay in flight without holding registers (``_unit_loop`` keeps one unit ahead in
    registers, which a kernel at its register limit cannot deepen).

    ``UT``: each unit's expert and gate come from the program's table at ``tab_ptr`` (``[2,
    E_PAD]`` int32: the selected experts in index order, then their gates' bits; see
    ``_unit_table``) — two scalar loads instead of ``_unit``'s two block-wide reductions, which
    sit on the address path of every unit's copies."""
    PER: tl.constexpr = G // BN
    re = tl.arange(0, E_PAD)
    rd = tl.arange(0, D_PAD)
    dmask = rd < D
    rn = tl.arange(0, BN)
    acc = tl.zeros([D_PAD], tl.float32)
    for u in tl.range(u0, u1, num_stages=ST):
        if UT:
            slot = u // PER
            row0 = tl.load(tab_ptr + slot) * G + (u % PER) * BN
            g_e = tl.load(tab_ptr + E_PAD + slot).to(tl.float32, bitcast=True)
        else:
            row0, g_e = _unit(u, cnt, gate, re, PER, BN, G)
        off = (row0 + rn)[:, None] * D + rd[None, :]
        wg = tl.load(w_in_ptr + off, mask=dmask[None, :], other=0.0)
        wu = tl.load(w_in_ptr + F * D + off, mask=dmask[None, :], other=0.0)
        wo = tl.load(w_out_ptr + off, mask=dmask[None, :], other=0.0)
        acc += _unit_term(x, wg, wu, wo, g_e)
    return acc


@triton.jit
def _unit_table(tab_ptr, gate, cnt, E_PAD: tl.constexpr):
    """Writes the program's unit table (``_unit_loop_piped``'s ``UT``): slot ``cnt[e] - 1`` of
    each selected expert e holds e and its gate's bits. Read back by the same program's threads
    after the CTA barrier (which orders global memory within the block)."""
    re = tl.arange(0, E_PAD)
    sel = gate != 0.0
    tl.store(tab_ptr + cnt - 1, re, mask=sel)
    tl.store(tab_ptr + E_PAD + cnt - 1, gate.to(tl.int32, bitcast=True), mask=sel)
    tl.debug_barrier()


@triton.jit
def _rank_table(tab_ptr, expert, gate, E_PAD: tl.constexpr):
    """``_unit_table`` from a ranked selection (``triton_select._select_ranked``): slot r holds
    the r-th expert and its gate's bits, no scan needed (slots from k on are never read)."""
    re = tl.arange(0, E_PAD)
    tl.store(tab_ptr + re, expert)
    tl.store(tab_ptr + E_PAD + re, gate.to(tl.int32, bitcast=True))
    tl.debug_barrier()


@triton.jit
def _balanced_kernel(
    x_ptr,  # [1, D] activations (bf16/f16/f32)
    logits_ptr,  # [1, E] f32 router logits
    tau_ptr,  # [1] f32 budget
    w_in_ptr,  # [2, F, D] gate rows then up rows, neuron-major
    w_out_ptr,  # [F, D] down-projection rows
    y_in_ptr,  # [1, D_PAD] f32 zeros (aliased to y_ptr)
    y_ptr,  # out [1, D_PAD] f32: the FFN output, accumulated with atomics
    k_ptr,  # out [1] i32: experts selected (program 0 writes it)
    D: tl.constexpr, E: tl.constexpr, G: tl.constexpr, E_PAD: tl.constexpr,
    D_PAD: tl.constexpr, BN: tl.constexpr, P: tl.constexpr, NUCLEUS: tl.constexpr,
    SIGMOID: tl.constexpr, K_MIN: tl.constexpr, K_MAX: tl.constexpr,
):  # fmt: skip
    F: tl.constexpr = E * G
    PER: tl.constexpr = G // BN
    pid = tl.program_id(0)
    # CACHE passed, not defaulted: triton 3.6 hands a jit callee's defaulted constexpr over as a
    # plain str (a compile error on the H200, nineteenth session; 3.9 accepts it).
    gate, k = _select(_logits(logits_ptr, E, E_PAD, ""), tl.load(tau_ptr), E, E_PAD, NUCLEUS,
                      SIGMOID, K_MIN, K_MAX)  # fmt: skip
    if pid == 0:
        tl.store(k_ptr, k)
    cnt = tl.cumsum((gate != 0.0).to(tl.int32), 0)  # selected experts up to each index
    n_units = k * PER
    u0 = pid * n_units // P
    u1 = (pid + 1) * n_units // P
    if u1 > u0:
        rd = tl.arange(0, D_PAD)
        dmask = rd < D
        x = tl.load(x_ptr + rd, mask=dmask, other=0.0).to(tl.float32)
        acc = _unit_loop(x, w_in_ptr, w_out_ptr, gate, cnt, u0, u1, D, D_PAD, E_PAD, F, G, BN)
        tl.atomic_add(y_ptr + rd, acc, mask=dmask, sem="relaxed")


def supported(t: int, d: int, group_size: int, block_n: int = 2) -> bool:
    """Whether the fused one-token kernel takes this layer (else the per-expert kernels)."""
    return t == 1 and jt.next_pow2(d) <= MAX_D and group_size % block_n == 0


def balanced_ffn_decode(
    x_td: jax.Array,
    logits_te: jax.Array,
    tau,
    w_in_cfd: jax.Array,
    w_out_fd: jax.Array,
    *,
    group_size: int,
    rule: str = "paper",
    gate: str = "sigmoid",
    k_min: int = 1,
    k_max: int | None = None,
    block_n: int = 2,
    programs: int = 0,
    num_warps: int = 4,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``(y_td [1, d] x.dtype, k_t [1] int32)`` of one token from its router logits ``[1, E]``.

    ``programs`` 0: two per SM (2-neuron units; the Pallas kernel's measured best), else one
    per SM. Raises ValueError outside ``supported``.
    """
    t, d = x_td.shape
    f = w_out_fd.shape[0]
    e = f // group_size
    if block_n < 1 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    if not supported(t, d, group_size, block_n):
        raise ValueError(
            f"the fused one-token kernel takes t = 1, next_pow2(d) <= {MAX_D} and G % block_n "
            f"== 0; got t={t}, d={d}, G={group_size}, block_n={block_n}"
        )
    if logits_te.shape != (1, e):
        raise ValueError(f"logits must be [1, {e}], got {logits_te.shape}")
    k_max = e if k_max is None else min(k_max, e)
    if not 1 <= k_min <= k_max:
        raise ValueError(f"need 1 <= k_min <= k_max, got {k_min}, {k_max}")
    if rule not in ("paper", "nucleus") or gate not in ("sigmoid", "none"):
        raise ValueError(f"rule must be paper|nucleus and gate sigmoid|none: {rule!r}, {gate!r}")
    if programs < 0:
        raise ValueError(f"programs must be >= 0 (0: two per SM), got {programs}")
    n_prog = programs or jt.unit_programs(block_n)
    d_pad = jt.next_pow2(d)
    y, k = jt.triton_call(
        _balanced_kernel, x_td, logits_te.astype(jnp.float32),
        jnp.reshape(jnp.asarray(tau, jnp.float32), (1,)), w_in_cfd, w_out_fd,
        jnp.zeros((1, d_pad), jnp.float32),
        out_shape=[jax.ShapeDtypeStruct((1, d_pad), jnp.float32),
                   jax.ShapeDtypeStruct((1,), jnp.int32)],
        input_output_aliases={5: 0}, grid=(n_prog,), num_warps=num_warps, num_stages=1,
        interpret=interpret, D=d, E=e, G=group_size, E_PAD=max(16, jt.next_pow2(e)),
        D_PAD=d_pad, BN=block_n, P=n_prog, NUCLEUS=rule == "nucleus",
        SIGMOID=gate == "sigmoid", K_MIN=k_min, K_MAX=k_max,
    )  # fmt: skip
    return y[:, :d].astype(x_td.dtype), k
