"""The Lightning data module of parallel text (translation), e.g. Multi30k.

Reading, tokenisation, datasets and the bucketed batch sampler are plain PyTorch, in
:mod:`captioner.data.parallel_text` (whose docstring explains the file layouts, tokenisation and
bucketing); they are re-exported here, where configs and older code import them from.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader, Sampler, SequentialSampler

from captioner.config import NON_NEGATIVE, POSITIVE, ConfigError, check_ranges
from captioner.data.parallel_text import (BucketBatchSampler, EpochRandomSampler,
                                          ParallelDataError, ParallelDataset, collate_parallel,
                                          detokenize_mt, read_aligned, read_tsv, tokenize_mt)
from captioner.data.samplers import batch_sampler_order, loader_generator, trainer_epoch
from captioner.data.vocabulary import (MORE_THAN_SPECIALS, Vocabulary, check_coverage,
                                        count_tokens)

__all__ = ["ParallelDataError", "tokenize_mt", "detokenize_mt", "read_aligned", "read_tsv",
           "ParallelDataset", "collate_parallel", "BucketBatchSampler", "EpochRandomSampler",
           "ParallelTextDataModule"]

log = logging.getLogger(__name__)

DEFAULT_SPLITS: dict[str, str] = {"train": "train", "val": "val", "test": "test_2016_flickr"}
STAGES: tuple[str, ...] = ("train", "val", "test")


# ---------------------------------------------------------------------------------- data module
class ParallelTextDataModule(L.LightningDataModule):
    """Parallel text (e.g. Multi30k) for :class:`~captioner.lit.translation.TranslationModule`.

    ``vocab_size`` (target) and ``src_vocab_size`` work right after construction (the training
    split is read on first use), so the CLI links them to the model. Both vocabularies are part
    of the module's ``state_dict``.

    Args:
        root: folder of the files.
        src_lang: source language code (file suffix of the aligned layout), e.g. ``"de"``.
        tgt_lang: target language code, e.g. ``"en"``.
        format: ``"aligned"`` (``{split}.{lang}`` file pairs) or ``"tsv"`` (``{split}.tsv``).
        splits: file stem of each stage, keys among ``train``/``val``/``test``; default
            Multi30k's ``{"train": "train", "val": "val", "test": "test_2016_flickr"}``. A
            stage left out has no data.
        lowercase: lowercase all text (and score BLEU case-insensitively).
        min_freq: a training word seen fewer times becomes ``<unk>`` (per language).
        max_vocab_size: largest vocabulary per language, specials included (``None``: no limit).
        max_len: training pairs with more than ``max_len`` tokens on either side (before
            ``<start>``/``<end>``) are left out; val/test are never filtered.
        batch_size: training sentence pairs per batch.
        eval_batch_size: val/test batch size; default ``batch_size``.
        bucket_factor: training batches are bucketed within pools of this many batches.
        num_workers: DataLoader worker processes.
        max_pairs: keep only the first ``max_pairs`` pairs of each split (quick runs).
        seed: seed of the batch shuffling.
    """

    def __init__(
        self,
        root: str,
        src_lang: str = "de",
        tgt_lang: str = "en",
        format: Literal["aligned", "tsv"] = "aligned",
        splits: dict[str, str] | None = None,
        lowercase: bool = True,
        min_freq: int = 2,
        max_vocab_size: int | None = None,
        max_len: int = 50,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        bucket_factor: int = 50,
        num_workers: int = 0,
        max_pairs: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if format not in ("aligned", "tsv"):
            raise ConfigError(f"format must be 'aligned' or 'tsv', got {format!r}")
        splits = dict(DEFAULT_SPLITS if splits is None else splits)
        unknown = set(splits) - set(STAGES)
        if unknown:
            raise ConfigError(f"splits: unknown stages {sorted(unknown)}, expected {list(STAGES)}")
        check_ranges(type(self).__name__, "data", dict(
            max_len=max_len, batch_size=batch_size, eval_batch_size=eval_batch_size,
            bucket_factor=bucket_factor, num_workers=num_workers, min_freq=min_freq,
            max_vocab_size=max_vocab_size, max_pairs=max_pairs), {
            "max_len": POSITIVE, "batch_size": POSITIVE, "eval_batch_size": POSITIVE,
            "bucket_factor": POSITIVE, "num_workers": NON_NEGATIVE, "min_freq": POSITIVE,
            "max_vocab_size": MORE_THAN_SPECIALS, "max_pairs": POSITIVE})
        self.root, self.format = Path(root), format
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        self.splits, self.lowercase = splits, lowercase
        self.min_freq, self.max_vocab_size, self.max_len = min_freq, max_vocab_size, max_len
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.bucket_factor, self.num_workers = bucket_factor, num_workers
        self.max_pairs, self.seed = max_pairs, seed
        self._pairs: dict[str, list[tuple[str, str]]] = {}
        self._src_vocab: Vocabulary | None = None
        self._tgt_vocab: Vocabulary | None = None
        self._datasets: dict[str, ParallelDataset] = {}

    # ------------------------------------------------------------------ text
    def files(self, stage: str) -> tuple[Path, ...]:
        """The file(s) of a stage: ``(source, target)`` or ``(tsv,)``."""
        stem = self.splits[stage]
        if self.format == "tsv":
            return (self.root / f"{stem}.tsv",)
        return (self.root / f"{stem}.{self.src_lang}", self.root / f"{stem}.{self.tgt_lang}")

    def check_trained_with(self, stored: dict[str, Any], source: str) -> None:
        """Refuse data of another language pair or case handling than a checkpoint was
        trained on: its vocabularies would read the sources as mostly ``<unk>``, and its output
        would be scored against references in another language or case.

        Args:
            stored: the data module options the checkpoint stores (``init_args``); options
                it lacks are not compared.
            source: the checkpoint, for the message.

        Raises:
            captioner.config.ConfigError: ``src_lang``, ``tgt_lang`` or ``lowercase`` differ.
        """
        differ = [f"{name} {stored[name]!r} (this data: {getattr(self, name)!r})"
                  for name in ("src_lang", "tgt_lang", "lowercase")
                  if name in stored and stored[name] != getattr(self, name)]
        if differ:
            raise ConfigError(f"{source} was trained on data with {', '.join(differ)}: give "
                              "the data config it was trained with")

    def _where(self, stage: str) -> str:
        """The file(s) of a stage for messages."""
        if stage not in self.splits:
            return f"{self.root} (splits has no {stage!r} file stem)"
        return ", ".join(map(str, self.files(stage)))

    def pairs(self, stage: str) -> list[tuple[str, str]]:
        """Raw ``(source, target)`` sentences of ``"train"``, ``"val"`` or ``"test"`` (read once;
        empty for a stage without a file stem); eval batches' ``index`` points into this list."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if stage not in self._pairs:
            if stage not in self.splits:
                pairs = []
            elif self.format == "tsv":
                pairs = read_tsv(*self.files(stage))
            else:
                pairs = read_aligned(*self.files(stage))
            self._pairs[stage] = pairs[: self.max_pairs] if self.max_pairs is not None else pairs
        return self._pairs[stage]

    def sources(self, stage: str) -> list[str]:
        """Raw source sentences of a stage."""
        return [s for s, _ in self.pairs(stage)]

    def references(self, stage: str) -> list[str]:
        """Raw target sentences of a stage (the BLEU references)."""
        return [t for _, t in self.pairs(stage)]

    def tokenize(self, text: str) -> list[str]:
        """:func:`tokenize_mt` with this module's ``lowercase``."""
        return tokenize_mt(text, self.lowercase)

    def _training_pairs(self) -> list[tuple[list[str], list[str]]]:
        """Tokenised training pairs within ``max_len``."""
        pairs = [(self.tokenize(s), self.tokenize(t)) for s, t in self.pairs("train")]
        kept = [(s, t) for s, t in pairs if len(s) <= self.max_len and len(t) <= self.max_len]
        if len(kept) < len(pairs):  # shown (a warning) where it is more than 1 %
            level = logging.WARNING if len(pairs) - len(kept) > 0.01 * len(pairs) else logging.INFO
            log.log(level, "left out %d of %d training pairs longer than max_len=%d tokens",
                    len(pairs) - len(kept), len(pairs), self.max_len)
        return kept

    # ------------------------------------------------------------------ vocabularies
    def _build_vocabs(self) -> None:
        (self._src_vocab, _), (self._tgt_vocab, _) = self.built_vocabularies()

    def built_vocabularies(self, check: bool = True) -> tuple[tuple[Vocabulary, Counter[str]],
                                                              tuple[Vocabulary, Counter[str]]]:
        """The source and target vocabularies the training pairs give with ``min_freq`` /
        ``max_vocab_size`` (whatever :meth:`set_vocabs` imposed; nothing is stored), each with
        its token counts.

        Args:
            check: refuse a vocabulary that covers too little of its side
                (:func:`~captioner.data.vocabulary.check_coverage`).
        """
        train = self._training_pairs()
        if not train:
            raise ParallelDataError(f"{self._where('train')}: cannot build the vocabularies: "
                                    "the training split has no sentence pairs (within "
                                    f"max_len={self.max_len})")
        kw = dict(min_freq=self.min_freq, max_size=self.max_vocab_size)
        options = f"min_freq {self.min_freq}, max_vocab_size {self.max_vocab_size}"
        sources, targets = count_tokens(s for s, _ in train), count_tokens(t for _, t in train)
        src_vocab = Vocabulary.from_counts(sources, **kw)
        tgt_vocab = Vocabulary.from_counts(targets, **kw)
        if check:
            check_coverage(src_vocab, sources, f"the training sources ({options})")
            check_coverage(tgt_vocab, targets, f"the training targets ({options})")
        return (src_vocab, sources), (tgt_vocab, targets)

    @property
    def src_vocab(self) -> Vocabulary:
        """Source vocabulary (imposed by :meth:`set_vocabs` or built from the training split)."""
        if self._src_vocab is None:
            self._build_vocabs()
        return self._src_vocab  # type: ignore[return-value]

    @property
    def tgt_vocab(self) -> Vocabulary:
        """Target vocabulary."""
        if self._tgt_vocab is None:
            self._build_vocabs()
        return self._tgt_vocab  # type: ignore[return-value]

    vocab = tgt_vocab  # the name the captioning code uses for the output vocabulary

    @property
    def vocab_size(self) -> int:
        """``V`` of the target language (the decoder's output)."""
        return len(self.tgt_vocab)

    @property
    def src_vocab_size(self) -> int:
        """``V`` of the source language (the encoder's embedding)."""
        return len(self.src_vocab)

    def set_vocabs(self, src_vocab: Vocabulary, tgt_vocab: Vocabulary) -> None:
        """Impose both vocabularies (e.g. a checkpoint's); datasets encoded otherwise are
        dropped."""
        if src_vocab != self._src_vocab or tgt_vocab != self._tgt_vocab:
            self._datasets.clear()
        self._src_vocab, self._tgt_vocab = src_vocab, tgt_vocab

    def state_dict(self) -> dict[str, Any]:
        """``{"src_vocab": ..., "tgt_vocab": ...}`` (saved into checkpoints by Lightning)."""
        return {"src_vocab": self.src_vocab.to_dict(), "tgt_vocab": self.tgt_vocab.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the vocabularies of :meth:`state_dict`."""
        if "src_vocab" in state_dict and "tgt_vocab" in state_dict:
            self.set_vocabs(Vocabulary.from_dict(state_dict["src_vocab"]),
                            Vocabulary.from_dict(state_dict["tgt_vocab"]))

    # ------------------------------------------------------------------ loaders
    def dataset(self, stage: str) -> ParallelDataset:
        """Encoded pairs of a stage (training: length-filtered)."""
        if stage not in self._datasets:
            if stage == "train":
                pairs = self._training_pairs()
            else:
                pairs = [(self.tokenize(s), self.tokenize(t)) for s, t in self.pairs(stage)]
            self._datasets[stage] = ParallelDataset(pairs, self.src_vocab, self.tgt_vocab)
        return self._datasets[stage]

    def setup(self, stage: str | None = None) -> None:
        """Encode the splits the Lightning stage needs."""
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",),
                  "predict": ("test",)}.get(stage or "", STAGES)
        for name in needed:
            self.dataset(name)

    def loader(self, stage: str) -> DataLoader[dict[str, Any]]:
        """Bucketed batches of :func:`collate_parallel` (shuffled for ``"train"`` only)."""
        dataset = self.dataset(stage)
        if len(dataset) == 0:
            raise ParallelDataError(f"{self._where(stage)}: the {stage} split has no sentence "
                                    "pairs")
        train = stage == "train"
        keys = list(zip(dataset.tgt_lengths.tolist(), dataset.src_lengths.tolist()))
        trainer = getattr(self, "trainer", None)
        order: Sampler[int] = (batch_sampler_order(dataset, self.seed, trainer) if train
                               else SequentialSampler(dataset))
        # Lightning rebuilds the batch sampler under DDP with these arguments, `epoch` included
        sampler = BucketBatchSampler(order, self.batch_size if train else self.eval_batch_size,
                                     keys=keys, bucket_factor=self.bucket_factor, seed=self.seed,
                                     epoch=trainer_epoch(trainer))
        return DataLoader(dataset, batch_sampler=sampler, num_workers=self.num_workers,
                          collate_fn=collate_parallel, persistent_workers=self.num_workers > 0,
                          generator=loader_generator(self.seed))  # nothing from the global RNG

    def train_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Shuffled, bucketed training batches."""
        return self.loader("train")

    def val_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Validation pairs once each, sorted by length."""
        return self.loader("val")

    def test_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Test pairs once each, sorted by length."""
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader[dict[str, Any]]:
        """The test pairs (as :meth:`test_dataloader`)."""
        return self.loader("test")
