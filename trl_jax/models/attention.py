"""Attention masks (causal + padding + segment + sliding window) and the attention kernels: XLA's dense path,
cuDNN (``jax.nn.dot_product_attention``) on GPU, and the Pallas splash kernel on TPU (:func:`attend` picks).

Slots are token indices along the sequence (or KV cache); ``segment ids`` are ints with 0 = padding / empty slot.
Tokens attend to earlier-or-equal slots of their own segment, so left padding, right padding and packed sequences
(several documents per row, positions restarting) are all handled by one mask.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from trl_jax.parallel.rules import activation_sharding, active_mesh, active_spec


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
    if impl in ("xla", "splash"):
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


# ---------------------------------------------------------------------------------------------------------------------
# Splash attention (Pallas TPU kernel from ``jax.experimental.pallas.ops.tpu.splash_attention``)

# Run the splash kernel in Pallas' interpreter (any backend, CPU included): for tests and debugging only.
SPLASH_INTERPRET = False
# ``window`` value meaning "this layer's sliding window is only known at trace time" (per-layer windows under a
# layer scan): the splash kernel's mask is static, so such calls use XLA attention.
TRACED_WINDOW = -1
_SPLASH_LANES = 128  # the kernel's sequence blocks are multiples of the TPU lane width
_SPLASH_BLOCKS = (512, 256, 128)
# ``auto`` on TPU takes splash from this sequence length on (shorter sequences: XLA's dense path is as fast)
SPLASH_AUTO_MIN_LEN = 128


def static_window(sliding_windows) -> int | None:
    """The ``window`` argument of :func:`attend` for a model whose per-layer windows are ``sliding_windows``
    (``ModelConfig.sliding_windows``): ``None`` without windows, the width when every layer has the same one,
    :data:`TRACED_WINDOW` when layers differ."""
    if sliding_windows is None or all(w is None for w in sliding_windows):
        return None
    ws = set(sliding_windows)
    return int(next(iter(ws))) if len(ws) == 1 else TRACED_WINDOW


def _splash_unavailable(q, k, segment_ids, window) -> str | None:
    """Why the splash kernel cannot take this call (``None`` when it can)."""
    if segment_ids is None:
        return "no segment ids (cached / decode attention: queries are not the keys' own tokens)"
    if q.shape[1] != k.shape[1]:
        return f"query length {q.shape[1]} != key length {k.shape[1]}"
    if window == TRACED_WINDOW:
        return "sliding windows differ between layers (the kernel's mask is static)"
    if q.shape[2] % k.shape[2]:
        return f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} key/value heads"
    return None


def _use_splash(impl: str, q, k, segment_ids, window) -> bool:
    if impl == "splash":
        why = _splash_unavailable(q, k, segment_ids, window)
        if why is not None:
            # cached (decode) attention is XLA's by design: said once at INFO; anything else is a WARNING
            level = logging.INFO if segment_ids is None else logging.WARNING
            _warn_once(("splash", why), "splash attention cannot run this call (%s); using XLA attention.", why,
                       level=level)
            return False
        return True
    return (impl == "auto" and jax.default_backend() == "tpu" and q.shape[1] >= SPLASH_AUTO_MIN_LEN
            and _splash_unavailable(q, k, segment_ids, window) is None)


def _block(length: int) -> int:
    return next(b for b in _SPLASH_BLOCKS if length % b == 0)


def _splash_kernel(num_heads: int, length: int, window: int | None, interpret: bool, softcap: float | None = None):
    """A per-example kernel: ``q [N, T, H]``, ``k/v [K, T, H]`` (GQA by head groups), ``SegmentIds([T], [T])``.

    Causal (or causal within ``window``: key ``k`` visible from query ``q`` when ``q - window < k <= q``, as
    transformers' sliding window) and-ed with equal segment ids. ``length`` is a multiple of 128."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (length, length)
    if window is None or window >= length:
        head_mask = sa.CausalMask(shape=shape)
    else:
        head_mask = sa.LocalMask(shape=shape, window_size=(window - 1, 0), offset=0)
    b = _block(length)
    blocks = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                           block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    # built per trace (its mask-info arrays become constants of the trace that asks; a cached kernel would leak them)
    return sa.make_splash_mha_single_device(sa.MultiHeadMask([head_mask] * num_heads), block_sizes=blocks,
                                            interpret=interpret, attn_logits_soft_cap=softcap)


def splash_attention(q, k, v, segment_ids, *, scale: float, window: int | None = None,
                     interpret: bool | None = None, softcap: float | None = None) -> jnp.ndarray:
    """Self-attention through the Pallas splash kernel: ``q [B, T, N, H]``, ``k/v [B, T, K, H]`` (the same ``T``
    tokens, at slots ``0..T-1``), ``segment_ids [B, T]`` (0 = padding) -> ``[B, T, N, H]``.

    The mask is :func:`build_mask`'s (and :func:`window_mask`'s with a static ``window``): causal within a segment,
    padding keys invisible, a padding query seeing only itself (each padding slot gets a segment of its own). ``T``
    is padded up to a multiple of 128 with such one-slot segments. ``q`` is scaled before the kernel (which then
    soft-caps the scores by ``softcap`` when given, as transformers' Gemma 2 does after scaling). Per-example
    kernels are vmapped over the batch; under :func:`trl_jax.parallel.rules.activation_sharding` the call runs in
    ``jax.shard_map`` over the batch axes (and the heads over ``tensor`` where both head counts divide), so SPMD
    partitioning never sees the kernel.
    """
    interpret = SPLASH_INTERPRET if interpret is None else interpret
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    length = -(-t // _SPLASH_LANES) * _SPLASH_LANES
    slots = jnp.arange(length, dtype=jnp.int32)
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, length - t)))
    seg = jnp.where(seg == 0, -1 - slots[None], seg)  # padding: one segment per slot
    # [B, T, N, H] -> [B, N, T, H], padded along T
    pad = ((0, 0), (0, 0), (0, length - t), (0, 0))
    qt = jnp.pad(jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2), pad)
    kt = jnp.pad(jnp.swapaxes(k, 1, 2), pad)
    vt = jnp.pad(jnp.swapaxes(v, 1, 2), pad)

    def local(qt, kt, vt, seg):
        from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

        kernel = _splash_kernel(qt.shape[1], length, window, bool(interpret), softcap)
        return jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=SegmentIds(s1, s1)))(qt, kt, vt, seg)

    mesh = active_mesh()
    if mesh is None:
        out = local(qt, kt, vt, seg)
    else:
        bspec = active_spec(("activation_batch", None), (b, length))
        baxes = bspec[0] if len(bspec) else None
        hspec_q = active_spec((None, "activation_heads"), (1, n))
        hspec_k = active_spec((None, "activation_kv_heads"), (1, kv_heads))
        hq = hspec_q[1] if len(hspec_q) > 1 else None
        hk = hspec_k[1] if len(hspec_k) > 1 else None
        heads = hq if hq == hk else None  # both head counts split the same way, or neither is split
        spec = PartitionSpec(baxes, heads, None, None)

        def run(qt, kt, vt, seg):
            with activation_sharding(None):
                return local(qt, kt, vt, seg)

        # check_vma off: the Pallas call declares no varying-axes types (every operand here is per-device anyway)
        out = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, PartitionSpec(baxes, None)),
                            out_specs=spec, check_vma=False)(qt, kt, vt, seg)
    return jnp.swapaxes(out[:, :, :t], 1, 2).astype(q.dtype)


def attend(q, k, v, mask, *, scale: float, impl: str = "auto", segment_ids=None, window=None,
           softcap: float | None = None) -> jnp.ndarray:
    """``q [B, T, N, H]``, ``k/v [B, S, K, H]`` (GQA: K divides N), ``mask [B, 1, T, S]`` -> ``[B, T, N, H]``.

    ``impl``: ``"xla"``; ``"cudnn"`` (GPU; an error if cuDNN refuses); ``"splash"`` (the Pallas TPU kernel, see
    :func:`splash_attention`; calls it cannot take are logged once and run on XLA); ``"auto"``: splash on TPU
    (sequences of at least :data:`SPLASH_AUTO_MIN_LEN`), cuDNN on GPU where it applies (a refusal is logged once and
    XLA used instead), XLA otherwise (CPU).

    ``segment_ids [B, T]`` (0 = padding) and ``window`` (a static sliding-window width, ``None`` for none,
    :data:`TRACED_WINDOW` when only ``mask`` carries it) describe ``mask`` for kernels that build their own: pass
    them only when the queries and keys are the same ``T`` tokens at slots ``0..T-1`` (forward passes without a
    cache); ``mask`` must then equal ``build_mask(slots, slots, segment_ids, segment_ids)`` (and the window mask).

    ``softcap``: scaled scores become ``softcap * tanh(scores / softcap)`` before the mask (Gemma 2); the splash
    kernel and XLA take it, cuDNN does not (such calls run on XLA).
    """
    if _use_splash(impl, q, k, segment_ids, window):
        return splash_attention(q, k, v, segment_ids, scale=scale, window=None if window is None else int(window),
                                softcap=softcap)
    if softcap is not None:
        if impl == "cudnn":
            _warn_once(("cudnn", "softcap"), "cuDNN attention takes no logit soft-capping; using XLA attention.")
        return xla_attention(q, k, v, mask, scale=scale, softcap=softcap)
    if _use_cudnn(impl, q):
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
        except Exception as e:  # noqa: BLE001 - shape/dtype/version cuDNN cannot take: fall back to XLA
            if impl == "cudnn":
                raise
            _warn_fallback(q, e)
    return xla_attention(q, k, v, mask, scale=scale)


_FALLBACKS: set = set()


def _warn_once(key, msg, *args, level: int = logging.WARNING) -> None:
    if key not in _FALLBACKS:
        _FALLBACKS.add(key)
        logging.getLogger("trl_jax").log(level, msg, *args)


def _warn_fallback(q, err) -> None:
    _warn_once(
        (q.shape, str(q.dtype), type(err).__name__),
        "cuDNN attention unavailable for q %s %s (%s: %s); using XLA attention. Set attn_implementation='xla' "
        "to silence this, or 'cudnn' to make it an error.", q.shape, q.dtype, type(err).__name__, err)


def xla_attention(q, k, v, mask, *, scale: float, softcap: float | None = None) -> jnp.ndarray:
    """Dense attention as transformers' eager path computes it: scores in the input dtype, softmax in fp32,
    probabilities cast back to the value dtype, so under bf16 both matmuls (and their gradients) are bf16.
    ``softcap``: ``softcap * tanh(scaled scores / softcap)`` before the mask (fp32)."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k).astype(jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).astype(q.dtype).reshape(b, t, n, h)
