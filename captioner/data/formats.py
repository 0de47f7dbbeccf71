"""Annotation formats -> a list of :class:`ImageRecord` (one per image, all its captions).

Three on-disk formats are read:

* **COCO** captions JSON (``captions_train2014.json``), optionally with a COCO *instances* JSON
  for object boxes (:func:`load_coco`; parsed and indexed with ``pycocotools``);
* **Karpathy** split JSON (``dataset_coco.json``, ``dataset_flickr8k.json``,
  ``dataset_flickr30k.json``) (:func:`load_karpathy`);
* the **Kaggle Flickr8k** ``captions.txt`` CSV, header ``image,caption``
  (:func:`load_kaggle_flickr8k`).

Broken files fail loudly with an :class:`AnnotationError` naming the file and the entry
(``captions.txt line 17: empty caption``). Structural faults (bad JSON, missing keys, unknown
split names) always raise. Bad *entries* (empty caption, image without captions, missing image
file, caption for an unknown image) raise too unless ``skip_bad=True``, in which case they are
dropped and summarised in a single :class:`AnnotationWarning` per file; ``skip_bad`` also
decodes every image once and drops those that cannot be read (corrupt, truncated, not images).

Records without an official split get one from :func:`assign_splits`.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from captioner.data.images import ImageLoadError, load_image
from captioner.data.tokenize import tokenize

__all__ = [
    "SPLITS",
    "Box",
    "ImageRecord",
    "AnnotationError",
    "AnnotationFileNotFound",
    "AnnotationWarning",
    "load_coco",
    "load_karpathy",
    "load_kaggle_flickr8k",
    "drop_unreadable",
    "image_load_error",
    "image_load_errors",
    "assign_splits",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
"""The split names records may carry (Karpathy's ``restval`` is folded into ``train``)."""

_KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


@dataclass
class Box:
    """One object annotation.

    Attributes:
        category: Category name (e.g. ``"circle"``, ``"dog"``).
        bbox: COCO ``(x, y, w, h)`` in pixels, top-left corner first.
        attributes: Optional extra labels, e.g. ``{"colour": "red", "size": "small"}``.
    """

    category: str
    bbox: tuple[float, float, float, float]
    attributes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bbox = tuple(float(v) for v in self.bbox)  # type: ignore[assignment]
        if len(self.bbox) != 4:
            raise ValueError(f"bbox must be (x, y, w, h), got {self.bbox}")


@dataclass
class ImageRecord:
    """One image and everything known about it.

    Attributes:
        image_id: Dataset image id (COCO id; Karpathy ``cocoid``/``imgid``; else running index).
        path: Image file.
        captions: Raw caption strings (stripped, never empty), in file order.
        split: ``"train"``, ``"val"``, ``"test"`` or ``None`` (not yet assigned).
        boxes: Object boxes (from a COCO instances file), in file order.
        width: Stored image width in pixels, when the annotation gives it.
        height: Stored image height in pixels, when the annotation gives it.
    """

    image_id: int
    path: Path
    captions: list[str]
    split: str | None = None
    boxes: list[Box] = field(default_factory=list)
    width: int | None = None
    height: int | None = None

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.split is not None and self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None, got {self.split!r}")


class AnnotationError(ValueError):
    """An annotation file is malformed; the message names the file and the entry."""


class AnnotationFileNotFound(AnnotationError, FileNotFoundError):
    """An annotation or captions file, or its image folder, is missing (also a
    ``FileNotFoundError``)."""


class AnnotationWarning(UserWarning):
    """Bad entries were skipped (``skip_bad=True``); one warning per file with the counts."""


class _Problems:
    """Raise on the first bad entry, or (``skip_bad``) count them all and warn once.

    Args:
        file: The annotation file, for messages.
        skip_bad: Count instead of raising.
    """

    def __init__(self, file: Path, skip_bad: bool) -> None:
        self.file = file
        self.skip_bad = skip_bad
        self.counts: Counter[str] = Counter()
        self.first: str | None = None

    def report(self, where: str, reason: str, detail: str = "") -> None:
        """Record one bad entry: ``<file> <where>: <reason>[: <detail>]``."""
        message = f"{self.file} {where}: {reason}" + (f": {detail}" if detail else "")
        if not self.skip_bad:
            raise AnnotationError(message + " (pass skip_bad=True to skip bad entries)")
        self.counts[reason] += 1
        self.first = self.first or message

    def warn(self) -> None:
        """Emit the single summary warning, if anything was skipped."""
        if self.counts:
            summary = ", ".join(f"{n} x {reason}" for reason, n in self.counts.items())
            warnings.warn(
                f"{self.file}: skipped {summary} (first: {self.first})",
                AnnotationWarning,
                stacklevel=3,
            )


# ---------------------------------------------------------------------------- JSON helpers
def image_load_error(path: Path) -> str | None:
    """Why :func:`~captioner.data.images.load_image` rejects ``path``, or ``None``."""
    try:
        load_image(path)
    except ImageLoadError as e:
        return e.reason
    return None


def image_load_errors(paths: Sequence[Path]) -> list[str | None]:
    """:func:`image_load_error` of each path, decoded in threads (Pillow releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(image_load_error, paths))


def _readable(records: list[ImageRecord], problems: _Problems) -> list[ImageRecord]:
    """With ``skip_bad``, decode every image once and drop (and count) those that cannot be
    read: corrupt, truncated or not images at all. Threads, as Pillow decodes without the GIL;
    about 2 ms per image and core for Flickr-sized JPEGs. Without ``skip_bad`` images are
    decoded when a batch needs them, where an unreadable one raises
    :class:`~captioner.data.images.ImageLoadError` naming the file."""
    if not problems.skip_bad or not records:
        return records
    errors = image_load_errors([r.path for r in records])
    kept = []
    for record, error in zip(records, errors):
        if error is None:
            kept.append(record)
        else:
            problems.report(f"({record.path.name})", "unreadable image", error)
    return kept


def drop_unreadable(records: list[ImageRecord], source: str | os.PathLike[str]
                    ) -> list[ImageRecord]:
    """The records whose image :func:`~captioner.data.images.load_image` can decode; the others
    are dropped and counted in one :class:`AnnotationWarning` naming ``source``. (What the
    loaders do with ``skip_bad`` and ``check_images``, for a subset chosen afterwards.)"""
    problems = _Problems(Path(source), skip_bad=True)
    kept = _readable(records, problems)
    problems.warn()
    return kept


def _require_image_folder(path: Path, image_dir: Path, file: Path) -> None:
    """Called for a missing image ``path``: a missing image folder is named as one (every
    image of ``file`` was reported as a missing image file, or with ``skip_bad`` skipped until
    the split was empty). Entries naming absolute paths elsewhere do not need the folder."""
    if not image_dir.is_dir() and path.is_relative_to(image_dir):
        raise AnnotationFileNotFound(f"image folder not found: {image_dir} (the images of {file})")


def _read_json(file: Path) -> Any:
    """Parse a JSON file; syntax errors become :class:`AnnotationError` naming the file."""
    if not file.is_file():
        raise AnnotationFileNotFound(f"annotation file not found: {file}")
    try:
        with file.open(encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{file}: malformed JSON: {e}") from None
    except UnicodeDecodeError:
        raise _not_utf8(file) from None


def _not_utf8(file: Path) -> AnnotationError:
    """The error for ``file`` that is not UTF-8, naming the line of its first bad byte (the
    decoder's own position is an offset into the chunk it was reading, not into the file)."""
    raw = file.read_bytes()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start
        line = raw[:at].count(b"\n") + 1
        return AnnotationError(f"{file} line {line}: not UTF-8 text "
                               f"({e.reason}: byte {raw[at]:#04x} at offset {at})")
    return AnnotationError(f"{file}: not UTF-8 text")  # changed since: no position to give


def _require_list(data: Any, key: str, file: Path) -> list[Any]:
    """``data[key]``, which must exist and be a list (``data`` must be an object)."""
    if not isinstance(data, dict):
        raise AnnotationError(
            f"{file}: expected a JSON object at top level, got {type(data).__name__}"
        )
    if key not in data:
        raise AnnotationError(f"{file}: missing top-level key '{key}'")
    if not isinstance(data[key], list):
        raise AnnotationError(f"{file}: '{key}' must be a list, got {type(data[key]).__name__}")
    return data[key]


def _require_keys(entry: Any, keys: tuple[str, ...], where: str, file: Path) -> None:
    """Check that a JSON entry is an object holding ``keys``."""
    if not isinstance(entry, dict):
        raise AnnotationError(f"{file} {where}: expected an object, got {type(entry).__name__}")
    for key in keys:
        if key not in entry:
            raise AnnotationError(f"{file} {where}: missing key '{key}'")


def _as_int(value: Any, what: str, where: str, file: Path) -> int:
    """An integer id (bools and non-integral numbers rejected)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise AnnotationError(f"{file} {where}: {what} must be an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise AnnotationError(f"{file} {where}: {what} must be an integer, got {value!r}") from None


def _optional_int(value: Any) -> int | None:
    """Width/height: an int when given as a finite number, else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value)


def _coco_index(dataset: dict[str, Any]) -> COCO:
    """A ``pycocotools`` index over an already validated dataset dict (its prints silenced)."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# ---------------------------------------------------------------------------- COCO
def load_coco(
    annotation_file: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    split: str | None = None,
    instances_file: str | os.PathLike[str] | None = None,
    skip_bad: bool = False,
    check_images: bool = True,
    image_exists: Callable[[Path], bool] = Path.is_file,
) -> list[ImageRecord]:
    """Read a COCO captions JSON (and optionally the matching instances JSON).

    Captions format: ``{"images": [{"id", "file_name", "width"?, "height"?}],
    "annotations": [{"image_id", "caption", "id"?}]}``. Instances format:
    ``{"annotations": [{"image_id", "bbox": [x, y, w, h], "category_id", "attributes"?}],
    "categories": [{"id", "name"}]}``; boxes of images absent from the captions file are ignored.

    Args:
        annotation_file: The captions JSON.
        image_dir: Folder holding the ``file_name`` images.
        split: Split given to every record (``None``: leave for :func:`assign_splits`).
        instances_file: Optional instances JSON that fills :attr:`ImageRecord.boxes`.
        skip_bad: Skip (and count in one warning) empty captions, captions of unknown images,
            images without captions and missing image files, instead of raising.
        check_images: with ``skip_bad``, also decode every image once and skip those that
            cannot be read (corrupt, truncated, not images); ``False`` leaves that to the
            caller (:func:`drop_unreadable`).
        image_exists: whether an image is there (its file; the cached-feature data modules
            also take an image whose grid their cache holds, its file deleted since).

    Returns:
        One record per image, in the order of the ``images`` list.

    Raises:
        AnnotationError: On malformed JSON, missing keys, or (without ``skip_bad``) bad entries.
        FileNotFoundError: If an annotation file does not exist.
    """
    file = Path(annotation_file)
    image_dir = Path(image_dir)
    data = _read_json(file)
    images = _require_list(data, "images", file)
    annotations = _require_list(data, "annotations", file)
    problems = _Problems(file, skip_bad)

    positions: dict[int, int] = {}  # image id -> position in `images`
    for i, image in enumerate(images):
        _require_keys(image, ("id", "file_name"), f"images[{i}]", file)
        image_id = _as_int(image["id"], "'id'", f"images[{i}]", file)
        if image_id in positions:
            raise AnnotationError(f"{file} images[{i}]: duplicate image id {image_id}")
        positions[image_id] = i

    kept: list[dict[str, Any]] = []
    annotation_ids: dict[Any, int] = {}  # COCO's own annotation id -> its position
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]"
        _require_keys(ann, ("image_id", "caption"), where, file)
        if isinstance(ann.get("id"), (int, str)):  # a file concatenated with itself repeats all
            if ann["id"] in annotation_ids:
                problems.report(where, "duplicate annotation id",
                                f"{ann['id']!r}, as annotations[{annotation_ids[ann['id']]}]")
                continue
            annotation_ids[ann["id"]] = i
        image_id = _as_int(ann["image_id"], "'image_id'", where, file)
        caption = ann["caption"]
        if not isinstance(caption, str):
            raise AnnotationError(f"{file} {where}: 'caption' must be a string, got {caption!r}")
        if image_id not in positions:
            problems.report(where, "caption for an unknown image", f"image_id {image_id}")
        elif not tokenize(caption):  # empty, or punctuation only
            problems.report(f"{where} (image_id {image_id})", "empty caption",
                            repr(caption[:60]))
        else:
            kept.append({"id": i, "image_id": image_id, "caption": caption.strip()})

    coco = _coco_index({"images": [{"id": k} for k in positions], "annotations": kept})
    boxes = _load_coco_boxes(Path(instances_file), set(positions)) if instances_file else {}

    records: list[ImageRecord] = []
    for image_id, i in positions.items():
        image = images[i]
        captions = [ann["caption"] for ann in coco.imgToAnns.get(image_id, [])]
        path = image_dir / str(image["file_name"])
        where = f"images[{i}] ({image['file_name']})"
        if not captions:
            problems.report(where, "image without captions")
        elif not image_exists(path):
            _require_image_folder(path, image_dir, file)
            problems.report(where, "image file not found", str(path))
        else:
            records.append(
                ImageRecord(
                    image_id=image_id,
                    path=path,
                    captions=captions,
                    split=split,
                    boxes=boxes.get(image_id, []),
                    width=_optional_int(image.get("width")),
                    height=_optional_int(image.get("height")),
                )
            )
    if check_images:
        records = _readable(records, problems)
    problems.warn()
    return records


def _load_coco_boxes(file: Path, image_ids: set[int]) -> dict[int, list[Box]]:
    """Boxes per image id from a COCO instances JSON (only for ``image_ids``)."""
    data = _read_json(file)
    annotations = _require_list(data, "annotations", file)
    categories = _require_list(data, "categories", file)
    names: dict[int, str] = {}
    for i, cat in enumerate(categories):
        _require_keys(cat, ("id", "name"), f"categories[{i}]", file)
        category_id = _as_int(cat["id"], "'id'", f"categories[{i}]", file)
        if category_id in names:
            raise AnnotationError(f"{file} categories[{i}]: duplicate category id "
                                  f"{category_id} ({names[category_id]!r} and {cat['name']!r})")
        names[category_id] = str(cat["name"])

    kept: list[dict[str, Any]] = []
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]"
        _require_keys(ann, ("image_id", "bbox", "category_id"), where, file)
        image_id = _as_int(ann["image_id"], "'image_id'", where, file)
        category_id = _as_int(ann["category_id"], "'category_id'", where, file)
        bbox = ann["bbox"]
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
        ):
            raise AnnotationError(
                f"{file} {where}: 'bbox' must be [x, y, w, h] numbers, got {bbox!r}"
            )
        if category_id not in names:
            raise AnnotationError(f"{file} {where}: unknown category_id {category_id}")
        attributes = ann.get("attributes", {})
        if not isinstance(attributes, dict):
            raise AnnotationError(
                f"{file} {where}: 'attributes' must be an object, got {attributes!r}"
            )
        if image_id in image_ids:
            kept.append(
                {"id": i, "image_id": image_id, "category_id": category_id, "bbox": bbox,
                 "attributes": attributes}
            )

    coco = _coco_index(
        {
            "images": [{"id": k} for k in image_ids],
            "annotations": kept,
            "categories": [{"id": k, "name": v} for k, v in names.items()],
        }
    )
    return {
        image_id: [
            Box(coco.cats[a["category_id"]]["name"], tuple(a["bbox"]), dict(a["attributes"]))
            for a in anns
        ]
        for image_id, anns in coco.imgToAnns.items()
    }


# ---------------------------------------------------------------------------- Karpathy
def load_karpathy(
    json_file: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    skip_bad: bool = False,
    check_images: bool = True,
    image_exists: Callable[[Path], bool] = Path.is_file,
) -> list[ImageRecord]:
    """Read a Karpathy split JSON (``dataset_coco.json``, ``dataset_flickr8k.json``, ...).

    Format: ``{"images": [{"filepath"?, "filename", "split"?, "sentences": [{"raw", "tokens"}],
    "imgid"?, "cocoid"?}]}``. The image is ``image_root / filepath / filename``. ``restval`` counts
    as ``train``; a missing split is ``None``. A sentence's ``raw`` text is used (its ``tokens``
    only when ``raw`` is absent), so all datasets are tokenised by the same tokeniser.

    Args:
        json_file: The JSON file.
        image_root: Folder the ``filepath``/``filename`` are relative to.
        skip_bad: Skip (and count in one warning) empty captions, images without captions and
            missing image files, instead of raising.
        check_images: with ``skip_bad``, also decode every image once and skip those that
            cannot be read (corrupt, truncated, not images); ``False`` leaves that to the
            caller (:func:`drop_unreadable`).
        image_exists: whether an image is there (its file; the cached-feature data modules
            also take an image whose grid their cache holds, its file deleted since).

    Returns:
        One record per image, in file order.

    Raises:
        AnnotationError: On malformed JSON, missing keys, unknown split names, or (without
            ``skip_bad``) bad entries.
        FileNotFoundError: If the JSON file does not exist.
    """
    file = Path(json_file)
    image_root = Path(image_root)
    images = _require_list(_read_json(file), "images", file)
    problems = _Problems(file, skip_bad)
    records: list[ImageRecord] = []
    seen: set[int] = set()
    for i, image in enumerate(images):
        _require_keys(image, ("filename", "sentences"), f"images[{i}]", file)
        where = f"images[{i}] ({image['filename']})"
        split = image.get("split")
        if split is not None and (not isinstance(split, str) or split not in _KARPATHY_SPLITS):
            raise AnnotationError(
                f"{file} {where}: unknown split {split!r}, expected one of {list(_KARPATHY_SPLITS)}"
            )
        sentences = image["sentences"]
        if not isinstance(sentences, list):
            raise AnnotationError(f"{file} {where}: 'sentences' must be a list")
        captions: list[str] = []
        for j, sentence in enumerate(sentences):
            text = _karpathy_text(sentence, f"{where} sentences[{j}]", file)
            if tokenize(text):
                captions.append(text)
            else:  # empty, or punctuation only
                problems.report(f"{where} sentences[{j}]", "empty caption", repr(text[:60]))
        raw_id = image.get("cocoid", image.get("imgid", i))
        path = image_root / str(image.get("filepath", "")) / str(image["filename"])
        if not captions:
            problems.report(where, "image without captions")
        elif not image_exists(path):
            _require_image_folder(path, image_root, file)
            problems.report(where, "image file not found", str(path))
        else:
            image_id = _as_int(raw_id, "image id", where, file)
            if image_id in seen:  # evaluation keys images by id: two would be merged
                raise AnnotationError(f"{file} {where}: duplicate image id {image_id}")
            seen.add(image_id)
            records.append(
                ImageRecord(
                    image_id=image_id,
                    path=path,
                    captions=captions,
                    split=None if split is None else _KARPATHY_SPLITS[split],
                )
            )
    if check_images:
        records = _readable(records, problems)
    problems.warn()
    return records


def _karpathy_text(sentence: Any, where: str, file: Path) -> str:
    """The stripped caption text of one Karpathy sentence (``raw``, else joined ``tokens``)."""
    if not isinstance(sentence, dict) or ("raw" not in sentence and "tokens" not in sentence):
        raise AnnotationError(f"{file} {where}: expected an object with 'raw' or 'tokens'")
    if "raw" in sentence:
        if not isinstance(sentence["raw"], str):
            raise AnnotationError(f"{file} {where}: 'raw' must be a string")
        return sentence["raw"].strip()
    tokens = sentence["tokens"]
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise AnnotationError(f"{file} {where}: 'tokens' must be a list of strings")
    return " ".join(tokens).strip()


# ---------------------------------------------------------------------------- Kaggle Flickr8k
def load_kaggle_flickr8k(
    captions_file: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    skip_bad: bool = False,
    check_images: bool = True,
    image_exists: Callable[[Path], bool] = Path.is_file,
) -> list[ImageRecord]:
    """Read the Kaggle Flickr8k ``captions.txt`` (CSV, header ``image,caption``).

    Captions may be quoted and contain commas and doubled quotes (``csv`` rules). An unquoted
    caption containing commas (more than two fields) is re-joined with commas, since image file
    names never contain them. Blank lines are ignored. Records have ``split=None`` and image ids
    ``0, 1, ...`` in order of first appearance; captions keep file order.

    Args:
        captions_file: The CSV file.
        image_dir: Folder holding the images.
        skip_bad: Skip (and count in one warning) rows without a caption, empty captions and
            missing image files, instead of raising.
        check_images: with ``skip_bad``, also decode every image once and skip those that
            cannot be read (corrupt, truncated, not images); ``False`` leaves that to the
            caller (:func:`drop_unreadable`).
        image_exists: whether an image is there (its file; the cached-feature data modules
            also take an image whose grid their cache holds, its file deleted since).

    Returns:
        One record per image, in order of first appearance.

    Raises:
        AnnotationError: On a wrong header or undecodable CSV, or (without ``skip_bad``) bad rows;
            messages give the 1-based line number.
        FileNotFoundError: If the CSV file does not exist.
    """
    file = Path(captions_file)
    image_dir = Path(image_dir)
    if not file.is_file():
        raise AnnotationFileNotFound(f"captions file not found: {file}")
    problems = _Problems(file, skip_bad)
    captions: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    repeated: list[int] = []  # lines that repeat an earlier (image, caption) row exactly
    end = 0  # the last line of the last record read (the header is line 1)
    try:
        with file.open(encoding="utf-8-sig", newline="") as f:
            # a long caption is cut in training (max_caption_length), not a CSV error: csv's
            # default field limit is 128 KiB
            csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
            reader = csv.reader(f, strict=True)  # an unclosed quote is an error, not a merge
            header = next(reader, None)
            if header is None or [h.strip().lower() for h in header] != ["image", "caption"]:
                raise AnnotationError(
                    f"{file} line 1: expected header 'image,caption', got {header}"
                )
            end = reader.line_num
            for row in reader:
                line, end = end + 1, reader.line_num  # a quoted caption may span several lines
                where = f"line {line}"
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) < 2:
                    problems.report(where, "expected 'image,caption'", repr(row[0][:60]))
                    continue
                image, caption = row[0].strip(), ",".join(row[1:]).strip()
                if not image:
                    problems.report(where, "empty image name")
                elif not tokenize(caption):  # empty, or punctuation only
                    problems.report(where, "empty caption", repr(caption[:60]))
                else:
                    if caption in captions.get(image, ()):
                        repeated.append(line)
                    captions.setdefault(image, []).append(caption)
                    first_line.setdefault(image, line)
    except csv.Error as e:  # the record starts after the last one read (an unclosed quote
        # runs to the end of the file: reader.line_num would name the last line)
        raise AnnotationError(f"{file} line {end + 1}: malformed CSV (the record starting "
                              f"there, read to line {reader.line_num}): {e}") from None
    except UnicodeDecodeError:
        raise _not_utf8(file) from None
    if repeated:  # kept (two annotators may write the same words), but a merged file says so
        warnings.warn(f"{file}: {len(repeated)} rows repeat an earlier row of the same image "
                      f"exactly (first: line {repeated[0]}); a file concatenated with itself "
                      "would count every caption twice", AnnotationWarning, stacklevel=2)

    records: list[ImageRecord] = []
    for image, texts in captions.items():
        path = image_dir / image
        if not image_exists(path):
            _require_image_folder(path, image_dir, file)
            where = f"line {first_line[image]} ({image})"
            problems.report(where, "image file not found", str(path))
            continue
        records.append(ImageRecord(image_id=len(records), path=path, captions=texts))
    if check_images:
        records = _readable(records, problems)
    problems.warn()
    return records


# ---------------------------------------------------------------------------- splits
def _split_key(record: ImageRecord, seed: int) -> tuple[str, str]:
    """Process-independent sort key: SHA-1 of seed and file name (path breaks ties)."""
    digest = hashlib.sha1(f"{seed}\0{record.path.name}".encode("utf-8")).hexdigest()
    return digest, str(record.path)


def assign_splits(
    records: list[ImageRecord],
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    method: str = "rank",
) -> list[ImageRecord]:
    """Give a deterministic split to every record whose ``split`` is ``None``.

    ``method="rank"`` (the default): unsplit records are ranked by ``sha1(seed, file name)``; the
    first ``round(test_fraction * n)`` become ``test``, the next ``round(val_fraction * n)``
    ``val``, the rest ``train`` (a non-zero fraction gets at least one image once ``n >= 3``;
    a split left empty is warned of).
    Counts are exact, but adding or removing an image shifts the boundaries, so that a few other
    images change split (8 of 20 single-image additions to the 798-image Flickr8k subset moved
    one or two): a model trained before the change then has training images in the new
    val/test.

    ``method="hash"``: each image's split follows from its own hash alone, ``u = sha1(seed, file
    name) / 2^160`` in ``[0, 1)``: ``test`` if ``u < test_fraction``, ``val`` if ``u <
    test_fraction + val_fraction``, else ``train``. Adding or removing images never moves the
    others (for data sets that grow); counts are then binomial around the fractions (a split
    may be empty for a handful of images).

    Either way the split depends only on file names and ``seed`` (not on ``hash()``, file order,
    the machine or the Python process), so the same images always get the same splits.

    Args:
        records: Records; those with a split keep it.
        val_fraction: Fraction of the unsplit records for validation.
        test_fraction: Fraction of the unsplit records for test.
        seed: Changes the ranking.
        method: ``"rank"`` or ``"hash"`` (above).

    Returns:
        New records (the inputs are not modified), in the input order.

    Raises:
        ValueError: If the fractions are negative or sum to 1 or more, or ``method`` is unknown.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            "need val_fraction, test_fraction >= 0 with sum < 1, "
            f"got {val_fraction}, {test_fraction}"
        )
    if method not in ("rank", "hash"):
        raise ValueError(f"split method must be 'rank' or 'hash', got {method!r}")
    unsplit = [i for i, r in enumerate(records) if r.split is None]
    if method == "hash":
        def own_split(record: ImageRecord) -> str:
            u = int(_split_key(record, seed)[0], 16) / 2.0**160  # [0, 1)
            return ("test" if u < test_fraction else
                    "val" if u < test_fraction + val_fraction else "train")

        out = [dataclasses.replace(r, split=own_split(r)) if r.split is None else r
               for r in records]
        _warn_of_empty_splits(Counter(out[i].split for i in unsplit), len(unsplit),
                              val_fraction, test_fraction, method)
        return out
    n = len(unsplit)
    counts = {"test": round(test_fraction * n), "val": round(val_fraction * n)}
    for name, fraction in (("test", test_fraction), ("val", val_fraction)):
        if fraction > 0 and counts[name] == 0 and n >= 3:
            counts[name] = 1
    ranked = sorted(unsplit, key=lambda i: _split_key(records[i], seed))
    chosen: dict[int, str] = {}
    for rank, i in enumerate(ranked):
        if rank < counts["test"]:
            chosen[i] = "test"
        elif rank < counts["test"] + counts["val"]:
            chosen[i] = "val"
        else:
            chosen[i] = "train"
    _warn_of_empty_splits(Counter(chosen.values()), n, val_fraction, test_fraction, method)
    return [
        dataclasses.replace(r, split=chosen[i]) if i in chosen else r
        for i, r in enumerate(records)
    ]


def _warn_of_empty_splits(counts: Counter, n: int, val_fraction: float, test_fraction: float,
                          method: str) -> None:
    """One :class:`AnnotationWarning` per split that a non-zero fraction left without images
    (1 or 2 unsplit images with ``rank``; a few with ``hash``): validating or testing on it
    would otherwise fail later, or score nothing, without saying why."""
    for split, fraction in (("val", val_fraction), ("test", test_fraction)):
        if n and fraction > 0 and not counts.get(split):
            warnings.warn(f"the {split} split gets none of the {n} unsplit image(s) "
                          f"({split}_fraction {fraction}, split_method {method!r}): give more "
                          "images, or a split of its own", AnnotationWarning, stacklevel=3)
