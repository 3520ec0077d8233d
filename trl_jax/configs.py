"""Trainer configs with TRL 1.16's field names and defaults, plus JAX-only knobs.

Every config is a plain dataclass. Field names and defaults are those of the installed TRL
(`trl.SFTConfig`, `trl.DPOConfig`, `trl.KTOConfig`, `trl.RewardConfig`, `trl.GRPOConfig`,
`trl.experimental.online_dpo.OnlineDPOConfig`) and of `transformers.TrainingArguments` for the common ones, written out
here (this module never imports torch, transformers' Trainer or trl). On top of them every config has the JAX fields
listed in `JAX_FIELDS`.

* PyTorch-only fields (`TORCH_ONLY_FIELDS`: `deepspeed`, `fsdp`, `ddp_*`, `dataloader_*`, `torch_compile*`,
  `gradient_checkpointing_kwargs`, `use_liger_kernel`, `tf32`, ...) are accepted so that a TRL config or YAML file
  runs unchanged; when any of them is set to a non-default value, ONE `TorchOnlyFieldWarning` line lists them, and
  they have no effect.
* A misspelled field raises `TypeError` naming the closest valid field (`difflib`).
* `from_dict` / `from_yaml` honor TRL's YAML conventions (`trl.scripts.utils.TrlParser`): a top-level `env:` mapping
  is exported to `os.environ`; model keys (`ModelConfig`: `model_name_or_path`, `dtype`, `lora_*`, ...) and script
  keys (`ScriptArguments`: `dataset_name`, `dataset_train_split`, ...; `DatasetMixtureConfig`: `datasets`, ...) are
  collected separately by `load_config`. String values (from a CLI or YAML `1e-5`) are converted to the field type.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import warnings
from dataclasses import MISSING, dataclass, field
from typing import Any, NamedTuple

__all__ = [
    "TorchOnlyFieldWarning",
    "UsageError",
    "DPO_LOSS_TYPES",
    "KTO_LOSS_TYPES",
    "GRPO_LOSS_TYPES",
    "ONLINE_DPO_LOSS_TYPES",
    "TORCH_ONLY_FIELDS",
    "NOT_SUPPORTED_FIELDS",
    "JAX_FIELDS",
    "GENERATION_JAX_FIELDS",
    "TrainingArgumentsJax",
    "BaseConfig",
    "SFTConfig",
    "DPOConfig",
    "KTOConfig",
    "RewardConfig",
    "GRPOConfig",
    "RLOOConfig",
    "OnlineDPOConfig",
    "DistillationConfig",
    "ModelConfig",
    "ScriptArguments",
    "DatasetConfig",
    "DatasetMixtureConfig",
    "RunConfig",
    "load_config",
    "coerce_value",
]


class TorchOnlyFieldWarning(UserWarning):
    """Emitted once per config when PyTorch-only fields are set; they are ignored by trl_jax."""


# Fields of TrainingArguments / TRL configs that configure PyTorch, accelerate, DeepSpeed, FSDP, vLLM or torch data
# loading. They are accepted (so TRL configs load unchanged) and ignored. Sharding is configured with `mesh_shape`
# and `mesh_axis_names` instead of fsdp/ddp/deepspeed; rematerialization with `gradient_checkpointing` /
# `remat_policy` instead of `gradient_checkpointing_kwargs`.
TORCH_ONLY_FIELDS: frozenset[str] = frozenset(
    {
        # transformers.TrainingArguments
        "optim_target_modules", "tf32", "activation_checkpointing_kwargs", "gradient_checkpointing_kwargs",
        "torch_compile", "torch_compile_backend", "torch_compile_mode", "use_liger_kernel", "liger_kernel_config",
        "use_cache", "neftune_noise_alpha", "torch_empty_cache_steps", "auto_find_batch_size",
        "eval_use_gather_object", "enable_jit_checkpoint", "use_cpu", "accelerator_config", "parallelism_config",
        "dataloader_drop_last", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
        "dataloader_prefetch_factor", "dataloader_multiprocessing_context", "dataloader_in_order",
        "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph",
        "ddp_backend", "ddp_timeout", "fsdp", "fsdp_config", "deepspeed", "debug", "skip_memory_metrics",
        "local_rank", "save_on_each_node", "log_level_replica", "log_on_each_node",
        # TRL
        "activation_offloading", "ds3_gather_for_generation", "use_vllm", "vllm_mode", "vllm_model_impl",
        "vllm_enable_sleep_mode", "vllm_structured_outputs_regex", "vllm_server_base_url", "vllm_server_host",
        "vllm_server_port", "vllm_server_timeout", "vllm_group_port", "vllm_gpu_memory_utilization",
        "vllm_max_model_length", "vllm_tensor_parallel_size", "use_transformers_continuous_batching",
        "transformers_continuous_batching_config", "use_transformers_paged", "cache_implementation",
        "vllm_importance_sampling_correction", "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_min",
        "vllm_importance_sampling_clip_max", "vllm_importance_sampling_cap",
        # transformers Trainer / modelling internals with no counterpart here (trl_jax's models have no dropout,
        # always reduce log-probs in fp32, never drop dataset columns by signature, and are deterministic)
        "trust_remote_code", "disable_dropout", "cast_lm_head_to_fp32", "full_determinism",
        "remove_unused_columns", "label_names", "length_column_name", "log_level", "logging_nan_inf_filter",
        "eval_accumulation_steps", "eval_do_concat_batches", "prediction_loss_only", "do_train", "do_predict",
        "log_multimodal", "ignore_bias_buffers",
    }
)

_NESTED = ("nested (double) quantization of the 4-bit scales is not implemented: leave it off (the scales stay "
           "fp32, 0.5 bit per weight)")
_STORAGE = "the 4-bit codes are stored as uint8 (two per byte); leave bnb_4bit_quant_storage unset"
_HUB = ("pushing to the Hub is not implemented: `save_model()` writes a Hugging Face directory, upload it with "
        "`hf upload`")
_BEST = ("keeping the best checkpoint is not implemented: pick the step from log_history.jsonl and load "
         "`<output_dir>/checkpoints/<step>` with resume_from_checkpoint")
_METRICS = "compute_metrics is not supported: evaluation reports the loss and the trainer's metrics"
# Fields that would change the experiment but are not implemented yet: an error at construction when set to a
# non-default value (so that a user who asked for LoRA does not silently get a full fine-tune), with what to do.
NOT_SUPPORTED_FIELDS: dict[str, str] = {
    "use_bnb_nested_quant": _NESTED,
    "bnb_4bit_quant_storage": _STORAGE,
    **{name: _HUB for name in ("push_to_hub", "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy",
                               "hub_always_push", "hub_revision", "log_completions_hub_repo")},
    **{name: _BEST for name in ("load_best_model_at_end", "metric_for_best_model", "greater_is_better")},
    "batch_eval_metrics": _METRICS,
    "include_for_metrics": _METRICS,
    "model_revision": ("download that revision (`hf download ID --revision REV --local-dir DIR`) and pass DIR as "
                       "model_name_or_path"),
    "average_tokens_across_devices": "trl_jax always normalizes the loss by the token count of the global batch",
    "bf16_full_eval": "evaluation runs in `compute_dtype`; set that instead",
    "fp16_full_eval": "evaluation runs in `compute_dtype`; set that instead",
    "dataset_kwargs": "prepare the dataset yourself (e.g. with `datasets.map`) before passing it",
    "eval_delay": "not implemented; use eval_strategy / eval_steps",
    "ignore_data_skip": "resume is exact by construction (the data order is a function of seed and epoch)",
    "include_num_input_tokens_seen": "`num_tokens` (cumulative) is logged with every record",
    "label_smoothing_factor": "label smoothing is not implemented",
    "restore_callback_states_from_checkpoint": "callback states are not saved in checkpoints",
    "save_only_model": "checkpoints always hold the whole train state; save_model() writes the model alone",
    "trackio_space_id": "trackio logging is not implemented; use report_to tensorboard or wandb",
    "trackio_bucket_id": "trackio logging is not implemented; use report_to tensorboard or wandb",
    "trackio_static_space_id": "trackio logging is not implemented; use report_to tensorboard or wandb",
    "log_unique_prompts": "not implemented; completions.jsonl has every prompt",
    "teacher_model_revision": ("download that revision (`hf download ID --revision REV --local-dir DIR`) and pass DIR "
                               "as teacher_model_name_or_path"),
    **{name: "adaptive entropy is not implemented; use a fixed entropy_coef"
       for name in ("use_adaptive_entropy", "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta",
                    "entropy_target")},
}

# Fields that trl_jax adds to every config (absent from TRL's configs). `pad_to_multiple_of` exists in TRL's SFT/DPO/
# KTO/GRPO configs with the same default and is added to the others.
JAX_FIELDS: tuple[str, ...] = (
    "mesh_shape",
    "mesh_axis_names",
    "param_dtype",
    "compute_dtype",
    "ref_param_dtype",
    "remat_policy",
    "scan_layers",
    "logprob_chunk_size",
    "pad_to_multiple_of",
    "overwrite_output_dir",
    "max_consecutive_nonfinite_updates",
    "attn_implementation",
    "moe_implementation",
    "save_merged_model",
)

# Fields that trl_jax adds to the configs of the trainers that generate (GRPOConfig, OnlineDPOConfig) only.
GENERATION_JAX_FIELDS: tuple[str, ...] = ("decode_layout", "decode_block_size")
# `decode_layout` values: the policy cast to the compute dtype and resharded for decoding (see
# trl_jax.generation.prepare_decode_params), or None to sample with the training params as they are.
DECODE_LAYOUT_CHOICES: tuple = ("auto", "replicated", "tensor", None)


def _resolve_attn_implementation(value, model_init_kwargs=None) -> str | None:
    """`attn_implementation` (or TRL's `model_init_kwargs["attn_implementation"]`) -> auto / xla / cudnn / splash
    (`trl_jax.models.config.resolve_attn_implementation`: transformers' names map with one warning line, unknown
    names are an error naming the choices); None when neither is set."""
    from trl_jax.models.config import resolve_attn_implementation

    from_kwargs = model_init_kwargs.get("attn_implementation") if isinstance(model_init_kwargs, dict) else None
    if value is None and from_kwargs is None:
        return None
    resolved = resolve_attn_implementation(value if value is not None else from_kwargs)
    if value is not None and from_kwargs is not None and from_kwargs != value \
            and resolve_attn_implementation(from_kwargs) != resolved:
        raise ValueError(f"`attn_implementation`={value!r} and `model_init_kwargs['attn_implementation']`="
                         f"{from_kwargs!r} disagree; set one of them.")
    return resolved


def _check_generation_fields(cfg) -> None:
    _check_choice("decode_layout", cfg.decode_layout, DECODE_LAYOUT_CHOICES)
    if isinstance(cfg.decode_block_size, bool) or not isinstance(cfg.decode_block_size, int) \
            or cfg.decode_block_size < 1:
        raise ValueError(f"`decode_block_size` must be a positive int, got {cfg.decode_block_size!r}.")

# `loss_type` values each trainer accepts (TRL 1.16's lists; trl_jax.losses implements each of them).
DPO_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
KTO_LOSS_TYPES: tuple[str, ...] = ("kto", "apo_zero_unpaired")
GRPO_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
ONLINE_DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo")


class UsageError(ValueError):
    """A problem with how a run was asked for (a config value, an argument, an existing output_dir): the CLI
    reports it as a usage error (exit status 2)."""

_DTYPES = ("float32", "bfloat16", "float16")
_REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable", "everything_saveable")
_INTERVALS = ("no", "steps", "epoch")
_SAVE_STRATEGIES = ("no", "steps", "epoch", "best")
_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown_field_error(cls, name: str) -> TypeError:
    names = _field_names(cls)
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    return TypeError(
        f"{cls.__name__} got an unknown field `{name}`.{hint} See `dataclasses.fields({cls.__name__})` for the "
        "accepted names (TRL's field names plus trl_jax.configs.JAX_FIELDS)."
    )


def _split_top_level(text: str) -> list[str]:
    return [part.strip() for part in text.replace(",", " ").split() if part.strip()]


def coerce_value(value: Any, annotation: str) -> Any:
    """Convert a string (from a CLI flag or a YAML scalar such as `1e-5`) to the type named by `annotation`.

    Non-string values are returned unchanged except lists for tuple-typed fields. `annotation` is the dataclass
    field's annotation string, e.g. `"int | None"`, `"list[float]"`.
    """
    ann = annotation.replace(" ", "")
    if not isinstance(value, str):
        if isinstance(value, list) and ann.startswith("tuple"):
            return tuple(value)
        return value
    text = value.strip()
    if text.lower() in ("none", "null") and "None" in ann:
        return None
    if ann.startswith(("list", "tuple")) or "|list" in ann:
        if text.startswith("["):
            items = json.loads(text)
        else:
            items = _split_top_level(text)
        inner = ann[ann.index("[") + 1 : ann.index("]")] if "[" in ann else "str"
        items = [coerce_value(item, inner) for item in items]
        if ann.startswith("str|") and len(items) == 1:
            return items[0]
        return tuple(items) if ann.startswith("tuple") else items
    if "bool" in ann and text.lower() in _TRUE + _FALSE:
        return text.lower() in _TRUE
    if "int" in ann:
        try:
            return int(text)
        except ValueError:
            pass
    if "float" in ann:
        try:
            return float(text)
        except ValueError:
            pass
    if "dict" in ann and text.startswith("{"):
        return json.loads(text)
    return value


class _ConfigMixin:
    """Unknown-field checks, dict/YAML construction and the torch-only warning, shared by all configs."""

    def __new__(cls, *args, **kwargs):
        known = set(_field_names(cls))
        for name in kwargs:
            if name not in known:
                raise _unknown_field_error(cls, name)
        return super().__new__(cls)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """Build the config from a mapping, converting string values to the field types (TRL's parser does)."""
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in values.items():
            if name not in types:
                raise _unknown_field_error(cls, name)
            kwargs[name] = coerce_value(value, str(types[name]))
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None):
        """Read a TRL-style YAML run config; model/script keys are validated and dropped (see `load_config`)."""
        return load_config(path, cls, overrides=overrides).args

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _field_defaults(self):
        for f in dataclasses.fields(self):
            default = f.default if f.default is not MISSING else (
                f.default_factory() if f.default_factory is not MISSING else None
            )
            yield f.name, default

    def _refuse_not_supported(self) -> None:
        """`NOT_SUPPORTED_FIELDS` set to a non-default value: one error naming each field and what to do instead."""
        problems = []
        for name, default in self._field_defaults():
            if name in NOT_SUPPORTED_FIELDS and getattr(self, name) != default:
                problems.append(f"`{name}`={getattr(self, name)!r} ({NOT_SUPPORTED_FIELDS[name]})")
        if problems:
            raise ValueError(f"{type(self).__name__}: not supported by trl_jax yet: {'; '.join(problems)}. Leave "
                             "these fields at their defaults.")

    def _warn_torch_only(self) -> None:
        set_fields = []
        for f in dataclasses.fields(self):
            if f.name not in TORCH_ONLY_FIELDS:
                continue
            default = f.default if f.default is not MISSING else (
                f.default_factory() if f.default_factory is not MISSING else None
            )
            if getattr(self, f.name) != default:
                set_fields.append(f.name)
        if set_fields:
            warnings.warn(
                f"trl_jax ignores these PyTorch-only fields of {type(self).__name__}: {', '.join(sorted(set_fields))}",
                TorchOnlyFieldWarning,
                stacklevel=4,
            )


@dataclass
class TrainingArgumentsJax(_ConfigMixin):
    """`transformers.TrainingArguments` fields (names and defaults of transformers 5.24) + trl_jax's JAX fields.

    JAX fields:
        mesh_shape (`tuple[int, ...]`, *optional*): device mesh shape over `mesh_axis_names`; `None` = all devices
            on the first (data) axis. One entry may be `-1` (filled with the remaining devices).
        mesh_axis_names (`tuple[str, ...]`, defaults to `("data", "fsdp", "tensor")`).
        param_dtype (`str`, defaults to `"float32"`): dtype the parameters (and optimizer moments) are stored in.
        compute_dtype (`str`, *optional*): activation dtype; `None` = `bfloat16` if `bf16`, `float16` if `fp16`,
            else `float32` (resolved in `__post_init__`). With a `compute_dtype` narrower than `param_dtype` every
            matmul of the forward and backward pass (LM head included) runs in it with fp32 accumulation, on a cast
            copy of the fp32 master weights.
        ref_param_dtype (`str`, *optional*): dtype the frozen reference model (DPO, KTO, GRPO with `beta > 0`,
            online DPO) is stored in; `None` = `compute_dtype` (TRL holds the reference in the model's dtype).
            Set `"float32"` to keep an fp32 reference under `bf16`.
        remat_policy (`str`, *optional*): `jax.checkpoint` policy per decoder layer; `None` = `"nothing_saveable"`
            when `gradient_checkpointing` else `"none"`. One of `_REMAT_POLICIES`.
        scan_layers (`bool`, defaults to `False`): run the decoder layers with `jax.lax.scan` (faster compile).
        logprob_chunk_size (`int`, defaults to `256`): tokens per chunk of the fused LM-head log-prob computation.
        pad_to_multiple_of (`int`, *optional*, defaults to `"auto"`): collators pad the sequence axis to a multiple
            of it (bounded by `max_length`) so that jit compiles a handful of shapes. `"auto"` resolves to `None`
            as in TRL off Neuron; with `None` collators pad to `max_length` (one shape) when it is set.
        overwrite_output_dir (`bool`, defaults to `False`): transformers' former flag. A run into an `output_dir`
            that already holds checkpoints must either resume (`resume_from_checkpoint`) or set this, which deletes
            the old `checkpoints/`, `log_history.jsonl` and TensorBoard `runs/` before training.
        max_consecutive_nonfinite_updates (`int`, defaults to `3`): a step whose loss or gradient is NaN/Inf is
            skipped (counted in the logged `skipped_updates`); after this many in a row the run stops with the
            last good state checkpointed. `0` never stops.
        save_merged_model (`bool`, defaults to `False`): with LoRA, `save_model()` writes the full model with the
            adapters merged into the weights (an HF checkpoint) instead of PEFT's adapter directory.
        moe_implementation (`str`, defaults to `"auto"`): mixture-of-experts dispatch of Qwen3-MoE / Mixtral models
            (`trl_jax.models.moe`): `"dense"` (every expert on every token), `"ragged"` (grouped matmuls over the
            routed tokens), `"auto"` (ragged on GPU/TPU, dense on CPU). Same numbers either way.
    """

    output_dir: str | None = None
    per_device_train_batch_size: int = 8
    num_train_epochs: float = 3.0
    max_steps: int = -1
    learning_rate: float = 5e-05
    lr_scheduler_type: str = 'linear'
    lr_scheduler_kwargs: dict | str | None = None
    warmup_steps: float = 0
    optim: str = 'adamw_torch_fused'
    optim_args: str | None = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-08
    optim_target_modules: str | list[str] | None = None
    gradient_accumulation_steps: int = 1
    average_tokens_across_devices: bool = True
    max_grad_norm: float = 1.0
    label_smoothing_factor: float = 0.0
    bf16: bool = False
    fp16: bool = False
    bf16_full_eval: bool = False
    fp16_full_eval: bool = False
    tf32: bool | None = None
    activation_checkpointing: bool | None = None
    activation_checkpointing_kwargs: dict[str, Any] | str | None = None
    gradient_checkpointing: bool | None = None
    gradient_checkpointing_kwargs: dict[str, Any] | str | None = None
    torch_compile: bool = False
    torch_compile_backend: str | None = None
    torch_compile_mode: str | None = None
    use_liger_kernel: bool = False
    liger_kernel_config: dict[str, bool] | None = None
    use_cache: bool = False
    neftune_noise_alpha: float | None = None
    torch_empty_cache_steps: int | None = None
    auto_find_batch_size: bool = False
    logging_strategy: str = 'steps'
    logging_steps: float = 500
    logging_first_step: bool = False
    log_on_each_node: bool = True
    logging_nan_inf_filter: bool = True
    include_num_input_tokens_seen: str | bool = 'no'
    log_level: str = 'passive'
    log_level_replica: str = 'warning'
    disable_tqdm: bool | None = None
    report_to: str | list[str] | None = 'none'
    run_name: str | None = None
    project: str = 'huggingface'
    trackio_space_id: str | None = None
    trackio_bucket_id: str | None = None
    trackio_static_space_id: str | bool | None = None
    eval_strategy: str = 'no'
    eval_steps: float | None = None
    eval_delay: float = 0
    per_device_eval_batch_size: int = 8
    prediction_loss_only: bool = False
    eval_on_start: bool = False
    eval_do_concat_batches: bool = True
    eval_use_gather_object: bool = False
    eval_accumulation_steps: int | None = None
    include_for_metrics: list[str] = field(default_factory=lambda: [])
    batch_eval_metrics: bool = False
    save_only_model: bool = False
    save_strategy: str = 'steps'
    save_steps: float = 500
    save_on_each_node: bool = False
    save_total_limit: int | None = None
    enable_jit_checkpoint: bool = False
    push_to_hub: bool = False
    hub_token: str | None = None
    hub_private_repo: bool | None = None
    hub_model_id: str | None = None
    hub_strategy: str = 'every_save'
    hub_always_push: bool = False
    hub_revision: str | None = None
    load_best_model_at_end: bool = False
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None
    ignore_data_skip: bool = False
    restore_callback_states_from_checkpoint: bool = False
    full_determinism: bool = False
    seed: int = 42
    data_seed: int | None = None
    use_cpu: bool = False
    accelerator_config: dict | str | None = None
    parallelism_config: Any | None = None
    dataloader_drop_last: bool = False
    dataloader_num_workers: int = 0
    dataloader_pin_memory: bool = True
    dataloader_persistent_workers: bool = False
    dataloader_prefetch_factor: int | None = None
    dataloader_multiprocessing_context: str | None = None
    dataloader_in_order: bool = True
    remove_unused_columns: bool = True
    label_names: list[str] | None = None
    train_sampling_strategy: str = 'random'
    length_column_name: str = 'length'
    ddp_find_unused_parameters: bool | None = None
    ddp_bucket_cap_mb: int | None = None
    ddp_broadcast_buffers: bool | None = None
    ddp_static_graph: bool | None = None
    ddp_backend: str | None = None
    ddp_timeout: int = 1800
    fsdp: str | None = None
    fsdp_config: dict[str, Any] | str | None = None
    deepspeed: dict | str | None = None
    debug: str | list[str] = ''
    skip_memory_metrics: bool = True
    do_train: bool = False
    do_eval: bool = False
    do_predict: bool = False
    resume_from_checkpoint: str | None = None
    local_rank: int = -1
    # ---- JAX-only fields ----
    mesh_shape: tuple[int, ...] | None = None
    mesh_axis_names: tuple[str, ...] = ("data", "fsdp", "tensor")
    param_dtype: str = "float32"
    compute_dtype: str | None = None
    ref_param_dtype: str | None = None
    remat_policy: str | None = None
    scan_layers: bool = False
    logprob_chunk_size: int = 256
    pad_to_multiple_of: int | str | None = "auto"
    overwrite_output_dir: bool = False
    max_consecutive_nonfinite_updates: int = 3
    # attention kernel: auto (splash on TPU, cuDNN on GPU, XLA on CPU) / xla / cudnn / splash; transformers' names
    # map (eager/sdpa -> xla, flash_attention_2/3 -> auto); `model_init_kwargs["attn_implementation"]` sets it too
    attn_implementation: str | None = None
    moe_implementation: str = "auto"
    save_merged_model: bool = False

    def __post_init__(self):
        self._refuse_not_supported()
        self._warn_torch_only()
        self._check_numbers()
        if self.output_dir is None:
            self.output_dir = "trainer_output"
        if self.output_dir is not None:
            self.output_dir = os.path.expanduser(self.output_dir)
        for name in ("lr_scheduler_kwargs", "model_init_kwargs", "dataset_kwargs", "generation_kwargs",
                     "chat_template_kwargs", "accelerator_config", "fsdp_config", "deepspeed"):
            value = getattr(self, name, None)
            if isinstance(value, str) and value.startswith("{"):
                setattr(self, name, json.loads(value))
        self.attn_implementation = _resolve_attn_implementation(self.attn_implementation,
                                                                getattr(self, "model_init_kwargs", None))
        _check_choice("moe_implementation", self.moe_implementation, ("auto", "dense", "ragged"))
        # transformers 5: `gradient_checkpointing` is an alias of `activation_checkpointing`.
        if self.activation_checkpointing is None and self.gradient_checkpointing is not None:
            self.activation_checkpointing = self.gradient_checkpointing
        if self.activation_checkpointing is None:
            self.activation_checkpointing = False
        self.gradient_checkpointing = self.activation_checkpointing
        if self.activation_checkpointing_kwargs is None and self.gradient_checkpointing_kwargs is not None:
            self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs
        self.gradient_checkpointing_kwargs = self.activation_checkpointing_kwargs
        if self.disable_tqdm is None:
            self.disable_tqdm = logging.getLogger("trl_jax").getEffectiveLevel() > logging.WARN
        if isinstance(self.include_num_input_tokens_seen, bool):
            self.include_num_input_tokens_seen = "all" if self.include_num_input_tokens_seen else "no"
        for name, allowed in (("eval_strategy", _INTERVALS), ("logging_strategy", _INTERVALS),
                              ("save_strategy", _SAVE_STRATEGIES)):
            value = str(getattr(self, name)).lower()
            if value not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}.")
            setattr(self, name, value)
        if self.save_strategy == "best":
            raise ValueError("`save_strategy='best'` is not supported by trl_jax yet (keeping the best checkpoint is "
                             "not implemented); use 'steps' or 'epoch' and pick the step from log_history.jsonl.")
        if self.do_eval is False and self.eval_strategy != "no":
            self.do_eval = True
        if self.eval_strategy == "steps" and not self.eval_steps:
            if self.logging_steps > 0:
                self.eval_steps = self.logging_steps
            else:
                raise ValueError("`eval_strategy='steps'` needs a non-zero `eval_steps` or `logging_steps`.")
        for name in ("logging_steps", "eval_steps", "save_steps"):
            value = getattr(self, name)
            if value is not None and value > 1:
                if value != int(value):
                    raise ValueError(f"`{name}` must be an integer when larger than 1, got {value}.")
                setattr(self, name, int(value))
        if self.load_best_model_at_end and self.metric_for_best_model is None:
            self.metric_for_best_model = "loss"
        if self.greater_is_better is None and self.metric_for_best_model is not None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")
        if self.report_to in ("none", ["none"], None):
            self.report_to = []
        elif self.report_to == "all" or self.report_to == ["all"]:
            self.report_to = ["tensorboard", "wandb"]
        elif not isinstance(self.report_to, list):
            self.report_to = [self.report_to]
        if self.fp16 and self.bf16:
            raise ValueError("At most one of `fp16` and `bf16` can be True.")
        if self.warmup_steps < 0:
            raise ValueError("`warmup_steps` must be >= 0 (a value below 1 is a ratio of the total steps).")
        # pad_to_multiple_of: the CLI passes strings; "auto" resolves to None as TRL does off Neuron.
        if isinstance(self.pad_to_multiple_of, str):
            text = self.pad_to_multiple_of.lower()
            self.pad_to_multiple_of = None if text in ("auto", "none", "null") else int(text)
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of <= 0:
            raise ValueError(f"`pad_to_multiple_of` must be a positive int or None, got {self.pad_to_multiple_of}.")
        # JAX fields
        if self.mesh_shape is not None:
            self.mesh_shape = tuple(int(x) for x in self.mesh_shape)
            if len(self.mesh_shape) != len(self.mesh_axis_names):
                raise ValueError(
                    f"`mesh_shape` {self.mesh_shape} has {len(self.mesh_shape)} axes but `mesh_axis_names` "
                    f"{tuple(self.mesh_axis_names)} has {len(self.mesh_axis_names)}; give one size per axis name."
                )
            if sum(1 for x in self.mesh_shape if x == -1) > 1:
                raise ValueError(f"At most one `mesh_shape` entry may be -1, got {self.mesh_shape}.")
        self.mesh_axis_names = tuple(self.mesh_axis_names)
        if self.param_dtype not in _DTYPES:
            raise ValueError(f"`param_dtype` must be one of {_DTYPES}, got {self.param_dtype!r}.")
        if self.compute_dtype is None:
            self.compute_dtype = "bfloat16" if self.bf16 else "float16" if self.fp16 else "float32"
        if self.compute_dtype not in _DTYPES:
            raise ValueError(f"`compute_dtype` must be one of {_DTYPES}, got {self.compute_dtype!r}.")
        if self.ref_param_dtype is None:
            self.ref_param_dtype = self.compute_dtype
        if self.ref_param_dtype not in _DTYPES:
            raise ValueError(f"`ref_param_dtype` must be one of {_DTYPES}, got {self.ref_param_dtype!r}.")
        if self.remat_policy is None:
            self.remat_policy = "nothing_saveable" if self.gradient_checkpointing else "none"
        if self.remat_policy not in _REMAT_POLICIES:
            raise ValueError(f"`remat_policy` must be one of {_REMAT_POLICIES}, got {self.remat_policy!r}.")
        if self.logprob_chunk_size is not None and self.logprob_chunk_size <= 0:
            raise ValueError(f"`logprob_chunk_size` must be positive, got {self.logprob_chunk_size}.")
        self._check_dtype_backend()

    def _check_numbers(self) -> None:
        """Values no run can use, refused at construction with TRL's field names (before any model is loaded)."""
        def num(name):
            value = getattr(self, name, None)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"`{name}` must be a number, got {value!r} ({type(value).__name__}).")
            return value

        lr = num("learning_rate")
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"`learning_rate` must be a finite number >= 0, got {lr}; typical values are 1e-6 to "
                             "1e-3 (a negative learning rate would climb the loss).")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            value = num(name)
            if value != int(value) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer (>= 1), got {value}.")
        max_steps = num("max_steps")
        if max_steps != int(max_steps) or max_steps < -1:
            raise ValueError(f"`max_steps` must be a positive integer, or -1 to train for `num_train_epochs`; got "
                             f"{max_steps}.")
        epochs = num("num_train_epochs")
        if not math.isfinite(epochs) or epochs < 0 or (max_steps <= 0 and epochs <= 0):
            raise ValueError(f"`num_train_epochs` must be a finite number > 0 when `max_steps` is not set (> 0); got "
                             f"num_train_epochs={epochs}, max_steps={max_steps}.")
        for name in ("max_length", "max_prompt_length", "max_completion_length", "max_new_tokens",
                     "num_generations", "num_generations_eval", "num_iterations", "steps_per_generation",
                     "generation_batch_size", "eval_accumulation_steps"):
            value = num(name)
            if value is not None and (value != int(value) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer (or None where TRL allows it), got {value}.")
        for name in ("logging_steps", "save_steps", "eval_steps", "weight_decay", "adam_epsilon", "warmup_steps"):
            value = num(name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value}.")
        limit = num("save_total_limit")
        if limit is not None and (limit != int(limit) or limit < 1):
            raise ValueError(f"`save_total_limit` must be a positive integer, or None to keep every checkpoint; "
                             f"got {limit}.")
        stop = num("max_consecutive_nonfinite_updates")
        if stop != int(stop) or stop < 0:
            raise ValueError(f"`max_consecutive_nonfinite_updates` must be an integer >= 0 (0 = never stop on "
                             f"non-finite updates), got {stop}.")

    def _check_dtype_backend(self) -> None:
        """float16 matmuls do not compile on XLA's CPU backend ("F16_F16_F32 not supported by dot_general"):
        refuse them here, as transformers refuses `fp16` on a CPU."""
        if self.compute_dtype != "float16":
            return
        import jax

        if jax.default_backend() == "cpu":
            origin = "`fp16=True`" if self.fp16 else "`compute_dtype='float16'`"
            raise ValueError(
                f"{origin} asks for float16 activations, which XLA's CPU backend cannot compile; on CPU use "
                "`compute_dtype='float32'` (or 'bfloat16', i.e. `bf16=True`), or run on a GPU/TPU."
            )

    @property
    def world_size(self) -> int:
        """Data-parallel size: product of the `data` and `fsdp` mesh axes (all devices when `mesh_shape` is None).

        It plays the role of TRL's `world_size` (number of processes, one per GPU): the global batch is
        `per_device_train_batch_size * world_size`.
        """
        import jax

        n = jax.device_count()
        if self.mesh_shape is None:
            return n
        shape = list(self.mesh_shape)
        if -1 in shape:
            known = math.prod(x for x in shape if x != -1)
            shape[shape.index(-1)] = n // known
        size = 1
        for name, dim in zip(self.mesh_axis_names, shape, strict=True):
            if name in ("data", "fsdp"):
                size *= dim
        return size

    @property
    def train_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.world_size


@dataclass
class BaseConfig(TrainingArgumentsJax):
    """TRL's `_BaseConfig` defaults (`logging_steps=10`, `gradient_checkpointing=True`, `bf16=None` -> `not fp16`)."""

    bf16: bool | None = None
    gradient_checkpointing: bool = True
    logging_steps: float = 10
    lr_scheduler_kwargs: dict | str | None = None
    use_liger_kernel: bool = False
    torch_empty_cache_steps: int | None = None

    def __post_init__(self):
        self.bf16 = (not self.fp16) if self.bf16 is None else self.bf16
        super().__post_init__()


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.{hint}")


@dataclass
class SFTConfig(BaseConfig):
    """Fields and defaults of `trl.SFTConfig` (1.16) + `JAX_FIELDS`."""

    learning_rate: float = 2e-05
    model_init_kwargs: dict[str, Any] | str | None = None
    trust_remote_code: bool = False
    router_aux_loss_coef: float | None = None
    chat_template_path: str | None = None
    dataset_text_field: str = 'text'
    dataset_kwargs: dict[str, Any] | str | None = None
    dataset_num_proc: int | None = None
    eos_token: str | None = None
    max_length: int | None = 1024
    truncation_mode: str = 'keep_start'
    shuffle_dataset: bool = False
    packing: bool = False
    packing_strategy: str = 'bfd'
    padding_free: bool = False
    pad_to_multiple_of: int | str | None = 'auto'
    eval_packing: bool | None = None
    completion_only_loss: bool | None = None
    assistant_only_loss: bool = False
    loss_type: str = 'nll'
    activation_offloading: bool = False
    pad_token: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type == "chunked_nll":  # deprecated alias in TRL 1.16
            warnings.warn("`loss_type='chunked_nll'` is deprecated; use 'nll'.", FutureWarning, stacklevel=3)
            self.loss_type = "nll"
        _check_choice("loss_type", self.loss_type, ("nll", "dft"))
        if self.packing_strategy == "bfd-requeue":
            warnings.warn("`bfd-requeue` was renamed `bfd_split`.", FutureWarning, stacklevel=3)
            self.packing_strategy = "bfd_split"
        _check_choice("packing_strategy", self.packing_strategy, ("bfd", "bfd_split", "wrapped"))
        _check_choice("truncation_mode", self.truncation_mode, ("keep_start", "keep_end"))
        if self.packing and self.max_length is None:
            raise ValueError("When packing is enabled, `max_length` can't be `None`.")


@dataclass
class DPOConfig(BaseConfig):
    """Fields and defaults of `trl.DPOConfig` (1.16) + `JAX_FIELDS`.

    TRL 1.16 has no `max_prompt_length` / `max_completion_length`: `max_length` truncates each prompt+completion
    sequence in the collator (`truncation_mode`).
    """

    learning_rate: float = 1e-06
    model_init_kwargs: dict[str, Any] | str | None = None
    trust_remote_code: bool = False
    router_aux_loss_coef: float | None = None
    disable_dropout: bool = True
    dataset_num_proc: int | None = None
    max_length: int | None = 1024
    truncation_mode: str = 'keep_start'
    padding_free: bool = False
    pad_to_multiple_of: int | str | None = 'auto'
    precompute_ref_log_probs: bool = False
    precompute_ref_batch_size: int | None = None
    loss_type: list[str] = field(default_factory=lambda: ['sigmoid'])
    loss_weights: list[float] | None = None
    ld_alpha: float | None = None
    f_divergence_type: str = 'reverse_kl'
    f_alpha_divergence_coef: float = 0.5
    label_smoothing: float = 0.0
    beta: float = 0.1
    use_weighting: bool = False
    discopop_tau: float = 0.05
    activation_offloading: bool = False
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    pad_token: str | None = None

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        self.loss_type = list(self.loss_type)
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(
                "`loss_weights` must have the same length as `loss_type` when combining multiple losses. "
                f"Got {len(self.loss_weights)} weights for {len(self.loss_type)} loss types."
            )
        _check_choice("truncation_mode", self.truncation_mode, ("keep_start", "keep_end"))
        if not self.loss_type:
            raise ValueError(f"`loss_type` is empty; pass one or more of {list(DPO_LOSS_TYPES)}.")
        unknown = [t for t in self.loss_type if t not in DPO_LOSS_TYPES]
        if unknown:
            close = difflib.get_close_matches(unknown[0], DPO_LOSS_TYPES, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"Unknown DPO `loss_type` {unknown}.{hint} Accepted: {list(DPO_LOSS_TYPES)}.")
        _check_choice("f_divergence_type", self.f_divergence_type,
                      ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"))
        super().__post_init__()


@dataclass
class KTOConfig(BaseConfig):
    """Fields and defaults of `trl.KTOConfig` (1.16) + `JAX_FIELDS`."""

    learning_rate: float = 1e-06
    train_sampling_strategy: str = 'sequential'
    model_init_kwargs: dict[str, Any] | str | None = None
    trust_remote_code: bool = False
    router_aux_loss_coef: float | None = None
    disable_dropout: bool = True
    dataset_num_proc: int | None = None
    max_length: int | None = 1024
    pad_to_multiple_of: int | str | None = 'auto'
    precompute_ref_log_probs: bool = False
    precompute_ref_batch_size: int | None = None
    loss_type: str = 'kto'
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    activation_offloading: bool = False
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512

    def __post_init__(self):
        super().__post_init__()
        _check_choice("loss_type", self.loss_type, KTO_LOSS_TYPES)


@dataclass
class RewardConfig(BaseConfig):
    """Fields and defaults of `trl.RewardConfig` (1.16) + `JAX_FIELDS`.

    As in TRL, `max_length` filters: a pair whose chosen or rejected sequence (prompt included) has more than
    `max_length` tokens is dropped from the dataset, nothing is truncated.
    """

    learning_rate: float = 0.0001
    model_init_kwargs: dict[str, Any] | str | None = None
    trust_remote_code: bool = False
    chat_template_path: str | None = None
    disable_dropout: bool = True
    dataset_num_proc: int | None = None
    eos_token: str | None = None
    max_length: int | None = 1024
    pad_to_multiple_of: int | str | None = 'auto'
    center_rewards_coefficient: float | None = None
    activation_offloading: bool = False
    pad_token: str | None = None

    def __post_init__(self):
        super().__post_init__()
        coef = self.center_rewards_coefficient
        if coef is not None and (isinstance(coef, bool) or not isinstance(coef, (int, float))
                                 or not math.isfinite(coef)):
            raise ValueError(f"`center_rewards_coefficient` must be a finite number or None, got {coef!r} (TRL "
                             "recommends 0.01).")
        if self.pad_token is not None:
            warnings.warn("`pad_token` is deprecated in TRL and will be removed in v2.0.0; set `tokenizer.pad_token` "
                          "and pass the tokenizer as `processing_class` instead.", FutureWarning, stacklevel=3)


def _resolve_generation_batch(cfg, trainer: str) -> None:
    """`generation_batch_size` / `steps_per_generation` resolved as TRL's GRPO and RLOO configs do (`world_size` =
    data-parallel devices), and their checks: full prompt groups, at least 2 generations per prompt."""
    num_processes = cfg.world_size
    global_batch = cfg.per_device_train_batch_size * num_processes
    if cfg.generation_batch_size is None and cfg.steps_per_generation is None:
        cfg.steps_per_generation = cfg.gradient_accumulation_steps
        cfg.generation_batch_size = global_batch * cfg.steps_per_generation
    elif cfg.generation_batch_size is not None and cfg.steps_per_generation is None:
        if cfg.generation_batch_size % global_batch != 0:
            raise ValueError(
                f"generation_batch_size ({cfg.generation_batch_size}) must be divisible by the global batch "
                f"size ({global_batch})."
            )
        cfg.steps_per_generation = cfg.generation_batch_size // global_batch
    elif cfg.generation_batch_size is None and cfg.steps_per_generation is not None:
        cfg.generation_batch_size = global_batch * cfg.steps_per_generation
    else:
        raise ValueError("'generation_batch_size' and 'steps_per_generation' can not be both configured.")
    if cfg.do_eval and cfg.eval_strategy != "no":
        num_generations = cfg.num_generations_eval or cfg.num_generations
        if (cfg.per_device_eval_batch_size * num_processes) % num_generations != 0:
            raise ValueError(
                f"The global eval batch size ({cfg.per_device_eval_batch_size} * {num_processes}) must be "
                f"divisible by the number of generations used for evaluation ({num_generations})."
            )
    if cfg.generation_batch_size % cfg.num_generations != 0:
        raise ValueError(
            f"generation_batch_size ({cfg.generation_batch_size}) must be divisible by num_generations "
            f"({cfg.num_generations})."
        )
    if cfg.num_generations < 2:
        raise ValueError(
            f"{trainer} needs at least 2 generations per prompt for the advantages; got {cfg.num_generations}."
        )


@dataclass
class GRPOConfig(BaseConfig):
    """Fields and defaults of `trl.GRPOConfig` (1.16) + `JAX_FIELDS` + `GENERATION_JAX_FIELDS`.

    `generation_batch_size` / `steps_per_generation` are resolved as TRL does, with `world_size` = data-parallel
    devices (see `TrainingArgumentsJax.world_size`).

    Parameters added by trl_jax (sampling):
        decode_layout (`str` or `None`, defaults to `"auto"`): how the policy is laid out while sampling. Once per
            generation batch the params are cast to the compute dtype and resharded: `"replicated"` (every device
            holds the whole model; the decode batch is split over every mesh axis), `"tensor"` (tensor-parallel over
            every mesh axis but `data`), `"auto"` (replicated when it takes at most 30% of a device's memory, else
            tensor); `None` samples with the training params as they are (fp32 master weights, training sharding).
        decode_block_size (`int`, defaults to `128`): the first decode segment's length; the KV cache grows by
            doubling segments so decode attention costs follow the tokens generated so far.
    """

    learning_rate: float = 1e-06
    remove_unused_columns: bool | None = False
    model_init_kwargs: dict[str, Any] | str | None = None
    trust_remote_code: bool = False
    router_aux_loss_coef: float | None = None
    disable_dropout: bool = False
    cast_lm_head_to_fp32: bool = False
    num_generations: int | None = 8
    num_generations_eval: int | None = None
    max_completion_length: int | None = 512
    ds3_gather_for_generation: bool = True
    shuffle_dataset: bool | None = True
    pad_to_multiple_of: int | str | None = 'auto'
    generation_batch_size: int | None = None
    steps_per_generation: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    generation_kwargs: dict | str | None = None
    chat_template_kwargs: dict | str | None = None
    repetition_penalty: float = 1.0
    cache_implementation: str | None = None
    use_vllm: bool = False
    vllm_mode: str = 'colocate'
    vllm_model_impl: str = 'vllm'
    vllm_enable_sleep_mode: bool = False
    vllm_structured_outputs_regex: str | None = None
    vllm_server_base_url: str | None = None
    vllm_server_host: str = '0.0.0.0'
    vllm_server_port: int = 8000
    vllm_server_timeout: float = 240.0
    vllm_group_port: int = 51216
    vllm_gpu_memory_utilization: float = 0.3
    vllm_max_model_length: int | None = None
    vllm_tensor_parallel_size: int = 1
    beta: float = 0.0
    num_iterations: int = 1
    epsilon: float = 0.2
    delta: float | None = None
    epsilon_high: float | None = None
    sapo_temperature_neg: float = 1.05
    sapo_temperature_pos: float = 1.0
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    importance_sampling_level: str = 'token'
    reward_weights: list[float] | None = None
    multi_objective_aggregation: str = 'sum_then_normalize'
    scale_rewards: str = 'group'
    loss_type: str = 'dapo'
    mask_truncated_completions: bool = False
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    top_entropy_quantile: float = 1.0
    entropy_coef: float = 0.0
    use_adaptive_entropy: bool = False
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0
    entropy_coef_delta: float = 0.005
    entropy_target: float = 0.2
    max_tool_calling_iterations: int | None = None
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_mode: str = 'sequence_mask'
    vllm_importance_sampling_clip_max: float | None = 3.0
    vllm_importance_sampling_clip_min: float | None = None
    off_policy_mask_threshold: float | None = None
    use_bias_correction_kl: bool = True
    log_completions: bool = False
    log_multimodal: bool = True
    num_completions_to_print: int | None = None
    log_unique_prompts: bool = False
    log_completions_hub_repo: str | None = None
    use_transformers_continuous_batching: bool = False
    transformers_continuous_batching_config: dict | str | None = None
    use_transformers_paged: bool = False
    vllm_importance_sampling_cap: float | None = None
    decode_layout: str | None = "auto"
    decode_block_size: int = 128

    def __post_init__(self):
        super().__post_init__()
        _check_generation_fields(self)
        if self.use_transformers_paged:
            self.use_transformers_continuous_batching = True
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        _check_choice("loss_type", self.loss_type, GRPO_LOSS_TYPES)
        _check_choice("scale_rewards", self.scale_rewards, ("group", "batch", "none"))
        _check_choice("importance_sampling_level", self.importance_sampling_level, ("token", "sequence"))
        if self.log_completions_hub_repo is not None and not self.log_completions:
            raise ValueError("`log_completions_hub_repo` is set but `log_completions` is False; enable it or unset.")
        _resolve_generation_batch(self, "GRPO")
        if self.vllm_importance_sampling_cap is not None:
            self.vllm_importance_sampling_clip_max = self.vllm_importance_sampling_cap


@dataclass
class RLOOConfig(BaseConfig):
    """Fields and defaults of `trl.RLOOConfig` (1.16) + `JAX_FIELDS` + `GENERATION_JAX_FIELDS`.

    The generation fields are GRPO's (see `GRPOConfig`, including `decode_layout` / `decode_block_size`); RLOO's
    own: `beta` (KL coefficient, in the reward), `normalize_advantages`, `reward_clip_range`.
    """

    learning_rate: float = 1e-06
    model_init_kwargs: dict[str, Any] | str | None = None
    trust_remote_code: bool = False
    router_aux_loss_coef: float | None = None
    disable_dropout: bool = False
    remove_unused_columns: bool | None = False
    num_generations: int | None = 2
    num_generations_eval: int | None = None
    max_completion_length: int | None = 512
    ds3_gather_for_generation: bool = True
    shuffle_dataset: bool | None = True
    pad_to_multiple_of: int | str | None = 'auto'
    generation_batch_size: int | None = None
    steps_per_generation: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    generation_kwargs: dict | str | None = None
    chat_template_kwargs: dict | str | None = None
    repetition_penalty: float = 1.0
    cache_implementation: str | None = None
    use_vllm: bool = False
    vllm_mode: str = 'colocate'
    vllm_model_impl: str = 'vllm'
    vllm_enable_sleep_mode: bool = False
    vllm_structured_outputs_regex: str | None = None
    vllm_server_base_url: str | None = None
    vllm_server_host: str = '0.0.0.0'
    vllm_server_port: int = 8000
    vllm_server_timeout: float = 240.0
    vllm_group_port: int = 51216
    vllm_gpu_memory_utilization: float = 0.3
    vllm_max_model_length: int | None = None
    vllm_tensor_parallel_size: int = 1
    beta: float = 0.05
    num_iterations: int = 1
    epsilon: float = 0.2
    epsilon_high: float | None = None
    reward_weights: list[float] | None = None
    normalize_advantages: bool = False
    reward_clip_range: tuple[float, float] | None = None
    mask_truncated_completions: bool = False
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    log_completions: bool = False
    log_multimodal: bool = True
    num_completions_to_print: int | None = None
    log_unique_prompts: bool = False
    use_transformers_continuous_batching: bool = False
    transformers_continuous_batching_config: dict | str | None = None
    use_transformers_paged: bool = False
    decode_layout: str | None = "auto"
    decode_block_size: int = 128

    def __post_init__(self):
        super().__post_init__()
        _check_generation_fields(self)
        if self.use_transformers_paged:
            self.use_transformers_continuous_batching = True
        if self.reward_clip_range is not None:
            if len(self.reward_clip_range) != 2 or float(self.reward_clip_range[0]) > float(self.reward_clip_range[1]):
                raise ValueError(
                    f"`reward_clip_range` must be (min, max) with min <= max, got {self.reward_clip_range!r}.")
            self.reward_clip_range = (float(self.reward_clip_range[0]), float(self.reward_clip_range[1]))
        _resolve_generation_batch(self, "RLOO")


@dataclass
class OnlineDPOConfig(BaseConfig):
    """Fields and defaults of `trl.experimental.online_dpo.OnlineDPOConfig` (1.16) + `JAX_FIELDS` +
    `GENERATION_JAX_FIELDS`.

    Parameters added by trl_jax (sampling):
        decode_layout (`str` or `None`, defaults to `"auto"`): how the policy is laid out while sampling:
            `"auto"`, `"replicated"`, `"tensor"` (cast to the compute dtype and resharded once per batch) or `None`
            (the training params as they are); see `GRPOConfig.decode_layout`.
        decode_block_size (`int`, defaults to `128`): the first decode segment's length (the KV cache grows by
            doubling segments).
    """

    learning_rate: float = 5e-07
    remove_unused_columns: bool = False
    reward_model_path: str | None = None
    max_new_tokens: int = 64
    max_length: int = 512
    temperature: float = 0.9
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    generation_kwargs: dict | None = None
    cache_implementation: str | None = None
    missing_eos_penalty: float | None = None
    beta: list[float] = field(default_factory=lambda: [0.1])
    loss_type: str = 'sigmoid'
    disable_dropout: bool = True
    use_vllm: bool = False
    vllm_model_impl: str = 'vllm'
    vllm_structured_outputs_regex: str | None = None
    vllm_gpu_memory_utilization: float | None = 0.55
    vllm_mode: str = 'colocate'
    vllm_server_base_url: str | None = None
    vllm_server_host: str = '0.0.0.0'
    vllm_server_port: int = 8000
    vllm_server_timeout: float = 240.0
    vllm_group_port: int = 51216
    vllm_tensor_parallel_size: int = 1
    vllm_enable_sleep_mode: bool = False
    ds3_gather_for_generation: bool = True
    model_init_kwargs: dict[str, Any] | str | None = None
    trust_remote_code: bool = False
    reward_weights: list[float] | None = None
    decode_layout: str | None = "auto"
    decode_block_size: int = 128

    def __post_init__(self):
        super().__post_init__()
        _check_generation_fields(self)
        if hasattr(self.beta, "__len__") and len(self.beta) == 1:
            self.beta = self.beta[0]
        _check_choice("loss_type", self.loss_type, ONLINE_DPO_LOSS_TYPES)
        if self.max_new_tokens >= self.max_length:
            warnings.warn(
                f"`max_new_tokens` ({self.max_new_tokens}) >= `max_length` ({self.max_length}): prompts will be "
                "truncated or removed in the forward pass.",
                stacklevel=3,
            )


@dataclass
class DistillationConfig(BaseConfig):
    """Fields and defaults of `trl.DistillationConfig` (1.16) + `JAX_FIELDS` + `GENERATION_JAX_FIELDS`.

    As in TRL 1.16 the trainer is on-policy: every completion is sampled by the student (`max_completion_length`
    new tokens at `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`) and the loss is the generalized
    JSD (`beta`: 0 forward KL, 1 reverse KL) between the student's and the teacher's next-token distributions at
    `temperature`. The teacher is `teacher_model_name_or_path` (or the trainer's `teacher_model` argument), loaded
    in `teacher_model_init_kwargs["dtype"]` if given, else in `compute_dtype`, and sharded like the student.

    Parameters added by trl_jax (sampling): `decode_layout`, `decode_block_size`; see `GRPOConfig`.
    """

    learning_rate: float = 1e-06
    model_init_kwargs: dict[str, Any] | str | None = None
    trust_remote_code: bool = False
    teacher_model_name_or_path: str | None = None
    teacher_model_revision: str | None = None
    teacher_model_init_kwargs: dict[str, Any] | str | None = None
    disable_dropout: bool = False
    remove_unused_columns: bool | None = False
    max_completion_length: int | None = 512
    ds3_gather_for_generation: bool = True
    shuffle_dataset: bool | None = True
    pad_to_multiple_of: int | str | None = 'auto'
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    generation_kwargs: dict | str | None = None
    chat_template_kwargs: dict | str | None = None
    repetition_penalty: float = 1.0
    cache_implementation: str | None = None
    use_vllm: bool = False
    vllm_mode: str = 'colocate'
    vllm_model_impl: str = 'vllm'
    vllm_enable_sleep_mode: bool = False
    vllm_structured_outputs_regex: str | None = None
    vllm_server_base_url: str | None = None
    vllm_server_host: str = '0.0.0.0'
    vllm_server_port: int = 8000
    vllm_server_timeout: float = 240.0
    vllm_group_port: int = 51216
    vllm_gpu_memory_utilization: float = 0.3
    vllm_max_model_length: int | None = None
    vllm_tensor_parallel_size: int = 1
    beta: float = 1.0
    max_tool_calling_iterations: int | None = None
    log_completions: bool = False
    num_completions_to_print: int | None = None
    log_unique_prompts: bool = False
    decode_layout: str | None = "auto"
    decode_block_size: int = 128

    def __post_init__(self):
        super().__post_init__()
        _check_generation_fields(self)
        if isinstance(self.teacher_model_init_kwargs, str):
            self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)
        if self.beta < 0.0 or self.beta > 1.0:
            raise ValueError(f"beta must be in [0.0, 1.0], got {self.beta}.")


# ---------------------------------------------------------------------------------------------------------------
# Script-level argument groups of TRL's CLI (`trl.ModelConfig`, `trl.ScriptArguments`, `trl.scripts.utils`).
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig(_ConfigMixin):
    """Field names and defaults of `trl.ModelConfig`. `use_peft` + `lora_*` give the trainers a LoRA config
    (:func:`trl_jax.models.lora.get_peft_config`, as TRL's); `load_in_4bit` (NF4/FP4) or `load_in_8bit` (LLM.int8)
    hold the frozen base quantized under LoRA (nested 4-bit quantization is refused, `NOT_SUPPORTED_FIELDS`);
    `attn_implementation` picks the attention kernel (auto / xla / cudnn / splash; transformers' names map) and is
    passed on to the trainer config by the CLI."""

    model_name_or_path: str | None = None
    model_revision: str = "main"
    dtype: str | None = "float32"
    attn_implementation: str | None = None
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None
    lora_target_parameters: list[str] | None = None
    lora_modules_to_save: list[str] | None = None
    lora_task_type: str = "CAUSAL_LM"
    use_rslora: bool = False
    use_dora: bool = False
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    use_bnb_nested_quant: bool = False
    bnb_4bit_quant_storage: str | None = None

    def __post_init__(self):
        self._refuse_not_supported()
        self._warn_torch_only()
        self.attn_implementation = _resolve_attn_implementation(self.attn_implementation)
        if not self.use_peft:
            defaults = dict(self._field_defaults())
            lora_set = [n for n in _LORA_FIELDS if getattr(self, n) != defaults[n]]
            if lora_set:
                raise ValueError(f"{', '.join(lora_set)} set without `use_peft: true`: they would be ignored and the "
                                 "whole model trained; set `use_peft: true` (LoRA) or remove them.")
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("`load_in_8bit` and `load_in_4bit` are both set: choose one (TRL refuses 8-bit and "
                             "4-bit precision at the same time).")
        if self.load_in_4bit and not self.use_peft:
            raise ValueError("`load_in_4bit: true` (QLoRA) trains LoRA adapters on a frozen 4-bit base: set "
                             "`use_peft: true` too; a 4-bit model cannot be trained in full.")
        if self.load_in_8bit and not self.use_peft:
            raise ValueError("`load_in_8bit: true` (LLM.int8) trains LoRA adapters on a frozen 8-bit base: set "
                             "`use_peft: true` too; an 8-bit model cannot be trained in full.")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError(f"bnb_4bit_quant_type {self.bnb_4bit_quant_type!r}: choose nf4 or fp4.")
        if isinstance(self.lora_target_modules, list) and len(self.lora_target_modules) == 1:
            self.lora_target_modules = self.lora_target_modules[0]  # TRL: one entry is a string (`all-linear`, regex)
        if self.lora_task_type not in ("CAUSAL_LM", "SEQ_CLS"):
            raise ValueError(f"lora_task_type {self.lora_task_type!r}: choose CAUSAL_LM or SEQ_CLS.")


_LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters",
                "lora_modules_to_save", "use_rslora", "use_dora")


@dataclass
class ScriptArguments(_ConfigMixin):
    """Field names and defaults of `trl.ScriptArguments`."""

    dataset_name: str | None = None
    dataset_config: str | None = None
    dataset_train_split: str = "train"
    dataset_test_split: str = "test"
    dataset_streaming: bool = False
    ignore_bias_buffers: bool = False

    def __post_init__(self):
        self._refuse_not_supported()
        self._warn_torch_only()


@dataclass
class GRPOScriptArguments(ScriptArguments):
    """`trl.scripts.grpo.GRPOScriptArguments`: reward functions by built-in name or dotted import path, and an
    optional reward model (a `*ForSequenceClassification` checkpoint)."""

    reward_funcs: list[str] | None = None
    reward_model_name_or_path: str | None = None


@dataclass
class DatasetConfig(_ConfigMixin):
    """One entry of `DatasetMixtureConfig.datasets` (`trl.scripts.utils.DatasetConfig`)."""

    path: str = ""
    name: str | None = None
    data_dir: str | None = None
    data_files: str | list[str] | dict[str, str] | None = None
    split: str = "train"
    columns: list[str] | None = None
    fraction: float | None = None

    def __post_init__(self):
        if not self.path:
            raise ValueError("A `datasets:` entry needs a `path` (hub id, local directory or data file).")


@dataclass
class DatasetMixtureConfig(_ConfigMixin):
    """`trl.scripts.utils.DatasetMixtureConfig`: `datasets:` is a list of `DatasetConfig` mappings."""

    datasets: list[DatasetConfig] = field(default_factory=list)
    streaming: bool = False
    test_split_size: float | None = None

    def __post_init__(self):
        self.datasets = [d if isinstance(d, DatasetConfig) else DatasetConfig.from_dict(d) for d in self.datasets]


class RunConfig(NamedTuple):
    """What a TRL YAML run config holds: trainer args, model args, script args and the dataset mixture."""

    args: Any
    model_args: ModelConfig
    script_args: ScriptArguments
    dataset_args: DatasetMixtureConfig


def load_config(source, config_cls=SFTConfig, overrides: dict[str, Any] | None = None,
                script_cls=None) -> RunConfig:
    """Read a TRL-style run config (YAML path or dict) the way `trl.scripts.utils.TrlParser` does.

    * A top-level `env:` mapping is exported to `os.environ` (values stringified).
    * Each key goes to every group that has a field of that name (trainer config, `ModelConfig`, `ScriptArguments`,
      `DatasetMixtureConfig`); a key no group knows raises `TypeError` suggesting the closest name.
    * `overrides` (e.g. `--field value` pairs from a CLI, values may be strings) take precedence over the file.
    """
    if isinstance(source, dict):
        values = dict(source)
    else:
        import yaml

        with open(source, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ValueError(f"Config file {source} must contain a YAML mapping, got {type(values).__name__}.")
    env = values.pop("env", None)
    if env is not None:
        if not isinstance(env, dict):
            raise ValueError("`env` must be a mapping of environment variable names to values.")
        for key, value in env.items():
            os.environ[str(key)] = str(value)
    values.update(overrides or {})
    groups = [config_cls, ModelConfig, script_cls or ScriptArguments, DatasetMixtureConfig]
    buckets: list[dict[str, Any]] = [{} for _ in groups]
    for key, value in values.items():
        matched = False
        for group, bucket in zip(groups, buckets, strict=True):
            if key in group.__dataclass_fields__:
                bucket[key] = value
                matched = True
        if not matched:
            all_names = [n for g in groups for n in _field_names(g)]
            close = difflib.get_close_matches(key, all_names, n=1, cutoff=0.6)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise TypeError(
                f"Unknown config key `{key}` (not a field of {config_cls.__name__}, ModelConfig, ScriptArguments or "
                f"DatasetMixtureConfig).{hint}"
            )
    return RunConfig(*(group.from_dict(bucket) for group, bucket in zip(groups, buckets, strict=True)))
