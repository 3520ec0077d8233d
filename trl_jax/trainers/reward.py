"""``RewardTrainer``: TRL's outcome reward model (Bradley-Terry on preference pairs) on the shared loop.

Model: a ``*ForSequenceClassification`` decoder with one label (the ``score`` head read at each sequence's last
non-pad token, as transformers pools). A ``*ForCausalLM`` checkpoint gets a new random ``score`` head and loses its
LM head, as ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)`` does in TRL.

Data: preference rows (explicit or implicit prompt, standard or conversational, or tokenized ``chosen_ids`` /
``rejected_ids``), prepared as TRL does (EOS appended to standard answers, prompt + answer tokenized whole, pairs
longer than ``max_length`` dropped), with an optional ``margin`` column. The collator's ``[2B, L]`` (chosen rows,
then rejected rows) is regrouped as ``[B, 2, L]`` so gradient accumulation and data parallelism split pairs, never
a pair; the loss runs one forward over ``[2b, L]``.

Loss and metrics: ``trl_jax.losses.reward`` (``accuracy``, ``margin``, ``min_reward``, ``mean_reward``,
``max_reward``; ``num_tokens`` is the running count of training tokens). ``save_model`` writes a checkpoint that
``transformers.AutoModelForSequenceClassification`` loads, and that ``GRPOTrainer(reward_funcs=<dir>)`` scores with.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from trl_jax.configs import RewardConfig
from trl_jax.data.collators import DataCollatorForRewardPreference
from trl_jax.data.tokenization import prepare_reward_dataset
from trl_jax.losses.base import LossTerms
from trl_jax.losses.reward import reward_loss
from trl_jax.trainers.base import BaseTrainer, reject_unsupported

_PAIRED = ("input_ids", "attention_mask", "position_ids", "segment_ids")


class RewardTrainer(BaseTrainer):
    """``RewardTrainer(model, args=RewardConfig(...), train_dataset=..., eval_dataset=..., processing_class=...)``.

    ``model``: a local HF directory / hub id (``*ForSequenceClassification`` with ``num_labels=1``, or a causal LM
    that gets a new ``score`` head), or a ``(CausalLM, params)`` pair whose params have a one-label ``score``.
    """

    _tag = "reward"
    config_class = RewardConfig

    def __init__(self, model, args: RewardConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None, optimizers=None,
                 optimizer_cls_and_kwargs=None, preprocess_logits_for_metrics=None, quantization_config=None,
                 peft_config=None):
        reject_unsupported("RewardTrainer", compute_metrics=compute_metrics, optimizers=optimizers,
                           optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                           preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                           quantization_config=quantization_config)
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        if args is None:  # TRL's default output_dir: "<model name>-Reward"
            name = os.path.basename(str(model).rstrip("/")) if isinstance(model, (str, os.PathLike)) else "model"
            args = RewardConfig(output_dir=f"{name}-Reward")
        # LoRA: the new score head is trained in full (PEFT's SEQ_CLS rule, as TRL recommends modules_to_save=score)
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, callbacks,
                         data_collator=data_collator, peft_config=peft_config)

    # ------------------------------------------------------------------ model
    def _load_model(self, model):
        m, params, path = super()._load_model(model)
        num_labels = m.config.num_labels
        if num_labels is None and isinstance(model, (str, os.PathLike)):
            from trl_jax.models.seq_cls import as_sequence_classifier

            # TRL: set_seed(args.seed), then AutoModelForSequenceClassification.from_pretrained(num_labels=1)
            m, params = as_sequence_classifier(m, params, num_labels=1, seed=self.args.seed, mesh=self.mesh)
            num_labels = 1
        if num_labels != 1 or "score" not in params:
            raise ValueError(
                f"The model has `num_labels={num_labels}`, but reward models require `num_labels=1` to output a "
                "single scalar reward per sequence. Pass a *ForSequenceClassification model with num_labels=1, or a "
                "model path (a causal LM checkpoint gets a new one-label `score` head)."
            )
        return m, params, path

    def _load_tokenizer(self, processing_class, model_path):
        tok = super()._load_tokenizer(processing_class, model_path)
        # The score head pools on the last non-pad token: the model's pad id is the tokenizer's (TRL sets
        # model.config.pad_token_id), and so is the saved config's, so transformers pools the same token.
        self.model.config = self.model.config.replace(pad_token_id=tok.pad_token_id)
        if self.model.hf_config is not None:
            self.model.hf_config.pad_token_id = tok.pad_token_id
            if getattr(self.args, "eos_token", None) is not None:
                self.model.hf_config.eos_token_id = tok.eos_token_id
        return tok

    # ------------------------------------------------------------------ data
    def _prepare_dataset(self, dataset, split):
        dataset = prepare_reward_dataset(dataset, self.processing_class, self.args, dataset_name=split)
        if "margin" in dataset.column_names and len(dataset):
            value = dataset[0]["margin"]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"The {split} dataset's `margin` column must hold numbers (the reward margin of "
                                 f"each pair), got {type(value).__name__} {value!r}.")
        return dataset

    def _collate(self, rows, num_rows):
        batch = DataCollatorForRewardPreference(
            pad_token_id=self.processing_class.pad_token_id,
            max_length=self.args.max_length,
            pad_to_multiple_of=self.args.pad_to_multiple_of,
            pad_batch_to=num_rows,
        )(rows)
        out = {k: np.stack([batch[k][:num_rows], batch[k][num_rows:]], axis=1) for k in _PAIRED}  # [B, 2, L]
        for k in ("margin", "example_mask"):
            if k in batch:
                out[k] = batch[k]
        return out

    def _make_batch(self, rows, num_rows):
        """The trainer's collator, or a user ``data_collator``: one that returns TRL's layout (``input_ids`` /
        ``attention_mask`` ``[2B, L]``, chosen rows then rejected rows, optional ``margin [B]``; e.g. TRL's
        ``reward_trainer.DataCollatorForPreference``) is regrouped into pairs here."""
        if self.data_collator is None:
            return self._collate(rows, num_rows)
        batch = {k: np.asarray(v) for k, v in self.data_collator(rows).items()}
        if batch["input_ids"].ndim != 2:
            return batch  # already pairs ([B, 2, L])
        b = batch["input_ids"].shape[0] // 2
        attention = batch["attention_mask"].astype(np.int32)
        flat = {"input_ids": batch["input_ids"].astype(np.int32), "attention_mask": attention,
                "position_ids": (np.cumsum(attention, axis=1, dtype=np.int32) - 1).clip(min=0) * attention,
                "segment_ids": attention}
        out = {k: np.stack([v[:b], v[b:]], axis=1) for k, v in flat.items()}
        if "margin" in batch:
            out["margin"] = batch["margin"].astype(np.float32)
        return out

    def _batch_stats(self, batch):
        return {"num_tokens": float(np.sum(batch["attention_mask"]))}

    # ------------------------------------------------------------------ loss
    def rewards(self, params, batch):
        """Chosen and rejected rewards ``[b]`` each of a ``[b, 2, L]`` batch (one forward over ``[2b, L]``)."""
        b = batch["input_ids"].shape[0]
        flat = {k: jnp.concatenate([batch[k][:, 0], batch[k][:, 1]], axis=0) for k in _PAIRED}
        scores = self.model.sequence_scores(params, flat["input_ids"], flat["position_ids"], flat["segment_ids"],
                                            pad_token_id=self.processing_class.pad_token_id)[:, 0]
        return scores[:b], scores[b:]

    def loss_fn(self, params, batch, rng, ref_params=None) -> LossTerms:
        chosen, rejected = self.rewards(params, batch)
        return reward_loss(chosen, rejected, margin=batch.get("margin"),
                           center_rewards_coefficient=self.args.center_rewards_coefficient,
                           example_mask=batch.get("example_mask"))
