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


# ---------------------------------------------------------------------- helpers of the trainers' loop
def is_multiprocess() -> bool:
    return jax.process_count() > 1


def is_main_process() -> bool:
    """Process 0: the one that writes logs, counters and exported models."""
    return jax.process_index() == 0


def process_rows(mesh: Mesh | None, global_batch_size: int) -> slice:
    """This process's rows of a global batch: :func:`local_batch_slice` with several processes, all rows with one."""
    if mesh is None or not is_multiprocess():
        return slice(0, global_batch_size)
    return local_batch_slice(mesh, global_batch_size)


def pad_to_common_shape(local_batch: dict, pad_value=lambda key: 0) -> dict:
    """Make every process's local batch the same shape: each non-leading axis is padded (at its end) to the
    largest size any process has, with ``pad_value(key)``. Per-batch padded lengths (the collators' length
    buckets) differ between processes holding different rows; the longest equals the bucket a one-process run
    picks for the whole batch, so the padded global batch is the one-process batch. One small all-gather of the
    shapes; a no-op with one process."""
    if not is_multiprocess():
        return local_batch
    from jax.experimental import multihost_utils

    keys = sorted(local_batch)
    dims = [d for k in keys for d in np.shape(local_batch[k])[1:]]
    if not dims:
        return local_batch
    every = np.asarray(multihost_utils.process_allgather(np.asarray(dims, np.int32)))
    target = every.reshape(-1, len(dims)).max(axis=0)
    out, i = {}, 0
    for k in keys:
        x = np.asarray(local_batch[k])
        n = x.ndim - 1
        want = target[i:i + n]
        i += n
        pads = [(0, 0)] + [(0, int(w) - s) for w, s in zip(want, x.shape[1:])]
        out[k] = np.pad(x, pads, constant_values=pad_value(k)) if any(p[1] for p in pads) else x
    return out


def sum_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Per-process host counters (e.g. ``num_tokens`` of the local rows) summed over all processes."""
    if not values or not is_multiprocess():
        return values
    from jax.experimental import multihost_utils

    keys = sorted(values)
    every = np.asarray(multihost_utils.process_allgather(np.asarray([values[k] for k in keys], np.float32)))
    total = every.reshape(-1, len(keys)).astype(np.float64).sum(axis=0)
    return {k: float(v) for k, v in zip(keys, total)}


def gather_to_host(tree):
    """A pytree of (possibly sharded over several processes) arrays as full numpy arrays on every process. Every
    process must call it (a collective with several processes)."""
    if not is_multiprocess():
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
                        if isinstance(x, jax.Array) else x, tree)


def sync_processes(name: str) -> None:
    """Barrier: every process waits here until all have arrived (no-op with one process)."""
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
