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

CONFIGS = [C.SFTConfig, C.DPOConfig, C.KTOConfig, C.GRPOConfig, C.OnlineDPOConfig]
IDS = [c.__name__ for c in CONFIGS]
# GRPO's defaults need the global batch divisible by num_generations: one data-parallel replica, 8 generations.
BASE = {C.GRPOConfig: dict(per_device_train_batch_size=8, mesh_shape=(1, 1, -1))}


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
    (C.OnlineDPOConfig, "max_length"), (C.OnlineDPOConfig, "max_new_tokens"), (C.GRPOConfig, "max_completion_length"),
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
    assert C.DPOConfig(bf16=False, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]).loss_type == ["sigmoid", "sft"]
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
