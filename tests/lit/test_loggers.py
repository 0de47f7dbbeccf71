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


def _fit(root: Path, epochs: int, ckpt_path: str | None = None, told: bool = True) -> Path:
    """Fit ``_Logged`` for ``epochs`` epochs of 4 steps into version ``exp`` of ``root``,
    saving ``epoch=N.ckpt`` after each epoch; returns the folder of ``metrics.csv``. ``told``:
    the logger is told where the fit starts, as the captioner modules tell it."""
    torch.manual_seed(0)
    logger = ResumableCSVLogger(str(root), name="run", version="exp")
    if told:
        logger.continue_from(4 * int(Path(ckpt_path).stem.split("=")[1]) + 4 if ckpt_path
                             else None)  # the global step of epoch=N.ckpt
    trainer = L.Trainer(max_epochs=epochs, limit_train_batches=4, limit_val_batches=2,
                        log_every_n_steps=1, logger=logger, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[ModelCheckpoint(dirpath=root / "ckpts", filename="{epoch}",
                                                   save_top_k=-1)])
    trainer.fit(_Logged(), ckpt_path=ckpt_path)
    return Path(logger.log_dir)


def _rows(folder: Path, name: str = "metrics.csv") -> list[tuple[str, str, bool, bool]]:
    """``(epoch, step, has a train loss, has a val score)`` of each row of ``metrics.csv``."""
    with open(folder / name, newline="") as file:
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
    assert not list(folder.glob("metrics.before-*"))


def test_a_module_that_does_not_say_it_resumes_never_loses_a_row(tmp_path):
    """Not told where the run starts (a module other than captioner's), rows the run would
    log again are not dropped on a guess: the earlier file is moved aside whole."""
    folder = _fit(tmp_path, 3)
    killed = _rows(folder)
    _fit(tmp_path, 4, ckpt_path=str(tmp_path / "ckpts" / "epoch=1.ckpt"), told=False)
    assert _rows(folder, "metrics.before-1.csv") == killed
    assert {r[0] for r in _rows(folder)} == {"2", "3"}


def test_a_new_fit_into_a_used_version_moves_the_earlier_file_aside(tmp_path, recwarn):
    """Not a resume: the earlier rows belong to another run. Lightning deleted them; keeping
    those before the new run's first logged step mixed two runs in one file."""
    folder = _fit(tmp_path, 2)
    earlier = (folder / "metrics.csv").read_bytes()
    _fit(tmp_path, 1)
    assert (folder / "metrics.before-1.csv").read_bytes() == earlier
    assert _rows(folder) == _rows(_fit(tmp_path / "alone", 1))
    assert any("held another run's metrics (this fit is not a resume): moved to "
               f"{folder / 'metrics.before-1.csv'}" in str(w.message) for w in recwarn)


def test_an_unreadable_metrics_file_is_moved_aside_not_a_crash(tmp_path, recwarn):
    """A row with more fields than the header failed at the first save, after training had
    run; a file in another encoding when the logger started."""
    folder = tmp_path / "run" / "exp"
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_bytes(b"epoch,step\n0,1,2\n\xe9\xff,3\n")
    _fit(tmp_path, 1, told=False)
    assert (folder / "metrics.before-1.csv").read_bytes() == b"epoch,step\n0,1,2\n\xe9\xff,3\n"
    assert _rows(folder) == _rows(_fit(tmp_path / "alone", 1))
    assert any("cannot be read" in str(w.message) for w in recwarn)


def test_the_captioner_modules_tell_the_logger_where_the_fit_starts(monkeypatch):
    """The restored global step of a resumed fit, ``None`` for a new one."""
    from types import SimpleNamespace

    from captioner.lit.captioning import CaptioningModule
    from tests.lit.test_captioning import model_config

    module = CaptioningModule.from_config(model_config(9))
    told = []
    logger = ResumableCSVLogger("unused")
    monkeypatch.setattr(logger, "continue_from", told.append)
    for ckpt_path, step in ((None, 0), ("last.ckpt", 36)):
        trainer = SimpleNamespace(loggers=[logger], ckpt_path=ckpt_path, global_step=step,
                                  optimizers=[])
        monkeypatch.setattr(CaptioningModule, "trainer", trainer)
        monkeypatch.setattr(module, "_end_frozen_blocks_filter", lambda check: None)
        module.on_train_start()
    assert told == [None, 36]


def test_validate_and_test_into_the_fits_folder_keep_its_rows(tmp_path):
    """``captioner validate`` / ``test --ckpt_path last`` log into the fit's version folder:
    they cut every row logged before their own step 0 (the whole fit's curve, silently). The
    captioner modules now say so, and their rows follow the fit's."""
    from captioner.lit.captioning import CaptioningModule
    from tests.lit.test_captioning import model_config, tiny_dm

    def trainer():
        return L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1,
                         limit_test_batches=1, log_every_n_steps=1, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0,
                         logger=ResumableCSVLogger(str(tmp_path), name="run", version="v"))

    dm = tiny_dm(tmp_path / "shapes")
    module = CaptioningModule.from_config(model_config(dm.vocab_size))
    trainer().fit(module, datamodule=dm)
    folder = tmp_path / "run" / "v"
    fitted = _csv(folder)
    assert {r["epoch"] for r in fitted} == {"0", "1"} and any(r["val/bleu4"] for r in fitted)
    trainer().validate(module, datamodule=dm)
    trainer().test(module, datamodule=dm)
    rows = _csv(folder)
    assert [{k: r[k] for k in fitted[0]} for r in rows[:len(fitted)]] == fitted
    assert rows[-1]["test/bleu4"] != "" and len(rows) == len(fitted) + 2
    assert not list(folder.glob("metrics.before-*"))


def _csv(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def test_a_header_only_metrics_file_is_simply_replaced(tmp_path):
    """Nothing to keep or to move aside (no empty ``metrics.before-N.csv`` left behind)."""
    folder = tmp_path / "run" / "exp"
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text("epoch,step,old/key\n")
    _fit(tmp_path, 1)
    assert _rows(folder) == _rows(_fit(tmp_path / "alone", 1))
    assert not list(folder.glob("metrics.before-*"))
    assert "old/key" not in (folder / "metrics.csv").read_text()
