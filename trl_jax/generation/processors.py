"""Logits processors with transformers' semantics, as pure functions of ``logits [B, V]`` (fp32).

Each function mirrors one transformers processor (``generation/logits_process.py``) on the case trl_jax
samples in (one sequence per row, ``min_tokens_to_keep=1``, ``filter_value=-inf``):

* :func:`repetition_penalty` -- ``RepetitionPenaltyLogitsProcessor``: every token already present in the row
  (prompt tokens under the attention mask, plus generated tokens) gets ``l * p`` if ``l < 0`` else ``l / p``.
* :func:`temperature` -- ``TemperatureLogitsWarper``: ``l / T``.
* :func:`top_k` -- ``TopKLogitsWarper``: drop tokens whose logit is below the k-th largest (ties at the k-th
  value are kept).
* :func:`top_p` -- ``TopPLogitsWarper``: sort ascending, drop tokens whose ascending cumulative probability is
  ``<= 1 - top_p``; the most likely token is always kept.
* :func:`min_p` -- ``MinPLogitsWarper``: drop tokens whose probability is below ``min_p * max_prob``.

:func:`process_logits` chains them in transformers' ``generate`` order: repetition penalty (a "processor", applied
in greedy decoding too), then -- only when sampling -- temperature, top-k, top-p, min-p (the former "warpers").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def seen_tokens(ids: jnp.ndarray, mask: jnp.ndarray, vocab_size: int) -> jnp.ndarray:
    """``[B, V]`` bool: which token ids occur in each row of ``ids [B, T]`` where ``mask [B, T]`` is nonzero.

    With a left-padded prompt and its attention mask this is the set transformers penalizes
    (``prompt_ignore_length`` = the padding length).
    """
    rows = jnp.arange(ids.shape[0])[:, None]
    cols = jnp.where(mask != 0, ids, vocab_size)  # masked positions go out of range and are dropped
    return jnp.zeros((ids.shape[0], vocab_size), bool).at[rows, cols].set(True, mode="drop")


def repetition_penalty(logits: jnp.ndarray, seen: jnp.ndarray, penalty: float) -> jnp.ndarray:
    """``logits [B, V]`` fp32, ``seen [B, V]`` bool (token occurs in the row) -> penalized logits ``[B, V]``."""
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def temperature(logits: jnp.ndarray, value: float) -> jnp.ndarray:
    """``logits [B, V] / value``."""
    return logits / value


def top_k(logits: jnp.ndarray, k: int) -> jnp.ndarray:
    """Keep the ``k`` largest logits per row (and any tied with the k-th); the rest become ``-inf``."""
    k = min(int(k), logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p(logits: jnp.ndarray, p: float) -> jnp.ndarray:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability mass reaches ``p``.

    Exactly transformers' rule: in ascending order, a token is removed when the cumulative probability up to and
    including it is ``<= 1 - p``; the last (most likely) token is always kept.
    """
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cum <= (1.0 - p)
    remove_sorted = remove_sorted.at[..., -1].set(False)
    rows = jnp.arange(logits.shape[0])[:, None]
    remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
    return jnp.where(remove, NEG_INF, logits)


def min_p(logits: jnp.ndarray, p: float) -> jnp.ndarray:
    """Drop tokens with probability below ``p * max_prob`` (the most likely token always survives)."""
    probs = jax.nn.softmax(logits, axis=-1)
    threshold = p * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < threshold, NEG_INF, logits)


def process_logits(
    logits: jnp.ndarray,
    *,
    do_sample: bool,
    temperature_value: float = 1.0,
    top_k_value: int | None = None,
    top_p_value: float | None = None,
    min_p_value: float | None = None,
    repetition_penalty_value: float | None = None,
    seen: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """transformers' processor chain on next-token ``logits [B, V]`` -> processed fp32 logits ``[B, V]``.

    Options are Python values (static under ``jit``); a disabled option (``None``, ``top_k`` 0, ``top_p`` 1.0,
    ``temperature`` 1.0, ``repetition_penalty`` 1.0) costs nothing, as transformers skips that processor.
    """
    logits = logits.astype(jnp.float32)
    if repetition_penalty_value is not None and repetition_penalty_value != 1.0:
        if seen is None:
            raise ValueError("process_logits: repetition_penalty needs `seen` ([B, V] bool of tokens in each row).")
        logits = repetition_penalty(logits, seen, repetition_penalty_value)
    if not do_sample:
        return logits
    if temperature_value != 1.0:
        logits = temperature(logits, temperature_value)
    if top_k_value:
        logits = top_k(logits, top_k_value)
    if top_p_value is not None and top_p_value < 1.0:
        logits = top_p(logits, top_p_value)
    if min_p_value is not None:
        logits = min_p(logits, min_p_value)
    return logits
