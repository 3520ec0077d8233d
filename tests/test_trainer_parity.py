"""Loss-curve parity of trl_jax's SFT / DPO / KTO trainers with TRL's trainers (short version).

The same tiny random ``Qwen3ForCausalLM`` saved with ``save_pretrained`` is trained by TRL (torch, CPU) and by
trl_jax (one-device mesh) on the same rows in the same order with the same hyperparameters; every per-step
``log_history`` entry (loss, grad_norm, learning_rate, num_tokens and each trainer's metrics) must agree within
1e-3 relative (1e-6 absolute near zero), and both sides must log the same metric names. The 20-step version over
more cases is ``benchmarks/parity_trainers.py``.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

_BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "parity_trainers.py"
_spec = importlib.util.spec_from_file_location("parity_trainers", _BENCH)
pt = sys.modules.setdefault("parity_trainers", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(pt)

STEPS = 5
RTOL = 1e-3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return pt.make_model_dir(str(tmp_path_factory.mktemp("parity") / "model"))


_RUNS: dict = {}


def _run(name, model_dir, tmp_path_factory):
    """Both trainers' per-step logs for case ``name`` (cached: a case runs once per session)."""
    if name not in _RUNS:
        case = pt.CASES[name]
        ds = pt.make_dataset(case.kind, pt.rows_needed(case, STEPS))
        out = tmp_path_factory.mktemp(name)
        trl_logs = pt.run_trl(case, model_dir, ds, STEPS, str(out / "trl"))
        jax_logs = pt.run_jax(case, model_dir, ds, STEPS, str(out / "jax"),
                              mesh_shape=None if name.endswith("-dp") else (1, 1, 1))
        _RUNS[name] = (trl_logs, jax_logs)
    return _RUNS[name]


def _assert_parity(trl_logs, jax_logs, from_step2=()):
    """Same steps, same metric names, every value within RTOL. Keys in ``from_step2`` are compared from step 2."""
    assert len(trl_logs) == len(jax_logs) == STEPS
    cmp = pt.compare(trl_logs, jax_logs, rtol=RTOL)
    assert cmp.only_trl == [] and cmp.only_jax == [], (cmp.only_trl, cmp.only_jax)
    later = pt.compare(trl_logs[1:], jax_logs[1:], rtol=RTOL)
    errors = {k: (later if k in from_step2 else cmp).max_rel[k] for k in cmp.max_rel}
    bad = {k: (v, cmp.curves[k]) for k, v in errors.items() if not v <= RTOL}
    assert not bad, bad
    # The run must actually move (a parity test on a frozen model would prove little).
    losses = cmp.curves["loss"][0]
    assert max(abs(x - losses[0]) for x in losses) > 1e-3 * abs(losses[0]), losses
    return cmp


def test_sft_adamw_grad_accumulation_parity(model_dir, tmp_path_factory):
    # AdamW, weight decay, gradient_accumulation_steps=2: TRL normalises by num_items_in_batch over both
    # micro-batches; trl_jax by the summed token counts.
    cmp = _assert_parity(*_run("sft-adamw-ga2", model_dir, tmp_path_factory))
    assert {"loss", "grad_norm", "learning_rate", "entropy", "mean_token_accuracy", "num_tokens"} <= set(cmp.max_rel)


def test_sft_sgd_linear_warmup_parity(model_dir, tmp_path_factory):
    trl_logs, jax_logs = _run("sft-adamw", model_dir, tmp_path_factory)  # linear schedule, 3 warmup steps
    _assert_parity(trl_logs, jax_logs)
    trl_logs, jax_logs = _run("sft-sgd", model_dir, tmp_path_factory)
    _assert_parity(trl_logs, jax_logs)


def test_sft_data_parallel_parity(model_dir, tmp_path_factory):
    # trl_jax on its default mesh over every device (8 simulated CPU devices under the suite's XLA_FLAGS): the
    # global batch of 8 sharded over the data axis must give TRL's single-process numbers.
    _assert_parity(*_run("sft-adamw-dp", model_dir, tmp_path_factory))


def test_dpo_adamw_parity(model_dir, tmp_path_factory):
    cmp = _assert_parity(*_run("dpo-adamw", model_dir, tmp_path_factory))
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "logits/chosen", "logits/rejected"} <= set(cmp.max_rel)


# At step 1 policy == reference: TRL's rewards are exactly 0, so rewards/accuracies (a strict >) is 0.0. trl_jax
# must tie exactly too (one computation for both while the weights are equal), not by luck of XLA's rounding.
def test_dpo_step1_rewards_accuracies_tie(model_dir, tmp_path_factory):
    trl_logs, jax_logs = _run("dpo-adamw", model_dir, tmp_path_factory)
    assert trl_logs[0]["rewards/margins"] == 0.0
    assert jax_logs[0]["rewards/margins"] == 0.0
    assert jax_logs[0]["rewards/chosen"] == 0.0 and jax_logs[0]["rewards/rejected"] == 0.0
    assert jax_logs[0]["rewards/accuracies"] == trl_logs[0]["rewards/accuracies"]


def test_kto_adamw_parity(model_dir, tmp_path_factory):
    cmp = _assert_parity(*_run("kto-adamw", model_dir, tmp_path_factory))
    assert {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(
        cmp.max_rel)
