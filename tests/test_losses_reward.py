"""trl_jax.losses.reward against TRL 1.16's own ``RewardTrainer.compute_loss``.

TRL is driven on a stand-in trainer (``RewardTrainer.__new__`` plus the attributes ``compute_loss`` reads) whose
"model" returns fixed ``logits [2B, 1]`` (chosen rows, then rejected rows, as TRL's collator lays them out). The
same rewards go through ``reward_loss``; loss, every logged metric and the gradient w.r.t. the rewards (torch
autograd vs ``jax.grad``) must agree to 1e-5, with and without a ``margin`` column and ``center_rewards_coefficient``.
"""

from __future__ import annotations

import os
import types
from collections import defaultdict

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.trainer.reward_trainer import RewardTrainer

from trl_jax.losses.reward import reward_loss

B = 6
TOL = dict(rtol=1e-5, atol=1e-5)


def make_rewards(seed: int = 0, ties: bool = True):
    rng = np.random.RandomState(seed)
    chosen = rng.normal(0.3, 1.5, B).astype(np.float32)
    rejected = rng.normal(-0.2, 1.5, B).astype(np.float32)
    if ties:
        rejected[1] = chosen[1]  # a tie is not an accurate pair (strict >)
    margin = rng.uniform(0.0, 2.0, B).astype(np.float32)
    return chosen, rejected, margin


class _FixedModel(torch.nn.Module):  # a Module: accelerate inspects it when peft is installed
    training = True

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def __call__(self, **kwargs):
        assert kwargs.get("use_cache") is False
        return types.SimpleNamespace(logits=self.logits)


class _Accelerator:
    @staticmethod
    def gather(x):
        return x

    @staticmethod
    def gather_for_metrics(x):
        return x


def trl_reward(chosen, rejected, margin=None, coef=None, training=True):
    """Loss, metrics and d loss / d rewards ([2B]) from TRL's ``compute_loss``."""
    trainer = RewardTrainer.__new__(RewardTrainer)
    trainer.args = types.SimpleNamespace(center_rewards_coefficient=coef)
    trainer.accelerator = _Accelerator()
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    leaf = torch.tensor(np.concatenate([chosen, rejected])[:, None], requires_grad=True)
    trainer.model = _FixedModel(leaf)
    trainer.model.training = training
    n = 2 * len(chosen)
    inputs = {"input_ids": torch.ones(n, 5, dtype=torch.long), "attention_mask": torch.ones(n, 5, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = torch.tensor(margin)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    mode = "train" if training else "eval"
    metrics = {k: v[-1] for k, v in trainer._metrics[mode].items()}
    return loss.item(), metrics, leaf.grad.numpy()[:, 0]


def ours(chosen, rejected, margin=None, coef=None, example_mask=None):
    def f(c, r):
        t = reward_loss(c, r, margin=None if margin is None else jnp.asarray(margin),
                        center_rewards_coefficient=coef, example_mask=example_mask)
        return t.loss, t.metrics

    (loss, metrics), (gc, gr) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
        jnp.asarray(chosen), jnp.asarray(rejected))
    return float(loss), {k: float(v) for k, v in metrics.items()}, np.concatenate([gc, gr])


@pytest.mark.parametrize("use_margin", [False, True], ids=["no-margin", "margin"])
@pytest.mark.parametrize("coef", [None, 0.01, 0.5], ids=["no-center", "center-0.01", "center-0.5"])
def test_loss_metrics_and_gradients_equal_trl(use_margin, coef):
    chosen, rejected, margin = make_rewards(seed=int(use_margin) + (0 if coef is None else 3))
    margin = margin if use_margin else None
    t_loss, t_metrics, t_grad = trl_reward(chosen, rejected, margin, coef)
    o_loss, o_metrics, o_grad = ours(chosen, rejected, margin, coef)
    np.testing.assert_allclose(o_loss, t_loss, **TOL)
    # TRL also logs the running `num_tokens` (a trainer counter, not a loss metric)
    assert set(t_metrics) - {"num_tokens"} == set(o_metrics)
    for k, v in o_metrics.items():
        np.testing.assert_allclose(v, t_metrics[k], **TOL, err_msg=k)
    np.testing.assert_allclose(o_grad, t_grad, **TOL)


def test_metric_names_equal_trls_in_eval_mode_too():
    chosen, rejected, _ = make_rewards(seed=7)
    _, t_metrics, _ = trl_reward(chosen, rejected, training=False)
    _, o_metrics, _ = ours(chosen, rejected)
    assert set(t_metrics) == set(o_metrics) | {"num_tokens"}
    for k, v in o_metrics.items():
        np.testing.assert_allclose(v, t_metrics[k], **TOL, err_msg=k)


def test_padding_pairs_are_ignored():
    """Pairs flagged 0 in ``example_mask`` change nothing: loss, metrics and gradients equal TRL on the real pairs
    alone (the padded pairs get zero gradient)."""
    chosen, rejected, margin = make_rewards(seed=11)
    keep = np.array([1, 1, 0, 1, 0, 1], bool)
    real = keep.nonzero()[0]
    pad_c, pad_r = chosen.copy(), rejected.copy()
    pad_c[~keep], pad_r[~keep] = 50.0, -80.0  # would dominate min/max/mean if counted
    o_loss, o_metrics, o_grad = ours(pad_c, pad_r, margin, 0.1, example_mask=jnp.asarray(keep))
    t_loss, t_metrics, t_grad = trl_reward(chosen[real], rejected[real], margin[real], 0.1)
    np.testing.assert_allclose(o_loss, t_loss, **TOL)
    for k, v in o_metrics.items():
        np.testing.assert_allclose(v, t_metrics[k], **TOL, err_msg=k)
    n = len(real)
    np.testing.assert_allclose(o_grad[real], t_grad[:n], **TOL)
    np.testing.assert_allclose(o_grad[len(keep) + real], t_grad[n:], **TOL)
    np.testing.assert_array_equal(o_grad[~np.concatenate([keep, keep])], 0.0)


def test_all_padding_batch_is_zero_loss_and_nan_metrics():
    z = jnp.zeros(3)
    t = reward_loss(z, z, example_mask=jnp.zeros(3, bool))
    assert float(t.loss) == 0.0 and float(t.denominator) == 0.0
    assert all(np.isnan(float(v)) for v in t.metrics.values())
