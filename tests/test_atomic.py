"""captioner.atomic: whole files or none, with an ordinary file's permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from captioner.atomic import atomic_path, atomic_write
from captioner.data.vocabulary import Vocabulary
from captioner.features import FeatureCache, extract_features


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def test_written_files_get_the_umask_permissions_not_mkstemps(tmp_path, umask_022):
    with atomic_write(tmp_path / "a.json") as f:
        f.write("{}")
    with atomic_write(tmp_path / "b.bin", "wb") as f:
        f.write(b"\x00\x01")
    with atomic_path(tmp_path / "c.npz") as tmp:
        assert tmp.suffix == ".npz" and tmp.parent == tmp_path  # writers keep the format
        np.savez(tmp, x=np.arange(3))
    ordinary = tmp_path / "ordinary.txt"
    ordinary.write_text("x")
    assert _mode(ordinary) == umask_022
    for name in ("a.json", "b.bin", "c.npz"):
        assert _mode(tmp_path / name) == umask_022, name
    assert (tmp_path / "a.json").read_text() == "{}"
    assert np.load(tmp_path / "c.npz")["x"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "c.npz",
                                                         "ordinary.txt"]  # no leftovers


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "vocab.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_write(target) as f:
            f.write("half of the new")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]


def test_vocabulary_and_feature_cache_are_readable_by_others(tmp_path, umask_022,
                                                            monkeypatch):
    vocab = Vocabulary.build([["a", "dog"], ["a", "cat"]], min_freq=1)
    vocab.save(tmp_path / "vocab.json")
    assert _mode(tmp_path / "vocab.json") == umask_022
    assert Vocabulary.load(tmp_path / "vocab.json") == vocab

    import torch
    from PIL import Image

    class Frozen(torch.nn.Module):
        grid_size, out_channels = (1, 1), 3

        def forward(self, x):  # (B, 3, H, W) -> (B, 1, 3)
            return x.mean((2, 3)).unsqueeze(1)

    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.png")
        Image.new("RGB", (5, 3), (40 * i, 0, 0)).save(images[-1])
    out = tmp_path / "cache"
    extract_features(Frozen().eval(), images, out, image_size=4, batch_size=2, shard_size=2)
    files = sorted(out.iterdir())
    assert [p.name for p in files] == [".lock", "index.json", "shard_00000.npy",
                                       "shard_00001.npy"]  # .lock: the extraction's lock
    assert all(_mode(p) == umask_022 for p in files)
    assert FeatureCache(out).tensor(images[2]).shape == (1, 3)


def test_atomic_path_flushes_the_file_to_disk_before_moving_it(tmp_path, monkeypatch):
    """The temporary file is fsynced before the rename, and the folder after it (a figure or
    ``.npz`` renamed into place could otherwise be empty after a power loss)."""
    synced = []
    fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    with atomic_path(tmp_path / "c.npz") as tmp:
        np.savez(tmp, x=np.arange(3))
    assert synced == [str(tmp), str(tmp_path)]
    synced.clear()
    with atomic_write(tmp_path / "d.json") as f:
        f.write("{}")
    assert len(synced) == 2 and synced[1] == str(tmp_path)  # once each, not twice


def test_a_folder_that_refuses_the_temporary_file_is_reported_with_the_destination(
        tmp_path, monkeypatch):
    """The error named the hidden temporary file (``.x.png.acb9f0d300b7.tmp.png``), which the
    user never asked for; it names the destination."""
    import captioner.atomic as atomic

    def refuse(folder, prefix, suffix):
        raise PermissionError(13, "Permission denied", str(folder / f"{prefix}abc{suffix}"))

    monkeypatch.setattr(atomic, "_create_temp", refuse)
    target = tmp_path / "x.png"
    with pytest.raises(PermissionError) as info:
        with atomic_write(target) as f:
            f.write("never")
    assert info.value.filename == str(target) and str(target) in str(info.value)
    assert ".tmp" not in str(info.value) and not target.exists()
