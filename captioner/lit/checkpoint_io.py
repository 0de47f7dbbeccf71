"""Checkpoint files written atomically on local disks, whatever folder holds the temp files.

Lightning's :class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` writes a checkpoint through
an fsspec transaction, whose local temporary file comes from ``tempfile.mkstemp()``, in the
system's temp folder; the commit is ``shutil.move``. Where that folder is on another file system
than the checkpoints (a node-local ``/tmp``, checkpoints on a network disk), the move is a copy
into the destination itself: a run killed during it leaves a truncated ``last.ckpt`` in place of
the previous good one. :class:`AtomicCheckpointIO` writes next to the destination instead and
moves the file with ``os.replace`` (:func:`captioner.atomic.atomic_write`); remote paths
(``s3://``...) keep Lightning's way. ``captioner fit`` installs it
(:func:`use_atomic_checkpoints`). The hidden temporary file a hard-killed write left is removed
by the next write of the same checkpoint.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import torch
from fsspec.core import strip_protocol
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from captioner.atomic import atomic_write, remove_leftovers

__all__ = ["AtomicCheckpointIO", "use_atomic_checkpoints"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` whose local writes go to a temporary file in the
    checkpoint's own folder, flushed to disk and moved onto the checkpoint with ``os.replace``:
    a reader, or a resumed run, sees the old checkpoint or the new one, never part of one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        local = Path(strip_protocol(str(path)))  # file:///x -> /x
        # a hard-killed earlier write of this same file left its hidden temporary file (one
        # writer per checkpoint file: rank 0, one save at a time)
        remove_leftovers(local.parent, glob.escape(local.name))
        with atomic_write(local, "wb") as f:
            torch.save(checkpoint, f)


def use_atomic_checkpoints(trainer: Any) -> None:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` where it has Lightning's plain
    :class:`TorchCheckpointIO` (another checkpoint plugin, e.g. asynchronous, is kept)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
