"""``TrainState``: everything a step reads and writes, as one pytree (checkpointed whole)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from trl_jax.parallel.rules import DEFAULT_RULES, logical_to_shardings
from trl_jax.parallel.sharding import as_named, replicated
from trl_jax.utils.trees import partition


@flax.struct.dataclass
class TrainState:
    """``step``: int32 scalar (optimizer updates applied); ``params``: trained pytree; ``opt_state``: optax
    state; ``rng``: raw ``uint32[2]`` PRNG key, split once per step; ``ref_params``: optional frozen pytree (the
    reference model of DPO/KTO/GRPO), passed to the loss as ``ref_params=`` and never updated."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    ref_params: Any = None

    @classmethod
    def create(
        cls,
        params,
        optimizer: optax.GradientTransformation,
        rng=None,
        ref_params=None,
        *,
        mesh: Mesh | None = None,
        param_shardings=None,
        logical_axes=None,
        rules=DEFAULT_RULES,
        donate: bool = False,
        trainable=None,
    ) -> "TrainState":
        """A fresh state (step 0, ``optimizer.init(params)``).

        With ``mesh``: the state is born sharded. Parameter shardings come from ``param_shardings`` (pytree of
        ``NamedSharding``/``PartitionSpec``) or ``logical_axes`` (pytree of logical-axis tuples, mapped through
        ``rules``), else replicated; optimizer moments follow their parameter, everything else is replicated.

        ``donate=True`` hands ``params`` and ``ref_params`` over to the state (their buffers are reused where the
        layout allows, so start-up holds params + optimizer state + reference and no identity copy); the caller
        must not use the arrays it passed in afterwards.

        ``trainable``: ``pred(key_path_names) -> bool`` selecting the leaves the optimizer updates (LoRA adapters);
        the optimizer state then covers those leaves only, the rest of ``params`` stays frozen.
        """
        rng = jax.random.PRNGKey(0) if rng is None else rng
        if jnp.issubdtype(jnp.result_type(rng), jax.dtypes.prng_key):
            rng = jax.random.key_data(rng)

        def build(p, r, rp):
            opt_params = p if trainable is None else partition(p, trainable)[0]
            return cls(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(opt_params), rng=r,
                       ref_params=rp)

        donated = (0, 2) if donate else ()
        if mesh is None:
            return jax.jit(build, donate_argnums=donated)(params, rng, ref_params)
        if param_shardings is None:
            if logical_axes is not None:
                param_shardings = logical_to_shardings(logical_axes, mesh, rules, shapes=params)
            else:
                param_shardings = jax.tree.map(lambda _: replicated(mesh), params)
        param_shardings = as_named(param_shardings, mesh)
        abstract = jax.eval_shape(build, params, rng, ref_params)
        shardings = train_state_shardings(abstract, mesh, param_shardings)
        return jax.jit(build, out_shardings=shardings, donate_argnums=donated)(params, rng, ref_params)


def _path_key(path) -> tuple:
    return tuple(str(k) for k in path)


def train_state_shardings(state, mesh: Mesh, param_shardings) -> TrainState:
    """A ``TrainState`` of ``NamedSharding`` for ``state`` (arrays or ``ShapeDtypeStruct``s).

    ``params`` and ``ref_params`` take ``param_shardings``; every optimizer-state leaf whose key path ends with a
    parameter's key path and has that parameter's shape (Adam's ``mu``/``nu``, momentum, ...) takes that
    parameter's sharding; the rest (counts, factored Adafactor rows, step, rng) is replicated.
    """
    param_shardings = as_named(param_shardings, mesh)
    rep = replicated(mesh)
    by_path = {}
    for (path, x), s in zip(
        jax.tree_util.tree_leaves_with_path(state.params), jax.tree_util.tree_leaves(param_shardings)
    ):
        by_path[_path_key(path)] = (tuple(x.shape), s)

    def opt_leaf(path, x):
        key = _path_key(path)
        for i in range(len(key)):
            hit = by_path.get(key[i:])
            if hit is not None and hit[0] == tuple(x.shape):
                return hit[1]
        return rep

    return TrainState(
        step=rep,
        params=param_shardings,
        opt_state=jax.tree_util.tree_map_with_path(opt_leaf, state.opt_state),
        rng=rep,
        ref_params=None if state.ref_params is None else param_shardings,
    )


def shardings_of(tree, mesh: Mesh | None = None):
    """The current ``NamedSharding`` of each leaf (replicated on ``mesh`` for leaves that have none)."""

    def one(x):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and (mesh is None or s.mesh == mesh):
            return s
        return replicated(mesh) if mesh is not None else s

    return jax.tree.map(one, tree)


def abstract_like(tree, shardings=None):
    """``ShapeDtypeStruct`` pytree of ``tree`` (with ``shardings`` if given, else each leaf's own) -- a restore
    target for :class:`trl_jax.train.Checkpointer`."""
    if shardings is None:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
        )
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
