"""Train/eval step builders: ``jax.jit`` over a ``Mesh`` (in/out shardings, donated state) and a ``jax.pmap``
variant, both with exact gradient accumulation over numerator/denominator losses.

The loss contract: ``loss_fn(params, micro_batch, rng) -> LossTerms(numerator, denominator, metrics)`` (plus
``ref_params=`` when the state carries reference params). The step differentiates the *numerator* only, sums
numerators, denominators and gradients over the ``k`` micro-batches (and, under pmap, over devices), then
divides once: ``grad = sum(d numerator) / sum(denominator)``. That is the gradient of one batch ``k`` times
larger, whatever the number of counted tokens in each micro-batch. ``denominator`` is treated as a constant
(``stop_gradient``); it must not depend on the params.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from trl_jax.losses.base import LossTerms
from trl_jax.parallel.mesh import batch_axes, batch_parallel_size
from trl_jax.parallel.rules import DEFAULT_RULES, activation_sharding, logical_to_shardings
from trl_jax.parallel.sharding import as_named, batch_shardings, replicated
from trl_jax.train.precision import cast_floating
from trl_jax.train.state import TrainState, shardings_of, train_state_shardings
from trl_jax.utils.trees import combine, partition

Metrics = dict


def global_norm(tree) -> jax.Array:
    """fp32 L2 norm over every leaf of ``tree`` (torch's ``total_norm`` with ``norm_type=2``)."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)) if leaves else jnp.zeros(())


def clip_by_global_norm_torch(grads, max_norm: float):
    """torch ``clip_grad_norm_``: ``coef = min(max_norm / (norm + 1e-6), 1)``. Returns ``(clipped, norm)``."""
    norm = global_norm(grads)
    coef = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
    return jax.tree.map(lambda g: (g * coef).astype(g.dtype), grads), norm


def _safe(den):
    return jnp.where(den == 0, 1.0, den)


class _Core:
    """The math shared by the jit and pmap steps."""

    def __init__(self, loss_fn, optimizer, k, max_grad_norm, learning_rate_fn, compute_dtype, micro_constraint=None,
                 trainable=None, training_context=None):
        if int(k) < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {k}.")
        self.loss_fn, self.optimizer, self.k = loss_fn, optimizer, int(k)
        self.max_grad_norm, self.lr_fn, self.compute_dtype = max_grad_norm, learning_rate_fn, compute_dtype
        self.micro_constraint = micro_constraint
        self.trainable = trainable  # pred(key path names) -> bool; None: every leaf trains
        self.training_context = training_context  # rng -> context manager entered around training forwards

    def split_trainable(self, params):
        """``(trained, frozen)`` parts of ``params`` (``frozen`` empty without a ``trainable`` predicate)."""
        if self.trainable is None:
            return params, {}
        return partition(params, self.trainable)

    def join(self, trained, frozen):
        return trained if self.trainable is None else combine(trained, frozen)

    def call_loss(self, params, batch, rng, ref_params):
        if self.compute_dtype is not None:
            params = cast_floating(params, self.compute_dtype)
            if ref_params is not None:
                ref_params = cast_floating(ref_params, self.compute_dtype)
        if ref_params is None:
            terms = self.loss_fn(params, batch, rng)
        else:
            terms = self.loss_fn(params, batch, rng, ref_params=jax.lax.stop_gradient(ref_params))
        if not isinstance(terms, LossTerms):
            if isinstance(terms, tuple) and len(terms) == 3:
                terms = LossTerms(*terms)
            else:
                raise TypeError(
                    "loss_fn must return trl_jax.losses.base.LossTerms(numerator, denominator, metrics); got "
                    f"{type(terms).__name__}."
                )
        return terms

    def split(self, batch):
        k = self.k

        def one(x):
            if x.ndim == 0 or x.shape[0] % k:
                raise ValueError(
                    f"batch leaf of shape {x.shape}: its leading axis must be a multiple of "
                    f"gradient_accumulation_steps={k}."
                )
            y = x.reshape(k, x.shape[0] // k, *x.shape[1:])
            return y if self.micro_constraint is None else self.micro_constraint(y)

        return jax.tree.map(one, batch)

    def accumulate(self, params, batch, rng, ref_params):
        """``(sum numerator, sum denominator, sum d numerator / d trained params [fp32], mean metrics)``; the
        gradient covers the trained part of ``params`` only (all of it without a ``trainable`` predicate)."""
        trained, frozen = self.split_trainable(params)

        def micro(mb, r):
            def f(p):
                ctx = self.training_context(r) if self.training_context is not None else contextlib.nullcontext()
                with ctx:
                    t = self.call_loss(self.join(p, frozen), mb, r, ref_params)
                return jnp.asarray(t.numerator, jnp.float32), (
                    jax.lax.stop_gradient(jnp.asarray(t.denominator, jnp.float32)),
                    t.metrics,
                )

            (num, (den, metrics)), g = jax.value_and_grad(f, has_aux=True)(trained)
            return num, den, cast_floating(g, jnp.float32), metrics

        if self.k == 1:
            return micro(batch, rng)

        def body(carry, xs):
            mb, j = xs
            num, den, g, metrics = micro(mb, jax.random.fold_in(rng, j))
            cn, cd, cg = carry
            return (cn + num, cd + den, jax.tree.map(jnp.add, cg, g)), metrics

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trained)
        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
        (num, den, g), metrics = jax.lax.scan(body, init, (self.split(batch), jnp.arange(self.k)))
        # nan-mean: a metric a micro-batch could not measure (e.g. KTO's rewards/rejected without undesirable
        # rows) is NaN there, and TRL averages only the values it logged.
        return num, den, g, jax.tree.map(lambda m: jnp.nanmean(m, axis=0), metrics)

    def apply(self, state: TrainState, new_rng, num, den, g_sum, metrics):
        grads = jax.tree.map(lambda g: g / _safe(den), g_sum)
        if self.max_grad_norm is not None and self.max_grad_norm > 0:
            grads, grad_norm = clip_by_global_norm_torch(grads, float(self.max_grad_norm))
        else:
            grad_norm = global_norm(grads)
        trained, frozen = self.split_trainable(state.params)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trained)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, trained)
        params = optax.apply_updates(trained, updates)
        # A non-finite loss or gradient never reaches the weights: the update is skipped (params and optimizer
        # state kept), the step counter still advances and the NaN/Inf is reported in the metrics, so the caller
        # can stop with the last good state intact.
        finite = jnp.isfinite(num) & jnp.isfinite(grad_norm)
        params = self.join(jax.tree.map(lambda new, old: jnp.where(finite, new, old), params, trained), frozen)
        opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), opt_state, state.opt_state)
        out = {"loss": num / _safe(den), "grad_norm": grad_norm}
        if self.lr_fn is not None:
            out["learning_rate"] = jnp.asarray(self.lr_fn(state.step), jnp.float32)
        out.update({k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()})
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=new_rng)
        return new, out


class TrainStep:
    """A compiled ``step(state, batch) -> (state, metrics)``; build with :func:`make_train_step`.

    Compiled once per (state, batch) structure and shape. ``compile_count()`` reports how many executables
    exist (tests assert it stays 1 across steps of one shape).
    """

    def __init__(self, core: _Core, mesh, state_shardings, param_shardings, batch_sharding, donate, logical=None):
        self.core, self.mesh, self.donate, self._logical = core, mesh, donate, logical
        self._state_shardings, self._param_shardings, self._batch_sharding = (
            state_shardings,
            param_shardings,
            batch_sharding,
        )
        self._jitted: dict = {}

    def _fn(self, state, batch):
        # traced under the mesh's activation layout: model and log-prob code pin their activations by logical
        # names (trl_jax.parallel.constrain), so every device computes only its batch rows / tensor shard
        rules = self._logical[1] if self._logical is not None else DEFAULT_RULES
        with activation_sharding(self.mesh, rules):
            new_rng, step_rng = jax.random.split(state.rng)
            num, den, g, metrics = self.core.accumulate(state.params, batch, step_rng, state.ref_params)
            return self.core.apply(state, new_rng, num, den, g, metrics)

    def _build(self, state, batch):
        donate = (0,) if self.donate else ()
        if self.mesh is None:
            return jax.jit(self._fn, donate_argnums=donate)
        mesh = self.mesh
        if self._state_shardings is not None:
            s_sh = as_named(self._state_shardings, mesh)
        elif self._param_shardings is not None:
            s_sh = train_state_shardings(state, mesh, self._param_shardings)
        elif self._logical is not None:
            axes, rules = self._logical
            s_sh = train_state_shardings(state, mesh, logical_to_shardings(axes, mesh, rules, shapes=state.params))
        else:
            s_sh = shardings_of(state, mesh)
        if self._batch_sharding is None:
            b_sh = batch_shardings(batch, mesh)
        elif isinstance(self._batch_sharding, PartitionSpec):
            b_sh = jax.tree.map(lambda _: NamedSharding(mesh, self._batch_sharding), batch)
        else:
            b_sh = as_named(self._batch_sharding, mesh)
        n = batch_parallel_size(mesh) * self.core.k
        for x in jax.tree.leaves(batch):
            if x.ndim and x.shape[0] % n:
                raise ValueError(
                    f"batch leaf of shape {x.shape}: the batch axis must be a multiple of data*fsdp*"
                    f"gradient_accumulation_steps = {n} on this mesh; pad the batch or change the mesh."
                )
        fn = jax.jit(
            self._fn, in_shardings=(s_sh, b_sh), out_shardings=(s_sh, replicated(mesh)), donate_argnums=donate
        )
        fn._trl_jax_state_shardings = s_sh
        return fn

    def _get(self, state, batch):
        key = (jax.tree.structure(state), jax.tree.structure(batch))
        fn = self._jitted.get(key)
        if fn is None:
            fn = self._jitted[key] = self._build(state, batch)
        return fn

    def __call__(self, state: TrainState, batch) -> tuple[TrainState, Metrics]:
        fn = self._get(state, batch)
        target = getattr(fn, "_trl_jax_state_shardings", None)
        if target is not None and jax.tree.leaves(state) and not self._placed(state, target):
            # first call with a state laid out differently (e.g. unsharded): move it once, so the executable
            # compiled for the target layout is the only one
            state = jax.device_put(state, target)
        return fn(state, batch)

    @staticmethod
    def _placed(state, target) -> bool:
        return all(
            getattr(x, "sharding", None) is not None and x.sharding.is_equivalent_to(s, x.ndim)
            for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(target))
        )

    def lower(self, state, batch):
        return self._get(state, batch).lower(state, batch)

    def compile_count(self) -> int:
        return sum(f._cache_size() for f in self._jitted.values())

    _cache_size = compile_count


def make_train_step(
    loss_fn: Callable[..., LossTerms],
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
    state_shardings=None,
    param_shardings=None,
    logical_axes=None,
    rules=DEFAULT_RULES,
    batch_sharding=None,
    gradient_accumulation_steps: int = 1,
    max_grad_norm: float | None = None,
    learning_rate_fn: Callable | None = None,
    compute_dtype=None,
    donate: bool = True,
    trainable=None,
    training_context=None,
) -> TrainStep:
    """Build a jitted ``step(state, batch) -> (new_state, metrics)``.

    - ``loss_fn(params, micro_batch, rng[, ref_params=])`` -> ``LossTerms``; ``micro_batch`` is ``batch`` with
      its leading axis split into ``gradient_accumulation_steps`` consecutive chunks (``lax.scan``).
    - ``mesh``: shard with ``jax.jit`` in/out shardings. State shardings: ``state_shardings`` (a ``TrainState``
      of shardings), or derived from ``param_shardings``, or (default) whatever shardings the incoming state
      already has (e.g. from ``TrainState.create(..., mesh=...)``), or from ``logical_axes`` (a pytree of logical
      axis names like the params, e.g. ``model.logical_axes()``) mapped through ``rules``. Batch: ``batch_sharding`` (a
      ``PartitionSpec`` for every leaf, or a pytree), default leading axis over ``("data", "fsdp")``.
    - ``max_grad_norm``: clip like torch's ``clip_grad_norm_`` when > 0; ``grad_norm`` is logged pre-clip.
    - ``learning_rate_fn``: the optimizer's schedule, to log ``learning_rate`` (the lr of this update).
    - ``compute_dtype``: e.g. ``jnp.bfloat16`` -- loss computed on a cast copy of the params (see precision).
    - ``donate``: donate the input state's buffers (the caller must not reuse the state it passed in).
    - ``trainable``: ``pred(key path names) -> bool``: only those leaves are differentiated and updated (the
      state's optimizer state must cover exactly them: ``TrainState.create(..., trainable=pred)``); the others
      are frozen (LoRA: the base weights). ``grad_norm`` and clipping cover the trained leaves, like torch's.
    - ``training_context``: ``rng -> context manager`` entered around each micro-batch's forward/backward (LoRA
      dropout: :func:`trl_jax.models.lora.dropout_rng`).

    Metrics: ``loss`` (= sum numerators / sum denominators), ``grad_norm``, ``learning_rate`` and the loss's own
    metrics averaged over micro-batches; all fp32 scalars, replicated.
    """
    constraint = None
    if mesh is not None and gradient_accumulation_steps > 1:
        axes = batch_axes(mesh)
        lead = None if not axes else axes[0] if len(axes) == 1 else axes

        def constraint(y):
            spec = PartitionSpec(None, lead, *([None] * (y.ndim - 2)))
            return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))

    core = _Core(
        loss_fn, optimizer, gradient_accumulation_steps, max_grad_norm, learning_rate_fn, compute_dtype, constraint,
        trainable=trainable, training_context=training_context,
    )
    logical = None if logical_axes is None else (logical_axes, rules)
    return TrainStep(core, mesh, state_shardings, param_shardings, batch_sharding, donate, logical)


def make_eval_step(loss_fn: Callable[..., LossTerms], *, mesh: Mesh | None = None, compute_dtype=None):
    """A jitted ``eval_step(state, batch) -> metrics`` (``loss`` = numerator / denominator, the loss metrics, and
    ``numerator`` / ``denominator`` so callers can pool batches exactly). Uses ``state.rng`` without advancing it."""
    core = _Core(loss_fn, None, 1, None, None, compute_dtype)

    def fn(state, batch):
        t = core.call_loss(state.params, batch, state.rng, state.ref_params)
        num = jnp.asarray(t.numerator, jnp.float32)
        den = jnp.asarray(t.denominator, jnp.float32)
        out = {"loss": num / _safe(den), "numerator": num, "denominator": den}
        out.update({k: jnp.asarray(v, jnp.float32) for k, v in t.metrics.items()})
        return out

    if mesh is None:
        return jax.jit(fn)
    return jax.jit(fn, out_shardings=replicated(mesh))


# --------------------------------------------------------------------------------------------------- pmap


class PmapTrainStep:
    """``step(state, batch)`` on replicated state; build with :func:`make_pmap_train_step`.

    ``state``: a state from :func:`replicate` (leading device axis); ``batch``: global ``[B, ...]`` host arrays
    (split across devices here) or already ``[n_devices, B / n_devices, ...]`` when ``batch_is_split=True``.
    Metrics come back as plain (un-replicated) scalars.
    """

    def __init__(self, core: _Core, axis_name: str, devices, donate: bool):
        self.core, self.axis_name = core, axis_name
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self.n = len(self.devices)
        self._traces = 0
        self._p = jax.pmap(self._fn, axis_name=axis_name, devices=self.devices, donate_argnums=(0,) if donate else ())

    def _fn(self, state, batch):
        self._traces += 1
        ax = self.axis_name
        new_rng, step_rng = jax.random.split(state.rng)
        step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(ax))
        num, den, g, metrics = self.core.accumulate(state.params, batch, step_rng, state.ref_params)
        num, den, g = jax.lax.psum((num, den, g), ax)
        metrics = jax.lax.pmean(metrics, ax)
        return self.core.apply(state, new_rng, num, den, g, metrics)

    def replicate(self, tree):
        """``tree`` copied onto this step's devices with the layout the step returns."""
        return replicate(tree, self.devices, self.axis_name)

    def split(self, batch):
        def one(x):
            if x.shape[0] % (self.n * self.core.k):
                raise ValueError(
                    f"pmap step: batch axis {x.shape[0]} must be a multiple of n_devices*gradient_accumulation_steps"
                    f" = {self.n * self.core.k}."
                )
            return x.reshape(self.n, x.shape[0] // self.n, *x.shape[1:])

        return jax.tree.map(one, batch)

    def __call__(self, state, batch, *, batch_is_split: bool = False):
        if not batch_is_split:
            batch = self.split(batch)
        new, metrics = self._p(state, batch)
        return new, jax.tree.map(lambda m: m[0], metrics)

    def compile_count(self) -> int:
        """How many times the step was traced (= compiled; pmap exposes no cache size)."""
        return self._traces


def make_pmap_train_step(
    loss_fn: Callable[..., LossTerms],
    optimizer: optax.GradientTransformation,
    *,
    axis_name: str = "batch",
    devices=None,
    gradient_accumulation_steps: int = 1,
    max_grad_norm: float | None = None,
    learning_rate_fn: Callable | None = None,
    compute_dtype=None,
    donate: bool = True,
    trainable=None,
    training_context=None,
) -> PmapTrainStep:
    """Plain data parallelism with ``jax.pmap``: every device holds the full state, computes numerator,
    denominator and numerator-gradients on its rows (accumulating ``k`` micro-batches), then ``lax.psum``s them,
    so the update equals the single-device one. Metrics other than ``loss``/``grad_norm``/``learning_rate`` are
    ``pmean`` of per-device values. Random draws differ from :func:`make_train_step` (per-device fold-in)."""
    core = _Core(loss_fn, optimizer, gradient_accumulation_steps, max_grad_norm, learning_rate_fn, compute_dtype,
                 trainable=trainable, training_context=training_context)
    return PmapTrainStep(core, axis_name, devices, donate)


def replicate(tree, devices=None, axis_name: str = "batch"):
    """Copy a pytree (e.g. a ``TrainState``) onto every device for :class:`PmapTrainStep` (leading device axis).

    ``axis_name`` must be the step's ``axis_name`` so the input layout equals pmap's output layout (otherwise
    the second step re-traces); :meth:`PmapTrainStep.replicate` passes it for you."""
    devices = list(devices) if devices is not None else jax.local_devices()
    mesh = Mesh(np.asarray(devices, dtype=object), (axis_name,))
    sharding = NamedSharding(mesh, PartitionSpec(axis_name))
    n = len(devices)
    return jax.tree.map(lambda x: jax.device_put(jnp.broadcast_to(x, (n, *jnp.shape(x))), sharding), tree)


def unreplicate(tree):
    """The first device's copy of a replicated pytree."""
    return jax.tree.map(lambda x: x[0], tree)


__all__ = [
    "PmapTrainStep",
    "TrainStep",
    "clip_by_global_norm_torch",
    "make_eval_step",
    "make_pmap_train_step",
    "make_train_step",
    "replicate",
    "unreplicate",
]

