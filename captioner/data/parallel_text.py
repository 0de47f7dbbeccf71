r"""Parallel text for translation: reading, tokenisation, datasets, bucketed batches.

Plain PyTorch (no Lightning): the data module that uses them is
:class:`captioner.data.parallel.ParallelTextDataModule`.

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
apostrophes / hyphens, a word-final hyphen before a space (German ``Obst- und``) and decimal
numbers whole, keeps combining marks inside their words, and lowercases by default (as the usual
Multi30k baselines do). The model's output is detokenised by :func:`detokenize_mt` and scored
by sacreBLEU against the *raw* reference lines with its own ``13a`` tokenisation, lowercased when
the data is (the signature then says ``case:lc``); ``13a`` splits punctuation as
:func:`tokenize_mt` does (keeping ``man's``, ``t-shirt``, ``3.5`` whole), so the score hardly
depends on how :func:`detokenize_mt` spaces punctuation. (Both functions live in
:mod:`captioner.data.tokenize` and are re-exported here.)

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

import codecs
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, Dataset, Sampler

from captioner.data.samplers import EpochRandomSampler, shuffles
from captioner.data.tokenize import detokenize_mt, tokenize_mt
from captioner.data.vocabulary import Vocabulary

__all__ = ["ParallelDataError", "decode_lines", "read_lines", "tokenize_mt", "detokenize_mt",
           "read_aligned", "read_tsv",
           "ParallelDataset", "collate_parallel", "BucketBatchSampler", "EpochRandomSampler"]

class ParallelDataError(ValueError):
    """Unusable parallel data; the message names the file and line."""


# ---------------------------------------------------------------------------------- files
def decode_lines(raw: bytes, source: str | Path) -> list[str]:
    """The lines of UTF-8 text ``raw`` without their ``\\n`` / ``\\r\\n``.

    Only ``\\n`` ends a line, as ``wc -l`` and the line-aligned corpora count them (a lone
    ``\\r`` inside a line is text, not a line break); a final newline makes no extra empty line,
    and a leading byte-order mark is dropped.

    Raises:
        ParallelDataError: ``raw`` is not UTF-8, naming ``source`` and the line.
    """
    raw = raw.removeprefix(codecs.BOM_UTF8)  # a byte-order mark (Windows editors) is not text
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ParallelDataError(f"{source}:{line}: not UTF-8 text ({e.reason})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def read_lines(path: str | Path) -> list[str]:
    """:func:`decode_lines` of a file.

    Raises:
        ParallelDataError: a missing or unreadable file, or one that is not UTF-8.
    """
    path = Path(path)
    if not path.exists():  # a pipe (``--reference <(...)``) or a device is read as it is
        raise ParallelDataError(f"{path}: file not found")
    if path.is_dir():
        raise ParallelDataError(f"{path}: a folder, not a file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ParallelDataError(f"{path}: cannot read ({e.strerror})") from None
    return decode_lines(raw, path)


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
    src, tgt = read_lines(src_path), read_lines(tgt_path)
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
    for i, line in enumerate(read_lines(path), start=1):
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
    number of batches on every rank). Lightning rebuilds it with the arguments it was made
    with, ``epoch`` included, so the new ``DistributedSampler`` starts at that epoch too: a
    fit resumed at epoch ``e`` draws its first batches before Lightning calls ``set_epoch``,
    and would otherwise replay epoch 0's order.

    Args:
        sampler: the indices to batch.
        batch_size: items per batch (the last batch of a pool may be smaller).
        drop_last: drop a pool's last batch when it is smaller than ``batch_size``.
        keys: one sort key per dataset item, e.g. ``(target length, source length)``.
        bucket_factor: pool size in batches.
        seed: base seed of the batch order.
        epoch: the epoch to start at: passed to the sampler's ``set_epoch`` when it has one
            (the training loop's epoch for a resumed fit); ``None`` leaves the sampler's epoch
            as it is.
    """

    def __init__(self, sampler: Sampler[int] | Sequence[int], batch_size: int,
                 drop_last: bool = False, *, keys: Sequence[Any], bucket_factor: int = 50,
                 seed: int = 0, epoch: int | None = None) -> None:
        if batch_size < 1 or bucket_factor < 1:
            raise ValueError(f"batch_size and bucket_factor must be >= 1, got {batch_size}, "
                             f"{bucket_factor}")
        super().__init__(sampler, batch_size, drop_last)
        self.keys = list(keys)
        self.bucket_factor, self.seed = bucket_factor, seed
        if epoch is not None and callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(epoch)  # type: ignore[union-attr]

    @property
    def shuffle(self) -> bool:
        """Whether the indices come shuffled (training batches)."""
        return shuffles(self.sampler)

    def _pool_size(self) -> int:
        return self.batch_size * self.bucket_factor if self.shuffle else max(len(self.sampler), 1)

    def _batches_per_pool(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        """The batches of one pass, made on the first ``next`` (a generator): a worker-backed
        DataLoader calls ``iter`` twice when it starts and uses the second iterator, and an
        eager pass here moved the sampler's epoch on at the first call (the first epoch then
        repeated the second's order, and a resumed fit did not continue exactly)."""
        epoch = int(getattr(self.sampler, "epoch", 0))  # before a pass moves it on
        indices, size = list(self.sampler), self._pool_size()
        batches = []
        for start in range(0, len(indices), size):
            pool = sorted(indices[start:start + size], key=lambda i: self.keys[i])
            batches += [pool[i:i + self.batch_size]
                        for i in range(0, self._batches_per_pool(len(pool)) * self.batch_size,
                                       self.batch_size)]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch + 1_000_003)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        yield from batches

    def __len__(self) -> int:
        n, size = len(self.sampler), self._pool_size()
        full, rest = divmod(n, size)
        return full * self._batches_per_pool(size) + self._batches_per_pool(rest)
