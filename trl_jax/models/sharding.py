"""Logical axis names -> ``NamedSharding`` on a mesh, through a rules table.

Logical names used by the decoder: ``vocab, embed, heads, kv_heads, head_dim, mlp, layers, labels, value``.
A rules table is a sequence of ``(logical_name, mesh_axis | tuple of mesh axes | None)``, first match wins (the
``flax.linen`` convention). ``trl_jax.parallel`` owns the project-wide rules; :data:`DEFAULT_RULES` is a sensible
FSDP + tensor-parallel default. A dimension stays replicated where its mesh axis is absent from the mesh, already
used by another dimension of the same tensor, or does not divide its size.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("labels", None),
    ("value", None),
)


def _axes_size(mesh: Mesh, axes) -> int:
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return n


def spec_for(logical: PartitionSpec | tuple, shape: Sequence[int], mesh: Mesh, rules) -> PartitionSpec:
    """Mesh ``PartitionSpec`` for one array with logical axis names ``logical`` and ``shape``."""
    table = {}
    for name, target in rules:
        table.setdefault(name, target)
    used: set[str] = set()
    out = []
    for name, dim in zip(tuple(logical), shape):
        target = table.get(name) if name is not None else None
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        axes = tuple(a for a in axes if a in mesh.shape and a not in used)
        if axes and dim % _axes_size(mesh, axes) == 0:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        else:
            out.append(None)
    return PartitionSpec(*out)


def param_shardings(logical_axes, abstract_params, mesh: Mesh, rules=None):
    """Tree of ``NamedSharding`` for the params (``logical_axes`` from ``CausalLM.logical_axes()``)."""
    rules = DEFAULT_RULES if rules is None else rules
    return jax.tree_util.tree_map(
        lambda spec, a: NamedSharding(mesh, spec_for(spec, a.shape, mesh, rules)),
        logical_axes,
        abstract_params,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
