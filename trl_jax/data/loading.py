"""Dataset loading: in-memory datasets, local json/jsonl/parquet/csv files, saved datasets, hub names, builtins."""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any

__all__ = ["DatasetFileError", "load_dataset_any", "load_dataset_mixture", "mixture_row_counts"]


class DatasetFileError(ValueError):
    """A local data file that cannot be read as a dataset (empty, or not valid JSON); the message names the file,
    the line where it applies, and the fix."""

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
    if source.startswith("file://"):  # a local path written as a URL
        from trl_jax.train.checkpoint import path_str

        source = path_str(source)
    elif "://" in source and not source.startswith("hf://"):
        # gs://, s3://, any fsspec URL: a file is read by the builder of its extension (datasets speaks fsspec), a
        # directory written by save_to_disk with load_from_disk
        from trl_jax.train.checkpoint import as_path

        remote = as_path(source)
        if (remote / "dataset_info.json").exists() or (remote / "dataset_dict.json").exists():
            return _pick_split(datasets.load_from_disk(source), split, f"The saved dataset {source}")
    ext = os.path.splitext(source)[1].lower()
    if ext in _FILE_BUILDERS:
        json_logger = logging.getLogger("datasets.packaged_modules.json.json")
        level = json_logger.level
        if _FILE_BUILDERS[ext] == "json":  # its "Failed to load JSON" lines would precede the one error below
            json_logger.setLevel(logging.CRITICAL)
        try:
            return datasets.load_dataset(_FILE_BUILDERS[ext], data_files=source, split="train", streaming=streaming,
                                         **kwargs)
        except Exception:  # noqa: BLE001 -- diagnosed below, re-raised as is when the file looks fine
            if _FILE_BUILDERS[ext] != "json" or "://" in source:
                raise
            problem = _diagnose_json_files(source)
            if problem is None:
                raise
        finally:
            json_logger.setLevel(level)
        raise problem from None
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
    if source == "json" and isinstance(data_files, (str, list, tuple)):  # TRL's `path: json` + `data_files:`
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        try:
            ds = datasets.load_dataset(source, name, data_dir=data_dir, data_files=data_files, split=split,
                                       streaming=streaming, **kwargs)
        except Exception:  # noqa: BLE001 -- diagnosed below, re-raised as is when the files look fine
            problem = next((p for p in map(_diagnose_json_files, files) if p is not None), None)
            if problem is None:
                raise
            raise problem from None
        return _pick_split(ds, split, source)
    return _pick_split(
        datasets.load_dataset(source, name, data_dir=data_dir, data_files=data_files, split=split,
                              streaming=streaming, **kwargs),
        split, source,
    )


def _json_type_name(value) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _diagnose_json_file(path: str) -> DatasetFileError | None:
    """The first problem that stops `datasets`' json builder on ``path`` (empty, bad JSON, a line that is not an
    object), as a :class:`DatasetFileError` naming the file, the line and the fix; ``None`` if none is found."""
    kind = "JSON Lines" if path.lower().endswith(".jsonl") else "JSON"
    fmt_hint = ('one JSON object per line, e.g. {"prompt": "...", "completion": "..."}' if kind == "JSON Lines"
                else 'a JSON array of objects or one JSON object per line')
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        return DatasetFileError(f"Dataset file {path} is not UTF-8 text ({e}); re-save it as UTF-8 {kind}.")
    except OSError:
        return None
    if not text.strip():
        return DatasetFileError(
            f"Dataset file {path} is empty (no rows). Write {fmt_hint}, or point the config at a file with data."
        )
    if kind == "JSON":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            whole_error = e
        else:
            if isinstance(whole, list) and not whole:
                return DatasetFileError(
                    f"Dataset file {path} holds an empty JSON array (no rows). Write {fmt_hint}."
                )
            if isinstance(whole, list):
                for i, row in enumerate(whole):
                    if not isinstance(row, dict):
                        return DatasetFileError(
                            f"Dataset file {path}: element {i} of the top-level array is {_json_type_name(row)}, "
                            f"not an object. Each row must be an object mapping column names to values."
                        )
            return None
        if text.lstrip().startswith("[") or text.strip().count("\n") == 0:
            e = whole_error
            return DatasetFileError(
                f"Dataset file {path}, line {e.lineno}, column {e.colno}: invalid JSON ({e.msg}). Fix that line "
                f"so the file is {fmt_hint}."
            )
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return DatasetFileError(
                f"Dataset file {path}, line {lineno}, column {e.colno}: invalid JSON ({e.msg}). Each line must be "
                f"one complete JSON object ({fmt_hint}); fix or remove line {lineno}."
            )
        if not isinstance(row, dict):
            return DatasetFileError(
                f"Dataset file {path}, line {lineno}: {_json_type_name(row)}, not a JSON object. Each line must be "
                f"one object mapping column names to values; fix or remove line {lineno}."
            )
    return None


def _diagnose_json_files(source: str) -> DatasetFileError | None:
    paths = sorted(glob.glob(source)) if glob.has_magic(source) else [source]
    for path in paths:
        if os.path.isfile(path):
            problem = _diagnose_json_file(path)
            if problem is not None:
                return problem
    return None


def mixture_row_counts(lengths, fractions) -> list[int]:
    """Rows kept from each dataset of a mixture, by TRL 1.16's rule (`trl.scripts.utils.get_dataset`).

    ``fractions`` are target shares of the final mixture: normalised to sum to one (``w_i = f_i / Σ f``), and the
    mixture size is the largest that oversamples no dataset, ``N = min_{w_i > 0} len_i / w_i``; dataset ``i``
    contributes its first ``round(w_i · N)`` rows (Python's ``round``: halves go to even). Example: 17 + 17 rows at
    0.75 / 0.25 give ``N = 22.67`` and 17 + 6 = 23 rows. ``fractions`` must be set for all datasets or for none
    (``None`` everywhere keeps every row).
    """
    lengths, fractions = list(lengths), list(fractions)
    if all(f is None for f in fractions):
        return [int(n) for n in lengths]
    if any(f is None for f in fractions):
        missing = [i for i, f in enumerate(fractions) if f is None]
        raise ValueError(
            "`fraction` must be set for either all datasets in the mixture or none of them (as in TRL); "
            f"datasets {missing} of the `datasets:` list have none. Give every entry a `fraction` (target shares "
            "of the final mixture, normalised to sum to one) or remove them all."
        )
    if any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(
            f"Dataset `fraction`s must be >= 0 with a positive sum (target shares of the final mixture); got "
            f"{fractions}."
        )
    weights = [f / sum(fractions) for f in fractions]
    total = min(n / w for n, w in zip(lengths, weights, strict=True) if w > 0)
    return [min(round(w * total), int(n)) for n, w in zip(lengths, weights, strict=True)]


def load_dataset_mixture(mixture, seed: int = 0):
    """Load a `DatasetMixtureConfig` (TRL's `datasets:` list) and concatenate it.

    Each entry is loaded with `load_dataset_any(path, name=..., data_dir=..., data_files=..., split=...)` and
    reduced to `columns`. `fraction`s are TRL 1.16's target shares of the final mixture (see
    :func:`mixture_row_counts`: normalised, the mixture capped so that no dataset is oversampled, set for all
    entries or none, not with streaming). The parts are concatenated in order, as TRL does (streaming too). With
    `test_split_size` a `DatasetDict` with `train`/`test` splits is returned (split with `seed`), else a
    `DatasetDict` with only `train`.
    """
    import datasets

    fractions = [entry.fraction for entry in mixture.datasets]
    if any(f is not None for f in fractions):
        if mixture.streaming:
            raise ValueError(
                "Using a dataset `fraction` is not supported with streaming datasets (as in TRL): set "
                "`streaming: false` or remove the `fraction`s."
            )
        mixture_row_counts([0] * len(fractions), fractions)  # the all-or-none and sign checks, before any loading
    parts = []
    for entry in mixture.datasets:
        ds = load_dataset_any(entry.path, split=entry.split, name=entry.name, data_dir=entry.data_dir,
                              data_files=entry.data_files, streaming=mixture.streaming)
        if entry.columns is not None:
            ds = ds.select_columns(entry.columns)
        parts.append(ds)
    if not parts:
        raise ValueError("The dataset mixture is empty: give at least one entry under `datasets:`.")
    if any(f is not None for f in fractions):
        counts = mixture_row_counts([len(ds) for ds in parts], fractions)
        parts = [ds.select(range(n)) for ds, n in zip(parts, counts, strict=True)]
    combined = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if mixture.test_split_size is not None:
        return combined.train_test_split(test_size=mixture.test_split_size, seed=seed)
    return datasets.DatasetDict({"train": combined})
