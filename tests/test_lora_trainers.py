"""LoRA training against TRL + PEFT: the same tiny Qwen3, the same initial adapters (TRL's, saved in PEFT's format
and loaded by trl_jax as a model path), the same rows and optimizer; every per-step log value (loss, grad_norm,
learning rate, the trainer's metrics) within 1e-3 relative over 20 steps, for SFT and DPO (the DPO reference is
the base model with the adapters off, on both sides). Then trl_jax's saved adapter loads in PEFT with equal logits,
and the trainer trains exactly PEFT's trainable parameters with optimizer state for those only."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import pathlib
import sys

import jax
import numpy as np
import pytest

_BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "parity_trainers.py"
_spec = importlib.util.spec_from_file_location("parity_trainers", _BENCH)
pt = sys.modules.setdefault("parity_trainers", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(pt)

STEPS = 20
RTOL = 1e-3
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
            task_type="CAUSAL_LM")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return pt.make_model_dir(str(tmp_path_factory.mktemp("lora") / "model"))


def _trl_trainer(kind, model_dir, case, ds, out, peft_kwargs):
    import peft
    import torch
    import trl
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    kw = pt._args_kwargs(case, STEPS, out)
    kw.update(use_cpu=True, dataloader_num_workers=0)
    cfg_cls, trainer_cls = {"sft": (trl.SFTConfig, trl.SFTTrainer), "dpo": (trl.DPOConfig, trl.DPOTrainer)}[kind]
    return trainer_cls(model=model_dir, args=cfg_cls(**kw), train_dataset=ds,
                       processing_class=AutoTokenizer.from_pretrained(model_dir),
                       peft_config=peft.LoraConfig(**peft_kwargs))


def _jax_trainer(kind, model, case, ds, out, **extra):
    from trl_jax.configs import DPOConfig, SFTConfig
    from trl_jax.trainers import DPOTrainer, SFTTrainer

    kw = pt._args_kwargs(case, STEPS, out)
    kw.update(mesh_shape=(1, 1, 1), **extra)
    cfg_cls, trainer_cls = {"sft": (SFTConfig, SFTTrainer), "dpo": (DPOConfig, DPOTrainer)}[kind]
    return trainer_cls(model=model, args=cfg_cls(**kw), train_dataset=ds)


def _parity(kind, case_name, model_dir, tmp_path, peft_kwargs=LORA):
    case = pt.CASES[case_name]
    ds = pt.make_dataset(kind, pt.rows_needed(case, STEPS))
    trl_trainer = _trl_trainer(kind, model_dir, case, ds, str(tmp_path / "trl"), peft_kwargs)
    init_dir = tmp_path / "init-adapter"
    trl_trainer.model.save_pretrained(str(init_dir))  # TRL's random initial adapters, in PEFT's format
    n_trl_trainable = sum(p.numel() for p in trl_trainer.model.parameters() if p.requires_grad)
    with contextlib.redirect_stdout(io.StringIO()):
        trl_trainer.train()
    trl_logs = pt._step_logs(trl_trainer.state.log_history)

    jt = _jax_trainer(kind, str(init_dir), case, ds, str(tmp_path / "jax"))  # base + those adapters
    assert jt.num_trainable_parameters == n_trl_trainable
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        jt.train()
    jax_logs = pt._step_logs(jt.log_history)
    assert len(trl_logs) == len(jax_logs) == STEPS
    cmp = pt.compare(trl_logs, jax_logs, rtol=RTOL)
    assert cmp.only_trl == [] and cmp.only_jax == [], (cmp.only_trl, cmp.only_jax)
    bad = {k: (v, cmp.curves[k]) for k, v in cmp.max_rel.items() if not v <= RTOL}
    assert not bad, bad
    losses = cmp.curves["loss"][0]
    assert max(abs(x - losses[0]) for x in losses) > 1e-2 * abs(losses[0]), losses  # the adapters learn
    return trl_trainer, jt


def test_sft_lora_loss_curve_equals_trl_peft(model_dir, tmp_path):
    trl_trainer, jt = _parity("sft", "sft-adamw", model_dir, tmp_path)
    # optimizer state: Adam's two moments for the adapters only (the frozen base has none)
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(jt.state.opt_state) if x.ndim)
    assert opt_bytes == 2 * 4 * jt.num_trainable_parameters
    # the base did not move; the saved adapter loads in PEFT and gives trl_jax's logits
    import peft
    import torch
    import transformers

    out = tmp_path / "saved"
    jt.save_model(str(out))
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    pm = peft.PeftModel.from_pretrained(base, str(out)).eval()
    ids = np.array([[5, 17, 33, 8, 21, 40, 2, 9]], np.int32)
    with torch.no_grad():
        want = pm(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    got = np.asarray(jt.model.logits(jt.state.params, ids))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # and equals TRL's own trained adapter (same curve, same weights)
    with torch.no_grad():
        trl_out = trl_trainer.model(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, trl_out, atol=2e-3, rtol=2e-3)


def test_dpo_lora_loss_curve_equals_trl_peft_with_base_as_reference(model_dir, tmp_path):
    _, jt = _parity("dpo", "dpo-adamw", model_dir, tmp_path)
    assert jt.state.ref_params is None  # no second copy of the weights: the reference is the base itself
