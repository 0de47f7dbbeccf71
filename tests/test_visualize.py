"""Tests for captioner.visualize (attention figures, map files, alignment heatmaps)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from captioner.visualize import (
    load_attention_maps,
    plot_alignment,
    plot_attention,
    save_attention_maps,
    upsample_attention,
)

GRID = (3, 5)  # (H, W), deliberately not square
IMG_H, IMG_W = 37, 53  # odd sizes that do not divide the grid
WORDS = ["a", "red", "square", "<end>"]  # T = 4


@pytest.fixture
def alphas() -> np.ndarray:
    rng = np.random.default_rng(0)
    a = rng.random((len(WORDS), GRID[0] * GRID[1]))  # (T, L)
    return a / a.sum(axis=1, keepdims=True)


@pytest.fixture
def image() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (IMG_H, IMG_W, 3), dtype=np.uint8))


def _no_temp_files(directory) -> bool:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".")) == []


def test_upsample_attention_shape_and_cell_alignment():
    alpha = np.zeros(GRID)
    alpha[1, 3] = 1.0  # cell rows [12.33, 24.67), cols [31.8, 42.4)
    up = upsample_attention(alpha, (IMG_H, IMG_W), smooth=False)
    assert up.shape == (IMG_H, IMG_W)
    r, c = np.unravel_index(np.argmax(up), up.shape)
    assert 12 <= r < 25 and 31 <= c < 43
    smoothed = upsample_attention(alpha, (IMG_H, IMG_W), smooth=True)
    assert smoothed.shape == (IMG_H, IMG_W) and smoothed.max() < up.max()


def test_an_identity_view_draws_the_plain_map():
    """With ``theta`` each image pixel reads the grid map at the grid point that looked at it;
    through the identity that is the pixel's own centre (pixel ``i`` spans ``[i, i + 1)``, so
    its centre ``i + 0.5`` is index ``i`` of the map), and the map is the plain one exactly.
    Reading at ``i + 0.5`` instead would shift it by half a pixel, blending neighbours."""
    alpha = np.random.default_rng(3).random(GRID)  # (3, 5)
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    plain = upsample_attention(alpha, (20, 30), smooth=False)
    through = upsample_attention(alpha, (20, 30), smooth=False, theta=identity)
    np.testing.assert_allclose(through, plain, rtol=0, atol=1e-12)


@pytest.mark.parametrize("smooth", [False, True])
def test_upsampling_is_bilinear_then_gaussian(smooth):
    """The separable form (``R_y alpha R_x^T``) equals bilinear interpolation at the pixel
    centres (edges held) followed by a Gaussian of ``SMOOTH_SIGMA_CELLS`` cells, computed
    directly with scipy on the full image."""
    from scipy import ndimage

    from captioner.visualize import SMOOTH_SIGMA_CELLS

    alpha = np.random.default_rng(2).random(GRID)
    for img_h, img_w in ((IMG_H, IMG_W), (11, 97), (64, 9)):
        rows = (np.arange(img_h) + 0.5) * GRID[0] / img_h - 0.5
        cols = (np.arange(img_w) + 0.5) * GRID[1] / img_w - 0.5
        rr, cc = np.meshgrid(rows, cols, indexing="ij")  # (H_img, W_img) each
        expected = ndimage.map_coordinates(alpha, [rr, cc], order=1, mode="nearest")
        if smooth:
            sigma = (SMOOTH_SIGMA_CELLS * img_h / GRID[0], SMOOTH_SIGMA_CELLS * img_w / GRID[1])
            expected = ndimage.gaussian_filter(expected, sigma=sigma, mode="nearest")
        got = upsample_attention(alpha, (img_h, img_w), smooth=smooth)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_plot_attention_soft_with_betas(tmp_path, image, alphas):
    betas = np.array([0.83, 0.5, 0.91, 0.1])
    out = plot_attention(image, WORDS, alphas, GRID, tmp_path / "soft.png", betas=betas,
                         title="soft attention")
    assert out == tmp_path / "soft.png"
    with Image.open(out) as fig:
        assert fig.format == "PNG" and fig.size[0] > IMG_W
    assert _no_temp_files(tmp_path)


def test_plot_attention_hard_locations_grayscale_array_pdf(tmp_path, alphas):
    gray = np.linspace(0.0, 1.0, IMG_H * IMG_W).reshape(IMG_H, IMG_W)  # (H, W) floats
    hard = np.array([0, 7, 14, 3])
    one_hot = np.eye(GRID[0] * GRID[1])[hard]  # (T, L)
    out = plot_attention(gray, WORDS, one_hot, GRID, tmp_path / "sub" / "hard.pdf",
                         hard_locations=hard, smooth=False, cols=3, cmap="jet")
    assert out.read_bytes().startswith(b"%PDF")
    with pytest.raises(ValueError):
        plot_attention(gray, WORDS, alphas, GRID, tmp_path / "bad.png",
                       hard_locations=np.array([0, 1, 2, 15]))
    with pytest.raises(ValueError):
        plot_attention(gray, WORDS, alphas[:, :-1], GRID, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_figures_of_strips_and_large_images_stay_bounded(tmp_path, alphas, monkeypatch):
    """A 3 x 2000 strip made a 950 x 264,910 px figure (45 s, 4.3 GB), and a large photo had
    every map upsampled to its full size: panels keep within 8:1, maps within 1024 a side,
    drawn over the image's own pixel extent (the peak stays on its cell)."""
    import matplotlib.axes

    import captioner.visualize as visualize

    sizes = []
    upsample = visualize.upsample_attention
    monkeypatch.setattr(visualize, "upsample_attention",
                        lambda *a, **k: sizes.append(a[1]) or upsample(*a, **k))
    strip = np.zeros((2000, 3), dtype=np.uint8)
    plot_attention(strip, WORDS, alphas, GRID, tmp_path / "strip.png", smooth=False)
    with Image.open(tmp_path / "strip.png") as fig:
        assert fig.size[1] < 8 * fig.size[0] and fig.size[1] < 6000
    assert sizes == [(1024, 2)] * len(WORDS)  # 2000 x 3 scaled to 1024 on the long side
    sizes.clear()
    one_hot = np.zeros((1, GRID[0] * GRID[1]))
    one_hot[0, 2 * GRID[1] + 4] = 1.0  # the bottom-right cell
    drawn = []
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", _recording_imshow(drawn))
    plot_attention(np.zeros((3001, 4500)), ["x"], one_hot, GRID, tmp_path / "big.png",
                   smooth=False)
    assert sizes == [(683, 1024)]  # 3001 x 4500 scaled to 1024 on the long side
    up, extent = drawn[-1]
    assert up.shape == (683, 1024) and extent == (0.0, 4500, 3001, 0.0)
    row, col = np.unravel_index(up.argmax(), up.shape)
    assert row / 683 * 3001 >= 2 * 3001 / 3 and col / 1024 * 4500 >= 4 * 4500 / 5


def _recording_imshow(drawn):
    import matplotlib.axes

    imshow = matplotlib.axes.Axes.imshow

    def record(self, data, *args, **kwargs):
        drawn.append((np.asarray(data), kwargs.get("extent")))
        return imshow(self, data, *args, **kwargs)

    return record


def test_attention_maps_roundtrip(tmp_path, alphas):
    betas = np.array([0.83, 0.5, 0.91, 0.1])
    hard = np.array([0, 7, 14, 3])
    path = save_attention_maps(tmp_path / "maps", WORDS, alphas, GRID, betas=betas,
                               hard_locations=hard, image_size=(IMG_H, IMG_W))
    assert path.name == "maps.npz"
    maps = load_attention_maps(path)
    assert maps.words == WORDS
    assert maps.grid == GRID and maps.image_size == (IMG_H, IMG_W)
    assert maps.alphas.shape == (4, 3, 5)
    np.testing.assert_allclose(maps.alphas, alphas.reshape(4, 3, 5), rtol=1e-6)
    np.testing.assert_allclose(maps.betas, betas, rtol=1e-6)
    np.testing.assert_array_equal(maps.hard_locations, hard)

    bare = load_attention_maps(save_attention_maps(tmp_path / "bare.npz", WORDS, alphas, GRID))
    assert bare.betas is None and bare.hard_locations is None and bare.image_size is None
    assert _no_temp_files(tmp_path)


def test_plot_alignment(tmp_path):
    src = ["the", "agreement", "on", "the", "zone", "<end>"]  # S = 6
    tgt = ["l'", "accord", "sur", "la", "zone", "<end>", "."]  # T = 7
    rng = np.random.default_rng(2)
    a = rng.random((len(tgt), len(src)))
    a /= a.sum(axis=1, keepdims=True)  # (T, S)
    out = plot_alignment(src, tgt, a, tmp_path / "align.png")
    with Image.open(out) as fig:
        assert fig.format == "PNG"
    with pytest.raises(ValueError):
        plot_alignment(src, tgt, a.T, tmp_path / "bad.png")


def test_hard_outline_sits_on_its_cell_of_a_non_square_grid(tmp_path, monkeypatch, alphas):
    import captioner.visualize as visualize

    drawn = []
    real = visualize.Polygon
    monkeypatch.setattr(visualize, "Polygon", lambda xy, **kw: drawn.append(xy) or real(xy, **kw))
    # cell 7 of the 3 x 5 grid on 30 x 53 pixels: row 1, column 2,
    # x in [21.2, 31.8), y in [10, 20)
    plot_attention(np.zeros((30, 53, 3)), ["a"], alphas[:1], GRID, tmp_path / "h.png",
                   hard_locations=[7])
    np.testing.assert_allclose(drawn[0], [[21.2, 10], [31.8, 10], [31.8, 20], [21.2, 20]])


def test_too_few_maps_and_integer_images_are_read_right(tmp_path, alphas):
    from captioner.visualize import _as_image_array

    with pytest.raises(ValueError, match="5 words but only 4 attention maps"):
        save_attention_maps(tmp_path / "m.npz", WORDS + ["x"], alphas, GRID)
    np.testing.assert_allclose(_as_image_array(np.array([[0, 51], [255, 102]], np.uint8)),
                               [[0.0, 0.2], [1.0, 0.4]])


def test_a_zoomed_view_is_read_bilinearly_up_to_its_edge():
    # the view of the left half, twice enlarged horizontally: image column j (centre j + 0.5)
    # looked at grid column 2 j + 0.5, i.e. between map columns 2 j and 2 j + 1
    alpha = np.arange(15, dtype=float).reshape(GRID)
    theta = np.array([[0.5, 0.0, -0.5], [0.0, 1.0, 0.0]])
    plain = upsample_attention(alpha, (6, 10), smooth=False)
    left = upsample_attention(alpha, (6, 10), smooth=False, theta=theta)
    np.testing.assert_allclose(left[:, :5], (plain[:, 0:10:2] + plain[:, 1:10:2]) / 2)
    assert (left[:, 5:] == 0).all()
