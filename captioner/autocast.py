"""Autocast's rule for which tensors it casts, for code that casts once on its behalf.

Autocast casts a floating point tensor to its dtype for a matmul unless it is float64
(``at::autocast::is_eligible``). The decoder casts a few tensors once per unroll or per search
instead of letting autocast cast them at every step (:mod:`captioner.unrolled_linear`,
:meth:`captioner.decoder.AttentionDecoder.frozen_weights`); it follows the same rule, so that a
float64 model under autocast stays float64 as it would without those casts.
"""

from __future__ import annotations

import torch


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would cast ``x`` to for a matmul on its device, or ``None``:
    autocast is off there, or ``x`` is not floating point, or it is float64."""
    device = x.device.type
    if (not torch.is_autocast_enabled(device) or not x.is_floating_point()
            or x.dtype == torch.float64):
        return None
    return torch.get_autocast_dtype(device)
