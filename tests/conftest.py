"""Shared fixtures: a tiny shapes data set and a captioner checkpoint trained on it.

Both are session-scoped and built once (about ten seconds on one CPU core):

* ``shapes_root`` - :func:`captioner.data.shapes.make_shapes_dataset` with 24 train, 6 val and
  6 test images of 32 x 32 pixels;
* ``tiny_checkpoint`` - a soft-attention model (``shapes_cnn``, a non-square 3 x 4 grid, tiny
  decoder) trained for a few steps through a real :class:`lightning.Trainer`, saved with
  ``trainer.save_checkpoint`` so it carries the ``"captioner"`` metadata a checkpoint written by
  ``captioner fit`` carries.

Torch runs single-threaded in the tests (``CAPTIONER_TEST_THREADS`` to change it): the tensors are
tiny, and on a shared machine intra-op threads oversubscribe the cores and make small models tens
of times slower (measured: 6 training steps of the tiny model, 16 s with 2 threads under load,
0.5 s with one).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

torch.set_num_threads(int(os.environ.get("CAPTIONER_TEST_THREADS", "1")))

class CastCounter(TorchDispatchMode):
    """Counts the dtype casts (``aten._to_copy``) of tensors of the given shapes, per shape:
    ``with CastCounter([(4, 5)]) as casts: ...; casts.counts[(4, 5)]``."""

    def __init__(self, shapes) -> None:
        super().__init__()
        self.counts = {tuple(shape): 0 for shape in shapes}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else None
        if func is torch.ops.aten._to_copy.default and shape in self.counts:
            self.counts[shape] += 1
        return func(*args, **(kwargs or {}))


SHAPES_SIZES = {"num_train": 24, "num_val": 6, "num_test": 6, "image_size": 32}
TINY_GRID = (3, 4)  # (H, W): deliberately not square

TINY_MODEL_CONFIG: dict[str, Any] = {
    "encoder": {
        "class_path": "captioner.encoders.ImageEncoder",
        "init_args": {"backbone": "shapes_cnn", "weights": None, "grid_size": list(TINY_GRID),
                      "freeze": False},
    },
    "decoder": {
        "class_path": "captioner.decoder.AttentionDecoder",
        "init_args": {
            "embed_dim": 8, "hidden_dim": 16, "dropout": 0.0,
            "attention": {"class_path": "captioner.attention.AdditiveAttention",
                          "init_args": {"attention_dim": 8}},
        },
    },
    "lr": 0.01,
    "max_length": 8,
}


def shapes_data_config(root: Path, batch_size: int = 8) -> dict[str, Any]:
    """The ``data:`` section (``class_path`` / ``init_args``) of the tiny shapes set."""
    return {
        "class_path": "captioner.data.datamodule.ShapesDataModule",
        "init_args": {"root": str(root), **SHAPES_SIZES, "seed": 0, "batch_size": batch_size,
                      "num_workers": 0},
    }


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny generated shapes set (COCO layout, with boxes)."""
    from captioner.data.shapes import make_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, seed=0, **SHAPES_SIZES)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A captioner checkpoint trained for a few steps on ``shapes_root``."""
    import lightning as L

    from captioner.config import instantiate
    from captioner.lit.captioning import CaptioningModule

    L.seed_everything(0, verbose=False)
    cfg = shapes_data_config(shapes_root)
    dm = instantiate(cfg["class_path"], cfg["init_args"])
    model = CaptioningModule.from_config({**TINY_MODEL_CONFIG, "vocab_size": dm.vocab_size})
    out = tmp_path_factory.mktemp("tiny_run")
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=6, limit_val_batches=1, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=out,
    )
    trainer.fit(model, datamodule=dm)
    path = out / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


def red_squares(tmp_path: Path, n: int) -> Path:
    """``n`` small JPEGs in ``tmp_path/images`` and their ``captions.txt`` (Kaggle CSV layout)."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(n):
        Image.new("RGB", (8, 8), (240 * i // n, 0, 0)).save(images / f"{i}.jpg")
    (tmp_path / "captions.txt").write_text(
        "image,caption\n" + "".join(f"{i}.jpg,a red square {i}\n" for i in range(n)))
    return images


def red_squares_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> tuple[Path, Path]:
    """``tiny_checkpoint`` re-saved as if trained on :func:`red_squares` (20 images, Kaggle CSV
    layout) split with ``split_seed`` 0, and the data configs ``seed0.yaml`` (the stored split
    settings, one loader option changed) and ``seed1.yaml`` (another split) in ``tmp_path``.

    Returns:
        ``(checkpoint, images folder)``.
    """
    import yaml

    images = red_squares(tmp_path, 20)
    data = {"class_path": "captioner.data.datamodule.CaptionDataModule",
            "init_args": {"format": "flickr8k_csv", "annotations": str(tmp_path / "captions.txt"),
                          "image_root": str(images), "image_size": 16, "num_workers": 0,
                          "min_freq": 1, "val_fraction": 0.25, "test_fraction": 0.25,
                          "split_seed": 0}}
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    ckpt["captioner"]["data"]["datamodule"] = data
    ckpt["captioner"]["data"]["image_size"] = 16
    trained = tmp_path / "trained.ckpt"
    torch.save(ckpt, trained)
    for seed in (0, 1):
        loader = {"batch_size": 3} if seed == 0 else {}  # a loader option: not the split
        (tmp_path / f"seed{seed}.yaml").write_text(yaml.safe_dump({"data": {
            **data, "init_args": {**data["init_args"], "split_seed": seed, **loader}}}))
    return trained, images


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> Any:
    """``scripts/<name>.py`` imported as a module (registered in ``sys.modules``: dataclasses
    look their module up)."""
    spec = importlib.util.spec_from_file_location(f"captioner_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def deterministic_algorithms(mode: bool = True) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(mode)`` inside the block, the setting restored."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(mode)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


def trainer_at(epoch: int, **attributes: Any) -> Any:
    """A stand-in for a Lightning ``Trainer`` whose fit loop has finished ``epoch`` epochs
    (what the data modules read to start a resumed epoch in order), with ``attributes``
    (``world_size``, ``overfit_batches``, ...)."""
    from types import SimpleNamespace

    progress = SimpleNamespace(current=SimpleNamespace(processed=epoch))
    return SimpleNamespace(fit_loop=SimpleNamespace(epoch_progress=progress), **attributes)

