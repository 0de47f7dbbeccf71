"""The word vocabulary: token <-> id mapping with four reserved special tokens.

Ids ``0..3`` are always ``<pad>``, ``<start>``, ``<end>``, ``<unk>``, in that order, so padding is
id 0 everywhere (``collate_captions``, the loss ``ignore_index``, the embedding ``padding_idx``).
A vocabulary is fully described by its ordered token list (``itos``); that list is what is saved
to JSON and stored in checkpoints, and what :meth:`Vocabulary.fingerprint` hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from captioner.atomic import atomic_write

__all__ = ["Vocabulary", "VocabularyError", "VocabularyFileNotFound", "PAD", "START", "END",
           "UNK", "SPECIALS", "check_coverage", "count_tokens"]

PAD = "<pad>"
START = "<start>"
END = "<end>"
UNK = "<unk>"
SPECIALS: tuple[str, ...] = (PAD, START, END, UNK)


#: a ``max_vocab_size`` option's range (:func:`captioner.config.check_ranges`)
MORE_THAN_SPECIALS = (lambda v: v > len(SPECIALS),
                      f"> {len(SPECIALS)} (the specials and at least one word)")


class VocabularyError(ValueError):
    """A vocabulary file cannot be read; the message names the file."""


class VocabularyFileNotFound(VocabularyError, FileNotFoundError):
    """A vocabulary file is missing (also a ``FileNotFoundError``)."""


class Vocabulary:
    """An ordered token list with the four specials at ids 0..3.

    Args:
        tokens: The full id -> token list (``itos``), starting with ``<pad> <start> <end> <unk>``;
            tokens must be unique.

    Raises:
        ValueError: If the specials are missing or misplaced, or a token is repeated or not a
            non-empty string.
    """

    def __init__(self, tokens: Sequence[str]) -> None:
        tokens = list(tokens)
        if tuple(tokens[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(
                f"a vocabulary must start with {list(SPECIALS)}, got {tokens[: len(SPECIALS)]}"
            )
        for token in tokens:
            if not isinstance(token, str) or not token:
                raise ValueError(f"vocabulary tokens must be non-empty strings, got {token!r}")
        stoi = {token: i for i, token in enumerate(tokens)}
        if len(stoi) != len(tokens):
            repeated = sorted(t for t, n in Counter(tokens).items() if n > 1)
            raise ValueError(f"repeated vocabulary tokens: {repeated[:10]}")
        self.itos: list[str] = tokens
        self.stoi: dict[str, int] = stoi

    @classmethod
    def build(
        cls,
        token_lists: Iterable[list[str]],
        min_freq: int = 1,
        max_size: int | None = None,
    ) -> Vocabulary:
        """Count tokens and keep the frequent ones (:meth:`from_counts`).

        Args:
            token_lists: Tokenised captions (e.g. the training split's), read once.
            min_freq: Keep tokens seen at least this many times.
            max_size: Largest vocabulary size *including* the 4 specials (``None``: unlimited).

        Returns:
            The vocabulary.

        Raises:
            ValueError: If ``min_freq < 1`` or ``max_size < 4``.
        """
        return cls.from_counts(count_tokens(token_lists), min_freq, max_size)

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], min_freq: int = 1,
                    max_size: int | None = None) -> Vocabulary:
        """Keep the frequent tokens of ``counts`` (token -> occurrences).

        Order is deterministic: specials, then frequency descending, ties alphabetical.

        Raises:
            ValueError: If ``min_freq < 1`` or ``max_size < 4``.
        """
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        if max_size is not None and max_size < len(SPECIALS):
            raise ValueError(f"max_size must be >= {len(SPECIALS)} (the specials), got {max_size}")
        counts = {w: n for w, n in counts.items() if w not in SPECIALS}
        kept = [w for w, n in counts.items() if n >= min_freq]
        words = sorted(kept, key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[: max_size - len(SPECIALS)]
        return cls([*SPECIALS, *words])

    # ------------------------------------------------------------------ ids of the specials
    @property
    def pad_id(self) -> int:
        """Id of ``<pad>`` (0)."""
        return 0

    @property
    def start_id(self) -> int:
        """Id of ``<start>`` (1)."""
        return 1

    @property
    def end_id(self) -> int:
        """Id of ``<end>`` (2)."""
        return 2

    @property
    def unk_id(self) -> int:
        """Id of ``<unk>`` (3)."""
        return 3

    # ------------------------------------------------------------------ encode / decode
    def encode(self, tokens: Iterable[str], add_start_end: bool = True) -> list[int]:
        """Map tokens to ids (unknown tokens -> ``unk_id``).

        Args:
            tokens: Word tokens.
            add_start_end: Wrap the ids in ``<start>`` ... ``<end>``.

        Returns:
            The ids, ``T`` long with ``T = len(tokens) + 2`` when ``add_start_end``.
        """
        ids = [self.stoi.get(token, self.unk_id) for token in tokens]
        return [self.start_id, *ids, self.end_id] if add_start_end else ids

    def decode(self, ids: Iterable[int], strip_special: bool = True) -> list[str]:
        """Map ids back to tokens.

        Args:
            ids: Token ids (ints, or a 1-D tensor / array; anything ``int()`` accepts).
            strip_special: Stop at the first ``<end>`` and drop ``<pad>``/``<start>``
                (``<unk>`` is kept: it is a real prediction). ``False`` maps every id.

        Returns:
            The tokens.

        Raises:
            IndexError: For an id outside ``[0, V)``.
        """
        tokens: list[str] = []
        for raw in ids:
            i = int(raw)
            if not 0 <= i < len(self.itos):
                raise IndexError(f"token id {i} outside the vocabulary [0, {len(self.itos)})")
            if strip_special:
                if i == self.end_id:
                    break
                if i in (self.pad_id, self.start_id):
                    continue
            tokens.append(self.itos[i])
        return tokens

    # ------------------------------------------------------------------ container protocol
    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: object) -> bool:
        return token in self.stoi

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return self.itos == other.itos

    __hash__ = None  # type: ignore[assignment]  # mutable lists inside; equality by content

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self)}, fingerprint={self.fingerprint()[:8]})"

    def fingerprint(self) -> str:
        """SHA-1 hex digest of the ordered token list (identifies a vocabulary in logs/ckpts)."""
        return hashlib.sha1("\n".join(self.itos).encode("utf-8")).hexdigest()

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-able description: ``{"itos": [...], "fingerprint": "..."}``."""
        return {"itos": list(self.itos), "fingerprint": self.fingerprint()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocabulary:
        """Inverse of :meth:`to_dict`.

        Args:
            d: A dict with an ``"itos"`` token list (and optionally a ``"fingerprint"``, checked).

        Returns:
            The vocabulary.

        Raises:
            VocabularyError: If ``d`` is not such a dict, or the fingerprint does not match.
        """
        if not isinstance(d, dict) or not isinstance(d.get("itos"), list):
            raise VocabularyError("a vocabulary dict needs an 'itos' list of tokens")
        vocab = cls(d["itos"])
        expected = d.get("fingerprint")
        if expected is not None and expected != vocab.fingerprint():
            raise VocabularyError(
                f"vocabulary fingerprint mismatch: stored {expected}, "
                f"computed {vocab.fingerprint()} (the word list was changed after it was saved)"
            )
        return vocab

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the vocabulary as JSON atomically (temp file in the same folder + ``os.replace``).

        A reader never sees a half-written file, even if the writer is killed.

        Args:
            path: Destination file; parent folders are created.
        """
        with atomic_write(path) as f:
            json.dump(self.to_dict(), f, ensure_ascii=False, indent=0)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Vocabulary:
        """Read a vocabulary written by :meth:`save`.

        Args:
            path: The JSON file.

        Returns:
            The vocabulary.

        Raises:
            VocabularyFileNotFound: If the file does not exist (a ``FileNotFoundError``).
            VocabularyError: If it is not valid vocabulary JSON (a ``ValueError``); the
                message names the file.
        """
        path = Path(path)
        try:
            with path.open(encoding="utf-8") as f:
                data = json.load(f)
            return cls.from_dict(data)
        except FileNotFoundError as e:
            raise VocabularyFileNotFound(f"{path}: no such vocabulary file") from e
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
            raise VocabularyError(f"{path}: not a valid vocabulary file: {e}") from e
        except OSError as e:  # a folder, no permission
            raise VocabularyError(f"{path}: cannot read the vocabulary file "
                                  f"({e.strerror or e})") from e


#: share of a training text's tokens outside its built vocabulary above which
#: :func:`check_coverage` warns
UNKNOWN_SHARE_WARNING = 0.5


def count_tokens(token_lists: Iterable[Iterable[str]]) -> Counter[str]:
    """Token -> occurrences over ``token_lists`` (read once: a generator is not kept)."""
    counts: Counter[str] = Counter()
    for tokens in token_lists:
        counts.update(tokens)
    return counts


def check_coverage(vocab: Vocabulary, counts: Mapping[str, int], what: str,
                   loaded_from: str | None = None) -> float:
    """Check a vocabulary built from the token ``counts`` (:func:`count_tokens`), or loaded
    from a file for the texts they count, against them: refuse one that holds none of their
    words (the model would learn to write ``<unk>`` and nothing else), warn where more than
    :data:`UNKNOWN_SHARE_WARNING` of the tokens are ``<unk>``.

    Args:
        vocab: the vocabulary built from ``counts``, or loaded.
        counts: token -> occurrences in the training texts.
        what: the texts (and the options that built the vocabulary), for the messages (e.g.
            ``"the training captions (min_freq 5, max_vocab_size None)"``).
        loaded_from: the file ``vocab`` was loaded from (``"vocab_file x.json"``); ``None``:
            built from ``counts``.

    Returns:
        The share of the tokens that are not in ``vocab`` (0 for no tokens).

    Raises:
        VocabularyError: no word of the texts is in the vocabulary although they have some.
    """
    total = sum(counts.values())
    unknown = sum(n for w, n in counts.items() if w not in vocab)
    common = max(counts.items(), key=lambda item: (item[1], item[0])) if counts else None
    if common and loaded_from is None and len(vocab) == len(SPECIALS):
        raise VocabularyError(
            f"the vocabulary built from {what} keeps no word: the most frequent of their "
            f"{len(counts)} distinct words ({common[0]!r}) is seen {common[1]} time(s); "
            "lower min_freq")
    words = len(vocab) - len(SPECIALS)
    if common and unknown == total:  # loaded: none of the texts' words is in it
        raise VocabularyError(
            f"the vocabulary of {loaded_from} ({words} words) holds no word of {what}: all "
            f"{total} tokens would be <unk>, the most frequent {common[0]!r} among them (its "
            "words must be written as the tokenizer writes them)")
    share = unknown / total if total else 0.0
    if share > UNKNOWN_SHARE_WARNING:
        said = (f"the vocabulary built from {what} ({words} words) reads {100 * share:.0f}% of "
                f"their {total} tokens" if loaded_from is None else
                f"the vocabulary of {loaded_from} ({words} words) reads {100 * share:.0f}% of "
                f"the {total} tokens of {what}")
        logging.getLogger(__name__).warning("%s as <unk>", said)
    return share
