"""What the ``captioner`` inference commands share: the exit statuses, the one-line
:class:`ToolError`, argument types, the common options (``--ckpt``, ``--beam-size``...), the
wrapper that turns errors into exit statuses, and checkpoint / data-config loading."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import copy
import inspect
import json
import os
import sys
import tempfile
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.messages import one_line

if TYPE_CHECKING:
    from captioner.inference import Captioner

EXIT_OK, EXIT_INPUT_ERROR, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT


class ToolError(Exception):
    """An expected failure: printed as one line, with an exit status."""

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


def int_at_least(minimum: int, name: str) -> Callable[[str], int]:
    """An argparse type: an integer ``>= minimum`` (``name`` for messages)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {name}, got {value}")
        return value

    return parse


positive_int = int_at_least(1, "a positive integer")
non_negative_int = int_at_least(0, "an integer >= 0")


def device_arg(text: str) -> str:
    """A torch device that exists here (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (cpu, cuda, cuda:0...)"
                                         ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has "
                                         f"{torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine")
    return text


def output_folder(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Check, before a command's work starts, that its output folder can be made or written
    in, so that a path that cannot be one (an existing file, a file among its parents, a
    read-only place) is answered at once, not after a whole split has been decoded. Nothing
    is left here (a refused run leaves nothing behind): the test writes and removes a hidden
    probe file in the nearest existing folder, since ``os.access`` answers yes to root
    everywhere.

    Returns:
        The folder.

    Raises:
        ToolError: naming the option and the path (exit status 2).
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ToolError(f"{option} {folder}: a file, not a folder")
    existing = next(p for p in [folder, *folder.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise ToolError(f"{option} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ToolError(f"{option} {folder}: cannot write in {existing}")
    try:  # os.access says yes to root everywhere, also on /proc or a read-only mount
        tempfile.NamedTemporaryFile(dir=existing, prefix=".captioner-probe-").close()
    except OSError as e:
        raise ToolError(f"{option} {folder}: cannot write in {existing} ({e.strerror})") from None
    return folder


def figure_errors(path: str) -> contextlib.AbstractContextManager[None]:
    """Turn the errors of writing a figure (unknown format, bad folder, bad colormap) into a
    one-line :class:`ToolError`."""

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except (OSError, ValueError) as e:
            raise ToolError(f"cannot write the figure {path}: {one_line(e)}") from None

    return guard()


def tool_parser(name: str, description: str) -> argparse.ArgumentParser:
    from captioner.autocast import PRECISIONS

    p = argparse.ArgumentParser(prog=f"captioner {name}", description=description)
    p.add_argument("--ckpt", required=True, help="captioner checkpoint (.ckpt)")
    p.add_argument("--beam-size", type=positive_int, default=None,
                   help="beam size K, 1 = greedy (default: the checkpoint's setting)")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="most decoding steps (default: the checkpoint's setting)")
    p.add_argument("--min-length", type=positive_int, default=None,
                   help="fewest tokens, <end> included: an undertrained model or a wide beam "
                        "may otherwise end at once (default: the checkpoint's setting)")
    p.add_argument("--beam-stop", choices=("k_finished", "exact"), default=None,
                   help="when beam search stops: once K hypotheses ended, or once no alive beam "
                        "can outrank the best ended one (default: the checkpoint's setting)")
    p.add_argument("--device", type=device_arg, default="cpu", help="torch device (default: cpu)")
    p.add_argument("--precision", choices=PRECISIONS, default="32",
                   help="32 (default), or bf16: bfloat16 autocast, about 2x faster on CPUs with "
                        "AVX512-BF16 or AMX (many times slower without), results may differ "
                        "slightly")
    p.add_argument("--compile-search", action="store_true",
                   help="fuse the additive attention's search energies with torch.compile "
                        "(beam search 1.05-1.3x faster on CPU; compiles for seconds first, "
                        "needs a C++ compiler, else runs as without)")
    p.add_argument("--hard-test", choices=("argmax", "expectation"), default=None,
                   help="hard-attention checkpoints: attend to the most probable location "
                        "(argmax) or to the expected context (expectation, as the authors' "
                        "generate_caps.py) at test time (default: the checkpoint's hard_test)")
    return p


def compile_search(args: argparse.Namespace, decoder: Any) -> None:
    """Apply ``--compile-search`` to a loaded decoder (a note where it has no effect)."""
    from captioner.attention import set_compile_search

    if getattr(args, "compile_search", False) and not set_compile_search(decoder):
        print("note: --compile-search: the model has no additive attention; nothing to "
              "compile", file=sys.stderr)


def hard_test(args: argparse.Namespace, decoder: Any) -> None:
    """Apply ``--hard-test`` to a loaded decoder; refused for a decoder without hard attention."""
    rule = getattr(args, "hard_test", None)
    if rule is None:
        return
    hard = getattr(decoder, "hard", None)
    if hard is None:
        raise ToolError(f"--hard-test {rule}: {args.ckpt} has soft attention; the option chooses "
                        "how hard attention (attention_mode: hard) attends at test time")
    hard.test_rule = rule


def _escape_unencodable(error: UnicodeError) -> tuple[bytes, int]:
    """Encoding error handler of the tools' stdout: a surrogate (a byte of a file name that is
    not UTF-8, ``surrogateescape``) becomes that byte again, any other character the encoding
    lacks a backslash escape (``backslashreplace``: ``\\xf1``, ``\\u65e5``)."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    out = b"".join(bytes([ord(ch) - 0xDC00]) if "\udc80" <= ch <= "\udcff"
                   else ch.encode("ascii", "backslashreplace")
                   for ch in error.object[error.start:error.end])
    return out, error.end


#: the ``errors`` of the tools' stdout (:func:`_escape_unencodable`)
OUTPUT_ERRORS = "captioner.output"
codecs.register_error(OUTPUT_ERRORS, _escape_unencodable)


def silence_stdout(stderr: bool = False) -> None:
    """Point ``sys.stdout`` (and with ``stderr``, ``sys.stderr``: ``2>&1 | head``) at
    ``os.devnull`` after its reader went away, so that the interpreter's final flush does not
    fail again."""
    with contextlib.suppress(OSError):
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - open for the rest of the process
        if stderr:
            sys.stderr = open(os.devnull, "w")  # noqa: SIM115


def make_tool(name: str, parse: Callable[[list[str]], argparse.Namespace],
          run: Callable[[argparse.Namespace], int]) -> Callable[[list[str]], int]:
    """Wrap ``run`` so that argparse exits and expected errors become exit statuses: a
    :class:`ToolError` one line and its status, Ctrl-C 130, a closed pipe 0. The tool's
    ``sys.stdout`` writes what its encoding cannot with :data:`OUTPUT_ERRORS` (set for the
    process, as the tools print through it)."""

    def main(argv: list[str]) -> int:
        # a file name that is not valid UTF-8 reaches Python with surrogates: written back as
        # the bytes it had; a character the console cannot show (a Windows code page, ASCII)
        # as a backslash escape: never a UnicodeEncodeError that loses the remaining output
        reconfigure = getattr(sys.stdout, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):
                reconfigure(errors=OUTPUT_ERRORS)
        try:
            args = parse(list(argv))
        except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
            return e.code if isinstance(e.code, int) else EXIT_OK if e.code is None else EXIT_USAGE
        try:
            return run(args)
        except ToolError as e:
            print_error(name, str(e))
            return e.status
        except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (130, as shells do)
            print_error(name, "interrupted")
            return EXIT_INTERRUPTED
        except BrokenPipeError:  # `captioner caption ... | head`
            silence_stdout()
            return EXIT_OK

    main.__name__ = f"{name}_main"
    main.__doc__ = f"``captioner {name} ...``; returns the exit status."
    return main


def print_error(tool: str, message: str) -> None:
    print(f"captioner {tool}: error: {message}", file=sys.stderr)


def load_captioner(args: argparse.Namespace) -> Captioner:
    from captioner.inference import Captioner, CheckpointError

    try:
        captioner = Captioner.from_checkpoint(args.ckpt, device=args.device,
                                              precision=getattr(args, "precision", "32"))
    except CheckpointError as e:
        raise ToolError(str(e)) from None
    if getattr(args, "cells", None):
        captioner.cells = args.cells.replace("-", "_")
    apply_search_options(args, captioner, "caption")
    return captioner


def apply_search_options(args: argparse.Namespace, model: Any, what: str) -> None:
    """The search options of a tool's command line on a loaded ``Captioner`` / ``Translator``
    (``model.search``, ``model.decoder``): ``--beam-stop``, ``--min-length`` (checked against
    the most decoding steps), ``--compile-search``, ``--hard-test``.

    Raises:
        ToolError: a ``min_length`` over ``max_length`` (no ``what`` could end).
    """
    if getattr(args, "beam_stop", None):
        model.search["beam_stop"] = args.beam_stop
    if getattr(args, "min_length", None):
        model.search["min_length"] = args.min_length
    max_length = getattr(args, "max_length", None) or model.search["max_length"]
    if model.search["min_length"] > max_length:
        given = "--min-length" if getattr(args, "min_length", None) else (
            "the checkpoint's min_length")
        raise ToolError(f"{given} {model.search['min_length']} exceeds the most decoding "
                        f"steps ({max_length}; --max-length): no {what} could end")
    compile_search(args, model.decoder)
    hard_test(args, model.decoder)


def add_cells_argument(p: argparse.ArgumentParser) -> None:
    """``--cells``: where the attention cells lie in the image (:class:`Captioner`'s ``cells``)."""
    p.add_argument("--cells", choices=["tile", "receptive-field"], default="tile",
                   help="place attention cell (r, c) as the (r, c) uniform tile of the image, "
                        "as the paper does (default), or at its features' receptive fields' "
                        "centres (ResNets: half a cell up and left of the tile; measured once "
                        "per run, about 0.3 s for ResNet-101)")


def write_json(path: Path, obj: Any) -> None:
    from captioner.atomic import atomic_write
    from captioner.metrics import json_safe

    with atomic_write(path) as f:
        json.dump(json_safe(obj), f, indent=2, ensure_ascii=False, allow_nan=False)


def merged_class_config(files: Sequence[str | Path],
                        section: Callable[[Any], Any]) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of the section ``section(doc)`` picks in each YAML file,
    later files overriding earlier ones (``init_args`` merged key by key; a new ``class_path``
    starts from empty ``init_args``); ``{}`` when no file has one.

    Raises:
        ToolError: unreadable YAML.
    """
    import yaml

    merged: dict[str, Any] = {}
    for file in files:
        try:
            doc = yaml.safe_load(Path(file).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise ToolError(f"{file}: cannot read the config ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
        part = section(doc) if isinstance(doc, dict) else None
        if not isinstance(part, dict):
            continue
        class_path = part.get("class_path", merged.get("class_path"))
        if class_path is None:
            continue
        if class_path != merged.get("class_path"):
            merged = {"class_path": class_path, "init_args": {}}
        merged["init_args"].update(part.get("init_args") or {})
    return merged


def load_data_config(files: Sequence[str | Path]) -> dict[str, Any]:
    """The ``data`` section (``class_path`` / ``init_args``) of YAML config files.

    Each file is either a LightningCLI config with a ``data:`` key or a bare
    ``class_path``/``init_args`` mapping; later files override earlier ones
    (:func:`merged_class_config`).

    Raises:
        ToolError: unreadable YAML or no data section.
    """
    merged = merged_class_config(files, lambda doc: doc.get("data", doc))
    if not merged:
        raise ToolError("no data section (data: class_path/init_args) in "
                        + ", ".join(map(str, files)))
    return merged


def data_config_from_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The data module config a checkpoint remembers, or ``None``.

    Looked up in order: ``ckpt["captioner"]["data"]["datamodule"]`` (``class_path`` /
    ``init_args``); Lightning's ``datamodule_hyper_parameters`` with the ``_class_path`` that
    LightningCLI records; the same hyper-parameters with the class found by the name under which
    Lightning saved the data module's state (a class of :mod:`captioner.data.datamodule`).

    A relative path of captioner's stored config (``annotations: ../data/captions.txt``) is
    relative to the folder the training ran in (its ``working_dir``): where it names nothing
    from here but something from there, it is made to point there.
    """
    import lightning as L

    from captioner.data import datamodule as dm_module

    stored = ((ckpt.get("captioner") or {}).get("data") or {}).get("datamodule")
    if isinstance(stored, dict) and stored.get("class_path"):
        return {"class_path": stored["class_path"],
                "init_args": _from_working_dir(dict(stored.get("init_args") or {}),
                                               stored.get("working_dir"))}
    hparams = ckpt.get("datamodule_hyper_parameters")
    if not isinstance(hparams, dict):
        return None
    class_path = hparams.get("_class_path")
    if class_path is None:
        for name, cls in inspect.getmembers(dm_module, inspect.isclass):
            if issubclass(cls, L.LightningDataModule) and name in ckpt:
                class_path = f"{cls.__module__}.{cls.__qualname__}"
                break
    if class_path is None:
        return None
    return {"class_path": class_path,
            "init_args": {k: v for k, v in hparams.items() if not k.startswith("_")}}


def _from_working_dir(init_args: dict[str, Any], working_dir: str | None) -> dict[str, Any]:
    """``init_args`` with each relative path that exists only under ``working_dir`` (in a
    mapping too: per-split files) joined to it; other values as they are."""
    if not working_dir or os.path.realpath(working_dir) == os.path.realpath(os.getcwd()):
        return init_args

    def resolved(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: resolved(v) for k, v in value.items()}
        if (isinstance(value, str) and value and not os.path.isabs(value)
                and not os.path.exists(value)
                and os.path.exists(os.path.join(working_dir, value))):
            return os.path.join(working_dir, value)
        return value

    return {k: v if k == "format" else resolved(v) for k, v in init_args.items()}


DATA_OVERRIDE = "--data.init_args."


def parse_with_data_overrides(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``p.parse_args(argv)`` that also takes LightningCLI's ``--data.init_args.KEY VALUE`` (or
    ``KEY=VALUE``; ``KEY`` may be dotted, ``splits.test``), as ``captioner fit`` does, into
    ``args.data_overrides``: ``(KEY, text)`` pairs in the order given, applied over the
    ``--config`` files or the checkpoint's stored data config (:func:`requested_data_config`
    reads each text as the option's type wants it)."""
    args, rest = p.parse_known_args(argv)
    overrides: list[tuple[str, str]] = []
    unknown: list[str] = []
    i = 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith(DATA_OVERRIDE):
            unknown.append(item)
            i += 1
            continue
        key, eq, value = item[len(DATA_OVERRIDE):].partition("=")
        if not eq:
            if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                p.error(f"{item} needs a value (or {item}=VALUE)")
            value, i = rest[i + 1], i + 1
        if not key or any(not part for part in key.split(".")):
            p.error(f"{item}: name an option, e.g. {DATA_OVERRIDE}image_root DIR")
        overrides.append((key, value))
        i += 1
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.data_overrides = overrides
    return args


def _override_value(hint: Any, text: str) -> Any:
    """``text`` as LightningCLI reads a command-line value for an option typed ``hint``: kept
    as text where the option takes text (a path, a name: ``my #2``, ``2024-01-05`` and ``no``
    stay as written; ``null`` is ``None`` where the option allows it; ``{...}`` / ``[...]`` a
    mapping or list where it also takes one), else read as YAML (numbers, booleans, lists,
    mappings)."""
    import typing

    import yaml

    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union,
                                                                   types.UnionType) else (hint,)
    if any(o is str or (isinstance(o, type) and issubclass(o, os.PathLike)) for o in options):
        if text == "null" and type(None) in options:
            return None
        containers = {typing.get_origin(o) or o for o in options} & {dict, list}
        if containers and text.lstrip().startswith(("{", "[")):  # str | dict: a mapping given
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                return text
            return value if isinstance(value, tuple(containers)) else text
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _with_overrides(cfg: dict[str, Any], overrides: Sequence[tuple[str, str]],
                    source: str) -> dict[str, Any]:
    """``cfg`` with the ``init_args`` keys of ``overrides`` (dotted: nested) set, in order,
    each value typed by :func:`_override_value` from the class's constructor."""
    import typing

    from captioner.config import import_class

    try:
        hints = typing.get_type_hints(import_class(cfg["class_path"]).__init__)
    except Exception:  # noqa: BLE001 - unresolvable hints (or class: reported when built)
        hints = {}
    cfg = copy.deepcopy(cfg)
    for key, text in overrides:
        *parents, last = key.split(".")
        target = cfg.setdefault("init_args", {})
        for depth, part in enumerate(parents):
            if target.get(part) is None:
                target[part] = {}
            elif not isinstance(target[part], dict):
                raise ToolError(f"{DATA_OVERRIDE}{key}: {'.'.join(parents[:depth + 1])} is "
                                f"{target[part]!r} in {source}, not a mapping")
            target = target[part]
        target[last] = _override_value(hints.get(last) if not parents else None, text)
    return cfg


def stored_data_config(args: argparse.Namespace) -> dict[str, Any] | None:
    """:func:`data_config_from_checkpoint` of ``--ckpt``, read once per run and memory-mapped
    (a checkpoint with a ResNet-101 is ~200 MB, of which the data config needs none of the
    weights; it is needed in several places): a copy."""
    from captioner.inference import read_checkpoint

    if "_stored_data_config" not in vars(args):
        args._stored_data_config = data_config_from_checkpoint(
            read_checkpoint(args.ckpt, mmap=True))
    return copy.deepcopy(args._stored_data_config)


def requested_data_config(args: argparse.Namespace) -> tuple[dict[str, Any], str, bool]:
    """The data config a tool was asked for: ``--config`` files, else the one the checkpoint
    ``--ckpt`` stores, with ``--data.init_args.KEY`` overrides applied; where it came from; and
    whether it is the stored config unchanged."""
    if args.config:
        cfg = load_data_config(args.config)
        source = ", ".join(args.config)
    else:
        cfg = stored_data_config(args)
        source = f"{args.ckpt} (stored data config)"
        if cfg is None:
            raise ToolError(f"{args.ckpt} stores no data config: pass --config data.yaml")
    overrides = getattr(args, "data_overrides", None) or []
    if overrides:
        cfg = _with_overrides(cfg, overrides, source)
        source += " with " + ", ".join(dict.fromkeys(f"{DATA_OVERRIDE}{k}" for k, _ in overrides))
    return cfg, source, not args.config and not overrides


def build_data_module(args: argparse.Namespace) -> tuple[Any, str]:
    """The data module of ``--config`` files, else the one the checkpoint ``--ckpt`` stores
    (either with ``--data.init_args`` overrides), and a description of where its config came
    from. An override of an option the class does not take is refused, also over a stored
    config (whose own unknown options, from an older version of the class, are dropped)."""
    cfg, source, _ = requested_data_config(args)
    overrides = getattr(args, "data_overrides", None) or []
    if overrides and not args.config:  # the stored config's own extras may go; a typo may not
        accepted = _accepted_options(cfg["class_path"], source)
        unknown = sorted({k.split(".")[0] for k, _ in overrides} - accepted) if accepted else []
        if unknown:
            raise ToolError(f"{source}: {cfg['class_path']} has no option "
                            f"{', '.join(unknown)}")
    dm = instantiate_data_config(cfg, source, strict=bool(args.config))
    if not callable(getattr(dm, "records", None)):  # e.g. parallel text: a traceback later
        raise ToolError(f"{source}: {type(dm).__name__} holds no images: this command reads an "
                        "image captioning data config (e.g. configs/data/flickr8k_subset.yaml); "
                        "a translation model is scored by captioner test or captioner "
                        "translate --reference")
    return dm, source


def _accepted_options(class_path: str, source: str) -> set[str] | None:
    """The constructor options of ``class_path`` (``None``: it takes ``**kwargs``)."""
    from captioner.config import import_class

    try:
        params = inspect.signature(import_class(class_path).__init__).parameters
    except Exception as e:  # noqa: BLE001 - import errors: one line
        raise ToolError(f"cannot build the data module from {source}: "
                        f"{one_line(e, 1000)}") from None
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return set(params) - {"self"}


def instantiate_data_config(cfg: dict[str, Any], source: str, strict: bool) -> Any:
    """The data module of ``cfg`` (``class_path`` / ``init_args``).

    Args:
        cfg: the config.
        source: where it comes from, for messages.
        strict: refuse options the class does not take (a misspelt option of a config file
            would silently draw another split); otherwise (a checkpoint's stored config, which
            may hold options of an older version of the class) they are dropped.

    Raises:
        ToolError: the class cannot be imported or built, or (``strict``) an unknown option.
    """
    from captioner.config import import_class, instantiate

    try:
        cls = import_class(cfg["class_path"])
        params = inspect.signature(cls.__init__).parameters
        accepted = set(params) - {"self"}
        # a subclass passing **kwargs on to its base takes what the base takes: not checked
        open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    except Exception as e:  # noqa: BLE001 - jsonargparse / import errors: one line
        raise ToolError(f"cannot build the data module from {source}: "
                        f"{one_line(e, 1000)}") from None
    unknown = sorted(set(cfg["init_args"]) - accepted)
    if unknown and strict and not open_ended:
        raise ToolError(f"{source}: {cls.__name__} has no option {', '.join(unknown)} (its "
                        f"options: {', '.join(sorted(accepted))})")
    init_args = {k: v for k, v in cfg["init_args"].items() if k in accepted or open_ended}
    try:
        return instantiate(cfg["class_path"], init_args)
    except Exception as e:  # noqa: BLE001 - jsonargparse / constructor errors: one line
        raise ToolError(f"cannot build the data module from {source}: "
                        f"{one_line(e, 1000)}") from None


# data options that change how batches are loaded, never which images a split holds
LOADER_OPTIONS = frozenset({"batch_size", "eval_batch_size", "num_workers", "pin_memory",
                            "persistent_workers", "same_length_batches", "verify_cache"})
PATH_OPTIONS = frozenset({"annotations", "image_root", "instances", "vocab_file", "features_dir",
                          "root"})
"""Data options that say where the data is, not how it is split: where the stored config's
paths name nothing (the data moved), its splits are drawn at the given config's paths."""


def training_overlap(stored: dict[str, Any] | None, given: dict[str, Any],
                     records: Sequence[Any], split: str) -> dict[str, Any]:
    """Which of the evaluated ``records`` the checkpoint trained on, where the data config
    ``given`` replaces the one it stores (another ``split_seed`` or other fractions put
    training images in the evaluated split, and the scores are then inflated).

    Only the overlap that the change of config brings counts: an image that the stored config
    already put in both its training split and its ``split`` (annotation files that share
    images, warned of when the data is set up) is in the data itself, and evaluating with the
    stored config would score it too; such images are counted apart (``already_shared``).

    Args:
        stored: the checkpoint's data config (:func:`data_config_from_checkpoint`), or ``None``.
        given: the data config the records were drawn with.
        records: the evaluated split's :class:`~captioner.data.formats.ImageRecord` s.
        split: the evaluated split's name (``"val"`` or ``"test"``).

    Returns:
        ``{"checked": bool, "reason": str, "images": int, "example": str | None}``, plus
        ``already_shared`` (int) where the splits were compared: ``images`` of ``records`` lie
        in the stored config's training split and not in its ``split``; the stored splits are
        drawn from the annotations alone (no image decoded, nothing written).
    """
    from captioner.data.datamodule import ShapesDataModule

    result: dict[str, Any] = {"checked": False, "images": 0, "example": None}
    if stored is None:
        return {**result, "reason": "the checkpoint stores no data config"}

    def split_defining(cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The options that define the splits, defaults filled in (a YAML names a few, a
        checkpoint or a parsed command line all)."""
        from captioner.config import import_class

        try:
            params = inspect.signature(import_class(cfg["class_path"]).__init__).parameters
            defaults = {k: p.default for k, p in params.items()
                        if p.default is not inspect.Parameter.empty}
        except Exception:  # noqa: BLE001 - compared as given; building it reports the error
            defaults = {}
        return cfg["class_path"], {k: v for k, v in {**defaults, **cfg["init_args"]}.items()
                                   if k not in LOADER_OPTIONS}

    if split_defining(given) == split_defining(stored):
        return {**result, "checked": True, "reason": "the same split settings as the checkpoint's"}
    def stored_splits_of(cfg: dict[str, Any]) -> dict[str, Any] | str:
        """The stored settings' ``train`` and ``split`` paths, or why they cannot be read."""
        try:
            stored_dm = instantiate_data_config(cfg, "the checkpoint's data config", strict=False)
            if isinstance(stored_dm, ShapesDataModule):  # reading it would generate it anew
                return "generated data: each split is generated apart"
            splits = stored_dm.split_records()
        except Exception as e:  # noqa: BLE001 - ToolError too: the stored data may be elsewhere
            return f"could not read the checkpoint's training split ({one_line(e)})"
        return {"train": {os.path.realpath(r.path) for r in splits["train"]},
                split: {os.path.realpath(r.path) for r in splits.get(split, ())}}

    read = stored_splits_of(stored)
    where = "compared with the checkpoint's training split"
    moved = {k: v for k, v in given["init_args"].items()
             if k in PATH_OPTIONS and v != stored["init_args"].get(k)}
    if isinstance(read, str) and moved and not read.startswith("generated"):
        # the data moved: the stored split settings, applied to the data where it is now
        read_there = stored_splits_of({**stored, "init_args": {**stored["init_args"], **moved}})
        if not isinstance(read_there, str):
            read = read_there
            where += f" (its settings applied where the data is now: {', '.join(sorted(moved))})"
    if isinstance(read, str):
        return {**result, "reason": read}
    trained, evaluated = read["train"], read[split]
    in_training = [r for r in records if os.path.realpath(r.path) in trained]
    seen = [r for r in in_training if os.path.realpath(r.path) not in evaluated]
    return {"checked": True, "reason": where,
            "images": len(seen), "example": str(seen[0].path) if seen else None,
            "already_shared": len(in_training) - len(seen)}
