"""Shuffling that a resumed run reproduces exactly.

A plain ``RandomSampler`` draws from the global RNG, whose state a checkpoint does not hold: after a
resume the batch order differs from the uninterrupted run. Here the order is a function of
``(seed, epoch)`` only. Lightning calls ``set_epoch`` on every sampler that has it, and under DDP it
replaces a ``RandomSampler`` (this is one) with a ``DistributedSampler``, which is seeded the same way.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import RandomSampler


def global_seed() -> int:
    """The seed of ``seed_everything`` (Lightning exports it), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class EpochSeededRandomSampler(RandomSampler):
    def __init__(self, data_source, seed: int | None = None) -> None:
        super().__init__(data_source)
        self.seed = global_seed() if seed is None else seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()
