"""Mixture-of-experts routing (Qwen3-MoE, Mixtral) as transformers computes it, and the two expert dispatches.

The expert layer itself is ``SparseMoE`` in :mod:`trl_jax.models.decoder`; ``ModelConfig.moe_impl`` picks how it
runs the experts (:func:`resolve_moe_impl`):

* ``"dense"``: every expert runs on every token and the routing weights (:func:`router_weights`, zero outside each
  token's top-k) mix their outputs: plain dots that any mesh partitions, ``num_experts / top_k`` times the FLOPs of
  a routed dispatch.
* ``"ragged"`` (:func:`ragged_experts`): the ``N * top_k`` (token, slot) pairs sorted by expert, one grouped matmul
  (``jax.lax.ragged_dot``) per projection over the expert groups, weighted, unsorted and summed per token: the
  routed FLOPs on backends with a grouped-matmul kernel (GPU, TPU). XLA:CPU has none: JAX lowers ``ragged_dot`` there
  to a dot over a masked ``[E, M, K]`` copy of the rows, ``num_experts`` times the routed FLOPs (``top_k`` times the
  dense dispatch's), so ``"auto"`` keeps ``"dense"`` on CPU.

Both are exact (no capacity factor, no dropped tokens) and agree to float rounding; under an active
:func:`trl_jax.parallel.rules.activation_sharding` mesh the ragged dispatch runs per device with ``shard_map`` over
the batch axes (expert kernels gathered, their ``mlp`` dimension split over ``tensor`` with a ``psum``); with an
``expert`` mesh axis > 1 it falls back to the dense dispatch (one log line): expert-parallel routing would need an
all-to-all token exchange, which is not implemented.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

_LOGGED: set = set()


def _log_once(key, msg, *args, level=logging.WARNING) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        logging.getLogger("trl_jax").log(level, msg, *args)


def resolve_moe_impl(impl: str, *, adapted: bool = False, mesh=None) -> str:
    """``ModelConfig.moe_impl`` -> ``"dense"`` or ``"ragged"`` for one trace.

    ``"auto"``: ``"ragged"`` on GPU/TPU, ``"dense"`` on CPU (no grouped-matmul kernel there, see the module doc).
    ``"ragged"`` falls back to ``"dense"`` (one log line naming why) when the expert projections carry LoRA adapters
    (``adapted``; their layers apply them as dense projections), or when ``mesh`` (the active
    activation-sharding mesh) has an ``expert`` axis of size > 1."""
    if impl == "auto":
        impl = "dense" if jax.default_backend() == "cpu" else "ragged"
    if impl != "ragged":
        return "dense"
    if adapted:
        _log_once("adapted", "moe_impl='ragged': the expert projections carry LoRA adapters; those layers use the "
                             "dense expert dispatch.")
        return "dense"
    if mesh is not None and mesh.shape.get("expert", 1) > 1:
        _log_once("expert", "moe_impl='ragged': the mesh splits experts over an `expert` axis of size %d; routed "
                            "expert parallelism (an all-to-all token exchange) is not implemented, so the dense "
                            "dispatch runs (each device its own experts on every token).", mesh.shape["expert"])
        return "dense"
    return impl


def ragged_experts(x, idx, w, gate, up, down, act, *, tensor_axis=None):
    """Routed experts with grouped matmuls: ``x [N, D]``, top-k expert ids ``idx [N, k]`` and routing weights
    ``w [N, k]``; expert kernels ``gate, up [E, D, F]``, ``down [E, F, D]`` -> ``sum_j w_j down_j(act(gate_j x) *
    up_j x)`` ``[N, D]`` in ``x``'s dtype (the routing weight is applied before ``down``, as the dense dispatch
    does). ``tensor_axis``: inside ``shard_map`` with ``F`` split over that axis, the partial sums are ``psum``-ed.
    """
    N, k = idx.shape
    E = gate.shape[0]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, token order within a group
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    xs = jnp.take(x, order // k, axis=0)  # [N*k, D]
    g = jax.lax.ragged_dot(xs, gate, sizes)
    u = jax.lax.ragged_dot(xs, up, sizes)
    h = act(g) * u * jnp.take(w.reshape(-1), order)[:, None].astype(g.dtype)
    y = jax.lax.ragged_dot(h, down, sizes)  # [N*k, D]
    if tensor_axis is not None:
        y = jax.lax.psum(y, tensor_axis)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(N * k, dtype=order.dtype))
    return jnp.sum(jnp.take(y, inverse, axis=0).reshape(N, k, -1), axis=1).astype(x.dtype)


def top_k_routing(logits: jax.Array, top_k: int, *, normalize: bool):
    """``(weights [..., k] fp32, expert ids [..., k])``: the nonzero entries of :func:`router_weights`."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, idx = jax.lax.top_k(probs, top_k)
    if normalize:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    return top, idx


def sharded_ragged_experts(x, idx, w, gate, up, down, act, mesh, batch_spec, tensor_axis):
    """:func:`ragged_experts` per device on ``mesh``: ``x [B, T, D]``, ``idx, w [B, T, k]`` split by ``batch_spec``
    (their first dimension's mesh axes), the kernels gathered except ``F`` over ``tensor_axis`` (or None)."""
    from jax.sharding import PartitionSpec as P

    def local(x, idx, w, gate, up, down):
        B, T, D = x.shape
        y = ragged_experts(x.reshape(B * T, D), idx.reshape(B * T, -1), w.reshape(B * T, -1), gate, up, down, act,
                           tensor_axis=tensor_axis)
        return y.reshape(B, T, D)

    row = P(batch_spec)
    col = P(None, None, tensor_axis)
    return jax.shard_map(local, mesh=mesh, in_specs=(row, row, row, col, col, P(None, tensor_axis, None)),
                         out_specs=row, check_vma=False)(x, idx, w, gate, up, down)


def router_weights(logits: jax.Array, top_k: int, *, normalize: bool) -> jax.Array:
    """Routing weights ``[..., E]`` fp32 from router logits ``[..., E]``: softmax in fp32, the ``top_k`` largest
    probabilities kept (``torch.topk``'s choice), renormalized to sum to 1 when ``normalize`` (Mixtral always,
    Qwen3-MoE by ``norm_topk_prob``), zero for the other experts."""
    top, idx = top_k_routing(logits, top_k, normalize=normalize)
    return jnp.sum(jax.nn.one_hot(idx, logits.shape[-1], dtype=jnp.float32) * top[..., None], axis=-2)


def router_aux_loss(router_logits: jax.Array, top_k: int, mask: jax.Array | None = None) -> jax.Array:
    """transformers' ``load_balancing_loss_func`` (Switch Transformer eqs. 4-6) over all layers.

    ``router_logits [L, B, T, E]``; ``mask [B, T]`` (1 = token counted, as transformers' ``attention_mask``) or
    ``None``. Returns the fp32 scalar ``E * sum_e f_e * P_e``: ``f_e`` the fraction of (token, top-k slot) picks that
    chose expert ``e`` and ``P_e`` its mean routing probability, both over every layer's counted tokens. Multiply by
    ``router_aux_loss_coef`` to add it to a training loss as transformers does with ``output_router_logits``.
    """
    L, B, T, E = router_logits.shape
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    _, idx = jax.lax.top_k(probs, top_k)
    picks = jnp.sum(jax.nn.one_hot(idx, E, dtype=jnp.float32), axis=-2)  # [L, B, T, E]
    w = jnp.ones((B, T), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    rows = L * jnp.sum(w)
    tokens_per_expert = jnp.einsum("lbte,bt->e", picks, w) / rows
    prob_per_expert = jnp.einsum("lbte,bt->e", probs, w) / rows
    return jnp.sum(tokens_per_expert * prob_per_expert) * E
