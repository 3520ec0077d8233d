"""``KTOTrainer``: TRL's Kahneman-Tversky optimisation on the shared loop.

Each row is one (prompt, completion, label) example; paired preference data is unpaired first. For ``loss_type
"kto"`` every row also carries a mismatched completion (its neighbour's, TRL's ``KL_completion_ids``); the
policy-minus-reference log-ratio of those mismatched pairs, averaged over the micro-batch, detached and clamped
at 0, is the KL reference point. Sequence log-probs come from hidden states through ``fused_log_probs`` (no
``[B, L, V]`` logits); the loss and metrics are ``trl_jax.losses.kto``. Rows are read in order
(``train_sampling_strategy="sequential"``, TRL's KTO default) so the mismatched pairs stay within a batch.
"""

from __future__ import annotations

import copy
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from trl_jax.configs import KTOConfig
from trl_jax.data.collators import DataCollatorForUnpairedPreference
from trl_jax.data.tokenization import prepare_unpaired_preference_dataset
from trl_jax.losses.base import LossTerms, with_router_aux_loss
from trl_jax.losses.kto import kto_loss
from trl_jax.trainers.base import BaseTrainer, reject_unsupported
from trl_jax.trainers.token_stats import sequence_token_stats
from trl_jax.trainers.reference import ReferenceModelMixin, reference_value

_SEQ = ("input_ids", "attention_mask", "completion_mask", "position_ids", "segment_ids")


def _part(batch, prefix: str):
    return {k: batch[prefix + k] for k in _SEQ}


def _seq_sum(stats):
    return jnp.sum(jnp.where(stats["mask"], stats["logps"], 0.0), axis=-1)


class KTOTrainer(ReferenceModelMixin, BaseTrainer):
    """``KTOTrainer(model, ref_model=None, args=KTOConfig(...), train_dataset=..., eval_dataset=..., processing_class=...)``."""

    _tag = "kto"
    config_class = KTOConfig

    def __init__(self, model, ref_model=None, args: KTOConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None, optimizers=None,
                 optimizer_cls_and_kwargs=None, preprocess_logits_for_metrics=None, peft_config=None):
        reject_unsupported("KTOTrainer", compute_metrics=compute_metrics, optimizers=optimizers,
                           optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                           preprocess_logits_for_metrics=preprocess_logits_for_metrics)
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, callbacks, ref_model=ref_model,
                         data_collator=data_collator, peft_config=peft_config)
        self._warn_unbalanced()
        if self.args.precompute_ref_log_probs:
            self._precompute_ref_log_probs()

    @property
    def _uses_kl(self) -> bool:
        return self.args.loss_type == "kto"

    def _warn_unbalanced(self) -> None:
        """TRL's check: desirable_weight * n_D / (undesirable_weight * n_U) should lie in [1, 4/3]."""
        labels = np.asarray(self.train_dataset["label"], bool)
        n_d, n_u = int(labels.sum()), int((~labels).sum())
        if n_d == 0 or n_u == 0:
            warnings.warn(f"KTO train set has {n_d} desirable and {n_u} undesirable examples; both kinds are needed "
                          "for the KTO objective to compare them.", stacklevel=3)
            return
        ratio = self.args.desirable_weight * n_d / (self.args.undesirable_weight * n_u)
        if not 1.0 <= ratio <= 4.0 / 3.0:
            warnings.warn(
                f"desirable_weight * #desirable / (undesirable_weight * #undesirable) = {ratio:.3f} is outside "
                "[1, 4/3] (the KTO paper's recommended range); adjust desirable_weight / undesirable_weight.",
                stacklevel=3,
            )

    def _precompute_ref_log_probs(self):
        chunk = self.args.logprob_chunk_size
        uses_kl = self._uses_kl

        def ref_sums(params, batch):
            out = {"ref_logps": _seq_sum(sequence_token_stats(self.model, params, _part(batch, ""), chunk, extras=False))}
            if uses_kl:
                out["ref_KL_logps"] = _seq_sum(
                    sequence_token_stats(self.model, params, _part(batch, "KL_"), chunk, extras=False))
            return out

        self._precompute_columns(ref_sums)

    # ------------------------------------------------------------------ data
    def _prepare_dataset(self, dataset, split):
        # TRL rotates completions within blocks of one process's batch; here a micro-batch spans every
        # data-parallel device, so the mismatched pairs are built within the whole micro-batch.
        args = copy.copy(self.args)
        args.per_device_train_batch_size = self.micro_batch_rows
        if self._uses_kl and self.micro_batch_rows <= 1:
            raise ValueError("KTO's KL reference point needs at least 2 examples per micro-batch (it pairs each "
                             "prompt with another row's completion); raise per_device_train_batch_size.")
        return prepare_unpaired_preference_dataset(dataset, self.processing_class, args, dataset_name=split)

    def _collate(self, rows, num_rows):
        batch = DataCollatorForUnpairedPreference(
            pad_token_id=self.processing_class.pad_token_id,
            max_length=self.args.max_length,
            pad_to_multiple_of=self.args.pad_to_multiple_of,
            pad_batch_to=num_rows,
        )(rows)
        return batch

    def _batch_stats(self, batch):
        return {"num_tokens": float(np.sum(batch["attention_mask"]))}

    # ------------------------------------------------------------------ loss
    def loss_fn(self, params, batch, rng, ref_params=None) -> LossTerms:
        args = self.args
        chunk = args.logprob_chunk_size
        coef = self.router_aux_loss_coef  # mixture of experts: TRL adds coef * the policy forward's aux loss
        pol = sequence_token_stats(self.model, params, _part(batch, ""), chunk, extras=True, router_aux=bool(coef))
        policy_logps = _seq_sum(pol)
        kl_kwargs = {}
        policy_kl = None
        if self._uses_kl:
            policy_kl = jax.lax.stop_gradient(_seq_sum(sequence_token_stats(
                self.model, jax.lax.stop_gradient(params), _part(batch, "KL_"), chunk, extras=False)))
            kl_kwargs["policy_KL_logps"] = policy_kl
        if "ref_logps" in batch:
            ref_logps = batch["ref_logps"]
            if self._uses_kl:
                kl_kwargs["ref_KL_logps"] = batch["ref_KL_logps"]
        else:
            ref_params = self._reference(params, ref_params)  # LoRA without ref_model: the base
            if ref_params is None:
                raise ValueError("KTO needs a reference: ref_params in the train state or precomputed ref log-probs.")
            ref_logps = reference_value(
                policy_logps,
                lambda rp: _seq_sum(sequence_token_stats(self.model, rp, _part(batch, ""), chunk, extras=False)),
                params, ref_params)
            if self._uses_kl:
                kl_kwargs["ref_KL_logps"] = reference_value(
                    policy_kl,
                    lambda rp: _seq_sum(sequence_token_stats(self.model, rp, _part(batch, "KL_"), chunk, extras=False)),
                    params, ref_params)
        terms = kto_loss(
            policy_logps, ref_logps, batch["label"], beta=args.beta, loss_type=args.loss_type,
            desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight,
            example_mask=batch["example_mask"], loss_mask=pol["mask"], per_token_entropy=pol["entropy"],
            per_token_mean_logits=pol["mean_logits"], **kl_kwargs,
        )
        return with_router_aux_loss(terms, pol["aux_loss"], coef) if coef else terms
