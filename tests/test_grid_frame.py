"""Where the attention grid lies in the image when a Spatial Transformer moved the view."""

import numpy as np
import pytest
import torch

from captioner.encoders import ImageEncoder, SpatialTransformer
from captioner.grid_frame import cell_outline, grid_to_image, image_to_grid, pixel_centres
from captioner.metrics import attention_correctness, box_cell_coverage
from captioner.visualize import upsample_attention

# The view of the top-left quarter, twice enlarged: grid point p looked at image point p / 2 - 1/2.
ZOOM_TOP_LEFT = np.array([[0.5, 0.0, -0.5], [0.0, 0.5, -0.5]])


def test_grid_and_image_points_are_inverse_maps():
    rng = np.random.default_rng(0)
    theta = np.array([[0.7, -0.3, 0.1], [0.2, 0.9, -0.25]])
    points = rng.uniform(-1, 1, (11, 2))
    np.testing.assert_allclose(image_to_grid(grid_to_image(points, theta), theta), points,
                               atol=1e-12)
    np.testing.assert_allclose(grid_to_image(points, ZOOM_TOP_LEFT), points / 2 - 0.5)
    np.testing.assert_array_equal(grid_to_image(points, None), points)
    np.testing.assert_array_equal(image_to_grid(points, None), points)
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        grid_to_image(points, np.eye(3))


def test_pixel_centres_are_row_major_and_normalised():
    centres = pixel_centres((3, 5))  # (15, 2) as (x, y)
    assert centres.shape == (15, 2)
    np.testing.assert_allclose(centres[0], [-0.8, -2 / 3])
    np.testing.assert_allclose(centres[4], [0.8, -2 / 3])  # the first row runs along x
    np.testing.assert_allclose(centres[5], [-0.8, 0.0])


def test_cell_outline_without_and_with_a_view():
    # cell (1, 2) of a 3 x 5 grid on a 30 x 50 image: x in [20, 30), y in [10, 20)
    np.testing.assert_allclose(cell_outline(7, (3, 5), None, (30, 50)),
                               [[20, 10], [30, 10], [30, 20], [20, 20]])
    # the zoomed view halves it and keeps it in the top-left quarter
    np.testing.assert_allclose(cell_outline(7, (3, 5), ZOOM_TOP_LEFT, (30, 50)),
                               [[10, 5], [15, 5], [15, 10], [10, 10]])
    # location 3 of a 2 x 4 grid is row 3 // 4 = 0, column 3 % 4 = 3 (row-major over W = 4):
    # on a 20 x 40 image (10 x 10 px cells) x in [30, 40), y in [0, 10)
    np.testing.assert_allclose(cell_outline(3, (2, 4), None, (20, 40)),
                               [[30, 0], [40, 0], [40, 10], [30, 10]])


def test_coverage_through_the_identity_equals_the_exact_areas():
    boxes = [(10.0, 0.0, 20.0, 20.0), (35.0, 15.0, 10.0, 7.5)]  # on multiples of 1/16 cell
    exact = box_cell_coverage(boxes, (3, 5), (30, 50))
    sampled = box_cell_coverage(boxes, (3, 5), (30, 50), np.array([[1.0, 0, 0], [0, 1.0, 0]]))
    np.testing.assert_allclose(sampled, exact)
    assert exact[0, 1] == 1.0 and exact[2, 0] == 0.0 and exact[1, 3] == 0.25


def test_coverage_follows_the_view():
    # A box over the left half of the top-left quarter (x < 25, y < 15 of a 30 x 100 image):
    # in the zoomed view it fills the grid's two left columns, and nothing else.
    box = [(0.0, 0.0, 25.0, 15.0)]
    cover = box_cell_coverage(box, (3, 4), (30, 100), ZOOM_TOP_LEFT)
    np.testing.assert_array_equal(cover, [[1, 1, 0, 0]] * 3)
    # Without the view the same box covers only part of the first row.
    assert box_cell_coverage(box, (3, 4), (30, 100))[2].sum() == 0.0
    # A view that reaches outside the image covers nothing there (zero padding).
    outside = np.array([[1.0, 0.0, 1.5], [0.0, 1.0, 0.0]])  # x shifted by 3/4 of the image
    assert box_cell_coverage([(0.0, 0.0, 100.0, 30.0)], (1, 4), (30, 100), outside)[0, 3] == 0.0


def test_attention_correctness_uses_each_images_view():
    grid, size = (3, 4), (30, 100)
    alpha = np.zeros((1, 12))
    alpha[0, 4] = 1.0  # cell (1, 0): looked at x in [0, 12.5), y in [5, 10) through the zoom
    boxes = [[("square", "red", (0.0, 0.0, 25.0, 15.0))]]
    through = attention_correctness([alpha], [["square"]], boxes, grid, [size],
                                    thetas=[ZOOM_TOP_LEFT])
    assert through["attention_correctness"] == 1.0
    assert through["chance"] == pytest.approx(0.5)  # uniform over the view: 6 of 12 cells
    plain = attention_correctness([alpha], [["square"]], boxes, grid, [size], thetas=[None])
    assert plain["attention_correctness"] == pytest.approx(0.5)  # cell (1, 0) is y in [10, 20)
    assert plain["chance"] == pytest.approx(0.125)
    with pytest.raises(ValueError, match="thetas"):
        attention_correctness([alpha], [["square"]], boxes, grid, [size], thetas=[])


def test_upsampled_map_is_drawn_where_the_view_looked():
    grid, size = (3, 5), (60, 100)
    alpha = np.zeros(grid)
    alpha[0, 4] = 1.0
    plain = upsample_attention(alpha, size, smooth=False)
    moved = upsample_attention(alpha, size, smooth=False, theta=ZOOM_TOP_LEFT)
    # cell (0, 4) centre: grid (0.8, -2/3) -> image (-0.1, -5/6) -> pixel x 45, y 5
    assert plain[10, 90] > 0.9 and plain[10, 45] == 0.0
    assert moved[5, 45] > 0.9 and moved[10, 90] == 0.0
    assert moved[30:, :].max() == 0.0 and moved[:, 50:].max() == 0.0  # outside the view
    # the view's map is the plain map shrunk onto the quarter: same values, half the size
    np.testing.assert_allclose(moved[:30, :50], plain[::2, ::2], atol=0.06)


def _encoder(*stages):
    return ImageEncoder(backbone="shapes_cnn", weights=None, grid_size=(3, 5), stages=stages)


def _fixed(stn: SpatialTransformer, params: list[float]) -> SpatialTransformer:
    regress = stn.localisation[0][-1]
    with torch.no_grad():
        regress.weight.zero_()
        regress.bias.copy_(torch.tensor(params))
    return stn


def test_encoder_grid_theta_composes_the_views_in_order():
    images = torch.rand(2, 3, 32, 40)
    plain = _encoder()
    plain(images)
    assert plain.grid_theta() is None

    first = SpatialTransformer(where="input", transform="attention")
    second = SpatialTransformer(where="output", transform="translation")
    encoder = _encoder(first, second)
    _fixed(first, [0.5, -0.5, -0.5])  # zoom onto the top-left quarter of the image
    _fixed(second, [0.4, 0.0])  # then move right by a fifth of the view
    encoder(images)
    theta = encoder.grid_theta()  # (B, 2, 3)
    assert theta.shape == (2, 2, 3)
    # p -> (p + (0.4, 0)) in the first view -> half of that - 1/2 in the image
    expected = torch.tensor([[0.5, 0.0, -0.3], [0.0, 0.5, -0.5]])
    torch.testing.assert_close(theta, expected.expand(2, 2, 3), rtol=0, atol=1e-6)


def test_encoder_grid_theta_refuses_several_views_per_cell():
    encoder = _encoder(SpatialTransformer(where="output", num_transformers=2, combine="concat"))
    encoder(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="2 views"):
        encoder.grid_theta()


def test_a_collapsed_view_is_drawn_and_a_broken_one_refused():
    line = np.array([[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])  # every grid point on the line y = 0
    np.testing.assert_allclose(image_to_grid(np.array([[0.25, 0.3]]), line), [[0.5, 0.0]])
    with pytest.raises(ValueError, match="non-finite"):
        grid_to_image(np.zeros((1, 2)), np.array([[1.0, 0.0, np.nan], [0.0, 1.0, 0.0]]))
