"""Synthetic "shapes" captioning data set, deterministic from a seed.

Every image shows one to three (by default) coloured shapes (``SHAPES`` x ``COLOURS`` x
``SIZES``) at non-overlapping positions on a plain light background, and has 3 to 5 reference
captions that name every object and the spatial relations between them. The files follow the
COCO layout, so the loaders written for COCO read this set unchanged::

    root/
      manifest.json                          parameters; written last
      annotations/captions_{split}.json      {"info", "licenses", "images", "annotations"}
      annotations/instances_{split}.json     {"images", "annotations", "categories", ...}
      {split}/images/{split}_{i:05d}.png

Caption grammar (tokens separated by single spaces, lower case, no final period)::

    caption  := chain | listing | np location
    np       := "a" [size] colour shape
    chain    := np (relation np)*            # each relation links the two nps around it
    relation := "left of" | "right of" | "above" | "below"
    listing  := np "and" np | np "," np ("," np)* "and" np
    location := "in the top left" | "at the top" | "on the left" | "in the middle" | ...

The relation of ``x`` to ``y`` is read on the dominant axis of the displacement of their box
centres (``|dx| >= |dy|``: left of / right of; otherwise above / below). Layouts where the two
axes are nearly tied are rejected while sampling, so every relation is clear-cut.

The first reference is canonical: a chain of the objects ordered left to right, each with its
size word, e.g. ``"a small red circle left of a large blue square above a green triangle"``.
The others vary the order of mention (right to left, top to bottom), drop the size words, list
the objects, or (one object) add its location, so multi-reference BLEU is meaningful.

``distort=True`` applies a random rotation, scale and translation to the whole rendered scene
(a target for a Spatial Transformer); boxes are the warped objects' pixel extents and captions
describe the scene as it is seen (relations from the centres of the warped boxes).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from captioner.atomic import atomic_write

__all__ = [
    "CAPTION_WORDS",
    "COLOURS",
    "COLOUR_RGB",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SIZE_FRACTION",
    "SPLITS",
    "PlacedShape",
    "ShapeObject",
    "describe",
    "draw_clutter",
    "draw_shape",
    "make_shapes_dataset",
    "object_words",
    "relation",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
SPLITS: tuple[str, ...] = ("train", "val", "test")

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
}
"""Exact RGB of each colour word; rendering uses no anti-aliasing, so pixels match exactly."""

SIZE_FRACTION: dict[str, float] = {"small": 0.18, "large": 0.35}
"""Side of an object's box as a fraction of the image side."""

BACKGROUND: tuple[int, int, int] = (245, 245, 240)
MAX_OBJECTS = 4
VERSION = 1  # bump when the generator's output changes, so cached sets are regenerated

_LOCATION_WORDS = ("in", "at", "on", "the", "top", "bottom", "left", "right", "middle")
CAPTION_WORDS: frozenset[str] = frozenset(
    ("a", "and", ",", "of", "above", "below", *_LOCATION_WORDS, *SIZES, *COLOURS, *SHAPES)
)
"""Every token any caption can contain (clutter never adds words)."""

_GAP = 2  # minimum free pixels between two object boxes
_TIE = 0.08  # reject layouts where ||dx| - |dy|| < _TIE * image_size for some pair
_CIRCLE_POINTS = 32  # outline points of a circle when transforming its box


def object_words() -> dict[str, str]:
    """Map each shape and colour word to its kind.

    Used by the attention-correctness metric to find the caption tokens that refer to an
    object's box.

    Returns:
        ``{"circle": "shape", ..., "red": "colour", ...}``.
    """
    words = {shape: "shape" for shape in SHAPES}
    words.update({colour: "colour" for colour in COLOURS})
    return words


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene, as seen in the final image.

    Attributes:
        shape: A word of ``SHAPES``.
        colour: A word of ``COLOURS``.
        size: A word of ``SIZES``.
        bbox: COCO box ``(x, y, w, h)`` in pixels: the exact extent of the drawn object.
    """

    shape: str
    colour: str
    size: str
    bbox: tuple[float, float, float, float]

    @property
    def centre(self) -> tuple[float, float]:
        """``(x, y)`` centre of the box; spatial relations are decided on it."""
        x, y, w, h = self.bbox
        return x + w / 2, y + h / 2


def relation(a: ShapeObject, b: ShapeObject) -> str:
    """Spatial relation of ``a`` to ``b`` on the dominant axis of their centres.

    Args:
        a: The object being located.
        b: The reference object.

    Returns:
        One of ``RELATIONS``: ``"left of"`` / ``"right of"`` when ``|dx| >= |dy|``, else
        ``"above"`` / ``"below"`` (image ``y`` grows downwards).
    """
    dx = a.centre[0] - b.centre[0]
    dy = a.centre[1] - b.centre[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _noun_phrase(obj: ShapeObject, with_size: bool) -> str:
    if with_size:
        return f"a {obj.size} {obj.colour} {obj.shape}"
    return f"a {obj.colour} {obj.shape}"


def _chain(objects: Sequence[ShapeObject], with_size: bool) -> str:
    parts = [_noun_phrase(objects[0], with_size)]
    for prev, cur in zip(objects[:-1], objects[1:]):
        parts += [relation(prev, cur), _noun_phrase(cur, with_size)]
    return " ".join(parts)


def _listing(objects: Sequence[ShapeObject], with_size: bool) -> str:
    phrases = [_noun_phrase(obj, with_size) for obj in objects]
    return " , ".join(phrases[:-1]) + " and " + phrases[-1]


def _location(obj: ShapeObject, image_size: int) -> str:
    def third(v: float, low: str, high: str) -> str | None:
        if v < image_size / 3:
            return low
        if v > 2 * image_size / 3:
            return high
        return None

    horizontal = third(obj.centre[0], "left", "right")
    vertical = third(obj.centre[1], "top", "bottom")
    if horizontal and vertical:
        return f"in the {vertical} {horizontal}"
    if vertical:
        return f"at the {vertical}"
    if horizontal:
        return f"on the {horizontal}"
    return "in the middle"


def describe(objects: Sequence[ShapeObject], image_size: int) -> list[str]:
    """All distinct captions of a scene, the canonical one first.

    Args:
        objects: The scene's objects, in any order; ``(colour, shape)`` pairs must be unique.
        image_size: Side of the image in pixels (for location words of a single object).

    Returns:
        Distinct captions; ``[0]`` is the canonical chain of the objects ordered left to right
        with size words. At least 4 captions for any number of objects.
    """
    if not objects:
        raise ValueError("a scene needs at least one object")
    if len(objects) == 1:
        obj = objects[0]
        where = _location(obj, image_size)
        full, bare = _noun_phrase(obj, True), _noun_phrase(obj, False)
        return [full, bare, f"{full} {where}", f"{bare} {where}"]
    left_right = sorted(objects, key=lambda o: (o.centre[0], o.centre[1]))
    top_bottom = sorted(objects, key=lambda o: (o.centre[1], o.centre[0]))
    candidates = [
        _chain(left_right, True),
        _chain(left_right, False),
        _chain(left_right[::-1], True),
        _chain(top_bottom, True),
        _listing(left_right, True),
        _chain(left_right[::-1], False),
        _chain(top_bottom[::-1], True),
    ]
    return list(dict.fromkeys(candidates))  # dedupe, keep order


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlacedShape:
    """An object before distortion: top-left corner and side of its square box (also used by
    :mod:`captioner.data.shapes_classification`)."""

    shape: str
    colour: str
    size: str
    x0: int
    y0: int
    side: int


def draw_shape(draw: ImageDraw.ImageDraw, obj: PlacedShape,
               fill: tuple[int, int, int] | int) -> None:
    """Draw ``obj`` filled with ``fill`` (an RGB colour, or a grey level for masks)."""
    x0, y0, s = obj.x0, obj.y0, obj.side
    x1, y1 = x0 + s - 1, y0 + s - 1  # ImageDraw boxes include their last pixel
    if obj.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif obj.shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x0 + (s - 1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    elif obj.shape == "cross":
        t = max(2, round(s / 3))
        a = x0 + (s - t) // 2
        b = y0 + (s - t) // 2
        draw.rectangle([a, y0, a + t - 1, y1], fill=fill)
        draw.rectangle([x0, b, x1, b + t - 1], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def _outline(obj: PlacedShape) -> np.ndarray:
    """Points ``(P, 2)`` (continuous pixel coordinates) whose hull contains the drawn shape."""
    x0, y0, s = float(obj.x0), float(obj.y0), float(obj.side)
    if obj.shape == "circle":
        angles = np.linspace(0.0, 2 * math.pi, _CIRCLE_POINTS, endpoint=False)
        r = s / 2 / math.cos(math.pi / _CIRCLE_POINTS)  # circumscribed polygon
        return np.stack([x0 + s / 2 + r * np.cos(angles), y0 + s / 2 + r * np.sin(angles)], 1)
    if obj.shape == "triangle":
        return np.array([[x0 + s / 2, y0], [x0, y0 + s], [x0 + s, y0 + s]])
    if obj.shape == "cross":
        t = max(2, round(s / 3))
        a = x0 + (obj.side - t) // 2
        b = y0 + (obj.side - t) // 2
        return np.array(
            [[a, y0], [a + t, y0], [a, y0 + s], [a + t, y0 + s],
             [x0, b], [x0, b + t], [x0 + s, b], [x0 + s, b + t]]
        )
    return np.array([[x0, y0], [x0 + s, y0], [x0, y0 + s], [x0 + s, y0 + s]])


def _place(rng: np.random.Generator, image_size: int, n: int) -> list[PlacedShape]:
    """Sample ``n`` objects with unique ``(colour, shape)`` at non-overlapping positions."""
    for _ in range(1000):
        codes = rng.choice(len(SHAPES) * len(COLOURS), size=n, replace=False)
        sizes = rng.integers(0, len(SIZES), size=n)
        placed: list[PlacedShape] = []
        for code, size_index in zip(codes, sizes):
            size = SIZES[size_index]
            side = round(SIZE_FRACTION[size] * image_size)
            for _ in range(100):
                x0, y0 = (int(v) for v in rng.integers(1, image_size - side, size=2))
                candidate = PlacedShape(
                    SHAPES[code // len(COLOURS)], COLOURS[code % len(COLOURS)], size, x0, y0, side
                )
                if all(_compatible(candidate, other, image_size) for other in placed):
                    placed.append(candidate)
                    break
            else:
                break  # this object did not fit: resample the whole scene
        if len(placed) == n:
            return placed
    raise RuntimeError(f"could not place {n} objects in a {image_size}-pixel image")


def _compatible(a: PlacedShape, b: PlacedShape, image_size: int) -> bool:
    """Boxes apart by ``_GAP`` pixels and their relation clear-cut."""
    apart = (
        a.x0 + a.side + _GAP <= b.x0
        or b.x0 + b.side + _GAP <= a.x0
        or a.y0 + a.side + _GAP <= b.y0
        or b.y0 + b.side + _GAP <= a.y0
    )
    dx = (a.x0 + a.side / 2) - (b.x0 + b.side / 2)
    dy = (a.y0 + a.side / 2) - (b.y0 + b.side / 2)
    return apart and abs(abs(dx) - abs(dy)) >= _TIE * image_size


def draw_clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, image_size: int) -> None:
    """Grey specks and thin grey lines, drawn under the objects; never an object colour."""
    for _ in range(int(rng.integers(3, 9))):
        x, y = (int(v) for v in rng.integers(0, image_size - 1, size=2))
        d = int(rng.integers(0, 2))
        grey = int(rng.integers(110, 200))
        draw.rectangle([x, y, x + d, y + d], fill=(grey, grey, grey))
    for _ in range(int(rng.integers(1, 3))):
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, image_size, size=4))
        grey = int(rng.integers(110, 200))
        draw.line([x0, y0, x1, y1], fill=(grey, grey, grey), width=1)


def _affine(image_size: int, angle: float, scale: float, shift: Sequence[float]) -> np.ndarray:
    """Forward affine map ``p' = s R (p - c) + c + t`` as a ``(2, 3)`` matrix.

    ``R`` rotates by ``angle`` degrees (counter-clockwise on screen, as ``Image.rotate``), ``s``
    is ``scale``, ``c`` the image centre and ``t`` the ``shift`` in pixels.
    """
    theta = math.radians(angle)
    cos, sin = math.cos(theta), math.sin(theta)
    rot = scale * np.array([[cos, sin], [-sin, cos]])
    c = np.full(2, image_size / 2)
    return np.concatenate([rot, (c + np.asarray(shift) - rot @ c)[:, None]], axis=1)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def _sample_distortion(
    rng: np.random.Generator, image_size: int, placed: Sequence[PlacedShape]
) -> dict[str, Any]:
    """Random rotation (+-40 deg), scale (0.7-1.1), translation (+-15 %) keeping objects in view.

    Up to 20 draws; the first that keeps every object wholly inside the image with clear-cut
    relations wins. If none does (rare) the scene is left as it is (identity parameters).
    """
    for _ in range(20):
        angle = float(rng.uniform(-40.0, 40.0))
        scale = float(rng.uniform(0.7, 1.1))
        shift = [float(v) for v in rng.uniform(-0.15, 0.15, size=2) * image_size]
        matrix = _affine(image_size, angle, scale, shift)
        outlines = [_apply(matrix, _outline(obj)) for obj in placed]
        inside = all(((pts >= 0) & (pts <= image_size)).all() for pts in outlines)
        # Box centres after the warp (to within a pixel of the drawn boxes' centres).
        moved = np.array([(pts.min(0) + pts.max(0)) / 2 for pts in outlines])
        clear = all(
            abs(abs(d[0]) - abs(d[1])) >= _TIE * image_size
            for i in range(len(placed))
            for d in moved[i] - moved[i + 1:]
        )
        if inside and clear:
            return {"angle": angle, "scale": scale, "translate": shift}
    return {"angle": 0.0, "scale": 1.0, "translate": [0.0, 0.0]}


def _render(
    rng: np.random.Generator,
    image_size: int,
    num_objects: int,
    clutter: bool,
    distort: bool,
) -> tuple[Image.Image, list[ShapeObject], dict[str, Any] | None]:
    """Draw one scene; return the image, its objects as seen and the distortion (if any).

    Each box is the exact pixel extent of its object in the final image: the object is drawn
    alone into a mask that goes through the same (nearest-neighbour) warp as the image.
    """
    size = (image_size, image_size)
    placed = _place(rng, image_size, num_objects)
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    if clutter:
        draw_clutter(rng, draw, image_size)
    for obj in placed:
        draw_shape(draw, obj, COLOUR_RGB[obj.colour])

    matrix = np.eye(2, 3)
    distortion = None
    if distort:
        distortion = _sample_distortion(rng, image_size, placed)
        matrix = _affine(
            image_size, distortion["angle"], distortion["scale"], distortion["translate"]
        )
    inverse = tuple(np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2].flatten())

    def warp(im: Image.Image, fill: tuple[int, int, int] | int) -> Image.Image:
        if distortion is None:
            return im
        return im.transform(
            size, Image.Transform.AFFINE, inverse, resample=Image.Resampling.NEAREST, fillcolor=fill
        )

    objects = []
    for obj in placed:
        mask = Image.new("L", size, 0)
        draw_shape(ImageDraw.Draw(mask), obj, 255)
        left, top, right, bottom = warp(mask, 0).getbbox() or (0, 0, 0, 0)
        bbox = (float(left), float(top), float(right - left), float(bottom - top))
        objects.append(ShapeObject(obj.shape, obj.colour, obj.size, bbox))
    return warp(image, BACKGROUND), objects, distortion


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _atomic_write_json(path: Path, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f)


def _split_paths(root: Path, split: str) -> tuple[Path, Path, Path]:
    annotations = root / "annotations"
    return (
        annotations / f"captions_{split}.json",
        annotations / f"instances_{split}.json",
        root / split / "images",
    )


def _write_split(
    root: Path,
    split: str,
    split_index: int,
    num_images: int,
    first_ids: tuple[int, int, int],
    params: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Render one split into a staging folder, move it into place; return the two COCO dicts.

    ``first_ids`` are the first image, caption and instance ids of the split.
    """
    staging = root / f".{split}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    size = params["image_size"]

    images: list[dict[str, Any]] = []
    captions: list[dict[str, Any]] = []
    instances: list[dict[str, Any]] = []
    distortions: list[dict[str, Any]] = []
    first_image_id, caption_id, instance_id = first_ids
    for i in range(num_images):
        # One generator per image: image i of a split does not depend on the split sizes.
        rng = np.random.default_rng([params["seed"], split_index, i])
        n = int(rng.integers(params["min_objects"], params["max_objects"] + 1))
        image, objects, distortion = _render(rng, size, n, params["clutter"], params["distort"])
        image_id = first_image_id + i
        file_name = f"{split}_{i:05d}.png"
        image.save(staging / "images" / file_name, format="PNG")
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})

        variants = describe(objects, size)
        k = min(int(rng.integers(3, 6)), len(variants))
        others = rng.choice(np.arange(1, len(variants)), size=k - 1, replace=False)
        for text in [variants[0], *(variants[j] for j in others)]:
            captions.append({"id": caption_id, "image_id": image_id, "caption": text})
            caption_id += 1
        for obj in objects:
            instances.append({
                "id": instance_id,
                "image_id": image_id,
                "category_id": SHAPES.index(obj.shape) + 1,
                "bbox": list(obj.bbox),
                "area": round(obj.bbox[2] * obj.bbox[3], 2),
                "iscrowd": 0,
                "attributes": {"colour": obj.colour, "size": obj.size},
            })
            instance_id += 1
        if distortion is not None:
            distortions.append({"image_id": image_id, **distortion})

    target = root / split
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)

    info = {"description": f"synthetic shapes captions, {split} split", "version": VERSION,
            "parameters": params}
    captions_json = {"info": info, "licenses": [], "images": images, "annotations": captions}
    instances_json: dict[str, Any] = {
        "info": info,
        "images": images,
        "annotations": instances,
        "categories": [{"id": j + 1, "name": name} for j, name in enumerate(SHAPES)],
    }
    if params["distort"]:
        instances_json["distortions"] = distortions  # forward affine of each image, for STN studies
    return captions_json, instances_json


def make_shapes_dataset(
    root: str | Path,
    num_train: int = 2000,
    num_val: int = 200,
    num_test: int = 200,
    image_size: int = 64,
    seed: int = 0,
    clutter: bool = False,
    distort: bool = False,
    min_objects: int = 1,
    max_objects: int = 3,
) -> dict[str, tuple[Path, Path, Path]]:
    """Generate (or reuse) the synthetic shapes captioning set under ``root``.

    Output is byte-identical for identical arguments. If ``root/manifest.json`` records the
    same arguments the files are reused as they are; otherwise old splits are removed and the
    set regenerated (with a warning when a finished set of other options is replaced: a run
    still reading it would read other images). A finished set is reused without writing
    anything (a read-only root works); one to generate is checked again and generated under
    ``root/.lock`` (POSIX ``flock``; no lock elsewhere), so processes sharing ``root`` generate
    it once. Each split is rendered in a staging folder and moved into place, JSON files are
    written to a temporary name and renamed, and the manifest is written last, so an
    interrupted run is never mistaken for a finished one.

    Args:
        root: Output folder (created if needed).
        num_train: Number of training images.
        num_val: Number of validation images.
        num_test: Number of test images.
        image_size: Side of the square RGB images in pixels (at least 32).
        seed: Non-negative seed of the generator.
        clutter: Add grey specks and thin grey lines that are not objects.
        distort: Rotate (+-40 deg), scale (0.7-1.1) and translate (+-15 %) each whole scene;
            boxes are transformed with it.
        min_objects: Fewest objects in an image (at least 1).
        max_objects: Most objects in an image (at most ``MAX_OBJECTS``).

    Returns:
        ``{split: (captions_json, instances_json, image_dir)}`` for ``"train"``, ``"val"`` and
        ``"test"``; COCO ``file_name`` entries are relative to ``image_dir``.

    Raises:
        ValueError: If an argument is out of range.
    """
    counts = {"train": num_train, "val": num_val, "test": num_test}
    if any(n < 0 for n in counts.values()):
        raise ValueError(f"split sizes must be non-negative, got {counts}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(
            f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, "
            f"got {min_objects} and {max_objects}"
        )

    root = Path(root)
    params: dict[str, Any] = {
        "num_train": int(num_train), "num_val": int(num_val), "num_test": int(num_test),
        "image_size": int(image_size), "seed": int(seed), "clutter": bool(clutter),
        "distort": bool(distort), "min_objects": int(min_objects), "max_objects": int(max_objects),
    }
    paths = {split: _split_paths(root, split) for split in SPLITS}
    if _made_with(root, params, paths)[0]:  # reused as it is: nothing written (a read-only
        return paths  # root works)
    root.mkdir(parents=True, exist_ok=True)
    with _generation_lock(root):  # a second process waits, then finds the set made
        made, other = _made_with(root, params, paths)
        if not made:
            if other is not None:
                changed = ", ".join(f"{k} {other.get(k)!r} -> {v!r}" for k, v in params.items()
                                    if other.get(k) != v)
                warnings.warn(f"{root}: the shapes set there was made with other options "
                              f"({changed}) and is generated again; a run still reading it now "
                              "reads other images. Give each set of options its own root",
                              stacklevel=2)
            # the manifest goes first: a half-regenerated set must never look finished
            (root / "manifest.json").unlink(missing_ok=True)
            _generate(root, params, counts, paths)
    return paths


def _made_with(root: Path, params: dict[str, Any], paths: dict[str, tuple[Path, ...]],
               ) -> tuple[bool, dict[str, Any] | None]:
    """``(made, other)``: whether ``root`` holds a complete set made with ``params``, and the
    options of a complete set made with others (which a regeneration replaces), if it holds
    one."""
    try:
        old = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False, None
    old_params = old.get("parameters") if isinstance(old, dict) else None
    if not isinstance(old_params, dict) or old.get("version") != VERSION or not all(
            p.exists() for triple in paths.values() for p in triple):
        return False, None
    return old_params == params, None if old_params == params else old_params


@contextlib.contextmanager
def _generation_lock(root: Path) -> Iterator[None]:
    """Hold ``root/.lock`` exclusively while a set is checked and generated (POSIX ``flock``,
    waiting for another process's generation; released if the process dies). Without POSIX
    locks, or where the lock file cannot be opened, there is no lock."""
    try:
        import fcntl

        handle = open(root / ".lock", "a")  # noqa: SIM115 - closed below
    except (ImportError, OSError):
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _generate(root: Path, params: dict[str, Any], counts: dict[str, int],
              paths: dict[str, tuple[Path, ...]]) -> None:
    """Write the three splits and then the manifest (last: it marks the set finished)."""
    manifest = {"version": VERSION, "parameters": params}
    for split in SPLITS:
        shutil.rmtree(root / split, ignore_errors=True)
        for p in paths[split][:2]:
            p.unlink(missing_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)

    image_id = caption_id = instance_id = 1  # ids unique across splits
    for split_index, split in enumerate(SPLITS):
        captions_json, instances_json = _write_split(
            root, split, split_index, counts[split], (image_id, caption_id, instance_id), params
        )
        _atomic_write_json(paths[split][0], captions_json)
        _atomic_write_json(paths[split][1], instances_json)
        image_id += counts[split]
        caption_id += len(captions_json["annotations"])
        instance_id += len(instances_json["annotations"])
    manifest["splits"] = {
        split: {
            "num_images": counts[split],
            "captions": str(paths[split][0].relative_to(root)),
            "instances": str(paths[split][1].relative_to(root)),
            "image_dir": str(paths[split][2].relative_to(root)),
        }
        for split in SPLITS
    }
    _atomic_write_json(root / "manifest.json", manifest)
