r"""Adaptive average pooling to a fixed grid, also under deterministic algorithms on a GPU.

PyTorch's adaptive average pooling of an ``h x w`` map to ``H x W`` averages, for output cell
``(i, j)``, the input rows ``[s_i, e_i)`` and columns ``[s_j, e_j)`` with

    s_i = floor(i h / H),    e_i = ceil((i + 1) h / H)

(windows overlap where ``H`` does not divide ``h``, and repeat cells where ``H > h``). It is
linear, so it equals two small matrix products

    a = P_H x P_W^T,    P_H[i, k] = 1 / (e_i - s_i) if s_i <= k < e_i else 0    # (H, h)

CUDA's ``adaptive_avg_pool2d`` backward accumulates with atomics and has no deterministic
implementation: a run with ``torch.use_deterministic_algorithms(True)`` (Lightning's
``deterministic: true``) stops at the first backward pass. :class:`GridPool` then takes the
matrix form, whose backward is two matrix products; otherwise PyTorch's kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def pooling_matrix(n_in: int, n_out: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """``P`` ``(n_out, n_in)``: row ``i`` averages input positions ``[s_i, e_i)``."""
    i = torch.arange(n_out, device=device)
    start = (i * n_in) // n_out  # (n_out,) floor(i n_in / n_out)
    end = -((-(i + 1) * n_in) // n_out)  # (n_out,) ceil((i + 1) n_in / n_out)
    k = torch.arange(n_in, device=device)
    inside = (k >= start[:, None]) & (k < end[:, None])  # (n_out, n_in)
    return inside.to(dtype) / (end - start)[:, None].to(dtype)


def adaptive_avg_pool2d_linear(x: torch.Tensor, size: int | Sequence[int | None]) -> torch.Tensor:
    """Adaptive average pooling of ``x`` ``(B, C, h, w)`` to ``(B, C, H, W)`` by two matrix
    products (module docstring): the values of :func:`F.adaptive_avg_pool2d` up to rounding.
    ``size``: ``H``, or ``(H, W)`` where ``None`` keeps that side."""
    h, w = x.shape[-2:]
    H, W = (size, size) if isinstance(size, int) else size
    H, W = H or h, W or w
    p_h = pooling_matrix(h, H, x.dtype, x.device)  # (H, h)
    p_w = pooling_matrix(w, W, x.dtype, x.device)  # (W, w)
    return p_h @ x @ p_w.T  # (B, C, H, W)


class GridPool(nn.AdaptiveAvgPool2d):
    """Adaptive average pooling to ``output_size = (H, W)``: ``(B, C, h, w) -> (B, C, H, W)``.

    PyTorch's kernel, except while deterministic algorithms are switched on (and autograd
    records), where the matrix form (module docstring) keeps the backward pass deterministic
    on every device.
    """

    fingerprint_name = "AdaptiveAvgPool2d"
    """It computes what :class:`nn.AdaptiveAvgPool2d` does: feature caches fingerprinted with
    that class (:func:`captioner.features.encoder_fingerprint`) stay valid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.are_deterministic_algorithms_enabled() and torch.is_grad_enabled():
            return adaptive_avg_pool2d_linear(x, self.output_size)  # (B, C, H, W)
        return F.adaptive_avg_pool2d(x, self.output_size)  # (B, C, H, W)
