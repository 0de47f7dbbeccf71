"""Lightning callbacks of captioner.

:class:`ResumableCheckpoint` is Lightning's ``ModelCheckpoint`` whose top-k survives a resume.
A resumed ``captioner fit`` logs into a new ``version_N`` folder, so its checkpoint folder
changes; ``ModelCheckpoint`` then forgets the best score so far (it keeps only
``best_model_path``), and the first validation of the resumed run becomes "best" even when it
is worse than an earlier epoch (a ``best-epoch=02.ckpt`` beside the real best, epoch 1, left in
the earlier folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


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
