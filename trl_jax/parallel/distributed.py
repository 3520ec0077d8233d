"""Multi-process (multi-host) setup: ``jax.distributed`` and per-process batch slices."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from trl_jax.parallel.sharding import batch_spec


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids=None,
    cpu_collectives: str | None = "gloo",
    **kwargs,
) -> None:
    """Start JAX's multi-process runtime; call once per process before touching any device.

    On TPU pods / SLURM / GPU clusters all arguments may be left ``None`` (auto-detected by
    ``jax.distributed.initialize``). For several processes on one CPU machine give
    ``coordinator_address="127.0.0.1:PORT"``, ``num_processes`` and ``process_id``; ``cpu_collectives``
    (``"gloo"`` or ``"mpi"``) selects the CPU collective implementation needed for cross-process reductions.
    """
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        **kwargs,
    )


def local_batch_slice(mesh: Mesh, global_batch_size: int) -> slice:
    """Rows ``[start, stop)`` of the global batch that live on this process's devices.

    Each process loads only these rows and passes them to :func:`make_global_batch`. Requires the process's
    devices to hold one contiguous block of rows (true for meshes from :func:`make_mesh`).
    """
    sharding = NamedSharding(mesh, batch_spec(mesh, 1))
    idx = sharding.devices_indices_map((global_batch_size,))
    me = jax.process_index()
    rows = sorted({(s[0].start or 0, s[0].stop or global_batch_size) for d, s in idx.items() if d.process_index == me})
    start, stop = rows[0][0], max(r[1] for r in rows)
    covered = set()
    for a, b in rows:
        covered.update(range(a, b))
    if covered != set(range(start, stop)):
        raise ValueError(
            "local_batch_slice: this process's devices do not hold one contiguous block of the batch; build the "
            "mesh with make_mesh() so that devices of one process are adjacent on the batch axes."
        )
    return slice(start, stop)


def make_global_batch(local_batch, mesh: Mesh, global_batch_size: int | None = None):
    """Build globally-sharded arrays from each process's slice (``jax.make_array_from_process_local_data``).

    ``local_batch``: pytree of host arrays ``[B_local, ...]`` holding rows :func:`local_batch_slice` of the
    global batch. Returns arrays of shape ``[B_global, ...]`` sharded over ``("data", "fsdp")``.
    """

    def one(x):
        x = np.asarray(x)
        sharding = NamedSharding(mesh, batch_spec(mesh, x.ndim))
        gshape = None if global_batch_size is None else (global_batch_size, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, gshape)

    return jax.tree.map(one, local_batch)
