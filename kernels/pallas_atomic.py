"""A relaxed float atomic add for Pallas-Triton kernels.

Why. ``plgpu.atomic_add`` lowers to ``tt.atomic_rmw`` with acquire-release semantics at GPU
scope, and Pallas exposes no knob for it. An acquire-release ``atom`` is a fence plus an atomic
whose result must come back before the thread's next memory operation: a program that adds its
``[t, d]`` share element by element pays one L2 round trip per atomic, in series, and drains
the loads the software pipeline had in flight. Partial sums need no ordering at all (the kernel
boundary orders them for whoever reads the result), so the decode kernels add with relaxed
semantics, which lets the atomics stream like stores.

How. A twin of Pallas' atomic primitive: the same abstract evaluation, discharge rule (the
interpreter) and Triton lowering rule, run with the lowering's ``_atomic_rmw`` helper bound to
``MemSemantic.RELAXED`` for the duration of this primitive's lowering only. These are private
jax hooks (jax 0.10-0.11, the versions whose Pallas Triton backend we support); if they moved,
:data:`HAVE_RELAXED` is False and :func:`atomic_add` falls back to ``plgpu.atomic_add`` — the
same sums, only slower.
"""

from __future__ import annotations

import functools

try:  # The Triton backend modules import on CPU jaxlib too.
    from jax._src import core as _core
    from jax._src import tree_util as _tree_util
    from jax._src.lib.triton import dialect as _tt
    from jax._src.pallas.triton import lowering as _lowering
    from jax._src.pallas.triton import primitives as _prims
    from jax._src.state import discharge as _discharge
    from jax._src.state import primitives as _state_prims
    from jax.experimental.pallas import triton as plgpu

    _RELAXED = _tt.MemSemantic.RELAXED
    _ADD = _prims.AtomicOpType.ADD
    _rule = _prims._atomic_lowering_rule
    _abstract_eval = _prims._atomic_abstract_eval
    _discharge_rule = _prims._atomic_rmw_discharge_rule
    _orig_rmw = _lowering._atomic_rmw
    HAVE_RELAXED = True
except (ImportError, AttributeError):  # pragma: no cover - another jax layout
    plgpu = None
    HAVE_RELAXED = False

if HAVE_RELAXED:
    relaxed_atomic_p = _core.Primitive("prunepath_relaxed_atomic_rmw")
    relaxed_atomic_p.def_effectful_abstract_eval(_abstract_eval)
    _discharge.register_discharge_rule(relaxed_atomic_p)(_discharge_rule)

    @_lowering.register_lowering(relaxed_atomic_p)
    def _relaxed_lowering_rule(ctx, *args_flat, args_tree, atomic_type):
        # Pallas' own rule, with its atomic helper defaulting to relaxed semantics. Lowering
        # runs these rules one after another in the lowering thread, so the swap is scoped to
        # exactly this op.
        _lowering._atomic_rmw = functools.partial(_orig_rmw, semantic=_RELAXED)
        try:
            return _rule(ctx, *args_flat, args_tree=args_tree, atomic_type=atomic_type)
        finally:
            _lowering._atomic_rmw = _orig_rmw


def atomic_add(ref, idx, val, *, mask=None):
    """``ref[idx] += val`` with relaxed float atomics (no ordering with other memory ops).

    Same arguments as ``plgpu.atomic_add``; use it only for sums that nothing in the same kernel
    reads back. Works under ``interpret=True`` (Pallas' discharge rule, which takes no mask).
    """
    if not HAVE_RELAXED:  # pragma: no cover - another jax layout
        return plgpu.atomic_add(ref, idx, val, mask=mask)
    x_ref, transforms = _state_prims.get_ref_and_transforms(ref, idx, "atomic_rmw")
    flat, tree = _tree_util.tree_flatten((x_ref, transforms, val, mask))
    return relaxed_atomic_p.bind(*flat, args_tree=tree, atomic_type=_ADD)
