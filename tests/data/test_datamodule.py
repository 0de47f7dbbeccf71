"""Tests for captioner.data.datamodule."""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from captioner.config import ConfigError
from captioner.data.cached import CachedFeaturesDataModule
from captioner.data.datamodule import CaptionDataModule, ShapesDataModule
from captioner.data.formats import AnnotationError
from captioner.data.vocabulary import Vocabulary
from tests.conftest import trainer_at


def _image(path: Path, colour: tuple[int, int, int] = (10, 20, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (13, 9), colour).save(path)


def _coco_split(tmp_path: Path, split: str, captions: dict[str, list[str]]) -> tuple[str, str]:
    """Write a tiny COCO captions file for one split; return (json, image_dir)."""
    image_dir = tmp_path / split
    images, annotations = [], []
    for i, (name, texts) in enumerate(captions.items()):
        _image(image_dir / name)
        images.append({"id": i, "file_name": name})
        annotations += [{"id": len(annotations) + k, "image_id": i, "caption": t}
                        for k, t in enumerate(texts)]  # unique ids
    file = tmp_path / f"captions_{split}.json"
    file.write_text(json.dumps({"images": images, "annotations": annotations}))
    return str(file), str(image_dir)


TRAIN = {"t0.png": ["A red dog.", "A dog"], "t1.png": ["a cat"], "t2.png": ["red red dog"]}
VAL = {"v0.png": ["A dog sits.", "a bird"], "v1.png": ["Cats"]}


def _per_split_module(tmp_path: Path, **kwargs: object) -> CaptionDataModule:
    train_json, train_dir = _coco_split(tmp_path, "train", TRAIN)
    val_json, val_dir = _coco_split(tmp_path, "val", VAL)
    options: dict[str, object] = {"image_size": 9, "batch_size": 3, "num_workers": 0, "min_freq": 1}
    options.update(kwargs)
    return CaptionDataModule(
        format="coco",
        annotations={"train": train_json, "val": val_json},
        image_root={"train": train_dir, "val": val_dir},
        **options,  # type: ignore[arg-type]
    )


def test_an_image_in_two_splits_is_warned_of(tmp_path: Path) -> None:
    """Per-split COCO files that share an image leak it from training into validation."""
    train_json, train_dir = _coco_split(tmp_path, "train", TRAIN)
    (tmp_path / "val.json").write_text(json.dumps({
        "images": [{"id": 0, "file_name": "t1.png"}, {"id": 1, "file_name": "t2.png"}],
        "annotations": [{"id": 0, "image_id": 0, "caption": "a cat"},
                        {"id": 1, "image_id": 1, "caption": "a dog"}]}))
    options = dict(format="coco", image_size=9, num_workers=0, min_freq=1)
    shared = CaptionDataModule(annotations={"train": train_json, "val": str(tmp_path / "val.json")},
                               image_root={"train": train_dir, "val": train_dir}, **options)
    with pytest.warns(UserWarning, match=r"2 images are in more than one split \(first: "
                                         r".*t1\.png, in train and val\)"):
        shared.records("val")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _per_split_module(tmp_path / "separate").records("val")  # no image shared: silent


def test_vocab_size_right_after_construction(tmp_path: Path) -> None:
    dm = _per_split_module(tmp_path, min_freq=2)
    # train counts: red=3 dog=3 a=3 cat=1 -> specials + [a, dog, red]
    assert dm.vocab_size == 7
    assert dm.vocab.itos[4:] == ["a", "dog", "red"]
    assert dm.hparams["min_freq"] == 2 and dm.hparams["format"] == "coco"


def test_records_and_references(tmp_path: Path) -> None:
    dm = _per_split_module(tmp_path)
    assert [r.path.name for r in dm.records("train")] == ["t0.png", "t1.png", "t2.png"]
    assert dm.records("test") == []
    assert dm.references("val") == [[["a", "dog", "sits"], ["a", "bird"]], [["cats"]]]
    assert dm.records("val") is dm.records("val")  # parsed once, cached
    with pytest.raises(ValueError):
        dm.records("dev")


def test_captions_in_excess_of_the_cap_are_discarded_everywhere(tmp_path: Path) -> None:
    """``max_captions_per_image`` keeps each image's first captions in file order (the paper
    discards COCO's captions in excess of 5, Sec. 5.1): for the training pairs, the vocabulary
    and the references alike; images with fewer keep all of theirs."""
    train = {"t0.png": ["one dog", "two cats", "three birds"], "t1.png": ["a fish"]}
    val = {"v0.png": ["red car", "blue bus", "green van"], "v1.png": ["a boat"]}
    train_json, train_dir = _coco_split(tmp_path, "train", train)
    val_json, val_dir = _coco_split(tmp_path, "val", val)
    dm = CaptionDataModule(format="coco", annotations={"train": train_json, "val": val_json},
                           image_root={"train": train_dir, "val": val_dir}, image_size=9,
                           batch_size=8, num_workers=0, min_freq=1, max_captions_per_image=2)
    assert [r.captions for r in dm.records("train")] == [["one dog", "two cats"], ["a fish"]]
    assert dm.references("val") == [[["red", "car"], ["blue", "bus"]], [["a", "boat"]]]
    assert "three" not in dm.vocab.stoi and "birds" not in dm.vocab.stoi
    assert dm.vocab.itos[4:] == ["a", "cats", "dog", "fish", "one", "two"]
    dm.setup("fit")
    assert sum(len(b["index"]) for b in dm.train_dataloader()) == 3  # one pair per caption kept
    assert dm.hparams["max_captions_per_image"] == 2
    cached = CachedFeaturesDataModule(
        features_dir=str(tmp_path / "no_cache_needed_to_parse"), format="coco",
        annotations={"train": train_json, "val": val_json},
        image_root={"train": train_dir, "val": val_dir}, min_freq=1, max_captions_per_image=2)
    assert [r.captions for r in cached.records("train")] == [["one dog", "two cats"], ["a fish"]]
    uncapped = _per_split_module(tmp_path / "all")
    assert [len(r.captions) for r in uncapped.records("train")] == [2, 1, 1]


def test_dataloaders(tmp_path: Path) -> None:
    dm = _per_split_module(tmp_path, eval_batch_size=2)
    dm.setup("fit")
    train = dm.train_dataloader()
    batches = list(train)
    assert sum(len(b["index"]) for b in batches) == 4  # one item per caption
    batch = batches[0]
    assert set(batch) == {"images", "captions", "lengths", "index"}
    assert batch["images"].shape == (3, 3, 9, 9)
    assert batch["captions"].shape == (3, int(batch["lengths"].max()))
    assert batch["captions"].dtype == torch.long
    assert (batch["captions"][:, 0] == dm.vocab.start_id).all()

    val = list(dm.val_dataloader())
    assert [b["index"].tolist() for b in val] == [[0, 1]]  # images once each, in order
    assert set(val[0]) == {"images", "index"} and val[0]["images"].shape == (2, 3, 9, 9)
    with pytest.raises(AnnotationError, match=re.escape(  # no test annotations given
            "the test split has no images: the per-split annotations give train, val only")):
        dm.test_dataloader()


def test_loaders_take_nothing_from_the_global_generator(tmp_path: Path, monkeypatch) -> None:
    """The training order is a function of (seed, epoch) and the loaders have their own
    generator: iterating takes nothing from the global torch generator (which checkpoints save
    for dropout), so resuming with persistent workers is exact."""
    # the run seed is pinned: other tests' seed_everything leaves PL_GLOBAL_SEED set, and with
    # 4 items some seeds (7, say) happen to give epochs 0 and 1 the same order
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    dm = _per_split_module(tmp_path, num_workers=0)
    state = torch.get_rng_state()
    first = [b["index"].tolist() for b in dm.train_dataloader()]
    list(dm.val_dataloader())
    assert torch.equal(torch.get_rng_state(), state)
    again = dm.train_dataloader()
    assert [b["index"].tolist() for b in again] == first  # same seed and epoch: same order
    second = [b["index"].tolist() for b in again]  # a loop of one's own: the next epoch's
    assert second != first and sorted(sum(second, [])) == sorted(sum(first, []))
    again.sampler.set_epoch(1)  # what Lightning does before epoch 1
    assert [b["index"].tolist() for b in again] == second


def test_several_processes_get_the_distributed_sampler_at_the_trainers_epoch(tmp_path: Path
                                                                             ) -> None:
    """Under DDP the training sampler is the ``DistributedSampler`` Lightning would make (same
    seed), already at the trainer's epoch: Lightning keeps it, so a resumed epoch is not
    replayed with epoch 0's order (Lightning's own sampler starts at epoch 0 and the first
    batch is drawn before its set_epoch)."""

    from torch.utils.data import DistributedSampler

    dm = _per_split_module(tmp_path, batch_size=1)
    dm.trainer = trainer_at(2, world_size=2, global_rank=1)
    sampler = dm.train_dataloader().sampler
    assert isinstance(sampler, DistributedSampler) and sampler.epoch == 2
    expected = DistributedSampler(dm._dataset("train"), num_replicas=2, rank=1, shuffle=True,
                                  seed=sampler.seed)
    expected.set_epoch(2)
    assert list(sampler) == list(expected)


def test_persistent_workers_flag(tmp_path: Path) -> None:
    dm = _per_split_module(tmp_path, num_workers=1)
    assert dm.train_dataloader().persistent_workers  # not iterated: no worker is started
    assert _per_split_module(tmp_path, num_workers=0).val_dataloader().persistent_workers is False


def test_single_coco_file_gets_deterministic_splits(tmp_path: Path) -> None:
    names = {f"img{i}.png": [f"caption number {i}"] for i in range(10)}
    file, image_dir = _coco_split(tmp_path, "all", names)
    dm = CaptionDataModule("coco", file, image_dir, val_fraction=0.2, test_fraction=0.2, min_freq=1)
    sizes = [len(dm.records(s)) for s in ("train", "val", "test")]
    assert sizes == [6, 2, 2]
    again = CaptionDataModule("coco", file, image_dir, val_fraction=0.2, test_fraction=0.2)
    assert [r.path for r in again.records("val")] == [r.path for r in dm.records("val")]
    limited = CaptionDataModule("coco", file, image_dir, val_fraction=0.2, test_fraction=0.2, max_images=1)
    assert [len(limited.records(s)) for s in ("train", "val", "test")] == [1, 1, 1]


def test_state_dict_restores_vocab(tmp_path: Path) -> None:
    dm = _per_split_module(tmp_path)
    state = json.loads(json.dumps(dm.state_dict()))  # JSON-able
    other = _per_split_module(tmp_path, min_freq=3)
    assert other.vocab != dm.vocab
    other.load_state_dict(state)
    assert other.vocab == dm.vocab
    imposed = Vocabulary.build([["dog"]])
    other.set_vocab(imposed)
    assert other.vocab_size == 5
    assert other.train_dataloader().dataset.vocab is imposed  # type: ignore[attr-defined]


def test_vocab_file(tmp_path: Path) -> None:
    vocab = Vocabulary.build([["zebra", "yak", "dog", "red"]])  # 6 of the 10 tokens known
    vocab.save(tmp_path / "vocab.json")
    dm = _per_split_module(tmp_path, vocab_file=str(tmp_path / "vocab.json"))
    assert dm.vocab == vocab


def test_karpathy_and_flickr_csv(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        _image(tmp_path / "imgs" / name)
    karpathy = tmp_path / "dataset_flickr8k.json"
    karpathy.write_text(json.dumps({"images": [
        {"filename": "a.png", "split": "train", "sentences": [{"raw": "A dog."}]},
        {"filename": "b.png", "split": "restval", "sentences": [{"raw": "A cat."}]},
        {"filename": "c.png", "split": "test", "sentences": [{"raw": "A cow."}]},
    ]}))
    dm = CaptionDataModule("karpathy", str(karpathy), str(tmp_path / "imgs"), min_freq=1)
    assert [len(dm.records(s)) for s in ("train", "val", "test")] == [2, 0, 1]
    assert dm.vocab.itos[4:] == ["a", "cat", "dog"]

    csv_file = tmp_path / "captions.txt"
    csv_file.write_text('image,caption\na.png,"A dog , running ."\nb.png,A cat\nc.png,A cow\n')
    dm = CaptionDataModule("flickr8k_csv", str(csv_file), str(tmp_path / "imgs"), min_freq=1,
                           val_fraction=0.3, test_fraction=0.3)
    assert sorted(len(dm.records(s)) for s in ("train", "val", "test")) == [1, 1, 1]
    assert dm.references("train")[0][0][-1] in {"running", "cat", "cow"}


def test_constructor_rejects_inconsistent_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        CaptionDataModule("karpathy", {"train": "x.json"}, "imgs")
    with pytest.raises(ValueError):
        CaptionDataModule("coco", {"dev": "x.json"}, {"dev": "imgs"})
    with pytest.raises(ValueError):
        CaptionDataModule("flickr8k_csv", "c.txt", "imgs", instances="i.json")
    # 2 cut every training caption to <start> <end>: the model learnt to write nothing
    with pytest.raises(ConfigError, match=re.escape(
            "max_caption_length must be >= 3 (<start>, a word, <end>), got 2")):
        CaptionDataModule("flickr8k_csv", "c.txt", "imgs", max_caption_length=2)
    assert CaptionDataModule("flickr8k_csv", "c.txt", "imgs",
                             max_caption_length=3).max_caption_length == 3


def test_signature_is_readable_by_jsonargparse() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(CaptionDataModule, "data")
    cfg = parser.parse_args(
        ["--data.format=coco", '--data.annotations={"train": "t.json", "val": "v.json"}',
         "--data.image_root=images", "--data.batch_size=5"]
    )
    assert cfg.data.annotations == {"train": "t.json", "val": "v.json"}
    assert cfg.data.batch_size == 5


def test_shapes_datamodule(tmp_path: Path) -> None:
    dm = ShapesDataModule(str(tmp_path / "shapes"), num_train=5, num_val=3, num_test=1, image_size=32,
                          batch_size=3)
    assert dm.vocab_size > 4  # generates the set lazily
    assert (tmp_path / "shapes" / "manifest.json").is_file()
    assert [len(dm.records(s)) for s in ("train", "val", "test")] == [5, 3, 1]
    assert all(r.boxes for r in dm.records("train"))
    assert "root" in dm.hparams and "format" not in dm.hparams
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (3, 3, 32, 32)
    dm.prepare_data()  # idempotent


def test_skip_bad_decodes_only_the_images_it_keeps(tmp_path: Path, monkeypatch) -> None:
    """With ``max_images`` only the images kept are decoded (a corrupt one beyond them costs
    nothing); the cached-feature modules, which never read images, decode none."""
    import captioner.data.formats as formats
    from captioner.data.cached import CachedFeaturesDataModule

    images = tmp_path / "imgs"
    for i in range(6):
        _image(images / f"{i}.png")
    (images / "5.png").write_bytes(b"")  # corrupt, the last train image
    (images / "1.png").write_bytes(b"")  # corrupt, within the first 3
    csv_file = tmp_path / "captions.txt"
    csv_file.write_text("image,caption\n" + "".join(f"{i}.png,a dog {i}\n" for i in range(6)))
    decoded: list[str] = []
    real = formats.image_load_error
    monkeypatch.setattr(formats, "image_load_error", lambda p: decoded.append(p.name) or real(p))
    options = dict(format="flickr8k_csv", annotations=str(csv_file), image_root=str(images),
                   min_freq=1, val_fraction=0.0, test_fraction=0.0, skip_bad=True, num_workers=0)
    with pytest.warns(UserWarning, match="1 x unreadable image"):
        kept = CaptionDataModule(**options, max_images=3).records("train")
    assert sorted(decoded) == ["0.png", "1.png", "2.png"]
    assert [r.path.name for r in kept] == ["0.png", "2.png"]
    decoded.clear()
    with pytest.warns(UserWarning, match="2 x unreadable image"):
        assert len(CaptionDataModule(**options).records("train")) == 4
    assert len(decoded) == 6
    decoded.clear()
    cached = CachedFeaturesDataModule(features_dir=str(tmp_path / "cache"), **options)
    assert len(cached.records("train")) == 6 and decoded == []  # grids only: nothing decoded


class JsonLinesData(CaptionDataModule):
    """A new annotation format in one method: one JSON object per line, ``{"image", "caption"}``."""

    def parse_records(self):
        from captioner.data.formats import ImageRecord

        by_image: dict[str, list[str]] = {}
        for line in Path(self.annotations).read_text().splitlines():
            entry = json.loads(line)
            by_image.setdefault(entry["image"], []).append(entry["caption"])
        return [ImageRecord(i, Path(self.image_root) / name, captions)
                for i, (name, captions) in enumerate(by_image.items())]


def test_a_new_format_is_one_overridden_method(tmp_path: Path) -> None:
    """``format: custom`` with ``parse_records`` overridden: the base class splits, builds the
    vocabulary and loads; ``skip_bad`` drops the unreadable images for it. ``custom`` without
    the override is refused."""
    images = tmp_path / "imgs"
    for i in range(7):
        _image(images / f"{i}.png", (30 * i, 10, 10))
    (images / "6.png").write_bytes(b"not an image")
    lines = [json.dumps({"image": f"{i}.png", "caption": f"a red dog number {i}"})
             for i in range(7) for _ in range(2)]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines))
    options = dict(format="custom", annotations=str(tmp_path / "captions.jsonl"),
                   image_root=str(images), min_freq=1, val_fraction=0.0, test_fraction=2 / 6,
                   batch_size=3, num_workers=0, skip_bad=True)
    dm = JsonLinesData(**options)
    with pytest.warns(UserWarning, match="1 x unreadable image"):
        sizes = [len(dm.records(s)) for s in ("train", "val", "test")]
    assert sizes == [4, 0, 2]
    assert "number" in dm.vocab.stoi
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape[0] == 3 and batch["captions"][0, 0] == dm.vocab.start_id
    with pytest.raises(ValueError, match="overrides parse_records"):
        CaptionDataModule(**{**options, "format": "custom"})


def test_hash_splits_stay_put_when_images_are_added_or_removed(tmp_path: Path) -> None:
    """``split_method: hash`` decides each image's split from its own hash: adding or removing
    images never moves another (with the default ``rank``, whose counts are exact, a few do),
    and the shares follow the fractions."""
    from captioner.data.formats import ImageRecord, assign_splits

    def records(names):
        return [ImageRecord(i, tmp_path / name, ["a cap"]) for i, name in enumerate(names)]

    def splits(names, method):
        return {r.path.name: r.split for r in assign_splits(records(names), 0.1, 0.2, 3, method)}

    names = [f"im{i}.jpg" for i in range(400)]
    moved = {"rank": 0, "hash": 0}
    for method in moved:
        before = splits(names, method)
        for extra in range(10):
            after = splits([*names, f"new{extra}.jpg"], method)
            moved[method] += sum(after[n] != before[n] for n in names)
        fewer = splits(names[1:], method)
        moved[method] += sum(fewer[n] != before[n] for n in names[1:])
    assert moved["hash"] == 0 and moved["rank"] > 0, moved
    shares = Counter(splits([f"x{i}.png" for i in range(4000)], "hash").values())
    assert abs(shares["test"] / 4000 - 0.2) < 0.03 and abs(shares["val"] / 4000 - 0.1) < 0.03
    with pytest.raises(ValueError, match="split method must be 'rank' or 'hash'"):
        assign_splits(records(names), 0.1, 0.1, 0, "random")
    # through the data module (and its checkpointed settings)
    images = tmp_path / "images"
    images.mkdir()
    for name in names[:30]:
        Image.new("RGB", (4, 4)).save(images / name)
    (tmp_path / "captions.txt").write_text(
        "image,caption\n" + "".join(f"{n},a red square\n" for n in names[:30]))
    dm = CaptionDataModule(format="flickr8k_csv", annotations=str(tmp_path / "captions.txt"),
                           image_root=str(images), split_method="hash", split_seed=3,
                           val_fraction=0.1, test_fraction=0.2, num_workers=0, min_freq=1)
    by_split = {s: {r.path.name for r in rs} for s, rs in dm.split_records().items()}
    expected = splits(names[:30], "hash")
    assert all(expected[n] == s for s, ns in by_split.items() for n in ns)
    assert dm.hparams["split_method"] == "hash"
    with pytest.raises(ConfigError, match="split_method must be 'rank' or 'hash'"):
        CaptionDataModule(format="flickr8k_csv", annotations="a", image_root="b",
                          split_method="random")


def test_a_file_listed_twice_within_a_split_is_warned_of(tmp_path: Path) -> None:
    """Two spellings of one file name (``im0.jpg``, ``./im0.jpg``) or two COCO ids for one file
    make two records that the split key puts in the same split, where the cross-split warning
    never saw them: each copy then trains or scores on part of the captions."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        Image.new("RGB", (4, 4)).save(images / f"im{i}.jpg")
    rows = [f"im{i}.jpg,a square {i}" for i in range(6)] + ["./im0.jpg,a red square"]
    (tmp_path / "captions.txt").write_text("image,caption\n" + "\n".join(rows) + "\n")
    dm = CaptionDataModule(format="flickr8k_csv", annotations=str(tmp_path / "captions.txt"),
                           image_root=str(images), num_workers=0, min_freq=1)
    with pytest.warns(UserWarning, match=r"1 image files are listed more than once within a "
                                         r"split \(first: .*im0\.jpg, in "):
        dm.split_records(warn=True)


@pytest.mark.parametrize("option, value, rule", [
    ("batch_size", 0, ">= 1"), ("batch_size", -3, ">= 1"), ("eval_batch_size", 0, ">= 1"),
    ("image_size", 0, ">= 1"), ("num_workers", -1, ">= 0"), ("min_freq", 0, ">= 1"),
    ("max_vocab_size", 4, "> 4 (the specials and at least one word)"),
    ("max_captions_per_image", 0, ">= 1")])
def test_out_of_range_options_are_refused_when_the_module_is_built(option, value, rule):
    """``batch_size: 0`` failed in torch's DataLoader with a traceback, ``image_size: 0`` only at
    the sanity check, after the model was built: now one error naming the option."""
    with pytest.raises(ConfigError, match=re.escape(
            f"CaptionDataModule: {option} must be {rule}, got {value} (data.init_args.{option})")):
        CaptionDataModule(format="flickr8k_csv", annotations="a", image_root="b",
                          **{option: value})


def _numbered_squares(tmp_path: Path, caption: str) -> dict[str, Any]:
    """Ten 4 x 4 images ``0.png``... in the Kaggle layout, image ``i`` captioned
    ``caption.format(i=i)``; returns the data module's options (6 train, 2 val, 2 test)."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(10):
        Image.new("RGB", (4, 4)).save(images / f"{i}.png")
    (tmp_path / "captions.txt").write_text("image,caption\n" + "".join(
        f"{i}.png,{caption.format(i=i)}\n" for i in range(10)))
    return dict(format="flickr8k_csv", annotations=str(tmp_path / "captions.txt"),
                image_root=str(images), num_workers=0, val_fraction=0.2, test_fraction=0.2)


def test_a_vocabulary_that_keeps_no_word_is_refused(tmp_path, caplog):
    """``min_freq`` above every word's count left only the specials: the model learnt to write
    ``<unk>`` and nothing else, without a word said. Now refused, naming the most frequent word
    and its count; a vocabulary reading most tokens as ``<unk>`` is warned of."""
    import logging

    from captioner.data.vocabulary import VocabularyError

    options = _numbered_squares(tmp_path, "a red square number {i}")
    with pytest.raises(VocabularyError, match=r"keeps no word: the most frequent of their 10 "
                                              r"distinct words \('square'\) is seen 6 time"):
        CaptionDataModule(**options, min_freq=7).vocab
    with caplog.at_level(logging.WARNING, logger="captioner.data.vocabulary"):
        vocab = CaptionDataModule(**options, min_freq=6).vocab  # a, red, square, number
    assert vocab.itos[4:] == ["a", "number", "red", "square"]
    assert "reads 20% of their 30 tokens as <unk>" not in caplog.text  # 6 of 30: no warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="captioner.data.vocabulary"):
        CaptionDataModule(**options, min_freq=6, max_vocab_size=5).vocab  # "a" alone
    assert "(1 words) reads 80% of their 30 tokens as <unk>" in caplog.text


def test_a_vocab_file_that_holds_no_word_of_the_captions_is_refused(tmp_path, caplog):
    """A ``vocab_file`` whose words the tokenizer never writes (upper case, punctuation, another
    corpus) trained on ``<unk>`` alone, without a word said; it gets the built vocabulary's
    coverage check now: refused when it holds no word of the training captions, warned of when
    it reads most of their tokens as ``<unk>``; without a training split it is not checked."""
    import logging

    from captioner.data.vocabulary import SPECIALS, Vocabulary, VocabularyError

    options = _numbered_squares(tmp_path, "A red square number {i}.")
    upper = tmp_path / "upper.json"
    Vocabulary([*SPECIALS, "A", "Red", "square."]).save(upper)
    with pytest.raises(VocabularyError, match=(
            rf"the vocabulary of vocab_file {upper} \(3 words\) holds no word of the training "
            r"captions: all 30 tokens would be <unk>, the most frequent 'square' among them")):
        CaptionDataModule(**options, vocab_file=str(upper)).vocab
    one = tmp_path / "one.json"
    Vocabulary([*SPECIALS, "red", "blue"]).save(one)
    with caplog.at_level(logging.WARNING, logger="captioner.data.vocabulary"):
        assert CaptionDataModule(**options, vocab_file=str(one)).vocab.itos[4:] == ["red", "blue"]
    assert (f"the vocabulary of vocab_file {one} (2 words) reads 80% of the 30 tokens of the "
            "training captions as <unk>") in caplog.text
    # no training split (a data config to evaluate on): nothing to check, the file is used
    val_json, val_dir = _coco_split(tmp_path, "val", VAL)
    val_only = CaptionDataModule(format="coco", annotations={"val": val_json},
                                 image_root={"val": val_dir}, vocab_file=str(upper))
    assert val_only.vocab.itos[4:] == ["A", "Red", "square."]


def test_an_empty_val_or_test_split_is_refused_or_warned_of_while_fitting(tmp_path):
    """Annotations that put every image in ``train``: ``captioner test`` ran no loop and exited
    0 without scores, and a fit ran without validation, Lightning saying only that a loader
    has no length. ``test`` / ``validate`` are now refused naming the file; a fit warns."""
    import lightning as L
    from lightning.pytorch.trainer.states import TrainerFn

    from captioner.data.formats import AnnotationWarning

    for name in ("a.png", "b.png", "c.png"):
        _image(tmp_path / "imgs" / name)
    karpathy = tmp_path / "dataset_flickr8k.json"
    karpathy.write_text(json.dumps({"images": [
        {"filename": name, "split": "train", "sentences": [{"raw": f"a dog {name}"}]}
        for name in ("a.png", "b.png", "c.png")]}))
    dm = CaptionDataModule("karpathy", str(karpathy), str(tmp_path / "imgs"), min_freq=1,
                           num_workers=0)
    for loader, split in [(dm.test_dataloader, "test"), (dm.val_dataloader, "val"),
                          (dm.predict_dataloader, "test")]:
        with pytest.raises(AnnotationError, match=re.escape(
                f"{karpathy}: the {split} split has no images (check the annotations' splits")):
            loader()
    dm.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                           enable_checkpointing=False, default_root_dir=tmp_path)
    dm.trainer.state.fn = TrainerFn.FITTING
    with pytest.warns(AnnotationWarning, match="the val split has no images .*: the fit runs "
                                               "without validation"):
        assert len(dm.val_dataloader()) == 0
    dm.trainer.state.fn = TrainerFn.VALIDATING
    with pytest.raises(AnnotationError, match="the val split has no images"):
        dm.val_dataloader()
    assert len(dm.train_dataloader()) == 1
