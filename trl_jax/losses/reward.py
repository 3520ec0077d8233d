"""Reward-model (Bradley-Terry) loss, as TRL 1.16's ``RewardTrainer.compute_loss`` computes it.

Pure, jit-compatible, fixed-shape. Inputs are the scalar rewards of the chosen and rejected sequence of each pair
(``[B]`` each; the ``score`` head of a ``*ForSequenceClassification`` model at the last non-pad token), an
optional ``margin [B]`` (TRL's ``margin`` column) and an optional ``example_mask [B]`` that drops padding pairs.

    loss = mean(-log sigmoid(r_chosen - r_rejected [- margin]))
           [+ center_rewards_coefficient * mean((r_chosen + r_rejected) ** 2)]

(the centering term of Eisenstein et al. 2023, Eq. 2, exactly as TRL writes it: the squared *sum* of the pair's
rewards). Both terms are means over the pairs, so ``numerator`` is their sum over real pairs and ``denominator``
the number of real pairs: gradient accumulation over equal micro-batches gives TRL's mean of micro-batch means.

Metrics (TRL names; ``stop_gradient``; values as one ``compute_loss`` call logs them):

* ``min_reward``, ``mean_reward``, ``max_reward``: over all ``2B`` rewards (chosen and rejected).
* ``accuracy``: fraction of pairs with ``r_chosen > r_rejected`` (strict, a tie counts as wrong).
* ``margin``: mean of ``r_chosen - r_rejected`` (the margin column is not subtracted).

An all-padding batch gives loss 0 and NaN metrics ("not logged"; loggers average with ``nanmean``).
Not here (trainer-level in TRL): ``num_tokens`` (running total of ``attention_mask.sum()`` over training).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from trl_jax.losses.base import LossTerms, as_f32

__all__ = ["reward_loss", "pair_loss", "center_rewards_term", "reward_metrics"]


def _pairs_mask(example_mask, batch: int) -> jax.Array:
    if example_mask is None:
        return jnp.ones((batch,), dtype=bool)
    example_mask = jnp.asarray(example_mask, dtype=bool)
    if example_mask.shape != (batch,):
        raise ValueError(f"example_mask must have shape [B]=({batch},), got {example_mask.shape}")
    return example_mask


def pair_loss(chosen_rewards, rejected_rewards, margin=None) -> jax.Array:
    """Per-pair Bradley-Terry loss ``-log sigmoid(r_c - r_r [- margin])`` ``[B]`` (fp32)."""
    diff = as_f32(chosen_rewards) - as_f32(rejected_rewards)
    if margin is not None:
        diff = diff - as_f32(margin)
    return -jax.nn.log_sigmoid(diff)


def center_rewards_term(chosen_rewards, rejected_rewards) -> jax.Array:
    """Per-pair centering penalty ``(r_c + r_r) ** 2`` ``[B]`` (TRL's ``mean`` of it is taken by the caller)."""
    return jnp.square(as_f32(chosen_rewards) + as_f32(rejected_rewards))


def reward_metrics(chosen_rewards, rejected_rewards, example_mask=None) -> dict:
    """TRL's logged reward metrics of one batch (see the module docstring); NaN when no pair is real."""
    c = jax.lax.stop_gradient(as_f32(chosen_rewards))
    r = jax.lax.stop_gradient(as_f32(rejected_rewards))
    mask = _pairs_mask(example_mask, c.shape[0])
    n = jnp.sum(mask.astype(jnp.float32))
    nan = jnp.float32(jnp.nan)

    def mean(x):
        return jnp.where(n > 0, jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(n, 1.0), nan)

    both = jnp.concatenate([c, r])
    both_mask = jnp.concatenate([mask, mask])
    return {
        "min_reward": jnp.where(n > 0, jnp.min(jnp.where(both_mask, both, jnp.inf)), nan),
        "mean_reward": jnp.where(n > 0, jnp.sum(jnp.where(both_mask, both, 0.0)) / jnp.maximum(2.0 * n, 1.0), nan),
        "max_reward": jnp.where(n > 0, jnp.max(jnp.where(both_mask, both, -jnp.inf)), nan),
        "accuracy": mean((c > r).astype(jnp.float32)),
        "margin": mean(c - r),
    }


def reward_loss(chosen_rewards, rejected_rewards, *, margin=None, center_rewards_coefficient: float | None = None,
                example_mask=None) -> LossTerms:
    """TRL's reward-model loss and metrics for ``B`` pairs.

    Args:
        chosen_rewards, rejected_rewards: ``[B]`` scalar rewards (any float dtype; computed in fp32).
        margin: optional ``[B]`` margins subtracted from the reward difference (TRL's ``margin`` column).
        center_rewards_coefficient: adds ``coef * mean((r_c + r_r) ** 2)`` when not ``None``.
        example_mask: optional ``[B]`` bool/int, ``False`` for padding pairs.

    Returns ``LossTerms(numerator, denominator, metrics)`` with ``loss = numerator / denominator``.
    """
    chex.assert_rank([chosen_rewards, rejected_rewards], 1)
    chex.assert_equal_shape([chosen_rewards, rejected_rewards])
    mask = _pairs_mask(example_mask, chosen_rewards.shape[0])
    per_pair = pair_loss(chosen_rewards, rejected_rewards, margin)
    if center_rewards_coefficient is not None:
        per_pair = per_pair + center_rewards_coefficient * center_rewards_term(chosen_rewards, rejected_rewards)
    numerator = jnp.sum(jnp.where(mask, per_pair, 0.0))
    denominator = jnp.sum(mask.astype(jnp.float32))
    return LossTerms(numerator, denominator, reward_metrics(chosen_rewards, rejected_rewards, mask))

