"""The expert kernels of the Pallas decode FFN: union of experts, neuron blocks, down forms.

`pallas_decode.py` plans the blocks and runs routing; these kernels do the bytes-bound part
from its gate table ``[tp or 1, ep]`` (zero for experts a token did not select):

* Union of experts, in the kernel. Every program reads the small gate table, takes the union
  over tokens and its prefix count, and finds the expert of its slot by one reduction. No host
  sync, no scatter, no extra launch; an expert that several tokens chose is read once, and each
  token's contribution is masked by its own gate.
* Neuron blocks, not experts, are the unit of work. An FFN neuron is independent of the others
  until the down-projection sums them, so program ``(slot, nb)`` owns neurons
  ``[e*G + nb*BN, e*G + (nb+1)*BN)`` of expert ``e``: it reads their W_gate/W_up rows
  (contiguous ``[BN, d]`` slabs, in ``[BN, BD]`` tiles from HBM with ``pl.ds``; a last tile past
  d is masked) and applies ``silu(gate)·up·σ(g)`` in fp32. Splitting G gives the GPU enough
  programs at batch 1 and low k (45 experts at 10% of E = 448 would occupy a third of an H200's
  132 SMs).
* Down-projection, two forms. ``down="atomic"`` (default for one token): the same program reads
  its W_out rows and adds its ``[t, d]`` share with relaxed fp32 atomics (``pallas_atomic.py``:
  Pallas' own are acquire-release, 12-17% slower here) — one launch; one token adds one row
  and is never padded (its row is broadcast to the dot's 16 inside). ``down="split"``
  (default for 2-16 tokens): the program stores its activations and a second kernel, whose
  programs own output columns, sums over the union's experts in registers and adds once per
  chunk; measured on the H200 at batch 16 it is 3.2× faster than per-block atomics
  (BENCHMARKS.md, issue 5).
* Programs past the union count return at once, so the grid is static
  (``min(E, t·k_max) · G/BN`` programs) while the work follows the traced τ.

Two inner-product forms: ``plgpu.dot`` (tensor cores; needs every dim ≥ 16, so tokens are padded
to 16 rows and BN ≥ 16) and broadcast-multiply + sum (no minimum). Both accumulate in fp32;
fp32 weights use IEEE (not TF32) dots.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from prunepath_jax.kernels import pallas_atomic, pallas_pdl

try:  # The Triton backend module imports on CPU jaxlib too; guard anyway (it is deprecated).
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - only on a jax without Pallas-Triton
    plgpu = None


def _atomic_add(plan, ref, idx, val, mask=None):
    """Partial-sum atomics: relaxed by default (``pallas_atomic.py`` says why); ``atomics=
    "acq_rel"`` keeps Pallas' own (fenced) atomics, for measuring the difference."""
    if plan["atomics"] == "relaxed":
        return pallas_atomic.atomic_add(ref, idx, val, mask=mask)
    return plgpu.atomic_add(ref, idx, val, mask=mask)


def load_cols(ref, shape, c0, d, tail: bool):
    """A ``shape`` tile whose columns start at ``c0``; with ``tail``, columns ≥ d read as 0."""
    if not tail:
        return plgpu.load(ref)
    ok = (c0 + jax.lax.broadcasted_iota(jnp.int32, shape, 1)) < d
    return plgpu.load(ref, mask=ok, other=0)


def union(gate_ref):
    """Union of the tokens' experts from the gate table: ``(gate_te, cnt_e, n_used)``."""
    gate_te = gate_ref[...]  # [tp or 1, ep] fp32, zero rows/cols for padding
    used_e = jnp.max((gate_te != 0.0).astype(jnp.int32), axis=0)  # [ep]
    return gate_te, jnp.cumsum(used_e), jnp.sum(used_e)  # inclusive prefix count of the union


def _kernel(
    gate_ref, x_ref, w_in_ref, w_out_ref, y_in_ref, y_ref, *, t, d, f, g, ep, plan, interpret
):
    """One program = one (union slot, neuron block[, d split]). With ``plan["down"] == "split"``
    the program stores its activations ``[tp, bn]`` into ``y_ref`` (``[tp, n_slots·G]``,
    slot-major) for :func:`_down_kernel` instead of doing the down-projection with atomics.

    ``"preact"``: the program adds its gate and up pre-activations over its share of d (one of
    ``up_splits``) into ``y_ref`` (``[tp, n_slots·2G]``: a slot's G gate then G up columns) with
    fp32 atomics, and :func:`_down_kernel` applies ``silu(g)·u·σ`` when it reads them. Why: at
    one token and low k a program's serial chain of dependent loads, not the bytes, sets the
    time (the kernel's fixed cost was ~23 µs of a 38 µs call at 10% of the 8B layer); splitting
    d shortens every chain and multiplies the programs that stream in parallel."""
    del y_in_ref  # aliased to y_ref (the zeroed fp32 accumulator)
    tp, bn, bd, bdo = plan["tp"], plan["bn"], plan["bd"], plan["bdo"]
    splits, ks_n = g // bn, plan["up_splits"]
    n_in = plan["n_in"] // ks_n  # d tiles per program (the last of d may be partial: masked)
    in_tail, out_tail = bd * plan["n_in"] != d, bdo * plan["n_out"] != d
    pid = pl.program_id(0)
    ks = pid % ks_n
    slot = pid // ks_n // splits
    nb = pid // ks_n % splits

    gate_te, cnt_e, n_used = union(gate_ref)

    @pl.when(slot < n_used)
    def _():
        # Expert of this slot: the first e with cnt_e == slot + 1 is #(cnt_e <= slot).
        e = jnp.sum((cnt_e <= slot).astype(jnp.int32))
        iota_e = jax.lax.broadcasted_iota(jnp.int32, gate_te.shape, 1)
        g_t = jnp.sum(jnp.where(iota_e == e, gate_te, 0.0), axis=1)  # [tp] or [1]
        row0 = e * g + nb * bn
        rows = pl.ds(pl.multiple_of(row0, bn), bn)
        rows_up = pl.ds(pl.multiple_of(f + row0, bn), bn)  # w_in is viewed as [2f, d]
        prec = jax.lax.Precision.HIGHEST if plan["fp32"] else None

        def in_body(i, carry):
            acc_g, acc_u = carry
            c0 = (ks * n_in + i) * bd
            cols = pl.ds(pl.multiple_of(c0, bd), bd)
            xr = x_ref.shape[0]
            x = load_cols(x_ref.at[:, cols], (xr, bd), c0, d, in_tail)  # [tp or 1, bd]
            if xr != tp:  # one token on the dot path: 16 identical rows, no padding
                x = jnp.broadcast_to(x, (tp, bd))
            wg = load_cols(w_in_ref.at[rows, cols], (bn, bd), c0, d, in_tail)
            wu = load_cols(w_in_ref.at[rows_up, cols], (bn, bd), c0, d, in_tail)
            if plan["use_dot"]:
                acc_g += plgpu.dot(x, wg, trans_b=True, precision=prec)
                acc_u += plgpu.dot(x, wu, trans_b=True, precision=prec)
            else:  # elementwise FMAs into [tp, bn, bd]; one cross-thread reduction at the end
                x32 = x.astype(jnp.float32)[:, None, :]
                acc_g += x32 * wg.astype(jnp.float32)[None]
                acc_u += x32 * wu.astype(jnp.float32)[None]
            return acc_g, acc_u

        acc_shape = (tp, bn) if plan["use_dot"] else (tp, bn, bd)
        zero = jnp.zeros(acc_shape, jnp.float32)
        h_g, h_u = jax.lax.fori_loop(0, n_in, in_body, (zero, zero))
        if not plan["use_dot"]:
            h_g, h_u = jnp.sum(h_g, axis=-1), jnp.sum(h_u, axis=-1)  # [tp, bn]
        if plan["down"] == "preact":
            c0 = slot * 2 * g + nb * bn
            for c, h in ((c0, h_g), (c0 + g, h_u)):
                cols = (pl.ds(0, tp), pl.ds(pl.multiple_of(c, bn), bn))
                if ks_n == 1:
                    plgpu.store(y_ref.at[cols], h)
                else:
                    _atomic_add(plan, y_ref, cols, h)
            return
        a_tn = h_g / (1.0 + jnp.exp(-h_g)) * h_u * g_t[:, None]  # silu(gate)·up·σ(g), fp32
        if plan["down"] == "split":
            acols = pl.ds(pl.multiple_of(slot * g + nb * bn, bn), bn)
            plgpu.store(y_ref.at[:, acols], a_tn)
            return
        row_ok = jax.lax.broadcasted_iota(jnp.int32, (tp, bdo), 0) < t
        one_row = y_ref.shape[0] == 1 and tp > 1  # one token: its row alone goes out

        def out_body(i, carry):
            cols = pl.ds(pl.multiple_of(i * bdo, bdo), bdo)
            # [bn, bdo]; past d zeros, added to the accumulator's padding columns (no mask)
            wo = load_cols(w_out_ref.at[rows, cols], (bn, bdo), i * bdo, d, out_tail)
            if plan["use_dot"]:
                lhs = a_tn if plan["fp32"] else a_tn.astype(wo.dtype)
                part = plgpu.dot(lhs, wo, precision=prec)  # [tp, bdo] fp32
            else:
                part = jnp.sum(a_tn[:, :, None] * wo.astype(jnp.float32)[None], axis=1)
            if one_row:  # the 16 rows are the same token's: any one is exact (max of equals)
                _atomic_add(plan, y_ref, (pl.ds(0, 1), cols), jnp.max(part, axis=0)[None, :])
                return carry
            # Rows past t are padding (zeros, or copies of the token); the mask skips their
            # atomics. The interpreter cannot discharge masked atomics: it adds them to rows
            # the caller drops.
            mask = None if interpret else row_ok
            _atomic_add(plan, y_ref, (pl.ds(0, tp), cols), part, mask=mask)
            return carry

        jax.lax.fori_loop(0, plan["n_out"], out_body, 0)


def _down_kernel(gate_ref, act_ref, w_out_ref, y_in_ref, y_ref, *, t, g, e, n_slots, plan,
                 interpret):  # fmt: skip
    """Down-projection without per-expert atomics: program ``(j, c)`` owns output columns
    ``[j·bdo, (j+1)·bdo)`` and union slots ``c, c + C, c + 2C, …``; it sums
    ``act[:, slot] @ W_out[expert(slot), cols]`` in registers and adds once (C chunks ⇒ C adds
    per output element instead of one per neuron block)."""
    del y_in_ref
    tp = plan["tp"]
    bdo, chunks = plan["block_d_down"], plan["down_chunks"]
    preact = plan["down"] == "preact"
    j, c = pl.program_id(0), pl.program_id(1)
    gate_te, cnt_e, n_used = union(gate_ref)
    cols = pl.ds(pl.multiple_of(j * bdo, bdo), bdo)
    prec = jax.lax.Precision.HIGHEST if plan["fp32"] else None

    def body(i, acc):
        slot = c + i * chunks
        ok = slot < n_used  # a static trip count (pipelinable loads); dead slots load nothing
        ex = jnp.minimum(jnp.sum((cnt_e <= slot).astype(jnp.int32)), e - 1)
        if preact:  # [tp, g] gate and up pre-activations -> silu(g)·u·σ, fp32
            c0 = slot * 2 * g
            hg, hu = (
                plgpu.load(act_ref.at[:, pl.ds(pl.multiple_of(c0 + o, g), g)],
                           mask=jnp.full((tp, g), ok), other=0.0)
                for o in (0, g)
            )  # fmt: skip
            iota_e = jax.lax.broadcasted_iota(jnp.int32, gate_te.shape, 1)
            g_t = jnp.sum(jnp.where(iota_e == ex, gate_te, 0.0), axis=1)  # [tp] or [1]
            a = hg / (1.0 + jnp.exp(-hg)) * hu * g_t[:, None]
        else:
            a = plgpu.load(
                act_ref.at[:, pl.ds(pl.multiple_of(slot * g, g), g)],
                mask=jnp.full((tp, g), ok),
                other=0.0,
            )  # [tp, g] fp32
        wo = plgpu.load(
            w_out_ref.at[pl.ds(pl.multiple_of(ex * g, g), g), cols],
            mask=jnp.full((g, bdo), ok),
            other=0.0,
        )  # [g, bdo]
        if plan["use_dot"]:
            lhs = a if plan["fp32"] else a.astype(wo.dtype)
            return acc + plgpu.dot(lhs, wo, precision=prec)
        return acc + jnp.sum(a[:, :, None] * wo.astype(jnp.float32)[None], axis=1)

    n_iter = -(-n_slots // chunks)
    if preact:  # many chunks, few live slots each: stop at the union's end (a dynamic loop)
        n_iter = jnp.clip((n_used - c + chunks - 1) // chunks, 0, n_iter)
    acc = jax.lax.fori_loop(0, n_iter, body, jnp.zeros((tp, bdo), jnp.float32))
    row_ok = jax.lax.broadcasted_iota(jnp.int32, (tp, bdo), 0) < t
    _atomic_add(plan, y_ref, (pl.ds(0, tp), cols), acc, mask=None if interpret else row_ok)


def accumulator_shape(t: int, d: int, group_size: int, n_slots: int, plan: dict):
    """Shape of the expert kernel's fp32 output buffer (zeroed, aliased): ``[1 or tp, d']`` for
    the atomic down-projection (d' = d rounded up to whole output tiles), the activations
    ``[tp, n_slots·G(·2)]`` for the split forms."""
    tp = plan["tp"]
    if plan["experts"] == "balanced":  # one row of whole d chunks (pallas_balanced.py)
        return (1, plan["bc"] * plan["n_c"])
    if plan["down"] == "atomic":  # whole output tiles: a masked last tile adds to padding
        return (1 if t == 1 else tp, plan["bdo"] * plan["n_out"])
    return (tp, n_slots * group_size * (2 if plan["down"] == "preact" else 1))


def expert_ffn(
    gate_pe, x_pd, w_in_cfd, w_out_fd, *, t, group_size, n_slots, plan, interpret, y0=None
):
    """The expert kernel alone: fp32 ``[tp, d]`` from the gate table and padded x ``[tp, d]``.

    Separate so benchmarks can time the bytes-bound part without the routing launches.
    ``n_slots`` bounds the union size statically (``min(E, t·k_max)``). The gate table is
    ``[tp, ep]``, or ``[1, ep]`` for one token: every program reads it before its first weight
    load, so one token does not pay for 15 padding rows (32 KB at E = 448) in that prologue.
    ``y0``: the zeroed accumulator (``accumulator_shape``) if the caller has one (the selection
    kernel zeroes it on the way), else a fresh ``jnp.zeros`` (an XLA memset).
    """
    tp = plan["tp"]
    tg, ep = gate_pe.shape
    if tg not in (1, tp) or x_pd.shape[0] not in (1, tp):
        raise ValueError(f"gate table and x need 1 or {tp} rows: {gate_pe.shape}, {x_pd.shape}")
    f, d = w_out_fd.shape
    split = plan["down"] != "atomic"
    acc_shape = accumulator_shape(t, d, group_size, n_slots, plan)
    if y0 is None:
        y0 = jnp.zeros(acc_shape, jnp.float32)
    elif y0.shape != acc_shape:
        raise ValueError(f"accumulator {y0.shape} != {acc_shape}")
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    gate_spec = pl.BlockSpec((tg, ep), lambda *_: (0, 0))  # small: every program reads it
    params = plgpu.CompilerParams(num_warps=plan["num_warps"], num_stages=plan["num_stages"])
    out = pl.pallas_call(
        pallas_pdl.early_launch(
            functools.partial(
                _kernel, t=t, d=d, f=f, g=group_size, ep=ep, plan=plan, interpret=interpret
            ),
            interpret=interpret,
            tag="experts",
        ),
        out_shape=jax.ShapeDtypeStruct(acc_shape, jnp.float32),
        grid=(n_slots * (group_size // plan["bn"]) * plan["up_splits"],),
        in_specs=[
            gate_spec,
            any_spec,  # x_td [tp, d]
            any_spec,  # w_in [2f, d]: gate rows then up rows (a free reshape)
            any_spec,  # w_out_fd [f, d]
            any_spec,  # y0 [tp, d] fp32 zeros (aliased to the output) / act [tp, a_cols]
        ],
        out_specs=any_spec,
        input_output_aliases={4: 0},
        compiler_params=params,
        interpret=interpret,
        name="prunepath_sparse_ffn_decode",
    )(gate_pe, x_pd, w_in_cfd.reshape(2 * f, d), w_out_fd, y0)
    if not split:
        return out[:, :d]  # a slice XLA fuses into the consumer
    bdo = plan["block_d_down"]
    chunks = min(plan["down_chunks"], n_slots)
    plan = {**plan, "down_chunks": chunks}
    return pl.pallas_call(
        pallas_pdl.early_launch(
            functools.partial(
                _down_kernel,
                t=t,
                g=group_size,
                e=f // group_size,
                n_slots=n_slots,
                plan=plan,
                interpret=interpret,
            ),
            interpret=interpret,
            tag="experts",
        ),
        out_shape=jax.ShapeDtypeStruct((tp, d), jnp.float32),
        grid=(d // bdo, chunks),
        in_specs=[gate_spec, any_spec, any_spec, any_spec],  # gate, act, w_out, y0
        out_specs=any_spec,
        input_output_aliases={3: 0},
        compiler_params=params,
        interpret=interpret,
        name="prunepath_sparse_ffn_down",
    )(gate_pe, out, w_out_fd, jnp.zeros((tp, d), jnp.float32))
