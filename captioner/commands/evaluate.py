"""``captioner evaluate --ckpt M.ckpt [--config data.yaml] [--split test] [--out DIR]``: decode
every image of a split once and score it with the official COCO caption protocol
(:func:`captioner.evaluation.evaluate_split`); writes the COCO results file and the metrics JSON."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from captioner.cli import register_tool
from captioner.commands.common import (EXIT_INPUT_ERROR, EXIT_OK, ToolError, add_cells_argument,
                                       build_data_module, load_captioner, make_tool,
                                       non_negative_int, output_folder,
                                       parse_with_data_overrides, positive_int,
                                       requested_data_config, stored_data_config, tool_parser,
                                       training_overlap, write_json)
from captioner.evaluation import (empty_captions_warning, evaluate_split, format_table,
                                  image_size_warning, same_image_size)
from captioner.messages import one_line


def _parse(argv: list[str]) -> argparse.Namespace:
    p = tool_parser("evaluate", "Decode every image of a split once and score it with the official "
                            "COCO caption protocol (pycocoevalcap).")
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="data config (LightningCLI YAML with a data: section); repeatable; "
                        "default: the data config stored in the checkpoint")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", default=None,
                   help="output folder (default: eval_CKPT_SPLIT beside the checkpoint, "
                        "CKPT its file name without .ckpt: each checkpoint of a run its own)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per batch (32)")
    p.add_argument("--num-workers", type=non_negative_int, default=0,
                   help="image loading workers (0)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="evaluate only the first N images of the split (quick checks)")
    p.add_argument("--no-java", action="store_true",
                   help="skip the Java parts (Python tokenizer; no METEOR / SPICE)")
    p.add_argument("--no-spice", action="store_true", help="skip SPICE")
    add_cells_argument(p)
    p.add_argument("--allow-training-images", action="store_true",
                   help="score the split even where --config puts images of the checkpoint's "
                        "own training split in it (refused by default)")
    p.epilog = ("Options of the data config can be overridden as in captioner fit: "
                "--data.init_args.KEY VALUE (e.g. --data.init_args.image_root DIR).")
    return parse_with_data_overrides(p, argv)


def _training_overlap(args: argparse.Namespace, records: list) -> dict[str, Any]:
    """:func:`~captioner.commands.common.training_overlap` of ``--config`` (or the stored config
    with ``--data.init_args`` overrides) against the data config the checkpoint stores (nothing
    to check with the stored config unchanged, or on ``train``)."""
    requested, _, stored = requested_data_config(args)
    if args.split == "train":  # not a count of 0: with the stored config, every image is one
        return {"checked": False, "images": None, "example": None,
                "reason": "the train split: scores of images the model was trained on" if stored
                else "the train split of another data config: not compared"}
    if stored:
        return {"checked": False, "images": 0, "example": None,
                "reason": "the checkpoint's own data config"}
    return training_overlap(stored_data_config(args), requested, records, args.split)


def _run(args: argparse.Namespace) -> int:
    from captioner.data.formats import AnnotationError
    from captioner.data.images import ImageLoadError
    from captioner.metrics import write_coco_results

    captioner = load_captioner(args)
    ckpt = Path(args.ckpt).resolve()  # the default folder is the checkpoint's own: the best
    # and the last of a run shared eval_SPLIT, where the second overwrote the first's results
    out = output_folder(args.out if args.out else ckpt.parent / f"eval_{ckpt.stem}_{args.split}")
    dm, source = build_data_module(args)
    if hasattr(dm, "cache_replaces_images"):  # a cached config: evaluate reads the pixels
        dm.cache_replaces_images = False
    try:
        records = dm.records(args.split)
    except (AnnotationError, OSError, ValueError) as e:
        raise ToolError(f"cannot read the {args.split} split ({source}): "
                        f"{one_line(e)}", EXIT_INPUT_ERROR) from None
    records = records[: args.limit] if args.limit else records
    if not records:
        raise ToolError(f"the {args.split} split of {source} has no images", EXIT_INPUT_ERROR)
    print(f"captioner evaluate: {len(records)} {args.split} images ({source})", file=sys.stderr)
    overlap = _training_overlap(args, records)
    if not overlap["checked"] and (args.config or args.data_overrides):
        print(f"captioner evaluate: not checked against the training split: {overlap['reason']}",
              file=sys.stderr)
    if overlap["images"]:
        message = (f"{overlap['images']} of the {len(records)} {args.split} images of {source} "
                   f"are in the checkpoint's training split (e.g. {overlap['example']}): its "
                   "split settings differ from the ones it was trained with")
        if not args.allow_training_images:
            raise ToolError(f"{message}; the scores would be inflated. Evaluate with the "
                            "checkpoint's own data config (no --config or --data.init_args "
                            "overrides) or the same split settings, or pass "
                            "--allow-training-images")  # a config mismatch: 2, as `test`
        print(f"captioner evaluate: WARNING: {message}", file=sys.stderr)
    image_size = getattr(dm, "image_size", None) or captioner.image_size
    if not same_image_size(image_size, captioner.image_size):
        said = image_size_warning(captioner.image_size, image_size)
        print(f"captioner evaluate: WARNING: {said} ({source})", file=sys.stderr)
    try:
        ev = evaluate_split(captioner, records, beam_size=args.beam_size,
                            max_length=args.max_length, batch_size=args.batch_size,
                            num_workers=args.num_workers,
                            use_java=False if args.no_java else None,
                            use_spice=False if args.no_spice else None,
                            image_size=image_size)
    except ImageLoadError as e:
        raise ToolError(str(e), EXIT_INPUT_ERROR) from None
    for part, reason in ev.skipped.items():
        print(f"captioner evaluate: {part} skipped: {reason}", file=sys.stderr)
    warning = empty_captions_warning(list(ev.captions.values()), args.split)
    if warning:
        print(f"captioner evaluate: WARNING: {warning}", file=sys.stderr)

    results = out / f"captions_{args.split}.json"
    metrics = out / f"metrics_{args.split}.json"
    write_coco_results(ev.captions, results, files={r.image_id: r.path for r in records})
    report = {"checkpoint": str(Path(args.ckpt).resolve()), "split": args.split,
              "data": source, "precision": args.precision,
              "compile_search": args.compile_search,
              "training_images_in_split": overlap, **ev.to_dict()}
    write_json(metrics, report)
    print(format_table(ev))
    print(f"\ncaptions (COCO results format): {results}\nmetrics: {metrics}")
    return EXIT_OK


main = make_tool("evaluate", _parse, _run)
register_tool("evaluate", main)
