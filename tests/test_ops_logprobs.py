"""selective_log_softmax, entropy and fused log-probs against TRL's torch helpers and the unfused JAX math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.trainer import utils as trl_utils

from trl_jax.ops import (
    entropy_from_logits,
    fused_log_probs,
    selective_log_softmax,
    selective_log_softmax_and_entropy,
)


def _logits(shape, seed=0, scale=3.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_matches_trl(chunk_size, temperature):
    logits = _logits((3, 7, 50))
    index = np.random.default_rng(1).integers(0, 50, size=(3, 7))
    ref = trl_utils.selective_log_softmax(torch.tensor(logits), torch.tensor(index), temperature=temperature)
    ours = selective_log_softmax(jnp.asarray(logits), jnp.asarray(index), temperature=temperature, chunk_size=chunk_size)
    assert ours.dtype == jnp.float32 and ours.shape == (3, 7)
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(ours) <= 0)


def test_selective_log_softmax_topk_and_row_mask_match_trl():
    logits = _logits((2, 6, 40), seed=2)
    index = np.random.default_rng(3).integers(0, 40, size=(2, 6, 4))
    row_mask = np.random.default_rng(4).integers(0, 2, size=(2, 6, 4))
    ref = trl_utils.selective_log_softmax(torch.tensor(logits), torch.tensor(index), row_mask=torch.tensor(row_mask))
    ours = selective_log_softmax(jnp.asarray(logits), jnp.asarray(index), row_mask=jnp.asarray(row_mask), chunk_size=4)
    assert ours.shape == (2, 6, 4)
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_logits_give_fp32_within_tolerance(dtype):
    logits32 = _logits((4, 9, 64), seed=5)
    index = np.random.default_rng(6).integers(0, 64, size=(4, 9))
    low = jnp.asarray(logits32).astype(dtype)
    exact = jnp.take_along_axis(jax.nn.log_softmax(low.astype(jnp.float32), -1), jnp.asarray(index)[..., None], -1)[..., 0]
    ours = selective_log_softmax(low, jnp.asarray(index), chunk_size=8)
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), np.asarray(exact), atol=1e-5)
    # and within bf16 tolerance of the fp32 reference computed by TRL
    ref = trl_utils.selective_log_softmax(torch.tensor(logits32), torch.tensor(index)).numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=0.1, rtol=0.02)
    assert np.all(np.asarray(ours) <= 0)


def test_log_probs_are_nonpositive_for_peaked_logits():
    logits = jnp.zeros((2, 3, 16)).at[..., 5].set(80.0)
    out = selective_log_softmax(logits, jnp.full((2, 3), 5))
    assert np.all(np.asarray(out) <= 0)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_gradient_equals_naive(chunk_size):
    logits = jnp.asarray(_logits((3, 5, 30), seed=7))
    index = jnp.asarray(np.random.default_rng(8).integers(0, 30, size=(3, 5)))
    w = jnp.asarray(np.random.default_rng(9).normal(size=(3, 5)).astype(np.float32))

    def naive(lg):
        lp = jnp.take_along_axis(jax.nn.log_softmax(lg / 0.9, -1), index[..., None], -1)[..., 0]
        return jnp.sum(lp * w)

    def ours(lg):
        return jnp.sum(selective_log_softmax(lg, index, temperature=0.9, chunk_size=chunk_size) * w)

    np.testing.assert_allclose(np.asarray(jax.grad(ours)(logits)), np.asarray(jax.grad(naive)(logits)), atol=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 3, 128])
def test_entropy_matches_trl(chunk_size):
    logits = _logits((2, 5, 33), seed=10)
    ref = trl_utils.entropy_from_logits(torch.tensor(logits), chunk_size=chunk_size or 128).numpy()
    ours = entropy_from_logits(jnp.asarray(logits), chunk_size=chunk_size)
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5)


def test_selective_log_softmax_and_entropy_matches_trl():
    logits = _logits((2, 5, 33), seed=11)
    index = np.random.default_rng(12).integers(0, 33, size=(2, 5))
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]])
    ref_lp, ref_h = trl_utils.selective_log_softmax_and_entropy(
        torch.tensor(logits), torch.tensor(index), temperature=1.3, row_mask=torch.tensor(mask)
    )
    lp, h = selective_log_softmax_and_entropy(
        jnp.asarray(logits), jnp.asarray(index), temperature=1.3, row_mask=jnp.asarray(mask), chunk_size=3
    )
    np.testing.assert_allclose(np.asarray(lp), ref_lp.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), ref_h.numpy(), atol=1e-5)


def test_invalid_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="temperature"):
        selective_log_softmax(jnp.zeros((2, 4)), jnp.zeros((2,), jnp.int32), temperature=0.0)
    with pytest.raises(ValueError, match="index shape"):
        selective_log_softmax(jnp.zeros((2, 3, 4)), jnp.zeros((3, 2), jnp.int32))
    with pytest.raises(ValueError, match="lm_head_weight"):
        fused_log_probs(jnp.zeros((2, 3, 8)), jnp.zeros((10, 8)), jnp.zeros((2, 3), jnp.int32))


@pytest.mark.parametrize("chunk_size", [4, 7, 64])
def test_fused_log_probs_and_gradients_equal_unfused(chunk_size):
    rng = np.random.default_rng(13)
    hidden = jnp.asarray(rng.normal(size=(2, 9, 16)).astype(np.float32))
    weight = jnp.asarray(rng.normal(size=(16, 40)).astype(np.float32) * 0.5)
    targets = jnp.asarray(rng.integers(0, 40, size=(2, 9)))
    mask = jnp.asarray(rng.integers(0, 2, size=(2, 9)))
    gl = jnp.asarray(rng.normal(size=(2, 9)).astype(np.float32))
    ge = jnp.asarray(rng.normal(size=(2, 9)).astype(np.float32))

    def unfused(h, w):
        z = (h @ w) / 0.8
        logp = jax.nn.log_softmax(z, -1)
        lp = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
        ent = -jnp.sum(jnp.exp(logp) * logp, -1)
        return jnp.sum(jnp.where(mask, lp * gl + ent * ge, 0.0))

    def fused(h, w):
        lp, ent = fused_log_probs(h, w, targets, chunk_size=chunk_size, temperature=0.8, return_entropy=True, mask=mask)
        return jnp.sum(lp * gl + ent * ge)

    np.testing.assert_allclose(float(fused(hidden, weight)), float(unfused(hidden, weight)), rtol=1e-5)
    g_f = jax.grad(fused, argnums=(0, 1))(hidden, weight)
    g_u = jax.grad(unfused, argnums=(0, 1))(hidden, weight)
    for a, b in zip(g_f, g_u):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
    lp, top1, lsq = fused_log_probs(hidden, weight, targets, chunk_size=chunk_size, return_top1=True,
                                    return_log_sum_sq_probs=True)
    np.testing.assert_array_equal(np.asarray(top1), np.asarray(jnp.argmax(hidden @ weight, -1) == targets))
    probs = jax.nn.softmax(hidden @ weight, -1)
    np.testing.assert_allclose(np.asarray(lsq), np.log(np.sum(np.asarray(probs) ** 2, -1)), atol=1e-5)
    ref = trl_utils.selective_log_softmax(torch.tensor(np.asarray(hidden @ weight)), torch.tensor(np.asarray(targets)))
    np.testing.assert_allclose(np.asarray(lp), ref.numpy(), atol=1e-5)


def test_fused_path_never_holds_full_logits():
    """Compiled temporary memory of the fused forward+backward stays far below one [N, V] fp32 buffer."""
    n, d, v, chunk = 2048, 32, 4096, 128
    hidden = jax.ShapeDtypeStruct((n, d), jnp.float32)
    weight = jax.ShapeDtypeStruct((d, v), jnp.float32)
    targets = jax.ShapeDtypeStruct((n,), jnp.int32)

    def loss(h, w, t):
        return jnp.sum(fused_log_probs(h, w, t, chunk_size=chunk))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, weight, targets).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    full_logits = n * v * 4
    assert temp < full_logits / 4, (temp, full_logits)


def _temp_bytes(fn, *specs):
    return jax.jit(fn).lower(*specs).compile().memory_analysis().temp_size_in_bytes


def test_selective_log_softmax_holds_no_full_fp32_copy():
    """XLA memory analysis: the fused default needs no [N, V] temporary, forward or backward; the chunked mode is
    bounded by a few chunks. (fp32 logits: XLA:CPU upcasts bf16 arrays whole, see the module docstring.)"""
    n, v = 512, 8192
    logits = jax.ShapeDtypeStruct((n, v), jnp.float32)
    index = jax.ShapeDtypeStruct((n,), jnp.int32)
    full = n * v * 4
    fused = lambda lg, ix: selective_log_softmax(lg, ix)
    assert _temp_bytes(fused, logits, index) < full / 16
    assert _temp_bytes(jax.grad(lambda lg, ix: fused(lg, ix).sum()), logits, index) < full / 16
    chunk = 64
    chunked = lambda lg, ix: selective_log_softmax(lg, ix, chunk_size=chunk)
    assert _temp_bytes(chunked, logits, index) <= 3 * chunk * v * 4
    assert _temp_bytes(jax.grad(lambda lg, ix: chunked(lg, ix).sum()), logits, index) <= 3 * chunk * v * 4
