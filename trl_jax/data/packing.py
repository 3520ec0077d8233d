"""Sequence packing with TRL's strategies (`bfd`, `bfd_split`, `wrapped`) and per-document position ids.

`pack_dataset` reproduces `trl.pack_dataset` row for row: it packs each `map` batch (1000 rows by default)
independently, keeps the row order of TRL's Best-Fit-Decreasing, and adds `seq_lengths` (document lengths per
packed row) for the bfd strategies.
"""

from __future__ import annotations

import bisect
from collections import deque
from typing import Any

import numpy as np

__all__ = ["PACKING_STRATEGIES", "pack_examples", "pack_dataset", "position_ids_from_seq_lengths",
           "segment_ids_from_seq_lengths"]

PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")


def _check_columns(batch: dict[str, list]) -> list[str]:
    names = list(batch)
    if not names:
        raise ValueError("Packing needs at least one column.")
    lengths = [len(x) for x in batch[names[0]]]
    for name in names:
        column = batch[name]
        if any(not isinstance(x, (list, tuple, np.ndarray)) for x in column):
            raise TypeError(f"Packing requires all columns to be lists of lists; `{name}` is not.")
        if [len(x) for x in column] != lengths:
            raise ValueError(f"All columns must have values of the same length; `{name}` differs from `{names[0]}`.")
    return names


def _best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) in creation order; each item goes to the fullest bin it fits in.

    Items are visited by decreasing length (ties by index). Among bins with the same remaining space the oldest
    is used first; a new bin is opened when no bin fits.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep index order
    spaces: list[int] = []  # sorted distinct remaining spaces (> 0) of open bins
    by_space: dict[int, deque] = {}
    bins: list[list[int]] = []
    for i in order:
        length = lengths[i]
        pos = bisect.bisect_left(spaces, length)
        if pos < len(spaces):
            space = spaces[pos]
            bin_id = by_space[space].popleft()
            if not by_space[space]:
                spaces.pop(pos)
        else:
            space = capacity
            bin_id = len(bins)
            bins.append([])
        bins[bin_id].append(i)
        space -= length
        if space > 0:
            if space not in by_space or not by_space[space]:
                by_space[space] = deque()
                bisect.insort(spaces, space)
            by_space[space].append(bin_id)
    return bins


def pack_examples(batch: dict[str, list], seq_length: int, strategy: str = "bfd") -> dict[str, list]:
    """Pack one batch of list columns (all of equal per-row lengths) into rows of at most `seq_length` tokens.

    * `bfd`: drop empty rows, truncate rows to `seq_length`, Best-Fit-Decreasing bin packing, add `seq_lengths`.
    * `bfd_split`: like `bfd` but rows longer than `seq_length` are cut into `seq_length` fragments (last one
      shorter), each packed as its own document.
    * `wrapped`: concatenate everything and cut every `seq_length` tokens (documents may straddle rows; no
      `seq_lengths`).
    """
    if strategy not in PACKING_STRATEGIES:
        raise ValueError(f"Invalid packing strategy '{strategy}', must be one of {PACKING_STRATEGIES}.")
    if seq_length <= 0:
        raise ValueError(f"`seq_length` must be positive, got {seq_length}.")
    names = _check_columns(batch)
    if strategy == "wrapped":
        out = {}
        for name in names:
            flat = [t for row in batch[name] for t in row]
            out[name] = [flat[i : i + seq_length] for i in range(0, len(flat), seq_length)]
        return out
    docs: dict[str, list] = {name: [] for name in names}
    for r in range(len(batch[names[0]])):
        n = len(batch[names[0]][r])
        if n == 0:
            continue
        if strategy == "bfd":
            spans = [(0, min(n, seq_length))]
        else:
            spans = [(s, min(s + seq_length, n)) for s in range(0, n, seq_length)]
        for start, stop in spans:
            for name in names:
                docs[name].append(list(batch[name][r][start:stop]))
    lengths = [len(x) for x in docs[names[0]]]
    bins = _best_fit_decreasing(lengths, seq_length)
    out = {name: [[t for i in b for t in docs[name][i]] for b in bins] for name in names}
    out["seq_lengths"] = [[lengths[i] for i in b] for b in bins]
    return out


def pack_dataset(dataset, seq_length: int, strategy: str = "bfd", map_kwargs: dict[str, Any] | None = None):
    """Pack a `datasets.Dataset`/`DatasetDict`/`IterableDataset` like `trl.pack_dataset` (see `pack_examples`).

    All columns must be list columns with identical per-row lengths (e.g. `input_ids`, `labels`); the packing runs
    per `map` batch (`map_kwargs["batch_size"]`, default 1000), as TRL's does.
    """
    if strategy not in PACKING_STRATEGIES:
        raise ValueError(f"Invalid packing strategy '{strategy}', must be one of {PACKING_STRATEGIES}.")
    map_kwargs = dict(map_kwargs or {})
    from .formats import get_column_names

    columns = get_column_names(dataset)
    return dataset.map(
        pack_examples,
        batched=True,
        fn_kwargs={"seq_length": seq_length, "strategy": strategy},
        remove_columns=columns,
        **map_kwargs,
    )


def position_ids_from_seq_lengths(seq_lengths, total: int | None = None) -> np.ndarray:
    """Positions restarting at 0 at each document: `[3, 2] -> [0, 1, 2, 0, 1]`, right-padded with 0 to `total`.

    Shapes: `seq_lengths [D]` -> `[total]` int32 (`total` defaults to `sum(seq_lengths)`).
    """
    seq_lengths = [int(x) for x in seq_lengths]
    n = sum(seq_lengths)
    total = n if total is None else total
    if total < n:
        raise ValueError(f"`total` ({total}) is smaller than the packed length ({n}).")
    pos = np.zeros(total, dtype=np.int32)
    offset = 0
    for length in seq_lengths:
        pos[offset : offset + length] = np.arange(length, dtype=np.int32)
        offset += length
    return pos


def segment_ids_from_seq_lengths(seq_lengths, total: int | None = None) -> np.ndarray:
    """Document index per token, 1-based (`[3, 2] -> [1, 1, 1, 2, 2]`), 0 on right padding up to `total`."""
    seq_lengths = [int(x) for x in seq_lengths]
    n = sum(seq_lengths)
    total = n if total is None else total
    seg = np.zeros(total, dtype=np.int32)
    seg[:n] = np.repeat(np.arange(1, len(seq_lengths) + 1, dtype=np.int32), seq_lengths)
    return seg
