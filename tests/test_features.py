"""Feature cache: extraction, resumption after a kill, memory-mapped reading, cached training."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from captioner.config import ConfigError
from captioner.data.cached import CachedFeaturesDataModule
from captioner.data.datamodule import CaptionDataModule
from captioner.data.datasets import CaptionTrainDataset, ImageEvalDataset, collate_captions
from captioner.data.shapes import make_shapes_dataset
from captioner.encoders.encoder import ImageEncoder
from captioner.features import (INDEX_FILE, FeatureCache, FeatureCacheError, extract_features,
                                image_key)
from tests.conftest import SHAPES_SIZES

GRID = (3, 5)  # (H, W): L = 15, not square


def frozen_encoder(seed: int = 0) -> ImageEncoder:
    torch.manual_seed(seed)
    return ImageEncoder("shapes_cnn", weights=None, grid_size=GRID, freeze=True)


def data_kwargs(shapes_root: Path, batch_size: int = 5) -> dict:
    paths = make_shapes_dataset(shapes_root, seed=0, **SHAPES_SIZES)  # reuses the fixture's set
    return {"format": "coco", "annotations": {s: str(p[0]) for s, p in paths.items()},
            "image_root": {s: str(p[2]) for s, p in paths.items()}, "image_size": 32,
            "batch_size": batch_size, "num_workers": 0, "min_freq": 1}


@pytest.fixture(scope="module")
def records(shapes_root):
    dm = CaptionDataModule(**data_kwargs(shapes_root))
    return {split: dm.records(split) for split in ("train", "val", "test")}


def test_extracted_grids_are_the_encoder_output_in_float16(records, tmp_path):
    encoder = frozen_encoder()
    paths = [r.path for r in records["train"][:7]] + [records["train"][0].path]  # a duplicate
    cache = extract_features(encoder, paths, tmp_path, image_size=32, batch_size=2, shard_size=4)

    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["complete"] and index["grid"] == list(GRID) and index["dim"] == 128
    assert index["shards"] == ["shard_00000.npy", "shard_00001.npy"]  # 7 images: 4 + 3
    assert len(cache) == 7
    assert [index["items"][image_key(p)] for p in paths[:7]] == [
        [0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [1, 1], [1, 2]]
    shard = np.load(tmp_path / "shard_00001.npy")
    assert shard.shape == (3, 15, 128) and shard.dtype == np.float16

    images = torch.stack([ImageEvalDataset(records["train"][:7], 32)[i]["image"]
                          for i in range(7)])
    with torch.no_grad():
        expected = encoder.eval()(images)  # (7, L, D)
    got = torch.stack([cache.tensor(p) for p in paths[:7]])
    assert got.dtype == torch.float16 and got.shape == (7, 15, 128)
    torch.testing.assert_close(got.float(), expected, rtol=1e-3, atol=1e-4)  # float16 rounding
    assert isinstance(cache._shard(0), np.memmap)  # read through the page cache, not loaded


def test_cache_refuses_other_encoder_unfinished_and_bad_shards(records, tmp_path):
    paths = [r.path for r in records["val"]]
    extract_features(frozen_encoder(0), paths[:2], tmp_path, image_size=32, batch_size=2,
                     shard_size=2)
    with pytest.raises(FeatureCacheError, match="fingerprint .* unless the config sets "
                                                "seed_everything"):
        extract_features(frozen_encoder(1), paths, tmp_path, image_size=32, batch_size=2,
                         shard_size=2)
    with pytest.raises(FeatureCacheError, match="image_size"):
        extract_features(frozen_encoder(0), paths, tmp_path, image_size=40, batch_size=2,
                         shard_size=2)
    with pytest.raises(ValueError, match="multiple of batch_size"):
        extract_features(frozen_encoder(0), paths, tmp_path / "x", image_size=32, batch_size=3,
                         shard_size=4)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    (tmp_path / INDEX_FILE).write_text(json.dumps({**index, "complete": False}))
    with pytest.raises(FeatureCacheError, match="did not finish"):
        FeatureCache(tmp_path)
    with pytest.raises(FeatureCacheError, match="no feature cache"):
        FeatureCache(tmp_path / "nothing")
    with pytest.raises(KeyError, match="not in the feature cache"):
        FeatureCache(tmp_path, require_complete=False).array(paths[3])


def test_killed_extraction_resumes_to_the_same_cache(tiny_checkpoint, shapes_root, tmp_path,
                                                     capsys):
    """SIGKILL a `captioner extract-features` process after its first shard, run the command
    again: the cache equals that of an uninterrupted extraction, shard for shard."""
    from captioner.cli import main
    from captioner.inference import Captioner

    out = tmp_path / "killed"
    argv = ["extract-features", "--ckpt", str(tiny_checkpoint), "--out", str(out),
            "--split", "train,val", "--batch-size", "2", "--shard-size", "4", "--allow-trainable"]
    # a separate process (a fork after torch's OpenMP threads ran can hang in the child)
    child = subprocess.Popen([sys.executable, "-m", "captioner", *argv, "--shard-delay", "60"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env={**os.environ, "OMP_NUM_THREADS": "1",
                                  "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    index_file = out / INDEX_FILE
    deadline = time.monotonic() + 120
    while not index_file.is_file() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    child.kill()  # SIGKILL, asleep after its first shard
    _, err = child.communicate()
    assert child.returncode == -signal.SIGKILL, err.decode()[-2000:]
    partial = json.loads(index_file.read_text())
    assert not partial["complete"] and partial["shards"] == ["shard_00000.npy"]
    assert len(partial["items"]) == 4
    with pytest.raises(FeatureCacheError, match="did not finish"):
        FeatureCache(out)

    assert main(argv) == 0  # resumes
    assert "30 images cached" in capsys.readouterr().out  # 24 train + 6 val
    dm = CaptionDataModule(**data_kwargs(shapes_root))  # the checkpoint's data
    paths = [r.path for split in ("train", "val") for r in dm.records(split)]
    ref = extract_features(Captioner.from_checkpoint(tiny_checkpoint).encoder, paths,
                           tmp_path / "ref", image_size=32, batch_size=2, shard_size=4)
    resumed = FeatureCache(out)
    assert resumed.items == ref.items  # same shard and row for every image
    assert resumed.index["shards"] == ref.index["shards"]
    for path in paths:
        np.testing.assert_array_equal(resumed.array(path), ref.array(path))


def test_a_second_extraction_into_the_same_folder_is_refused(records, tmp_path):
    """Two extractions writing one folder would overwrite each other's shards and index; the
    folder's lock refuses the second (here: the lock held as a running extraction holds it)."""
    import fcntl

    paths = [r.path for r in records["train"][:4]]
    with open(tmp_path / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FeatureCacheError, match="another extraction is writing this cache"):
            extract_features(frozen_encoder(), paths, tmp_path, image_size=32, batch_size=2,
                             shard_size=2)
        assert not (tmp_path / INDEX_FILE).exists()
    cache = extract_features(frozen_encoder(), paths, tmp_path, image_size=32, batch_size=2,
                             shard_size=2)  # released: it runs
    assert len(cache) == 4


def test_a_reader_keeps_a_bounded_number_of_shards_open(records, tmp_path):
    """One map (and file descriptor) per shard would exhaust the descriptors of a large cache:
    the least recently used are released."""
    paths = [r.path for r in records["train"][:10]]
    extract_features(frozen_encoder(), paths, tmp_path, image_size=32, batch_size=2,
                     shard_size=2)  # 5 shards
    every = FeatureCache(tmp_path)
    bounded = FeatureCache(tmp_path, max_open_shards=2)
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(2):
        for path in paths:
            assert torch.equal(bounded.tensor(path), every.tensor(path))
            assert len(bounded._shards) <= 2
    assert len(every._shards) == 5
    assert len(os.listdir("/proc/self/fd")) - fds <= 5 + 2  # every's five, bounded's two


def test_extraction_uses_one_loader_and_writes_the_index_sparingly(records, tmp_path,
                                                                    monkeypatch):
    """COCO has ~480 shards: one DataLoader feeds them all (workers started once, not per
    shard), and index.json is written after the first shard, then at most every
    INDEX_WRITE_INTERVAL seconds, and at the end (after every shard it was quadratic); the
    shards and the final index are those of writing it every time."""
    import torch.utils.data

    import captioner.features as features

    loaders, writes = [], []
    real_loader, real_write = torch.utils.data.DataLoader, features._write_json

    class CountingLoader(real_loader):
        def __init__(self, *args, **kwargs):
            loaders.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", CountingLoader)
    monkeypatch.setattr(features, "_write_json",
                        lambda path, obj: writes.append(path.name) or real_write(path, obj))
    paths = [r.path for r in records["train"][:9]]  # 5 shards of 2: 2 + 2 + 2 + 2 + 1
    runs = {}
    for interval in (1e9, 0.0):
        monkeypatch.setattr(features, "INDEX_WRITE_INTERVAL", interval)
        loaders.clear(), writes.clear()
        out = tmp_path / str(interval)
        extract_features(frozen_encoder(), paths, out, image_size=32, batch_size=2, shard_size=2)
        runs[interval] = (len(loaders), writes.count(INDEX_FILE))
        assert FeatureCache(out).items == FeatureCache(tmp_path / "1000000000.0").items
        for name in FeatureCache(out).index["shards"]:
            assert np.array_equal(np.load(out / name), np.load(tmp_path / "1000000000.0" / name))
    assert runs == {1e9: (1, 2), 0.0: (1, 5)}  # first + last shard; every shard


def test_an_interrupted_extraction_records_the_shards_it_finished(records, tmp_path):
    """Ctrl-C between index writes: the shards finished since the last write are recorded on
    the way out (they were encoded again by the next run), and the next run goes on after them
    to the cache of an uninterrupted run."""
    paths = [r.path for r in records["train"][:9]]  # 5 shards of 2
    out, kw = tmp_path / "cache", dict(image_size=32, batch_size=2, shard_size=2)

    def stop_after_third_shard(line: str) -> None:
        if line.startswith("shard_00002.npy"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_features(frozen_encoder(), paths, out, progress=stop_after_third_shard, **kw)
    index = json.loads((out / INDEX_FILE).read_text())
    assert len(index["shards"]) == len(set(s for s, _ in index["items"].values())) == 3
    assert not index["complete"]
    said = []
    extract_features(frozen_encoder(), paths, out, progress=said.append, **kw)
    assert [line.split(":")[0] for line in said] == ["shard_00003.npy", "shard_00004.npy"]
    whole = extract_features(frozen_encoder(), paths, tmp_path / "whole", **kw)
    assert FeatureCache(out).items == whole.items


def test_datasets_resolve_paths_once_and_readers_keep_every_shard_open(records, tmp_path,
                                                                      monkeypatch):
    """A shuffled epoch read ~85 % of its items through a re-opened shard with the old 64-map
    LRU on COCO's 482 shards, and resolved each path on disk per item: the datasets now look up
    (shard, row) once and a reader keeps every shard open by default."""
    import captioner.features as features
    from captioner.data.cached_datasets import CachedImageDataset

    paths = [r.path for r in records["train"][:6]]
    extract_features(frozen_encoder(), paths, tmp_path, image_size=32, batch_size=2,
                     shard_size=2)  # 3 shards
    cache = FeatureCache(tmp_path)
    assert cache.max_open_shards == 3 == features.default_open_shards(3)
    assert features.default_open_shards(10**9) >= 64
    dataset = CachedImageDataset(records["train"][:6], cache)
    expected = [cache.tensor(p) for p in paths]
    with pytest.raises(features.NotInCache, match="nor 1 more") as missing:  # all listed
        cache.locate([paths[0], tmp_path / "a.png", tmp_path / "b.png"])
    assert missing.value.missing == [image_key(tmp_path / "a.png"), image_key(tmp_path / "b.png")]
    monkeypatch.setattr(features, "image_key", lambda path: pytest.fail("resolved per item"))
    for i in (4, 0, 5, 2):
        assert torch.equal(dataset[i]["features"], expected[i])


def test_extract_features_refuses_a_trainable_encoder(tiny_checkpoint, tmp_path, capsys):
    from captioner.cli import main

    status = main(["extract-features", "--ckpt", str(tiny_checkpoint), "--out", str(tmp_path)])
    assert status == 2
    assert "trainable parameter" in capsys.readouterr().err
    assert not (tmp_path / INDEX_FILE).exists()


@pytest.fixture(scope="module")
def cached_setup(shapes_root, tmp_path_factory):
    """A frozen-encoder captioning module and a cache of all splits made with its encoder."""
    from captioner.lit.captioning import CaptioningModule
    from tests.conftest import TINY_MODEL_CONFIG

    raw = CaptionDataModule(**data_kwargs(shapes_root))
    torch.manual_seed(0)
    config = {**TINY_MODEL_CONFIG, "vocab_size": raw.vocab_size,
              "encoder": {"class_path": "captioner.encoders.ImageEncoder",
                          "init_args": {"backbone": "shapes_cnn", "weights": None,
                                        "grid_size": list(GRID), "freeze": True}}}
    module = CaptioningModule.from_config(config)
    module.vocab = raw.vocab
    out = tmp_path_factory.mktemp("cache")
    paths = [r.path for s in ("train", "val", "test") for r in raw.records(s)]
    extract_features(module.encoder, paths, out, image_size=32, batch_size=4, shard_size=8)
    return module, raw, out


def test_cached_batches_carry_features_instead_of_images(cached_setup, shapes_root):
    module, raw, out = cached_setup
    dm = CachedFeaturesDataModule(features_dir=str(out), **data_kwargs(shapes_root, 5))
    assert dm.vocab == raw.vocab
    dm.setup("fit")
    train = next(iter(dm.train_dataloader()))
    assert "images" not in train and train["features"].shape == (5, 15, 128)
    assert train["features"].dtype == torch.float16
    assert train["captions"].shape[0] == 5 and train["lengths"].shape == (5,)
    val = next(iter(dm.val_dataloader()))
    assert val["features"].shape == (5, 15, 128) and val["index"].tolist() == [0, 1, 2, 3, 4]
    assert dm.hparams["features_dir"] == str(out) and dm.hparams["format"] == "coco"


def test_cached_loss_equals_raw_image_loss(cached_setup, shapes_root):
    """Same pairs, frozen encoder: the loss from the cache matches the raw-image loss."""
    module, raw, out = cached_setup
    dm = CachedFeaturesDataModule(features_dir=str(out), **data_kwargs(shapes_root))
    dm.setup("fit")
    cached_ds, raw_ds = dm._dataset("train"), raw._dataset("train")
    n = len(raw_ds)
    assert isinstance(raw_ds, CaptionTrainDataset) and len(cached_ds) == n > 24
    pick = [0, 7, n // 3, n // 2, n - 1]
    raw_batch = collate_captions([raw_ds[i] for i in pick])
    cached_batch = dm.train_dataloader().collate_fn([cached_ds[i] for i in pick])
    assert torch.equal(raw_batch["captions"], cached_batch["captions"])
    module.eval()  # no dropout: both paths see the same network
    with torch.no_grad():
        # each caption gets its own image's grid (an untrained decoder's loss hardly depends
        # on the image, so the loss alone would not notice a neighbour's features)
        encoded = module.encoder(raw_batch["images"])  # (5, L, D)
        torch.testing.assert_close(cached_batch["features"].float(), encoded,
                                   rtol=1e-2, atol=1e-3)  # float16 storage
        assert (cached_batch["features"].float() - encoded.roll(1, 0)).abs().max() > 0.05
        raw_loss = module.loss(raw_batch)["loss"]
        cached_loss = module.loss(cached_batch)["loss"]
    assert torch.isfinite(raw_loss) and raw_loss > 1.0
    torch.testing.assert_close(cached_loss, raw_loss, rtol=1e-4, atol=0)


def test_missing_images_are_reported_with_the_split(records, shapes_root, tmp_path):
    extract_features(frozen_encoder(), [r.path for r in records["val"]], tmp_path,
                     image_size=32, batch_size=2, shard_size=2)
    dm = CachedFeaturesDataModule(features_dir=str(tmp_path), **data_kwargs(shapes_root))
    dm.setup("validate")  # val is cached
    with pytest.raises(FeatureCacheError, match=r"24 of the 24 train images .*--split train"):
        dm.setup("fit")


def test_cache_of_another_image_size_is_refused(records, shapes_root, tmp_path):
    extract_features(frozen_encoder(), [r.path for r in records["val"]], tmp_path,
                     image_size=16, batch_size=2, shard_size=2)  # the data config says 32
    dm = CachedFeaturesDataModule(features_dir=str(tmp_path), **data_kwargs(shapes_root))
    with pytest.raises(FeatureCacheError, match=r"extracted at image_size \[16, 16\], but the "
                                                r"data config says \[32, 32\]"):
        dm.setup("validate")


def test_captioner_fit_trains_from_the_cache_without_running_the_encoder(
        tiny_checkpoint, shapes_root, tmp_path):
    """`captioner fit` with `data: CachedShapesDataModule`: batches carry features, the CNN
    never runs, training and validation go through; a cache made by another encoder, or a
    trainable encoder, is refused."""
    import yaml

    from captioner.cli import lightning_main
    from captioner.inference import Captioner
    from tests.conftest import TINY_MODEL_CONFIG

    raw = CaptionDataModule(**data_kwargs(shapes_root))
    paths = [r.path for s in ("train", "val", "test") for r in raw.records(s)]
    encoder = TINY_MODEL_CONFIG["encoder"]
    frozen = {**TINY_MODEL_CONFIG,
              "encoder": {**encoder, "init_args": {**encoder["init_args"], "freeze": True}}}

    def fit_config(features_dir: Path, model: dict) -> str:
        config = {
            "seed_everything": 0,
            "model": {"class_path": "captioner.lit.captioning.CaptioningModule",
                      "init_args": model},
            "data": {"class_path": "captioner.data.cached.CachedShapesDataModule",
                     "init_args": {"features_dir": str(features_dir), "root": str(shapes_root),
                                   **SHAPES_SIZES, "seed": 0, "batch_size": 8}},
            "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1,
                        "limit_train_batches": 2, "limit_val_batches": 1,
                        "num_sanity_val_steps": 0, "logger": False,
                        "enable_checkpointing": False, "enable_progress_bar": False,
                        "enable_model_summary": False, "default_root_dir": str(tmp_path)},
        }
        path = tmp_path / f"{features_dir.name}_{model['encoder']['init_args']['freeze']}.yaml"
        path.write_text(yaml.safe_dump(config))
        return str(path)

    cli = lightning_main(["--config", fit_config(tmp_path / "c", frozen)], run=False)
    extract_features(cli.model.encoder, paths, tmp_path / "c", image_size=32, batch_size=4,
                     shard_size=8)  # this model's own (frozen, seeded) encoder
    calls: list[int] = []
    cli.model.encoder.register_forward_hook(lambda *args: calls.append(1))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert calls == [] and cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert "val/bleu4" in cli.trainer.callback_metrics
    assert cli.model.data_config["datamodule"]["init_args"]["features_dir"] == str(tmp_path / "c")
    cli.trainer.validate(cli.model, datamodule=cli.datamodule)  # its own cache: checked, accepted

    # a cache extracted by another encoder (the tiny checkpoint's): refused, with both hashes
    extract_features(Captioner.from_checkpoint(tiny_checkpoint).encoder, paths, tmp_path / "o",
                     image_size=32, batch_size=4, shard_size=8)
    cli = lightning_main(["--config", fit_config(tmp_path / "o", frozen)], run=False)
    with pytest.raises(ValueError, match=r"extracted with another encoder \(fingerprint "):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    for run in (cli.trainer.validate, cli.trainer.test):  # scoring it would be as wrong
        with pytest.raises(ConfigError, match=r"extracted with another encoder"):
            run(cli.model, datamodule=cli.datamodule)
    # a trainable encoder cannot learn from cached grids: a clear error, not silent no-training
    cli = lightning_main(["--config", fit_config(tmp_path / "c", TINY_MODEL_CONFIG)], run=False)
    with pytest.raises(ValueError, match=r"serves cached encoder features .* trainable parameter"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    # another grid than the cache's: the checkpoint would describe another model than trained
    other_grid = {**frozen, "encoder": {**frozen["encoder"], "init_args": {
        **frozen["encoder"]["init_args"], "grid_size": [2, 5]}}}
    cli = lightning_main(["--config", fit_config(tmp_path / "c", other_grid)], run=False)
    with pytest.raises(ConfigError, match=r"holds 3 x 4 grids, but this model's encoder pools "
                                          r"to 2 x 5"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 0


def test_skip_bad_leaves_out_the_same_images_raw_and_cached(tmp_path, capsys):
    """With ``skip_bad`` the raw-image module decodes every image and drops the unreadable ones
    before drawing the splits; the extraction records them and the cached module drops the same,
    so both train on the same images and splits (a cached run used to keep the corrupt image,
    draw other splits, then ask for an extraction that could not read it)."""
    import yaml

    from captioner.cli import main
    from tests.conftest import TINY_MODEL_CONFIG

    images = tmp_path / "images"
    _random_pngs(images, 12)
    (images / "4.png").write_bytes(b"not an image at all")
    (tmp_path / "captions.txt").write_text(
        "image,caption\n" + "".join(f"{i}.png,a red square number {i}\n" for i in range(12)))
    data = {"format": "flickr8k_csv", "annotations": str(tmp_path / "captions.txt"),
            "image_root": str(images), "image_size": 32, "min_freq": 1, "val_fraction": 0.25,
            "test_fraction": 0.25, "skip_bad": True, "num_workers": 0, "batch_size": 4}
    encoder = TINY_MODEL_CONFIG["encoder"]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"class_path": "captioner.data.datamodule.CaptionDataModule", "init_args": data},
        "model": {"class_path": "captioner.lit.captioning.CaptioningModule", "init_args": {
            **TINY_MODEL_CONFIG,
            "encoder": {**encoder, "init_args": {**encoder["init_args"], "freeze": True}}}}}))
    out = tmp_path / "cache"
    with pytest.warns(UserWarning, match="1 x unreadable image"):
        raw = {s: [r.path.name for r in CaptionDataModule(**data).records(s)]
               for s in ("train", "val", "test")}
    assert "4.png" not in sum(raw.values(), [])
    assert main(["extract-features", "--config", str(config), "--out", str(out)]) == 0
    assert "1 unreadable images left out" in capsys.readouterr().err
    cache = FeatureCache(out)
    assert list(cache.unreadable) == [image_key(images / "4.png")] and len(cache) == 11
    with pytest.warns(UserWarning, match="left out 1 images the feature extraction could not"):
        cached_dm = CachedFeaturesDataModule(features_dir=str(out), **data)
        cached = {s: [r.path.name for r in cached_dm.records(s)] for s in raw}
    assert cached == raw
    # max_images too: the splits are drawn before the unreadable image is left out, so they
    # are the same raw and cached, and a max_images above the split sizes changes nothing
    # (the raw module used to split with the unreadable image counted, the cached without)
    for max_images in (100, 2):
        with pytest.warns(UserWarning):
            raw_m = CaptionDataModule(**data, max_images=max_images)
            cached_m = CachedFeaturesDataModule(features_dir=str(out), **data,
                                                max_images=max_images)
            kept = [{s: [r.path.name for r in dm.records(s)] for s in raw}
                    for dm in (raw_m, cached_m)]
        assert kept[0] == kept[1], max_images
        if max_images == 100:
            assert kept[0] == raw
        else:  # the first 2 of each split, the unreadable one then left out
            assert all(kept[0][s] == raw[s][: len(kept[0][s])] for s in raw)
            assert sorted(len(v) for v in kept[0].values()) == [1, 2, 2]

    # the same through the API, resumed: the unreadable image is recorded once, not retried
    import captioner.data.formats as formats

    paths = [images / f"{i}.png" for i in range(12)]
    first = extract_features(frozen_encoder(), paths[:6], tmp_path / "api", image_size=32,
                             batch_size=2, shard_size=2, skip_unreadable=True)
    assert list(first.unreadable) == [image_key(images / "4.png")]
    decoded: list[str] = []
    real = formats.image_load_error
    formats.image_load_error = lambda path: decoded.append(path.name) or real(path)
    try:
        again = extract_features(frozen_encoder(), paths, tmp_path / "api", image_size=32,
                                 batch_size=2, shard_size=2, skip_unreadable=True)
    finally:
        formats.image_load_error = real
    assert "4.png" not in decoded and len(decoded) == 6  # only the images not seen before
    assert len(again) == 11 and list(again.unreadable) == [image_key(images / "4.png")]
    # repaired since: read again and cached, so raw and cached data keep the same images (it
    # stayed left out for good, the run saying "12 images already cached")
    shutil.copy(images / "5.png", images / "4.png")
    said: list[str] = []
    repaired = extract_features(frozen_encoder(), paths, tmp_path / "api", image_size=32,
                                batch_size=2, shard_size=2, skip_unreadable=True,
                                progress=said.append)
    assert len(repaired) == 12 and repaired.unreadable == {}
    torch.testing.assert_close(repaired.tensor(images / "4.png"), repaired.tensor(images / "5.png"))
    said.clear()
    (images / "4.png").write_bytes(b"broken again")  # not cached again: the file it cached
    with pytest.raises(FeatureCacheError, match="changed since they were cached"):
        extract_features(frozen_encoder(), paths, tmp_path / "api", image_size=32,
                         batch_size=2, shard_size=2, skip_unreadable=True)
    extract_features(frozen_encoder(), paths[:4], tmp_path / "api2", image_size=32,
                     batch_size=2, shard_size=2, skip_unreadable=True)
    extract_features(frozen_encoder(), paths[:6], tmp_path / "api2", image_size=32,
                     batch_size=2, shard_size=2, skip_unreadable=True)
    extract_features(frozen_encoder(), paths[:6], tmp_path / "api2", image_size=32,
                     batch_size=2, shard_size=2, skip_unreadable=True, progress=said.append)
    assert said == [f"5 images already cached in {tmp_path / 'api2'} (1 unreadable left out)"]


def test_bf16_extraction_is_recorded_and_never_mixed_with_float32(records, tmp_path):
    """``precision="bf16"`` runs the encoder under bf16 autocast: grids within bf16 rounding of
    float32's (not equal), the precision written to the index, and a resumed run of the other
    precision refused by name; an index from before the field counts as float32."""
    paths = [r.path for r in records["val"][:4]]
    fp32 = extract_features(frozen_encoder(), paths[:2], tmp_path / "a", image_size=32,
                            batch_size=2, shard_size=2)
    bf16 = extract_features(frozen_encoder(), paths[:2], tmp_path / "b", image_size=32,
                            batch_size=2, shard_size=2, precision="bf16")
    assert fp32.index["precision"] == "32" and bf16.index["precision"] == "bf16"
    a, b = (torch.stack([c.tensor(p) for p in paths[:2]]).float() for c in (fp32, bf16))
    assert not torch.equal(a, b)
    torch.testing.assert_close(b, a, rtol=5e-2, atol=5e-2 * float(a.abs().max()))
    with pytest.raises(FeatureCacheError, match=r"another precision \('bf16', now '32'\)"):
        extract_features(frozen_encoder(), paths, tmp_path / "b", image_size=32, batch_size=2,
                         shard_size=2)
    with pytest.raises(ValueError, match="precision must be one of"):
        extract_features(frozen_encoder(), paths, tmp_path / "c", image_size=32, batch_size=2,
                         shard_size=2, precision="16")
    index = json.loads((tmp_path / "a" / INDEX_FILE).read_text())
    del index["precision"]  # a cache written before the field: resumed as float32
    (tmp_path / "a" / INDEX_FILE).write_text(json.dumps(index))
    resumed = extract_features(frozen_encoder(), paths, tmp_path / "a", image_size=32,
                               batch_size=2, shard_size=2)
    assert len(resumed) == 4 and resumed.index["precision"] == "32"


def test_extract_features_command_takes_the_precision(tiny_checkpoint, tmp_path, capsys):
    from captioner.cli import main

    status = main(["extract-features", "--ckpt", str(tiny_checkpoint), "--out", str(tmp_path),
                   "--allow-trainable", "--split", "val", "--precision", "bf16"])
    assert status == 0, capsys.readouterr().err
    assert json.loads((tmp_path / INDEX_FILE).read_text())["precision"] == "bf16"
    status = main(["extract-features", "--ckpt", str(tiny_checkpoint), "--out", str(tmp_path),
                   "--allow-trainable", "--split", "val"])
    assert status == 2 and "another precision ('bf16', now '32')" in capsys.readouterr().err
    # --verify reads every shard against its checksum before going on
    status = main(["extract-features", "--ckpt", str(tiny_checkpoint), "--out", str(tmp_path),
                   "--allow-trainable", "--split", "val", "--precision", "bf16", "--verify"])
    assert status == 0 and ("verified the cache's shards against their checksums"
                            in capsys.readouterr().err)


def test_without_skip_unreadable_an_image_found_unreadable_is_read_again(tmp_path):
    """An image a ``skip_unreadable`` run recorded as unreadable is read again by a run without
    it: its error names it (the run used to report it "already cached" and exit 0), and once
    repaired it is cached. A data module that keeps it (no ``skip_bad``) names the cause."""

    from captioner.data.images import ImageLoadError

    images = tmp_path / "images"
    _random_pngs(images, 4)
    good = (images / "2.png").read_bytes()
    (images / "2.png").write_bytes(b"truncated")
    paths = [images / f"{i}.png" for i in range(4)]
    out = tmp_path / "cache"
    kw = dict(image_size=32, batch_size=2, shard_size=2)
    first = extract_features(frozen_encoder(), paths, out, skip_unreadable=True, **kw)
    assert list(first.unreadable) == [image_key(images / "2.png")] and len(first) == 3

    (tmp_path / "captions.txt").write_text(
        "image,caption\n" + "".join(f"{i}.png,a red square number {i}\n" for i in range(4)))
    data = {"format": "flickr8k_csv", "annotations": str(tmp_path / "captions.txt"),
            "image_root": str(images), "image_size": 32, "min_freq": 1, "val_fraction": 0.25,
            "test_fraction": 0.25, "num_workers": 0, "batch_size": 4}
    dm = CachedFeaturesDataModule(features_dir=str(out), **data)
    split = next(s for s in ("train", "val", "test")
                 if any(r.path.name == "2.png" for r in dm.records(s)))
    with pytest.raises(FeatureCacheError, match=r"could not be read when the feature cache .*"
                                                r"2\.png.*skip_bad: true"):
        dm.setup("fit" if split != "test" else "test")
        dm._dataset(split)

    with pytest.raises(ImageLoadError, match=r"2\.png"):
        extract_features(frozen_encoder(), paths, out, **kw)
    (images / "2.png").write_bytes(good)  # repaired
    again = extract_features(frozen_encoder(), paths, out, **kw)
    assert len(again) == 4 and again.unreadable == {}


def _random_pngs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` random 40 x 48 PNGs ``0.png``... in ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = [folder / f"{i}.png" for i in range(n)]
    for path in paths:
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")).save(path)
    return paths


def test_images_rewritten_since_extraction_are_refused(tmp_path):
    """An image file rewritten at the same path (a data set regenerated or re-downloaded in
    place) no longer matches its cached grid: reading the cache for it and resuming the
    extraction are refused, naming it; a file deleted since is not an error (the cache is then
    its only copy). Other content of the same size is caught by its modification time."""
    paths = _random_pngs(tmp_path / "images", 4)
    out = tmp_path / "cache"
    kw = dict(image_size=32, batch_size=2, shard_size=2)
    cache = extract_features(frozen_encoder(), paths, out, **kw)
    index = json.loads((out / INDEX_FILE).read_text())
    assert index["files"][image_key(paths[1])] == [paths[1].stat().st_size,
                                                   paths[1].stat().st_mtime_ns]
    assert cache.locate(paths).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]

    _random_pngs(tmp_path / "other", 2, seed=1)[1].replace(paths[1])  # new content, same name
    st = paths[1].stat()  # written later than the cache (within 2 s it would pass as the same)
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    with pytest.raises(FeatureCacheError, match=rf"1 of 4 images changed since they were cached "
                                                rf"in {out} \(first: {paths[1]}"):
        FeatureCache(out).locate(paths)
    with pytest.raises(FeatureCacheError, match=rf"first: {paths[1]}"):
        extract_features(frozen_encoder(), paths, out, **kw)  # a resume would mix the two
    with pytest.raises(FeatureCacheError, match=r"changed since"):
        FeatureCache(out).array(paths[1])
    FeatureCache(out).locate(paths[2:])  # the unchanged ones still read

    paths[1].unlink()  # deleted: the cached grid is its only copy
    assert FeatureCache(out).locate(paths).shape == (4, 2)
    st = paths[2].stat()
    os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns - st.st_mtime_ns % 10**9))
    FeatureCache(out).locate(paths)  # mtime cut to the second (tar, zip, scp -p): unchanged
    os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10 * 10**9))  # same bytes, touched
    with pytest.raises(FeatureCacheError, match=rf"first: {paths[2]}"):
        FeatureCache(out).locate(paths)


def test_a_cached_fit_needs_no_image_file_whose_grid_the_cache_holds(tmp_path, monkeypatch,
                                                                     tiny_checkpoint, capsys):
    """The cache is the only copy of a grid whose image was deleted since (the raw images
    removed to free the disk), yet the annotations' parser refused the missing file ("image
    file not found"), and with ``skip_bad`` dropped it, which can move images between splits.
    The cached module now takes an image its cache holds; one it does not is still refused."""
    from captioner.data.formats import AnnotationError

    paths = _random_pngs(tmp_path / "images", 12)
    captions = tmp_path / "captions.txt"
    captions.write_text("image,caption\n" + "".join(
        f"{p.name},a picture number {i % 3}\n" for i, p in enumerate(paths)))
    data = dict(format="flickr8k_csv", annotations=str(captions),
                image_root=str(tmp_path / "images"), image_size=32, num_workers=0, min_freq=1,
                val_fraction=0.25, test_fraction=0.25)
    out = tmp_path / "cache"
    extract_features(frozen_encoder(), paths, out, image_size=32, batch_size=4, shard_size=4)
    splits = {s: [r.path for r in CaptionDataModule(**data).records(s)] for s in
              ("train", "val", "test")}
    paths[3].unlink()
    with pytest.raises(AnnotationError, match=r"line 5 \(3.png\): image file not found"):
        CaptionDataModule(**data).records("train")  # the raw images are needed there
    cached = CachedFeaturesDataModule(features_dir=str(out), **data)
    assert {s: [r.path for r in cached.records(s)] for s in splits} == splits
    cached.setup("fit")
    grid = torch.as_tensor(FeatureCache(out).array(paths[3]))  # (L, D)
    split = next(s for s, ps in splits.items() if paths[3] in ps)
    dataset = cached._dataset(split)
    items = [dataset[i] for i in range(len(dataset))]
    read = [item["features"] for item in items
            if cached.records(split)[item["index"]].path == paths[3]]
    assert read and all(torch.equal(f, grid) for f in read)  # its grid, from the cache
    # the tools read the config alike: extract-features (--verify on a finished cache whose
    # images were removed) takes the cached image; evaluate, which reads the pixels, needs it
    import argparse

    import yaml

    from captioner.cli import main
    from captioner.commands.common import build_data_module

    config = tmp_path / "cached.yaml"
    config.write_text(yaml.safe_dump({"data": {
        "class_path": "captioner.data.cached.CachedFeaturesDataModule",
        "init_args": {"features_dir": str(out), **data}}}))
    dm, _ = build_data_module(argparse.Namespace(config=[str(config)], ckpt=None))
    assert [r.path for r in dm.records("train")] == splits["train"]
    assert main(["evaluate", "--ckpt", str(tiny_checkpoint), "--config", str(config), "--split",
                 "train", "--no-java", "--out", str(tmp_path / "eval")]) == 1
    assert "line 5 (3.png): image file not found" in capsys.readouterr().err
    # without a readable cache (before its extraction) the files are needed, and the cache is
    # tried once, not for every missing file
    opened = []
    cache = CachedFeaturesDataModule.cache
    monkeypatch.setattr(CachedFeaturesDataModule, "cache",
                        property(lambda self: opened.append(1) or cache.fget(self)))
    paths[4].unlink()
    no_cache = CachedFeaturesDataModule(features_dir=str(tmp_path / "none"), skip_bad=True,
                                        **data)
    with pytest.warns(UserWarning, match="2 x image file not found"):
        no_cache.records("train")
    assert len(opened) == 1
    monkeypatch.undo()
    with captions.open("a") as f:  # neither a file nor a cached grid
        f.write("missing.png,a picture number 0\n")
    with pytest.raises(AnnotationError, match=r"line 14 \(missing.png\): image file not found"):
        CachedFeaturesDataModule(features_dir=str(out), **data).records("train")


def test_an_unfinished_cache_resumes_through_a_cached_skip_bad_config(tmp_path, capsys):
    """``extract-features --config`` with the cached data module's own config (``skip_bad``):
    reading its records used to open the cache as finished, so after an interrupted
    extraction every rerun failed with "the extraction did not finish; run ... again"."""
    import yaml

    from captioner.cli import main
    from tests.conftest import TINY_MODEL_CONFIG

    images = tmp_path / "images"
    _random_pngs(images, 6)
    (images / "5.png").write_bytes(b"corrupt")
    (tmp_path / "captions.txt").write_text(
        "image,caption\n" + "".join(f"{i}.png,a square number {i}\n" for i in range(6)))
    out = tmp_path / "cache"
    encoder = TINY_MODEL_CONFIG["encoder"]
    config = tmp_path / "cached.yaml"
    config.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "data": {"class_path": "captioner.data.cached.CachedFeaturesDataModule", "init_args": {
            "features_dir": str(out), "format": "flickr8k_csv",
            "annotations": str(tmp_path / "captions.txt"), "image_root": str(images),
            "image_size": 32, "min_freq": 1, "val_fraction": 0.2, "test_fraction": 0.2,
            "skip_bad": True, "num_workers": 0}},
        "model": {"class_path": "captioner.lit.captioning.CaptioningModule", "init_args": {
            **TINY_MODEL_CONFIG, "encoder": {**encoder, "init_args": {
                **encoder["init_args"], "weights": None, "freeze": True}}}}}))
    extract = ["extract-features", "--config", str(config), "--out", str(out),
               "--batch-size", "2", "--shard-size", "2"]
    assert main(extract) == 0, capsys.readouterr().err
    index = json.loads((out / INDEX_FILE).read_text())
    assert len(index["items"]) == 5 and index["complete"]
    # as if killed after its first shard: the index records one shard and is unfinished
    first = {k: v for k, v in index["items"].items() if v[0] == 0}
    (out / INDEX_FILE).write_text(json.dumps({**index, "items": first, "shards": ["shard_00000.npy"],
                                              "complete": False}))
    with pytest.warns(UserWarning, match="left out 1 images"):
        assert main(extract) == 0, capsys.readouterr().err
    again = FeatureCache(out)
    assert again.index["complete"] and len(again) == 5
    assert again.index["fingerprint"] == index["fingerprint"]  # seed_everything: same weights


def test_config_seed_reads_the_last_integer_seed(tmp_path):
    from captioner.commands.extract_features import config_seed

    files = []
    for i, text in enumerate(["seed_everything: 3\n", "data: {}\n", "seed_everything: 5\n",
                              "seed_everything: true\n"]):
        files.append(tmp_path / f"{i}.yaml")
        files[-1].write_text(text)
    assert config_seed(files[:2]) == 3 and config_seed(files[:3]) == 5
    assert config_seed(files) is None and config_seed(files[1:2]) is None


def test_true_half_precision_encoders_are_checked_against_the_cache(tmp_path):
    """Under ``bf16-true`` / ``16-true`` the encoder's weights are cast: the cache keeps the
    fingerprints of its encoder cast to those dtypes, so the check still refuses another
    encoder's cache (it used to only warn and train on it)."""
    import copy
    from types import SimpleNamespace

    from captioner.features import encoder_fingerprint
    from captioner.lit.captioning import CaptioningModule
    from tests.conftest import TINY_MODEL_CONFIG

    paths = _random_pngs(tmp_path / "images", 2)
    encoder = TINY_MODEL_CONFIG["encoder"]
    frozen = {**TINY_MODEL_CONFIG, "vocab_size": 11, "encoder": {
        **encoder, "init_args": {**encoder["init_args"], "weights": None, "freeze": True}}}
    torch.manual_seed(0)
    module = CaptioningModule.from_config(frozen)
    torch.manual_seed(1)
    other = CaptioningModule.from_config(frozen)
    for name, model in (("mine", module), ("other", other)):
        extract_features(model.encoder, paths, tmp_path / name, image_size=32, batch_size=2,
                         shard_size=2)
    index = json.loads((tmp_path / "mine" / INDEX_FILE).read_text())
    for dtype in (torch.bfloat16, torch.float16):
        cast = copy.deepcopy(module.encoder).to(dtype)
        assert index["fingerprints"][str(dtype)[6:]] == encoder_fingerprint(cast, 32)
        assert encoder_fingerprint(cast, 32) != index["fingerprint"]
    # a complete cache written before the 16-bit fingerprints were stored gets them when its
    # extraction is run again, though no image is left to encode
    older = {k: v for k, v in index.items() if k != "fingerprints"}
    (tmp_path / "mine" / INDEX_FILE).write_text(json.dumps(older))
    extract_features(module.encoder, paths, tmp_path / "mine", image_size=32, batch_size=2,
                     shard_size=2)
    assert json.loads((tmp_path / "mine" / INDEX_FILE).read_text()) == index
    module.encoder.to(torch.bfloat16)
    for name in ("mine", "other"):
        dm = SimpleNamespace(features_dir=str(tmp_path / name), image_size=32,
                             cache=FeatureCache(tmp_path / name))
        module._trainer = SimpleNamespace(datamodule=dm)
        if name == "mine":
            module.check_feature_cache()  # its own cache, in bf16: accepted
        else:
            with pytest.raises(ConfigError, match="extracted with another encoder"):
                module.check_feature_cache()


def test_broken_index_shards_and_overflow_name_the_file(tmp_path):
    """A truncated shard or index, and features float16 cannot hold, are errors naming the
    shard, the index or the image (they were numpy / json errors naming nothing); a hard-killed
    write's temporary files are removed when the extraction is resumed."""
    from torch import nn

    paths = _random_pngs(tmp_path / "images", 4)
    out = tmp_path / "cache"
    kw = dict(image_size=32, batch_size=2, shard_size=2)
    extract_features(frozen_encoder(), paths, out, **kw)
    shard = out / "shard_00001.npy"
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    with pytest.raises(FeatureCacheError, match=rf"{shard}: not a readable shard"):
        FeatureCache(out).tensor(paths[2])
    shard.write_bytes(b"")  # empty: numpy's EOFError, named as a shard too
    with pytest.raises(FeatureCacheError, match=rf"{shard}: not a readable shard"):
        FeatureCache(out).tensor(paths[2])
    np.save(shard, np.zeros((2, 4, 4), dtype=np.float32))
    with pytest.raises(FeatureCacheError, match=rf"{shard}: a float32 array of shape \(2, 4, 4\)"):
        FeatureCache(out).tensor(paths[2])
    shard.write_bytes(good[: len(good) // 2])
    # run again: the damaged shard's images are encoded again, into a new shard (a cut-short
    # shard used to stay, the run saying every image was cached); a run of other images drops
    # it from the index without claiming to encode them
    said = []
    extract_features(frozen_encoder(), paths[:2], out, progress=said.append, **kw)
    assert said[0].startswith("shard_00001.npy: damaged (") and said[0].endswith(
        "0 of its 2 images are encoded again now, the others when a run asks for them")
    assert image_key(paths[2]) not in FeatureCache(out).items and not shard.exists()
    FeatureCache(out).tensor(paths[0])
    said.clear()
    extract_features(frozen_encoder(), paths, out, progress=said.append, **kw)
    assert said[0].startswith("shard_00002.npy: 2 images")  # the dropped ones, encoded now
    assert (out / "shard_00002.npy").read_bytes() == good
    torch.testing.assert_close(FeatureCache(out).tensor(paths[2]),
                               torch.from_numpy(np.load(out / "shard_00002.npy")[0]))

    leftovers = [out / ".shard_00002.npy.0123456789ab.tmp.npy",
                 out / ".index.json.0123456789ab.tmp.json"]
    for path in leftovers:
        path.write_bytes(b"partial")
    extract_features(frozen_encoder(), paths, out, **kw)  # resumed (nothing left to do)
    assert not any(path.exists() for path in leftovers)

    index_file = out / INDEX_FILE
    index_file.write_text(index_file.read_text()[:50])
    with pytest.raises(FeatureCacheError, match=rf"{index_file}: not a readable feature cache"):
        FeatureCache(out)
    with pytest.raises(FeatureCacheError, match=rf"{index_file}: not a readable feature cache"):
        extract_features(frozen_encoder(), paths, out, **kw)

    class Spiked(nn.Module):
        """The frozen encoder with one image's features set to ``value``."""

        def __init__(self, value: float) -> None:
            super().__init__()
            self.inner, self.value = frozen_encoder(), value
            self.grid_size, self.out_channels = self.inner.grid_size, self.inner.out_channels

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            out = self.inner(images).clone()
            out[1, 0, 0] = self.value
            return out

    for value, what in ((1e6, "values beyond float16's range"), (float("nan"), "NaN")):
        with pytest.raises(ValueError, match=rf"{paths[1]}: the encoder's features hold {what}"):
            extract_features(Spiked(value), paths, tmp_path / f"spiked{value}", **kw)


def test_fingerprint_covers_settings_and_normalisation_and_keeps_old_caches(records, tmp_path):
    """Two encoders with equal weights that compute different features (a non-local stage
    with and without sub-sampling; another input normalisation, a buffer the state dict leaves
    out) have different fingerprints (version 2); a cache written under version 1 (no
    ``fingerprint_version`` in its index) is still checked, and resumed, under version 1."""
    from captioner.encoders.non_local import NonLocalBlock
    from captioner.features import FINGERPRINT_VERSION, encoder_fingerprint

    def with_stage(subsample: bool) -> ImageEncoder:
        torch.manual_seed(0)
        return ImageEncoder("shapes_cnn", grid_size=GRID, freeze=True,
                            stages=[NonLocalBlock(subsample=subsample)])

    a, b = with_stage(False), with_stage(True)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))
    assert encoder_fingerprint(a, 32) != encoder_fingerprint(b, 32)
    assert encoder_fingerprint(a, 32, version=1) == encoder_fingerprint(b, 32, version=1)
    c = frozen_encoder()
    d = frozen_encoder()
    d.mean.fill_(0.25)
    assert encoder_fingerprint(c, 32) != encoder_fingerprint(d, 32)

    paths = [r.path for r in records["val"][:4]]
    out = tmp_path / "old"
    extract_features(frozen_encoder(), paths[:2], out, image_size=32, batch_size=2, shard_size=2)
    index = json.loads((out / INDEX_FILE).read_text())
    assert index["fingerprint_version"] == FINGERPRINT_VERSION == 2
    del index["fingerprint_version"]  # as written before versions
    index["fingerprint"] = encoder_fingerprint(frozen_encoder(), 32, version=1)
    (out / INDEX_FILE).write_text(json.dumps(index))
    cache = extract_features(frozen_encoder(), paths, out, image_size=32, batch_size=2,
                             shard_size=2)  # resumed under its own definition
    assert len(cache) == 4 and cache.index["fingerprint_version"] == 1
    assert cache.index["fingerprint"] == index["fingerprint"]


def _flickr_config_with_frozen_encoder(tmp_path: Path, n: int, **data: Any) -> tuple[Path, Path]:
    """``n`` random PNGs with one caption each (Kaggle CSV) and ``config.yaml``: a
    ``CaptionDataModule`` on them (``image_size`` 32; ``data`` overrides its options) and the
    tiny model with its encoder frozen.

    Returns:
        ``(images folder, config file)``.
    """
    import yaml

    from tests.conftest import TINY_MODEL_CONFIG

    images = tmp_path / "images"
    _random_pngs(images, n)
    (tmp_path / "captions.txt").write_text(
        "image,caption\n" + "".join(f"{i}.png,a red square number {i}\n" for i in range(n)))
    encoder = TINY_MODEL_CONFIG["encoder"]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"class_path": "captioner.data.datamodule.CaptionDataModule", "init_args": {
            "format": "flickr8k_csv", "annotations": str(tmp_path / "captions.txt"),
            "image_root": str(images), "image_size": 32, **data}},
        "model": {"class_path": "captioner.lit.captioning.CaptioningModule", "init_args": {
            **TINY_MODEL_CONFIG,
            "encoder": {**encoder, "init_args": {**encoder["init_args"], "freeze": True}}}}}))
    return images, config


def test_extract_features_takes_data_overrides_as_fit_does(tmp_path, capsys):
    """``--data.init_args.KEY VALUE`` (and ``KEY=VALUE``) over the ``--config`` files: a shipped
    config's relative data paths can be pointed elsewhere without writing another YAML (the
    command used to refuse them: "unrecognized arguments")."""
    from captioner.cli import main

    images, config = _flickr_config_with_frozen_encoder(
        tmp_path, 9, annotations="elsewhere/captions.txt", image_root="elsewhere/images")
    out = tmp_path / "cache"
    base = ["extract-features", "--config", str(config), "--out", str(out)]
    assert main(base) == 1  # the config's own paths name nothing
    assert "elsewhere/captions.txt" in capsys.readouterr().err
    assert main([*base, "--data.init_args.annotations", str(tmp_path / "captions.txt"),
                 f"--data.init_args.image_root={images}"]) == 0
    err = capsys.readouterr().err
    assert "with --data.init_args.annotations, --data.init_args.image_root" in err
    assert len(FeatureCache(out)) == 9
    assert main([*base, "--data.init_args.annotations"]) == 2  # no value
    assert "needs a value" in capsys.readouterr().err
    assert main([*base, "--dat.init_args.x", "1"]) == 2  # not a data override: refused
    assert "unrecognized arguments: --dat.init_args.x 1" in capsys.readouterr().err


def test_extract_features_answers_each_mistake_with_its_status(tmp_path, capsys):
    """An unreadable image is unreadable data (1; it was answered 2: ``ImageLoadError`` is a
    ``ValueError`` and was caught as a cache mistake); an unknown, repeated or empty ``--split``
    and an ``--out`` that is a file are usage errors (2), answered before any image is read
    (``--split ,`` cached nothing and exited 0, ``--out FILE`` ended in a traceback)."""
    from captioner.cli import main

    images, config = _flickr_config_with_frozen_encoder(tmp_path, 6, num_workers=0, min_freq=1)
    base = ["extract-features", "--config", str(config)]
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for extra, says in [(["--split", "train,bogus"], "'train,bogus': give one or more of"),
                        (["--split", ","], "',': give one or more of"),
                        (["--split", "val,val"], "each once"),
                        (["--out", str(a_file)], f"--out {a_file}: a file, not a folder"),
                        (["--out", str(a_file / "cache")], f"{a_file} is a file, not a folder")]:
        argv = [*base, "--out", str(tmp_path / "cache"), *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
    assert not (tmp_path / "cache").exists()
    (images / "3.png").write_bytes(b"garbage")
    assert main([*base, "--out", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err
    assert "3.png" in err and "Traceback" not in err


def test_an_image_rewritten_while_it_is_cached_is_caught(tmp_path):
    """The signature kept for an image used to be taken after its shard was encoded: a file
    rewritten in between was stored with the new file's signature and the old file's grid.
    Now taken before any image is read and compared after each shard; the next run encodes it
    again and goes on."""
    from PIL import Image

    paths = _random_pngs(tmp_path / "images", 6)
    out, kw = tmp_path / "cache", dict(image_size=32, batch_size=2, shard_size=2)

    def rewrite_a_later_image(line: str) -> None:
        if line.startswith("shard_00000.npy"):  # after the first shard, before the second's
            time.sleep(0.01)
            Image.new("RGB", (16, 16), (0, 200, 0)).save(paths[3])  # another size

    with pytest.raises(FeatureCacheError, match=rf"{paths[3]}: the file changed while it was "
                                                r"being cached \(1 of this shard's 2 images\)"):
        extract_features(frozen_encoder(), paths, out, progress=rewrite_a_later_image, **kw)
    index = json.loads((out / INDEX_FILE).read_text())
    assert image_key(paths[3]) not in index["items"] and len(index["items"]) == 2  # shard 0
    cache = extract_features(frozen_encoder(), paths, out, **kw)  # resumed: encoded anew
    fresh = extract_features(frozen_encoder(), paths, tmp_path / "fresh", **kw)
    torch.testing.assert_close(cache.tensor(paths[3]), fresh.tensor(paths[3]))


def test_changed_bytes_inside_a_shard_are_found_by_verify_and_encoded_again(tmp_path, capsys,
                                                                            monkeypatch):
    """A shard keeps its size and shape but some bytes of its grids changed (bit rot, an
    edit): opening it cannot tell, the CRC-32 written with it can. ``verify`` names it, the
    data module's ``verify_cache`` refuses it, and an extraction run with ``verify`` encodes
    its images again, to the same bytes; a cache written before checksums gets them recorded."""
    import zlib
    import warnings

    import captioner.features as features
    from captioner.data.cached import CachedShapesDataModule
    from captioner.features import shard_checksum

    paths = _random_pngs(tmp_path / "images", 5)
    out = tmp_path / "cache"
    kw = dict(image_size=32, batch_size=2, shard_size=2)
    extract_features(frozen_encoder(), paths, out, **kw)
    index = json.loads((out / INDEX_FILE).read_text())
    # each shard's checksum is zlib's CRC-32 of its grids' bytes (not the .npy header)
    assert index["checksums"] == {name: zlib.crc32(np.load(out / name).tobytes())
                                  for name in ("shard_00000.npy", "shard_00001.npy",
                                               "shard_00002.npy")}
    monkeypatch.setattr(features, "CRC_CHUNK", 7)  # read in pieces: the same checksum
    grids = np.load(out / "shard_00001.npy", mmap_mode="r")
    assert shard_checksum(grids) == index["checksums"]["shard_00001.npy"]
    assert FeatureCache(out).verify() == {}

    shard = out / "shard_00001.npy"
    good = shard.read_bytes()
    original = FeatureCache(out).tensor(paths[3])
    damaged = bytearray(good)
    damaged[-3] ^= 0x10  # one bit of the last grid: same size, same header
    shard.write_bytes(bytes(damaged))
    served = FeatureCache(out).tensor(paths[3])  # opening a shard cannot tell
    assert (served != original).sum() == 1
    lines: list[str] = []
    found = FeatureCache(out).verify(progress=lines.append)
    assert list(found) == ["shard_00001.npy"] and found["shard_00001.npy"].startswith(
        "its bytes changed (CRC-32 ")
    assert lines == ["shard_00000.npy: intact",
                     f"shard_00001.npy: {found['shard_00001.npy']}", "shard_00002.npy: intact"]

    # the data module with verify_cache refuses it, naming the shard and the repair
    dm = CachedShapesDataModule(features_dir=str(out), image_size=32, verify_cache=True)
    with pytest.raises(FeatureCacheError,
                       match=r"shard_00001\.npy: damaged \(its bytes changed.*; 1 damaged "
                             r"shards in the cache\); .*--verify"):
        dm.cache

    # a plain re-run reads headers only; with verify the shard's images are encoded again
    said: list[str] = []
    extract_features(frozen_encoder(), paths, out, progress=said.append, **kw)
    assert said == ["5 images already cached in " + str(out)]
    extract_features(frozen_encoder(), paths, out, progress=said.append, verify=True, **kw)
    assert said[1].startswith("shard_00001.npy: damaged (its bytes changed") and said[1].endswith(
        "2 of its 2 images are encoded again now")
    assert said[2] == "verified the cache's shards against their checksums"
    assert said[3].startswith("shard_00003.npy: 2 images")
    assert (out / "shard_00003.npy").read_bytes() == good and not shard.exists()
    assert FeatureCache(out).verify() == {}

    # a cache written before checksums: shapes only, then --verify records them
    index = json.loads((out / INDEX_FILE).read_text())
    del index["checksums"]
    (out / INDEX_FILE).write_text(json.dumps(index))
    assert FeatureCache(out).unchecked_shards == ["shard_00000.npy", "shard_00002.npy",
                                                  "shard_00003.npy"]
    with pytest.warns(UserWarning, match="3 shards were written before checksums"):
        CachedShapesDataModule(features_dir=str(out), image_size=32, verify_cache=True).cache
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CachedShapesDataModule(features_dir=str(out), image_size=32).cache  # no check asked: no warning
    said.clear()
    extract_features(frozen_encoder(), paths, out, progress=said.append, verify=True, **kw)
    assert said[0] == ("verified the cache's shards against their checksums; 3 shards written "
                       "before checksums were kept had none: recorded now")
    assert FeatureCache(out).unchecked_shards == [] and FeatureCache(out).verify() == {}


def test_shards_of_another_dtype_rank_or_too_few_rows_are_damaged(tmp_path):
    paths = _random_pngs(tmp_path / "images", 4)
    out = tmp_path / "cache"
    kw = dict(image_size=32, batch_size=2, shard_size=2)
    extract_features(frozen_encoder(), paths, out, **kw)
    shard = out / "shard_00001.npy"
    grids = np.load(shard)  # (2, 15, 128) float16: GRID 3 x 5, shapes_cnn's D = 128
    # the right shape in float32: refused by its dtype (not served as float32, nor only
    # reported as changed bytes)
    np.save(shard, grids.astype(np.float32))
    with pytest.raises(FeatureCacheError, match=r"a float32 array of shape \(2, 15, 128\)"):
        FeatureCache(out).tensor(paths[2])
    assert FeatureCache(out).verify() == {
        "shard_00001.npy": "a float32 array of shape (2, 15, 128)"}
    # a 0-d array: an error naming the shard, not an IndexError
    np.save(shard, np.array(1.0, dtype=np.float16))
    with pytest.raises(FeatureCacheError, match=r"a float16 array of shape \(\)"):
        FeatureCache(out).tensor(paths[2])
    # one row where the index uses rows 0 and 1: damaged (by shape, before any checksum)
    np.save(shard, grids[:1])
    damaged = {"shard_00001.npy": "a float16 array of shape (1, 15, 128)"}
    assert FeatureCache(out).verify() == damaged
    index = json.loads((out / INDEX_FILE).read_text())
    del index["checksums"]  # a cache from before checksums: the shape is all there is
    (out / INDEX_FILE).write_text(json.dumps(index))
    assert FeatureCache(out).verify() == damaged
    said: list[str] = []
    extract_features(frozen_encoder(), paths, out, progress=said.append, **kw)  # no verify
    assert said[0].startswith("shard_00001.npy: damaged (a float16 array of shape (1, 15, 128))")
