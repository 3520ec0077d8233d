"""The runs of the multi-host trainer test (``tests/test_multihost_trainers.py``).

As a script, one process of a 2-process run: ``python _multihost_trainer_worker.py PROCESS_ID 2 PORT WORKDIR``
(``jax.distributed`` on localhost with gloo, 4 CPU devices per process) runs :func:`train_both` into
``WORKDIR/mp`` and writes its per-step losses to ``WORKDIR/result-mp-<process>.json`` (outside the output dirs).
The test runs the same functions in its own process (8 CPU devices) for the one-process side.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

STEPS = 4
MODEL = "builtin:tiny-qwen3"


def _sft_config(output_dir, **kw):
    from trl_jax.configs import SFTConfig

    base = dict(output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=1, per_device_eval_batch_size=1,
                learning_rate=3e-3, max_length=None, logging_steps=1, eval_strategy="steps", eval_steps=2,
                save_steps=2, bf16=False, gradient_checkpointing=False, disable_tqdm=True,
                report_to="tensorboard", seed=0)
    base.update(kw)
    return SFTConfig(**base)


def _losses(trainer):
    return {
        "train": [[r["step"], r["loss"]] for r in trainer.log_history if "loss" in r and "step" in r],
        "eval": [[r["step"], r["eval_loss"]] for r in trainer.log_history if "eval_loss" in r],
    }


def train_both(workdir: str, tag: str, url=lambda p: p) -> dict:
    """SFT (eval, checkpoints every 2 steps, save_model), DPO (precomputed reference, gradient accumulation), GRPO
    and online DPO under ``workdir/tag``; returns the per-step train / eval losses."""
    from trl_jax.configs import DPOConfig
    from trl_jax.data.loading import load_dataset_any
    from trl_jax.trainers import DPOTrainer, SFTTrainer

    root = os.path.join(workdir, tag)
    sft_train, sft_eval = _sft_data()
    sft = SFTTrainer(MODEL, args=_sft_config(url(os.path.join(root, "sft"))), train_dataset=sft_train,
                     eval_dataset=sft_eval)
    sft.train()
    sft.save_model(url(os.path.join(root, "sft", "final")))
    out = {"sft": _losses(sft)}
    pref = load_dataset_any("builtin:arithmetic_preference").select(range(40))
    dpo = DPOTrainer(MODEL, args=DPOConfig(
        output_dir=url(os.path.join(root, "dpo")), max_steps=STEPS, per_device_train_batch_size=1,
        gradient_accumulation_steps=2, per_device_eval_batch_size=1, learning_rate=1e-3, max_length=None,
        precompute_ref_log_probs=True, logging_steps=1, eval_strategy="steps", eval_steps=2, save_strategy="no",
        bf16=False, gradient_checkpointing=False, disable_tqdm=True, seed=0),
        train_dataset=pref.select(range(32)), eval_dataset=pref.select(range(32, 40)))
    dpo.train()
    out["dpo"] = _losses(dpo)
    out["grpo"] = train_grpo(root, url)
    out["online_dpo"] = train_online_dpo(root, url)
    return out


def digit_count_reward(completions, log_metric=None, **kwargs):
    """Deterministic and varied: the number of digits in the completion (None for an empty one); logs the
    batch's mean length through ``log_metric`` (a reward-function metric gathered over processes)."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    if log_metric is not None:
        for t in texts:
            log_metric("chars", len(t))
    return [float(sum(ch.isdigit() for ch in t)) if t else None for t in texts]


def train_grpo(root: str, url=lambda p: p) -> dict:
    """GRPO: 4 steps, generation batches of 16 completions (4 prompts x 4) reused over 2 steps (old log-probs
    recomputed by the forward pass and gathered), sampling at temperature 1."""
    from trl_jax.configs import GRPOConfig
    from trl_jax.data.loading import load_dataset_any
    from trl_jax.trainers import GRPOTrainer

    prompts = load_dataset_any("builtin:arithmetic_prompts").select(range(16))
    grpo = GRPOTrainer(MODEL, reward_funcs=digit_count_reward, args=GRPOConfig(
        output_dir=url(os.path.join(root, "grpo")), max_steps=STEPS, per_device_train_batch_size=1,
        num_generations=4, steps_per_generation=2, max_completion_length=6, temperature=1.0, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to="none", bf16=False, gradient_checkpointing=False,
        disable_tqdm=True, seed=0), train_dataset=prompts)
    grpo.reuse_sampler_logps = False  # the old log-probs' forward pass, fetched from every process
    grpo.train()
    out = _losses(grpo)
    out["metrics"] = [{k: r[k] for k in ("step", "reward", "reward_std", "frac_reward_zero_std", "chars",
                                         "completions/mean_length", "num_tokens") if k in r}
                      for r in grpo.log_history if "loss" in r and "step" in r]
    return out


def train_online_dpo(root: str, url=lambda p: p) -> dict:
    """Online DPO: 4 steps of 8 prompt pairs sampled at temperature 1, ranked by ``digit_count_reward``; one eval
    (step 4) of 5 prompts in a batch of 8 rows (process 1 holds only padding pairs there)."""
    from trl_jax.configs import OnlineDPOConfig
    from trl_jax.data.loading import load_dataset_any
    from trl_jax.trainers import OnlineDPOTrainer

    prompts = load_dataset_any("builtin:arithmetic_prompts").select(range(37))
    odpo = OnlineDPOTrainer(MODEL, reward_funcs=digit_count_reward, args=OnlineDPOConfig(
        output_dir=url(os.path.join(root, "online_dpo")), max_steps=STEPS, per_device_train_batch_size=1,
        per_device_eval_batch_size=1, max_new_tokens=6, temperature=1.0, learning_rate=1e-3, logging_steps=1,
        eval_strategy="steps", eval_steps=STEPS, save_strategy="no", report_to="none", bf16=False,
        gradient_checkpointing=False, disable_tqdm=True, seed=0),
        train_dataset=prompts.select(range(32)), eval_dataset=prompts.select(range(32, 37)))
    odpo.train()
    out = _losses(odpo)
    out["metrics"] = [{k: r[k] for k in ("step", "objective/scores", "rewards/accuracies", "rewards/margins",
                                         "objective/kl", "num_tokens") if k in r}
                      for r in odpo.log_history if "loss" in r and "step" in r]
    return out


def resume_sft(checkpoints: str, dest: str) -> dict:
    """Copy a checkpoints directory to ``dest`` and resume its step 2 there (``file://`` URLs) to step 4."""
    from trl_jax.trainers import SFTTrainer

    shutil.copytree(checkpoints, os.path.join(dest, "checkpoints"))
    sft_train, sft_eval = _sft_data()
    sft = SFTTrainer(MODEL, args=_sft_config("file://" + dest), train_dataset=sft_train, eval_dataset=sft_eval)
    sft.train(resume_from_checkpoint="file://" + os.path.join(dest, "checkpoints", "2"))
    return {"sft": _losses(sft)}


def _sft_data():
    from trl_jax.data.loading import load_dataset_any

    return (load_dataset_any("builtin:arithmetic_sft").select(range(40)),
            load_dataset_any("builtin:arithmetic_sft", split="test").select(range(11)))


def main(pid: int, nproc: int, port: int, workdir: str) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // nproc}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from trl_jax.parallel import initialize_distributed

    initialize_distributed(f"127.0.0.1:{port}", nproc, pid)
    assert jax.device_count() == 8 and jax.process_count() == nproc, (jax.device_count(), jax.process_count())
    out = train_both(workdir, "mp")
    with open(os.path.join(workdir, f"result-mp-{pid}.json"), "w", encoding="utf-8") as f:
        json.dump(out, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
