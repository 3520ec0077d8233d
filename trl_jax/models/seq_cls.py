"""Turn a causal LM into a ``*ForSequenceClassification`` model, as transformers does when a ``*ForCausalLM``
checkpoint is loaded with ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=n)``.

The decoder weights are kept, the LM head is dropped and a new ``score`` head ``[D, num_labels]`` (no bias) is drawn
from ``normal(0, initializer_range)`` (transformers' ``_init_weights`` for ``nn.Linear``). The HF config becomes the
family's ``*ForSequenceClassification`` architecture with ``num_labels``, so ``save_pretrained`` writes a checkpoint
``AutoModelForSequenceClassification`` loads.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from trl_jax.models.config import SUPPORTED_ARCHITECTURES
from trl_jax.models.model import CausalLM
from trl_jax.models.sharding import param_shardings

__all__ = ["as_sequence_classifier"]


def as_sequence_classifier(model: CausalLM, params: dict, *, num_labels: int = 1, seed: int = 0, mesh=None,
                           pad_token_id: int | None = None) -> tuple[CausalLM, dict]:
    """``(model, params)`` of a causal LM -> ``(model, params)`` with a random ``score`` head and no LM head.

    ``params`` keep their arrays (and shardings); the new head is placed by the logical-axis rules on ``mesh``
    (replicated on the first local device without one). ``pad_token_id`` (default: the model's) is what the head
    pools on (the last non-pad token)."""
    cfg = model.config
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    new_cfg = cfg.replace(num_labels=num_labels, has_lm_head=False, pad_token_id=pad)
    hf = copy.deepcopy(model.hf_config) if model.hf_config is not None else None
    std = 0.02
    if hf is not None:
        hf.num_labels = num_labels
        hf.architectures = [SUPPORTED_ARCHITECTURES[cfg.model_type][1]]
        hf.pad_token_id = pad
        std = float(getattr(hf, "initializer_range", std) or std)
    new = CausalLM(new_cfg, hf_config=hf, value_head=model.value_head)
    abstract = new.abstract_params()["score"]["kernel"]
    if mesh is not None:
        sharding = param_shardings(new.logical_axes(), new.abstract_params(), mesh)["score"]["kernel"]
    else:
        sharding = SingleDeviceSharding(jax.local_devices()[0])
    kernel = std * jax.random.normal(jax.random.PRNGKey(seed), abstract.shape, jnp.float32)
    out = {k: v for k, v in params.items() if k != "lm_head"}
    out["score"] = {"kernel": jax.device_put(kernel.astype(abstract.dtype), sharding)}
    return new, out
