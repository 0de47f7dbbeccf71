"""Lightning callbacks of captioner.

:class:`KeepInputConfigs` is LightningCLI's ``SaveConfigCallback`` that never writes over one of
the run's own ``--config`` files (``config.yaml`` in the folder the run starts in, with no
logger: ``default_root_dir`` is that folder).

:class:`ResumableCheckpoint` is Lightning's ``ModelCheckpoint`` whose top-k survives a resume.
A resumed ``captioner fit`` logs into a new ``version_N`` folder, so its checkpoint folder
changes; ``ModelCheckpoint`` then forgets the best score so far (it keeps only
``best_model_path``), and the first validation of the resumed run becomes "best" even when it
is worse than an earlier epoch (a ``best-epoch=02.ckpt`` beside the real best, epoch 1, left in
the earlier folder).

:class:`LearningRateLog` is Lightning's ``LearningRateMonitor`` that lets a run without a logger
(``--trainer.logger false``) train, with one warning, instead of stopping it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_warn


class KeepInputConfigs(SaveConfigCallback):
    """Saves the run's whole config as ``SaveConfigCallback`` does (``overwrite`` lets a later
    run replace an earlier run's copy), except over a file the run was configured from: with
    ``--trainer.logger false`` the copy goes to ``default_root_dir``, by default the current
    folder, where ``config.yaml`` may be the user's own; it was replaced by the run's settings
    (command-line overrides and ``ckpt_path`` included, so that running it again resumed).
    The copy is then written as ``config.run.yaml`` beside it, as it is wherever ``config.yaml``
    is a file LightningCLI did not write (the user's, when the run starts from its copy).
    A ``validate`` or ``test`` run whose ``config.yaml`` would replace an earlier run's copy
    (``--trainer.logger false``: the fit's, in the same ``default_root_dir``) writes
    ``config.validate.yaml`` / ``config.test.yaml`` instead, so the fit's settings are kept."""

    input_files: list[Any] | None = None
    """Every ``--config`` file of the run, set by the CLI (the callback's own ``config`` is the
    subcommand's, without the files given before the subcommand); ``None``: those."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.save_to_log_dir and not self.already_saved:
            target = os.path.realpath(os.path.join(trainer.log_dir or ".", self.config_filename))
            stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn
            if stage != "fit" and os.path.exists(target):
                stem, suffix = os.path.splitext(self.config_filename)
                self.config_filename = f"{stem}.{stage}{suffix or '.yaml'}"
                target = os.path.realpath(os.path.join(trainer.log_dir or ".",
                                                       self.config_filename))
            files = self.config.get("config") if self.input_files is None else self.input_files
            inputs = {os.path.realpath(os.fspath(path)) for path in files or []
                      if path is not None}  # None: a config given as a YAML string
            if target in inputs or not _saved_copy_or_absent(target):
                stem, suffix = os.path.splitext(self.config_filename)
                self.config_filename = f"{stem}.run{suffix or '.yaml'}"
                rank_zero_warn(f"{target} is one of this run's --config files or a config "
                               "written by hand: the run's config is saved as "
                               f"{self.config_filename} beside it instead")
                other = os.path.join(os.path.dirname(target), self.config_filename)
                if os.path.realpath(other) in inputs or not _saved_copy_or_absent(other):
                    self.save_to_log_dir = False  # that one is the user's too: no copy
        super().setup(trainer, pl_module, stage)


def _saved_copy_or_absent(path: str) -> bool:
    """Whether ``path`` may be written over: absent, or a copy LightningCLI saved (its first
    line is the ``# lightning.pytorch==<version>`` header); a file without it is the user's
    (run again from ``config.run.yaml``, ``config.yaml`` is no input, but still theirs)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().startswith("# lightning.pytorch==")
    except FileNotFoundError:
        return True
    except (OSError, UnicodeDecodeError):
        return False


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that restores its best scores from a checkpoint written in another
    folder (a resumed run's new ``version_N``), and never deletes a file outside its own folder:
    an epoch is saved only when it beats the best of the whole run, and an earlier run's best
    file stays where it is (``best_model_path`` keeps pointing at it until a better one).

    The state key is ``ModelCheckpoint``'s, so checkpoints written with ``ModelCheckpoint``
    restore into it. Arguments are ``ModelCheckpoint``'s.
    """

    @property
    def state_key(self) -> str:
        return "ModelCheckpoint" + super().state_key.removeprefix(type(self).__qualname__)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("best_model_score", "kth_best_model_path", "kth_value", "best_k_models",
                    "last_model_path"):
            if key in state_dict:
                setattr(self, key, state_dict[key])
        self.best_model_path = state_dict["best_model_path"]

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if self.dirpath is not None and Path(filepath).parent.resolve() != Path(
                self.dirpath).resolve():
            return  # an earlier run's folder: left alone
        super()._remove_checkpoint(trainer, filepath)


class LearningRateLog(LearningRateMonitor):
    """``LearningRateMonitor`` (same arguments) that does nothing, after one warning, in a run
    with no logger: Lightning's raises at the start of training, so the shipped trainer configs
    (which add it) stopped ``captioner fit ... --trainer.logger false`` after building the data
    and the model."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._off = False

    def on_train_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._off = not trainer.loggers
        if self._off:
            rank_zero_warn("the run has no logger (--trainer.logger false): learning rates are "
                           "not logged (LearningRateLog is off)")
            return
        super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if not self._off:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if not self._off:
            super().on_train_epoch_start(trainer, *args, **kwargs)
