"""Training orders that are a function of ``(seed, epoch)`` alone, so that a fit resumed from an
end-of-epoch checkpoint repeats the uninterrupted run's batches exactly.

A ``DataLoader`` with ``shuffle=True`` draws its permutation, and every new iterator its workers'
base seed, from the global torch generator. With persistent workers the iterator of later epochs
is reused (no draw), while a resumed process makes a new one (one more draw): from then on the
order and the dropout stream of the two runs differ. :func:`epoch_sampler` and
:func:`loader_generator` take nothing from the global generator.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import RandomSampler


class EpochRandomSampler(RandomSampler):
    """A permutation of ``range(n)`` drawn from ``seed + epoch``: the same for the same epoch,
    so resuming an epoch repeats its order (Lightning calls :meth:`set_epoch`)."""

    def __init__(self, data_source: Sequence[Any], seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=g).tolist())


def run_seed() -> int:
    """The run's seed: ``seed_everything``'s (``PL_GLOBAL_SEED``, as Lightning's distributed
    sampler uses), ``0`` without one."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def epoch_sampler(data_source: Sequence[Any], seed: int, trainer: Any = None
                  ) -> EpochRandomSampler:
    """An :class:`EpochRandomSampler` at the epoch ``trainer`` is at (Lightning draws the first
    batch of a resumed fit before it calls ``set_epoch``: without this the resumed epoch would
    start with epoch 0's order)."""
    sampler = EpochRandomSampler(data_source, seed)
    if trainer is not None:
        sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed)
    return sampler


def loader_generator(seed: int) -> torch.Generator:
    """A ``DataLoader``'s own generator (its workers' base seed), so that making an iterator
    takes nothing from the global one."""
    return torch.Generator().manual_seed(seed)
