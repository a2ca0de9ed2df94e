"""The in-kernel selection (``kernels/triton_select.py``, what the fused one-token kernel and
the one-launch step run in every program) under the Triton interpreter against
``routing.select`` + ``routing.gates``: the same k and the same experts on every case of
``select_cases.py`` (ties, τ = 1, τ > 1, clamped k, zero-mass experts), the gates within the fp32
tolerance; and it lowers for sm_90."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, interpreted_npz
from select_cases import CASES, FORMS, logits

from prunepath_jax import routing


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return interpreted_npz(tmp_path_factory, "select_interp_runner")


def _reference(c):
    lg = jnp.asarray(logits(c))
    s = routing.select(lg, c.tau, rule=c.rule, k_min=c.k_min, k_max=c.k_max)
    return (
        np.asarray(routing.gates(lg, s.mask_te, c.gate)),
        np.asarray(s.k_t),
        np.asarray(s.mask_te),
    )


def test_cases_cover_the_contract():
    ks = {c.name: _reference(c)[1] for c in CASES}
    assert any((k == 1).any() for k in ks.values()), "a token with k = 1"
    assert any((k == c.e).all() for c, k in zip(CASES, ks.values(), strict=True)), "k = E"
    assert any((k == c.e - 1).any() for c, k in zip(CASES, ks.values(), strict=True)), "τ = 1"
    assert any(c.k_min > 1 and (k == c.k_min).any() for c, k in zip(CASES, ks.values(),
               strict=True)), "k clamped up"  # fmt: skip
    assert any(c.k_max and (k == c.k_max).any() for c, k in zip(CASES, ks.values(),
               strict=True)), "k clamped down"  # fmt: skip
    assert any(1 < k.min() and k.max() < c.e - 1 for c, k in zip(CASES, ks.values(), strict=True))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_selection_matches_routing(case, form, results):
    g_ref, k_ref, mask_ref = _reference(case)
    g, k = results[f"{case.name}/{form}/g"], results[f"{case.name}/{form}/k"]
    np.testing.assert_array_equal(k, k_ref, err_msg=f"{case.name}: k")
    np.testing.assert_array_equal(g != 0, mask_ref, err_msg=f"{case.name}: selected experts")
    assert_close(g.astype(np.float32), g_ref, "op_fp32", case.name)
    np.testing.assert_array_equal(
        results[f"{case.name}/{form}/c"], mask_ref.sum(0), err_msg=f"{case.name}: counts"
    )  # the launch's, per expert


@pytest.mark.parametrize("block_t", [1, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_slots_equal_group_by_expert(case, block_t, results):
    """`triton_group.kernel_slots` from the selection's per-program counts: the same token lists
    as XLA's `group_by_expert` on the reference mask (each expert's tokens ascending), and no
    slot past the lists written (the interpreter's -1 poison stays)."""
    from prunepath_jax.kernels.triton_group import group_by_expert

    _, _, mask_ref = _reference(case)
    tok_ref, off_ref, cnt_ref = (np.asarray(a) for a in group_by_expert(
        jnp.asarray(mask_ref), case.k_max or case.e, 8)[:3])  # fmt: skip
    tok, off, cnt = (results[f"{case.name}/slots{block_t}/{n}"] for n in ("tok", "off", "cnt"))
    n = int(cnt_ref.sum())
    np.testing.assert_array_equal(cnt, cnt_ref)
    np.testing.assert_array_equal(off, off_ref)
    np.testing.assert_array_equal(tok[:n], tok_ref[:n])
    assert tok.shape == tok_ref.shape and (tok[n:] == -1).all()


def test_kernel_slots_rejects_a_table_of_the_wrong_shape():
    from prunepath_jax.kernels.triton_group import kernel_slots

    with pytest.raises(ValueError, match="cnt_pe must be"):
        kernel_slots(jnp.zeros((10, 8), jnp.int8), jnp.zeros((2, 8), jnp.int32), 4, 8)


def test_blocked_cases_cover_a_partial_block():
    """4 tokens a program: some case's token count is not a multiple of 4, so the last program
    masks rows past T (an unmasked store would write past the outputs)."""
    assert any(c.t % 4 for c in CASES) and any(c.gate == "none" for c in CASES)


def test_select_gates_rejects_a_bad_layout():
    from prunepath_jax.kernels.triton_select import select_gates

    lg = jnp.zeros((4, 8), jnp.float32)
    for bad in ({"block_t": 3}, {"block_t": 0}, {"block_t": 2, "ranked": True}):
        with pytest.raises(ValueError, match="block_t"):
            select_gates(lg, 0.5, interpret=True, **bad)
    with pytest.raises(ValueError, match="counts must be one of"):
        select_gates(lg, 0.5, interpret=True, counts="sorted")


def test_selection_lowers_for_sm90():
    """Compiles to an sm_90 cubin within the shared-memory limit (sm90_compile raises otherwise)
    at the 8B, 1B and a small expert count."""
    from helpers import sm90_compile

    from prunepath_jax.kernels.triton_select import _select_kernel

    for e, ranked, bt, warps, counts in (
        (448, False, 1, 8, False), (448, True, 1, 8, True), (256, True, 1, 8, False),
        (12, False, 1, 8, 2), (12, True, 1, 8, False), (448, False, 4, 4, False),
        (448, False, 8, 8, True), (448, False, 8, 8, 2), (12, False, 4, 4, True),
    ):  # fmt: skip
        sm90_compile(_select_kernel, {"l": "*fp32", "tau": "*fp32", "g": "*fp32", "k": "*i32",
                                      "c": "*i32"},
                          dict(T=4096, E=e, E_PAD=max(16, 1 << (e - 1).bit_length()),
                               NUCLEUS=False, SIGMOID=True, K_MIN=1, K_MAX=e, RANKED=ranked,
                               BLOCK_T=bt, COUNTS=counts), warps=warps, stages=1)  # fmt: skip


def test_slots_kernel_lowers_for_sm90():
    """`triton_group._slots_kernel` compiles to an sm_90 cubin at the 8B and 1B prefill shapes
    (8 tokens a program) and one token a program."""
    from helpers import sm90_compile

    from prunepath_jax.kernels.triton_group import _slots_kernel

    for t, e, bt in ((4096, 448, 8), (16384, 256, 8), (40, 12, 1)):
        sm90_compile(_slots_kernel, {"m": "*i8", "b": "*i32", "tok": "*i32"},
                     dict(T=t, E=e, E_PAD=max(16, 1 << (e - 1).bit_length()), BLOCK_T=bt),
                     warps=4, stages=1)  # fmt: skip
