"""``num_generations``: repeat each prompt G times, consecutively (TRL's ``RepeatSampler(mini_repeat_count=G)``)."""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np


def repeat_for_generations(batch, num_generations: int):
    """Repeat every row of ``batch`` ``num_generations`` times in a row: ``[p0, p1] -> [p0, p0, p1, p1]`` (G=2).

    ``batch``: an array (``[B, ...]`` -> ``[B * G, ...]``, numpy stays numpy, jax stays jax), a list/tuple (each
    item repeated), or a mapping of those (e.g. ``{"prompt_ids": ..., "prompt_mask": ..., "answer": [...]}``).
    This is the order TRL's GRPO/online-DPO sampler yields: the G completions of one prompt are adjacent, so
    group statistics are ``reshape(-1, G)``.
    """
    if not isinstance(num_generations, (int, np.integer)) or num_generations < 1:
        raise ValueError(f"num_generations must be a positive int, got {num_generations!r}.")
    g = int(num_generations)
    if isinstance(batch, Mapping):
        return type(batch)({k: repeat_for_generations(v, g) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(x for x in batch for _ in range(g))
    if isinstance(batch, np.ndarray):
        return np.repeat(batch, g, axis=0)
    if hasattr(batch, "shape"):
        return jnp.repeat(batch, g, axis=0)
    raise ValueError(
        f"repeat_for_generations: unsupported batch type {type(batch).__name__}; pass an array, a list or a dict."
    )
