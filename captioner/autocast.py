"""Autocast: its rule for which tensors it casts, for code that casts once on its behalf, and
the ``precision`` setting of inference (:class:`captioner.inference.Captioner`,
:class:`captioner.translate.Translator`, the commands' ``--precision``).

Autocast casts a floating point tensor to its dtype for a matmul unless it is float64
(``at::autocast::is_eligible``). The decoder casts a few tensors once per unroll or per search
instead of letting autocast cast them at every step (:mod:`captioner.unrolled_linear`,
:meth:`captioner.decoder.AttentionDecoder.frozen_weights`); it follows the same rule, so that a
float64 model under autocast stays float64 as it would without those casts.
"""

from __future__ import annotations

import contextlib
import warnings

import torch


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would cast ``x`` to for a matmul on its device, or ``None``:
    autocast is off there, or ``x`` is not floating point, or it is float64."""
    device = x.device.type
    if (not torch.is_autocast_enabled(device) or not x.is_floating_point()
            or x.dtype == torch.float64):
        return None
    return torch.get_autocast_dtype(device)


#: the precisions the inference classes and commands accept (``--precision``)
PRECISIONS = ("32", "bf16")


def check_precision(precision: str | int, device: torch.device | str) -> str:
    """``precision`` itself, checked: one of :data:`PRECISIONS` (the integer ``32`` is read as
    ``"32"``); ``"bf16"`` on a CPU without native bf16 (no AVX512-BF16 / AMX, where bf16
    matmuls are emulated, many times slower than float32) is accepted with a warning.

    Raises:
        ValueError: another value, named with the allowed ones.
    """
    if isinstance(precision, int) and not isinstance(precision, bool):
        precision = str(precision)  # as Lightning's ``precision: 32``
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if (precision == "bf16" and torch.device(device).type == "cpu"
            and not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        warnings.warn("precision bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX): "
                      "many times slower than float32 here", stacklevel=2)
    return precision


def inference_autocast(device: torch.device, precision: str
                       ) -> contextlib.AbstractContextManager[None]:
    """Autocast in bfloat16 on ``device`` for ``precision`` ``"bf16"``: the matmuls and
    convolutions of the encoder and the decoder run in bf16, and the elementwise operations on
    their outputs (the attention softmax, the LSTM cell) follow in bf16; the output
    log-softmax and the search scores are float32. Nothing for ``"32"``."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
