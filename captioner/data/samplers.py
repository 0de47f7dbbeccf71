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
from torch.utils.data import DistributedSampler, RandomSampler, Sampler


class EpochRandomSampler(RandomSampler):
    """A permutation of ``range(n)`` drawn from ``seed + epoch``: the same for the same epoch,
    so resuming an epoch repeats its order (Lightning calls :meth:`set_epoch` before each
    epoch). Each pass moves on to the next epoch, so a loop of its own over the loader gets a
    new order every pass without calling :meth:`set_epoch`."""

    def __init__(self, data_source: Sequence[Any], seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed((self.seed + self.epoch) % 2**63)
        self.epoch += 1  # the next pass, unless set_epoch says otherwise
        return iter(torch.randperm(len(self.data_source), generator=g).tolist())


def run_seed() -> int:
    """The run's seed: ``seed_everything``'s (``PL_GLOBAL_SEED``, as Lightning's distributed
    sampler uses; LightningCLI always sets one); else, with several processes, 0, as Lightning's
    own sampler takes (each rank must shuffle alike, or their shards overlap and some examples
    are never seen); else torch's initial seed (random for each process unless
    ``torch.manual_seed`` was called)."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    if seed is not None:
        return int(seed)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size() > 1:
        return 0
    return torch.initial_seed() % 2**32


def trainer_epoch(trainer: Any = None) -> int:
    """The epoch ``trainer``'s fit loop is at (the epochs it has finished: a resumed fit's
    first epoch), 0 without a trainer."""
    return trainer.fit_loop.epoch_progress.current.processed if trainer is not None else 0


def epoch_sampler(data_source: Sequence[Any], seed: int, trainer: Any = None,
                  distributed: bool = True) -> Sampler[int]:
    """The training sampler, at the epoch ``trainer`` is at (Lightning draws the first batch of a
    resumed fit before it calls ``set_epoch``: without this the resumed epoch would start with
    epoch 0's order): an :class:`EpochRandomSampler`, or with several processes (and
    ``distributed``) the ``DistributedSampler`` Lightning would put in its place (same seed), so
    that Lightning keeps it and its epoch. (``distributed=False`` for a sampler inside a batch
    sampler: Lightning rebuilds those with a sampler of its own under DDP.)"""
    epoch = trainer_epoch(trainer)
    sampler: EpochRandomSampler | DistributedSampler
    if distributed and trainer is not None and getattr(trainer, "world_size", 1) > 1:
        sampler = DistributedSampler(data_source, num_replicas=trainer.world_size,  # type: ignore[arg-type]
                                     rank=trainer.global_rank, shuffle=True, seed=seed)
    else:
        sampler = EpochRandomSampler(data_source, seed)
    sampler.set_epoch(epoch)
    return sampler


def loader_generator(seed: int) -> torch.Generator:
    """A ``DataLoader``'s own generator (its workers' base seed), so that making an iterator
    takes nothing from the global one."""
    return torch.Generator().manual_seed(seed)
