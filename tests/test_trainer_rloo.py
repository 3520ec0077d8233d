"""RLOOTrainer against TRL 1.16's RLOOTrainer on the same tiny model, completions, rewards and weights.

Our trainer samples and scores a generation batch on ``builtin:tiny-qwen3`` (policy and a perturbed reference, so
the KL in the reward is not zero). TRL's own ``RLOOTrainer._generate_and_score_completions`` then runs on the same
prompts and completions (a ``RLOOTrainer.__new__`` stand-in whose ``_generate`` returns our completions), with the
same weights loaded in PyTorch for its old and reference log-probs and the same reward functions: same advantages
and generation metrics. ``RLOOTrainer._compute_loss`` on our generation batch gives the loss, its metrics and,
through ``backward()``, the gradient norm. The loop (train, metrics, completions table, save, exact resume) runs on
the tiny model. The GRPO parity test's stand-ins (accelerator, PyTorch model loader, reward functions) are reused.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections import defaultdict, deque
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from test_trainer_grpo import MODEL, TEMPERATURE, _Acc, dataset, digit_reward, sometimes_none, torch_model
from trl import RLOOTrainer as TRLRLOOTrainer

from trl_jax.assets import builtin_model_dir
from trl_jax.configs import RLOOConfig
from trl_jax.losses.rloo import rloo_advantages
from trl_jax.models import save_pretrained
from trl_jax.trainers.rloo import RLOOTrainer

G = 4


def make_args(tmp, **kw):
    base = dict(output_dir=str(tmp), per_device_train_batch_size=1, num_generations=G, max_completion_length=6,
                temperature=TEMPERATURE, max_steps=2, logging_steps=1, save_strategy="no", learning_rate=1e-3,
                report_to="none", bf16=False, gradient_checkpointing=False, seed=3, disable_tqdm=True)
    base.update(kw)
    return RLOOConfig(**base)


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """One generation batch from our trainer (KL to a perturbed reference in the reward) + the same weights in
    PyTorch."""
    tmp = tmp_path_factory.mktemp("rloo_parity")
    args = make_args(tmp / "out", beta=0.5, reward_weights=[1.0, 0.5])
    tr = RLOOTrainer(MODEL, reward_funcs=[digit_reward, sometimes_none], args=args, train_dataset=dataset())
    tr._build(4)
    params = tr.state.params
    ref_params = jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(1), x.shape, x.dtype), params)
    tr.state = tr.state.replace(ref_params=ref_params)
    rows = tr._rows_for_generation(0)
    rng = jax.random.fold_in(jax.random.PRNGKey(args.seed + 1), 0)
    arrays, metrics, table = tr.generate_and_score(rows, params, rng, num_generations=G)
    ref_dir = str(tmp / "ref")
    save_pretrained(tr.model, ref_params, ref_dir, tokenizer=tr.processing_class)
    return SimpleNamespace(tr=tr, rows=rows, arrays=arrays, metrics=metrics, table=table, params=params,
                           torch_policy=torch_model(builtin_model_dir(MODEL)), torch_ref=torch_model(ref_dir))


# ----------------------------------------------------------------------------------------------------------------
# Advantages and generation metrics == TRL's _generate_and_score_completions
# ----------------------------------------------------------------------------------------------------------------


def trl_generate_and_score(p, args, reward_funcs=(digit_reward, sometimes_none)):
    """TRL's ``_generate_and_score_completions`` on our prompts and completions (its old and reference log-probs
    from the PyTorch weights, its ``_calculate_rewards`` with our reward functions)."""
    a = p.arrays
    lengths = a["completion_mask"].sum(1)
    plen = p.tr.prompt_length
    prompt_mask = a["segment_ids"][:, :plen]
    prompt_ids_list = [row[m.astype(bool)].tolist() for row, m in zip(a["input_ids"][:, :plen], prompt_mask)]
    completion_ids_list = [row[:n].tolist() for row, n in zip(a["completion_ids"], lengths)]
    tr = TRLRLOOTrainer.__new__(TRLRLOOTrainer)
    tr.accelerator = Accelerator(cpu=True)
    p.torch_policy.eval()
    tr.model = p.torch_policy  # eval mode: TRL logs under "eval" and uses num_generations_eval
    tr.ref_model = p.torch_ref
    tr._tokenizer = SimpleNamespace(pad_token_id=p.tr.pad_token_id)
    tr.eos_token_ids = p.tr.eos_token_ids
    tr.pad_to_multiple_of = None
    tr.mask_truncated_completions = args.mask_truncated_completions
    tr.args = SimpleNamespace(per_device_train_batch_size=len(p.rows), per_device_eval_batch_size=len(p.rows),
                              gradient_checkpointing_kwargs=None, report_to=[])
    tr.beta = args.beta
    tr.num_generations = tr.num_generations_eval = args.num_generations
    tr.reward_funcs = list(reward_funcs)
    tr.reward_func_names = p.tr.reward_func_names
    tr.reward_processing_classes = [None] * len(reward_funcs)
    tr.reward_weights = torch.tensor(args.reward_weights, dtype=torch.float32)
    tr.reward_clip_range = args.reward_clip_range
    tr.normalize_advantages = args.normalize_advantages
    tr.state = SimpleNamespace(global_step=0)
    tr.log_multimodal = False
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr._logs = {"images": deque(), "prompt": deque(), "completion": deque(), "rewards": defaultdict(deque),
                "advantages": deque(), "extra": defaultdict(deque)}
    tr._pending_extra_logs = defaultdict(list)
    tr._pending_metrics = defaultdict(list)
    completions = [r["completion"] for r in p.table]
    tr._generate = lambda prompts: (prompt_ids_list, completion_ids_list, completions)
    out = tr._generate_and_score_completions(p.rows)
    return out, {k: v[0] for k, v in tr._metrics["eval"].items() if v}


@pytest.mark.parametrize("options", [{}, {"normalize_advantages": True, "reward_clip_range": (1.0, 3.0)}])
def test_generation_batch_advantages_and_metrics_match_trl(parity, options):
    args = copy.copy(parity.tr.args)
    for k, v in options.items():
        setattr(args, k, v)
    tr = parity.tr
    tr.args = args
    rng = jax.random.fold_in(jax.random.PRNGKey(args.seed + 1), 0)
    arrays, metrics, table = tr.generate_and_score(parity.rows, parity.params, rng, num_generations=G)
    np.testing.assert_array_equal(arrays["completion_ids"], parity.arrays["completion_ids"])
    rewards = np.array([[np.nan if r[n] is None else r[n] for n in tr.reward_func_names] for r in table], np.float32)
    assert np.isnan(rewards[:, 1]).any() and not np.isnan(rewards[:, 0]).any()
    out, trl_m = trl_generate_and_score(parity, args)
    np.testing.assert_allclose(arrays["advantages"], out["advantages"].numpy(), rtol=1e-4, atol=1e-4)
    assert metrics["kl"] != 0.0
    for k, v in trl_m.items():
        np.testing.assert_allclose(metrics[k], v, rtol=1e-4, atol=1e-5, err_msg=k)
    # Without the KL, the advantages are exactly the pure function of the rewards.
    adv, m = rloo_advantages(rewards, args.reward_weights, num_generations=G, beta=0.0,
                             reward_clip_range=args.reward_clip_range,
                             normalize_advantages=args.normalize_advantages)
    assert np.all(np.isfinite(np.asarray(adv))) and "kl" not in m
    # The sequence KL enters the reward: the advantages with beta differ from those without.
    assert not np.allclose(np.asarray(adv), arrays["advantages"], atol=1e-6)


def test_leave_one_out_edge_cases_match_trl(parity):
    """Unscorable rows, a group with one scorable completion, equal rewards: TRL's driver on fixed rewards."""
    r = np.array([[1.0, np.nan], [np.nan, np.nan], [np.nan, np.nan], [np.nan, np.nan],
                  [2.0, 1.0], [2.0, 1.0], [2.0, 1.0], [2.0, 1.0],
                  [0.5, np.nan], [3.0, 2.0], [np.nan, 4.0], [1.0, 1.0]], np.float32)
    n = len(r)

    def column(i):
        def fn(prompts, completions, completion_ids, **kwargs):
            return [None if math.isnan(v) else float(v) for v in r[:, i]]
        return fn

    args = SimpleNamespace(beta=0.0, num_generations=G, mask_truncated_completions=False, reward_weights=[1.0, 2.0],
                           reward_clip_range=None, normalize_advantages=True)
    p = SimpleNamespace(
        tr=SimpleNamespace(prompt_length=2, pad_token_id=0, eos_token_ids=[5], reward_func_names=["a", "b"]),
        rows=[{"prompt": "p"}] * n, torch_policy=parity.torch_policy, torch_ref=None,
        table=[{"completion": "c"}] * n,
        arrays={"input_ids": np.full((n, 3), 7), "segment_ids": np.ones((n, 3), np.int64),
                "completion_ids": np.full((n, 1), 5), "completion_mask": np.ones((n, 1), np.int64)})
    out, trl_m = trl_generate_and_score(p, args, reward_funcs=(column(0), column(1)))
    adv, m = rloo_advantages(r, [1.0, 2.0], num_generations=G, normalize_advantages=True,
                             reward_func_names=["a", "b"])
    np.testing.assert_allclose(np.asarray(adv), out["advantages"].numpy(), rtol=1e-5, atol=1e-6)
    assert set(trl_m) == set(m), (sorted(trl_m), sorted(m))
    for k in trl_m:
        np.testing.assert_allclose(float(m[k]), trl_m[k], rtol=1e-5, atol=1e-6, err_msg=k)


# ----------------------------------------------------------------------------------------------------------------
# One step's loss, gradient and metrics == TRL's _compute_loss
# ----------------------------------------------------------------------------------------------------------------


def _loss_batch(p):
    b = {k: np.asarray(v) for k, v in p.arrays.items()}
    logps = np.asarray(jax.jit(lambda q, x: p.tr._token_logps(q, x))(p.params, b))
    noise = np.random.default_rng(0).normal(0.0, 0.15, logps.shape).astype(np.float32)
    b["old_per_token_logps"] = (logps + noise * b["completion_mask"]).astype(np.float32)
    return b


def trl_loss(p, batch, args):
    c = batch["completion_ids"].shape[1]
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    attn = torch.tensor(batch["segment_ids"], dtype=torch.long)
    mask = torch.tensor(batch["completion_mask"], dtype=torch.long)
    tr = TRLRLOOTrainer.__new__(TRLRLOOTrainer)
    tr.epsilon_low = args.epsilon
    tr.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    tr.aux_loss_enabled = False
    tr.accelerator = _Acc()
    tr.model = SimpleNamespace(training=True)
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    inputs = {"prompt_ids": ids[:, :-c], "prompt_mask": attn[:, :-c], "completion_ids": ids[:, -c:],
              "completion_mask": mask, "advantages": torch.tensor(batch["advantages"]),
              "old_logps": (torch.tensor(batch["old_per_token_logps"]) * mask).sum(1)}
    model = p.torch_policy
    model.zero_grad()
    loss = tr._compute_loss(model, inputs)
    loss.backward()
    grad_norm = math.sqrt(sum(float((q.grad.double() ** 2).sum()) for q in model.parameters() if q.grad is not None))
    return float(loss.detach()), grad_norm, {k: v[0] for k, v in tr._metrics["train"].items()}


def ours_loss(p, batch, args):
    tr = p.tr
    tr.args = args
    jb = {k: jnp.asarray(v) for k, v in batch.items()}

    def f(params):
        t = tr.loss_fn(params, jb, None)
        return t.numerator / t.denominator, t.metrics

    (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(p.params)
    grad_norm = math.sqrt(sum(float(jnp.sum(jnp.square(g))) for g in jax.tree.leaves(grads)))
    return float(loss), grad_norm, {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("eps", [dict(epsilon=0.2), dict(epsilon=0.1, epsilon_high=0.3)])
def test_step_loss_matches_trl(parity, eps):
    args = copy.copy(parity.tr.args)
    for k, v in eps.items():
        setattr(args, k, v)
    batch = _loss_batch(parity)
    l_trl, g_trl, m_trl = trl_loss(parity, batch, args)
    l, g, m = ours_loss(parity, batch, args)
    np.testing.assert_allclose(l, l_trl, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(g, g_trl, rtol=2e-3, atol=1e-5)
    assert set(m_trl) <= set(m), (sorted(m_trl), sorted(m))
    for k in m_trl:
        np.testing.assert_allclose(m[k], m_trl[k], rtol=2e-3, atol=2e-5, err_msg=k)
    assert m_trl["entropy"] > 0 and m_trl["clip_ratio/region_mean"] > 0  # the clipped branch is exercised


# ----------------------------------------------------------------------------------------------------------------
# The loop: train, metrics, completions table, save, exact resume
# ----------------------------------------------------------------------------------------------------------------

GEN_METRICS = ("reward", "reward_std", "frac_reward_zero_std", "rewards/digit_reward/mean", "rewards/digit_reward/std",
               "kl", "completions/mean_length", "completions/clipped_ratio")
LOSS_METRICS = ("loss", "grad_norm", "learning_rate", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max", "num_tokens")


def test_train_save_resume(tmp_path):
    kw = dict(max_steps=3, beta=0.05, lr_scheduler_type="constant", gradient_accumulation_steps=2,
              normalize_advantages=True)
    full = RLOOTrainer(MODEL, reward_funcs=digit_reward, args=make_args(tmp_path / "full", **kw),
                       train_dataset=dataset())
    full.train()
    logs = [r for r in full.log_history if "loss" in r]
    assert len(logs) == 3
    for rec in logs:
        for k in GEN_METRICS + LOSS_METRICS:
            assert k in rec and np.isfinite(rec[k]), (k, rec.get(k))
    table = [json.loads(x) for x in open(tmp_path / "full" / "completions.jsonl")]
    assert {r["step"] for r in table} == {1, 2, 3} and {"digit_reward", "advantage"} <= set(table[0])
    out = full.save_model(str(tmp_path / "full" / "model"))
    assert os.path.isfile(os.path.join(out, "model.safetensors"))

    part = RLOOTrainer(MODEL, reward_funcs=digit_reward,
                       args=make_args(tmp_path / "part", save_strategy="steps", save_steps=2, **kw),
                       train_dataset=dataset())
    part.args.max_steps = 2
    part.train()
    resumed = RLOOTrainer(MODEL, reward_funcs=digit_reward, args=make_args(tmp_path / "part", **kw),
                          train_dataset=dataset())
    resumed.train(resume_from_checkpoint=True)
    assert int(resumed.state.step) == 3
    for a, b in zip(jax.tree.leaves(full.state.params), jax.tree.leaves(resumed.state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_config_checks():
    with pytest.raises(ValueError, match="at least 2 generations"):
        RLOOConfig(bf16=False, num_generations=1, per_device_train_batch_size=2, mesh_shape=(1, 1, -1))
    with pytest.raises(ValueError, match="reward_clip_range"):
        RLOOConfig(bf16=False, reward_clip_range=(2.0, 1.0), mesh_shape=(1, 1, -1), per_device_train_batch_size=2)
