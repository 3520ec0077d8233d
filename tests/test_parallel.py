"""Meshes, logical-axis rules, param/batch sharding helpers."""

import jax
import numpy as np
import pytest
from _multiprocess_worker import LOGICAL, init_params, make_batch
from jax.sharding import PartitionSpec as P

from trl_jax.parallel import (
    DEFAULT_RULES,
    batch_parallel_size,
    fsdp_shardings,
    local_batch_slice,
    logical_to_shardings,
    logical_to_spec,
    make_global_batch,
    make_mesh,
    override_rules,
    shard_batch,
    shard_params,
)


def test_make_mesh_shapes_and_errors():
    m = make_mesh((2, 2, 2))
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh({"tensor": 4, "data": -1}).shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert dict(make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert batch_parallel_size(make_mesh((2, 2, 2))) == 4
    with pytest.raises(ValueError, match="needs 12 devices"):
        make_mesh((3, 2, 2))
    with pytest.raises(ValueError, match="unknown axis"):
        make_mesh({"pipeline": 8})
    with pytest.raises(ValueError, match="one size per axis"):
        make_mesh((8, 1))


def test_logical_to_spec_rules():
    mesh = make_mesh((1, 2, 4))
    assert logical_to_spec(("embed", "mlp"), mesh=mesh, shape=(16, 32)) == P("fsdp", "tensor")
    assert logical_to_spec(("layers", "embed", "heads"), mesh=mesh, shape=(2, 16, 16)) == P(None, "fsdp", "tensor")
    # non-dividing dims are replicated, absent / size-1 axes dropped
    assert logical_to_spec(("embed", "mlp"), mesh=mesh, shape=(15, 6)) == P()
    assert logical_to_spec(("vocab", "embed"), mesh=make_mesh((8, 1, 1)), shape=(32, 16)) == P()
    # a mesh axis is used once per array
    rules = override_rules(DEFAULT_RULES, mlp="fsdp")
    assert logical_to_spec(("embed", "mlp"), rules, mesh=mesh, shape=(16, 32)) == P("fsdp")
    # multi-axis rules and user tables
    assert logical_to_spec(("embed",), [("embed", ("fsdp", "tensor"))], mesh=mesh, shape=(16,)) == P(("fsdp", "tensor"))
    with pytest.raises(ValueError, match="no rule for logical axis 'experts_x'"):
        logical_to_spec(("experts_x",))


def test_rules_cover_models_logical_names():
    """Every logical name the model package uses has a rule (models own their names; the table must follow)."""
    from trl_jax.models.decoder import LOGICAL_AXIS_NAMES

    names = {k for k, _ in DEFAULT_RULES}
    assert set(LOGICAL_AXIS_NAMES) <= names


def test_shard_params_and_batch():
    mesh = make_mesh((2, 2, 2))
    params = shard_params(init_params(), mesh, logical_axes=LOGICAL)
    assert params["layers"]["up_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert params["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")
    np.testing.assert_array_equal(np.asarray(params["norm"]["scale"]), init_params()["norm"]["scale"])
    sh = logical_to_shardings(LOGICAL, mesh, shapes=init_params())
    assert sh["embed_tokens"]["embedding"].spec == P("tensor", "fsdp")
    fs = fsdp_shardings(init_params(), make_mesh((1, 8, 1)), min_size=64)
    assert fs["layers"]["up_proj"]["kernel"].spec == P(None, "fsdp") or fs["layers"]["up_proj"]["kernel"].spec == P(None, None, "fsdp")
    b = shard_batch(make_batch(0), mesh)
    assert b["input_ids"].sharding.spec == P(("data", "fsdp"), None)


def test_local_batch_slice_and_global_batch_single_process():
    mesh = make_mesh((2, 2, 2))
    assert local_batch_slice(mesh, 8) == slice(0, 8)
    host = make_batch(0)
    g = make_global_batch(host, mesh)
    np.testing.assert_array_equal(np.asarray(g["input_ids"]), host["input_ids"])
    assert g["input_ids"].sharding.spec == P(("data", "fsdp"), None)


def test_models_logical_axes_and_state_shardings():
    """The model package's logical axes (PartitionSpec leaves) map through the rules; optimizer moments follow
    their parameter's sharding, counts are replicated (no compilation: abstract shapes only)."""
    import optax
    from transformers import Qwen3Config

    from trl_jax.models.config import config_from_hf
    from trl_jax.models.model import CausalLM
    from trl_jax.train import TrainState, make_optimizer, train_state_shardings

    hf = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    model = CausalLM(config_from_hf(hf))
    mesh = make_mesh((1, 2, 4))
    abstract = model.abstract_params()
    sh = logical_to_shardings(model.logical_axes(), mesh, shapes=abstract)
    specs = [s.spec for s in jax.tree.leaves(sh)]
    assert any("tensor" in jax.tree.leaves(tuple(s)) for s in specs)
    assert any("fsdp" in jax.tree.leaves(tuple(s)) for s in specs)
    tx = make_optimizer(1e-3, weight_decay=0.1)
    st = jax.eval_shape(lambda p: TrainState(step=0, params=p, opt_state=tx.init(p), rng=jax.random.PRNGKey(0)), abstract)
    ss = train_state_shardings(st, mesh, sh)
    adam = [s for s in jax.tree.leaves(ss.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)][0]
    assert jax.tree.leaves(adam.mu) == jax.tree.leaves(sh)
    assert jax.tree.leaves(adam.nu) == jax.tree.leaves(sh)
    assert adam.count.spec == P()
