"""AtomicCheckpointIO: no checkpoint write, interrupted or across file systems, leaves a
truncated checkpoint where a good one was."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

from captioner.lit.checkpoint_io import AtomicCheckpointIO, use_atomic_checkpoints
from tests.conftest import SHAPES_SIZES
from tests.lit.test_cli_test import shapes_run

OLD, NEW = {"w": torch.zeros(1000)}, {"w": torch.ones(1000)}


def cross_device_and_killed_mid_copy(monkeypatch) -> None:
    """The temp folder on another file system (``os.rename`` fails with EXDEV, so
    ``shutil.move`` copies) and the process killed after 100 bytes of the copy."""
    def rename(src, dst, *args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def copyfile(src, dst, *args, **kwargs):
        with open(src, "rb") as fsrc, open(dst, "wb") as fdst:
            fdst.write(fsrc.read(100))
        raise KeyboardInterrupt("killed mid-copy")

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(shutil, "copyfile", copyfile)


def saved(path) -> torch.Tensor:
    return torch.load(path, weights_only=True)["w"]


@pytest.mark.parametrize("io_class", [TorchCheckpointIO, AtomicCheckpointIO])
def test_a_temp_folder_on_another_file_system(tmp_path, monkeypatch, io_class):
    """Lightning's writer (the reference) moves its temp file from the system temp folder: on
    another file system that is a copy into the destination, and a kill during it leaves a
    truncated ``last.ckpt`` in place of the good one. The atomic writer's temp file is in the
    checkpoint's folder: nothing to copy, the new checkpoint lands whole."""
    path = tmp_path / "ckpts" / "last.ckpt"
    io = io_class()
    io.save_checkpoint(OLD, path)
    with monkeypatch.context() as patch:
        cross_device_and_killed_mid_copy(patch)
        try:
            io.save_checkpoint(NEW, path)
        except KeyboardInterrupt:
            pass
    if io_class is TorchCheckpointIO:
        with pytest.raises(RuntimeError):
            saved(path)
    else:
        assert torch.equal(saved(path), NEW["w"])
        assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temp left


def test_a_write_killed_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(OLD, path)
    real_save = torch.save

    def killed(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint(NEW, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(saved(path), OLD["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_hard_killed_writes_temporary_file_goes_with_the_next_write(tmp_path):
    """SIGKILL during ``torch.save`` runs no clean-up: the hidden temporary file stayed beside
    ``last.ckpt`` for good (hundreds of MB with a ResNet). The next write of that checkpoint
    removes it; another checkpoint's is left to its own writer."""
    io = AtomicCheckpointIO()
    path = tmp_path / "epoch=1-step=[9].ckpt"  # glob characters in the name
    left = tmp_path / ".epoch=1-step=[9].ckpt.0123456789ab.tmp.ckpt"
    other = tmp_path / ".last.ckpt.0123456789ab.tmp.ckpt"
    left.write_bytes(b"PK\x03\x04 partial")
    other.write_bytes(b"PK\x03\x04 partial")
    io.save_checkpoint(NEW, path)
    assert torch.equal(saved(path), NEW["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, path.name]


def test_fit_installs_it_and_keeps_another_plugin(shapes_root, tmp_path):
    from captioner.cli import lightning_main

    argv = shapes_run(shapes_root, tmp_path, SHAPES_SIZES["num_train"],
                      SHAPES_SIZES["num_test"], 4)
    cli = lightning_main(argv, run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    other = AsyncCheckpointIO()
    cli.trainer.strategy.checkpoint_io = other
    use_atomic_checkpoints(cli.trainer)
    assert cli.trainer.strategy.checkpoint_io is other


def test_a_file_url_is_written_where_it_points(tmp_path, monkeypatch):
    """``file:///dir/last.ckpt`` (a direct ``trainer.save_checkpoint`` call) lands in
    ``/dir``, as with Lightning's writer; it was written under ``./file:/dir``."""
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "ckpts" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(NEW, f"file://{target}")
    assert torch.equal(saved(target), NEW["w"])
    assert not (tmp_path / "file:").exists()


def test_a_remote_url_keeps_lightnings_writer():
    """A non-local URL (here fsspec's in-memory file system) is written by Lightning's writer,
    where it points; it must not become a local path (``/ckpts/last.ckpt``)."""
    import fsspec

    AtomicCheckpointIO().save_checkpoint(NEW, "memory://ckpts/last.ckpt")
    with fsspec.open("memory://ckpts/last.ckpt", "rb") as f:
        assert torch.equal(torch.load(f, weights_only=True)["w"], NEW["w"])
