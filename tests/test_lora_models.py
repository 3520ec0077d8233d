"""LoRA / rsLoRA / DoRA adapters: trl_jax's adapted decoder against PEFT on the transformers PyTorch model.

Random adapters are built by PEFT (``init_lora_weights=False``: A and B both random), saved in PEFT's format and
loaded by trl_jax, and trl_jax's adapters saved in PEFT's format load in ``peft.PeftModel`` -- logits equal within
1e-4 (fp32) both ways, for several target sets."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from model_fixtures import make_torch_model, padded_batch, save_torch_model, torch_logits
from trl_jax.models import from_pretrained, save_pretrained
from trl_jax.models.lora import (LoraConfig, count_params, merge_adapters, partition, resolve_lora,
                                 trainable_names, without_adapters)
from trl_jax.models.peft_io import add_adapters, load_adapter, save_adapter, with_lora

CASES = {
    "qv": dict(target_modules=["q_proj", "v_proj"]),
    "all_linear_rslora": dict(target_modules="all-linear", use_rslora=True),
    "regex_layer1_dora": dict(target_modules=r".*\.1\.(self_attn\.o_proj|mlp\.down_proj)", use_dora=True),
    "layers_to_transform_save_head": dict(target_modules=["k_proj", "gate_proj"], layers_to_transform=[0],
                                          modules_to_save=["lm_head"]),
    # tied embeddings: the trained embedding copy feeds the input only, the head keeps the original (PEFT's rule)
    "tied_save_embedding": dict(target_modules=["v_proj"], modules_to_save=["embed_tokens"]),
    # Phi-3's fused qkv_proj / gate_up_proj: one PEFT adapter per fused module (a shared A, B split by rows)
    "phi3_qkv_o": dict(target_modules=["qkv_proj", "o_proj"]),
    "phi3_all_linear_rslora": dict(target_modules="all-linear", use_rslora=True),
    "phi3_gate_up_dora": dict(target_modules=["gate_up_proj"], use_dora=True),
}


def _arch(case):
    if case.startswith("phi3"):
        return "phi3"
    return {"qv": "qwen2", "tied_save_embedding": "qwen3"}.get(case, "llama")  # qwen2: q/k/v biases; qwen3: tied


def _peft_model(tm, case, seed=0, **extra):
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
                          **{**CASES.get(case, {}), **extra})
    pm = peft.get_peft_model(tm, cfg)
    with torch.no_grad():  # DoRA magnitudes and saved modules off their initial values too
        g = torch.Generator().manual_seed(seed + 1)
        for n, p in pm.named_parameters():
            if "lora_magnitude" in n or "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return pm.eval()


def _close(got, want, mask):
    """Equal within 1e-4 on the real tokens (padding positions' logits are not defined the same way)."""
    keep = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.asarray(got)[keep], np.asarray(want)[keep], atol=1e-4, rtol=1e-4)


def _jax_logits(model, params, ids, mask, pos):
    return np.asarray(model.logits(params, jnp.asarray(ids), jnp.asarray(pos), attention_mask=jnp.asarray(mask)))


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_with_equal_logits_and_saves_back(case, tmp_path):
    arch = _arch(case)
    tm = make_torch_model(arch)
    base_dir = save_torch_model(tm, tmp_path / "base")
    pm = _peft_model(tm, case)
    pm.save_pretrained(str(tmp_path / "adapter"))
    ids, mask, pos = padded_batch()
    want = torch_logits(pm, ids, mask, pos)

    scan = "layers_to_transform" not in CASES[case] and "regex" not in case
    model, params = from_pretrained(base_dir, scan_layers=scan)
    lmodel, lparams = load_adapter(tmp_path / "adapter", model, params)
    _close(_jax_logits(lmodel, lparams, ids, mask, pos), want, mask)

    if case == "phi3_all_linear_rslora":  # the decode path's fused adapters (shared A passed to q/k/v, gate/up)
        _check_decoding(lmodel, lparams, ids[:1, :8])  # (8: within LongRoPE's short factors, cached or not)

    # the base (adapters removed from the tree) is the model PEFT runs with its adapters disabled
    with pm.disable_adapter():
        base_want = torch_logits(pm, ids, mask, pos)
    ref = without_adapters(lparams)
    for m in lmodel.config.lora.modules_to_save:  # PEFT's disabled adapter uses the original module
        ref[m] = params[m]
    _close(_jax_logits(lmodel, ref, ids, mask, pos), base_want, mask)

    # trl_jax's save -> PEFT load -> same logits
    out = tmp_path / "ours"
    save_adapter(lmodel, lparams, out, base_model_name_or_path=base_dir)
    back = peft.PeftModel.from_pretrained(make_torch_model(arch), str(out)).eval()
    _close(torch_logits(back, ids, mask, pos), want, mask)
    saved = json.load(open(out / "adapter_config.json"))
    assert saved["peft_type"] == "LORA"
    if arch == "phi3":  # PEFT's tensor names and shapes (fused modules, B rows in q,k,v / gate,up order)
        from safetensors.numpy import load_file
        theirs = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
        ours = load_file(str(out / "adapter_model.safetensors"))
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
        for k in theirs:
            np.testing.assert_allclose(ours[k], theirs[k], atol=1e-6, rtol=0, err_msg=k)
        assert sorted(saved["target_modules"]) == sorted(pm.peft_config["default"].target_modules)

    # merged into a plain model: same logits, saved as a full HF checkpoint transformers loads
    plain = with_lora(lmodel, None)
    merged = merge_adapters(lparams, lmodel.config.lora)
    _close(_jax_logits(plain, merged, ids, mask, pos), want, mask)
    save_pretrained(plain, merged, str(tmp_path / "merged"))
    import transformers
    full = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), attn_implementation="eager")
    _close(torch_logits(full, ids, mask, pos), want, mask)

    # trainable parameters: exactly PEFT's requires_grad set
    n_peft = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    names = trainable_names(lparams, lmodel.config.lora)
    trainable, _ = partition(lparams, lambda n: n in names)
    assert count_params(trainable) == n_peft


def _check_decoding(lmodel, lparams, ids, prompt=4):
    """Cached decoding (prefill ``prompt`` tokens, then token by token) gives the full forward's logits."""
    full = _jax_logits(lmodel, lparams, ids, np.ones_like(ids), np.arange(ids.shape[1])[None])
    cache = lmodel.init_cache(1, 16)
    logits, cache = lmodel.prefill(lparams, cache, jnp.asarray(ids[:1, :prompt]), logits_for="all")
    steps = [np.asarray(logits)[0]]
    for t in range(prompt, ids.shape[1]):
        lg, cache = lmodel.decode_step(lparams, cache, jnp.asarray(ids[:1, t]), jnp.asarray([t]))
        steps.append(np.asarray(lg))
    got = np.concatenate([steps[0], np.stack([s[0] for s in steps[1:]])])
    np.testing.assert_allclose(got, full[0], atol=1e-4, rtol=1e-4)


def test_new_adapters_start_as_the_base_and_decode_like_the_forward(tmp_path):
    tm = make_torch_model("qwen3")
    model, params = from_pretrained(save_torch_model(tm, tmp_path / "base"))
    spec = resolve_lora(LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", use_dora=True), model.config)
    lmodel, lparams = add_adapters(model, params, spec, rng=jax.random.PRNGKey(3))
    ids, mask, pos = padded_batch()
    # B = 0 and DoRA magnitude = ||W||: the adapted model starts as the base
    _close(_jax_logits(lmodel, lparams, ids, mask, pos), torch_logits(tm, ids, mask, pos), mask)
    # random B: cached decoding (prefill + token by token) applies the adapters like the full forward
    lparams = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(len(str(p))), x.shape)
        if str(p).endswith("'lora_b']") else x, lparams)
    _check_decoding(lmodel, lparams, ids[:1], prompt=6)


def test_resolve_lora_errors_name_the_fix():
    model_cfg = from_pretrained.__globals__["config_from_hf"](make_torch_model("llama").config)
    with pytest.raises(ValueError, match="modules_to_save"):
        resolve_lora(LoraConfig(target_modules=["lm_head"]), model_cfg)
    with pytest.raises(ValueError, match="matches no linear layer"):
        resolve_lora(LoraConfig(target_modules=["c_attn"]), model_cfg)
    with pytest.raises(ValueError, match="init_lora_weights"):
        resolve_lora(LoraConfig(init_lora_weights="pissa"), model_cfg)
    spec = resolve_lora(LoraConfig(target_modules=["q_proj"], layers_to_transform=[1]), model_cfg)
    with pytest.raises(ValueError, match="scan_layers: false"):
        model_cfg.replace(lora=spec)
    assert spec.targets == ((), ("q_proj",))


def _fixed_keep(shape):
    """A deterministic dropout keep-mask, the same in torch and JAX for one input shape (drops every 10th value)."""
    return np.arange(int(np.prod(shape))).reshape(shape) % 10 != 3


class _FixedDropout(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return x * torch.as_tensor(_fixed_keep(tuple(x.shape))) / (1 - self.p)


def test_phi3_fused_shared_a_gradient_and_dropout_equal_peft(tmp_path, monkeypatch):
    """Phi-3, all-linear + DoRA + dropout: the gradient of the fused modules' shared A (one param: the sum over
    q, k, v / gate, up) equals torch autograd's on PEFT's fused ``lora_A``, and B's and the magnitudes' too; the
    dropout is one mask per PEFT module, applied to the fused module's input (masks made deterministic and equal
    on both sides, so the logits and gradients compare exactly). The gradients are taken on a (fsdp 2, tensor 4)
    mesh (8 simulated devices, as tests/run.sh sets), where the shared A sits on the input axis and the B parts on
    the q/k/v (gate/up) output axes, as their kernels."""
    from trl_jax.models.lora import dropout_rng

    p = 0.1
    tm = make_torch_model("phi3")
    base_dir = save_torch_model(tm, tmp_path / "base")
    pm = _peft_model(tm, None, target_modules="all-linear", use_dora=True, lora_dropout=p)
    pm.save_pretrained(str(tmp_path / "adapter"))
    n_modules = 0
    for m in pm.modules():
        if hasattr(m, "lora_dropout") and "default" in m.lora_dropout:
            m.lora_dropout["default"] = _FixedDropout(p)
            n_modules += 1
    assert n_modules == 8  # 2 layers x (qkv_proj, o_proj, gate_up_proj, down_proj)
    pm.train()
    ids, _, _ = padded_batch()  # full rows (no padding: every position is a real token)
    targets = ids[:, 1:]

    logits = pm(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits
    loss = -torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, torch.as_tensor(targets, dtype=torch.long)[
        ..., None]).mean()
    loss.backward()

    draws = []

    def fixed_bernoulli(key, prob=0.5, shape=None):
        draws.append(tuple(shape))
        return jnp.asarray(_fixed_keep(tuple(shape)))

    monkeypatch.setattr(jax.random, "bernoulli", fixed_bernoulli)
    # unrolled layers, run eagerly: every module's dropout call counted once
    umodel, uparams = load_adapter(tmp_path / "adapter", *from_pretrained(base_dir, scan_layers=False))
    with dropout_rng(jax.random.PRNGKey(0)):
        got = umodel.logits(uparams, jnp.asarray(ids))
    assert len(draws) == n_modules, draws  # one mask per fused module, shared by its parts
    np.testing.assert_allclose(np.asarray(got), logits.detach().numpy(), atol=1e-4, rtol=1e-4)

    mesh = None
    if jax.device_count() >= 8:
        mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    # scanned, rematerialised layers (a trainer's setup): dropout masks drawn per layer inside the remat'd scan
    lmodel, lparams = load_adapter(tmp_path / "adapter", *from_pretrained(base_dir, mesh=mesh, remat_policy="full"),
                                   mesh=mesh)
    if mesh is not None:
        P = jax.sharding.PartitionSpec
        attn, mlp = lparams["layers"]["self_attn"], lparams["layers"]["mlp"]
        assert attn["qkv_proj"]["lora_a"].sharding.spec == P(None, "fsdp", None)
        assert mlp["gate_up_proj"]["lora_a"].sharding.spec == P(None, "fsdp", None)
        assert attn["q_proj"]["lora_b"].sharding.spec == P(None, None, "tensor", None)
        assert mlp["up_proj"]["lora_b"].sharding.spec == P(None, None, "tensor")
        for node, parts in ((attn, ("q_proj", "k_proj", "v_proj")), (mlp, ("gate_proj", "up_proj"))):
            for q in parts:  # B's output axes as its kernel's (kv_heads 2 on tensor 4: replicated, as the kernel)
                kernel_spec = tuple(node[q]["kernel"].sharding.spec) + (None,) * 4
                b_spec = tuple(node[q]["lora_b"].sharding.spec) + (None,) * 4
                assert b_spec[2:node[q]["lora_b"].ndim] == kernel_spec[2:node[q]["kernel"].ndim], q

    def jax_loss(pr):
        with dropout_rng(jax.random.PRNGKey(0)):
            lg = lmodel.logits(pr, jnp.asarray(ids))
        lp = jax.nn.log_softmax(lg[:, :-1].astype(jnp.float32), -1)
        return -jnp.take_along_axis(lp, jnp.asarray(targets)[..., None], -1).mean()

    val, grads = jax.jit(jax.value_and_grad(jax_loss))(lparams)
    np.testing.assert_allclose(float(val), float(loss), rtol=1e-5)
    grads = jax.device_get(grads)
    named = dict(pm.named_parameters())
    for i in range(2):
        for group, fused, parts in (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                                    ("mlp", "gate_up_proj", ("gate_proj", "up_proj"))):
            g = grads["layers"][group]
            pre = f"base_model.model.model.layers.{i}.{group}.{fused}."
            a_want = named[pre + "lora_A.default.weight"].grad.numpy()  # [r, D]
            assert np.abs(a_want).max() > 1e-3
            np.testing.assert_allclose(g[fused]["lora_a"][i].T, a_want, atol=1e-5, rtol=0, err_msg=pre + "lora_A")
            b_got = np.concatenate([g[q]["lora_b"][i].reshape(4, -1).T for q in parts])
            np.testing.assert_allclose(b_got, named[pre + "lora_B.default.weight"].grad.numpy(), atol=1e-5, rtol=0)
            m_got = np.concatenate([g[q]["lora_magnitude"][i].reshape(-1) for q in parts])
            np.testing.assert_allclose(m_got, named[pre + "lora_magnitude_vector.default.weight"].grad.numpy(),
                                       atol=1e-5, rtol=0)


def test_phi3_targets_name_the_fused_modules():
    """Phi-3's PEFT targets are its checkpoint's modules: split names (``q_proj``) are refused naming ``qkv_proj``
    (PEFT would find no such module); ``all-linear`` is its four fused/plain modules per layer, saved in
    adapter_config.json as PEFT writes it (the modules' full names); other models are unchanged."""
    from model_fixtures import make_config
    from trl_jax.models.config import config_from_hf
    from trl_jax.models.peft_io import adapter_config_dict

    phi3 = config_from_hf(make_config("phi3"))
    for bad in (["q_proj", "v_proj"], ["qkv_proj", "up_proj"], ["self_attn.k_proj"]):
        with pytest.raises(ValueError, match="qkv_proj"):
            resolve_lora(LoraConfig(target_modules=bad), phi3)
    with pytest.raises(ValueError, match="target_modules must be given"):
        resolve_lora(LoraConfig(), phi3)
    with pytest.raises(ValueError, match="gate_up_proj"):
        resolve_lora(LoraConfig(target_modules=r".*\.q_proj"), phi3)
    spec = resolve_lora(LoraConfig(target_modules="all-linear"), phi3)
    assert spec.fused and spec.targets == (("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),) * 2
    assert spec.adapts("q_proj", None) and spec.adapts("up_proj", 1) and spec.adapts("qkv_proj", 0)
    names = adapter_config_dict(spec, None)["target_modules"]
    assert sorted(names) == sorted(f"model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"))
    assert resolve_lora(LoraConfig(target_modules=names), phi3).targets == spec.targets
    llama = resolve_lora(LoraConfig(target_modules="all-linear"), config_from_hf(make_config("llama")))
    assert not llama.fused and llama.targets[0] == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj")
    assert adapter_config_dict(llama, None)["target_modules"] == "all-linear"
