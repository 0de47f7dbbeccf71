"""Word-level caption tokenisation.

A small regular-expression tokeniser, so that training, evaluation and inference split text the
same way without downloading NLTK data (no ``punkt``). The rules:

* text is lowercased (``str.lower``) and curly apostrophes become ``'``;
* a *word* is a run of letters and digits (any script), optionally joined by single inner
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

__all__ = ["tokenize", "detokenize"]

# ``[^\W_]`` is "a letter or a digit" (``\w`` without the underscore), in any script.
_ALNUM = r"[^\W_]"
_NUMBER = rf"\d+(?:[.,]\d+)+{_ALNUM}*"  # 3.5, 1,000, 2.5m
_WORD = rf"{_ALNUM}+(?:['\-]{_ALNUM}+)*"  # man's, t-shirt, rock-n-roll
_TOKEN_RE = re.compile(rf"{_NUMBER}|{_WORD}")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})


def tokenize(text: str) -> list[str]:
    """Split a caption into lowercase word tokens, dropping punctuation.

    Args:
        text: Raw caption text.

    Returns:
        The tokens, in order; empty for text without letters or digits.
    """
    return _TOKEN_RE.findall(text.lower().translate(_APOSTROPHES))


def detokenize(tokens: list[str]) -> str:
    """Join tokens back into a sentence (single spaces; punctuation was not kept).

    Args:
        tokens: Word tokens, e.g. the output of :func:`tokenize` or a decoded caption.

    Returns:
        The tokens joined by single spaces.
    """
    return " ".join(tokens)
