"""Balanced k-means (exact sizes, quality, errors) and the FFN neuron permutation."""

import jax
import numpy as np
import pytest
from helpers import assert_close

from prunepath_jax import experts as X


def _planted(f, d, g, noise, seed=0):
    """Rows around e = f/g random unit directions, shuffled; returns (rows_fd, true labels)."""
    rng = np.random.default_rng(seed)
    e = f // g
    centres_ed = rng.normal(size=(e, d))
    centres_ed /= np.linalg.norm(centres_ed, axis=1, keepdims=True)
    true_f = rng.permutation(np.repeat(np.arange(e), g))
    rows_fd = centres_ed[true_f] + noise * rng.normal(size=(f, d)) / np.sqrt(d)
    return rows_fd.astype(np.float32), true_f


# Shapes are shared between tests: each new (f, d, e) costs a compilation of several seconds.
@pytest.mark.parametrize(("f", "d", "g"), [(256, 24, 16), (40, 5, 1), (64, 8, 64)])
def test_exact_cluster_sizes(f, d, g):
    rows = np.random.default_rng(f + g).normal(size=(f, d)).astype(np.float32)
    labels = np.asarray(X.balanced_kmeans(rows, g, n_iter=5))
    assert labels.dtype == np.int32 and labels.shape == (f,)
    np.testing.assert_array_equal(np.bincount(labels, minlength=f // g), np.full(f // g, g))


def test_deterministic_given_seed():
    rows = np.random.default_rng(0).normal(size=(256, 24)).astype(np.float32)
    a = np.asarray(X.balanced_kmeans(rows, 16, seed=3))
    b = np.asarray(X.balanced_kmeans(rows, 16, seed=3))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("g", [0, -4, 7, 2.0])
def test_bad_group_size(g):
    rows = np.ones((64, 4), np.float32)
    with pytest.raises(ValueError, match="group size g"):
        X.balanced_kmeans(rows, g)


def test_bad_rows_shape():
    with pytest.raises(ValueError, match=r"\[f, d\]"):
        X.balanced_kmeans(np.ones(64, np.float32), 8)


def test_planted_clusters_recovered():
    rows, true_f = _planted(512, 64, 16, noise=1.0)
    labels = np.asarray(X.balanced_kmeans(rows, 16))
    e = 32
    counts_ee = np.zeros((e, e), int)
    np.add.at(counts_ee, (labels, true_f), 1)
    purity = counts_ee.max(axis=1).sum() / labels.size
    assert purity >= 0.95, f"planted clusters recovered with purity {purity:.3f}"
    found = X.within_cluster_cosine(rows, labels)
    planted = X.within_cluster_cosine(rows, true_f)
    assert found >= planted - 1e-3
    rng = np.random.default_rng(1)
    assert found > X.within_cluster_cosine(rows, rng.permutation(512) % e) + 0.3


def test_quality_on_random_rows():
    """Even unstructured rows have chance structure that k-means must exploit."""
    f, d, g = 512, 64, 16
    rows = np.random.default_rng(2).normal(size=(f, d)).astype(np.float32)
    found = X.within_cluster_cosine(rows, X.balanced_kmeans(rows, g))
    rng = np.random.default_rng(3)
    random_groups = max(
        X.within_cluster_cosine(rows, rng.permutation(f) % (f // g)) for _ in range(5)
    )
    contiguous = X.within_cluster_cosine(rows, np.arange(f) // g)
    assert found > random_groups + 0.02 and found > contiguous + 0.02, (
        found,
        random_groups,
        contiguous,
    )


def test_within_cluster_cosine_values():
    base = np.array([[1.0, 0.0], [0.0, 2.0]])
    rows = np.repeat(base, 3, axis=0)  # two clusters of 3 identical (after scaling) rows
    assert X.within_cluster_cosine(rows, [0, 0, 0, 1, 1, 1]) == pytest.approx(1.0)
    assert X.within_cluster_cosine(rows, [0, 1, 0, 1, 0, 1]) == pytest.approx(1 / 3)


def test_permutation_from_labels():
    labels = np.array([2, 0, 1, 0, 2, 1], np.int32)
    perm = X.permutation_from_labels(labels, 2)
    np.testing.assert_array_equal(perm, [1, 3, 2, 5, 0, 4])  # stable within each expert
    np.testing.assert_array_equal(labels[perm], [0, 0, 1, 1, 2, 2])
    inv = X.inverse_permutation(perm)
    np.testing.assert_array_equal(perm[inv], np.arange(6))
    with pytest.raises(ValueError, match="exactly g=2"):
        X.permutation_from_labels(np.array([0, 0, 0, 1, 1, 2]), 2)
    with pytest.raises(ValueError, match="does not divide"):
        X.permutation_from_labels(labels, 4)
    with pytest.raises(ValueError, match="labels must be in"):
        X.permutation_from_labels(np.array([0, 0, 3, 3]), 2)


def _swiglu(x_td, w_gate_df, w_up_df, w_down_fd):
    return (jax.nn.silu(x_td @ w_gate_df) * (x_td @ w_up_df)) @ w_down_fd


def test_permuted_ffn_is_unchanged_and_splits_into_experts():
    rng = np.random.default_rng(4)
    t, d, f, g = 7, 24, 256, 16
    e = f // g
    x = rng.normal(size=(t, d)).astype(np.float32)
    w_gate = rng.normal(size=(d, f)).astype(np.float32) / np.sqrt(d)
    w_up = rng.normal(size=(d, f)).astype(np.float32) / np.sqrt(d)
    w_down = rng.normal(size=(f, d)).astype(np.float32) / np.sqrt(f)
    labels = X.balanced_kmeans(w_gate.T, g, n_iter=5)
    perm = X.permutation_from_labels(labels, g)
    pg, pu, pd = X.permute_ffn(w_gate, w_up, w_down, perm)
    dense = _swiglu(x, w_gate, w_up, w_down)
    assert_close(_swiglu(x, pg, pu, pd), dense, "op_fp32", "permuted FFN")

    # Expert e is the contiguous block [e*g, (e+1)*g) and holds exactly its cluster's neurons.
    labels = np.asarray(labels)
    for ex in range(e):
        np.testing.assert_array_equal(
            np.sort(perm[ex * g : (ex + 1) * g]), np.flatnonzero(labels == ex)
        )
    blocks = [slice(ex * g, (ex + 1) * g) for ex in range(e)]
    per_expert = sum(_swiglu(x, pg[:, s], pu[:, s], pd[s]) for s in blocks)
    assert_close(per_expert, dense, "op_fp32", "sum of expert FFNs")

    # Non-gated FFN with a first-projection bias (GPT-2 / BERT style).
    b_in = rng.normal(size=(f,)).astype(np.float32)
    pg2, pu2, pd2 = X.permute_ffn(w_gate, None, w_down, perm)
    assert pu2 is None
    ref = jax.nn.gelu(x @ w_gate + b_in) @ w_down
    got = jax.nn.gelu(x @ pg2 + X.permute_bias(b_in, perm)) @ pd2
    assert_close(got, ref, "op_fp32", "permuted GELU FFN with bias")
