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
    """``fn`` compiled with ``torch.compile(fn, **options)`` on the first call.

    Where the compiled call raises, ``fn`` runs eagerly on the same arguments: if that raises
    too, the error is the arguments' (a shape mismatch, out of memory) and is raised, compiling
    staying on; otherwise compiling failed (no C++ compiler, no Triton, an unsupported op), a
    ``RuntimeWarning`` says why once, and calls on that device and dtype run eagerly from then
    on (``failed`` maps ``(device type, dtype)`` of the first tensor argument to the reason).

    Args:
        fn: the function; its arguments are tensors and Python constants.
        options: keyword arguments of ``torch.compile`` (e.g. ``dynamic=True``).
    """

    def __init__(self, fn: Callable[..., Any], **options: Any) -> None:
        self.fn, self.options = fn, options
        self._compiled: Callable[..., Any] | None = None
        self.failed: dict[tuple[str, Any] | None, str] = {}

    def __call__(self, *args: Any) -> Any:
        key = _key(args)
        if key in self.failed:
            return self.fn(*args)
        try:
            if self._compiled is None:
                import torch

                self._compiled = torch.compile(self.fn, **self.options)
            return self._compiled(*args)
        except Exception as e:  # noqa: BLE001 - no compiler, unsupported op, ...: eager
            out = self.fn(*args)  # raises where the arguments are at fault
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            self.failed[key] = f"{type(e).__name__}: {first}"
            warnings.warn(f"torch.compile of {self.fn.__name__} failed on {key} "
                          f"({self.failed[key]}); running it eagerly there", RuntimeWarning,
                          stacklevel=2)
            return out


def _key(args: tuple[Any, ...]) -> tuple[str, Any] | None:
    """``(device type, dtype)`` of the first tensor among ``args``, else ``None``."""
    import torch

    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type, a.dtype
    return None
