"""KTO (Kahneman-Tversky Optimization) loss, as TRL 1.16's ``KTOTrainer`` computes it.

Pure, jit-compatible, fixed-shape. Instead of TRL's ragged ``chosen``/``rejected`` index selections, every example
of the batch stays in place and a boolean ``label [B]`` says whether it is desirable (``True``, TRL's "chosen") or
undesirable (``False``, "rejected"). An optional ``example_mask [B]`` drops padding rows (for fixed-size buckets).

With ``u = policy_logps - ref_logps`` (sequence log-probs: sums over completion tokens) and the KL reference point
``z_ref`` (see :func:`kto_kl_reference_point`):

* ``"kto"`` (KTO paper, Eq. 7): desirable ``1 - sigmoid(beta * (u - z_ref))``, undesirable
  ``1 - sigmoid(beta * (z_ref - u))``.
* ``"apo_zero_unpaired"`` (APO paper, unpaired APO-zero): desirable ``1 - sigmoid(beta * u)``, undesirable
  ``sigmoid(beta * u)``; no KL term (``kl`` is logged as 0).

Loss: ``nanmean(concat(desirable_weight * l_desirable, undesirable_weight * l_undesirable))`` — a plain mean over the
batch's examples (weights are not renormalised), NaN losses excluded. ``numerator`` is the sum of the weighted
non-NaN losses, ``denominator`` their count.

Metrics (TRL names; values as TRL logs them for one ``compute_loss`` call; ``stop_gradient`` throughout):

* ``kl``: ``z_ref`` (0.0 for ``apo_zero_unpaired``).
* ``rewards/chosen``, ``logps/chosen``: NaN-ignoring sum of ``beta * u`` (resp. ``policy_logps``) over desirable
  examples divided by the number of desirable examples; likewise ``rewards/rejected``, ``logps/rejected``;
  ``rewards/margins = rewards/chosen - rewards/rejected``.
* ``entropy`` (when ``per_token_entropy`` and ``loss_mask`` are given): token-weighted mean entropy over the
  completion tokens of all examples, 0.0 when there are none.
* ``logits/chosen``, ``logits/rejected`` (when ``per_token_mean_logits`` and ``loss_mask`` are given): mean over the
  completion tokens of desirable (undesirable) examples of the vocabulary-mean logit.

TRL does not log a metric at all on a step where its count is zero (no desirable examples, ...); here, with fixed
shapes, such a metric is **NaN, meaning "not logged"**: a logger reproduces TRL's ``sum(values) / len(values)`` over
its window by averaging with ``nanmean``. The loss itself is never NaN from masking (an all-masked batch gives 0).

Not here (trainer-level in TRL): ``num_tokens`` (running total of ``attention_mask.sum()``), the MoE ``aux_loss``
(``router_aux_loss_coef * aux_loss`` added to the loss), the desirable/undesirable weight-balance warning.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from trl_jax.losses.base import LossTerms, as_f32
from trl_jax.ops.masking import masked_count, masked_sum

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def _rows_mask(example_mask, batch: int) -> jax.Array:
    if example_mask is None:
        return jnp.ones((batch,), dtype=bool)
    example_mask = jnp.asarray(example_mask, dtype=bool)
    if example_mask.shape != (batch,):
        raise ValueError(f"example_mask must have shape [B]=({batch},), got {example_mask.shape}")
    return example_mask


def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def kto_kl_reference_point(
    policy_KL_logps: jax.Array,
    ref_KL_logps: jax.Array,
    *,
    example_mask: jax.Array | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """KTO's KL reference point ``z_ref``, detached and clamped at 0, as TRL computes it.

    TRL: ``clamp_min(mean_over_processes(mean_over_local_batch(policy_KL_logps - ref_KL_logps)), 0)`` under
    ``no_grad``. Here the inner mean is over the rows of the given arrays (the set rows of ``example_mask``). Called
    under ``jit`` on a global batch that is the whole cross-process mean; inside ``shard_map``/``pmap`` pass
    ``axis_name`` and the per-shard means are averaged over it (``lax.pmean``), exactly TRL's gather-then-mean.

    Args:
      policy_KL_logps: ``[B]`` sequence log-probs of the mismatched (KL) completions under the policy.
      ref_KL_logps: ``[B]`` the same under the reference model.
      example_mask: optional ``[B]`` bool; unset rows are ignored (a shard with no set row contributes 0).
      axis_name: mapped axis to average the per-shard means over.

    Returns:
      fp32 scalar ``>= 0`` with no gradient.
    """
    policy_KL_logps = as_f32(policy_KL_logps)
    ref_KL_logps = as_f32(ref_KL_logps)
    chex.assert_rank([policy_KL_logps, ref_KL_logps], 1)
    chex.assert_equal_shape([policy_KL_logps, ref_KL_logps])
    rows = _rows_mask(example_mask, policy_KL_logps.shape[0])
    diff = jax.lax.stop_gradient(policy_KL_logps - ref_KL_logps)
    local_mean = masked_sum(diff, rows) / jnp.maximum(masked_count(rows), 1.0)
    if axis_name is not None:
        local_mean = jax.lax.pmean(local_mean, axis_name)
    return jnp.maximum(local_mean, 0.0)


def kto_loss(
    policy_logps: jax.Array,
    ref_logps: jax.Array,
    label: jax.Array,
    policy_KL_logps: jax.Array | None = None,
    ref_KL_logps: jax.Array | None = None,
    *,
    beta: float = 0.1,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl: jax.Array | float | None = None,
    example_mask: jax.Array | None = None,
    loss_mask: jax.Array | None = None,
    per_token_entropy: jax.Array | None = None,
    per_token_mean_logits: jax.Array | None = None,
    axis_name: str | None = None,
) -> LossTerms:
    """TRL's KTO / unpaired APO-zero loss and metrics on a fixed-shape batch.

    Args:
      policy_logps: ``[B]`` fp32 sequence log-probs (sum over completion tokens) of each example under the policy.
      ref_logps: ``[B]`` the same under the reference model (treated as constants: ``stop_gradient``).
      label: ``[B]`` bool, ``True`` = desirable ("chosen"), ``False`` = undesirable ("rejected").
      policy_KL_logps, ref_KL_logps: ``[B]`` sequence log-probs of the mismatched KL completions (TRL's
        ``KL_completion_ids``, each prompt paired with its neighbour's completion). Needed by ``"kto"`` unless
        ``kl`` is given; ignored by ``"apo_zero_unpaired"``.
      beta: KTO's beta.
      loss_type: ``"kto"`` or ``"apo_zero_unpaired"``.
      desirable_weight, undesirable_weight: TRL's lambda_D and lambda_U.
      kl: an already reduced KL reference point (e.g. gathered across hosts by the caller) used instead of
        computing it from the KL log-probs; it is detached and clamped at 0 here (idempotent if already clamped).
      example_mask: optional ``[B]`` bool; unset rows (padding) count nowhere.
      loss_mask: ``[B, T]`` bool, ``True`` where the (already shifted) target token is a completion token; only
        needed for the token metrics below.
      per_token_entropy: optional ``[B, T]`` next-token entropies aligned with ``loss_mask`` -> ``entropy``.
      per_token_mean_logits: optional ``[B, T]`` vocabulary-mean logits aligned with ``loss_mask`` ->
        ``logits/chosen``, ``logits/rejected``.
      axis_name: inside ``shard_map``/``pmap``: the KL reference point is ``pmean``-ed and metric sums/counts are
        ``psum``-med over this axis (TRL's ``gather_for_metrics``); numerator/denominator stay per shard.

    Returns:
      :class:`LossTerms` with fp32 numerator, denominator and TRL-named metrics (see the module docstring).
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"Unknown KTO loss_type {loss_type!r}; supported: {', '.join(KTO_LOSS_TYPES)}.")
    policy_logps = as_f32(policy_logps)
    ref_logps = jax.lax.stop_gradient(as_f32(ref_logps))
    chex.assert_rank([policy_logps, ref_logps], 1)
    chex.assert_equal_shape([policy_logps, ref_logps])
    batch = policy_logps.shape[0]
    label = jnp.asarray(label)
    if label.shape != (batch,):
        raise ValueError(f"label must be a [B]=({batch},) bool array (True = desirable), got shape {label.shape}")
    label = label.astype(bool)
    rows = _rows_mask(example_mask, batch)
    chosen = rows & label
    rejected = rows & ~label

    if loss_type == "kto":
        if kl is None:
            if policy_KL_logps is None or ref_KL_logps is None:
                raise ValueError(
                    "loss_type='kto' needs the KL reference point: pass policy_KL_logps and ref_KL_logps (sequence "
                    "log-probs of the mismatched KL completions) or an already reduced `kl`."
                )
            kl = kto_kl_reference_point(policy_KL_logps, ref_KL_logps, example_mask=rows, axis_name=axis_name)
        else:
            kl = jnp.maximum(jax.lax.stop_gradient(as_f32(kl)), 0.0)
        chex.assert_shape(kl, ())
    else:
        kl = jnp.zeros((), jnp.float32)

    logratios = policy_logps - ref_logps
    if loss_type == "kto":
        chosen_losses = 1.0 - jax.nn.sigmoid(beta * (logratios - kl))
        rejected_losses = 1.0 - jax.nn.sigmoid(beta * (kl - logratios))
    else:  # apo_zero_unpaired
        chosen_losses = 1.0 - jax.nn.sigmoid(beta * logratios)
        rejected_losses = jax.nn.sigmoid(beta * logratios)
    losses = jnp.where(label, desirable_weight * chosen_losses, undesirable_weight * rejected_losses)
    counted = rows & ~jnp.isnan(losses)  # TRL reduces with nanmean
    numerator = masked_sum(losses, counted)
    denominator = masked_count(counted)

    metrics = {"kl": kl}
    rewards = jax.lax.stop_gradient(beta * logratios)
    detached_logps = jax.lax.stop_gradient(policy_logps)
    num = {"chosen": _psum(masked_count(chosen), axis_name), "rejected": _psum(masked_count(rejected), axis_name)}
    for name, sel in (("chosen", chosen), ("rejected", rejected)):
        for key, values in (("rewards", rewards), ("logps", detached_logps)):
            total = _psum(masked_sum(values, sel & ~jnp.isnan(values)), axis_name)  # TRL's nansum
            metrics[f"{key}/{name}"] = jnp.where(num[name] > 0, total / jnp.maximum(num[name], 1.0), jnp.nan)
    metrics["rewards/margins"] = jnp.where(
        (num["chosen"] > 0) & (num["rejected"] > 0), metrics["rewards/chosen"] - metrics["rewards/rejected"], jnp.nan
    )

    if per_token_entropy is not None or per_token_mean_logits is not None:
        if loss_mask is None:
            raise ValueError("per_token_entropy / per_token_mean_logits need loss_mask [B, T] (completion targets).")
        loss_mask = jnp.asarray(loss_mask, dtype=bool)
        if loss_mask.ndim != 2 or loss_mask.shape[0] != batch:
            raise ValueError(f"loss_mask must be [B, T] with B={batch}, got shape {loss_mask.shape}")
        tokens = loss_mask & rows[:, None]
    if per_token_entropy is not None:
        chex.assert_shape(per_token_entropy, loss_mask.shape)
        entropy_sum = _psum(masked_sum(jax.lax.stop_gradient(per_token_entropy), tokens), axis_name)
        total_tokens = _psum(masked_count(tokens), axis_name)
        metrics["entropy"] = jnp.where(total_tokens > 0, entropy_sum / jnp.maximum(total_tokens, 1.0), 0.0)
    if per_token_mean_logits is not None:
        chex.assert_shape(per_token_mean_logits, loss_mask.shape)
        mean_logits = jax.lax.stop_gradient(per_token_mean_logits)
        for name, sel in (("chosen", chosen), ("rejected", rejected)):
            sel_tokens = tokens & sel[:, None]
            total = _psum(masked_sum(mean_logits, sel_tokens), axis_name)
            count = _psum(masked_count(sel_tokens), axis_name)
            metrics[f"logits/{name}"] = jnp.where(count > 0, total / jnp.maximum(count, 1.0), jnp.nan)

    return LossTerms(numerator=numerator, denominator=denominator, metrics=metrics)
