"""Where the attention grid lies in the image, when a Spatial Transformer moved the view.

Without a view-moving stage, cell ``(r, c)`` of the ``H x W`` attention grid covers pixels
``[c W_img / W, (c + 1) W_img / W) x [r H_img / H, (r + 1) H_img / H)`` of the image: the
uniform-cell reading of the paper's figures (Sec. 5.4 upsamples each map by the network's
stride), and the default (``edges=None`` below). It is exact for backbones whose strided layers
keep the grid centred (VGG, the shapes CNN); ResNet's padded stride-2 layers centre feature
``j`` on input pixel ``32 j`` rather than ``32 j + 15.5`` (the tiles lie half a cell right of
and below the receptive fields), EfficientNet-Lite's "same" padding on ``32 j + 31``. Cell
boundaries at the receptive fields' centres (``edges``: ``(ys (H + 1,), xs (W + 1,))``,
normalised, from :meth:`ImageEncoder.cell_edges
<captioner.encoders.encoder.ImageEncoder.cell_edges>`, :mod:`captioner.encoders.receptive_field`)
place every cell where its features look instead; the functions below take them. A Spatial
Transformer (Jaderberg et al. 2015, Eq. 1) samples its input at

    (x_s, y_s)^T = A_theta (x_t, y_t, 1)^T

for each point ``(x_t, y_t)`` of its output, in normalised coordinates (``-1`` to ``1`` across
the map, pixel centres at ``(2 i + 1) / n - 1``, i.e. ``align_corners=False``). The grid the
decoder attends over is (pooled from) that output, so the cell at grid point ``p`` looked at image
point ``A_theta [p; 1]``; several transformers in sequence compose
(:func:`captioner.encoders.stn.compose_thetas`; :meth:`ImageEncoder.grid_theta`). For a
transformer placed on a feature map rather than the image, the feature map's normalised
coordinates are taken as the image's (the backbone's receptive fields are centred that way up
to padding effects).

This module maps between the two frames with the ``(2, 3)`` matrix ``A`` of one image
(``None`` = the identity): :func:`grid_to_image` for points of the grid, :func:`image_to_grid`
for points of the image (through ``A^{-1}``). Attention correctness
(:func:`captioner.metrics.box_cell_coverage`) and the attention figures
(:func:`captioner.visualize.upsample_attention`) use them.

Shapes: ``P`` points, ``(H, W)`` the attention grid, ``(H_img, W_img)`` the image in pixels.
"""

from __future__ import annotations

import numpy as np


def _as_theta(theta: np.ndarray) -> np.ndarray:
    theta = np.asarray(theta, dtype=np.float64)
    if theta.shape != (2, 3):
        raise ValueError(f"theta must be a (2, 3) affine matrix, got shape {theta.shape}")
    if not np.all(np.isfinite(theta)):
        raise ValueError("theta has non-finite entries")
    return theta


def grid_to_image(points: np.ndarray, theta: np.ndarray | None) -> np.ndarray:
    """Normalised grid points ``(P, 2)`` as ``(x, y)`` -> the image points they looked at."""
    points = np.asarray(points, dtype=np.float64)
    if theta is None:
        return points
    theta = _as_theta(theta)
    return points @ theta[:, :2].T + theta[:, 2]  # (P, 2)


def image_to_grid(points: np.ndarray, theta: np.ndarray | None) -> np.ndarray:
    """Normalised image points ``(P, 2)`` as ``(x, y)`` -> where they appear in the grid.

    A singular ``A`` (a view collapsed to a line or a point) is inverted in the least-squares
    sense (pseudo-inverse), so such a figure is drawn rather than refused.
    """
    points = np.asarray(points, dtype=np.float64)
    if theta is None:
        return points
    theta = _as_theta(theta)
    inverse = np.linalg.pinv(theta[:, :2])  # (2, 2)
    return (points - theta[:, 2]) @ inverse.T  # (P, 2)


def pixel_centres(size: tuple[int, int]) -> np.ndarray:
    """Normalised ``(x, y)`` of every pixel centre of an ``(h, w)`` map, ``(h w, 2)`` row-major."""
    h, w = size
    ys = (2.0 * np.arange(h) + 1.0) / h - 1.0
    xs = (2.0 * np.arange(w) + 1.0) / w - 1.0
    yy, xx = np.meshgrid(ys, xs, indexing="ij")  # (h, w) each
    return np.stack([xx.ravel(), yy.ravel()], -1)  # (h w, 2)


def to_pixels(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Normalised ``(x, y)`` points ``(P, 2)`` -> continuous pixel coordinates ``(x, y)`` of an
    ``(h, w)`` map, pixel ``i`` spanning ``[i, i + 1)``."""
    h, w = size
    points = np.asarray(points, dtype=np.float64)
    return np.stack([(points[:, 0] + 1.0) * w / 2.0, (points[:, 1] + 1.0) * h / 2.0], -1)


Edges = tuple[np.ndarray, np.ndarray]
"""Cell boundaries ``(ys (H + 1,), xs (W + 1,))``, increasing, normalised in the grid's frame."""


def grid_edges(grid: tuple[int, int], edges: Edges | None = None) -> Edges:
    """``edges`` checked against ``grid``, or the uniform tiles' (``None``)."""
    h, w = grid
    if edges is None:
        return np.linspace(-1.0, 1.0, h + 1), np.linspace(-1.0, 1.0, w + 1)
    ys, xs = (np.asarray(e, dtype=np.float64) for e in edges)
    if ys.shape != (h + 1,) or xs.shape != (w + 1,):
        raise ValueError(f"cell edges must be ({h + 1},) and ({w + 1},) for a {h} x {w} grid, "
                         f"got {ys.shape} and {xs.shape}")
    if not (np.all(np.isfinite(ys)) and np.all(np.isfinite(xs))
            and np.all(np.diff(ys) > 0) and np.all(np.diff(xs) > 0)):
        raise ValueError("cell edges must be finite and increasing")
    return ys, xs


def cell_outline(location: int, grid: tuple[int, int], theta: np.ndarray | None,
                 image_size: tuple[int, int], edges: Edges | None = None) -> np.ndarray:
    """The image-pixel corners ``(4, 2)`` as ``(x, y)`` of grid cell ``location`` (``l = r W +
    c``), in order around the cell: a rectangle without ``theta``, a parallelogram with it;
    ``edges``: the cells' boundaries (default: uniform tiles)."""
    h, w = grid
    r, c = divmod(int(location), w)
    ys, xs = grid_edges(grid, edges)
    x0, x1 = xs[c], xs[c + 1]
    y0, y1 = ys[r], ys[r + 1]
    corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    return to_pixels(grid_to_image(corners, theta), image_size)


def encoder_edges(encoder: object) -> Edges | None:
    """The cell boundaries at the receptive fields' centres of an encoder's last forward pass
    (:meth:`ImageEncoder.cell_edges <captioner.encoders.encoder.ImageEncoder.cell_edges>`), or
    ``None`` (an encoder without them: the uniform tiles)."""
    cell_edges = getattr(encoder, "cell_edges", None)
    return None if cell_edges is None else cell_edges()


def encoder_thetas(encoder: object) -> np.ndarray | None:
    """``(B, 2, 3)`` grid-to-image transforms of an encoder's last forward pass, or ``None``.

    ``None`` when the encoder has no ``grid_theta`` (cached features), moved no view, or shows
    several views per cell (then with a warning naming why the attention cannot be placed).
    """
    grid_theta = getattr(encoder, "grid_theta", None)
    if grid_theta is None:
        return None
    try:
        theta = grid_theta()
    except ValueError as e:
        import warnings

        warnings.warn(f"attention is shown on the grid as laid on the image: {e}", stacklevel=2)
        return None
    return None if theta is None else theta.detach().float().cpu().double().numpy()
