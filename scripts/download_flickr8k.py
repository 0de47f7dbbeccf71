#!/usr/bin/env python
"""Download Flickr8k (Hodosh et al., 2013) images, captions and official splits.

Uses the widely used mirror of the original release (Jason Brownlee's GitHub release):
``Flickr8k_Dataset.zip`` (8,091 JPEGs in ``Flicker8k_Dataset/``, sic) and ``Flickr8k_text.zip``
(``Flickr8k.token.txt`` with five captions per image, and ``Flickr_8k.{train,dev,test}Images.txt``,
the 6k/1k/1k split used by Xu et al.). ``--karpathy`` also fetches Karpathy's
``caption_datasets.zip`` (``dataset_flickr8k.json``, the same split, pre-tokenised).
Downloads resume, are zip-verified and extracted exactly as in ``scripts/download_coco.py``.

The Kaggle "Flickr8k" layout is accepted too and needs no download script: a directory with
``images/<name>.jpg`` and ``captions.txt`` (CSV with header ``image,caption``, one row per
caption); it has no official split, so the data module makes a deterministic one.

Examples::

    python scripts/download_flickr8k.py --root data/flickr8k --dry-run
    python scripts/download_flickr8k.py --root data/flickr8k --karpathy
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from download_coco import Archive, run  # noqa: E402

_RELEASE = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k"
FLICKR8K_ARCHIVES: tuple[Archive, ...] = (
    Archive("images", f"{_RELEASE}/Flickr8k_Dataset.zip", "1.1 GB"),
    Archive("text", f"{_RELEASE}/Flickr8k_text.zip", "2.3 MB"),
)
KARPATHY = Archive(
    "karpathy",
    "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
    "36 MB",
    extract_to="karpathy",
)


def _config_lines(root: Path, karpathy: bool) -> str:
    root = root.resolve()
    lines = [
        "# Flickr8k with Karpathy's split (run with --karpathy): a data config (see configs/data/):",
        "data:",
        "  class_path: captioner.data.datamodule.CaptionDataModule",
        "  init_args:",
        "    format: karpathy",
        f"    annotations: {root / 'karpathy' / 'dataset_flickr8k.json'}",
        f"    image_root: {root / 'Flicker8k_Dataset'}",
        "# or, for the Kaggle layout (images/ + captions.txt, deterministic own split):",
        "#   format: flickr8k_csv",
        "#   annotations: <dir>/captions.txt",
        "#   image_root: <dir>/images",
    ]
    if not karpathy:  # Flickr8k.token.txt and the split lists are in no format read here
        lines.insert(0, "# (without --karpathy no annotation file captioner reads was fetched: "
                        "run again with --karpathy for dataset_flickr8k.json)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("data/flickr8k"),
                        help="destination directory (default: data/flickr8k)")
    parser.add_argument("--karpathy", action="store_true",
                        help="also fetch Karpathy's caption_datasets.zip (dataset_flickr8k.json)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be downloaded and extracted, touch nothing")
    parser.add_argument("--no-crc", action="store_true",
                        help="only check the zip directory, not every member's CRC (faster)")
    parser.add_argument("--keep-zips", action="store_true",
                        help="keep the archives after extraction")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    archives = list(FLICKR8K_ARCHIVES) + ([KARPATHY] if args.karpathy else [])
    if run(archives, args.root, dry_run=args.dry_run, crc=not args.no_crc,
           keep_zips=args.keep_zips):
        return 1
    print()
    print(_config_lines(args.root, args.karpathy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
