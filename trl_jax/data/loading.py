"""Dataset loading: in-memory datasets, local json/jsonl/parquet/csv files, saved datasets, hub names, builtins."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["load_dataset_any", "load_dataset_mixture"]

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def _pick_split(dataset, split: str | None, origin: str):
    from datasets import DatasetDict, IterableDatasetDict

    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        if split is None:
            split = "train"
        if split not in dataset:
            raise ValueError(f"{origin} has splits {list(dataset.keys())}, not {split!r}; pass one of them as `split`.")
        return dataset[split]
    return dataset


def load_dataset_any(source: Any, *, split: str | None = "train", name: str | None = None,
                     streaming: bool = False, data_dir: str | None = None, data_files=None, **kwargs):
    """Return a `datasets.Dataset` / `IterableDataset` from any of:

    * a `Dataset` / `IterableDataset` (returned as is) or a `DatasetDict` (its `split`);
    * a list of row dicts or a dict of columns;
    * `"builtin:NAME"`: a dataset shipped with trl_jax (`trl_jax.data.builtin.BUILTIN_DATASETS`);
    * a local `.json` / `.jsonl` / `.parquet` / `.csv` file (or glob of them), loaded as its `train` split;
    * a directory written by `Dataset.save_to_disk`, or a directory of data files;
    * otherwise a hub name, through `datasets.load_dataset(source, name, split=split, streaming=streaming)`.
    """
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        return source
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return _pick_split(source, split, "The DatasetDict")
    if isinstance(source, list):
        return datasets.Dataset.from_list(source)
    if isinstance(source, dict):
        return datasets.Dataset.from_dict(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"Cannot load a dataset from a {type(source).__name__}; pass a datasets.Dataset, a local file path, a "
            "hub dataset name or 'builtin:NAME'."
        )
    source = os.fspath(source)
    if source.startswith("builtin:"):
        from .builtin import load_builtin_dataset

        return load_builtin_dataset(source.split(":", 1)[1], split=split or "train")
    ext = os.path.splitext(source)[1].lower()
    if ext in _FILE_BUILDERS:
        ds = datasets.load_dataset(_FILE_BUILDERS[ext], data_files=source, split="train", streaming=streaming,
                                   **kwargs)
        return ds
    if os.path.isdir(source):
        if os.path.exists(os.path.join(source, "dataset_info.json")) or os.path.exists(
            os.path.join(source, "dataset_dict.json")
        ):
            return _pick_split(datasets.load_from_disk(source), split, f"The saved dataset {source}")
        return _pick_split(
            datasets.load_dataset(source, name, data_dir=data_dir, data_files=data_files, split=split,
                                  streaming=streaming, **kwargs),
            split, source,
        )
    return _pick_split(
        datasets.load_dataset(source, name, data_dir=data_dir, data_files=data_files, split=split,
                              streaming=streaming, **kwargs),
        split, source,
    )


def load_dataset_mixture(mixture, seed: int = 0):
    """Load a `DatasetMixtureConfig` (TRL's `datasets:` list) and concatenate it.

    Each entry is loaded with `load_dataset_any(path, name=..., data_dir=..., data_files=..., split=...)`, reduced to
    `columns` and to the first `fraction` of its rows. With `test_split_size` a `DatasetDict` with `train`/`test`
    splits is returned (split with `seed`), else a `DatasetDict` with only `train`.
    """
    import datasets

    parts = []
    for entry in mixture.datasets:
        ds = load_dataset_any(entry.path, split=entry.split, name=entry.name, data_dir=entry.data_dir,
                              data_files=entry.data_files, streaming=mixture.streaming)
        if entry.columns is not None:
            ds = ds.select_columns(entry.columns)
        if entry.fraction is not None:
            if mixture.streaming:
                raise ValueError("`fraction` is not supported with streaming datasets.")
            ds = ds.select(range(int(len(ds) * entry.fraction)))
        parts.append(ds)
    if not parts:
        raise ValueError("The dataset mixture is empty: give at least one entry under `datasets:`.")
    combined = parts[0] if len(parts) == 1 else (
        datasets.interleave_datasets(parts) if mixture.streaming else datasets.concatenate_datasets(parts)
    )
    if mixture.test_split_size is not None:
        return combined.train_test_split(test_size=mixture.test_split_size, seed=seed)
    return datasets.DatasetDict({"train": combined})
