"""Jit-compatible array ops: log-probs, entropy, masked reductions, padding."""

from trl_jax.ops.logprobs import (
    entropy_from_logits,
    fused_log_probs,
    selective_log_softmax,
    selective_log_softmax_and_entropy,
)
from trl_jax.ops.masking import masked_count, masked_mean, masked_sum, nanmax, nanmean, nanmin, nanstd
from trl_jax.ops.padding import pad, pad_to_length

__all__ = [
    "entropy_from_logits",
    "fused_log_probs",
    "masked_count",
    "masked_mean",
    "masked_sum",
    "nanmax",
    "nanmean",
    "nanmin",
    "nanstd",
    "pad",
    "pad_to_length",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
]
