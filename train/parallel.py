"""Placing the training step on a (data, fsdp, model) mesh (DESIGN.md section 3).

Parameters and their optimiser moments follow `prunepath_jax.sharding.param_spec` (FSDP over
weights, experts/heads/vocabulary on `model`); the batch is split over data x fsdp; scalars are
replicated. The step is `jax.jit` with explicit in/out shardings and the train state donated, so
one program runs on 1..N devices and on several hosts (each host feeds its own rows of the global
batch, see `put_batch`).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prunepath_jax import sharding
from prunepath_jax.train.config import TrainConfig
from prunepath_jax.train.step import train_step

log = logging.getLogger(__name__)
BATCH_AXES = sharding.BATCH_AXES


def _key(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """A `NamedSharding` per leaf by the parameter rules (optimiser moments inherit their
    parameter's rule because the rule reads the parameter names in the leaf's path)."""

    def one(path, leaf):
        names = tuple(_key(k) for k in path)
        return sharding.param_sharding(names, tuple(np.shape(leaf)), mesh)

    return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shardings(batch: dict, mesh: Mesh) -> dict:
    return {k: batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def check_batch(global_batch: int, mesh: Mesh, grad_accum: int) -> None:
    """The global batch must split evenly over data x fsdp (per micro-batch)."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = global_batch // grad_accum
    if micro % n:
        raise ValueError(
            f"batch_size {global_batch} / grad_accum {grad_accum} = {micro} rows per micro-batch "
            f"is not divisible by the data x fsdp mesh size {n}"
        )


def put_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over data x fsdp (works on 1..N hosts)."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
        for k, v in local.items()
    }


def place(tree: Any, shardings: Any) -> Any:
    return jax.device_put(tree, shardings)


def jit_train_step(
    cfg: TrainConfig,
    graphdef: Any,
    optimizer,
    mesh: Mesh,
    state_shardings: Any,
    frozen_shardings: Any,
    batch_example: dict,
):
    """The jitted, sharded step: `(state, frozen, batch) -> (state, metrics)`, state donated."""
    fn = functools.partial(train_step, graphdef=graphdef, optimizer=optimizer, cfg=cfg)
    return jax.jit(
        fn,
        in_shardings=(state_shardings, frozen_shardings, batch_shardings(batch_example, mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,),
    )


def init_distributed(cfg: TrainConfig) -> None:
    """`jax.distributed.initialize` from the config's flags, else from the environment (SLURM,
    Open MPI, Cloud TPU, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)."""
    if not cfg.distributed:
        return
    kwargs = {}
    coord = cfg.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if coord:
        kwargs["coordinator_address"] = coord
    n = cfg.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
    if n:
        kwargs["num_processes"] = n
    pid = cfg.process_id if cfg.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
    if pid >= 0:
        kwargs["process_id"] = pid
    jax.distributed.initialize(**kwargs)
    log.info(
        "distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def mesh_from_config(cfg: TrainConfig) -> Mesh:
    """The (data, fsdp, model) mesh over every device; one axis may be -1 (the remaining ones)."""
    sizes = (cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_model)
    fixed = int(np.prod([s for s in sizes if s != -1]))
    n_dev = jax.device_count()
    if -1 in sizes and n_dev % fixed:
        raise ValueError(f"{n_dev} devices do not split into mesh axes {list(sizes)}")
    mesh = sharding.make_mesh(*sizes)  # validates the sizes, resolves -1
    if mesh.devices.size != n_dev:
        raise ValueError(
            f"mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} x "
            f"model={mesh.shape['model']} uses {mesh.devices.size} of the {n_dev} visible "
            "devices; the axes must use them all"
        )
    return mesh


def init_sharded(mcfg, dtype, mesh: Mesh, *, seed: int = 0, router_scale: float = 0.0):
    """A random-weight model created directly in its sharded placement (benchmarks, multi-host).

    Initialisation runs inside one `jax.jit` whose outputs carry the parameter shardings, so no
    process ever holds the whole model and every process of a multi-host run gets the same
    weights. `router_scale > 0` draws PrunePath routers from N(0, router_scale^2) (a zero
    router routes uniformly).
    """
    from flax import nnx

    from prunepath_jax import models

    cls = models.model_class(mcfg)

    def make():
        model = cls(mcfg, dtype=dtype, rngs=nnx.Rngs(seed))
        if router_scale and mcfg.prunepath is not None:
            for i, layer in enumerate(model.layers):
                key = jax.random.key(seed * 1000 + i)
                layer.mlp.router[...] = (
                    jax.random.normal(key, layer.mlp.router.shape) * router_scale
                )
        return nnx.split(model)[1]

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: cls(mcfg, dtype=dtype, rngs=nnx.Rngs(0))))
    state = jax.jit(make, out_shardings=tree_shardings(abstract, mesh))()
    return nnx.merge(graphdef, state)
