"""Torch datasets over :class:`~captioner.data.formats.ImageRecord` lists, and their collates.

* :class:`CaptionTrainDataset`: one item per (image, caption) pair, for teacher forcing;
* :class:`ImageEvalDataset`: one item per image, for generation; ``index`` points back into the
  record list (and so into ``CaptionDataModule.references(split)``).

Images are decoded in ``__getitem__`` (inside DataLoader workers) by
:func:`~captioner.data.images.load_image`; a broken file raises
:class:`~captioner.data.images.ImageLoadError` naming it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from captioner.data.formats import AnnotationWarning, ImageRecord
from captioner.data.images import image_to_tensor, load_image
from captioner.data.tokenize import tokenize
from captioner.data.vocabulary import Vocabulary

__all__ = ["CaptionTrainDataset", "ImageEvalDataset", "collate_captions", "collate_images"]


class CaptionTrainDataset(Dataset[dict[str, Any]]):
    """Every (image, caption) pair of ``records``, captions encoded with ``vocab``.

    Captions are tokenised and encoded once, here, into one flat int array plus offsets (so that
    forked DataLoader workers share them instead of copying millions of small Python lists).

    Args:
        records: The images and their captions.
        vocab: Vocabulary used to encode captions (unknown words -> ``<unk>``).
        image_size: Side ``S`` of the square ``S x S`` input, or ``(H, W)``.
        max_length: Longest encoded caption ``T + 1``, ``<start>`` and ``<end>`` included; longer
            captions are cut, keeping ``<end>`` last (counted in one
            :class:`~captioner.data.formats.AnnotationWarning`).

    Raises:
        ValueError: If ``max_length < 2``.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        vocab: Vocabulary,
        image_size: int | tuple[int, int],
        max_length: int = 50,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must leave room for <start> and <end>, got {max_length}")
        self.records = list(records)
        self.vocab = vocab
        self.image_size = image_size
        self.max_length = max_length
        record_index: list[int] = []
        lengths: list[int] = []
        ids: list[int] = []
        cut, longest = 0, 0
        for r, record in enumerate(self.records):
            for caption in record.captions:
                encoded = vocab.encode(tokenize(caption))
                if len(encoded) > max_length:
                    cut, longest = cut + 1, max(longest, len(encoded))
                    encoded = [*encoded[: max_length - 1], vocab.end_id]
                record_index.append(r)
                lengths.append(len(encoded))
                ids.extend(encoded)
        if cut:
            warnings.warn(f"{cut} of {len(lengths)} training captions are longer than "
                          f"max_caption_length = {max_length} tokens (<start> and <end> "
                          f"included; the longest has {longest}) and are cut",
                          AnnotationWarning, stacklevel=2)
        self._record_index = np.asarray(record_index, dtype=np.int64)  # (P,) pairs
        self._offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])  # (P + 1,)
        self._ids = np.asarray(ids, dtype=np.int64)  # (sum of T,)

    def __len__(self) -> int:
        return len(self._record_index)

    @property
    def lengths(self) -> np.ndarray:
        """``(P,)`` int64: each pair's encoded caption length ``T + 1`` (``<start>`` and
        ``<end>`` included, after cutting)."""
        return np.diff(self._offsets)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Returns ``image`` (3, H, W) float in [0, 1], ``caption`` (T + 1,) long, ``index`` int."""
        r = int(self._record_index[i])
        start, end = self._offsets[i], self._offsets[i + 1]
        caption = torch.from_numpy(self._ids[start:end].copy())  # (T + 1,)
        image = image_to_tensor(load_image(self.records[r].path), self.image_size)  # (3, H, W)
        return {"image": image, "caption": caption, "index": r}


class ImageEvalDataset(Dataset[dict[str, Any]]):
    """Each image of ``records`` once.

    Args:
        records: The images.
        image_size: Side ``S`` of the square ``S x S`` input, or ``(H, W)``.
    """

    def __init__(self, records: Sequence[ImageRecord], image_size: int | tuple[int, int]) -> None:
        self.records = list(records)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Returns ``image`` (3, H, W) float in [0, 1] and ``index`` (= ``i``)."""
        image = image_to_tensor(load_image(self.records[i].path), self.image_size)  # (3, H, W)
        return {"image": image, "index": i}


def collate_captions(batch: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack images and right-pad captions (order kept, no sorting by length).

    Args:
        batch: Items of :class:`CaptionTrainDataset`.
        pad_id: Padding id (``Vocabulary.pad_id``).

    Returns:
        ``images`` (B, 3, H, W) float, ``captions`` (B, T + 1) long, ``T + 1`` the longest
        caption (the others padded with ``pad_id``), ``lengths`` (B,) long (tokens incl.
        ``<start>``/``<end>``), ``index`` (B,) long.
    """
    lengths = torch.tensor([len(item["caption"]) for item in batch], dtype=torch.long)  # (B,)
    captions = torch.full((len(batch), int(lengths.max())), pad_id, dtype=torch.long)  # (B, T + 1)
    for b, item in enumerate(batch):
        captions[b, : lengths[b]] = item["caption"]
    return {
        "images": torch.stack([item["image"] for item in batch]),  # (B, 3, H, W)
        "captions": captions,
        "lengths": lengths,
        "index": torch.tensor([item["index"] for item in batch], dtype=torch.long),  # (B,)
    }


def collate_images(batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack images.

    Args:
        batch: Items of :class:`ImageEvalDataset`.

    Returns:
        ``images`` (B, 3, H, W) float and ``index`` (B,) long.
    """
    return {
        "images": torch.stack([item["image"] for item in batch]),  # (B, 3, H, W)
        "index": torch.tensor([item["index"] for item in batch], dtype=torch.long),  # (B,)
    }
