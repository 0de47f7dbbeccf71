"""Inference sub-commands of ``captioner``: ``caption``, ``evaluate`` and ``visualize``.

Registered into :data:`captioner.cli.TOOLS` on import (``captioner.cli.main`` imports this
module), each as ``fn(argv: list[str]) -> exit status``:

* ``captioner caption --ckpt M.ckpt [--beam-size K] [--max-length N] [--batch-size B] [--json]
  PATH...`` - caption image files and folders (recursively), ``path<TAB>caption`` per line or a
  JSON array;
* ``captioner evaluate --ckpt M.ckpt [--config data.yaml] [--split test] [--out DIR]`` - decode
  every image of a split once and score it with the official COCO caption protocol
  (:func:`captioner.metrics.coco_caption_scores`), plus attention correctness where the data
  has object boxes; writes the COCO results file and the metrics JSON;
* ``captioner visualize --ckpt M.ckpt IMAGE --out FIG.png [--save-maps maps.npz]`` - the
  attention figure of Xu et al. (2015, Figures 2-3): one panel per generated word;
* ``captioner translate --ckpt M.ckpt [--beam-size K] [--alignment FIG.png] [--reference REF]
  [SENTENCE...]`` - translate sentences (arguments, or stdin lines) with a translation
  checkpoint, one translation per line; optionally the source x target alignment figure
  (Bahdanau et al. 2015, Figure 3) and sacreBLEU against reference lines (on stderr).

Exit status: 0 success; 1 some inputs could not be read (the others are still processed);
2 usage errors, an unusable checkpoint or data config. Expected failures print one line per
problem on stderr and never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.cli import register_tool

if TYPE_CHECKING:
    from captioner.data.formats import ImageRecord
    from captioner.inference import Captioner

EXIT_OK, EXIT_INPUT_ERROR, EXIT_USAGE = 0, 1, 2


class ToolError(Exception):
    """An expected failure: printed as one line, with an exit status."""

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


def _int_at_least(minimum: int, name: str) -> Callable[[str], int]:
    """An argparse type: an integer ``>= minimum`` (``name`` for messages)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {name}, got {value}")
        return value

    return parse


_positive = _int_at_least(1, "a positive integer")
_non_negative = _int_at_least(0, "an integer >= 0")


def _device(text: str) -> str:
    """A torch device that exists here (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (cpu, cuda, cuda:0...)"
                                         ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has "
                                         f"{torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine")
    return text


def _figure_errors(path: str) -> contextlib.AbstractContextManager[None]:
    """Turn the errors of writing a figure (unknown format, bad folder, bad colormap) into a
    one-line :class:`ToolError`."""

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except (OSError, ValueError) as e:
            raise ToolError(f"cannot write the figure {path}: {' '.join(str(e).split())[:300]}"
                            ) from None

    return guard()


def _parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"captioner {name}", description=description)
    p.add_argument("--ckpt", required=True, help="captioner checkpoint (.ckpt)")
    p.add_argument("--beam-size", type=_positive, default=None,
                   help="beam size K, 1 = greedy (default: the checkpoint's setting)")
    p.add_argument("--max-length", type=_positive, default=None,
                   help="most decoding steps (default: the checkpoint's setting)")
    p.add_argument("--beam-stop", choices=("k_finished", "exact"), default=None,
                   help="when beam search stops: once K hypotheses ended, or once no alive beam "
                        "can outrank the best ended one (default: the checkpoint's setting)")
    p.add_argument("--device", type=_device, default="cpu", help="torch device (default: cpu)")
    return p


def _tool(name: str, parse: Callable[[list[str]], argparse.Namespace],
          run: Callable[[argparse.Namespace], int]) -> Callable[[list[str]], int]:
    """Wrap ``run`` so that argparse exits and expected errors become exit statuses."""

    def main(argv: list[str]) -> int:
        try:
            args = parse(list(argv))
        except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
            return e.code if isinstance(e.code, int) else EXIT_OK if e.code is None else EXIT_USAGE
        try:
            return run(args)
        except ToolError as e:
            _error(name, str(e))
            return e.status
        except BrokenPipeError:  # `captioner caption ... | head`
            with contextlib.suppress(OSError):
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the final flush
            return EXIT_OK

    main.__name__ = f"{name}_main"
    main.__doc__ = f"``captioner {name} ...``; returns the exit status."
    return main


def _error(tool: str, message: str) -> None:
    print(f"captioner {tool}: error: {message}", file=sys.stderr)


def _load_captioner(args: argparse.Namespace) -> Captioner:
    from captioner.inference import Captioner, CheckpointError

    try:
        captioner = Captioner.from_checkpoint(args.ckpt, device=args.device)
    except CheckpointError as e:
        raise ToolError(str(e)) from None
    if getattr(args, "beam_stop", None):
        captioner.search["beam_stop"] = args.beam_stop
    return captioner


# ================================================================================== caption
def _parse_caption(argv: list[str]) -> argparse.Namespace:
    p = _parser("caption", "Caption image files and folders (searched recursively).")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders")
    p.add_argument("--batch-size", type=_positive, default=16, help="images per batch (16)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON array of {image, caption, words, tokens, score}")
    return p.parse_args(argv)


def _run_caption(args: argparse.Namespace) -> int:
    captioner = _load_captioner(args)
    captions, errors = captioner.caption_paths(
        args.paths, beam_size=args.beam_size, max_length=args.max_length,
        batch_size=args.batch_size)
    for path, reason in errors:
        print(f"captioner caption: {path}: {reason}", file=sys.stderr)
    if args.json:
        rows = [{"image": str(c.path), "caption": c.text, "words": c.words, "tokens": c.tokens,
                 "score": c.score} for c in captions]
        print(json.dumps(rows, indent=1, ensure_ascii=False))
    else:
        for c in captions:
            print(f"{c.path}\t{c.text}")
    sys.stdout.flush()
    if errors:
        print(f"captioner caption: {len(errors)} path(s) not captioned, {len(captions)} captioned",
              file=sys.stderr)
        return EXIT_INPUT_ERROR
    return EXIT_OK


# ================================================================================== evaluate
@dataclass
class Evaluation:
    """What :func:`evaluate_split` measured.

    Attributes:
        scores: COCO metrics (``"BLEU-1"`` .. ``"BLEU-4"``, ``"METEOR"``, ``"ROUGE-L"``,
            ``"CIDEr"`` (CIDEr-D), ``"SPICE"``), those that ran.
        skipped: part -> reason for the parts of the protocol that did not run.
        tokenizer: ``"ptb"`` (official Stanford PTBTokenizer) or ``"python"`` (fallback).
        captions: image id -> generated caption.
        attention: ``{"attention_correctness", "chance", "num_words"}`` when the records have
            object boxes, else ``None``.
        protocol: how the numbers were obtained (split, images, references per image, beam).
    """

    scores: dict[str, float]
    skipped: dict[str, str]
    tokenizer: str
    captions: dict[int, str]
    attention: dict[str, float] | None = None
    protocol: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON written as the metrics file."""
        out: dict[str, Any] = {"scores": self.scores, "skipped": self.skipped,
                               "tokenizer": self.tokenizer, "protocol": self.protocol}
        if self.attention is not None:
            out["attention_correctness"] = self.attention["attention_correctness"]
            out["attention_chance"] = self.attention["chance"]
            out["attention_words"] = int(self.attention["num_words"])
        return out


def evaluate_split(captioner: Captioner, records: Sequence[ImageRecord], *,
                   beam_size: int | None = None, max_length: int | None = None,
                   batch_size: int = 32, num_workers: int = 0,
                   use_java: bool | None = None, use_spice: bool | None = None) -> Evaluation:
    """Decode every image of ``records`` exactly once and score it by the COCO protocol.

    Each image is captioned once (greedy or beam search) and its caption scored against *all*
    its reference captions with :func:`captioner.metrics.coco_caption_scores` (PTB tokenizer,
    BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE when available). When the records carry object
    boxes (the shapes data), attention correctness (:func:`captioner.metrics.attention_correctness`)
    and its chance level are computed from the same decoding.

    Args:
        captioner: a :class:`captioner.inference.Captioner`.
        records: :class:`~captioner.data.formats.ImageRecord` s of one split.
        beam_size: ``K`` (default: the checkpoint's setting).
        max_length: most decoding steps (default: the checkpoint's setting).
        batch_size: images per batch.
        num_workers: DataLoader worker processes for image loading.
        use_java: as in :func:`~captioner.metrics.coco_caption_scores`.
        use_spice: as in :func:`~captioner.metrics.coco_caption_scores`.

    Returns:
        An :class:`Evaluation`.

    Raises:
        captioner.data.images.ImageLoadError: an image of the split cannot be read.
        ValueError: no records.
    """
    import numpy as np
    from torch.utils.data import DataLoader

    from captioner.data.datasets import ImageEvalDataset, collate_images
    from captioner.metrics import attention_correctness, coco_caption_scores

    if not records:
        raise ValueError("no images to evaluate")
    loader = DataLoader(ImageEvalDataset(records, captioner.image_size), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, collate_fn=collate_images)
    captions = []
    for batch in loader:
        captions.extend(captioner.caption_tensors(batch["images"], beam_size, max_length))
    hyps = {r.image_id: c.text for r, c in zip(records, captions)}
    refs = {r.image_id: list(r.captions) for r in records}
    with _quiet("captioner.metrics"):  # skipped parts are reported by the caller, once
        result = coco_caption_scores(refs, hyps, use_java=use_java, use_spice=use_spice)

    attention = None
    if any(r.boxes for r in records):
        H, W = captioner.grid_size
        attention = attention_correctness(
            [c.word_alphas.reshape(len(c.words), H * W) for c in captions],  # (T, L) each
            [c.words for c in captions],
            [[(b.category, (b.attributes or {}).get("colour", ""), tuple(b.bbox))
              for b in r.boxes] for r in records],
            (H, W), [_image_size(r) for r in records],
            thetas=[c.grid_theta for c in captions])
    n_refs = [len(r.captions) for r in records]
    protocol = {
        "images": len(records),
        "references_per_image": {"min": min(n_refs), "mean": float(np.mean(n_refs)),
                                 "max": max(n_refs)},
        "beam_size": captioner.search["beam_size"] if beam_size is None else beam_size,
        "max_length": captioner.search["max_length"] if max_length is None else max_length,
        "length_penalty": captioner.search["length_penalty"],
        "beam_stop": captioner.search["beam_stop"],
        "tokenizer": result.tokenizer,
        "decoded_once_per_image": True,
    }
    return Evaluation(dict(result.scores), dict(result.skipped), result.tokenizer, hyps,
                      attention, protocol)


def _image_size(record: ImageRecord) -> tuple[int, int]:
    """``(H_img, W_img)`` of a record, from the annotation or the file header."""
    if record.height and record.width:
        return int(record.height), int(record.width)
    from PIL import Image

    with Image.open(record.path) as img:
        return img.height, img.width


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_data_config(files: Sequence[str | Path]) -> dict[str, Any]:
    """The ``data`` section (``class_path`` / ``init_args``) of YAML config files.

    Each file is either a LightningCLI config with a ``data:`` key or a bare
    ``class_path``/``init_args`` mapping. Later files override earlier ones (``init_args``
    merged key by key; a new ``class_path`` starts from empty ``init_args``).

    Raises:
        ToolError: unreadable YAML or no data section.
    """
    import yaml

    merged: dict[str, Any] = {}
    for file in files:
        try:
            doc = yaml.safe_load(Path(file).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise ToolError(f"{file}: cannot read the config ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
        section = doc.get("data", doc) if isinstance(doc, dict) else None
        if not isinstance(section, dict):
            continue
        class_path = section.get("class_path", merged.get("class_path"))
        if class_path is None:
            continue
        if class_path != merged.get("class_path"):
            merged = {"class_path": class_path, "init_args": {}}
        merged["init_args"].update(section.get("init_args") or {})
    if not merged:
        raise ToolError("no data section (data: class_path/init_args) in "
                        + ", ".join(map(str, files)))
    return merged


def data_config_from_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The data module config a checkpoint remembers, or ``None``.

    Looked up in order: ``ckpt["captioner"]["data"]["datamodule"]`` (``class_path`` /
    ``init_args``); Lightning's ``datamodule_hyper_parameters`` with the ``_class_path`` that
    LightningCLI records; the same hyper-parameters with the class found by the name under which
    Lightning saved the data module's state (a class of :mod:`captioner.data.datamodule`).
    """
    import lightning as L

    from captioner.data import datamodule as dm_module

    stored = ((ckpt.get("captioner") or {}).get("data") or {}).get("datamodule")
    if isinstance(stored, dict) and stored.get("class_path"):
        return {"class_path": stored["class_path"],
                "init_args": dict(stored.get("init_args") or {})}
    hparams = ckpt.get("datamodule_hyper_parameters")
    if not isinstance(hparams, dict):
        return None
    class_path = hparams.get("_class_path")
    if class_path is None:
        for name, cls in inspect.getmembers(dm_module, inspect.isclass):
            if issubclass(cls, L.LightningDataModule) and name in ckpt:
                class_path = f"{cls.__module__}.{cls.__qualname__}"
                break
    if class_path is None:
        return None
    return {"class_path": class_path,
            "init_args": {k: v for k, v in hparams.items() if not k.startswith("_")}}


def _build_data_module(args: argparse.Namespace) -> tuple[Any, str]:
    from captioner.config import import_class, instantiate
    from captioner.inference import read_checkpoint

    if args.config:
        cfg = load_data_config(args.config)
        source = ", ".join(args.config)
    else:
        cfg = data_config_from_checkpoint(read_checkpoint(args.ckpt))
        source = f"{args.ckpt} (stored data config)"
        if cfg is None:
            raise ToolError(f"{args.ckpt} stores no data config: pass --config data.yaml")
    try:
        cls = import_class(cfg["class_path"])
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        init_args = {k: v for k, v in cfg["init_args"].items() if k in accepted}
        return instantiate(cfg["class_path"], init_args), source
    except Exception as e:  # noqa: BLE001 - jsonargparse / constructor errors: one line
        raise ToolError(f"cannot build the data module from {source}: "
                        f"{' '.join(str(e).split())[:300]}") from None


def _parse_evaluate(argv: list[str]) -> argparse.Namespace:
    p = _parser("evaluate", "Decode every image of a split once and score it with the official "
                            "COCO caption protocol (pycocoevalcap).")
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="data config (LightningCLI YAML with a data: section); repeatable; "
                        "default: the data config stored in the checkpoint")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", default=None,
                   help="output folder (default: eval_SPLIT beside the checkpoint)")
    p.add_argument("--batch-size", type=_positive, default=32, help="images per batch (32)")
    p.add_argument("--num-workers", type=_non_negative, default=0,
                   help="image loading workers (0)")
    p.add_argument("--limit", type=_positive, default=None,
                   help="evaluate only the first N images of the split (quick checks)")
    p.add_argument("--no-java", action="store_true",
                   help="skip the Java parts (Python tokenizer; no METEOR / SPICE)")
    p.add_argument("--no-spice", action="store_true", help="skip SPICE")
    return p.parse_args(argv)


def _run_evaluate(args: argparse.Namespace) -> int:
    from captioner.data.formats import AnnotationError
    from captioner.data.images import ImageLoadError
    from captioner.metrics import write_coco_results

    captioner = _load_captioner(args)
    dm, source = _build_data_module(args)
    try:
        records = dm.records(args.split)
    except (AnnotationError, OSError, ValueError) as e:
        raise ToolError(f"cannot read the {args.split} split ({source}): "
                        f"{' '.join(str(e).split())[:300]}", EXIT_INPUT_ERROR) from None
    records = records[: args.limit] if args.limit else records
    if not records:
        raise ToolError(f"the {args.split} split of {source} has no images", EXIT_INPUT_ERROR)
    print(f"captioner evaluate: {len(records)} {args.split} images ({source})", file=sys.stderr)
    try:
        ev = evaluate_split(captioner, records, beam_size=args.beam_size,
                            max_length=args.max_length, batch_size=args.batch_size,
                            num_workers=args.num_workers,
                            use_java=False if args.no_java else None,
                            use_spice=False if args.no_spice else None)
    except ImageLoadError as e:
        raise ToolError(str(e), EXIT_INPUT_ERROR) from None
    for part, reason in ev.skipped.items():
        print(f"captioner evaluate: {part} skipped: {reason}", file=sys.stderr)

    out = Path(args.out) if args.out else Path(args.ckpt).resolve().parent / f"eval_{args.split}"
    results = out / f"captions_{args.split}.json"
    metrics = out / f"metrics_{args.split}.json"
    write_coco_results(ev.captions, results)
    report = {"checkpoint": str(Path(args.ckpt).resolve()), "split": args.split,
              "data": source, **ev.to_dict()}
    _write_json(metrics, report)
    print(format_table(ev))
    print(f"\ncaptions (COCO results format): {results}\nmetrics: {metrics}")
    return EXIT_OK


def format_table(ev: Evaluation) -> str:
    """A plain-text table of an :class:`Evaluation` (metrics in ``[0, 1]``, as pycocoevalcap)."""
    p = ev.protocol
    lines = [f"{'metric':<24}{'score':>8}", "-" * 32]
    lines += [f"{name:<24}{value:>8.4f}" for name, value in ev.scores.items()]
    lines += [f"{name:<24}{'skipped':>8}" for name in ev.skipped if name != "PTBTokenizer"]
    if ev.attention is not None:
        lines.append(f"{'attention correctness':<24}{ev.attention['attention_correctness']:>8.4f}")
        lines.append(f"{'  chance (box area)':<24}{ev.attention['chance']:>8.4f}")
    lines.append("-" * 32)
    refs = p.get("references_per_image", {})
    lines.append(f"{p.get('images')} images decoded once (beam {p.get('beam_size')}), "
                 f"{refs.get('mean', 0):.1f} references/image, {ev.tokenizer} tokenizer")
    return "\n".join(lines)


def _write_json(path: Path, obj: Any) -> None:
    from captioner.atomic import atomic_write
    from captioner.metrics import json_safe

    with atomic_write(path) as f:
        json.dump(json_safe(obj), f, indent=2, ensure_ascii=False, allow_nan=False)


# ================================================================================== visualize
DISPLAY_MAX_SIDE = 640  # the figure's image is shrunk to this side (the maps do not change)


def _parse_visualize(argv: list[str]) -> argparse.Namespace:
    p = _parser("visualize", "Draw where the model looked for each generated word.")
    p.add_argument("image", metavar="IMAGE", help="image file")
    p.add_argument("--out", required=True, help="figure file (.png, .pdf, .svg...)")
    p.add_argument("--save-maps", default=None, metavar="NPZ",
                   help="also save the raw attention maps (.npz)")
    p.add_argument("--cmap", default="gray", help="overlay colormap (gray, as the paper; jet...)")
    p.add_argument("--no-smooth", action="store_true", help="do not smooth the upsampled maps")
    p.add_argument("--with-end", action="store_true", help="add a panel for <end>")
    p.add_argument("--stn", default=None, metavar="FIGURE",
                   help="also draw each Spatial Transformer stage: the input with the sampling "
                        "grid's outline and the warped output")
    return p.parse_args(argv)


def _run_visualize(args: argparse.Namespace) -> int:
    from captioner.data.images import ImageLoadError, load_image
    from captioner.visualize import plot_attention, save_attention_maps

    captioner = _load_captioner(args)
    if args.stn and not _stn_stages(captioner):  # before anything is written
        raise ToolError("--stn: the model has no Spatial Transformer stage", EXIT_USAGE)
    try:
        image = load_image(args.image)
    except ImageLoadError as e:
        raise ToolError(str(e), EXIT_INPUT_ERROR) from None
    (c,) = captioner.caption([image], beam_size=args.beam_size, max_length=args.max_length)
    n = len(c.tokens) if args.with_end else len(c.words)
    words = [*c.words, "<end>"][:n]
    betas = c.betas[:n] if captioner.has_gate else None
    shown = image.copy()
    shown.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE))  # keeps the aspect ratio
    hard = getattr(captioner.decoder, "hard", None)
    # hard attention with the argmax rule at test time: the one location chosen for each word
    # (with the expectation rule every location contributes, so no cell is outlined)
    chosen = hard is not None and getattr(hard, "test_rule", "argmax") == "argmax"
    locations = c.alphas[:n].reshape(n, -1).argmax(-1) if chosen else None
    with _figure_errors(args.out):
        figure = plot_attention(shown, words, c.alphas[:n], captioner.grid_size, args.out,
                                betas=betas, hard_locations=locations, smooth=not args.no_smooth,
                                cmap=args.cmap, title=c.text or "(empty caption)",
                                theta=c.grid_theta)
    print(f"{args.image}\t{c.text}")
    print(f"figure: {figure}")
    if args.stn:
        with _figure_errors(args.stn):
            print(f"stn: {_draw_stn(captioner, image, args.stn)}")
    if args.save_maps:
        with _figure_errors(args.save_maps):
            maps = save_attention_maps(args.save_maps, words, c.alphas[:n],
                                       captioner.grid_size, betas=c.betas[:n],
                                       hard_locations=locations,
                                       image_size=(image.height, image.width),
                                       theta=c.grid_theta)
        print(f"maps: {maps}")
    return EXIT_OK


def _stn_stages(captioner: Captioner) -> list[Any]:
    from captioner.encoders.stn import SpatialTransformer

    return [s for s in captioner.encoder.stages if isinstance(s, SpatialTransformer)]


def _draw_stn(captioner: Captioner, image: Any, out: str) -> Path:
    """Run the encoder once and draw the first Spatial Transformer stage's warp."""
    import torch

    from captioner.visualize import plot_stn

    stages = _stn_stages(captioner)
    batch = captioner.preprocess(image).unsqueeze(0)  # (1, 3, S, S)
    with torch.no_grad():
        captioner.encoder(batch.to(captioner.device))
    stage = stages[0]
    theta = stage.input_theta() if hasattr(stage, "input_theta") else stage.last_theta[:, 0]
    return Path(plot_stn(batch, theta.cpu(), out))


caption_main = _tool("caption", _parse_caption, _run_caption)
evaluate_main = _tool("evaluate", _parse_evaluate, _run_evaluate)
visualize_main = _tool("visualize", _parse_visualize, _run_visualize)

register_tool("caption", caption_main)
register_tool("evaluate", evaluate_main)
register_tool("visualize", visualize_main)


# ========================================================================== extract-features
def _parse_extract_features(argv: list[str]) -> argparse.Namespace:
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
    p.add_argument("--split", default="train,val,test",
                   help="comma-separated splits to cache (default: train,val,test)")
    p.add_argument("--batch-size", type=_positive, default=32, help="images per forward (32)")
    p.add_argument("--shard-size", type=_positive, default=256,
                   help="images per shard, a multiple of --batch-size (256)")
    p.add_argument("--num-workers", type=_non_negative, default=0,
                   help="image loading workers (0)")
    p.add_argument("--device", type=_device, default="cpu", help="torch device (default: cpu)")
    p.add_argument("--allow-trainable", action="store_true",
                   help="cache an encoder that has trainable parameters (they then stay frozen)")
    p.add_argument("--shard-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # tests
    args = p.parse_args(argv)
    if not args.config and not args.ckpt:
        p.error("give --config (data and model sections) or --ckpt")
    return args


def load_model_encoder_config(files: Sequence[str | Path]) -> dict[str, Any]:
    """The ``model.init_args.encoder`` section (``class_path`` / ``init_args``) of YAML files.

    Later files override earlier ones (``init_args`` merged key by key).

    Raises:
        ToolError: unreadable YAML or no encoder in any ``model:`` section.
    """
    import yaml

    merged: dict[str, Any] = {}
    for file in files:
        try:
            doc = yaml.safe_load(Path(file).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise ToolError(f"{file}: cannot read the config ({type(e).__name__})") from None
        model = doc.get("model") if isinstance(doc, dict) else None
        encoder = ((model or {}).get("init_args") or {}).get("encoder")
        if not isinstance(encoder, dict):
            continue
        class_path = encoder.get("class_path", merged.get("class_path"))
        if class_path != merged.get("class_path"):
            merged = {"class_path": class_path, "init_args": {}}
        merged["init_args"].update(encoder.get("init_args") or {})
    if not merged.get("class_path"):
        raise ToolError("no model encoder (model: init_args: encoder: class_path) in "
                        + ", ".join(map(str, files)))
    return merged


def _run_extract_features(args: argparse.Namespace) -> int:
    from captioner.config import instantiate
    from captioner.data.images import ImageLoadError
    from captioner.features import FeatureCacheError, extract_features

    if args.ckpt:
        captioner = _load_captioner(args)
        encoder, image_size = captioner.encoder, captioner.image_size
        encoder_config: dict[str, Any] = {"checkpoint": str(Path(args.ckpt).resolve())}
    else:
        encoder_config = load_model_encoder_config(args.config)
        try:
            encoder = instantiate(encoder_config["class_path"], encoder_config["init_args"])
        except Exception as e:  # noqa: BLE001 - jsonargparse / constructor errors: one line
            raise ToolError(f"cannot build the encoder: {' '.join(str(e).split())[:300]}") from None
        image_size = None
    dm, source = _build_data_module(args)
    image_size = getattr(dm, "image_size", None) or image_size or 224
    skip_bad = bool(getattr(dm, "skip_bad", False))
    if skip_bad:  # the extraction decodes each image and records the unreadable ones
        dm.decode_images = False
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    if trainable and not args.allow_trainable:
        raise ToolError(f"the encoder has {len(trainable)} trainable parameter tensors (e.g. "
                        f"{trainable[0]}): cached features would freeze them; set freeze: true "
                        "and no trainable stages, or pass --allow-trainable")
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    paths = []
    for split in splits:
        try:
            records = dm.records(split)
        except (OSError, ValueError) as e:
            raise ToolError(f"cannot read the {split} split ({source}): "
                            f"{' '.join(str(e).split())[:300]}", EXIT_INPUT_ERROR) from None
        paths += [r.path for r in records]
    print(f"captioner extract-features: {len(paths)} images of {','.join(splits)} ({source}) "
          f"-> {args.out}", file=sys.stderr)
    try:
        cache = extract_features(
            encoder, paths, args.out, image_size=image_size, batch_size=args.batch_size,
            shard_size=args.shard_size, num_workers=args.num_workers, device=args.device,
            encoder_config=encoder_config, shard_delay=args.shard_delay,
            skip_unreadable=skip_bad,
            progress=lambda line: print(f"captioner extract-features: {line}", file=sys.stderr,
                                        flush=True))
    except (FeatureCacheError, ValueError) as e:
        raise ToolError(str(e)) from None
    except ImageLoadError as e:
        raise ToolError(str(e), EXIT_INPUT_ERROR) from None
    h, w = cache.grid_size
    print(f"{len(cache)} images cached in {args.out}: {h} x {w} x {cache.dim} float16")
    return EXIT_OK


extract_features_main = _tool("extract-features", _parse_extract_features, _run_extract_features)
register_tool("extract-features", extract_features_main)


# ================================================================================== translate
def _parse_translate(argv: list[str]) -> argparse.Namespace:
    p = _parser("translate", "Translate sentences with a translation checkpoint "
                "(arguments, or one sentence per stdin line); one translation per line.")
    p.add_argument("sentences", nargs="*", metavar="SENTENCE",
                   help="sentences to translate (default: read stdin, one per line)")
    p.add_argument("--batch-size", type=_positive, default=64, help="sentences per batch (64)")
    p.add_argument("--alignment", default=None, metavar="FIG",
                   help="draw the attention of each translation, source x target words "
                        "(Bahdanau et al. 2015, Fig. 3); several sentences: FIG_1.png, FIG_2.png")
    p.add_argument("--reference", default=None, metavar="FILE",
                   help="reference translations, one per input line: print sacreBLEU on stderr")
    return p.parse_args(argv)


def _alignment_paths(out: str, n: int) -> list[Path]:
    path = Path(out)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(1, n + 1)]


def _run_translate(args: argparse.Namespace) -> int:
    from captioner.inference import CheckpointError
    from captioner.translate import Translator, sacrebleu_score

    try:
        translator = Translator.from_checkpoint(args.ckpt, device=args.device)
        if args.beam_stop:
            translator.search["beam_stop"] = args.beam_stop
    except CheckpointError as e:
        raise ToolError(str(e)) from None
    sentences = args.sentences or [line.rstrip("\r\n") for line in sys.stdin]
    if sentences and not args.sentences:
        sentences[0] = sentences[0].removeprefix("\ufeff")  # a byte-order mark is no word
    references = None
    if args.reference:
        try:
            references = Path(args.reference).read_text(encoding="utf-8-sig").split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ToolError(f"{args.reference}: cannot read references ({e})") from None
        if references and references[-1] == "":
            references.pop()
        if len(references) != len(sentences):
            raise ToolError(f"{args.reference}: {len(references)} reference lines for "
                            f"{len(sentences)} sentences")
    todo = [s for s in sentences if s.strip()]  # a blank line is answered by a blank line
    done = iter(translator.translate(todo, beam_size=args.beam_size, max_length=args.max_length,
                                     batch_size=args.batch_size))
    translations = [next(done) if s.strip() else None for s in sentences]
    texts = [t.text if t is not None else "" for t in translations]
    for text in texts:
        print(text)
    sys.stdout.flush()
    if args.alignment:
        from captioner.visualize import plot_alignment

        shown = [t for t in translations if t is not None]
        for t, path in zip(shown, _alignment_paths(args.alignment, len(shown))):
            with _figure_errors(str(path)):
                figure = plot_alignment(t.source_tokens, t.target_tokens, t.alphas, path,
                                        title=t.text or "(empty translation)")
            print(f"alignment: {figure}", file=sys.stderr)
    if references is not None:
        bleu = sacrebleu_score(texts, references, lowercase=translator.lowercase)
        print(f"{bleu.detail}\nsignature: {bleu.signature}", file=sys.stderr)
    return EXIT_OK


translate_main = _tool("translate", _parse_translate, _run_translate)
register_tool("translate", translate_main)
