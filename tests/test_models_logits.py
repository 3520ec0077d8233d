"""trl_jax decoders give transformers' logits (fp32, max abs diff <= 1e-4) for every supported architecture.

Reference: a tiny random transformers PyTorch model, saved with ``save_pretrained`` and loaded by trl_jax.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from model_fixtures import ARCHS, make_torch_model, packed_batch, padded_batch, save_torch_model, torch_logits
from trl_jax.models import from_pretrained

ATOL = 1e-4
_CACHE = {}


def _loaded(name, tmp_path_factory):
    if name not in _CACHE:
        tm = make_torch_model(name)
        d = save_torch_model(tm, tmp_path_factory.mktemp(name))
        model, params = from_pretrained(d)
        _CACHE[name] = (tm, d, model, params, jax.jit(model.logits))
    return _CACHE[name]


@pytest.mark.parametrize("name", list(ARCHS))
def test_padded_and_packed_logits_match_transformers(name, tmp_path_factory):
    tm, _, model, params, logits = _loaded(name, tmp_path_factory)
    # right- and left-padded rows in one batch; positions = cumsum(mask) - 1 on both sides
    ids, mask, pos = padded_batch()
    ref = torch_logits(tm, ids, mask, pos)
    out = np.asarray(logits(params, ids, pos, mask))
    assert out.shape == ref.shape
    assert np.abs(out - ref)[mask.astype(bool)].max() <= ATOL
    # packed rows, positions restarting per document: each document equals its own separate torch run
    ids, pos, seg, docs = packed_batch()
    if name == "llama_dynamic":
        # dynamic NTK scales by max(position_ids) over the whole batch (as transformers does), so separate runs
        # only agree while every document stays within max_position_embeddings (8): rows 0-1 (lengths <= 7)
        ids, pos, seg = ids[:2], pos[:2], seg[:2]
        docs = [d for d in docs if d[0] < 2]
    out = np.asarray(logits(params, ids, pos, seg))
    for r, start, n, toks in docs:
        ref = torch_logits(tm, toks[None])[0]
        np.testing.assert_allclose(out[r, start : start + n], ref, atol=ATOL, rtol=0)


def test_attention_mask_and_derived_segments(tmp_path_factory):
    tm, _, model, params, _ = _loaded("qwen3", tmp_path_factory)
    ids, mask, pos = padded_batch()
    ref = torch_logits(tm, ids, mask, pos)
    fwd = jax.jit(lambda p, i, a, m: model.logits(p, i, positions=a, attention_mask=m))
    out = np.asarray(fwd(params, ids, pos, mask))
    assert np.abs(out - ref)[mask.astype(bool)].max() <= ATOL
    # positions alone: documents are detected where positions restart (transformers' packed-sequence rule)
    ids, pos, seg, docs = packed_batch()
    out = np.asarray(jax.jit(lambda p, i, a: model.logits(p, i, positions=a))(params, ids[:2], pos[:2]))
    for r, start, n, toks in docs:
        if r < 2:
            np.testing.assert_allclose(out[r, start : start + n], torch_logits(tm, toks[None])[0], atol=ATOL, rtol=0)


# dynamic NTK recomputes frequencies from the longest position per call, so cached keys (rotated earlier) and a
# full forward legitimately differ once positions pass max_position_embeddings -- in transformers too.
@pytest.mark.parametrize("name", [n for n in ARCHS if n != "llama_dynamic"])
def test_kv_cache_decoding_matches_full_forward(name, tmp_path_factory):
    tm, _, model, params, _ = _loaded(name, tmp_path_factory)
    P, G = 6, 6
    rng = np.random.default_rng(3)
    ids = rng.integers(1, 97, size=(3, P + G)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding
    mask[2, :4] = 0
    ids[mask == 0] = 0
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    ref = torch_logits(tm, ids, mask, pos)
    prefill = jax.jit(model.prefill)
    step = jax.jit(model.decode_step)
    cache = model.init_cache(3, P + G, jnp.float32)
    last, cache = prefill(params, cache, ids[:, :P], pos[:, :P], mask[:, :P])
    np.testing.assert_allclose(np.asarray(last), ref[:, P - 1], atol=ATOL, rtol=0)
    for t in range(P, P + G):
        last, cache = step(params, cache, ids[:, t], pos[:, t])
        np.testing.assert_allclose(np.asarray(last), ref[:, t], atol=ATOL, rtol=0)
    assert int(cache["index"]) == P + G


@pytest.mark.parametrize("name", ["mistral", "qwen3"])
def test_scan_vs_unrolled(name, tmp_path_factory):
    tm, d, model, params, logits = _loaded(name, tmp_path_factory)
    model_u, params_u = from_pretrained(d, scan_layers=False)
    assert "layers_0" in params_u and "layers" not in params_u
    assert params["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == 2
    ids, mask, pos = padded_batch()
    a = np.asarray(logits(params, ids, pos, mask))
    b = np.asarray(jax.jit(model_u.logits)(params_u, ids, pos, mask))
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_remat_policies_give_same_gradients(tmp_path_factory):
    _, d, _, _, _ = _loaded("llama3", tmp_path_factory)
    ids, mask, pos = padded_batch()
    grads = []
    for scan, policy in [(True, "dots_saveable"), (False, "full")]:
        model, params = from_pretrained(d, scan_layers=scan, remat_policy=policy)

        def loss(p, model=model):
            return jnp.sum(model.logits(p, ids, pos, mask) ** 2 * mask[..., None])

        g = jax.jit(jax.grad(loss))(params)
        g_layer0 = g["layers"]["mlp"]["down_proj"]["kernel"][0] if scan else g["layers_0"]["mlp"]["down_proj"]["kernel"]
        grads.append((np.asarray(g["embed_tokens"]["embedding"]), np.asarray(g_layer0)))
    for other in grads[1:]:
        for x, y in zip(grads[0], other):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * np.abs(x).max())


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_bf16_within_bf16_tolerance(name, tmp_path):
    tm = make_torch_model(name).to(torch.bfloat16)
    d = save_torch_model(tm, tmp_path)
    model, params = from_pretrained(d, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert params["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    ids, mask, pos = padded_batch()
    ref = torch_logits(tm, ids, mask, pos)
    out = jax.jit(model.logits)(params, ids, pos, mask)
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out.astype(jnp.float32))
    valid = mask.astype(bool)
    scale = np.abs(ref[valid]).max()
    # bf16 has an 8-bit mantissa (relative step 2**-8 = 0.0039); errors compound over 2 layers and the logits matmul
    assert np.abs(out - ref)[valid].max() <= 0.03 * scale
    assert np.abs(out - ref)[valid].mean() <= 0.004 * scale


@pytest.mark.parametrize("name", ["llama", "qwen2"])  # untied and tied embeddings
def test_pad_token_lookups_send_no_gradient_to_the_pad_row_as_transformers(name, tmp_path):
    """transformers builds the embedding with ``padding_idx=pad_token_id``: pad tokens that are attended (a sampled
    pad, a pad inside a packed row) give the pad row no gradient through the lookup. Gradients equal torch's."""
    tm = make_torch_model(name)
    model, params = from_pretrained(save_torch_model(tm, tmp_path))
    ids = np.array([[5, 0, 17, 0, 33, 8], [0, 21, 40, 2, 0, 9]], np.int32)  # pad id 0, every position attended
    assert tm.config.pad_token_id == 0

    def loss(p):
        return jnp.sum(model.logits(p, ids) ** 2) * 1e-3

    g = np.asarray(jax.grad(loss)(params)["embed_tokens"]["embedding"])
    tm.zero_grad()
    (tm(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.float() ** 2).sum().mul(1e-3).backward()
    want = tm.model.embed_tokens.weight.grad.numpy()
    np.testing.assert_allclose(g, want, rtol=0, atol=1e-5 * np.abs(want).max())
    if not tm.config.tie_word_embeddings:
        assert np.abs(g[0]).max() == 0.0
