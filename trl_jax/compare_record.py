"""trl_jax's GRPO and online DPO trainers, recording every batch they sample (``trl-jax compare``).

The recorded batches are replayed through TRL's own trainer by the TRL side of the comparison
(``trl_jax_compare.replay``), so both libraries take their steps on exactly the same prompt and completion tokens.
One record per sampled training batch (a GRPO generation batch, an online DPO micro-batch), in sampling order:

* ``rows``: the dataset rows of the batch's prompts (every column but trl_jax's ``prompt_ids``; GRPO: each prompt
  once, in order, as TRL's ``RepeatSampler`` reads them);
* ``prompts``: the prompts as TRL's trainer receives them (GRPO: each repeated ``num_generations`` times);
* ``prompt_ids`` (GRPO: per completion; online DPO: per prompt) and ``completion_ids`` (per completion, up to and
  including the first EOS; online DPO: the first completion of every prompt, then the second ones): token ids;
* ``step``: the 1-based optimizer step the batch was sampled for.

The file also holds the tokenizer's ``pad_token_id`` and ``eos_token_ids``.

Nothing is changed in training: the recording reads the sampler's output on the host.
"""

from __future__ import annotations

import json

import numpy as np


def _row(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "prompt_ids"}


def _completions(cids: np.ndarray, cmask: np.ndarray, index) -> list[list[int]]:
    return [cids[i][: int(cmask[i].sum())].tolist() for i in index]


class _Recording:
    """Mixin: ``_sample`` keeps its last output; subclasses turn it into records while ``_recording`` is set."""

    _recording = False

    def _sample(self, *a, **kw):
        out = super()._sample(*a, **kw)
        self._last_sampled = (np.asarray(out[0]), np.asarray(out[1]))
        return out

    @property
    def records(self) -> list:
        if "_records" not in self.__dict__:
            self._records = []
        return self._records

    def save_records(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"pad_token_id": self.pad_token_id, "eos_token_ids": list(self.eos_token_ids),
                       "batches": self.records}, f, default=_json_default)


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"cannot record a value of type {type(x).__name__}")


def recording_trainer_cls(command: str) -> type:
    """``command``'s trainer class (``grpo`` / ``online-dpo``) with batch recording (:attr:`records`,
    :meth:`save_records`)."""
    from trl_jax.trainers import GRPOTrainer, OnlineDPOTrainer

    if command == "grpo":
        class RecordingGRPOTrainer(_Recording, GRPOTrainer):
            def _batch_for_step(self, step):
                self._record_step = step + 1
                return super()._batch_for_step(step)

            def _generation(self, gen_index):
                self._recording = True
                try:
                    return super()._generation(gen_index)
                finally:
                    self._recording = False

            def generate_and_score(self, rows, params, rng, *, num_generations, **kw):
                out = super().generate_and_score(rows, params, rng, num_generations=num_generations, **kw)
                if self._recording:
                    cids, cmask = self._last_sampled
                    self.records.append({
                        "step": self._record_step,
                        "rows": [_row(r) for r in rows[::num_generations]],
                        "prompts": [r["prompt"] for r in rows],
                        "prompt_ids": [list(r["prompt_ids"]) for r in rows],
                        "completion_ids": _completions(cids, cmask, range(len(rows))),
                    })
                return out

        return RecordingGRPOTrainer
    if command == "online-dpo":
        class RecordingOnlineDPOTrainer(_Recording, OnlineDPOTrainer):
            def _generate_pairs(self, rows, num_rows, micro_rows, rng, beta):
                out = super()._generate_pairs(rows, num_rows, micro_rows, rng, beta)
                if self._training_batch:
                    cids, cmask = self._last_sampled
                    for s in range(0, len(rows), micro_rows):
                        idx = range(s, min(s + micro_rows, len(rows)))
                        self.records.append({
                            "step": self._gen_step + 1,
                            "rows": [_row(rows[i]) for i in idx],
                            "prompts": [rows[i]["prompt"] for i in idx],
                            "prompt_ids": [list(rows[i]["prompt_ids"]) for i in idx],
                            "completion_ids": _completions(cids, cmask, idx)
                            + _completions(cids, cmask, [num_rows + i for i in idx]),
                        })
                return out

        return RecordingOnlineDPOTrainer
    raise ValueError(f"command must be grpo or online-dpo, got {command!r}")
