"""trl_jax.configs against the installed TRL 1.16 configs and TrlParser."""

import dataclasses
import enum
import os
import warnings

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import pytest
import trl
from trl.experimental.online_dpo import OnlineDPOConfig as TRLOnlineDPOConfig
from trl.scripts.utils import DatasetMixtureConfig as TRLMixture
from trl.scripts.utils import TrlParser

from trl_jax import configs as C

HERE = os.path.dirname(__file__)
PAIRS = [
    (C.SFTConfig, trl.SFTConfig),
    (C.DPOConfig, trl.DPOConfig),
    (C.KTOConfig, trl.KTOConfig),
    (C.GRPOConfig, trl.GRPOConfig),
    (C.OnlineDPOConfig, TRLOnlineDPOConfig),
    (C.RewardConfig, trl.RewardConfig),
    (C.DistillationConfig, trl.DistillationConfig),
    (C.RLOOConfig, trl.RLOOConfig),
    (C.ModelConfig, trl.ModelConfig),
    (C.ScriptArguments, trl.ScriptArguments),
    (C.DatasetMixtureConfig, TRLMixture),
]


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default.value if isinstance(f.default, enum.Enum) else f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_field_names_and_defaults_equal_trl(ours, theirs):
    our_fields = {f.name: _default(f) for f in dataclasses.fields(ours)}
    trl_fields = {f.name: _default(f) for f in dataclasses.fields(theirs)}
    assert set(trl_fields) - set(our_fields) == set()
    extra = set(our_fields) - set(trl_fields)
    if ours in (C.ModelConfig, C.ScriptArguments, C.DatasetMixtureConfig):
        assert extra == set()
    else:
        generating = ours in (C.GRPOConfig, C.OnlineDPOConfig, C.DistillationConfig, C.RLOOConfig)
        assert extra == (set(C.JAX_FIELDS) | set(C.GENERATION_JAX_FIELDS if generating else ())) - set(trl_fields)
    for name, value in trl_fields.items():
        assert our_fields[name] == value, name
    # Torch-only fields are real fields (accepted) of every trainer config.
    if ours not in (C.ModelConfig, C.ScriptArguments, C.DatasetMixtureConfig):
        assert {"deepspeed", "fsdp", "gradient_checkpointing_kwargs", "dataloader_num_workers"} <= set(our_fields)


# Values that legitimately differ after __post_init__ (documented in the README):
# bf16: TRL/transformers refuse bf16 on a torch CPU without use_cpu; we compare with bf16 set explicitly.
# report_to/debug/enum types: normalized the same way, compared below after conversion.
# accelerator_config / parallelism_config become accelerate objects in TRL; they are torch-only here.
_POST_INIT_SKIP = {"parallelism_config", "accelerator_config"}


@pytest.mark.parametrize("ours,theirs", PAIRS[:7], ids=[p[0].__name__ for p in PAIRS[:7]])
@pytest.mark.parametrize("kw", [{}, {"eval_strategy": "steps", "logging_steps": 5, "save_steps": 20.0,
                                     "pad_to_multiple_of": "64", "fp16": False}])
def test_post_init_values_equal_trl(ours, theirs, kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trl_names = {f.name for f in dataclasses.fields(theirs)}
        trl_cfg = theirs(output_dir="/tmp/trl_jax_cfg", bf16=False, **{k: v for k, v in kw.items() if k in trl_names})
    # One data-parallel replica, like TRL's single process (world_size = product of the data and fsdp axes).
    our_cfg = ours(output_dir="/tmp/trl_jax_cfg", bf16=False, mesh_shape=(1, 1, -1), **kw)
    for f in dataclasses.fields(theirs):
        if f.name in _POST_INIT_SKIP:
            continue
        value = getattr(trl_cfg, f.name)
        if isinstance(value, enum.Enum):
            value = value.value
        if f.name == "debug":
            value = [v.value for v in value]
            assert our_cfg.debug in ("", [])
            continue
        assert getattr(our_cfg, f.name) == value, f.name
    assert our_cfg.compute_dtype == "float32" and our_cfg.param_dtype == "float32"


def test_bf16_default_resolves_like_trl():
    cfg = C.SFTConfig()
    assert cfg.bf16 is True and cfg.compute_dtype == "bfloat16" and cfg.output_dir == "trainer_output"
    # fp16 resolves to float16 activations; XLA's CPU backend cannot compile them, so on CPU it is refused
    # at construction (as transformers refuses fp16 on a CPU).
    import jax

    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="compute_dtype='float32'"):
            C.SFTConfig(fp16=True)
        assert C.SFTConfig(fp16=True, compute_dtype="float32").bf16 is False
    else:
        assert C.SFTConfig(fp16=True).bf16 is False
        assert C.SFTConfig(fp16=True).compute_dtype == "float16"
    assert C.SFTConfig(gradient_checkpointing=False).remat_policy == "none"
    assert C.SFTConfig().remat_policy == "nothing_saveable"
    assert C.GRPOConfig(per_device_train_batch_size=4, num_generations=4, gradient_accumulation_steps=2,
                        mesh_shape=(1, 1, -1)).generation_batch_size == 8


def test_misspelled_field_suggests_closest():
    with pytest.raises(TypeError, match="Did you mean `learning_rate`"):
        C.SFTConfig(lerning_rate=1e-4)
    with pytest.raises(TypeError, match="Did you mean `per_device_train_batch_size`"):
        C.DPOConfig.from_dict({"per_device_train_batchsize": 4})
    with pytest.raises(TypeError, match="Did you mean `model_name_or_path`"):
        C.load_config({"model_name_or_pth": "x"}, C.SFTConfig)


def test_torch_only_fields_one_warning_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        C.SFTConfig(deepspeed="ds.json", fsdp="full_shard", gradient_checkpointing_kwargs={"use_reentrant": False},
                    torch_compile=True, dataloader_num_workers=4)
    msgs = [str(w.message) for w in caught if issubclass(w.category, C.TorchOnlyFieldWarning)]
    assert len(msgs) == 1 and "\n" not in msgs[0]
    for name in ("deepspeed", "fsdp", "gradient_checkpointing_kwargs", "torch_compile", "dataloader_num_workers"):
        assert name in msgs[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", C.TorchOnlyFieldWarning)
        C.SFTConfig()  # defaults: no warning


def test_validation_errors():
    with pytest.raises(ValueError, match="mesh_axis_names"):
        C.SFTConfig(mesh_shape=(2, 4))
    with pytest.raises(ValueError, match="param_dtype"):
        C.SFTConfig(param_dtype="fp8")
    with pytest.raises(ValueError, match="packing_strategy"):
        C.SFTConfig(packing_strategy="first_fit")
    with pytest.raises(ValueError, match="loss_weights"):
        C.DPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    assert C.DPOConfig(loss_type="ipo").loss_type == ["ipo"]
    assert C.OnlineDPOConfig().beta == 0.1


def test_from_dict_coerces_strings_like_cli():
    cfg = C.DPOConfig.from_dict({"learning_rate": "1e-5", "beta": "0.2", "loss_type": "sigmoid,sft",
                                 "loss_weights": "[1.0, 0.5]", "max_length": "none", "bf16": "false",
                                 "mesh_shape": "2,4,1", "pad_to_multiple_of": "16"})
    assert cfg.learning_rate == 1e-5 and cfg.beta == 0.2 and cfg.loss_type == ["sigmoid", "sft"]
    assert cfg.loss_weights == [1.0, 0.5] and cfg.max_length is None and cfg.bf16 is False
    assert cfg.mesh_shape == (2, 4, 1) and cfg.pad_to_multiple_of == 16


def test_yaml_matches_trl_parser(monkeypatch):
    path = os.path.join(HERE, "fixtures", "trl_example_config.yaml")
    monkeypatch.delenv("TRL_JAX_TEST_ENV_VAR", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = C.load_config(path, C.SFTConfig, overrides={"learning_rate": "3e-4"})
    assert os.environ["TRL_JAX_TEST_ENV_VAR"] == "42"
    torch_msgs = [str(w.message) for w in caught if issubclass(w.category, C.TorchOnlyFieldWarning)]
    assert len(torch_msgs) == 1 and "dataloader_num_workers" in torch_msgs[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parser = TrlParser((trl.ScriptArguments, trl.SFTConfig, trl.ModelConfig, TRLMixture))
        script, trl_args, model, _ = parser.parse_args_and_config(["--config", path, "--learning_rate", "3e-4"])
    for f in dataclasses.fields(trl.SFTConfig):
        value = getattr(trl_args, f.name)
        value = value.value if isinstance(value, enum.Enum) else value
        if f.name in ("debug", *_POST_INIT_SKIP):
            continue
        assert getattr(run.args, f.name) == value, f.name
    for ours, theirs in ((run.model_args, model), (run.script_args, script)):
        assert dataclasses.asdict(ours) == dataclasses.asdict(theirs)
    assert run.args.learning_rate == 3e-4 and run.args.weight_decay == 0.01
    assert run.model_args.model_name_or_path == "Qwen/Qwen2.5-0.5B" and run.script_args.dataset_name == "stanfordnlp/imdb"
    assert C.SFTConfig.from_yaml(path).packing is True


def test_dataset_mixture_from_yaml_dict():
    run = C.load_config({"datasets": [{"path": "builtin:arithmetic_sft", "split": "train", "fraction": 0.5}],
                         "output_dir": "/tmp/x"}, C.SFTConfig)
    assert isinstance(run.dataset_args.datasets[0], C.DatasetConfig)
    from trl_jax.data import load_dataset_mixture

    ds = load_dataset_mixture(run.dataset_args)
    # TRL 1.16: fractions are shares of the final mixture; a lone dataset's share is 1 (all 2000 rows)
    assert len(ds["train"]) == 2000
