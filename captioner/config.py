"""Rebuild model parts from the configuration stored in a checkpoint (no Lightning).

A checkpoint stores the model's constructor configuration exactly as LightningCLI parsed it
(``class_path`` / ``init_args`` for injected parts), so a fresh process can rebuild the modules
with jsonargparse and load the state dicts: no module is ever pickled.
"""

from __future__ import annotations

import importlib
from typing import Any

from jsonargparse import ArgumentParser


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the option and what to give."""


def plain(obj: Any) -> Any:
    """Recursively turn jsonargparse Namespaces (and tuples) into dicts and lists, so a config
    can be stored in a checkpoint that loads with ``torch.load(weights_only=True)``."""
    if hasattr(obj, "as_dict"):
        obj = obj.as_dict()
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
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
