"""Datasets of cached annotation grids: the image datasets with ``features`` for ``images``.

Plain PyTorch (no Lightning): :class:`CachedCaptionDataset` / :class:`CachedImageDataset` serve
each record's grid ``(L, D)`` (float16) from a :class:`~captioner.features.FeatureCache`, and the
collate functions stack them into ``features`` ``(B, L, D)``. The data modules that use them are
in :mod:`captioner.data.cached`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from captioner.data.datasets import (CaptionTrainDataset, ImageEvalDataset, collate_captions,
                                     collate_images)
from captioner.data.formats import ImageRecord
from captioner.data.vocabulary import Vocabulary
from captioner.features import FeatureCache

__all__ = ["CachedCaptionDataset", "CachedImageDataset", "collate_cached_captions",
           "collate_cached_images"]


class CachedCaptionDataset(CaptionTrainDataset):
    """:class:`CaptionTrainDataset` pairs with the image's cached grid instead of its pixels.

    Args:
        records: the images and their captions.
        vocab: vocabulary used to encode captions.
        cache: the feature cache holding every record's image.
        max_length: longest encoded caption ``T + 1`` (``<start>``/``<end>`` included).
    """

    def __init__(self, records: Sequence[ImageRecord], vocab: Vocabulary, cache: FeatureCache,
                 max_length: int = 50) -> None:
        super().__init__(records, vocab, image_size=1, max_length=max_length)
        self.cache = cache
        self._locations = cache.locate(r.path for r in self.records)  # (R, 2) shard, row

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Returns ``features`` ``(L, D)`` float16, ``caption`` ``(T + 1,)`` long, ``index`` int."""
        r = int(self._record_index[i])
        start, end = self._offsets[i], self._offsets[i + 1]
        caption = torch.from_numpy(self._ids[start:end].copy())  # (T + 1,)
        shard, row = self._locations[r]
        return {"features": self.cache.tensor_at(shard, row), "caption": caption, "index": r}


class CachedImageDataset(ImageEvalDataset):
    """Each image of ``records`` once, as its cached grid.

    Args:
        records: the images.
        cache: the feature cache holding them.
    """

    def __init__(self, records: Sequence[ImageRecord], cache: FeatureCache) -> None:
        super().__init__(records, image_size=1)
        self.cache = cache
        self._locations = cache.locate(r.path for r in self.records)  # (R, 2) shard, row

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Returns ``features`` ``(L, D)`` float16 and ``index`` (= ``i``)."""
        shard, row = self._locations[i]
        return {"features": self.cache.tensor_at(shard, row), "index": i}


def _as_images(batch: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**item, "image": item["features"]} for item in batch]


def collate_cached_captions(batch: Sequence[dict[str, Any]], pad_id: int = 0
                            ) -> dict[str, torch.Tensor]:
    """:func:`collate_captions` with ``features`` ``(B, L, D)`` in place of ``images``."""
    out = collate_captions(_as_images(batch), pad_id)
    out["features"] = out.pop("images")  # (B, L, D)
    return out


def collate_cached_images(batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """:func:`collate_images` with ``features`` ``(B, L, D)`` in place of ``images``."""
    out = collate_images(_as_images(batch))
    out["features"] = out.pop("images")  # (B, L, D)
    return out
