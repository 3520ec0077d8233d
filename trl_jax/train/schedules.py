"""Learning-rate schedules with ``transformers.get_scheduler`` semantics, as optax schedules.

Each schedule maps the number of optimizer updates already applied (``count``, an int array, 0 for the first
update) to the learning rate of the next update -- exactly the value a PyTorch ``LambdaLR`` holds while
``optimizer.step()`` runs, and the value ``Trainer`` logs as ``learning_rate``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax.numpy as jnp

Schedule = Callable[[jnp.ndarray], jnp.ndarray]

SCHEDULER_TYPES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
)


def get_warmup_steps(num_training_steps: int | None, warmup_steps: float = 0, warmup_ratio: float | None = None) -> int:
    """``TrainingArguments.get_warmup_steps``: ``warmup_steps >= 1`` is a step count, ``0 <= warmup_steps < 1`` a
    ratio of ``num_training_steps`` (rounded up). ``warmup_ratio`` (older TRL/transformers field) is honoured
    when ``warmup_steps`` is 0."""
    if warmup_ratio and not warmup_steps:
        warmup_steps = float(warmup_ratio)
    if warmup_steps >= 1:
        return int(warmup_steps)
    if warmup_steps == 0:
        return 0
    if num_training_steps is None:
        raise ValueError("a fractional warmup_steps (a ratio) needs num_training_steps.")
    return math.ceil(num_training_steps * warmup_steps)


def _f(x):
    return jnp.asarray(x, jnp.float32)


def _warmup(s, w):
    return s / max(1.0, float(w))


def _multiplier(name: str, w: int, n: int | None, lr: float, kw: dict) -> Callable:
    def need_n():
        if n is None:
            raise ValueError(f"lr_scheduler_type={name!r} requires num_training_steps (max_steps).")
        return float(n)

    if name == "constant":
        return lambda s: jnp.ones_like(s)
    if name == "constant_with_warmup":
        return lambda s: jnp.where(s < w, _warmup(s, w), 1.0)
    if name == "linear":
        N = need_n()
        return lambda s: jnp.where(s < w, _warmup(s, w), jnp.maximum(0.0, (N - s) / max(1.0, N - w)))
    if name in ("cosine", "cosine_with_min_lr"):
        N = need_n()
        cycles = float(kw.pop("num_cycles", 0.5))
        rate = 0.0
        if name == "cosine_with_min_lr":
            rate = _min_lr_rate(kw, lr)

        def cos(s):
            p = (s - w) / max(1.0, N - w)
            factor = 0.5 * (1.0 + jnp.cos(math.pi * cycles * 2.0 * p))
            factor = factor * (1 - rate) + rate
            return jnp.where(s < w, _warmup(s, w), jnp.maximum(0.0, factor))

        return cos
    if name == "cosine_warmup_with_min_lr":
        N = need_n()
        cycles = float(kw.pop("num_cycles", 0.5))
        rate = _min_lr_rate(kw, lr)
        wr = kw.pop("warmup_lr_rate", None)

        def cos_rate(s):
            if wr is None:
                warm = (s + 1.0) / max(1.0, float(w))
            else:
                warm = wr + (1.0 - wr) * s / max(1.0, float(w) - 1)
            p = (s - w + 1.0) / max(1.0, N - w)
            factor = 0.5 * (1.0 + jnp.cos(math.pi * cycles * 2.0 * p)) * (1 - rate) + rate
            return jnp.where(s < w, warm, jnp.maximum(0.0, factor))

        return cos_rate
    if name == "cosine_with_restarts":
        N = need_n()
        cycles = float(kw.pop("num_cycles", 1))

        def restarts(s):
            p = (s - w) / max(1.0, N - w)
            val = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * jnp.mod(cycles * p, 1.0))))
            return jnp.where(s < w, _warmup(s, w), jnp.where(p >= 1.0, 0.0, val))

        return restarts
    if name == "polynomial":
        N = need_n()
        lr_end = float(kw.pop("lr_end", 1e-7))
        power = float(kw.pop("power", 1.0))
        if not lr > lr_end:
            raise ValueError(f"lr_end ({lr_end}) must be smaller than initial lr ({lr})")
        decay_steps = max(N - w, 1e-12)

        def poly(s):
            pct = 1.0 - (s - w) / decay_steps
            decay = (lr - lr_end) * jnp.maximum(pct, 0.0) ** power + lr_end
            return jnp.where(s < w, _warmup(s, w), jnp.where(s > N, lr_end / lr, decay / lr))

        return poly
    if name == "inverse_sqrt":
        timescale = kw.pop("timescale", None)
        if timescale is None:
            timescale = w or 10_000
        timescale = float(timescale)
        shift = timescale - w
        return lambda s: jnp.where(s < w, _warmup(s, w), 1.0 / jnp.sqrt(jnp.maximum(s + shift, 0.0) / timescale))
    if name == "warmup_stable_decay":
        if "num_decay_steps" not in kw:
            raise ValueError("warmup_stable_decay needs lr_scheduler_kwargs={'num_decay_steps': ...}.")
        d = int(kw.pop("num_decay_steps"))
        stable = kw.pop("num_stable_steps", None)
        if stable is None:
            stable = need_n() - w - d
        stable = float(stable)
        wtype = kw.pop("warmup_type", "linear")
        dtype = kw.pop("decay_type", "cosine")
        min_ratio = float(kw.pop("min_lr_ratio", 0.0))
        cycles = float(kw.pop("num_cycles", 0.5))
        for t, what in ((wtype, "warmup"), (dtype, "decay")):
            if t not in ("linear", "cosine", "1-sqrt"):
                raise ValueError(f"Unknown {what} type: {t}, expected 'linear', 'cosine' or '1-sqrt'")

        def wsd(s):
            p = s / max(1.0, float(w))
            warm = {
                "linear": p,
                "cosine": 0.5 * (1.0 - jnp.cos(math.pi * p)),
                "1-sqrt": 1.0 - jnp.sqrt(jnp.clip(1.0 - p, 0.0)),
            }[wtype]
            warm = jnp.maximum(0.0, warm * (1.0 - min_ratio) + min_ratio)
            q = (s - w - stable) / max(1.0, float(d))
            dec = {
                "linear": 1.0 - q,
                "cosine": 0.5 * (1.0 + jnp.cos(math.pi * cycles * 2.0 * q)),
                "1-sqrt": 1.0 - jnp.sqrt(jnp.clip(q, 0.0)),
            }[dtype]
            dec = jnp.maximum(0.0, dec * (1.0 - min_ratio) + min_ratio)
            out = jnp.where(s < w + stable + d, dec, min_ratio)
            out = jnp.where(s < w + stable, 1.0, out)
            return jnp.where(s < w, warm, out)

        return wsd
    if name in ("reduce_lr_on_plateau", "greedy"):
        raise ValueError(
            f"lr_scheduler_type={name!r} depends on evaluation metrics and is not supported by trl_jax; use a "
            f"step-based schedule ({', '.join(SCHEDULER_TYPES)})."
        )
    raise ValueError(f"Unknown lr_scheduler_type {name!r}; supported: {', '.join(SCHEDULER_TYPES)}.")


def _min_lr_rate(kw: dict, lr: float) -> float:
    min_lr, rate = kw.pop("min_lr", None), kw.pop("min_lr_rate", None)
    if min_lr is not None and rate is not None:
        raise ValueError("Only one of min_lr or min_lr_rate should be set")
    if min_lr is not None:
        return float(min_lr) / lr
    if rate is None:
        raise ValueError("One of min_lr or min_lr_rate should be set through the `lr_scheduler_kwargs`")
    return float(rate)


def make_schedule(
    lr_scheduler_type: str = "linear",
    learning_rate: float = 5e-5,
    num_training_steps: int | None = None,
    warmup_steps: float = 0,
    *,
    warmup_ratio: float | None = None,
    lr_scheduler_kwargs: Mapping | None = None,
) -> Schedule:
    """An optax schedule ``count -> learning rate`` equal to ``learning_rate * lambda(count)`` of
    ``transformers.get_scheduler(lr_scheduler_type, ..., scheduler_specific_kwargs=lr_scheduler_kwargs)``.

    ``warmup_steps``: steps (>= 1) or a ratio (< 1) of ``num_training_steps``, as in ``TrainingArguments``.
    Computed in fp32 (transformers uses Python floats: values agree to ~1e-7 relative).
    """
    name = str(getattr(lr_scheduler_type, "value", lr_scheduler_type))
    w = get_warmup_steps(num_training_steps, warmup_steps, warmup_ratio)
    kw = dict(lr_scheduler_kwargs or {})
    mult = _multiplier(name, w, num_training_steps, float(learning_rate), kw)
    if kw:
        raise ValueError(f"lr_scheduler_kwargs {sorted(kw)} are not accepted by lr_scheduler_type={name!r}.")
    lr = float(learning_rate)

    def schedule(count):
        return _f(lr) * mult(_f(count))

    return schedule
