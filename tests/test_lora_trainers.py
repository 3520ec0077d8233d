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
import jax.numpy as jnp
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


def test_grpo_lora_step_loss_equals_trl_compute_loss(tmp_path):
    """GRPO with LoRA: our trainer samples a batch; TRL's ``_compute_loss`` runs on the same completions with the
    same adapters loaded by PEFT (reference: the PEFT model with its adapters disabled, as TRL does)."""
    import copy
    import math

    import jax.numpy as jnp
    import peft
    import torch

    from test_trainer_grpo import MODEL, dataset, digit_reward, make_args, torch_model, trl_stand_in
    from trl_jax.assets import builtin_model_dir
    from trl_jax.models.lora import LoraConfig
    from trl_jax.trainers.grpo import GRPOTrainer

    args = make_args(tmp_path / "out", beta=0.04)
    tr = GRPOTrainer(MODEL, reward_funcs=[digit_reward], args=args, train_dataset=dataset(),
                     peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    tr._build(4)
    # adapters away from their zero start, so the policy differs from the reference (KL > 0)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(len(str(p))), x.shape, x.dtype)
        if "lora_b" in str(p) else x, tr.state.params)
    tr.state = tr.state.replace(params=params)
    slices, _ = tr._generation(0)
    batch = {k: np.asarray(v) for k, v in slices[0].items()}
    logps = np.asarray(jax.jit(lambda p, b: tr._token_logps(p, b))(params, batch))
    noise = np.random.default_rng(0).normal(0.0, 0.3, logps.shape).astype(np.float32)
    batch["old_per_token_logps"] = (logps + noise * batch["completion_mask"]).astype(np.float32)
    adapter = tmp_path / "adapter"
    tr.save_model(str(adapter))

    # ours: gradient over the adapters only, reference = base (ref_params None in the state)
    trained_pred = tr._trainable_pred()
    from trl_jax.utils.trees import combine, partition

    trained, frozen = partition(params, trained_pred)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}

    def f(t):
        terms = tr.loss_fn(combine(t, frozen), jb, None)
        return terms.numerator / terms.denominator, terms.metrics

    (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(trained)
    g = math.sqrt(sum(float(jnp.sum(jnp.square(x))) for x in jax.tree.leaves(grads)))

    # TRL: PEFT model on the same base with our saved adapters
    pm = peft.PeftModel.from_pretrained(torch_model(builtin_model_dir(MODEL)), str(adapter), is_trainable=True)
    targs = copy.copy(tr.args)
    stand = trl_stand_in(targs)
    c = batch["completion_ids"].shape[1]
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    attn = torch.tensor(batch["segment_ids"], dtype=torch.long)
    with torch.no_grad(), pm.disable_adapter():
        ref, _, _ = stand._get_per_token_logps_and_entropies(pm, ids, attn, c)
    inputs = {
        "prompt_ids": ids[:, :-c], "prompt_mask": attn[:, :-c], "completion_ids": ids[:, -c:],
        "completion_mask": torch.tensor(batch["completion_mask"], dtype=torch.long),
        "advantages": torch.tensor(batch["advantages"]),
        "num_items_in_batch": torch.tensor(float(batch["num_items_in_batch"][0])),
        "old_per_token_logps": torch.tensor(batch["old_per_token_logps"]), "ref_per_token_logps": ref,
    }
    pm.zero_grad()
    l_trl = stand._compute_loss(pm, inputs)
    l_trl.backward()
    g_trl = math.sqrt(sum(float((q.grad.double() ** 2).sum()) for q in pm.parameters() if q.grad is not None))
    m_trl = {k: v[0] for k, v in stand._metrics["train"].items()}
    np.testing.assert_allclose(float(loss), float(l_trl), rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(g, g_trl, rtol=2e-3, atol=1e-5)
    for k in m_trl:
        np.testing.assert_allclose(float(metrics[k]), m_trl[k], rtol=2e-3, atol=2e-5, err_msg=k)
    assert m_trl["kl"] > 0


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices: tests/run.sh sets them")
def test_lora_step_on_every_mesh_equals_one_device_and_skips_base_gradients(tmp_path):
    """Adapters follow their kernel's logical axes (A on the input axis, B on the output axis), so the LoRA step
    runs on every mesh of the scale tests with the one-device values and 1/N of the matmul FLOPs per device; and
    it computes no weight gradient for the frozen base (fewer FLOPs than the full fine-tune's step)."""
    from test_sharded_cost import MESHES, _mesh, _model_dir
    from trl_jax.configs import SFTConfig
    from trl_jax.data.builtin import load_builtin_dataset
    from trl_jax.models.lora import LoraConfig
    from trl_jax.train import make_train_step
    from trl_jax.trainers import SFTTrainer
    from trl_jax.utils.hlo_cost import hlo_cost

    model_dir = _model_dir(str(tmp_path))
    data = load_builtin_dataset("arithmetic_sft").select(range(16))

    def trainer(peft_config):
        args = SFTConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=8, max_steps=1, max_length=32,
                         mesh_shape=(1, 1, 1), report_to="none", save_strategy="no", disable_tqdm=True,
                         learning_rate=1e-2, optim="sgd", bf16=False)  # SGD: the update is the gradient (Adam's first step
        # would turn sign noise of near-zero gradients into +-lr)
        tr = SFTTrainer(model_dir, args=args, train_dataset=data, peft_config=peft_config)
        tr._build(1)
        return tr

    tr = trainer(LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True))
    batch = {k: np.asarray(v) for k, v in tr._batch_for_step(0).items()}
    state0 = jax.device_get(tr.state)

    def step_on(mesh):
        step = make_train_step(tr.loss_fn, tr.optimizer, mesh=mesh, logical_axes=tr.model.logical_axes(),
                               trainable=tr._trainable_pred(), donate=False)
        return step

    one_step = step_on(_mesh((1, 1, 1)))
    ref_state, ref_metrics = one_step(jax.tree.map(jnp.asarray, state0), batch)
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    abstract = jax.eval_shape(lambda s: s, tr.state)
    one = hlo_cost(one_step.lower(abstract, spec).compile())
    for shape in MESHES:
        step = step_on(_mesh(shape))
        c = hlo_cost(step.lower(abstract, spec).compile())
        assert 8 * c["matmul_flops"] / one["matmul_flops"] <= 1.15, (shape, c["matmul_flops"], one["matmul_flops"])
        if shape not in ((8, 1, 1), (1, 2, 4)):  # values: data parallel and fsdp x tensor (compiles are the cost)
            continue
        new, metrics = step(jax.tree.map(jnp.asarray, state0), batch)
        np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7),
                     new.params, ref_state.params)
    full = trainer(None)
    fstep = make_train_step(full.loss_fn, full.optimizer, mesh=_mesh((1, 1, 1)),
                            logical_axes=full.model.logical_axes(), donate=False)
    full_cost = hlo_cost(fstep.lower(jax.eval_shape(lambda s: s, full.state), spec).compile())
    assert one["matmul_flops"] < 0.85 * full_cost["matmul_flops"], (one["matmul_flops"], full_cost["matmul_flops"])


def _lora_trainer(kind, out, **extra):
    """A LoRA trainer of ``kind`` on the built-in tiny model and shipped data (2 steps)."""
    from trl_jax import configs as C
    from trl_jax import trainers as T
    from trl_jax.data.builtin import load_builtin_dataset
    from trl_jax.models.lora import LoraConfig

    common = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=2, bf16=False, mesh_shape=(1, 1, 1),
                  report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, learning_rate=5e-2)
    common.update(extra)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], lora_dropout=0.1)
    model = "builtin:tiny-qwen3"

    def reward(completions, **kw):
        return [float(len(str(c))) for c in completions]

    if kind == "sft":
        return T.SFTTrainer(model, args=C.SFTConfig(max_length=32, **common), peft_config=lora,
                            train_dataset=load_builtin_dataset("arithmetic_sft").select(range(16)))
    if kind in ("kto", "reward"):
        data = load_builtin_dataset("arithmetic_preference").select(range(16))
        if kind == "kto":
            return T.KTOTrainer(model, args=C.KTOConfig(max_length=32, **common), train_dataset=data, peft_config=lora)
        return T.RewardTrainer(model, args=C.RewardConfig(max_length=256, **common), train_dataset=data,
                               peft_config=lora)
    prompts = load_builtin_dataset("arithmetic_prompts").select(range(16))
    return T.OnlineDPOTrainer(model, reward_funcs=reward, train_dataset=prompts, peft_config=lora,
                              args=C.OnlineDPOConfig(max_new_tokens=6, **common))


@pytest.mark.parametrize("kind", ["kto", "online_dpo", "reward"])
def test_lora_trains_only_adapters_in_every_trainer(kind, tmp_path):
    from trl_jax.models.lora import is_adapter
    from trl_jax.utils.trees import partition

    tr = _lora_trainer(kind, tmp_path / "out")
    before = jax.device_get(tr.params)
    tr.train()
    after = jax.device_get(tr.state.params)
    assert tr.state.ref_params is None  # reference = the base with the adapters off (reward: no reference at all)
    pred = tr._trainable_pred()
    moved, fixed = partition(after, pred)
    moved0, fixed0 = partition(before, pred)
    jax.tree.map(np.testing.assert_array_equal, fixed, fixed0)  # the frozen base never moves
    lora_b = [x for p, x in jax.tree_util.tree_leaves_with_path(moved) if "lora_b" in jax.tree_util.keystr(p)]
    assert lora_b and all(np.abs(x).max() > 0 for x in lora_b)  # the adapters learned (B starts at zero)
    assert all(np.isfinite(r["loss"]) for r in tr.log_history if "loss" in r)
    out = tr.save_model(str(tmp_path / "saved"))
    import json
    cfg = json.load(open(f"{out}/adapter_config.json"))
    assert cfg["r"] == 4 and cfg["task_type"] == ("SEQ_CLS" if kind == "reward" else "CAUSAL_LM")
    if kind == "reward":  # PEFT's SEQ_CLS task trains and saves the score head in full
        assert cfg["modules_to_save"] == ["score"]
    del is_adapter


def test_lora_resume_is_exact_and_an_adapter_dir_continues_training(tmp_path):
    full = _lora_trainer("sft", tmp_path / "full", max_steps=4, save_strategy="steps", save_steps=2)
    full.train()
    want = [r["loss"] for r in full.log_history if "loss" in r]
    # a fresh trainer resumes from the step-2 checkpoint: same steps 3-4 (dropout masks included)
    import shutil
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "4")
    resumed = _lora_trainer("sft", tmp_path / "cut", max_steps=4, save_strategy="steps", save_steps=2,
                            resume_from_checkpoint=True)
    resumed.train()
    got = [r["loss"] for r in resumed.log_history if "loss" in r]
    assert got[-2:] == want[-2:]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.params),
                 jax.device_get(full.state.params))
    # saved adapters as a model path: base + adapters load, and continue training from there
    adapter = full.save_model(str(tmp_path / "adapter"))
    from trl_jax.configs import SFTConfig
    from trl_jax.data.builtin import load_builtin_dataset
    from trl_jax.trainers import SFTTrainer

    cont = SFTTrainer(adapter, args=SFTConfig(output_dir=str(tmp_path / "cont"), max_steps=1, bf16=False,
                                              mesh_shape=(1, 1, 1), report_to="none", save_strategy="no",
                                              per_device_train_batch_size=4, max_length=32, disable_tqdm=True),
                      train_dataset=load_builtin_dataset("arithmetic_sft").select(range(8)))
    assert cont.lora_spec.r == 4 and cont.lora_spec.targets[0] == ("q_proj", "up_proj")
    jax.tree.map(np.testing.assert_allclose, jax.device_get(cont.params), jax.device_get(full.state.params))
    merged = full.save_model(str(tmp_path / "merged"), merged=True)
    import transformers
    tm = transformers.AutoModelForCausalLM.from_pretrained(merged)
    import torch
    ids = np.array([[3, 9, 14, 7, 21]], np.int32)
    with torch.no_grad():
        want_logits = tm(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(full.model.logits(full.state.params, ids)), want_logits, atol=1e-4,
                               rtol=1e-4)


def test_lora_quickstart_config_runs_from_the_cli(tmp_path):
    """configs/quickstart_sft_lora.yaml as shipped (use_peft + lora_* keys), shortened: the CLI trains adapters
    and writes PEFT's adapter directory."""
    import json

    from trl_jax import cli

    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "qs"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = cli.main(["sft", "--config", str(root / "configs" / "quickstart_sft_lora.yaml"), "--max_steps", "2",
                       "--model_name_or_path", "builtin:tiny-qwen3", "--output_dir", str(out),
                       "--dataset_test_split", "none"])
    assert rc in (0, None)
    cfg = json.load(open(out / "adapter_config.json"))
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"], cfg["modules_to_save"]) == \
        (64, 64, "all-linear", ["embed_tokens", "lm_head"])
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
