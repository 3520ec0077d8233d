"""GRPOTrainer against TRL 1.16's GRPOTrainer on the same tiny model, completions, rewards and weights.

The whole trainer path is checked: our trainer samples and scores a generation batch on ``builtin:tiny-qwen3``;
then TRL's own code runs on the same completions with the same weights loaded in PyTorch:
``GRPOTrainer._get_per_token_logps_and_entropies`` (TRL's fused LM head, temperature-scaled) for the policy and the
reference, and ``GRPOTrainer._compute_loss`` (a ``GRPOTrainer.__new__`` stand-in) for the loss, its metrics and,
through ``backward()``, the parameter gradient norm. Advantages are checked against TRL's
``_generate_and_score_completions`` driver from ``test_losses_grpo``. Built-in rewards are compared with
``trl.rewards``. The loop itself (train, metrics, completions table, save, exact resume) runs on the tiny model.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl import GRPOTrainer as TRLGRPOTrainer
from trl.trainer.utils import add_fused_lm_head

from trl_jax.assets import builtin_model_dir
from trl_jax.configs import GRPOConfig
from trl_jax.data.builtin import load_builtin_dataset
from trl_jax.losses.grpo import LOSS_TYPES
from trl_jax.models import save_pretrained
from trl_jax.rewards import (
    accuracy_reward,
    completion_text,
    get_soft_overlong_punishment,
    resolve_reward_funcs,
    think_format_reward,
)
from trl_jax.trainers.grpo import GRPOTrainer

MODEL = "builtin:tiny-qwen3"
TEMPERATURE = 0.9


def digit_reward(completions, answer, **kwargs):
    """Varied, deterministic: number of digits in the completion, +2 for an exact answer."""
    return [float(sum(ch.isdigit() for ch in completion_text(c))) + 2.0 * (completion_text(c).strip() == a)
            for c, a in zip(completions, answer, strict=True)]


def sometimes_none(completions, completion_ids, **kwargs):
    """Returns None for every third completion (NaN in the table), else a length-based reward."""
    return [None if i % 3 == 0 else len(ids) / 4.0 for i, ids in enumerate(completion_ids)]


def make_args(tmp, **kw):
    base = dict(output_dir=str(tmp), per_device_train_batch_size=1, num_generations=4, max_completion_length=6,
                temperature=TEMPERATURE, max_steps=2, logging_steps=1, save_strategy="no", learning_rate=1e-3,
                report_to="none", bf16=False, gradient_checkpointing=False, seed=3, disable_tqdm=True)
    base.update(kw)
    return GRPOConfig(**base)


def dataset(n=16):
    return load_builtin_dataset("arithmetic_prompts").select(range(n))


# ----------------------------------------------------------------------------------------------------------------
# TRL drivers
# ----------------------------------------------------------------------------------------------------------------


class _Acc:
    num_processes, process_index, is_main_process, sync_gradients = 1, 0, True, True
    device = torch.device("cpu")

    def autocast(self):
        return contextlib.nullcontext()

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    def gather_for_metrics(self, x):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def trl_stand_in(args, ga=1):
    tr = TRLGRPOTrainer.__new__(TRLGRPOTrainer)
    tr.loss_type = args.loss_type
    tr.epsilon_low = args.epsilon
    tr.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    tr.beta = args.beta
    tr.importance_sampling_level = args.importance_sampling_level
    tr.top_entropy_quantile = args.top_entropy_quantile
    tr.off_policy_mask_threshold = args.off_policy_mask_threshold
    tr.max_completion_length = args.max_completion_length
    tr.use_vllm = tr.vllm_importance_sampling_correction = False
    tr.entropy_coef = args.entropy_coef
    tr.use_adaptive_entropy = False
    tr._entropy_bonus_enabled = args.entropy_coef != 0.0
    tr.aux_loss_enabled = False
    tr.current_gradient_accumulation_steps = ga
    tr.accelerator = _Acc()
    tr.model = SimpleNamespace(training=True)
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr.args = args
    return tr


def torch_model(path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    add_fused_lm_head(m, temperature=TEMPERATURE, outputs=("log_probs", "entropy"))
    return m


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """One generation batch from our trainer + the same weights in PyTorch (policy and a perturbed reference)."""
    tmp = tmp_path_factory.mktemp("grpo_parity")
    args = make_args(tmp / "out", beta=0.04, reward_weights=[1.0, 0.5])
    tr = GRPOTrainer(MODEL, reward_funcs=[digit_reward, sometimes_none], args=args, train_dataset=dataset())
    tr._build(4)
    slices, gen_metrics = tr._generation(0)
    batch = {k: np.asarray(v) for k, v in slices[0].items()}
    params = tr.state.params
    # A reference different from the policy (so the KL term is not zero) and old log-probs different from the
    # current ones (so ratios are clipped): both are fed identically to TRL.
    ref_params = jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(1), x.shape, x.dtype), params)
    logps = np.asarray(jax.jit(lambda p, b: tr._token_logps(p, b))(params, batch))
    noise = np.random.default_rng(0).normal(0.0, 0.3, logps.shape).astype(np.float32)
    batch["old_per_token_logps"] = (logps + noise * batch["completion_mask"]).astype(np.float32)
    ref_dir = str(tmp / "ref")
    save_pretrained(tr.model, ref_params, ref_dir, tokenizer=tr.processing_class)
    return SimpleNamespace(tr=tr, batch=batch, params=params, ref_params=ref_params, gen_metrics=gen_metrics,
                           torch_policy=torch_model(builtin_model_dir(MODEL)), torch_ref=torch_model(ref_dir))


def trl_loss(p, args):
    """TRL's per-token log-probs (policy + reference) and ``_compute_loss`` on the trainer's generation batch."""
    b = p.batch
    c = b["completion_ids"].shape[1]
    ids = torch.tensor(b["input_ids"], dtype=torch.long)
    attn = torch.tensor(b["segment_ids"], dtype=torch.long)
    tr = trl_stand_in(args)
    with torch.no_grad():
        ref, _, _ = tr._get_per_token_logps_and_entropies(p.torch_ref, ids, attn, c)
    inputs = {
        "prompt_ids": ids[:, :-c], "prompt_mask": attn[:, :-c], "completion_ids": ids[:, -c:],
        "completion_mask": torch.tensor(b["completion_mask"], dtype=torch.long),
        "advantages": torch.tensor(b["advantages"]),
        "num_items_in_batch": torch.tensor(float(b["num_items_in_batch"][0])),
        "old_per_token_logps": torch.tensor(b["old_per_token_logps"]), "ref_per_token_logps": ref,
    }
    model = p.torch_policy
    model.zero_grad()
    loss = tr._compute_loss(model, inputs)
    loss.backward()
    grad_norm = math.sqrt(sum(float((q.grad.double() ** 2).sum()) for q in model.parameters() if q.grad is not None))
    metrics = {k: v[0] for k, v in tr._metrics["train"].items()}
    return float(loss.detach()), grad_norm, metrics


def ours_loss(p, args):
    tr = p.tr
    tr.args = args
    batch = {k: jnp.asarray(v) for k, v in p.batch.items()}

    def f(params):
        t = tr.loss_fn(params, batch, None, ref_params=p.ref_params)
        return t.numerator / t.denominator, t.metrics

    (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(p.params)
    grad_norm = math.sqrt(sum(float(jnp.sum(jnp.square(g))) for g in jax.tree.leaves(grads)))
    return float(loss), grad_norm, {k: float(v) for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------------------------------
# One GRPO step's loss == TRL's, every loss type
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_step_loss_matches_trl(parity, loss_type):
    extra = dict(epsilon_high=1.1) if loss_type == "cispo" else {}
    if loss_type == "dr_grpo":
        extra["top_entropy_quantile"] = 0.5  # exercise the entropy mask through the trainer too
    args = copy.copy(parity.tr.args)
    for k, v in {"loss_type": loss_type, **extra}.items():
        setattr(args, k, v)
    l_trl, g_trl, m_trl = trl_loss(parity, args)
    l, g, m = ours_loss(parity, args)
    np.testing.assert_allclose(l, l_trl, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(g, g_trl, rtol=2e-3, atol=1e-5)
    assert set(m_trl) <= set(m), (sorted(m_trl), sorted(m))
    for k in m_trl:
        np.testing.assert_allclose(m[k], m_trl[k], rtol=2e-3, atol=2e-5, err_msg=k)
    assert m_trl["kl"] > 0 and m_trl["entropy"] > 0


def test_generation_batch_advantages_and_metrics_match_trl(parity):
    """TRL's reward -> advantage code on our rewards: same advantages, same reward metrics, same names."""
    from test_losses_grpo import trl_generate_and_score

    tr = parity.tr
    rows = tr._rows_for_generation(0)
    # Re-score the generation exactly as the trainer did (same rng) to get the per-function rewards.
    rng = jax.random.fold_in(jax.random.PRNGKey(tr.args.seed + 1), 0)
    arrays, metrics, table = tr.generate_and_score(rows, parity.params, rng, num_generations=4)
    rewards = np.array([[np.nan if r[n] is None else r[n] for n in tr.reward_func_names] for r in table], np.float32)
    assert np.isnan(rewards[:, 1]).any() and not np.isnan(rewards[:, 0]).any()
    lengths = arrays["completion_mask"].sum(1)
    cids = [row[:n].tolist() for row, n in zip(arrays["completion_ids"], lengths)]
    out, trl_m = trl_generate_and_score(rewards, num_generations=4, reward_weights=[1.0, 0.5],
                                        completion_ids_list=cids)
    np.testing.assert_allclose(arrays["advantages"], out["advantages"].numpy(), rtol=1e-5, atol=1e-5)
    for k in ("reward", "reward_std", "frac_reward_zero_std"):
        np.testing.assert_allclose(metrics[k], trl_m[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for i, name in enumerate(tr.reward_func_names):
        np.testing.assert_allclose(metrics[f"rewards/{name}/mean"], trl_m[f"rewards/fn{i}/mean"], rtol=1e-5)
    # RepeatSampler order: each prompt num_generations times in a row; the trainer's slice is a shuffle of it.
    assert [r["prompt"] for r in rows[:4]] == [rows[0]["prompt"]] * 4
    assert metrics == parity.gen_metrics
    # The completions the reward functions saw are the sampled tokens, decoded.
    texts = tr.processing_class.batch_decode(cids, skip_special_tokens=True)
    assert [completion_text(r["completion"]) for r in table] == texts
    assert isinstance(table[0]["completion"], list) and table[0]["completion"][0]["role"] == "assistant"


# ----------------------------------------------------------------------------------------------------------------
# Buffering: steps_per_generation, num_iterations, old log-probs
# ----------------------------------------------------------------------------------------------------------------


def test_buffering_reuses_generations_and_tracks_old_logps(tmp_path):
    args = make_args(tmp_path, steps_per_generation=2, num_iterations=2, max_steps=4)
    tr = GRPOTrainer(MODEL, reward_funcs=digit_reward, args=args, train_dataset=dataset())
    # 8 rows per micro-batch x 2 slices = 16 completions = 4 prompts per generation; 16 prompts -> 4 generations,
    # each used for 2 x 2 micro-steps = 4 optimizer steps (GA=1): TRL's dataloader length.
    assert tr.generation_rows == 16 and tr.steps_per_epoch() == 16
    tr._build(4)
    calls = []
    orig = tr._generation
    tr._generation = lambda g: (calls.append(g), orig(g))[1]
    batches = [tr._batch_for_step(s) for s in range(5)]
    assert calls == [0, 1]  # steps 0-3 use generation 0 (2 slices x 2 iterations), step 4 starts generation 1
    np.testing.assert_array_equal(batches[0]["input_ids"], batches[2]["input_ids"])  # second iteration, slice 0
    assert not np.array_equal(batches[0]["input_ids"], batches[1]["input_ids"])
    # GA % (steps_per_generation * num_iterations) != 0 -> old log-probs from generation time (TRL's rule)
    assert "old_per_token_logps" in batches[0]
    assert math.isnan(tr._step_host_metrics["reward"]) is False
    tr._batch_for_step(5)
    assert math.isnan(tr._step_host_metrics["reward"])  # reuse step: generation metrics not logged again


# ----------------------------------------------------------------------------------------------------------------
# The loop: train, metrics, completions table, save, exact resume
# ----------------------------------------------------------------------------------------------------------------

GEN_METRICS = ("reward", "reward_std", "frac_reward_zero_std", "rewards/digit_reward/mean", "rewards/digit_reward/std",
               "completions/mean_length", "completions/min_length", "completions/max_length",
               "completions/clipped_ratio", "completions/mean_terminated_length",
               "completions/min_terminated_length", "completions/max_terminated_length")
LOSS_METRICS = ("loss", "grad_norm", "learning_rate", "entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max", "num_tokens")


def test_train_save_resume(tmp_path):
    kw = dict(max_steps=3, beta=0.02, lr_scheduler_type="constant", gradient_accumulation_steps=2, mask_truncated_completions=True)
    full = GRPOTrainer(MODEL, reward_funcs=digit_reward, args=make_args(tmp_path / "full", **kw),
                       train_dataset=dataset())
    full.train()
    logs = [r for r in full.log_history if "loss" in r]
    assert len(logs) == 3
    for rec in logs:
        for k in GEN_METRICS + LOSS_METRICS:
            assert k in rec and np.isfinite(rec[k]), (k, rec.get(k))
    table = [json.loads(x) for x in open(tmp_path / "full" / "completions.jsonl")]
    assert {r["step"] for r in table} == {1, 2, 3} and len(table) == 3 * 16
    assert {"prompt", "completion", "digit_reward", "advantage"} <= set(table[0])
    out = full.save_model(str(tmp_path / "full" / "model"))
    assert os.path.isfile(os.path.join(out, "model.safetensors"))

    # Interrupted run: checkpoint at step 2, then resume to step 3: same params as the uninterrupted run.
    part = GRPOTrainer(MODEL, reward_funcs=digit_reward,
                       args=make_args(tmp_path / "part", save_strategy="steps", save_steps=2, **kw),
                       train_dataset=dataset())
    part.args.max_steps = 2
    part.train()
    # a kill after step 3's completions were written but before its checkpoint: the resumed run rewrites them
    with open(tmp_path / "part" / "completions.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "prompt": "stale"}) + "\n")
    resumed = GRPOTrainer(MODEL, reward_funcs=digit_reward, args=make_args(tmp_path / "part", **kw),
                          train_dataset=dataset())
    resumed.train(resume_from_checkpoint=True)
    assert int(resumed.state.step) == 3
    table = [json.loads(x) for x in open(tmp_path / "part" / "completions.jsonl")]
    assert sorted(r["step"] for r in table) == [1] * 16 + [2] * 16 + [3] * 16
    assert all(r["prompt"] != "stale" for r in table)
    for a, b in zip(jax.tree.leaves(full.state.params), jax.tree.leaves(resumed.state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_reward_function_error_names_function_and_completion(tmp_path):
    def broken_reward(completions, **kwargs):
        out = []
        for c in completions:
            if completion_text(c) == completion_text(completions[-1]):
                raise KeyError("boom")
            out.append(0.0)
        return out

    tr = GRPOTrainer(MODEL, reward_funcs=[digit_reward, broken_reward], args=make_args(tmp_path),
                     train_dataset=dataset())
    with pytest.raises(RuntimeError, match=r"broken_reward.*KeyError.*boom.*completion 0"):
        tr.train()
    with pytest.raises(ValueError, match="at least one reward"):
        GRPOTrainer(MODEL, reward_funcs=[], args=make_args(tmp_path), train_dataset=dataset())
    with pytest.raises(ValueError, match="reward weights"):
        GRPOTrainer(MODEL, reward_funcs=[digit_reward], args=make_args(tmp_path, reward_weights=[1.0, 2.0]),
                    train_dataset=dataset())
    with pytest.raises(ValueError, match="prompt"):
        GRPOTrainer(MODEL, reward_funcs=[digit_reward], args=make_args(tmp_path),
                    train_dataset=dataset().rename_column("prompt", "question"))


# ----------------------------------------------------------------------------------------------------------------
# Built-in rewards against trl.rewards
# ----------------------------------------------------------------------------------------------------------------


def test_builtin_rewards_match_trl():
    from trl.rewards import get_soft_overlong_punishment as trl_soft
    from trl.rewards import think_format_reward as trl_think

    texts = ["<think>\nreason\n</think>\n42", "<think>a</think><think>b</think>x", "no think", "<think>open",
             "</think>x", "<think></think>"]
    comps = [[{"role": "assistant", "content": t}] for t in texts]
    assert think_format_reward(comps) == trl_think(comps)
    assert think_format_reward(texts) == trl_think(comps)
    ids = [[1] * n for n in (0, 3, 4, 5, 7, 8, 9, 12)]
    assert get_soft_overlong_punishment(8, 4)(completion_ids=ids) == trl_soft(8, 4)(completion_ids=ids)
    assert get_soft_overlong_punishment(8, 4).__name__ == trl_soft(8, 4).__name__
    # accuracy_reward (math_verify when installed) is checked against trl.rewards in test_rewards.py
    from trl_jax.rewards import exact_match_reward

    assert exact_match_reward(["7", " 7\n", "8", "<think>x</think>7"], answer=["7"] * 4) == [1.0, 1.0, 0.0, 1.0]
    assert exact_match_reward([[{"content": "12"}]], solution=["12"]) == [1.0]
    assert exact_match_reward(["1"], answer=[None]) == [None]
    with pytest.raises(ValueError, match="answer"):
        accuracy_reward(["1"])
    funcs = resolve_reward_funcs(["accuracy_reward", "think_format_reward", "test_trainer_grpo.digit_reward",
                                  "some/reward-model"])
    assert funcs[:2] == [accuracy_reward, think_format_reward] and funcs[2].__name__ == "digit_reward"
    assert funcs[3] == "some/reward-model"
    with pytest.raises(ValueError, match="dotted import path"):
        resolve_reward_funcs(["no_such_module_xyz.fn"])
