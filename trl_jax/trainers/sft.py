"""``SFTTrainer``: TRL's supervised fine-tuning on the shared loop.

Loss: per-token log-probs of the shifted labels straight from the final hidden states and the LM head
(``fused_log_probs``, token chunks of ``logprob_chunk_size``), then TRL's ``nll`` / ``dft`` token mean over counted
tokens (``trl_jax.losses.sft``). Gradient accumulation is exact: the step divides the summed numerators by the
summed token counts of all micro-batches, which is what TRL gets from ``num_items_in_batch``.
Metrics: ``loss``, ``entropy``, ``mean_token_accuracy``, ``num_tokens``, ``grad_norm``, ``learning_rate``.
"""

from __future__ import annotations

import numpy as np

from trl_jax.configs import SFTConfig
from trl_jax.data.collators import DataCollatorForLanguageModeling
from trl_jax.data.tokenization import prepare_sft_dataset
from trl_jax.losses.base import LossTerms, with_router_aux_loss
from trl_jax.losses.sft import shift_labels, sft_loss
from trl_jax.ops import fused_log_probs
from trl_jax.models.model import final_logit_softcapping
from trl_jax.models.moe import router_aux_loss
from trl_jax.trainers.base import BaseTrainer, reject_unsupported


class SFTTrainer(BaseTrainer):
    """``SFTTrainer(model, args=SFTConfig(...), train_dataset=..., eval_dataset=..., processing_class=...)``.

    ``formatting_func`` turns rows into text as in TRL. Datasets: language modeling (``text``), prompt/completion
    and conversational (``messages``, or conversational prompt/completion), raw or already tokenized.
    """

    _tag = "sft"
    config_class = SFTConfig

    def __init__(self, model, args: SFTConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_loss_func=None, compute_metrics=None,
                 callbacks=None, optimizers=None, optimizer_cls_and_kwargs=None, preprocess_logits_for_metrics=None,
                 peft_config=None, formatting_func=None):
        reject_unsupported("SFTTrainer", compute_loss_func=compute_loss_func, compute_metrics=compute_metrics,
                           optimizers=optimizers, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                           preprocess_logits_for_metrics=preprocess_logits_for_metrics)
        self.formatting_func = formatting_func
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, callbacks,
                         data_collator=data_collator, peft_config=peft_config)

    def _prepare_dataset(self, dataset, split):
        packing = self.args.packing if split == "train" else (
            self.args.eval_packing if self.args.eval_packing is not None else self.args.packing)
        return prepare_sft_dataset(dataset, self.processing_class, self.args, formatting_func=self.formatting_func,
                                   packing=packing, dataset_name=split)

    @property
    def _padding_free(self) -> bool:
        # TRL forces padding-free attention for bfd packing; rows keep their shape here, documents are separated
        # by segment ids, and labels at each document start are dropped exactly as TRL's flattened batch does.
        return bool(self.args.padding_free or (self.args.packing and self.args.packing_strategy != "wrapped"))

    def _collate(self, rows, num_rows):
        collator = DataCollatorForLanguageModeling(
            pad_token_id=self.processing_class.pad_token_id,
            max_length=self.args.max_length,
            pad_to_multiple_of=self.args.pad_to_multiple_of,
            padding_free=self._padding_free,
            pad_batch_to=num_rows,
        )
        batch = collator(rows)
        return {k: batch[k] for k in ("input_ids", "position_ids", "segment_ids", "labels", "attention_mask")}

    def _batch_stats(self, batch):
        return {"num_tokens": float(np.sum(batch["attention_mask"]))}

    def loss_fn(self, params, batch, rng, ref_params=None) -> LossTerms:
        model = self.model
        inputs = (params, batch["input_ids"], batch["position_ids"], batch["segment_ids"])
        aux_coef = self.router_aux_loss_coef
        if aux_coef:  # mixture of experts: TRL adds coef * the load-balancing loss (router logits of this forward)
            hidden, router_logits = model.hidden_states_and_router_logits(*inputs)
        else:
            hidden = model.hidden_states(*inputs)
        targets, loss_mask = shift_labels(batch["labels"])
        logps, entropy, top1 = fused_log_probs(
            hidden, model.lm_head_weight(params), targets,
            chunk_size=self.args.logprob_chunk_size, return_entropy=True, return_top1=True, mask=loss_mask,
            final_logit_softcapping=final_logit_softcapping(model),
        )
        terms = sft_loss(logps, loss_mask, loss_type=self.args.loss_type, per_token_entropy=entropy, is_top1=top1)
        if not aux_coef:
            return terms
        # TRL: loss + coef * aux_loss per forward, aux over the tokens the attention mask keeps
        aux = router_aux_loss(router_logits, model.config.num_experts_per_tok, batch["segment_ids"] != 0)
        return with_router_aux_loss(terms, aux, aux_coef)

    def completion_exact_match(self, dataset=None) -> float:
        """Fraction of rows whose every trained token (completion or assistant turn, with its EOS) is the model's
        argmax given the true prefix — i.e. greedy decoding would reproduce the whole answer exactly.

        Computed teacher-forced in one forward per batch (no generation loop). Uses the eval set by default.
        """
        import jax
        import jax.numpy as jnp

        ds = self._checked(dataset, "eval") if dataset is not None else self.eval_dataset
        if ds is None:
            raise ValueError("completion_exact_match() needs a dataset (or an eval_dataset).")
        params = self.trained_params if self.state is None else self.state.params

        if not hasattr(self, "_exact_match_fn"):
            def fn(p, batch):
                model = self.model
                hidden = model.hidden_states(p, batch["input_ids"], batch["position_ids"], batch["segment_ids"])
                targets, mask = shift_labels(batch["labels"])
                _, top1 = fused_log_probs(hidden, model.lm_head_weight(p), targets,
                                          chunk_size=self.args.logprob_chunk_size, return_top1=True, mask=mask,
                                          final_logit_softcapping=final_logit_softcapping(model))
                return jnp.all(top1 | ~mask, axis=-1) & jnp.any(mask, axis=-1)

            self._exact_match_fn = jax.jit(fn)
        from trl_jax.parallel import batch_parallel_size
        from trl_jax.parallel.distributed import gather_to_host

        rows_per_batch = self.args.per_device_eval_batch_size * batch_parallel_size(self.mesh)
        hits = 0
        for start in range(0, len(ds), rows_per_batch):
            indices = range(start, min(start + rows_per_batch, len(ds)))
            # each process collates only its rows; the per-row flags are gathered from every process
            batch = self._device_batch(self._collate_local(ds, indices, rows_per_batch, collate=self._collate))
            ok = gather_to_host(self._exact_match_fn(params, batch))
            hits += int(np.sum(np.asarray(ok)[:len(indices)]))
        return hits / len(ds)
