"""What captioner's Lightning modules share (captioning and translation).

* construction from a config dict, as LightningCLI builds them
  (:meth:`CaptionerModule.from_config`);
* checkpoint metadata under ``checkpoint["captioner"]`` (format, task, model config, vocabularies,
  data settings) and the random streams of torch, numpy and Python, so that a checkpoint loads in
  a fresh process from the file alone and resuming continues exactly;
* the decoded outputs of validation / test gathered across ranks (DDP), each example once;
* the REINFORCE terms of hard attention (Section 4.1, Eq. 12), whatever the annotations encode;
* the ``plateau`` learning-rate schedule, stepped with each validation's score.

Plain ``nn.Module``s never import this: only the Lightning wrappers do.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from captioner.atomic import aside_name
from captioner.config import NON_NEGATIVE, POSITIVE, check_ranges, instantiate, plain
from captioner.decoder import DecoderOutput
from captioner.inference import CHECKPOINT_FORMAT, CHECKPOINT_KEY, CheckpointError
from captioner.lit.loggers import ResumableCSVLogger
from captioner.losses import attention_entropy, reinforce_surrogate, sentence_log_likelihood

log = logging.getLogger(__name__)


def datamodule_record(dm: Any) -> dict[str, Any]:
    """How a checkpoint remembers its data module: ``class_path``, ``init_args`` (the
    module's hyperparameters) and ``working_dir``, the folder relative paths among them are
    relative to (:func:`captioner.commands.common.data_config_from_checkpoint` resolves them
    from there when the checkpoint is used elsewhere)."""
    hp = plain(dict(getattr(dm, "hparams", {}) or {}))  # a pathlib.Path root: a string
    return {"class_path": f"{type(dm).__module__}.{type(dm).__qualname__}",
            "init_args": {k: v for k, v in hp.items() if not k.startswith("_")},
            "working_dir": os.getcwd()}


class CaptionerModule(L.LightningModule):
    """Base of :class:`~captioner.lit.captioning.CaptioningModule` and
    :class:`~captioner.lit.translation.TranslationModule`.

    Subclasses set :attr:`task`, have a ``decoder`` (an
    :class:`~captioner.decoder.AttentionDecoder`) and the hyperparameters ``hard_lambda_r``,
    ``hard_lambda_e`` and ``hard_num_samples``, fill ``self._eval_outputs`` with dicts holding an ``"index"``
    during validation / test, and describe their vocabularies through :meth:`checkpoint_meta`
    and :meth:`restore_meta`.

    Attributes:
        task: the ``"task"`` recorded in checkpoints; loading a checkpoint of another task fails.
        model_config: ``{"class_path", "init_args"}`` the module was built from (set by the CLI
            or :meth:`from_config`), saved in checkpoints.
        data_config: data settings needed at inference (saved in checkpoints).
    """

    task: str = ""
    validation_metrics: tuple[str, ...] = ()
    """The ``val/...`` keys the module logs (without the prefix)."""

    def __init__(self) -> None:
        super().__init__()
        self.model_config: dict[str, Any] | None = None
        self.data_config: dict[str, Any] = {}
        self._eval_outputs: list[dict[str, Any]] = []

    #: option -> (the test a valid value passes, what it must be): :meth:`check_options`
    OPTION_RULES: dict[str, tuple[Any, str]] = {
        "lr": NON_NEGATIVE,
        "encoder_lr": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE,
        "doubly_stochastic": NON_NEGATIVE,
        "plateau_patience": NON_NEGATIVE,
        "plateau_factor": (lambda v: 0 < v < 1, "in (0, 1)"),
        "beam_size": POSITIVE,
        "max_length": POSITIVE,
        "min_length": NON_NEGATIVE,  # 0 and 1 alike: <end> may come first
        "hard_num_samples": POSITIVE,
    }

    def check_options(self) -> None:
        """Refuse, when the module is built, an option value its first optimiser step or search
        would fail on (a learning rate of ``-1`` failed in the optimiser's constructor with a
        traceback) or that cannot be meant (``min_length`` over ``max_length``).

        Raises:
            captioner.config.ConfigError: naming the option, its value and the valid range.
        """
        from captioner.config import ConfigError

        hp = self.hparams
        rules = dict(self.OPTION_RULES)
        if hp.get("lr_scheduler") != "plateau":  # unused: not checked
            rules.pop("plateau_patience"), rules.pop("plateau_factor")
        check_ranges(type(self).__name__, "model", hp, rules)
        if hp.get("min_length", 1) > hp.get("max_length", 1):
            raise ConfigError(f"{type(self).__name__}: min_length ({hp['min_length']}) must not "
                              f"exceed max_length ({hp['max_length']}): no caption could end")

    @classmethod
    def from_config(cls, init_args: dict[str, Any]) -> "CaptionerModule":
        """Build from a config dict as LightningCLI would (``encoder``/``decoder`` given by
        ``class_path``/``init_args``), remembering the config for checkpoints."""
        path = f"{cls.__module__}.{cls.__qualname__}"
        module = instantiate(path, copy.deepcopy(init_args))
        module.model_config = {"class_path": path, "init_args": plain(init_args)}
        return module

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, map_location: Any = None,
                             hparams_file: str | Path | None = None, strict: bool | None = None,
                             weights_only: bool | None = None, **kwargs: Any) -> "CaptionerModule":
        """Lightning's loader, for captioner's checkpoints (``captioner fit``, or a module built
        with :meth:`from_config`): the module is rebuilt from the model config the checkpoint
        carries (Lightning's own loader rebuilds from ``hyper_parameters`` alone, which cannot
        hold the encoder and decoder the CLI instantiated), offline (no pretrained weights are
        fetched: the checkpoint supplies them), with its weights, vocabularies and data settings.

        Args:
            checkpoint_path: the ``.ckpt`` file (a path; file objects are not read).
            map_location: device to move the module to (``"cuda:0"``, a ``torch.device``, a
                CUDA index; ``None``: CPU). Mappings and functions are refused.
            hparams_file: not supported (the checkpoint holds the config); must be ``None``.
            strict: load the state dict strictly (default ``True``).
            weights_only: accepted for Lightning's signature; captioner checkpoints are always
                read with ``weights_only=True`` (they hold no pickled objects).
            **kwargs: init args that replace the stored ones (``beam_size=5``...).

        Raises:
            captioner.inference.CheckpointError: not a captioner checkpoint of this task, or one
                saved by a module built by hand, without a model config.
        """
        from captioner.encoders.backbone import architecture_only
        from captioner.inference import CheckpointError, read_checkpoint

        if hparams_file is not None:
            raise ValueError("captioner checkpoints carry their config: hparams_file is not used")
        if map_location is not None and not isinstance(map_location, (str, int, torch.device)):
            raise ValueError("map_location: give a device (\"cpu\", \"cuda:0\", torch.device); "
                             "the module is built on CPU and moved there")
        if not isinstance(checkpoint_path, (str, Path)):
            raise TypeError("checkpoint_path: give the .ckpt file's path")
        ckpt = read_checkpoint(checkpoint_path, task=cls.task)
        meta = ckpt[CHECKPOINT_KEY]
        if not meta["model_config"].get("init_args"):
            raise CheckpointError(f"{checkpoint_path}: the checkpoint has no model config")
        with architecture_only():
            module = cls.from_config({**meta["model_config"]["init_args"], **kwargs})
        module.restore_meta(meta)
        module.data_config = meta.get("data") or {}
        module.load_state_dict(ckpt["state_dict"], strict=True if strict is None else strict)
        return module.to(map_location) if map_location is not None else module

    # ---------------------------------------------------------------- learning rate
    def plateau_scheduler(self, optimizer: torch.optim.Optimizer, monitor: str) -> dict[str, Any]:
        """``configure_optimizers``' return value with a ``ReduceLROnPlateau`` (mode max, the
        ``plateau_patience`` / ``plateau_factor`` hyperparameters) on ``monitor``.

        The module steps it itself, in :meth:`step_plateau` at the end of each validation, not
        Lightning at the end of the epoch: the checkpoint written after validation then holds
        the stepped scheduler (Lightning skips the step that was due when it resumes from such a
        checkpoint, so a resumed run lost an LR cut), and epochs without validation
        (``check_val_every_n_epoch > 1``) need no metric.
        """
        h = self.hparams
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", patience=h.plateau_patience, factor=h.plateau_factor)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": monitor, "strict": False}}

    def step_plateau(self, score: float) -> None:
        """Step the ``plateau`` scheduler (if any) with this validation's score: while
        fitting, at the validation that ends an epoch (so ``plateau_patience`` counts epochs
        with a fractional ``val_check_interval`` too), or at every validation when validation
        is scheduled in training batches (an integer ``val_check_interval``, or
        ``check_val_every_n_epoch: null``): then the patience counts validations."""
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit":
            return  # a validate() after fit() on the same trainer steps nothing
        by_batches = (trainer.check_val_every_n_epoch is None
                      or isinstance(trainer.val_check_interval, int))
        if not trainer.is_last_batch and not by_batches:
            return  # a validation within the epoch
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(score)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            return  # stepped by step_plateau after each validation
        super().lr_scheduler_step(scheduler, metric)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping (``--trainer.gradient_clip_val``), also for the fused Adam under
        autocast without a gradient scaler (``bf16-mixed``).

        Lightning's mixed-precision plugin refuses to clip for any optimiser that unscales
        gradients inside its step (the fused Adam of :func:`captioner.lit.optim.adam`), scaler or
        not. Only a scaler (``16-mixed`` on CUDA, where the modules use Adam's loop) makes that
        unsafe; without one the gradients are the true float32 gradients, clipped here by the
        plugin's base class, as in a float32 run."""
        plugin = self.trainer.precision_plugin
        if (gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None
                and getattr(optimizer, "_step_supports_amp_scaling", False)):
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---------------------------------------------------------------- run hooks
    def on_fit_start(self) -> None:
        self.check_monitors()
        self.explain_frozen_blocks()

    def on_train_start(self) -> None:
        self._end_frozen_blocks_filter(check=True)
        self._apply_resumed_optimizer_options()
        # a resumed fit continues its metrics.csv; a new one moves an earlier file aside
        self._tell_loggers(self.trainer.global_step if self.trainer.ckpt_path else None)

    def on_validation_start(self) -> None:
        if self.trainer.state.fn != TrainerFn.FITTING:  # `validate`: after the fit's rows
            self._tell_loggers(math.inf)

    def on_test_start(self) -> None:
        self._tell_loggers(math.inf)  # `test`: its rows after the fit's, which are all kept

    def _tell_loggers(self, start: float | None) -> None:
        """Tell a :class:`~captioner.lit.loggers.ResumableCSVLogger` where this run starts."""
        for logger in self.trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                logger.continue_from(start)

    #: the hyperparameters the optimizer's state holds, and the parameter groups they set:
    #: ``lr`` the first group's (the decoder, stages...), ``encoder_lr`` the second's (the
    #: trained backbone), ``weight_decay`` every group's
    OPTIMIZER_HPARAMS = ("lr", "encoder_lr", "weight_decay")

    def _note_resumed_optimizer_options(self, checkpoint: dict[str, Any]) -> None:
        """A fit resumed with ``--model.init_args.lr`` (``encoder_lr``, ``weight_decay``)
        other than the checkpoint's: Lightning then restores the optimizer's state, whose
        parameter groups carry the checkpoint's values, so the new ones had no effect while
        ``hparams.yaml`` and the saved config said they had. They are noted here and applied
        at the start of training (:meth:`_apply_resumed_optimizer_options`)."""
        stored = checkpoint.get("hyper_parameters") or {}
        self._resumed_options = {
            k: (stored[k], self.hparams[k]) for k in self.OPTIMIZER_HPARAMS
            if k in stored and k in self.hparams and stored[k] != self.hparams[k]}

    def _apply_resumed_optimizer_options(self) -> None:
        """Set the restored optimizer's groups to the options noted by
        :meth:`_note_resumed_optimizer_options` (a ``plateau`` schedule goes on from them)."""
        changed = getattr(self, "_resumed_options", None)
        if not changed:
            return
        self._resumed_options = {}
        applied: set[str] = set()
        for optimizer in self.trainer.optimizers:
            for i, group in enumerate(optimizer.param_groups):
                key = "lr" if i == 0 else "encoder_lr"
                if key in changed:
                    group["lr"] = changed[key][1]
                    applied.add(key)
                if "weight_decay" in changed:
                    group["weight_decay"] = changed["weight_decay"][1]
                    applied.add("weight_decay")
        said = ", ".join(f"{k} {new} (the checkpoint's: {old})"
                         for k, (old, new) in changed.items() if k in applied)
        if said:
            rank_zero_info(f"the resumed fit trains with {said}")
        if set(changed) - applied:  # encoder_lr with a frozen backbone: no group takes it
            rank_zero_warn(f"{', '.join(sorted(set(changed) - applied))} given on resume has "
                           "no parameter group to apply to (no trained backbone)")

    def teardown(self, stage: str) -> None:
        self._end_frozen_blocks_filter()  # a fit that stopped before training

    def explain_frozen_blocks(self) -> None:
        """Frozen backbone blocks stay in eval mode (fixed batch-norm statistics, as intended),
        which Lightning reports at the start of training as "Found N module(s) in eval mode
        ... may lead to unexpected behavior": where the modules in eval mode are exactly
        those blocks' modules, that warning is replaced by one line saying so. Any other set
        still warns, also one of the same size: the set is compared here and again at
        ``on_train_start`` (just after Lightning's check), where a set that changed in between
        gets Lightning's warning back. The filter lasts from ``on_fit_start`` to
        ``on_train_start``, so later fits in the process are not affected."""
        encoder = getattr(self, "encoder", None)
        frozen = getattr(encoder, "frozen_blocks", None)
        if not frozen:
            return
        modules = {id(module) for name, block in encoder.body.named_children() if name in frozen
                   for module in block.modules()}
        self._end_frozen_blocks_filter()
        if self._eval_modules() != modules:
            return  # Lightning's warning stands
        self._frozen_blocks_filter = warnings.catch_warnings()
        self._frozen_blocks_filter.__enter__()
        self._frozen_blocks_modules = modules
        warnings.filterwarnings(
            "ignore", message=re.escape(f"Found {len(modules)} module(s) in eval mode at the "
                                        "start of training"))
        if self.trainer.is_global_zero:
            log.info("%d frozen backbone block(s) (%d modules) stay in eval mode: their batch-norm "
                     "statistics are fixed, as intended", len(frozen), len(modules))

    def _eval_modules(self) -> set[int]:
        """The ``id`` of every submodule (this module included) in eval mode."""
        return {id(module) for module in self.modules() if not module.training}

    def _end_frozen_blocks_filter(self, check: bool = False) -> None:
        """End the filter of ``explain_frozen_blocks``; with ``check``, give Lightning's warning
        back if the modules in eval mode are no longer exactly the frozen blocks' but as many."""
        entered = self.__dict__.pop("_frozen_blocks_filter", None)
        modules = self.__dict__.pop("_frozen_blocks_modules", set())
        if entered is None:
            return
        entered.__exit__(None, None, None)
        eval_modules = self._eval_modules()
        if check and eval_modules != modules and len(eval_modules) == len(modules):
            rank_zero_warn(
                f"Found {len(eval_modules)} module(s) in eval mode at the start of training. "
                "This may lead to unexpected behavior during training. If this is intentional, "
                "you can ignore this warning. (captioner: not only the frozen backbone blocks.)",
                category=PossibleUserWarning)

    def check_monitors(self) -> None:
        """Refuse, before the first epoch, a callback (``ModelCheckpoint``, ``EarlyStopping``)
        that monitors a ``val/`` key this module never logs: Lightning would fail only at the
        end of the first validation, after a whole epoch of training. A callback told that the
        key may be missing (``EarlyStopping(strict=False)``) is left alone.

        Raises:
            captioner.config.ConfigError: naming the callback, the key and the valid keys.
        """
        from captioner.config import ConfigError

        logged = [f"val/{k}" for k in self.validation_metrics]
        for callback in self.trainer.callbacks:
            monitor = getattr(callback, "monitor", None)
            if getattr(callback, "strict", True) is False:
                continue
            if isinstance(monitor, str) and monitor.startswith("val/") and monitor not in logged:
                raise ConfigError(
                    f"{type(callback).__name__}(monitor={monitor!r}): a {self.task} model logs "
                    f"{', '.join(logged)}. (A model config file can carry trainer settings, as "
                    "configs/model/multi30k_gru.yaml does with its checkpoints; a checkpoint "
                    "does not, so resuming with --ckpt_path needs that file again.)")

    # ---------------------------------------------------------------- hard attention
    def hard_samples(self) -> int:
        """``M`` of Eq. 12: location sequences sampled per target in this training step (``1``
        outside training or without hard attention)."""
        if not self.training or getattr(self.decoder, "hard", None) is None:
            return 1
        return int(self.hparams.get("hard_num_samples", 1))

    def caption_term_scale(self, targets: torch.Tensor, pad_id: int) -> float:
        """The factor that puts a per-target mean (the doubly stochastic penalty, the REINFORCE
        terms) on the NLL's normaliser, so that every term of the loss is divided by the same
        count: ``1`` with ``loss_reduction: sentence`` (all are means over the ``B`` targets);
        ``B / N_tok`` with ``token``, where the NLL is a mean over the ``N_tok`` target tokens,
        so that the loss is ``sum_b (nll_b + lambda dsr_b + reinforce_b) / N_tok`` and
        ``lambda``, ``lambda_r`` and ``lambda_e`` keep their meaning relative to the likelihood
        whatever the targets' length.

        Args:
            targets: ``(B, T)`` target ids.
            pad_id: padding id.
        """
        if self.hparams.get("loss_reduction", "sentence") != "token":
            return 1.0
        return targets.shape[0] / max(int((targets != pad_id).sum()), 1)  # exact in any dtype

    def add_hard_attention_loss(self, losses: dict[str, torch.Tensor], out: DecoderOutput,
                                targets: torch.Tensor, pad_id: int) -> None:
        r"""Add the REINFORCE part of Eq. 12 to ``losses`` for a training unroll that sampled
        locations: ``losses["loss"]`` grows by it, and the detached ``reinforce``, ``reward``,
        ``baseline`` and ``entropy`` entries are set (nothing when no location was sampled:
        evaluation mode, soft attention).

        ``loss`` is :func:`~captioner.losses.reinforce_surrogate` with the reward
        ``log p(y | s~, a)`` of each target and the baseline ``b`` of the decoder's
        :class:`~captioner.hard_attention.HardAttention`, which is then updated with the
        rewards of the targets that sampled at least one location. The likelihood term of
        Eq. 12 is the ordinary NLL under the sampled locations, which the caller adds.

        Args:
            losses: the caller's losses, with ``"loss"``.
            out: the decoder's training output (``location_log_probs`` and ``sampled`` set).
            targets: ``(B, T)`` target ids.
            pad_id: padding id.

        ``reward`` is the mean over the targets that sampled (NaN if none did), ``baseline``
        the ``b`` used and ``entropy`` the mean ``H[s]``.
        """
        hard = getattr(self.decoder, "hard", None)
        if hard is None or out.location_log_probs is None:
            return
        steps = targets != pad_id  # (B, T)
        reward = sentence_log_likelihood(out.token_logits, targets, pad_id, out.positions)  # (B,)
        log_p_s = (out.location_log_probs * steps).sum(1)  # (B,)
        entropy = attention_entropy(out.alphas, steps)  # (B,)
        sampled = (out.sampled & steps).any(1)  # (B,)
        any_sampled = bool(sampled.any())
        # the mini-batch's mean reward; under DDP the whole batch's, over every rank (each rank
        # would otherwise track its own share, and DDP's buffer broadcast keeps rank 0's alone)
        batch_reward = mean_over_ranks(reward[sampled].detach())  # (1,), or (0,): none sampled
        baseline = hard.baseline.clone()
        if not bool(hard.baseline_started) and batch_reward.numel():
            baseline = batch_reward[0]
        surrogate = reinforce_surrogate(reward, log_p_s, entropy, baseline,
                                        self.hparams.get("hard_lambda_r", 0.1),
                                        self.hparams.get("hard_lambda_e", 0.002))
        hard.update_baseline(batch_reward)
        losses["loss"] = losses["loss"] + self.caption_term_scale(targets, pad_id) * surrogate
        losses.update(reinforce=surrogate.detach(),
                      reward=(reward[sampled].mean().detach() if any_sampled
                              else reward.new_tensor(float("nan"))),
                      baseline=baseline.detach(), entropy=entropy.mean().detach())

    def log_hard_attention(self, losses: dict[str, torch.Tensor], batch_size: int) -> None:
        """Log ``train/reinforce``, ``train/reward``, ``train/baseline``, ``train/entropy``
        when :meth:`add_hard_attention_loss` added them."""
        for key in ("reinforce", "reward", "baseline", "entropy"):
            if key in losses and torch.isfinite(losses[key]):  # reward: NaN if none sampled
                self.log(f"train/{key}", losses[key], batch_size=batch_size)

    # ---------------------------------------------------------------- evaluation outputs
    def on_validation_epoch_start(self) -> None:
        self._eval_outputs = []

    def on_test_epoch_start(self) -> None:
        self._eval_outputs = []

    def results_dir(self) -> Path:
        """Where test results are written: the logger's folder, else the trainer's root. Call it
        on every rank: under DDP ``trainer.log_dir`` broadcasts rank 0's value, a collective
        that a rank-0-only call would leave the other ranks out of (rank 0 then fails or hangs)."""
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    def keep_earlier_results(self, out_dir: Path, names: tuple[str, ...]) -> str | None:
        """Before a test writes ``names`` into ``out_dir``: move an earlier test's files aside
        (``test_metrics.before-N.json``..., one ``N`` for the set, with a warning), since two
        ``captioner test --ckpt_path`` runs of one folder (the last and the best checkpoint)
        would otherwise replace each other's results silently. Returns the checkpoint this
        test scores (``trainer.ckpt_path``, ``None`` for the model in memory), which the
        metrics file records."""
        earlier = [out_dir / name for name in names if (out_dir / name).exists()]
        if earlier:
            n = 1
            while any((out_dir / aside_name(name, n)).exists() for name in names):
                n += 1
            for path in earlier:
                os.replace(path, out_dir / aside_name(path.name, n))
            rank_zero_warn(f"{out_dir}: an earlier test's {', '.join(p.name for p in earlier)} "
                           f"moved aside as {aside_name(earlier[0].name, n)}...")
        ckpt = self.trainer.ckpt_path
        if not ckpt:
            return None
        return str(ckpt) if "://" in str(ckpt) else str(Path(ckpt).resolve())  # a URL as given

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
        if self.model_config is None and not getattr(self, "_warned_no_config", False):
            import warnings

            self._warned_no_config = True
            warnings.warn(
                f"{type(self).__name__} was built by hand, so its checkpoints hold no model "
                "config: captioner's tools and load_from_checkpoint cannot rebuild them. Build it "
                f"with {type(self).__name__}.from_config(init_args) (encoder and decoder as "
                "class_path / init_args dicts, as in YAML) or through `captioner fit`.",
                stacklevel=2)
        from captioner.data.samplers import run_seed

        checkpoint[CHECKPOINT_KEY] = {"format": CHECKPOINT_FORMAT, "task": self.task,
                                      "model_config": plain(self.model_config),
                                      "data": self.data_config, "run_seed": run_seed(),
                                      **self.checkpoint_meta()}
        if isinstance(checkpoint.get("datamodule_hyper_parameters"), dict):  # Lightning's copy
            checkpoint["datamodule_hyper_parameters"] = plain(
                checkpoint["datamodule_hyper_parameters"])
        checkpoint["rng_states"] = rng_states()
        per_rank = all_ranks_rng_states(checkpoint["rng_states"])
        if per_rank is not None:
            checkpoint["rng_states_per_rank"] = per_rank

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check that the checkpoint is captioner's and of this task, restore its metadata
        (vocabularies, whose size is checked there, configs, random states), and check that
        its weights fit this module (:meth:`check_weights_fit`): all before Lightning loads
        the weights.

        Raises:
            captioner.inference.CheckpointError: naming the checkpoint file where the trainer
                knows it (``--ckpt_path``).
        """
        where = self._checkpoint_file()
        meta = checkpoint.get(CHECKPOINT_KEY)
        if meta is None:
            raise CheckpointError(f"{where}not a captioner checkpoint (no {CHECKPOINT_KEY!r} "
                                  "entry)")
        task = meta.get("task", "captioning")  # the first captioning checkpoints had no task
        if task != self.task:
            raise CheckpointError(f"{where}a {task} checkpoint cannot be loaded into a "
                                  f"{self.task} module")
        self.restore_meta(meta)  # first: a vocabulary of another size is named as such
        if isinstance(checkpoint.get("state_dict"), dict):  # (sharded strategies keep none)
            self.check_weights_fit(checkpoint["state_dict"], where)
        self.model_config = self.model_config or meta.get("model_config")
        self.data_config = self.resumed_data_config(meta.get("data") or {})
        if "rng_states" in checkpoint:  # resuming continues the random streams exactly
            trainer = self._trainer  # the device it runs on: no CUDA state for a CPU run
            set_rng_states(own_rng_states(checkpoint), cuda=None if trainer is None else
                           trainer.strategy.root_device.type == "cuda")
        self._resume_run_seed(meta.get("run_seed"), where)
        if self._trainer is not None and self._trainer.state.fn == "fit":
            self._note_resumed_optimizer_options(checkpoint)

    def _resume_run_seed(self, stored: int | None, where: str) -> None:
        """A resumed fit keeps the run's seed, which the checkpoint records, where the training
        order is a function of that seed and the epoch: the caption data modules'
        (``order_from_run_seed``, :func:`captioner.data.samplers.run_seed`), and under DDP
        Lightning's distributed sampler's. A fit resumed without ``--seed_everything``
        (Lightning then seeds 0) or with another seed went on in another order, silently.
        ``PL_GLOBAL_SEED`` is set to the stored seed, with a warning where it differed."""
        from captioner.data.samplers import run_seed

        trainer = self._trainer
        if stored is None or trainer is None or trainer.state.fn != "fit":
            return
        if not (getattr(trainer.datamodule, "order_from_run_seed", False)
                or trainer.world_size > 1):
            return  # an order of the data module's own seed (translation's buckets)
        current = run_seed()
        if int(stored) != current:
            rank_zero_warn(f"{where}the resumed run keeps its seed {stored}, not {current}: its "
                           "training order is a function of the run's seed and the epoch "
                           f"(give --seed_everything {stored} to resume without this warning)")
        os.environ["PL_GLOBAL_SEED"] = str(int(stored))

    def _checkpoint_file(self) -> str:
        """``"FILE: "`` of the checkpoint the trainer is restoring (``--ckpt_path``), else ``""``."""
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        return f"{path}: " if path else ""

    def check_weights_fit(self, state: dict[str, Any], where: str = "") -> None:
        """Refuse weights of another shape (or, with ``strict_loading``, other names) than this
        module's: a model option given with ``--ckpt_path`` over the stored model config
        (``--model.init_args.decoder.init_args.hidden_dim 32``) ended in torch's 50-line
        ``load_state_dict`` traceback.

        Raises:
            captioner.inference.CheckpointError: naming up to three differing weights.
        """
        own = self.state_dict()
        problems = [f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} here"
                    for k, v in state.items()
                    if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
        if self.strict_loading:
            problems += [f"{k}: not in the checkpoint" for k in own if k not in state]
            problems += [f"{k}: not in this model" for k in state if k not in own]
        if problems:
            more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
            raise CheckpointError(
                f"{where}the checkpoint's weights do not fit the model as configured "
                f"({'; '.join(problems[:3])}{more}): a model option given with the checkpoint "
                "differs from the model config it stores; give none to use the stored one")

    def resumed_data_config(self, stored: dict[str, Any]) -> dict[str, Any]:
        """The data settings to keep after loading a checkpoint that stores ``stored``: those
        that ``setup`` recorded from this run's data module where it ran first (a fit resumed
        with ``--ckpt_path``, which may read the data otherwise: another ``image_size``...),
        else the stored ones (a module loaded from the file)."""
        return self.data_config or stored


def rng_states() -> dict[str, Any]:
    """The random states of torch (CPU, and the current CUDA device's generator where CUDA is in
    use: dropout and hard attention's sampling draw from it on a GPU; Apple MPS's where it is
    available), numpy and Python, as plain types and tensors only (so that checkpoints load
    with ``torch.load(weights_only=True)``).

    Under DDP the ranks' streams drift apart (dropout over batches of other shapes draws other
    numbers of values), so a checkpoint also keeps every rank's (:func:`all_ranks_rng_states`)
    and each rank restores its own (:func:`own_rng_states`)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(),
              "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
              "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()  # (the current device's)
    if torch.backends.mps.is_available():  # Apple GPUs draw dropout from their own generator
        states["mps"] = torch.mps.get_rng_state()
    return states


def _process_group() -> tuple[int, int] | None:
    """``(rank, world size)`` of the initialised process group, ``None`` without one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.get_rank(), dist.get_world_size()


def all_ranks_rng_states(states: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Every rank's :func:`rng_states` (rank order), gathered from ``states`` of each rank: a
    collective, so every rank must call it (Lightning builds a checkpoint on every rank and
    rank 0 writes it). ``None`` in a single process."""
    group = _process_group()
    if group is None or group[1] == 1:
        return None
    import torch.distributed as dist

    gathered: list[Any] = [None] * group[1]
    dist.all_gather_object(gathered, states)
    return gathered


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean of every rank's ``values`` ``(n,)`` (``n`` may differ between ranks and be 0),
    as ``(1,)``, or ``(0,)`` when no rank has any. A collective under DDP, so every rank must
    call it; ``values.mean()`` in a single process."""
    group = _process_group()
    if group is None or group[1] == 1:
        return values.mean().reshape(1) if values.numel() else values.reshape(0)
    import torch.distributed as dist

    stats = torch.stack([values.sum(), values.new_tensor(float(values.numel()))])  # (2,)
    dist.all_reduce(stats)  # sums over the ranks
    return (stats[:1] / stats[1]) if bool(stats[1] > 0) else values.reshape(0)


def own_rng_states(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The random states this process resumes from: its rank's where the checkpoint has one per
    rank from a run of the same number of processes, else the writer's (rank 0's)."""
    per_rank, group = checkpoint.get("rng_states_per_rank"), _process_group()
    if per_rank is not None and group is not None and len(per_rank) == group[1]:
        return per_rank[group[0]]
    return checkpoint["rng_states"]


def set_rng_states(states: dict[str, Any], cuda: bool | None = None) -> None:
    """Restore what :func:`rng_states` saved. A CUDA state is restored where ``cuda`` (default:
    where CUDA is available), so a run resumed on the CPU does not start CUDA, and a GPU run
    resumed on a CPU cannot repeat its GPU streams."""
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and (torch.cuda.is_available() if cuda is None else cuda):
        torch.cuda.set_rng_state(states["cuda"])  # the current device (each rank's own)
    if "mps" in states and torch.backends.mps.is_available():
        torch.mps.set_rng_state(states["mps"])
