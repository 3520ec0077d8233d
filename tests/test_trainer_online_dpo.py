"""OnlineDPOTrainer against TRL 1.16's ``trl.experimental.online_dpo.OnlineDPOTrainer`` on the same completions.

Completions are sampled by our trainer from ``builtin:tiny-qwen3``, then fixed (EOS placed where the case needs it
and cut with TRL's own ``truncate_right``). TRL's real ``training_step`` runs on a ``OnlineDPOTrainer.__new__``
stand-in whose ``_generate`` returns exactly those tokens, with the same weights in PyTorch (policy, and a perturbed
reference) and the same reward functions / weights / ``missing_eos_penalty``: its loss, the gradient norm after its
``backward()`` and its ``stats`` are compared with our ``build_pairs`` + ``loss_fn``. TRL's ``_forward`` prompt
truncation (``max_length``) is exercised. The loop (reward functions and a judge, beta per epoch, save + exact
resume) runs on the tiny model.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.experimental.online_dpo import OnlineDPOTrainer as TRLOnlineDPOTrainer
from trl.experimental.utils import truncate_right

from trl_jax.assets import builtin_model_dir
from trl_jax.configs import OnlineDPOConfig
from trl_jax.data.builtin import load_builtin_dataset
from trl_jax.models import save_pretrained
from trl_jax.rewards import completion_text
from trl_jax.trainers.grpo import _left_pad
from trl_jax.trainers.online_dpo import OnlineDPOTrainer, preferred_first, render_for_judge

MODEL = "builtin:tiny-qwen3"
N = 8  # prompts per micro-batch: per_device_train_batch_size=1 x 8 simulated devices


def digit_reward(completions, answer, **kwargs):
    """Coarse (ties happen, exercising TRL's >= rule): digit count // 2, +2 for the exact answer."""
    return [float(sum(ch.isdigit() for ch in completion_text(c)) // 2) + 2.0 * (completion_text(c).strip() == a)
            for c, a in zip(completions, answer, strict=True)]


def vowel_reward(completions, trainer_state=None, **kwargs):
    assert trainer_state is not None  # TRL passes the trainer state to reward functions
    return [None if i == 3 else float(sum(ch in "aeiouAEIOU" for ch in completion_text(c)))
            for i, c in enumerate(completions)]


def make_args(tmp, **kw):
    base = dict(output_dir=str(tmp), per_device_train_batch_size=1, max_new_tokens=6, max_steps=2, logging_steps=1,
                save_strategy="no", learning_rate=1e-3, report_to="none", bf16=False, gradient_checkpointing=False,
                seed=3, disable_tqdm=True)
    base.update(kw)
    return OnlineDPOConfig(**base)


def dataset(n=16):
    return load_builtin_dataset("arithmetic_prompts").select(range(n))


# ----------------------------------------------------------------------------------------------------------------
# TRL driver: the real `training_step` on a stand-in
# ----------------------------------------------------------------------------------------------------------------


class _Acc:
    num_processes, process_index, is_main_process = 1, 0, True
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def backward(self, loss, **kwargs):
        loss.backward()

    def autocast(self):
        return contextlib.nullcontext()


STATS = ("objective/kl", "objective/entropy", "objective/non_score_reward", "rewards/chosen", "rewards/rejected",
         "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "val/contain_eos_token", "beta",
         "objective/rlhf_reward", "objective/scores_margin", "objective/scores")
PADDING_SUMS = ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward")


def trl_step(p, gen, loss_type, beta):
    """TRL's ``training_step`` on the fixed generation ``gen``: (loss, grad norm, stats)."""
    tr = TRLOnlineDPOTrainer.__new__(TRLOnlineDPOTrainer)
    a = p.tr.args
    tr.args = SimpleNamespace(use_vllm=False, missing_eos_penalty=a.missing_eos_penalty, loss_type=loss_type,
                              torch_empty_cache_steps=None, optim="adamw_torch", n_gpu=1, gradient_accumulation_steps=1)
    # TRL's generate output: prompts left-padded to the batch's longest, the block as wide as the longest completion.
    plen = int(gen["prompt_mask"].sum(1).max())
    width = int(gen["completion_mask"].sum(1).max())
    pid = torch.tensor(np.concatenate([gen["prompt_ids"]] * 2)[:, -plen:], dtype=torch.long)
    pmask = torch.tensor(np.concatenate([gen["prompt_mask"]] * 2)[:, -plen:], dtype=torch.long)
    cid = torch.tensor(gen["completion_ids"][:, :width], dtype=torch.long)
    cmask = torch.tensor(gen["completion_mask"][:, :width], dtype=torch.long)
    tr._generate = lambda model, prompts, images=None: (pid, pmask, cid, cmask, None)
    tr.eos_token_ids = p.tr.eos_token_ids
    tr.max_length = a.max_length
    tr.ref_model = p.torch_ref
    tr.processing_class = p.tr.processing_class
    tr.reward_funcs = [digit_reward, vowel_reward]
    tr.reward_processing_classes = [None, None]
    tr.reward_weights = torch.tensor(a.reward_weights, dtype=torch.float32)
    tr.accelerator = _Acc()
    tr.state = SimpleNamespace(epoch=0.0, global_step=0)
    tr._beta = beta
    tr.stats = {k: [] for k in STATS}
    model = p.torch_policy
    model.zero_grad()
    inputs = {"prompt": [r["prompt"] for r in p.rows], "answer": [r["answer"] for r in p.rows]}
    loss = tr.training_step(model, inputs)
    grad_norm = math.sqrt(sum(float((q.grad.double() ** 2).sum()) for q in model.parameters() if q.grad is not None))
    return float(loss), grad_norm, {k: v[0] for k, v in tr.stats.items()}


def ours_step(p, gen, loss_type, beta):
    tr = p.tr
    tr.args = copy.copy(tr.args)
    tr.args.loss_type = loss_type
    arrays, table = tr.build_pairs(p.rows, gen["prompt_ids"], gen["prompt_mask"], gen["completion_ids"],
                                   gen["completion_mask"], num_rows=N, micro_rows=N, beta=beta)
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}

    def f(params):
        t = tr.loss_fn(params, batch, None, ref_params=p.ref_params)
        return t.numerator / t.denominator, t.metrics

    (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(p.params)
    grad_norm = math.sqrt(sum(float(jnp.sum(jnp.square(g))) for g in jax.tree.leaves(grads)))
    return float(loss), grad_norm, {k: float(v) for k, v in metrics.items()}, arrays, table


def torch_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """One sampled generation from our trainer + the same weights in PyTorch (policy and a perturbed reference)."""
    tmp = tmp_path_factory.mktemp("odpo_parity")
    # max_length 20 < prompt (~15 tokens) + completion block: TRL's _forward cuts prompts from the left.
    args = make_args(tmp / "out", reward_weights=[1.0, 0.5], missing_eos_penalty=0.7, max_length=20)
    tr = OnlineDPOTrainer(MODEL, reward_funcs=[digit_reward, vowel_reward], args=args, train_dataset=dataset())
    tr._build(4)
    params = tr.state.params
    rows = [tr.train_dataset[i] for i in range(N)]
    prompt_ids, prompt_mask = _left_pad([r["prompt_ids"] for r in rows], tr.prompt_length, tr.pad_token_id)
    assert prompt_mask.sum(1).max() + 6 > 20  # the truncation path is really taken
    cids, _ = tr._sample(params, np.concatenate([prompt_ids] * 2), np.concatenate([prompt_mask] * 2),
                         jax.random.PRNGKey(0))
    ref_params = jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(1), x.shape, x.dtype), params)
    ref_dir = str(tmp / "ref")
    save_pretrained(tr.model, ref_params, ref_dir, tokenizer=tr.processing_class)
    return SimpleNamespace(tr=tr, rows=rows, params=params, ref_params=ref_params, prompt_ids=prompt_ids,
                           prompt_mask=prompt_mask, sampled=np.asarray(cids),
                           torch_policy=torch_model(builtin_model_dir(MODEL)), torch_ref=torch_model(ref_dir))


def fixed_generation(p, case):
    """``ragged``: EOS inside some completions (padding after it); ``full``: EOS only in the last column of some
    (no padding anywhere, so TRL's sums over the whole block equal sums over completion tokens)."""
    eos = p.tr.eos_token_ids[0]
    ids = p.sampled.copy()
    ids[np.isin(ids, p.tr.eos_token_ids)] = 5
    rows = np.arange(ids.shape[0])
    if case == "ragged":
        ids[rows % 3 == 0, 2] = eos
        ids[rows % 5 == 1, 4] = eos
    else:
        ids[rows % 3 == 0, -1] = eos
    out, mask = truncate_right(torch.tensor(ids), p.tr.eos_token_ids, p.tr.pad_token_id)
    return {"prompt_ids": p.prompt_ids, "prompt_mask": p.prompt_mask, "completion_ids": out.numpy(),
            "completion_mask": mask.numpy()}


@pytest.mark.parametrize("case", ["full", "ragged"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_step_matches_trl_training_step(parity, loss_type, case):
    gen = fixed_generation(parity, case)
    beta = 0.3
    l_trl, g_trl, m_trl = trl_step(parity, gen, loss_type, beta)
    l, g, m, arrays, table = ours_step(parity, gen, loss_type, beta)
    np.testing.assert_allclose(l, l_trl, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g, g_trl, rtol=1e-3, atol=1e-5)
    assert set(m_trl) == set(m), (sorted(m_trl), sorted(m))
    compared = [k for k in m_trl if case == "full" or k not in PADDING_SUMS]
    for k in compared:
        np.testing.assert_allclose(m[k], m_trl[k], rtol=1e-4, atol=1e-4, err_msg=k)
    # Non-degenerate: the comparison sees pairs both ways, missing EOS, a real KL.
    assert 0 < m_trl["val/contain_eos_token"] < 1 and m_trl["objective/scores_margin"] > 0
    assert abs(m_trl["rewards/margins"]) > 1e-4 and abs(m_trl["objective/kl"]) > 1e-3
    assert arrays["example_mask"].sum() == N and len(table) == N
    if case == "ragged":
        # Documented difference: TRL's KL/entropy sums include the padding after EOS; ours are over completion
        # tokens only -- so here they differ, and ours are the masked sums.
        assert not np.isclose(m["objective/kl"], m_trl["objective/kl"], rtol=1e-4, atol=1e-5)


def test_pairs_follow_scores_and_judge(parity):
    p = parity
    gen = fixed_generation(p, "ragged")
    arrays, table = p.tr.build_pairs(p.rows, gen["prompt_ids"], gen["prompt_mask"], gen["completion_ids"],
                                     gen["completion_mask"], num_rows=N, micro_rows=N, beta=0.1)
    s = arrays["scores"]
    assert (s[:, 0] >= s[:, 1]).all() and (s[:, 0] > s[:, 1]).any()
    assert [r["score_chosen"] for r in table] == s[:, 0].tolist()
    # Missing-EOS penalty applied to exactly the completions without EOS.
    assert set(np.unique(arrays["contain_eos"])) == {0.0, 1.0}

    # A judge preferring the longer completion (first on ties).
    seen = {}

    class LongerJudge:
        def judge(self, prompts, completion_pairs):
            seen["prompts"], seen["pairs"] = prompts, completion_pairs
            return [0 if len(a) >= len(b) else 1 for a, b in completion_pairs]

    tr = p.tr
    funcs, tr.reward_funcs, tr.judge = tr.reward_funcs, None, LongerJudge()
    try:
        arrays_j, table_j = tr.build_pairs(p.rows, gen["prompt_ids"], gen["prompt_mask"], gen["completion_ids"],
                                           gen["completion_mask"], num_rows=N, micro_rows=N, beta=0.1)
    finally:
        tr.reward_funcs, tr.judge = funcs, None
    assert seen["prompts"][0] == render_for_judge(p.rows[0]["prompt"]) and seen["prompts"][0].startswith("User: ")
    assert seen["pairs"][0][0].startswith("Assistant: ")
    for r in table_j:
        assert len(completion_text(r["chosen"])) >= len(completion_text(r["rejected"]))
    assert "score_chosen" not in table_j[0]
    assert (arrays_j["completion_mask"][:, 0].sum(1) > 0).all()
    np.testing.assert_array_equal(preferred_first(np.array([1.0, 1.0, 1.0, 2.0])), [True, False])  # tie -> first
    with pytest.raises(ValueError, match="index"):
        preferred_first(ranks=[0, 2])


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------

LOSS_METRICS = ("loss", "grad_norm", "learning_rate", "num_tokens", "objective/kl", "objective/entropy",
                "objective/non_score_reward", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "rewards/margins", "logps/chosen", "logps/rejected", "val/contain_eos_token", "beta")
SCORE_METRICS = ("objective/rlhf_reward", "objective/scores_margin", "objective/scores")


def test_train_save_resume_with_reward_functions(tmp_path):
    kw = dict(max_steps=3, lr_scheduler_type="constant", missing_eos_penalty=1.0,
              beta=[0.1, 0.05], reward_weights=[1.0, 0.5])
    funcs = [digit_reward, vowel_reward]
    full = OnlineDPOTrainer(MODEL, reward_funcs=funcs, args=make_args(tmp_path / "full", **kw),
                            train_dataset=dataset(12))
    assert full.steps_per_epoch() == 2  # 12 prompts, 8 per step: the second step's last 4 pairs are padding
    full.train()
    logs = [r for r in full.log_history if "loss" in r]
    assert len(logs) == 3
    for rec in logs:
        for k in LOSS_METRICS + SCORE_METRICS:
            assert k in rec and np.isfinite(rec[k]), (k, rec.get(k))
    assert [r["beta"] for r in logs] == [0.1, 0.1, 0.05]  # one value per epoch
    assert full.beta_for_step(3) == 0.05 and full.beta_for_step(100) == 0.05
    out = full.save_model(str(tmp_path / "full" / "model"))
    assert os.path.isfile(os.path.join(out, "model.safetensors"))

    part = OnlineDPOTrainer(MODEL, reward_funcs=funcs,
                            args=make_args(tmp_path / "part", save_strategy="steps", save_steps=2, **kw),
                            train_dataset=dataset(12))
    part.args.max_steps = 2
    part.train()
    resumed = OnlineDPOTrainer(MODEL, reward_funcs=funcs, args=make_args(tmp_path / "part", **kw),
                               train_dataset=dataset(12))
    resumed.train(resume_from_checkpoint=True)
    assert int(resumed.state.step) == 3
    for a, b in zip(jax.tree.leaves(full.state.params), jax.tree.leaves(resumed.state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_train_with_judge_and_eval(tmp_path):
    calls = []

    def shorter_judge(prompts, completion_pairs):  # a plain callable works too
        calls.append(len(completion_pairs))
        return [0 if len(a) <= len(b) else 1 for a, b in completion_pairs]

    tr = OnlineDPOTrainer(MODEL, judge=shorter_judge, args=make_args(tmp_path, loss_type="ipo", beta=0.5, max_steps=1,
                                                                   gradient_accumulation_steps=2,
                                                                   per_device_eval_batch_size=1),
                          train_dataset=dataset(), eval_dataset=dataset(4))
    tr.train()
    logs = [r for r in tr.log_history if "loss" in r]
    assert len(logs) == 1 and calls == [2 * N]  # one step: 2 micro-batches of 8 prompts, sampled together
    for rec in logs:
        for k in LOSS_METRICS:
            assert k in rec and np.isfinite(rec[k]), (k, rec.get(k))
        assert not set(SCORE_METRICS) & set(rec)  # TRL logs scores only with reward functions
    ev = tr.evaluate()  # 4 eval prompts in one batch of 8 pairs, 4 of them masked
    assert np.isfinite(ev["eval_loss"]) and ev["eval_beta"] == 0.5 and np.isfinite(ev["eval_rewards/margins"])


def test_argument_errors(tmp_path):
    ds = dataset()
    with pytest.raises(ValueError, match="reward_funcs.*judge"):
        OnlineDPOTrainer(MODEL, args=make_args(tmp_path), train_dataset=ds)
    with pytest.raises(ValueError, match="either"):
        OnlineDPOTrainer(MODEL, reward_funcs=digit_reward, judge=lambda p, c: [0] * len(c), args=make_args(tmp_path),
                         train_dataset=ds)
    with pytest.raises(ValueError, match="use_vllm"):
        OnlineDPOTrainer(MODEL, reward_funcs=digit_reward, args=make_args(tmp_path, use_vllm=True), train_dataset=ds)
    with pytest.raises(ValueError, match="generation_kwargs"):
        OnlineDPOTrainer(MODEL, reward_funcs=digit_reward, args=make_args(tmp_path, generation_kwargs={"foo": 1}),
                         train_dataset=ds)
    with pytest.raises(ValueError, match="init_lora_weights"):  # LoRA is supported; its bad options are refused
        OnlineDPOTrainer(MODEL, reward_funcs=digit_reward, args=make_args(tmp_path), train_dataset=ds,
                         peft_config={"init_lora_weights": "pissa"})
    with pytest.raises(ValueError, match="prompt"):
        OnlineDPOTrainer(MODEL, reward_funcs=digit_reward, args=make_args(tmp_path),
                         train_dataset=ds.rename_column("prompt", "question"))
    with pytest.raises(ValueError, match="reward weights"):
        OnlineDPOTrainer(MODEL, reward_funcs=[digit_reward], args=make_args(tmp_path, reward_weights=[1.0, 2.0]),
                         train_dataset=ds)
