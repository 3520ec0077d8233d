"""Dataset format detection and validation, and TRL's example-level transforms.

Formats (TRL's names), keyed by columns; each can be *standard* (strings) or *conversational* (lists of
`{"role", "content"}` messages):

* ``language_modeling``: `text` (or `dataset_text_field`) / `messages`; ShareGPT `conversations` (`from`/`value`).
* ``prompt_only``: `prompt`.
* ``prompt_completion``: `prompt` + `completion`.
* ``preference``: `prompt` + `chosen` + `rejected`; ``preference_implicit_prompt``: `chosen` + `rejected`.
* ``unpaired_preference``: `prompt` + `completion` + `label` (bool).
* ``tokenized``: `input_ids` (SFT), `prompt_ids` + `chosen_ids` + `rejected_ids` (DPO), `prompt_ids` +
  `completion_ids` + `label` (KTO), `chosen_ids` + `rejected_ids` (reward).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "ACCEPTED_FORMATS",
    "is_conversational",
    "is_conversational_from_value",
    "maybe_convert_to_chatml",
    "extract_prompt",
    "maybe_extract_prompt",
    "unpair_preference_dataset",
    "maybe_unpair_preference_dataset",
    "get_column_names",
    "detect_format",
    "validate_dataset_format",
]

_MESSAGE_KEYS = ("prompt", "chosen", "rejected", "completion", "messages")

# What each trainer accepts, as (format name, required columns) in the order they are tried.
ACCEPTED_FORMATS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "sft": (
        ("tokenized", ("input_ids",)),
        ("prompt_completion", ("prompt", "completion")),
        ("language_modeling (conversational)", ("messages",)),
        ("language_modeling (ShareGPT)", ("conversations",)),
        ("language_modeling", ("{text}",)),
    ),
    "dpo": (
        ("tokenized", ("prompt_ids", "chosen_ids", "rejected_ids")),
        ("preference", ("prompt", "chosen", "rejected")),
        ("preference_implicit_prompt", ("chosen", "rejected")),
    ),
    "kto": (
        ("tokenized", ("prompt_ids", "completion_ids", "label")),
        ("unpaired_preference", ("prompt", "completion", "label")),
        ("preference", ("prompt", "chosen", "rejected")),
        ("preference_implicit_prompt", ("chosen", "rejected")),
    ),
    "reward": (
        ("tokenized", ("chosen_ids", "rejected_ids")),
        ("preference", ("prompt", "chosen", "rejected")),
        ("preference_implicit_prompt", ("chosen", "rejected")),
    ),
    "grpo": (("prompt_only", ("prompt",)),),
    "online_dpo": (("prompt_only", ("prompt",)),),
}


def is_conversational(example: dict[str, Any]) -> bool:
    """True when one of `prompt/chosen/rejected/completion/messages` holds a list of role-tagged message dicts."""
    for key in _MESSAGE_KEYS:
        if key in example:
            value = example[key]
            return (
                isinstance(value, list)
                and len(value) > 0
                and isinstance(value[0], dict)
                and "role" in value[0]
            )
    return False


def is_conversational_from_value(example: dict[str, Any]) -> bool:
    """True for ShareGPT-style `conversations` lists of `{"from", "value"}` dicts."""
    value = example.get("conversations")
    return (
        isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict)
        and "from" in value[0] and "value" in value[0]
    )


def maybe_convert_to_chatml(example: dict[str, Any]) -> dict[str, Any]:
    """Rename `from`/`value` to `role`/`content` in message lists and `conversations` to `messages`."""
    for key in (*_MESSAGE_KEYS, "conversations"):
        messages = example.get(key)
        if isinstance(messages, list):
            for message in messages:
                if isinstance(message, dict):
                    if "from" in message:
                        message["role"] = message.pop("from")
                    if "value" in message:
                        message["content"] = message.pop("value")
    if "conversations" in example:
        example["messages"] = example.pop("conversations")
    return example


def extract_prompt(example: dict[str, Sequence]) -> dict[str, Sequence]:
    """Split the longest common prefix of `chosen` and `rejected` off as `prompt` (TRL's implicit prompt).

    Works element-wise on message lists and character-wise on strings; for strings a space right before the
    divergence point stays with the completions.
    """
    chosen, rejected = example["chosen"], example["rejected"]
    n = min(len(chosen), len(rejected))
    cut = n
    for i in range(n):
        if chosen[i] != rejected[i]:
            cut = i - 1 if chosen[i - 1] == " " else i
            break
    else:
        # No divergence within the shorter one: TRL's loop leaves the index at its last value.
        cut = n - 1 if n > 0 else 0
    return {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}


def maybe_extract_prompt(example: dict[str, Any]) -> dict[str, Any]:
    """`extract_prompt` unless a `prompt` of the same kind (conversational or not) as `chosen` is present."""
    if "chosen" not in example or "rejected" not in example:
        return example
    if "prompt" in example:
        chosen_conv = is_conversational({"chosen": example["chosen"]})
        prompt_conv = is_conversational({"prompt": example["prompt"]})
        if chosen_conv == prompt_conv:
            return example
    return extract_prompt({"chosen": example["chosen"], "rejected": example["rejected"]})


def _unpair_batch(batch: dict[str, list]) -> dict[str, list]:
    n = len(batch["chosen"])
    out = {"completion": batch["chosen"] + batch["rejected"], "label": [True] * n + [False] * n}
    if "prompt" in batch:
        out["prompt"] = batch["prompt"] + batch["prompt"]
    for key, values in batch.items():
        if key not in ("chosen", "rejected", "prompt"):
            out[key] = values + values
    return out


def get_column_names(dataset) -> list[str]:
    """Column names of a `Dataset`/`IterableDataset` (from the first row when the iterable has no features)."""
    names = getattr(dataset, "column_names", None)
    if isinstance(names, dict):  # DatasetDict
        names = next(iter(names.values()))
    if names is None:
        names = list(next(iter(dataset)).keys())
    return list(names)


def unpair_preference_dataset(dataset, **map_kwargs):
    """`(prompt, chosen, rejected)` rows -> `(prompt, completion, label)` rows, as `trl.unpair_preference_dataset`.

    Within each `map` batch (default 1000 rows) the chosen rows come first (label True), then the rejected ones
    (label False); other columns are duplicated.
    """
    from datasets import DatasetDict

    if isinstance(dataset, DatasetDict):
        columns = next(iter(dataset.values())).column_names
    else:
        columns = get_column_names(dataset)
    return dataset.map(_unpair_batch, batched=True, remove_columns=columns, **map_kwargs)


def maybe_unpair_preference_dataset(dataset, num_proc: int | None = None, desc: str | None = None):
    """Unpair only when the dataset has `chosen` and `rejected` columns."""
    columns = get_column_names(dataset)
    if "chosen" in columns and "rejected" in columns:
        kwargs = {"num_proc": num_proc}
        if desc is not None:
            kwargs["desc"] = desc
        return unpair_preference_dataset(dataset, **kwargs)
    return dataset


def detect_format(columns: Sequence[str] | dict[str, Any], trainer: str = "sft",
                  dataset_text_field: str = "text") -> str | None:
    """Name of the first accepted format of `trainer` whose columns are all present, else None."""
    names = set(columns.keys() if isinstance(columns, dict) else columns)
    for name, required in ACCEPTED_FORMATS[trainer]:
        required = tuple(dataset_text_field if c == "{text}" else c for c in required)
        if all(c in names for c in required):
            return name
    return None


def _describe_formats(trainer: str, dataset_text_field: str) -> str:
    parts = []
    for name, required in ACCEPTED_FORMATS[trainer]:
        cols = " + ".join(f"`{dataset_text_field if c == '{text}' else c}`" for c in required)
        parts.append(f"{name} ({cols})")
    return "; ".join(parts)


def _check_value(trainer: str, column: str, value: Any) -> str | None:
    """Return a description of what is wrong with `value` for `column`, or None."""
    if column in ("prompt", "completion", "chosen", "rejected", "messages"):
        if isinstance(value, str):
            return None if column != "messages" else "`messages` must be a list of {'role', 'content'} dicts"
        if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
            return None
        if isinstance(value, list) and not value:
            return f"`{column}` is an empty list"
        return f"`{column}` must be a string or a list of {{'role', 'content'}} message dicts, got {type(value).__name__}"
    if column == "label" and not isinstance(value, bool):
        return f"`label` must be a bool (True = desirable), got {type(value).__name__} {value!r}"
    if column.endswith("_ids") and not (isinstance(value, list) and all(isinstance(t, int) for t in value)):
        return f"`{column}` must be a list of token ids"
    return None


def validate_dataset_format(dataset, trainer: str = "sft", dataset_text_field: str = "text") -> str:
    """Check that `dataset` is in a format `trainer` accepts and return the format name.

    Raises `ValueError` naming the columns found and the formats accepted, or what is wrong with a column's type
    (checked on the first row).
    """
    if trainer not in ACCEPTED_FORMATS:
        raise ValueError(f"Unknown trainer {trainer!r}; expected one of {sorted(ACCEPTED_FORMATS)}.")
    columns = get_column_names(dataset)
    fmt = detect_format(columns, trainer, dataset_text_field)
    if fmt is None:
        raise ValueError(
            f"The {trainer.upper()} dataset has columns {columns}, which match no accepted format. Accepted formats "
            f"(columns): {_describe_formats(trainer, dataset_text_field)}. Rename or map your columns accordingly"
            + (" (or set `dataset_text_field`)." if trainer == "sft" else ".")
        )
    first = next(iter(dataset))
    if fmt in ("language_modeling (ShareGPT)",):
        if not is_conversational_from_value(first):
            raise ValueError("`conversations` must be a list of {'from', 'value'} dicts (ShareGPT format).")
        return fmt
    required = dict(ACCEPTED_FORMATS[trainer])[fmt]
    for column in required:
        column = dataset_text_field if column == "{text}" else column
        problem = _check_value(trainer, column, first[column])
        if column == dataset_text_field and fmt == "language_modeling" and not isinstance(first[column], str):
            problem = f"`{column}` must be a string, got {type(first[column]).__name__}"
        if problem:
            raise ValueError(f"Bad {trainer.upper()} dataset (format {fmt}, columns {columns}): {problem}.")
    return fmt
