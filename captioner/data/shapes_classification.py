"""Distorted single-shape classification: a cluttered-MNIST analogue built from the shapes data.

Jaderberg et al. (2015, Section 4.1) show what a Spatial Transformer learns on distorted and
cluttered MNIST: it localises the digit and undoes its rotation, scale and translation. The
captioning data cannot show this (captions describe a distorted scene *as seen*, so nothing asks
the STN to undo anything); this task can. Every ``S x S`` image shows **one** shape of
:data:`~captioner.data.shapes.SHAPES` (the label is its index), of a random colour, with

* side ``a ~ U{side_range}`` pixels (its box before rotation),
* rotation ``phi ~ U(-max_angle, max_angle)`` degrees about its centre (counter-clockwise on
  screen, as ``PIL.Image.rotate``),
* centre ``(c_x, c_y)`` uniform over the positions that keep the rotated shape inside the image,
* grey clutter (specks and lines, as the shapes data) and ``distractors`` small fragments in the
  object colours that are not shapes (bars of 1-2 x 3-6 pixels).

The parameters of each image are kept (:class:`ShapeParams`, in the normalised coordinates of
``F.affine_grid`` with ``align_corners=False``: ``x_n = 2 x / S - 1`` for ``x`` in pixel-edge
units, ``y`` down), so the transform an STN predicts can be compared with the one that undoes
the distortion: an output grid centred on the shape has ``(t_x, t_y) = (c_x, c_y)``, one that
shows the shape at a fixed apparent size has ``s`` proportional to ``a``, and one that shows it
upright has rotation ``r = -phi`` (``A = s [cos r, -sin r; sin r, cos r]``, ``y`` down).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from captioner.data.shapes import (BACKGROUND, COLOUR_RGB, COLOURS, SHAPES, PlacedShape,
                                   draw_clutter, draw_shape)

__all__ = ["DistortedShapes", "ShapeParams", "render_distorted_shape"]


@dataclass(frozen=True)
class ShapeParams:
    """The distortion of one image.

    Attributes:
        label: index of the shape in ``SHAPES``.
        colour: a word of ``COLOURS``.
        side: ``a``, the side of the shape's box in pixels (before rotation).
        angle: ``phi`` in degrees, counter-clockwise on screen.
        centre: ``(c_x, c_y)`` in normalised coordinates (``[-1, 1]``, ``y`` down).
    """

    label: int
    colour: str
    side: int
    angle: float
    centre: tuple[float, float]


def render_distorted_shape(
    rng: np.random.Generator,
    image_size: int = 64,
    side_range: tuple[int, int] = (10, 16),
    max_angle: float = 45.0,
    distractors: int = 4,
) -> tuple[Image.Image, ShapeParams]:
    """Draw one image (see the module docstring); deterministic given ``rng``'s state.

    Args:
        rng: the random generator.
        image_size: ``S``.
        side_range: inclusive range of the side ``a`` in pixels.
        max_angle: rotations are uniform in ``[-max_angle, max_angle]`` degrees.
        distractors: number of coloured fragments.

    Returns:
        The RGB image and its :class:`ShapeParams`.
    """
    lo, hi = side_range
    if not 2 <= lo <= hi or math.ceil(hi * math.sqrt(2)) + 2 > image_size:
        raise ValueError(f"side_range {side_range} does not fit a {image_size}-pixel image "
                         "(need 2 <= low <= high and high * sqrt(2) + 2 <= image_size)")
    size = (image_size, image_size)
    label = int(rng.integers(len(SHAPES)))
    colour = COLOURS[int(rng.integers(len(COLOURS)))]
    side = int(rng.integers(lo, hi + 1))
    angle = float(rng.uniform(-max_angle, max_angle))
    reach = math.ceil(side * math.sqrt(2) / 2) + 1  # half-extent of the shape at any rotation
    cx, cy = (float(v) + (side % 2) / 2 for v in rng.integers(reach, image_size - reach + 1, 2))
    x0, y0 = round(cx - side / 2), round(cy - side / 2)  # box edges: centre exactly (cx, cy)

    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw_clutter(rng, draw, image_size)
    for _ in range(distractors):
        length, width = int(rng.integers(3, 7)), int(rng.integers(1, 3))
        w, h = (length, width) if rng.random() < 0.5 else (width, length)
        x, y = (int(v) for v in rng.integers(0, image_size - 6, 2))
        draw.rectangle([x, y, x + w - 1, y + h - 1],
                       fill=COLOUR_RGB[COLOURS[int(rng.integers(len(COLOURS)))]])
    mask = Image.new("L", size, 0)
    draw_shape(ImageDraw.Draw(mask), PlacedShape(SHAPES[label], colour, "small", x0, y0, side),
               255)
    mask = mask.rotate(angle, resample=Image.Resampling.NEAREST, center=(cx, cy))
    image.paste(COLOUR_RGB[colour], (0, 0, image_size, image_size), mask)
    centre = (2 * cx / image_size - 1, 2 * cy / image_size - 1)
    return image, ShapeParams(label, colour, side, angle, centre)


class DistortedShapes(Dataset):
    """``num`` images of :func:`render_distorted_shape`, rendered once into memory.

    Items are ``(image, label)``: ``(3, S, S)`` float in ``[-1, 1]`` (so an STN's zero padding
    is mid-grey) and an int. :attr:`params` keeps every image's :class:`ShapeParams`;
    :attr:`images` the ``(N, 3, S, S)`` uint8 pixels.

    Args:
        num: ``N``, number of images.
        seed: the generator's seed; equal seeds give equal data sets.
        image_size, side_range, max_angle, distractors: see :func:`render_distorted_shape`.
    """

    def __init__(self, num: int, seed: int = 0, image_size: int = 64,
                 side_range: tuple[int, int] = (10, 16), max_angle: float = 45.0,
                 distractors: int = 4) -> None:
        if num <= 0:
            raise ValueError(f"num must be positive, got {num}")
        rng = np.random.default_rng(seed)
        pixels, self.params = [], []
        for _ in range(num):
            image, params = render_distorted_shape(rng, image_size, side_range, max_angle,
                                                   distractors)
            pixels.append(np.asarray(image))
            self.params.append(params)
        self.images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
        # images: (N, 3, S, S) uint8
        self.labels = torch.tensor([p.label for p in self.params])  # (N,)

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float() / 127.5 - 1.0, int(self.labels[index])

    def targets(self) -> dict[str, torch.Tensor]:
        """The distortion of every image as tensors: ``centre`` ``(N, 2)``, ``side``,
        ``angle`` (degrees) and ``label`` ``(N,)``."""
        return {
            "centre": torch.tensor([p.centre for p in self.params]),
            "side": torch.tensor([float(p.side) for p in self.params]),
            "angle": torch.tensor([p.angle for p in self.params]),
            "label": self.labels.clone(),
        }
