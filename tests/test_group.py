"""The grouped GEMM's token lists by expert (`kernels/triton_group.py`) and the prefill's
selection that feeds them: XLA's lists cover every selected pair once in either program order,
the grouping tunings refuse what cannot run before any launch, the prefill benchmark's labels
name their tunings, and on a GPU the selection kernel's masks, counts and the kernel lists at
the 8B prefill shape. The interpreter cases of the lists are in ``test_select.py`` and
``test_kernels_triton.py``."""

import jax
import numpy as np
import pytest
from helpers import load_script
from kernel_cases import GROUPED_CASES, inputs, kwargs


@pytest.mark.parametrize("expert_group", [0, 5, 12])
def test_groups_cover_every_pair_once(expert_group):
    """The device-side grouping lists each selected (token, expert) pair exactly once, in
    either program order: expert by expert, or (``expert_group`` > 0) the same tiles permuted
    into groups of experts and, inside a group, by each tile's first token."""
    from prunepath_jax.kernels.triton_group import group_by_expert

    rng = np.random.default_rng(0)
    mask = rng.random((37, 12)) < 0.3
    mask[:, 5] = False
    tok, off, cnt, tile_e, tile_m = map(np.asarray, group_by_expert(mask, 12, 8, expert_group))
    n_real = int(np.sum(-(-cnt // 8)))
    assert (tile_e[:n_real] < 12).all() and (tile_e[n_real:] == 12).all()
    if expert_group:
        _, _, _, tile_e0, tile_m0 = map(np.asarray, group_by_expert(mask, 12, 8))
        assert sorted(zip(tile_e, tile_m, strict=True)) == sorted(
            zip(tile_e0, tile_m0, strict=True)
        )
        first = tok[off[tile_e[:n_real]] + 8 * tile_m[:n_real]]
        key = list(zip(tile_e[:n_real] // expert_group, first, tile_e[:n_real], strict=True))
        assert key == sorted(key)
        assert not (tile_e[:n_real][1:] >= tile_e[:n_real][:-1]).all(), "an order of its own"
        tile_e, tile_m = tile_e0, tile_m0
    pairs = set()
    for i, e in enumerate(tile_e):
        if e == 12:
            continue
        rows = range(tile_m[i] * 8, min(cnt[e], (tile_m[i] + 1) * 8))
        for r in rows:
            pairs.add((int(tok[off[e] + r]), int(e)))
    assert pairs == set(zip(*np.nonzero(mask), strict=True))
    tile_end = np.cumsum(-(-cnt // 8))  # each tile's expert: the sorted search it replaces
    np.testing.assert_array_equal(
        tile_e, np.searchsorted(tile_end, np.arange(len(tile_e)), "right")
    )


@pytest.mark.parametrize(
    "tuning, match",
    [
        ({"grouping": "sort"}, "grouping must be one of"),
        ({"up_form": "xwx"}, "up_form must be one of"),
        ({"grouping": "triton", "selection": "xla"}, "needs selection='triton'"),
        ({"grouping": "triton", "select_counts": "atomic"}, "select_counts False"),
    ],
)
def test_grouped_rejects_a_bad_grouping(tuning, match):
    """The kernel grouping takes the Triton selection's per-program table, so it refuses the
    XLA selection and the other counts, before any launch (no interpreter needed)."""
    from prunepath_jax.kernels.triton_grouped import sparse_ffn_grouped

    c = GROUPED_CASES[0]
    with pytest.raises(ValueError, match=match):
        sparse_ffn_grouped(*inputs(c), c.tau, **kwargs(c), **tuning)


def test_prefill_benchmark_labels_name_the_tuning():
    """`benchmarks/sparse_prefill.py`'s ``--selections`` labels: each suffix is the tuning key
    it names (``:xla`` must pick XLA's lists now that "auto" takes the kernel's), and a label it
    cannot read stops the run instead of timing the default."""
    mod = load_script("sparse_prefill", folder="benchmarks")
    lay = {"selection": "triton", "select_block_t": 8, "select_warps": 8}
    assert mod.selection_tuning("xla") == {"selection": "xla"}
    assert mod.selection_tuning("triton:8:8") == lay
    assert mod.selection_tuning("triton:8:8:xla") == {**lay, "grouping": "xla"}
    assert mod.selection_tuning("triton:8:8:lists") == {**lay, "grouping": "triton"}
    assert mod.selection_tuning("triton:8:8:partial") == {**lay, "select_counts": "partial"}
    assert mod.selection_tuning("triton:8:8:wx") == {**lay, "up_form": "wx", "warps": 4}
    for bad in ("triton:8:8:sort", "triton:8:8:xtable", "xla:8:8", "triton:8", "sort"):
        with pytest.raises(SystemExit, match="--selections"):
            mod.selection_tuning(bad)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", [(1, 8), (2, 4), (4, 4), (8, 8), (16, 8)], ids=str)
def test_triton_selection_at_the_prefill_shape_on_gpu(layout):
    """4096 tokens x 448 experts (the 8B prefill), τ 0.5 and k clamped to [112, 112] as the
    benchmark routes, at launch layouts (tokens, warps a program): the kernel's masks equal
    `routing.select`'s except for tokens whose mass sits within a few float32 ulps of τ (none
    is allowed to differ by more than one expert), its per-expert counts (atomic and per
    program) its mask's, and `triton_group.kernel_slots`' token lists XLA's."""
    import jax.numpy as jnp

    from prunepath_jax import routing
    from prunepath_jax.kernels.triton_group import group_by_expert, kernel_slots
    from prunepath_jax.kernels.triton_grouped import kernel_selection

    lg = jax.random.normal(jax.random.key(3), (4096, 448), jnp.float32) * 2.0
    select = jax.jit(kernel_selection, static_argnums=(2, 3, 4, 5, 6, 7, 8))
    for tau, k_min, k_max in ((0.5, 1, 448), (1.0, 112, 112), (0.9, 1, 200)):
        args = (lg, jnp.float32(tau), "paper", k_min, k_max, False, *layout)
        mask, k, cnt = select(*args, "atomic")
        np.testing.assert_array_equal(np.asarray(cnt), np.asarray(mask).sum(0))  # the atomics
        cnt_p = select(*args, "partial")[2]
        np.testing.assert_array_equal(np.asarray(cnt_p), np.asarray(cnt))  # per program
        table = select(*args, "table")[2]
        tok, off, cnt_s = jax.jit(kernel_slots, static_argnums=(2, 3))(mask, table, layout[0],
                                                                        k_max)  # fmt: skip
        tok_x, off_x, _ = group_by_expert(mask != 0, k_max, 128)[:3]
        n = int(np.asarray(cnt).sum())
        np.testing.assert_array_equal(np.asarray(cnt_s), np.asarray(cnt))  # the lists: XLA's
        np.testing.assert_array_equal(np.asarray(off), np.asarray(off_x))
        np.testing.assert_array_equal(np.asarray(tok)[:n], np.asarray(tok_x)[:n])
        sel = routing.select(lg, tau, k_min=k_min, k_max=k_max)
        diff = np.asarray(k) != np.asarray(sel.k_t)
        assert diff.mean() < 1e-3 and np.abs(np.asarray(k - sel.k_t)).max() <= 1, tau
        same = ~diff
        np.testing.assert_array_equal(np.asarray(mask)[same] != 0, np.asarray(sel.mask_te)[same])
