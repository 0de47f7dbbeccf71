"""Rebuild model parts from the configuration stored in a checkpoint (no Lightning).

A checkpoint stores the model's constructor configuration exactly as LightningCLI parsed it
(``class_path`` / ``init_args`` for injected parts), so a fresh process can rebuild the modules
with jsonargparse and load the state dicts: no module is ever pickled.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Mapping
from typing import Any

from jsonargparse import ArgumentParser


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the option and what to give."""


#: the usual ranges of :func:`check_ranges`: (the test a valid value passes, what it must be)
POSITIVE = (lambda v: v >= 1, ">= 1")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")


def check_ranges(owner: str, section: str, values: Mapping[str, Any],
                 rules: Mapping[str, tuple[Any, str]]) -> None:
    """Refuse an option outside its range when a class is built, before a library fails on it
    later with a traceback (torch's DataLoader on ``batch_size: 0``, Adam on ``lr: -1``).

    Args:
        owner: the class, for the message.
        section: the config section of its options (``"data"``, ``"model"``), for the message.
        values: option -> value; ``None`` (an unset optional) and options without a rule pass.
        rules: option -> ``(test, rule)``, e.g. :data:`POSITIVE`.

    Raises:
        ConfigError: naming the class, the option (as ``SECTION.init_args.NAME``), the value and
            the rule.
    """
    for name, (valid, rule) in rules.items():
        value = values.get(name)
        if value is not None and not valid(value):
            raise ConfigError(f"{owner}: {name} must be {rule}, got {value!r} "
                              f"({section}.init_args.{name})")


def plain(obj: Any) -> Any:
    """Recursively turn jsonargparse Namespaces (and tuples) into dicts and lists, and paths
    (``pathlib.Path``, jsonargparse's) into strings, so a config can be stored in a checkpoint
    that loads with ``torch.load(weights_only=True)``."""
    if hasattr(obj, "as_dict"):
        obj = obj.as_dict()
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def import_class(class_path: str) -> type:
    """Import ``"package.module.Class"``; clear error when it does not exist."""
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"cannot import {class_path!r}: {e}") from None


def instantiate(class_path: str, init_args: dict[str, Any]) -> Any:
    """Instantiate ``class_path`` from a (possibly nested) jsonargparse ``init_args`` dict."""
    cls = import_class(class_path)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "obj", fail_untyped=False)
    cfg = parser.parse_object({"obj": init_args})
    return parser.instantiate(cfg).obj


def instantiate_arguments(types: Mapping[str, Any], init_args: Mapping[str, Any]) -> dict[str, Any]:
    """Build some constructor arguments of a module from its stored ``init_args`` (each one a
    ``class_path`` / ``init_args`` dict, typed as in ``types``), as LightningCLI builds them,
    without building the module itself (so no Lightning is imported).

    Args:
        types: argument name -> its type hint in the module's constructor, e.g.
            ``{"encoder": ImageEncoder, "decoder": Callable[[int, int], AttentionDecoder]}``.
        init_args: the module's stored init args; other entries are ignored.

    Returns:
        ``{name: instance or callable}``; ``None`` for an argument ``init_args`` does not give.
    """
    # the arguments as the keyword parameters of a function, read with fail_untyped=False as
    # LightningCLI reads a model's: a user's class with untyped parameters (a score function's
    # ``query_dim, key_dim``) trains there, so its checkpoint must rebuild here too
    # (only the parts given, each required and of its own type: an Optional would turn every
    # refusal into a union report that names neither the key nor the reason)
    given = {name: type_ for name, type_ in types.items() if init_args.get(name)}

    def parts(**kwargs: Any) -> dict[str, Any]:
        return kwargs

    parts.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=type_)
        for name, type_ in given.items()])
    parts.__annotations__ = dict(given)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(parts, None, fail_untyped=False)
    built = parser.instantiate(parser.parse_object({k: init_args[k] for k in given}))
    return {name: getattr(built, name, None) for name in types}

