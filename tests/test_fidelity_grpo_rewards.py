"""GRPO reward tables against TRL 1.16's ``GRPOTrainer._calculate_rewards``: None and NaN alike (NaN in the
table, nansum across functions), TRL's warning when no function scores a completion, and infinite rewards refused."""

from __future__ import annotations

import logging
import math
import types

import numpy as np
import pytest
import torch
from accelerate import PartialState
from trl.trainer.grpo_trainer import GRPOTrainer as TRLGRPOTrainer

from trl_jax.losses.grpo import grpo_advantages
from trl_jax.trainers.grpo import GRPOTrainer

PROMPTS = ["p0", "p0", "p1", "p1"]
COMPLETIONS = ["7", "8", "x", "12"]
ANSWERS = ["7", "7", "3", "12"]


def f_none(prompts, completions, answer, **kw):
    return [1.0 if c == a else None if c == "x" else 0.0 for c, a in zip(completions, answer)]


def f_nan(prompts, completions, answer, **kw):
    return [float("nan") if c in ("x", "8") else 0.5 * len(c) for c, a in zip(completions, answer)]


def _trl_rewards(funcs):
    PartialState()  # accelerate's logger (TRL's warning) needs it
    t = TRLGRPOTrainer.__new__(TRLGRPOTrainer)
    t.reward_funcs = funcs
    t.reward_processing_classes = [None] * len(funcs)
    t.reward_func_names = [f.__name__ for f in funcs]
    t.accelerator = types.SimpleNamespace(device=torch.device("cpu"), is_main_process=True)
    t.state = types.SimpleNamespace(global_step=0)
    t.args = types.SimpleNamespace(report_to=[])
    t._log_completion_extra = t._log_metric = lambda *a: None
    t.environments = None
    inputs = [{"prompt": p, "completion": c, "answer": a} for p, c, a in zip(PROMPTS, COMPLETIONS, ANSWERS)]
    return t._calculate_rewards(inputs, PROMPTS, COMPLETIONS, [[1]] * len(PROMPTS)).numpy()


def _our_trainer(funcs):
    t = GRPOTrainer.__new__(GRPOTrainer)
    t.reward_funcs = funcs
    t.reward_func_names = [f.__name__ for f in funcs]
    t.trainer_state = None
    t._user_metrics = {}
    return t


def _our_rewards(funcs):
    rows = [{"prompt": p, "prompt_ids": [1], "answer": a} for p, a in zip(PROMPTS, ANSWERS)]
    return _our_trainer(funcs)._calculate_rewards(rows, PROMPTS, COMPLETIONS, [[1]] * len(PROMPTS))


def test_none_and_nan_rewards_match_trl(capsys, caplog):
    funcs = [f_none, f_nan]
    with caplog.at_level(logging.WARNING):
        expected = _trl_rewards(funcs)
    got = _our_rewards(funcs)
    np.testing.assert_array_equal(got, expected)  # NaN where None or NaN was returned, in the same places
    assert np.isnan(got[2]).all()  # completion "x": no function scores it
    trl_warning = next(r.getMessage() for r in caplog.records if "All reward functions returned None" in r.getMessage())
    ours = capsys.readouterr().err
    assert trl_warning.split("] ", 1)[-1] in ours  # TRL's text, after its "[RANK 0] " prefix
    assert "'completion': 'x'" in ours and "'answer': '3'" in ours
    # nansum across functions; the unscorable completion gets advantage 0 (grpo_advantages is checked against
    # TRL's advantage code in test_losses_grpo.py)
    adv, metrics = grpo_advantages(got, num_generations=2)
    assert float(adv[2]) == 0.0 and np.isfinite(np.asarray(adv)).all()
    np.testing.assert_allclose(float(metrics["reward"]), np.mean([1.0 + 0.5, 0.0, 1.0 + 1.0]), rtol=1e-6)


def test_nan_reward_is_treated_like_none():
    def f_none_only(prompts, completions, answer, **kw):
        return [None if c in ("x", "8") else 0.5 * len(c) for c in completions]

    f_none_only.__name__ = "f_nan"
    np.testing.assert_array_equal(_our_rewards([f_none, f_nan]), _our_rewards([f_none, f_none_only]))


@pytest.mark.parametrize("bad", [math.inf, -math.inf])
def test_infinite_reward_names_function_and_completion(bad):
    def overflow(prompts, completions, **kw):
        return [bad if c == "12" else 1.0 for c in completions]

    with pytest.raises(ValueError, match=r"Reward function 'overflow' returned -?inf for completion 3: '12' "
                                         r"\(prompt: 'p1'\).*must be finite"):
        _our_rewards([f_none, overflow])
