"""LoRA on an 8-bit base (``load_in_8bit``, bitsandbytes' LLM.int8), checked against bitsandbytes itself (its CPU
backend): the stored ``CB`` / ``SCB`` equal ``Int8Params``' byte for byte; the LLM.int8 matmul equals
``Linear8bitLt``'s (``MatMul8bitLt``) bit for bit and its input gradient to 1e-6, with and without outlier
columns; a transformers model loaded with ``BitsAndBytesConfig(load_in_8bit=True)`` plus PEFT adapters gives
trl_jax's logits; SFT with ``load_in_8bit`` + LoRA reproduces TRL + peft + bitsandbytes' per-step log over 10 steps.

Two set-up choices on the TRL side, both about TRL/bitsandbytes on CPU rather than the 8-bit math:

* bitsandbytes 0.50.2 *trains* on CPU through ``MatMul8bitFp`` (dequantize, then a plain matmul: no activation
  quantization, "no fast int8 kernels on CPU"); on CUDA, and in eval mode everywhere, it runs ``MatMul8bitLt``
  (LLM.int8). trl_jax computes LLM.int8 always, so the TRL run routes CPU training through ``MatMul8bitLt``
  (``trl_jax_compare.worker.llm_int8_training``: the computation TRL trains with on a GPU).
* TRL casts the LoRA weights of a quantized model to bf16 (its QLoRA recipe); trl_jax keeps adapters fp32 (as
  its 4-bit path does), so the comparison puts TRL's back to fp32.
"""

from __future__ import annotations

import contextlib
import io
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from model_fixtures import make_torch_model, padded_batch, save_torch_model  # noqa: E402
from test_qlora import DIMS, char_qwen3  # noqa: E402
from trl_jax.models import from_pretrained  # noqa: E402
from trl_jax.models.peft_io import load_adapter, quantize_model  # noqa: E402
from trl_jax.models.quant import dequantize_model_params, int8_matmul, quantize_int8_kernel  # noqa: E402
from trl_jax_compare.worker import llm_int8_training  # noqa: E402


def _linear8bit(w: np.ndarray, b, threshold: float):
    lin = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=b is not None, has_fp16_weights=False,
                              threshold=threshold)
    lin.weight = bnb.nn.Int8Params(torch.tensor(w), requires_grad=False, has_fp16_weights=False)
    if b is not None:
        lin.bias = torch.nn.Parameter(torch.tensor(b))
    return lin.to("cpu").eval()  # eval: MatMul8bitLt on CPU


@pytest.mark.parametrize("kshape,n_in", [((128, 4, 16), 1), ((4, 32, 64), 2), ((100, 48), 1)])
def test_int8_storage_equals_bitsandbytes_int8params(kshape, n_in):
    k = np.random.default_rng(0).normal(size=kshape).astype(np.float32) * 0.05
    k[..., 3] = 0.0  # an all-zero output row: SCB 0, codes 0
    IN = int(np.prod(kshape[:n_in]))
    w = torch.tensor(k.reshape(IN, -1).T.copy())  # the torch Linear weight [out, in]
    p = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False).to("cpu")
    kq, ks = quantize_int8_kernel(jnp.asarray(k), n_in)
    assert kq.dtype == jnp.int8 and ks.dtype == jnp.float32 and kq.shape == kshape
    np.testing.assert_array_equal(np.asarray(kq).reshape(IN, -1).T, p.CB.numpy())
    np.testing.assert_array_equal(np.asarray(ks).reshape(-1), p.SCB.numpy())


@pytest.mark.parametrize("outliers", [True, False])
@pytest.mark.parametrize("kshape,n_in,bias", [((96, 40), 1, True), ((4, 16, 24), 2, False), ((64, 2, 8), 1, True)])
def test_llm_int8_matmul_and_input_grad_equal_linear8bitlt(kshape, n_in, bias, outliers):
    """Forward: bit-equal to ``MatMul8bitLt`` (int32 products, the same fp32 dequantization; the outlier columns'
    fp32 matmul agrees to 1e-6). Input gradient: ``dy @ (CB * SCB / 127)`` in fp32, within 1e-6 (summation
    order). Bias gradient: ``sum dy``."""
    rng = np.random.default_rng(1)
    k = rng.normal(size=kshape).astype(np.float32) * 0.05
    IN = int(np.prod(kshape[:n_in]))
    w = k.reshape(IN, -1).T.copy()
    b = rng.normal(size=kshape[n_in:]).astype(np.float32) if bias else None
    x = rng.normal(size=(3, 5) + kshape[:n_in]).astype(np.float32) * 1.5
    xf = x.reshape(3, 5, IN)
    if outliers:  # |x| >= 6 in three columns (one exactly at the threshold), and a whole row of them
        xf[0, 1, 7], xf[2, 3, 20], xf[1, 1, 50 % IN] = 9.0, -7.5, 6.0
    else:
        xf = np.clip(xf, -5.9, 5.9)
    x = xf.reshape(x.shape)
    lin = _linear8bit(w, None if b is None else b.reshape(-1), threshold=6.0)
    kq, ks = quantize_int8_kernel(jnp.asarray(k), n_in)
    xt = torch.tensor(xf, requires_grad=True)
    y = lin(xt)
    assert (lin.state.idx.numel() > 0) == outliers
    g = rng.normal(size=y.shape).astype(np.float32)
    y.backward(torch.tensor(g))

    def f(x, bb):
        return int8_matmul(x, kq, ks, bb, n_in=n_in, threshold=6.0)

    yj, vjp = jax.vjp(f, jnp.asarray(x), None if b is None else jnp.asarray(b))
    dx, db = vjp(jnp.asarray(g.reshape(yj.shape)))
    yj = np.asarray(yj).reshape(y.shape)
    if outliers:
        np.testing.assert_allclose(yj, y.detach().numpy(), rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(yj, y.detach().numpy())
    np.testing.assert_allclose(np.asarray(dx).reshape(xt.shape), xt.grad.numpy(), rtol=1e-6, atol=1e-6)
    if b is not None:
        np.testing.assert_allclose(np.asarray(db).reshape(-1), g.sum((0, 1)), rtol=1e-6, atol=1e-6)
    # threshold 0: no outlier decomposition (bitsandbytes' int8_scaled_mm alone)
    lin0 = _linear8bit(w, None if b is None else b.reshape(-1), threshold=0.0)
    with torch.no_grad():
        y0 = lin0(torch.tensor(xf)).numpy()
    y0j = int8_matmul(jnp.asarray(x), kq, ks, None if b is None else jnp.asarray(b), n_in=n_in, threshold=0.0)
    np.testing.assert_array_equal(np.asarray(y0j).reshape(y0.shape), y0)


def _outlier_model(name, **kw):
    """A tiny model whose first hidden features come out of the norms 8x larger: attention and MLP inputs with
    columns past LLM.int8's threshold (6.0), so the outlier decomposition runs."""
    tm = make_torch_model(name, **kw)
    with torch.no_grad():
        for layer in tm.model.layers:
            layer.input_layernorm.weight[:4] *= 8.0
            layer.post_attention_layernorm.weight[:3] *= 8.0
    return tm


def _packed(ids, mask):
    """The real tokens of a padded batch as one padding-free row (positions restarting per document): what
    bitsandbytes sees of the batch without its padding rows."""
    keep = mask.astype(bool)
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids[keep][None], pos[keep][None]


def test_8bit_model_with_peft_adapters_equals_transformers_bitsandbytes(tmp_path):
    """trl_jax on a padded batch (right- and left-padded rows) = transformers + bitsandbytes on the same tokens
    packed into one padding-free row: LLM.int8's outlier columns are the same real tokens' (bitsandbytes counts
    padding rows too; trl_jax leaves them out, so a padded batch agrees with bitsandbytes run without padding).

    Every one of the 14 8-bit layers, fed the activations bitsandbytes saw in the model, gives its output bit for
    bit. The logits agree to ~1e-6 on all but a few tokens: LLM.int8 rounds activations (to fp16, then to int8
    codes), so a last-bit difference upstream of a projection (attention and norms sum in other orders in XLA and
    torch) moves a value sitting at a rounding tie by one code, and that token's logits by up to ~1e-2 here."""
    tm = _outlier_model("llama", **DIMS)
    base = save_torch_model(tm, tmp_path / "base")
    tq = transformers.AutoModelForCausalLM.from_pretrained(
        base, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True), device_map="cpu",
        dtype=torch.float32, attn_implementation="eager")
    assert isinstance(tq.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    assert not isinstance(tq.lm_head, bnb.nn.Linear8bitLt)
    cb = tq.model.layers[0].self_attn.q_proj.weight.data.numpy().copy()  # Int8Params' CB after loading
    torch.manual_seed(0)
    pm = peft.get_peft_model(tq, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"],
                                                 init_lora_weights=False)).eval()
    pm.save_pretrained(str(tmp_path / "adapter"))
    ids, mask, pos = padded_batch()
    pids, ppos = _packed(ids, mask)
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, i[0].detach().clone(), o.detach().clone())))
             for m in tq.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    with torch.no_grad():
        want = pm(input_ids=torch.as_tensor(pids, dtype=torch.long), position_ids=torch.as_tensor(ppos),
                  use_cache=False).logits[0].numpy()
    for h in hooks:
        h.remove()
    assert len(seen) == 14
    for m, x, y in seen:  # layer by layer on the model's own activations: bit-equal
        mine = int8_matmul(jnp.asarray(x.numpy()), jnp.asarray(m.state.CB.numpy().T), jnp.asarray(m.state.SCB.numpy()),
                           None if m.bias is None else jnp.asarray(m.bias.detach().numpy()), threshold=6.0)
        np.testing.assert_array_equal(np.asarray(mine), y.numpy())
    state = tq.model.layers[0].self_attn.q_proj.base_layer.state
    assert state.idx.numel() > 0  # outlier columns were decomposed
    scb = state.SCB

    model, params = from_pretrained(base)
    qmodel, qparams = quantize_model(model, params, "int8")
    node = (qparams["layers"] if qmodel.config.scan_layers else qparams["layers_0"])["self_attn"]["q_proj"]
    assert node["kernel_int8"].dtype == jnp.int8 and node["kernel_scb"].dtype == jnp.float32
    ours = np.asarray(node["kernel_int8"][0] if qmodel.config.scan_layers else node["kernel_int8"]).reshape(64, -1).T
    np.testing.assert_array_equal(ours, cb)
    lmodel, lparams = load_adapter(tmp_path / "adapter", qmodel, qparams)
    got = np.asarray(lmodel.logits(lparams, jnp.asarray(ids), jnp.asarray(pos), attention_mask=jnp.asarray(mask)))
    err = np.abs(got[mask.astype(bool)] - want).max(-1)  # per token, 24 tokens
    assert np.sum(err > 1e-5) <= 3 and err.max() < 2e-2, err
    # merging (save_model(merged=True)) dequantizes as PEFT does: CB * SCB / 127
    deq = dequantize_model_params(qmodel, qparams)
    k = (deq["layers"] if qmodel.config.scan_layers else deq["layers_0"])["self_attn"]["q_proj"]["kernel"]
    k = np.asarray(k[0] if qmodel.config.scan_layers else k).reshape(64, -1).T
    np.testing.assert_array_equal(k, BF.int8_vectorwise_dequant(torch.tensor(cb), scb).numpy())
    # 8 bits per projection weight (+ one fp32 scale per output feature): ~4x fewer bytes than fp32
    proj = lambda tree: sum(x.nbytes for p, x in jax.tree_util.tree_leaves_with_path(tree)  # noqa: E731
                            if "proj" in jax.tree_util.keystr(p) and "lora" not in jax.tree_util.keystr(p))
    assert 3.7 < proj(params) / proj(qparams) <= 4.0


def test_8bit_lora_sft_loss_curve_equals_trl_peft_bitsandbytes(tmp_path):
    """10 SFT steps, LoRA on all linear layers of an 8-bit base: TRL + peft + bitsandbytes (``MatMul8bitLt``, see
    the module docstring) against trl_jax, padding-free on both sides (bitsandbytes takes outlier columns over
    every row it is given, padding included, and transformers' padding rows are not trl_jax's; packed rows have
    none). Some projection calls do have outlier columns (pre-hooks count them)."""
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
    kw = pt._args_kwargs(case, steps, str(tmp_path / "trl"))
    kw.update(use_cpu=True, dataloader_num_workers=0, max_steps=steps, padding_free=True, max_length=None,
              model_init_kwargs={"quantization_config": transformers.BitsAndBytesConfig(load_in_8bit=True),
                                 "device_map": "cpu", "dtype": torch.float32})
    torch.manual_seed(0)
    lora = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trl_tr = trl.SFTTrainer(model=model_dir, args=trl.SFTConfig(**kw), train_dataset=ds,
                            processing_class=AutoTokenizer.from_pretrained(model_dir),
                            peft_config=peft.LoraConfig(**lora))
    # TRL casts the adapters of a quantized model to bf16 (its QLoRA recipe, 4- and 8-bit alike); trl_jax keeps
    # them fp32 (as its 4-bit path does), so they are put back to fp32 here to compare the 8-bit base alone
    lora_params = [p for p in trl_tr.model.parameters() if p.requires_grad]
    assert lora_params and all(p.dtype == torch.bfloat16 for p in lora_params)
    for p in lora_params:
        p.data = p.data.float()
    init = tmp_path / "init"
    trl_tr.model.save_pretrained(str(init))
    outlier_calls = []
    for m in trl_tr.model.modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            m.register_forward_pre_hook(lambda m, i: outlier_calls.append(bool((i[0].abs() >= 6.0).any())))
    with contextlib.redirect_stdout(io.StringIO()), llm_int8_training(True):
        trl_tr.train()
    assert sum(outlier_calls) >= 5, (sum(outlier_calls), len(outlier_calls))  # 20 of 140 calls here
    trl_logs = pt._step_logs(trl_tr.state.log_history)

    jkw = pt._args_kwargs(case, steps, str(tmp_path / "jax"))
    jkw.update(mesh_shape=(1, 1, 1), max_steps=steps, padding_free=True, max_length=None,
               model_init_kwargs={"quantization_config": transformers.BitsAndBytesConfig(load_in_8bit=True)})
    jt = SFTTrainer(str(init), args=SFTConfig(**jkw), train_dataset=ds)
    assert jt.model.config.quantization == "int8" and jt.model.config.llm_int8_threshold == 6.0
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        jt.train()
    jax_logs = pt._step_logs(jt.log_history)
    cmp = pt.compare(trl_logs, jax_logs, rtol=1e-4)
    assert cmp.only_trl == [] and cmp.only_jax == [], (cmp.only_trl, cmp.only_jax)
    # every logged value (loss, grad_norm, entropy, accuracy, ...) within 1e-4 relative (measured: < 5e-7)
    bad = {k: (v, cmp.curves[k]) for k, v in cmp.max_rel.items() if not v <= 1e-4}
    assert not bad, bad
    losses = cmp.curves["loss"][0]
    assert max(abs(x - losses[0]) for x in losses) > 1e-2 * abs(losses[0]), losses


def test_8bit_refusals_name_the_fix():
    from trl_jax.trainers.peft import PeftMixin

    def quant(qc):
        m = PeftMixin()
        m.args = types.SimpleNamespace(model_init_kwargs={"quantization_config": qc})
        return m

    assert quant({"load_in_8bit": True})._quantization_type() == "int8"
    bnb_cfg = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=3.0)
    assert quant(bnb_cfg)._quantization_type() == "int8" and quant(bnb_cfg)._llm_int8_threshold() == 3.0
    assert quant({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"})._quantization_type() == "nf4"
    with pytest.raises(ValueError, match="load_in_8bit and load_in_4bit are both set: choose one"):
        quant({"load_in_8bit": True, "load_in_4bit": True})._quantization_type()
    with pytest.raises(ValueError, match="llm_int8_has_fp16_weight.*leave it off"):
        quant({"load_in_8bit": True, "llm_int8_has_fp16_weight": True})._quantization_type()
    with pytest.raises(ValueError, match="llm_int8_skip_modules.*leave it unset"):
        quant({"load_in_8bit": True, "llm_int8_skip_modules": ["mlp"]})._quantization_type()
    quant({"load_in_8bit": True, "llm_int8_skip_modules": ["lm_head"]})._quantization_type()
    with pytest.raises(ValueError, match="load_in_8bit.*pass a peft_config"):
        quant({"load_in_8bit": True})._setup_peft(None, None, "model", None)


def test_8bit_mixture_of_experts_keeps_experts_unquantized_as_bitsandbytes(tmp_path):
    """Qwen3-MoE with ``load_in_8bit`` + LoRA on the attention projections: transformers stores the experts (and
    the router) as parameters, not ``nn.Linear``, so bitsandbytes quantizes only the attention projections; trl_jax
    does the same (its expert kernels stay in the compute dtype) and gives the same logits. ``all-linear`` (which
    PEFT extends to the experts and router through ``target_parameters``) and MLP names are refused."""
    tm = make_torch_model("qwen3_moe", **DIMS)
    base = save_torch_model(tm, tmp_path / "base")
    tq = transformers.AutoModelForCausalLM.from_pretrained(
        base, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True), device_map="cpu",
        dtype=torch.float32, attn_implementation="eager")
    torch.manual_seed(0)
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    pm = peft.get_peft_model(tq, peft.LoraConfig(r=4, lora_alpha=8, target_modules=attention,
                                                 init_lora_weights=False)).eval()
    assert isinstance(tq.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear8bitLt)
    assert not any(isinstance(m, bnb.nn.Linear8bitLt) for m in tq.model.layers[0].mlp.modules())
    pm.save_pretrained(str(tmp_path / "adapter"))
    ids, mask, pos = padded_batch()
    pids, ppos = _packed(ids, mask)
    with torch.no_grad():
        want = pm(input_ids=torch.as_tensor(pids, dtype=torch.long), position_ids=torch.as_tensor(ppos),
                  use_cache=False).logits[0].numpy()
    model, params = from_pretrained(base)
    qmodel, qparams = quantize_model(model, params, "int8")
    mlp = qparams["layers"]["mlp"]
    assert set(mlp["gate_proj"]) == {"kernel"} and "kernel_int8" in qparams["layers"]["self_attn"]["q_proj"]
    lmodel, lparams = load_adapter(tmp_path / "adapter", qmodel, qparams)
    assert set(lparams["layers"]["mlp"]["up_proj"]) == {"kernel"}  # no adapters on the experts
    got = np.asarray(lmodel.logits(lparams, jnp.asarray(ids), jnp.asarray(pos), attention_mask=jnp.asarray(mask)))
    err = np.abs(got[mask.astype(bool)] - want).max(-1)
    assert np.sum(err > 1e-5) <= 3 and err.max() < 2e-2, err
    from trl_jax.models.lora import resolve_lora

    for target, match in (("all-linear", "target_parameters"), (["gate_proj"], "matches no linear layer")):
        with pytest.raises(ValueError, match=match):
            resolve_lora({"r": 4, "target_modules": target}, model.config)
