"""Direct Preference Optimization loss, every ``loss_type`` of TRL's ``DPOTrainer`` (trl 1.16).

Two entry points, one formula:

* :func:`dpo_loss_terms` / :func:`dpo_loss` take per-pair **sequence** quantities (:class:`DPOInputs`, ``[B]``):
  the summed policy and reference log-probs of the chosen and rejected completions plus, where a loss type needs
  them, completion lengths (``ipo``, ``sigmoid_norm``), the chosen NLL (``sft``) and WPO pair weights. This is
  what online DPO feeds from its sampled pairs.
* :func:`dpo_loss_terms_from_token_logps` takes per-token arrays (:class:`DPOTokenInputs`, ``[B, L]``) the way
  ``DPOTrainer._compute_loss`` sees them — per-token log-probs aligned with the next-token labels, zero outside
  the completion, and the completion masks ``completion_mask[..., 1:]`` — and applies LD-DPO (``ld_alpha``), WPO
  (``use_weighting``) and the token-level metrics (``entropy``, ``logits/*``, ``mean_token_accuracy``) before
  calling :func:`dpo_loss_terms`.

Returned :class:`~trl_jax.losses.base.LossTerms`: ``numerator = Σ_pairs Σ_k w_k ℓ_k`` and ``denominator = B``, so
``loss = Σ_k w_k · mean_pairs(ℓ_k)`` as TRL computes it, and micro-batches accumulate exactly. Metric names and
formulas are TRL's (per micro-batch, before TRL's averaging over logging steps).

Everything is fp32, pure and jit-able: ``loss_type`` and the other configuration arguments are Python values (make
them static / close over them), the arrays are traced. Gradients flow into the policy log-probs only (reference
log-probs, WPO weights and metrics are ``stop_gradient``-ed).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from trl_jax.losses.base import LossTerms, as_f32
from trl_jax.ops.masking import masked_count, masked_sum

LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
"""Every ``loss_type`` accepted by TRL 1.16's ``DPOTrainer``."""

F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
"""Accepted ``f_divergence_type`` values (f-DPO)."""

F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
"""Loss types that accept a non-default ``f_divergence_type`` (the others raise, as in TRL)."""

_LENGTH_NORMALIZED = frozenset({"ipo", "sigmoid_norm"})
_SORTING = frozenset({"aot", "aot_unpaired"})


class DPOInputs(NamedTuple):
    """Per-pair sequence quantities, all ``[B]`` (cast to fp32).

    Attributes:
        chosen_logps: policy log-prob of each chosen completion, summed over its tokens (LD-DPO-weighted when
            ``ld_alpha`` is used, as TRL does). Differentiated.
        rejected_logps: same for the rejected completion. Differentiated.
        ref_chosen_logps: reference-model counterpart of ``chosen_logps`` (no gradient).
        ref_rejected_logps: reference-model counterpart of ``rejected_logps`` (no gradient).
        chosen_lengths: completion token count of the chosen sequence (TRL: ``completion_mask.sum(-1)``), used by
            ``ipo`` and ``sigmoid_norm`` (clamped to ≥ 1). Online DPO's un-normalized IPO: pass ones.
        rejected_lengths: same for the rejected sequence.
        chosen_nll: ``-Σ log π(token)`` over the chosen completion tokens, **not** LD-weighted; ``sft`` only.
        chosen_token_counts: number of tokens in ``chosen_nll`` (TRL: ``completion_mask[..., 1:].sum(-1)``);
            ``sft`` only. The SFT term is ``Σ chosen_nll / Σ chosen_token_counts`` over the micro-batch.
        pair_weights: WPO weight of each pair (``w_chosen · w_rejected``, see :func:`wpo_weights`), or ``None`` for
            no weighting. Treated as a constant (no gradient).
    """

    chosen_logps: jax.Array
    rejected_logps: jax.Array
    ref_chosen_logps: jax.Array
    ref_rejected_logps: jax.Array
    chosen_lengths: jax.Array | None = None
    rejected_lengths: jax.Array | None = None
    chosen_nll: jax.Array | None = None
    chosen_token_counts: jax.Array | None = None
    pair_weights: jax.Array | None = None


class DPOTokenInputs(NamedTuple):
    """Per-token inputs, as ``DPOTrainer._compute_loss`` sees them; chosen ``[B, Lc]``, rejected ``[B, Lr]``.

    Position ``t`` holds the log-prob of the label at ``t + 1`` (the shifted labels); the masks are TRL's
    ``completion_mask[..., 1:]``. Log-probs are expected to be 0 outside the mask (as TRL's fused head returns them);
    sums here are masked anyway.

    Attributes:
        chosen_token_logps, rejected_token_logps: policy per-token log-probs, fp32. Differentiated.
        chosen_mask, rejected_mask: 1 on completion tokens (bool or numeric).
        ref_chosen_token_logps, ref_rejected_token_logps: reference per-token log-probs; or ``None`` when
            ``ref_chosen_logps``/``ref_rejected_logps`` (``[B]``, precomputed sums, already LD-weighted as TRL's
            ``precompute_ref_log_probs`` stores them) are given instead.
        chosen_lengths, rejected_lengths: ``[B]`` completion lengths for ``ipo``/``sigmoid_norm`` (TRL uses the
            unshifted ``completion_mask.sum(-1)``); default: the mask sums, which agree whenever the sequence starts
            with at least one prompt token.
        chosen_log_sum_sq_probs, rejected_log_sum_sq_probs: ``log Σ_v p_v²`` per token, needed for
            ``use_weighting`` (WPO).
        chosen_entropy, rejected_entropy: per-token entropy, for the ``entropy`` metric (optional).
        chosen_mean_logits, rejected_mean_logits: per-token mean of the logits over the vocabulary, for
            ``logits/chosen`` and ``logits/rejected`` (optional).
        chosen_is_top1: per-token "label is the argmax" (bool), for ``mean_token_accuracy`` (optional).
    """

    chosen_token_logps: jax.Array
    rejected_token_logps: jax.Array
    chosen_mask: jax.Array
    rejected_mask: jax.Array
    ref_chosen_token_logps: jax.Array | None = None
    ref_rejected_token_logps: jax.Array | None = None
    ref_chosen_logps: jax.Array | None = None
    ref_rejected_logps: jax.Array | None = None
    chosen_lengths: jax.Array | None = None
    rejected_lengths: jax.Array | None = None
    chosen_log_sum_sq_probs: jax.Array | None = None
    rejected_log_sum_sq_probs: jax.Array | None = None
    chosen_entropy: jax.Array | None = None
    rejected_entropy: jax.Array | None = None
    chosen_mean_logits: jax.Array | None = None
    rejected_mean_logits: jax.Array | None = None
    chosen_is_top1: jax.Array | None = None


# ----------------------------------------------------------------------------------------------------------------
# Configuration checks (trace time, Python values)
# ----------------------------------------------------------------------------------------------------------------


def _normalize_loss_types(loss_type: str | Sequence[str], loss_weights: Sequence[float] | None):
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not loss_types:
        raise ValueError(f"`loss_type` is empty. Pass one or more of {list(LOSS_TYPES)}.")
    unknown = [t for t in loss_types if t not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"Unknown DPO loss_type {unknown}. Accepted loss types: {list(LOSS_TYPES)}.")
    if loss_weights is None:
        weights = [1.0] * len(loss_types)
    else:
        weights = [float(w) for w in loss_weights]
        if len(weights) != len(loss_types):
            raise ValueError(
                f"`loss_weights` must have the same length as `loss_type`: got {len(weights)} weights for "
                f"{len(loss_types)} loss types {loss_types}. Pass one weight per loss type, or None for all 1.0."
            )
    return loss_types, weights


def _check_config(loss_types, f_divergence_type, label_smoothing, use_weighting):
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"Unknown f_divergence_type {f_divergence_type!r}. Accepted: {list(F_DIVERGENCE_TYPES)}.")
    if f_divergence_type != "reverse_kl" and not set(loss_types) <= F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"`f_divergence_type={f_divergence_type!r}` is only supported for the loss types "
            f"{sorted(F_DIVERGENCE_LOSS_TYPES)}; got {loss_types}. Use f_divergence_type='reverse_kl' with these."
        )
    if use_weighting and _SORTING & set(loss_types):
        raise ValueError(
            "WPO weighting (`use_weighting` / `pair_weights`) is not supported with 'aot' or 'aot_unpaired': those "
            "losses sort the pairs, which would misalign the per-pair weights. Drop the weights or the loss type."
        )
    if "robust" in loss_types and not (0.0 <= label_smoothing < 0.5):
        warnings.warn(
            f"`label_smoothing` should lie in [0.0, 0.5) for the 'robust' loss; got {label_smoothing}.", stacklevel=3
        )
    if "exo_pair" in loss_types and label_smoothing == 0.0:
        raise ValueError(
            "`label_smoothing` must be > 0 for the 'exo_pair' loss (it is the EXO ε; the paper recommends 1e-3)."
        )


def _check_vector(name, x, batch):
    if x.ndim != 1 or x.shape[0] != batch:
        raise ValueError(f"DPOInputs.{name} must have shape [B]=[{batch}], got {tuple(x.shape)}.")


# ----------------------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------------------


def f_divergence_scores(logratios: jax.Array, f_divergence_type: str = "reverse_kl", alpha: float = 0.5):
    """f'(π/π_ref) of the f-DPO paper, from ``logratios = log π - log π_ref`` ``[B]`` fp32 -> ``[B]`` fp32.

    ``reverse_kl``: the log-ratio itself (standard DPO). ``forward_kl``: ``1 - exp(-r)``. ``js_divergence``:
    ``log 2 + logσ(r)``. ``alpha_divergence``: ``(exp((α-1) r) - 1) / (α-1)`` with the exponent clamped at 80
    (fp32), falling back to ``reverse_kl`` when ``|α - 1| < 1e-6``.
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1.0 - jnp.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + jax.nn.log_sigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        t = jnp.minimum((alpha - 1.0) * logratios, 80.0)
        return (jnp.exp(t) - 1.0) / (alpha - 1.0)
    raise ValueError(f"Unknown f_divergence_type {f_divergence_type!r}. Accepted: {list(F_DIVERGENCE_TYPES)}.")


def sequence_logps(token_logps, mask):
    """Summed log-probs of each sequence: ``[B, L]``, ``[B, L]`` -> ``[B]`` fp32."""
    return masked_sum(token_logps, mask, axis=-1)


def ld_dpo_logps(chosen_token_logps, rejected_token_logps, chosen_mask, rejected_mask, ld_alpha: float):
    """LD-DPO sequence log-probs: ``shared + ld_alpha · tail`` for chosen and rejected, each ``[B]`` fp32.

    For each pair the first ``min(len_chosen, len_rejected)`` completion tokens are "shared" and count fully; the
    completion tokens past that (the verbose tail of the longer response) are scaled by ``ld_alpha``.
    Inputs ``[B, Lc]`` / ``[B, Lr]``.
    """
    chosen_mask = jnp.asarray(chosen_mask, bool)
    rejected_mask = jnp.asarray(rejected_mask, bool)
    shared = jnp.minimum(chosen_mask.sum(-1), rejected_mask.sum(-1))[:, None]

    def weighted(token_logps, mask):
        pos = jnp.cumsum(mask.astype(jnp.int32), axis=-1)  # 1-based position among completion tokens
        shared_mask = mask & (pos <= shared)
        tail_mask = mask & (pos > shared)
        return masked_sum(token_logps, shared_mask, -1) + ld_alpha * masked_sum(token_logps, tail_mask, -1)

    return weighted(chosen_token_logps, chosen_mask), weighted(rejected_token_logps, rejected_mask)


def wpo_weights(token_logps, log_sum_sq_probs, mask):
    """WPO sequence weight ``exp(mean_t(log p_t - log Σ_v p_v²))`` over completion tokens: ``[B, L]`` -> ``[B]``.

    Without gradient (``stop_gradient``). The length is the mask sum clamped to ≥ 1. The pair weight TRL applies
    is ``wpo_weights(chosen...) * wpo_weights(rejected...)``.
    """
    aligned = jax.lax.stop_gradient(as_f32(token_logps) - as_f32(log_sum_sq_probs))
    lengths = jnp.maximum(masked_count(mask, -1), 1.0)
    return jnp.exp(masked_sum(aligned, mask, -1) / lengths)


def _sorted_pairwise(a, b, keep):
    """``sort(a) - sort(b)`` over the kept pairs only (TRL's AOT), returned per row: the j-th smallest difference
    lands on the j-th kept row and padding rows get 0."""
    if keep is None:
        return jnp.sort(a) - jnp.sort(b)
    high = jnp.finfo(jnp.float32).max
    d = jnp.sort(jnp.where(keep, a, high)) - jnp.sort(jnp.where(keep, b, high))
    rows = jnp.argsort(~keep, stable=True)  # kept rows first, in order
    return jnp.zeros_like(d).at[rows].set(d)


def _per_pair_loss(loss_type, *, beta, label_smoothing, discopop_tau, inputs: DPOInputs, lr_c, lr_r, s_c, s_r,
                   keep=None):
    """One loss type's ``[B]`` per-pair loss. ``lr_*``: log-ratios; ``s_*``: f-divergence scores."""
    logsig = jax.nn.log_sigmoid
    delta = s_c - s_r
    if loss_type == "sigmoid":
        return -logsig(beta * delta)
    if loss_type == "hinge":
        return jax.nn.relu(1.0 - beta * delta)
    if loss_type in _LENGTH_NORMALIZED:
        if inputs.chosen_lengths is None or inputs.rejected_lengths is None:
            raise ValueError(
                f"loss_type {loss_type!r} normalizes by completion length: pass DPOInputs.chosen_lengths and "
                "rejected_lengths (completion token counts, [B]); pass ones for an un-normalized loss."
            )
        avg_delta = s_c / jnp.maximum(as_f32(inputs.chosen_lengths), 1.0) - s_r / jnp.maximum(
            as_f32(inputs.rejected_lengths), 1.0
        )
        if loss_type == "ipo":
            return (avg_delta - 1.0 / (2.0 * beta)) ** 2
        return -logsig(beta * avg_delta)
    if loss_type == "exo_pair":
        z = beta * delta
        log_pw = math.log1p(-label_smoothing)
        log_pl = math.log(label_smoothing)
        return jax.nn.sigmoid(z) * (logsig(z) - log_pw) + jax.nn.sigmoid(-z) * (logsig(-z) - log_pl)
    if loss_type == "nca_pair":
        rc, rr = beta * lr_c, beta * lr_r
        return -logsig(rc) - 0.5 * logsig(-rc) - 0.5 * logsig(-rr)
    if loss_type == "robust":
        clean = -(1.0 - label_smoothing) * logsig(beta * delta)
        flipped = -label_smoothing * logsig(-beta * delta)
        return (clean - flipped) / (1.0 - 2.0 * label_smoothing)
    if loss_type == "bco_pair":
        return -logsig(beta * lr_c) - logsig(-beta * lr_r)
    if loss_type == "sppo_hard":
        return (lr_c - 0.5 / beta) ** 2 + (lr_r + 0.5 / beta) ** 2
    if loss_type in _SORTING:
        if loss_type == "aot":
            pi = as_f32(inputs.chosen_logps) - as_f32(inputs.rejected_logps)
            ref = as_f32(inputs.ref_chosen_logps) - as_f32(inputs.ref_rejected_logps)
            d = _sorted_pairwise(pi, jax.lax.stop_gradient(ref), keep)
        else:
            d = _sorted_pairwise(lr_c, lr_r, keep)
        return -logsig(beta * d) * (1.0 - label_smoothing) - logsig(-beta * d) * label_smoothing
    if loss_type == "apo_zero":
        return (1.0 - jax.nn.sigmoid(beta * lr_c)) + jax.nn.sigmoid(beta * lr_r)
    if loss_type == "apo_down":
        return jax.nn.sigmoid(beta * lr_c) + (1.0 - jax.nn.sigmoid(beta * (lr_c - lr_r)))
    if loss_type == "discopop":
        logits = beta * delta
        modulation = jax.nn.sigmoid(logits / discopop_tau)
        return -logsig(logits) * (1.0 - modulation) + jnp.exp(-logits) * modulation
    if loss_type == "sft":
        if inputs.chosen_nll is None or inputs.chosen_token_counts is None:
            raise ValueError(
                "loss_type 'sft' needs DPOInputs.chosen_nll (summed -log-probs of the chosen completion tokens, [B]) "
                "and chosen_token_counts ([B]); dpo_loss_terms_from_token_logps fills them."
            )
        # TRL: mean NLL over all chosen completion tokens of the micro-batch, broadcast to every pair.
        # Padding pairs (``keep`` False) contribute neither NLL nor tokens, so a padded batch equals the
        # unpadded one. (TRL gives NaN when there are no tokens; this gives 0.)
        nll = as_f32(inputs.chosen_nll)
        counts = as_f32(inputs.chosen_token_counts)
        if keep is not None:
            nll = jnp.where(keep, nll, 0.0)
            counts = jnp.where(keep, counts, 0.0)
        total = jnp.maximum(jnp.sum(counts), 1.0)
        return jnp.broadcast_to(jnp.sum(nll) / total, lr_c.shape)
    raise ValueError(f"Unknown DPO loss_type {loss_type!r}. Accepted loss types: {list(LOSS_TYPES)}.")


# ----------------------------------------------------------------------------------------------------------------
# Public losses
# ----------------------------------------------------------------------------------------------------------------


def dpo_loss_terms(
    inputs: DPOInputs,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    example_mask: jax.Array | None = None,
) -> LossTerms:
    """DPO loss from per-pair sequence log-probs, as ``DPOTrainer._compute_loss`` (trl 1.16).

    Args:
        inputs: :class:`DPOInputs` (``[B]`` arrays).
        beta, loss_type, loss_weights, label_smoothing, f_divergence_type, f_alpha_divergence_coef,
            discopop_tau: TRL's ``DPOConfig`` fields of the same names (Python values; static under jit —
            except ``beta``, which may also be a traced fp32 scalar, e.g. online DPO's per-epoch beta list).
            ``loss_type`` is a string or a list combined as ``Σ_k loss_weights[k] · mean(ℓ_k)``.

    Returns:
        ``LossTerms(numerator=Σ_pairs Σ_k w_k ℓ_k, denominator=B, metrics)`` with metrics ``rewards/chosen``,
        ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``.
        With ``inputs.pair_weights`` set, every per-pair loss is multiplied by it (WPO).
        ``example_mask`` (``[B]``, 1 = real pair): padding pairs of a fixed-shape batch are left out of the
        numerator, the denominator (then ``Σ mask``) and the metrics, so the result equals the unpadded batch's.
    """
    loss_types, weights = _normalize_loss_types(loss_type, loss_weights)
    _check_config(loss_types, f_divergence_type, label_smoothing, inputs.pair_weights is not None)
    if isinstance(beta, (int, float)) and beta == 0:  # beta may also be a traced scalar (e.g. a beta schedule)
        raise ValueError("`beta` must be non-zero.")

    chosen_logps = as_f32(inputs.chosen_logps)
    batch = chosen_logps.shape[0] if chosen_logps.ndim == 1 else -1
    for name, value in inputs._asdict().items():
        if value is not None:
            _check_vector(name, jnp.asarray(value), batch)
    rejected_logps = as_f32(inputs.rejected_logps)
    ref_chosen = jax.lax.stop_gradient(as_f32(inputs.ref_chosen_logps))
    ref_rejected = jax.lax.stop_gradient(as_f32(inputs.ref_rejected_logps))
    inputs = inputs._replace(ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)

    lr_c = chosen_logps - ref_chosen
    lr_r = rejected_logps - ref_rejected
    s_c = f_divergence_scores(lr_c, f_divergence_type, f_alpha_divergence_coef)
    s_r = f_divergence_scores(lr_r, f_divergence_type, f_alpha_divergence_coef)
    pair_weights = None if inputs.pair_weights is None else jax.lax.stop_gradient(as_f32(inputs.pair_weights))

    per_pair = jnp.zeros_like(chosen_logps)
    for t, w in zip(loss_types, weights, strict=True):
        ell = _per_pair_loss(
            t,
            beta=beta,
            label_smoothing=label_smoothing,
            discopop_tau=discopop_tau,
            inputs=inputs,
            lr_c=lr_c,
            lr_r=lr_r,
            s_c=s_c,
            s_r=s_r,
            keep=None if example_mask is None else jnp.asarray(example_mask, bool),
        )
        if pair_weights is not None:
            ell = ell * pair_weights
        per_pair = per_pair + w * ell

    if example_mask is None:
        keep = jnp.ones(chosen_logps.shape, bool)
        count = jnp.asarray(chosen_logps.shape[0], jnp.float32)
    else:
        keep = jnp.asarray(example_mask, bool)
        _check_vector("example_mask", keep, batch)
        count = masked_count(keep)

    def mean(x):
        return masked_sum(x, keep) / jnp.maximum(count, 1.0)

    chosen_rewards = jax.lax.stop_gradient(beta * lr_c)
    rejected_rewards = jax.lax.stop_gradient(beta * lr_r)
    metrics = {
        "rewards/chosen": mean(chosen_rewards),
        "rewards/rejected": mean(rejected_rewards),
        "rewards/accuracies": mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "rewards/margins": mean(chosen_rewards - rejected_rewards),
        "logps/chosen": mean(jax.lax.stop_gradient(chosen_logps)),
        "logps/rejected": mean(jax.lax.stop_gradient(rejected_logps)),
    }
    return LossTerms(masked_sum(per_pair, keep), count, metrics)


def dpo_loss(inputs: DPOInputs, **config) -> tuple[jax.Array, dict]:
    """``(loss, metrics)`` of :func:`dpo_loss_terms` (same keyword arguments)."""
    terms = dpo_loss_terms(inputs, **config)
    return terms.loss, terms.metrics


def dpo_token_metrics(tokens: DPOTokenInputs) -> dict:
    """TRL's token-level DPO metrics, from whichever per-token statistics are present in ``tokens``.

    ``entropy``: token-weighted mean entropy over the chosen and rejected completion tokens (0 without tokens);
    ``logits/chosen``, ``logits/rejected``: token-weighted mean of the per-token mean logits;
    ``mean_token_accuracy``: fraction of chosen completion tokens whose label is the argmax.
    """
    sg = jax.lax.stop_gradient
    cm, rm = tokens.chosen_mask, tokens.rejected_mask

    def ratio(num, den):
        return jnp.where(den > 0, num / jnp.maximum(den, 1.0), 0.0)

    metrics = {}
    if tokens.chosen_entropy is not None and tokens.rejected_entropy is not None:
        num = masked_sum(sg(tokens.chosen_entropy), cm) + masked_sum(sg(tokens.rejected_entropy), rm)
        metrics["entropy"] = ratio(num, masked_count(cm) + masked_count(rm))
    if tokens.chosen_mean_logits is not None:
        metrics["logits/chosen"] = ratio(masked_sum(sg(tokens.chosen_mean_logits), cm), masked_count(cm))
    if tokens.rejected_mean_logits is not None:
        metrics["logits/rejected"] = ratio(masked_sum(sg(tokens.rejected_mean_logits), rm), masked_count(rm))
    if tokens.chosen_is_top1 is not None:
        hits = jnp.asarray(tokens.chosen_is_top1, bool) & jnp.asarray(cm, bool)
        metrics["mean_token_accuracy"] = ratio(masked_count(hits), masked_count(cm))
    return metrics


def dpo_loss_terms_from_token_logps(
    tokens: DPOTokenInputs,
    *,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    **config,
) -> LossTerms:
    """DPO loss from per-token log-probs (TRL's ``_compute_loss`` path); ``config`` as in :func:`dpo_loss_terms`.

    ``ld_alpha`` (LD-DPO) weights the tokens past the shared length of each pair, for the policy and the per-token
    reference (precomputed reference sums are used as given). ``use_weighting`` applies WPO pair weights computed
    from ``log_sum_sq_probs``. Metrics: those of :func:`dpo_loss_terms` plus :func:`dpo_token_metrics`.
    """
    chex.assert_rank([tokens.chosen_token_logps, tokens.rejected_token_logps], 2)
    chex.assert_equal_shape([tokens.chosen_token_logps, tokens.chosen_mask])
    chex.assert_equal_shape([tokens.rejected_token_logps, tokens.rejected_mask])
    cm = jnp.asarray(tokens.chosen_mask, bool)
    rm = jnp.asarray(tokens.rejected_mask, bool)

    def seq(c, r):
        if ld_alpha is None:
            return sequence_logps(c, cm), sequence_logps(r, rm)
        return ld_dpo_logps(c, r, cm, rm, ld_alpha)

    chosen_logps, rejected_logps = seq(tokens.chosen_token_logps, tokens.rejected_token_logps)
    if tokens.ref_chosen_token_logps is not None and tokens.ref_rejected_token_logps is not None:
        ref_chosen, ref_rejected = seq(tokens.ref_chosen_token_logps, tokens.ref_rejected_token_logps)
    elif tokens.ref_chosen_logps is not None and tokens.ref_rejected_logps is not None:
        ref_chosen, ref_rejected = tokens.ref_chosen_logps, tokens.ref_rejected_logps
    else:
        raise ValueError(
            "DPOTokenInputs needs reference log-probs: either ref_chosen_token_logps and ref_rejected_token_logps "
            "([B, L]) or precomputed ref_chosen_logps and ref_rejected_logps ([B])."
        )

    pair_weights = None
    if use_weighting:
        if tokens.chosen_log_sum_sq_probs is None or tokens.rejected_log_sum_sq_probs is None:
            raise ValueError(
                "use_weighting=True (WPO) needs DPOTokenInputs.chosen_log_sum_sq_probs and rejected_log_sum_sq_probs "
                "(per-token log Σ_v p_v², [B, L])."
            )
        pair_weights = wpo_weights(tokens.chosen_token_logps, tokens.chosen_log_sum_sq_probs, cm) * wpo_weights(
            tokens.rejected_token_logps, tokens.rejected_log_sum_sq_probs, rm
        )

    inputs = DPOInputs(
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
        chosen_lengths=masked_count(cm, -1) if tokens.chosen_lengths is None else tokens.chosen_lengths,
        rejected_lengths=masked_count(rm, -1) if tokens.rejected_lengths is None else tokens.rejected_lengths,
        chosen_nll=-sequence_logps(tokens.chosen_token_logps, cm),
        chosen_token_counts=masked_count(cm, -1),
        pair_weights=pair_weights,
    )
    terms = dpo_loss_terms(inputs, **config)
    metric_tokens = tokens
    if config.get("example_mask") is not None:  # padding pairs' tokens stay out of the token metrics too
        keep = jnp.asarray(config["example_mask"], bool)[:, None]
        metric_tokens = tokens._replace(chosen_mask=cm & keep, rejected_mask=rm & keep)
    return LossTerms(terms.numerator, terms.denominator, {**terms.metrics, **dpo_token_metrics(metric_tokens)})


def dpo_loss_from_token_logps(tokens: DPOTokenInputs, **kwargs) -> tuple[jax.Array, dict]:
    """``(loss, metrics)`` of :func:`dpo_loss_terms_from_token_logps`."""
    terms = dpo_loss_terms_from_token_logps(tokens, **kwargs)
    return terms.loss, terms.metrics


__all__ = [
    "DPOInputs",
    "DPOTokenInputs",
    "F_DIVERGENCE_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "LOSS_TYPES",
    "dpo_loss",
    "dpo_loss_from_token_logps",
    "dpo_loss_terms",
    "dpo_loss_terms_from_token_logps",
    "dpo_token_metrics",
    "f_divergence_scores",
    "ld_dpo_logps",
    "sequence_logps",
    "wpo_weights",
]
