"""Tests for captioner.data.datasets."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioner.data.datasets import (
    CaptionTrainDataset,
    ImageEvalDataset,
    collate_captions,
    collate_images,
)
from captioner.data.formats import ImageRecord
from captioner.data.images import ImageLoadError
from captioner.data.vocabulary import Vocabulary

# Distinct odd sizes: images are stored 13 x 9 (W x H) and resized to H=11, W=7.
SIZE = (11, 7)


def _records(tmp_path: Path) -> list[ImageRecord]:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    records = []
    for i, colour in enumerate(colours):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (13, 9), colour).save(path)
        records.append(ImageRecord(10 + i, path, []))
    records[0].captions = ["A red square.", "Red!"]
    records[1].captions = ["a green square on a green field here"]
    records[2].captions = ["blue"]
    return records


def _vocab() -> Vocabulary:
    return Vocabulary.build([["a", "red", "square", "green", "blue"]])  # a=4 blue=5 green=6 red=7 square=8


def test_train_dataset_items(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"1 of 4 training captions are longer than "
                                         r"max_caption_length = 6 .*the longest has 10"):
        ds = CaptionTrainDataset(_records(tmp_path), _vocab(), SIZE, max_length=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none cut: no warning
        CaptionTrainDataset(_records(tmp_path), _vocab(), SIZE, max_length=10)
    assert len(ds) == 4  # one item per caption
    item = ds[0]
    assert item["image"].shape == (3, 11, 7) and item["image"].dtype == torch.float32
    assert torch.allclose(item["image"][:, 5, 3], torch.tensor([1.0, 0.0, 0.0]))
    assert item["caption"].tolist() == [1, 4, 7, 8, 2]
    assert item["caption"].dtype == torch.long
    assert item["index"] == 0
    assert ds[1]["caption"].tolist() == [1, 7, 2]
    # 8 words -> cut to max_length=6 with <end> kept last; unknown words -> <unk>
    assert ds[2]["caption"].tolist() == [1, 4, 6, 8, 3, 2]
    assert ds[2]["index"] == 1
    assert ds[3]["index"] == 2


def test_train_dataset_rejects_tiny_max_length(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        CaptionTrainDataset(_records(tmp_path), _vocab(), SIZE, max_length=1)


def test_collate_captions(tmp_path: Path) -> None:
    ds = CaptionTrainDataset(_records(tmp_path), _vocab(), SIZE)
    batch = collate_captions([ds[1], ds[3], ds[0]], pad_id=0)
    assert set(batch) == {"images", "captions", "lengths", "index"}
    assert batch["images"].shape == (3, 3, 11, 7)  # (B, 3, H, W)
    assert batch["captions"].tolist() == [[1, 7, 2, 0, 0], [1, 5, 2, 0, 0], [1, 4, 7, 8, 2]]
    assert batch["lengths"].tolist() == [3, 3, 5]
    assert batch["index"].tolist() == [0, 2, 0]
    assert collate_captions([ds[1], ds[0]], pad_id=9)["captions"][0].tolist() == [1, 7, 2, 9, 9]


def test_eval_dataset_and_collate(tmp_path: Path) -> None:
    ds = ImageEvalDataset(_records(tmp_path), SIZE)
    assert len(ds) == 3
    batch = collate_images([ds[2], ds[0], ds[1]])
    assert set(batch) == {"images", "index"}
    assert batch["images"].shape == (3, 3, 11, 7)
    assert batch["index"].tolist() == [2, 0, 1]
    assert torch.allclose(batch["images"][0, :, 0, 0], torch.tensor([0.0, 0.0, 1.0]))


def test_broken_image_names_the_file(tmp_path: Path) -> None:
    records = _records(tmp_path)
    records[1].path.write_text("garbage")
    ds = ImageEvalDataset(records, SIZE)
    with pytest.raises(ImageLoadError, match="img1.png"):
        ds[1]
