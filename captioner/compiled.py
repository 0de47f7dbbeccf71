"""A function ``torch.compile``\\ d on its first call, run eagerly where compiling fails.

Used for opt-in fused kernels (:class:`captioner.attention.AdditiveAttention`'s
``compile_search``): inductor fuses a chain of elementwise operations and a reduction into one
loop that never writes the intermediate tensors. It needs a C++ compiler on CPU (Triton on
CUDA) and compiles once per process and shape family, so it stays opt-in; where it cannot
compile, one warning says why and the eager function runs from then on, with the same results.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable


class CompiledOrEager:
    """``fn`` compiled with ``torch.compile(fn, **options)`` on the first call; if compiling or
    running the compiled code raises, a ``RuntimeWarning`` names the error once and ``fn``
    runs eagerly for the rest of the process (an error of ``fn`` itself is then raised by the
    eager call, as it would be without compiling).

    Args:
        fn: the function; its arguments are tensors and Python constants.
        options: keyword arguments of ``torch.compile`` (e.g. ``dynamic=True``).
    """

    def __init__(self, fn: Callable[..., Any], **options: Any) -> None:
        self.fn, self.options = fn, options
        self._compiled: Callable[..., Any] | None = None
        self.failed: str | None = None  # why compiling failed, once it has

    def __call__(self, *args: Any) -> Any:
        if self.failed is None:
            try:
                if self._compiled is None:
                    import torch

                    self._compiled = torch.compile(self.fn, **self.options)
                return self._compiled(*args)
            except Exception as e:  # noqa: BLE001 - no compiler, unsupported op, ...: eager
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                self.failed = f"{type(e).__name__}: {first}"
                warnings.warn(f"torch.compile of {self.fn.__name__} failed ({self.failed}); "
                              "running it eagerly", RuntimeWarning, stacklevel=2)
        return self.fn(*args)
