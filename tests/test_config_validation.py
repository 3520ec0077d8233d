"""Config validation at construction, for every trainer config, with TRL's field names in the message; the
accepted `loss_type` lists equal TRL 1.16's."""

from __future__ import annotations

import os
import re

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import jax
import pytest
import trl
from trl.experimental.online_dpo import OnlineDPOConfig as TRLOnlineDPOConfig

from trl_jax import configs as C

CONFIGS = [C.SFTConfig, C.DPOConfig, C.KTOConfig, C.GRPOConfig, C.OnlineDPOConfig, C.RewardConfig, C.DistillationConfig,
           C.RLOOConfig]
IDS = [c.__name__ for c in CONFIGS]
# GRPO's defaults need the global batch divisible by num_generations: one data-parallel replica, 8 generations.
BASE = {C.GRPOConfig: dict(per_device_train_batch_size=8, mesh_shape=(1, 1, -1)),
        C.RLOOConfig: dict(per_device_train_batch_size=2, mesh_shape=(1, 1, -1))}


def _make(cls, **kw):
    return cls(**{"bf16": False, **BASE.get(cls, {}), **kw})


@pytest.mark.parametrize("cls", CONFIGS, ids=IDS)
@pytest.mark.parametrize("field,value", [
    ("learning_rate", -2e-3),
    ("learning_rate", float("nan")),
    ("per_device_train_batch_size", 0),
    ("per_device_eval_batch_size", -1),
    ("gradient_accumulation_steps", 0),
    ("max_steps", -5),
    ("max_steps", 2.5),
    ("save_total_limit", 0),
    ("logging_steps", -1),
    ("max_consecutive_nonfinite_updates", -1),
    ("weight_decay", -0.1),
])
def test_bad_values_are_refused_naming_the_field(cls, field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        _make(cls, **{field: value})


@pytest.mark.parametrize("cls", CONFIGS, ids=IDS)
def test_epochs_and_steps(cls):
    with pytest.raises(ValueError, match="`num_train_epochs` must be a finite number > 0 when `max_steps`"):
        _make(cls, num_train_epochs=0)
    assert _make(cls, num_train_epochs=0, max_steps=5).max_steps == 5  # max_steps wins, as in transformers
    assert _make(cls, learning_rate=0.0).learning_rate == 0.0  # a frozen run is allowed


@pytest.mark.parametrize("cls,field", [
    (C.SFTConfig, "max_length"), (C.DPOConfig, "max_length"), (C.KTOConfig, "max_length"),
    (C.RewardConfig, "max_length"), (C.OnlineDPOConfig, "max_length"), (C.OnlineDPOConfig, "max_new_tokens"), (C.GRPOConfig, "max_completion_length"),
    (C.GRPOConfig, "num_iterations"),
])
def test_lengths_must_be_positive(cls, field):
    with pytest.raises(ValueError, match=f"`{field}` must be a positive integer"):
        _make(cls, **{field: 0})


def _backticked(help_text: str) -> list[str]:
    return re.findall(r"`'([a-z_]+)'`", help_text)


def test_dpo_loss_types_are_trls_15():
    from trl_jax.losses.dpo import LOSS_TYPES

    trl_types = _backticked(trl.DPOConfig.__dataclass_fields__["loss_type"].metadata["help"])
    assert len(trl_types) == 15 and tuple(trl_types) == C.DPO_LOSS_TYPES == LOSS_TYPES
    for t in trl_types:
        assert C.DPOConfig(bf16=False, loss_type=t).loss_type == [t]
    both = C.DPOConfig(bf16=False, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    assert both.loss_type == ["sigmoid", "sft"]
    with pytest.raises(ValueError, match=r"Unknown DPO `loss_type` \['sigmod'\]\. Did you mean 'sigmoid'\?"):
        C.DPOConfig(loss_type="sigmod")
    with pytest.raises(ValueError, match="`loss_type` is empty"):
        C.DPOConfig(loss_type=[])
    with pytest.raises(ValueError, match="`f_divergence_type`"):
        C.DPOConfig(f_divergence_type="kl")


def test_kto_grpo_online_dpo_loss_types_are_trls():
    from trl_jax.losses.grpo import LOSS_TYPES as GRPO_IMPLEMENTED

    assert list(C.KTO_LOSS_TYPES) == trl.KTOConfig.__dataclass_fields__["loss_type"].metadata["choices"]
    assert list(C.ONLINE_DPO_LOSS_TYPES) == TRLOnlineDPOConfig.__dataclass_fields__["loss_type"].metadata["choices"]
    grpo_help = trl.GRPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    listed = grpo_help.split("Supported values are", 1)[1].split(".", 1)[0]
    assert set(re.findall(r"'([a-z_]+)'", listed)) == set(C.GRPO_LOSS_TYPES) == set(GRPO_IMPLEMENTED)
    for t in C.GRPO_LOSS_TYPES:
        assert _make(C.GRPOConfig, loss_type=t).loss_type == t
    with pytest.raises(ValueError, match="`loss_type` must be one of"):
        C.KTOConfig(loss_type="sigmoid")
    with pytest.raises(ValueError, match="`loss_type` must be one of.*Did you mean 'dapo'"):
        _make(C.GRPOConfig, loss_type="dapoo")
    with pytest.raises(ValueError, match="`loss_type` must be one of"):
        C.OnlineDPOConfig(loss_type="hinge")
    with pytest.raises(ValueError, match="`scale_rewards`"):
        _make(C.GRPOConfig, scale_rewards="std")
    with pytest.raises(ValueError, match="`importance_sampling_level`"):
        _make(C.GRPOConfig, importance_sampling_level="seq")


@pytest.mark.parametrize("cls", CONFIGS, ids=IDS)
def test_float16_refused_on_cpu(cls):
    if jax.default_backend() != "cpu":
        pytest.skip("float16 compiles on this backend")
    for kw in (dict(compute_dtype="float16"), dict(fp16=True)):
        with pytest.raises(ValueError, match="CPU backend cannot compile.*compute_dtype='float32'.*bfloat16"):
            _make(cls, **kw)
    assert _make(cls, compute_dtype="bfloat16").compute_dtype == "bfloat16"
    assert _make(cls, param_dtype="float16", compute_dtype="float32").param_dtype == "float16"


@pytest.mark.parametrize("cls", CONFIGS, ids=IDS)
def test_defaults_and_trl_example_values_pass(cls):
    cfg = _make(cls, learning_rate=1e-5, max_steps=10, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                save_total_limit=2, overwrite_output_dir=True, max_consecutive_nonfinite_updates=0)
    assert cfg.overwrite_output_dir is True and cfg.max_consecutive_nonfinite_updates == 0
    assert _make(cls).max_consecutive_nonfinite_updates == 3


# ---------------------------------------------------------------------------------------------------- field audit
# Every field of every trainer config, of the CLI's ModelConfig and of its script arguments is in exactly one class:
#   used          read by trl_jax (checked below: the name is read somewhere in trl_jax outside configs.py, or
#                 resolved into a used field by a config's __post_init__: RESOLVED_IN_CONFIG);
#   PyTorch-only  C.TORCH_ONLY_FIELDS: accepted with one warning line, no effect;
#   not supported C.NOT_SUPPORTED_FIELDS: an error at construction unless left at the default.
# A new field without a class fails test_every_field_has_exactly_one_class.
RESOLVED_IN_CONFIG = {
    "activation_checkpointing": "alias of gradient_checkpointing -> remat_policy",
    "gradient_checkpointing": "-> remat_policy",
    "fp16": "-> compute_dtype",
    "bf16": "-> compute_dtype",
    "do_eval": "GRPO's eval batch check",
    "generation_batch_size": "-> steps_per_generation",
    "vllm_importance_sampling_cap": "-> vllm_importance_sampling_clip_max (PyTorch-only too)",
    "overwrite_output_dir": "read by the run's output_dir check",
}
AUDITED = [C.SFTConfig, C.DPOConfig, C.KTOConfig, C.GRPOConfig, C.OnlineDPOConfig, C.RewardConfig, C.RLOOConfig,
           C.ModelConfig, C.ScriptArguments, C.GRPOScriptArguments, C.DatasetMixtureConfig, C.DatasetConfig,
           C.DistillationConfig]


def _trl_jax_sources() -> str:
    import trl_jax

    root = os.path.dirname(trl_jax.__file__)
    texts = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if name.endswith(".py") and path != os.path.join(root, "configs.py"):
                texts.append(open(path, encoding="utf-8").read())
    return "\n".join(texts)


def _used_fields() -> set[str]:
    import dataclasses

    sources = _trl_jax_sources()
    names = {f.name for cls in AUDITED for f in dataclasses.fields(cls)}
    read = {n for n in names if re.search(rf"(\.{n}\b|[\"']{n}[\"'])", sources)}
    return (read | set(RESOLVED_IN_CONFIG)) - set(C.TORCH_ONLY_FIELDS) - set(C.NOT_SUPPORTED_FIELDS)


def test_every_field_has_exactly_one_class():
    import dataclasses

    used = _used_fields()
    assert not set(C.TORCH_ONLY_FIELDS) & set(C.NOT_SUPPORTED_FIELDS)
    unclassified = sorted({f.name for cls in AUDITED for f in dataclasses.fields(cls)}
                          - used - set(C.TORCH_ONLY_FIELDS) - set(C.NOT_SUPPORTED_FIELDS))
    assert unclassified == [], (
        f"fields nothing reads and no class covers: {unclassified}. Implement them, or add them to "
        "TORCH_ONLY_FIELDS (warned, no effect) or NOT_SUPPORTED_FIELDS (refused when set) in trl_jax/configs.py."
    )
    # The classes name real fields (no stale entries).
    all_names = {f.name for cls in AUDITED for f in dataclasses.fields(cls)}
    assert set(C.NOT_SUPPORTED_FIELDS) <= all_names and set(RESOLVED_IN_CONFIG) <= all_names


def _non_default(f):
    import dataclasses

    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return default + 1
    if default is None:
        return {"int": 2, "float": 0.5, "bool": True, "list": ["x"]}.get(
            next((t for t in ("bool", "int", "float", "list") if t in str(f.type)), "str"), "x")
    if isinstance(default, list):
        return ["x"]
    return "other"


@pytest.mark.parametrize("cls", AUDITED[:9] + [C.DistillationConfig],
                         ids=[c.__name__ for c in AUDITED[:9]] + ["DistillationConfig"])
def test_not_supported_fields_are_errors_when_set(cls):
    import dataclasses

    base = BASE.get(cls, {}) if cls in CONFIGS else {}
    if cls in CONFIGS:
        base = {"bf16": False, **base}
    cls(**base)  # defaults pass
    fields = [f for f in dataclasses.fields(cls) if f.name in C.NOT_SUPPORTED_FIELDS]
    for f in fields:
        with pytest.raises(ValueError, match=rf"not supported by trl_jax yet: `{f.name}`=.*\(.+\)"):
            cls(**base, **{f.name: _non_default(f)})


def test_lora_fields_need_use_peft_and_quantization_needs_lora_from_the_cli_config():
    """`--lora_r 8` without `--use_peft true` would train the full model: refused, naming the fix; 4-bit loading
    needs LoRA, so does 8-bit, both at once and nested quantization are refused; `use_peft` + `lora_*` become
    TRL's LoRA config."""
    from trl_jax.models.lora import get_peft_config

    with pytest.raises(ValueError, match="load_in_4bit.*use_peft: true"):
        C.load_config({"load_in_4bit": "true"}, C.SFTConfig)
    with pytest.raises(ValueError, match="load_in_8bit.*use_peft: true"):
        C.load_config({"load_in_8bit": "true"}, C.SFTConfig)
    with pytest.raises(ValueError, match="load_in_8bit.*load_in_4bit.*both"):
        C.load_config({"use_peft": "true", "load_in_8bit": "true", "load_in_4bit": "true"}, C.SFTConfig)
    run8 = C.load_config({"use_peft": "true", "load_in_8bit": "true"}, C.SFTConfig)
    assert run8.model_args.load_in_8bit
    from trl_jax.models.lora import apply_model_args
    apply_model_args(run8.args, run8.model_args)
    assert run8.args.model_init_kwargs["quantization_config"] == {"load_in_8bit": True}
    with pytest.raises(ValueError, match="`use_bnb_nested_quant`=True"):
        C.load_config({"use_peft": "true", "load_in_4bit": "true", "use_bnb_nested_quant": "true"}, C.SFTConfig)
    assert C.load_config({"use_peft": "true", "load_in_4bit": "true"}, C.SFTConfig).model_args.load_in_4bit
    for key in ("lora_alpha", "lora_dropout", "lora_target_modules", "use_dora"):
        with pytest.raises(ValueError, match=f"{key}.*use_peft: true"):
            C.load_config({key: "true" if key == "use_dora" else "1"}, C.SFTConfig)
    run = C.load_config({"use_peft": "true", "lora_r": "8", "lora_target_modules": ["q_proj", "v_proj"],
                         "use_rslora": "true"}, C.SFTConfig)
    peft = get_peft_config(run.model_args)
    assert (peft.r, peft.lora_alpha, peft.lora_dropout, tuple(peft.target_modules), peft.use_rslora) == \
        (8, 32, 0.05, ("q_proj", "v_proj"), True)
    assert get_peft_config(C.load_config({}, C.SFTConfig).model_args) is None


def test_torch_only_fields_of_model_and_script_args_warn():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        C.ModelConfig(attn_implementation="flash_attention_2")  # used: maps to a JAX kernel (no torch warning)
        C.ScriptArguments(ignore_bias_buffers=True)
        C.SFTConfig(bf16=False, trust_remote_code=True, remove_unused_columns=False)
    msgs = [str(w.message) for w in caught if issubclass(w.category, C.TorchOnlyFieldWarning)]
    assert len(msgs) == 2 and "ignore_bias_buffers" in msgs[0]
    assert "remove_unused_columns" in msgs[1] and "trust_remote_code" in msgs[1]
    with pytest.raises(ValueError, match="save_strategy='best'"):
        C.SFTConfig(bf16=False, save_strategy="best")


def test_attn_implementation_chooses_the_kernel(caplog):
    """`attn_implementation` (trainer config, TRL's `model_init_kwargs`, the CLI's ModelConfig) -> the model's
    `attention_impl`: JAX names as they are, transformers' torch names mapped with one warning line, unknown names
    an error naming the choices."""
    import logging

    for value in ("auto", "xla", "cudnn", "splash"):
        assert C.SFTConfig(bf16=False, attn_implementation=value).attn_implementation == value
        assert C.ModelConfig(attn_implementation=value).attn_implementation == value
    assert C.SFTConfig(bf16=False).attn_implementation is None and C.ModelConfig().attn_implementation is None
    with caplog.at_level(logging.WARNING, logger="trl_jax"):
        caplog.clear()
        assert C.DPOConfig(bf16=False, attn_implementation="eager").attn_implementation == "xla"
        assert len([r for r in caplog.records if "attn_implementation" in r.getMessage()]) == 1
        assert C.ModelConfig(attn_implementation="sdpa").attn_implementation == "xla"
        assert C.ModelConfig(attn_implementation="flash_attention_2").attn_implementation == "auto"
        kw = C.GRPOConfig(bf16=False, model_init_kwargs={"attn_implementation": "flash_attention_3"})
        assert kw.attn_implementation == "auto"
    assert C.KTOConfig(bf16=False, model_init_kwargs='{"attn_implementation": "splash"}').attn_implementation \
        == "splash"
    with pytest.raises(ValueError, match="attn_implementation 'flash'.*auto, xla, cudnn, splash"):
        C.SFTConfig(bf16=False, attn_implementation="flash")
    with pytest.raises(ValueError, match="attn_implementation 'fast'.*auto, xla, cudnn, splash"):
        C.ModelConfig(attn_implementation="fast")
    with pytest.raises(ValueError, match="disagree"):
        C.SFTConfig(bf16=False, attn_implementation="xla", model_init_kwargs={"attn_implementation": "splash"})
    run = C.load_config({"attn_implementation": "splash"}, C.SFTConfig)
    assert run.model_args.attn_implementation == "splash"
