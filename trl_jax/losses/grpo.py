"""GRPO: group-relative advantages and the clipped policy-gradient loss, as TRL's ``GRPOTrainer`` computes them.

Pure, jit-compatible functions; everything is fp32. The formulas follow TRL 1.16's
``GRPOTrainer._generate_and_score_completions`` (rewards -> advantages) and ``GRPOTrainer._compute_loss``
(log-probs -> loss), including every ``loss_type`` it accepts (``LOSS_TYPES``) and their normalizers.

Distributed semantics: TRL gathers rewards, entropies and metric sums across processes. Here every array is the
*global* array (under ``jax.jit`` with sharded inputs XLA inserts the collectives), so the functions are written
for one "process" holding the whole batch; the normalizer knobs that involve processes or accumulation
(``num_items_in_batch``, ``num_processes``, ``gradient_accumulation_steps``, ``steps_per_generation``) are
explicit arguments so a train step can reproduce TRL's per-micro-batch scaling exactly.

Shapes: ``N`` completions in a generation batch (``N = num_prompts * num_generations``, completions of one prompt
contiguous), ``F`` reward functions, ``B`` completions in a micro-batch, ``T`` completion length.
"""

from __future__ import annotations

import math
from typing import Sequence

import chex
import jax
import jax.numpy as jnp

from trl_jax.losses.base import LossTerms, as_f32, reward_metrics, weighted_rewards
from trl_jax.ops.masking import nanmax, nanmean, nanmin, nanstd

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
"""Every ``loss_type`` TRL 1.16's ``GRPOTrainer`` accepts."""

_CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # PPO-style clipped surrogate
_TOKEN_SUM_LOSS_TYPES = ("cispo", "dapo", "vespo")  # normalized by the (global) number of loss tokens
SCALE_REWARDS = ("group", "batch", "none")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
_STD_EPS = 1e-4  # TRL's guard in ``A / (std + 1e-4)``


# --------------------------------------------------------------------------------------------------------------------
# Rewards -> advantages
# --------------------------------------------------------------------------------------------------------------------


def resolve_scale_rewards(scale_rewards) -> str:
    """Map ``scale_rewards`` as ``GRPOConfig.__post_init__`` does: ``True -> "group"``, ``False -> "none"``."""
    if scale_rewards is True:
        return "group"
    if scale_rewards is False:
        return "none"
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(
            f"Invalid value for scale_rewards: {scale_rewards!r}. Must be one of 'batch', 'group', 'none' "
            "(or True = 'group', False = 'none')."
        )
    return scale_rewards


def _repeat_groups(x, num_generations):
    return jnp.repeat(x, num_generations, axis=0)


def grpo_advantages(
    rewards_per_func,
    reward_weights=None,
    *,
    num_generations: int,
    scale_rewards="group",
    multi_objective_aggregation: str = "sum_then_normalize",
    reward_func_names: Sequence[str] | None = None,
):
    """Group-relative advantages from per-function rewards, as TRL's ``_generate_and_score_completions``.

    Args:
        rewards_per_func: ``[N, F]`` rewards of the whole (gathered) generation batch; NaN marks a reward function
            that returned ``None`` for that completion. Rows ``[g*G, (g+1)*G)`` are the ``G = num_generations``
            completions of prompt ``g``.
        reward_weights: ``[F]``; ``None`` means all ones (TRL's default).
        num_generations: ``G``; ``N`` must be a multiple of it.
        scale_rewards: ``"group"`` (divide by the group std), ``"batch"`` (by the batch std), ``"none"``; ``True`` /
            ``False`` map to ``"group"`` / ``"none"``. Ignored by ``normalize_then_sum`` (as in TRL).
        multi_objective_aggregation: ``"sum_then_normalize"`` (weighted nansum of the functions, then group
            baseline) or ``"normalize_then_sum"`` (GDPO: per-function group z-score, weighted nansum, then batch
            z-score).
        reward_func_names: names for the ``rewards/<name>/mean|std`` metrics; default ``reward_func_<i>``.

    Returns:
        ``(advantages [N] fp32, metrics)``. Advantages are never NaN: a completion whose every reward is NaN
        ("unscorable") gets 0, and a group of equal rewards gets exactly 0. ``metrics`` holds
        ``rewards/<name>/mean``, ``rewards/<name>/std``, ``reward``, ``reward_std``, ``frac_reward_zero_std``
        computed as TRL logs them (each process then keeps its own slice of the advantages).
    """
    r, w, reward_func_names, unscorable, weighted_sum = weighted_rewards(
        rewards_per_func, reward_weights, num_generations, reward_func_names)
    n, f = r.shape
    scale_rewards = resolve_scale_rewards(scale_rewards)
    g = num_generations


    if multi_objective_aggregation == "sum_then_normalize":
        rewards = weighted_sum
        grouped = rewards.reshape(-1, g)
        mean_grouped = _repeat_groups(nanmean(grouped, axis=1), g)
        if scale_rewards in ("group", "none"):  # with "none", std only feeds the zero-std metric
            std = _repeat_groups(nanstd(grouped, axis=1), g) if g > 1 else jnp.zeros_like(rewards)
        else:  # "batch"
            std = jnp.broadcast_to(nanstd(rewards), rewards.shape) if n > 1 else jnp.zeros_like(rewards)
        advantages = rewards - mean_grouped
        if scale_rewards != "none":
            advantages = advantages / (std + _STD_EPS)
    elif multi_objective_aggregation == "normalize_then_sum":
        grouped = r.reshape(-1, g, f)
        mean_k = jnp.expand_dims(nanmean(grouped, axis=1), 1)
        std_k = nanstd(grouped, axis=1, keepdims=True) if g > 1 else jnp.zeros_like(mean_k)
        reward_k = ((grouped - mean_k) / (std_k + _STD_EPS)).reshape(-1, f)
        rewards = jnp.where(unscorable, jnp.nan, jnp.nansum(reward_k * w[None, :], axis=1))
        std = jnp.broadcast_to(nanstd(rewards), rewards.shape) if n > 1 else jnp.zeros_like(rewards)
        advantages = (rewards - nanmean(rewards)) / (std + _STD_EPS)
    else:
        raise ValueError(
            f"Invalid multi_objective_aggregation: {multi_objective_aggregation!r}. Must be 'sum_then_normalize' "
            "or 'normalize_then_sum'."
        )
    advantages = jnp.nan_to_num(advantages, nan=0.0)
    return advantages, reward_metrics(r, weighted_sum, std, reward_func_names)


# --------------------------------------------------------------------------------------------------------------------
# Masks and weights used by the loss
# --------------------------------------------------------------------------------------------------------------------


def truncated_completions(completion_ids, completion_mask, eos_token_ids, pad_token_id):
    """Which completions were cut at ``max_completion_length`` (TRL's ``mask_truncated_completions`` test).

    A completion is truncated when its last valid token (``completion_mask`` set) is neither an EOS id nor the pad
    id. Empty completions count as not truncated.

    Args:
        completion_ids: ``[B, T]`` int, right-padded. completion_mask: ``[B, T]``.
        eos_token_ids: an int or a sequence of ints. pad_token_id: int.

    Returns:
        ``[B]`` bool.
    """
    ids = jnp.asarray(completion_ids)
    valid = jnp.asarray(completion_mask).astype(bool)
    chex.assert_equal_shape([ids, valid])
    if isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    stop_ids = jnp.asarray([*eos_token_ids, pad_token_id], dtype=ids.dtype)
    length = jnp.sum(valid, axis=1)
    last = jnp.take_along_axis(ids, jnp.maximum(length - 1, 0)[:, None], axis=1)[:, 0]
    return (length > 0) & ~jnp.isin(last, stop_ids)


def mask_truncated_completions(completion_mask, truncated):
    """``completion_mask [B, T]`` with the rows of truncated completions (``truncated [B]`` bool) zeroed."""
    m = jnp.asarray(completion_mask)
    return m * (~jnp.asarray(truncated, bool))[:, None].astype(m.dtype)


def high_entropy_mask(entropies, mask, threshold: float):
    """Tokens whose entropy is at least the ``threshold`` quantile of the valid tokens' entropies.

    Our equivalent of TRL's ``GRPOTrainer.get_high_entropy_mask``: the quantile is taken over every valid token
    of the (global) batch with linear interpolation (``torch.quantile``'s default); padding is never selected;
    no valid token gives an all-False mask.

    Args:
        entropies: ``[B, T]`` per-token entropies (>= 0). mask: ``[B, T]`` 1 = valid.
        threshold: quantile in ``[0, 1]``; TRL passes ``1 - top_entropy_quantile``.

    Returns:
        ``[B, T]`` bool.
    """
    h = as_f32(entropies)
    valid = jnp.asarray(mask).astype(bool)
    chex.assert_equal_shape([h, valid])
    flat = jnp.sort(jnp.where(valid, h, jnp.inf).reshape(-1))  # valid entries first, ascending
    count = jnp.sum(valid)
    rank = jnp.float32(threshold) * (count - 1).astype(jnp.float32)
    lower = jnp.floor(rank)
    weight = rank - lower
    lo_idx = jnp.clip(lower.astype(jnp.int32), 0, flat.shape[0] - 1)
    hi_idx = jnp.clip(jnp.ceil(rank).astype(jnp.int32), 0, flat.shape[0] - 1)
    below, above = flat[lo_idx], flat[hi_idx]
    # torch.lerp's two-sided formula, so the threshold is bit-identical to torch.quantile's.
    quantile = jnp.where(weight < 0.5, below + weight * (above - below), above - (above - below) * (1.0 - weight))
    selected = (h * valid.astype(h.dtype)) >= quantile
    return selected & valid & (count > 0)


def off_policy_sequence_mask(advantages, per_token_logps, sampling_per_token_logps, mask, threshold: float):
    """DeepSeek-V3.2 off-policy sequence mask (TRL's ``get_off_policy_mask``): 1 = keep, 0 = drop.

    A sequence is kept when its advantage is >= 0 or its masked mean of ``sampling - sg(logp)`` (NaN -> 0) is at
    most ``threshold``.

    Args:
        advantages: ``[B, 1]`` or ``[B, T]``. per_token_logps, sampling_per_token_logps, mask: ``[B, T]``.

    Returns:
        fp32 ``[B, 1]`` (``[B, T]`` for per-token advantages).
    """
    m = as_f32(mask)
    kl = jnp.nan_to_num(as_f32(sampling_per_token_logps) - jax.lax.stop_gradient(as_f32(per_token_logps)), nan=0.0)
    avg_seq_kl = jnp.sum(kl * m, axis=1, keepdims=True) / jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1.0)
    return ((advantages >= 0) | (avg_seq_kl <= threshold)).astype(jnp.float32)


def vespo_gamma_weights(
    advantages,
    log_ratio_per_token,
    mask,
    importance_sampling_ratio=None,
    *,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
):
    """VESPO's detached gamma weight ``phi(w) = exp(lambda + k log w - lambda w)`` per sequence (TRL's
    ``get_gamma_weights``), ``w`` the sequence-level ratio ``prod_t pi/pi_old`` (times the vLLM token IS ratios).

    Args:
        advantages: ``[B, 1]`` (or ``[B, T]``). log_ratio_per_token, mask: ``[B, T]``.
        importance_sampling_ratio: optional ``[B, T]`` token-level vLLM IS ratio.

    Returns:
        fp32 ``[B, 1]`` (broadcast like ``advantages``), NaN/inf mapped to 0, gradient stopped.
    """
    lower = math.log(1e-8)
    m = as_f32(mask)
    log_ratio = jnp.clip(as_f32(log_ratio_per_token), -20.0, 20.0)
    seq_log_ratio = jnp.sum(log_ratio * m, axis=-1, keepdims=True)
    if importance_sampling_ratio is not None:
        log_is = jnp.clip(jnp.log(as_f32(importance_sampling_ratio)), lower, 20.0)
        seq_log_ratio = seq_log_ratio + jnp.sum(log_is, axis=-1, keepdims=True)
    log_w = jnp.clip(seq_log_ratio, lower, 20.0)
    w = jnp.exp(log_w)
    nonneg = advantages >= 0
    k = jnp.where(nonneg, jnp.float32(k_pos), jnp.float32(k_neg))
    lam = jnp.maximum(jnp.where(nonneg, jnp.float32(lambda_pos), jnp.float32(lambda_neg)), 1e-4)
    phi = jnp.exp(lam + k * log_w - lam * w)
    phi = jnp.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)
    return jax.lax.stop_gradient(phi)


def vllm_importance_sampling_ratio(
    old_per_token_logps,
    sampling_per_token_logps,
    mask,
    *,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
):
    """Truncated / masked importance sampling between the trainer and the vLLM sampler (TRL's
    ``vllm_importance_sampling_correction``), with TRL's ``sampling/*`` metrics.

    ``d_t = (old_t - sampling_t) * mask_t`` (NaN sampling log-probs give ``d_t = 0``); token modes use
    ``exp(d_t)``, sequence modes ``exp(sum_t d_t)``; ``*_truncate`` clamps to ``[clip_min, clip_max]``, ``*_mask``
    zeroes ratios outside it (a ``None`` bound is open).

    Args:
        old_per_token_logps, sampling_per_token_logps, mask: ``[B, T]`` (the whole batch the metrics cover).

    Returns:
        ``(ratio, metrics)``: ratio ``[B, T]`` (token modes) or ``[B, 1]`` (sequence modes), to pass to
        ``grpo_loss(importance_sampling_ratio=...)``; metrics ``sampling/sampling_logp_difference/mean|max``,
        ``sampling/importance_sampling_ratio/min|mean|max``.
    """
    if mode not in VLLM_IS_MODES:
        raise ValueError(f"Unknown vLLM importance sampling mode {mode!r}; expected one of {VLLM_IS_MODES}.")
    if mode.endswith("_truncate") and clip_min is None and clip_max is None:
        raise ValueError(f"vLLM importance sampling mode {mode!r} needs clip_min or clip_max.")
    old = as_f32(old_per_token_logps)
    sampling = as_f32(sampling_per_token_logps)
    valid = jnp.asarray(mask).astype(bool)
    chex.assert_equal_shape([old, sampling, valid])
    diff = jnp.nan_to_num((old - sampling) * valid.astype(jnp.float32), nan=0.0)
    sequence_level = mode.startswith("sequence")
    log_ratio = jnp.sum(diff, axis=-1, keepdims=True) if sequence_level else diff
    ratio = jnp.exp(log_ratio)
    if mode.endswith("_truncate"):
        ratio = jnp.clip(ratio, clip_min, clip_max)
    else:
        lo = -jnp.inf if clip_min is None else clip_min
        hi = jnp.inf if clip_max is None else clip_max
        ratio = jnp.where((ratio < lo) | (ratio > hi), 0.0, ratio)

    delta = jnp.abs(old - sampling)
    counted = valid & ~jnp.isnan(delta)
    n_counted = jnp.sum(counted)
    any_counted = n_counted > 0
    metrics = {
        "sampling/sampling_logp_difference/mean": jnp.where(
            any_counted, jnp.sum(jnp.where(counted, delta, 0.0)) / jnp.maximum(n_counted, 1), 0.0
        ),
        "sampling/sampling_logp_difference/max": jnp.where(
            any_counted, jnp.max(jnp.where(counted, delta, -jnp.inf)), 0.0
        ),
    }
    if sequence_level:
        flat, sel = ratio.reshape(-1), jnp.ones(ratio.shape[0], bool)
    else:
        flat, sel = ratio.reshape(-1), valid.reshape(-1)
    n_sel = jnp.sum(sel)
    has = n_sel > 0
    metrics["sampling/importance_sampling_ratio/min"] = jnp.where(has, jnp.min(jnp.where(sel, flat, jnp.inf)), 0.0)
    metrics["sampling/importance_sampling_ratio/mean"] = jnp.where(
        has, jnp.sum(jnp.where(sel, flat, 0.0)) / jnp.maximum(n_sel, 1), 0.0
    )
    metrics["sampling/importance_sampling_ratio/max"] = jnp.where(has, jnp.max(jnp.where(sel, flat, -jnp.inf)), 0.0)
    return ratio, metrics


def update_entropy_coef(
    entropy_coef,
    world_entropy,
    *,
    entropy_target: float = 0.2,
    entropy_coef_delta: float = 0.005,
    entropy_coef_min: float = 0.0,
    entropy_coef_max: float = 1.0,
):
    """Adaptive entropy control (Skywork-OR1) after an optimizer step, as TRL's ``use_adaptive_entropy``.

    ``world_entropy`` is the accumulation window's global token mean entropy. Returns the next coefficient; the
    coefficient to *apply* on the next step is ``coef if world_entropy <= entropy_target else 0`` (TRL applies
    no bonus before the first measurement).
    """
    up = jnp.minimum(entropy_coef + entropy_coef_delta, entropy_coef_max)
    down = jnp.maximum(entropy_coef - entropy_coef_delta, entropy_coef_min)
    return jnp.where(world_entropy <= entropy_target, up, down)


# --------------------------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------------------------


def _is_nonzero(x) -> bool:
    """``x != 0`` for a Python/concrete number; a traced value counts as nonzero (enabled)."""
    try:
        return float(x) != 0.0
    except (TypeError, jax.errors.ConcretizationTypeError):
        return True


def grpo_loss(
    per_token_logps,
    old_per_token_logps,
    ref_per_token_logps,
    advantages,
    completion_mask,
    *,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    beta: float = 0.0,
    importance_sampling_level: str = "token",
    use_bias_correction_kl: bool = False,
    sapo_temperature_neg: float = 1.05,
    sapo_temperature_pos: float = 1.0,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    tool_mask=None,
    truncated=None,
    entropies=None,
    top_entropy_quantile: float = 1.0,
    entropy_coef=0.0,
    entropy_bonus_enabled: bool | None = None,
    off_policy_mask_threshold: float | None = None,
    sampling_per_token_logps=None,
    importance_sampling_ratio=None,
    max_completion_length: int | None = None,
    num_items_in_batch=None,
    num_processes: int = 1,
    gradient_accumulation_steps: int = 1,
    steps_per_generation: int | None = None,
    training: bool = True,
    aux_loss=None,
    router_aux_loss_coef: float = 0.0,
) -> LossTerms:
    """GRPO-family policy loss for one micro-batch, equal to TRL's ``GRPOTrainer._compute_loss``.

    With ``r = exp(logp - old)`` per token (``importance_sampling_level="token"``) or
    ``exp(masked mean_t (logp - old))`` per sequence (``"sequence"``, GSPO):

    * ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``luspo``: ``-min(min(r, delta) A, clip(r, 1-eps, 1+eps_high) A)``
    * ``cispo``: ``-sg(min(r, eps_high)) A logp``;  ``sapo``: ``-(4/tau) sigmoid(tau (r - 1)) A``
    * ``vespo``: ``-phi(w) A logp`` (``vespo_gamma_weights``)

    then ``x off-policy mask x top-entropy mask x vLLM IS ratio (not vespo) + beta KL_k3`` (KL optionally ``x r``),
    aggregated per ``loss_type`` as TRL does:

    ==================  ============================================  =========================================
    loss_type           numerator                                     denominator
    ==================  ============================================  =========================================
    grpo, sapo          ``sum_i (sum_t l m / max(sum_t m, 1))``       ``B * GA``
    bnpo                ``sum l m``                                   ``max(sum m, 1) * GA``
    dr_grpo             ``sum l m``                                   ``B * max_completion_length * GA``
    dapo, cispo, vespo  ``sum l m``                                   ``max(num_items_in_batch, 1) / num_processes
                                                                      * GA / steps_per_generation`` (train)
    luspo               ``sum l m`` (per-sequence sums)               ``B * GA``
    ==================  ============================================  =========================================

    (``GA`` = ``gradient_accumulation_steps`` in training, 1 in eval; ``m`` = completion mask x tool mask.)
    ``loss = numerator / denominator`` is the value TRL back-propagates for this micro-batch. The entropy bonus
    (``- entropy_coef * masked mean entropy / GA``) and the MoE aux loss (``+ coef * aux / GA``) are folded into
    the numerator.

    Args:
        per_token_logps: ``[B, T]`` current policy log-probs (differentiate w.r.t. this).
        old_per_token_logps: ``[B, T]`` or ``None`` (then ``sg(per_token_logps)``: ratio exactly 1, as TRL when
            generation and optimization are aligned).
        ref_per_token_logps: ``[B, T]``; required when ``beta != 0``.
        advantages: ``[B]`` (or ``[B, T]`` per-token advantages).
        completion_mask: ``[B, T]`` 1 = completion token.
        loss_type: one of ``LOSS_TYPES``. epsilon: low clip. epsilon_high: high clip (``None`` -> ``epsilon``; for
            ``cispo`` the IS-weight cap). delta: INTELLECT-2 upper bound on ``r`` in the unclipped term.
        beta: KL coefficient. importance_sampling_level: ``"token"`` or ``"sequence"``.
        use_bias_correction_kl: multiply the KL term by ``r``.
        sapo_temperature_*/vespo_*: SAPO and VESPO hyper-parameters (TRL defaults).
        tool_mask: ``[B, T]`` optional, 0 = tool-output token excluded from the loss.
        truncated: ``[B]`` bool optional; rows set are masked out (``mask_truncated_completions``; compute
            ``num_items_in_batch`` from the masked mask, as TRL does).
        entropies: ``[B, T]`` per-token entropies; needed for the ``entropy`` metric, ``top_entropy_quantile < 1``
            and the entropy bonus (differentiate w.r.t. it for the bonus gradient).
        top_entropy_quantile: keep only tokens at or above the ``1 - q`` entropy quantile (``high_entropy_mask``).
        entropy_coef: entropy-bonus coefficient to apply this step (may be traced); ``entropy_bonus_enabled``
            (default ``entropy_coef != 0``) controls whether the bonus and the ``policy_loss``/``entropy_coef``
            metrics are added (TRL: ``entropy_coef != 0 or use_adaptive_entropy``).
        off_policy_mask_threshold: OPSM delta; uses ``sampling_per_token_logps`` (``[B, T]``) when given, else
            the old log-probs.
        importance_sampling_ratio: vLLM IS ratio from ``vllm_importance_sampling_ratio`` (``[B, T]`` or
            ``[B, 1]``), or ``None`` when the correction is off.
        max_completion_length: required for ``dr_grpo``.
        num_items_in_batch: loss tokens in the whole generation batch over all processes (``dapo``/``cispo``/
            ``vespo``). ``None`` uses this micro-batch's ``max(sum m, 1)`` (a token mean of the micro-batch).
        num_processes, gradient_accumulation_steps, steps_per_generation (``None`` -> ``GA``), training: TRL's
            scaling knobs. Under a single jitted global step use ``num_processes=1``.
        aux_loss, router_aux_loss_coef: MoE load-balancing loss, added as ``coef * aux / GA``.

    Returns:
        ``LossTerms(numerator, denominator, metrics)`` with TRL's metric names: ``entropy`` (if ``entropies``
        given), ``kl`` (``beta != 0``), ``clip_ratio/low_mean``, ``clip_ratio/low_min``, ``clip_ratio/high_mean``,
        ``clip_ratio/high_max``, ``clip_ratio/region_mean`` (clipped losses), ``cispo_clip_ratio``,
        ``vespo/phi_seq_mean``, ``policy_loss`` and ``entropy_coef`` (entropy bonus), ``aux_loss``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown loss type: {loss_type!r}. Supported: {LOSS_TYPES}.")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(
            f"Unknown importance sampling level: {importance_sampling_level!r}. Possible values are 'token' and "
            "'sequence'."
        )
    logp = as_f32(per_token_logps)
    chex.assert_rank(logp, 2)
    batch_size = logp.shape[0]
    mask = as_f32(completion_mask)
    chex.assert_equal_shape([logp, mask])
    if truncated is not None:
        mask = mask_truncated_completions(mask, truncated)
    if tool_mask is not None:
        chex.assert_equal_shape([logp, tool_mask])
        mask = mask * as_f32(tool_mask)
    adv = as_f32(advantages)
    if adv.ndim == 1:
        chex.assert_shape(adv, (batch_size,))
        adv = adv[:, None]
    else:
        chex.assert_equal_shape([adv, logp])
    epsilon_low = epsilon
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    if beta != 0.0 and ref_per_token_logps is None:
        raise ValueError("beta != 0 needs ref_per_token_logps (the reference model's log-probs); pass them or beta=0.")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' normalizes by max_completion_length; pass max_completion_length.")
    if top_entropy_quantile < 1.0 and entropies is None:
        raise ValueError("top_entropy_quantile < 1 needs the per-token entropies; pass entropies=[B, T].")
    if loss_type == "vespo" and importance_sampling_ratio is not None and jnp.ndim(importance_sampling_ratio) == 2:
        if jnp.shape(importance_sampling_ratio)[1] == 1 and logp.shape[1] != 1:
            raise ValueError(
                "VESPO needs a token-level vLLM importance sampling ratio ([B, T]); use "
                "vllm_importance_sampling_ratio(mode='token_truncate' or 'token_mask')."
            )
    if entropy_bonus_enabled is None:
        entropy_bonus_enabled = _is_nonzero(entropy_coef)
    if entropy_bonus_enabled and entropies is None:
        raise ValueError("The entropy bonus (entropy_coef != 0) needs the per-token entropies; pass entropies.")
    h = None
    if entropies is not None:
        h = as_f32(entropies)
        chex.assert_equal_shape([h, logp])

    entropy_mask = None
    if top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(jax.lax.stop_gradient(h), mask, 1.0 - top_entropy_quantile)

    old = jax.lax.stop_gradient(logp) if old_per_token_logps is None else as_f32(old_per_token_logps)
    chex.assert_equal_shape([old, logp])

    if off_policy_mask_threshold is not None:
        sampling = old if sampling_per_token_logps is None else as_f32(sampling_per_token_logps)
        opsm = off_policy_sequence_mask(adv, logp, sampling, mask, off_policy_mask_threshold)

    log_ratio = logp - old
    if importance_sampling_level == "token":
        log_weights = log_ratio
    else:
        log_weights = jnp.sum(log_ratio * mask, axis=-1, keepdims=True) / jnp.maximum(
            jnp.sum(mask, axis=-1, keepdims=True), 1.0
        )
    coef_1 = jnp.exp(log_weights)  # [B, T] or [B, 1]

    if beta != 0.0:
        ref = as_f32(ref_per_token_logps)
        chex.assert_equal_shape([ref, logp])
        per_token_kl = jnp.exp(ref - logp) - (ref - logp) - 1.0
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    if loss_type == "cispo":
        clamped = jax.lax.stop_gradient(jnp.minimum(coef_1, epsilon_high))
        per_token_loss = -clamped * adv * logp
    elif loss_type in _CLIPPED_LOSS_TYPES:
        coef_2 = jnp.clip(coef_1, 1.0 - epsilon_low, 1.0 + epsilon_high)
        if delta is not None:
            coef_1 = jnp.minimum(coef_1, delta)  # the clip metrics below see this clamped ratio, as in TRL
        per_token_loss = -jnp.minimum(coef_1 * adv, coef_2 * adv)
    elif loss_type == "sapo":
        tau = jnp.where(adv > 0, jnp.float32(sapo_temperature_pos), jnp.float32(sapo_temperature_neg))
        per_token_loss = -(jax.nn.sigmoid(tau * (coef_1 - 1.0)) * 4.0 / tau) * adv
    else:  # vespo
        phi_seq = vespo_gamma_weights(
            adv,
            log_ratio,
            mask,
            importance_sampling_ratio,
            k_pos=vespo_k_pos,
            lambda_pos=vespo_lambda_pos,
            k_neg=vespo_k_neg,
            lambda_neg=vespo_lambda_neg,
        )
        per_token_loss = -phi_seq * adv * logp

    if off_policy_mask_threshold is not None:
        per_token_loss = per_token_loss * opsm
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask.astype(jnp.float32)
    if importance_sampling_ratio is not None and loss_type != "vespo":
        per_token_loss = per_token_loss * as_f32(importance_sampling_ratio)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl

    ga = float(gradient_accumulation_steps) if training else 1.0
    masked_loss = per_token_loss * mask  # broadcasts [B, 1] per-sequence losses over the tokens
    if loss_type in ("grpo", "sapo"):
        numerator = jnp.sum(jnp.sum(masked_loss, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0))
        policy_denominator = jnp.float32(batch_size)
        denominator = policy_denominator * ga
    elif loss_type == "bnpo":
        numerator = jnp.sum(masked_loss)
        policy_denominator = jnp.maximum(jnp.sum(mask), 1.0)
        denominator = policy_denominator * ga
    elif loss_type == "dr_grpo":
        numerator = jnp.sum(masked_loss)
        policy_denominator = jnp.float32(batch_size * max_completion_length)
        denominator = policy_denominator * ga
    elif loss_type in _TOKEN_SUM_LOSS_TYPES:
        numerator = jnp.sum(masked_loss)
        if num_items_in_batch is None:
            denominator = jnp.maximum(jnp.sum(mask), 1.0)
        else:
            denominator = jnp.maximum(as_f32(num_items_in_batch), 1.0) / num_processes
            if training:
                spg = gradient_accumulation_steps if steps_per_generation is None else steps_per_generation
                denominator = denominator * gradient_accumulation_steps / spg
        policy_denominator = denominator
    else:  # luspo
        numerator = jnp.sum(masked_loss)
        policy_denominator = jnp.float32(batch_size)
        denominator = policy_denominator * ga
    denominator = as_f32(denominator)

    metrics = {}
    if entropy_bonus_enabled:
        policy_loss = jax.lax.stop_gradient(numerator / policy_denominator)
        effective_mask = mask if entropy_mask is None else mask * entropy_mask.astype(jnp.float32)
        entropy_loss = jnp.sum(h * effective_mask) / jnp.maximum(jnp.sum(effective_mask), 1.0) / ga
        numerator = numerator - entropy_coef * entropy_loss * denominator
        metrics["policy_loss"] = policy_loss
        if training:
            metrics["entropy_coef"] = as_f32(entropy_coef)
    if aux_loss is not None and router_aux_loss_coef != 0.0:
        numerator = numerator + router_aux_loss_coef * as_f32(aux_loss) / ga * denominator
        metrics["aux_loss"] = jax.lax.stop_gradient(as_f32(aux_loss))

    # ----- metrics (TRL names; all gradient-free) -----
    sg = jax.lax.stop_gradient

    def seq_mean(x):  # per-sequence mean (NaN for an empty row, ignored by nanmin/nanmax)
        if x.shape[1] == 1:
            return x[:, 0]
        return jnp.sum(x * mask, axis=-1) / jnp.sum(mask, axis=-1)

    def global_mean(x):
        if x.shape[1] == 1:
            return jnp.sum(x) / jnp.maximum(jnp.float32(x.shape[0]), 1.0)
        return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    if beta != 0.0:
        metrics["kl"] = global_mean(sg(per_token_kl))
    if h is not None:
        metrics["entropy"] = global_mean(sg(h))
    c1 = sg(coef_1)
    if loss_type in _CLIPPED_LOSS_TYPES:
        low = ((c1 < 1.0 - epsilon_low) & (adv < 0)).astype(jnp.float32)
        high = ((c1 > 1.0 + epsilon_high) & (adv > 0)).astype(jnp.float32)
        region = jnp.maximum(low, high)
        metrics["clip_ratio/low_mean"] = global_mean(low)
        metrics["clip_ratio/high_mean"] = global_mean(high)
        metrics["clip_ratio/region_mean"] = global_mean(region)
        metrics["clip_ratio/low_min"] = nanmin(seq_mean(low))
        metrics["clip_ratio/high_max"] = nanmax(seq_mean(high))
    elif loss_type == "cispo":
        metrics["cispo_clip_ratio"] = global_mean(((c1 > epsilon_high) & (adv > 0)).astype(jnp.float32))
    elif loss_type == "vespo":
        metrics["vespo/phi_seq_mean"] = global_mean(phi_seq)

    return LossTerms(as_f32(numerator), denominator, metrics)


def grpo_loss_and_metrics(*args, **kwargs):
    """``grpo_loss`` returning ``(loss, metrics)``: ``loss`` is the scalar TRL back-propagates for the micro-batch."""
    terms = grpo_loss(*args, **kwargs)
    return terms.loss, terms.metrics
