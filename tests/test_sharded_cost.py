"""Scale: every device does 1/N of a sharded step, fsdp moves weights (not logits), bf16 means bf16 matmuls.

Measured on the compiled, SPMD-partitioned programs with ``trl_jax.utils.hlo_cost`` (per-device matmul FLOPs and
collective bytes, loop trip counts included) on 8 simulated CPU devices, for the train step of every trainer.
"""

from __future__ import annotations

import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trl_jax.ops import fused_log_probs
from trl_jax.parallel import activation_sharding, make_mesh
from trl_jax.train import make_train_step
from trl_jax.utils.hlo_cost import hlo_cost

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices: tests/run.sh sets them")


def _mesh(shape):
    return make_mesh(shape, devices=jax.devices()[:math.prod(shape)])


# --------------------------------------------------------------------------------------------- fused log-probs


@pytest.mark.parametrize("shape", MESHES)
def test_fused_log_probs_on_a_mesh_equals_one_device(shape):
    """Values and gradients of the per-device (shard_map) path equal the single-device computation, with the
    vocabulary split over ``tensor`` (cross-shard log-sum-exp, entropy, argmax, log sum p^2)."""
    rng = np.random.default_rng(0)
    b, t, d, v = 8, 10, 16, 96
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(d, v)) * 0.7, jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
    mask = jnp.asarray(rng.random((b, t)) > 0.2)

    def f(h, w):
        lp, ent, top1, lsq = fused_log_probs(h, w, targets, chunk_size=24, temperature=0.7, return_entropy=True,
                                             return_top1=True, return_log_sum_sq_probs=True, mask=mask,
                                             final_logit_softcapping=5.0)
        return jnp.sum(lp) + 0.3 * jnp.sum(ent) + 0.1 * jnp.sum(lsq), (lp, ent, top1, lsq)

    grad = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
    (ref_val, ref_out), ref_g = jax.jit(grad)(hidden, weight)
    mesh = _mesh(shape)

    def sharded(h, w):
        with activation_sharding(mesh):
            return grad(h, w)

    (val, out), g = jax.jit(sharded)(hidden, weight)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    for a, r in zip(out, ref_out):
        if a.dtype == bool:
            np.testing.assert_array_equal(a, r)
        else:
            np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)
    for a, r in zip(g, ref_g):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-6)
    # the sharded program really is per device: 1/8 of the LM-head FLOPs each
    one = hlo_cost(jax.jit(grad).lower(hidden, weight).compile())["matmul_flops"]
    per = hlo_cost(jax.jit(sharded).lower(hidden, weight).compile())["matmul_flops"]
    assert per * 8 <= 1.15 * one, (per, one)


# --------------------------------------------------------------------------------------------- trainers


def _model_dir(root):
    """A Qwen3-shaped model whose heads, KV heads, MLP and vocabulary divide by 8 (so every mesh can split them)
    with the built-in character tokenizer (the model's vocabulary is padded past the tokenizer's, as Qwen's is)."""
    from transformers import AutoConfig

    from trl_jax.assets import build_char_tokenizer
    from trl_jax.models import CausalLM, config_from_hf, save_pretrained

    tok = build_char_tokenizer()
    hf = AutoConfig.for_model(
        "qwen3", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=8, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
        architectures=["Qwen3ForCausalLM"])
    model = CausalLM(config_from_hf(hf), hf_config=hf)
    path = os.path.join(root, "model")
    save_pretrained(model, model.init_params(jax.random.PRNGKey(0)), path, tokenizer=tok)
    return path


def _trainer(kind, model_dir, out, bf16=False):
    from trl_jax.configs import DPOConfig, GRPOConfig, KTOConfig, OnlineDPOConfig, RewardConfig, RLOOConfig, SFTConfig
    from trl_jax.data.builtin import load_builtin_dataset
    from trl_jax.trainers import (DPOTrainer, GRPOTrainer, KTOTrainer, OnlineDPOTrainer, RewardTrainer, RLOOTrainer,
                                  SFTTrainer)

    common = dict(output_dir=out, per_device_train_batch_size=8, max_steps=1, bf16=bf16, mesh_shape=(1, 1, 1),
                  gradient_checkpointing=False, disable_tqdm=True, report_to="none", save_strategy="no",
                  logging_steps=1)

    def reward(completions, **kw):
        return [float(len(str(c))) for c in completions]

    if kind == "sft":
        return SFTTrainer(model_dir, args=SFTConfig(max_length=32, **common),
                          train_dataset=load_builtin_dataset("arithmetic_sft").select(range(16)))
    if kind in ("dpo", "kto", "reward"):
        data = load_builtin_dataset("arithmetic_preference").select(range(16))
        if kind == "reward":
            return RewardTrainer(model_dir, args=RewardConfig(max_length=64, **common), train_dataset=data)
        if kind == "dpo":
            return DPOTrainer(model_dir, args=DPOConfig(max_length=32, **common), train_dataset=data)
        return KTOTrainer(model_dir, args=KTOConfig(max_length=32, **common), train_dataset=data)
    prompts = load_builtin_dataset("arithmetic_prompts").select(range(16))
    if kind == "distillation":
        from trl_jax.configs import DistillationConfig
        from trl_jax.trainers import DistillationTrainer

        return DistillationTrainer(model_dir, teacher_model=model_dir, train_dataset=prompts,
                                   args=DistillationConfig(max_completion_length=8, beta=0.5, **common))
    if kind == "grpo":
        return GRPOTrainer(model_dir, reward_funcs=reward, train_dataset=prompts,
                           args=GRPOConfig(num_generations=4, max_completion_length=8, beta=0.04, **common))
    if kind == "rloo":
        return RLOOTrainer(model_dir, reward_funcs=reward, train_dataset=prompts,
                           args=RLOOConfig(num_generations=4, max_completion_length=8, beta=0.05, **common))
    return OnlineDPOTrainer(model_dir, reward_funcs=reward, train_dataset=prompts,
                            args=OnlineDPOConfig(max_new_tokens=8, **common))


def _first_batch(tr):
    tr._build(1)
    if hasattr(tr, "_generation"):
        return {k: np.asarray(v) for k, v in tr._generation(0)[0][0].items()}
    return tr._batch_for_step(0)


def _step_cost(tr, batch, mesh, compute_dtype=None, text=False):
    step = make_train_step(tr.loss_fn, tr.optimizer, mesh=mesh, logical_axes=tr.model.logical_axes(),
                           compute_dtype=compute_dtype)
    state = jax.eval_shape(lambda s: s, tr.state)
    spec = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}
    lowered = step.lower(state, spec)
    if text:
        return lowered.as_text()
    return hlo_cost(lowered.compile())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    old = os.environ.get("TRL_JAX_CACHE")
    os.environ["TRL_JAX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield _model_dir(str(tmp_path_factory.mktemp("cost")))
    if old is None:
        os.environ.pop("TRL_JAX_CACHE", None)
    else:
        os.environ["TRL_JAX_CACHE"] = old


@pytest.mark.parametrize("kind", ["sft", "dpo", "kto", "reward", "grpo", "rloo", "online_dpo", "distillation"])
def test_train_step_does_one_nth_of_the_work_per_device(kind, model_dir, tmp_path):
    tr = _trainer(kind, model_dir, str(tmp_path / kind))
    batch = _first_batch(tr)
    param_bytes = sum(x.size * 4 for x in jax.tree.leaves(tr.state.params))
    one = _step_cost(tr, batch, _mesh((1, 1, 1)))
    assert one["matmul_flops"] > 0 and one["collective_bytes_total"] == 0
    report = {}
    for shape in MESHES:
        c = _step_cost(tr, batch, _mesh(shape))
        report[shape] = (8 * c["matmul_flops"] / one["matmul_flops"], c["collective_bytes_total"] / param_bytes)
    bad = {s: r for s, r in report.items() if not (r[0] <= 1.15 and r[1] <= 4.0)}
    assert not bad, f"{kind}: (8 x per-device FLOPs / one device's, collective bytes / fp32 param bytes): {report}"


def test_bf16_train_step_runs_every_matmul_in_bf16(model_dir, tmp_path):
    """``bf16=True``: the trainer's step casts a bf16 copy of the fp32 master weights, so every dot of the forward
    and backward pass (the LM head's ``[.., V]`` logits included) takes bf16 operands with fp32 accumulation."""
    tr = _trainer("sft", model_dir, str(tmp_path / "sft"), bf16=True)
    batch = _first_batch(tr)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tr.state.params))  # fp32 master weights
    text = tr._train_step.lower(tr.state, tr._device_batch(batch)).as_text()
    dots = re.findall(r"stablehlo\.dot_general.*?:\s*\((tensor<[^)]*)\)\s*->\s*(tensor<[^>]*>)", text)
    assert dots
    vocab = tr.model.config.vocab_size
    lm_head = [d for d in dots if f"x{vocab}x" in d[0] or f"{vocab}x" in d[1]]
    assert lm_head, "no LM-head matmul found"
    f32_operands = [d for d in dots if re.search(r"tensor<[0-9x]+xf32>", d[0])]
    assert not f32_operands, f32_operands[:3]


def test_reference_model_is_held_in_the_compute_dtype(model_dir, tmp_path):
    tr = _trainer("dpo", model_dir, str(tmp_path / "dpo"), bf16=True)
    tr._build(1)
    assert {x.dtype for x in jax.tree.leaves(tr.state.ref_params)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(tr.state.params)} == {jnp.dtype(jnp.float32)}


def test_after_start_up_only_the_train_state_is_alive(model_dir, tmp_path):
    """After ``_build`` the live device buffers are the train state's (fp32 params, Adam moments, a bf16 reference)
    and nothing else of that size: no leftover copy of the loaded weights or of the reference."""
    import gc

    gc.collect()
    before = {id(x) for x in jax.live_arrays()}
    tr = _trainer("dpo", model_dir, str(tmp_path / "dpo"), bf16=True)
    tr._build(1)
    gc.collect()
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(tr.state))
    live = sum(x.nbytes for x in jax.live_arrays() if id(x) not in before)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(tr.state.params))
    # params (fp32) + two fp32 Adam moments + a bf16 reference = 3.5 x the fp32 params
    assert state_bytes >= 3.5 * param_bytes
    assert live <= state_bytes + 0.05 * param_bytes, (live, state_bytes, param_bytes)
