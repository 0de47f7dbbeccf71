"""Inference sub-commands of ``captioner`` (one module each), registered into
:data:`captioner.cli.TOOLS` on import (``captioner.cli.main`` imports this package), each as
``fn(argv: list[str]) -> exit status``: ``caption``, ``evaluate``, ``visualize``,
``extract-features``, ``translate``.

Exit status: 0 success; 1 some inputs could not be read (the others are still processed);
2 usage errors, an unusable checkpoint or data config. Expected failures print one line per
problem on stderr and never a traceback.
"""

from captioner.commands import caption, evaluate, extract_features, translate, visualize

__all__ = ["caption", "evaluate", "extract_features", "translate", "visualize"]
