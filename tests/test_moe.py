"""Mixture-of-experts dispatch and layouts (``trl_jax.models.moe``, ``SparseMoE``): the ragged (grouped-matmul)
dispatch equals the dense one and transformers (padded, packed, scanned, unrolled, cached decoding, gradients, every
mesh of the train-step tests), its matmul FLOPs are the routed ones, and Qwen3-MoE checkpoints that mix expert and
dense-MLP layers (``decoder_sparse_step``, ``mlp_only_layers``) load, run, decode and save as transformers' do.
Tiny configs (hidden 32, 4 experts, top 2)."""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from model_fixtures import make_torch_model, packed_batch, padded_batch, save_torch_model, torch_logits
from test_models_architectures import _check_cached_decoding
from trl_jax.models import CausalLM, from_pretrained, router_aux_loss, save_pretrained
from trl_jax.models.sharding import param_shardings
from trl_jax.parallel import activation_sharding, make_mesh
from trl_jax.utils.hlo_cost import hlo_cost
from trl_jax.utils.jaxpr_cost import jaxpr_matmul_flops

ATOL = 1e-4
_CACHE: dict = {}


def _checkpoint(name, tmp_path_factory, **overrides):
    key = (name, repr(sorted(overrides.items())))
    if key not in _CACHE:
        tm = make_torch_model(name, **overrides)
        _CACHE[key] = (tm, save_torch_model(tm, tmp_path_factory.mktemp(name)))
    return _CACHE[key]


def _tree_close(a, b, **tol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path), **tol)


def test_ragged_dispatch_equals_dense_and_transformers(tmp_path_factory):
    """Qwen3-MoE: padded and packed logits and cached decoding (the in-place decode path): ragged = dense =
    transformers (scanned layers here; unrolled ones in the mixed-layers test; gradients: the mesh test)."""
    tm, d = _checkpoint("qwen3_moe", tmp_path_factory)
    model, params = from_pretrained(d, moe_impl="ragged")
    dense = CausalLM(model.config.replace(moe_impl="dense"), model.hf_config)
    ids, mask, pos = padded_batch()
    ref = torch_logits(tm, ids, mask, pos)
    out = np.asarray(jax.jit(model.logits)(params, ids, pos, mask))
    assert np.abs(out - ref)[mask.astype(bool)].max() <= ATOL
    np.testing.assert_allclose(out, np.asarray(jax.jit(dense.logits)(params, ids, pos, mask)), atol=1e-5, rtol=0)
    pids, ppos, pseg, docs = packed_batch()
    pout = np.asarray(jax.jit(model.logits)(params, pids, ppos, pseg))
    for r, start, n, toks in docs:
        np.testing.assert_allclose(pout[r, start:start + n], torch_logits(tm, toks[None])[0], atol=ATOL, rtol=0)
    _check_cached_decoding(tm, model, params)


def test_ragged_dispatch_mixtral_logits_match_transformers(tmp_path_factory):
    """Mixtral (renormalized top-2, sliding window): padded logits with the ragged dispatch = transformers'."""
    tm, d = _checkpoint("mixtral", tmp_path_factory)
    model, params = from_pretrained(d, moe_impl="ragged")
    ids, mask, pos = padded_batch()
    out = np.asarray(jax.jit(model.logits)(params, ids, pos, mask))
    assert np.abs(out - torch_logits(tm, ids, mask, pos))[mask.astype(bool)].max() <= ATOL


def _moe_layer(impl, **kw):
    """A lone ``SparseMoE`` (Qwen3-MoE-shaped: hidden 32, 4 experts of width 24, top 2), its params, logical axes."""
    from trl_jax.models.config import ModelConfig
    from trl_jax.models.decoder import SparseMoE

    cfg = ModelConfig("qwen3_moe", 97, 32, 64, 1, 4, 2, 8, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=24, norm_topk_prob=False, moe_impl=impl, **kw)
    layer = SparseMoE(cfg)
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 6, 32), jnp.float32)
    boxed = layer.init(jax.random.PRNGKey(0), x)["params"]
    return layer, nn.meta.unbox(boxed), nn.get_partition_spec(boxed), x


def _layer_loss(layer):
    return lambda p, x: jnp.sum(jnp.sin(layer.apply({"params": p}, x)))


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_ragged_dispatch_on_every_train_step_mesh(shape):
    """Under the train step's activation-sharding context (meshes of tests/test_train_step.py) the ragged dispatch
    runs per device (``shard_map`` over the batch axes, expert ``mlp`` columns over ``tensor`` + ``psum``): output
    and gradients (every param, router included, and the input) equal one device's dense dispatch."""
    layer, params, logical, x = _moe_layer("ragged")
    dense = _moe_layer("dense")[0]
    ref = jax.jit(jax.value_and_grad(_layer_loss(dense), argnums=(0, 1)))(params, x)
    mesh = make_mesh(shape)  # (data, fsdp, tensor), as the train-step tests build it
    sharded = jax.device_put(params, param_shardings(logical, params, mesh))
    xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))

    def step(p, x):
        with activation_sharding(mesh):
            return jax.value_and_grad(_layer_loss(layer), argnums=(0, 1))(p, x)

    jitted = jax.jit(step)
    assert "manual_computation" in jitted.lower(sharded, xs).as_text()  # the per-device (shard_map) dispatch
    out = jitted(sharded, xs)
    _tree_close(out, ref, atol=2e-5, rtol=1e-5)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(out[1]))  # every param gets gradient


def test_ragged_dispatch_does_the_routed_matmul_flops():
    """Forward + backward of one expert layer: the ragged dispatch's grouped matmuls do ``top_k / num_experts`` of
    the dense dispatch's expert FLOPs (counted on the jaxpr). XLA:CPU has no grouped matmul: JAX lowers
    ``ragged_dot`` to a dense dot over a masked per-expert copy of the rows, which ``hlo_cost`` counts as such, so
    on CPU the ragged program does ``top_k`` times the dense dispatch's expert FLOPs (why ``moe_impl="auto"`` is
    dense on CPU)."""
    _, params, _, x = _moe_layer("dense")
    N, D, E, F, k = 8 * 6, 32, 4, 24, 2
    expert_dense = 3 * 3 * 2 * N * D * E * F  # gate, up, down: the forward dot and two backward dots each
    flops = {}
    for impl in ("dense", "ragged"):
        f = jax.grad(_layer_loss(_moe_layer(impl)[0]), argnums=(0, 1))
        flops[impl] = (jaxpr_matmul_flops(jax.make_jaxpr(f)(params, x).jaxpr),
                       hlo_cost(jax.jit(f).lower(params, x).compile())["matmul_flops"])
    router = flops["dense"][0] - expert_dense  # the router's dots, common to both
    assert flops["ragged"][0] == pytest.approx(router + expert_dense * k / E)
    assert flops["ragged"][1] == pytest.approx(router + expert_dense * k, rel=0.01)  # what XLA:CPU runs


# ---------------------------------------------------------------------------------------------- mixed layers
MIXED = dict(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[5])  # experts on layers 1 and 3


def test_qwen3_moe_mixed_dense_and_expert_layers_match_transformers(tmp_path_factory, caplog):
    """``decoder_sparse_step=2`` and ``mlp_only_layers``: layers 1 and 3 have experts, 0, 2, 4, 5 a dense MLP of
    ``intermediate_size``. Scanned layers asked for -> unrolled (one log line); logits (ragged dispatch), the
    load-balancing loss over the expert layers, cached decoding (dense dispatch, CPU's ``auto``) and the save round
    trip equal transformers'."""
    tm, d = _checkpoint("qwen3_moe", tmp_path_factory, **MIXED)
    assert [type(layer.mlp).__name__ for layer in tm.model.layers] == [
        "Qwen3MoeMLP", "Qwen3MoeSparseMoeBlock", "Qwen3MoeMLP", "Qwen3MoeSparseMoeBlock", "Qwen3MoeMLP", "Qwen3MoeMLP"]
    with caplog.at_level(logging.WARNING, logger="trl_jax"):
        model, params = from_pretrained(d)  # scan_layers=True asked for
    assert "unrolled layers" in caplog.text and not model.config.scan_layers
    assert model.config.sparse_layers == (1, 3)
    assert params["layers_0"]["mlp"]["gate_proj"]["kernel"].shape == (32, 64)
    assert params["layers_1"]["mlp"]["gate_proj"]["kernel"].shape == (32, 4, 24)
    ids, mask, pos = padded_batch()
    ref = torch_logits(tm, ids, mask, pos)
    ragged = CausalLM(model.config.replace(moe_impl="ragged"), model.hf_config)
    out = np.asarray(jax.jit(ragged.logits)(params, ids, pos, mask))
    assert np.abs(out - ref)[mask.astype(bool)].max() <= ATOL
    with pytest.raises(ValueError, match="scan_layers: false"):
        model.config.replace(scan_layers=True)
    with torch.no_grad():
        r = tm(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
               position_ids=torch.as_tensor(pos, dtype=torch.long), output_router_logits=True)
    router = jax.jit(model.router_logits)(params, ids, pos, mask)
    assert router.shape == (2, 3, 12, 4)
    assert float(router_aux_loss(router, 2, mask)) == pytest.approx(float(r.aux_loss), abs=1e-5)
    _check_cached_decoding(tm, model, params)
    out_dir = tmp_path_factory.mktemp("mixed_out")
    save_pretrained(CausalLM(model.config), params, str(out_dir))  # config rebuilt by to_hf_config
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir), attn_implementation="eager").eval()
    assert back.config.decoder_sparse_step == 2 and back.config.mlp_only_layers == [5]
    sa, sb = tm.state_dict(), back.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=0, rtol=0, msg=k)


def test_moe_impl_is_validated_and_a_trainer_config_field():
    from trl_jax.configs import SFTConfig
    from trl_jax.models.config import ModelConfig

    with pytest.raises(ValueError, match="moe_impl"):
        ModelConfig("qwen3_moe", 97, 32, 64, 2, 4, 2, 8, num_experts=4, num_experts_per_tok=2, moe_impl="grouped")
    assert SFTConfig(output_dir="/tmp/x").moe_implementation == "auto"
    assert SFTConfig(output_dir="/tmp/x", moe_implementation="ragged").moe_implementation == "ragged"
    with pytest.raises(ValueError, match="moe_implementation"):
        SFTConfig(output_dir="/tmp/x", moe_implementation="grouped")


def test_param_shardings_of_mixed_layers(tmp_path_factory):
    """Unrolled mixed layers get their own shardings: expert kernels on ``(fsdp, expert, tensor)``."""
    _, d = _checkpoint("qwen3_moe", tmp_path_factory, **MIXED)
    mesh = jax.make_mesh((2, 2, 2), ("fsdp", "expert", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    model, params = from_pretrained(d, mesh=mesh)
    sh = param_shardings(model.logical_axes(), model.abstract_params(), mesh)
    assert sh["layers_1"]["mlp"]["up_proj"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", "expert", "tensor")
    assert params["layers_0"]["mlp"]["up_proj"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
