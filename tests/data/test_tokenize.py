"""Tests for captioner.data.tokenize."""

from __future__ import annotations

import pytest

from captioner.data.tokenize import detokenize, detokenize_mt, tokenize


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A dog runs.", ["a", "dog", "runs"]),
        ("  Two   DOGS,\tplaying!\n", ["two", "dogs", "playing"]),
        ("A man's hat", ["a", "man's", "hat"]),  # possessive stays one token
        ("don\u2019t stop", ["don't", "stop"]),  # curly apostrophe normalised
        ("the dogs' toys", ["the", "dogs", "toys"]),  # trailing apostrophe dropped
        ("'quoted' word", ["quoted", "word"]),
        ("a red t-shirt", ["a", "red", "t-shirt"]),
        ("a - b -- c-", ["a", "b", "c"]),  # free-standing hyphens dropped
        ("3 dogs and 12 cats", ["3", "dogs", "and", "12", "cats"]),
        ("3.5 metres, 1,000 people", ["3.5", "metres", "1,000", "people"]),
        ("a 3d movie at 2.5m", ["a", "3d", "movie", "at", "2.5m"]),
        ("dogs,cats;birds", ["dogs", "cats", "birds"]),
        ("snake_case", ["snake", "case"]),
        ("Café naïve", ["café", "naïve"]),
        ("Cafe\u0301 nai\u0308ve", ["café", "naïve"]),  # decomposed (NFD): the same words
        ("\u0130stanbul", ["i\u0307stanbul"]),  # the dot that lower() leaves stays in the word
        ("\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
         ["\u0928\u092e\u0938\u094d\u0924\u0947", "\u0926\u0941\u0928\u093f\u092f\u093e"]),  # vowel signs
        ("", []),
        ("... !!! ,", []),
    ],
)
def test_tokenize(text: str, expected: list[str]) -> None:
    assert tokenize(text) == expected


def test_detokenize_joins_with_single_spaces() -> None:
    assert detokenize(["a", "man's", "dog"]) == "a man's dog"
    assert detokenize([]) == ""


def test_tokenize_is_idempotent_on_its_output() -> None:
    tokens = tokenize("A man's red T-shirt, 2 dogs & 3.5 cats.")
    assert tokenize(detokenize(tokens)) == tokens


def test_detokenize_mt_keeps_a_possessive_apostrophe_after_z_on_its_word() -> None:
    """A possessive apostrophe after a word ending in ``z`` (or ``s``) stays on its word, as
    ``"kids' toys"`` does; read as an opening quote it would join the next word."""
    assert detokenize_mt(["fritz", "'", "car"]) == "fritz' car"
    assert detokenize_mt(["Fritz", "'", "car"]) == "Fritz' car"  # capital Z too
    assert detokenize_mt(["kids", "'", "toys"]) == "kids' toys"
