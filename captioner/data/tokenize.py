"""Word-level caption tokenisation.

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
"""

from __future__ import annotations

import re
import sys
import unicodedata

__all__ = ["tokenize", "detokenize"]

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
