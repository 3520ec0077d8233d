"""Masked/nan-aware reductions and padding against TRL's torch helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.experimental.utils import pad_to_length as trl_pad_to_length
from trl.trainer import utils as trl_utils

from trl_jax.ops import masked_mean, masked_sum, nanmax, nanmean, nanmin, nanstd, pad, pad_to_length


def _with_nans(seed, shape, frac=0.3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    x[rng.random(shape) < frac] = np.nan
    return x


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_nanstd_matches_trl(axis):
    x = _with_nans(0, (6, 5))
    x[:, 0] = np.nan  # a column with no valid entry
    x[1:, 1] = np.nan  # a column with one valid entry -> NaN (Bessel)
    ref = trl_utils.nanstd(torch.tensor(x), dim=axis).numpy()
    ours = np.asarray(nanstd(jnp.asarray(x), axis=axis))
    np.testing.assert_allclose(ours, ref, atol=1e-6, equal_nan=True)


def test_nanstd_keepdim_matches_trl():
    x = _with_nans(1, (4, 8))
    ref = trl_utils.nanstd(torch.tensor(x), dim=1, keepdim=True).numpy()
    np.testing.assert_allclose(np.asarray(nanstd(jnp.asarray(x), axis=1, keepdims=True)), ref, atol=1e-6, equal_nan=True)


def test_nanmin_nanmax_nanmean_match_torch():
    x = _with_nans(2, (12,))
    assert float(nanmin(jnp.asarray(x))) == pytest.approx(float(trl_utils.nanmin(torch.tensor(x))))
    assert float(nanmax(jnp.asarray(x))) == pytest.approx(float(trl_utils.nanmax(torch.tensor(x))))
    assert float(nanmean(jnp.asarray(x))) == pytest.approx(float(torch.nanmean(torch.tensor(x))), rel=1e-6)
    allnan = jnp.full((3,), jnp.nan)
    assert np.isnan(float(nanmin(allnan))) and np.isnan(float(nanmax(allnan))) and np.isnan(float(nanmean(allnan)))
    assert np.isnan(float(trl_utils.nanmin(torch.full((3,), float("nan")))))


def test_masked_mean_all_masked_is_zero_not_nan():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(3, 4)).astype(np.float32))
    mask = jnp.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    rows = masked_mean(x, mask, axis=1)
    assert float(rows[1]) == 0.0
    np.testing.assert_allclose(float(rows[0]), float((x[0, 0] + x[0, 2]) / 2), rtol=1e-6)
    assert float(masked_mean(x, jnp.zeros_like(mask))) == 0.0
    assert float(masked_sum(x, mask)) == pytest.approx(float(jnp.sum(x * mask)), rel=1e-6)
    g = jax.grad(lambda v: masked_mean(v, jnp.zeros_like(mask)))(x)
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("multiple", [None, 4])
def test_pad_matches_trl(side, multiple):
    seqs = [np.array([1, 2, 3]), np.array([4, 5]), np.array([6])]
    ref = trl_utils.pad([torch.tensor(s) for s in seqs], padding_value=-1, padding_side=side, pad_to_multiple_of=multiple)
    np.testing.assert_array_equal(pad(seqs, -1, side, multiple), ref.numpy())
    seqs2 = [np.ones((2, 3)), np.ones((1, 2)) * 2]
    ref2 = trl_utils.pad([torch.tensor(s) for s in seqs2], padding_value=0, padding_side=side, pad_to_multiple_of=multiple)
    np.testing.assert_array_equal(pad(seqs2, 0, side, multiple), ref2.numpy())
    with pytest.raises(ValueError, match="padding_side"):
        pad(seqs, 0, "middle")


def test_pad_to_length_matches_trl():
    x = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(
        np.asarray(pad_to_length(x, 5, pad_value=9)), trl_pad_to_length(torch.tensor(x), 5, pad_value=9).numpy()
    )
    np.testing.assert_array_equal(
        np.asarray(pad_to_length(x, 4, pad_value=7, axis=0)),
        trl_pad_to_length(torch.tensor(x), 4, pad_value=7, dim=0).numpy(),
    )
    np.testing.assert_array_equal(np.asarray(pad_to_length(x, 2)), x)
    assert jax.jit(lambda v: pad_to_length(v, 8))(jnp.asarray(x)).shape == (2, 8)
