"""RepeatSampler, flush_left / flush_right and truncate_dataset against TRL 1.16's on identical inputs."""

from __future__ import annotations

import datasets
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.experimental.utils import truncate_dataset as trl_truncate_dataset
from trl.trainer.utils import RepeatSampler as TRLRepeatSampler
from trl.trainer.utils import flush_left as trl_flush_left

from trl_jax.data.utils import flush_left, flush_right, truncate_dataset
from trl_jax.generation.repeat import RepeatSampler, TorchCPUGenerator

# ---------------------------------------------------------------------------------------------- RepeatSampler


@pytest.mark.parametrize("n", [7, 12, 1, 100])
@pytest.mark.parametrize("mini, batch, repeat", [(2, 3, 4), (1, 1, 1), (3, 4, 2), (8, 5, 1), (1, 200, 1)])
@pytest.mark.parametrize("shuffle, seed", [(False, None), (True, 42), (True, None), (True, 0), (True, 2**40 + 7)])
def test_repeat_sampler_matches_trl(n, mini, batch, repeat, shuffle, seed):
    data = list(range(n))
    ours = RepeatSampler(data, mini_repeat_count=mini, batch_size=batch, repeat_count=repeat, shuffle=shuffle,
                         seed=seed)
    theirs = TRLRepeatSampler(data, mini_repeat_count=mini, batch_size=batch, repeat_count=repeat, shuffle=shuffle,
                              seed=seed)
    for _epoch in range(3):  # each epoch draws the next permutation from the sampler's own generator
        assert list(ours) == list(theirs)
    assert len(ours) == len(theirs)


def test_repeat_sampler_docstring_example():
    sampler = RepeatSampler(["a", "b", "c", "d", "e", "f", "g"], mini_repeat_count=2, batch_size=3, repeat_count=4)
    assert list(sampler) == [4, 4, 3, 3, 0, 0] * 4 + [1, 1, 2, 2, 6, 6] * 4  # TRL's docstring, default seed
    with pytest.raises(ValueError, match="mini_repeat_count must be a positive int"):
        RepeatSampler([1], mini_repeat_count=0)


@pytest.mark.parametrize("seed", [0, 1, 123, 2**32 + 5, 67280421310721])
def test_torch_generator_randperm_sequence(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    ours = TorchCPUGenerator(seed)
    for n in (1, 2, 10, 1000, 3, 50000):
        assert ours.randperm(n) == torch.randperm(n, generator=g).tolist()


# ---------------------------------------------------------------------------------------------- flush_left/right


def _masks_and_values(seed):
    rng = np.random.default_rng(seed)
    mask = np.zeros((5, 9), np.int64)
    for i, (start, length) in enumerate([(2, 4), (0, 9), (5, 2), (3, 0), (1, 3)]):
        mask[i, start:start + length] = 1
    mask[1, 4] = 0  # a hole inside a row
    values = rng.integers(1, 100, mask.shape)
    floats = rng.normal(size=mask.shape).astype(np.float32)
    return mask, values, floats


@pytest.mark.parametrize("seed", [0, 1])
def test_flush_left_matches_trl(seed):
    mask, values, floats = _masks_and_values(seed)
    expected = trl_flush_left(torch.tensor(mask), torch.tensor(values), torch.tensor(floats))
    got = flush_left(mask, values, floats)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e.numpy())
    np.testing.assert_array_equal(flush_left(mask), trl_flush_left(torch.tensor(mask)).numpy())
    assert isinstance(flush_left(mask.tolist()), np.ndarray)  # lists in, numpy out
    jm, jv = flush_left(jnp.asarray(mask), jnp.asarray(values))  # JAX arrays in, JAX arrays out
    assert isinstance(jv, type(jnp.asarray(values))) and jm.shape == expected[0].shape
    np.testing.assert_array_equal(np.asarray(jv), expected[1].numpy())


def test_flush_left_docstring_example_and_empty_mask():
    m, t = flush_left(np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]), np.array([[9, 9, 2, 3, 4], [9, 5, 6, 9, 9]]))
    e_m, e_t = trl_flush_left(torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]),
                              torch.tensor([[9, 9, 2, 3, 4], [9, 5, 6, 9, 9]]))
    np.testing.assert_array_equal(m, e_m.numpy())
    np.testing.assert_array_equal(t, e_t.numpy())
    zeros = np.zeros((2, 4), np.int64)
    np.testing.assert_array_equal(flush_left(zeros), trl_flush_left(torch.tensor(zeros)).numpy())


@pytest.mark.parametrize("seed", [0, 1])
def test_flush_right_is_the_mirror_of_trl_flush_left(seed):
    mask, values, _ = _masks_and_values(seed)
    e_m, e_v = trl_flush_left(torch.tensor(mask[:, ::-1].copy()), torch.tensor(values[:, ::-1].copy()))
    m, v = flush_right(mask, values)
    np.testing.assert_array_equal(m, e_m.numpy()[:, ::-1])
    np.testing.assert_array_equal(v, e_v.numpy()[:, ::-1])
    assert (m[:, -1] == 1).sum() == (mask.sum(1) > 0).sum()  # every non-empty row ends in the last column


# ---------------------------------------------------------------------------------------------- truncate_dataset


@pytest.mark.parametrize("max_length", [0, 2, 3, 10])
@pytest.mark.parametrize("fmt", [None, "numpy"])
def test_truncate_dataset_matches_trl(max_length, fmt):
    ds = datasets.Dataset.from_dict({
        "input_ids": [[1, 2, 3], [4, 5, 6, 7], [8]],
        "attention_mask": [[0, 1, 1], [0, 0, 1, 1], [1]],
        "nested": [[[1, 2], [3]], [[4]], []],
        "text": ["a", "b", "c"],
        "label": [1, 0, 1],
    })
    if fmt:
        ds = ds.with_format(fmt)
    ours, theirs = truncate_dataset(ds, max_length), trl_truncate_dataset(ds, max_length)
    assert ours.format == theirs.format
    assert ours.with_format(None).to_list() == theirs.with_format(None).to_list()
    dd = datasets.DatasetDict({"train": ds, "test": ds})
    assert truncate_dataset(dd, max_length)["test"].with_format(None).to_list() == \
        trl_truncate_dataset(dd, max_length)["test"].with_format(None).to_list()
    it = ds.with_format(None).to_iterable_dataset()
    assert list(truncate_dataset(it, max_length)) == list(trl_truncate_dataset(it, max_length))
