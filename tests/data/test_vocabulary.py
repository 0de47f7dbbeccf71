"""Tests for captioner.data.vocabulary."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from captioner.data.vocabulary import SPECIALS, Vocabulary, check_coverage

CAPTIONS = [
    ["a", "dog", "runs"],
    ["a", "cat", "runs"],
    ["a", "dog", "sits"],
    ["the", "cat"],
]
# counts: a=3, cat=2, dog=2, runs=2, sits=1, the=1


def test_specials_have_fixed_ids() -> None:
    vocab = Vocabulary.build([])
    assert vocab.itos == ["<pad>", "<start>", "<end>", "<unk>"]
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)
    assert len(vocab) == 4


def test_build_orders_by_frequency_then_alphabet() -> None:
    vocab = Vocabulary.build(CAPTIONS)
    assert vocab.itos[4:] == ["a", "cat", "dog", "runs", "sits", "the"]
    assert vocab.stoi["cat"] == 5


def test_build_min_freq_and_max_size() -> None:
    assert Vocabulary.build(CAPTIONS, min_freq=2).itos[4:] == ["a", "cat", "dog", "runs"]
    assert Vocabulary.build(CAPTIONS, min_freq=3).itos[4:] == ["a"]
    assert Vocabulary.build(CAPTIONS, max_size=6).itos[4:] == ["a", "cat"]  # 4 specials + 2
    assert Vocabulary.build(CAPTIONS, max_size=4).itos == list(SPECIALS)  # the specials alone
    with pytest.raises(ValueError):
        Vocabulary.build(CAPTIONS, min_freq=0)
    with pytest.raises(ValueError):
        Vocabulary.build(CAPTIONS, max_size=3)


def test_build_ignores_special_tokens_in_data() -> None:
    vocab = Vocabulary.build([["<unk>", "dog", "<pad>"]])
    assert vocab.itos == [*SPECIALS, "dog"]


def test_encode_decode() -> None:
    vocab = Vocabulary.build(CAPTIONS)  # a=4 cat=5 dog=6 runs=7 sits=8 the=9
    assert vocab.encode(["a", "dog", "flies"]) == [1, 4, 6, 3, 2]
    assert vocab.encode(["the", "cat"], add_start_end=False) == [9, 5]
    # stops at <end>, drops <pad>/<start>, keeps <unk>
    assert vocab.decode([1, 4, 3, 0, 6, 2, 7, 7]) == ["a", "<unk>", "dog"]
    assert vocab.decode(torch.tensor([1, 4, 2, 0])) == ["a"]
    assert vocab.decode([1, 4, 2, 0], strip_special=False) == ["<start>", "a", "<end>", "<pad>"]
    with pytest.raises(IndexError):
        vocab.decode([10])
    with pytest.raises(IndexError):
        vocab.decode([1, 4, -1])  # not itos[-1], "the"


def test_vocabulary_is_case_sensitive() -> None:
    vocab = Vocabulary.build([["Dog", "dog", "dog"]])  # dog=4, Dog=5
    assert vocab.encode(["Dog", "DOG"], add_start_end=False) == [5, 3]


def test_equality_fingerprint_and_dict_roundtrip() -> None:
    vocab = Vocabulary.build(CAPTIONS)
    again = Vocabulary.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert again == vocab
    assert again.fingerprint() == vocab.fingerprint()
    other = Vocabulary.build(CAPTIONS, min_freq=2)
    assert other != vocab
    assert other.fingerprint() != vocab.fingerprint()
    assert len(vocab.fingerprint()) == 40
    # the tokens are hashed with a separator: these two lists must not collide
    assert (Vocabulary([*SPECIALS, "ab", "c"]).fingerprint()
            != Vocabulary([*SPECIALS, "a", "bc"]).fingerprint())
    # stored in every vocabulary file and checkpoint: a new definition would refuse them all
    assert Vocabulary(SPECIALS).fingerprint() == "76d907f29bcbf794236bfe85cb287099b1a64b62"


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary(["dog", "<pad>"])
    with pytest.raises(ValueError, match="repeated"):
        Vocabulary([*SPECIALS, "dog", "dog"])
    with pytest.raises(ValueError, match="non-empty strings"):
        Vocabulary([*SPECIALS, "dog", ""])


def test_save_is_atomic_and_loads_back(tmp_path: Path) -> None:
    vocab = Vocabulary.build(CAPTIONS)
    path = tmp_path / "sub" / "vocab.json"
    vocab.save(path)
    vocab.save(path)  # overwrite in place
    assert Vocabulary.load(path) == vocab
    assert sorted(p.name for p in path.parent.iterdir()) == ["vocab.json"]  # no temp files left


def test_save_failure_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vocab = Vocabulary.build(CAPTIONS)
    path = tmp_path / "vocab.json"
    path.write_text("old")

    def boom(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("captioner.data.vocabulary.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        vocab.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]
    assert path.read_text() == "old"  # the previous file is untouched


@pytest.mark.parametrize(
    "content",
    ['{"itos": ["<pad>", "<start>"', '{"tokens": []}', '["a", "b"]', '{"itos": ["dog"]}'],
)
def test_load_malformed_names_the_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "broken_vocab.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="broken_vocab.json"):
        Vocabulary.load(path)


def test_load_of_a_folder_is_a_vocabulary_error_naming_it(tmp_path: Path) -> None:
    """``vocab_file`` naming a folder raised a bare ``IsADirectoryError``."""
    from captioner.data.vocabulary import VocabularyError

    folder = tmp_path / "vocab_dir"
    folder.mkdir()
    with pytest.raises(VocabularyError, match="vocab_dir: cannot read the vocabulary file"):
        Vocabulary.load(folder)


def test_load_of_a_missing_file_is_a_file_not_found_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing_vocab.json: no such vocabulary file"):
        Vocabulary.load(tmp_path / "missing_vocab.json")


def test_coverage_warns_only_above_half_unknown(caplog: pytest.LogCaptureFixture) -> None:
    counts = {"dog": 3, "cat": 2, "owl": 1}
    vocab = Vocabulary.from_counts(counts, min_freq=3)  # dog: 3 of the 6 tokens unknown
    with caplog.at_level(logging.WARNING, logger="captioner.data.vocabulary"):
        assert check_coverage(vocab, counts, "the captions") == 0.5
    assert not caplog.records  # exactly half: no warning


def test_load_detects_tampered_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "vocab.json"
    d = Vocabulary.build(CAPTIONS).to_dict()
    d["itos"].append("extra")
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="fingerprint"):
        Vocabulary.load(path)
