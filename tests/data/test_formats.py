"""Tests for captioner.data.formats."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from captioner.data.formats import (
    AnnotationError,
    AnnotationWarning,
    Box,
    ImageRecord,
    assign_splits,
    load_coco,
    load_kaggle_flickr8k,
    load_karpathy,
)


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (3, 5), (200, 30, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


JPEG = _jpeg_bytes()


def _touch(folder: Path, *names: str, data: bytes = JPEG) -> None:
    """Image files (a small valid JPEG unless ``data`` says otherwise)."""
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def _write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _coco(tmp_path: Path) -> tuple[Path, Path, Path]:
    images = tmp_path / "images"
    _touch(images, "a.jpg", "b.jpg")
    captions = _write_json(
        tmp_path / "captions.json",
        {
            "images": [
                {"id": 7, "file_name": "a.jpg", "width": 13, "height": 11},
                {"id": 3, "file_name": "b.jpg"},
            ],
            "annotations": [
                {"id": 1, "image_id": 7, "caption": "A dog. "},
                {"id": 2, "image_id": 3, "caption": "A cat."},
                {"id": 5, "image_id": 7, "caption": "A brown dog."},
            ],
        },
    )
    instances = _write_json(
        tmp_path / "instances.json",
        {
            "annotations": [
                {"id": 1, "image_id": 7, "bbox": [1, 2, 3, 4], "category_id": 2,
                 "attributes": {"colour": "brown"}},
                {"id": 2, "image_id": 7, "bbox": [0.5, 0, 5, 6], "category_id": 1},
                {"id": 3, "image_id": 99, "bbox": [0, 0, 1, 1], "category_id": 1},  # unknown image
            ],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        },
    )
    return captions, instances, images


# ---------------------------------------------------------------------------- COCO
def test_load_coco(tmp_path: Path) -> None:
    captions, instances, images = _coco(tmp_path)
    records = load_coco(captions, images, split="val", instances_file=instances)
    assert records == [
        ImageRecord(
            7, images / "a.jpg", ["A dog.", "A brown dog."], "val",
            [Box("dog", (1.0, 2.0, 3.0, 4.0), {"colour": "brown"}), Box("cat", (0.5, 0.0, 5.0, 6.0))],
            13, 11,
        ),
        ImageRecord(3, images / "b.jpg", ["A cat."], "val"),
    ]
    assert load_coco(captions, images)[0].boxes == [] and load_coco(captions, images)[0].split is None


def test_load_coco_without_annotation_ids(tmp_path: Path) -> None:
    _touch(tmp_path, "a.jpg")
    file = _write_json(
        tmp_path / "c.json",
        {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": "x"}]},
    )
    assert load_coco(file, tmp_path)[0].captions == ["x"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"images": [', "malformed JSON"),
        ('{"annotations": []}', "missing top-level key 'images'"),
        ('{"images": {}, "annotations": []}', "'images' must be a list"),
        ('{"images": [{"id": 1}], "annotations": []}', r"images\[0\]: missing key 'file_name'"),
        (
            '{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]}',
            r"annotations\[0\]: missing key 'caption'",
        ),
        (
            '{"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],'
            ' "annotations": []}',
            "duplicate image id 1",
        ),
    ],
)
def test_load_coco_malformed(tmp_path: Path, content: str, message: str) -> None:
    file = tmp_path / "bad_captions.json"
    file.write_text(content)
    with pytest.raises(AnnotationError, match=f"bad_captions.json.*{message}"):
        load_coco(file, tmp_path, skip_bad=True)  # structural errors are never skipped


def test_load_coco_bad_instances(tmp_path: Path) -> None:
    captions, _, images = _coco(tmp_path)
    bad = _write_json(
        tmp_path / "bad_instances.json",
        {"annotations": [{"image_id": 7, "bbox": [1, 2, 3], "category_id": 1}],
         "categories": [{"id": 1, "name": "cat"}]},
    )
    with pytest.raises(AnnotationError, match=r"bad_instances.json annotations\[0\]: 'bbox'"):
        load_coco(captions, images, instances_file=bad)
    unknown = _write_json(
        tmp_path / "bad_instances.json",
        {"annotations": [{"image_id": 7, "bbox": [1, 2, 3, 4], "category_id": 5}],
         "categories": [{"id": 1, "name": "cat"}]},
    )
    with pytest.raises(AnnotationError, match=r"annotations\[0\]: unknown category_id 5"):
        load_coco(captions, images, instances_file=unknown)


def test_load_coco_bad_entries_raise_or_are_counted(tmp_path: Path) -> None:
    _touch(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    file = _write_json(
        tmp_path / "captions.json",
        {
            "images": [
                {"id": 1, "file_name": "a.jpg"},
                {"id": 2, "file_name": "b.jpg"},  # only an empty caption -> no captions
                {"id": 3, "file_name": "c.jpg"},  # no captions at all
                {"id": 4, "file_name": "gone.jpg"},  # missing file
            ],
            "annotations": [
                {"image_id": 1, "caption": "fine"},
                {"image_id": 1, "caption": "   "},
                {"image_id": 2, "caption": ""},
                {"image_id": 4, "caption": "lost"},
                {"image_id": 9, "caption": "orphan"},
            ],
        },
    )
    with pytest.raises(AnnotationError, match=r"captions.json annotations\[1\] \(image_id 1\): empty caption"):
        load_coco(file, tmp_path)
    with pytest.warns(AnnotationWarning) as caught:
        records = load_coco(file, tmp_path, skip_bad=True)
    assert [r.image_id for r in records] == [1]
    assert records[0].captions == ["fine"]
    assert len(caught) == 1  # one summary warning
    text = str(caught[0].message)
    for part in ["2 x empty caption", "1 x caption for an unknown image",
                 "2 x image without captions", "1 x image file not found"]:
        assert part in text


# ---------------------------------------------------------------------------- Karpathy
def test_load_karpathy(tmp_path: Path) -> None:
    _touch(tmp_path, "val2014/x.jpg", "train2014/y.jpg", "z.jpg")
    file = _write_json(
        tmp_path / "dataset_coco.json",
        {
            "images": [
                {"filepath": "val2014", "filename": "x.jpg", "split": "restval", "imgid": 0,
                 "cocoid": 42, "sentences": [{"raw": "A man.", "tokens": ["a", "man"]},
                                             {"tokens": ["a", "guy"]}]},
                {"filepath": "train2014", "filename": "y.jpg", "split": "test", "imgid": 1,
                 "sentences": [{"raw": "Snow."}]},
                {"filename": "z.jpg", "split": "val", "imgid": 2, "sentences": [{"raw": "Sun"}]},
            ]
        },
    )
    records = load_karpathy(file, tmp_path)
    assert [(r.image_id, r.split, r.captions) for r in records] == [
        (42, "train", ["A man.", "a guy"]),
        (1, "test", ["Snow."]),
        (2, "val", ["Sun"]),
    ]
    assert [r.path for r in records] == [tmp_path / "val2014/x.jpg", tmp_path / "train2014/y.jpg",
                                         tmp_path / "z.jpg"]


def test_load_karpathy_errors(tmp_path: Path) -> None:
    _touch(tmp_path, "x.jpg")
    bad_split = _write_json(
        tmp_path / "k.json",
        {"images": [{"filename": "x.jpg", "split": "dev", "sentences": [{"raw": "a"}]}]},
    )
    with pytest.raises(AnnotationError, match=r"k.json images\[0\] \(x.jpg\): unknown split 'dev'"):
        load_karpathy(bad_split, tmp_path)
    missing = _write_json(tmp_path / "m.json", {"images": [{"filename": "x.jpg"}]})
    with pytest.raises(AnnotationError, match=r"m.json images\[0\]: missing key 'sentences'"):
        load_karpathy(missing, tmp_path)
    empty = _write_json(
        tmp_path / "e.json",
        {"images": [{"filename": "x.jpg", "sentences": [{"raw": "ok"}, {"raw": " "}]},
                    {"filename": "nope.jpg", "sentences": [{"raw": "ok"}]}]},
    )
    with pytest.raises(AnnotationError, match=r"e.json images\[0\] \(x.jpg\) sentences\[1\]: empty caption"):
        load_karpathy(empty, tmp_path)
    with pytest.warns(AnnotationWarning, match="1 x empty caption, 1 x image file not found"):
        records = load_karpathy(empty, tmp_path, skip_bad=True)
    assert [(r.captions, r.split) for r in records] == [(["ok"], None)]


# ---------------------------------------------------------------------------- Kaggle Flickr8k
CSV = (
    "image,caption\n"
    "a.jpg,A dog runs .\n"
    'b.jpg,"A girl , in red , waves ."\n'
    'a.jpg,"He said ""hi"" ."\n'
    "\n"
    "b.jpg,Unquoted, with a comma .\n"
)


def test_load_kaggle_flickr8k(tmp_path: Path) -> None:
    _touch(tmp_path, "img/a.jpg", "img/b.jpg")
    file = tmp_path / "captions.txt"
    file.write_text(CSV)
    records = load_kaggle_flickr8k(file, tmp_path / "img")
    assert [(r.image_id, r.path.name, r.split) for r in records] == [(0, "a.jpg", None), (1, "b.jpg", None)]
    assert records[0].captions == ["A dog runs .", 'He said "hi" .']
    assert records[1].captions == ["A girl , in red , waves .", "Unquoted, with a comma ."]


def test_a_missing_image_folder_is_named_as_one_by_every_loader(tmp_path: Path) -> None:
    """Every image was reported as a missing file (``captions.txt line 2 (a.jpg): image file
    not found``), or with ``skip_bad`` all skipped; the folder is named, with or without it."""
    captions, _, _ = _coco(tmp_path)
    karpathy = _write_json(tmp_path / "dataset_flickr8k.json", {"images": [
        {"filename": "a.jpg", "split": "val", "imgid": 0, "sentences": [{"raw": "A dog."}]}]})
    csv_file = tmp_path / "captions.txt"
    csv_file.write_text(CSV)
    gone = tmp_path / "nonexistent"
    for load, file in [(load_coco, captions), (load_karpathy, karpathy),
                       (load_kaggle_flickr8k, csv_file)]:
        for skip_bad in (False, True):
            with pytest.raises(FileNotFoundError, match=re.escape(
                    f"image folder not found: {gone} (the images of {file})")) as e:
                load(file, gone, skip_bad=skip_bad)
            assert isinstance(e.value, AnnotationError)
    # an entry naming an absolute path elsewhere does not need the folder
    _touch(tmp_path, "elsewhere/a.jpg")
    absolute = _write_json(tmp_path / "abs.json", {"images": [
        {"filename": str(tmp_path / "elsewhere" / "a.jpg"), "split": "val", "imgid": 0,
         "sentences": [{"raw": "A dog."}]}]})
    assert [r.path for r in load_karpathy(absolute, gone)] == [tmp_path / "elsewhere" / "a.jpg"]

def test_load_kaggle_flickr8k_bad_lines(tmp_path: Path) -> None:
    _touch(tmp_path, "a.jpg")
    file = tmp_path / "captions.txt"
    file.write_text('image,caption\na.jpg,fine\n"a.jpg","multi\nline"\na.jpg,  \nonlyname\n,x\n')
    with pytest.raises(AnnotationError, match="captions.txt line 5: empty caption"):
        load_kaggle_flickr8k(file, tmp_path)  # line 5 although the 4th row: a row spans 2 lines
    with pytest.warns(AnnotationWarning) as caught:
        records = load_kaggle_flickr8k(file, tmp_path, skip_bad=True)
    assert len(caught) == 1
    assert "1 x empty caption, 1 x expected 'image,caption', 1 x empty image name" in str(caught[0].message)
    assert records[0].captions == ["fine", "multi\nline"]
    file.write_text('image,caption\na.jpg,fine\na.jpg,"\n\n"\n')  # lines 3-5: an empty caption
    with pytest.raises(AnnotationError, match="captions.txt line 3: empty caption"):
        load_kaggle_flickr8k(file, tmp_path)  # the line where the bad record starts


def test_load_kaggle_flickr8k_header_and_missing_image(tmp_path: Path) -> None:
    file = tmp_path / "captions.txt"
    file.write_text("img,text\na.jpg,x\n")
    with pytest.raises(AnnotationError, match="captions.txt line 1: expected header"):
        load_kaggle_flickr8k(file, tmp_path)
    file.write_text("\ufeffimage,caption\na.jpg,x\n", encoding="utf-8")  # BOM tolerated
    with pytest.raises(AnnotationError, match=r"line 2 \(a.jpg\): image file not found"):
        load_kaggle_flickr8k(file, tmp_path)
    # header in any case, a line of spaces skipped, the image's first line named
    file.write_text("Image, Caption\na.jpg,x\n   \na.jpg,y\n")
    with pytest.raises(AnnotationError, match=r"line 2 \(a.jpg\): image file not found"):
        load_kaggle_flickr8k(file, tmp_path)


def test_a_file_that_is_not_utf8_is_named_with_the_line_of_its_first_bad_byte(
        tmp_path: Path) -> None:
    """The message gave the decoder's position, an offset into the chunk it was reading (7466
    for a byte at 245034 of a large file): neither a line nor a file offset. A CSV and a JSON
    file name the line now (a byte-order mark counted in the offset)."""
    (tmp_path / "a.jpg").write_bytes(b"")
    rows = [f"a.jpg,caption number {i}\n".encode() for i in range(12000)]  # past one chunk
    rows[3000] = "a.jpg,un caf\u00e9 noir\n".encode("latin-1")  # line 3002 with the header
    csv_file = tmp_path / "captions.txt"
    csv_file.write_bytes(b"\xef\xbb\xbfimage,caption\n" + b"".join(rows))
    at = csv_file.read_bytes().index(b"\xe9")
    with pytest.raises(AnnotationError, match=re.escape(
            f"{csv_file} line 3002: not UTF-8 text (invalid continuation byte: byte 0xe9 at "
            f"offset {at})")):
        load_kaggle_flickr8k(csv_file, tmp_path)
    json_file = tmp_path / "coco.json"
    json_file.write_bytes(b'{"images": [],\n "annotations": [\n{"caption": "caf\xe9"}]}')
    with pytest.raises(AnnotationError, match=re.escape(f"{json_file} line 3: not UTF-8 text")):
        load_coco(json_file, tmp_path)


# ---------------------------------------------------------------------------- all formats
def _three_formats(tmp_path: Path, captions: dict[str, str]) -> dict[str, Any]:
    """The same images and captions as a COCO, a Karpathy and a Kaggle CSV file."""
    names = list(captions)
    coco = _write_json(tmp_path / "coco.json", {
        "images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
        "annotations": [{"image_id": i, "caption": captions[n]} for i, n in enumerate(names)]})
    karpathy = _write_json(tmp_path / "karpathy.json", {"images": [
        {"filename": n, "imgid": i, "split": "train", "sentences": [{"raw": captions[n]}]}
        for i, n in enumerate(names)]})
    csv_file = tmp_path / "captions.txt"
    csv_file.write_text("image,caption\n" + "".join(f'{n},"{captions[n]}"\n' for n in names))
    return {"coco": lambda **kw: load_coco(coco, tmp_path, **kw),
            "karpathy": lambda **kw: load_karpathy(karpathy, tmp_path, **kw),
            "csv": lambda **kw: load_kaggle_flickr8k(csv_file, tmp_path, **kw)}


@pytest.mark.parametrize("fmt", ["coco", "karpathy", "csv"])
def test_skip_bad_drops_images_that_cannot_be_decoded(tmp_path: Path, fmt: str) -> None:
    _touch(tmp_path, "good.jpg")
    _touch(tmp_path, "zero.jpg", data=b"")
    _touch(tmp_path, "cut.jpg", data=JPEG[: len(JPEG) // 2])  # truncated scan data
    load = _three_formats(tmp_path, {"good.jpg": "a red box", "zero.jpg": "a thing",
                                     "cut.jpg": "another thing"})[fmt]
    assert len(load()) == 3  # without skip_bad: decoded when a batch needs them
    with pytest.warns(AnnotationWarning) as caught:
        records = load(skip_bad=True)
    assert [r.path.name for r in records] == ["good.jpg"]
    assert len(caught) == 1 and "2 x unreadable image" in str(caught[0].message)
    assert "(zero.jpg): unreadable image: not a recognised image format" in str(caught[0].message)


@pytest.mark.parametrize("fmt", ["coco", "karpathy", "csv"])
def test_a_caption_without_words_is_empty(tmp_path: Path, fmt: str) -> None:
    _touch(tmp_path, "a.jpg", "b.jpg")
    load = _three_formats(tmp_path, {"a.jpg": "a dog .", "b.jpg": "... !!! ?"})[fmt]
    with pytest.raises(AnnotationError, match=r"empty caption: '\.\.\. !!! \?'"):
        load()
    with pytest.warns(AnnotationWarning, match="1 x empty caption"):
        records = load(skip_bad=True)
    assert [r.path.name for r in records] == ["a.jpg"]


def test_malformed_values_name_the_entry(tmp_path: Path) -> None:
    _touch(tmp_path, "x.jpg", "y.jpg")
    listed = _write_json(tmp_path / "k.json", {"images": [
        {"filename": "x.jpg", "split": ["train"], "sentences": [{"raw": "a dog"}]}]})
    with pytest.raises(AnnotationError, match=r"k.json images\[0\] \(x.jpg\): unknown split"):
        load_karpathy(listed, tmp_path)
    twice = _write_json(tmp_path / "d.json", {"images": [
        {"filename": n, "imgid": 5, "sentences": [{"raw": "a dog"}]} for n in ("x.jpg", "y.jpg")]})
    with pytest.raises(AnnotationError, match=r"images\[1\] \(y.jpg\): duplicate image id 5"):
        load_karpathy(twice, tmp_path)
    flag = _write_json(tmp_path / "b.json", {"images": [{"id": True, "file_name": "x.jpg"}],
                                             "annotations": []})
    with pytest.raises(AnnotationError, match=r"b.json images\[0\]: 'id' must be an integer"):
        load_coco(flag, tmp_path)
    bom = tmp_path / "bom.json"  # saved by a Windows editor
    bom.write_text("\ufeff" + json.dumps({"images": [{"filename": "x.jpg",
                                                       "sentences": [{"raw": "a dog"}]}]}),
                   encoding="utf-8")
    assert [r.path.name for r in load_karpathy(bom, tmp_path)] == ["x.jpg"]
    coco = tmp_path / "c.json"
    coco.write_text('{"images": [{"id": 1, "file_name": "x.jpg", "width": NaN, "height": Infinity}],'
                    ' "annotations": [{"image_id": 1, "caption": "a dog"}]}')
    (record,) = load_coco(coco, tmp_path)
    assert record.width is None and record.height is None  # not numbers: unknown size


def test_csv_unclosed_quote_is_an_error_not_a_merge(tmp_path: Path) -> None:
    _touch(tmp_path, "a.jpg", "b.jpg")
    file = tmp_path / "captions.txt"
    file.write_text('image,caption\na.jpg,"A dog runs\nb.jpg,A cat sits\n')
    with pytest.raises(AnnotationError, match=r"captions.txt line 2: malformed CSV \(the record "
                                              r"starting there, read to line 3\)"):
        load_kaggle_flickr8k(file, tmp_path)
    # the quote opens on line 3 of 8: named there, not at the end of the file
    file.write_text("image,caption\na.jpg,A dog\nb.jpg,\"A cat\n" + "a.jpg,A dog\n" * 5)
    with pytest.raises(AnnotationError, match=r"captions.txt line 3: malformed CSV \(the record "
                                              r"starting there, read to line 8\)"):
        load_kaggle_flickr8k(file, tmp_path)
    file.write_text('image,"caption\na.jpg,A dog\n')  # the header itself
    with pytest.raises(AnnotationError, match=r"captions.txt line 1: malformed CSV"):
        load_kaggle_flickr8k(file, tmp_path)


# ---------------------------------------------------------------------------- splits
def _records(n: int) -> list[ImageRecord]:
    return [ImageRecord(i, Path(f"/data/img_{i:03d}.jpg"), [f"caption {i}"]) for i in range(n)]


def test_assign_splits_counts_and_fixed_splits() -> None:
    records = _records(20)
    records[0] = ImageRecord(0, Path("/data/img_000.jpg"), ["c"], split="test")
    out = assign_splits(records, val_fraction=0.2, test_fraction=0.1, seed=0)
    assert out[0].split == "test"  # an existing split is kept
    rest = [r.split for r in out[1:]]
    assert (rest.count("train"), rest.count("val"), rest.count("test")) == (13, 4, 2)  # of 19
    assert all(r.split is None for r in records[1:])  # inputs untouched
    assert [r.image_id for r in out] == list(range(20))


def test_a_split_left_empty_by_too_few_images_is_warned_of() -> None:
    """1 or 2 unsplit images give ``rank``'s non-zero fractions no image (round(0.1 * 2) = 0):
    one warning per empty split (validation used to find nothing to score, silently); from 3
    images on each gets one, and a zero fraction or a fixed split is no case."""
    import warnings

    from captioner.data.formats import AnnotationWarning

    with pytest.warns(AnnotationWarning) as caught:
        out = assign_splits(_records(2), val_fraction=0.1, test_fraction=0.1)
    assert [r.split for r in out] == ["train", "train"]
    said = sorted(str(w.message) for w in caught)
    assert len(said) == 2 and said[0].startswith("the test split gets none of the 2 unsplit")
    assert "val_fraction 0.1, split_method 'rank'" in said[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assign_splits(_records(3), val_fraction=0.1, test_fraction=0.1)
        assign_splits(_records(2), val_fraction=0.0, test_fraction=0.0)
        fixed = [ImageRecord(0, Path("/d/a.jpg"), ["c"], split="val")]
        assign_splits(fixed, val_fraction=0.1, test_fraction=0.1)
    with pytest.warns(AnnotationWarning, match="split_method 'hash'"):
        assign_splits(_records(1), val_fraction=0.1, test_fraction=0.1, method="hash")


def test_hash_splits_give_each_fraction_its_share() -> None:
    """``method="hash"``: ``test`` if ``u < test_fraction``, ``val`` if ``u < test_fraction +
    val_fraction`` (a cumulative bound: comparing ``u`` with ``val_fraction`` alone would give
    ``val`` nothing when the two fractions are equal), else ``train``."""
    from collections import Counter

    records = [ImageRecord(i, Path(f"/x/{i}.jpg"), ["c"]) for i in range(1000)]
    out = assign_splits(records, val_fraction=0.3, test_fraction=0.3, method="hash")
    counts = Counter(r.split for r in out)
    # each count ~ Binomial(1000, 0.3): mean 300, sd sqrt(1000 * 0.3 * 0.7) = 14.5;
    # 240..360 is +-4 sd (deterministic here: the hashes depend on the names and seed 0 only)
    assert 240 <= counts["val"] <= 360 and 240 <= counts["test"] <= 360, counts
    assert counts["train"] == 1000 - counts["val"] - counts["test"]


def test_assign_splits_depends_on_names_and_seed_not_order() -> None:
    records = _records(30)
    a = {r.path.name: r.split for r in assign_splits(records, seed=3)}
    b = {r.path.name: r.split for r in assign_splits(records[::-1], seed=3)}
    c = {r.path.name: r.split for r in assign_splits(records, seed=4)}
    assert a == b
    assert a != c


def test_assign_splits_small_sets_get_val_and_test() -> None:
    splits = [r.split for r in assign_splits(_records(3), 0.1, 0.1)]
    assert sorted(splits) == ["test", "train", "val"]
    with pytest.raises(ValueError):
        assign_splits(_records(3), 0.6, 0.4)


def test_assign_splits_same_in_another_process() -> None:
    here = [r.split for r in assign_splits(_records(25), seed=7)]
    code = (
        "from pathlib import Path\n"
        "from captioner.data.formats import ImageRecord, assign_splits\n"
        "rs = [ImageRecord(i, Path(f'/data/img_{i:03d}.jpg'), ['c']) for i in range(25)]\n"
        "print(','.join(r.split for r in assign_splits(rs, seed=7)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert out.stdout.strip().split(",") == here


def test_no_warning_when_nothing_skipped(tmp_path: Path) -> None:
    captions, _, images = _coco(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_coco(captions, images, skip_bad=True)


def test_duplicates_a_merged_file_would_bring(tmp_path: Path) -> None:
    """A captions file concatenated with itself repeats its annotation ids: refused, naming
    both entries (or skipped with ``skip_bad``); a category id given twice in an instances
    file was silently overwritten; a long caption in a CSV is a caption, not a CSV error
    (csv's 128 KiB field limit)."""
    _touch(tmp_path, "a.jpg")
    captions = _write_json(tmp_path / "c.json", {
        "images": [{"id": 1, "file_name": "a.jpg"}],
        "annotations": [{"id": 5, "image_id": 1, "caption": "a dog"},
                        {"id": 6, "image_id": 1, "caption": "a brown dog"},
                        {"id": 5, "image_id": 1, "caption": "a dog"}]})
    with pytest.raises(AnnotationError, match=r"c\.json annotations\[2\]: duplicate annotation "
                                              r"id: 5, as annotations\[0\]"):
        load_coco(captions, tmp_path)
    with pytest.warns(AnnotationWarning, match="1 x duplicate annotation id"):
        (record,) = load_coco(captions, tmp_path, skip_bad=True)
    assert record.captions == ["a dog", "a brown dog"]
    instances = _write_json(tmp_path / "i.json", {
        "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1], "category_id": 1}],
        "categories": [{"id": 1, "name": "dog"}, {"id": 1, "name": "cat"}]})
    with pytest.raises(AnnotationError, match=r"i\.json categories\[1\]: duplicate category id 1 "
                                              r"\('dog' and 'cat'\)"):
        load_coco(captions, tmp_path, instances_file=instances, skip_bad=True)
    long = "a dog " * 30000  # 180,000 characters
    (tmp_path / "captions.txt").write_text(f"image,caption\na.jpg,{long}\na.jpg,a cat\n")
    (record,) = load_kaggle_flickr8k(tmp_path / "captions.txt", tmp_path)
    assert record.captions == [long.strip(), "a cat"]
    # a CSV row repeated exactly: kept (annotators may agree), but a merged file is warned of
    (tmp_path / "twice.txt").write_text("image,caption\na.jpg,a cat\na.jpg,a dog\na.jpg,a cat\n")
    with pytest.warns(AnnotationWarning, match=r"twice\.txt: 1 rows repeat an earlier row of the "
                                               r"same image exactly \(first: line 4\)"):
        (record,) = load_kaggle_flickr8k(tmp_path / "twice.txt", tmp_path)
    assert record.captions == ["a cat", "a dog", "a cat"]
