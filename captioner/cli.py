"""The ``captioner`` command.

* ``captioner fit|validate|test --config ...``: LightningCLI (model, data and trainer from
  composable YAML; the vocabulary size is linked from the data module).
* ``captioner demo``: make the shapes data, train, caption held-out images and draw attention.
* Inference tools (``caption``, ``evaluate``, ``visualize``...): see :data:`TOOLS`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any, Callable

from captioner.messages import one_line  # re only: cheap for every command

LIGHTNING_COMMANDS = ("fit", "validate", "test")  # no predict: `captioner caption` does that


def _cli_class() -> type:
    """The LightningCLI subclass (Lightning is imported lazily: inference tools start fast)."""
    from lightning.pytorch.cli import LightningCLI

    class CaptionerCLI(LightningCLI):
        """LightningCLI with the data -> model vocabulary link and config-carrying checkpoints."""

        _ckpt_meta: dict[str, Any] | None = None

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {k: v for k, v in LightningCLI.subcommands().items()
                    if k in LIGHTNING_COMMANDS}

        def init_parser(self, **kwargs: Any):
            """A parse error prints its message and the ``--help`` tip, not first the 40 lines
            of usage of every Trainer option (jsonargparse's default), which bury it."""
            parser = super().init_parser(**kwargs)
            parser.print_usage = lambda file=None: None
            report = parser.error

            def error(message: str, *args: Any, **kwargs: Any):
                return report(_name_config_lines(message, _RUN.get("args") or []), *args,
                              **kwargs)

            parser.error = error
            return parser

        def add_arguments_to_parser(self, parser) -> None:
            _counts_before_fractions(parser)
            parser.link_arguments("data", "model.init_args.vocab_size",
                                  compute_fn=self._linked_vocab_size, apply_on="instantiate")
            parser.add_argument(
                "--allow_training_images", type=bool, default=False,
                help="test / validate: evaluate even where the data config puts images of the "
                     "--ckpt_path checkpoint's own training split in the evaluated split "
                     "(refused by default: the scores would be inflated)")

        def _linked_vocab_size(self, dm: Any) -> int:
            """``V`` for the model: the data module's, after imposing the checkpoint's
            vocabularies on it when a ``--ckpt_path`` carries them (so that data whose own
            vocabulary would differ, e.g. another ``min_freq``, still tests the checkpoint)."""
            meta = self._ckpt_meta or {}
            vocab, src = meta.get("vocab"), meta.get("src_vocab")
            if meta:
                _check_task(meta.get("task", "captioning"), dm,
                            f"the checkpoint {getattr(self, '_ckpt_read', None) or ''}".rstrip())
            else:
                self._check_model_task(dm)
            stored = ((meta.get("data") or {}).get("datamodule") or {}).get("init_args")
            if stored and hasattr(dm, "check_trained_with"):
                dm.check_trained_with(stored, "the --ckpt_path checkpoint")
            if vocab is not None:
                from captioner.data.vocabulary import Vocabulary

                if src is not None and hasattr(dm, "set_vocabs"):
                    sides = Vocabulary.from_dict(src), Vocabulary.from_dict(vocab)
                    if self.subcommand == "fit" and hasattr(dm, "built_vocabularies"):
                        self._warn_of_another_vocabulary(dm, sides)
                    dm.set_vocabs(*sides)
                elif src is None and hasattr(dm, "set_vocab"):
                    imposed = Vocabulary.from_dict(vocab)
                    if self.subcommand == "fit" and hasattr(dm, "built_vocabulary"):
                        self._warn_of_another_vocabulary(dm, (imposed,))
                    dm.set_vocab(imposed)
            return int(dm.vocab_size)

        def _warn_of_another_vocabulary(self, dm: Any, imposed: tuple[Any, ...]) -> None:
            """A fit resumed on data whose own vocabulary (``min_freq``, ``max_vocab_size`` or
            ``vocab_file``) holds words outside the checkpoint's goes on with the checkpoint's
            (its weights need it): say so, since it usually means other data than the
            checkpoint was trained on, whose new words would train as ``<unk>``. ``imposed``:
            the captioning vocabulary, or translation's source and target ones. The data
            module's own vocabularies are left unbuilt (their coverage check could refuse a
            small fine-tuning set); data that cannot be read here is left to the fit to
            report."""
            import warnings

            from captioner.data.vocabulary import Vocabulary

            try:
                if len(imposed) == 2:  # translation: source and target
                    (src, src_counts), (tgt, tgt_counts) = dm.built_vocabularies(check=False)
                    sides = [("source ", "sources", src, src_counts),
                             ("target ", "targets", tgt, tgt_counts)]
                else:
                    own, counts = dm.built_vocabulary(check=False)
                    if dm.vocab_file is not None:
                        own = Vocabulary.load(dm.vocab_file)
                    sides = [("", "captions", own, counts)]
            except Exception:  # noqa: BLE001 - the fit reads the same data and reports it
                return
            for (side, texts, own, counts), theirs in zip(sides, imposed):
                new = sorted((w for w in own.itos if w not in theirs.stoi),
                             key=lambda w: (-counts[w], w))  # the words the data's own keeps
                if not new:
                    continue
                share = sum(counts[w] for w in new) / sum(counts.values())
                warnings.warn(
                    f"{getattr(self, '_ckpt_read', None) or 'the checkpoint'}: the fit goes on "
                    f"with the checkpoint's {side}vocabulary ({len(theirs)} words), which its "
                    f"weights need; {len(new)} words of this data's training {texts} "
                    f"({share:.1%} of their tokens; most frequent: "
                    f"{', '.join(map(repr, new[:3]))}) are not in it and will be read as "
                    "<unk>. Resuming on other data than the checkpoint was trained on is rarely "
                    "meant", UserWarning, stacklevel=2)

        def _check_model_task(self, dm: Any) -> None:
            """The configured model's task (``captioning`` / ``translation``) against what
            ``dm`` holds (a translation model on image data failed with an AttributeError, a
            captioning model on parallel text with a KeyError in its first training step)."""
            from captioner.config import import_class

            cfg = self.config[self.subcommand] if self.subcommand else self.config
            class_path = getattr(cfg.get("model"), "class_path", None)
            try:
                task = getattr(import_class(class_path), "task", None) if class_path else None
            except ValueError:  # reported by jsonargparse
                return
            if task:
                _check_task(task, dm, f"the model {class_path.rsplit('.', 1)[-1]}")

        def parse_arguments(self, parser, args) -> None:
            argv = sys.argv[1:] if args is None else args
            listed = isinstance(argv, (list, tuple))
            self._model_args = _model_options(argv) if listed else []
            if listed:
                _check_config_files(argv)
            # read before Lightning parses the file, so that a bad file is one clear line
            path = _ckpt_path_option(argv) if listed else None
            if path == "last" and not _gives_model(argv):
                from captioner.config import ConfigError

                raise ConfigError("--ckpt_path last is found from the run's trainer config after "
                                  "parsing, which needs a model config: give the run's model "
                                  "--config, or the checkpoint file (--ckpt_path PATH/last.ckpt)")
            self._ckpt_read = path
            self._ckpt_meta = _checkpoint_meta(path) if path else None
            self._ckpt_model = _saved_model_config(self._ckpt_meta)
            if self._ckpt_meta == {} and not _gives_model(argv):
                from captioner.inference import CheckpointError

                raise CheckpointError(
                    f"{path}: not a captioner checkpoint (it holds no model config or "
                    "vocabulary): only checkpoints written by captioner (captioner fit, or a "
                    "module of captioner.lit trained with a Lightning Trainer) can be read")
            if self._ckpt_model is not None and not _gives_model(argv):
                argv = _with_model_first(list(argv), self._ckpt_model)  # no model YAML needed
            if args is not None or not listed:
                super().parse_arguments(parser, argv if listed else args)
                return
            process_argv = sys.argv  # the command line itself: LightningCLI warns when it is
            sys.argv = [sys.argv[0], *argv]  # also given as args, so hand it over as sys.argv
            try:
                super().parse_arguments(parser, None)
            finally:
                sys.argv = process_argv

        def _parse_ckpt_path(self) -> None:
            """Lightning parses a checkpoint's ``hyper_parameters`` as the model config; those
            of a module trained through the Python API (``CaptioningModule.from_config`` and a
            plain ``Trainer``) carry no ``_class_path`` and fail to parse as a model
            ("Parsing of ckpt_path hyperparameters failed!"). A checkpoint with captioner's
            saved model config needs neither: :meth:`before_instantiate_classes` applies
            that config, which holds every hyperparameter."""
            cfg = self.config[self.config.subcommand] if self.config.get("subcommand") else {}
            parsed = cfg.get("ckpt_path")
            if str(parsed) == "last":  # the file, so that it is read as an explicit path is
                from captioner.config import plain

                parsed = cfg["ckpt_path"] = _last_checkpoint(plain(cfg.get("trainer") or {}),
                                                             self.config.subcommand)
            if str(parsed or "") != str(getattr(self, "_ckpt_read", None) or ""):
                # the value parsed is not the one read before parsing (an option form that
                # _ckpt_path_option does not know): read what the run will use
                self._ckpt_read = parsed
                self._ckpt_meta = _checkpoint_meta(parsed) if parsed else None
                self._ckpt_model = _saved_model_config(self._ckpt_meta)
            if self._ckpt_model is None:
                super()._parse_ckpt_path()

        def before_instantiate_classes(self) -> None:
            """Two fixes before the classes are built.

            * With ``--ckpt_path``, the model is built as the checkpoint was: its model config
              (encoder and decoder included, saved by :mod:`captioner.lit.base`) replaces the
              config files' model section, so that a model trained with
              ``--model.init_args.decoder.init_args.hidden_dim 256`` tests without repeating
              it (and a command line without any model config is given the checkpoint's
              before parsing, in :meth:`parse_arguments`). Lightning itself parses only the
              module's own hyperparameters from the checkpoint, over the whole configuration,
              so that ``captioner test --ckpt_path X --model.init_args.beam_size 5`` would
              silently decode with the checkpoint's beam size: the ``--model...`` options of
              the command line are parsed again on top of both.
            * Translation models also take the source vocabulary size: filled in here from
              the data module when the model class has a ``src_vocab_size`` argument (a link
              would break models without it).
            """
            import inspect

            from captioner.config import import_class, instantiate, plain

            cfg = self.config[self.subcommand] if self.subcommand else self.config
            if self.subcommand and cfg.get("ckpt_path"):
                self._model_from_checkpoint(cfg.ckpt_path)
                if self._model_args:
                    self.config = self.parser.parse_args([self.subcommand, *self._model_args],
                                                         namespace=self.config)
                cfg = self.config[self.subcommand]
            model, data = cfg.get("model"), cfg.get("data")
            if model is None or data is None or not getattr(model, "class_path", None):
                return
            params = inspect.signature(import_class(model.class_path).__init__).parameters
            if "src_vocab_size" in params and not model.init_args.get("src_vocab_size"):
                saved = (self._ckpt_meta or {}).get("src_vocab")
                if saved is not None:  # the checkpoint's, imposed on the data too
                    model.init_args.src_vocab_size = len(saved["itos"])
                else:
                    dm = instantiate(data.class_path, plain(data.init_args))
                    self._check_model_task(dm)
                    model.init_args.src_vocab_size = int(dm.src_vocab_size)

        def instantiate_trainer(self, **kwargs: Any):
            """The trainer writes its checkpoints atomically
            (:mod:`captioner.lit.checkpoint_io`), and its config copy is told every
            ``--config`` file of the run (:class:`~captioner.lit.callbacks.KeepInputConfigs`:
            it sees only the subcommand's)."""
            from captioner.lit.checkpoint_io import use_atomic_checkpoints

            from captioner.lit.callbacks import KeepInputConfigs

            trainer = super().instantiate_trainer(**kwargs)
            use_atomic_checkpoints(trainer)
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            files = [*(self.config.get("config") or []),  # given before the subcommand too
                     *((cfg.get("config") or []) if self.subcommand else [])]
            for callback in trainer.callbacks:
                if isinstance(callback, KeepInputConfigs):
                    callback.input_files = files
            return trainer

        def _model_from_checkpoint(self, ckpt_path: str) -> None:
            """The checkpoint's saved model config over the parsed one (the vocabulary size
            stays linked from the data module); nothing when it has none."""
            if not self._ckpt_model:
                return
            try:
                self.config = self.parser.parse_object(
                    {self.subcommand: {"model": self._ckpt_model}}, self.config)
            except (SystemExit, Exception) as e:  # jsonargparse exits on a parse error
                import warnings

                warnings.warn(f"{ckpt_path}: its saved model config does not parse with this "
                              f"version of captioner ({one_line(e, 300)}); the model is built "
                              "from the config files instead", stacklevel=2)

        def instantiate_classes(self) -> None:
            import contextlib

            from captioner.encoders.backbone import architecture_only

            # a checkpoint supplies every weight: no pretrained backbone download for nothing
            offline = architecture_only() if self._ckpt_meta else contextlib.nullcontext()
            try:
                with offline:
                    super().instantiate_classes()
            except ValueError as e:  # a constructor refusing a value: one line, exit 2
                from captioner.config import ConfigError

                refused = _constructor_error(e)
                if _input_error(e) is not None or not isinstance(refused, ValueError):
                    raise  # a bug, an OSError, a missing package...: its traceback
                raise ConfigError(f"cannot build the model or data from the config: "
                                  f"{one_line(refused, 1000)}") from e
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            model_cfg = cfg["model"].as_dict() if hasattr(cfg["model"], "as_dict") else dict(
                cfg["model"])
            model_cfg.setdefault("init_args", {})["vocab_size"] = int(self.model.hparams.vocab_size)
            self.model.model_config = model_cfg
            if self.subcommand in ("test", "validate") and self._ckpt_meta:
                self._check_training_overlap(cfg)

        def _check_training_overlap(self, cfg: Any) -> None:
            """``test`` / ``validate`` of a checkpoint with a data config whose split settings
            differ from the stored ones: the evaluated split must not hold training images
            (:func:`captioner.commands.common.training_overlap`); the result goes to the
            module's ``training_images_in_split`` (written to ``test_metrics.json``).

            Raises:
                captioner.config.ConfigError: training images in the split, naming one,
                    unless ``--allow_training_images true``.
            """
            import logging

            import torch

            from captioner.commands.common import data_config_from_checkpoint, training_overlap
            from captioner.config import ConfigError, plain
            from captioner.data.datamodule import ShapesDataModule

            dm = self.datamodule
            if not hasattr(dm, "split_records") or isinstance(dm, ShapesDataModule):
                return  # parallel text (fixed split files) or generated images
            split = "test" if self.subcommand == "test" else "val"
            # read by _checkpoint_meta already: mapped, not read again
            ckpt = torch.load(cfg["ckpt_path"], map_location="cpu", weights_only=True, mmap=True)
            records = dm.split_records()[split]
            overlap = training_overlap(data_config_from_checkpoint(ckpt), plain(cfg["data"]),
                                       records, split)
            self.model.training_images_in_split = overlap
            log = logging.getLogger(__name__)
            if not overlap["checked"]:
                log.warning("%s: not checked against the training split: %s", split,
                            overlap["reason"])
            if not overlap["images"]:
                return
            message = (f"{overlap['images']} of the {len(records)} {split} images are in the "
                       f"checkpoint's training split (e.g. {overlap['example']}): the data "
                       "config's split settings differ from the ones it was trained with")
            if not cfg.get("allow_training_images"):
                raise ConfigError(f"{message}; the scores would be inflated. Give the data "
                                  "config the checkpoint was trained with, or pass "
                                  "--allow_training_images true")
            log.warning("%s", message)

    return CaptionerCLI


def _check_task(task: str, dm: Any, what: str) -> None:
    """Refuse a ``task`` model (``captioning`` / ``translation``) on the other task's data.

    Raises:
        captioner.config.ConfigError: naming ``what`` and the data module's class.
    """
    from captioner.config import ConfigError

    if (task == "translation") != hasattr(dm, "set_vocabs"):
        holds = "captions" if task == "translation" else "parallel text"
        raise ConfigError(f"{what} is a {task} model, but the data module "
                          f"{type(dm).__name__} holds {holds}: give the {task} data config")


LIGHTNING_CHECKPOINT_NAMES = ("last", "best", "hpc")  # ckpt_path values Lightning resolves
SUBCOMMANDS = ("fit", "validate", "test", "predict")  # LightningCLI's


def _last_checkpoint(trainer: dict[str, Any], subcommand: str = "fit") -> str | None:
    """The file ``--ckpt_path last`` means, from the run's ``trainer`` config: the newest
    ``last*.ckpt`` in the folders its checkpoint callbacks write to, which is then read as an
    explicit ``--ckpt_path`` is (model config, vocabulary, checks).

    Those folders are a callback's ``dirpath``, else the logger's: its fixed ``version``'s
    ``checkpoints``, or, without a logger, ``default_root_dir/checkpoints``. A logger with an
    automatic version (the shipped configs) gives every run a new folder: Lightning looked for
    ``last`` only in that new, empty one, warned and trained from scratch (or tested an untrained
    model). The earlier versions' files may be other experiments' (the configs share one logger
    folder), so none is picked: the error lists the newest.

    Returns:
        The file; ``None`` for a ``fit`` whose folder has none yet (a first run: it trains from
        scratch with a warning, as Lightning does, so that ``last`` can be set and forgotten).

    Raises:
        captioner.config.ConfigError: ``validate``/``test`` without a ``last`` checkpoint in
            those folders, or an automatic version (naming the newest candidates of the
            logger's earlier versions; exit status 2).
    """
    import os
    from datetime import datetime
    from pathlib import Path

    from lightning.pytorch.utilities import rank_zero_info

    from captioner.config import ConfigError

    root = Path(trainer.get("default_root_dir") or os.getcwd()).expanduser()
    folders: list[Path] = []  # where this run's `last` is
    versions: list[Path] = []  # the logger's automatic versions: other runs'
    callbacks = trainer.get("callbacks") or []
    callbacks = [callbacks] if isinstance(callbacks, dict) else list(callbacks)
    ckpt_callbacks = [c for c in callbacks
                      if isinstance(c, dict) and "Checkpoint" in str(c.get("class_path", ""))]
    if not ckpt_callbacks and trainer.get("enable_checkpointing") is not False:
        ckpt_callbacks = [{}]  # Lightning's default ModelCheckpoint
    for callback in ckpt_callbacks:
        dirpath = (callback.get("init_args") or {}).get("dirpath")
        if dirpath:
            folders.append(Path(dirpath).expanduser())
            continue
        logger = trainer.get("logger")  # None or True: Lightning's default logger
        if isinstance(logger, list):
            logger = logger[0] if logger else False
        if logger is False:  # no logger: Lightning's default_root_dir/checkpoints
            folders.append(root / "checkpoints")
            continue
        args = (logger.get("init_args") or {}) if isinstance(logger, dict) else {}
        name = args["name"] if "name" in args else "lightning_logs"
        logs = Path(args.get("save_dir") or root).expanduser() / (name or "")
        version = args.get("version")
        if version is None:
            versions.append(logs)
        else:
            folders.append(logs / (version if isinstance(version, str) else f"version_{version}")
                           / "checkpoints")
    folders = list(dict.fromkeys(folders))  # two callbacks may share the logger's folder
    versions = list(dict.fromkeys(versions))
    found = [p for folder in folders for p in folder.glob("last*.ckpt") if p.is_file()]
    if found:
        newest = max(found, key=lambda p: p.stat().st_mtime_ns)
        rank_zero_info(f"--ckpt_path last: {newest}")
        return str(newest)
    if not folders and not versions:
        raise ConfigError("--ckpt_path last: this trainer config writes no checkpoints "
                          "(enable_checkpointing: false, no checkpoint callback); give the "
                          "checkpoint file")
    if folders and not versions and subcommand == "fit":
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"--ckpt_path last: no last checkpoint in {', '.join(map(str, folders))} "
                       "yet: training starts from scratch")
        return None
    earlier = sorted((p for logs in versions for p in logs.glob("version_*/checkpoints/last*.ckpt")
                      if p.is_file()), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    where = ", ".join([*map(str, folders), *(str(v / "version_*") for v in versions)])
    if not earlier:
        named = sorted({p.parents[1].name for logs in versions  # fixed versions' own folders
                        for p in logs.glob("*/checkpoints/last*.ckpt") if p.is_file()})
        fixed = (" (a logger with an automatic version gives every run a new folder: set "
                 "--trainer.logger.init_args.version NAME to resume by `last`"
                 + (f"; fixed versions with a last checkpoint: {', '.join(named)}" if named
                    else "") + ")" if versions else "")
        raise ConfigError(f"--ckpt_path last: no last checkpoint in {where}{fixed}; give the "
                          "checkpoint file (--ckpt_path PATH/last.ckpt)")
    listed = "; ".join(f"{p} ({datetime.fromtimestamp(p.stat().st_mtime):%Y-%m-%d %H:%M})"
                       for p in earlier[:3])
    raise ConfigError(
        "--ckpt_path last: the logger gives this run a new version folder, and the earlier "
        "versions may hold other experiments (Lightning would look only in the new folder and "
        f"train from scratch); give the checkpoint file: the newest are {listed}")


def _checkpoint_meta(ckpt_path: str) -> dict[str, Any] | None:
    """The captioner metadata of a checkpoint file (model config, vocabularies), ``{}`` for a
    checkpoint without it, ``None`` for the names Lightning resolves itself (``last``...).

    Raises:
        captioner.inference.CheckpointError: a missing file, or one that is not a readable
            checkpoint, in one line naming it (:func:`main`: exit status 2).
    """
    from captioner.inference import CHECKPOINT_KEY, load_checkpoint_file

    text = str(ckpt_path)
    if (text in LIGHTNING_CHECKPOINT_NAMES or text.startswith("registry")
            or text.lower() in ("null", "none", "") or "://" in text):
        return None  # Lightning's names, no checkpoint (null overrides a config), remote files
    ckpt = load_checkpoint_file(ckpt_path, mmap=True)
    return dict(ckpt.get(CHECKPOINT_KEY) or {})


def _saved_model_config(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """The model config of :func:`_checkpoint_meta`'s metadata, as ``{class_path, init_args}``
    without ``vocab_size`` (linked from the data module); ``None`` when there is none."""
    model = (meta or {}).get("model_config") or {}
    if not model.get("class_path"):
        return None
    init_args = {k: v for k, v in (model.get("init_args") or {}).items() if k != "vocab_size"}
    return {"class_path": model["class_path"], "init_args": init_args}


def _ckpt_path_option(argv: list[str] | tuple[str, ...]) -> str | None:
    """The checkpoint of ``--ckpt_path V`` or of a config file's ``ckpt_path:`` (a file given
    before the subcommand: its ``test: {ckpt_path: ...}``), whichever comes last in ``argv`` (as
    LightningCLI reads them), or ``None``."""
    from pathlib import Path

    import yaml

    path, args = None, [str(a) for a in argv]
    at = next((i for i, a in enumerate(args) if a in LIGHTNING_COMMANDS
               and (i == 0 or args[i - 1] not in ("--config", "-c"))), None)  # the subcommand
    for i, arg in enumerate(args):
        name, eq, inline = arg.partition("=")
        value = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
        if value is None:
            continue
        if name == "--ckpt_path":
            path = value
        elif name in ("--config", "-c"):
            try:
                loaded = yaml.safe_load(Path(value).read_text())
            except (OSError, yaml.YAMLError):
                continue  # reported by LightningCLI / _check_config_files
            if at is not None and i < at and isinstance(loaded, dict):  # the root parser's
                loaded = loaded.get(args[at])
            if isinstance(loaded, dict) and "ckpt_path" in loaded:  # null resets it
                path = None if loaded["ckpt_path"] is None else str(loaded["ckpt_path"])
    return path


def _config_files(argv: list[str] | tuple[str, ...]) -> list[str]:
    """The files of ``--config F`` / ``-c F`` / ``--config=F`` options, in order."""
    files = []
    for i, arg in enumerate(map(str, argv)):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(str(argv[i + 1]))
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _check_config_files(argv: list[str] | tuple[str, ...]) -> None:
    """A config file that is not valid YAML stops with one line naming it and the place
    (jsonargparse's own message names neither the file nor a useful line).

    Raises:
        captioner.config.ConfigError: naming the file, line and column.
    """
    from pathlib import Path

    import yaml

    from captioner.config import ConfigError

    for path in _config_files(argv):
        if Path(path).is_file():
            try:
                yaml.safe_load(Path(path).read_text())
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                problem = getattr(e, "problem", None) or one_line(e, 300)
                raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None


def _gives_model(argv: list[str] | tuple[str, ...]) -> bool:
    """Whether a command line names a model: ``--model CONFIG|CLASS``, or a config file with a
    ``model`` section (``--model.init_args.X`` alone names none)."""
    from pathlib import Path

    import yaml

    if any(str(a) == "--model" or str(a).startswith("--model=") for a in argv):
        return True
    subcommand = next((str(a) for i, a in enumerate(argv) if str(a) in SUBCOMMANDS
                       and (i == 0 or str(argv[i - 1]) not in ("--config", "-c"))), None)
    for path in _config_files(argv):
        if Path(path).is_file():
            try:
                loaded = yaml.safe_load(Path(path).read_text())
            except (OSError, yaml.YAMLError):
                return True  # let the parser report it
            section = loaded.get(subcommand) if isinstance(loaded, dict) else None
            if isinstance(loaded, dict) and ("model" in loaded or (  # a file given before the
                    isinstance(section, dict) and "model" in section)):  # subcommand: its section
                return True
    return False


def _with_model_first(argv: list[str], model: dict[str, Any]) -> list[str]:
    """``argv`` with the checkpoint's model config given first after the subcommand, so that
    a command line without a model config parses (config files and options given after it
    apply on top). ``model``: :func:`_saved_model_config`'s."""
    import json

    given = json.dumps(model)
    at = next((i for i, a in enumerate(argv) if a in LIGHTNING_COMMANDS), None)
    if at is None:
        return argv
    return [*argv[: at + 1], "--model", given, *argv[at + 1 :]]


INT_OR_FRACTION = ("limit_train_batches", "limit_val_batches", "limit_test_batches",
                   "limit_predict_batches", "val_check_interval", "overfit_batches")
"""Trainer options where an int counts batches and a float is a fraction of them."""


def _counts_before_fractions(parser: Any) -> None:
    """Make the :data:`INT_OR_FRACTION` trainer options read an integer as a count of batches.

    Lightning's signature gives them ``Optional[Union[int, float]]``, which jsonargparse resolves
    as ``Union[float, int, None]`` (Lightning issue #21259): ``limit_val_batches: 1`` became
    ``1.0``, all the batches instead of one, and the config LightningCLI saves or prints said
    ``1.0`` too. The options' type hints are reordered to try ``int`` first; a float such as
    ``0.25`` still parses as a fraction.
    """
    import typing

    for action in getattr(parser, "_actions", ()):
        dest = str(getattr(action, "dest", ""))
        hint = getattr(action, "_typehint", None)
        if not dest.startswith("trainer.") or dest[len("trainer."):] not in INT_OR_FRACTION:
            continue
        args = typing.get_args(hint)
        if int in args and float in args and args.index(float) < args.index(int):
            action._typehint = typing.Union[tuple([int, *[a for a in args if a is not int]])]


def _model_options(argv: list[str] | tuple[str, ...]) -> list[str]:
    """The ``--model...`` options of a command line with their values, in order
    (``--model.init_args.beam_size 5``, ``--model.init_args.beam_size=5``, ``--model X.yaml``)."""
    picked, i = [], 0
    while i < len(argv):
        arg = str(argv[i])
        if arg == "--model" or arg.startswith(("--model.", "--model=")):
            takes_value = "=" not in arg and i + 1 < len(argv)
            picked.extend(map(str, argv[i : i + 1 + takes_value]))
            i += takes_value
        i += 1
    return picked


def lightning_main(args: list[str] | None = None, run: bool = True):
    """Run LightningCLI with captioner's defaults; returns the CLI object."""
    import lightning as L

    from captioner.lit.callbacks import KeepInputConfigs

    process_argv = sys.argv
    # for parse errors: the --config files, relative to this folder (jsonargparse enters a
    # config's own folder while it parses nested sections)
    _RUN["args"] = list(sys.argv[1:] if args is None else args)
    _RUN["cwd"] = os.getcwd()
    if args is not None and list(args) == sys.argv[1:]:
        args = None  # the command line itself (DDP's launcher re-runs sys.argv in each rank)
    elif args is not None:  # given in Python: LightningCLI would warn about sys.argv
        sys.argv = sys.argv[:1]
    try:
        return _cli_class()(
            L.LightningModule, L.LightningDataModule,
            subclass_mode_model=True, subclass_mode_data=True,
            save_config_callback=KeepInputConfigs, save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "captioner", **{  # not Trainer.test's docstring, cut mid-way
                c: {"description": f"captioner {c}: {TOOL_SUMMARIES[c]}"}
                for c in LIGHTNING_COMMANDS}},
            args=args, run=run,
        )
    finally:
        sys.argv = process_argv


def _constructor_error(error: BaseException) -> BaseException:
    """The exception a constructor raised under jsonargparse's wrappers (it re-raises whatever
    a class raises as a ``ValueError`` of its own, "Does not validate against any of the Union
    subtypes"...): the first one down the ``__cause__`` chain not raised inside jsonargparse."""
    seen: set[int] = set()
    while error.__cause__ is not None and id(error) not in seen:
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is None or "jsonargparse" not in tb.tb_frame.f_code.co_filename:
            return error
        error = error.__cause__
    return error


def _name_config_lines(message: str, argv: list[str]) -> str:
    """``message`` of a parse error, led by one line per ``--config`` file and line that it
    blames (jsonargparse names the option, not the file, and buries it in a report of every
    type the section could have been): an option that is not accepted, a ``class_path`` that
    cannot be imported, a value outside an option's ``Literal`` choices. An option of a class
    is looked for in the ``init_args`` of that ``class_path`` only, a dotted one
    (``trainer.max_epoch``) at its path; nothing is added where no file holds it there."""
    import re

    import yaml

    # the class is named before the option (a section's class_path) or after it, in the value
    # jsonargparse quotes (a nested class: "Option 'x' is not accepted. Got value:
    # Namespace(class_path='pkg.Class', ...")
    quoted = [(_quoted_class_path(m[1]), m[0]) for m in re.findall(
        r"Option '([^']+)' is not accepted\. Got value: Namespace\(([^\n]*)", message)]
    # (class_path or None, key, the choices its value is outside of (None: any value), what
    # to say after "FILE line N: ")
    wanted: list[tuple[str | None, str, tuple[Any, ...] | None, str]] = [
        (class_path, key, None, f"option {key.rsplit('.', 1)[-1]!r} is not accepted")
        for class_path, key in [*quoted, *[
            (m[0] or None, m[1]) for m in re.findall(
                r"(?:class_path '([^']+)':\s*)?Option '([^']+)' is not accepted", message)
            if m[0] or m[1] not in {k for _, k in quoted}]]]
    wanted += [(None, key, None, f"option {key.rsplit('.', 1)[-1]!r} is not accepted")
               for key in re.findall(r"does not accept option '([^']+)'", message)]
    wanted += [(m[0] or None, m[1], _literal_choices(m[2]),
                f"{m[1].rsplit('.', 1)[-1]} {m[3]!r} is not one of {m[2]}")
               for m in re.findall(r"(?:class_path '([^']+)':\s*)?Parser key \"([^\"]+)\":\s*"
                                   r"Expected a typing\.Literal\[([^\]]*)\]\. Got value: "
                                   r"([^\n]+?)(?=\. Got value: |\n|$)",
                                   message)]
    unimportable = re.findall(r"(module '[^']+' has no attribute '[^']+'|No module named '[^']+')"
                              r"\. Got value: Namespace\(class_path='([^']+)'", message)
    unimportable += [(m[1], m[0]) for m in re.findall(
        r"Problem with given class_path '([^']+)':\s*(module '[^']+' has no attribute '[^']+'|"
        r"No module named '[^']+')", message)]  # a subclass-mode section's (model, data)
    roots = {}
    here = _RUN.get("cwd") or os.getcwd()  # jsonargparse may be inside a config's folder now
    for file in _config_files(argv):
        try:
            with open(os.path.join(here, os.path.expanduser(file)), encoding="utf-8") as f:
                roots[file] = yaml.compose(f)
        except (OSError, yaml.YAMLError):
            continue
    found: list[str] = []
    for class_path, key, choices, says in dict.fromkeys(wanted):
        hits = _giving(roots, class_path, key, choices)
        if not hits and choices is not None:  # a wrong value wherever an init_args gives it
            hits = _giving(roots, "*", key, choices)  # (an override file without class_path)
        if not hits and class_path is None and "." not in key:  # a class's, its name not
            hits = _giving(roots, "", key, None)  # given: only if unique
            hits = hits if len(hits) == 1 else []
        found += [f"{file} line {node.start_mark.line + 1}: {says}" for file, node in hits]
    for reason, class_path in dict.fromkeys(unimportable):
        found += [f"{file} line {node.start_mark.line + 1}: class_path {class_path!r} cannot be "
                  f"imported ({reason}){_close_names(class_path)}"
                  for file, root in roots.items() for node in _class_path_nodes(root, class_path)]
    return "\n".join([*dict.fromkeys(found), message]) if found else message


def _quoted_class_path(value: str) -> str:
    """The ``class_path`` at the top level of the ``Namespace(...)`` jsonargparse quotes
    (``value``: its text after ``Namespace(``), where it may come after ``init_args`` holding
    nested classes' own; ``"?"`` (a class, but none known) where there is none."""
    import re

    for m in re.finditer(r"class_path='([^']+)'", value):
        before = value[:m.start()]
        if before.count("(") - before.count(")") == 0:
            return m.group(1)
    return "?"


def _giving(roots: dict[str, Any], class_path: str | None, key: str,
            choices: tuple[Any, ...] | None = None) -> list[tuple[str, Any]]:
    """``(file, key node)`` of each place in the config files' YAML ``roots`` that gives
    ``key`` (:func:`_config_key_nodes`), with a value outside ``choices`` if they are said: a
    valid value in one file is not blamed for a wrong one given elsewhere."""
    import yaml

    def outside(node: Any) -> bool:
        try:
            return yaml.safe_load(yaml.serialize(node)) not in choices  # type: ignore[operator]
        except (yaml.YAMLError, TypeError):  # unhashable and the like: not comparable, blamed
            return True

    return [(file, k) for file, root in roots.items()
            for k, v in _config_key_nodes(root, class_path, key)
            if choices is None or outside(v)]


def _literal_choices(listed: str) -> tuple[Any, ...] | None:
    """The values of jsonargparse's ``typing.Literal[...]`` text (``"'none', 'plateau'"``);
    ``None`` where they cannot be read."""
    import ast

    try:
        return tuple(ast.literal_eval(f"[{listed}]"))
    except (ValueError, SyntaxError):
        return None


def _close_names(class_path: str) -> str:
    """``"; did you mean 'pkg.mod.Name'?"`` for a dotted path whose module imports and holds a
    class of a similar name; ``""`` otherwise."""
    import difflib
    import importlib
    import inspect

    module_name, _, name = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - only a hint: any failure to import gives none
        return ""
    classes = [n for n, v in vars(module).items() if inspect.isclass(v) and not n.startswith("_")]
    close = difflib.get_close_matches(name, classes, n=1)
    return f"; did you mean {module_name + '.' + close[0]!r}?" if close else ""


def _yaml_mappings(root: Any) -> Iterator[Any]:
    """Every YAML mapping node under ``root`` (``root`` included), in no particular order."""
    import yaml

    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            yield node
            stack.extend(value for _, value in node.value)


def _child(node: Any, name: str) -> tuple[Any, Any] | None:
    """``(key node, value node)`` of ``name`` in the YAML mapping ``node``; ``None`` if absent
    (or not a mapping)."""
    import yaml

    items = node.value if isinstance(node, yaml.MappingNode) else []
    return next(((k, v) for k, v in items if getattr(k, "value", None) == name), None)


def _class_path_nodes(root: Any, class_path: str) -> list[Any]:
    """The YAML value nodes ``class_path: <class_path>`` anywhere under ``root``."""
    nodes = [hit[1] for mapping in _yaml_mappings(root)
             if (hit := _child(mapping, "class_path")) and hit[1].value == class_path]
    return sorted(nodes, key=lambda n: n.start_mark.line)


def _config_key_nodes(root: Any, class_path: str | None, key: str) -> list[tuple[Any, Any]]:
    """The YAML ``(key node, value node)`` of ``key``: in the ``init_args`` of every mapping
    whose ``class_path`` is ``class_path`` (or ends with it; ``""``: any class; ``"*"``: every
    ``init_args``, with a ``class_path`` or without), else (``None``) at the dotted path
    ``key``."""
    if class_path is None:
        node, hit = root, None
        for part in key.split("."):
            hit = _child(node, part)
            if hit is None:
                return []
            node = hit[1]
        return [hit]
    nodes = []
    for mapping in _yaml_mappings(root):
        named = _child(mapping, "class_path")
        value = getattr(named[1], "value", None) if named else None
        if class_path == "*" or isinstance(value, str) and (
                class_path in ("", value) or class_path.endswith("." + value)):
            init_args = _child(mapping, "init_args")
            found = _child(init_args[1], key) if init_args else None
            nodes += [found] if found else []
    return sorted(nodes, key=lambda kv: kv[0].start_mark.line)


def _demo(argv: list[str]) -> int:
    from captioner.demo import main as demo_main

    return demo_main(argv)


TOOLS: dict[str, Callable[[list[str]], Any]] = {"demo": _demo}


def register_tool(name: str, fn: Callable[[list[str]], Any]) -> None:
    """Add a ``captioner NAME ...`` sub-command (``fn(argv) -> exit status``)."""
    TOOLS[name] = fn


def _load_tools() -> None:
    import importlib

    for module in ("captioner.commands",):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


TOOL_SUMMARIES = {
    "fit": "train (LightningCLI: --config trainer/data/model YAML, --ckpt_path to resume)",
    "validate": "validation metrics of a model or checkpoint (LightningCLI)",
    "test": "COCO-protocol test metrics, captions and metrics files (LightningCLI)",
    "demo": "make the shapes data, train, caption held-out images, draw the attention",
    "caption": "caption image files or folders with a checkpoint",
    "evaluate": "the COCO protocol on a split, with a checkpoint",
    "visualize": "draw where the model looked for each word of an image's caption",
    "translate": "translate sentences with a translation checkpoint",
    "extract-features": "cache a frozen encoder's grids for training without images",
}


def _usage() -> str:
    names = [*LIGHTNING_COMMANDS, *sorted(TOOLS)]
    width = max(map(len, names))
    lines = ["usage: captioner COMMAND [options]   (captioner COMMAND --help for its options)",
             "", "commands:"]
    lines += [f"  {n:<{width}}  {TOOL_SUMMARIES.get(n, '')}".rstrip() for n in names]
    return "\n".join(lines)


#: the arguments of the running Lightning command (``"args"``), for its parse errors
_RUN: dict[str, Any] = {}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _load_tools()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv and argv[0] in TOOLS:
        return int(TOOLS[argv[0]](argv[1:]) or 0)
    if argv and argv[0] not in LIGHTNING_COMMANDS and not argv[0].startswith("-"):
        known = ", ".join([*LIGHTNING_COMMANDS, *sorted(TOOLS)])
        print(f"captioner: unknown command {argv[0]!r}; commands: {known}", file=sys.stderr)
        return 2
    sigint = signal.getsignal(signal.SIGINT)
    try:
        lightning_main(argv)
    except SystemExit as e:
        if e.code == 1 and isinstance(e.__context__, KeyboardInterrupt):
            # Lightning's answer to Ctrl-C: a graceful shutdown, then sys.exit(1) inside its
            # `except KeyboardInterrupt`; an interrupted command exits 130, as the tools do
            from captioner.commands.common import EXIT_INTERRUPTED

            return EXIT_INTERRUPTED
        raise
    except Exception as e:  # noqa: BLE001 - only data errors are answered here, others re-raised
        cause = _input_error(e)
        if cause is None:
            raise
        print(f"captioner {argv[0]}: {cause}", file=sys.stderr)
        return _exit_status(cause)
    finally:  # Lightning ignores SIGINT while it shuts down; not for a caller in Python
        if sigint is not None:  # (None: a handler installed from C, which cannot be restored)
            with contextlib.suppress(ValueError):  # not in the main thread: never changed
                signal.signal(signal.SIGINT, sigint)
    return 0


def _exit_status(error: BaseException) -> int:
    """As the tools answer (``captioner.commands.common``): 1 for data that cannot be read (an
    annotation file, an image, a parallel text file), 2 for a usage or configuration error (a
    config, a checkpoint, a vocabulary, a feature cache that does not fit the run)."""
    from captioner.data.formats import AnnotationError
    from captioner.data.images import ImageLoadError
    from captioner.data.parallel_text import ParallelDataError

    return 1 if isinstance(error, (AnnotationError, ImageLoadError, ParallelDataError)) else 2


def _input_error(error: BaseException) -> BaseException | None:
    """The data or checkpoint error behind ``error``, or ``None``.

    Such errors are captioner's own (:class:`AnnotationError`, :class:`ImageLoadError`...) and
    already name the file and line or field; their traceback only buries that. LightningCLI /
    jsonargparse may have wrapped one (e.g. read while linking the vocabulary size, as the
    ``__cause__`` of a ``ValueError``): only explicit causes (``raise ... from``) are followed,
    so an unrelated error raised while one was being handled keeps its traceback.
    """
    from captioner.config import ConfigError
    from captioner.data.formats import AnnotationError
    from captioner.data.images import ImageLoadError
    from captioner.data.parallel_text import ParallelDataError
    from captioner.data.vocabulary import VocabularyError
    from captioner.features import FeatureCacheError
    from captioner.inference import CheckpointError

    kinds = (AnnotationError, ImageLoadError, ParallelDataError, FeatureCacheError,
             CheckpointError, ConfigError, VocabularyError)
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kinds):
            return error
        seen.add(id(error))
        error = error.__cause__
    return None


if __name__ == "__main__":
    # ``python -m captioner.cli``: this file runs as ``__main__``, but the tools register into
    # the imported ``captioner.cli`` (a second copy of this module), so run that one's main
    from captioner.cli import main as _package_main

    sys.exit(_package_main())
