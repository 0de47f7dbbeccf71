"""Word-level tokenisation: captions (:func:`tokenize`) and translation (:func:`tokenize_mt`).

A small regular-expression tokeniser, so that training, evaluation and inference split text the
same way without downloading NLTK data (no ``punkt``). The rules:

* text is put in Unicode NFC form (a decomposed ``"e" + U+0301`` is the same word as ``"é"``),
  lowercased (``str.lower``) and curly apostrophes become ``'``;
* a *word* is a run of letters and digits (any script; combining marks such as Devanagari
  vowel signs, or the dot ``"İ".lower()`` leaves, stay inside it), optionally joined by single inner
  apostrophes or hyphens: ``"man's"`` -> ``["man's"]``, ``"t-shirt"`` -> ``["t-shirt"]``,
  ``"don't"`` -> ``["don't"]`` (contractions and possessives stay one token);
* a *number* keeps its inner decimal point or thousands separator: ``"3.5"`` -> ``["3.5"]``,
  ``"1,000"`` -> ``["1,000"]``, ``"2.5m"`` -> ``["2.5m"]``;
* everything else (punctuation, leading/trailing apostrophes and hyphens, underscores, symbols)
  separates tokens and is dropped: ``"dogs' toys!"`` -> ``["dogs", "toys"]``.

Example:
    >>> tokenize("A man's red T-shirt, 2 dogs & 3.5 cats.")
    ['a', "man's", 'red', 't-shirt', '2', 'dogs', '3.5', 'cats']

Translation must produce punctuation, so :func:`tokenize_mt` keeps each mark as a token of its
own (same words and numbers otherwise) and :func:`detokenize_mt` joins a translation back; see
:mod:`captioner.data.parallel_text` for how they meet sacreBLEU.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from collections.abc import Sequence

__all__ = ["tokenize", "detokenize", "tokenize_mt", "detokenize_mt"]

# ``[^\W_]`` is "a letter or a digit" (``\w`` without the underscore), in any script.
_ALNUM = r"[^\W_]"
_NUMBER = rf"\d+(?:[.,]\d+)+{_ALNUM}*"  # 3.5, 1,000, 2.5m


def _mark_class() -> str:
    """A character class of the combining marks (categories Mn, Mc, Me) of the BMP."""
    ranges: list[list[int]] = []
    for code in range(min(sys.maxunicode, 0xFFFF) + 1):
        if unicodedata.category(chr(code)).startswith("M"):
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1][1] = code
            else:
                ranges.append([code, code])
    return "[" + "".join(f"\\u{a:04x}-\\u{b:04x}" for a, b in ranges) + "]"


_MARK = _mark_class()
_PIECE = rf"{_ALNUM}+(?:{_MARK}+{_ALNUM}*)*"  # letters/digits with their marks
_WORD = rf"{_PIECE}(?:['\-]{_PIECE})*"  # man's, t-shirt, rock-n-roll
_TOKEN_RE = re.compile(rf"{_NUMBER}|{_WORD}")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})


def tokenize(text: str) -> list[str]:
    """Split a caption into lowercase word tokens, dropping punctuation.

    Args:
        text: Raw caption text.

    Returns:
        The tokens, in order; empty for text without letters or digits.
    """
    text = unicodedata.normalize("NFC", text).lower().translate(_APOSTROPHES)
    return _TOKEN_RE.findall(text)


def detokenize(tokens: list[str]) -> str:
    """Join tokens back into a sentence (single spaces; punctuation was not kept).

    Args:
        tokens: Word tokens, e.g. the output of :func:`tokenize` or a decoded caption.

    Returns:
        The tokens joined by single spaces.
    """
    return " ".join(tokens)


# ------------------------------------------------------------------------ translation
# Translation keeps punctuation (see captioner.data.parallel_text for the choices).
#: Version of :func:`tokenize_mt`, recorded in translation checkpoints: 1 split words at
#: combining marks and word-final hyphens; 2 keeps both in the word (a model trained on 1 reads
#: such words differently now, often as ``<unk>``).
MT_TOKENIZER_VERSION = 2
_MT_TOKEN_RE = re.compile(
    rf"\d+(?:[.,]\d+)+{_ALNUM}*"  # 3.5, 1,000, 2.5m
    rf"|{_WORD}(?:-(?=[\s,;]|$))?"  # man's, t-shirt, marks kept; German "Obst- und", "Kinder-,"
    r"|[^\w\s]|_"  # every other visible character is a token of its own
)
_MT_CLOSING = frozenset(".,!?;:%)]}\u201d\u0964\u0965")  # no space before: . , ) ] ” । ॥
_MT_OPENING = frozenset("([{\u201e")  # no space after: ( [ { „
_MT_QUOTE_PAIRS = {'"': '"', "'": "'", "\u201c": "\u201d", "\u201e": "\u201c"}  # opening -> closing


def tokenize_mt(text: str, lowercase: bool = True) -> list[str]:
    """Split a sentence into word and punctuation tokens.

    Example:
        >>> tokenize_mt("A man's T-shirt (red), 3.5 m!")
        ['a', "man's", 't-shirt', '(', 'red', ')', ',', '3.5', 'm', '!']

    The text is put in Unicode NFC form first, as the captioning tokeniser does: a decomposed
    ``"a" + U+0308`` (macOS, some corpora) is the same word as ``"ä"``. Combining marks that
    have no precomposed form (Devanagari vowel signs, Thai tone marks) stay inside their word,
    and a hyphen that ends a word (before a space, a comma, a semicolon or the end) stays on it
    (German ``"Obst- und Gemüsestand"`` -> ``"obst-"``, ``"und"``, ...; ``"Kinder-, Jugend-"``),
    as sacreBLEU's 13a tokenizer keeps it: detokenised output then scores as its reference
    does.

    Args:
        text: a raw sentence.
        lowercase: lowercase the text first.

    Returns:
        The tokens in order.
    """
    text = unicodedata.normalize("NFC", text).translate(_APOSTROPHES)
    return _MT_TOKEN_RE.findall(text.lower() if lowercase else text)


def detokenize_mt(tokens: Sequence[str]) -> str:
    """Join tokens into a sentence: spaces between tokens, none before closing punctuation or
    after opening brackets and typographic quotes (``["a", "dog", "."]`` -> ``"a dog."``), and
    a possessive apostrophe after an ``s`` kept on its word (``"kids' toys"``; not when
    another ``'`` follows, which makes it an opening quote: ``"says 'yes'"``). Guillemets keep
    their spaces (French spacing, German ``»...«``). Consecutive ``-`` tokens are joined
    (``["a", "-", "-", "b"]`` -> ``"a -- b"``): :func:`tokenize_mt` splits a ``--`` dash into
    two, which sacreBLEU's ``13a`` keeps as one token in a reference.

    Args:
        tokens: output of :func:`tokenize_mt` or a decoded translation.

    Returns:
        The sentence.
    """
    pieces: list[str] = []
    glue = True  # no space before the next token (start of sentence, after an opening mark)
    expected_close: list[str] = []  # the closing quote of each quote still open
    tokens = list(tokens)
    for i, token in enumerate(tokens):
        if token == "'" and 0 < i < len(tokens) - 1 and tokens[i - 1][-1:] in ("s", "S", "z", "Z") \
                and tokens[i + 1][:1].isalnum() and "'" not in tokens[i + 1 :]:
            closing, opening = True, False  # "the kids' toys": on its word
        elif expected_close and token == expected_close[-1]:  # closes the innermost quote
            expected_close.pop()
            closing, opening = True, False
        elif token in _MT_QUOTE_PAIRS:  # “ opens in English, closes German „...“ (handled above)
            expected_close.append(_MT_QUOTE_PAIRS[token])
            closing, opening = False, True
        elif token == "-" and i > 0 and tokens[i - 1] == "-":  # a "--" dash, split in two
            closing, opening = True, False
        else:
            closing, opening = token in _MT_CLOSING, token in _MT_OPENING
        pieces.append(token if glue or closing else " " + token)
        glue = opening
    return "".join(pieces)
