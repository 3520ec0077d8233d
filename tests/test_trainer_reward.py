"""RewardTrainer: loss-curve parity with TRL's RewardTrainer, the saved checkpoint in transformers and as GRPO's
reward model, resume, the quickstart, and bad-input errors.

Parity: one ``*ForSequenceClassification`` directory built by TRL's own recipe (``set_seed(0)`` then
``AutoModelForSequenceClassification.from_pretrained(causal_lm, num_labels=1)``, saved) is trained by TRL (torch,
CPU) and by trl_jax on the same rows in the same order with the same optimizer; every per-step ``log_history``
value (loss, grad_norm, learning_rate, num_tokens, accuracy, margin, min/mean/max_reward) must agree within 1e-3
relative. Rewards are O(0.1-1) numbers that cross zero, so values below 1e-2 are compared with 1e-5 absolute.
The 20-step version is ``benchmarks/parity_trainers.py --cases reward-adamw ...``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys

import jax
import numpy as np
import pytest

from trl_jax.configs import RewardConfig
from trl_jax.data.loading import load_dataset_any
from trl_jax.trainers import RewardTrainer

_BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "parity_trainers.py"
_spec = importlib.util.spec_from_file_location("parity_trainers", _BENCH)
pt = sys.modules.setdefault("parity_trainers", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(pt)

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = "builtin:tiny-qwen3"
STEPS = 12
RTOL = 1e-3
METRICS = {"loss", "grad_norm", "learning_rate", "num_tokens", "accuracy", "margin", "min_reward", "mean_reward",
           "max_reward"}


@pytest.fixture(scope="module", autouse=True)
def _cache(trl_jax_cache):
    return trl_jax_cache


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_parity")
    return pt.make_reward_model_dir(pt.make_model_dir(str(root / "causal")), str(root / "rm"))


@pytest.fixture(scope="module")
def pref_data():
    return load_dataset_any("builtin:arithmetic_preference").select(range(64))


def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=8,
                learning_rate=1e-3, max_length=64, logging_steps=1, save_strategy="no", bf16=False,
                gradient_checkpointing=False, disable_tqdm=True, mesh_shape=(1, 1, 1))
    base.update(kw)
    return RewardConfig(**base)


# ------------------------------------------------------------------------------------------------ parity with TRL
@pytest.mark.parametrize("name", ["reward-adamw", "reward-adamw-ga2-margin-center", "reward-adamw-dp"])
def test_loss_curve_parity_with_trl(name, reward_dir, tmp_path):
    case = pt.CASES[name]
    dp = name.endswith("-dp")
    if dp and case.per_device_train_batch_size % jax.device_count():
        pytest.skip(f"needs a device count dividing {case.per_device_train_batch_size}")
    ds = pt.make_dataset(case.data_kind, pt.rows_needed(case, STEPS))
    trl_logs = pt.run_trl(case, reward_dir, ds, STEPS, str(tmp_path / "trl"))
    jax_logs = pt.run_jax(case, reward_dir, ds, STEPS, str(tmp_path / "jax"), mesh_shape=None if dp else (1, 1, 1))
    assert len(trl_logs) == len(jax_logs) == STEPS
    cmp = pt.compare(trl_logs, jax_logs, rtol=RTOL, atol=case.atol)
    assert cmp.only_trl == [] and cmp.only_jax == [], (cmp.only_trl, cmp.only_jax)
    assert set(cmp.max_rel) == METRICS
    bad = {k: (v, cmp.curves[k]) for k, v in cmp.failures(RTOL).items()}
    assert not bad, bad
    losses = cmp.curves["loss"][0]
    assert max(abs(x - losses[0]) for x in losses) > 1e-3 * abs(losses[0]), losses  # the run moves


# ------------------------------------------------------------------------------------------------ save / reload
def test_saved_model_scores_equal_in_transformers_and_as_grpo_reward_model(tmp_path, pref_data):
    """A causal LM gets a one-label score head; after training, save_model writes a checkpoint that
    AutoModelForSequenceClassification loads with the same scores, and that GRPOTrainer scores with."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from trl_jax.configs import GRPOConfig
    from trl_jax.trainers import GRPOTrainer

    tr = RewardTrainer(MODEL, args=_args(tmp_path / "run"), train_dataset=pref_data)
    tr.train()
    path = tr.save_model(str(tmp_path / "rm"))
    rows = [tr.train_dataset[i] for i in range(6)]
    batch = tr._collate(rows, len(rows))
    chosen, rejected = (np.asarray(x) for x in jax.jit(tr.rewards)(tr.state.params, batch))

    hf = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager").eval()
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == tr.processing_class.pad_token_id
    ids = np.concatenate([batch["input_ids"][:, 0], batch["input_ids"][:, 1]])
    mask = np.concatenate([batch["attention_mask"][:, 0], batch["attention_mask"][:, 1]])
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask)).logits
    ref = ref[:, 0].numpy()
    np.testing.assert_allclose(np.concatenate([chosen, rejected]), ref, atol=1e-5, rtol=1e-5)
    assert np.ptp(ref) > 1e-3  # trained: the rows get different rewards

    prompts = load_dataset_any("builtin:arithmetic_prompts").select(range(8))
    grpo = GRPOTrainer(MODEL, reward_funcs=path, train_dataset=prompts,
                       args=GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=8,
                                       num_generations=4, max_completion_length=8, max_steps=1, bf16=False,
                                       mesh_shape=(1, 1, 1), gradient_checkpointing=False, disable_tqdm=True,
                                       save_strategy="no"))
    raw = [pref_data[i] for i in range(6)]
    scores = grpo._reward_model_scores(0, [r["prompt"] for r in raw], [r["chosen"] for r in raw])
    np.testing.assert_allclose(scores, ref[:6], atol=1e-5, rtol=1e-5)


class _StopAt:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_resume_is_exact(tmp_path, pref_data):
    full = RewardTrainer(MODEL, args=_args(tmp_path / "full", save_strategy="steps", save_steps=2),
                         train_dataset=pref_data)
    full.train()
    ref = [(h["step"], h["loss"]) for h in full.log_history if "loss" in h and "step" in h]
    assert [s for s, _ in ref] == [1, 2, 3, 4]
    for key in METRICS:
        assert key in full.log_history[0], key

    out = tmp_path / "cut"
    cut = RewardTrainer(MODEL, args=_args(out, save_strategy="steps", save_steps=2), train_dataset=pref_data,
                        callbacks=[_StopAt(3)])
    assert cut.train().global_step == 3  # interrupted after the checkpoint at step 2
    resumed = RewardTrainer(MODEL, args=_args(out, save_strategy="steps", save_steps=2,
                                              resume_from_checkpoint=True), train_dataset=pref_data)
    resumed.train()
    new = [(h["step"], h["loss"]) for h in resumed.log_history if "loss" in h and "step" in h and h["step"] > 2]
    assert [s for s, _ in new] == [3, 4]
    np.testing.assert_allclose([l for _, l in new], [l for s, l in ref if s > 2], rtol=1e-5)
    assert resumed.log_history[-2]["num_tokens"] == full.log_history[-2]["num_tokens"]


# ------------------------------------------------------------------------------------------------ data
def test_dataset_formats_and_max_length_filter(tmp_path):
    """Explicit / implicit prompt, standard / conversational, tokenized and legacy columns; pairs longer than
    max_length are dropped (TRL filters, it does not truncate)."""
    from datasets import Dataset

    tok = RewardTrainer(MODEL, args=_args(tmp_path / "a"),
                        train_dataset=Dataset.from_dict({"chosen": ["1+1=2"], "rejected": ["1+1=3"]})
                        ).processing_class
    eos = tok.eos_token_id
    std = RewardTrainer(MODEL, args=_args(tmp_path / "b", max_length=6), train_dataset=Dataset.from_dict(
        {"prompt": ["1+1=", "12345+1="], "chosen": ["2", "12346"], "rejected": ["3", "12347"], "margin": [0.5, 1]}))
    assert len(std.train_dataset) == 1  # "12345+1=12346<eos>" has 15 tokens
    row = std.train_dataset[0]
    assert row["chosen_ids"] == tok("1+1=2")["input_ids"] + [eos] and row["rejected_ids"][-2:] == [
        tok.convert_tokens_to_ids("3"), eos]
    batch = std._collate([row], 2)
    assert batch["input_ids"].shape[:2] == (2, 2) and batch["margin"].tolist() == [0.5, 0.0]
    assert batch["example_mask"].tolist() == [1, 0]

    conv = [{"role": "user", "content": "1+1?"}]
    chat = RewardTrainer(MODEL, args=_args(tmp_path / "c"), train_dataset=Dataset.from_list([
        {"prompt": conv, "chosen": [{"role": "assistant", "content": "2"}],
         "rejected": [{"role": "assistant", "content": "3"}]}]))
    want = tok.apply_chat_template(conv + [{"role": "assistant", "content": "2"}], tokenize=True,
                                   return_dict=True)["input_ids"]
    assert chat.train_dataset[0]["chosen_ids"] == list(want)

    with pytest.warns(FutureWarning, match="chosen_input_ids"):
        legacy = RewardTrainer(MODEL, args=_args(tmp_path / "d"), train_dataset=Dataset.from_dict(
            {"chosen_input_ids": [[5, 6, 7]], "rejected_input_ids": [[5, 6]]}))
    assert legacy.train_dataset[0]["chosen_ids"] == [5, 6, 7]


def test_trl_data_collator_gives_the_same_loss(tmp_path):
    """TRL's own reward collator (torch tensors, [2B, L] chosen-then-rejected rows) as ``data_collator``: the
    batch is regrouped into pairs and gives the default collator's loss and metrics."""
    from datasets import Dataset
    from trl.trainer.reward_trainer import DataCollatorForPreference

    data = Dataset.from_dict({"prompt": ["1+1=", "2+2=", "3+3="], "chosen": ["2", "4", "6"],
                              "rejected": ["3", "5", "66"], "margin": [0.1, 0.0, 0.7]})
    ours = RewardTrainer(MODEL, args=_args(tmp_path / "a", per_device_train_batch_size=3), train_dataset=data)
    pad = ours.processing_class.pad_token_id
    theirs = RewardTrainer(MODEL, args=_args(tmp_path / "b", per_device_train_batch_size=3), train_dataset=data,
                           data_collator=DataCollatorForPreference(pad_token_id=pad))
    a = jax.jit(ours.loss_fn)(ours.params, dict(ours._batch_for_step(0)), None)
    b = jax.jit(theirs.loss_fn)(theirs.params, dict(theirs._batch_for_step(0)), None)
    np.testing.assert_allclose(float(b.loss), float(a.loss), rtol=1e-6)
    for k in a.metrics:
        np.testing.assert_allclose(float(b.metrics[k]), float(a.metrics[k]), rtol=1e-6, atol=1e-7, err_msg=k)


def test_bad_inputs_name_the_problem(tmp_path):
    from datasets import Dataset

    with pytest.raises(ValueError, match=r"REWARD dataset has columns \['prompt', 'completion'\].*chosen"):
        RewardTrainer(MODEL, args=_args(tmp_path), train_dataset=Dataset.from_dict(
            {"prompt": ["a"], "completion": ["b"]}))
    with pytest.raises(ValueError, match="`train_dataset` is required"):
        RewardTrainer(MODEL, args=_args(tmp_path))
    with pytest.raises(ValueError, match="`margin` column must hold numbers"):
        RewardTrainer(MODEL, args=_args(tmp_path), train_dataset=Dataset.from_dict(
            {"chosen": ["a"], "rejected": ["b"], "margin": ["big"]}))
    from trl_jax.models import from_pretrained
    from trl_jax.assets import resolve_model_path

    causal = from_pretrained(resolve_model_path(MODEL))
    with pytest.raises(ValueError, match="num_labels=1"):
        RewardTrainer(causal, args=_args(tmp_path), processing_class=None,
                      train_dataset=Dataset.from_dict({"chosen": ["a"], "rejected": ["b"]}))
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        RewardConfig(bf16=False, center_rewards_coefficient=float("nan"))


# ------------------------------------------------------------------------------------------------ quickstart
def test_quickstart_held_out_accuracy_rises(tmp_path, monkeypatch):
    """configs/quickstart_reward.yaml through the CLI, shortened (40 of its 250 steps): held-out accuracy rises;
    evaluation reports TRL's metric names."""
    from trl_jax import cli

    monkeypatch.chdir(tmp_path)
    # the config's global batch of 16 pairs, whatever the device count (tests/run.sh simulates 8 devices)
    per_device = str(16 // jax.device_count()) if 16 % jax.device_count() == 0 else "16"
    mesh = {} if 16 % jax.device_count() == 0 else {"mesh_shape": "1,1,1"}
    result = cli.run_trainer("reward", str(ROOT / "configs" / "quickstart_reward.yaml"),
                             {"max_steps": "40", "eval_strategy": "no", "disable_tqdm": "true",
                              "per_device_train_batch_size": per_device, **mesh})
    assert {"eval_loss", "eval_accuracy", "eval_margin", "eval_min_reward", "eval_mean_reward",
            "eval_max_reward"} <= set(result)
    assert result["eval_accuracy"] >= result["eval_accuracy_before"] + 0.1, result
    assert os.path.isfile(tmp_path / "outputs" / "quickstart-reward" / "model.safetensors")
    with open(tmp_path / "outputs" / "quickstart-reward" / "config.json") as f:
        assert json.load(f)["architectures"] == ["Qwen3ForSequenceClassification"]
