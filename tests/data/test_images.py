"""Tests for captioner.data.images."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from captioner.data.images import (
    IMAGE_EXTENSIONS,
    ImageLoadError,
    find_images,
    image_to_tensor,
    load_image,
    to_rgb,
    upright_rgb,
)


def _pixel(img: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    assert img.mode == "RGB"
    return img.getpixel(xy)  # type: ignore[return-value]


def test_grayscale_png(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.new("L", (5, 3), 77).save(path)
    img = load_image(path)
    assert img.size == (5, 3)
    assert _pixel(img) == (77, 77, 77)


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "rgba.png"
    im = Image.new("RGBA", (3, 1))
    im.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> white
    im.putpixel((1, 0), (0, 0, 255, 255))  # opaque blue
    im.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black -> mid grey
    im.save(path)
    img = load_image(path)
    assert _pixel(img, (0, 0)) == (255, 255, 255)
    assert _pixel(img, (1, 0)) == (0, 0, 255)
    assert all(abs(v - 127) <= 1 for v in _pixel(img, (2, 0)))


def test_la_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    im = Image.new("LA", (2, 1))
    im.putpixel((0, 0), (0, 0))
    im.putpixel((1, 0), (40, 255))
    im.save(path)
    img = load_image(path)
    assert _pixel(img, (0, 0)) == (255, 255, 255)
    assert _pixel(img, (1, 0)) == (40, 40, 40)


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    opaque, transparent = tmp_path / "p.png", tmp_path / "p_t.png"
    im.save(opaque)
    im.save(transparent, transparency=0)
    assert _pixel(load_image(opaque), (0, 0)) == (0, 0, 0)
    assert _pixel(load_image(transparent), (0, 0)) == (255, 255, 255)  # transparent index
    assert _pixel(load_image(transparent), (1, 0)) == (10, 200, 30)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (7, 5), (0, 255, 255, 0)).save(path, quality=95)  # pure red ink
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    r, g, b = _pixel(load_image(path), (3, 2))
    assert r > 230 and g < 30 and b < 30


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    a = np.array([[0, 32896, 60000, 65535]], dtype=np.uint16)  # black, mid grey, white
    Image.fromarray(a).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    img = load_image(path)
    # v * 255 / 65535, not v / 256 (v >> 8): 60000 -> 233.46 -> 233, not 234
    assert [_pixel(img, (x, 0))[0] for x in range(4)] == [0, 128, 233, 255]


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.array([[0, 1000, 65535]], dtype=np.int32), [0, 4, 255]),  # "I" holding 16-bit data
        (np.array([[-10, 0, 10]], dtype=np.int32), [0, 128, 255]),  # out of range: min-max
        (np.array([[0.0, 0.5, 1.0]], dtype=np.float32), [0, 128, 255]),  # "F" in [0, 1]
        (np.array([[0.2, 0.6, 1.0]], dtype=np.float32), [51, 153, 255]),  # up to 1 included
        (np.array([[-2.0, 0.0, 2.0]], dtype=np.float32), [0, 128, 255]),  # "F" other: min-max
    ],
)
def test_int_and_float_modes(array: np.ndarray, expected: list[int]) -> None:
    img = to_rgb(Image.fromarray(array))
    assert [_pixel(img, (x, 0))[0] for x in range(3)] == expected


def test_float_nan_does_not_blank_the_picture() -> None:
    img = to_rgb(Image.fromarray(np.array([[np.nan, 0.0, 0.5, 1.0, np.inf]], dtype=np.float32)))
    assert [_pixel(img, (x, 0))[0] for x in range(5)] == [0, 0, 128, 255, 255]
    # NaN takes the low end of the finite range (-2), not the value 0 (mid grey here)
    img = to_rgb(Image.fromarray(np.array([[np.nan, -2.0, 2.0]], dtype=np.float32)))
    assert [_pixel(img, (x, 0))[0] for x in range(3)] == [0, 0, 255]
    blank = to_rgb(Image.fromarray(np.full((2, 3), np.nan, dtype=np.float32)))
    assert np.asarray(blank).max() == 0


@pytest.mark.parametrize(("bits", "values", "key"), [
    (1, [0, 1, 0], 0),  # 1-bit grey, black marked transparent
    (16, [0, 1000, 65535], 1000),  # 16-bit grey, 1000 marked transparent
])
def test_png_transparent_grey_value_becomes_white(tmp_path: Path, bits, values, key) -> None:
    """A tRNS chunk on 1-bit and 16-bit greyscale PNGs (PIL keeps it in info only)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    if bits == 1:
        row = bytes([int("".join(str(v) for v in values).ljust(8, "0"), 2)])
    else:
        row = b"".join(struct.pack(">H", v) for v in values)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 3, 1, bits, 0, 0, 0, 0))
           + chunk(b"tRNS", struct.pack(">H", key)) + chunk(b"IDAT", zlib.compress(b"\x00" + row))
           + chunk(b"IEND", b""))
    path = tmp_path / f"grey{bits}.png"
    path.write_bytes(png)
    with Image.open(path) as raw:
        assert raw.info["transparency"] == key
    img = load_image(path)
    expected = {1: [255, 255, 255], 16: [0, 255, 255]}[bits]  # key pixels white, others scaled
    assert [_pixel(img, (x, 0))[0] for x in range(3)] == expected


@pytest.mark.parametrize(("mode", "key", "other"), [("L", 77, 200),
                                                    ("RGB", (10, 20, 30), (10, 20, 31))])
def test_png_colour_key_of_8bit_grey_and_rgb_becomes_white(tmp_path: Path, mode, key,
                                                           other) -> None:
    path = tmp_path / f"key_{mode}.png"
    im = Image.new(mode, (2, 1), key)
    im.putpixel((1, 0), other)
    im.save(path, transparency=key)
    img = load_image(path)
    assert _pixel(img, (0, 0)) == (255, 255, 255)
    assert _pixel(img, (1, 0)) == ((other,) * 3 if mode == "L" else other)


@pytest.mark.parametrize("make", ["convert", "quantize"])
def test_palette_with_alpha_becomes_white_in_memory_as_from_a_file(tmp_path: Path, make) -> None:
    """Pillow's ``convert("P")`` / ``quantize()`` of an RGBA image keeps alpha in the palette
    (no ``transparency`` key in ``info``): a see-through red pixel is white, as in the PNG file
    the same image saves to, and an opaque blue one stays blue."""
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 255))
    palette = rgba.convert("P") if make == "convert" else rgba.quantize()
    assert palette.mode == "P" and "transparency" not in palette.info
    path = tmp_path / "palette.png"
    palette.save(path)
    for img in (to_rgb(palette), upright_rgb(palette), load_image(path)):
        assert [_pixel(img, (x, 0)) for x in range(2)] == [(255, 255, 255), (0, 0, 255)]


def test_bilevel_mode(tmp_path: Path) -> None:
    path = tmp_path / "bits.png"
    im = Image.new("1", (3, 2), 0)
    im.putpixel((2, 1), 1)
    im.save(path)
    img = load_image(path)
    assert _pixel(img, (0, 0)) == (0, 0, 0)
    assert _pixel(img, (2, 1)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    Image.new("RGB", (7, 3), (200, 10, 10)).save(path, exif=exif.tobytes())
    with Image.open(path) as raw:
        assert raw.size == (7, 3)
    assert load_image(path).size == (3, 7)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_boxes_follow_the_exif_turn(tmp_path: Path, orientation: int) -> None:
    """A box drawn on the stored pixels lands, through :func:`upright_box`, on the same
    pixels of the image :func:`load_image` turned upright (PIL's ``exif_transpose``)."""
    from captioner.data.images import exif_orientation, upright_box

    W, H, box = 60, 40, (5, 8, 10, 6)  # stored sides and an (x, y, w, h) box, none symmetric
    stored = np.zeros((H, W, 3), dtype=np.uint8)
    stored[box[1]: box[1] + box[3], box[0]: box[0] + box[2]] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "turned.png"
    Image.fromarray(stored).save(path, exif=exif)
    assert exif_orientation(path) == orientation
    upright = np.asarray(load_image(path))  # (H', W', 3)
    with Image.open(path) as img:  # turned as PIL's own exif_transpose turns it
        np.testing.assert_array_equal(upright, np.asarray(ImageOps.exif_transpose(img)))
    x, y, w, h = (int(v) for v in upright_box(box, (H, W), orientation))
    red = upright[..., 0] > 127  # (H', W')
    assert red[y: y + h, x: x + w].shape == (h, w)  # inside the image: an empty slice is all()
    assert red[y: y + h, x: x + w].all() and red.sum() == w * h == 60


def test_upright_box_transverse_by_hand() -> None:
    """Orientation 7 (``TRANSVERSE``, the mirror across the anti-diagonal) moves stored pixel
    ``(x, y)`` of a ``W x H`` image to ``(H - 1 - y, W - 1 - x)`` of the ``H x W`` upright one."""
    from captioner.data.images import upright_box

    # stored 60 x 40 (W x H), box x in [5, 15), y in [8, 14):
    # upright x = 40 - 1 - y in [26, 31] -> x0 = 40 - 8 - 6 = 26, width 6
    # upright y = 60 - 1 - x in [45, 54] -> y0 = 60 - 5 - 10 = 45, height 10
    assert upright_box((5, 8, 10, 6), (40, 60), 7) == (26, 45, 6, 10)


def test_a_turned_image_keeps_no_orientation(tmp_path: Path) -> None:
    """:func:`load_image` turns a sideways photo upright and drops its EXIF orientation, so
    turning the loaded image again (as ``Captioner.caption`` turns an in-memory image) leaves
    it as it is."""
    from captioner.data.images import upright_rgb

    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turned 90 degrees clockwise to display
    stored = np.zeros((40, 60, 3), dtype=np.uint8)  # stored W x H = 60 x 40
    stored[0, 0] = (255, 0, 0)  # the stored top-left pixel
    for name in ("sideways.png", "sideways.jpg"):
        path = tmp_path / name
        Image.fromarray(stored).save(path, exif=exif)
        img = load_image(path)
        assert img.size == (40, 60), name  # (W, H): turned
        assert img.getexif().get(0x0112, 1) == 1, name  # no orientation left
        again = upright_rgb(img)
        assert again.size == (40, 60), name  # not turned a second time
        np.testing.assert_array_equal(np.asarray(again), np.asarray(img))
    # ROTATE_270 (90 degrees clockwise) takes the stored top-left pixel to the top right
    assert load_image(tmp_path / "sideways.png").getpixel((39, 0))[0] > 127


def _exif_blob(entries: bytes, count: int, tail: bytes = b"") -> bytes:
    """A little-endian TIFF block of ``count`` IFD0 entries (then ``tail``: their data)."""
    import struct

    return (b"Exif\0\0II*\0" + struct.pack("<I", 8) + struct.pack("<H", count) + entries
            + struct.pack("<I", 0) + tail)


def test_boxes_and_pixels_follow_one_reading_of_the_tag(tmp_path: Path) -> None:
    """The pixels and the boxes agree where PIL's exif_transpose and a plain read of the tag
    did not: an orientation stored as a float (``6.0``: PIL turns the image) and a malformed
    tag elsewhere in the EXIF (exif_transpose failed after reading 6, so the image stayed as
    stored while the boxes were turned)."""
    import struct

    from captioner.data.images import exif_orientation

    float_six = _exif_blob(struct.pack("<HHI", 274, 11, 1) + struct.pack("<f", 6.0), 1)
    bad_make = _exif_blob(struct.pack("<HHIHH", 274, 3, 1, 6, 0)
                          + struct.pack("<HHII", 0x010F, 5, 1, 38), 2, struct.pack("<II", 1, 1))
    for name, blob in (("float.jpg", float_six), ("bad_make.jpg", bad_make)):
        Image.new("RGB", (60, 40), "red").save(tmp_path / name, exif=blob)
        assert exif_orientation(tmp_path / name) == 6, name
        assert load_image(tmp_path / name).size == (40, 60), name  # (W, H): turned


def test_exif_orientation_of_files_without_one(tmp_path: Path) -> None:
    from captioner.data.images import exif_orientation

    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert exif_orientation(tmp_path / "plain.png") == 1
    assert exif_orientation(tmp_path / "broken.png") == exif_orientation(tmp_path / "no.png") == 1


def test_exif_orientation_is_read_once_per_file_version(tmp_path: Path, monkeypatch) -> None:
    """Reading a PNG's orientation decodes the whole image (its eXIf chunk may follow the
    pixels): remembered per file, and read again once the file changes."""
    import os

    from captioner.data.images import exif_orientation

    path = tmp_path / "scene.png"
    Image.new("RGB", (8, 6)).save(path)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    assert exif_orientation(path) == exif_orientation(path) == 1 and len(opened) == 1
    exif = Image.Exif()
    exif[0x0112] = 8
    real_open(path).save(path, exif=exif)
    os.utime(path, ns=(1, 1))  # another version of the file, whatever the clock's resolution
    assert exif_orientation(path) == 8 and len(opened) == 2


def test_remembered_orientations_are_bounded(tmp_path: Path, monkeypatch) -> None:
    """At most ``MAX_ORIENTATIONS`` files are remembered (the cache was unbounded), the oldest
    dropped first, and every answer is still right."""
    import captioner.data.images as images

    monkeypatch.setattr(images, "_ORIENTATIONS", {})
    monkeypatch.setattr(images, "MAX_ORIENTATIONS", 3)
    paths = []
    for i in range(5):
        exif = Image.Exif()
        exif[0x0112] = i + 2
        paths.append(tmp_path / f"{i}.jpg")
        Image.new("RGB", (4, 3)).save(paths[-1], exif=exif.tobytes())
    assert [images.exif_orientation(p) for p in paths] == [2, 3, 4, 5, 6]
    assert [key[0] for key in images._ORIENTATIONS] == [str(p) for p in paths[2:]]
    assert images.exif_orientation(paths[0]) == 2  # read again: right, and now the newest
    assert len(images._ORIENTATIONS) == 3


def test_one_pixel_image(tmp_path: Path) -> None:
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(path)
    img = load_image(path)
    assert img.size == (1, 1) and _pixel(img) == (1, 2, 3)
    t = image_to_tensor(img, (5, 3))
    assert t.shape == (3, 5, 3)
    assert torch.allclose(t[:, 4, 2], torch.tensor([1.0, 2.0, 3.0]) / 255)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.jpg"
    with pytest.raises(ImageLoadError, match="nowhere.jpg") as info:
        load_image(path)
    assert info.value.path == path
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(tmp_path)


def test_non_image_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture")
    with pytest.raises(ImageLoadError, match="notes.jpg.*not a recognised image"):
        load_image(path)


def test_unreadable_file_is_not_called_corrupt(tmp_path: Path, monkeypatch) -> None:
    """A file that cannot be opened (permissions; root ignores chmod, so the open is made to
    fail) is reported as unreadable, not as truncated or corrupt image data."""
    path = tmp_path / "locked.jpg"
    Image.new("RGB", (4, 4)).save(path)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", refuse)
    with pytest.raises(ImageLoadError, match=r"locked.jpg: cannot read the file \(Permission "
                                             r"denied\)$"):
        load_image(path)


def test_truncated_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.jpg.*truncated"):
        load_image(path)


def test_decompression_bomb_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (11, 9)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # 99 pixels > 2 * 40: refused by PIL
    with pytest.raises(ImageLoadError, match="big.png.*too large"):
        load_image(path)


def test_pil_pixel_limit_is_raised_at_import() -> None:
    from captioner.data.images import MAX_IMAGE_PIXELS

    assert Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS >= MAX_IMAGE_PIXELS > 89478485


def test_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(ImageLoadError("a/b.png", "broken")))
    assert isinstance(err, ImageLoadError)
    assert str(err) == "cannot load image a/b.png: broken"


def test_error_survives_a_dataloader_worker(tmp_path: Path) -> None:
    """torch re-raises a worker's exception as ``type(message)``: still an ImageLoadError,
    with the file and reason."""
    from torch.utils.data import DataLoader

    from captioner.data.datasets import ImageEvalDataset, collate_images
    from captioner.data.formats import ImageRecord

    bad = tmp_path / "zero.jpg"
    bad.write_bytes(b"")
    loader = DataLoader(ImageEvalDataset([ImageRecord(0, bad, ["x"])], 8), num_workers=1,
                        collate_fn=collate_images)
    with pytest.raises(ImageLoadError) as caught:
        next(iter(loader))
    assert caught.value.path == bad and caught.value.reason == "not a recognised image format"
    assert ImageLoadError("no traceback").reason == "no traceback"  # any other one-argument text
    odd = tmp_path / "a: b"  # a folder whose name holds ": "
    odd.mkdir()
    (tmp_path / "a").mkdir()  # a shorter prefix that exists too: the longest one wins
    (odd / "x.png").write_bytes(b"")
    text = ("Traceback ...\ncaptioner.data.images.ImageLoadError: cannot load image "
            f"{odd}/x.png: not a recognised image format")
    err = ImageLoadError(text)
    assert err.path == odd / "x.png" and err.reason == "not a recognised image format"


def test_image_to_tensor_shape_range_and_values() -> None:
    img = Image.new("RGB", (13, 6), (255, 0, 51))
    t = image_to_tensor(img, (11, 7))
    assert t.shape == (3, 11, 7) and t.dtype == torch.float32
    assert torch.allclose(t[:, 5, 3], torch.tensor([1.0, 0.0, 0.2]))
    square = image_to_tensor(img, 9)
    assert square.shape == (3, 9, 9)
    assert image_to_tensor(Image.new("L", (4, 4), 255), 5).shape == (3, 5, 5)  # any mode
    with pytest.raises(ValueError, match="image size must be positive"):
        image_to_tensor(img, (3, 0))


def test_image_to_tensor_antialiases_when_shrinking() -> None:
    stripes = np.zeros((8, 64, 3), dtype=np.uint8)
    stripes[:, ::2] = 255  # 1-pixel stripes average to mid grey, not aliased to 0 or 255
    t = image_to_tensor(Image.fromarray(stripes), (8, 4))
    assert torch.allclose(t, torch.full_like(t, 0.5), atol=0.05)


def test_find_images(tmp_path: Path) -> None:
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "a" / ".hidden").mkdir()
    (tmp_path / "empty").mkdir()
    for name in ["a/z.jpg", "a/b.PNG", "a/deep/c.jpeg", "a/readme.txt", "a/.hidden/h.jpg", "x.txt"]:
        (tmp_path / name).write_bytes(b"")
    single = tmp_path / "a" / "z.jpg"
    found, problems = find_images(
        [tmp_path / "a", str(single), tmp_path / "missing.jpg", tmp_path / "x.txt", tmp_path / "empty"]
    )
    assert found == [tmp_path / "a/b.PNG", tmp_path / "a/deep/c.jpeg", single]  # sorted, deduped
    assert [p for p, _ in problems] == [tmp_path / "missing.jpg", tmp_path / "x.txt", tmp_path / "empty"]
    assert "no such file" in problems[0][1]
    assert ".png" in IMAGE_EXTENSIONS and ".jpg" in IMAGE_EXTENSIONS
    # only names below the folder searched count as hidden, not the folder's own ancestors
    inside = tmp_path / ".cache" / "photos"
    inside.mkdir(parents=True)
    (inside / "p.png").write_bytes(b"")
    assert find_images([inside]) == ([inside / "p.png"], [])


def test_find_images_names_what_a_path_that_is_no_file_or_folder_is(tmp_path: Path) -> None:
    """A named pipe and a link loop were both "no such file or folder", and a loop inside a
    folder a "broken symbolic link (its target does not exist)"."""
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    named = [tmp_path / n for n in ("pipe.jpg", "loop.jpg", "gone.png", "missing.png")]
    assert find_images(named) == ([], [
        (named[0], "not a regular file or folder (a named pipe)"),
        (named[1], "symbolic link loop (too many levels of symbolic links)"),
        (named[2], "broken symbolic link (its target does not exist)"),
        (named[3], "no such file or folder")])
    assert find_images([tmp_path])[1] == [  # inside a folder: the links (a pipe is skipped)
        (named[2], "broken symbolic link (its target does not exist)"),
        (named[1], "symbolic link loop (too many levels of symbolic links)")]


def test_find_images_reports_a_broken_link_inside_a_folder(tmp_path: Path) -> None:
    """``caption DIR`` skipped a dangling ``broken.jpg`` symlink without a word and exited 0
    (a missing file named explicitly was reported)."""
    (tmp_path / "ok.png").write_bytes(b"")
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "alias.png").symlink_to(tmp_path / "ok.png")  # a working link is an image
    found, problems = find_images([tmp_path])
    assert found == [tmp_path / "alias.png", tmp_path / "ok.png"]
    assert problems == [(tmp_path / "broken.jpg",
                         "broken symbolic link (its target does not exist)")]
    only_broken = tmp_path / "only"
    only_broken.mkdir()
    (only_broken / "x.jpg").symlink_to(tmp_path / "nowhere.jpg")
    assert find_images([only_broken]) == ([], [(only_broken / "x.jpg", "broken symbolic link "
                                                "(its target does not exist)")])
    folders_only = tmp_path / "folders"
    (folders_only / "album.jpg").mkdir(parents=True)  # a folder with an image's name
    assert find_images([folders_only]) == ([], [(folders_only, "folder contains no image files")])

def test_evaluation_turns_coco_boxes_with_the_image(tmp_path: Path) -> None:
    """Attention correctness meets boxes on the image the model saw: COCO gives boxes and sizes
    on the stored pixels, which an EXIF orientation of 6 turns (boxes turned, sides swapped);
    an annotation whose size is already the upright one keeps its boxes; no EXIF: as given."""
    from captioner.data.formats import Box, ImageRecord
    from captioner.evaluation import upright_boxes

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (60, 40)).save(tmp_path / "turned.png", exif=exif)
    Image.new("RGB", (60, 40)).save(tmp_path / "plain.png")
    box = Box("square", (5, 8, 10, 6), {"colour": "red"})

    def record(name: str, width: int | None, height: int | None) -> ImageRecord:
        return ImageRecord(1, tmp_path / name, ["a red square"], boxes=[box], width=width,
                           height=height)

    turned = ([("square", "red", (26.0, 5.0, 6.0, 10.0))], (60, 40))  # (H, W) upright
    assert upright_boxes(record("turned.png", 60, 40)) == turned
    assert upright_boxes(record("turned.png", None, None)) == turned  # sizes from the file
    assert upright_boxes(record("turned.png", 40, 60)) == (
        [("square", "red", (5.0, 8.0, 10.0, 6.0))], (60, 40))  # annotated upright
    assert upright_boxes(record("plain.png", 60, 40)) == (
        [("square", "red", (5.0, 8.0, 10.0, 6.0))], (40, 60))
    exif[0x0112] = 5  # transposed (the first orientation that swaps the sides)
    Image.new("RGB", (60, 40)).save(tmp_path / "transposed.png", exif=exif)
    assert upright_boxes(record("transposed.png", 60, 40)) == (
        [("square", "red", (8.0, 5.0, 6.0, 10.0))], (60, 40))  # x <-> y, w <-> h
    assert upright_boxes(record("transposed.png", 40, 60)) == (
        [("square", "red", (5.0, 8.0, 10.0, 6.0))], (60, 40))  # annotated upright


def test_a_file_cut_short_and_a_malformed_chunk_are_told_apart(tmp_path: Path) -> None:
    """A JPEG cut in half: "truncated image: the file ends before the image data does"; a
    whole PNG with a 2-byte gAMA chunk keeps Pillow's own reason (it is no file cut short)."""
    import struct
    import zlib

    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.jpg"
    Image.fromarray((rng.random((64, 80, 3)) * 255).astype("uint8")).save(photo, quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(photo.read_bytes()[: photo.stat().st_size // 2])
    with pytest.raises(ImageLoadError, match="truncated image: the file ends before the image"):
        load_image(cut)
    whole = tmp_path / "whole.png"
    Image.fromarray((rng.random((8, 8, 3)) * 255).astype("uint8")).save(whole)
    data = whole.read_bytes()
    ihdr_end = 8 + 8 + 13 + 4  # signature, IHDR length + type, 13 data bytes, CRC
    chunk = b"gAMA" + b"\x00\x01"
    bad = data[:ihdr_end] + struct.pack(">I", 2) + chunk + struct.pack(
        ">I", zlib.crc32(chunk)) + data[ihdr_end:]
    malformed = tmp_path / "malformed.png"
    malformed.write_bytes(bad)
    with pytest.raises(ImageLoadError) as e:
        load_image(malformed)
    assert "Truncated gAMA chunk" in str(e.value) and "file ends before" not in str(e.value)


def test_find_images_follows_linked_folders_once(tmp_path: Path) -> None:
    """``caption DIR`` skipped the images of a symbolically linked sub-folder without a word
    (``Path.rglob`` does not follow them); they are found now, and a link back to an ancestor
    ends instead of looping."""
    album = tmp_path / "elsewhere" / "album"
    album.mkdir(parents=True)
    (album / "p.png").write_bytes(b"")
    top = tmp_path / "photos"
    (top / "own").mkdir(parents=True)
    (top / "own" / "q.jpg").write_bytes(b"")
    (top / "linked").symlink_to(album)
    (top / "own" / "loop").symlink_to(top)  # back to an ancestor
    found, problems = find_images([top])
    assert found == [top / "linked" / "p.png", top / "own" / "q.jpg"] and problems == []
    for name in ("a", "b", "zz"):  # links to a folder that is under the one searched too
        (top / name).symlink_to(top / "own")
    assert find_images([top])[0] == [top / "linked" / "p.png", top / "own" / "q.jpg"]


def test_an_in_memory_image_that_cannot_be_decoded_is_named(tmp_path: Path) -> None:
    """``Captioner.caption([Image.open(path)])`` of a truncated file raised Pillow's bare
    ``OSError: image file is truncated`` (Pillow decodes on first use), not the
    :class:`ImageLoadError` a path gives, naming the file."""
    path = tmp_path / "cut.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    path.write_bytes(path.read_bytes()[:-2000])  # the header whole, the scan cut short
    with pytest.raises(ImageLoadError, match=re.escape(f"cannot load image {path}: truncated")):
        upright_rgb(Image.open(path))
    with pytest.raises(ImageLoadError, match=re.escape(f"cannot load image {path}: truncated")):
        load_image(path)  # the same reason from the path
    assert upright_rgb(Image.new("F", (3, 2))).mode == "RGB"  # in memory: converted as before
