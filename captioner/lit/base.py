"""What captioner's Lightning modules share (captioning and translation).

* construction from a config dict, as LightningCLI builds them
  (:meth:`CaptionerModule.from_config`);
* checkpoint metadata under ``checkpoint["captioner"]`` (format, task, model config, vocabularies,
  data settings) and the random streams of torch, numpy and Python, so that a checkpoint loads in
  a fresh process from the file alone and resuming continues exactly;
* the decoded outputs of validation / test gathered across ranks (DDP), each example once.

Plain ``nn.Module``s never import this: only the Lightning wrappers do.
"""

from __future__ import annotations

import copy
import random
from typing import Any

import lightning as L
import numpy as np
import torch

from captioner.config import instantiate, plain
from captioner.inference import CHECKPOINT_FORMAT, CHECKPOINT_KEY


class CaptionerModule(L.LightningModule):
    """Base of :class:`~captioner.lit.captioning.CaptioningModule` and
    :class:`~captioner.lit.translation.TranslationModule`.

    Subclasses set :attr:`task`, fill ``self._eval_outputs`` with dicts holding an ``"index"``
    during validation / test, and describe their vocabularies through :meth:`checkpoint_meta`
    and :meth:`restore_meta`.

    Attributes:
        task: the ``"task"`` recorded in checkpoints; loading a checkpoint of another task fails.
        model_config: ``{"class_path", "init_args"}`` the module was built from (set by the CLI
            or :meth:`from_config`), saved in checkpoints.
        data_config: data settings needed at inference (saved in checkpoints).
    """

    task: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.model_config: dict[str, Any] | None = None
        self.data_config: dict[str, Any] = {}
        self._eval_outputs: list[dict[str, Any]] = []

    @classmethod
    def from_config(cls, init_args: dict[str, Any]) -> "CaptionerModule":
        """Build from a config dict as LightningCLI would (``encoder``/``decoder`` given by
        ``class_path``/``init_args``), remembering the config for checkpoints."""
        path = f"{cls.__module__}.{cls.__qualname__}"
        module = instantiate(path, copy.deepcopy(init_args))
        module.model_config = {"class_path": path, "init_args": plain(init_args)}
        return module

    # ---------------------------------------------------------------- evaluation outputs
    def on_validation_epoch_start(self) -> None:
        self._eval_outputs = []

    def on_test_epoch_start(self) -> None:
        self._eval_outputs = []

    def _gather_outputs(self) -> list[dict[str, Any]]:
        """All ranks' decoded outputs, each example once, ordered by index."""
        outputs = self._eval_outputs
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, outputs)
            outputs = [o for part in gathered for o in part]
        unique = {o["index"]: o for o in outputs}  # the distributed sampler may pad with repeats
        return [unique[i] for i in sorted(unique)]

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_meta(self) -> dict[str, Any]:
        """Task-specific entries of the checkpoint metadata (vocabularies...)."""
        return {}

    def restore_meta(self, meta: dict[str, Any]) -> None:
        """Restore the task-specific entries written by :meth:`checkpoint_meta`."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"format": CHECKPOINT_FORMAT, "task": self.task,
                                      "model_config": plain(self.model_config),
                                      "data": self.data_config, **self.checkpoint_meta()}
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(CHECKPOINT_KEY)
        if meta is None:
            raise ValueError(f"not a captioner checkpoint (no {CHECKPOINT_KEY!r} entry)")
        task = meta.get("task", "captioning")  # the first captioning checkpoints had no task
        if task != self.task:
            raise ValueError(f"a {task} checkpoint cannot be loaded into a {self.task} module")
        self.restore_meta(meta)
        self.model_config = self.model_config or meta.get("model_config")
        self.data_config = meta.get("data") or {}
        if "rng_states" in checkpoint:  # resuming continues the random streams exactly
            set_rng_states(checkpoint["rng_states"])


def rng_states() -> dict[str, Any]:
    """The random states of torch, numpy and Python, as plain types and tensors only (so that
    checkpoints load with ``torch.load(weights_only=True)``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate()}


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` saved."""
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
