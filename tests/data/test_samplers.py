"""Tests for captioner.data.samplers: the paper's batches of one caption length."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from captioner.data.datamodule import ShapesDataModule
from captioner.data.samplers import EpochRandomSampler, SameLengthBatchSampler, epoch_sampler
from tests.conftest import SHAPES_SIZES, trainer_at

#          0  1  2  3  4  5  6  7  8  9
KEYS = [3, 3, 3, 4, 4, 5, 3, 4, 3, 3]  # length 3: 6 captions, 4: 3, 5: 1


def test_each_batch_holds_one_length_and_each_caption_comes_once():
    sampler = SameLengthBatchSampler(EpochRandomSampler(KEYS, seed=1), 2, keys=KEYS, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(10))
    assert all(len({KEYS[i] for i in b}) == 1 for b in batches)
    # by hand: length 3 -> 2 + 2 + 2, length 4 -> 2 + 1, length 5 -> 1
    assert sorted((KEYS[b[0]], len(b)) for b in batches) == [
        (3, 2), (3, 2), (3, 2), (4, 1), (4, 2), (5, 1)]
    assert len(sampler) == 6
    dropping = SameLengthBatchSampler(EpochRandomSampler(KEYS), 2, drop_last=True, keys=KEYS)
    assert sorted(len(b) for b in dropping) == [2, 2, 2, 2] and len(dropping) == 4


def test_the_order_is_a_function_of_seed_and_epoch():
    order = EpochRandomSampler(KEYS, seed=2)
    sampler = SameLengthBatchSampler(order, 2, keys=KEYS, seed=2)
    epochs = []
    for epoch in range(6):
        order.set_epoch(epoch)  # what Lightning calls on the batch sampler's sampler
        epochs.append(list(sampler))
    order.set_epoch(3)
    assert list(sampler) == epochs[3]
    assert len({str(e) for e in epochs}) > 1
    assert list(sampler) == epochs[4]  # a pass without set_epoch: the next epoch
    resumed = SameLengthBatchSampler(EpochRandomSampler(KEYS, seed=2), 2, keys=KEYS, seed=2,
                                     epoch=5)
    assert list(resumed) == epochs[5]  # a fit resumed at epoch 5, before any set_epoch


def test_leaving_out_the_epoch_keeps_the_samplers_epoch():
    """Wrapping a sampler already at epoch 4 without ``epoch`` must not reset it to 0."""
    order = EpochRandomSampler(KEYS, seed=2)
    order.set_epoch(4)
    wrapped = list(SameLengthBatchSampler(order, 2, keys=KEYS, seed=2))
    at_4 = list(SameLengthBatchSampler(EpochRandomSampler(KEYS, seed=2), 2, keys=KEYS, seed=2,
                                       epoch=4))
    at_0 = list(SameLengthBatchSampler(EpochRandomSampler(KEYS, seed=2), 2, keys=KEYS, seed=2,
                                       epoch=0))
    assert wrapped == at_4 and wrapped != at_0

def test_the_next_length_is_drawn_in_proportion_to_its_batches():
    """The paper "randomly sample[s] a length": here length 3 has 6 batches of 2 and length 7
    two, so an epoch's first batch is of length 3 with probability 6 / 8."""
    keys = [3] * 12 + [7] * 4
    order = EpochRandomSampler(keys, seed=0)
    sampler = SameLengthBatchSampler(order, 2, keys=keys, seed=0)
    firsts = Counter()
    for epoch in range(800):
        order.set_epoch(epoch)
        firsts[keys[next(iter(sampler))[0]]] += 1
    assert firsts[3] / 800 == pytest.approx(0.75, abs=0.05)


def test_a_worker_backed_loader_keeps_each_epochs_order():
    """A DataLoader with workers calls ``iter`` twice and uses the second iterator: the first
    call must not move the sampler on to the next epoch."""
    sampler = SameLengthBatchSampler(EpochRandomSampler(KEYS, seed=4), 3, keys=KEYS, seed=4)
    unused = iter(sampler)
    epoch0 = list(sampler)
    del unused
    assert epoch0 == list(SameLengthBatchSampler(EpochRandomSampler(KEYS, seed=4), 3,
                                                 keys=KEYS, seed=4))


@pytest.mark.parametrize("world", [2, 3, 4, 5])  # 6 batches: 0, 0, 2 and 4 repeated
def test_ranks_take_the_same_number_of_batches(world):
    """Each rank's share of the captions would group into another number of batches (and the
    rank left over would hang the gradient all-reduce): the batches are made over the whole
    set, alike on every rank, and dealt out, the first ones repeated to a multiple of W."""
    per_rank = []
    for rank in range(world):
        shard = DistributedSampler(KEYS, num_replicas=world, rank=rank, shuffle=True, seed=7)
        sampler = SameLengthBatchSampler(shard, 2, keys=KEYS, seed=7, epoch=3)
        per_rank.append(list(sampler))
        assert len(per_rank[-1]) == len(sampler) == -(-6 // world)  # 6 batches in all
    dealt = [b for batches in per_rank for b in batches]
    assert all(len({KEYS[i] for i in b}) == 1 for b in dealt)
    assert {i for b in dealt for i in b} == set(range(10))
    assert len(dealt) - len({tuple(b) for b in dealt}) == -6 % world  # repeats, only to pad
    # the batches of one epoch are those of a permutation drawn from (seed, epoch)
    g = torch.Generator().manual_seed(7 + 3)
    again = SameLengthBatchSampler(torch.randperm(10, generator=g).tolist(), 2, keys=KEYS)
    assert sorted(tuple(sorted(b)) for b in again) == sorted({tuple(sorted(b)) for b in dealt})


def test_lightning_rebuilds_it_around_its_distributed_sampler():
    """What Lightning's DDP does with a custom batch sampler: it re-makes it from the arguments
    it was made with, the ``sampler`` swapped for a ``DistributedSampler``."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader

    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = DataLoader(KEYS, batch_sampler=SameLengthBatchSampler(
            EpochRandomSampler(KEYS, seed=5), 2, keys=KEYS, seed=5, epoch=2))
    shard = DistributedSampler(KEYS, num_replicas=2, rank=1, shuffle=True, seed=5)
    rebuilt = _update_dataloader(loader, shard, mode=RunningStage.TRAINING).batch_sampler
    assert isinstance(rebuilt, SameLengthBatchSampler)
    assert rebuilt.sampler is shard and shard.epoch == 2  # started at the resumed epoch
    assert (rebuilt.batch_size, rebuilt.keys, rebuilt.seed) == (2, KEYS, 5)
    assert len(list(rebuilt)) == len(rebuilt) == 3


def test_the_data_module_serves_unpadded_batches_of_one_length(shapes_root: Path):
    dm = ShapesDataModule(root=str(shapes_root), **SHAPES_SIZES, seed=0, batch_size=5, num_workers=0,
                          same_length_batches=True)
    dm.setup("fit")
    lengths = dm._dataset("train").lengths
    assert len(set(lengths.tolist())) > 1  # more than one length to keep apart
    loader = dm.train_dataloader()
    batches = list(loader)
    seen = torch.cat([b["index"] for b in batches])
    assert len(seen) == len(lengths) == len(dm._dataset("train"))
    expected = sum(-(-n // 5) for n in Counter(lengths.tolist()).values())
    assert len(batches) == len(loader) == expected
    for batch in batches:
        assert (batch["lengths"] == batch["captions"].shape[1]).all()  # one length, no padding
        assert (batch["captions"] != dm.vocab.pad_id).all()
    # a fit resumed at epoch 2 draws epoch 2's batches (before Lightning's set_epoch)
    loader.batch_sampler.sampler.set_epoch(2)
    epoch2 = [b["index"].tolist() for b in loader]
    dm.trainer = trainer_at(2)
    assert [b["index"].tolist() for b in dm.train_dataloader()] == epoch2
    # evaluation is untouched: each image once, in order
    assert torch.cat([b["index"] for b in dm.val_dataloader()]).tolist() == list(range(6))


def test_the_default_mixes_lengths(shapes_root: Path):
    dm = ShapesDataModule(root=str(shapes_root), **SHAPES_SIZES, seed=0, batch_size=24, num_workers=0)
    batch = next(iter(dm.train_dataloader()))
    assert len(set(batch["lengths"].tolist())) > 1


def test_overfit_batches_repeat_the_same_unshuffled_batches(shapes_root: Path):
    """Lightning makes a loader's own sampler sequential for ``overfit_batches``, but not the
    sampler inside a batch sampler: every epoch trained on other batches."""
    dm = ShapesDataModule(root=str(shapes_root), **SHAPES_SIZES, seed=0, batch_size=5, num_workers=0,
                          same_length_batches=True)
    epochs = []
    for epoch in range(3):
        dm.trainer = trainer_at(epoch, overfit_batches=2)
        loader = dm.train_dataloader()
        epochs.append([b["index"].tolist() for b in loader])
    assert epochs[0] == epochs[1] == epochs[2]
    lengths = [b["lengths"][0].item() for b in dm.train_dataloader()]
    assert lengths == sorted(lengths)  # unshuffled: by length


def test_a_sampler_of_some_indices_batches_and_counts_those():
    sampler = SameLengthBatchSampler([0, 1, 2, 3], 2, keys=KEYS)  # not shuffling: in order
    assert list(sampler) == [[0, 1], [2], [3]]  # length 3: 0 1 | 2, then length 4: 3
    assert len(sampler) == 3
    # 4 random draws: counted from a pass of their own, never the data set's 6 batches
    sampled = SameLengthBatchSampler(torch.utils.data.RandomSampler(KEYS, num_samples=4), 2,
                                     keys=KEYS)
    assert all(2 <= len(sampled) <= 3 for _ in range(20))


def test_epoch_sampler_under_ddp_keeps_the_seed_and_honours_distributed_false():
    trainer = trainer_at(2, world_size=2, global_rank=1)
    shard = epoch_sampler(list(range(10)), 5, trainer)
    assert isinstance(shard, DistributedSampler)
    assert (shard.seed, shard.num_replicas, shard.rank, shard.epoch, shard.shuffle) == (
        5, 2, 1, 2, True)
    inner = epoch_sampler(list(range(10)), 5, trainer, distributed=False)
    assert type(inner) is EpochRandomSampler and (inner.seed, inner.epoch) == (5, 2)
