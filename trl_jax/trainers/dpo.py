"""``DPOTrainer``: TRL's direct preference optimisation on the shared loop.

Batch layout: the collator's ``[2B, L]`` (chosen rows, then rejected rows) is regrouped as ``[B, 2, L]`` so the
leading axis is the pair axis — gradient accumulation and data-parallel sharding split pairs, never a pair. The
loss runs one concatenated forward of ``[2b, L]``, takes per-token log-probs of the shifted completion tokens from
the hidden states (``fused_log_probs``: no ``[2b, L, V]`` logits), the reference model's the same way (frozen
``ref_params`` in the train state, or precomputed ``ref_*_logps`` columns), and TRL's DPO loss
(``trl_jax.losses.dpo``) with every ``loss_type`` and option of ``DPOConfig``.

The reference model is a frozen copy of the initial weights by default, or ``ref_model`` (a path / hub id, or a
``(CausalLM, params)`` pair). ``precompute_ref_log_probs=True`` runs the reference once over the datasets before
training and drops the reference weights. ``sync_ref_model=True`` (TR-DPO) mixes the policy into the reference
every ``ref_model_sync_steps`` steps with weight ``ref_model_mixup_alpha``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from trl_jax.configs import DPOConfig
from trl_jax.data.collators import DataCollatorForPreference
from trl_jax.data.tokenization import prepare_preference_dataset
from trl_jax.losses.base import LossTerms, with_router_aux_loss
from trl_jax.losses.dpo import DPOTokenInputs, dpo_loss_terms_from_token_logps
from trl_jax.trainers.base import BaseTrainer, reject_unsupported
from trl_jax.trainers.reference import ReferenceModelMixin, reference_value
from trl_jax.trainers.token_stats import sequence_token_stats

_PAIRED = ("input_ids", "attention_mask", "completion_mask", "position_ids", "segment_ids")


class DPOTrainer(ReferenceModelMixin, BaseTrainer):
    """``DPOTrainer(model, ref_model=None, args=DPOConfig(...), train_dataset=..., eval_dataset=..., processing_class=...)``."""

    _tag = "dpo"
    config_class = DPOConfig

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None, optimizers=None,
                 optimizer_cls_and_kwargs=None, preprocess_logits_for_metrics=None, peft_config=None):
        reject_unsupported("DPOTrainer", compute_metrics=compute_metrics, optimizers=optimizers,
                           optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                           preprocess_logits_for_metrics=preprocess_logits_for_metrics)
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, callbacks, ref_model=ref_model,
                         data_collator=data_collator, peft_config=peft_config)
        if self.args.precompute_ref_log_probs:
            self._precompute_ref_log_probs()

    # ------------------------------------------------------------------ reference model
    def _precompute_ref_log_probs(self):
        """Add ``ref_chosen_logps`` / ``ref_rejected_logps`` columns (TRL's ``precompute_ref_log_probs``)."""
        chunk = self.args.logprob_chunk_size
        ld_alpha = self.args.ld_alpha

        def ref_sums(params, batch):
            b = batch["input_ids"].shape[0]
            flat = {k: jnp.concatenate([batch[k][:, 0], batch[k][:, 1]], axis=0) for k in _PAIRED}
            stats = sequence_token_stats(self.model, params, flat, chunk, extras=False)
            lp, m = stats["logps"], stats["mask"]
            if ld_alpha is not None:
                from trl_jax.losses.dpo import ld_dpo_logps

                c, r = ld_dpo_logps(lp[:b], lp[b:], m[:b], m[b:], ld_alpha)
                return {"ref_chosen_logps": c, "ref_rejected_logps": r}
            seq = jnp.sum(jnp.where(m, lp, 0.0), axis=-1)
            return {"ref_chosen_logps": seq[:b], "ref_rejected_logps": seq[b:]}

        self._precompute_columns(ref_sums)

    # ------------------------------------------------------------------ data
    def _prepare_dataset(self, dataset, split):
        return prepare_preference_dataset(dataset, self.processing_class, self.args, dataset_name=split)

    def _collate(self, rows, num_rows):
        batch = DataCollatorForPreference(
            pad_token_id=self.processing_class.pad_token_id,
            max_length=self.args.max_length,
            truncation_mode=self.args.truncation_mode,
            pad_to_multiple_of=self.args.pad_to_multiple_of,
            pad_batch_to=num_rows,
        )(rows)
        b = num_rows
        out = {k: np.stack([batch[k][:b], batch[k][b:]], axis=1) for k in _PAIRED}  # [B, 2, L]
        for k in ("ref_chosen_logps", "ref_rejected_logps", "example_mask"):
            if k in batch:
                out[k] = batch[k]
        return out

    def _batch_stats(self, batch):
        return {"num_tokens": float(np.sum(batch["attention_mask"]))}

    # ------------------------------------------------------------------ loss
    def _beta(self, step=None):
        return self.args.beta

    def loss_fn(self, params, batch, rng, ref_params=None) -> LossTerms:
        args = self.args
        b = batch["input_ids"].shape[0]
        flat = {k: jnp.concatenate([batch[k][:, 0], batch[k][:, 1]], axis=0) for k in _PAIRED}  # [2b, L]
        coef = self.router_aux_loss_coef  # mixture of experts: TRL adds coef * the policy forward's aux loss
        pol = sequence_token_stats(self.model, params, flat, args.logprob_chunk_size, extras=True,
                                   router_aux=bool(coef))
        ref_kw = {}
        if "ref_chosen_logps" in batch:
            ref_kw = dict(ref_chosen_logps=batch["ref_chosen_logps"], ref_rejected_logps=batch["ref_rejected_logps"])
        else:
            ref_params = self._reference(params, ref_params)  # LoRA without ref_model: the base
            if ref_params is None:
                raise ValueError("DPO needs a reference: ref_params in the train state or precomputed ref log-probs.")
            ref_lp = reference_value(
                pol["logps"],
                lambda rp: sequence_token_stats(self.model, rp, flat, args.logprob_chunk_size, extras=False)["logps"],
                params, ref_params)
            ref_kw = dict(ref_chosen_token_logps=ref_lp[:b], ref_rejected_token_logps=ref_lp[b:])
        m = pol["mask"]
        full = flat["completion_mask"].astype(jnp.float32)
        tokens = DPOTokenInputs(
            chosen_token_logps=pol["logps"][:b], rejected_token_logps=pol["logps"][b:],
            chosen_mask=m[:b], rejected_mask=m[b:],
            chosen_lengths=jnp.sum(full[:b], -1), rejected_lengths=jnp.sum(full[b:], -1),
            chosen_log_sum_sq_probs=pol["lsq"][:b], rejected_log_sum_sq_probs=pol["lsq"][b:],
            chosen_entropy=pol["entropy"][:b], rejected_entropy=pol["entropy"][b:],
            chosen_mean_logits=pol["mean_logits"][:b], rejected_mean_logits=pol["mean_logits"][b:],
            chosen_is_top1=pol["top1"][:b],
            **ref_kw,
        )
        terms = dpo_loss_terms_from_token_logps(
            tokens, ld_alpha=args.ld_alpha, use_weighting=args.use_weighting, beta=self._beta(),
            loss_type=args.loss_type, loss_weights=args.loss_weights, label_smoothing=args.label_smoothing,
            f_divergence_type=args.f_divergence_type, f_alpha_divergence_coef=args.f_alpha_divergence_coef,
            discopop_tau=args.discopop_tau, example_mask=batch["example_mask"],
        )
        return with_router_aux_loss(terms, pol["aux_loss"], coef) if coef else terms
