"""Placing parameters and batches on a mesh."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from trl_jax.parallel.mesh import batch_axes, batch_parallel_size
from trl_jax.parallel.rules import DEFAULT_RULES, Rules, logical_to_shardings


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_spec(mesh: Mesh, ndim: int = 1) -> PartitionSpec:
    """``PartitionSpec`` splitting the leading (batch) axis over ``("data", "fsdp")``; other axes replicated."""
    axes = batch_axes(mesh)
    lead = None if not axes else axes[0] if len(axes) == 1 else axes
    return PartitionSpec(lead, *([None] * (ndim - 1))) if ndim else PartitionSpec()


def batch_shardings(batch, mesh: Mesh):
    """The pytree of ``NamedSharding`` that splits every leaf of ``batch`` on its leading axis."""
    return jax.tree.map(lambda x: NamedSharding(mesh, batch_spec(mesh, np.ndim(x))), batch)


def _check_batch(batch, mesh):
    n = batch_parallel_size(mesh)
    for path, x in jax.tree_util.tree_leaves_with_path(batch):
        if np.ndim(x) == 0 or x.shape[0] % n:
            raise ValueError(
                f"shard_batch: leaf {jax.tree_util.keystr(path)} has shape {np.shape(x)}; its leading (batch) axis "
                f"must be a multiple of data*fsdp = {n}. Pad the batch or change the mesh."
            )


def shard_batch(batch, mesh: Mesh):
    """Put a host (numpy / jax) batch on ``mesh``, split on the leading axis. Single-process only; with several
    processes use :func:`trl_jax.parallel.make_global_batch` on each process's slice."""
    _check_batch(batch, mesh)
    return jax.device_put(batch, batch_shardings(batch, mesh))


def shard_params(params, mesh: Mesh, shardings=None, *, logical_axes=None, rules: Rules = DEFAULT_RULES):
    """Place ``params`` on ``mesh``.

    ``shardings``: a matching pytree of ``NamedSharding`` / ``PartitionSpec``; or ``logical_axes``: a matching
    pytree of logical-axis tuples mapped through ``rules``; neither: replicated.
    """
    if shardings is None:
        if logical_axes is not None:
            shardings = logical_to_shardings(logical_axes, mesh, rules, shapes=params)
        else:
            shardings = jax.tree.map(lambda _: replicated(mesh), params)
    shardings = as_named(shardings, mesh)
    return jax.device_put(params, shardings)


def as_named(shardings, mesh: Mesh):
    """Turn any ``PartitionSpec`` leaves of a shardings pytree into ``NamedSharding`` on ``mesh``."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s) if isinstance(s, PartitionSpec) else s,
        shardings,
        is_leaf=lambda s: isinstance(s, (PartitionSpec, jax.sharding.Sharding)),
    )
