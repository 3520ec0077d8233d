"""Padding helpers with TRL's semantics.

``pad`` works on host arrays (it builds batches from ragged lists, before jit); ``pad_to_length`` is jit-compatible.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


def pad(
    sequences: Sequence,
    padding_value=0,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> np.ndarray:
    """Stack arrays of different shapes into one ``[N, *max_shape]`` array, like ``trl.trainer.utils.pad``.

    The output shape is the per-dimension maximum; ``pad_to_multiple_of`` rounds only the first (sequence)
    dimension up; ``padding_side`` ("left" or "right") applies to the first dimension only, trailing dimensions
    are right-padded. The dtype is the first sequence's.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if len(sequences) == 0:
        raise ValueError("pad() needs at least one sequence")
    arrays = [np.asarray(s) for s in sequences]
    ndims = {a.ndim for a in arrays}
    if len(ndims) != 1 or 0 in ndims:
        raise ValueError(f"pad() needs sequences of one rank >= 1, got ranks {sorted(ndims)}")
    shape = np.max([a.shape for a in arrays], axis=0).tolist()
    if pad_to_multiple_of:
        shape[0] = -(-shape[0] // pad_to_multiple_of) * pad_to_multiple_of
    out = np.full((len(arrays), *shape), padding_value, dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        start = shape[0] - a.shape[0] if padding_side == "left" else 0
        out[(i, slice(start, start + a.shape[0])) + tuple(slice(0, s) for s in a.shape[1:])] = a
    return out


def pad_to_length(x, length: int, pad_value=0, axis: int = -1):
    """Right-pad ``x`` along ``axis`` to ``length``; returned unchanged when already at least that long."""
    x = jnp.asarray(x)
    axis = axis % x.ndim
    if x.shape[axis] >= length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths, constant_values=pad_value)
