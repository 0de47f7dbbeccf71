"""Load a captioner checkpoint in a fresh process and caption images (no Lightning).

Example::

    from captioner.inference import Captioner
    captioner = Captioner.from_checkpoint("model.ckpt")
    for c in captioner.caption(["dog.jpg", "cat.png"], beam_size=3):
        print(c.text, c.alphas.shape)   # (T, H, W) attention per generated word
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from captioner.config import parse_arguments
from captioner.data.images import image_to_tensor, load_image
from captioner.data.vocabulary import END, PAD, SPECIALS, START, Vocabulary
from captioner.search import beam_search, greedy_search

CHECKPOINT_KEY = "captioner"


class CheckpointError(ValueError):
    """A file that is not a usable captioner checkpoint."""


def read_checkpoint(path: str | Path, task: str | None = None) -> dict[str, Any]:
    """Load a checkpoint file on CPU and validate its captioner metadata.

    Raises:
        CheckpointError: missing file, not a torch file, or not a captioner checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None
    meta = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    if not meta or not meta.get("model_config") or not meta.get("vocab"):
        raise CheckpointError(f"{path}: not a captioner checkpoint (no model config / vocabulary)")
    if task is not None and meta.get("task") != task:
        raise CheckpointError(f"{path}: a {meta.get('task')!r} checkpoint, expected {task!r}")
    return ckpt


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@dataclass
class Caption:
    """One generated caption.

    Attributes:
        words: generated words (``<end>`` and specials removed).
        tokens: generated token ids, ``<end>`` included when emitted.
        score: total log-probability.
        alphas: ``(T, H, W)`` attention for each token of ``tokens``.
        betas: ``(T,)`` gate values.
        image: the image as loaded (RGB, EXIF-rotated).
    """

    words: list[str]
    tokens: list[int]
    score: float
    alphas: np.ndarray
    betas: np.ndarray
    image: Image.Image | None = None

    @property
    def text(self) -> str:
        return " ".join(self.words)


class Captioner:
    """A trained encoder + decoder with its vocabulary and preprocessing.

    Args:
        encoder: :class:`~captioner.encoders.ImageEncoder`.
        decoder: :class:`~captioner.decoder.AttentionDecoder`.
        vocab: the training vocabulary.
        image_size: side of the square input images used in training.
        search: default search settings (``beam_size``, ``max_length``, ``min_length``,
            ``length_penalty``).
    """

    def __init__(self, encoder: torch.nn.Module, decoder: torch.nn.Module, vocab: Vocabulary,
                 image_size: int = 224, search: dict[str, Any] | None = None) -> None:
        self.encoder, self.decoder, self.vocab = encoder.eval(), decoder.eval(), vocab
        self.image_size = image_size
        self.search = {"beam_size": 1, "max_length": 20, "min_length": 1, "length_penalty": 0.0,
                       **(search or {})}

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> "Captioner":
        """Rebuild the model from a checkpoint alone (config and vocabulary are inside)."""
        from captioner.lit.captioning import CaptioningModule  # only for its signature

        ckpt = read_checkpoint(path, task="captioning")
        meta = ckpt[CHECKPOINT_KEY]
        init_args = meta["model_config"]["init_args"]
        vocab = Vocabulary.from_dict(meta["vocab"])
        parts = parse_arguments(CaptioningModule, init_args, ["encoder", "decoder"])
        encoder = parts["encoder"]
        decoder = parts["decoder"](int(init_args["vocab_size"]), encoder.out_channels)
        state = ckpt["state_dict"]
        encoder.load_state_dict(_sub_state(state, "encoder."))
        decoder.load_state_dict(_sub_state(state, "decoder."))
        if decoder.vocab_size != len(vocab):
            raise CheckpointError(f"{path}: vocabulary of {len(vocab)} words but the decoder "
                                  f"predicts {decoder.vocab_size}")
        hp = ckpt.get("hyper_parameters", {})
        search = {k: hp[k] for k in ("beam_size", "max_length", "min_length", "length_penalty")
                  if k in hp}
        image_size = (meta.get("data") or {}).get("image_size") or 224
        return cls(encoder.to(device), decoder.to(device), vocab, int(image_size), search)

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> ``(3, S, S)`` in ``[0, 1]`` at the training resolution."""
        return image_to_tensor(image, self.image_size)

    @torch.no_grad()
    def caption(self, images: Sequence[str | Path | Image.Image], beam_size: int | None = None,
                max_length: int | None = None, min_length: int | None = None,
                batch_size: int = 16) -> list[Caption]:
        """Caption images (paths or PIL images), batched.

        Raises:
            captioner.data.images.ImageLoadError: a path that is missing or not an image.
        """
        results: list[Caption] = []
        for start in range(0, len(images), batch_size):
            chunk = [img if isinstance(img, Image.Image) else load_image(img)
                     for img in images[start:start + batch_size]]
            chunk = [img.convert("RGB") for img in chunk]
            batch = torch.stack([self.preprocess(img) for img in chunk]).to(self.device)
            results.extend(self._decode(batch, chunk, beam_size, max_length, min_length))
        return results

    def _decode(self, batch, pil_images, beam_size, max_length, min_length) -> list[Caption]:
        s = self.search
        k = s["beam_size"] if beam_size is None else beam_size
        kw = dict(start_id=SPECIALS.index(START), end_id=SPECIALS.index(END),
                  pad_id=SPECIALS.index(PAD),
                  max_length=s["max_length"] if max_length is None else max_length,
                  min_length=s["min_length"] if min_length is None else min_length)
        annotations = self.encoder(batch)  # (B, L, D)
        if k <= 1:
            out = greedy_search(self.decoder, annotations, **kw)
        else:
            out = beam_search(self.decoder, annotations, beam_size=k,
                              length_penalty=s["length_penalty"], **kw)
        H, W = self.encoder.grid_size
        captions = []
        for i, img in enumerate(pil_images):
            n = int(out.lengths[i])
            tokens = out.tokens[i, :n].tolist()
            captions.append(Caption(
                words=self.vocab.decode(tokens), tokens=tokens, score=float(out.scores[i]),
                alphas=out.alphas[i, :n].float().cpu().numpy().reshape(n, H, W),
                betas=out.betas[i, :n].float().cpu().numpy(), image=img))
        return captions
