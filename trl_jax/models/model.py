"""The functional model protocol the trainers use: params pytree in, arrays out.

``CausalLM`` is a thin, stateless wrapper (config + linen module); every method is a pure function of ``params``
and jit-able (``jax.jit(model.logits)`` works, ``model`` being a static closure).
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from trl_jax.models.attention import segment_ids_from_attention_mask, segment_ids_from_positions
from trl_jax.models.config import ModelConfig
from trl_jax.models.decoder import Decoder, decode_forward, init_decode_cache
from trl_jax.models.lora import current_dropout_rng

Params = Any


def _unbox(tree):
    return nn.meta.unbox(tree)


class CausalLM:
    """A decoder-only LM (optionally with a sequence-classification ``score`` head and/or TRL's value head).

    Model protocol:
      * ``hidden_states(params, input_ids [B,T], positions [B,T]=None, segment_ids [B,T]=None,
        attention_mask [B,T]=None) -> [B, T, D]`` (final norm applied, compute dtype)
      * ``lm_head_weight(params) -> [D, V]`` (tied: ``embedding.T``)
      * ``logits(...) -> [B, T, V]`` (compute dtype)
      * ``init_cache(batch, max_len, dtype)``, ``prefill(params, cache, input_ids, positions, attention_mask)``,
        ``decode_step(params, cache, tokens [B], positions [B])``
      * ``sequence_scores(...) -> [B, num_labels]`` and ``values(...) -> [B, T]`` fp32 for the heads.

    Masking: ``segment_ids`` (int, 0 = padding; tokens attend causally within their own segment) wins; else
    ``attention_mask`` (0/1); else segments are derived from ``positions`` (a new document wherever positions do
    not step by +1, as transformers detects packed rows); else all tokens attend causally. ``positions`` default to
    ``arange(T)`` like transformers — pass ``cumsum(attention_mask) - 1`` for left padding.
    """

    def __init__(self, config: ModelConfig, hf_config=None, value_head: bool = False):
        self.config = config
        self.hf_config = hf_config
        self.value_head = value_head
        self.module = Decoder(config, value_head=value_head)

    # ------------------------------------------------------------------ params
    def _init_fn(self, rng):
        ids = jnp.zeros((1, 1), jnp.int32)
        slots = jnp.zeros((1,), jnp.int32)
        return self.module.init(rng, ids, ids, ids + 1, slots, method=Decoder.init_all)["params"]

    def init_params(self, rng) -> Params:
        """Random parameters (``param_dtype``), a plain nested dict of arrays."""
        return _unbox(jax.jit(self._init_fn)(rng))

    def abstract_params(self) -> Params:
        """``jax.ShapeDtypeStruct`` tree of the parameters (no allocation)."""
        return _unbox(jax.eval_shape(self._init_fn, jax.random.PRNGKey(0)))

    def logical_axes(self) -> Params:
        """Tree of ``jax.sharding.PartitionSpec`` holding *logical* axis names per parameter dimension."""
        return nn.get_partition_spec(jax.eval_shape(self._init_fn, jax.random.PRNGKey(0)))

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _resolve(input_ids, positions, segment_ids, attention_mask):
        chex.assert_rank(input_ids, 2)
        B, T = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            derived = None
        else:
            derived = positions
        if segment_ids is None:
            if attention_mask is not None:
                segment_ids = segment_ids_from_attention_mask(attention_mask)
            elif derived is not None:
                segment_ids = segment_ids_from_positions(derived)
            else:
                segment_ids = jnp.ones((B, T), jnp.int32)
        chex.assert_equal_shape([input_ids, positions, segment_ids])
        return positions.astype(jnp.int32), segment_ids.astype(jnp.int32)

    # ------------------------------------------------------------------ protocol
    def hidden_states(self, params, input_ids, positions=None, segment_ids=None, attention_mask=None):
        """Final-norm hidden states ``[B, T, D]`` in the compute dtype."""
        positions, seg = self._resolve(input_ids, positions, segment_ids, attention_mask)
        slots = jnp.arange(input_ids.shape[1], dtype=jnp.int32)
        rng = current_dropout_rng() if self.config.lora is not None else None
        rngs = None if rng is None else {"dropout": rng}
        h, _ = self.module.apply({"params": params}, input_ids, positions, seg, seg, slots, slots, rngs=rngs)
        return h

    def lm_head_weight(self, params) -> jnp.ndarray:
        """``[D, V]`` LM-head weight (param dtype); tied models return the embedding transposed."""
        if self.config.tie_word_embeddings:
            return params["embed_tokens"]["embedding"].T
        if "lm_head" not in params:
            raise ValueError("This model has no LM head (a *ForSequenceClassification checkpoint with untied "
                             "embeddings); use sequence_scores(), or load a *ForCausalLM checkpoint.")
        return params["lm_head"]["kernel"]

    def logits_from_hidden(self, params, hidden) -> jnp.ndarray:
        """``hidden [..., D]`` -> logits ``[..., V]`` (compute dtype), soft-capped where the model does (Gemma)."""
        logits = jnp.einsum("...d,dv->...v", hidden, self.lm_head_weight(params).astype(hidden.dtype))
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = (cap * jnp.tanh(logits / cap)).astype(logits.dtype)
        return logits

    def logits(self, params, input_ids, positions=None, segment_ids=None, attention_mask=None):
        """``[B, T, V]`` logits in the compute dtype."""
        return self.logits_from_hidden(params, self.hidden_states(params, input_ids, positions, segment_ids,
                                                                  attention_mask))

    def hidden_states_and_router_logits(self, params, input_ids, positions=None, segment_ids=None,
                                        attention_mask=None):
        """One forward: final-norm hidden states ``[B, T, D]`` and the mixture-of-experts router logits of every
        expert layer ``[L, B, T, E]`` (compute dtype), for :func:`trl_jax.models.moe.router_aux_loss` (transformers'
        ``output_router_logits``)."""
        if not self.config.num_experts:
            raise ValueError(f"{self.config.model_type} has no mixture-of-experts layers (no router logits).")
        positions, seg = self._resolve(input_ids, positions, segment_ids, attention_mask)
        slots = jnp.arange(input_ids.shape[1], dtype=jnp.int32)
        rng = current_dropout_rng() if self.config.lora is not None else None
        rngs = None if rng is None else {"dropout": rng}
        (h, _), state = self.module.apply({"params": params}, input_ids, positions, seg, seg, slots, slots,
                                          rngs=rngs, mutable=["intermediates"])
        inter = state["intermediates"]
        if self.config.scan_layers:
            return h, inter["layers"]["mlp"]["router_logits"][0]
        return h, jnp.stack([inter[f"layers_{i}"]["mlp"]["router_logits"][0]  # expert layers only (as transformers)
                             for i in self.config.sparse_layers])

    def router_logits(self, params, input_ids, positions=None, segment_ids=None, attention_mask=None):
        """Router logits ``[L, B, T, E]`` of :meth:`hidden_states_and_router_logits`."""
        return self.hidden_states_and_router_logits(params, input_ids, positions, segment_ids, attention_mask)[1]

    # ------------------------------------------------------------------ heads
    def sequence_scores(self, params, input_ids, positions=None, segment_ids=None, attention_mask=None,
                        pad_token_id=None):
        """``*ForSequenceClassification`` scores ``[B, num_labels]``: the ``score`` head at the last non-pad token.

        Like transformers, the pooled index is the last position whose ``input_ids != pad_token_id``
        (``pad_token_id`` defaults to the config's; without one, the last position).
        """
        if "score" not in params:
            raise ValueError("params have no `score` head: load a *ForSequenceClassification checkpoint "
                             "(config.architectures) or build the model with a num_labels config.")
        h = self.hidden_states(params, input_ids, positions, segment_ids, attention_mask)
        logits = jnp.einsum("btd,dl->btl", h, params["score"]["kernel"].astype(h.dtype))
        pad = self.config.pad_token_id if pad_token_id is None else pad_token_id
        T = input_ids.shape[1]
        if pad is None:
            idx = jnp.full((input_ids.shape[0],), T - 1)
        else:
            idx = jnp.argmax(jnp.arange(T) * (input_ids != pad), axis=-1)
        return jnp.take_along_axis(logits, idx[:, None, None], axis=1)[:, 0]

    def values(self, params, input_ids, positions=None, segment_ids=None, attention_mask=None):
        """TRL value head: ``v_head.summary`` (fp32) on the final hidden states -> ``[B, T]`` fp32."""
        if "v_head" not in params:
            raise ValueError("params have no `v_head`: build the model with value_head=True "
                             "(from_pretrained(..., value_head=True)).")
        h = self.hidden_states(params, input_ids, positions, segment_ids, attention_mask)
        return value_head_apply(params["v_head"], h)

    # ------------------------------------------------------------------ KV cache
    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        """Preallocated cache: ``k, v [L, B, S, K, Hd]``, ``segment_ids [B, S]`` (0 = empty), ``index`` (next slot).

        The layout of :func:`trl_jax.models.decoder.init_decode_cache`: ``prefill`` / ``decode_step`` update each
        layer's slots in place (``dynamic_update_slice`` into the one buffer), so under ``jax.jit`` with the cache
        donated no call copies or restacks the whole cache."""
        return init_decode_cache(self.config, batch, max_len, dtype)

    def _cached_forward(self, params, cache, input_ids, positions, q_seg):
        return decode_forward(self.config, params, cache, input_ids, positions, q_seg)

    def prefill(self, params, cache, input_ids, positions=None, attention_mask=None, logits_for: str = "last"):
        """Run a (left-padded) prompt ``[B, T]`` through the model, writing slots ``[index, index + T)``.

        Returns ``(logits, cache)``: ``logits [B, V]`` at the last slot (``logits_for="last"``) or ``[B, T, V]``
        (``"all"``). ``positions`` default to ``cumsum(attention_mask) - 1`` (left-padding aware). Runs the in-place
        decode path (:func:`trl_jax.models.decoder.decode_forward`); attention covers the cache's ``S`` slots.
        """
        chex.assert_rank(input_ids, 2)
        if logits_for not in ("last", "all"):
            raise ValueError(f"logits_for must be 'last' or 'all', got {logits_for!r}.")
        mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        q_seg = segment_ids_from_attention_mask(mask)
        h, cache = self._cached_forward(params, cache, input_ids, positions.astype(jnp.int32), q_seg)
        if logits_for == "last":
            h = h[:, -1]
        return self.logits_from_hidden(params, h), cache

    def decode_step(self, params, cache, tokens, positions):
        """One token per row: ``tokens [B]``, ``positions [B]`` -> ``(logits [B, V], cache)``; the new keys/values
        are written in place at slot ``index`` of each layer (donate ``cache`` under ``jax.jit`` to avoid a copy)."""
        chex.assert_rank(tokens, 1)
        q_seg = jnp.ones((tokens.shape[0], 1), jnp.int32)
        h, cache = self._cached_forward(params, cache, tokens[:, None], positions[:, None].astype(jnp.int32), q_seg)
        return self.logits_from_hidden(params, h[:, 0]), cache


def router_aux_loss_coef(model, configured: float | None = None) -> float:
    """The weight of the load-balancing loss TRL adds to the training loss of mixture-of-experts models.

    ``configured``: the trainer config's ``router_aux_loss_coef``. ``None`` (TRL's default) takes the checkpoint's
    own ``router_aux_loss_coef``; a number replaces it (``0.0`` turns the term off). Dense models get 0, and a
    non-zero ``configured`` on a dense model is a ``ValueError`` (as TRL: there are no router logits to weight).
    """
    cfg = getattr(model, "config", None)
    moe = bool(getattr(cfg, "num_experts", 0))
    if configured is None:
        return float(getattr(cfg, "router_aux_loss_coef", 0.0) or 0.0) if moe else 0.0
    if configured and not moe:
        raise ValueError(
            f"router_aux_loss_coef is set to {configured} but the model ({getattr(cfg, 'model_type', '?')}) is not a "
            "mixture-of-experts model, so there is no load-balancing loss to weight: leave router_aux_loss_coef "
            "unset.")
    return float(configured) if moe else 0.0


def final_logit_softcapping(model) -> float | None:
    """The model's final-logit soft-cap (Gemma 2/3), for ``fused_log_probs(..., final_logit_softcapping=)``;
    ``None`` for models without one (or without a ``config`` that says)."""
    return getattr(getattr(model, "config", None), "final_logit_softcapping", None)


def value_head_apply(v_head_params, hidden) -> jnp.ndarray:
    """``summary(hidden)`` in fp32: ``hidden [..., D]`` -> ``[...]``."""
    s = v_head_params["summary"]
    return (jnp.einsum("...d,do->...o", hidden.astype(jnp.float32), s["kernel"].astype(jnp.float32))
            + s["bias"].astype(jnp.float32))[..., 0]
