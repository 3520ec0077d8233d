"""FlaxModelAdapter: a transformers 4.x FlaxPreTrainedModel behind the model protocol.

transformers >= 5 removed the Flax model classes, so these tests skip there (the only allowed skip).
"""

import numpy as np
import pytest
import transformers

if int(transformers.__version__.split(".")[0]) >= 5:
    pytest.skip("transformers >= 5 has no Flax models (FlaxModelAdapter targets transformers 4.x)",
                allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from trl_jax.models import FlaxModelAdapter  # noqa: E402


def _flax_llama():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.FlaxLlamaForCausalLM(cfg, seed=0)


def test_adapter_logits_hidden_and_lm_head():
    fm = _flax_llama()
    ad = FlaxModelAdapter(fm)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 97, size=(2, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    ref = np.asarray(fm(ids, attention_mask=mask).logits)
    np.testing.assert_allclose(np.asarray(ad.logits(fm.params, ids, attention_mask=mask)), ref, atol=1e-4)
    h = ad.hidden_states(fm.params, ids, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(h @ ad.lm_head_weight(fm.params)), ref, atol=1e-4)


def test_adapter_cache_decoding_matches_full_forward():
    fm = _flax_llama()
    ad = FlaxModelAdapter(fm)
    ids = np.random.default_rng(1).integers(1, 97, size=(2, 8)).astype(np.int32)
    ref = np.asarray(fm(ids).logits)
    cache = ad.init_cache(2, 8)
    last, cache = ad.prefill(fm.params, cache, jnp.asarray(ids[:, :5]))
    np.testing.assert_allclose(np.asarray(last), ref[:, 4], atol=1e-4)
    for t in range(5, 8):
        last, cache = ad.decode_step(fm.params, cache, jnp.asarray(ids[:, t]), jnp.full((2,), t))
        np.testing.assert_allclose(np.asarray(last), ref[:, t], atol=1e-4)
