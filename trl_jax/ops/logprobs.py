"""Per-token log-probabilities and entropies without full fp32 copies of the logits.

Three entry points, all jit-compatible and differentiable, all returning fp32 whatever the input dtype:

* :func:`selective_log_softmax` — ``log_softmax(logits)[index]`` from materialised logits ``[..., V]``, computed
  as ``logits[index] - logsumexp(logits)``. By default (``chunk_size=None``) this is one expression that XLA fuses
  into a single reduction pass: the fp32 upcast happens in registers and no ``[..., V]`` temporary exists, in the
  forward or the backward pass (checked with XLA's memory analysis). With ``chunk_size=k`` the sequence is processed
  in chunks of about ``k / B`` positions holding every batch row (a ``lax.scan`` whose body is rematerialised),
  which bounds the temporaries to ``O(k * V)`` even where a backend declines to fuse. Caveat: XLA:CPU has no native bf16 arithmetic and upcasts whole bf16 arrays,
  so bf16 logits on CPU cost one fp32 copy either way; fp32 on CPU and bf16 on GPU/TPU do not.
* :func:`entropy_from_logits` — Shannon entropy (nats) per row, same two modes.
* :func:`fused_log_probs` — log-probs (and optionally entropies) straight from final hidden states ``[B, T, D]``
  and the LM-head weight ``[D, V]``: token chunks of ``hidden @ W`` are formed, reduced and dropped, so neither the
  forward nor the backward pass ever holds ``[B, T, V]``. Gradients equal the unfused computation.

Sharding: chunks run along the sequence, never across batch rows, so under a mesh each device scores only its
own rows; under :func:`trl_jax.parallel.activation_sharding` the LM-head weight is gathered over ``fsdp`` once
(weights move, not logits) and the vocabulary stays split over ``tensor``.

TRL returns bf16 log-probs for bf16 logits; we always reduce in fp32, which is more accurate and is what TRL's
chunked/fused kernels do.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec

from trl_jax.parallel.rules import activation_sharding, active_mesh, active_spec, constrain

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
    """``z [..., V]`` fp32, ``index [..., K]`` -> (selected log-probs ``[..., K]``, entropy ``[...]`` or None)."""
    lse = jax.nn.logsumexp(z, axis=-1)
    # lse = max + log(sum(exp(z - max))) with the sum >= 1, so lse >= z[index] holds in floating point too and
    # every log-prob is <= 0 without clamping (a clamp would halve gradients at exactly 0).
    selected = jnp.take_along_axis(z, index, axis=-1) - lse[..., None]
    entropy = _entropy(z, lse) if want_entropy else None
    return selected, entropy


def _entropy(z: jax.Array, lse: jax.Array) -> jax.Array:
    """``-sum(p * log p)`` over the last axis with ``log p = z - lse``: summing ``p * (z - lse)`` keeps the
    precision that ``lse - sum(p * z)`` loses to cancellation when the logits are large."""
    logp = z - lse[..., None]
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def _batch_time(lead: tuple[int, ...]) -> tuple[int, int]:
    """Leading shape -> ``(B, T)``: the last leading axis is the sequence, the ones before it the batch."""
    if len(lead) >= 2:
        return math.prod(lead[:-1]), lead[-1]
    return 1, math.prod(lead)


def _chunked_over_tokens(fn, arrays, chunk_size: int, batch_axes=("activation_batch",)):
    """Apply ``fn`` (rematerialised) to sequence chunks of ``arrays`` (each ``[B, T, ...]``) and stitch the outputs.

    The batch axis is never split or flattened into the chunk: every chunk holds all ``B`` rows and ``~chunk_size
    / B`` positions, so on a mesh whose batch axes split ``B`` each device computes only its own rows (1/N of
    the work), and a chunk's temporaries are ``O(chunk_size * V)`` globally. ``fn`` maps ``[B, tc, ...]`` chunks
    to a tuple of ``[B, tc, ...]`` outputs.
    """
    b, t = arrays[0].shape[:2]
    tc, padded = _chunk_rows(t, max(1, chunk_size // max(b, 1)))
    if padded != t:
        arrays = [jnp.pad(a, [(0, 0), (0, padded - t)] + [(0, 0)] * (a.ndim - 2)) for a in arrays]
    n = padded // tc

    def body(carry, i):
        xs = [jax.lax.dynamic_slice_in_dim(a, i * tc, tc, axis=1) for a in arrays]
        xs = [constrain(x, tuple(batch_axes) + (None,) * (x.ndim - 1)) for x in xs]
        return carry, fn(*xs)

    _, out = jax.lax.scan(_remat(body), None, jnp.arange(n))
    return jax.tree.map(lambda o: jnp.moveaxis(o, 0, 1).reshape((b, padded) + o.shape[3:])[:, :t], out)


def _rows(fn, arrays, lead: tuple[int, ...], chunk_size: int | None):
    """``fn`` over all positions at once (``chunk_size=None``: XLA fuses it) or over sequence chunks; ``arrays``
    are ``[*lead, ...]`` and ``fn`` maps ``[B, t, ...]`` blocks to a tuple of ``[B, t, ...]`` outputs."""
    b, t = _batch_time(lead)
    arrays = [a.reshape((b, t) + a.shape[len(lead):]) for a in arrays]
    out = fn(*arrays) if chunk_size is None else _chunked_over_tokens(fn, arrays, chunk_size)
    return jax.tree.map(lambda o: o.reshape(lead + o.shape[2:]), out)


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
      chunk_size: ``None`` for one fused pass (default), or tokens per chunk: the last leading axis is split
        into chunks of ``~chunk_size / B`` positions, the leading axes before it (the batch) are kept whole.

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
    lead = logits.shape[:-1]

    def fn(z, idx):
        return _log_softmax_stats(z.astype(jnp.float32) / temperature, idx, want_entropy=False)[0]

    out = _rows(fn, [logits, index.astype(jnp.int32)], lead, chunk_size)
    if squeeze:
        out = out[..., 0]
    if row_mask is not None:
        out = jnp.where(jnp.asarray(row_mask, bool), out, 0.0)
    return out


def entropy_from_logits(logits: jax.Array, *, temperature: float = 1.0, chunk_size: int | None = None) -> jax.Array:
    """Shannon entropy in nats of ``softmax(logits / temperature)`` per row: ``[..., V]`` -> ``[...]`` fp32.

    ``chunk_size``: ``None`` for one fused pass, or tokens per chunk (see the module docstring).
    """
    _check_temperature(temperature)

    def fn(z):
        z = z.astype(jnp.float32) / temperature
        return _entropy(z, jax.nn.logsumexp(z, axis=-1))

    return _rows(fn, [logits], logits.shape[:-1], chunk_size)


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

    def fn(z, idx):
        sel, ent = _log_softmax_stats(z.astype(jnp.float32) / temperature, idx[..., None], want_entropy=True)
        return sel[..., 0], ent

    logps, ent = _rows(fn, [logits, index.astype(jnp.int32)], logits.shape[:-1], chunk_size)
    if row_mask is not None:
        keep = jnp.asarray(row_mask, bool)
        logps, ent = jnp.where(keep, logps, 0.0), jnp.where(keep, ent, 0.0)
    return logps, ent



def _vocab_stats(z, idx, temperature, vocab_axis, vocab_offset, *, entropy, top1, lsq):
    """Per-token statistics of logits ``z [b, t, Vl]`` (fp32) at targets ``idx [b, t]`` (global ids).

    ``vocab_axis``: the mesh axis the vocabulary is split over inside ``shard_map`` (``z`` holds the columns
    ``[vocab_offset, vocab_offset + Vl)``), reduced with ``psum``/``pmax``; ``None`` for the whole vocabulary.
    Returns a tuple: log-prob, then entropy, top-1 flag, ``log sum p^2`` as asked.
    """
    def psum(x):
        return x if vocab_axis is None else jax.lax.psum(x, vocab_axis)

    def pmax(x):
        return x if vocab_axis is None else jax.lax.pmax(x, vocab_axis)

    zt = z / temperature
    m = jax.lax.stop_gradient(pmax(jnp.max(jax.lax.stop_gradient(zt), axis=-1)))
    lse = m + jnp.log(psum(jnp.sum(jnp.exp(zt - m[..., None]), axis=-1)))
    local = idx - vocab_offset
    inside = (local >= 0) & (local < zt.shape[-1])
    picked = jnp.take_along_axis(zt, jnp.clip(local, 0, zt.shape[-1] - 1)[..., None], axis=-1)[..., 0]
    out = [psum(jnp.where(inside, picked, 0.0)) - lse]
    if entropy:
        logp = zt - lse[..., None]
        out.append(psum(-jnp.sum(jnp.exp(logp) * logp, axis=-1)))
    if top1:  # first maximum wins ties, as torch.argmax
        zs = jax.lax.stop_gradient(z)
        lmax = jnp.max(zs, axis=-1)
        gmax = pmax(lmax)
        first = jnp.argmax(zs, axis=-1).astype(jnp.int32) + vocab_offset
        cand = jnp.where(lmax == gmax, first, jnp.iinfo(jnp.int32).max)
        arg = cand if vocab_axis is None else jax.lax.pmin(cand, vocab_axis)
        out.append(arg == idx)
    if lsq:
        z2 = 2.0 * zt
        m2 = jax.lax.stop_gradient(pmax(jnp.max(jax.lax.stop_gradient(z2), axis=-1)))
        out.append(m2 + jnp.log(psum(jnp.sum(jnp.exp(z2 - m2[..., None]), axis=-1))) - 2.0 * lse)
    return tuple(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _narrow_matmul(h, w, dtype):
    """``h [b, t, D] @ w [D, V]`` (``h`` in ``dtype``) with operands in ``dtype`` (bf16/fp16) and fp32
    accumulation, forward and backward (autodiff alone would run the backward matmuls on the fp32 cotangent). ``w`` is an fp32 copy of a
    ``dtype`` weight (exact), so its cotangent is fp32."""
    return jnp.einsum("btd,dv->btv", h.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _narrow_matmul_fwd(h, w, dtype):
    hc, wc = h.astype(dtype), w.astype(dtype)
    return jnp.einsum("btd,dv->btv", hc, wc, preferred_element_type=jnp.float32), (hc, wc)


def _narrow_matmul_bwd(dtype, res, dz):
    hc, wc = res
    dzc = dz.astype(dtype)
    dh = jnp.einsum("btv,dv->btd", dzc, wc, preferred_element_type=jnp.float32).astype(dtype)
    dw = jnp.einsum("btd,btv->dv", hc, dzc, preferred_element_type=jnp.float32)
    return dh, dw


_narrow_matmul.defvjp(_narrow_matmul_fwd, _narrow_matmul_bwd)


def _pvary(x, axes):
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, tuple(axes), to="varying")
    return jax.lax.pvary(x, tuple(axes))


def _sharded_fused(logits_of, hidden, weight, targets, chunk_size, temperature, bspec, want, loop_dtype=None):
    """:func:`fused_log_probs`' chunk loop run per device with ``shard_map`` on the active mesh.

    Each device scores its own batch rows (``hidden [B, T, D]`` split over the batch axes) against the LM-head
    weight gathered over ``fsdp`` once (its vocabulary split over ``tensor``); the chunk loop and its gradient
    accumulation are local, so the weight's gradient is reduced across devices once, not once per chunk.
    """
    mesh = active_mesh()
    vspec = active_spec((None, "activation_vocab"), weight.shape)
    vocab_axes = vspec[1] if len(vspec) > 1 else None
    vocab_axes = None if vocab_axes is None else (vocab_axes if isinstance(vocab_axes, tuple) else (vocab_axes,))
    baxes = bspec[0] if len(bspec) else None
    baxes = () if baxes is None else (baxes if isinstance(baxes, tuple) else (baxes,))
    n_batch = math.prod(mesh.shape[a] for a in baxes)
    local_chunk = max(1, chunk_size // n_batch)
    row_spec = PartitionSpec(baxes or None, None)

    def local(h, w, idx):
        offset = 0
        if vocab_axes is not None:
            shard = 0
            for a in vocab_axes:
                shard = shard * mesh.shape[a] + jax.lax.axis_index(a)
            offset = shard * w.shape[-1]
        if loop_dtype is not None:
            w = w.astype(loop_dtype)
        if baxes:
            # one device-varying copy before the loop: the weight's gradient is then summed across the batch
            # devices once, after the loop (a use inside the loop would psum every chunk's partial gradient)
            w = _pvary(w, baxes)
        with activation_sharding(None):
            return _chunked_over_tokens(
                lambda hc, ic: _vocab_stats(logits_of(hc, w), ic, temperature, vocab_axes, offset, **want),
                [h, idx], local_chunk)

    n_out = 1 + sum(bool(v) for v in want.values())
    return jax.shard_map(
        local, mesh=mesh,
        in_specs=(PartitionSpec(baxes or None, None, None), PartitionSpec(None, vocab_axes), row_spec),
        out_specs=tuple([row_spec] * n_out),
    )(hidden, weight, targets)


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
    lead = hidden.shape[:-1]
    want = dict(entropy=return_entropy, top1=return_top1, lsq=return_log_sum_sq_probs)

    # A bf16/fp16 LM head: both matmuls of every chunk (forward and backward) take operands in that dtype and
    # accumulate in fp32; the weight enters the chunk loop as an exact fp32 copy so that its gradient is summed
    # over chunks (and devices) in fp32 and rounded once.
    narrow = None if jnp.dtype(lm_head_weight.dtype).itemsize >= 4 else jnp.dtype(lm_head_weight.dtype)

    def logits_of(h, w):
        if narrow is not None:
            z = _narrow_matmul(h.astype(narrow), w, narrow)
        else:
            z = jnp.einsum("btd,dv->btv", h.astype(w.dtype), w, preferred_element_type=jnp.float32)
        if logit_scale is not None:
            z = z * logit_scale
        if final_logit_softcapping is not None:
            z = final_logit_softcapping * jnp.tanh(z / final_logit_softcapping)
        return z

    b, t = _batch_time(lead)
    h3, idx2 = hidden.reshape(b, t, hidden.shape[-1]), targets.reshape(b, t).astype(jnp.int32)
    bspec = active_spec(("activation_batch",), (b,))
    if bspec is None:  # no mesh: one local chunk loop
        w = lm_head_weight if narrow is None else lm_head_weight.astype(jnp.float32)
        out = _chunked_over_tokens(
            lambda h, i: _vocab_stats(logits_of(h, w), i, temperature, None, 0, **want), [h3, idx2], chunk_size)
    else:
        out = _sharded_fused(logits_of, h3, lm_head_weight, idx2, chunk_size, temperature, bspec, want,
                             loop_dtype=None if narrow is None else jnp.float32)
    out = [o.reshape(lead) for o in out]
    if mask is not None:
        keep = jnp.asarray(mask, bool)
        out = [jnp.where(keep, o, jnp.zeros((), o.dtype)) for o in out]
    return out[0] if len(out) == 1 else tuple(out)
