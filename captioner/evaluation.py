"""Scoring a captioner on a split by the COCO caption protocol: every image decoded once, its
caption scored against all its references (:func:`captioner.metrics.coco_caption_scores`), and
attention correctness where the data has object boxes. What ``captioner evaluate`` runs; usable
from Python and notebooks."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from captioner.data.formats import ImageRecord
    from captioner.inference import Captioner


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
                   use_java: bool | None = None, use_spice: bool | None = None,
                   image_size: int | Sequence[int] | None = None) -> Evaluation:
    """Decode every image of ``records`` exactly once and score it by the COCO protocol.

    Each image is captioned once (greedy or beam search) and its caption scored against *all*
    its reference captions with :func:`captioner.metrics.coco_caption_scores` (PTB tokenizer,
    BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE when available). When the records carry object
    boxes (the shapes data), attention correctness (:func:`captioner.metrics.attention_correctness`)
    and its chance level are computed from the same decoding, with the cells placed as the
    captioner's ``cells`` says (uniform tiles, or at the receptive fields' centres).

    Args:
        captioner: a :class:`captioner.inference.Captioner`.
        records: :class:`~captioner.data.formats.ImageRecord` s of one split.
        beam_size: ``K`` (default: the checkpoint's setting).
        max_length: most decoding steps (default: the checkpoint's setting).
        batch_size: images per batch.
        num_workers: DataLoader worker processes for image loading.
        use_java: as in :func:`~captioner.metrics.coco_caption_scores`.
        use_spice: as in :func:`~captioner.metrics.coco_caption_scores`.
        image_size: the images' size for the encoder (the data config's; default: the
            checkpoint's training size, ``captioner.image_size``).

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
    image_size = captioner.image_size if image_size is None else image_size
    loader = DataLoader(ImageEvalDataset(records, image_size), batch_size=batch_size,
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
        upright = [upright_boxes(r) for r in records]
        attention = attention_correctness(
            [c.word_alphas.reshape(len(c.words), H * W) for c in captions],  # (T, L) each
            [c.words for c in captions], [boxes for boxes, _ in upright],
            (H, W), [size for _, size in upright],
            thetas=[c.grid_theta for c in captions], edges=captions[0].cell_edges)
    n_refs = [len(r.captions) for r in records]
    protocol = {
        "images": len(records),
        "image_size": image_size,
        "references_per_image": {"min": min(n_refs), "mean": float(np.mean(n_refs)),
                                 "max": max(n_refs)},
        "beam_size": captioner.search["beam_size"] if beam_size is None else beam_size,
        "max_length": captioner.search["max_length"] if max_length is None else max_length,
        "min_length": captioner.search["min_length"],
        "length_penalty": captioner.search["length_penalty"],
        "beam_stop": captioner.search["beam_stop"],
        # hard attention's location rule at test time; None for soft attention
        "hard_test": getattr(getattr(captioner.decoder, "hard", None), "test_rule", None),
        # as placed: "tile" where the receptive fields could not be measured (warned of)
        "cells": "receptive_field" if captions[0].cell_edges is not None else "tile",
        "tokenizer": result.tokenizer,
        "decoded_once_per_image": True,
        "empty_captions": sum(not c.text for c in captions),
    }
    return Evaluation(dict(result.scores), dict(result.skipped), result.tokenizer, hyps,
                      attention, protocol)


def empty_captions_warning(captions: Sequence[str], split: str) -> str | None:
    """The warning for a split whose decoded captions include empty ones (``<end>`` chosen
    first: common for beam search on an undertrained model, whose short hypotheses score
    highest), which score 0 on every metric; ``None`` when there are none."""
    empty = sum(not c for c in captions)
    if not empty:
        return None
    return (f"{split}: {empty} of {len(captions)} decoded captions are empty (<end> chosen "
            "first: an undertrained model, most often under beam search with length_penalty "
            "0): min_length 2 forbids them")


def same_image_size(a: int | Sequence[int], b: int | Sequence[int]) -> bool:
    """Whether two image sizes (a side, or ``(H, W)``) are the same."""
    def hw(size: int | Sequence[int]) -> tuple[int, ...]:
        return (int(size),) * 2 if isinstance(size, (int, float)) else tuple(map(int, size))

    return hw(a) == hw(b)


def image_size_warning(trained: int | Sequence[int], used: int | Sequence[int]) -> str:
    """The warning for scoring a model at another image size than it was trained at (a data
    config's ``image_size``): the scores are then not the model's at its own resolution."""
    return (f"the images are read at image_size {used}, but the model was trained at "
            f"{trained}: the scores are those of another input resolution (set the data "
            f"config's image_size to {trained} to score it as trained)")


def image_size(record: ImageRecord) -> tuple[int, int]:
    """``(H_img, W_img)`` of a record, from the annotation or, where it gives none (COCO's
    ``width`` / ``height`` are optional), the file header."""
    if record.height and record.width:
        return int(record.height), int(record.width)
    from PIL import Image

    with Image.open(record.path) as img:
        return img.height, img.width


def upright_boxes(record: ImageRecord) -> tuple[list[tuple[str, str, tuple[float, ...]]],
                                                tuple[int, int]]:
    """A record's objects as ``(category, colour, (x, y, w, h))`` and its ``(H_img, W_img)``,
    on the image as the model sees it: turned upright by its EXIF orientation
    (:func:`captioner.data.images.upright_box`).

    COCO's boxes and ``width`` / ``height`` are those of the stored pixels (its annotation tool
    did not turn images), so a turned image's boxes are turned with it. Where the annotation's
    size is the turned image's (sides swapped by orientations 5 to 8), the boxes were drawn on
    the upright image and are kept as given.
    """
    from PIL import Image

    from captioner.data.images import exif_orientation, upright_box

    size = image_size(record)
    boxes = [(b.category, (b.attributes or {}).get("colour", ""), tuple(b.bbox))
             for b in record.boxes]
    orientation = exif_orientation(record.path) if boxes else 1
    if orientation == 1:
        return boxes, size
    if orientation >= 5 and record.height and record.width:
        with Image.open(record.path) as img:
            if size == (img.width, img.height) != (img.height, img.width):
                return boxes, size  # annotated on the upright image
    turned = [(category, colour, upright_box(box, size, orientation))
              for category, colour, box in boxes]
    return turned, (size[1], size[0]) if orientation >= 5 else size


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


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
