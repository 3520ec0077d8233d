"""One process of the multi-host trainer test (``tests/test_multihost_trainers.py``).

``python _multihost_trainer_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR ROLE``

* ``NUM_PROCESSES=2``: ``jax.distributed`` on localhost (gloo), 4 CPU devices per process; ``NUM_PROCESSES=1``: one
  process with 8 CPU devices. Either way the mesh has 8 devices.
* ROLE ``train``: SFT (eval, checkpoints, ``save_model``) then DPO (precomputed reference log-probs, gradient
  accumulation) into ``WORKDIR/<tag>/{sft,dpo}`` with ``<tag>`` = ``mp`` (2 processes) or ``sp`` (1 process;
  ``output_dir`` given as a ``file://`` URL). ROLE ``resume``: one process resumes ``WORKDIR/mp/sft``'s step-2
  checkpoint (written by 2 processes) into ``WORKDIR/resume`` and trains to step 4.
Per-step losses go to ``WORKDIR/result-<tag>-<process>.json`` (outside the output dirs).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

STEPS = 4


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


def main(pid: int, nproc: int, port: int, workdir: str, role: str) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // nproc}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    if nproc > 1:
        from trl_jax.parallel import initialize_distributed

        initialize_distributed(f"127.0.0.1:{port}", nproc, pid)
    assert jax.device_count() == 8 and jax.process_count() == nproc, (jax.device_count(), jax.process_count())

    from trl_jax.configs import DPOConfig
    from trl_jax.data.loading import load_dataset_any
    from trl_jax.trainers import DPOTrainer, SFTTrainer

    model = "builtin:tiny-qwen3"
    sft_train = load_dataset_any("builtin:arithmetic_sft").select(range(40))
    sft_eval = load_dataset_any("builtin:arithmetic_sft", split="test").select(range(11))
    out = {}
    if role == "train":
        tag = "mp" if nproc > 1 else "sp"
        root = os.path.join(workdir, tag)
        url = (lambda p: p) if nproc > 1 else (lambda p: "file://" + p)  # one process: output_dir as a URL
        sft = SFTTrainer(model, args=_sft_config(url(os.path.join(root, "sft"))), train_dataset=sft_train,
                         eval_dataset=sft_eval)
        sft.train()
        sft.save_model(url(os.path.join(root, "sft", "final")))
        out["sft"] = _losses(sft)
        pref = load_dataset_any("builtin:arithmetic_preference").select(range(40))
        dpo = DPOTrainer(model, args=DPOConfig(
            output_dir=url(os.path.join(root, "dpo")), max_steps=STEPS, per_device_train_batch_size=1,
            gradient_accumulation_steps=2, per_device_eval_batch_size=1, learning_rate=1e-3, max_length=None,
            precompute_ref_log_probs=True, logging_steps=1, eval_strategy="steps", eval_steps=2, save_strategy="no",
            bf16=False, gradient_checkpointing=False, disable_tqdm=True, seed=0),
            train_dataset=pref.select(range(32)), eval_dataset=pref.select(range(32, 40)))
        dpo.train()
        out["dpo"] = _losses(dpo)
    else:
        tag = "resume"
        dest = os.path.join(workdir, "resume")
        shutil.copytree(os.path.join(workdir, "mp", "sft", "checkpoints"), os.path.join(dest, "checkpoints"))
        sft = SFTTrainer(model, args=_sft_config("file://" + dest), train_dataset=sft_train, eval_dataset=sft_eval)
        sft.train(resume_from_checkpoint="file://" + os.path.join(dest, "checkpoints", "2"))
        out["sft"] = _losses(sft)
    with open(os.path.join(workdir, f"result-{tag}-{pid}.json"), "w", encoding="utf-8") as f:
        json.dump(out, f)
    if nproc > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
