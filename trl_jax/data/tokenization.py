"""Dataset preparation as TRL 1.16's SFT, DPO and KTO trainers do it (`_prepare_dataset`).

Each `prepare_*_dataset` runs the same `datasets.map`/`filter` steps as the TRL trainer, so the resulting columns
are identical token for token:

* SFT  -> `input_ids`, `labels` (`-100` outside the trained tokens), plus `seq_lengths` when packed.
* DPO  -> `prompt_ids`, `chosen_ids`, `rejected_ids`.
* KTO  -> `prompt_ids`, `completion_ids`, `label`, plus `KL_completion_ids` (mismatched pairs) unless
  `loss_type="apo_zero_unpaired"`.
* Reward -> `chosen_ids`, `rejected_ids` (prompt included), other columns (e.g. `margin`) kept.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

from .chat_template import common_prefix_length, has_generation_markers, row_tools, tokenize_input
from .formats import (
    extract_prompt,
    get_column_names,
    is_conversational,
    is_conversational_from_value,
    maybe_convert_to_chatml,
    unpair_preference_dataset,
    validate_dataset_format,
)
from .packing import pack_dataset

__all__ = [
    "setup_tokenizer",
    "tokenize_sft_example",
    "build_labels",
    "prepare_sft_dataset",
    "tokenize_preference_example",
    "prepare_preference_dataset",
    "tokenize_unpaired_example",
    "add_kl_completion_ids",
    "prepare_unpaired_preference_dataset",
    "tokenize_reward_example",
    "prepare_reward_dataset",
]

logger = logging.getLogger(__name__)
_warned_prefix = False


def setup_tokenizer(tokenizer, args=None):
    """Apply the config's tokenizer settings in place, as TRL's trainers do, and return the tokenizer.

    * `args.eos_token` replaces the EOS token (must be in the vocabulary).
    * `args.chat_template_path` pointing to a `.jinja`/`.j2` file becomes the chat template.
    * The pad token falls back to `args.pad_token`, then the tokenizer's pad token, then EOS.
    """
    eos_token = getattr(args, "eos_token", None)
    if eos_token is not None:
        if eos_token not in tokenizer.get_vocab():
            raise ValueError(
                f"The `eos_token` {eos_token!r} is not in the tokenizer's vocabulary; use an existing token."
            )
        tokenizer.eos_token = eos_token
    template_path = getattr(args, "chat_template_path", None)
    if template_path is not None:
        if os.path.isfile(template_path) and template_path.endswith((".jinja", ".j2")):
            with open(template_path, encoding="utf-8") as handle:
                tokenizer.chat_template = handle.read()
        else:
            raise ValueError(
                f"`chat_template_path` {template_path!r} is not a .jinja/.j2 file. trl_jax does not clone chat "
                "templates from another tokenizer (that resizes the embeddings); export the template to a file."
            )
    pad_token = getattr(args, "pad_token", None) or tokenizer.pad_token or tokenizer.eos_token
    if pad_token is None or pad_token not in tokenizer.get_vocab():
        raise ValueError(f"The pad token {pad_token!r} is not in the tokenizer's vocabulary; set `pad_token`.")
    tokenizer.pad_token = pad_token
    return tokenizer


def _warn_prefix(tokenizer, prompt_ids, prompt_len):
    global _warned_prefix
    if prompt_len < len(prompt_ids) and not _warned_prefix:
        _warned_prefix = True
        logger.warning(
            "The tokenized prompt is not a prefix of the tokenized prompt+completion; the completion starts where "
            "they diverge and this end of the prompt is left out: %r",
            tokenizer.decode(prompt_ids[prompt_len:]),
        )


def _map_kwargs(dataset, num_proc, desc):
    from datasets import Dataset

    if isinstance(dataset, Dataset):
        return {"num_proc": num_proc, "desc": desc}
    return {}


# ------------------------------------------------------------------------------------------------------------- SFT


def tokenize_sft_example(example: dict[str, Any], tokenizer, dataset_text_field: str = "text",
                         assistant_only_loss: bool = False, chat_template: str | None = None) -> dict[str, list]:
    """Tokenize one SFT row (after EOS handling): `input_ids` + `completion_mask` and/or `assistant_masks`."""
    kwargs = {"chat_template": chat_template, "tools": row_tools(example), **example.get("chat_template_kwargs", {})}
    output: dict[str, list] = {}
    if "prompt" in example:
        if is_conversational(example):
            prompt_ids = tokenize_input(tokenizer, example["prompt"], add_generation_prompt=True, **kwargs)["input_ids"]
            full = tokenize_input(tokenizer, example["prompt"] + example["completion"],
                                  return_assistant_tokens_mask=assistant_only_loss, **kwargs)
            full_ids = full["input_ids"]
            if "assistant_masks" in full:
                output["assistant_masks"] = full["assistant_masks"]
        else:
            prompt_ids = tokenize_input(tokenizer, example["prompt"])["input_ids"]
            full_ids = tokenize_input(tokenizer, example["prompt"] + example["completion"])["input_ids"]
        prompt_len = common_prefix_length(prompt_ids, full_ids)
        _warn_prefix(tokenizer, prompt_ids, prompt_len)
        output["input_ids"] = full_ids
        output["completion_mask"] = [0] * prompt_len + [1] * (len(full_ids) - prompt_len)
    elif is_conversational(example):
        processed = tokenize_input(tokenizer, example["messages"], return_assistant_tokens_mask=assistant_only_loss,
                                   **kwargs)
        output = {k: processed[k] for k in ("input_ids", "assistant_masks") if k in processed}
    else:
        output = {"input_ids": tokenize_input(tokenizer, example[dataset_text_field])["input_ids"]}
    if "assistant_masks" in output and 1 not in output["assistant_masks"]:
        raise RuntimeError(
            "`assistant_only_loss=True` but an example has no assistant tokens: the chat template probably lacks "
            "`{% generation %}` markers around assistant turns. Use a template with them (`chat_template_path`)."
        )
    return output


def build_labels(example: dict[str, Any], mask_columns: list[str]) -> dict[str, list]:
    """`labels[t] = input_ids[t]` where every mask in `mask_columns` is 1, else -100."""
    masks = [example[c] for c in mask_columns]
    return {"labels": [tok if all(bits) else -100 for tok, *bits in zip(example["input_ids"], *masks, strict=False)]}


def _add_eos_sft(example, eos_token, dataset_text_field):
    if dataset_text_field in example and not example[dataset_text_field].endswith(eos_token):
        example[dataset_text_field] = example[dataset_text_field] + eos_token
    elif "completion" in example and not example["completion"].endswith(eos_token):
        example["completion"] = example["completion"] + eos_token
    return example


def _truncate(example, sl):
    return {"input_ids": example["input_ids"][sl], "labels": example["labels"][sl]}


def prepare_sft_dataset(dataset, tokenizer, args, *, formatting_func: Callable[[dict], str] | None = None,
                        packing: bool | None = None, completion_only_loss: bool | None = None,
                        dataset_name: str = "train"):
    """Tokenize, mask, truncate and (optionally) pack an SFT dataset as `trl.SFTTrainer._prepare_dataset`.

    Args:
        dataset: `datasets.Dataset` or `IterableDataset` in an SFT format (see `formats.ACCEPTED_FORMATS["sft"]`).
        tokenizer: a `PreTrainedTokenizerBase` (call `setup_tokenizer` first for eos/pad/template settings).
        args: an `SFTConfig` (reads `dataset_text_field`, `assistant_only_loss`, `completion_only_loss`,
            `max_length`, `truncation_mode`, `packing`, `packing_strategy`, `shuffle_dataset`, `seed`,
            `dataset_num_proc`).
        formatting_func: `example -> str`, turning rows into language-modeling `text`.
        packing: overrides `args.packing` (e.g. `args.eval_packing` for the eval set).
        completion_only_loss: overrides the rule `args.completion_only_loss` (None: True iff the dataset has
            `prompt` and `completion`).

    Returns the dataset with `input_ids` and `labels` (and `seq_lengths` when packed with a bfd strategy).
    """
    from datasets import Dataset

    packing = args.packing if packing is None else packing
    if isinstance(dataset, Dataset) and dataset.format["type"] == "custom":
        raise ValueError(
            "Cannot prepare a dataset that uses `Dataset.with_transform()`; materialize it with `Dataset.map()`."
        )
    columns = get_column_names(dataset)
    is_processed = "input_ids" in columns
    if formatting_func is None and not is_processed:
        validate_dataset_format(dataset, "sft", args.dataset_text_field)
    first = next(iter(dataset))
    if completion_only_loss is None:
        completion_only_loss = args.completion_only_loss
        if completion_only_loss is None:
            completion_only_loss = "prompt" in first and "completion" in first
    if formatting_func is not None and completion_only_loss and args.completion_only_loss:
        raise ValueError("A `formatting_func` is incompatible with `completion_only_loss=True`.")
    chat_template = None
    if args.assistant_only_loss:
        if not is_conversational(first) and not is_processed:
            raise ValueError("`assistant_only_loss=True` needs a conversational dataset (`messages` or "
                             "conversational prompt/completion).")
        if not has_generation_markers(tokenizer.chat_template):
            raise ValueError(
                "`assistant_only_loss=True` needs a chat template with `{% generation %}` markers around assistant "
                "turns; set `chat_template_path` to such a .jinja file (TRL ships `*_training.jinja` ones)."
            )
    num_proc = getattr(args, "dataset_num_proc", None)

    if formatting_func is not None and not is_processed:
        dataset = dataset.map(lambda ex: {"text": formatting_func(ex)}, batched=False,
                              **_map_kwargs(dataset, num_proc, f"Applying formatting function to {dataset_name}"))
    if not is_processed:
        first = next(iter(dataset))
        if is_conversational_from_value(first):
            columns = get_column_names(dataset)
            dataset = dataset.map(maybe_convert_to_chatml,
                                  remove_columns="conversations" if "conversations" in columns else None,
                                  **_map_kwargs(dataset, num_proc, f"Converting {dataset_name} to ChatML"))
        first = next(iter(dataset))
        if not is_conversational(first):
            dataset = dataset.map(
                _add_eos_sft,
                fn_kwargs={"eos_token": tokenizer.eos_token, "dataset_text_field": args.dataset_text_field},
                remove_columns="messages" if "messages" in columns else None,
                **_map_kwargs(dataset, num_proc, f"Adding EOS to {dataset_name}"),
            )
        dataset = dataset.map(
            tokenize_sft_example,
            fn_kwargs={"tokenizer": tokenizer, "dataset_text_field": args.dataset_text_field,
                       "assistant_only_loss": args.assistant_only_loss, "chat_template": chat_template},
            **_map_kwargs(dataset, num_proc, f"Tokenizing {dataset_name}"),
        )
    columns = get_column_names(dataset)
    if "labels" not in columns:
        mask_columns = []
        if completion_only_loss and "completion_mask" in columns:
            mask_columns.append("completion_mask")
        if "assistant_masks" in columns:
            mask_columns.append("assistant_masks")
        dataset = dataset.map(build_labels, fn_kwargs={"mask_columns": mask_columns}, remove_columns=mask_columns,
                              **_map_kwargs(dataset, num_proc, f"Building labels for {dataset_name}"))
    if args.max_length is not None and not packing:
        if args.truncation_mode == "keep_start":
            sl = slice(None, args.max_length)
        elif args.truncation_mode == "keep_end":
            sl = slice(-args.max_length, None)
        else:
            raise ValueError(f"Unsupported truncation mode {args.truncation_mode!r}; use 'keep_start' or 'keep_end'.")
        dataset = dataset.map(_truncate, fn_kwargs={"sl": sl},
                              **_map_kwargs(dataset, num_proc, f"Truncating {dataset_name}"))
        dataset = dataset.filter(lambda ex: any(t != -100 for t in ex["labels"]),
                                 **_map_kwargs(dataset, num_proc, f"Dropping fully masked rows of {dataset_name}"))
    if packing:
        if args.max_length is None:
            raise ValueError("When packing is enabled, `max_length` can't be `None`.")
        dataset = dataset.select_columns(["input_ids", "labels"])
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        dataset = pack_dataset(dataset, args.max_length, args.packing_strategy,
                               _map_kwargs(dataset, num_proc, f"Packing {dataset_name}"))
    if args.shuffle_dataset:
        dataset = dataset.shuffle(seed=args.seed)
    return dataset


# ------------------------------------------------------------------------------------------------------------- DPO


def tokenize_preference_example(example: dict[str, Any], tokenizer) -> dict[str, list]:
    """Tokenize one preference row (after EOS handling) into `prompt_ids`, `chosen_ids`, `rejected_ids`."""
    kwargs = {"tools": row_tools(example), **example.get("chat_template_kwargs", {})}
    if is_conversational(example):
        prompt_ids = tokenize_input(tokenizer, example["prompt"], add_generation_prompt=True, **kwargs)["input_ids"]
        chosen_full = tokenize_input(tokenizer, example["prompt"] + example["chosen"], **kwargs)["input_ids"]
        rejected_full = tokenize_input(tokenizer, example["prompt"] + example["rejected"], **kwargs)["input_ids"]
    else:
        prompt_ids = tokenize_input(tokenizer, example["prompt"])["input_ids"]
        chosen_full = tokenize_input(tokenizer, example["prompt"] + example["chosen"])["input_ids"]
        rejected_full = tokenize_input(tokenizer, example["prompt"] + example["rejected"])["input_ids"]
    prompt_len = min(common_prefix_length(prompt_ids, chosen_full), common_prefix_length(prompt_ids, rejected_full))
    _warn_prefix(tokenizer, prompt_ids, prompt_len)
    return {
        "prompt_ids": prompt_ids[:prompt_len],
        "chosen_ids": chosen_full[prompt_len:],
        "rejected_ids": rejected_full[prompt_len:],
    }


def _add_eos_pair(example, eos_token):
    if not example["chosen"].endswith(eos_token):
        example["chosen"] = example["chosen"] + eos_token
    if not example["rejected"].endswith(eos_token):
        example["rejected"] = example["rejected"] + eos_token
    return example


def prepare_preference_dataset(dataset, tokenizer, args, *, dataset_name: str = "train"):
    """Prepare a DPO dataset as `trl.DPOTrainer._prepare_dataset`.

    Implicit prompts are extracted (`extract_prompt`), EOS is appended to standard chosen/rejected, rows are
    tokenized (`tokenize_preference_example`), and with `truncation_mode="keep_start"` rows whose prompt alone
    fills `max_length` are dropped. Truncation of prompt+completion to `max_length` happens in the collator.
    Already tokenized datasets (`prompt_ids`, `chosen_ids`, `rejected_ids`) are returned as is.
    """
    columns = get_column_names(dataset)
    if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(columns):
        return dataset
    validate_dataset_format(dataset, "dpo")
    num_proc = getattr(args, "dataset_num_proc", None)
    if "prompt" not in next(iter(dataset)):
        dataset = dataset.map(extract_prompt, **_map_kwargs(dataset, num_proc, f"Extracting prompt from {dataset_name}"))
    if not is_conversational(next(iter(dataset))):
        dataset = dataset.map(_add_eos_pair, fn_kwargs={"eos_token": tokenizer.eos_token},
                              **_map_kwargs(dataset, num_proc, f"Adding EOS to {dataset_name}"))
    dataset = dataset.map(tokenize_preference_example, fn_kwargs={"tokenizer": tokenizer},
                          **_map_kwargs(dataset, num_proc, f"Tokenizing {dataset_name}"))
    max_length = args.max_length
    if max_length is not None and getattr(args, "truncation_mode", "keep_start") == "keep_start":
        dataset = dataset.filter(lambda ex: len(ex["prompt_ids"]) < max_length,
                                 **_map_kwargs(dataset, num_proc, f"Dropping fully truncated rows of {dataset_name}"))
    return dataset


# ------------------------------------------------------------------------------------------------------------- KTO


def tokenize_unpaired_example(example: dict[str, Any], tokenizer) -> dict[str, list]:
    """Tokenize one unpaired row (after EOS handling) into `prompt_ids`, `completion_ids`."""
    kwargs = {"tools": row_tools(example), **example.get("chat_template_kwargs", {})}
    if is_conversational(example):
        prompt_ids = tokenize_input(tokenizer, example["prompt"], add_generation_prompt=True, **kwargs)["input_ids"]
        full_ids = tokenize_input(tokenizer, example["prompt"] + example["completion"], **kwargs)["input_ids"]
    else:
        prompt_ids = tokenize_input(tokenizer, example["prompt"])["input_ids"]
        full_ids = tokenize_input(tokenizer, example["prompt"] + example["completion"])["input_ids"]
    prompt_len = common_prefix_length(prompt_ids, full_ids)
    _warn_prefix(tokenizer, prompt_ids, prompt_len)
    return {"prompt_ids": prompt_ids[:prompt_len], "completion_ids": full_ids[prompt_len:]}


def _rotate_completions(batch):
    batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
    return batch


def add_kl_completion_ids(dataset, batch_size: int, num_proc: int | None = None):
    """Add `KL_completion_ids`: completions rotated by +1 within consecutive blocks of `batch_size` rows.

    `(x_1, y_1), ..., (x_n, y_n) -> (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})` per block, as TRL's KTO trainer
    builds its mismatched pairs for the KL reference point (`batch_size = per_device_train_batch_size`).
    """
    return dataset.map(_rotate_completions, batched=True, batch_size=batch_size,
                       **_map_kwargs(dataset, num_proc, "Extracting KL completions"))


def _add_eos_completion(example, eos_token):
    if not example["completion"].endswith(eos_token):
        example["completion"] = example["completion"] + eos_token
    return example


def prepare_unpaired_preference_dataset(dataset, tokenizer, args, *, dataset_name: str = "train"):
    """Prepare a KTO dataset as `trl.KTOTrainer._prepare_dataset`.

    Implicit prompts are extracted, paired preference data is unpaired (`unpair_preference_dataset`), EOS is
    appended to standard completions, rows are tokenized, rows whose prompt fills `max_length` are dropped and,
    unless `args.loss_type == "apo_zero_unpaired"`, `KL_completion_ids` is added in blocks of
    `args.per_device_train_batch_size` rows.
    """
    columns = get_column_names(dataset)
    num_proc = getattr(args, "dataset_num_proc", None)
    if not {"prompt_ids", "completion_ids", "label"} <= set(columns):
        validate_dataset_format(dataset, "kto")
        if "prompt" not in next(iter(dataset)):
            dataset = dataset.map(extract_prompt,
                                  **_map_kwargs(dataset, num_proc, f"Extracting prompt from {dataset_name}"))
        first = next(iter(dataset))
        if "chosen" in first and "rejected" in first:
            dataset = unpair_preference_dataset(dataset, **_map_kwargs(dataset, num_proc, f"Unpairing {dataset_name}"))
        if not is_conversational(next(iter(dataset))):
            dataset = dataset.map(_add_eos_completion, fn_kwargs={"eos_token": tokenizer.eos_token},
                                  **_map_kwargs(dataset, num_proc, f"Adding EOS to {dataset_name}"))
        dataset = dataset.map(tokenize_unpaired_example, fn_kwargs={"tokenizer": tokenizer},
                              **_map_kwargs(dataset, num_proc, f"Tokenizing {dataset_name}"))
        max_length = args.max_length
        if max_length is not None:
            dataset = dataset.filter(lambda ex: len(ex["prompt_ids"]) < max_length,
                                     **_map_kwargs(dataset, num_proc, f"Dropping fully truncated rows of {dataset_name}"))
    if getattr(args, "loss_type", "kto") != "apo_zero_unpaired" and "KL_completion_ids" not in get_column_names(dataset):
        dataset = add_kl_completion_ids(dataset, args.per_device_train_batch_size, num_proc)
    return dataset


# ---------------------------------------------------------------------------------------------------------- Reward


def tokenize_reward_example(example: dict[str, Any], tokenizer) -> dict[str, list]:
    """Tokenize one preference row (after EOS handling) into whole `chosen_ids` / `rejected_ids` sequences.

    As TRL's reward trainer: an explicit `prompt` is prepended to each answer (strings concatenated, message lists
    joined) and the whole sequence is tokenized at once (`tokenizer(text=...)`, or `apply_chat_template` with the
    row's `tools` and `chat_template_kwargs` and no generation prompt). With a prompt, the joined `chosen` /
    `rejected` are returned too (the columns TRL's preparation leaves)."""
    chosen, rejected = example["chosen"], example["rejected"]
    if "prompt" in example:
        chosen, rejected = example["prompt"] + chosen, example["prompt"] + rejected
    kwargs = {}
    if is_conversational(example):
        kwargs = {"tools": row_tools(example), **example.get("chat_template_kwargs", {})}
    out = {"chosen_ids": tokenize_input(tokenizer, chosen, **kwargs)["input_ids"],
           "rejected_ids": tokenize_input(tokenizer, rejected, **kwargs)["input_ids"]}
    if "prompt" in example:  # TRL's map leaves the joined texts in the `chosen` / `rejected` columns
        out.update(chosen=chosen, rejected=rejected)
    return out


def prepare_reward_dataset(dataset, tokenizer, args, *, dataset_name: str = "train"):
    """Prepare a reward-model dataset as `trl.RewardTrainer._prepare_dataset`.

    Legacy `chosen_input_ids`/`rejected_input_ids` columns are renamed (with TRL's FutureWarning). Untokenized
    rows (explicit or implicit prompt, standard or conversational) get EOS appended to standard `chosen` and
    `rejected`, then are tokenized by `tokenize_reward_example`. Finally, with `args.max_length` set, pairs whose
    chosen or rejected sequence is longer than `max_length` are dropped (TRL filters; it never truncates).
    """
    import warnings

    columns = get_column_names(dataset)
    is_processed = "chosen_ids" in columns and "rejected_ids" in columns
    if not is_processed and "chosen_input_ids" in columns and "rejected_input_ids" in columns:
        warnings.warn("Detected legacy dataset columns `chosen_input_ids`/`rejected_input_ids`; they are deprecated "
                      "and will not be supported in v1. Please migrate to `chosen_ids`/`rejected_ids`.",
                      FutureWarning, stacklevel=3)
        dataset = dataset.rename_column("chosen_input_ids", "chosen_ids")
        dataset = dataset.rename_column("rejected_input_ids", "rejected_ids")
        is_processed = True
    validate_dataset_format(dataset, "reward")
    num_proc = getattr(args, "dataset_num_proc", None)
    if not is_processed:
        if not is_conversational(next(iter(dataset))):
            dataset = dataset.map(_add_eos_pair, fn_kwargs={"eos_token": tokenizer.eos_token},
                                  **_map_kwargs(dataset, num_proc, f"Adding EOS to {dataset_name} dataset"))
        dataset = dataset.map(tokenize_reward_example, fn_kwargs={"tokenizer": tokenizer},
                              **_map_kwargs(dataset, num_proc, f"Tokenizing {dataset_name} dataset"))
    max_length = args.max_length
    if max_length is not None:
        dataset = dataset.filter(
            lambda ex: len(ex["chosen_ids"]) <= max_length and len(ex["rejected_ids"]) <= max_length,
            **_map_kwargs(dataset, num_proc, f"Filtering {dataset_name} >{max_length} tokens"))
    return dataset
