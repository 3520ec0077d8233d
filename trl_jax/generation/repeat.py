"""``num_generations``: repeat each prompt G times, consecutively (TRL's ``RepeatSampler(mini_repeat_count=G)``).

:func:`repeat_for_generations` repeats a batch's rows; :class:`RepeatSampler` is TRL's index sampler itself (same
index sequence for the same seed, torch's shuffle reproduced without torch by :class:`TorchCPUGenerator`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np


def repeat_for_generations(batch, num_generations: int):
    """Repeat every row of ``batch`` ``num_generations`` times in a row: ``[p0, p1] -> [p0, p0, p1, p1]`` (G=2).

    ``batch``: an array (``[B, ...]`` -> ``[B * G, ...]``, numpy stays numpy, jax stays jax), a list/tuple (each
    item repeated), or a mapping of those (e.g. ``{"prompt_ids": ..., "prompt_mask": ..., "answer": [...]}``).
    This is the order TRL's GRPO/online-DPO sampler yields: the G completions of one prompt are adjacent, so
    group statistics are ``reshape(-1, G)``.
    """
    if not isinstance(num_generations, (int, np.integer)) or num_generations < 1:
        raise ValueError(f"num_generations must be a positive int, got {num_generations!r}.")
    g = int(num_generations)
    if isinstance(batch, Mapping):
        return type(batch)({k: repeat_for_generations(v, g) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(x for x in batch for _ in range(g))
    if isinstance(batch, np.ndarray):
        return np.repeat(batch, g, axis=0)
    if hasattr(batch, "shape"):
        return jnp.repeat(batch, g, axis=0)
    raise ValueError(
        f"repeat_for_generations: unsupported batch type {type(batch).__name__}; pass an array, a list or a dict."
    )


# ----------------------------------------------------------------------------------------------------------------
# RepeatSampler: TRL's index sampler, with torch.Generator's exact shuffle and no torch
# ----------------------------------------------------------------------------------------------------------------

TORCH_DEFAULT_SEED = 67280421310721
"""The seed of a fresh ``torch.Generator()`` (what TRL's sampler shuffles with when ``seed`` is ``None``)."""

_RANDPERM_SMALL_N = (2**32 - 1) // 20  # torch's randperm_cpu switches algorithm at this size


class TorchCPUGenerator:
    """``torch.Generator()`` on CPU (MT19937, ``manual_seed``) as far as ``torch.randperm`` uses it, in numpy.

    ``randperm(n)`` returns the same list as ``torch.randperm(n, generator=g).tolist()`` for a generator seeded
    with the same seed and having made the same earlier ``randperm`` calls (torch's Fisher-Yates: for ``i < n - 1``,
    ``z = next_uint32 % (n - i)``, swap ``r[i]`` and ``r[i + z]``). Exact for ``n < (2**32 - 1) // 20`` (214M),
    torch's own bound for this algorithm; beyond it the same shuffle runs but torch's differs.
    """

    def __init__(self, seed: int = TORCH_DEFAULT_SEED):
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int (torch.Generator.manual_seed), got {seed!r}.")
        key = np.empty(624, np.uint32)
        x = int(seed) & 0xFFFFFFFF  # torch's mt19937 keeps the low 32 bits of the seed
        key[0] = x
        for j in range(1, 624):
            x = (1812433253 * (x ^ (x >> 30)) + j) & 0xFFFFFFFF
            key[j] = x
        self._bits = np.random.MT19937()
        self._bits.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": 624}}

    def randperm(self, n: int) -> list[int]:
        n = int(n)
        perm = list(range(n))
        if n < 2:
            return perm
        raw = self._bits.random_raw(n - 1)
        for i in range(n - 1):
            z = int(raw[i]) % (n - i)
            perm[i], perm[i + z] = perm[i + z], perm[i]
        return perm


class RepeatSampler:
    """TRL's ``RepeatSampler``: dataset indices in chunks of ``batch_size`` unique indices, each chunk emitted
    ``repeat_count`` times, each index within it ``mini_repeat_count`` times in a row.

    ``RepeatSampler(data_source, mini_repeat_count, batch_size=1, repeat_count=1, shuffle=True, seed=None)``:
    ``list(sampler)`` is the same index sequence as ``trl.trainer.utils.RepeatSampler`` with the same arguments,
    the shuffled order included: the permutation is ``torch.randperm(len(data_source))`` drawn from a generator
    seeded with ``seed`` (a fresh ``torch.Generator()``'s default seed when ``None``, as in TRL), reproduced
    without torch by :class:`TorchCPUGenerator`; every new iteration (epoch) draws the next permutation from the
    same generator. A last chunk with fewer than ``batch_size`` indices is dropped. ``len(sampler)`` is
    ``(n // batch_size) * batch_size * mini_repeat_count * repeat_count``.

    Example (TRL's docstring): ``list(RepeatSampler("abcdefg", mini_repeat_count=2, batch_size=3,
    repeat_count=4, shuffle=False))`` is ``[0, 0, 1, 1, 2, 2] * 4 + [3, 3, 4, 4, 5, 5] * 4``.
    """

    def __init__(self, data_source, mini_repeat_count: int, batch_size: int = 1, repeat_count: int = 1,
                 shuffle: bool = True, seed: int | None = None):
        for name, value in (("mini_repeat_count", mini_repeat_count), ("batch_size", batch_size),
                            ("repeat_count", repeat_count)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"RepeatSampler: {name} must be a positive int, got {value!r}.")
        self.data_source = data_source
        self.mini_repeat_count = int(mini_repeat_count)
        self.batch_size = int(batch_size)
        self.repeat_count = int(repeat_count)
        self.num_samples = len(data_source)
        self.shuffle = shuffle
        self.seed = seed
        if shuffle:
            self.generator = TorchCPUGenerator(TORCH_DEFAULT_SEED if seed is None else seed)

    def __iter__(self):
        if self.shuffle:
            indexes = self.generator.randperm(self.num_samples)
        else:
            indexes = list(range(self.num_samples))
        chunks = [indexes[i:i + self.batch_size] for i in range(0, len(indexes), self.batch_size)]
        for chunk in chunks:
            if len(chunk) != self.batch_size:
                continue
            for _ in range(self.repeat_count):
                for index in chunk:
                    for _ in range(self.mini_repeat_count):
                        yield index

    def __len__(self) -> int:
        return (self.num_samples // self.batch_size) * self.batch_size * self.mini_repeat_count * self.repeat_count
