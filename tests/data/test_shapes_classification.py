"""The distorted single-shape classification data (captioner.data.shapes_classification)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captioner.data.shapes import COLOUR_RGB, SHAPES
from captioner.data.shapes_classification import DistortedShapes, render_distorted_shape


def test_same_seed_same_images_other_seed_other_images():
    a, b, c = DistortedShapes(7, seed=3), DistortedShapes(7, seed=3), DistortedShapes(7, seed=4)
    assert torch.equal(a.images, b.images) and a.params == b.params
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (7, 3, 64, 64) and a.images.dtype == torch.uint8


def test_items_are_normalised_and_labels_cover_every_shape():
    data = DistortedShapes(200, seed=0, image_size=48, side_range=(8, 12))
    image, label = data[5]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0
    assert torch.equal(image, data.images[5].float() / 127.5 - 1.0)
    assert label == data.params[5].label
    counts = np.bincount(data.labels.numpy(), minlength=len(SHAPES))
    assert (counts > 30).all(), counts  # uniform over 4 shapes: 50 each expected


@pytest.mark.parametrize("seed", range(6))
def test_the_shape_is_drawn_whole_where_its_parameters_say(seed):
    """Without distractors the object colour marks exactly the shape: its pixels lie inside the
    image, their centroid is the stated centre (to a pixel; a triangle's centroid is lower
    than its box centre), and their count matches the side (area between 0.4 a^2 and a^2)."""
    rng = np.random.default_rng(seed)
    image, p = render_distorted_shape(rng, image_size=41, side_range=(9, 15), max_angle=45.0,
                                      distractors=0)
    pixels = np.asarray(image)
    ys, xs = np.nonzero((pixels == COLOUR_RGB[p.colour]).all(-1))
    area = len(xs)
    assert 0.4 * p.side**2 <= area <= p.side**2 + 2 * p.side, (SHAPES[p.label], area, p.side)
    # no object pixel on the border: the whole rotated shape is in view
    assert xs.min() > 0 and ys.min() > 0 and xs.max() < 40 and ys.max() < 40
    cx, cy = (xs.mean() + 0.5) * 2 / 41 - 1, (ys.mean() + 0.5) * 2 / 41 - 1  # normalised
    tolerance = 2 * (0.2 * p.side if SHAPES[p.label] == "triangle" else 1.0) / 41
    assert np.hypot(cx - p.centre[0], cy - p.centre[1]) <= tolerance, (SHAPES[p.label], p)


def test_rotation_turns_the_shape():
    """A square turned by 45 degrees is wider than its side; unturned it is exactly its side."""
    widths = {}
    for angle in (0.0, 45.0):
        seed = 0
        while True:  # find a square with the wanted rotation range
            rng = np.random.default_rng(seed)
            image, p = render_distorted_shape(rng, 48, (14, 14), max_angle=angle, distractors=0)
            if SHAPES[p.label] == "square" and abs(abs(p.angle) - angle) < 0.5:
                break
            seed += 1
        xs = np.nonzero((np.asarray(image) == COLOUR_RGB[p.colour]).all(-1))[1]
        widths[angle] = xs.max() - xs.min() + 1
    assert widths[0.0] == 14
    assert widths[45.0] >= 18  # 14 sqrt(2) = 19.8, nearest-neighbour rasterised


def test_sizes_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="does not fit a 20-pixel image"):
        render_distorted_shape(np.random.default_rng(0), image_size=20, side_range=(10, 16))
    with pytest.raises(ValueError, match="num must be positive"):
        DistortedShapes(0)
