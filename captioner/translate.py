"""Load a translation checkpoint in a fresh process and translate sentences (no Lightning).

The checkpoint alone is enough: it carries the model configuration (``class_path`` /
``init_args`` as LightningCLI parsed them), both vocabularies and the tokenisation setting.

Example::

    from captioner.translate import Translator
    translator = Translator.from_checkpoint("multi30k.ckpt")
    for t in translator.translate(["Ein Hund rennt.", "Zwei Männer lachen."], beam_size=5):
        print(t.text, t.alphas.shape)   # (T, S): attention of each target over source tokens

Also here, shared with :class:`captioner.lit.translation.TranslationModule`: :func:`decode`
(greedy or batched beam search over masked source annotations) and :func:`sacrebleu_score`
(corpus BLEU of detokenised output, with sacreBLEU's signature). The translation tokeniser
:func:`~captioner.data.tokenize.tokenize_mt` / :func:`~captioner.data.tokenize.detokenize_mt` is
re-exported here.
"""

from __future__ import annotations

import unicodedata
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captioner.autocast import check_precision, inference_autocast
from captioner.config import instantiate_arguments
from captioner.data.tokenize import MT_TOKENIZER_VERSION, detokenize_mt, tokenize_mt
from captioner.data.vocabulary import END, PAD, SPECIALS, START, UNK, Vocabulary
from captioner.decoder import AttentionDecoder
from captioner.encoders.text import TextEncoder
from captioner.inference import CHECKPOINT_KEY, CheckpointError, read_checkpoint
from captioner.messages import first_line, one_line
from captioner.search import SearchResult, beam_search, greedy_search

__all__ = ["BleuScore", "Translation", "Translator", "decode", "detokenize_mt",
           "sacrebleu_score", "tokenize_mt"]

TASK = "translation"
SEARCH_DEFAULTS: dict[str, Any] = {"beam_size": 1, "max_length": 50, "min_length": 1,
                                   "length_penalty": 1.0, "beam_stop": "k_finished"}


# ---------------------------------------------------------------------------------- shared parts
def decode(decoder: AttentionDecoder, annotations: torch.Tensor, mask: torch.Tensor, *,
           beam_size: int = 1, max_length: int = 50, min_length: int = 1,
           length_penalty: float = 1.0, beam_stop: str = "k_finished") -> SearchResult:
    """Greedy (``beam_size == 1``) or batched beam search over source annotations.

    Args:
        decoder: the attention decoder.
        annotations: ``(B, S, D)`` source annotations.
        mask: ``(B, S)`` bool, ``True`` at real source tokens.
        beam_size: ``K``.
        max_length: most target tokens, ``<end>`` included.
        min_length: fewest target tokens, ``<end>`` included.
        length_penalty: beam ranking ``score / length ** length_penalty``.
        beam_stop: ``"k_finished"`` or ``"exact"`` (:mod:`captioner.search`).

    Returns:
        The search result; ``alphas`` are ``(B, T, S)``.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    kw = dict(start_id=SPECIALS.index(START), end_id=SPECIALS.index(END),
              pad_id=SPECIALS.index(PAD), max_length=max_length, min_length=min_length, mask=mask)
    if beam_size == 1:
        return greedy_search(decoder, annotations, **kw)
    return beam_search(decoder, annotations, beam_size=beam_size, length_penalty=length_penalty,
                       stop=beam_stop, **kw)


@dataclass
class BleuScore:
    """A sacreBLEU corpus score.

    Attributes:
        score: BLEU in ``[0, 100]``.
        signature: sacreBLEU's signature (``nrefs:1|case:lc|eff:no|tok:13a|smooth:exp|...``).
        detail: sacreBLEU's one-line summary (n-gram precisions, brevity penalty, lengths).
    """

    score: float
    signature: str
    detail: str


UNK_FOR_BLEU = "\u2047"
"""What ``<unk>`` in a hypothesis is scored as: one token (``⁇``, as SentencePiece writes it)."""


def sacrebleu_score(hypotheses: Sequence[str], references: Sequence[str],
                    lowercase: bool = True) -> BleuScore:
    """Corpus BLEU of detokenised hypotheses against raw references (one reference each),
    with sacreBLEU's default ``13a`` tokenisation.

    Both sides are put in Unicode NFC form first, as :func:`captioner.data.tokenize.tokenize_mt`
    reads the model's text: a reference written decomposed (macOS, some corpora) matches.
    A ``<unk>`` is one word, so it is scored as one token (:data:`UNK_FOR_BLEU`), in hypotheses
    and in references (some preprocessed corpora write it there); ``13a`` would split the literal
    ``<unk>`` into three (``< unk >``), lengthening the sentence and lowering its n-gram
    precisions. A model's ``<unk>`` matches no reference word unless the reference has one too.

    Args:
        hypotheses: one detokenised translation per sentence.
        references: the reference sentence of each, as in the data file.
        lowercase: case-insensitive BLEU (``case:lc`` in the signature).

    Raises:
        ValueError: if the two lists differ in length.
    """
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    bleu = BLEU(lowercase=lowercase)
    if not hypotheses:
        bleu.corpus_score([""], [[""]])  # sacreBLEU fills its signature on a first score
        return BleuScore(0.0, str(bleu.get_signature()), "no sentences")
    # NFC, as the tokenisers read text: a decomposed reference (U+0308 after "a") matches "ä"
    hypotheses = [unicodedata.normalize("NFC", h).replace(UNK, UNK_FOR_BLEU) for h in hypotheses]
    references = [unicodedata.normalize("NFC", r).replace(UNK, UNK_FOR_BLEU) for r in references]
    result = bleu.corpus_score(hypotheses, [references])
    return BleuScore(float(result.score), str(bleu.get_signature()), str(result))


# ---------------------------------------------------------------------------------- inference
@dataclass
class Translation:
    """One translated sentence.

    Attributes:
        source: the input sentence.
        source_tokens: its tokens as tokenised for the model (lower-cased where it was
            trained so), ``<end>`` last (``S`` of them); words outside the source vocabulary
            keep their form here.
        words: generated target words (``<end>`` removed, ``<unk>`` kept).
        tokens: ``(T,)`` generated ids, ``<end>`` included when emitted.
        score: total log-probability of ``tokens``.
        alphas: ``(T, S)`` attention of each generated token over ``source_tokens``.
        source_unknown: ``(S,)`` whether the encoder read ``source_tokens[s]`` as ``<unk>``
            (a word outside the source vocabulary).
    """

    source: str
    source_tokens: list[str]
    words: list[str]
    tokens: list[int]
    score: float
    alphas: np.ndarray
    source_unknown: list[bool] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The detokenised translation."""
        return detokenize_mt(self.words)

    @property
    def source_labels(self) -> list[str]:
        """``source_tokens`` with the words read as ``<unk>`` marked (``"zebra (<unk>)"``), as
        alignment figures label them."""
        unknown = self.source_unknown or [False] * len(self.source_tokens)
        return [f"{w} ({UNK})" if u else w for w, u in zip(self.source_tokens, unknown)]

    @property
    def target_tokens(self) -> list[str]:
        """The generated tokens as strings, ``<end>`` included when emitted (``T`` of them)."""
        return [*self.words, END][: len(self.tokens)]


def check_tokenizer_version(data_config: dict[str, Any], source: str | Path) -> None:
    """Warn where a checkpoint's vocabularies were built with another :func:`tokenize_mt`
    version than this one (checkpoints without the field: version 1)."""
    stored = int(data_config.get("tokenizer_version", 1))
    if stored != MT_TOKENIZER_VERSION:
        warnings.warn(
            f"{source}: its vocabularies were built with tokenize_mt version {stored}, this is "
            f"version {MT_TOKENIZER_VERSION} (see captioner.data.tokenize.MT_TOKENIZER_VERSION): "
            "words whose tokens changed (combining marks, word-final hyphens) are read "
            "differently, often as <unk>; retrain for exact figures", UserWarning, stacklevel=3)


PART_TYPES: dict[str, Any] = {
    "encoder": Callable[[int], TextEncoder],
    "decoder": Callable[[int, int], AttentionDecoder],
}
"""``TranslationModule``'s ``encoder`` / ``decoder`` argument types, without importing Lightning
(a test checks them against the module's signature)."""


def build_model(init_args: dict[str, Any]) -> tuple[TextEncoder, AttentionDecoder]:
    """Encoder and decoder from stored ``TranslationModule`` init args, as LightningCLI builds
    them (``TextEncoder`` / ``AttentionDecoder`` with their defaults when not given)."""
    parts = instantiate_arguments(PART_TYPES, init_args)
    encoder = (parts["encoder"] or TextEncoder)(int(init_args["src_vocab_size"]))
    decoder = (parts["decoder"] or AttentionDecoder)(int(init_args["vocab_size"]),
                                                     encoder.out_channels)
    return encoder, decoder


class Translator:
    """A trained source encoder + attention decoder with both vocabularies.

    Args:
        encoder: :class:`~captioner.encoders.text.TextEncoder`.
        decoder: :class:`~captioner.decoder.AttentionDecoder`.
        src_vocab: source vocabulary.
        tgt_vocab: target vocabulary.
        lowercase: tokenisation setting of the training data.
        search: default search settings (``beam_size``, ``max_length``, ``min_length``,
            ``length_penalty``, ``beam_stop``).
        precision: ``"32"`` (float32) or ``"bf16"`` (bfloat16 autocast, as
            :class:`captioner.inference.Captioner`).
    """

    def __init__(self, encoder: TextEncoder, decoder: AttentionDecoder, src_vocab: Vocabulary,
                 tgt_vocab: Vocabulary, lowercase: bool = True,
                 search: dict[str, Any] | None = None, precision: str = "32") -> None:
        self.encoder, self.decoder = encoder.eval(), decoder.eval()
        self.src_vocab, self.tgt_vocab, self.lowercase = src_vocab, tgt_vocab, lowercase
        self.search = {**SEARCH_DEFAULTS, **(search or {})}
        self.precision = check_precision(precision, self.device)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu",
                        precision: str = "32") -> "Translator":
        """Rebuild the model from a translation checkpoint alone (``precision``: see the
        class).

        Raises:
            CheckpointError: unreadable file, not a translation checkpoint, a config that
                cannot be rebuilt, or weights / vocabularies that do not fit it.
        """
        ckpt = read_checkpoint(path, task=TASK)
        meta = ckpt[CHECKPOINT_KEY]
        try:
            init_args = meta["model_config"]["init_args"]
            tgt_vocab = Vocabulary.from_dict(meta["vocab"])
            src_vocab = Vocabulary.from_dict(meta["src_vocab"])
            sizes = (int(init_args["src_vocab_size"]), int(init_args["vocab_size"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{path}: broken translation metadata ({first_line(e)})") from None
        if sizes != (len(src_vocab), len(tgt_vocab)):
            raise CheckpointError(f"{path}: vocabulary mismatch: the model was built for "
                                  f"{sizes} words, the vocabularies have "
                                  f"{(len(src_vocab), len(tgt_vocab))}")
        try:
            encoder, decoder = build_model(init_args)
        except Exception as e:  # noqa: BLE001 - jsonargparse / constructors: one clear line
            raise CheckpointError(f"{path}: cannot rebuild the model from its stored config "
                                  f"({first_line(e)})") from None
        state = ckpt["state_dict"]
        try:
            for prefix, module in (("encoder.", encoder), ("decoder.", decoder)):
                module.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                        if k.startswith(prefix)})
        except RuntimeError as e:
            raise CheckpointError(f"{path}: weights do not fit the stored model config: "
                                  f"{one_line(e, 300)}") from None
        hp = ckpt.get("hyper_parameters") or {}
        search = {k: hp[k] for k in SEARCH_DEFAULTS if k in hp}
        lowercase = bool((meta.get("data") or {}).get("lowercase", True))
        check_tokenizer_version(meta.get("data") or {}, path)
        return cls(encoder.to(device), decoder.to(device), src_vocab, tgt_vocab, lowercase, search,
                   precision)

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.decoder.parameters()).device

    def tokenize(self, sentence: str) -> list[str]:
        """Source tokens as in training, ``<end>`` appended."""
        return [*tokenize_mt(sentence, self.lowercase), END]

    def encode_sources(self, token_lists: Sequence[Sequence[str]]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids ``(B, S)`` (right-padded) and lengths ``(B,)`` of tokenised sources (each ending
        in ``<end>``)."""
        ids = [self.src_vocab.encode(tokens, add_start_end=False) for tokens in token_lists]
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
        src = torch.full((len(ids), int(lengths.max())), self.src_vocab.pad_id, dtype=torch.long)
        for b, x in enumerate(ids):
            src[b, : len(x)] = torch.tensor(x, dtype=torch.long)
        return src.to(self.device), lengths.to(self.device)

    @torch.no_grad()
    def translate(self, sentences: str | Sequence[str], beam_size: int | None = None,
                  max_length: int | None = None, batch_size: int = 64) -> list[Translation]:
        """Translate sentences, batched by length, returned in the order given.

        Args:
            sentences: one sentence or a list of them (raw text).
            beam_size: ``K``; ``1`` is greedy search (default: the checkpoint's setting).
            max_length: most target tokens (default: the checkpoint's setting).
            batch_size: sentences decoded together.

        Returns:
            One :class:`Translation` per sentence.
        """
        if isinstance(sentences, str):
            sentences = [sentences]
        s = self.search
        k = s["beam_size"] if beam_size is None else beam_size
        n_max = s["max_length"] if max_length is None else max_length
        tokens = [self.tokenize(sentence) for sentence in sentences]
        order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
        results: list[Translation | None] = [None] * len(tokens)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            src, lengths = self.encode_sources([tokens[i] for i in chunk])
            with inference_autocast(self.device, self.precision):
                annotations, mask = self.encoder(src, lengths)  # (B, S, D), (B, S)
                out = decode(self.decoder, annotations, mask, beam_size=k, max_length=n_max,
                             min_length=s["min_length"], length_penalty=s["length_penalty"],
                             beam_stop=s["beam_stop"])
            for b, i in enumerate(chunk):
                n, S = int(out.lengths[b]), int(lengths[b])
                ids = out.tokens[b, :n].tolist()
                results[i] = Translation(
                    source=sentences[i], source_tokens=tokens[i],
                    words=self.tgt_vocab.decode(ids), tokens=ids, score=float(out.scores[b]),
                    alphas=out.alphas[b, :n, :S].float().cpu().numpy(),  # (T, S)
                    source_unknown=(src[b, :S] == self.src_vocab.unk_id).tolist())
        return results  # type: ignore[return-value]
