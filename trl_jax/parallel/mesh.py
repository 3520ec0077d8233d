"""Device meshes with the named axes trl_jax shards over: ``data``, ``fsdp``, ``tensor``.

``data`` replicates parameters and splits the batch; ``fsdp`` splits the batch *and* shards parameters (ZeRO-3
style: weights are all-gathered per use); ``tensor`` splits matmuls (Megatron style). The batch axis of every
input is sharded over ``("data", "fsdp")``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")


def make_mesh(
    shape: Sequence[int] | Mapping[str, int] | None = None,
    axis_names: Sequence[str] = MESH_AXES,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: all global devices) with named axes.

    ``shape``: sizes per axis, e.g. ``(8, 1, 1)`` or ``{"fsdp": 4, "tensor": 2}`` (missing names get size 1).
    One entry may be ``-1``: it takes whatever the device count leaves. ``None`` puts every device on ``fsdp``.
    The product of the sizes must equal the number of devices. Uses ``jax.make_mesh`` (topology-aware device
    order) when the devices are all of ``jax.devices()``, else a plain row-major reshape.
    """
    axis_names = tuple(axis_names)
    devs = list(jax.devices() if devices is None else devices)
    n = len(devs)
    if shape is None:
        sizes = [1] * len(axis_names)
        sizes[axis_names.index("fsdp") if "fsdp" in axis_names else 0] = -1
    elif isinstance(shape, Mapping):
        unknown = set(shape) - set(axis_names)
        if unknown:
            raise ValueError(f"make_mesh: unknown axis names {sorted(unknown)}; the mesh axes are {axis_names}.")
        sizes = [int(shape.get(a, 1)) for a in axis_names]
    else:
        sizes = [int(s) for s in shape]
        if len(sizes) != len(axis_names):
            raise ValueError(
                f"make_mesh: shape {tuple(sizes)} has {len(sizes)} entries but axis_names {axis_names} has "
                f"{len(axis_names)}; give one size per axis."
            )
    if sizes.count(-1) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1, got {tuple(sizes)}.")
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        if rest <= 0 or n % rest:
            raise ValueError(f"make_mesh: cannot fill -1 in {tuple(sizes)} with {n} devices.")
        sizes[sizes.index(-1)] = n // rest
    if math.prod(sizes) != n or any(s <= 0 for s in sizes):
        raise ValueError(
            f"make_mesh: shape {dict(zip(axis_names, sizes))} needs {math.prod(sizes)} devices but {n} are "
            "available; pick sizes whose product is the device count (one may be -1)."
        )
    # Auto axes: XLA propagates shardings from the jit in/out shardings (jax.make_mesh defaults to Explicit).
    types = (AxisType.Auto,) * len(axis_names)
    if devices is None:
        try:
            return jax.make_mesh(tuple(sizes), axis_names, axis_types=types, devices=devs)
        except Exception:  # noqa: BLE001 - fall back to a plain reshape on unusual topologies
            pass
    return Mesh(np.asarray(devs, dtype=object).reshape(sizes), axis_names, axis_types=types)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over (those of ``data``/``fsdp`` present in ``mesh``)."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch dimension is split: the global batch must be a multiple of this."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))
