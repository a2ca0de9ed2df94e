"""Compiled calls on a model split once: the graph definition hashed once, the state passed as a
flat list of arrays.

Why. ``jax.jit(f, static_argnames=("graphdef",))(graphdef, state, ...)`` hashes the NNX graph
definition (a static argument) and flattens the ``nnx.State`` pytree in Python on *every* call:
~2 ms and ~0.45 ms on the 2-core CI machine for SmolLM2's 242 arrays. The decode loop calls its
compiled chunk every 16 tokens, and at 1B a chunk is ~10 ms of device work: on the H200 a call
took 2-5 ms to return, and back-to-back calls ran 3% (1B) to 6% (SmolLM2) slower than the same
program called ahead-of-time compiled (BENCHMARKS.md, thirty-fifth session) — the host, not the
GPU, set part of the pace. :func:`bind` pays the hash once (per generate call) and returns a
function whose per-call work is flattening a list.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax


@functools.lru_cache(maxsize=32)
def _bound(impl: Callable, graphdef, treedef, donate_argnums: tuple[int, ...], static: tuple):
    """One ``jax.jit`` per (impl, graph, tree structure, donation, static keywords), kept so that
    later ``generate`` calls on the same model reuse its compiled programs."""
    kw = dict(static)

    def flat(leaves, *args):
        return impl(graphdef, jax.tree.unflatten(treedef, leaves), *args, **kw)

    flat.__name__ = getattr(impl, "__name__", "flat").lstrip("_")  # the profiler's module name
    return jax.jit(flat, donate_argnums=donate_argnums)


def bind(impl: Callable, graphdef, state, *, donate_argnums=(), **static):
    """``(fn, leaves)`` with ``fn(leaves, *args)`` = ``impl(graphdef, state, *args, **static)``,
    compiled.

    Args:
        impl: a function of ``(graphdef, state, *args, **static)`` (a split NNX model first).
        graphdef: the model's ``nnx.GraphDef``; baked into ``fn``, not an argument of it.
        state: its ``nnx.State``; ``leaves`` is it flattened, ``fn``'s first argument.
        donate_argnums: ``fn``'s positions to donate: 0 is ``leaves``, 1 the first of ``args``.
        **static: keywords baked into the compiled program (hashable: step counts, flags).
    """
    leaves, treedef = jax.tree.flatten(state)
    fn = _bound(impl, graphdef, treedef, tuple(donate_argnums), tuple(sorted(static.items())))
    return fn, leaves
