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


def with_router_aux_loss(terms: LossTerms, aux_loss: jax.Array, coef: float) -> LossTerms:
    """TRL's ``loss + router_aux_loss_coef * aux_loss`` for one forward of a mixture-of-experts model, folded into
    the numerator so that ``numerator / denominator`` is that sum; logs ``aux_loss`` (fp32 scalar)."""
    aux_loss = as_f32(aux_loss)
    return terms._replace(numerator=terms.numerator + coef * aux_loss * terms.denominator,
                          metrics={**terms.metrics, "aux_loss": jax.lax.stop_gradient(aux_loss)})


def as_f32(x) -> jax.Array:
    return jnp.asarray(x, dtype=jnp.float32)


def reward_metrics(rewards_per_func, weighted_sum, group_std, reward_func_names) -> dict:
    """TRL's per-generation-batch reward metrics of GRPO and RLOO: ``rewards/<name>/mean|std`` of each
    function's ``[N]`` column of ``rewards_per_func [N, F]`` (NaN = not scored), ``reward`` / ``reward_std`` of
    the weighted sum ``[N]``, and ``frac_reward_zero_std`` from the per-row group std ``[N]`` (torch.isclose's
    defaults; False for a NaN std)."""
    from trl_jax.ops.masking import nanmean, nanstd

    metrics = {}
    for i, name in enumerate(reward_func_names):
        metrics[f"rewards/{name}/mean"] = nanmean(rewards_per_func[:, i])
        metrics[f"rewards/{name}/std"] = nanstd(rewards_per_func[:, i])
    metrics["reward"] = nanmean(weighted_sum)
    metrics["reward_std"] = nanstd(weighted_sum)
    metrics["frac_reward_zero_std"] = jnp.mean(jnp.isclose(group_std, 0.0).astype(jnp.float32))
    return metrics

