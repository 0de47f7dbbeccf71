r"""Bilinear sampler whose backward pass is deterministic (the Spatial Transformer's, Eq. 5).

``F.grid_sample`` (bilinear, zero padding, ``align_corners=False``) computes, for each output
pixel with normalised source coordinates ``(x^s, y^s)`` in ``[-1, 1]``, the pixel coordinates

    u = ((x^s + 1) w - 1) / 2,    v = ((y^s + 1) h - 1) / 2

and the sum over the four neighbours ``(m, n)``, ``m in {floor(u), floor(u) + 1}``,
``n in {floor(v), floor(v) + 1}``, of ``U_nm max(0, 1 - |u - m|) max(0, 1 - |v - n|)``
(Jaderberg et al. 2015, Eq. 5), a neighbour outside the map counting as 0.

Its CUDA backward accumulates the gradient of ``U`` with atomics and has no deterministic
implementation: under ``torch.use_deterministic_algorithms(True)`` (Lightning's
``deterministic: true``) an STN model stopped at the first backward pass. :func:`bilinear_sample`
computes the same sum with ``index_select`` on the rows of ``U``, whose backward
(``index_add``) is deterministic on every device; the weights are written as
``(floor(u) + 1 - u)`` and ``(u - floor(u))``, so the gradient with respect to the coordinates
is grid_sample's too.
"""

from __future__ import annotations

import torch


def bilinear_sample(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)``.

    Args:
        x: ``U``, ``(B, C, h, w)``.
        grid: normalised source coordinates ``(x^s, y^s)``, ``(B, h', w', 2)``.

    Returns:
        ``V``, ``(B, C, h', w')``.
    """
    b, c, h, w = x.shape
    _, h_out, w_out, _ = grid.shape
    u = ((grid[..., 0] + 1) * w - 1) / 2  # (B, h', w') pixel column
    v = ((grid[..., 1] + 1) * h - 1) / 2  # (B, h', w') pixel row
    u0, v0 = u.detach().floor(), v.detach().floor()  # (B, h', w')
    rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # (B h w, C) one row per pixel
    first = (torch.arange(b, device=x.device) * (h * w)).view(b, 1, 1)  # (B, 1, 1)
    out = x.new_zeros(b, h_out, w_out, c)  # (B, h', w', C)
    for m, weight_u in ((u0, u0 + 1 - u), (u0 + 1, u - u0)):
        for n, weight_v in ((v0, v0 + 1 - v), (v0 + 1, v - v0)):
            inside = (m >= 0) & (m <= w - 1) & (n >= 0) & (n <= h - 1)  # (B, h', w'); NaN: False
            # outside (and NaN) coordinates read pixel 0 with weight 0 (NaN stays NaN, as in
            # grid_sample): a NaN cast to long would index far outside the map
            index = (first + torch.where(inside, n, 0).long() * w
                     + torch.where(inside, m, 0).long())  # (B, h', w')
            values = rows.index_select(0, index.reshape(-1)).view(b, h_out, w_out, c)
            weight = (weight_u * weight_v * inside).unsqueeze(-1)  # (B, h', w', 1)
            out = out + values * weight.to(values.dtype)
    return out.permute(0, 3, 1, 2)  # (B, C, h', w')
