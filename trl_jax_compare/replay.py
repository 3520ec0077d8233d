"""TRL's GRPO and online DPO trainers fed the completions trl_jax sampled (the shared-completions comparison).

Sampling draws from different random streams in the two libraries, so their runs cannot be compared value by
value. Instead trl_jax records every batch it samples (:mod:`trl_jax.compare_record`: the prompts' dataset rows,
prompt token ids, completion token ids, in sampling order) and TRL's own trainer trains on exactly those tokens:

* GRPO: through TRL's ``rollout_func`` hook (``GRPOTrainer(rollout_func=...)``), which replaces generation and
  returns ``prompt_ids`` / ``completion_ids``. Everything after generation is TRL's: reward functions on the decoded
  completions, group advantages, reference log-probs, ``_compute_loss``, the optimizer step and the logged metrics.
  The dataset handed to TRL is the recorded prompts in trl_jax's order with ``shuffle_dataset=False``, so TRL's
  ``RepeatSampler`` yields the same prompts (and their extra columns, e.g. ``answer``) in the same groups.
* Online DPO: TRL's ``_generate`` is overridden to return the recorded pair of completions of each micro-batch
  (prompts left-padded to the micro-batch's longest, completions right-padded to its longest, TRL's
  ``truncate_right`` layout); TRL's ``training_step`` then scores, pairs and computes the loss. Its dataset is the
  recorded prompts in order, read sequentially.

Each replay checks that the prompts TRL's data loader hands it are the recorded ones and fails loudly otherwise.
"""

from __future__ import annotations

import torch

from trl_jax_compare.trainers import build_trl_trainer, trl_classes


def replay_dataset(record: dict):
    """The recorded prompts (dataset rows, every column) in trl_jax's order, as a ``datasets.Dataset``."""
    from datasets import Dataset

    return Dataset.from_list([row for batch in record["batches"] for row in batch["rows"]])


class _Cursor:
    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next(self, prompts: list, what: str) -> dict:
        if self.i >= len(self.batches):
            raise RuntimeError(f"TRL asked for {what} {self.i + 1}, but trl_jax recorded only {len(self.batches)}.")
        b = self.batches[self.i]
        self.i += 1
        want = b["prompts"]
        if list(prompts) != list(want):
            raise RuntimeError(f"TRL's {what} {self.i} has other prompts than trl_jax's (first: {prompts[0]!r} vs "
                               f"{want[0]!r}): the replayed completions would not belong to them.")
        return b


def grpo_replay_trainer(record: dict, model, args_kwargs: dict, reward_funcs, callbacks=None):
    """TRL's ``GRPOTrainer`` whose generation returns trl_jax's recorded completions (``record["batches"]``: one
    entry per generation batch, ``prompts`` as TRL's sampler yields them, ``prompt_ids`` / ``completion_ids`` lists of
    token ids per completion)."""
    cursor = _Cursor(record["batches"])

    def rollout_func(prompts, trainer):
        b = cursor.next(prompts, "generation batch")
        return {"prompt_ids": b["prompt_ids"], "completion_ids": b["completion_ids"], "logprobs": None}

    kw = {**args_kwargs, "shuffle_dataset": False}
    trainer = build_trl_trainer("grpo", model, kw, replay_dataset(record), callbacks=callbacks,
                                reward_funcs=reward_funcs, rollout_func=rollout_func)
    trainer.replay_cursor = cursor
    return trainer


def online_dpo_replay_trainer(record: dict, model, args_kwargs: dict, reward_funcs, callbacks=None):
    """TRL's ``OnlineDPOTrainer`` whose ``_generate`` returns trl_jax's recorded pairs (``record["batches"]``: one
    entry per micro-batch, ``prompts``, ``prompt_ids`` per prompt and ``completion_ids`` per completion: the first
    completions of every prompt, then the second ones)."""
    _, base = trl_classes("online-dpo")
    cursor = _Cursor(record["batches"])

    class ReplayOnlineDPOTrainer(base):
        def _generate(self, model, prompts, images=None):
            b = cursor.next(prompts, "micro-batch")
            pad = self._tokenizer.pad_token_id
            device = next(model.parameters()).device
            pids, pmask = _pad(b["prompt_ids"], pad, left=True)
            cids, cmask = _pad(b["completion_ids"], pad, left=False)
            pids, pmask = pids.repeat(2, 1), pmask.repeat(2, 1)
            return pids.to(device), pmask.to(device), cids.to(device), cmask.to(device), None

    kw = {**args_kwargs, "train_sampling_strategy": "sequential"}
    trainer = build_trl_trainer("online-dpo", model, kw, replay_dataset(record), callbacks=callbacks,
                                trainer_cls=ReplayOnlineDPOTrainer, reward_funcs=reward_funcs)
    trainer.replay_cursor = cursor
    return trainer


def _pad(rows: list[list[int]], pad: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(max((len(r) for r in rows), default=0), 1)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if not r:
            continue
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask
