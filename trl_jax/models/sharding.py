"""Parameter shardings for loading: the project's one table, :data:`trl_jax.parallel.rules.DEFAULT_RULES`.

Logical names used by the decoder: ``vocab, embed, heads, kv_heads, head_dim, mlp, layers, labels, value``. Loading
(``from_pretrained``), the train state, the sampler's decode layout and checkpoints all map them through
:func:`trl_jax.parallel.rules.logical_to_spec`, so a model loaded onto a mesh already has the layout the train
step wants (no reshard at the first step). A dimension stays replicated where its mesh axis is absent from the
mesh, already used by another dimension of the same tensor, or does not divide its size.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from trl_jax.parallel.rules import DEFAULT_RULES, logical_to_spec


def spec_for(logical: PartitionSpec | tuple, shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES) -> PartitionSpec:
    """Mesh ``PartitionSpec`` for one array with logical axis names ``logical`` and ``shape``; names that
    ``rules`` does not mention are replicated."""
    logical = tuple(logical)
    known = {name for name, _ in rules}
    full = tuple(rules) + tuple((n, None) for n in logical if n is not None and n not in known)
    spec = tuple(logical_to_spec(logical, full, mesh=mesh, shape=tuple(shape)))
    return PartitionSpec(*spec, *([None] * (len(shape) - len(spec))))  # one entry per dimension


def param_shardings(logical_axes, abstract_params, mesh: Mesh, rules=None):
    """Tree of ``NamedSharding`` for the params (``logical_axes`` from ``CausalLM.logical_axes()``)."""
    rules = DEFAULT_RULES if rules is None else rules
    return jax.tree_util.tree_map(
        lambda spec, a: NamedSharding(mesh, spec_for(spec, a.shape, mesh, rules)),
        logical_axes,
        abstract_params,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
