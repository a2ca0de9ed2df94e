"""Expert construction (MoEfication): balanced k-means over FFN neurons, and the permutation.

Each FFN neuron is described by its row of the first projection (``gate_proj`` for SwiGLU/GeGLU,
``c_fc`` for GPT-2, ``intermediate.dense`` for BERT), L2-normalised. Neurons whose rows point the
same way tend to fire together, so grouping them makes an expert that is either mostly useful or
mostly idle for a token. The paper uses ``KMeansConstrained`` (min-cost flow, CPU, slow at 8B
scale); we need every cluster to have *exactly* g members too, but in JAX, fast on a 2-core CPU
and on a GPU, with memory ``O(f·e)`` (never ``O(f²)``).

Algorithm (:func:`balanced_kmeans`), on cosine similarity ``S = X Cᵀ`` ``[f, e]``:

1. k-means++ initialisation (D² sampling on cosine distance), deterministic given the seed.
2. Each iteration: (a) *prices* ``v_e`` from a few warm-started log-domain Sinkhorn steps on the
   transport problem "each neuron sends 1, each cluster receives g" — the dual variables of the
   balanced assignment LP, so ``argmax_e (S − v)`` is already nearly balanced; (b) an *exact*
   capacity repair on the priced scores: unassigned neurons propose to their best non-full
   cluster, each cluster keeps its best proposals up to its remaining capacity, repeat (at most
   e + 1 rounds, usually a handful); (c) centroids = normalised member means.
3. Stop when the labels no longer change or after ``n_iter`` iterations.

Layouts (ours: activations multiply on the left, ``y = x @ W``):

* ``W_gate``, ``W_up`` (or ``W_in``): ``[d, f]`` — *columns* are neurons; k-means rows are
  ``W_gate.T``.
* ``W_down`` (or ``W_out``): ``[f, d]`` — *rows* are neurons.
* biases of the first projection: ``[f]``.

After :func:`permute_ffn` expert e is the contiguous block ``[e*g, (e+1)*g)`` of the neuron axis,
and the FFN computes the same function (only the summation order changes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_EPS = 1e-12


def _normalise_rows(x_nd: jax.Array) -> jax.Array:
    norm_n = jnp.linalg.norm(x_nd, axis=-1, keepdims=True)
    return x_nd / jnp.maximum(norm_n, _EPS)


def _kmeanspp_init(x_fd: jax.Array, key: jax.Array, e: int) -> jax.Array:
    """k-means++ centroids ``[e, d]``: D² sampling spreads the seeds across directions."""
    f, d = x_fd.shape
    key0, key = jax.random.split(key)
    first = jax.random.randint(key0, (), 0, f)
    c_ed = jnp.zeros((e, d), x_fd.dtype).at[0].set(x_fd[first])
    dist_f = jnp.maximum(1.0 - x_fd @ x_fd[first], 0.0)

    def body(i, carry):
        c_ed, dist_f = carry
        # log(0) would give -inf everywhere for duplicate rows; the floor keeps sampling uniform.
        idx = jax.random.categorical(jax.random.fold_in(key, i), jnp.log(dist_f**2 + 1e-30))
        c_ed = c_ed.at[i].set(x_fd[idx])
        dist_f = jnp.minimum(dist_f, jnp.maximum(1.0 - x_fd @ x_fd[idx], 0.0))
        return c_ed, dist_f

    c_ed, _ = jax.lax.fori_loop(1, e, body, (c_ed, dist_f))
    return c_ed


def _sinkhorn_prices(
    s_fe: jax.Array, v_e: jax.Array, g: jax.Array, temp: jax.Array, n_steps: jax.Array
) -> jax.Array:
    """Cluster prices ``v_e`` that balance ``argmax_e(S − v)`` (entropic transport dual).

    Log-domain updates: neuron potentials make every row sum to 1, cluster prices make every
    column sum to g. Warm-starting from the previous iteration's prices keeps n_steps small.
    """
    log_g = jnp.log(jnp.asarray(g, jnp.float32))

    def body(_, v_e):
        u_f = temp * jax.nn.logsumexp((s_fe - v_e) / temp, axis=1)
        return temp * (jax.nn.logsumexp((s_fe - u_f[:, None]) / temp, axis=0) - log_g)

    return jax.lax.fori_loop(0, n_steps, body, v_e)


def _exact_assign(a_fe: jax.Array, g: jax.Array) -> jax.Array:
    """Labels ``[f]`` with exactly g neurons per cluster, greedy on the scores ``a_fe``.

    Rounds: every unassigned neuron proposes to its best cluster that still has room; each
    cluster accepts its highest-scoring proposals up to its remaining capacity. A round either
    places every proposer or fills a cluster, so it ends within e + 1 rounds; total capacity is
    exactly f, so every neuron is placed. Ties break towards lower neuron/cluster index.
    """
    f, e = a_fe.shape
    idx_f = jnp.arange(f, dtype=jnp.int32)

    def cond(state):
        labels_f, _ = state
        return jnp.any(labels_f < 0)

    def body(state):
        labels_f, cap_e = state
        open_fe = jnp.where(cap_e[None, :] > 0, a_fe, -jnp.inf)
        best_f = jnp.argmax(open_fe, axis=1).astype(jnp.int32)
        score_f = jnp.max(open_fe, axis=1)
        proposer_f = labels_f < 0
        key_cl = jnp.where(proposer_f, best_f, e)  # settled neurons sort after every cluster
        # Sort by cluster, then by descending score (lexsort: last key is primary; stable).
        perm = jnp.lexsort((-score_f, key_cl))
        cl_sorted = key_cl[perm]
        pos_sorted = idx_f - jnp.searchsorted(cl_sorted, cl_sorted, side="left").astype(jnp.int32)
        cap_pad = jnp.concatenate([cap_e, jnp.zeros((1,), cap_e.dtype)])
        accept_sorted = pos_sorted < cap_pad[cl_sorted]
        accept_f = jnp.zeros((f,), bool).at[perm].set(accept_sorted) & proposer_f
        labels_f = jnp.where(accept_f, best_f, labels_f)
        taken_e = jax.ops.segment_sum(accept_f.astype(jnp.int32), best_f, num_segments=e)
        return labels_f, cap_e - taken_e

    labels_f = jnp.full((f,), -1, jnp.int32)
    cap_e = jnp.full((e,), g, jnp.int32)  # g may be traced
    labels_f, _ = jax.lax.while_loop(cond, body, (labels_f, cap_e))
    return labels_f


# Only e is static (it sets shapes); g and the iteration counts are traced so that one
# compilation per (f, d, e) serves every call, which keeps test and per-layer runs cheap.
@functools.partial(jax.jit, static_argnames=("e",))
def _balanced_kmeans_jit(
    x_fd: jax.Array,
    key: jax.Array,
    g: jax.Array,
    e: int,
    n_iter: jax.Array,
    n_sinkhorn: jax.Array,
    temp_scale: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    x_fd = _normalise_rows(x_fd.astype(jnp.float32))
    c_ed = _kmeanspp_init(x_fd, key, e)

    def step(c_ed, v_e):
        s_fe = jnp.matmul(x_fd, c_ed.T, precision=jax.lax.Precision.HIGHEST)
        temp = temp_scale * jnp.maximum(jnp.std(s_fe), 1e-6)
        v_e = _sinkhorn_prices(s_fe, v_e, g, temp, n_sinkhorn)
        labels_f = _exact_assign(s_fe - v_e[None, :], g)
        # A one-hot matmul instead of segment_sum: scatter-add uses float atomics on GPU, whose
        # order varies run to run; the matmul keeps labels reproducible for a given seed.
        onehot_fe = jax.nn.one_hot(labels_f, e, dtype=x_fd.dtype)
        sum_ed = jnp.matmul(onehot_fe.T, x_fd, precision=jax.lax.Precision.HIGHEST)
        return labels_f, _normalise_rows(sum_ed), v_e

    def cond(state):
        it, changed = state[0], state[1]
        return (it < n_iter) & changed

    def body(state):
        it, _, labels_f, c_ed, v_e = state
        new_f, c_ed, v_e = step(c_ed, v_e)
        return it + 1, jnp.any(new_f != labels_f), new_f, c_ed, v_e

    labels_f, c_ed, v_e = step(c_ed, jnp.zeros((e,), jnp.float32))
    state = (jnp.int32(1), jnp.bool_(True), labels_f, c_ed, v_e)
    it, _, labels_f, _, _ = jax.lax.while_loop(cond, body, state)
    return labels_f, it


def balanced_kmeans(
    rows_fd: jax.Array,
    g: int,
    *,
    n_iter: int = 25,
    seed: int = 0,
    n_sinkhorn: int = 20,
    temp_scale: float = 0.05,
) -> jax.Array:
    """Clusters f neurons into ``e = f // g`` groups of exactly g by cosine similarity.

    Rows are L2-normalised first (the paper's ``sklearn.normalize``). One compilation serves
    every layer of the same shape.

    Args:
        rows_fd: one row per neuron ``[f, d]`` (for our ``[d, f]`` gate weight, pass ``W.T``).
        g: neurons per expert; must divide f.
        n_iter: maximum k-means iterations (stops earlier once labels are stable).
        seed: PRNG seed of the k-means++ initialisation; same seed, same labels.
        n_sinkhorn: Sinkhorn steps per iteration for the cluster prices (warm-started).
        temp_scale: entropic temperature as a fraction of the std of the similarities; smaller
            prices the LP more exactly but converges more slowly.

    Returns:
        ``labels_f`` int32 ``[f]`` with values in ``[0, e)``, each value exactly g times.

    Raises:
        ValueError: rows are not 2-D, g ≤ 0, g does not divide f, or n_iter < 1.
    """
    if rows_fd.ndim != 2:
        raise ValueError(f"rows must be [f, d], got shape {tuple(rows_fd.shape)}")
    f = int(rows_fd.shape[0])
    if not isinstance(g, (int, np.integer)) or g <= 0:
        raise ValueError(f"group size g must be a positive integer, got {g!r}")
    if f % g:
        raise ValueError(
            f"group size g={g} does not divide the FFN width f={f}: experts must be equal-sized"
        )
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    e = f // g
    if e == 1:
        return jnp.zeros((f,), jnp.int32)
    labels_f, _ = _balanced_kmeans_jit(
        jnp.asarray(rows_fd),
        jax.random.key(seed),
        jnp.int32(g),
        e,
        jnp.int32(n_iter),
        jnp.int32(n_sinkhorn),
        jnp.float32(temp_scale),
    )
    return labels_f


def within_cluster_cosine(rows_fd, labels_f) -> float:
    """Mean cosine similarity between distinct neurons of the same cluster.

    Averaged per cluster (clusters with < 2 members are skipped), then over clusters. Uses
    ``Σ_{i,j∈S} x_i·x_j = ‖Σ_{i∈S} x_i‖²`` on normalised rows, so it costs ``O(f·d)``.
    """
    x_fd = np.asarray(rows_fd, dtype=np.float64)
    x_fd = x_fd / np.maximum(np.linalg.norm(x_fd, axis=1, keepdims=True), _EPS)
    labels_f = np.asarray(labels_f)
    e = int(labels_f.max()) + 1
    n_e = np.bincount(labels_f, minlength=e).astype(np.float64)
    sum_ed = np.zeros((e, x_fd.shape[1]))
    np.add.at(sum_ed, labels_f, x_fd)
    ok = n_e >= 2
    pair_e = (np.sum(sum_ed[ok] ** 2, axis=1) - n_e[ok]) / (n_e[ok] * (n_e[ok] - 1))
    return float(pair_e.mean()) if ok.any() else float("nan")


def permutation_from_labels(labels_f, g: int) -> np.ndarray:
    """Permutation ``perm_f`` int32 putting expert e's neurons at ``[e*g, (e+1)*g)``.

    ``perm_f[j]`` is the original index of the neuron now at position j (gather convention:
    ``w_new = w[..., perm_f]``). Neurons keep their original relative order within an expert,
    so the result is deterministic.

    Raises:
        ValueError: some label does not occur exactly g times (or labels are not ``0..e-1``).
    """
    labels_f = np.asarray(labels_f).astype(np.int64)
    f = labels_f.shape[0]
    if g <= 0 or f % g:
        raise ValueError(f"group size g={g} does not divide f={f}")
    e = f // g
    if labels_f.min() < 0 or labels_f.max() >= e:
        raise ValueError(
            f"labels must be in [0, {e}), got range [{labels_f.min()}, {labels_f.max()}]"
        )
    counts_e = np.bincount(labels_f, minlength=e)
    if (counts_e != g).any():
        bad = np.flatnonzero(counts_e != g)[:5].tolist()
        raise ValueError(f"every expert needs exactly g={g} neurons; experts {bad} do not")
    return np.argsort(labels_f, kind="stable").astype(np.int32)


def inverse_permutation(perm_f) -> np.ndarray:
    """``inv[perm[j]] = j``: maps an original neuron index to its permuted position."""
    perm_f = np.asarray(perm_f)
    inv_f = np.empty_like(perm_f)
    inv_f[perm_f] = np.arange(perm_f.shape[0], dtype=perm_f.dtype)
    return inv_f


def permute_in(w_df, perm_f):
    """Permutes the neuron *columns* of a first-projection weight ``[d, f]`` (gate/up/in)."""
    return w_df[:, perm_f]


def permute_out(w_fd, perm_f):
    """Permutes the neuron *rows* of the down/out projection ``[f, d]``."""
    return w_fd[perm_f, :]


def permute_bias(b_f, perm_f):
    """Permutes a first-projection bias ``[f]`` (the down bias ``[d]`` is unchanged)."""
    return b_f[perm_f]


def permute_ffn(w_gate_df, w_up_df, w_down_fd, perm_f):
    """Permuted copies of one FFN's weights; pass ``w_up_df=None`` for non-gated FFNs (GPT-2).

    Returns:
        ``(w_gate_df, w_up_df, w_down_fd)`` with the neuron axis permuted; works on numpy and
        JAX arrays alike.
    """
    w_up_df = None if w_up_df is None else permute_in(w_up_df, perm_f)
    return permute_in(w_gate_df, perm_f), w_up_df, permute_out(w_down_fd, perm_f)
