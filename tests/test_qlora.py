"""QLoRA: the frozen base in bitsandbytes' 4-bit formats (NF4, FP4), LoRA adapters trained on top.

Checked against bitsandbytes itself (its CPU backend): the stored codes and scales equal ``quantize_4bit``'s byte
for byte and the dequantized kernels equal ``dequantize_4bit``'s exactly; a transformers model loaded with
``BitsAndBytesConfig(load_in_4bit=True)`` plus PEFT adapters gives trl_jax's logits; and SFT with
``load_in_4bit`` + LoRA reproduces TRL + peft + bitsandbytes' per-step log over 10 steps."""

from __future__ import annotations

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from model_fixtures import make_torch_model, padded_batch, save_torch_model, torch_logits  # noqa: E402
from trl_jax.models import from_pretrained  # noqa: E402
from trl_jax.models.peft_io import load_adapter, quantize_model  # noqa: E402
from trl_jax.models.quant import dequantize_kernel, quantize_kernel  # noqa: E402

DIMS = dict(hidden_size=64, intermediate_size=128)  # input sizes multiples of the 64-element block


def char_qwen3(model_dir) -> None:
    """A tiny random Qwen3 (``DIMS``) with the built-in character tokenizer, saved to ``model_dir``."""
    from trl_jax.assets import build_char_tokenizer

    tok = build_char_tokenizer()
    tm = make_torch_model("qwen3", **DIMS, head_dim=16, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id)
    save_torch_model(tm, model_dir)
    tok.save_pretrained(str(model_dir))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("kshape,n_in", [((128, 4, 16), 1), ((4, 32, 64), 2), ((192, 64), 1)])
def test_codes_and_dequantized_kernels_equal_bitsandbytes(quant_type, kshape, n_in):
    k = np.random.default_rng(0).normal(size=kshape).astype(np.float32) * 0.05
    IN = int(np.prod(kshape[:n_in]))
    w = torch.tensor(k.reshape(IN, -1).T.copy())  # the torch Linear weight [out, in]
    q_ref, state = BF.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    kq, ka = quantize_kernel(jnp.asarray(k), n_in, quant_type)
    np.testing.assert_array_equal(np.asarray(kq).reshape(IN // 2, -1).T.reshape(-1), q_ref.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(ka).reshape(IN // 64, -1).T.reshape(-1), state.absmax.numpy())
    ours = np.asarray(dequantize_kernel(kq, ka, kshape[:n_in], quant_type)).reshape(IN, -1).T
    np.testing.assert_array_equal(ours, BF.dequantize_4bit(q_ref, state).numpy())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_model_with_peft_adapters_equals_transformers_bitsandbytes(quant_type, tmp_path):
    tm = make_torch_model("llama", **DIMS)
    base = save_torch_model(tm, tmp_path / "base")
    qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                           bnb_4bit_compute_dtype=torch.float32)
    tq = transformers.AutoModelForCausalLM.from_pretrained(base, quantization_config=qcfg, device_map="cpu",
                                                           attn_implementation="eager")
    torch.manual_seed(0)
    pm = peft.get_peft_model(tq, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"],
                                                 init_lora_weights=False)).eval()
    pm.save_pretrained(str(tmp_path / "adapter"))
    ids, mask, pos = padded_batch()
    want = torch_logits(pm, ids, mask, pos)

    model, params = from_pretrained(base)
    qmodel, qparams = quantize_model(model, params, quant_type)
    assert qparams["layers_0"]["self_attn"]["q_proj"]["kernel_q"].dtype == jnp.uint8 if not \
        qmodel.config.scan_layers else qparams["layers"]["self_attn"]["q_proj"]["kernel_q"].dtype == jnp.uint8
    lmodel, lparams = load_adapter(tmp_path / "adapter", qmodel, qparams)
    got = np.asarray(lmodel.logits(lparams, jnp.asarray(ids), jnp.asarray(pos), attention_mask=jnp.asarray(mask)))
    keep = mask.astype(bool)
    np.testing.assert_allclose(got[keep], want[keep], atol=1e-4, rtol=1e-4)
    # 4 bits per projection weight (+ fp32 scales per 64): the base's projection bytes drop ~7x from fp32
    proj = lambda tree: sum(x.nbytes for p, x in jax.tree_util.tree_leaves_with_path(tree)  # noqa: E731
                            if "proj" in jax.tree_util.keystr(p) and "lora" not in jax.tree_util.keystr(p))
    assert proj(params) / proj(qparams) > 6.5


def test_qlora_sft_loss_curve_equals_trl_peft_bitsandbytes(tmp_path):
    import trl
    from transformers import AutoTokenizer

    import test_lora_trainers as tl
    pt = tl.pt
    from trl_jax.configs import SFTConfig
    from trl_jax.trainers import SFTTrainer

    steps = 10
    model_dir = str(tmp_path / "model")
    char_qwen3(model_dir)
    case = pt.CASES["sft-adamw"]
    ds = pt.make_dataset("sft", pt.rows_needed(case, steps))
    qcfg = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    kw = pt._args_kwargs(case, steps, str(tmp_path / "trl"))
    kw.update(use_cpu=True, dataloader_num_workers=0, max_steps=steps,
              model_init_kwargs={"quantization_config": transformers.BitsAndBytesConfig(
                  **qcfg, bnb_4bit_compute_dtype=torch.float32), "device_map": "cpu", "dtype": torch.float32})
    torch.manual_seed(0)
    lora = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trl_tr = trl.SFTTrainer(model=model_dir, args=trl.SFTConfig(**kw), train_dataset=ds,
                            processing_class=AutoTokenizer.from_pretrained(model_dir),
                            peft_config=peft.LoraConfig(**lora))
    init = tmp_path / "init"
    trl_tr.model.save_pretrained(str(init))
    with contextlib.redirect_stdout(io.StringIO()):
        trl_tr.train()
    trl_logs = pt._step_logs(trl_tr.state.log_history)

    jkw = pt._args_kwargs(case, steps, str(tmp_path / "jax"))
    jkw.update(mesh_shape=(1, 1, 1), max_steps=steps, model_init_kwargs={"quantization_config": qcfg})
    jt = SFTTrainer(str(init), args=SFTConfig(**jkw), train_dataset=ds)
    assert jt.model.config.quantization == "nf4"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        jt.train()
    jax_logs = pt._step_logs(jt.log_history)
    cmp = pt.compare(trl_logs, jax_logs, rtol=1e-3)
    assert cmp.only_trl == [] and cmp.only_jax == [], (cmp.only_trl, cmp.only_jax)
    # TRL's logged grad_norm comes out at bf16 resolution in this set-up (every value a multiple of 2^-6 in [2, 4):
    # 3.484375, 3.59375, ...), so it is compared within half a bf16 step; everything else within 1e-3.
    trl_gn = np.asarray(cmp.curves["grad_norm"][0])
    assert np.all(trl_gn * 2 ** 7 == np.round(trl_gn * 2 ** 7)), trl_gn
    tol = {"grad_norm": 2.0 ** -8}
    bad = {k: (v, cmp.curves[k]) for k, v in cmp.max_rel.items() if not v <= tol.get(k, 1e-3)}
    assert not bad, bad
    losses = cmp.curves["loss"][0]
    assert max(abs(x - losses[0]) for x in losses) > 1e-2 * abs(losses[0]), losses


def test_qlora_grpo_trains_adapters_on_a_4bit_base_and_samples_with_it(tmp_path):
    """GRPO with `load_in_4bit` + LoRA on the built-in tiny model: sampling and training run on the 4-bit base
    (uint8 codes in the state, unchanged by training), the adapters learn, the adapter directory is PEFT's."""
    from trl_jax.configs import GRPOConfig
    from trl_jax.data.builtin import load_builtin_dataset
    from trl_jax.models.lora import LoraConfig
    from trl_jax.trainers import GRPOTrainer

    def reward(completions, **kw):  # varies within a group even when every completion runs to the length cap
        from trl_jax.rewards import completion_text
        return [float(len(set(completion_text(c)))) for c in completions]

    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, max_steps=2, bf16=False, mesh_shape=(1, 1, 1), report_to="none",
                      save_strategy="no", logging_steps=1, disable_tqdm=True, learning_rate=5e-2, beta=0.04,
                      model_init_kwargs={"quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}})
    model_dir = tmp_path / "model"
    char_qwen3(model_dir)
    tr = GRPOTrainer(str(model_dir), reward_funcs=reward, args=args, peft_config=LoraConfig(r=4, lora_alpha=8),
                     train_dataset=load_builtin_dataset("arithmetic_prompts").select(range(8)))
    q0 = np.asarray(jax.device_get(tr.params["layers_0"]["self_attn"]["q_proj"]["kernel_q"])) if "layers_0" in \
        tr.params else np.asarray(jax.device_get(tr.params["layers"]["self_attn"]["q_proj"]["kernel_q"]))
    tr.train()
    p = tr.state.params
    node = p["layers_0"]["self_attn"] if "layers_0" in p else p["layers"]["self_attn"]
    np.testing.assert_array_equal(np.asarray(node["q_proj"]["kernel_q"]), q0)
    assert np.abs(np.asarray(node["q_proj"]["lora_b"])).max() > 0, [{k: r.get(k) for k in ("loss", "grad_norm", "reward", "reward_std", "skipped_updates")} for r in tr.log_history]
    assert all(np.isfinite(r["loss"]) for r in tr.log_history if "loss" in r)
    assert tr.state.ref_params is None
    out = tr.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists() and out
    merged = tr.save_model(str(tmp_path / "merged"), merged=True)
    back = transformers.AutoModelForCausalLM.from_pretrained(merged)
    ids = np.array([[5, 9, 13, 2, 7]], np.int32)
    with torch.no_grad():
        want = back(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(tr.model.logits(p, ids)), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quant", [{"load_in_4bit": True}, {"load_in_8bit": True}])
def test_bf16_frozen_base_keeps_the_quantization_scales_fp32(quant, tmp_path):
    """Under ``bf16`` the frozen base is held in bf16, except the 4-/8-bit scales (``kernel_absmax``,
    ``kernel_scb``): fp32, as bitsandbytes keeps them; the codes stay integers, the adapters in ``param_dtype``."""
    from trl_jax.configs import SFTConfig
    from trl_jax.data.loading import load_dataset_any
    from trl_jax.models.lora import LoraConfig
    from trl_jax.trainers import SFTTrainer

    char_qwen3(tmp_path / "model")
    tr = SFTTrainer(str(tmp_path / "model"), peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                    args=SFTConfig(output_dir=str(tmp_path / "out"), bf16=True, report_to="none", max_steps=1,
                                   model_init_kwargs={"quantization_config": quant}),
                    train_dataset=load_dataset_any("builtin:arithmetic_sft").select(range(8)))
    dtypes = {jax.tree_util.keystr(p).split("'")[-2]: str(x.dtype)
              for p, x in jax.tree_util.tree_leaves_with_path(tr.params)}
    scale, codes = ("kernel_absmax", "kernel_q") if "load_in_4bit" in quant else ("kernel_scb", "kernel_int8")
    assert dtypes[scale] == "float32" and dtypes[codes] in ("uint8", "int8")
    assert dtypes["lora_a"] == dtypes["lora_b"] == "float32"
    assert dtypes["scale"] == "bfloat16" and dtypes["embedding"] == "bfloat16"
