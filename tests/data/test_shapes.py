"""Tests for the synthetic shapes captioning data set (``captioner.data.shapes``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from captioner.data.shapes import (
    CAPTION_WORDS,
    COLOUR_RGB,
    COLOURS,
    SHAPES,
    SIZES,
    SPLITS,
    make_shapes_dataset,
    object_words,
)

SMALL = {"num_train": 12, "num_val": 4, "num_test": 4, "seed": 0}


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, Path]]:
    return make_shapes_dataset(tmp_path_factory.mktemp("plain"), **SMALL)


@pytest.fixture(scope="module")
def distorted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, Path]]:
    return make_shapes_dataset(
        tmp_path_factory.mktemp("distorted"), **SMALL, distort=True, clutter=True
    )


def _load(paths: tuple[Path, Path, Path]) -> tuple[dict[str, Any], dict[str, Any], Path]:
    captions, instances, image_dir = paths
    return json.loads(captions.read_text()), json.loads(instances.read_text()), image_dir


def _scenes(paths: tuple[Path, Path, Path]) -> list[tuple[np.ndarray, list[dict], list[str]]]:
    """(pixels (H, W, 3), object annotations, captions) per image of a split."""
    captions, instances, image_dir = _load(paths)
    objects: dict[int, list[dict]] = {}
    for ann in instances["annotations"]:
        objects.setdefault(ann["image_id"], []).append(ann)
    texts: dict[int, list[str]] = {}
    for ann in captions["annotations"]:
        texts.setdefault(ann["image_id"], []).append(ann["caption"])
    return [
        (
            np.asarray(Image.open(image_dir / image["file_name"]).convert("RGB")),
            objects[image["id"]],
            texts[image["id"]],
        )
        for image in captions["images"]
    ]


def _shape_name(ann: dict) -> str:
    return SHAPES[ann["category_id"] - 1]


def _centre(ann: dict) -> tuple[float, float]:
    x, y, w, h = ann["bbox"]
    return x + w / 2, y + h / 2


def _parse_chain(caption: str) -> tuple[list[tuple[str, str, str | None]], list[str]]:
    """``"a small red circle left of a blue square"`` -> ([(colour, shape, size)], [relation])."""
    tokens = caption.split()
    phrases: list[tuple[str, str, str | None]] = []
    relations: list[str] = []
    i = 0
    while i < len(tokens):
        assert tokens[i] == "a", caption
        size = tokens[i + 1] if tokens[i + 1] in SIZES else None
        j = i + 1 + (size is not None)
        phrases.append((tokens[j], tokens[j + 1], size))
        i = j + 2
        if i < len(tokens):
            n = 2 if tokens[i] in ("left", "right") else 1
            relations.append(" ".join(tokens[i:i + n]))
            i += n
    return phrases, relations


def _expected_relation(a: dict, b: dict) -> str:
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    dx, dy = ax - bx, ay - by
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _check_canonical(objects: list[dict], canonical: str) -> None:
    phrases, relations = _parse_chain(canonical)
    by_key = {(o["attributes"]["colour"], _shape_name(o)): o for o in objects}
    assert len(by_key) == len(objects)  # (colour, shape) unique within an image
    mentioned = [by_key[(colour, shape)] for colour, shape, _ in phrases]
    assert len(mentioned) == len(objects)
    assert [size for *_, size in phrases] == [o["attributes"]["size"] for o in mentioned]
    xs = [_centre(o)[0] for o in mentioned]
    assert xs == sorted(xs)  # ordered left to right
    for a, b, rel in zip(mentioned[:-1], mentioned[1:], relations):
        assert rel == _expected_relation(a, b), canonical


def _image_bytes(paths: dict[str, tuple[Path, Path, Path]]) -> list[bytes]:
    return [p.read_bytes() for split in SPLITS for p in sorted(paths[split][2].iterdir())]


def _json_text(paths: dict[str, tuple[Path, Path, Path]]) -> list[str]:
    return [p.read_text() for split in SPLITS for p in paths[split][:2]]


def test_constants_and_object_words() -> None:
    words = object_words()
    assert {w for w, kind in words.items() if kind == "shape"} == set(SHAPES)
    assert {w for w, kind in words.items() if kind == "colour"} == set(COLOURS)
    assert set(COLOUR_RGB) == set(COLOURS)
    assert len(set(COLOUR_RGB.values())) == len(COLOURS)
    assert set(words) <= CAPTION_WORDS


def test_deterministic_from_seed(
    tmp_path: Path, plain: dict[str, tuple[Path, Path, Path]]
) -> None:
    again = make_shapes_dataset(tmp_path / "again", **SMALL)
    assert _json_text(again) == _json_text(plain)
    assert _image_bytes(again) == _image_bytes(plain)
    other = make_shapes_dataset(tmp_path / "other", **{**SMALL, "seed": 1})
    assert _json_text(other) != _json_text(plain)
    assert _image_bytes(other) != _image_bytes(plain)


def test_files_are_coco(plain: dict[str, tuple[Path, Path, Path]]) -> None:
    image_ids: list[int] = []
    for split in SPLITS:
        captions, instances, image_dir = plain[split]
        assert captions.name == f"captions_{split}.json"
        assert image_dir == captions.parent.parent / split / "images"
        coco_caps, coco_inst = COCO(str(captions)), COCO(str(instances))
        ids = sorted(coco_caps.getImgIds())
        assert ids == sorted(coco_inst.getImgIds())
        assert len(ids) == SMALL[f"num_{split}"]
        assert [c["name"] for c in coco_inst.loadCats(coco_inst.getCatIds())] == list(SHAPES)
        for info in coco_caps.loadImgs(ids):
            assert info["file_name"] == f"{split}_{ids.index(info['id']):05d}.png"
            image = Image.open(image_dir / info["file_name"])
            assert image.mode == "RGB" and image.size == (info["width"], info["height"]) == (64, 64)
            assert 3 <= len(coco_caps.getAnnIds(imgIds=info["id"])) <= 5
            assert 1 <= len(coco_inst.getAnnIds(imgIds=info["id"])) <= 3
        image_ids += ids
    assert len(set(image_ids)) == len(image_ids)  # unique across splits
    manifest = json.loads((plain["train"][0].parent.parent / "manifest.json").read_text())
    assert manifest["parameters"]["seed"] == SMALL["seed"]


@pytest.mark.parametrize("fixture", ["plain", "distorted"])
def test_captions_name_every_object(fixture: str, request: pytest.FixtureRequest) -> None:
    for split in SPLITS:
        for _, objects, captions in _scenes(request.getfixturevalue(fixture)[split]):
            assert 3 <= len(captions) <= 5 and len(set(captions)) == len(captions)
            for caption in captions:
                assert caption == caption.lower() and not caption.endswith(".")
                tokens = caption.split()
                assert set(tokens) <= CAPTION_WORDS, caption  # clutter adds no words
                for obj in objects:
                    assert _shape_name(obj) in tokens and obj["attributes"]["colour"] in tokens
                assert sum(t in SHAPES for t in tokens) == len(objects)


@pytest.mark.parametrize("fixture", ["plain", "distorted"])
def test_boxes_hold_their_object(fixture: str, request: pytest.FixtureRequest) -> None:
    for split in SPLITS:
        for pixels, objects, _ in _scenes(request.getfixturevalue(fixture)[split]):
            size = pixels.shape[0]
            for obj in objects:
                x, y, w, h = obj["bbox"]
                assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= size and y + h <= size
                assert obj["area"] == pytest.approx(w * h)
                colour = np.array(COLOUR_RGB[obj["attributes"]["colour"]])
                inside = (pixels[int(y):int(y + h), int(x):int(x + w)] == colour).all(-1)
                assert inside.sum() > 0.25 * w * h  # mostly the object's colour
                # the box is tight: the object's colour reaches each of its four sides
                assert inside[0].any() and inside[-1].any()
                assert inside[:, 0].any() and inside[:, -1].any()
                if _shape_name(obj) in ("circle", "square", "cross"):
                    cx, cy = _centre(obj)
                    assert (pixels[int(cy), int(cx)] == colour).all()


def test_sizes_differ(plain: dict[str, tuple[Path, Path, Path]]) -> None:
    sides: dict[str, list[float]] = {"small": [], "large": []}
    for split in SPLITS:
        _, instances, _ = _load(plain[split])
        for obj in instances["annotations"]:
            sides[obj["attributes"]["size"]].append(max(obj["bbox"][2:]))
    assert sides["small"] and sides["large"]
    assert max(sides["small"]) < 0.25 * 64 < min(sides["large"])


@pytest.mark.parametrize("fixture", ["plain", "distorted"])
def test_canonical_relations_match_boxes(fixture: str, request: pytest.FixtureRequest) -> None:
    for split in SPLITS:
        for _, objects, captions in _scenes(request.getfixturevalue(fixture)[split]):
            _check_canonical(objects, captions[0])


def test_object_counts(tmp_path: Path) -> None:
    three = make_shapes_dataset(tmp_path / "three", num_train=10, num_val=0, num_test=0,
                                min_objects=3, max_objects=3)
    scenes = _scenes(three["train"])
    assert len(scenes) == 10 and all(len(objects) == 3 for _, objects, _ in scenes)
    for _, objects, captions in scenes:
        _check_canonical(objects, captions[0])
    one = make_shapes_dataset(tmp_path / "one", num_train=10, num_val=0, num_test=0,
                              min_objects=1, max_objects=1)
    for _, objects, captions in _scenes(one["train"]):
        assert len(objects) == 1
        obj = objects[0]
        assert captions[0] == f"a {obj['attributes']['size']} {obj['attributes']['colour']} " \
                              f"{_shape_name(obj)}"


def test_clutter_changes_pixels_not_captions(
    tmp_path: Path, plain: dict[str, tuple[Path, Path, Path]]
) -> None:
    cluttered = make_shapes_dataset(tmp_path, **SMALL, clutter=True)
    for split in SPLITS:
        for (clean_px, clean_objs, clean_caps), (px, objs, caps) in zip(
            _scenes(plain[split]), _scenes(cluttered[split])
        ):
            assert objs == clean_objs and caps[0] == clean_caps[0]
            assert (px != clean_px).any()
            changed = px[(px != clean_px).any(-1)]
            assert (changed[:, 0] == changed[:, 1]).all() and (changed[:, 1] == changed[:, 2]).all()


def test_distortion_warps_scenes(
    distorted: dict[str, tuple[Path, Path, Path]], plain: dict[str, tuple[Path, Path, Path]]
) -> None:
    _, instances, _ = _load(distorted["train"])
    angles = [d["angle"] for d in instances["distortions"]]
    assert len(angles) == SMALL["num_train"] and all(-40 <= a <= 40 for a in angles)
    assert all(0.7 <= d["scale"] <= 1.1 for d in instances["distortions"])
    boxes = [o["bbox"] for o in instances["annotations"]]
    assert boxes != [o["bbox"] for o in _load(plain["train"])[1]["annotations"]]


def test_idempotent_and_regenerates(tmp_path: Path) -> None:
    params = {"num_train": 6, "num_val": 2, "num_test": 2, "seed": 3}
    paths = make_shapes_dataset(tmp_path, **params)
    manifest = tmp_path / "manifest.json"
    watched = [manifest, *paths["train"][:2], *paths["train"][2].iterdir()]
    stamps = [p.stat().st_mtime_ns for p in watched]
    assert make_shapes_dataset(str(tmp_path), **params) == paths
    assert [p.stat().st_mtime_ns for p in watched] == stamps

    stale = tmp_path / "train" / "images" / "stale.png"
    stale.write_bytes(b"")
    # a set made with other options is replaced, with a warning (a run reading it would now
    # read other images: it was silent)
    with pytest.warns(UserWarning, match=r"made with other options \(num_train 6 -> 4\) and "
                                         r"is generated again; a run still reading it"):
        make_shapes_dataset(tmp_path, **{**params, "num_train": 4})
    assert not stale.exists()
    assert sorted(p.name for p in paths["train"][2].iterdir()) == [
        f"train_{i:05d}.png" for i in range(4)
    ]
    assert json.loads(manifest.read_text())["parameters"]["num_train"] == 4
    assert len(json.loads(paths["train"][0].read_text())["images"]) == 4
    assert [p.name for p in tmp_path.glob(".*")] == [".lock"]  # no staging or temporary files


@pytest.mark.parametrize(
    "kwargs",
    [{"num_train": -1}, {"image_size": 16}, {"seed": -1}, {"min_objects": 0},
     {"min_objects": 3, "max_objects": 2}, {"max_objects": 9}],
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        make_shapes_dataset(tmp_path, **kwargs)


def test_a_second_generation_waits_for_the_first(tmp_path: Path) -> None:
    """Two runs sharing a root (DDP ranks, two fits started together) generate one at a time:
    the second waits for the lock, then finds the set made and leaves it alone."""
    import threading
    import time

    from captioner.data.shapes import _generation_lock

    events = []
    held = threading.Event()

    def hold():
        with _generation_lock(tmp_path):
            held.set()
            time.sleep(0.5)
            events.append("released")

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    make_shapes_dataset(tmp_path, num_train=2, num_val=1, num_test=1)
    events.append("generated")
    holder.join()
    assert events == ["released", "generated"]


def test_a_finished_set_is_reused_without_writing_anything(tmp_path: Path, monkeypatch) -> None:
    """A set in a read-only root (shared, or another user's) was read with nothing written;
    the generation lock must not change that: it is taken only to generate."""
    import captioner.data.shapes as shapes

    params = {"num_train": 2, "num_val": 1, "num_test": 1}
    paths = make_shapes_dataset(tmp_path, **params)
    (tmp_path / ".lock").unlink()

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(args[0]))

    monkeypatch.setattr(shapes, "open", read_only, raising=False)
    monkeypatch.setattr(Path, "mkdir", read_only)
    assert make_shapes_dataset(tmp_path, **params) == paths
    assert not (tmp_path / ".lock").exists()
