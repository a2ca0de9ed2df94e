"""Sharding rules for parameters on a (data, fsdp, model) mesh.

A rule is chosen from the parameter's path and shape: projections into a wider space (q/k/v,
gate/up, c_fc, intermediate) put their output dimension on `model` and input on `fsdp`; projections
back (o, down, c_proj, output) the reverse; embeddings put the vocabulary on `model`. PrunePath
FFNs put their neurons (hence whole experts, which are contiguous blocks of G neurons) on `model`:
`w_in [c, f, d]` -> (-, model, fsdp), `w_out [f, d]` -> (model, fsdp), `b_in [c, f]` -> (-, model);
routers `[d, E]` are tiny and replicated. A dimension is only sharded when the axis size divides
it, so every config places without error.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# The axes a batch's rows are sharded over (the rest of the mesh shards weights only).
BATCH_AXES = ("data", "fsdp")

_OUT_PROJ = ("o_proj", "down_proj", "c_proj", "output", "down")


def _axis_size(mesh: Mesh, name: str) -> int:
    return mesh.shape.get(name, 1)


def param_spec(path: tuple, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for one parameter (see the module docstring for the rules)."""
    names = [str(p) for p in path]
    if len(shape) < 2 or "router" in names:
        return PartitionSpec()
    if "w_in" in names:  # [c, f, d]
        wanted = (None, "model", "fsdp")
    elif "w_out" in names:  # [f, d]
        wanted = ("model", "fsdp")
    elif "b_in" in names:  # [c, f]
        wanted = (None, "model")
    elif "gate_up_proj" in names and len(shape) == 3:  # [d, 2, f]
        wanted = ("fsdp", None, "model")
    elif any(n in ("embedding",) for n in names):
        wanted = ("model", "fsdp")
    elif any(n in _OUT_PROJ for n in names):
        wanted = ("model", "fsdp")
    else:
        wanted = ("fsdp", "model")
    wanted = (None,) * (len(shape) - len(wanted)) + wanted
    spec = []
    for dim, axis in zip(shape, wanted, strict=True):
        ok = axis is not None and axis in mesh.shape and dim % _axis_size(mesh, axis) == 0
        spec.append(axis if ok and _axis_size(mesh, axis) > 1 else None)
    return PartitionSpec(*spec)


def param_sharding(path: tuple, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, param_spec(path, shape, mesh))


def make_mesh(data: int = 1, fsdp: int = 1, model: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, model) mesh; -1 in one axis takes the remaining devices."""
    devices = devices if devices is not None else jax.devices()
    sizes = [data, fsdp, model]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    if -1 in sizes:
        known = 1
        for s in sizes:
            known *= s if s != -1 else 1
        sizes[sizes.index(-1)] = len(devices) // known
    n = sizes[0] * sizes[1] * sizes[2]
    if n > len(devices) or n <= 0:
        raise ValueError(f"mesh {sizes} needs {n} devices, have {len(devices)}")
    return jax.make_mesh(
        tuple(sizes),
        ("data", "fsdp", "model"),
        axis_types=(jax.sharding.AxisType.Auto,) * 3,
        devices=devices[:n],
    )
