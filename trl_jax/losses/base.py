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


def weighted_rewards(rewards_per_func, reward_weights, num_generations: int, reward_func_names=None):
    """The checked inputs of the group-advantage functions (GRPO, RLOO): ``rewards_per_func [N, F]`` (NaN = not
    scored), ``reward_weights [F]`` (``None``: ones), ``N`` a multiple of ``num_generations``. Returns ``(r [N, F]
    fp32, w [F] fp32, reward_func_names, unscorable [N] bool, weighted_sum [N])``: TRL's weighted nansum over the
    functions, NaN where every function left the completion unscored."""
    import chex

    r = as_f32(rewards_per_func)
    if r.ndim != 2:
        raise ValueError(f"rewards_per_func must be [N, F] (completions x reward functions); got shape {r.shape}.")
    n, f = r.shape
    if num_generations < 1 or n % num_generations != 0:
        raise ValueError(
            f"The number of completions ({n}) must be a multiple of num_generations ({num_generations}); the "
            "completions of one prompt must be contiguous rows."
        )
    w = jnp.ones((f,), jnp.float32) if reward_weights is None else as_f32(reward_weights)
    chex.assert_shape(w, (f,))
    if reward_func_names is None:
        reward_func_names = [f"reward_func_{i}" for i in range(f)]
    if len(reward_func_names) != f:
        raise ValueError(f"Got {len(reward_func_names)} reward_func_names for {f} reward functions.")
    unscorable = jnp.all(jnp.isnan(r), axis=1)
    weighted_sum = jnp.where(unscorable, jnp.nan, jnp.nansum(r * w[None, :], axis=1))
    return r, w, reward_func_names, unscorable, weighted_sum


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

