"""Robust image loading: any PIL mode -> RGB, EXIF orientation, clear errors.

Everything that reads a picture (training, evaluation, ``captioner caption img.jpg``) goes through
:func:`load_image`, so the model always sees upright 8-bit RGB, and a broken file fails with an
:class:`ImageLoadError` that names it instead of a bare PIL traceback from inside a worker.

:func:`image_to_tensor` only resizes and scales to ``[0, 1]``; mean/std normalisation belongs to
the encoder, whose pretrained weights define it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "ImageLoadError",
    "load_image",
    "exif_orientation",
    "upright_box",
    "to_rgb",
    "image_to_tensor",
    "find_images",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
"""Lower-case file suffixes that :func:`find_images` treats as images."""

MAX_IMAGE_PIXELS = 1 << 28
"""Pixel count above which PIL warns (twice this: refuses) — 268M, e.g. 16384 x 16384.

PIL's default (89M) rejects legitimate large photographs and scans; this limit is raised once, at
import, and never lowered (if something else raised it further, or disabled it, that stands).
"""
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

_WHITE = (255, 255, 255)


class ImageLoadError(ValueError):
    """An image file could not be read; the message names the file and the reason.

    Args:
        path: The offending file.
        reason: What went wrong.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str | None = None) -> None:
        if reason is None:  # re-raised from a DataLoader worker: one argument, the whole text
            path, reason = _from_worker(str(path))
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:  # picklable across DataLoader workers
        return type(self), (self.path, self.reason)


def _from_worker(message: str) -> tuple[str, str]:
    """``(path, reason)`` from the text torch re-raises a worker's error with (its traceback,
    ending in ``...ImageLoadError: cannot load image PATH: REASON``), or ``("?", message)``."""
    last = message.strip().splitlines()[-1] if message.strip() else ""
    _, sep, text = last.partition("ImageLoadError: cannot load image ")
    cuts = [i for i in range(len(text)) if text.startswith(": ", i)]
    if not sep or not cuts:
        return "?", message
    # a path may itself hold ": ": the longest prefix that exists, else the first cut
    cut = next((i for i in reversed(cuts) if Path(text[:i]).exists()), cuts[0])
    return text[:cut], text[cut + 2 :]


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Read an image file fully and return it upright, in 8-bit RGB.

    The whole file is decoded here (``img.load()``), so truncated or corrupt data fails now, with
    the path in the message, rather than later inside a transform. Truncated images are never
    accepted (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone).

    Args:
        path: Image file.

    Returns:
        A ``"RGB"`` image with EXIF orientation applied (size ``W x H`` after rotation).

    Raises:
        ImageLoadError: If the file is missing, not an image, truncated/corrupt, too large, or in
            a mode that cannot be converted.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(path, "no such file" if not path.exists() else "not a regular file")
    try:
        with Image.open(path) as img:
            img.load()
            upright = _exif_upright(img)
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not a recognised image format") from None
    except DECODE_ERRORS as e:
        raise _decode_error(path, e) from None
    return _as_rgb(upright, path)


#: what Pillow raises for image data it cannot decode (:func:`_decode_error` tells them apart),
#: and ``MemoryError``: an image under the pixel limit can still need more memory than there is
#: (a 23000 x 23000 PNG of 500 KB decodes to 1.6 GB), which fails that image, not a whole run
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
                 MemoryError)


def _decode_error(path: str | os.PathLike[str], e: BaseException) -> ImageLoadError:
    """The :class:`ImageLoadError` for ``e``, raised while decoding the image of ``path``."""
    if isinstance(e, Image.DecompressionBombError):
        return ImageLoadError(path, f"image too large ({e}); raise PIL.Image.MAX_IMAGE_PIXELS "
                                    "to accept it")
    if isinstance(e, MemoryError):
        return ImageLoadError(path, "image too large to decode in the memory available")
    if isinstance(e, (PermissionError, FileNotFoundError)):  # unreadable, or removed meanwhile
        return ImageLoadError(path, f"cannot read the file ({e.strerror})")
    # the file ends early (Pillow's "(N bytes not processed)" reads as if N were missing);
    # a malformed chunk inside a whole file ("Truncated gAMA chunk") is no such case
    if isinstance(e, EOFError) or any(m in str(e) for m in ("image file is truncated",
                                                            "Truncated File Read")):
        return ImageLoadError(path, "truncated image: the file ends before the image data does")
    return ImageLoadError(path, f"truncated or corrupt image data ({e})")


def _as_rgb(img: Image.Image, path: str | os.PathLike[str]) -> Image.Image:
    """:func:`to_rgb`, a mode it cannot convert reported as an :class:`ImageLoadError`."""
    try:
        return to_rgb(img)
    except MemoryError as e:
        raise _decode_error(path, e) from None
    except (ValueError, OSError) as e:
        raise ImageLoadError(path, f"cannot convert mode {img.mode!r} to RGB ({e})") from None


EXIF_ORIENTATION = 0x0112  # the TIFF / EXIF tag

# how each EXIF orientation is undone (as PIL's ImageOps.exif_transpose does)
_UNDO_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                     4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                     6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                     8: Image.Transpose.ROTATE_90}


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation of an opened image, 1 to 8; 1 where there is none or it cannot be
    read. The one reading of the tag that both the pixels (:func:`_exif_upright`) and the boxes
    (:func:`exif_orientation`) follow: a value stored as a float or rational (``6.0``) counts,
    as it does for ``exif_transpose``."""
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
        return next((o for o in _UNDO_ORIENTATION if value == o), 1)
    except Exception:  # noqa: BLE001 - malformed EXIF must not cost us the picture
        return 1




def _exif_upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation says (a new image either way). Turned here, not
    by ``ImageOps.exif_transpose``, which turns the pixels and then fails on a malformed tag
    elsewhere in the EXIF (so the image and :func:`exif_orientation` could disagree). A turned
    image keeps no orientation (its EXIF and XMP metadata are dropped): turned again, as
    ``Captioner.caption`` turns an in-memory image from :func:`load_image`, it stays as it is
    (``captioner visualize`` captioned a twice-turned photo and drew the once-turned one)."""
    orientation = _orientation(img)
    if orientation == 1:
        return img.copy()
    upright = img.transpose(_UNDO_ORIENTATION[orientation])
    # every metadata entry Pillow's getexif reads an orientation from: "exif", "xmp",
    # "XML:com.adobe.xmp", a PNG's "Raw profile type exif" (ImageMagick)...
    upright.info = {k: v for k, v in upright.info.items()
                    if "exif" not in str(k).lower() and "xmp" not in str(k).lower()}
    return upright


_ORIENTATIONS: dict[tuple[str, int, int], int] = {}
MAX_ORIENTATIONS = 1 << 18
"""Files whose orientation :func:`exif_orientation` remembers (twice COCO's 123k images; ~50 MB
at most); beyond it the oldest entry goes (a file changed on disk leaves its old entry)."""


def exif_orientation(path: str | os.PathLike[str]) -> int:
    """The EXIF orientation of an image file, 1 to 8 (1: stored upright; also for a file
    without EXIF, a malformed tag or an unreadable file, which :func:`load_image` reports).

    Remembered per file (path, size and modification time): reading it decodes a whole PNG
    (Pillow looks for an ``eXIf`` chunk after the image data), and attention correctness asks
    for every image at every validation."""
    try:
        info = os.stat(path)
        key = (os.fspath(path), info.st_size, info.st_mtime_ns)
        if key not in _ORIENTATIONS:
            with Image.open(path) as img:
                orientation = _orientation(img)
            while len(_ORIENTATIONS) >= MAX_ORIENTATIONS:
                del _ORIENTATIONS[next(iter(_ORIENTATIONS))]  # the oldest
            _ORIENTATIONS[key] = orientation
        return _ORIENTATIONS[key]
    except Exception:  # noqa: BLE001 - errors are load_image's
        return 1


def upright_box(box: tuple[float, float, float, float], stored_hw: tuple[int, int],
                orientation: int) -> tuple[float, float, float, float]:
    """A box ``(x, y, w, h)`` given on the stored pixels of an image (``stored_hw`` =
    ``(H, W)`` as stored; COCO's boxes and sizes) moved onto the image as :func:`load_image`
    turns it upright by its EXIF ``orientation`` (as ``ImageOps.exif_transpose``): 2 mirrors it,
    3 turns it by 180 degrees, 4 flips it, 5 transposes it, 6 turns it 90 degrees clockwise,
    7 transverses it, 8 turns it 90 degrees anticlockwise. Orientations 5 to 8 swap the
    image's sides: the upright image is ``(W, H)``."""
    x, y, w, h = box
    H, W = stored_hw
    return {1: (x, y, w, h),
            2: (W - x - w, y, w, h),
            3: (W - x - w, H - y - h, w, h),
            4: (x, H - y - h, w, h),
            5: (y, x, h, w),
            6: (H - y - h, x, h, w),
            7: (H - y - h, W - x - w, h, w),
            8: (y, W - x - w, h, w)}.get(orientation, (x, y, w, h))


def upright_rgb(img: Image.Image) -> Image.Image:
    """An in-memory image as :func:`load_image` would give it from a file: decoded (a lazily
    opened one), EXIF orientation applied, then :func:`to_rgb` (a new image; ``img`` is left
    as it is).

    Raises:
        ImageLoadError: its data cannot be decoded (a truncated file opened with
            ``Image.open``: Pillow decodes on first use), or its mode cannot be converted to
            RGB; named by the file it was opened from, else ``<in-memory image>``.
    """
    name = getattr(img, "filename", "") or "<in-memory image>"
    try:
        img.load()
        upright = _exif_upright(img)
    except DECODE_ERRORS as e:
        raise _decode_error(name, e) from None
    return _as_rgb(upright, name)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a PIL image of any common mode to 8-bit ``"RGB"``.

    * transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent index or a palette with
      alpha, ...) is composited on white, not dropped (dropping leaves whatever colour hides
      under alpha 0, often black);
    * 16-bit (``I;16*``) and 32-bit integer (``I``) greyscale are scaled, ``v * 255 / 65535``,
      not clipped to 255; ``I`` data outside ``[0, 65535]`` is min-max scaled instead;
    * float (``F``) in ``[0, 1]`` is scaled by 255, otherwise min-max scaled; NaN and infinite
      values take the ends of the finite range, so one bad pixel does not blank the picture;
    * ``1`` is black and white; in ``1``, ``I;16*`` and ``I`` a PNG transparent grey value
      (``info["transparency"]``) becomes white, as alpha does in the other modes;
    * ``L``, ``P``, ``CMYK``, ``YCbCr``, ... go through PIL's own conversion.

    Args:
        img: The image (already loaded).

    Returns:
        A new ``"RGB"`` image of the same size.

    Raises:
        ValueError: If PIL cannot convert the mode.
    """
    mode = img.mode
    # an alpha channel, a tRNS key (P, L, RGB; the grey modes are keyed below) or, in P, a
    # palette with alpha (what Pillow's convert("P") / quantize() of an RGBA image makes)
    has_alpha = img.has_transparency_data
    if mode == "RGB" and not has_alpha:
        return img.copy()
    if mode == "1" or mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(img)  # (H, W)
        grey = values.astype(np.uint8) * 255 if mode == "1" else _to_uint8(values, mode)
        key = img.info.get("transparency")  # a PNG tRNS grey value: those pixels are see-through
        if isinstance(key, int) and mode != "F":
            grey = np.where(values == (bool(key) if mode == "1" else key), 255, grey)
        return Image.fromarray(grey.astype(np.uint8), mode="L").convert("RGB")
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Scale a high-bit-depth greyscale array (H, W) to uint8 (H, W), see :func:`to_rgb`."""
    a = a.astype(np.float64)
    finite = a[np.isfinite(a)]
    if finite.size == 0:  # empty, or nothing but NaN / inf
        return np.zeros(a.shape, dtype=np.uint8)
    lo, hi = float(finite.min()), float(finite.max())
    a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    if mode == "F":
        scaled = a * 255.0 if lo >= 0.0 and hi <= 1.0 else _minmax(a, lo, hi)
    elif lo >= 0.0 and hi <= 65535.0:  # I;16* always; I when it holds 16-bit data (PNG, TIFF)
        scaled = a * (255.0 / 65535.0)
    else:
        scaled = _minmax(a, lo, hi)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _minmax(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` linearly onto ``[0, 255]`` (a constant array maps to 0)."""
    return (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)


def image_to_tensor(img: Image.Image, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize an RGB image and turn it into a float tensor in ``[0, 1]`` (no normalisation).

    The resize is bilinear and antialiased (PIL's ``resize`` widens the filter when shrinking)
    and does not keep the aspect ratio: the picture is squashed to the target, as in the paper's
    fixed-size encoder input.

    Args:
        img: An image, normally from :func:`load_image` (other modes go through :func:`to_rgb`).
        size: ``S`` for ``S x S``, or ``(H, W)``.

    Returns:
        Tensor ``(3, H, W)``, float32 in ``[0, 1]``.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {size}")
    if img.mode != "RGB":
        img = to_rgb(img)
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W, 3)
    return pixels.permute(2, 0, 1).float().div_(255.0)  # (3, H, W)


def _image_names_under(folder: Path) -> list[Path]:
    """The entries under ``folder`` with an image suffix that are not folders (files, broken
    links), not hidden, sorted; symbolic links to folders are followed (``Path.rglob`` skipped
    them silently before Python 3.13), each real folder once: through the folder itself where
    it is under ``folder``, else through the first link by name (real folders are walked
    before links, each group by name, so the route does not depend on listing order)."""
    names: list[Path] = []
    visited: set[str] = set()
    for top, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in visited:  # reached again through a link: a cycle, or a second route
            folders[:] = []
            continue
        visited.add(real)
        folders[:] = sorted((f for f in folders if not f.startswith(".")),
                            key=lambda f: (os.path.islink(os.path.join(top, f)), f))
        names += [Path(top) / f for f in files
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(names)


def find_images(
    paths: Iterable[str | os.PathLike[str]],
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand files and folders into a list of image files.

    Folders are searched recursively for files whose suffix is in :data:`IMAGE_EXTENSIONS`
    (case-insensitive), hidden files and folders (``.name``) skipped, symbolic links to folders
    followed (each real folder once, so a link to an ancestor ends), sorted by path. A file
    named explicitly is kept if its suffix is an image suffix and reported otherwise. Order
    follows ``paths``; a file reached twice is kept once.

    Args:
        paths: Files and/or folders.

    Returns:
        ``(found, problems)``: the image files, and ``(path, reason)`` for each path that does not
        exist, is a broken symbolic link or a link loop, is not a regular file or folder (a
        named pipe, a socket, a device), cannot be read, is a file with a non-image suffix, or
        is a folder without images; inside a folder, for each broken link or link loop with an
        image suffix (other special files there are skipped).
    """
    found: list[Path] = []
    problems: list[tuple[Path, str]] = []
    seen: set[Path] = set()

    def add(file: Path) -> None:
        if file not in seen:
            seen.add(file)
            found.append(file)

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            named = _image_names_under(path)
            files = [p for p in named if p.is_file()]
            broken = [p for p in named if p.is_symlink() and not p.exists()]
            problems.extend((p, _why_not_a_file(p)) for p in broken)
            if not files and not broken:  # (a folder named x.jpg is no image)
                problems.append((path, "folder contains no image files"))
            for file in files:
                add(file)
        elif path.is_file():
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                add(path)
            else:
                problems.append((path, f"not an image file extension ({path.suffix or 'none'})"))
        else:
            problems.append((path, _why_not_a_file(path)))
    return found, problems


def _why_not_a_file(path: Path) -> str:
    """Why ``path``, neither a file nor a folder, is no image: missing, a broken link, a link
    loop, or another kind of file (a FIFO, a device)."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop (too many levels of symbolic links)"
        if path.is_symlink():
            return "broken symbolic link (its target does not exist)"
        if e.errno == errno.ENOENT:
            return "no such file or folder"
        return f"cannot read it ({e.strerror})"
    kind = ("a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special")
    return f"not a regular file or folder ({kind})"
