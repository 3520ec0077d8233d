"""The train step of every added architecture (Gemma 2, Gemma 3 text, Phi-3, Qwen3-MoE, Mixtral) on every mesh of
``test_train_step.py`` ((8,1,1), (1,8,1), (2,2,2), (1,2,4)), and the mixtures of experts also with an ``expert``
mesh axis: the same losses and weights as one device.

The loss is SFT's token mean from the fused log-probs (Gemma's final-logit soft-cap included), plus the
load-balancing term for the mixtures of experts, so the router logits are differentiated through the sharded
experts too. Two SGD steps with clipping, gradient accumulation 2 (unequal token counts per micro-batch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from model_fixtures import VOCAB, make_config
from trl_jax.losses.sft import sft_loss
from trl_jax.models import CausalLM, config_from_hf, final_logit_softcapping, router_aux_loss
from trl_jax.ops import fused_log_probs
from trl_jax.parallel import make_mesh, shard_batch
from trl_jax.train import TrainState, make_train_step

ARCHS = ["gemma2", "gemma3_text", "phi3", "qwen3_moe", "mixtral"]
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
EXPERT_MESH = {"fsdp": 2, "expert": 2, "tensor": 2}
RTOL = ATOL = 3e-5
_REF: dict = {}


def _model(name):
    return CausalLM(config_from_hf(make_config(name)))


def _loss_fn(model):
    coef = 0.02 if model.config.num_experts else 0.0
    cap = final_logit_softcapping(model)

    def loss_fn(params, batch, rng, ref_params=None):
        ids, seg = batch["input_ids"], batch["segment_ids"]
        pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
        if coef:
            hidden, router_logits = model.hidden_states_and_router_logits(params, ids, pos, seg)
        else:
            hidden = model.hidden_states(params, ids, pos, seg)
        targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
        mask = jnp.concatenate([seg[:, 1:] != 0, jnp.zeros_like(seg[:, :1], bool)], axis=1)
        logps = fused_log_probs(hidden, model.lm_head_weight(params), targets, mask=mask,
                                final_logit_softcapping=cap)
        terms = sft_loss(logps, mask)
        if not coef:
            return terms
        aux = router_aux_loss(router_logits, model.config.num_experts_per_tok, seg != 0)
        return terms._replace(numerator=terms.numerator + coef * aux * terms.denominator)

    return loss_fn


def _batch(step):
    """16 rows x 12 tokens, right padding of varied length (the two micro-batches hold unequal token counts)."""
    rng = np.random.default_rng(step)
    ids = rng.integers(1, VOCAB, size=(16, 12)).astype(np.int32)
    lengths = np.array([12, 3, 9, 5, 12, 12, 11, 7, 2, 4, 12, 6, 3, 8, 5, 4])
    seg = (np.arange(12)[None, :] < lengths[:, None]).astype(np.int32)
    return {"input_ids": ids * seg, "segment_ids": seg}


def _run(name, mesh):
    model = _model(name)
    params = model.init_params(jax.random.PRNGKey(0))
    tx = optax.sgd(0.5)  # Adam's first step is ~lr * sign(g): it would magnify round-off on near-zero gradients
    logical = model.logical_axes() if mesh is not None else None
    state = TrainState.create(params, tx, jax.random.PRNGKey(1), mesh=mesh, logical_axes=logical)
    step = make_train_step(_loss_fn(model), tx, mesh=mesh, gradient_accumulation_steps=2, max_grad_norm=1.0)
    losses = []
    for i in range(2):
        b = {k: jnp.asarray(v) for k, v in _batch(i).items()}
        state, m = step(state, b if mesh is None else shard_batch(b, mesh))
        losses.append(float(m["loss"]))
    assert step.compile_count() == 1
    return losses, jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state.params), state


def _reference(name):
    if name not in _REF:
        _REF[name] = _run(name, None)[:2]
    return _REF[name]


def _check(name, mesh):
    ref_losses, ref_params = _reference(name)
    assert np.all(np.isfinite(ref_losses)) and ref_losses[0] != ref_losses[1]
    losses, params, state = _run(name, mesh)
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL, atol=ATOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), params, ref_params)
    return state


@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("name", ARCHS)
def test_train_step_on_every_mesh_equals_one_device(name, shape):
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    state = _check(name, make_mesh(shape))
    if shape[2] > 1:  # the attention weights really are split over the tensor axis
        q = state.params["layers"]["self_attn"]["q_proj"]["kernel"]
        assert "tensor" in jax.tree.leaves(tuple(q.sharding.spec))


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_moe_train_step_with_an_expert_mesh_axis_equals_one_device(name):
    mesh = make_mesh(EXPERT_MESH, axis_names=("data", "fsdp", "expert", "tensor"))
    state = _check(name, mesh)
    up = state.params["layers"]["mlp"]["up_proj"]["kernel"]  # (layers, embed, expert, mlp)
    assert up.sharding.spec[2] == "expert"
