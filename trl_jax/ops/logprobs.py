"""Per-token log-probabilities and entropies without full fp32 copies of the logits.

Three entry points, all jit-compatible and differentiable, all returning fp32 whatever the input dtype:

* :func:`selective_log_softmax` — ``log_softmax(logits)[index]`` from materialised logits ``[..., V]``, computed
  as ``logits[index] - logsumexp(logits)``. By default (``chunk_size=None``) this is one expression that XLA fuses
  into a single reduction pass: the fp32 upcast happens in registers and no ``[..., V]`` temporary exists, in the
  forward or the backward pass (checked with XLA's memory analysis). With ``chunk_size=k`` the rows are processed
  ``k`` at a time (a ``lax.scan`` whose body is rematerialised), which bounds the temporaries to ``O(k * V)`` even
  where a backend declines to fuse. Caveat: XLA:CPU has no native bf16 arithmetic and upcasts whole bf16 arrays,
  so bf16 logits on CPU cost one fp32 copy either way; fp32 on CPU and bf16 on GPU/TPU do not.
* :func:`entropy_from_logits` — Shannon entropy (nats) per row, same two modes.
* :func:`fused_log_probs` — log-probs (and optionally entropies) straight from final hidden states ``[B, T, D]``
  and the LM-head weight ``[D, V]``: token chunks of ``hidden @ W`` are formed, reduced and dropped, so neither the
  forward nor the backward pass ever holds ``[B, T, V]``. Gradients equal the unfused computation.

TRL returns bf16 log-probs for bf16 logits; we always reduce in fp32, which is more accurate and is what TRL's
chunked/fused kernels do.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

DEFAULT_TOKEN_CHUNK = 1024

_remat = functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)


def _chunk_rows(n: int, target: int) -> tuple[int, int]:
    """(chunk, padded_n): the largest divisor of ``n`` not above ``target`` when it is reasonably large, else
    ``target`` with ``n`` padded up to a multiple (padding copies the input once, so it is the fallback)."""
    target = max(1, min(target, n))
    for c in range(target, 0, -1):
        if n % c == 0:
            if c * 4 >= target:
                return c, n
            break
    return target, -(-n // target) * target


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def _log_softmax_stats(z: jax.Array, index: jax.Array, want_entropy: bool):
    """``z [C, V]`` fp32, ``index [C, K]`` -> (selected log-probs ``[C, K]``, entropy ``[C]`` or None)."""
    lse = jax.nn.logsumexp(z, axis=-1)
    # lse = max + log(sum(exp(z - max))) with the sum >= 1, so lse >= z[index] holds in floating point too and
    # every log-prob is <= 0 without clamping (a clamp would halve gradients at exactly 0).
    selected = jnp.take_along_axis(z, index, axis=-1) - lse[:, None]
    entropy = None
    if want_entropy:
        p = jnp.exp(z - lse[:, None])
        entropy = lse - jnp.sum(p * z, axis=-1)
    return selected, entropy


def _chunked_over_rows(fn, arrays, n: int, chunk_size: int):
    """Apply ``fn`` (rematerialised) to row chunks of ``arrays`` (each ``[n, ...]``) and stitch the outputs."""
    chunk, padded = _chunk_rows(n, chunk_size)
    if padded != n:
        arrays = [jnp.pad(a, [(0, padded - n)] + [(0, 0)] * (a.ndim - 1)) for a in arrays]
    stacked = [a.reshape((padded // chunk, chunk) + a.shape[1:]) for a in arrays]
    body = _remat(lambda carry, xs: (carry, fn(*xs)))
    _, out = jax.lax.scan(body, None, stacked)
    return jax.tree.map(lambda o: o.reshape((padded,) + o.shape[2:])[:n], out)


def _rows(fn, arrays, n: int, chunk_size: int | None):
    """``fn`` over all rows at once (``chunk_size=None``: XLA fuses it) or over row chunks."""
    if chunk_size is None:
        return fn(*arrays)
    return _chunked_over_rows(fn, arrays, n, chunk_size)


def selective_log_softmax(
    logits: jax.Array,
    index: jax.Array,
    *,
    temperature: float = 1.0,
    row_mask: jax.Array | None = None,
    chunk_size: int | None = None,
) -> jax.Array:
    """Memory-efficient ``take_along_axis(log_softmax(logits / temperature), index)``.

    Args:
      logits: ``[..., V]`` float (fp32, bf16 or fp16).
      index: ``[...]`` int (one token per row) or ``[..., K]`` int (K tokens per row, e.g. top-K).
      temperature: logits are divided by it first (GRPO samples at a temperature).
      row_mask: optional ``[...]`` / ``[..., K]`` mask shaped like ``index``; masked entries return 0.
      chunk_size: ``None`` for one fused pass (default), or rows (flattened leading positions) per chunk.

    Returns:
      fp32 log-probs shaped like ``index``; every entry <= 0.
    """
    _check_temperature(temperature)
    squeeze = index.ndim == logits.ndim - 1
    if squeeze:
        index = index[..., None]
    if index.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"index shape {index.shape} does not match logits leading shape {logits.shape[:-1]}; pass index as "
            "[...] or [..., K] with the logits' leading dimensions"
        )
    lead, vocab, k = logits.shape[:-1], logits.shape[-1], index.shape[-1]
    n = math.prod(lead)
    flat_logits = logits.reshape(n, vocab)
    flat_index = index.reshape(n, k).astype(jnp.int32)

    def fn(z, idx):
        return _log_softmax_stats(z.astype(jnp.float32) / temperature, idx, want_entropy=False)[0]

    out = _rows(fn, [flat_logits, flat_index], n, chunk_size).reshape(lead + (k,))
    if squeeze:
        out = out[..., 0]
    if row_mask is not None:
        out = jnp.where(jnp.asarray(row_mask, bool), out, 0.0)
    return out


def entropy_from_logits(logits: jax.Array, *, temperature: float = 1.0, chunk_size: int | None = None) -> jax.Array:
    """Shannon entropy in nats of ``softmax(logits / temperature)`` per row: ``[..., V]`` -> ``[...]`` fp32.

    ``chunk_size``: ``None`` for one fused pass, or rows per chunk (see the module docstring).
    """
    _check_temperature(temperature)
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    n = math.prod(lead)

    def fn(z):
        z = z.astype(jnp.float32) / temperature
        lse = jax.nn.logsumexp(z, axis=-1)
        return lse - jnp.sum(jnp.exp(z - lse[:, None]) * z, axis=-1)

    return _rows(fn, [logits.reshape(n, vocab)], n, chunk_size).reshape(lead)


def selective_log_softmax_and_entropy(
    logits: jax.Array,
    index: jax.Array,
    *,
    temperature: float = 1.0,
    row_mask: jax.Array | None = None,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Log-probs of ``index [...]`` and entropies, both ``[...]`` fp32, in one chunked pass over ``[..., V]``."""
    _check_temperature(temperature)
    if index.shape != logits.shape[:-1]:
        raise ValueError(f"index shape {index.shape} must equal logits leading shape {logits.shape[:-1]}")
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    n = math.prod(lead)

    def fn(z, idx):
        sel, ent = _log_softmax_stats(z.astype(jnp.float32) / temperature, idx[:, None], want_entropy=True)
        return sel[:, 0], ent

    logps, ent = _rows(
        fn, [logits.reshape(n, vocab), index.reshape(n).astype(jnp.int32)], n, chunk_size
    )
    logps, ent = logps.reshape(lead), ent.reshape(lead)
    if row_mask is not None:
        keep = jnp.asarray(row_mask, bool)
        logps, ent = jnp.where(keep, logps, 0.0), jnp.where(keep, ent, 0.0)
    return logps, ent


def fused_log_probs(
    hidden: jax.Array,
    lm_head_weight: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int = DEFAULT_TOKEN_CHUNK,
    temperature: float = 1.0,
    return_entropy: bool = False,
    return_top1: bool = False,
    return_log_sum_sq_probs: bool = False,
    mask: jax.Array | None = None,
    logit_scale: float | None = None,
    final_logit_softcapping: float | None = None,
):
    """Per-token log-probs of ``targets`` from hidden states, never materialising ``[B, T, V]``.

    ``logits = hidden @ lm_head_weight`` is formed ``chunk_size`` tokens at a time (matmul in the weight's dtype
    with fp32 accumulation), reduced to a log-prob (and entropy) and discarded; the backward pass recomputes each
    chunk (``jax.checkpoint``), so peak temporary memory is ``O(chunk_size * V)``.

    Args:
      hidden: ``[..., D]`` final hidden states (after the final norm), e.g. ``[B, T, D]``.
      lm_head_weight: ``[D, V]`` (a tied embedding ``[V, D]`` must be passed transposed).
      targets: ``[...]`` int token ids to score (already shifted: the token *after* each position).
      chunk_size: tokens per chunk.
      temperature: logits are divided by it (GRPO).
      return_entropy: also return the per-token entropy of the (tempered) distribution.
      return_top1: also return whether each target is the argmax of the logits (first maximum wins ties, as
        ``torch.argmax``), for TRL's ``mean_token_accuracy``.
      return_log_sum_sq_probs: also return ``log(sum_v p_v^2)`` per token (WPO weighting in DPO).
      mask: optional ``[...]``; masked positions return 0 log-prob and 0 entropy.
      logit_scale: optional multiplier on the logits (Cohere-style models).
      final_logit_softcapping: optional ``cap * tanh(logits / cap)`` (Gemma-style models).

    Returns:
      ``logps [...]`` fp32 alone, or a tuple ``(logps, entropy, top1, log_sum_sq_probs)`` (each ``[...]``;
      fp32, fp32, bool, fp32) holding only the parts asked for, in that order.
    """
    _check_temperature(temperature)
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets shape {targets.shape} must equal hidden leading shape {hidden.shape[:-1]}")
    if lm_head_weight.ndim != 2 or lm_head_weight.shape[0] != hidden.shape[-1]:
        raise ValueError(
            f"lm_head_weight must be [D, V] with D={hidden.shape[-1]}, got {lm_head_weight.shape}; "
            "transpose a tied [V, D] embedding"
        )
    lead, dim = hidden.shape[:-1], hidden.shape[-1]
    n = math.prod(lead)

    def fn(h, idx):
        z = jnp.dot(h.astype(lm_head_weight.dtype), lm_head_weight, preferred_element_type=jnp.float32)
        if logit_scale is not None:
            z = z * logit_scale
        if final_logit_softcapping is not None:
            z = final_logit_softcapping * jnp.tanh(z / final_logit_softcapping)
        sel, ent = _log_softmax_stats(z / temperature, idx[:, None], want_entropy=return_entropy)
        out = [sel[:, 0]]
        if return_entropy:
            out.append(ent)
        if return_top1:
            out.append(jnp.argmax(z, axis=-1) == idx)
        if return_log_sum_sq_probs:
            zt = z / temperature
            out.append(jax.nn.logsumexp(2.0 * zt, axis=-1) - 2.0 * jax.nn.logsumexp(zt, axis=-1))
        return tuple(out)

    out = _chunked_over_rows(fn, [hidden.reshape(n, dim), targets.reshape(n).astype(jnp.int32)], n, chunk_size)
    keep = None if mask is None else jnp.asarray(mask, bool)
    out = [o.reshape(lead) for o in out]
    if keep is not None:
        out = [jnp.where(keep, o, jnp.zeros((), o.dtype)) for o in out]
    return out[0] if len(out) == 1 else tuple(out)
