"""Attention masks (causal + padding + segment + sliding window) and the ``jax.nn.dot_product_attention`` call.

Slots are token indices along the sequence (or KV cache); ``segment ids`` are ints with 0 = padding / empty slot.
Tokens attend to earlier-or-equal slots of their own segment, so left padding, right padding and packed sequences
(several documents per row, positions restarting) are all handled by one mask.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp


def segment_ids_from_attention_mask(attention_mask: jnp.ndarray) -> jnp.ndarray:
    """``[B, T]`` 0/1 attention mask -> ``[B, T]`` int32 segment ids (1 = token, 0 = padding)."""
    return (attention_mask != 0).astype(jnp.int32)


def segment_ids_from_positions(positions: jnp.ndarray) -> jnp.ndarray:
    """Packed rows: a new document starts wherever ``positions`` does not step by +1 (transformers' rule).

    ``positions [B, T]`` -> segment ids ``[B, T]`` int32, starting at 1.
    """
    prev = jnp.concatenate([positions[:, :1] - 1, positions[:, :-1]], axis=1)
    return (1 + jnp.cumsum(positions - prev != 1, axis=1)).astype(jnp.int32)


def build_mask(
    q_slots: jnp.ndarray,
    kv_slots: jnp.ndarray,
    q_segment_ids: jnp.ndarray,
    kv_segment_ids: jnp.ndarray,
) -> jnp.ndarray:
    """Boolean mask ``[B, 1, Tq, S]`` (True = attend): causal by slot, same segment, key not padding.

    ``q_slots [Tq]``/``kv_slots [S]`` int, ``q_segment_ids [B, Tq]``, ``kv_segment_ids [B, S]``.
    A padding query (segment 0) attends to its own slot only, so no softmax row is empty.
    """
    causal = kv_slots[None, :] <= q_slots[:, None]  # [Tq, S]
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # [B, Tq, S]
    valid = (kv_segment_ids != 0)[:, None, :]
    mask = causal[None] & same & valid
    pad_q = (q_segment_ids == 0)[:, :, None] & (kv_slots[None, None, :] == q_slots[None, :, None])
    return (mask | pad_q)[:, None]


def window_mask(q_slots: jnp.ndarray, kv_slots: jnp.ndarray, window) -> jnp.ndarray:
    """``[1, 1, Tq, S]``: key within the sliding window of the query (``q - k < window``, as transformers)."""
    return ((q_slots[:, None] - kv_slots[None, :]) < window)[None, None]


def _use_cudnn(impl: str, q: jnp.ndarray) -> bool:
    if impl == "xla":
        return False
    if impl == "cudnn":
        return True
    # auto: cuDNN on GPU for half precision and shapes it supports; XLA otherwise
    return (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
        and q.shape[1] > 1
    )


def attend(q, k, v, mask, *, scale: float, impl: str = "auto") -> jnp.ndarray:
    """``q [B, T, N, H]``, ``k/v [B, S, K, H]`` (GQA: K divides N), ``mask [B, 1, T, S]`` -> ``[B, T, N, H]``.

    ``impl``: ``"cudnn"`` (GPU; an error if cuDNN refuses), ``"xla"``, or ``"auto"`` (cuDNN where it applies;
    a cuDNN refusal is logged once and XLA used instead).
    """
    if _use_cudnn(impl, q):
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
        except Exception as e:  # noqa: BLE001 - shape/dtype/version cuDNN cannot take: fall back to XLA
            if impl == "cudnn":
                raise
            _warn_fallback(q, e)
    return xla_attention(q, k, v, mask, scale=scale)


_FALLBACKS: set = set()


def _warn_fallback(q, err) -> None:
    key = (q.shape, str(q.dtype), type(err).__name__)
    if key not in _FALLBACKS:
        _FALLBACKS.add(key)
        logging.getLogger("trl_jax").warning(
            "cuDNN attention unavailable for q %s %s (%s: %s); using XLA attention. Set attn_implementation='xla' "
            "to silence this, or 'cudnn' to make it an error.", q.shape, q.dtype, type(err).__name__, err)


def xla_attention(q, k, v, mask, *, scale: float) -> jnp.ndarray:
    """Dense attention as transformers' eager path computes it: scores in the input dtype, softmax in fp32,
    probabilities cast back to the value dtype, so under bf16 both matmuls (and their gradients) are bf16."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k).astype(jnp.float32) * scale
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).astype(q.dtype).reshape(b, t, n, h)
