"""ResumableCheckpoint: the best epoch of the whole run, across resumes into new folders."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from captioner.lit.callbacks import ResumableCheckpoint


class Scripted(L.LightningModule):
    """Logs a fixed val/bleu4 per epoch."""

    SCORES = [0.20, 0.30, 0.25, 0.40]

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/bleu4", self.SCORES[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(2, 2)), batch_size=2)


def fit(root, epochs, best_class, ckpt_path=None):
    best = best_class(monitor="val/bleu4", mode="max", save_top_k=1, filename="best-{epoch:02d}")
    last = best_class(filename="last", save_top_k=1)
    trainer = L.Trainer(default_root_dir=root, max_epochs=epochs, logger=False,
                        callbacks=[best, last], enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(Scripted(), ckpt_path=ckpt_path)
    return best


def names(folder):
    return sorted(p.name for p in folder.glob("best-*.ckpt"))


@pytest.mark.parametrize("best_class", [ResumableCheckpoint, ModelCheckpoint])
def test_a_resumed_run_saves_only_epochs_better_than_the_whole_runs_best(tmp_path, best_class):
    """Epochs score 0.20, 0.30 | resumed in a new folder: 0.25 | resumed again: 0.40. The
    resumed epoch 2 is no best (ModelCheckpoint, the control, forgets the score and saves it);
    epoch 3 is, and the first folder's best file is kept."""
    fit(tmp_path / "a", 2, best_class)
    assert names(tmp_path / "a" / "checkpoints") == ["best-epoch=01.ckpt"]
    best = fit(tmp_path / "b", 3, best_class, tmp_path / "a" / "checkpoints" / "last.ckpt")
    if best_class is ModelCheckpoint:
        assert names(tmp_path / "b" / "checkpoints") == ["best-epoch=02.ckpt"]  # the defect
        return
    assert names(tmp_path / "b" / "checkpoints") == []
    assert best.best_model_path.endswith("best-epoch=01.ckpt")
    assert float(best.best_model_score) == pytest.approx(0.30)
    best = fit(tmp_path / "c", 4, best_class, tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert names(tmp_path / "c" / "checkpoints") == ["best-epoch=03.ckpt"]
    assert names(tmp_path / "a" / "checkpoints") == ["best-epoch=01.ckpt"]  # another run's: kept
    assert (tmp_path / "b" / "checkpoints" / "last.ckpt").is_file()  # resumed from: kept
    assert float(best.best_model_score) == pytest.approx(0.40)


def test_learning_rate_log_lets_a_run_without_logger_train(tmp_path):
    """``--trainer.logger false`` with the shipped trainer configs (which add the learning-rate
    callback) stopped at the start of training with Lightning's ``LearningRateMonitor``."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import LearningRateMonitor

    from captioner.lit.callbacks import LearningRateLog

    def run(callback, logger=False):
        trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=1, logger=logger,
                            callbacks=[callback], enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0,
                            enable_checkpointing=False, log_every_n_steps=1)
        trainer.fit(Scripted())
        return trainer

    with pytest.raises(MisconfigurationException, match="no logger"):  # the control
        run(LearningRateMonitor())
    with pytest.warns(UserWarning, match="no logger.*learning rates are not logged"):
        trainer = run(LearningRateLog())
    assert trainer.current_epoch == 1  # trained
    # with a logger it logs what LearningRateMonitor logs
    logged = LearningRateLog()
    run(logged, logger=L.pytorch.loggers.CSVLogger(tmp_path))
    assert list(logged.lrs) == ["lr-SGD"] and logged.lrs["lr-SGD"]
    assert set(logged.lrs["lr-SGD"]) == {0.01}
