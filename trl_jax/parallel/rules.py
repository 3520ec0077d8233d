"""Logical axis names -> mesh axes.

Model code names each parameter dimension with a logical name (``embed``, ``vocab``, ``heads``, ``kv_heads``,
``head_dim``, ``mlp``, ``layers``, ...); a rules table maps each name to a mesh axis (or a tuple of axes, or
``None`` for replicated). The table is plain data: pass your own, or ``override_rules(DEFAULT_RULES, mlp=None)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

#: Default table (FSDP on the model dimension, tensor parallelism on heads / MLP / vocab, like MaxText).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
    ("length", None),
    ("activation_length", None),
    # activations inside the model: the model dimension is never split (fsdp moves weights, not activations),
    # heads / MLP / vocab follow tensor parallelism
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_head_dim", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("kv", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("experts", None),
    ("expert", "expert"),  # MoE expert weights: a mesh axis of their own (when the mesh has one)
    ("labels", None),
    ("value", None),
    ("lora_rank", None),  # LoRA A [in, r] / B [r, out] follow their kernel's input / output axes
)

Rules = Sequence[tuple[str, "str | tuple[str, ...] | None"]]


def override_rules(rules: Rules = DEFAULT_RULES, **overrides) -> tuple:
    """``rules`` with some logical names remapped: ``override_rules(mlp="fsdp", vocab=None)``."""
    out = [(k, overrides.pop(k)) if k in overrides else (k, v) for k, v in rules]
    out += list(overrides.items())
    return tuple(out)


def _as_axes(v) -> tuple[str, ...]:
    if v is None:
        return ()
    return (v,) if isinstance(v, str) else tuple(v)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: Rules = DEFAULT_RULES,
    *,
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """One parameter's logical axes (e.g. ``("embed", "mlp")``) -> ``PartitionSpec``.

    A mesh axis is used at most once per spec (first dimension wins). With ``mesh`` and ``shape``, mesh axes that
    are absent from the mesh, of size 1, or do not divide the dimension are dropped (that dimension is then
    replicated over them) so any mesh accepts any model.
    """
    table: dict = {}
    for k, v in rules.items() if isinstance(rules, Mapping) else rules:  # first match wins (flax.linen convention)
        table.setdefault(k, v)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(
                f"logical_to_spec: no rule for logical axis {name!r}; known names: {sorted(table)}. Add one with "
                f"override_rules(rules, {name}=<mesh axis or None>)."
            )
        axes = [a for a in _as_axes(table[name]) if a not in used]
        if mesh is not None:
            axes = [a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1]
            if shape is not None:
                kept = []
                for a in axes:
                    if shape[i] % (math.prod(mesh.shape[b] for b in kept) * mesh.shape[a]) == 0:
                        kept.append(a)
                axes = kept
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _is_axes_leaf(x) -> bool:
    return x is None or isinstance(x, PartitionSpec) or (
        isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
    )


def logical_to_shardings(logical_tree, mesh: Mesh, rules: Rules = DEFAULT_RULES, shapes=None):
    """A pytree of logical-axes tuples -> the same pytree of ``NamedSharding`` on ``mesh``.

    ``shapes``: optional matching pytree of arrays / ``ShapeDtypeStruct`` so non-dividing axes are dropped.
    Leaves may be tuples or ``PartitionSpec``s of logical names (``trl_jax.models``' ``CausalLM.logical_axes()``).
    A ``None`` leaf means replicated.
    """
    if shapes is None:
        return jax.tree.map(
            lambda ax: NamedSharding(mesh, logical_to_spec(tuple(ax or ()), rules, mesh=mesh)),
            logical_tree,
            is_leaf=_is_axes_leaf,
        )

    def one(ax, x):
        ax = tuple(ax or ())
        if ax and len(ax) != len(x.shape):
            raise ValueError(f"logical axes {ax} do not match a parameter of shape {tuple(x.shape)}.")
        return NamedSharding(mesh, logical_to_spec(ax, rules, mesh=mesh, shape=x.shape))

    return jax.tree.map(one, logical_tree, shapes, is_leaf=_is_axes_leaf)


def fsdp_shardings(params, mesh: Mesh, *, axis: str = "fsdp", min_size: int = 2**10):
    """Shardings without logical names: shard each array's largest dimension divisible by ``mesh.shape[axis]``.

    Arrays smaller than ``min_size`` elements or with no divisible dimension stay replicated. Handy for models
    that carry no logical annotations.
    """
    n = mesh.shape.get(axis, 1)

    def one(x):
        if n == 1 or math.prod(x.shape) < min_size:
            return NamedSharding(mesh, PartitionSpec())
        dims = sorted(range(len(x.shape)), key=lambda d: -x.shape[d])
        for d in dims:
            if x.shape[d] % n == 0:
                spec = [None] * len(x.shape)
                spec[d] = axis
                return NamedSharding(mesh, PartitionSpec(*spec))
        warnings.warn(f"fsdp_shardings: no dimension of shape {tuple(x.shape)} divides {n}; replicating it.")
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, params)


def as_mapping(rules: Rules | Mapping) -> dict:
    return dict(rules.items() if isinstance(rules, Mapping) else rules)


# ----------------------------------------------------------------------------------- activation constraints

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("trl_jax_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Rules = DEFAULT_RULES):
    """While tracing under this context, :func:`constrain` pins activations to ``mesh`` through ``rules``.

    The step builders and the sampler enter it around the traced function, so model and log-prob code can name
    the layout they want (``constrain(h, ("activation_batch", "activation_length", "activation_embed"))``)
    without knowing the mesh. ``mesh=None`` (or no context) makes :func:`constrain` a no-op.
    """
    token = _ACTIVE.set(None if mesh is None else (mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing :func:`activation_sharding` context, or ``None``."""
    active = _ACTIVE.get()
    return None if active is None else active[0]


def active_spec(logical_axes: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec | None:
    """The ``PartitionSpec`` that :func:`constrain` would pin an array of ``shape`` to, or ``None`` outside an
    :func:`activation_sharding` context (for ``shard_map`` in/out specs)."""
    active = _ACTIVE.get()
    if active is None:
        return None
    mesh, rules = active
    return logical_to_spec(tuple(logical_axes), rules, mesh=mesh, shape=tuple(shape))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical axis names under an active :func:`activation_sharding`; ``x``
    unchanged otherwise. Mesh axes that do not divide a dimension are dropped (that dimension is replicated)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    if len(logical_axes) != x.ndim:
        raise ValueError(f"constrain: {len(logical_axes)} logical axes {tuple(logical_axes)} for an array of rank "
                         f"{x.ndim} (shape {x.shape}).")
    spec = logical_to_spec(tuple(logical_axes), rules, mesh=mesh, shape=x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
