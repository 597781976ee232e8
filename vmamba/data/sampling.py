"""Deterministic batch samplers: the data order is a function of (seed, epoch) alone.

A training epoch is a sequence of *global* batches (``global_batch`` samples each, the last
partial batch dropped) taken from a permutation fixed by (seed, epoch); process ``rank`` of
``world_size`` takes its contiguous slice of each global batch. Because the order never depends
on state, a resumed run skips the batches already consumed and continues with the same data,
and N processes together see exactly the batches one process would.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler

from .datasets import SampleKey
from .errors import ConfigError


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


class TrainBatchSampler(Sampler):
    """Yields lists of :class:`SampleKey`: this rank's share of each global batch."""

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if global_batch % world_size:
            raise ConfigError(
                f"batch size {global_batch} is not divisible by the {world_size} processes"
            )
        if num_samples < global_batch:
            raise ConfigError(
                f"the training set has {num_samples} images, fewer than one batch of "
                f"{global_batch}; lower --batch-size"
            )
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.steps_per_epoch = num_samples // global_batch
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch`` from its batch ``start`` (batches before it were consumed)."""
        self.epoch = epoch
        self.start = start

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start

    def __iter__(self):
        if self.shuffle:
            order = epoch_permutation(self.num_samples, self.seed, self.epoch)
        else:
            order = np.arange(self.num_samples)
        lo = self.rank * self.local_batch
        for b in range(self.start, self.steps_per_epoch):
            chunk = order[
                b * self.global_batch + lo : b * self.global_batch + lo + self.local_batch
            ]
            yield [SampleKey(int(i), self.seed, self.epoch) for i in chunk]


class EvalBatchSampler(Sampler):
    """Every sample exactly once, in order: rank r takes indices r, r + W, ... in batches."""

    def __init__(
        self, num_samples: int, batch_size: int, *, rank: int = 0, world_size: int = 1
    ) -> None:
        self.indices = list(range(rank, num_samples, world_size))
        self.batch_size = max(1, int(batch_size))

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        for b in range(0, len(self.indices), self.batch_size):
            yield self.indices[b : b + self.batch_size]
