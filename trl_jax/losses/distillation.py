"""Knowledge distillation: the generalized Jensen-Shannon divergence of TRL 1.16's ``DistillationTrainer``.

For each completion position the student's and the teacher's next-token distributions are compared over the whole
vocabulary (On-Policy Distillation of Language Models, arXiv 2306.13649, Eq. 1). With ``p_s = softmax(z_s / T)``,
``p_t = softmax(z_t / T)`` and ``m = (1 - beta) p_s + beta p_t``:

* ``beta = 0``: forward KL, ``KL(p_t || p_s)``;
* ``beta = 1``: reverse KL, ``KL(p_s || p_t)``;
* otherwise: ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)`` (``beta = 0.5`` is the symmetric JSD).

Only the student receives gradients. The student's entropy (of ``p_s``, in nats) is TRL's ``entropy`` metric.

Three entry points:

* :func:`per_token_divergence` -- the divergence and the student entropy per position from logits ``[..., V]``;
* :func:`generalized_jsd_loss` -- TRL's ``generalized_jsd_loss`` (``labels`` with -100, ``reduction``,
  ``num_items_in_batch``) on logits;
* :func:`distillation_loss` -- what ``DistillationTrainer.compute_loss`` computes, from the two models' final
  hidden states and LM heads: the logits are formed in sequence chunks that keep every batch row (so on a mesh
  each device works on its own rows), reduced and dropped, and recomputed in the backward pass, so neither model's
  ``[B, T, V]`` logits exist at once. Returns :class:`~trl_jax.losses.base.LossTerms` with ``numerator`` = the sum of
  the divergence over the counted tokens and ``denominator`` = their number: accumulated over micro-batches that is
  TRL's ``sum / num_items_in_batch`` over the generation batch.

Logit post-processing, in TRL's order: ``z * logit_scale``, then ``softcap * tanh(z / softcap)``, then ``/ T``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from trl_jax.losses.base import LossTerms, as_f32
from trl_jax.ops.logprobs import DEFAULT_TOKEN_CHUNK, _chunked_over_tokens


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0.0, 1.0], got {beta}.")
    return beta


def _transform(z, logit_scale, softcap, temperature):
    z = z.astype(jnp.float32)
    if logit_scale is not None and logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * jnp.tanh(z / softcap)
    return z / temperature


def divergence_from_log_probs(student_logps: jax.Array, teacher_logps: jax.Array, beta: float) -> jax.Array:
    """Generalized JSD per row from normalised log-probs ``[..., V]`` (fp32) -> ``[...]``."""
    beta = _check_beta(beta)
    if beta == 0.0:
        return jnp.sum(jnp.exp(teacher_logps) * (teacher_logps - student_logps), axis=-1)
    if beta == 1.0:
        return jnp.sum(jnp.exp(student_logps) * (student_logps - teacher_logps), axis=-1)
    log_m = jnp.logaddexp(student_logps + math.log1p(-beta), teacher_logps + math.log(beta))
    kl_teacher = jnp.sum(jnp.exp(teacher_logps) * (teacher_logps - log_m), axis=-1)
    kl_student = jnp.sum(jnp.exp(student_logps) * (student_logps - log_m), axis=-1)
    return beta * kl_teacher + (1.0 - beta) * kl_student


def per_token_divergence(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    beta: float,
    temperature: float = 1.0,
    student_logit_scale: float | None = None,
    teacher_logit_scale: float | None = None,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``[..., V]`` student and teacher logits -> (divergence ``[...]``, student entropy ``[...]``), fp32.

    The teacher side carries no gradient; the entropy carries none either."""
    zs = _transform(student_logits, student_logit_scale, student_final_logit_softcapping, temperature)
    zt = jax.lax.stop_gradient(_transform(teacher_logits, teacher_logit_scale, teacher_final_logit_softcapping,
                                          temperature))
    log_ps = jax.nn.log_softmax(zs, axis=-1)
    log_pt = jax.nn.log_softmax(zt, axis=-1)
    div = divergence_from_log_probs(log_ps, log_pt, beta)
    ls = jax.lax.stop_gradient(log_ps)
    entropy = -jnp.sum(jnp.exp(ls) * ls, axis=-1)
    return div, entropy


def generalized_jsd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch=None,
) -> jax.Array:
    """TRL's ``generalized_jsd_loss`` (``trl.experimental.gkd.GKDTrainer``), same arguments and reductions.

    ``student_logits``, ``teacher_logits``: ``[B, T, V]``; ``labels``: ``[B, T]`` with -100 where not counted.
    ``"batchmean"``: sum over counted tokens / their number (at least 1), or / ``B`` without labels; ``"sum"``;
    ``"mean"`` (over every counted token-and-vocabulary entry, as ``torch``'s element-wise mean); anything else
    returns the per-token values. ``num_items_in_batch``: sum / it, whatever ``reduction``.
    """
    div, _ = per_token_divergence(student_logits, teacher_logits, beta=beta, temperature=temperature)
    mask = jnp.ones(div.shape, bool) if labels is None else jnp.asarray(labels) != -100
    total = jnp.sum(jnp.where(mask, div, 0.0))
    if num_items_in_batch is not None:
        return total / as_f32(num_items_in_batch)
    if reduction == "batchmean":
        den = jnp.maximum(mask.sum(), 1) if labels is not None else max(div.shape[0], 1)
        return total / den
    if reduction == "sum":
        return total
    if reduction == "mean":
        # torch's kl_div(reduction="none") keeps the vocabulary axis: the mean runs over it too
        return total / (jnp.maximum(mask.sum(), 1) * student_logits.shape[-1])
    return jnp.where(mask, div, 0.0)


def _logits(h, w):
    return jnp.einsum("btd,dv->btv", h.astype(w.dtype), w, preferred_element_type=jnp.float32)


def distillation_loss(
    student_hidden: jax.Array,
    student_lm_head: jax.Array,
    teacher_hidden: jax.Array,
    teacher_lm_head: jax.Array,
    completion_mask: jax.Array,
    *,
    beta: float = 1.0,
    temperature: float = 1.0,
    student_lm_head_bias: jax.Array | None = None,
    teacher_lm_head_bias: jax.Array | None = None,
    student_logit_scale: float | None = None,
    teacher_logit_scale: float | None = None,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    chunk_size: int | None = DEFAULT_TOKEN_CHUNK,
) -> LossTerms:
    """TRL 1.16's ``DistillationTrainer`` loss of one micro-batch from hidden states.

    Args:
      student_hidden: ``[B, K, Ds]`` student final hidden states at the positions that predict the completion tokens.
      student_lm_head: ``[Ds, V]`` (a tied embedding ``[V, Ds]`` passed transposed).
      teacher_hidden: ``[B, K, Dt]`` the teacher's, same positions (``Dt`` may differ from ``Ds``; the vocabulary
        must be the same).
      teacher_lm_head: ``[Dt, V]``.
      completion_mask: ``[B, K]``; 1 = counted (TRL's ``completion_mask``, times ``tool_mask``).
      beta, temperature: the divergence (module docstring) and the softmax temperature of both models.
      chunk_size: tokens per chunk (``None``: all at once, materialising both ``[B, K, V]``).

    Returns:
      ``LossTerms(numerator=sum of the divergence, denominator=number of counted tokens, metrics={"entropy": mean
      student entropy over counted tokens (0 when none)})``.
    """
    beta = _check_beta(beta)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_lm_head.shape[-1] != teacher_lm_head.shape[-1]:
        raise ValueError(f"student vocabulary {student_lm_head.shape[-1]} != teacher vocabulary "
                         f"{teacher_lm_head.shape[-1]}: distillation needs a shared vocabulary.")
    teacher_hidden = jax.lax.stop_gradient(teacher_hidden)
    teacher_lm_head = jax.lax.stop_gradient(teacher_lm_head)
    if teacher_lm_head_bias is not None:
        teacher_lm_head_bias = jax.lax.stop_gradient(teacher_lm_head_bias)
    mask = jnp.asarray(completion_mask).astype(bool)

    def fn(hs, ht, m):
        zs, zt = _logits(hs, student_lm_head), _logits(ht, teacher_lm_head)
        if student_lm_head_bias is not None:
            zs = zs + student_lm_head_bias.astype(jnp.float32)
        if teacher_lm_head_bias is not None:
            zt = zt + teacher_lm_head_bias.astype(jnp.float32)
        div, ent = per_token_divergence(
            zs, zt, beta=beta, temperature=temperature, student_logit_scale=student_logit_scale,
            teacher_logit_scale=teacher_logit_scale, student_final_logit_softcapping=student_final_logit_softcapping,
            teacher_final_logit_softcapping=teacher_final_logit_softcapping)
        return jnp.where(m, div, 0.0), jnp.where(m, ent, 0.0)

    if chunk_size is None:
        div, ent = fn(student_hidden, teacher_hidden, mask)
    else:
        div, ent = _chunked_over_tokens(fn, [student_hidden, teacher_hidden, mask], chunk_size)
    count = as_f32(mask.sum())
    entropy = jax.lax.stop_gradient(jnp.sum(ent) / jnp.maximum(count, 1.0))
    return LossTerms(jnp.sum(div), count, {"entropy": entropy})
