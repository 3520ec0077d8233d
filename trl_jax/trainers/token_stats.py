"""Per-token statistics of a batch's completion tokens (log-probs, entropy, top-1 flags, log sum p^2, mean
logits) through the fused LM-head kernel: shared by the preference trainers (DPO, KTO)."""

from __future__ import annotations

import jax.numpy as jnp

from trl_jax.models.model import final_logit_softcapping
from trl_jax.models.moe import router_aux_loss
from trl_jax.ops import fused_log_probs


def shifted_completion(batch):
    """``[N, L]`` ids/mask -> next-token targets and their completion mask (last column never counted)."""
    ids, cmask = batch["input_ids"], batch["completion_mask"]
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
    mask = jnp.concatenate([cmask[:, 1:], jnp.zeros_like(cmask[:, :1])], axis=1).astype(bool)
    return targets, mask


def sequence_token_stats(model, params, batch, chunk_size: int, *, extras: bool, router_aux: bool = False):
    """Per-token log-probs (and optionally entropy, top-1 flags, log Σp², mean logits) of the completion tokens.

    ``batch``: ``[N, L]`` arrays (``input_ids``, ``position_ids``, ``segment_ids``, ``completion_mask``).
    Returns a dict of ``[N, L]`` arrays; position ``t`` scores token ``t + 1``. ``router_aux`` (mixture-of-experts
    models): also ``"aux_loss"``, the fp32 load-balancing loss of this forward over its real tokens (transformers'
    ``aux_loss`` with the attention mask).
    """
    inputs = (params, batch["input_ids"], batch["position_ids"], batch["segment_ids"])
    aux = {}
    if router_aux:
        hidden, router_logits = model.hidden_states_and_router_logits(*inputs)
        aux["aux_loss"] = router_aux_loss(router_logits, model.config.num_experts_per_tok, batch["segment_ids"] != 0)
    else:
        hidden = model.hidden_states(*inputs)
    weight = model.lm_head_weight(params)
    cap = final_logit_softcapping(model)
    targets, mask = shifted_completion(batch)
    if not extras:
        return {"logps": fused_log_probs(hidden, weight, targets, chunk_size=chunk_size, mask=mask,
                                         final_logit_softcapping=cap), "mask": mask, **aux}
    logps, ent, top1, lsq = fused_log_probs(
        hidden, weight, targets, chunk_size=chunk_size, mask=mask, final_logit_softcapping=cap,
        return_entropy=True, return_top1=True, return_log_sum_sq_probs=True,
    )
    mean_logits = jnp.einsum("...d,d->...", hidden.astype(jnp.float32), jnp.mean(weight.astype(jnp.float32), axis=1))
    return {"logps": logps, "mask": mask, "entropy": ent, "top1": top1, "lsq": lsq, "mean_logits": mean_logits, **aux}
