"""Collators that turn tokenized rows into fixed-shape numpy batches for jit.

The sequence axis is padded to `bucket_length(...)`: a multiple of `pad_to_multiple_of` (capped at `max_length`),
else `max_length`, else the next power of two. A run therefore compiles once per bucket, not once per batch. With
`pad_batch_to` the batch axis is padded too (padding rows are all-masked and flagged by `example_mask == 0`).

Conventions (all int32 unless noted, right padding):
    input_ids       [B, L]  pad_token_id on padding
    attention_mask  [B, L]  1 on real tokens
    position_ids    [B, L]  0.. per document, 0 on padding
    segment_ids     [B, L]  1-based document index within the row, 0 on padding (attend only within a segment)
    labels          [B, L]  TRL convention: token id where it is trained, -100 elsewhere (unshifted: the logits
                            at position t-1 predict labels[t])
    completion_mask [B, L]  1 on completion tokens (DPO/KTO), unshifted like labels
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .packing import position_ids_from_seq_lengths, segment_ids_from_seq_lengths

__all__ = [
    "bucket_length",
    "pad_rows",
    "DataCollatorForLanguageModeling",
    "DataCollatorForPreference",
    "DataCollatorForUnpairedPreference",
    "DataCollatorForRewardPreference",
]


def bucket_length(longest: int, max_length: int | None = None, pad_to_multiple_of: int | None = None) -> int:
    """Padded sequence length for a batch whose longest row has `longest` tokens."""
    longest = max(int(longest), 1)
    if pad_to_multiple_of:
        length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
        if max_length is not None and longest <= max_length:
            length = min(length, max_length)
        return length
    if max_length is not None and longest <= max_length:
        return int(max_length)
    return 1 << (longest - 1).bit_length()


def pad_rows(rows: list, length: int, value, dtype=np.int32, num_rows: int | None = None) -> np.ndarray:
    """Right-pad variable-length rows into a `[num_rows or len(rows), length]` array filled with `value`."""
    out = np.full((num_rows or len(rows), length), value, dtype=dtype)
    for i, row in enumerate(rows):
        n = len(row)
        if n > length:
            raise ValueError(f"Row {i} has {n} tokens, more than the padded length {length}; truncate it first.")
        out[i, :n] = row
    return out


def _batch_rows(n: int, pad_batch_to: int | None) -> int:
    if pad_batch_to is None:
        return n
    if n > pad_batch_to:
        raise ValueError(f"Got {n} examples, more than `pad_batch_to={pad_batch_to}`.")
    return pad_batch_to


def _example_mask(n: int, rows: int) -> np.ndarray:
    mask = np.zeros(rows, dtype=np.int32)
    mask[:n] = 1
    return mask


@dataclass
class DataCollatorForLanguageModeling:
    """SFT collator: rows of `input_ids` (+ `labels`, + `seq_lengths` when packed) -> fixed-shape batch.

    Keys: `input_ids`, `attention_mask`, `position_ids`, `segment_ids`, `labels`, `loss_mask` (= labels != -100),
    and `example_mask` with `pad_batch_to`. Documents packed into one row (`seq_lengths`) get their own positions
    and segments. With `padding_free=True` (TRL's mode, forced for bfd packing), labels at every document start are
    set to -100, as TRL does after flattening the batch; rows are kept (not flattened into one row) and the
    per-document attention comes from `segment_ids`, which gives the same losses with a static shape.
    """

    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    padding_free: bool = False
    pad_batch_to: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        if not examples:
            raise ValueError("Cannot collate an empty list of examples.")
        ids = [list(ex["input_ids"]) for ex in examples]
        labels = [list(ex["labels"]) if "labels" in ex else list(ex["input_ids"]) for ex in examples]
        rows = _batch_rows(len(ids), self.pad_batch_to)
        length = bucket_length(max(len(x) for x in ids), self.max_length, self.pad_to_multiple_of)
        out = {
            "input_ids": pad_rows(ids, length, self.pad_token_id, num_rows=rows),
            "attention_mask": pad_rows([[1] * len(x) for x in ids], length, 0, num_rows=rows),
            "labels": pad_rows(labels, length, -100, num_rows=rows),
        }
        positions = np.zeros((rows, length), dtype=np.int32)
        segments = np.zeros((rows, length), dtype=np.int32)
        for i, ex in enumerate(examples):
            seq_lengths = ex.get("seq_lengths") or [len(ids[i])]
            positions[i] = position_ids_from_seq_lengths(seq_lengths, length)
            segments[i] = segment_ids_from_seq_lengths(seq_lengths, length)
        out["position_ids"] = positions
        out["segment_ids"] = segments
        if self.padding_free:
            out["labels"][(positions == 0)] = -100
        out["loss_mask"] = (out["labels"] != -100).astype(np.int32)
        if self.pad_batch_to is not None:
            out["example_mask"] = _example_mask(len(ids), rows)
        return out


def _truncate(seq: list, max_length: int | None, mode: str) -> list:
    if max_length is None:
        return seq
    if mode == "keep_start":
        return seq[:max_length]
    if mode == "keep_end":
        return seq[-max_length:]
    raise ValueError(f"Unsupported truncation mode {mode!r}; use 'keep_start' or 'keep_end'.")


@dataclass
class DataCollatorForPreference:
    """DPO collator: rows of `prompt_ids`, `chosen_ids`, `rejected_ids` -> one `[2B, L]` batch for one forward.

    Rows `0..B-1` are prompt+chosen and rows `B..2B-1` prompt+rejected (TRL's layout). Each sequence is truncated
    to `max_length` (`truncation_mode`) before padding. Keys: `input_ids`, `attention_mask`, `completion_mask`,
    `position_ids`, `segment_ids` (all `[2B, L]`), `ref_chosen_logps`/`ref_rejected_logps` `[B]` float32 when the
    rows carry them, `example_mask` `[B]` with `pad_batch_to`.
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None
    pad_batch_to: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        if not examples:
            raise ValueError("Cannot collate an empty list of examples.")
        n = len(examples)
        rows = _batch_rows(n, self.pad_batch_to)
        seqs, masks = [], []
        for key in ("chosen_ids", "rejected_ids"):
            part_seqs, part_masks = [], []
            for ex in examples:
                prompt, answer = list(ex["prompt_ids"]), list(ex[key])
                part_seqs.append(_truncate(prompt + answer, self.max_length, self.truncation_mode))
                part_masks.append(_truncate([0] * len(prompt) + [1] * len(answer), self.max_length,
                                            self.truncation_mode))
            part_seqs += [[] for _ in range(rows - n)]
            part_masks += [[] for _ in range(rows - n)]
            seqs += part_seqs
            masks += part_masks
        length = bucket_length(max(len(s) for s in seqs), self.max_length, self.pad_to_multiple_of)
        attention = pad_rows([[1] * len(s) for s in seqs], length, 0)
        out = {
            "input_ids": pad_rows(seqs, length, self.pad_token_id),
            "attention_mask": attention,
            "completion_mask": pad_rows(masks, length, 0),
            "position_ids": (np.cumsum(attention, axis=1, dtype=np.int32) - 1).clip(min=0) * attention,
            "segment_ids": attention.copy(),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                values = np.zeros(rows, dtype=np.float32)
                values[:n] = [ex[key] for ex in examples]
                out[key] = values
        if self.pad_batch_to is not None:
            out["example_mask"] = _example_mask(n, rows)
        return out


@dataclass
class DataCollatorForUnpairedPreference:
    """KTO collator: rows of `prompt_ids`, `completion_ids`, `label` (+ `KL_completion_ids`) -> fixed-shape batch.

    Keys: `input_ids`, `attention_mask`, `completion_mask`, `position_ids`, `segment_ids` `[B, L]`; the same with
    a `KL_` prefix for the mismatched pairs when rows carry `KL_completion_ids` (padded to their own bucket);
    `label` `[B]` bool; `ref_logps`, `ref_KL_logps` `[B]` float32 when present; `example_mask` with
    `pad_batch_to` (padding rows have label False and no tokens). Sequences are truncated to `max_length` from
    the right, as TRL does.
    """

    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    pad_batch_to: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        if not examples:
            raise ValueError("Cannot collate an empty list of examples.")
        n = len(examples)
        rows = _batch_rows(n, self.pad_batch_to)
        out: dict[str, np.ndarray] = {}
        for prefix, key in (("", "completion_ids"), ("KL_", "KL_completion_ids")):
            if key not in examples[0]:
                continue
            seqs, masks = [], []
            for ex in examples:
                prompt, answer = list(ex["prompt_ids"]), list(ex[key])
                seqs.append(_truncate(prompt + answer, self.max_length, "keep_start"))
                masks.append(_truncate([0] * len(prompt) + [1] * len(answer), self.max_length, "keep_start"))
            length = bucket_length(max(len(s) for s in seqs), self.max_length, self.pad_to_multiple_of)
            attention = pad_rows([[1] * len(s) for s in seqs], length, 0, num_rows=rows)
            out[f"{prefix}input_ids"] = pad_rows(seqs, length, self.pad_token_id, num_rows=rows)
            out[f"{prefix}attention_mask"] = attention
            out[f"{prefix}completion_mask"] = pad_rows(masks, length, 0, num_rows=rows)
            out[f"{prefix}position_ids"] = (np.cumsum(attention, axis=1, dtype=np.int32) - 1).clip(min=0) * attention
            out[f"{prefix}segment_ids"] = attention.copy()
        for key in ("ref_logps", "ref_KL_logps"):
            if key in examples[0]:
                values = np.zeros(rows, dtype=np.float32)
                values[:n] = [ex[key] for ex in examples]
                out[key] = values
        label = np.zeros(rows, dtype=bool)
        label[:n] = [bool(ex["label"]) for ex in examples]
        out["label"] = label
        if self.pad_batch_to is not None:
            out["example_mask"] = _example_mask(n, rows)
        return out


@dataclass
class DataCollatorForRewardPreference:
    """Reward-model collator (TRL's `reward_trainer.DataCollatorForPreference`): rows of whole `chosen_ids` /
    `rejected_ids` sequences (+ `margin`) -> one `[2B, L]` batch, rows `0..B-1` chosen and `B..2B-1` rejected.

    Nothing is truncated (the dataset was filtered to `max_length`). Keys: `input_ids` (padded with
    `pad_token_id`, which is also how the score head finds each row's last token), `attention_mask`,
    `position_ids`, `segment_ids` `[2B, L]`; `margin` `[B]` float32 when the rows carry it; `example_mask` `[B]`
    with `pad_batch_to`.
    """

    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    pad_batch_to: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        if not examples:
            raise ValueError("Cannot collate an empty list of examples.")
        n = len(examples)
        rows = _batch_rows(n, self.pad_batch_to)
        seqs = []
        for key in ("chosen_ids", "rejected_ids"):
            seqs += [list(ex[key]) for ex in examples] + [[] for _ in range(rows - n)]
        length = bucket_length(max(len(x) for x in seqs), self.max_length, self.pad_to_multiple_of)
        attention = pad_rows([[1] * len(x) for x in seqs], length, 0)
        out = {
            "input_ids": pad_rows(seqs, length, self.pad_token_id),
            "attention_mask": attention,
            "position_ids": (np.cumsum(attention, axis=1, dtype=np.int32) - 1).clip(min=0) * attention,
            "segment_ids": attention.copy(),
        }
        if "margin" in examples[0]:
            margin = np.zeros(rows, dtype=np.float32)
            margin[:n] = [float(ex["margin"]) for ex in examples]
            out["margin"] = margin
        if self.pad_batch_to is not None:
            out["example_mask"] = _example_mask(n, rows)
        return out
