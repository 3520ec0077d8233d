"""Flax decoder models (Llama family, Gemma 2/3, Phi-3, Qwen3-MoE, Mixtral) with HF safetensors in/out (see ``README_models``).

Public API::

    model, params = from_pretrained("path/or/hub-id", dtype=jnp.bfloat16, mesh=mesh)
    h = model.hidden_states(params, input_ids, positions, segment_ids)      # [B, T, D]
    w = model.lm_head_weight(params)                                          # [D, V]
    save_pretrained(model, params, "out_dir", max_shard_size="2GB", tokenizer=tok)
"""

from trl_jax.models.attention import segment_ids_from_attention_mask, segment_ids_from_positions
from trl_jax.models.config import (
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_ROPE_TYPES,
    ModelConfig,
    config_from_hf,
    load_hf_config,
)
from trl_jax.models.decoder import LOGICAL_AXIS_NAMES
from trl_jax.models.flax_adapter import FlaxModelAdapter
from trl_jax.models.hf_io import from_pretrained, save_pretrained, to_hf_config
from trl_jax.models.model import CausalLM, final_logit_softcapping, value_head_apply
from trl_jax.models.moe import router_aux_loss, router_weights
from trl_jax.models.sharding import DEFAULT_RULES, param_shardings, spec_for

__all__ = [
    "CausalLM",
    "DEFAULT_RULES",
    "FlaxModelAdapter",
    "LOGICAL_AXIS_NAMES",
    "ModelConfig",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_ROPE_TYPES",
    "config_from_hf",
    "final_logit_softcapping",
    "from_pretrained",
    "load_hf_config",
    "param_shardings",
    "router_aux_loss",
    "router_weights",
    "save_pretrained",
    "segment_ids_from_attention_mask",
    "segment_ids_from_positions",
    "spec_for",
    "to_hf_config",
    "value_head_apply",
]
