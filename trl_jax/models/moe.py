"""Mixture-of-experts routing (Qwen3-MoE, Mixtral) as transformers computes it: pure functions of router logits.

The expert layer itself (``SparseMoE`` in :mod:`trl_jax.models.decoder`) dispatches densely: every expert runs on
every token and the routing weights below (zero outside each token's top-k) mix their outputs. That is exact
everywhere (no capacity, no dropped tokens) at ``num_experts / top_k`` times the FLOPs of a routed dispatch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def router_weights(logits: jax.Array, top_k: int, *, normalize: bool) -> jax.Array:
    """Routing weights ``[..., E]`` fp32 from router logits ``[..., E]``: softmax in fp32, the ``top_k`` largest
    probabilities kept (``torch.topk``'s choice), renormalized to sum to 1 when ``normalize`` (Mixtral always,
    Qwen3-MoE by ``norm_topk_prob``), zero for the other experts."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, idx = jax.lax.top_k(probs, top_k)
    if normalize:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
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
