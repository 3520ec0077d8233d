"""End-to-end tests of the trainer facades on the built-in tiny model: train, evaluate, save, reload, resume,
callbacks, logging, the CLI with a TRL YAML config, and bad-input errors."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from trl_jax import cli
from trl_jax.configs import DPOConfig, KTOConfig, SFTConfig
from trl_jax.data.loading import load_dataset_any
from trl_jax.trainers import DPOTrainer, KTOTrainer, SFTTrainer
from trl_jax.trainers.logging import read_tensorboard_scalars

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = "builtin:tiny-qwen3"


@pytest.fixture(scope="module", autouse=True)
def _cache(trl_jax_cache):
    return trl_jax_cache


@pytest.fixture(scope="module")
def sft_data():
    return load_dataset_any("builtin:arithmetic_sft").select(range(96)), load_dataset_any(
        "builtin:arithmetic_sft", split="test").select(range(20))


@pytest.fixture(scope="module")
def pref_data():
    return load_dataset_any("builtin:arithmetic_preference").select(range(48))


def _sft_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=1, per_device_eval_batch_size=2,
                learning_rate=3e-3, max_length=48, logging_steps=1, save_steps=3, bf16=False,
                gradient_checkpointing=False, disable_tqdm=True, assistant_only_loss=True)
    base.update(kw)
    return SFTConfig(**base)


class StopAt:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


class Recorder:
    def __init__(self):
        self.events = []

    def on_train_begin(self, args, state, control, **kw):
        self.events.append("begin")

    def on_log(self, args, state, control, logs=None, **kw):
        self.events.append(("log", state.global_step, logs["loss"]))

    def on_save(self, args, state, control, **kw):
        self.events.append(("save", state.global_step))

    def on_train_end(self, args, state, control, **kw):
        self.events.append("end")


def _losses(history):
    return [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]


def test_sft_resume_is_exact_and_saved_model_reloads(tmp_path, sft_data):
    train, test = sft_data
    rec = Recorder()
    full = SFTTrainer(MODEL, args=_sft_args(tmp_path / "full", report_to="tensorboard"), train_dataset=train,
                      eval_dataset=test, callbacks=[rec])
    full.train()
    ref_losses = _losses(full.log_history)
    assert [s for s, _ in ref_losses] == [1, 2, 3, 4, 5, 6]
    assert rec.events[0] == "begin" and rec.events[-1] == "end"
    assert ("save", 3) in rec.events and ("save", 6) in rec.events
    for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens", "grad_norm", "learning_rate", "epoch"):
        assert key in full.log_history[0], key
    with open(tmp_path / "full" / "log_history.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5, 6]
    tb = [f for f in os.listdir(tmp_path / "full" / "runs")]
    scalars = read_tensorboard_scalars(str(tmp_path / "full" / "runs" / tb[0]))
    assert [v for s, t, v in scalars if t == "train/loss"] == pytest.approx([l for _, l in ref_losses], rel=1e-6)

    # Interrupted at step 4 (after the checkpoint at 3), then resumed in a fresh trainer.
    out = tmp_path / "cut"
    cut = SFTTrainer(MODEL, args=_sft_args(out), train_dataset=train, callbacks=[StopAt(4)])
    assert cut.train().global_step == 4
    resumed = SFTTrainer(MODEL, args=_sft_args(out, resume_from_checkpoint=True), train_dataset=train)
    resumed.train()
    new = [x for x in _losses(resumed.log_history) if x[0] > 3]
    assert [s for s, _ in new] == [4, 5, 6]
    np.testing.assert_allclose([l for _, l in new], [l for s, l in ref_losses if s > 3], rtol=1e-5)
    assert resumed.log_history[-2]["num_tokens"] == full.log_history[-2]["num_tokens"]
    for a, b in zip(jax.tree.leaves(full.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

    # save_model writes an HF directory (weights, config, tokenizer) that loads back with the same eval loss.
    path = full.save_model(str(tmp_path / "saved"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(path))
    before = full.evaluate()
    again = SFTTrainer(path, args=_sft_args(tmp_path / "again"), train_dataset=train, eval_dataset=test)
    after = again.evaluate()
    assert after["eval_loss"] == pytest.approx(before["eval_loss"], rel=1e-5)
    assert 0.0 <= again.completion_exact_match() <= 1.0


def test_sft_gradient_accumulation_equals_large_batch(tmp_path, sft_data):
    train, _ = sft_data
    a = SFTTrainer(MODEL, args=_sft_args(tmp_path / "a", max_steps=2, per_device_train_batch_size=2,
                                         save_strategy="no"), train_dataset=train)
    a.train()
    b = SFTTrainer(MODEL, args=_sft_args(tmp_path / "b", max_steps=2, per_device_train_batch_size=1,
                                         gradient_accumulation_steps=2, save_strategy="no"), train_dataset=train)
    b.train()
    np.testing.assert_allclose([l for _, l in _losses(a.log_history)], [l for _, l in _losses(b.log_history)],
                               rtol=1e-5)


def test_dpo_and_kto_train_evaluate_with_trl_metric_names(tmp_path, pref_data):
    common = dict(max_steps=3, per_device_train_batch_size=1, per_device_eval_batch_size=1, learning_rate=1e-3,
                  max_length=48, logging_steps=1, save_strategy="no", bf16=False, gradient_checkpointing=False,
                  disable_tqdm=True)
    dpo = DPOTrainer(MODEL, args=DPOConfig(output_dir=str(tmp_path / "dpo"), loss_type=["sigmoid", "sft"],
                                           **common),
                     train_dataset=pref_data.select(range(40)), eval_dataset=pref_data.select(range(40, 45)))
    dpo.train()
    logged = dpo.log_history[0]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"):
        assert np.isfinite(logged[key]), key
    ev = dpo.evaluate()  # 5 pairs on 8 devices: padded pairs are masked out
    assert np.isfinite(ev["eval_loss"]) and np.isfinite(ev["eval_rewards/margins"])

    kto = KTOTrainer(MODEL, args=KTOConfig(output_dir=str(tmp_path / "kto"), **common),
                     train_dataset=pref_data.select(range(40)), eval_dataset=pref_data.select(range(40, 44)))
    kto.train()
    for key in ("kl", "rewards/chosen", "logps/chosen", "entropy", "logits/chosen"):
        assert key in kto.log_history[0], key
    assert np.isfinite(kto.log_history[0]["loss"])
    assert np.isfinite(kto.evaluate()["eval_loss"])


def test_nan_loss_stops_with_a_checkpoint(tmp_path, sft_data):
    train, _ = sft_data
    args = _sft_args(tmp_path, max_steps=6, learning_rate=1e12, max_grad_norm=0.0, lr_scheduler_type="constant",
                     save_strategy="no", logging_steps=100)
    trainer = SFTTrainer(MODEL, args=args, train_dataset=train)
    with pytest.raises(FloatingPointError, match="at step"):
        trainer.train()
    steps = [d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
    assert steps, "a checkpoint of the last good state must be written"
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(trainer.state.params))


def test_cli_runs_a_trl_yaml_config_unchanged_except_offline_sources(tmp_path):
    """TRL's example CLI config (hub model and dataset swapped for offline ones by CLI overrides)."""
    data = tmp_path / "text.jsonl"
    with open(data, "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"Repeat {i}{i + 1} and {i + 2}"}) + "\n")
    result = cli.run_trainer("sft", os.path.join(HERE, "fixtures", "trl_example_config.yaml"), {
        "model_name_or_path": MODEL, "dataset_name": str(data), "max_steps": "2", "max_length": "32",
        "per_device_train_batch_size": "1", "output_dir": str(tmp_path / "out"), "save_strategy": "no",
        "disable_tqdm": "true",
    })
    assert np.isfinite(result["train_loss"])
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")
    assert os.environ.get("TRL_JAX_TEST_ENV_VAR") == "42"


def test_bad_input_errors_name_the_problem(tmp_path):
    from datasets import Dataset

    with pytest.raises(ValueError, match="empty"):
        SFTTrainer(MODEL, args=_sft_args(tmp_path), train_dataset=Dataset.from_dict({"text": []}))
    with pytest.raises(ValueError, match="(?i)column|format"):
        SFTTrainer(MODEL, args=_sft_args(tmp_path), train_dataset=Dataset.from_dict({"foo": ["a", "b"]}))
    with pytest.raises(TypeError, match="peft_config"):
        SFTTrainer(MODEL, args=_sft_args(tmp_path), train_dataset=Dataset.from_dict({"text": ["a"]}),
                   peft_config=object())
    with pytest.raises(TypeError, match="Did you mean"):
        SFTConfig(output_dir=str(tmp_path), learnig_rate=1.0)


def test_metrics_logger_sends_to_wandb_when_asked(tmp_path, monkeypatch):
    """report_to=wandb logs every record through wandb.log with TRL/transformers-style train/ and eval/ keys."""
    import importlib.machinery
    import sys
    import types

    from trl_jax.trainers.logging import MetricsLogger

    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.run = None
    fake.init = lambda **kw: types.SimpleNamespace(log=lambda rec, step: calls.append((step, rec)), config=kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    args = SFTConfig(output_dir=str(tmp_path), report_to="wandb", disable_tqdm=True)
    logger = MetricsLogger(args, total_steps=2)
    logger.log({"loss": 1.5, "learning_rate": 1e-3}, 1)
    logger.log({"eval_loss": 2.0}, 2)
    logger.close()
    assert calls == [(1, {"train/loss": 1.5, "train/learning_rate": 1e-3}), (2, {"eval/loss": 2.0})]


def test_sft_packing_gives_the_same_loss_as_unpacked_documents(tmp_path, sft_data):
    """bfd packing (padding-free: per-document positions, no cross-document attention, no label across a
    boundary) sums exactly the same token losses as the same documents run one per row."""
    train, _ = sft_data
    docs = train.select(range(12))
    packed = SFTTrainer(MODEL, args=_sft_args(tmp_path / "p", packing=True, max_length=96), train_dataset=docs)
    plain = SFTTrainer((packed.model, packed.params), args=_sft_args(tmp_path / "u", max_length=96),
                       train_dataset=docs, processing_class=packed.processing_class)
    assert len(packed.train_dataset) < len(plain.train_dataset)  # several documents share a row

    def totals(trainer):
        ds = trainer.train_dataset
        batch = trainer._collate([ds[i] for i in range(len(ds))], len(ds))
        terms = jax.jit(trainer.loss_fn)(packed.params, batch, jax.random.PRNGKey(0))
        return float(terms.numerator), float(terms.denominator), batch

    num_p, den_p, batch_p = totals(packed)
    num_u, den_u, _ = totals(plain)
    assert batch_p["segment_ids"].max() > 1
    assert den_p == den_u
    np.testing.assert_allclose(num_p, num_u, rtol=1e-5)
