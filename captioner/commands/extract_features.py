"""``captioner extract-features --config data.yaml --config model.yaml --out DIR``: run the
frozen encoder once over a data set and store the annotation grids (:mod:`captioner.features`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from captioner.cli import register_tool
from captioner.commands.common import (EXIT_INPUT_ERROR, EXIT_OK, ToolError, build_data_module,
                                       device_arg, load_captioner, make_tool, merged_class_config,
                                       non_negative_int, output_folder, parse_with_data_overrides,
                                       positive_int)
from captioner.messages import one_line


def _parse(argv: list[str]) -> argparse.Namespace:
    from captioner.autocast import PRECISIONS

    p = argparse.ArgumentParser(
        prog="captioner extract-features",
        description="Run the frozen encoder once over a data set and store the annotation grids "
                    "(float16 shards + index.json, resumable) for "
                    "captioner.data.cached.CachedFeaturesDataModule.")
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="LightningCLI config(s) with the data: and model: sections (repeatable; "
                        "later files override earlier ones)")
    p.add_argument("--ckpt", default=None,
                   help="take the encoder (and, without --config, the data config) from this "
                        "checkpoint instead")
    p.add_argument("--out", required=True, help="cache folder (resumed when it exists)")
    p.add_argument("--split", type=split_list, default=["train", "val", "test"],
                   help="comma-separated splits to cache (default: train,val,test)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward (32)")
    p.add_argument("--shard-size", type=positive_int, default=256,
                   help="images per shard, a multiple of --batch-size (256)")
    p.add_argument("--num-workers", type=non_negative_int, default=0,
                   help="image loading workers (0)")
    p.add_argument("--device", type=device_arg, default="cpu", help="torch device (default: cpu)")
    p.add_argument("--allow-trainable", action="store_true",
                   help="cache an encoder that has trainable parameters (they then stay frozen)")
    p.add_argument("--precision", choices=PRECISIONS, default="32",
                   help="32 (default), or bf16: the encoder under bfloat16 autocast, about 2x "
                        "faster on CPUs with AVX512-BF16 or AMX; the grids differ from float32's "
                        "(5.5%% of their norm for EfficientNet-Lite0)")
    p.add_argument("--verify", action="store_true",
                   help="first read every shard already in --out and compare it with the "
                        "checksum written with it; the images of damaged shards are encoded "
                        "again (reads the whole cache)")
    p.add_argument("--shard-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # tests
    p.epilog = ("Options of the data config can be overridden as in captioner fit: "
                "--data.init_args.KEY VALUE (e.g. --data.init_args.image_root DIR).")
    args = parse_with_data_overrides(p, argv)
    if not args.config and not args.ckpt:
        p.error("give --config (data and model sections) or --ckpt")
    return args


def split_list(text: str) -> list[str]:
    """``--split``: comma-separated split names, each once, at least one."""
    from captioner.data.formats import SPLITS  # not at import: every command loads this module

    splits = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits or len(set(splits)) != len(splits):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give one or more of {', '.join(SPLITS)}, comma-separated, each once")
    return splits


def load_model_encoder_config(files: Sequence[str | Path]) -> dict[str, Any]:
    """The ``model.init_args.encoder`` section (``class_path`` / ``init_args``) of YAML files,
    later files overriding earlier ones (:func:`~captioner.commands.common.merged_class_config`).

    Raises:
        ToolError: unreadable YAML or no encoder in any ``model:`` section.
    """
    merged = merged_class_config(
        files, lambda doc: ((doc.get("model") or {}).get("init_args") or {}).get("encoder"))
    if not merged:
        raise ToolError("no model encoder (model: init_args: encoder: class_path) in "
                        + ", ".join(map(str, files)))
    return merged


def config_seed(files: Sequence[str | Path]) -> int | None:
    """The integer ``seed_everything`` of YAML config files (the last one given), or ``None``
    (none, or ``true``: LightningCLI's random seed)."""
    merged = merged_class_config(files, lambda doc: {"class_path": "seed", "init_args": {
        "seed": doc["seed_everything"]}} if "seed_everything" in doc else None)
    seed = (merged.get("init_args") or {}).get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def _run(args: argparse.Namespace) -> int:
    import torch

    from captioner.config import instantiate
    from captioner.data.images import ImageLoadError
    from captioner.features import FeatureCacheError, extract_features

    if args.ckpt:
        captioner = load_captioner(args)
        encoder, image_size = captioner.encoder, captioner.image_size
        encoder_config: dict[str, Any] = {"checkpoint": str(Path(args.ckpt).resolve())}
    else:
        encoder_config = load_model_encoder_config(args.config)
        seed = config_seed(args.config)
        if seed is not None:  # randomly initialised weights (weights: null) are then the same
            torch.manual_seed(seed)  # at every run, so that a resumed extraction matches
        try:
            encoder = instantiate(encoder_config["class_path"], encoder_config["init_args"])
        except Exception as e:  # noqa: BLE001 - jsonargparse / constructor errors: one line
            raise ToolError(f"cannot build the encoder: {one_line(e, 1000)}") from None
        image_size = None
    dm, source = build_data_module(args)
    image_size = getattr(dm, "image_size", None) or image_size or 224
    skip_bad = bool(getattr(dm, "skip_bad", False))
    if skip_bad:  # the extraction decodes each image and records the unreadable ones
        dm.decode_images = False
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    if trainable and not args.allow_trainable:
        raise ToolError(f"the encoder has {len(trainable)} trainable parameter tensors (e.g. "
                        f"{trainable[0]}): cached features would freeze them; set freeze: true "
                        "and no trainable stages, or pass --allow-trainable")
    splits = args.split
    output_folder(args.out)
    paths = []
    for split in splits:
        try:
            records = dm.records(split)
        except (OSError, ValueError) as e:
            raise ToolError(f"cannot read the {split} split ({source}): "
                            f"{one_line(e)}", EXIT_INPUT_ERROR) from None
        paths += [r.path for r in records]
    print(f"captioner extract-features: {len(paths)} images of {','.join(splits)} ({source}) "
          f"-> {args.out}", file=sys.stderr)
    try:
        cache = extract_features(
            encoder, paths, args.out, image_size=image_size, batch_size=args.batch_size,
            shard_size=args.shard_size, num_workers=args.num_workers, device=args.device,
            encoder_config=encoder_config, shard_delay=args.shard_delay,
            skip_unreadable=skip_bad, precision=args.precision, verify=args.verify,
            progress=lambda line: print(f"captioner extract-features: {line}", file=sys.stderr,
                                        flush=True))
    except ImageLoadError as e:  # a ValueError too: first
        raise ToolError(str(e), EXIT_INPUT_ERROR) from None
    except (FeatureCacheError, ValueError) as e:
        raise ToolError(str(e)) from None
    h, w = cache.grid_size
    print(f"{len(cache)} images cached in {args.out}: {h} x {w} x {cache.dim} float16")
    return EXIT_OK


main = make_tool("extract-features", _parse, _run)
register_tool("extract-features", main)
