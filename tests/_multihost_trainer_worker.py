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
    """SFT (eval, checkpoints every 2 steps, save_model) then DPO (precomputed reference, gradient accumulation)
    under ``workdir/tag``; returns the per-step train / eval losses."""
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
