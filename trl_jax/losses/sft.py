"""SFT losses (``nll``, ``dft``), as TRL 1.16's ``SFTTrainer.compute_loss`` computes them.

Label convention (TRL's / transformers'): ``labels [B, T]`` are the input ids with ``-100`` on positions that are not
trained on (prompt, padding, non-assistant turns); the logits at position ``t`` predict the label at ``t + 1``.
:func:`shift_labels` turns such labels into same-length ``targets [B, T]`` and ``loss_mask [B, T]`` (the last
position is never counted), so per-token arrays stay aligned with the logits ``[B, T, V]`` and no slicing of the
logits (or of the hidden states of a fused LM head) is needed. Everything else in this module takes **shifted**,
per-token inputs: log-probs of the target tokens (from ``trl_jax.ops.selective_log_softmax`` or
``fused_log_probs``), and optionally entropies and argmax-correct flags.

* ``"nll"``: per-token loss ``-log p(target)``.
* ``"dft"`` (Dynamic Fine-Tuning, arXiv 2508.05629): ``-log p(target) * stop_gradient(p(target))``.
* ``"chunked_nll"``: deprecated alias of ``"nll"`` (TRL's ``SFTConfig`` maps it the same way).

Normalisation: ``numerator`` = sum of the per-token losses over counted tokens; ``denominator`` = the number of
counted tokens, or ``num_items_in_batch`` when given (clamped to >= 1 like TRL). Without ``num_items_in_batch``,
accumulating micro-batches as ``sum(numerators) / sum(denominators)`` gives exactly what TRL/transformers obtain by
passing the global ``num_items_in_batch`` (the count of ``labels[..., 1:] != -100`` over all accumulated micro-batches
and devices) to every micro-batch; with ``num_items_in_batch`` each micro-batch's ``.loss`` is already its share of
that global mean, so such losses are *added*, not re-divided. TRL's ``average_tokens_across_devices`` rescaling
(``loss * num_processes``) only compensates DDP's gradient averaging and has no counterpart on a global batch.

Metrics (TRL names, ``stop_gradient``; 0.0 when no token is counted, as TRL logs):
``entropy`` = mean next-token entropy over counted tokens (when ``per_token_entropy`` is given) and
``mean_token_accuracy`` = fraction of counted tokens whose target is the argmax of the logits, first maximum winning
ties (when ``is_top1`` is given). ``num_tokens`` is a running total kept by the trainer; :func:`num_tokens_in_batch`
gives each batch's contribution as TRL counts it.

Not supported: ``label_smoothing_factor`` (deprecated in TRL; needs full logits), ``compute_loss_func``, the MoE
``aux_loss`` (the trainer adds ``router_aux_loss_coef * aux_loss``).
"""

from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp

from trl_jax.losses.base import LossTerms, as_f32
from trl_jax.ops.masking import masked_count, masked_sum

SFT_LOSS_TYPES = ("nll", "dft")
IGNORE_INDEX = -100


def shift_labels(labels: jax.Array, ignore_index: int = IGNORE_INDEX) -> tuple[jax.Array, jax.Array]:
    """TRL/transformers causal-LM labels -> aligned next-token targets.

    Args:
      labels: ``[B, T]`` int, ``ignore_index`` (-100) where not trained on.

    Returns:
      ``targets [B, T]`` int32 (``labels[:, t + 1]``; 0 where ignored, so it is always a valid index) and
      ``loss_mask [B, T]`` bool (``labels[:, t + 1] != ignore_index``; the last column is False).
    """
    labels = jnp.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be [B, T], got shape {labels.shape}")
    shifted = jnp.concatenate([labels[:, 1:], jnp.full((labels.shape[0], 1), ignore_index, labels.dtype)], axis=1)
    loss_mask = shifted != ignore_index
    return jnp.where(loss_mask, shifted, 0).astype(jnp.int32), loss_mask


def num_tokens_in_batch(attention_mask: jax.Array | None = None, position_ids: jax.Array | None = None) -> jax.Array:
    """A batch's contribution to TRL's ``num_tokens`` metric (a running total over training).

    ``attention_mask.sum()`` when there is one; in padding-free mode (no attention mask), the packed row length
    ``position_ids.shape[1]``. TRL sums this over processes and divides by the tensor-parallel size.
    """
    if attention_mask is not None:
        return jnp.sum(jnp.asarray(attention_mask).astype(jnp.int32))
    if position_ids is not None:
        return jnp.asarray(jnp.shape(position_ids)[1], jnp.int32)
    raise ValueError("num_tokens_in_batch needs attention_mask or (padding-free) position_ids.")


def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def sft_loss(
    per_token_logps: jax.Array,
    loss_mask: jax.Array,
    *,
    loss_type: str = "nll",
    num_items_in_batch: jax.Array | float | None = None,
    per_token_entropy: jax.Array | None = None,
    is_top1: jax.Array | None = None,
    axis_name: str | None = None,
) -> LossTerms:
    """TRL's SFT loss and loss-path metrics.

    Args:
      per_token_logps: ``[B, T]`` fp32 log-probs of the (shifted) target tokens, differentiable.
      loss_mask: ``[B, T]`` bool, ``True`` on counted tokens (see :func:`shift_labels`).
      loss_type: ``"nll"`` or ``"dft"`` (``"chunked_nll"`` accepted as a deprecated alias of ``"nll"``).
      num_items_in_batch: optional global count of counted tokens (gradient accumulation / multi-device); used
        as the denominator instead of this batch's count.
      per_token_entropy: optional ``[B, T]`` next-token entropies -> ``entropy``.
      is_top1: optional ``[B, T]`` bool, target == argmax(logits) (first maximum) -> ``mean_token_accuracy``.
      axis_name: inside ``shard_map``/``pmap``, metric sums and counts are ``psum``-med over this axis (TRL's
        ``gather_for_metrics``); numerator/denominator stay per shard.

    Returns:
      :class:`LossTerms`; ``.loss`` equals TRL's ``compute_loss`` value (0 for a batch without counted tokens).
    """
    if loss_type == "chunked_nll":
        warnings.warn("loss_type='chunked_nll' is deprecated (as in TRL); use 'nll'.", FutureWarning, stacklevel=2)
        loss_type = "nll"
    if loss_type not in SFT_LOSS_TYPES:
        raise ValueError(f"Invalid SFT loss_type {loss_type!r}; supported: {', '.join(SFT_LOSS_TYPES)}.")
    per_token_logps = as_f32(per_token_logps)
    chex.assert_rank(per_token_logps, 2)
    loss_mask = jnp.asarray(loss_mask, dtype=bool)
    if loss_mask.shape != per_token_logps.shape:
        raise ValueError(
            f"loss_mask shape {loss_mask.shape} must equal per_token_logps shape {per_token_logps.shape}; "
            "build both from shifted labels (see shift_labels)."
        )

    logps = jnp.where(loss_mask, per_token_logps, 0.0)
    per_token_loss = -logps
    if loss_type == "dft":
        per_token_loss = per_token_loss * jax.lax.stop_gradient(jnp.exp(logps))
    numerator = masked_sum(per_token_loss, loss_mask)
    count = masked_count(loss_mask)
    if num_items_in_batch is None:
        denominator = count
    else:
        denominator = jnp.maximum(as_f32(num_items_in_batch), 1.0)
        chex.assert_shape(denominator, ())

    metrics = {}
    if per_token_entropy is not None or is_top1 is not None:
        num_valid = _psum(count, axis_name)
        safe = jnp.maximum(num_valid, 1.0)
    if per_token_entropy is not None:
        chex.assert_shape(per_token_entropy, loss_mask.shape)
        entropy_sum = _psum(masked_sum(jax.lax.stop_gradient(per_token_entropy), loss_mask), axis_name)
        metrics["entropy"] = jnp.where(num_valid > 0, entropy_sum / safe, 0.0)
    if is_top1 is not None:
        chex.assert_shape(is_top1, loss_mask.shape)
        num_correct = _psum(masked_count(jnp.asarray(is_top1, bool) & loss_mask), axis_name)
        metrics["mean_token_accuracy"] = jnp.where(num_valid > 0, num_correct / safe, 0.0)
    return LossTerms(numerator=numerator, denominator=denominator, metrics=metrics)
