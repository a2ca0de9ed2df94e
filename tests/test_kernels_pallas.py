"""Pallas-Triton sparse decode FFN (kernels/pallas_decode.py, kernels/pallas_routing.py); its static
plan has tests/test_pallas_plan.py.

One shared case list, run three ways: the Pallas interpreter on CPU against the XLA reference,
the real Triton lowering on CPU through ``jax.export(platforms=["cuda"])`` (catches non-power-of-2
blocks and ops Triton cannot lower), and the compiled kernel on a GPU (``gpu`` marker).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, cuda_triton_calls

from prunepath_jax.kernels import pallas_decode as pd
from prunepath_jax.kernels.pallas_routing import route_gates_from_partials, route_gates_pallas
from prunepath_jax.kernels.reference import route_reference, sparse_ffn_reference
from prunepath_jax.models.layers import rms_norm


def _reference(x_td, router_de, w_in_cfd, w_out_fd, tau, *, group_size, **kw):
    return sparse_ffn_reference(
        x_td, router_de, w_in_cfd, w_out_fd, tau, group_size=group_size, **kw
    )


# name, t, d, E, G, dtype, tau, router scale, options (routing kwargs + tuning)
CASES = [
    ("b1_k1_fp32", 1, 64, 8, 16, jnp.float32, 0.01, 1.0, {}),
    ("b1_kE_bf16", 1, 64, 8, 16, jnp.bfloat16, 1.05, 1.0, {}),
    ("b1_bcast_fp32", 1, 64, 8, 16, jnp.float32, 0.7, 0.3, {"use_dot": False}),
    ("b5_odd_fp32", 5, 96, 7, 16, jnp.float32, 0.6, 0.05, {}),
    ("b3_kmax2_unused_bf16", 3, 64, 16, 8, jnp.bfloat16, 1.05, 1.0, {"k_max": 2}),
    ("b4_clamp_nucleus_none", 4, 64, 8, 16, jnp.float32, 0.6, 0.3,
     {"k_min": 2, "k_max": 3, "rule": "nucleus", "gate": "none"}),
    ("b2_zero_router_ties", 2, 64, 8, 16, jnp.float32, 0.45, 0.0, {}),
    ("b16_dot_bf16", 16, 64, 8, 32, jnp.bfloat16, 0.5, 0.05, {"use_dot": True}),
    ("b7_dot_fp32", 7, 64, 8, 16, jnp.float32, 0.5, 0.05, {"use_dot": True}),
    ("b6_xla_routing_fp32", 6, 64, 8, 16, jnp.float32, 0.5, 0.05, {"routing": "xla"}),
    ("b3_xla_logits_bf16", 3, 64, 8, 16, jnp.bfloat16, 0.6, 0.1, {"logits": "xla"}),
    ("b4_bcast_atomic_bf16", 4, 64, 8, 16, jnp.bfloat16, 0.6, 0.1,
     {"use_dot": False, "down": "atomic"}),
    ("b9_dot_atomic_fp32", 9, 64, 8, 16, jnp.float32, 0.6, 0.1, {"down": "atomic"}),
    ("b1_split_fp32", 1, 64, 8, 16, jnp.float32, 0.7, 0.3, {"down": "split"}),
    ("b5_split3_odd_bf16", 5, 96, 7, 16, jnp.bfloat16, 0.7, 0.1,
     {"down": "split", "down_chunks": 3}),
    ("b16_dot_split_bf16", 16, 64, 8, 32, jnp.bfloat16, 0.5, 0.05,
     {"use_dot": True, "down": "split", "down_chunks": 2}),
    ("b1_preact_up4_bf16", 1, 256, 8, 32, jnp.bfloat16, 0.6, 0.1,
     {"down": "preact", "up_splits": 4, "block_d": 64, "down_chunks": 3}),
    ("b3_preact_up2_fp32", 3, 128, 7, 16, jnp.float32, 0.7, 0.3,
     {"down": "preact", "up_splits": 2, "block_d": 32, "block_d_down": 32}),
    ("b2_preact_bcast_bf16", 2, 64, 8, 16, jnp.bfloat16, 0.7, 0.3,
     {"down": "preact", "use_dot": False}),
    ("b1_acq_rel_atomics_bf16", 1, 64, 8, 16, jnp.bfloat16, 0.7, 0.3, {"atomics": "acq_rel"}),
    ("b1_g32_default_bf16", 1, 128, 8, 32, jnp.bfloat16, 0.6, 0.1, {}),
    ("b1_g32_dot_bf16", 1, 128, 8, 32, jnp.bfloat16, 0.6, 0.1, {"use_dot": True}),
    ("b1_g32_bn16_fp32", 1, 128, 8, 32, jnp.float32, 0.6, 0.1, {"block_n": 16}),
    ("b2_e40_fused_glue_fp32", 2, 128, 40, 16, jnp.float32, 0.6, 0.1, {}),
    ("b1_e40_xla_glue_bf16", 1, 128, 40, 16, jnp.bfloat16, 0.6, 0.1, {"glue": "xla"}),
    # d with a small power-of-two factor: masked last tiles (up and down), or the divisor tiles
    ("b1_tail_d320_dot_bf16", 1, 320, 8, 32, jnp.bfloat16, 0.6, 0.1,
     {"block_d": 128, "use_dot": True}),
    ("b1_tail_d320_divisor_fp32", 1, 320, 8, 32, jnp.float32, 0.6, 0.1,
     {"block_d": 128, "tail": "divisor"}),
    ("b1_tail_bcast_d192_fp32", 1, 192, 8, 16, jnp.float32, 0.6, 0.1, {"use_dot": False}),
    ("b4_tail_split_d320_bf16", 4, 320, 8, 32, jnp.bfloat16, 0.6, 0.1, {"block_d": 128}),
    # The block's RMSNorm handed to the layer: fused into the logits kernel for 1-2 tokens (a
    # d that is no power of two: the row's mean(x²) reads a masked padded row), XLA for more.
    ("b1_norm_d192_bf16", 1, 192, 8, 16, jnp.bfloat16, 0.6, 0.1, {"with_norm": True}),
    ("b2_norm_e40_fp32", 2, 128, 40, 16, jnp.float32, 0.6, 0.1, {"with_norm": True}),
    ("b2_norm_bcast_bf16", 2, 64, 8, 16, jnp.bfloat16, 0.6, 0.1,
     {"with_norm": True, "use_dot": False}),
    ("b4_norm_in_xla_bf16", 4, 64, 8, 16, jnp.bfloat16, 0.6, 0.1, {"with_norm": True}),
    ("b1_norm_tuning_xla_fp32", 1, 64, 8, 16, jnp.float32, 0.6, 0.1,
     {"with_norm": True, "norm": "xla"}),
    ("b2_tail_preact_up3_fp32", 2, 320, 8, 16, jnp.float32, 0.7, 0.3,
     {"down": "preact", "up_splits": 3, "block_d": 128}),
    # The one-token balanced kernel (pallas_balanced.py): programs sharing the union's rows,
    # more programs than units (k = 1), a masked last chunk of d, the selection kernel's
    # zeroed accumulator at E = 40 and the XLA memset, the fused norm, fp32 and bf16.
    ("b1_balanced_bf16", 1, 128, 8, 32, jnp.bfloat16, 0.6, 0.1,
     {"experts": "balanced", "programs": 5}),
    ("b1_balanced_k1_fp32", 1, 64, 8, 16, jnp.float32, 0.01, 1.0,
     {"experts": "balanced", "programs": 7, "block_n": 2}),
    ("b1_balanced_kE_bn8_fp32", 1, 64, 8, 16, jnp.float32, 1.05, 1.0,
     {"experts": "balanced", "programs": 3, "block_n": 8, "prefetch": 0}),
    ("b1_balanced_tail_d192_bf16", 1, 192, 8, 16, jnp.bfloat16, 0.6, 0.1,
     {"experts": "balanced", "programs": 4, "block_d": 128}),
    ("b1_balanced_e40_norm_fp32", 1, 128, 40, 16, jnp.float32, 0.6, 0.1,
     {"experts": "balanced", "programs": 6, "with_norm": True}),
    ("b1_balanced_xla_glue_bf16", 1, 96, 8, 16, jnp.bfloat16, 0.6, 0.1,
     {"experts": "balanced", "programs": 2, "glue": "xla"}),
    # The software-pipelined unit loop: several units a program (its prefetch of the next
    # unit, the clamped reload of the last), one unit a program, masked chunks, k = E.
    ("b1_balanced_prefetch_bf16", 1, 128, 8, 32, jnp.bfloat16, 0.6, 0.1,
     {"experts": "balanced", "programs": 3, "block_n": 4, "prefetch": 1}),
    ("b1_balanced_prefetch_kE_tail_fp32", 1, 192, 8, 16, jnp.float32, 1.05, 1.0,
     {"experts": "balanced", "programs": 5, "block_n": 2, "block_d": 128, "prefetch": 1}),
    ("b1_balanced_prefetch_k1_fp32", 1, 64, 8, 16, jnp.float32, 0.01, 1.0,
     {"experts": "balanced", "programs": 9, "prefetch": 1}),
    # 1-neuron units (two programs a SM) with a masked last chunk of d, every expert.
    ("b1_balanced_prefetch_bn1_kE_tail_fp32", 1, 192, 8, 16, jnp.float32, 1.05, 1.0,
     {"experts": "balanced", "programs": 5, "block_n": 1, "block_d": 128, "prefetch": 1}),
    # The selection kernel's own blocks: 4 experts a program over E = 40 (zeroing the
    # accumulator in 16 shares), 2 warps; and through the XLA-glue path at batch 3.
    ("b1_select_be4_w2_bf16", 1, 128, 40, 16, jnp.bfloat16, 0.6, 0.1,
     {"experts": "balanced", "programs": 4, "select_block_e": 4, "select_warps": 2,
      "logit_warps": 1}),
    ("b3_select_be64_fp32", 3, 64, 40, 16, jnp.float32, 0.6, 0.1,
     {"select_block_e": 64, "select_warps": 8}),
    # No expert kernel: the selection kernel's gate table into XLA's dense matmuls (the fused
    # glue with its accumulator left alone at 2 tokens, the XLA sum at 5, the fused norm, k = E,
    # the XLA routing).
    ("b2_dense_e40_norm_fp32", 2, 128, 40, 16, jnp.float32, 0.6, 0.1,
     {"experts": "dense", "with_norm": True}),
    ("b5_dense_bf16", 5, 192, 8, 32, jnp.bfloat16, 0.6, 0.1, {"experts": "dense"}),
    ("b16_dense_kE_fp32", 16, 64, 8, 16, jnp.float32, 1.05, 1.0, {"experts": "dense"}),
    ("b3_dense_xla_routing_bf16", 3, 64, 40, 16, jnp.bfloat16, 0.6, 0.1,
     {"experts": "dense", "routing": "xla"}),
]  # fmt: skip
_ROUTE_KEYS = ("rule", "gate", "k_min", "k_max")
_TEST_KEYS = _ROUTE_KEYS + ("with_norm",)
NORM_EPS = 1e-5


def _inputs(seed, t, d, e, g, dtype, scale):
    k = jax.random.split(jax.random.key(seed), 4)
    f = e * g
    x = jax.random.normal(k[0], (t, d), jnp.float32).astype(dtype)
    router = jax.random.normal(k[1], (d, e), jnp.float32) * scale
    w_in = (jax.random.normal(k[2], (2, f, d)) * d**-0.5).astype(dtype)
    w_out = (jax.random.normal(k[3], (f, d)) * f**-0.5).astype(dtype)
    return x, router, w_in, w_out


def _norm_weight(seed, d, dtype):
    return (1.0 + 0.2 * jax.random.normal(jax.random.key(seed + 7), (d,))).astype(dtype)


def _check(case, interpret, seed):
    name, t, d, e, g, dtype, tau, scale, opts = case
    args = _inputs(seed, t, d, e, g, dtype, scale)
    route_kw = {k: v for k, v in opts.items() if k in _ROUTE_KEYS}
    tuning = {k: v for k, v in opts.items() if k not in _TEST_KEYS}
    tau = jnp.float32(tau)
    norm_kw, ref_args = {}, args
    if opts.get("with_norm"):  # x is the residual stream (scale 3: far from unit RMS)
        x_raw = args[0] * jnp.asarray(3, dtype)
        norm_kw = {"norm_d": _norm_weight(seed, d, dtype), "norm_eps": NORM_EPS}
        args = (x_raw,) + args[1:]
        ref_args = (rms_norm(x_raw, norm_kw["norm_d"], NORM_EPS),) + args[1:]
    y, k_t = pd.sparse_ffn_decode(*args, tau, group_size=g, interpret=interpret, **route_kw,
                                  **norm_kw, **tuning)  # fmt: skip
    y_ref, k_ref = _reference(*ref_args, tau, group_size=g, **route_kw)
    assert y.shape == (t, d) and y.dtype == dtype, name
    np.testing.assert_array_equal(np.asarray(k_t), np.asarray(k_ref), err_msg=name)
    assert_close(y, y_ref, "bf16" if dtype == jnp.bfloat16 else "op_fp32", name)
    return k_t


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_interpret_matches_reference(case):
    k_t = _check(case, interpret=True, seed=zlib.crc32(case[0].encode()) % 1000)
    name, t, _, e, *_ = case
    if name == "b1_k1_fp32":
        assert int(k_t[0]) == 1
    if name == "b1_kE_bf16":
        assert int(k_t[0]) == e
    if name == "b3_kmax2_unused_bf16":
        assert t * 2 < e  # union ≤ 6 of 16: some expert is selected by no token


@pytest.mark.parametrize("rule", ["paper", "nucleus"])
def test_sort_free_selection_matches_routing_select(rule):
    """The selection kernel alone on many random routings (soft, sharp, tied, clamped)."""
    rng = np.random.default_rng(7)
    for i in range(6):
        t, e = int(rng.integers(1, 17)), int(rng.integers(2, 40))
        scale = [0.0, 0.1, 1.0, 4.0][i % 4]
        logits = jnp.asarray(rng.normal(size=(t, e)) * scale, jnp.float32)
        if i == 5:  # ties between unequal experts: duplicate a column
            logits = logits.at[:, 1].set(logits[:, 0])
        tau = float(rng.uniform(0.05, 0.95)) if i != 4 else 1.05
        k_min, k_max = (1, None) if i % 2 else (2, max(2, e // 2))
        kw = {"rule": rule, "gate": "sigmoid", "k_min": k_min, "k_max": k_max}
        tp, ep = pd._next_pow2(t), max(16, pd._next_pow2(e))
        gate_pe, k_t = jax.jit(
            lambda lg, ta, kw=kw, tp=tp, ep=ep: route_gates_pallas(
                lg, ta, tp=tp, ep=ep, interpret=True, **kw
            )
        )(logits, jnp.float32(tau))
        # route_reference takes x and a router: identity router turns logits into themselves.
        _, mask_ref, gate_ref, k_ref = route_reference(logits, jnp.eye(e), tau, **kw)
        what = f"case {i}: t={t} e={e} scale={scale} tau={tau:.3f} {kw}"
        np.testing.assert_array_equal(np.asarray(k_t), np.asarray(k_ref), err_msg=what)
        np.testing.assert_array_equal(np.asarray(gate_pe[:t, :e] != 0), np.asarray(mask_ref),
                                      err_msg=what)  # fmt: skip
        assert_close(gate_pe[:t, :e], gate_ref, "op_fp32", what)
        assert not np.asarray(gate_pe[t:]).any() and not np.asarray(gate_pe[:, e:]).any(), what


def test_selection_from_partials_adds_them_and_zeroes_the_accumulator():
    """``route_gates_from_partials`` = ``route_gates_pallas`` on the partials' sum (added in the
    same order, so bitwise the same logits), whatever sits in each split's padding columns;
    its extra output is an all-zero buffer."""
    rng = np.random.default_rng(11)
    for t, e, n_part in ((1, 40, 4), (2, 7, 3), (1, 16, 1)):
        tp, ep = pd._next_pow2(t), max(16, pd._next_pow2(e))
        part = rng.normal(size=(tp, n_part, ep)).astype(np.float32) * 0.5
        part[:, :, e:] = np.nan  # unwritten columns: must be masked, never summed
        logits = part[:t, 0, :e].copy()
        for s in range(1, n_part):
            logits = logits + part[:t, s, :e]  # float32, in the kernel's order
        kw = {"rule": "paper", "gate": "sigmoid", "k_min": 1, "k_max": None}
        tau = jnp.float32(0.6)
        g_ref, k_ref = jax.jit(
            lambda lg, ta, kw=kw, tp=tp, ep=ep: route_gates_pallas(
                lg, ta, tp=tp, ep=ep, interpret=True, **kw
            )
        )(jnp.asarray(logits), tau)
        n_prog = ep // 16
        zeros = (1, 32 * n_prog)
        g, k, z = jax.jit(
            lambda pt, ta, kw=kw, t=t, e=e, ep=ep, n=n_part, zs=zeros: route_gates_from_partials(
                pt, n, ta, t=t, e=e, ep=ep, zeros=zs, interpret=True, **kw
            )
        )(jnp.asarray(part.reshape(tp, n_part * ep)), tau)
        what = f"t={t} e={e} n_part={n_part}"
        np.testing.assert_array_equal(np.asarray(k), np.asarray(k_ref), err_msg=what)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(g_ref), err_msg=what)
        assert z.shape == zeros and not np.asarray(z).any(), what
    with pytest.raises(ValueError, match="do not hold"):
        route_gates_from_partials(jnp.zeros((1, 48)), 3, 0.5, t=1, e=8, ep=32, interpret=True)
    with pytest.raises(ValueError, match="cannot split"):
        route_gates_from_partials(
            jnp.zeros((1, 64)), 2, 0.5, t=1, e=20, ep=32, zeros=(1, 24), interpret=True
        )


def test_fused_and_xla_glue_agree():
    """The one-token layer with the selection kernel adding the logits' partials (default) and
    with the XLA reduction + padding + memset between the kernels: same k, same y."""
    x, r, w_in, w_out = _inputs(5, 1, 128, 40, 16, jnp.bfloat16, 0.1)
    outs = [
        pd.sparse_ffn_decode(
            x, r, w_in, w_out, jnp.float32(0.7), group_size=16, interpret=True, glue=glue
        )  # fmt: skip
        for glue in ("fused", "xla")
    ]
    np.testing.assert_array_equal(np.asarray(outs[0][1]), np.asarray(outs[1][1]))
    assert_close(outs[0][0], outs[1][0], "bf16", "fused vs xla glue")
    with pytest.raises(ValueError, match="glue"):
        pd.sparse_ffn_decode(x, r, w_in, w_out, 0.7, group_size=16, interpret=True, glue="no")


def test_k_equals_e_at_batch_gt_1_and_jit_with_traced_tau():
    """τ traced under an outer jit, two values through one compilation: k = 1..E both ways."""
    x, r, w_in, w_out = _inputs(3, 3, 64, 8, 16, jnp.float32, 0.05)

    @jax.jit
    def f(tau):
        return pd.sparse_ffn_decode(x, r, w_in, w_out, tau, group_size=16, interpret=True)

    for tau in (0.2, 1.05):
        y, k_t = f(jnp.float32(tau))
        y_ref, k_ref = _reference(x, r, w_in, w_out, jnp.float32(tau), group_size=16)
        np.testing.assert_array_equal(np.asarray(k_t), np.asarray(k_ref))
        assert_close(y, y_ref, "op_fp32", f"tau={tau}")
    assert (np.asarray(k_t) == 8).all()


def test_rejects_unsupported_inputs():
    x, r, w_in, w_out = _inputs(0, 2, 64, 8, 16, jnp.float32, 1.0)
    kw = {"group_size": 16, "interpret": True}
    with pytest.raises(NotImplementedError, match="1..16 tokens"):
        pd.sparse_ffn_decode(jnp.zeros((17, 64)), r, w_in, w_out, 0.5, **kw)
    with pytest.raises(NotImplementedError, match="SwiGLU"):
        pd.sparse_ffn_decode(x, r, w_in[:1], w_out, 0.5, **kw)
    with pytest.raises(ValueError, match="share a dtype"):
        pd.sparse_ffn_decode(x, r, w_in.astype(jnp.bfloat16), w_out, 0.5, **kw)
    with pytest.raises(NotImplementedError, match="dtype"):
        pd.sparse_ffn_decode(x.astype(jnp.int8), r, w_in, w_out, 0.5, **kw)
    with pytest.raises(TypeError, match="unknown tuning"):
        pd.sparse_ffn_decode(x, r, w_in, w_out, 0.5, block_m=4, **kw)
    with pytest.raises(ValueError, match="tail must be"):
        pd.sparse_ffn_decode(x, r, w_in, w_out, 0.5, tail="pad", **kw)
    with pytest.raises(ValueError, match="experts must be"):
        pd.sparse_ffn_decode(x, r, w_in, w_out, 0.5, experts="rows", **kw)
    with pytest.raises(ValueError, match="one-token kernel"):
        pd.sparse_ffn_decode(x, r, w_in, w_out, 0.5, experts="balanced", **kw)
    with pytest.raises(ValueError, match="do not apply"):
        pd.sparse_ffn_decode(x[:1], r, w_in, w_out, 0.5, experts="balanced", use_dot=True, **kw)
    with pytest.raises(ValueError, match="programs must be"):
        pd.sparse_ffn_decode(x[:1], r, w_in, w_out, 0.5, experts="balanced", programs=-1, **kw)
    with pytest.raises(ValueError, match="prefetch must be"):
        pd.sparse_ffn_decode(x[:1], r, w_in, w_out, 0.5, experts="balanced", prefetch=2, **kw)
    with pytest.raises(ValueError, match="select_block_e must be a power of two"):
        pd.sparse_ffn_decode(x, r, w_in, w_out, 0.5, select_block_e=12, **kw)
    with pytest.raises(ValueError, match="select_warps must be a power of two"):
        pd.sparse_ffn_decode(x, r, w_in, w_out, 0.5, select_warps=0, **kw)
    if jax.default_backend() == "cpu":
        with pytest.raises(NotImplementedError, match="CUDA GPU"):
            pd.sparse_ffn_decode(x, r, w_in, w_out, 0.5, group_size=16)


# Lowering: the shared cases plus the benchmark's Llama-3-8B layer shape for every path.
EXPORT_CASES = [c[:6] + (c[8],) for c in CASES] + [
    ("8b_b1", 1, 4096, 448, 32, jnp.bfloat16, {}),
    ("8b_b4", 4, 4096, 448, 32, jnp.bfloat16, {}),
    ("8b_b16_dot", 16, 4096, 448, 32, jnp.bfloat16, {}),
    ("8b_b16_fp32", 16, 4096, 448, 32, jnp.float32, {}),
    (
        "8b_b1_bcast_bn8_w8",
        1,
        4096,
        448,
        32,
        jnp.bfloat16,
        {"use_dot": False, "block_n": 8, "num_warps": 8},
    ),
    ("8b_b1_split", 1, 4096, 448, 32, jnp.bfloat16, {"down": "split"}),
    ("8b_b1_balanced", 1, 4096, 448, 32, jnp.bfloat16, {"experts": "balanced"}),
    ("70b_b1_balanced", 1, 8192, 896, 32, jnp.bfloat16, {"experts": "balanced"}),
    (
        "8b_b1_balanced_prefetch_bn4",
        1,
        4096,
        448,
        32,
        jnp.bfloat16,
        {"experts": "balanced", "prefetch": 1, "block_n": 4},
    ),  # fmt: skip
    ("8b_b1_balanced_bn1", 1, 4096, 448, 32, jnp.bfloat16, {"block_n": 1}),
    ("8b_b1_select_be8", 1, 4096, 448, 32, jnp.bfloat16, {"select_block_e": 8}),
    ("smollm2_b1", 1, 576, 48, 32, jnp.bfloat16, {}),
    ("smollm2_b8", 8, 576, 48, 32, jnp.bfloat16, {}),
    ("8b_b16_split", 16, 4096, 448, 32, jnp.bfloat16, {"down": "split", "down_chunks": 8}),
    (
        "8b_b1_preact",
        1,
        4096,
        448,
        32,
        jnp.bfloat16,
        {"down": "preact", "up_splits": 4, "block_d_down": 512, "down_chunks": 32},
    ),
]


def _layer_specs(t, d, e, g, dtype, tau_shape, norm=False):
    """Abstract inputs of one decode layer: x, router, w_in, w_out, tau (and the norm weight)."""
    f = e * g
    return (
        jax.ShapeDtypeStruct((t, d), dtype),
        jax.ShapeDtypeStruct((d, e), jnp.float32),
        jax.ShapeDtypeStruct((2, f, d), dtype),
        jax.ShapeDtypeStruct((f, d), dtype),
        jax.ShapeDtypeStruct(tau_shape, jnp.float32),
    ) + ((jax.ShapeDtypeStruct((d,), dtype),) if norm else ())


@pytest.mark.parametrize("case", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_triton_lowering_exports_for_cuda(case):
    _, t, d, e, g, dtype, opts = case
    defaults = {"rule": "paper", "gate": "sigmoid", "k_min": 1, "k_max": None}
    route_kw = {k: opts.get(k, v) for k, v in defaults.items()}
    tuning = tuple(sorted((k, v) for k, v in opts.items() if k not in _TEST_KEYS))
    norm = bool(opts.get("with_norm"))

    def fn(x, r, w_in, w_out, tau, norm_d=None):
        return pd._decode_jit(x, r, w_in, w_out, tau, norm_d, group_size=g, interpret=False,
                              tuning=tuning, norm_eps=NORM_EPS, **route_kw)  # fmt: skip

    n_triton = cuda_triton_calls(jax.jit(fn), *_layer_specs(t, d, e, g, dtype, (), norm))
    plan = pd._plan(t, d, g, dtype, dict(tuning))
    split = plan.get("down") in ("split", "preact")  # a second expert kernel
    experts = plan["experts"] != "dense"  # dense: XLA's matmuls, no expert kernel
    route = opts.get("routing") != "xla"  # the sort-free selection kernel
    logits = route and opts.get("logits", "pallas") == "pallas"  # the split-K router GEMV
    expect = experts + route + logits + split
    assert n_triton == expect


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gpu_matches_reference(case):
    _check(case, interpret=False, seed=zlib.crc32(case[0].encode()) % 1000 + 1)


@pytest.mark.gpu
def test_gpu_llama8b_layer_shape():
    """The benchmark shape at batch 1, 4 and 16 (both inner-product forms)."""
    for t in (1, 4, 16):
        case = (f"8b_b{t}", t, 4096, 448, 32, jnp.bfloat16, 0.5, 0.02, {})
        _check(case, interpret=False, seed=t)


@pytest.mark.gpu
def test_gpu_balanced_kernel_real_layer_shapes():
    """The one-token balanced kernel at the 8B, 1B and SmolLM2 layers, 10% to all experts."""
    for d, e, tau in ((4096, 448, 0.5), (2048, 256, 0.2), (576, 48, 1.05), (4096, 448, 0.05)):
        for more in ({}, {"prefetch": 0}, {"block_n": 4}, {"block_n": 1}, {"select_block_e": 4}):
            opts = {"experts": "balanced", **more}
            case = (f"balanced_d{d}_tau{tau}_{opts}", 1, d, e, 32, jnp.bfloat16, tau, 0.02, opts)
            _check(case, interpret=False, seed=d)


@pytest.mark.gpu
def test_gpu_smollm2_layer_shape():
    """SmolLM2's layer (d 576, E 48, G 32) at 1, 5 and 8 tokens, default and pre-activation
    forms: the shapes of the end-to-end generation test, checked one layer at a time."""
    for t in (1, 5, 8):
        for opts in ({}, {"down": "preact"}):
            case = (f"smollm2_b{t}_{opts}", t, 576, 48, 32, jnp.bfloat16, 0.6, 0.05, opts)
            _check(case, interpret=False, seed=t)


@pytest.mark.gpu
def test_gpu_fp32_few_tokens_at_real_widths():
    """fp32 at 2-4 tokens on real layer widths: the dot path's tiles must fit shared memory."""
    for t in (2, 4):
        for d, e in ((576, 48), (2048, 64)):
            case = (f"fp32_b{t}_d{d}", t, d, e, 32, jnp.float32, 0.6, 0.05, {})
            _check(case, interpret=False, seed=t + d)


def _vmapped(x, r, w_in, w_out, g, interpret, **tuning):
    """The layer vmapped two ways: over a tau sweep (one checkpoint, several sparsities at once)
    and over independent token sets sharing the weights."""
    taus = jnp.array([0.3, 0.6, 0.9, 1.05], jnp.float32)
    over_tau = jax.jit(jax.vmap(lambda tau: pd.sparse_ffn_decode(
        x, r, w_in, w_out, tau, group_size=g, interpret=interpret, **tuning)))(taus)  # fmt: skip
    xs = jnp.stack([x, -x, 2 * x])
    over_x = jax.jit(jax.vmap(lambda xx: pd.sparse_ffn_decode(
        xx, r, w_in, w_out, 0.6, group_size=g, interpret=interpret, **tuning)))(xs)  # fmt: skip
    for tau, y, k_t in zip(taus, *over_tau, strict=True):
        y_ref, k_ref = _reference(x, r, w_in, w_out, tau, group_size=g)
        np.testing.assert_array_equal(np.asarray(k_t), np.asarray(k_ref))
        assert_close(y, y_ref, "op_fp32", f"vmap over tau {float(tau)}")
    for xx, y, k_t in zip(xs, *over_x, strict=True):
        y_ref, k_ref = _reference(xx, r, w_in, w_out, jnp.float32(0.6), group_size=g)
        np.testing.assert_array_equal(np.asarray(k_t), np.asarray(k_ref))
        assert_close(y, y_ref, "op_fp32", "vmap over token sets")


_VMAP_CASES = [(1, {}), (3, {}), (1, {"experts": "balanced", "programs": 4})]


@pytest.mark.parametrize("t,tuning", _VMAP_CASES, ids=["b1", "b3", "b1_balanced"])
def test_vmap_matches_reference(t, tuning):
    x, r, w_in, w_out = _inputs(t, t, 96, 8, 16, jnp.float32, 0.3)
    _vmapped(x, r, w_in, w_out, 16, interpret=True, **tuning)


@pytest.mark.parametrize("d", [576, 2048])  # the block kernel; the balanced one (auto)
def test_vmapped_layer_lowers_for_cuda(d):
    """Batched grids of all three kernels (logits, selection, experts) lower through Triton."""
    t, e, g = 1, 48, 32

    def fn(x, r, w_in, w_out, taus):
        return jax.vmap(lambda tau: pd._decode_jit(
            x, r, w_in, w_out, tau, None, group_size=g, rule="paper", gate="sigmoid", k_min=1,
            k_max=None, interpret=False, tuning=(), norm_eps=1e-6))(taus)  # fmt: skip

    specs = _layer_specs(t, d, e, g, jnp.bfloat16, (4,))
    assert cuda_triton_calls(jax.jit(fn), *specs) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("t,tuning", _VMAP_CASES, ids=["b1", "b3", "b1_balanced"])
def test_gpu_vmap_matches_reference(t, tuning):
    x, r, w_in, w_out = _inputs(t + 10, t, 96, 8, 16, jnp.float32, 0.3)
    _vmapped(x, r, w_in, w_out, 16, interpret=False, **tuning)
