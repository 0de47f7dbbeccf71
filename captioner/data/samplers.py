"""Training orders that are a function of ``(seed, epoch)`` alone, so that a fit resumed from an
end-of-epoch checkpoint repeats the uninterrupted run's batches exactly.

A ``DataLoader`` with ``shuffle=True`` draws its permutation, and every new iterator its workers'
base seed, from the global torch generator. With persistent workers the iterator of later epochs
is reused (no draw), while a resumed process makes a new one (one more draw): from then on the
order and the dropout stream of the two runs differ. :func:`epoch_sampler` and
:func:`loader_generator` take nothing from the global generator.

:class:`SameLengthBatchSampler` makes the paper's training batches, captions of one length each
(Xu et al. 2015, Sec. 4.3), on the same terms, and deals them out evenly under DDP.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import (BatchSampler, DistributedSampler, RandomSampler, Sampler,
                              SequentialSampler)


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


def batch_sampler_order(data_source: Sequence[Any], seed: int, trainer: Any = None
                        ) -> Sampler[int]:
    """The training order inside a batch sampler: :func:`epoch_sampler` (not distributed:
    Lightning rebuilds a batch sampler around its own ``DistributedSampler`` under DDP), or in
    order for ``overfit_batches``, which repeats the first batches (Lightning makes a loader's
    own sampler sequential for it, but not the sampler inside a batch sampler)."""
    if getattr(trainer, "overfit_batches", 0) > 0:
        return SequentialSampler(data_source)  # type: ignore[arg-type]
    return epoch_sampler(data_source, seed, trainer, distributed=False)


def shuffles(sampler: Sampler[int] | Sequence[int]) -> bool:
    """Whether ``sampler`` yields a shuffled order (a ``RandomSampler``, a shuffling
    ``DistributedSampler``): a batch sampler around it makes training batches."""
    return isinstance(sampler, RandomSampler) or bool(getattr(sampler, "shuffle", False))


def loader_generator(seed: int) -> torch.Generator:
    """A ``DataLoader``'s own generator (its workers' base seed), so that making an iterator
    takes nothing from the global one."""
    return torch.Generator().manual_seed(seed)


class SameLengthBatchSampler(BatchSampler):
    r"""Batches of captions of one length, the paper's minibatches (Xu et al. 2015, Sec. 4.3):

        "we build a dictionary mapping the length of a sentence to the corresponding subset of
        captions. Then, during training we randomly sample a length and retrieve a mini-batch of
        size 64 of that length."

    One pass: the indices in ``sampler``'s order (a permutation of the data set for training),
    grouped by ``keys[i]`` (the caption length) in that order, each group cut into batches of
    ``batch_size`` (its last one smaller, or dropped with ``drop_last``), and the batches
    shuffled (seeded by ``seed`` and the epoch). Each pass visits every index once, and the
    length of each next batch is a draw with probability proportional to the batches of that
    length still to come: the paper's "randomly sample a length". (The authors' code,
    arctic-captions' ``HomogeneousData``, cycles through the lengths in a random order instead,
    one batch of each in turn.)

    No batch is padded, so a training step unrolls exactly its captions' length. A data set
    with ``V`` distinct lengths has up to ``V`` batches smaller than ``batch_size`` per pass.

    Under DDP Lightning rebuilds a batch sampler around a ``DistributedSampler`` (its
    arguments, ``epoch`` included, are kept). Each rank's share of the captions would group
    into a different number of batches, and a rank that ran out of batches first would hang
    the others' gradient all-reduce; so with a ``DistributedSampler`` the batches are formed
    over the *whole* data set from a permutation drawn from its seed and epoch, identical on
    every rank, and dealt out: rank ``r`` of ``W`` takes batches ``r, r + W, ...``, the list
    first extended by repeating its first batches to a multiple of ``W`` (as the
    ``DistributedSampler`` repeats indices), so that every rank takes the same number of steps.

    Args:
        sampler: the order of the indices (a permutation of ``range(len(keys))`` or a
            ``DistributedSampler`` over that data set); a shuffling one gives shuffled batches.
        batch_size: items per batch.
        drop_last: drop each length's last batch when it is smaller than ``batch_size``.
        keys: one key per data set item (its caption's length).
        seed: base seed of the batch order.
        epoch: the epoch to start at, passed to the sampler's ``set_epoch`` when it has one
            (the training loop's epoch for a resumed fit); ``None`` leaves the sampler's epoch
            as it is.
    """

    def __init__(self, sampler: Sampler[int] | Sequence[int], batch_size: int,
                 drop_last: bool = False, *, keys: Sequence[Any], seed: int = 0,
                 epoch: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        super().__init__(sampler, batch_size, drop_last)
        self.keys = list(keys)
        self.seed = seed
        if epoch is not None and callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(epoch)  # type: ignore[union-attr]

    @property
    def shuffle(self) -> bool:
        """Whether the batches come shuffled (training)."""
        return shuffles(self.sampler)

    def _batch_count(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _replicas(self) -> tuple[int, int]:
        """``(W, r)``: the number of ranks and this one's (``(1, 0)`` without DDP)."""
        if isinstance(self.sampler, DistributedSampler):
            return self.sampler.num_replicas, self.sampler.rank
        return 1, 0

    def _order(self, epoch: int) -> list[int]:
        if not isinstance(self.sampler, DistributedSampler):
            return list(self.sampler)
        n = len(self.keys)
        if not self.sampler.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed((self.sampler.seed + epoch) % 2**63)
        return torch.randperm(n, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        """The batches of one pass, made on the first ``next`` (a generator, as
        :class:`~captioner.data.parallel_text.BucketBatchSampler`'s: a worker-backed DataLoader
        calls ``iter`` twice and uses the second iterator)."""
        epoch = int(getattr(self.sampler, "epoch", 0))  # before a pass moves it on
        groups: dict[Any, list[int]] = {}
        for i in self._order(epoch):
            groups.setdefault(self.keys[i], []).append(i)
        batches = [group[start:start + self.batch_size]
                   for _, group in sorted(groups.items(), key=lambda item: item[0])
                   for start in range(0, self._batch_count(len(group)) * self.batch_size,
                                      self.batch_size)]
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed + epoch + 1_000_003) % 2**63)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        world, rank = self._replicas()
        if world > 1 and batches:
            batches += (batches * world)[:-len(batches) % world]  # to a multiple of W
            batches = batches[rank::world]
        yield from batches

    def __len__(self) -> int:
        world, _ = self._replicas()
        counts = Counter(self.keys) if world > 1 else Counter(self.keys[i] for i in
                                                              self._indices())
        total = sum(self._batch_count(n) for n in counts.values())
        return -(-total // world)

    def _indices(self) -> Sequence[int]:
        """The indices a pass visits, without drawing its order (an ``EpochRandomSampler``
        moves on to its next epoch when iterated)."""
        sampler = self.sampler
        if (isinstance(sampler, RandomSampler) and not sampler.replacement
                and sampler.num_samples == len(sampler.data_source)):  # a permutation
            return range(len(sampler.data_source))
        return list(sampler)
