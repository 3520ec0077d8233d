"""TRL's small data utilities: ``flush_left`` / ``flush_right`` (``trl.trainer.utils``) and ``truncate_dataset``
(``trl.experimental.utils``), with the same outputs as TRL's on the same inputs.

``flush_left`` / ``flush_right`` take numpy or JAX arrays (or nested lists) and return JAX arrays for JAX inputs,
numpy arrays otherwise. Their output width depends on
the data (all-zero columns are cut), so they run eagerly on concrete arrays, not under ``jit``; inside a jitted
program use a fixed width (e.g. ``trl_jax.ops.padding``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["flush_left", "flush_right", "truncate_dataset"]


def _as_numpy(x, name):
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, M], got shape {a.shape}.")
    return a


def _like(template, a):
    """JAX arrays in, JAX arrays out; anything else (numpy, lists) gives numpy."""
    import jax

    return jax.numpy.asarray(a) if isinstance(template, jax.Array) else a


def _roll_rows(mask, tensors, shift, name):
    m = _as_numpy(mask, "mask")
    arrays = [_as_numpy(t, f"{name} tensor {i}") for i, t in enumerate(tensors)]
    for i, a in enumerate(arrays):
        if a.shape != m.shape:
            raise ValueError(f"{name}: tensor {i} has shape {a.shape}, the mask {m.shape}; they must match.")
    width = m.shape[1]
    idx = (np.arange(width)[None, :] + shift(m)[:, None]) % max(width, 1)
    return m, [np.take_along_axis(m, idx, 1)] + [np.take_along_axis(a, idx, 1) for a in arrays]


def _result(mask, tensors, rolled, keep):
    out = [_like(t, r[:, keep]) for t, r in zip((mask, *tensors), rolled, strict=True)]
    return out[0] if len(out) == 1 else tuple(out)


def flush_left(mask, *tensors):
    """TRL's ``flush_left``: roll each row so its first non-zero mask entry is in column 0 (the other arrays rolled
    the same way), then cut the columns from the first one that is zero in every row.

    ``flush_left([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], [[9, 9, 2, 3, 4], [9, 5, 6, 9, 9]])`` ->
    ``([[1, 1, 1], [1, 1, 0]], [[2, 3, 4], [5, 6, 9]])`` (a roll: what wraps around stays, as in TRL). Returns the
    mask alone when no other array is given, else ``(mask, *tensors)``.
    """
    m, rolled = _roll_rows(mask, tensors, lambda m: np.argmax(m, axis=1), "flush_left")
    empty = rolled[0].sum(axis=0) == 0
    first_empty = int(np.argmax(empty)) if empty.any() else m.shape[1]
    return _result(mask, tensors, rolled, slice(0, first_empty))


def flush_right(mask, *tensors):
    """The mirror image of :func:`flush_left`: ``flush_right(m, *t)`` is ``flush_left`` applied to the arrays with
    their columns reversed, reversed back. Each row is rolled so its last non-zero mask entry is in the last
    column, and the columns up to the last one (counting from the right) that is zero in every row are cut.
    (TRL 1.16 has no ``flush_right``; this is defined and tested as that mirror of TRL's ``flush_left``.)
    """
    flipped = [np.asarray(x)[:, ::-1] for x in (mask, *tensors)]
    out = flush_left(*flipped)
    out = out if isinstance(out, tuple) else (out,)
    res = [_like(t, np.ascontiguousarray(np.asarray(r)[:, ::-1])) for t, r in zip((mask, *tensors), out, strict=True)]
    return res[0] if len(res) == 1 else tuple(res)


def truncate_dataset(dataset, max_length: int, map_kwargs: dict[str, Any] | None = None):
    """TRL's ``truncate_dataset``: cut every list column of a ``Dataset`` / ``DatasetDict`` (or their iterable
    versions) to its first ``max_length`` items; other columns and the dataset's format are kept.

    ``map_kwargs`` go to ``dataset.map`` (e.g. ``num_proc``, ``desc``).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.types
    from datasets import Dataset, DatasetDict, IterableDatasetDict

    if not isinstance(max_length, (int, np.integer)) or max_length < 0:
        raise ValueError(f"truncate_dataset: max_length must be a non-negative int, got {max_length!r}.")
    map_kwargs = dict(map_kwargs or {})

    def truncate(examples):
        columns = []
        for column in examples.columns:
            if pyarrow.types.is_list(column.type) or pyarrow.types.is_large_list(column.type):
                column = pc.list_slice(column, 0, int(max_length))
            columns.append(column)
        return pa.Table.from_arrays(columns, names=examples.column_names)

    first = dataset[next(iter(dataset))] if isinstance(dataset, (DatasetDict, IterableDatasetDict)) else dataset
    if isinstance(first, Dataset):
        fmt = dict(first.format)
    else:
        fmt = {"type": first._formatting.format_type if first._formatting is not None else None}
    fmt.update(fmt.pop("format_kwargs", {}))
    dataset = dataset.with_format("arrow")
    dataset = dataset.map(truncate, batched=True, **map_kwargs)
    return dataset.with_format(**fmt)
