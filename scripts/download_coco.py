#!/usr/bin/env python
"""Download MS COCO 2014 captions data and Karpathy's split.

Fetches (from the official hosts) the train2014 / val2014 images, the 2014 train/val
annotations (``captions_train2014.json``, ``captions_val2014.json``) and Karpathy & Fei-Fei's
``caption_datasets.zip`` (``dataset_coco.json``: the 113k/5k/5k split used by Xu et al. and
most later work). Downloads resume after an interruption (HTTP ``Range``), show progress,
are checked as zip archives (CRC of every member unless ``--no-crc``) and are extracted under
``--root``. Nothing is downloaded twice: a finished archive is kept until extraction succeeds
and an extraction leaves a marker file.

Examples::

    python scripts/download_coco.py --root data/coco --dry-run
    python scripts/download_coco.py --root data/coco            # everything, about 19 GB
    python scripts/download_coco.py --root data/coco --only annotations karpathy

The small helpers below (``download``, ``verify_zip``, ``extract``) are reused by
``scripts/download_flickr8k.py``.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20  # 1 MiB


@dataclass(frozen=True)
class Archive:
    """One archive to fetch.

    Attributes:
        key: short name used by ``--only``.
        url: where to download it from.
        size_hint: human-readable size, for ``--dry-run`` and progress messages.
        extract_to: sub-directory of the root to extract into (``""`` for the root itself).
    """

    key: str
    url: str
    size_hint: str
    extract_to: str = ""

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


COCO_ARCHIVES: tuple[Archive, ...] = (
    Archive("train2014", "http://images.cocodataset.org/zips/train2014.zip", "13 GB"),
    Archive("val2014", "http://images.cocodataset.org/zips/val2014.zip", "6.2 GB"),
    Archive(
        "annotations",
        "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
        "241 MB",
    ),
    Archive(
        "karpathy",
        "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
        "36 MB",
        extract_to="karpathy",
    ),
)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def _progress(done: int, total: int | None, start: float, resumed: int) -> None:
    rate = (done - resumed) / max(time.monotonic() - start, 1e-6)
    if total:
        msg = f"\r  {_human(done)} / {_human(total)} ({100 * done / total:5.1f}%) {_human(rate)}/s"
    else:
        msg = f"\r  {_human(done)} {_human(rate)}/s"
    sys.stderr.write(msg + "   ")
    sys.stderr.flush()


def download(url: str, dest: Path, retries: int = 5, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest``, resuming a partial ``dest.part`` with HTTP Range.

    If the server ignores the range (status 200 instead of 206) the download restarts from
    zero; status 416 on a resumed request means the partial file is already complete. The
    finished file is moved into place atomically.

    Args:
        url: source URL (redirects are followed).
        dest: final path of the file.
        retries: attempts on network errors, each resuming where the last stopped.
        timeout: socket timeout in seconds.

    Returns:
        ``dest``.
    """
    if dest.exists():
        print(f"  already downloaded: {dest}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(1, retries + 1):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"User-Agent": "captioner-download/0.1"})
        if have:
            request.add_header("Range", f"bytes={have}-")
            print(f"  resuming at {_human(have)}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if have and response.status == 200:
                    print("  server ignored the range request; restarting")
                    have = 0
                length = response.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                start, done = time.monotonic(), have
                with open(part, "ab" if have else "wb") as f:
                    while chunk := response.read(CHUNK):
                        f.write(chunk)
                        done += len(chunk)
                        _progress(done, total, start, have)
                sys.stderr.write("\n")
                if total is not None and done < total:
                    raise urllib.error.URLError(f"connection closed at {done}/{total} bytes")
            break
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # nothing left to fetch
                break
            raise
        except (urllib.error.URLError, TimeoutError, ConnectionError,
                http.client.IncompleteRead) as exc:  # a chunked response cut short too
            reason = getattr(exc, "reason", None)
            if attempt == retries or (isinstance(reason, socket.gaierror)
                                      and reason.errno == socket.EAI_NONAME):
                raise  # the last attempt, or a host name that does not exist
            print(f"  network error ({exc}); retry {attempt}/{retries - 1} in {2 ** attempt} s")
            time.sleep(2**attempt)
    os.replace(part, dest)
    return dest


def verify_zip(path: Path, crc: bool = True) -> None:
    """Check that ``path`` is a readable zip (and, with ``crc``, that every member's CRC matches).

    Raises:
        zipfile.BadZipFile: if the archive is truncated or corrupt.
    """
    with zipfile.ZipFile(path) as zf:
        if crc:
            bad = zf.testzip()
            if bad is not None:
                raise zipfile.BadZipFile(f"{path}: CRC mismatch in {bad}")
        elif not zf.namelist():
            raise zipfile.BadZipFile(f"{path}: empty archive")


def extract(path: Path, target: Path) -> None:
    """Extract ``path`` into ``target`` once (a ``.<name>.extracted`` marker records success)."""
    marker = target / f".{path.name}.extracted"
    if marker.exists():
        print(f"  already extracted: {path.name} -> {target}")
        return
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path) as zf:
        zf.extractall(target)
    marker.touch()


def _dry_run_step(archive: Archive, zip_path: Path, target: Path) -> str:
    """What a real run would do first for ``archive``, given what is on disk."""
    part = zip_path.with_name(zip_path.name + ".part")
    if (target / f".{archive.filename}.extracted").exists():
        return f"already extracted in {target}: nothing to do"
    if zip_path.exists():
        return f"already downloaded: {zip_path}"
    if part.exists():
        return (f"GET {archive.url} ({archive.size_hint}), resuming {part} at "
                f"{_human(part.stat().st_size)}")
    return f"GET {archive.url} ({archive.size_hint}) -> {zip_path}"


def run(archives: list[Archive], root: Path, **options) -> int:
    """:func:`fetch_all`, with a failure told in one line (exit status 1) instead of a
    traceback: no network, an HTTP error, a corrupt archive, a full disk."""
    try:
        fetch_all(archives, root, **options)
    except urllib.error.HTTPError as exc:
        print(f"error: {exc.url}: HTTP {exc.code} {exc.reason}", file=sys.stderr)
    except urllib.error.URLError as exc:
        print(f"error: cannot download ({exc.reason}); check the network connection and run "
              "again (finished archives and partial downloads are kept)", file=sys.stderr)
    except (zipfile.BadZipFile, OSError, http.client.HTTPException) as exc:
        print(f"error: {exc!r}" if isinstance(exc, http.client.HTTPException) else f"error: {exc}",
              file=sys.stderr)
    else:
        return 0
    downloads = root / "downloads"
    if downloads.is_dir() and not any(downloads.iterdir()):
        downloads.rmdir()  # nothing downloaded: leave no empty folder behind
    return 1


def fetch_all(
    archives: list[Archive], root: Path, *, dry_run: bool, crc: bool, keep_zips: bool
) -> None:
    """Download, verify and extract each archive (or, with ``dry_run``, say what would happen)."""
    downloads = root / "downloads"
    for archive in archives:
        zip_path = downloads / archive.filename
        target = root / archive.extract_to if archive.extract_to else root
        if dry_run:
            print(f"[dry-run] {archive.key}: {_dry_run_step(archive, zip_path, target)}")
            if not (target / f".{archive.filename}.extracted").exists():
                print(f"[dry-run]   verify zip{' CRCs' if crc else ''}, extract -> {target}"
                      f"{'' if keep_zips else ', delete the zip'}")
            continue
        if (target / f".{archive.filename}.extracted").exists():
            print(f"{archive.key}: already extracted in {target}")
            continue
        print(f"{archive.key}: {archive.url} ({archive.size_hint})")
        download(archive.url, zip_path)
        print(f"  verifying {zip_path.name}")
        try:
            verify_zip(zip_path, crc=crc)
        except zipfile.BadZipFile:
            bad = zip_path.with_name(zip_path.name + ".corrupt")
            os.replace(zip_path, bad)
            print(f"  corrupt archive moved to {bad}; run again to download it afresh")
            raise
        print(f"  extracting -> {target}")
        extract(zip_path, target)
        if not keep_zips:
            zip_path.unlink()
    if not dry_run and not keep_zips and downloads.exists() and not any(downloads.iterdir()):
        shutil.rmtree(downloads)


def _config_lines(root: Path) -> str:
    root = root.resolve()
    return "\n".join(
        [
            "# COCO 2014 with Karpathy's split: put this in a data config (see configs/data/):",
            "data:",
            "  class_path: captioner.data.datamodule.CaptionDataModule",
            "  init_args:",
            "    format: karpathy",
            f"    annotations: {root / 'karpathy' / 'dataset_coco.json'}",
            f"    image_root: {root}    # holds train2014/ and val2014/",
            "# or the official COCO captions JSON per split:",
            "#   format: coco",
            f"#   annotations: {{train: {root / 'annotations' / 'captions_train2014.json'}, "
            f"val: {root / 'annotations' / 'captions_val2014.json'}}}",
            f"#   image_root: {{train: {root / 'train2014'}, val: {root / 'val2014'}}}",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("data/coco"),
                        help="destination directory (default: data/coco)")
    parser.add_argument("--only", nargs="+", choices=[a.key for a in COCO_ARCHIVES],
                        help="fetch only these archives (default: all)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be downloaded and extracted, touch nothing")
    parser.add_argument("--no-crc", action="store_true",
                        help="only check the zip directory, not every member's CRC (faster)")
    parser.add_argument("--keep-zips", action="store_true",
                        help="keep the archives after extraction")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [a for a in COCO_ARCHIVES if not args.only or a.key in args.only]
    if run(chosen, args.root, dry_run=args.dry_run, crc=not args.no_crc,
           keep_zips=args.keep_zips):
        return 1
    print()
    print(_config_lines(args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
