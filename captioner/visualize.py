"""Attention figures: maps over the image (Xu et al., 2015) and alignment heatmaps.

* :func:`plot_attention` - the "Show, Attend and Tell" figure (Xu et al., 2015, Figures 2-3):
  the image, then one panel per generated word with that step's attention map upsampled and
  smoothed over the image; the gate ``beta`` (Section 4.2.1) in the title and, for hard
  attention, the sampled location outlined.
* :func:`save_attention_maps` / :func:`load_attention_maps` - keep the raw maps next to a
  figure (``.npz``) so figures can be redrawn without re-running the model.
* :func:`plot_alignment` - the source/target heatmap of Bahdanau et al. (2015, Figure 3).
* :func:`plot_stn` - a Spatial Transformer's sampling grid on its input, next to the warped
  output (Jaderberg et al., 2015); :func:`sampling_grid_lines` / :func:`theta_outline` give
  the grid in pixel coordinates.

Figures are drawn on a bare :class:`matplotlib.figure.Figure` rendered by the Agg canvas, so
nothing touches pyplot's global state or the interactive backend, and nothing is ever shown.
Every file is written atomically: to a temporary file in the destination directory (with the
same extension, so the format is unchanged) and then moved into place with ``os.replace``.

Shapes use the package symbols: ``T`` caption length, ``H x W`` attention grid, ``L = H * W``,
``S`` source length; ``H_img x W_img`` is an image's size in pixels.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Polygon
from PIL import Image
from scipy import ndimage

from captioner.atomic import atomic_path
from captioner.data.images import to_rgb
from captioner.grid_frame import (Edges, cell_outline, grid_edges, image_to_grid, pixel_centres,
                                  to_pixels)

# Gaussian smoothing of the upsampled map, in grid cells (Xu et al. used sigma = 20 px for
# 16 px cells with skimage's pyramid_expand; half a cell keeps the cell structure readable).
SMOOTH_SIGMA_CELLS = 0.5
#: :func:`plot_attention`'s panels are at most this many times taller than wide, or wider
#: than tall
MAX_PANEL_ASPECT = 8
#: :func:`plot_attention` upsamples each map to at most this many pixels a side
MAX_MAP_SIDE = 1024

if TYPE_CHECKING:
    import torch


def figure_format(path: str | os.PathLike) -> str:
    """The format a figure written to ``path`` gets (its suffix; none: matplotlib's default),
    checked before anything is drawn.

    Raises:
        IsADirectoryError: ``path`` is a folder.
        ValueError: a suffix matplotlib cannot write, named with the ones it can.
    """
    out = Path(path)
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a folder; give a file name such as "
                                f"{out / 'attention.png'}")
    fmt = out.suffix.lstrip(".").lower() or matplotlib.rcParams["savefig.format"]
    formats = FigureCanvasAgg.get_supported_filetypes()
    if fmt not in formats:
        raise ValueError(f"format {fmt!r} is not supported (supported: "
                         f"{', '.join(sorted(formats))})")
    return fmt


def _save_figure(fig: Figure, path: str | os.PathLike, dpi: int) -> Path:
    out = Path(path)
    fmt = figure_format(out)  # (the temporary file's own suffix would be read otherwise)
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
    return out


def _as_image_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """Return ``(H, W)`` or ``(H, W, 3|4)`` floats in ``[0, 1]`` from a PIL image or array.

    Arrays may be ``(H, W)``, ``(H, W, C)`` or channels-first ``(C, H, W)`` with ``C`` in
    ``{1, 3, 4}``; integer arrays are read as 0..255, float arrays with values above 1 as
    0..255, others are clipped to ``[0, 1]``.
    """
    if isinstance(image, Image.Image):
        if image.mode not in ("L", "RGB", "RGBA"):
            image = to_rgb(image)  # 16-bit, palette, CMYK... as the model saw them
        arr = np.asarray(image)
    else:
        arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # (C, H, W) -> (H, W, C)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W), (H, W, C) or (C, H, W), got {arr.shape}")
    if np.issubdtype(arr.dtype, np.integer) or arr.max(initial=0) > 1.0:
        arr = arr.astype(np.float64) / 255.0
    return np.clip(arr.astype(np.float64), 0.0, 1.0)


def upsample_attention(
    alpha: np.ndarray, image_size: tuple[int, int], smooth: bool = True,
    theta: np.ndarray | None = None, edges: Edges | None = None,
) -> np.ndarray:
    """Upsample one attention map from its grid to the image, cell-aligned.

    Bilinear interpolation with cell centres at their true pixel positions (cell ``(r, c)``
    covers ``[c * W_img / W, (c + 1) * W_img / W) x [r * H_img / H, ...)``), edges held
    constant, then optional Gaussian smoothing with ``sigma = SMOOTH_SIGMA_CELLS`` cells along
    each axis (so non-square cells get an anisotropic kernel).

    With ``theta`` (a Spatial Transformer moved the view, :mod:`captioner.grid_frame`) that map
    is the one of the transformer's output; each image pixel then takes the value at the grid
    point that looked at it (``A^{-1}``), and pixels the view did not show are 0.

    With ``edges`` (the cells' boundaries at their receptive fields' centres,
    :mod:`captioner.grid_frame`) each cell's value sits at the middle of its own boundaries
    instead of the uniform tile's.

    Args:
        alpha: ``(H, W)`` attention weights.
        image_size: ``(H_img, W_img)`` in pixels.
        smooth: apply the Gaussian smoothing.
        theta: optional ``(2, 3)`` transform from the grid to the image.
        edges: optional cell boundaries ``(ys (H + 1,), xs (W + 1,))``, normalised.

    Returns:
        ``(H_img, W_img)`` float array.
    """
    on_grid = _upsample_on_grid(alpha, image_size, smooth, edges)  # (H_img, W_img)
    if theta is None:
        return on_grid
    # on_grid is the map over the transformer's output: read it where each pixel was seen
    where = to_pixels(image_to_grid(pixel_centres(image_size), theta), image_size)
    rows = where[:, 1].reshape(image_size) - 0.5  # pixel i's centre sits at i + 0.5
    cols = where[:, 0].reshape(image_size) - 0.5
    inside = ((rows >= -0.5) & (rows <= image_size[0] - 0.5)
              & (cols >= -0.5) & (cols <= image_size[1] - 0.5))
    up = ndimage.map_coordinates(on_grid, [rows, cols], order=1, mode="nearest")
    return np.where(inside, up, 0.0)


def _interp_matrix(n_out: int, n_in: int, edges: np.ndarray | None = None) -> np.ndarray:
    """``(n_out, n_in)`` linear interpolation weights, cell centres at their pixel positions,
    edges held constant (``map_coordinates(order=1, mode="nearest")`` along one axis); with
    ``edges`` ``(n_in + 1,)`` (normalised) the centres are their midpoints."""
    if edges is None:
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    else:  # each output pixel's centre as a fractional cell index, held at the ends
        centres = (edges[1:] + edges[:-1]) / 2  # (n_in,)
        pos = np.interp((2.0 * np.arange(n_out) + 1.0) / n_out - 1.0, centres,
                        np.arange(n_in, dtype=np.float64))
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = pos - i0
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), i0), 1 - frac)
    np.add.at(m, (np.arange(n_out), i1), frac)
    return m


def _upsample_on_grid(alpha: np.ndarray, image_size: tuple[int, int],
                      smooth: bool, edges: Edges | None = None) -> np.ndarray:
    """:func:`upsample_attention` of a grid laid on the image as it is: bilinear upsampling and
    the Gaussian are both separable and linear, so the map is ``R_y alpha R_x^T``."""
    h, w = alpha.shape
    img_h, img_w = image_size
    if edges is None:
        ry, rx = _interp_matrix(img_h, h), _interp_matrix(img_w, w)
    else:
        ys, xs = grid_edges((h, w), edges)
        ry, rx = _interp_matrix(img_h, h, ys), _interp_matrix(img_w, w, xs)
    if smooth:
        ry = ndimage.gaussian_filter1d(ry, SMOOTH_SIGMA_CELLS * img_h / h, axis=0, mode="nearest")
        rx = ndimage.gaussian_filter1d(rx, SMOOTH_SIGMA_CELLS * img_w / w, axis=0, mode="nearest")
    return ry @ alpha.astype(np.float64) @ rx.T


def _check_alphas(alphas: np.ndarray, grid: tuple[int, int], num_words: int) -> np.ndarray:
    """Return alphas as ``(T, H, W)``; accepts ``(T, L)`` or ``(T, H, W)``."""
    h, w = grid
    alphas = np.asarray(alphas, dtype=np.float64)
    if alphas.ndim == 2 and alphas.shape[1] == h * w:
        alphas = alphas.reshape(-1, h, w)  # (T, L) -> (T, H, W)
    if alphas.ndim != 3 or alphas.shape[1:] != (h, w):
        raise ValueError(f"alphas must be (T, {h * w}) or (T, {h}, {w}), got {alphas.shape}")
    if alphas.shape[0] < num_words:
        raise ValueError(f"{num_words} words but only {alphas.shape[0]} attention maps")
    return alphas[:num_words]


def plot_attention(
    image: Image.Image | np.ndarray,
    words: Sequence[str],
    alphas: np.ndarray,
    grid: tuple[int, int],
    out_path: str | os.PathLike,
    betas: np.ndarray | None = None,
    hard_locations: np.ndarray | None = None,
    smooth: bool = True,
    cols: int = 5,
    title: str | None = None,
    *,
    theta: np.ndarray | None = None,
    edges: Edges | None = None,
    cmap: str = "gray",
    overlay_alpha: float = 0.6,
    dpi: int = 100,
) -> Path:
    """Draw the attention figure of Xu et al. (2015) and save it atomically.

    The first panel is the image; panel ``t + 1`` shows ``words[t]`` as its title and the
    attention map ``alphas[t]`` upsampled to the image (:func:`upsample_attention`; at most
    :data:`MAX_MAP_SIDE` pixels a side, drawn over the image's whole extent), drawn with
    ``cmap`` over the image at opacity ``overlay_alpha``; panels keep within
    :data:`MAX_PANEL_ASPECT`: 1 and 1 : :data:`MAX_PANEL_ASPECT`. Each map is scaled from 0 to
    its own maximum (uniform attention shows as uniformly bright). With ``betas`` the title reads
    ``"word (β=0.83)"``; with ``hard_locations`` the sampled cell is outlined. Any grid
    (``H != W``) and image aspect ratio work.

    Args:
        image: the input image, PIL or array (see :func:`_as_image_array`).
        words: ``(T,)`` generated words, one per attention map.
        alphas: ``(T, L)`` (or ``(T, H, W)``) attention weights, ``L = H * W`` in row-major
            grid order; extra trailing maps are ignored.
        grid: attention grid ``(H, W)``.
        out_path: destination; the extension picks the format (``.png``, ``.pdf``, ...).
        betas: optional ``(T,)`` (or ``(T, 1)``) gating scalars.
        hard_locations: optional ``(T,)`` integer indices into ``L`` of the attended cells
            (hard attention); cell ``l`` is row ``l // W``, column ``l % W``.
        smooth: Gaussian-smooth the upsampled maps.
        cols: panels per row.
        title: optional figure title.
        theta: optional ``(2, 3)`` transform from the grid to the image
            (:attr:`captioner.inference.Caption.grid_theta`): a Spatial Transformer moved the
            view, and each map (and outlined cell) is drawn where that view lay in the image.
        edges: optional cell boundaries ``(ys (H + 1,), xs (W + 1,))``, normalised
            (:attr:`captioner.inference.Caption.cell_edges`): each map and outlined cell is
            drawn at the cells' receptive fields rather than as uniform tiles.
        cmap: matplotlib colormap of the overlay (``"gray"`` as in the paper, or ``"jet"``).
        overlay_alpha: opacity of the attention overlay.
        dpi: resolution of raster outputs.

    Returns:
        The path written.
    """
    img = _as_image_array(image)
    img_h, img_w = img.shape[:2]
    h, w = grid
    t_len = len(words)
    maps = _check_alphas(alphas, grid, t_len)  # (T, H, W)
    if betas is not None:
        betas = np.asarray(betas, dtype=np.float64).reshape(-1)
        if betas.shape[0] < t_len:
            raise ValueError(f"betas must have {t_len} entries, got {betas.shape[0]}")
    if hard_locations is not None:
        hard_locations = np.asarray(hard_locations).reshape(-1).astype(np.int64)
        if hard_locations.shape[0] < t_len or np.any(
            (hard_locations[:t_len] < 0) | (hard_locations[:t_len] >= h * w)
        ):
            raise ValueError(f"hard_locations must be {t_len} indices in [0, {h * w})")

    n_panels = t_len + 1
    n_cols = max(1, min(cols, n_panels))
    n_rows = math.ceil(n_panels / n_cols)
    panel_w = 2.4
    # the panel's height follows the image, within 1:8 and 8:1 (a 3 x 2000 strip would make a
    # figure of 265,000 pixels); imshow keeps the true aspect inside it
    aspect = min(max(img_h / img_w, 1 / MAX_PANEL_ASPECT), MAX_PANEL_ASPECT)
    panel_h = panel_w * aspect + 0.35  # room for the word above each panel
    # the maps are upsampled to at most MAX_MAP_SIDE pixels a side and drawn over the image's
    # own pixel extent (a 6000 x 8000 photo would otherwise take 384 MB per word)
    shrink = min(1.0, MAX_MAP_SIDE / max(img_h, img_w))
    map_size = (max(1, round(img_h * shrink)), max(1, round(img_w * shrink)))
    fig = Figure(figsize=(panel_w * n_cols, panel_h * n_rows + (0.4 if title else 0.0)))
    axes = fig.subplots(n_rows, n_cols, squeeze=False).reshape(-1)
    extent = (0.0, img_w, img_h, 0.0)  # continuous pixel edges: cell edges land exactly
    gray = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0} if img.ndim == 2 else {}

    for ax in axes:
        ax.set_axis_off()
    axes[0].imshow(img, extent=extent, **gray)
    axes[0].set_title("image", fontsize=9)
    for t in range(t_len):
        ax = axes[t + 1]
        ax.imshow(img, extent=extent, **gray)
        up = upsample_attention(maps[t], map_size, smooth, theta, edges)  # map_size
        ax.imshow(up, cmap=cmap, alpha=overlay_alpha, extent=extent,
                  vmin=0.0, vmax=float(up.max()) if up.max() > 0 else 1.0)
        label = words[t] if betas is None else f"{words[t]} (β={betas[t]:.2f})"
        ax.set_title(label, fontsize=9)
        if hard_locations is not None:
            corners = cell_outline(int(hard_locations[t]), (h, w), theta, (img_h, img_w),
                                   edges)
            ax.add_patch(Polygon(corners, closed=True, fill=False, edgecolor="red",
                                 linewidth=1.5))
        ax.set_xlim(0, img_w)
        ax.set_ylim(img_h, 0)
    if title:
        fig.suptitle(title)
    return _save_figure(fig, out_path, dpi)


@dataclass
class AttentionMaps:
    """Attention maps of one caption, as stored by :func:`save_attention_maps`.

    Attributes:
        words: ``(T,)`` generated words.
        alphas: ``(T, H, W)`` attention weights.
        grid: ``(H, W)``.
        betas: ``(T,)`` gating scalars, or ``None``.
        hard_locations: ``(T,)`` attended indices into ``L``, or ``None``.
        image_size: ``(H_img, W_img)``, or ``None``.
        theta: ``(2, 3)`` transform from the grid to the image (a Spatial Transformer moved
            the view), or ``None``.
        edges: cell boundaries ``(ys (H + 1,), xs (W + 1,))`` at the receptive fields'
            centres, or ``None`` (uniform tiles).
    """

    words: list[str]
    alphas: np.ndarray
    grid: tuple[int, int]
    betas: np.ndarray | None = None
    hard_locations: np.ndarray | None = None
    image_size: tuple[int, int] | None = None
    theta: np.ndarray | None = None
    edges: Edges | None = None


def save_attention_maps(
    path: str | os.PathLike,
    words: Sequence[str],
    alphas: np.ndarray,
    grid: tuple[int, int],
    betas: np.ndarray | None = None,
    hard_locations: np.ndarray | None = None,
    image_size: tuple[int, int] | None = None,
    theta: np.ndarray | None = None,
    edges: Edges | None = None,
) -> Path:
    """Save attention maps to a compressed ``.npz`` (atomically).

    Keys: ``words`` (unicode array), ``alphas`` ``(T, H, W)`` float32, ``grid`` ``(2,)`` and,
    when given, ``betas`` ``(T,)``, ``hard_locations`` ``(T,)`` int64, ``image_size``
    ``(2,)`` as ``(H_img, W_img)``, ``theta`` ``(2, 3)`` float64, ``edges_y`` ``(H + 1,)`` and
    ``edges_x`` ``(W + 1,)`` float64. Readable with
    ``np.load(path, allow_pickle=False)``.

    Args:
        path: destination file (``.npz`` is appended if missing).
        words: ``(T,)`` generated words.
        alphas: ``(T, L)`` or ``(T, H, W)`` attention weights.
        grid: ``(H, W)``.
        betas: optional ``(T,)`` gating scalars.
        hard_locations: optional ``(T,)`` attended indices into ``L``.
        image_size: optional ``(H_img, W_img)``.
        theta: optional ``(2, 3)`` transform from the grid to the image.
        edges: optional cell boundaries (:func:`plot_attention`).

    Returns:
        The path written.
    """
    out = Path(path)
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    t_len = len(words)
    arrays: dict[str, np.ndarray] = {
        "words": np.asarray(list(words), dtype=np.str_).reshape(t_len),
        "alphas": _check_alphas(alphas, grid, t_len).astype(np.float32),
        "grid": np.asarray(grid, dtype=np.int64),
    }
    if betas is not None:
        arrays["betas"] = np.asarray(betas, dtype=np.float32).reshape(-1)[:t_len]
    if hard_locations is not None:
        arrays["hard_locations"] = np.asarray(hard_locations, dtype=np.int64).reshape(-1)[:t_len]
    if image_size is not None:
        arrays["image_size"] = np.asarray(image_size, dtype=np.int64)
    if theta is not None:
        arrays["theta"] = np.asarray(theta, dtype=np.float64).reshape(2, 3)
    if edges is not None:
        arrays["edges_y"], arrays["edges_x"] = grid_edges(tuple(grid), edges)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:  # a file object: numpy appends no extension
            np.savez_compressed(f, **arrays)
    return out


def load_attention_maps(path: str | os.PathLike) -> AttentionMaps:
    """Load maps written by :func:`save_attention_maps`.

    Args:
        path: the ``.npz`` file.

    Returns:
        An :class:`AttentionMaps`; absent optional entries are ``None``.
    """
    with np.load(path, allow_pickle=False) as data:
        grid = tuple(int(v) for v in data["grid"])
        return AttentionMaps(
            words=[str(w) for w in data["words"]],
            alphas=data["alphas"].copy(),
            grid=(grid[0], grid[1]),
            betas=data["betas"].copy() if "betas" in data else None,
            hard_locations=data["hard_locations"].copy() if "hard_locations" in data else None,
            image_size=(
                (int(data["image_size"][0]), int(data["image_size"][1]))
                if "image_size" in data
                else None
            ),
            theta=data["theta"].copy() if "theta" in data else None,
            edges=(data["edges_y"].copy(), data["edges_x"].copy()) if "edges_y" in data
            else None,
        )


def plot_alignment(
    source_tokens: Sequence[str],
    target_tokens: Sequence[str],
    alphas: np.ndarray,
    out_path: str | os.PathLike,
    *,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Draw a soft-alignment heatmap like Bahdanau et al. (2015, Figure 3), atomically.

    Source tokens run along the x axis (top), target tokens down the y axis; cell ``(t, s)`` is
    the weight ``alpha_{ts}`` in grayscale, black 0 to white 1.

    Args:
        source_tokens: ``(S,)`` source tokens.
        target_tokens: ``(T,)`` target tokens.
        alphas: ``(T, S)`` attention weights, one row per target token.
        out_path: destination; the extension picks the format.
        title: optional figure title.
        dpi: resolution of raster outputs.

    Returns:
        The path written.
    """
    alphas = np.asarray(alphas, dtype=np.float64)
    t_len, s_len = len(target_tokens), len(source_tokens)
    if alphas.shape != (t_len, s_len):
        raise ValueError(f"alphas must be (T={t_len}, S={s_len}), got {alphas.shape}")
    size = 0.35
    fig = Figure(figsize=(max(3.0, size * s_len + 1.5), max(3.0, size * t_len + 1.5)))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(alphas, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="equal")
    ax.set_xticks(range(s_len), labels=list(source_tokens), rotation=90, fontsize=8)
    ax.set_yticks(range(t_len), labels=list(target_tokens), fontsize=8)
    ax.xaxis.tick_top()
    ax.set_xlabel("source")
    ax.xaxis.set_label_position("top")
    ax.set_ylabel("target")
    if title:
        ax.set_title(title, y=-0.1)
    return _save_figure(fig, out_path, dpi)


# ---------------------------------------------------------------------------- spatial transformers
def sampling_grid_lines(
    theta: torch.Tensor | np.ndarray, height: int, width: int, lines: int = 5, points: int = 2
) -> np.ndarray:
    """Lines of the output grid mapped into input pixel coordinates.

    The output grid's outline is the square ``[-1, 1]^2`` (with ``align_corners=False`` its edges
    are the outer pixel edges); its image under ``A_theta`` is the input region sampled. Pixel
    coordinates follow ``imshow``: pixel centres at integers, the image spans
    ``[-0.5, width - 0.5] x [-0.5, height - 0.5]``; ``u = ((x_s + 1) width - 1) / 2``.

    Args:
        theta: one ``(2, 3)`` matrix.
        height: input ``H``.
        width: input ``W``.
        lines: lines per direction (``2``: the outline only); the first and last of each
            direction are the outline.
        points: points per line (straight lines need 2).

    Returns:
        ``(2 * lines, points, 2)`` ``(u, v)`` pixel coordinates; rows ``0`` and ``lines - 1``
        are the top and bottom edges, rows ``lines`` and ``2 * lines - 1`` the left and right.
    """
    a = np.asarray(theta.detach().cpu() if hasattr(theta, "detach") else theta, float)
    ticks, along = np.linspace(-1.0, 1.0, lines), np.linspace(-1.0, 1.0, points)
    horizontal = [np.stack([along, np.full(points, t)], 1) for t in ticks]  # y fixed
    vertical = [np.stack([np.full(points, t), along], 1) for t in ticks]  # x fixed
    target = np.stack(horizontal + vertical)  # (2 * lines, points, 2) normalised (x, y)
    source = target @ a[:, :2].T + a[:, 2]  # (2 * lines, points, 2)
    scale = np.array([width, height], float)
    return ((source + 1.0) * scale - 1.0) / 2.0


def theta_outline(theta: torch.Tensor | np.ndarray, height: int, width: int) -> np.ndarray:
    """Corners of the sampled region in input pixel coordinates (see :func:`sampling_grid_lines`).

    Returns:
        ``(4, 2)`` ``(u, v)``: the images of the output's top-left, top-right, bottom-right and
        bottom-left corners (the identity gives ``(-0.5, -0.5), (W - 0.5, -0.5), ...``).
    """
    edges = sampling_grid_lines(theta, height, width, lines=2, points=2)
    top, bottom = edges[0], edges[1]
    return np.stack([top[0], top[1], bottom[1], bottom[0]])


_COLOURS = ("#ff7f0e", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def stn_views(images: Any, theta: Any, size: tuple[int, int] | None = None,
              fill: Sequence[float] | None = None) -> Any:
    """The warped views ``V = U(A_theta G)`` of ``(n, 3, H, W)`` images under ``(n, 2, 3)``
    transforms, ``(n, 3, h', w')``, showing ``fill`` (RGB, default black) where the grid samples
    outside the image (:func:`plot_stn`)."""
    import torch

    from captioner.encoders.stn import warp

    if isinstance(fill, torch.Tensor):  # e.g. encoder.mean, on the model's device, any dtype
        fill = fill.detach().cpu().float().numpy()
    pad = (torch.zeros(3) if fill is None else torch.as_tensor(
        np.asarray(fill, dtype=np.float32)).flatten()).view(1, 3, 1, 1)
    pad = pad.to(images.device, images.dtype)  # (1, 3, 1, 1)
    return warp(images - pad, theta, size) + pad  # the sampler's zero padding, shifted: fill


def plot_stn(
    images: torch.Tensor | np.ndarray,
    theta: torch.Tensor | np.ndarray,
    out_path: str | os.PathLike,
    output_size: int | tuple[int, int] | None = None,
    titles: Sequence[str] | None = None,
    dpi: int = 100,
    fill: Sequence[float] | None = None,
) -> Path:
    """Draw each input with a Spatial Transformer's sampling grid, next to the warped
    output(s) (Jaderberg et al. 2015, Fig. 3).

    Row ``k``: image ``k`` with the ``n`` sampling grids drawn on it (outline bold, inner grid
    lines thin, one colour per transformer), then the ``n`` warped outputs ``V = U(A_theta G)``
    computed from the image itself (the transforms are spatial only, so ``theta`` taken on the
    normalised input applies unchanged to the ``[0, 1]`` image).

    Args:
        images: ``(K, 3, H, W)`` (or one ``(3, H, W)``) RGB in ``[0, 1]``.
        theta: ``(K, n, 2, 3)``, ``(K, 2, 3)`` or one ``(2, 3)`` (e.g.
            ``SpatialTransformer.input_theta()``).
        out_path: image file (format from the suffix); written atomically.
        output_size: ``(h', w')`` of the warped outputs; default the input size.
        titles: optional title of each row's input panel (e.g. the generated caption).
        dpi: resolution.
        fill: the RGB colour in ``[0, 1]`` shown where the grid samples outside the input;
            default black. A stage at ``"input"`` samples the *normalised* image, whose zero
            padding is the normalisation mean: pass ``encoder.mean`` to show what it sees.

    Returns:
        ``out_path`` as a ``Path``.
    """
    import torch

    imgs = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    imgs = imgs.detach().cpu().float()
    th = torch.as_tensor(np.asarray(theta) if not isinstance(theta, torch.Tensor) else theta)
    th = th.detach().cpu().double()  # moved first: MPS has no float64
    if imgs.dim() == 3:
        imgs, th = imgs.unsqueeze(0), th.unsqueeze(0)
    if th.dim() == 3:
        th = th.unsqueeze(1)  # (K, 1, 2, 3)
    if imgs.dim() != 4 or th.dim() != 4 or th.shape[-2:] != (2, 3) or th.shape[0] != imgs.shape[0]:
        raise ValueError(f"need images (K, 3, H, W) and theta (K, n, 2, 3); got "
                         f"{tuple(imgs.shape)} and {tuple(th.shape)}")
    if titles is not None and len(titles) != imgs.shape[0]:
        raise ValueError(f"{len(titles)} titles for {imgs.shape[0]} images")
    k_images, n = imgs.shape[0], th.shape[1]
    h, w = imgs.shape[-2:]
    size = (output_size, output_size) if isinstance(output_size, int) else output_size

    fig = Figure(figsize=(2.6 * (1 + n), 2.4 * k_images))
    axes = fig.subplots(k_images, 1 + n, squeeze=False)
    for row in range(k_images):
        ax = axes[row, 0]
        ax.imshow(_as_image_array(imgs[row].numpy()), interpolation="nearest")
        for t in range(n):
            colour = _COLOURS[t % len(_COLOURS)]
            lines = sampling_grid_lines(th[row, t], h, w)
            for i, line in enumerate(lines):
                outline = i in (0, len(lines) // 2 - 1, len(lines) // 2, len(lines) - 1)
                ax.plot(line[:, 0], line[:, 1], color=colour, linewidth=2.0 if outline else 0.6,
                        alpha=1.0 if outline else 0.7)
        ax.set_xlim(-0.5 - 0.25 * w, w - 0.5 + 0.25 * w)
        ax.set_ylim(h - 0.5 + 0.25 * h, -0.5 - 0.25 * h)
        ax.set_title(titles[row] if titles else "input + sampling grid", fontsize=7)
        ax.axis("off")
        warped = stn_views(imgs[row : row + 1].expand(n, -1, -1, -1), th[row].float(), size,
                           fill)
        for t in range(n):
            ax = axes[row, 1 + t]
            ax.imshow(_as_image_array(warped[t].clamp(0, 1).numpy()), interpolation="nearest")
            ax.set_title(f"warped {t + 1}" if n > 1 else "warped", fontsize=7,
                         color=_COLOURS[t % len(_COLOURS)])
            ax.axis("off")
    return _save_figure(fig, out_path, dpi)
