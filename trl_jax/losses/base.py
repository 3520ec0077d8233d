"""The shared return type of every trl_jax loss.

Every objective computes ``loss = numerator / denominator``. Exposing both lets a train step accumulate
micro-batches exactly (``sum(numerators) / sum(denominators)``), which is what TRL's normalizers amount to when
micro-batches hold different numbers of counted tokens or pairs. ``metrics`` carry TRL's names, each a scalar
already averaged over the micro-batch as TRL logs it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LossTerms(NamedTuple):
    """``numerator`` and ``denominator``: fp32 scalars; ``metrics``: ``dict[str, fp32 scalar]`` (TRL names)."""

    numerator: jax.Array
    denominator: jax.Array
    metrics: dict

    @property
    def loss(self) -> jax.Array:
        """``numerator / denominator``; 0 (not NaN) when nothing was counted."""
        return self.numerator / jnp.where(self.denominator == 0, 1.0, self.denominator)


def as_f32(x) -> jax.Array:
    return jnp.asarray(x, dtype=jnp.float32)
