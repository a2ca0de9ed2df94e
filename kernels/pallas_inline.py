"""A small layer's one-token PrunePath FFN as one Pallas-Triton launch: every program routes.

Why. At d ≤ 1024 (SmolLM2-135M: d 576, E 48) a decode layer moves a few hundred KB and its
time is kernel chains, not bytes: the three-launch layer of ``pallas_decode.py`` (router logits,
selection, experts) took 2.4 + 2.6 + 4.8 µs per SmolLM2 layer on the H200, ~10 µs against the
~1.3 µs its dense FFN's bytes need, so the model decoded only ~1.08× faster at 75% sparsity
(BENCHMARKS.md, sixteenth session). A grid barrier between those phases cost as much as the
launches it removed (thirteenth session, at 8B). Small layers allow something cheaper: the whole
routing is small enough that every program can redo it. Each program reads the token's row and
the fp32 router (``d·E·4`` bytes: 110 KB at SmolLM2, from L2 after the first program), computes
the logits, the softmax and the paper's cumulative-mass selection (the sort-free rank rule of
``pallas_routing.py``, here over all ``E ≤ 64`` experts at once), finds its own (union slot,
neuron block) and, if the slot is live, streams that block's W_gate/W_up/W_out rows and adds its
share with relaxed fp32 atomics. No program waits for another; the only other launch is XLA's
memset of the accumulator.

Limits (the caller checks ``unsupported_reason``): one token, ``d ≤ SMALL_D`` (the row and one
masked power-of-two tile of d per weight row), ``next_pow2(E) ≤ MAX_EP`` (the ``[E, E]``
comparison of the rank rule in registers), SwiGLU weights. Results equal the three-launch
layer's up to fp32 summation order (the logits are summed in another order, so a cumulative
mass within ~1 float32 ulp of τ may fall on the other side, as ``pallas_routing.py`` says of
itself).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from prunepath_jax.kernels import pallas_atomic, pallas_pdl
from prunepath_jax.kernels.jt import next_pow2
from prunepath_jax.kernels.pallas_experts import load_cols
from prunepath_jax.kernels.pallas_logits import normed, row_scale
from prunepath_jax.kernels.pallas_routing import NEG, check_rule, choose

try:  # The Triton backend module imports on CPU jaxlib too; guard anyway (it is deprecated).
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - only on a jax without Pallas-Triton
    plgpu = None

SMALL_D = 1024  # the row, and each weight row, as one masked power-of-two tile
MAX_EP = 64  # the rank rule's [E, E] comparison stays ≤ 4096 elements in registers
ROUTER_REGS = 32  # fp32 registers a thread per router tile ([rows, ep]: 8192 elements at 8 warps)


def unsupported_reason(t: int, d: int, e: int) -> str | None:
    """Why the one-launch layer cannot take this shape (None when it can)."""
    if t != 1:
        return f"the one-launch layer takes one token, got {t}"
    if d > SMALL_D:
        return f"the one-launch layer takes d <= {SMALL_D}, got {d}"
    if max(next_pow2(e), 16) > MAX_EP:
        return f"the one-launch layer takes E <= {MAX_EP}, got {e}"
    return None


def _row(ref, zero, d, dp, nw_ref, scale):
    """The token's row ``[1, dp]`` (columns ≥ d zero), normalised as ``rms_norm`` when given its
    weight and scale. ``zero``: a traced 0 (Pallas rejects static slices past d; the masks keep
    the loads in bounds)."""
    x = load_cols(ref.at[:, pl.ds(zero, dp)], (1, dp), 0, d, dp != d)
    if nw_ref is None:
        return x
    ok = jax.lax.broadcasted_iota(jnp.int32, (dp,), 0) < d
    return normed(x, plgpu.load(nw_ref.at[pl.ds(zero, dp)], mask=ok, other=0), scale)


def _logits(x_ref, r_ref, nw_ref, scale, zero, *, d, e, ep, warps):
    """Router logits ``[1, ep]`` fp32 (NEG past E): ``Σ_d x·R`` over static ``[br, ep]`` router
    tiles (an unrolled loop: no tile waits for the previous one's reduction), reduced across
    threads once."""
    br = max(1, min(next_pow2(d), ROUTER_REGS * 32 * warps // ep))
    acc = jnp.zeros((1, br, ep), jnp.float32)
    col_ok = jax.lax.broadcasted_iota(jnp.int32, (br, ep), 1) < e
    for c in range(-(-d // br)):
        r0 = zero + c * br
        row_ok = (r0 + jax.lax.broadcasted_iota(jnp.int32, (br, ep), 0)) < d
        w = plgpu.load(r_ref.at[pl.ds(r0, br), pl.ds(zero, ep)], mask=row_ok & col_ok, other=0.0)
        x = load_cols(x_ref.at[:, pl.ds(r0, br)], (1, br), r0, d, True)
        if nw_ref is not None:
            ok = (r0 + jax.lax.broadcasted_iota(jnp.int32, (br,), 0)) < d
            x = normed(x, plgpu.load(nw_ref.at[pl.ds(r0, br)], mask=ok, other=0), scale)
        acc = acc + x.astype(jnp.float32)[:, :, None] * w.astype(jnp.float32)[None]
    lg = jnp.sum(acc, axis=1)  # [1, ep]
    return jnp.where(jax.lax.broadcasted_iota(jnp.int32, (1, ep), 1) < e, lg, NEG)


def _gates(lg, tau, *, e, ep, rule, gate, k_min, k_max):
    """Gates ``[1, ep]`` of every expert from the logits: the selection kernel's rank rule over
    the whole ``[ep, ep]`` comparison at once."""
    m = jnp.max(lg, axis=1)
    z = jnp.sum(jnp.exp(lg - m[:, None]), axis=1)
    p = jnp.exp(lg - m[:, None]) / z[:, None]  # [1, ep]
    pj, pe = p[:, None, :], p[:, :, None]
    j_idx = jax.lax.broadcasted_iota(jnp.int32, (1, ep, ep), 2)
    e_idx = jax.lax.broadcasted_iota(jnp.int32, (1, ep, ep), 1)
    ahead = (pj > pe) | ((pj == pe) & (j_idx < e_idx))  # j strictly ahead of e
    rank = jnp.sum(ahead.astype(jnp.int32), axis=2)
    mass = jnp.sum(jnp.where(ahead, pj, 0.0), axis=2)
    e_b = jax.lax.broadcasted_iota(jnp.int32, (1, ep), 1)
    return choose(rank, mass, p, lg, jnp.sum(p, axis=1), tau, e_b, t=1, e=e, rule=rule,
                  gate=gate, k_min=k_min, k_max=k_max)  # fmt: skip


def _kernel(x_ref, r_ref, tau_ref, *refs, d, f, e, ep, g, bn, eps, norm, route, warps):
    """Program p: union slot ``p // (G/bn)``, neuron block ``p % (G/bn)``. ``refs``: [norm weight
    ``[d]``], W_in ``[2f, d]``, W_out ``[f, d]``, the zeroed accumulator ``[1, dp]`` (aliased),
    then the outputs: the accumulator and ``k [1, 16]`` int32 (program 0 writes it)."""
    it = iter(refs)
    nw_ref = next(it) if norm else None
    w_in_ref, w_out_ref, _, y_ref, k_ref = it
    dp = next_pow2(d)
    pid = pl.program_id(0)
    slot, nb = pid // (g // bn), pid % (g // bn)
    scale = row_scale(x_ref, d, eps) if norm else None
    zero = pid * 0
    lg = _logits(x_ref, r_ref, nw_ref, scale, zero, d=d, e=e, ep=ep, warps=warps)
    tau = jnp.sum(plgpu.load(tau_ref.at[pl.ds(0, 1)]))
    gate_e = _gates(lg, tau, e=e, ep=ep, **route)  # [1, ep]
    used = (gate_e != 0.0).astype(jnp.int32)
    cnt = jnp.cumsum(used, axis=1)
    n_used = jnp.sum(used)

    @pl.when(pid == 0)
    def _():
        plgpu.store(k_ref.at[:, pl.ds(0, 16)], jnp.full((1, 16), n_used, jnp.int32))

    @pl.when(slot < n_used)
    def _():
        ex = jnp.sum((cnt <= slot).astype(jnp.int32))  # expert of this union slot
        iota_e = jax.lax.broadcasted_iota(jnp.int32, (1, ep), 1)
        g_e = jnp.sum(jnp.where(iota_e == ex, gate_e, 0.0))
        row0 = ex * g + nb * bn
        tail = dp != d

        def rows_of(ref, r0):  # [bn, dp] weight rows, columns ≥ d zero
            rows = pl.ds(pl.multiple_of(r0, bn), bn)
            return load_cols(ref.at[rows, pl.ds(zero, dp)], (bn, dp), 0, d, tail).astype(
                jnp.float32
            )

        wg, wu, wo = rows_of(w_in_ref, row0), rows_of(w_in_ref, f + row0), rows_of(w_out_ref, row0)
        x = _row(x_ref, zero, d, dp, nw_ref, scale).astype(jnp.float32)  # [1, dp]
        h_g, h_u = jnp.sum(wg * x, axis=1), jnp.sum(wu * x, axis=1)  # [bn]
        a_n = h_g / (1.0 + jnp.exp(-h_g)) * h_u * g_e  # silu(gate)·up·σ(g), fp32
        y = jnp.sum(a_n[:, None] * wo, axis=0)[None, :]  # [1, dp]
        pallas_atomic.atomic_add(y_ref, (pl.ds(0, 1), pl.ds(0, dp)), y)


def inline_ffn(x_1d, router_de, w_in_cfd, w_out_fd, tau, *, group_size, rule="paper",
               gate="sigmoid", k_min=1, k_max=None, norm_d=None, norm_eps=1e-6, block_n=8,
               num_warps=8, interpret=False):  # fmt: skip
    """One token's PrunePath SwiGLU FFN in one launch: ``(y [1, d] fp32, k [1] int32)``.

    Same arguments as ``pallas_decode.sparse_ffn_decode`` (``x_1d`` is the residual-stream row
    when ``norm_d`` is given: the programs normalise it themselves); ``block_n`` neurons per
    program (a power of two dividing G). Call under jit (the layer's ``_decode_jit`` does).
    """
    t, d = x_1d.shape
    f = w_out_fd.shape[0]
    g = group_size
    e = f // g
    why = unsupported_reason(t, d, e)
    if why is not None:
        raise ValueError(why)
    if g % block_n or block_n & (block_n - 1):
        raise ValueError(f"block_n={block_n} must be a power of 2 dividing group_size={g}")
    k_max = check_rule(rule, gate, k_min, k_max, e)
    ep, dp = max(next_pow2(e), 16), next_pow2(d)
    route = dict(rule=rule, gate=gate, k_min=k_min, k_max=k_max)
    kernel = functools.partial(
        _kernel, d=d, f=f, e=e, ep=ep, g=g, bn=block_n, eps=float(norm_eps),
        norm=norm_d is not None, route=route, warps=num_warps,
    )  # fmt: skip
    extra = [] if norm_d is None else [norm_d]
    tau_1 = jnp.reshape(jnp.asarray(tau, jnp.float32), (1,))
    ins = [x_1d, router_de.astype(jnp.float32), tau_1, *extra, w_in_cfd.reshape(2 * f, d),
           w_out_fd, jnp.zeros((1, dp), jnp.float32)]  # fmt: skip
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    y, k = pl.pallas_call(
        pallas_pdl.early_launch(kernel, interpret=interpret, tag="experts"),
        out_shape=[
            jax.ShapeDtypeStruct((1, dp), jnp.float32),
            jax.ShapeDtypeStruct((1, 16), jnp.int32),
        ],  # fmt: skip
        grid=(k_max * (g // block_n),),
        in_specs=[any_spec] * len(ins),
        out_specs=[any_spec, any_spec],
        input_output_aliases={len(ins) - 1: 0},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="prunepath_sparse_ffn_inline",
    )(*ins)
    return y[:, :d], k[:, 0]
