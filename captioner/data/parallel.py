r"""Parallel text for translation: reading, tokenisation, bucketed batches, the data module.

Files (``root`` holds one of two layouts, split names configurable):

* ``format="aligned"`` (the Multi30k layout): ``{root}/{split}.{src_lang}`` and
  ``{root}/{split}.{tgt_lang}``, one sentence per line, line ``i`` of one the translation of
  line ``i`` of the other;
* ``format="tsv"``: ``{root}/{split}.tsv``, one ``source<TAB>target`` pair per line.

Files that disagree in line count, empty lines and malformed TSV rows raise
:class:`ParallelDataError` naming the file and the (1-based) line.

Tokenisation (:func:`tokenize_mt`). The caption tokeniser :func:`captioner.data.tokenize.tokenize`
drops punctuation, which translation must produce (almost every Multi30k sentence ends with a
full stop). :func:`tokenize_mt` keeps each punctuation mark as a token, keeps words with inner
apostrophes / hyphens and decimal numbers whole, and lowercases by default (as the usual
Multi30k baselines do). The model's output is detokenised by :func:`detokenize_mt` and scored
by sacreBLEU against the *raw* reference lines with its own ``13a`` tokenisation, lowercased when
the data is (the signature then says ``case:lc``); ``13a`` splits punctuation as
:func:`tokenize_mt` does (keeping ``man's``, ``t-shirt``, ``3.5`` whole), so the score hardly
depends on how :func:`detokenize_mt` spaces punctuation. (Both functions are defined in
:mod:`captioner.translate`, which must not import Lightning, and re-exported here.)

Sentences are encoded with one :class:`~captioner.data.vocabulary.Vocabulary` per language,
built from the training split with ``min_freq``: targets as ``<start> w_1 .. w_n <end>``,
sources as ``x_1 .. x_S <end>`` (the ``<end>`` annotation marks the sentence end, a place for the
attention of the final ``<end>`` to go).

Batches are bucketed by length (:class:`BucketBatchSampler`): training batches are drawn from
shuffled pools of ``batch_size * bucket_factor`` pairs sorted by (target, source) length, so each
batch holds sentences of similar lengths and the decoder unroll wastes few padded steps;
evaluation batches come from the whole split sorted by length (``index`` restores the order).
Under DDP Lightning shards the indices with a ``DistributedSampler`` and each rank buckets its
own share.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, RandomSampler, Sampler,
                              SequentialSampler)

from captioner.data.vocabulary import Vocabulary
from captioner.translate import detokenize_mt, tokenize_mt  # Lightning-free home

__all__ = ["ParallelDataError", "tokenize_mt", "detokenize_mt", "read_aligned", "read_tsv",
           "ParallelDataset", "collate_parallel", "BucketBatchSampler", "EpochRandomSampler",
           "ParallelTextDataModule"]

log = logging.getLogger(__name__)

DEFAULT_SPLITS: dict[str, str] = {"train": "train", "val": "val", "test": "test_2016_flickr"}
STAGES: tuple[str, ...] = ("train", "val", "test")


class ParallelDataError(ValueError):
    """Unusable parallel data; the message names the file and line."""


# ---------------------------------------------------------------------------------- files
def _read_lines(path: Path) -> list[str]:
    """Lines without their newline (a final newline does not make an extra empty line)."""
    if not path.is_file():
        raise ParallelDataError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not text
    except UnicodeDecodeError as e:
        raise ParallelDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _check_not_empty(text: str, path: Path, line: int, what: str = "line") -> None:
    if not text.strip():
        raise ParallelDataError(f"{path}:{line}: empty {what}")


def read_aligned(src_path: str | Path, tgt_path: str | Path) -> list[tuple[str, str]]:
    """Read two line-aligned files into ``(source, target)`` pairs.

    Args:
        src_path: source sentences, one per line.
        tgt_path: their translations, line by line.

    Returns:
        The pairs, stripped of surrounding whitespace.

    Raises:
        ParallelDataError: a missing file, different line counts (the first line without a
            counterpart is named) or an empty line.
    """
    src_path, tgt_path = Path(src_path), Path(tgt_path)
    src, tgt = _read_lines(src_path), _read_lines(tgt_path)
    if len(src) != len(tgt):
        longer, shorter = (src_path, tgt_path) if len(src) > len(tgt) else (tgt_path, src_path)
        n = min(len(src), len(tgt))
        raise ParallelDataError(
            f"{longer}:{n + 1}: misaligned files: {src_path} has {len(src)} lines but "
            f"{tgt_path} has {len(tgt)}; line {n + 1} of {longer} has no counterpart in {shorter}")
    for i, (s, t) in enumerate(zip(src, tgt), start=1):
        _check_not_empty(s, src_path, i)
        _check_not_empty(t, tgt_path, i)
    return [(s.strip(), t.strip()) for s, t in zip(src, tgt)]


def read_tsv(path: str | Path) -> list[tuple[str, str]]:
    """Read ``source<TAB>target`` lines.

    Args:
        path: the TSV file.

    Returns:
        The pairs, stripped of surrounding whitespace.

    Raises:
        ParallelDataError: a missing file, a line without exactly one tab, or an empty side.
    """
    path = Path(path)
    pairs = []
    for i, line in enumerate(_read_lines(path), start=1):
        _check_not_empty(line, path, i)
        fields = line.split("\t")
        if len(fields) != 2:
            raise ParallelDataError(
                f"{path}:{i}: expected 2 tab-separated fields (source, target), got {len(fields)}")
        _check_not_empty(fields[0], path, i, "source")
        _check_not_empty(fields[1], path, i, "target")
        pairs.append((fields[0].strip(), fields[1].strip()))
    return pairs


# ---------------------------------------------------------------------------------- dataset
class ParallelDataset(Dataset[dict[str, Any]]):
    """Sentence pairs encoded once into flat id arrays.

    Args:
        pairs: ``(source, target)`` token lists.
        src_vocab: source vocabulary (unknown words -> ``<unk>``).
        tgt_vocab: target vocabulary.
    """

    def __init__(self, pairs: Sequence[tuple[Sequence[str], Sequence[str]]],
                 src_vocab: Vocabulary, tgt_vocab: Vocabulary) -> None:
        src = [[*src_vocab.encode(s, add_start_end=False), src_vocab.end_id] for s, _ in pairs]
        tgt = [tgt_vocab.encode(t) for _, t in pairs]
        self.src_lengths = np.asarray([len(s) for s in src], dtype=np.int64)  # (P,) S + 1
        self.tgt_lengths = np.asarray([len(t) for t in tgt], dtype=np.int64)  # (P,) T + 1
        self._src_offsets = np.concatenate([[0], np.cumsum(self.src_lengths)])
        self._tgt_offsets = np.concatenate([[0], np.cumsum(self.tgt_lengths)])
        self._src = np.asarray([i for s in src for i in s], dtype=np.int64)
        self._tgt = np.asarray([i for t in tgt for i in t], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.src_lengths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Returns ``src`` ``(S,)`` (ending in ``<end>``), ``tgt`` ``(T + 1,)`` (``<start>`` ..
        ``<end>``) and ``index`` ``i``."""
        s0, s1 = self._src_offsets[i], self._src_offsets[i + 1]
        t0, t1 = self._tgt_offsets[i], self._tgt_offsets[i + 1]
        return {"src": torch.from_numpy(self._src[s0:s1].copy()),
                "tgt": torch.from_numpy(self._tgt[t0:t1].copy()), "index": i}


def _pad(seqs: Sequence[torch.Tensor], pad_id: int) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = s
    return out


def collate_parallel(batch: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a list of :class:`ParallelDataset` items.

    Returns:
        ``src`` ``(B, S)``, ``src_lengths`` ``(B,)``, ``tgt`` ``(B, T + 1)``, ``index`` ``(B,)``.
    """
    return {
        "src": _pad([item["src"] for item in batch], pad_id),  # (B, S)
        "src_lengths": torch.tensor([len(item["src"]) for item in batch], dtype=torch.long),
        "tgt": _pad([item["tgt"] for item in batch], pad_id),  # (B, T + 1)
        "index": torch.tensor([item["index"] for item in batch], dtype=torch.long),
    }


class EpochRandomSampler(RandomSampler):
    """A permutation of ``range(n)`` drawn from ``seed + epoch``: the same for the same epoch,
    so resuming an epoch repeats its order (Lightning calls :meth:`set_epoch`)."""

    def __init__(self, data_source: Sequence[Any], seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=g).tolist())


class BucketBatchSampler(BatchSampler):
    """Batches of the indices ``sampler`` yields, grouped by similar lengths.

    A shuffling ``sampler`` (:class:`EpochRandomSampler`, ``RandomSampler``, a shuffling
    ``DistributedSampler``) makes training batches: its indices are cut into pools of
    ``batch_size * bucket_factor``, each pool is sorted by ``keys`` and cut into batches, and
    the batches are shuffled (seeded by ``seed`` and the sampler's ``epoch``). Any other sampler
    makes evaluation batches: all its indices sorted by ``keys``, ``bucket_factor`` ignored.
    Every index the sampler yields is in exactly one batch.

    As a ``BatchSampler`` with a ``sampler`` argument it works with Lightning's DDP: Lightning
    rebuilds it around a ``DistributedSampler``, so each rank buckets its own shard (same
    number of batches on every rank).

    Args:
        sampler: the indices to batch.
        batch_size: items per batch (the last batch of a pool may be smaller).
        drop_last: drop a pool's last batch when it is smaller than ``batch_size``.
        keys: one sort key per dataset item, e.g. ``(target length, source length)``.
        bucket_factor: pool size in batches.
        seed: base seed of the batch order.
    """

    def __init__(self, sampler: Sampler[int] | Sequence[int], batch_size: int,
                 drop_last: bool = False, *, keys: Sequence[Any], bucket_factor: int = 50,
                 seed: int = 0) -> None:
        if batch_size < 1 or bucket_factor < 1:
            raise ValueError(f"batch_size and bucket_factor must be >= 1, got {batch_size}, "
                             f"{bucket_factor}")
        super().__init__(sampler, batch_size, drop_last)
        self.keys = list(keys)
        self.bucket_factor, self.seed = bucket_factor, seed

    @property
    def shuffle(self) -> bool:
        """Whether the indices come shuffled (training batches)."""
        return isinstance(self.sampler, RandomSampler) or bool(getattr(self.sampler, "shuffle",
                                                                       False))

    def _pool_size(self) -> int:
        return self.batch_size * self.bucket_factor if self.shuffle else max(len(self.sampler), 1)

    def _batches_per_pool(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        indices, size = list(self.sampler), self._pool_size()
        batches = []
        for start in range(0, len(indices), size):
            pool = sorted(indices[start:start + size], key=lambda i: self.keys[i])
            batches += [pool[i:i + self.batch_size]
                        for i in range(0, self._batches_per_pool(len(pool)) * self.batch_size,
                                       self.batch_size)]
        if self.shuffle:
            epoch = int(getattr(self.sampler, "epoch", 0))
            g = torch.Generator().manual_seed(self.seed + epoch + 1_000_003)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return iter(batches)

    def __len__(self) -> int:
        n, size = len(self.sampler), self._pool_size()
        full, rest = divmod(n, size)
        return full * self._batches_per_pool(size) + self._batches_per_pool(rest)


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
            raise ValueError(f"format must be 'aligned' or 'tsv', got {format!r}")
        splits = dict(DEFAULT_SPLITS if splits is None else splits)
        unknown = set(splits) - set(STAGES)
        if unknown:
            raise ValueError(f"splits: unknown stages {sorted(unknown)}, expected {list(STAGES)}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
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
        if len(kept) < len(pairs):
            log.info("left out %d of %d training pairs longer than max_len=%d tokens",
                     len(pairs) - len(kept), len(pairs), self.max_len)
        return kept

    # ------------------------------------------------------------------ vocabularies
    def _build_vocabs(self) -> None:
        train = self._training_pairs()
        if not train:
            raise ValueError("cannot build the vocabularies: the training split is empty")
        kw = dict(min_freq=self.min_freq, max_size=self.max_vocab_size)
        self._src_vocab = Vocabulary.build((s for s, _ in train), **kw)
        self._tgt_vocab = Vocabulary.build((t for _, t in train), **kw)

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
            raise ValueError(f"the {stage} split has no sentence pairs")
        train = stage == "train"
        keys = list(zip(dataset.tgt_lengths.tolist(), dataset.src_lengths.tolist()))
        if train:
            order: Sampler[int] = EpochRandomSampler(dataset, self.seed)
            # Lightning draws the first batch of a resumed fit before it calls set_epoch: start
            # at the epoch the trainer is at, so that a resumed epoch repeats its order
            trainer = getattr(self, "trainer", None)
            if trainer is not None:
                order.set_epoch(trainer.fit_loop.epoch_progress.current.processed)
        else:
            order = SequentialSampler(dataset)
        sampler = BucketBatchSampler(order, self.batch_size if train else self.eval_batch_size,
                                     keys=keys, bucket_factor=self.bucket_factor, seed=self.seed)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=self.num_workers,
                          collate_fn=collate_parallel, persistent_workers=self.num_workers > 0)

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
