"""Tests for captioner.lit.loggers: a resumed fit keeps the metrics logged before it."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from captioner.lit.loggers import ResumableCSVLogger


class _Logged(BoringModel):
    """BoringModel logging its loss every step and a validation score every epoch."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("train/loss", out["loss"])
        return out

    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)
        self.log("val/score", out["x"], on_epoch=True)
        return out


def _fit(root: Path, epochs: int, ckpt_path: str | None = None) -> Path:
    """Fit ``_Logged`` for ``epochs`` epochs of 4 steps into version ``exp`` of ``root``,
    saving ``epoch=N.ckpt`` after each epoch; returns the folder of ``metrics.csv``."""
    torch.manual_seed(0)
    logger = ResumableCSVLogger(str(root), name="run", version="exp")
    trainer = L.Trainer(max_epochs=epochs, limit_train_batches=4, limit_val_batches=2,
                        log_every_n_steps=1, logger=logger, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[ModelCheckpoint(dirpath=root / "ckpts", filename="{epoch}",
                                                   save_top_k=-1)])
    trainer.fit(_Logged(), ckpt_path=ckpt_path)
    return Path(logger.log_dir)


def _rows(folder: Path) -> list[tuple[str, str, bool, bool]]:
    """``(epoch, step, has a train loss, has a val score)`` of each row of ``metrics.csv``."""
    with open(folder / "metrics.csv", newline="") as file:
        return [(r["epoch"], r["step"], bool(r["train/loss"]), bool(r["val/score"]))
                for r in csv.DictReader(file)]


def test_a_fit_resumed_into_the_same_version_keeps_the_earlier_metrics(tmp_path):
    """Lightning's CSVLogger deleted ``metrics.csv`` when a fit resumed into its folder (the
    README's ``--trainer.logger.init_args.version NAME --ckpt_path last``): the curve before
    the resume was lost. A killed run's rows after its last checkpoint are logged again by the
    resumed run, so they are replaced, not doubled: the file equals an uninterrupted run's."""
    straight = _rows(_fit(tmp_path / "straight", 4))
    assert {r[0] for r in straight} == {"0", "1", "2", "3"} and any(r[3] for r in straight)
    # a run killed after 3 epochs (it logged them), resumed from its checkpoint of epoch 1
    folder = _fit(tmp_path / "killed", 3)
    _fit(tmp_path / "killed", 4, ckpt_path=str(tmp_path / "killed" / "ckpts" / "epoch=1.ckpt"))
    assert _rows(folder) == straight
