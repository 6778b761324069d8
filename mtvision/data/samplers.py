"""Samplers: a resumable, seeded training order shared by 1..N processes, and an exact evaluation split.

Training (:class:`TrainSampler`): epoch ``e`` is one permutation drawn from ``(seed, e)``; process ``r``
of ``N`` takes every N-th index starting at ``r`` (``DistributedSampler``'s split), so with a per-process
batch of ``B / N`` the union of the processes' k-th batches is exactly the k-th batch of size ``B`` of a
single process. Each index comes with the seed of its augmentation, drawn from ``(seed, e, position)``,
so what a sample looks like never depends on the number of processes or workers, and a run resumed in
the middle of an epoch (``set_epoch(e, start)``) sees exactly the samples it would have seen.

Evaluation (:class:`ShardSampler`): process ``r`` takes indices ``r, r + N, ...``, every sample exactly
once over all processes (no padding duplicates, unlike ``DistributedSampler``), so summed metric states
equal a single process's.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Sampler

__all__ = ["TrainSampler", "ShardSampler"]


class TrainSampler(DistributedSampler):
    """Shuffled indices for one process of ``num_replicas``, yielded as ``(index, augmentation_seed)``.

    Args:
        dataset: the training set (only its length is used).
        num_replicas, rank: the process group (1, 0 for a single process).
        seed: the experiment seed.
        batch_size: the per-process batch; an epoch ends after the last full global batch, so every
            process sees the same number of batches.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, batch_size: int = 1):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = int(batch_size)
        self.start = 0
        # whole global batches only
        self.num_samples = (self.num_samples // self.batch_size) * self.batch_size
        self.total_size = self.num_samples * self.num_replicas

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate epoch ``epoch`` from its ``start_batch``-th batch (0: from the beginning)."""
        super().set_epoch(epoch)
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"TrainSampler: start_batch {start_batch} not in [0, {self.batches_per_epoch}]")
        self.start = int(start_batch) * self.batch_size

    def __len__(self) -> int:
        return self.num_samples - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=g)[: self.total_size]
        seeds = np.random.default_rng([self.seed, self.epoch]).integers(0, 2**63 - 1, self.total_size)
        for pos in range(self.rank + self.start * self.num_replicas, self.total_size, self.num_replicas):
            yield int(order[pos]), int(seeds[pos])


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + num_replicas, ...`` of the dataset, in order: every sample once overall."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0):
        self.n, self.num_replicas, self.rank = len(dataset), int(num_replicas), int(rank)

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.num_replicas))
