"""Load a captioner checkpoint in a fresh process and caption images (no Lightning).

The checkpoint alone is enough: it carries the model configuration (``class_path`` /
``init_args`` as LightningCLI parsed them), the vocabulary and the input resolution.

Example::

    from captioner.inference import Captioner
    captioner = Captioner.from_checkpoint("model.ckpt")
    for c in captioner.caption(["dog.jpg", "cat.png"], beam_size=3):
        print(c.text, c.alphas.shape)   # (T, H, W) attention per generated token

    captions, errors = captioner.caption_paths(["photos/", "missing.jpg"])
    for path, reason in errors:         # unreadable files do not stop the others
        print(path, reason)
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from captioner.autocast import check_precision, inference_autocast
from captioner.config import instantiate_arguments
from captioner.data.images import (ImageLoadError, find_images, image_to_tensor, load_image,
                                    upright_rgb)
from captioner.data.vocabulary import END, PAD, SPECIALS, START, Vocabulary
from captioner.decoder import AttentionDecoder
from captioner.encoders.backbone import architecture_only
from captioner.encoders.encoder import ImageEncoder
from captioner.messages import first_line, one_line
from captioner.search import SearchResult, beam_search, greedy_search

#: checkpoint entry of captioner's metadata (written by :mod:`captioner.lit.base`) and its format
CHECKPOINT_KEY = "captioner"
CHECKPOINT_FORMAT = 1

#: an image :meth:`Captioner.caption` takes: a file path or a PIL image
ImageInput = str | os.PathLike[str] | Image.Image


class CheckpointError(ValueError):
    """A file that is not a usable captioner checkpoint (the message says why, in one line)."""


#: (real path, inode, size, mtime_ns, ctime_ns) of the archives :func:`check_archive` found
#: whole in this process: a command that reads one checkpoint twice checks it once (a file
#: replaced since, even keeping its mtime as ``cp -p`` does, has another ctime)
_CHECKED_ARCHIVES: set[tuple[str, int, int, int, int]] = set()


def check_archive(path: str | Path) -> None:
    """Check every record of a ``torch.save`` archive against the CRC-32 the archive stores
    for it. ``torch.load`` does not: a checkpoint damaged in a copy or a download (bytes
    changed, the size kept) loaded silently, with wrong weights, and captioned nonsense.
    Reads the whole file (about 0.07 s for 200 MB from the page cache), once per process and
    file version. Records stored without a checksum (CRC 0 on data: torch's
    ``serialization.config.save.compute_crc32 = False``) are not checked.

    Raises:
        CheckpointError: naming the file and the damaged record, or saying it is no archive.
    """
    stat = os.stat(path)
    version = (os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns,
               stat.st_ctime_ns)
    if version in _CHECKED_ARCHIVES:
        return
    try:
        with zipfile.ZipFile(path) as archive:
            for record in archive.infolist():
                if record.CRC == 0 and record.file_size:  # saved without checksums
                    continue
                try:
                    with archive.open(record) as f:  # raises at the end on a CRC mismatch
                        while f.read(1 << 24):
                            pass
                except zipfile.BadZipFile as e:
                    if "CRC" not in str(e):  # a damaged header, not the data
                        raise CheckpointError(f"{path}: damaged checkpoint: {record.filename}: "
                                              f"{first_line(e)}") from None
                    raise CheckpointError(
                        f"{path}: damaged checkpoint: the bytes of {record.filename} do not "
                        "match the checksum stored with them (a broken copy or download)"
                        ) from None
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError,
            zlib.error) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line(e)})") from None
    _CHECKED_ARCHIVES.add(version)


def load_checkpoint_file(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """``torch.load`` of a checkpoint file on CPU (``weights_only``), every failure one line
    naming the file: missing, not a ``torch.save`` archive (cut short, empty, another kind of
    file), damaged (:func:`check_archive`), unreadable, or not a dict.

    Raises:
        CheckpointError: as above.
    """
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive since torch 1.6
        raise CheckpointError(f"{path}: not a checkpoint file (not a torch.save archive: cut "
                              "short, empty, or another kind of file)")
    check_archive(path)  # torch.load (and Lightning's) does not check the stored checksums
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({first_line(e)})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint (a {type(ckpt).__name__})")
    return ckpt


def read_checkpoint(path: str | Path, task: str | None = None,
                    mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint file on CPU and validate its captioner metadata.

    Args:
        path: the ``.ckpt`` file.
        task: expected ``"task"`` entry of the metadata (``"captioning"``), or ``None``.
        mmap: map the file instead of reading it: the tensors are read only where used (for
            the metadata alone, a fraction of a ResNet-101 checkpoint's ~200 MB).

    Returns:
        The checkpoint dict (``state_dict``, ``hyper_parameters``, ``"captioner"``...).

    Raises:
        CheckpointError: missing file, not a torch file, or not a captioner checkpoint.
    """
    path = Path(path)
    ckpt = load_checkpoint_file(path, mmap)
    meta = ckpt.get(CHECKPOINT_KEY)
    if not isinstance(meta, dict) or not meta.get("model_config") or not meta.get("vocab"):
        raise CheckpointError(f"{path}: not a captioner checkpoint (no model config / vocabulary)")
    if task is not None and meta.get("task") != task:
        raise CheckpointError(f"{path}: a {meta.get('task')!r} checkpoint, expected {task!r}")
    if not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path}: the checkpoint has no model weights (state_dict)")
    return ckpt


PART_TYPES: dict[str, Any] = {
    "encoder": ImageEncoder,
    "decoder": Callable[[int, int], AttentionDecoder],
}
"""Types of ``CaptioningModule``'s ``encoder`` / ``decoder`` arguments, spelled out so that
captioning never imports Lightning (a test checks them against the module's signature)."""


def _build_model(init_args: dict[str, Any], vocab_size: int) -> tuple[nn.Module, nn.Module]:
    """Encoder and decoder from the stored ``CaptioningModule`` init args, as LightningCLI
    builds them (``class_path`` / ``init_args``; the decoder is a callable ``(V, D) -> decoder``,
    :class:`~captioner.decoder.AttentionDecoder` with its defaults when not given)."""
    with architecture_only():  # the checkpoint supplies every weight: download nothing
        parts = instantiate_arguments(PART_TYPES, init_args)
    if parts["encoder"] is None:
        raise ValueError("the model config has no encoder")
    make_decoder = parts["decoder"] or AttentionDecoder
    decoder = make_decoder(vocab_size, parts["encoder"].out_channels)
    decoder.use_grid(parts["encoder"].grid_size)
    return parts["encoder"], decoder


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@dataclass
class Caption:
    """One generated caption.

    Attributes:
        words: generated words (``<end>`` and padding removed; ``<unk>`` kept), so
            ``words[t]`` was generated with attention ``alphas[t]``.
        tokens: ``(T,)`` generated token ids, ``<end>`` included when emitted.
        score: total log-probability of ``tokens``.
        alphas: ``(T, H, W)`` attention of each step of ``tokens``.
        betas: ``(T,)`` gate values (ones for a decoder without a gate).
        image: the image as loaded (RGB, EXIF-rotated), or ``None`` when not kept.
        path: the file the image came from, or ``None`` for an in-memory image.
        grid_theta: ``(2, 3)`` where the attention grid looked in the image when a Spatial
            Transformer moved the view (:mod:`captioner.grid_frame`), else ``None``: cell
            ``(r, c)`` then covers the ``(r, c)`` cell of the image.
        cell_edges: ``(ys (H + 1,), xs (W + 1,))`` the cells' boundaries at their receptive
            fields' centres (normalised, :mod:`captioner.grid_frame`) when the captioner's
            ``cells`` is ``"receptive_field"``, else ``None``: uniform tiles.
    """

    words: list[str]
    tokens: list[int]
    score: float
    alphas: np.ndarray
    betas: np.ndarray
    image: Image.Image | None = None
    path: Path | None = None
    grid_theta: np.ndarray | None = None
    cell_edges: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def text(self) -> str:
        """The caption as one string of space-separated words."""
        return " ".join(self.words)

    @property
    def word_alphas(self) -> np.ndarray:
        """``(len(words), H, W)``: the attention maps of the words (no ``<end>`` map)."""
        return self.alphas[: len(self.words)]

    @property
    def word_betas(self) -> np.ndarray:
        """``(len(words),)``: the gate values of the words."""
        return self.betas[: len(self.words)]


CELLS = ("tile", "receptive_field")
"""Where :class:`Captioner` places the attention cells in the image (its ``cells``)."""


class Captioner:
    """A trained encoder + decoder with its vocabulary and preprocessing.

    Args:
        encoder: :class:`~captioner.encoders.ImageEncoder`.
        decoder: :class:`~captioner.decoder.AttentionDecoder`.
        vocab: the training vocabulary.
        image_size: side of the square input images used in training.
        search: default search settings (``beam_size``, ``max_length``, ``min_length``,
            ``length_penalty``, ``beam_stop``: see :mod:`captioner.search`).
        precision: ``"32"`` (float32), or ``"bf16"``: encoder and decoder under bfloat16
            autocast, about 2x faster on CPUs with native bf16 (BENCHMARKS.md), with captions
            that may differ slightly from float32's (:func:`captioner.autocast.check_precision`).
        cells: where the attention cells lie in the image: ``"tile"`` (uniform tiles, as the
            paper's figures read them) or ``"receptive_field"`` (at the encoder's receptive
            fields' centres, :mod:`captioner.encoders.receptive_field`; each
            :class:`Caption` then carries ``cell_edges``).
    """

    def __init__(self, encoder: torch.nn.Module, decoder: torch.nn.Module, vocab: Vocabulary,
                 image_size: int = 224, search: dict[str, Any] | None = None,
                 precision: str = "32", cells: str = "tile") -> None:
        if cells not in CELLS:
            raise ValueError(f"cells must be one of {', '.join(CELLS)}, got {cells!r}")
        self.encoder, self.decoder, self.vocab = encoder.eval(), decoder.eval(), vocab
        self.cells = cells
        self.image_size = image_size
        self.search = {"beam_size": 1, "max_length": 20, "min_length": 1, "length_penalty": 0.0,
                       "beam_stop": "k_finished", **(search or {})}
        self.precision = check_precision(precision, self.device)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu",
                        precision: str = "32") -> "Captioner":
        """Rebuild the model from a checkpoint alone (config and vocabulary are inside).

        Args:
            path: a checkpoint written by ``captioner fit`` / ``trainer.save_checkpoint``.
            device: where to put the model.
            precision: ``"32"`` or ``"bf16"`` (see the class).

        Raises:
            CheckpointError: unreadable file, not a captioner checkpoint, a model config that
                cannot be rebuilt, weights that do not fit it, or a vocabulary whose size
                differs from the decoder's output layer.
        """
        ckpt = read_checkpoint(path, task="captioning")
        meta = ckpt[CHECKPOINT_KEY]
        try:
            init_args = meta["model_config"]["init_args"]
            vocab = Vocabulary.from_dict(meta["vocab"])
            vocab_size = int(init_args["vocab_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: broken captioner metadata ({first_line(e)})") from None
        if vocab_size != len(vocab):
            raise CheckpointError(f"{path}: vocabulary mismatch: the checkpoint's vocabulary has "
                                  f"{len(vocab)} words but the model was built for {vocab_size}")
        try:
            encoder, decoder = _build_model(init_args, vocab_size)
        except Exception as e:  # noqa: BLE001 - jsonargparse / constructors: one clear line
            raise CheckpointError(f"{path}: cannot rebuild the model from its stored config "
                                  f"({first_line(e)})") from None
        state = ckpt["state_dict"]
        try:
            encoder.load_state_dict(_sub_state(state, "encoder."))
            decoder.load_state_dict(_sub_state(state, "decoder."))
        except RuntimeError as e:
            problem = one_line(e, 300)  # the mismatched keys: the first few
            raise CheckpointError(f"{path}: weights do not fit the stored model config "
                                  f"(vocabulary or architecture mismatch): {problem}") from None
        hp = ckpt.get("hyper_parameters") or {}
        search = {k: hp[k] for k in ("beam_size", "max_length", "min_length", "length_penalty",
                                     "beam_stop") if k in hp}
        image_size = (meta.get("data") or {}).get("image_size") or 224
        return cls(encoder.to(device), decoder.to(device), vocab, int(image_size), search,
                   precision)

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.decoder.parameters()).device

    @property
    def grid_size(self) -> tuple[int, int]:
        """``(H, W)`` of the attention grid."""
        return tuple(self.encoder.grid_size)  # type: ignore[return-value]

    @property
    def has_gate(self) -> bool:
        """Whether the decoder has the gating scalar ``beta`` (Section 4.2.1)."""
        return (getattr(self.decoder, "gate", "none") != "none"
                and getattr(self.decoder, "use_context", True))  # Show and Tell has no beta

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> ``(3, H, W)`` in ``[0, 1]`` at the training resolution (``H = W =``
        :attr:`image_size` for a square one)."""
        return image_to_tensor(image, self.image_size)

    # ---------------------------------------------------------------- captioning
    @torch.no_grad()
    def caption(self, images: ImageInput | Sequence[ImageInput], beam_size: int | None = None,
                max_length: int | None = None, min_length: int | None = None,
                batch_size: int = 16, keep_images: bool = True) -> list[Caption]:
        """Caption images (paths or PIL images), batched, in the order given.

        Args:
            images: one image or a list of them (file paths or PIL images of any mode; a PIL
                image is turned by its EXIF orientation and converted as a file would be).
            beam_size: ``K``; ``1`` is greedy search (default: the checkpoint's setting).
            max_length: most decoding steps (default: the checkpoint's setting).
            min_length: fewest tokens, ``<end>`` included.
            batch_size: images encoded and decoded together.
            keep_images: keep the loaded image in :attr:`Caption.image`.

        Returns:
            One :class:`Caption` per image.

        Raises:
            captioner.data.images.ImageLoadError: a path that is missing or not an image.
            ValueError: ``batch_size`` below 1.
        """
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        _check_batch_size(batch_size)
        results: list[Caption] = []
        for start in range(0, len(images), batch_size):
            chunk = list(images[start:start + batch_size])
            # in-memory images as if read from a file: EXIF-rotated, RGB
            loaded = [upright_rgb(img) if isinstance(img, Image.Image) else load_image(img)
                      for img in chunk]
            paths = [None if isinstance(img, Image.Image) else Path(img) for img in chunk]
            batch = torch.stack([self.preprocess(img) for img in loaded])  # (B, 3, H, W)
            kept = loaded if keep_images else [None] * len(loaded)
            results.extend(self._caption_inputs(batch, kept, paths, beam_size, max_length,
                                                min_length))
        return results

    def caption_paths(self, paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
                      beam_size: int | None = None, max_length: int | None = None,
                      min_length: int | None = None, batch_size: int = 16,
                      keep_images: bool = False,
                      ) -> tuple[list[Caption], list[tuple[Path, str]]]:
        """Caption image files and folders (searched recursively), never stopping at a bad one.

        Folders are expanded with :func:`~captioner.data.images.find_images`; images are loaded
        ``batch_size`` at a time, so a large folder never sits in memory at once
        (:meth:`iter_caption_paths` hands each batch over as it is done).

        Args:
            paths: image files and/or folders (one path alone is one path, not a sequence).
            beam_size: ``K``; ``1`` is greedy search (default: the checkpoint's setting).
            max_length: most decoding steps.
            min_length: fewest tokens, ``<end>`` included.
            batch_size: images encoded and decoded together.
            keep_images: keep the loaded image in :attr:`Caption.image`.

        Returns:
            ``(captions, errors)``: a :class:`Caption` (with ``path`` set) for each readable
            image, in order, and ``(path, reason)`` for each path that is missing, not an image
            file, or not readable as an image.

        Raises:
            ValueError: ``batch_size`` below 1.
        """
        captions: list[Caption] = []
        errors: list[tuple[Path, str]] = []
        for done, failed in self.iter_caption_paths(paths, beam_size, max_length, min_length,
                                                    batch_size, keep_images):
            captions += done
            errors += failed
        return captions, errors

    def iter_caption_paths(
        self, paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        beam_size: int | None = None, max_length: int | None = None,
        min_length: int | None = None, batch_size: int = 16, keep_images: bool = False,
    ) -> Iterator[tuple[list[Caption], list[tuple[Path, str]]]]:
        """:meth:`caption_paths` one batch at a time, so that a caller can write each batch's
        captions before the next is decoded (``captioner caption`` does). Without
        ``keep_images`` each image is resized to the model's input as soon as it is decoded,
        so a batch of large photos never sits in memory at full resolution.

        Args:
            paths, beam_size, max_length, min_length, batch_size, keep_images: as
                :meth:`caption_paths`.

        Returns:
            An iterator of ``(captions, errors)``, one per batch of ``batch_size`` files, in
            order; the paths that name no image file come first, as one item with no captions.

        Raises:
            ValueError: ``batch_size`` below 1 (here, not at the first ``next``).
        """
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        _check_batch_size(batch_size)
        return self._iter_caption_paths(paths, beam_size, max_length, min_length, batch_size,
                                        keep_images)

    @torch.no_grad()
    def _iter_caption_paths(
        self, paths: Iterable[str | os.PathLike[str]], beam_size: int | None,
        max_length: int | None, min_length: int | None, batch_size: int, keep_images: bool,
    ) -> Iterator[tuple[list[Caption], list[tuple[Path, str]]]]:
        files, not_images = find_images(paths)
        if not_images:
            yield [], not_images
        for chunk in _batched(files, batch_size):
            inputs: list[torch.Tensor] = []  # (3, H, W) each
            kept: list[Image.Image | None] = []
            ok: list[Path] = []
            errors: list[tuple[Path, str]] = []
            for file in chunk:
                try:
                    image = load_image(file)
                except ImageLoadError as e:
                    errors.append((file, e.reason))
                    continue
                inputs.append(self.preprocess(image))
                kept.append(image if keep_images else None)
                ok.append(file)
                del image  # the full-resolution pixels go now unless kept
            captions = (self._caption_inputs(torch.stack(inputs), kept, ok, beam_size,
                                             max_length, min_length) if inputs else [])
            yield captions, errors

    @torch.no_grad()
    def caption_tensors(self, images: torch.Tensor, beam_size: int | None = None,
                        max_length: int | None = None, min_length: int | None = None,
                        ) -> list[Caption]:
        """Caption preprocessed images.

        Args:
            images: ``(B, 3, H, W)`` RGB in ``[0, 1]`` (see :meth:`preprocess`).
            beam_size: ``K``; ``1`` is greedy search.
            max_length: most decoding steps.
            min_length: fewest tokens, ``<end>`` included.

        Returns:
            One :class:`Caption` per image (without ``image`` / ``path``).

        Raises:
            TypeError: integer images (``torchvision.io.read_image``'s ``uint8`` in
                ``[0, 255]``: divide by 255, or use :meth:`preprocess`).
            ValueError: images that are not ``(B, 3, H, W)``.
        """
        from captioner.grid_frame import encoder_edges, encoder_thetas

        if not torch.is_floating_point(images):
            raise TypeError(f"images must be floating point in [0, 1], got {images.dtype} "
                            "(uint8 images in [0, 255]: divide by 255 first)")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) RGB, got shape {tuple(images.shape)}")
        with inference_autocast(self.device, self.precision):
            annotations = self.encoder(images.to(self.device, torch.float32))  # (B, L, D)
            out = self.generate(annotations, beam_size, max_length, min_length)
        thetas = encoder_thetas(self.encoder)  # (B, 2, 3) or None
        captions = self._captions(out)
        if thetas is not None:
            for caption, theta in zip(captions, thetas):
                caption.grid_theta = theta
        if self.cells == "receptive_field":
            edges = encoder_edges(self.encoder)  # the same for every image of the batch
            for caption in captions:
                caption.cell_edges = edges
        return captions

    def generate(self, annotations: torch.Tensor, beam_size: int | None = None,
                 max_length: int | None = None, min_length: int | None = None) -> SearchResult:
        """Decode ``(B, L, D)`` annotations with greedy (``K = 1``) or beam search."""
        s = self.search
        k = s["beam_size"] if beam_size is None else beam_size
        if k < 1:
            raise ValueError(f"beam_size must be at least 1, got {k}")
        kw = dict(start_id=SPECIALS.index(START), end_id=SPECIALS.index(END),
                  pad_id=SPECIALS.index(PAD),
                  max_length=s["max_length"] if max_length is None else max_length,
                  min_length=s["min_length"] if min_length is None else min_length)
        if k == 1:
            return greedy_search(self.decoder, annotations, **kw)
        return beam_search(self.decoder, annotations, beam_size=k,
                           length_penalty=s["length_penalty"], stop=s["beam_stop"], **kw)

    def _caption_inputs(self, batch: torch.Tensor, images: Sequence[Image.Image | None],
                        paths: Sequence[Path | None], beam_size: int | None,
                        max_length: int | None, min_length: int | None) -> list[Caption]:
        """Caption ``batch`` ``(B, 3, H, W)`` (:meth:`preprocess`'s), each caption given its
        image (or ``None``) and path."""
        captions = self.caption_tensors(batch, beam_size, max_length, min_length)
        for caption, img, path in zip(captions, images, paths):
            caption.image = img
            caption.path = path
        return captions

    def _captions(self, out: SearchResult) -> list[Caption]:
        H, W = self.grid_size
        captions = []
        for i in range(out.tokens.shape[0]):
            n = int(out.lengths[i])
            tokens = out.tokens[i, :n].tolist()
            captions.append(Caption(
                words=self.vocab.decode(tokens), tokens=tokens, score=float(out.scores[i]),
                alphas=out.alphas[i, :n].float().cpu().numpy().reshape(n, H, W),  # (T, H, W)
                betas=out.betas[i, :n].float().cpu().numpy()))
        return captions


def _check_batch_size(batch_size: int) -> None:
    """Refuse a ``batch_size`` that is not a positive integer (``True`` included) with a
    ``ValueError`` naming it (``range`` failed on 0 with "arg 3 must not be zero")."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _batched(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
