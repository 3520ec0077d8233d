"""Masked reductions and nan-aware statistics (jit-compatible, pure).

Conventions: ``mask`` is any numeric or boolean array broadcastable to ``x``; 1/True marks a counted entry.
Reductions return fp32 (or the input dtype when it is wider) and never NaN on an all-masked input unless stated.
"""

from __future__ import annotations

import jax.numpy as jnp


def _f32(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits >= 32:
        return x
    return x.astype(jnp.float32)


def masked_sum(x, mask, axis=None):
    """Sum of ``x`` over the entries where ``mask`` is set. ``x [...]``, ``mask [...]`` -> reduced fp32."""
    x = _f32(x)
    return jnp.sum(jnp.where(jnp.asarray(mask, bool), x, 0.0), axis=axis)


def masked_count(mask, axis=None):
    """Number of set mask entries, as fp32."""
    return jnp.sum(jnp.asarray(mask, bool).astype(jnp.float32), axis=axis)


def masked_mean(x, mask, axis=None, *, min_count: float = 1.0):
    """Mean of ``x`` over the set entries of ``mask``.

    The denominator is clamped to ``min_count`` (TRL's ``.clamp(min=1.0)``), so an all-masked reduction gives 0,
    never NaN.
    """
    return masked_sum(x, mask, axis) / jnp.maximum(masked_count(mask, axis), min_count)


def nanmean(x, axis=None):
    """Mean ignoring NaN entries; NaN where every entry is NaN (like ``torch.nanmean``)."""
    x = _f32(x)
    valid = ~jnp.isnan(x)
    count = jnp.sum(valid, axis=axis)
    total = jnp.sum(jnp.where(valid, x, 0.0), axis=axis)
    return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)


def nanstd(x, axis=None, keepdims: bool = False):
    """NaN-ignoring standard deviation with Bessel's correction, as TRL's ``nanstd``.

    ``var = sum((x - nanmean)^2) / count * count / (count - 1)``; NaN where fewer than two entries are valid.
    """
    x = _f32(x)
    valid = ~jnp.isnan(x)
    count = jnp.sum(valid, axis=axis, keepdims=True).astype(x.dtype)
    mean = jnp.sum(jnp.where(valid, x, 0.0), axis=axis, keepdims=True) / jnp.maximum(count, 1.0)
    sq = jnp.where(valid, (x - mean) ** 2, 0.0)
    var = jnp.sum(sq, axis=axis, keepdims=True) / jnp.maximum(count - 1.0, 1.0)
    std = jnp.where(count > 1, jnp.sqrt(var), jnp.nan)
    if not keepdims:
        std = jnp.squeeze(std, axis=axis) if axis is not None else std.reshape(())
    return std


def nanmin(x):
    """Minimum over all non-NaN entries; NaN if all are NaN."""
    x = _f32(x)
    valid = ~jnp.isnan(x)
    return jnp.where(jnp.any(valid), jnp.min(jnp.where(valid, x, jnp.inf)), jnp.nan)


def nanmax(x):
    """Maximum over all non-NaN entries; NaN if all are NaN."""
    x = _f32(x)
    valid = ~jnp.isnan(x)
    return jnp.where(jnp.any(valid), jnp.max(jnp.where(valid, x, -jnp.inf)), jnp.nan)
