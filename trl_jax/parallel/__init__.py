"""Meshes, logical-axis rules, parameter/batch sharding and multi-process setup."""

from trl_jax.parallel.distributed import initialize_distributed, local_batch_slice, make_global_batch
from trl_jax.parallel.mesh import BATCH_AXES, MESH_AXES, batch_axes, batch_parallel_size, make_mesh
from trl_jax.parallel.rules import (
    DEFAULT_RULES,
    activation_sharding,
    active_mesh,
    active_spec,
    constrain,
    fsdp_shardings,
    logical_to_shardings,
    logical_to_spec,
    override_rules,
)
from trl_jax.parallel.sharding import as_named, batch_shardings, batch_spec, replicated, shard_batch, shard_params

__all__ = [
    "BATCH_AXES",
    "DEFAULT_RULES",
    "MESH_AXES",
    "activation_sharding",
    "active_mesh",
    "active_spec",
    "constrain",
    "as_named",
    "batch_axes",
    "batch_parallel_size",
    "batch_shardings",
    "batch_spec",
    "fsdp_shardings",
    "initialize_distributed",
    "local_batch_slice",
    "logical_to_shardings",
    "logical_to_spec",
    "make_global_batch",
    "make_mesh",
    "override_rules",
    "replicated",
    "shard_batch",
    "shard_params",
]
