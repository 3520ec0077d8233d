"""RLOO: leave-one-out advantages and the sequence-level clipped loss, as TRL's ``RLOOTrainer`` computes them.

Pure, jit-compatible functions; everything is fp32. The formulas follow TRL 1.16's
``RLOOTrainer._generate_and_score_completions`` (rewards -> advantages) and ``RLOOTrainer._compute_loss``
(log-probs -> loss). Where RLOO differs from GRPO (:mod:`trl_jax.losses.grpo`):

* The KL to the reference enters the *reward*, not the loss: ``reward - beta * sum_t (old_logp_t - ref_logp_t)``
  (the first-order log ratio summed over the completion's loss tokens, computed at generation time).
* The baseline of a completion is the mean reward of the *other* scorable completions of its prompt; advantages
  are optionally normalized over the whole generation batch (``normalize_advantages``), never per group.
* ``reward_clip_range`` clamps the rewards before the KL penalty and the baseline.
* The importance ratio is per *sequence*: ``exp(sum_t logp_t - sum_t old_logp_t)``, clipped to
  ``[1 - epsilon, 1 + epsilon_high]``; the loss is the mean over the micro-batch's sequences (TRL returns it
  unscaled; the Trainer divides it by ``gradient_accumulation_steps``).

Shapes: ``N`` completions in a generation batch (completions of one prompt contiguous), ``F`` reward functions,
``B`` completions in a micro-batch, ``T`` completion length.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from trl_jax.losses.base import LossTerms, as_f32, reward_metrics, weighted_rewards
from trl_jax.ops.masking import nanmax, nanmean, nanmin, nanstd

_STD_EPS = 1e-4  # TRL's guard in ``A / (std + 1e-4)``


def rloo_advantages(
    rewards_per_func,
    reward_weights=None,
    *,
    num_generations: int,
    beta: float = 0.0,
    per_token_kl=None,
    completion_mask=None,
    reward_clip_range: tuple[float, float] | None = None,
    normalize_advantages: bool = False,
    reward_func_names: Sequence[str] | None = None,
):
    """Leave-one-out advantages from per-function rewards, as TRL's ``RLOOTrainer._generate_and_score_completions``.

    Args:
        rewards_per_func: ``[N, F]`` rewards of the generation batch; NaN where a function returned ``None``.
        reward_weights: ``[F]``; ``None`` means all ones.
        num_generations: ``G``; rows ``[g*G, (g+1)*G)`` are prompt ``g``'s completions.
        beta: KL coefficient; with ``beta != 0`` ``per_token_kl`` (``old_logps - ref_logps``, ``[N, T]``) and
            ``completion_mask`` (``[N, T]``, the loss mask) are required.
        reward_clip_range: ``(min, max)`` applied to the weighted rewards, or ``None``.
        normalize_advantages: z-score the advantages over the batch (``std + 1e-4``).
        reward_func_names: names for ``rewards/<name>/mean|std``; default ``reward_func_<i>``.

    Returns:
        ``(advantages [N] fp32, metrics)``: advantages are never NaN (an unscorable completion, or the only
        scorable one of its group, gets 0). ``metrics``: ``rewards/<name>/mean|std``, ``reward``, ``reward_std``,
        ``frac_reward_zero_std`` and, with ``beta != 0``, ``kl`` (mean per-token log ratio), as TRL logs them.
    """
    g = int(num_generations)
    r, w, reward_func_names, unscorable, weighted_sum = weighted_rewards(
        rewards_per_func, reward_weights, g, reward_func_names)
    n = r.shape[0]
    rewards = weighted_sum
    if reward_clip_range:
        rewards = jnp.clip(rewards, reward_clip_range[0], reward_clip_range[1])
    metrics = {}
    if beta != 0.0:
        if per_token_kl is None or completion_mask is None:
            raise ValueError("beta != 0 needs per_token_kl (old - reference log-probs) and completion_mask.")
        m = as_f32(completion_mask)
        kl_tok = as_f32(per_token_kl) * m
        rewards = rewards - beta * kl_tok.sum(-1)
        metrics["kl"] = kl_tok.sum() / jnp.maximum(m.sum(), 1.0)

    grouped = rewards.reshape(-1, g)
    std = nanstd(grouped, axis=1) if g > 1 else jnp.zeros((n // g,), jnp.float32)
    if g > 1:
        scorable = jnp.sum(~jnp.isnan(grouped), axis=1, keepdims=True).astype(jnp.float32)
        total = jnp.nansum(grouped, axis=1, keepdims=True)
        baselines = ((total - grouped) / (scorable - 1.0)).reshape(-1)  # 0/0 = NaN for a lone scorable row
        advantages = rewards - baselines
    else:
        advantages = jnp.zeros_like(rewards)
    if normalize_advantages:
        advantages = (advantages - nanmean(advantages)) / (nanstd(advantages) + _STD_EPS)
    advantages = jnp.nan_to_num(advantages, nan=0.0)
    metrics.update(reward_metrics(r, weighted_sum, std, reward_func_names))
    return advantages, metrics


def rloo_loss(
    per_token_logps,
    old_logps,
    advantages,
    completion_mask,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    entropies=None,
    aux_loss=None,
    router_aux_loss_coef: float = 0.0,
) -> LossTerms:
    """RLOO's micro-batch loss, equal to TRL's ``RLOOTrainer._compute_loss`` (before the Trainer's division by
    ``gradient_accumulation_steps``).

    Args:
        per_token_logps: ``[B, T]`` log-probs of the completion tokens under the params being trained.
        old_logps: ``[B]`` sequence log-probs at generation time (masked sum), or ``None``: on-policy, the ratio is
            exactly 1 (``stop_gradient`` of the current sequence log-probs).
        advantages: ``[B]``; completion_mask: ``[B, T]`` (the loss mask).
        epsilon, epsilon_high: clip range ``[1 - epsilon, 1 + epsilon_high]`` (``epsilon_high`` defaults to
            ``epsilon``).
        entropies: ``[B, T]`` per-token entropies for the ``entropy`` metric (optional).
        aux_loss, router_aux_loss_coef: mixture-of-experts load-balancing loss, added unscaled as TRL does.

    Returns:
        ``LossTerms(loss, 1, metrics)`` with ``entropy`` (when given) and ``clip_ratio/low_mean``, ``low_min``,
        ``high_mean``, ``high_max``, ``region_mean`` (TRL's names; sequence-level clip fractions).
    """
    mask = as_f32(completion_mask)
    logps = (as_f32(per_token_logps) * mask).sum(1)
    old = jax.lax.stop_gradient(logps) if old_logps is None else as_f32(old_logps)
    adv = as_f32(advantages)
    eps_low = float(epsilon)
    eps_high = float(epsilon if epsilon_high is None else epsilon_high)
    coef_1 = jnp.exp(logps - old)
    coef_2 = jnp.clip(coef_1, 1.0 - eps_low, 1.0 + eps_high)
    loss = -jnp.minimum(coef_1 * adv, coef_2 * adv).mean()
    metrics = {}
    if aux_loss is not None and router_aux_loss_coef:
        loss = loss + router_aux_loss_coef * as_f32(aux_loss)
        metrics["aux_loss"] = as_f32(aux_loss)
    if entropies is not None:
        metrics["entropy"] = (as_f32(entropies) * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    low = ((coef_1 < 1.0 - eps_low) & (adv < 0)).astype(jnp.float32)
    high = ((coef_1 > 1.0 + eps_high) & (adv > 0)).astype(jnp.float32)
    region = jnp.maximum(low, high)
    metrics["clip_ratio/low_mean"] = nanmean(low)
    metrics["clip_ratio/low_min"] = nanmin(low)
    metrics["clip_ratio/high_mean"] = nanmean(high)
    metrics["clip_ratio/high_max"] = nanmax(high)
    metrics["clip_ratio/region_mean"] = nanmean(region)
    return LossTerms(loss, jnp.float32(1.0), metrics)
