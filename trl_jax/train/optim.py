"""Optimizers from ``TrainingArguments`` names (``optim``, ``learning_rate``, ``weight_decay``, ``adam_*``).

Gradient clipping (``max_grad_norm``) is *not* part of the optimizer: the train step clips (torch's
``clip_grad_norm_`` formula) so that it can log the pre-clip ``grad_norm`` like ``Trainer``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import jax
import optax

from trl_jax.train.schedules import Schedule, make_schedule

#: ``Trainer.get_decay_parameter_names`` (transformers 5.x): parameters whose lower-cased dotted path matches
#: any of these get no weight decay (biases and norm weights).
NO_DECAY_PATTERNS: tuple[str, ...] = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")

ADAMW_NAMES = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_torch_xla", "adamw_torch_npu_fused", "adamw")
OPTIMIZERS = (*ADAMW_NAMES, "adafactor", "lion", "lion_32bit", "sgd", "adagrad")


def param_path(path) -> str:
    """A key path -> the dotted name transformers would use (``layers.0.self_attn.q_proj.weight``)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def decay_mask(params, no_decay_patterns: Sequence[str] = NO_DECAY_PATTERNS):
    """Bool pytree like ``params``: True where weight decay applies.

    Mirrors ``Trainer.get_decay_parameter_names``: a parameter is excluded when its lower-cased dotted path
    matches a pattern. transformers also excludes every parameter of an ``nn.LayerNorm`` module whatever its
    name; in a pytree only names exist, so a norm module must have ``norm`` in its name (Flax's default names
    ``LayerNorm_0``/``RMSNorm_0`` do), or pass extra patterns.
    """
    pats = [re.compile(p) for p in no_decay_patterns]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(p.search(param_path(path).lower()) for p in pats), params
    )


def _parse_optim_args(optim_args) -> dict:
    if not optim_args:
        return {}
    if isinstance(optim_args, Mapping):
        return dict(optim_args)
    out = {}
    for item in str(optim_args).replace(" ", "").split(","):
        if item:
            k, v = item.split("=")
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v
    return out


def make_optimizer(
    learning_rate: float | Schedule = 5e-5,
    *,
    optim: str = "adamw_torch",
    weight_decay: float = 0.0,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    adam_epsilon: float = 1e-8,
    optim_args: str | Mapping | None = None,
    weight_decay_mask: Callable | object | None = None,
) -> optax.GradientTransformation:
    """An optax optimizer equal to what ``Trainer.create_optimizer`` builds for ``optim``.

    - ``adamw_torch`` / ``adamw_torch_fused`` / ``adamw_hf`` / ``adamw``: ``optax.adamw`` (torch's decoupled
      decay, ``p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)``).
    - ``adafactor``: ``optax.adafactor`` with ``multiply_by_parameter_scale=False`` and the given lr, like
      transformers (``scale_parameter=False, relative_step=False``).
    - ``lion`` / ``lion_32bit``: ``optax.lion`` with ``b1=adam_beta1, b2=adam_beta2``.
    - ``sgd``: torch ``SGD`` (coupled L2 weight decay; ``optim_args="momentum=0.9,nesterov=..."``).
    - ``adagrad``: ``optax.adagrad``.

    ``weight_decay_mask``: pytree / callable of booleans; default :func:`decay_mask` (transformers' rule).
    """
    mask = decay_mask if weight_decay_mask is None else weight_decay_mask
    extra = _parse_optim_args(optim_args)
    name = str(getattr(optim, "value", optim))
    lr = learning_rate
    if name in ADAMW_NAMES:
        return optax.adamw(lr, b1=adam_beta1, b2=adam_beta2, eps=adam_epsilon, weight_decay=weight_decay, mask=mask)
    if name == "adafactor":
        return optax.adafactor(
            lr,
            multiply_by_parameter_scale=False,
            clipping_threshold=1.0,
            weight_decay_rate=weight_decay or None,
            weight_decay_mask=mask,
        )
    if name in ("lion", "lion_32bit"):
        return optax.lion(lr, b1=adam_beta1, b2=adam_beta2, weight_decay=weight_decay, mask=mask)
    if name == "sgd":
        momentum = extra.get("momentum")
        nesterov = str(extra.get("nesterov", "false")).lower() in ("1", "true", "1.0")
        tx = optax.sgd(lr, momentum=float(momentum) if momentum else None, nesterov=nesterov)
        if weight_decay:
            tx = optax.chain(optax.add_decayed_weights(weight_decay, mask), tx)
        return tx
    if name == "adagrad":
        return optax.adagrad(lr, eps=adam_epsilon if adam_epsilon != 1e-8 else 1e-10)
    raise ValueError(f"optim={name!r} is not supported by trl_jax; choose one of {', '.join(OPTIMIZERS)}.")


def optimizer_from_args(args, num_training_steps: int | None = None):
    """``(optimizer, schedule)`` from a ``TrainingArguments``-like object (TRL configs; attribute access).

    Reads ``learning_rate``, ``lr_scheduler_type``, ``lr_scheduler_kwargs``, ``warmup_steps``, ``warmup_ratio``,
    ``weight_decay``, ``adam_beta1``, ``adam_beta2``, ``adam_epsilon``, ``optim``, ``optim_args``;
    ``num_training_steps`` defaults to ``args.max_steps`` when positive.
    """
    g = lambda k, d=None: getattr(args, k, d)  # noqa: E731
    if num_training_steps is None and (g("max_steps") or 0) > 0:
        num_training_steps = int(g("max_steps"))
    schedule = make_schedule(
        g("lr_scheduler_type", "linear"),
        g("learning_rate", 5e-5),
        num_training_steps,
        g("warmup_steps", 0) or 0,
        warmup_ratio=g("warmup_ratio"),
        lr_scheduler_kwargs=g("lr_scheduler_kwargs") or None,
    )
    tx = make_optimizer(
        schedule,
        optim=g("optim", "adamw_torch"),
        weight_decay=g("weight_decay", 0.0) or 0.0,
        adam_beta1=g("adam_beta1", 0.9),
        adam_beta2=g("adam_beta2", 0.999),
        adam_epsilon=g("adam_epsilon", 1e-8),
        optim_args=g("optim_args"),
    )
    return tx, schedule
