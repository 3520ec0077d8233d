"""Adapter: a transformers 4.x ``FlaxPreTrainedModel`` (e.g. ``FlaxLlamaForCausalLM``) behind the model protocol.

transformers 5 removed its Flax classes; users who still hold a 4.x Flax model (and its params) can pass it to
the trainers through this adapter. Packed rows (several segments per row) are not supported by those models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


class FlaxModelAdapter:
    """Same protocol as :class:`trl_jax.models.CausalLM`, backed by ``flax_model.module``.

    ``params`` are the Flax model's own params dict (``flax_model.params``).
    """

    def __init__(self, flax_model):
        if not hasattr(flax_model, "module") or not hasattr(flax_model, "init_cache"):
            raise TypeError("FlaxModelAdapter needs a transformers 4.x FlaxPreTrainedModel (with .module/.params).")
        self.hf_model = flax_model
        self.module = flax_model.module
        self.hf_config = flax_model.config

    @staticmethod
    def _mask(input_ids, segment_ids, attention_mask):
        if attention_mask is not None:
            return attention_mask
        if segment_ids is not None:
            many = jnp.max(segment_ids, axis=1) > 1
            if not isinstance(many, jax.core.Tracer) and bool(jnp.any(many)):
                raise ValueError("transformers Flax models cannot attend within packed segments; unpack the rows.")
            return (segment_ids != 0).astype(jnp.int32)
        return jnp.ones_like(input_ids)

    def hidden_states(self, params, input_ids, positions=None, segment_ids=None, attention_mask=None):
        mask = self._mask(input_ids, segment_ids, attention_mask)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        out = self.module.apply({"params": params}, input_ids, mask, positions,
                                output_hidden_states=True, return_dict=True)
        return out.hidden_states[-1]

    def lm_head_weight(self, params):
        if not getattr(self.hf_config, "tie_word_embeddings", False) and "lm_head" in params:
            return params["lm_head"]["kernel"]
        vocab = self.hf_config.vocab_size
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            if getattr(path[-1], "key", None) == "embedding" and leaf.shape[0] == vocab:
                return leaf.T
        raise ValueError("Could not find the tied input embedding in the Flax params.")

    def logits(self, params, input_ids, positions=None, segment_ids=None, attention_mask=None):
        h = self.hidden_states(params, input_ids, positions, segment_ids, attention_mask)
        return h @ self.lm_head_weight(params).astype(h.dtype)

    def init_cache(self, batch, max_len, dtype=None):
        return {"cache": self.hf_model.init_cache(batch, max_len), "attention_mask": jnp.zeros((batch, max_len),
                jnp.int32), "index": jnp.zeros((), jnp.int32)}

    def _step(self, params, cache, input_ids, positions, mask):
        full = jax.lax.dynamic_update_slice(cache["attention_mask"], mask.astype(jnp.int32), (0, cache["index"]))
        out, upd = self.module.apply({"params": params, "cache": cache["cache"]}, input_ids, full, positions,
                                     output_hidden_states=True, return_dict=True, mutable=["cache"])
        new = {"cache": upd["cache"], "attention_mask": full, "index": cache["index"] + input_ids.shape[1]}
        return out.hidden_states[-1], new

    def prefill(self, params, cache, input_ids, positions=None, attention_mask=None, logits_for="last"):
        mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        h, cache = self._step(params, cache, input_ids, positions, mask)
        if logits_for == "last":
            h = h[:, -1]
        return h @ self.lm_head_weight(params).astype(h.dtype), cache

    def decode_step(self, params, cache, tokens, positions):
        h, cache = self._step(params, cache, tokens[:, None], positions[:, None], jnp.ones_like(tokens)[:, None])
        return h[:, 0] @ self.lm_head_weight(params).astype(h.dtype), cache
