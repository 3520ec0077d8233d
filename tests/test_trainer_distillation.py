"""DistillationTrainer against TRL 1.16's ``DistillationTrainer``.

The student (``builtin:tiny-qwen3``) is distilled from a teacher of another shape (``builtin:small-qwen3``, same
vocabulary) on-policy: our trainer samples the completions with the jitted sampler. TRL's own trainer (PyTorch, the
same weights, the same hyperparameters) is then fed the very same generation batch at every step (its
``_generate_and_score_completions`` replays ours, and its generation-batch shuffle is ours), so the two runs differ
only in the loss, the gradient and the optimizer: every step's ``loss``, ``grad_norm``, ``learning_rate`` and
``entropy`` must agree within 1e-3. The same run checkpoints at step 2; resuming from it reproduces step 3 exactly
(the teacher rides in the checkpointed state). Then save/load and the errors.
"""

from __future__ import annotations

import contextlib
import io
import os
from types import SimpleNamespace

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import jax
import numpy as np
import pytest
import torch

from trl_jax.assets import builtin_model_dir
from trl_jax.configs import DistillationConfig
from trl_jax.data.builtin import load_builtin_dataset
from trl_jax.trainers.distillation import DistillationTrainer

STUDENT, TEACHER = "builtin:tiny-qwen3", "builtin:small-qwen3"
STEPS, GA, ROWS = 3, 2, 8
KEYS = ("loss", "grad_norm", "learning_rate", "entropy")
GEN_KEYS = ("completions/mean_length", "completions/min_length", "completions/max_length", "completions/clipped_ratio",
            "completions/mean_terminated_length", "completions/min_terminated_length",
            "completions/max_terminated_length", "num_tokens")
HYPER = dict(max_steps=STEPS, gradient_accumulation_steps=GA, learning_rate=3e-3, lr_scheduler_type="linear",
             warmup_steps=1, weight_decay=0.01, max_grad_norm=1.0, max_completion_length=6, temperature=0.9,
             beta=0.4, logging_steps=1, report_to="none", bf16=False, gradient_checkpointing=False, seed=3,
             disable_tqdm=True)


def dataset(n=48):
    return load_builtin_dataset("arithmetic_prompts").select(range(n))


def make_args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=ROWS // jax.device_count() or 1,
                save_strategy="no", **HYPER)
    base.update(kw)
    return DistillationConfig(**base)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Our on-policy run (checkpoint at step 2), recording each step's generation batch."""
    tmp = tmp_path_factory.mktemp("distill")
    tr = DistillationTrainer(STUDENT, teacher_model=TEACHER, train_dataset=dataset(),
                             args=make_args(tmp / "ours", save_strategy="steps", save_steps=2, log_completions=True))
    assert tr.step_rows == ROWS * GA
    batches, inner = [], tr._batch_for_step

    def recording(step):
        b = inner(step)
        batches.append({k: np.asarray(v) for k, v in b.items()})
        return b

    tr._batch_for_step = recording
    with contextlib.redirect_stdout(io.StringIO()):
        tr.train()
    logs = [r for r in tr.log_history if "loss" in r]
    return SimpleNamespace(tr=tr, batches=batches, logs=logs, tmp=tmp)


def trl_logs(batches, out):
    """TRL's DistillationTrainer on the same weights, replaying our generation batches."""
    import trl.trainer.distillation_trainer as trl_mod
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig as TRLConfig
    from trl import DistillationTrainer as TRLTrainer

    torch.manual_seed(0)
    student_dir, teacher_dir = builtin_model_dir(STUDENT), builtin_model_dir(TEACHER)
    # the student samples the pad token inside completions now and then: both sides give its input embedding no
    # gradient (transformers' padding_idx)
    kw = dict(dtype=torch.float32, attn_implementation="eager")
    student = AutoModelForCausalLM.from_pretrained(student_dir, **kw)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, **kw)
    tok = AutoTokenizer.from_pretrained(student_dir)
    args = TRLConfig(output_dir=str(out), per_device_train_batch_size=ROWS, save_strategy="no", use_cpu=True,
                     dataloader_num_workers=0, **HYPER)
    tr = TRLTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset(), processing_class=tok)
    replay = iter(batches)

    def generate_and_score(inputs):
        b = next(replay)
        c = b["completion_ids"].shape[1]
        t = {k: torch.tensor(v, dtype=torch.long) for k, v in b.items()}
        return {"prompt_ids": t["input_ids"][:, :-c], "prompt_mask": t["segment_ids"][:, :-c],
                "completion_ids": t["completion_ids"], "completion_mask": t["completion_mask"],
                "num_items_in_batch": t["completion_mask"].sum().float()}

    tr._generate_and_score_completions = generate_and_score
    shuffle = trl_mod.shuffle_sequence_dict
    trl_mod.shuffle_sequence_dict = lambda d: d  # the batch is already in our (shuffled) order
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            tr.train()
    finally:
        trl_mod.shuffle_sequence_dict = shuffle
    return [r for r in tr.state.log_history if "loss" in r]


def test_step_losses_match_trl(run):
    theirs = trl_logs(run.batches, run.tmp / "trl")
    assert len(run.logs) == len(theirs) == STEPS
    for ours, ref in zip(run.logs, theirs, strict=True):
        for k in KEYS:
            np.testing.assert_allclose(ours[k], ref[k], rtol=1e-3, atol=1e-7, err_msg=f"step {ref['step']}: {k}")
    losses = [r["loss"] for r in run.logs]
    assert max(losses) > 0 and len(set(losses)) == STEPS


def test_on_policy_run_logs_trl_metrics(run):
    for rec in run.logs:
        for k in KEYS + GEN_KEYS:
            assert k in rec and np.isfinite(rec[k]), (k, rec.get(k))
        assert 1 <= rec["completions/mean_length"] <= 6
    # the completions are the student's own samples (different at every step), masked through the first EOS
    assert len(run.batches) == STEPS
    assert not np.array_equal(run.batches[0]["completion_ids"], run.batches[1]["completion_ids"])
    for b in run.batches:
        m = b["completion_mask"]
        assert np.all(np.diff(m, axis=1) <= 0) and np.all(m[:, 0] == 1)
    import json

    table = [json.loads(x) for x in open(run.tmp / "ours" / "completions.jsonl")]
    assert [r["step"] for r in table] == [s for s in range(1, STEPS + 1) for _ in range(ROWS * GA)]
    assert {"prompt", "completion"} <= set(table[0])


def test_resume_and_save(run):
    resumed = DistillationTrainer(STUDENT, teacher_model=TEACHER, train_dataset=dataset(),
                                  args=make_args(run.tmp / "ours"))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        resumed.train(resume_from_checkpoint=True)
    assert int(resumed.state.step) == STEPS
    table = open(run.tmp / "ours" / "completions.jsonl").read().splitlines()
    assert len(table) == 2 * ROWS * GA  # cut back to the checkpoint (step 2); the resumed run did not log them
    for a, b in zip(jax.tree.leaves(run.tr.state.params), jax.tree.leaves(resumed.state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # the teacher is never updated
    from trl_jax.models import from_pretrained

    _, teacher = from_pretrained(builtin_model_dir(TEACHER), scan_layers=resumed.args.scan_layers)
    for a, b in zip(jax.tree.leaves(teacher), jax.tree.leaves(resumed.state.ref_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    out = run.tr.save_model(str(run.tmp / "saved"))
    _, saved = from_pretrained(out, scan_layers=resumed.args.scan_layers)
    for a, b in zip(jax.tree.leaves(run.tr.state.params), jax.tree.leaves(saved), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_errors(tmp_path):
    args = make_args(tmp_path)
    with pytest.raises(ValueError, match="needs a `prompt` column.*columns \\['messages', 'answer'\\]"):
        DistillationTrainer(STUDENT, teacher_model=TEACHER, args=args,
                            train_dataset=load_builtin_dataset("arithmetic_sft").select(range(8)))
    with pytest.raises(ValueError, match="teacher model is required.*teacher_model_name_or_path"):
        DistillationTrainer(STUDENT, args=args, train_dataset=dataset(8))
    with pytest.raises(ValueError, match="use_vllm=True"):
        DistillationTrainer(STUDENT, teacher_model=TEACHER, args=make_args(tmp_path, use_vllm=True),
                            train_dataset=dataset(8))
    with pytest.raises(ValueError, match="beta must be in"):
        make_args(tmp_path, beta=1.5)
    from trl_jax.models import from_pretrained

    m, p = from_pretrained(builtin_model_dir(TEACHER))
    m.config = m.config.replace(vocab_size=m.config.vocab_size + 1)
    with pytest.raises(ValueError, match="vocab_size.*shared vocabulary"):
        DistillationTrainer(STUDENT, teacher_model=(m, p), args=args, train_dataset=dataset(8))


def test_teacher_is_frozen_in_the_compute_dtype_and_sharded_like_the_student(tmp_path):
    tr = DistillationTrainer(STUDENT, teacher_model=STUDENT, train_dataset=dataset(16),
                             args=make_args(tmp_path, bf16=True, mesh_shape=(1, jax.device_count(), 1),
                                            per_device_train_batch_size=1))
    tr._build(1)
    teacher, student = tr.state.ref_params, tr.state.params
    assert {x.dtype for x in jax.tree.leaves(teacher)} == {np.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(student)} == {np.dtype("float32")}
    for t, s in zip(jax.tree.leaves(teacher), jax.tree.leaves(student), strict=True):
        assert t.sharding.is_equivalent_to(s.sharding, t.ndim), (t.sharding, s.sharding)
    assert any(len(set(s.sharding.spec) - {None}) for s in jax.tree.leaves(student))  # really sharded (fsdp)


def test_lora_student(tmp_path):
    """``peft_config`` goes to the shared loop: only the adapters train, the teacher stays a full model."""
    from trl_jax.models.lora import LoraConfig

    tr = DistillationTrainer(STUDENT, teacher_model=TEACHER, train_dataset=dataset(16),
                             args=make_args(tmp_path, max_steps=1, gradient_accumulation_steps=1),
                             peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with contextlib.redirect_stdout(io.StringIO()):
        tr.train()
    rec = [r for r in tr.log_history if "loss" in r][0]
    assert np.isfinite(rec["loss"]) and rec["grad_norm"] > 0
    assert tr.num_trainable_parameters < tr.num_parameters


def test_cli_needs_a_teacher(tmp_path):
    from trl_jax.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_name_or_path: {STUDENT}\ndataset_name: builtin:arithmetic_prompts\n"
                   f"output_dir: {tmp_path / 'out'}\nbf16: false\nmax_steps: 1\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["distillation", "--config", str(cfg)]) == 2
    assert "teacher model is required" in err.getvalue() and "teacher_model_name_or_path" in err.getvalue()
    cfg.write_text(cfg.read_text() + "teacher_model_name_or_path: outputs/no-such-teacher\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["distillation", "--config", str(cfg)]) == 2
    assert "no-such-teacher" in err.getvalue()
