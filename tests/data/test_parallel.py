"""Parallel text: tokenisation, file errors, vocabularies, length filter, bucketed batches."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from captioner.config import ConfigError
from captioner.data.parallel import (BucketBatchSampler, EpochRandomSampler, ParallelDataError,
                                     ParallelTextDataModule, detokenize_mt, read_aligned,
                                     read_tsv, tokenize_mt)
from tests.conftest import trainer_at

TRAIN = [("Ein Hund läuft.", "A dog runs."),
         ("Ein Hund schläft.", "A dog sleeps."),
         ("Eine Katze läuft.", "A cat runs."),
         ("Zwei Hunde laufen schnell.", "Two dogs run fast.")]
VAL = [("Ein Hund.", "A dog."), ("Eine Katze schläft.", "A cat sleeps.")]


def write_aligned(root: Path, split: str, pairs, src="de", tgt="en") -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}.{src}").write_text("".join(f"{s}\n" for s, _ in pairs), encoding="utf-8")
    (root / f"{split}.{tgt}").write_text("".join(f"{t}\n" for _, t in pairs), encoding="utf-8")


def module(root: Path, **kw) -> ParallelTextDataModule:
    write_aligned(root, "train", TRAIN)
    write_aligned(root, "val", VAL)
    options = dict(splits={"train": "train", "val": "val"}, batch_size=2, min_freq=2)
    return ParallelTextDataModule(str(root), **{**options, **kw})


# ------------------------------------------------------------------------------ tokenisation
def test_tokenize_mt_keeps_punctuation_and_detokenize_joins_it_back():
    tokens = tokenize_mt("A man’s T-shirt (red), 3.5 m!")
    assert tokens == ["a", "man's", "t-shirt", "(", "red", ")", ",", "3.5", "m", "!"]
    assert detokenize_mt(tokens) == "a man's t-shirt (red), 3.5 m!"
    assert tokenize_mt("Zwei Hunde.", lowercase=False) == ["Zwei", "Hunde", "."]


@pytest.mark.parametrize("sentence", [
    "The kids' toys are “pink”.",  # possessive apostrophe, English typographic quotes
    'He said "hi" to us (twice)!',
    "Ein „großer“ Hund läuft.",  # German quotes: „ opens, “ closes
    "He says 'yes' to us.",  # single quotes in pairs are quotes, not a possessive
    "Il dit « oui ».",  # guillemets keep their (French) spacing
    "Zwei Hunde, 3.5 m weit; 1,000 Leute: 50%.",
    "Ein Obst- und Gemüsestand.",  # a suspended hyphen stays on its word (13a keeps it)
    "A dog -- a black one -- runs.",  # a "--" dash: one token to 13a, two to tokenize_mt
    "Kinder-, Jugend- und Obst-",  # before a comma and at the end too
    "एक आदमी सड़क पर चल रहा है।",  # vowel signs and a nukta inside words; the danda closes
    "ผู้ชาย กำลัง เดิน อยู่ ที่ บ้าน",  # Thai vowels and tone marks inside their words
])
def test_detokenize_inverts_tokenize_on_raw_sentences(sentence):
    """A translation that reproduces the tokens of its reference detokenises to the reference,
    so sacreBLEU (which re-tokenises both) scores it 100."""
    from captioner.translate import sacrebleu_score

    assert detokenize_mt(tokenize_mt(sentence, lowercase=False)) == sentence
    assert sacrebleu_score([detokenize_mt(tokenize_mt(sentence))], [sentence]).score == pytest.approx(100)


def test_tokenize_mt_keeps_combining_marks_in_their_word():
    assert tokenize_mt("एक आदमी सड़क पर चल रहा है।") == [
        "एक", "आदमी", "सड़क", "पर", "चल", "रहा", "है", "।"]
    assert tokenize_mt("Obst- und Gemüse-Stand") == ["obst-", "und", "gemüse-stand"]
    assert tokenize_mt("a - b, well-") == ["a", "-", "b", ",", "well-"]
    assert tokenize_mt("Kinder-, Jugend- und") == ["kinder-", ",", "jugend-", "und"]


def test_tokenize_mt_reads_decomposed_unicode_as_composed():
    import unicodedata

    composed = "Zwei Männer überqueren die Straße."
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    assert tokenize_mt(decomposed) == tokenize_mt(composed) == [
        "zwei", "männer", "überqueren", "die", "straße", "."]


def test_sacrebleu_reads_decomposed_references_as_composed():
    """A reference written decomposed (NFD) matches the composed output of the model, whose
    tokeniser reads NFC: 100, as with the composed reference."""
    import unicodedata

    from captioner.translate import sacrebleu_score

    reference = "Zwei Männer überqueren die Straße vor dem Café."
    output = detokenize_mt(tokenize_mt(unicodedata.normalize("NFD", reference)))
    assert sacrebleu_score([output], [unicodedata.normalize("NFD", reference)]).score == \
        pytest.approx(100)


def test_sacrebleu_scores_unk_as_one_wrong_word():
    from sacrebleu.metrics import BLEU

    from captioner.translate import sacrebleu_score

    ref = ["A man in a red shirt."]
    with_unk = sacrebleu_score(["a man in a <unk> shirt."], ref)
    one_wrong = sacrebleu_score(["a man in a blue shirt."], ref)
    assert with_unk.score == pytest.approx(one_wrong.score)
    assert "7 ref_len = 7" in with_unk.detail.replace("hyp_len = ", "")  # 7 tokens, not 9
    # a reference <unk> (some corpora keep them) is one token on both sides
    assert sacrebleu_score(["a <unk> dog."], ["A <unk> dog."]).score == pytest.approx(100)
    # sacreBLEU on the literal text splits it into "< unk >" and scores lower
    assert BLEU(lowercase=True).corpus_score(["a man in a <unk> shirt."], [ref]).score < \
        with_unk.score - 10


def test_sacrebleu_of_nothing_is_zero_with_a_signature():
    from captioner.translate import sacrebleu_score

    empty = sacrebleu_score([], [])
    assert empty.score == 0.0 and "tok:13a" in empty.signature and "case:lc" in empty.signature


# ------------------------------------------------------------------------------ file errors
def test_misaligned_files_name_file_and_line(tmp_path):
    write_aligned(tmp_path, "train", TRAIN)
    (tmp_path / "train.en").write_text("A dog runs.\nA dog sleeps.\nA cat runs.\n")
    with pytest.raises(ParallelDataError) as e:
        read_aligned(tmp_path / "train.de", tmp_path / "train.en")
    msg = str(e.value)
    assert f"{tmp_path / 'train.de'}:4" in msg and "4 lines" in msg and "has 3" in msg


def test_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "a.de").write_bytes("\ufeffZwei Hunde .\r\nEin Mann .\r\n".encode("utf-8"))
    (tmp_path / "a.en").write_bytes("\ufeffTwo dogs .\nA man .\n".encode("utf-8"))
    pairs = read_aligned(tmp_path / "a.de", tmp_path / "a.en")
    assert [list(p) for p in pairs] == [["Zwei Hunde .", "Two dogs ."], ["Ein Mann .", "A man ."]]


def test_only_a_newline_ends_a_line_and_bad_bytes_name_their_line(tmp_path):
    """A lone carriage return inside a line is text (``wc -l`` counts 2 lines in
    ``a\\rb\\nc\\n``; universal newlines read 3 and the files did not align); text that is not
    UTF-8 is reported at its line, not its byte offset."""
    from captioner.data.parallel_text import decode_lines, read_lines

    (tmp_path / "r.de").write_bytes(b"Ein\rHund.\r\nEine Katze.\n")
    (tmp_path / "r.en").write_bytes(b"A dog.\nA cat.")
    assert read_aligned(tmp_path / "r.de", tmp_path / "r.en") == [("Ein\rHund.", "A dog."),
                                                                ("Eine Katze.", "A cat.")]
    (tmp_path / "bad.de").write_bytes(b"Ein Hund.\nZwei Hunde.\nEin \xe4Hund.\nx\n")
    with pytest.raises(ParallelDataError, match=rf"{tmp_path / 'bad.de'}:3: not UTF-8 text "
                                                r"\(invalid"):
        read_lines(tmp_path / "bad.de")
    # the byte-order mark is not counted into the line either
    with pytest.raises(ParallelDataError, match=r"^stdin:2: not UTF-8"):
        decode_lines(b"\xef\xbb\xbfa\n\xff", "stdin")


def test_read_lines_reads_a_pipe_and_names_a_folder(tmp_path):
    """``translate --reference <(...)`` and ``/dev/stdin`` are not regular files: they were
    refused as "file not found"."""
    import os
    import threading

    from captioner.data.parallel_text import read_lines

    fifo = tmp_path / "ref.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_bytes, args=(b"A dog.\nA cat.\n",), daemon=True)
    writer.start()
    assert read_lines(fifo) == ["A dog.", "A cat."]
    writer.join()
    with pytest.raises(ParallelDataError, match=rf"^{tmp_path}: a folder, not a file$"):
        read_lines(tmp_path)
    with pytest.raises(ParallelDataError, match=r"gone\.en: file not found"):
        read_lines(tmp_path / "gone.en")

def test_empty_splits_name_their_files(tmp_path):
    dm = module(tmp_path)
    write_aligned(tmp_path, "val", [])
    with pytest.raises(ParallelDataError, match=rf"{tmp_path / 'val.de'}, "
                                                rf"{tmp_path / 'val.en'}: the val split has no"):
        dm.val_dataloader()
    short = module(tmp_path, max_len=1)
    with pytest.raises(ParallelDataError, match=r"train\.en: cannot build the vocabularies: the "
                                                r"training split has no sentence pairs \(within "
                                                r"max_len=1\)"):
        short.vocab_size


def test_a_checkpoints_language_pair_and_case_are_checked(tmp_path):
    write_aligned(tmp_path, "train", TRAIN)
    dm = module(tmp_path)
    dm.check_trained_with({"src_lang": "de", "tgt_lang": "en", "lowercase": True, "root": "x"},
                          "m.ckpt")  # other options (root) are not compared
    with pytest.raises(ConfigError, match=r"m\.ckpt was trained on data with src_lang 'en' "
                                          r"\(this data: 'de'\), tgt_lang 'de' \(this data: "
                                          r"'en'\): give the data config"):
        dm.check_trained_with({"src_lang": "en", "tgt_lang": "de", "lowercase": True}, "m.ckpt")
    with pytest.raises(ConfigError, match=r"lowercase False \(this data: True\)"):
        dm.check_trained_with({"lowercase": False}, "m.ckpt")


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_line_names_file_and_line(tmp_path, bad):
    write_aligned(tmp_path, "train", TRAIN)
    (tmp_path / "train.en").write_text(f"A dog runs.\n{bad}\nA cat runs.\nTwo dogs.\n")
    with pytest.raises(ParallelDataError, match=rf"{tmp_path / 'train.en'}:2: empty line"):
        read_aligned(tmp_path / "train.de", tmp_path / "train.en")


def test_data_module_reports_file_errors_on_first_use(tmp_path):
    dm = module(tmp_path)
    (tmp_path / "train.en").write_text("A dog runs.\n\nA cat runs.\nTwo dogs.\n")
    with pytest.raises(ParallelDataError, match=r"train\.en:2: empty line"):
        dm.vocab_size
    missing = ParallelTextDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(ParallelDataError, match=r"nowhere/train\.de: file not found"):
        missing.src_vocab_size


def test_tsv_reading_and_errors(tmp_path):
    good = tmp_path / "train.tsv"
    good.write_text("".join(f"{s}\t{t}\n" for s, t in TRAIN), encoding="utf-8")
    assert read_tsv(good) == TRAIN
    bad = tmp_path / "bad.tsv"
    bad.write_text("Ein Hund.\tA dog.\nkein Tab hier\n")
    with pytest.raises(ParallelDataError, match=rf"{bad}:2: expected 2 tab-separated fields"):
        read_tsv(bad)
    bad.write_text("Ein Hund.\tA dog.\nEine Katze.\t \n")
    with pytest.raises(ParallelDataError, match=rf"{bad}:2: empty target"):
        read_tsv(bad)


# ------------------------------------------------------------------------------ data module
def test_vocab_sizes_right_after_construction(tmp_path):
    dm = module(tmp_path)
    # de counts: "." 4, ein 2, hund 2, läuft 2, the rest once -> specials + 4 words
    assert dm.src_vocab.itos[4:] == [".", "ein", "hund", "läuft"]
    # en counts: "." 4, a 3, dog 2, runs 2
    assert dm.vocab.itos[4:] == [".", "a", "dog", "runs"]
    assert (dm.src_vocab_size, dm.vocab_size) == (8, 8)
    assert dm.hparams["min_freq"] == 2


def test_encoding_source_ends_with_end_target_is_wrapped(tmp_path):
    dm = module(tmp_path)
    item = dm.dataset("train")[0]  # "Ein Hund läuft." -> "A dog runs."
    assert item["src"].tolist() == [5, 6, 7, 4, 2]  # ein hund läuft . <end>
    assert item["tgt"].tolist() == [1, 5, 6, 7, 4, 2]  # <start> a dog runs . <end>
    val = dm.dataset("val")[1]  # "Eine Katze schläft." -> unknown words
    assert val["src"].tolist() == [3, 3, 3, 4, 2]


def test_max_len_filters_training_pairs_only(tmp_path):
    assert len(module(tmp_path).dataset("train")) == 4
    dm = module(tmp_path / "short", max_len=4)  # "zwei hunde laufen schnell ." has 5 tokens
    assert len(dm.dataset("train")) == 3
    assert len(dm.dataset("val")) == 2
    assert dm.references("val") == ["A dog.", "A cat sleeps."]


def test_max_len_leaves_out_a_pair_that_is_too_long_on_either_side(tmp_path):
    """A training pair is left out when its source *or* its target is longer than
    ``max_len`` tokens (a short source does not let a long target through, nor the reverse)."""
    pairs = [("Ein Hund.", "A dog."),  # 3 and 3 tokens: kept
             ("Hallo.", "One two three four five six."),  # 2 and 7 tokens: left out
             ("Eins zwei drei vier fünf.", "Hi.")]  # 6 and 2 tokens: left out
    write_aligned(tmp_path, "train", pairs)
    dm = ParallelTextDataModule(str(tmp_path), splits={"train": "train"}, min_freq=1,
                                max_len=4)
    assert len(dm.dataset("train")) == 1
    assert dm.dataset("train")[0]["tgt"].tolist() == [1, 5, 6, 4, 2]  # <start> a dog . <end>


def test_tsv_format_gives_the_same_data(tmp_path):
    aligned = module(tmp_path / "a")
    (tmp_path / "t").mkdir()
    for split, pairs in (("train", TRAIN), ("val", VAL)):
        (tmp_path / "t" / f"{split}.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs))
    tsv = ParallelTextDataModule(str(tmp_path / "t"), format="tsv", min_freq=2,
                                 splits={"train": "train", "val": "val"})
    assert tsv.src_vocab == aligned.src_vocab and tsv.vocab == aligned.vocab
    assert tsv.pairs("val") == aligned.pairs("val")
    assert tsv.pairs("test") == []  # no test stem configured


def test_split_names_are_configurable_and_checked(tmp_path):
    write_aligned(tmp_path, "tr", TRAIN, "en", "de")
    write_aligned(tmp_path, "dev", VAL, "en", "de")
    dm = ParallelTextDataModule(str(tmp_path), src_lang="en", tgt_lang="de", min_freq=1,
                                splits={"train": "tr", "val": "dev"})
    assert dm.files("val") == (tmp_path / "dev.en", tmp_path / "dev.de")
    assert dm.sources("val") == [s for s, _ in VAL]
    with pytest.raises(ValueError, match="unknown stages"):
        ParallelTextDataModule(str(tmp_path), splits={"training": "tr"})


def test_state_dict_restores_vocabularies_without_reading_files(tmp_path):
    dm = module(tmp_path)
    other = ParallelTextDataModule(str(tmp_path / "nowhere"))
    other.load_state_dict(dm.state_dict())
    assert (other.src_vocab, other.vocab) == (dm.src_vocab, dm.vocab)
    assert other.vocab_size == 8


def test_train_loader_batches_are_padded(tmp_path):
    dm = module(tmp_path)
    batches = list(dm.train_dataloader())
    assert sum(len(b["index"]) for b in batches) == 4
    for b in batches:
        assert b["src"].shape[0] == b["tgt"].shape[0] == b["src_lengths"].shape[0]
        assert b["src_lengths"].max() == b["src"].shape[1]
        for row, n in zip(b["src"], b["src_lengths"].tolist()):
            assert row[n - 1] == 2 and (row[n:] == 0).all()  # <end>, then padding


# ------------------------------------------------------------------------------ bucketing
def _range(keys, batch):
    values = [keys[i] for i in batch]
    return max(values) - min(values)


def test_bucketing_yields_batches_of_similar_lengths():
    rng = random.Random(0)
    keys = [rng.randint(1, 40) for _ in range(997)]
    sampler = BucketBatchSampler(EpochRandomSampler(keys), batch_size=16, keys=keys,
                                 bucket_factor=10, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(997))  # each index once
    assert len(batches) == len(sampler)
    assert all(len(b) <= 16 for b in batches)
    bucketed = sum(_range(keys, b) for b in batches) / len(batches)
    order = list(range(997))
    rng.shuffle(order)
    unbucketed = [order[i:i + 16] for i in range(0, 997, 16)]
    plain = sum(_range(keys, b) for b in unbucketed) / len(unbucketed)
    # a pool of 160 keys spread over 40 values: ~4 per value, so a batch spans ~4 values
    assert bucketed < 6 < 25 < plain


def test_bucketing_is_seeded_per_epoch_and_sorted_without_shuffle():
    keys = [(i * 7) % 23 for i in range(101)]
    order = EpochRandomSampler(keys, seed=1)
    sampler = BucketBatchSampler(order, batch_size=8, keys=keys, bucket_factor=4, seed=1)
    first = list(sampler)
    order.set_epoch(0)
    assert list(sampler) == first  # same epoch, same batches
    order.set_epoch(1)  # what Lightning calls on the batch sampler's sampler
    second = list(sampler)
    assert second != first
    assert list(sampler) not in (first, second)  # without set_epoch: the next epoch
    ordered = BucketBatchSampler(range(101), batch_size=8, keys=keys)
    flat = [keys[i] for b in ordered for i in b]
    assert flat == sorted(keys) and len(list(ordered)) == len(ordered) == 13
    assert torch.tensor(flat).diff().min() >= 0


def test_the_order_of_the_batches_changes_with_the_epoch():
    """The training batches are shuffled with ``seed`` *and* the sampler's epoch. With one pool
    (32 items < 8 * 100) every epoch sorts the same indices into the same four batches, so
    only their order can tell the epochs apart, and it must not be the same every epoch."""
    keys = list(range(32))
    order = EpochRandomSampler(keys, seed=0)
    sampler = BucketBatchSampler(order, batch_size=8, keys=keys, bucket_factor=100, seed=0)
    firsts = []
    for epoch in range(4):
        order.set_epoch(epoch)
        batches = list(sampler)
        # the one pool sorted by key, cut in 8s: [0..7], [8..15], [16..23], [24..31]
        assert sorted(batches) == [list(range(k, k + 8)) for k in (0, 8, 16, 24)]
        firsts.append(tuple(b[0] for b in batches))  # a permutation of (0, 8, 16, 24)
    assert len(set(firsts)) > 1, firsts


def test_a_worker_backed_loader_keeps_each_epochs_batch_order(tmp_path):
    """PyTorch calls ``iter`` on the batch sampler twice when a worker-backed loader starts; an
    eager pass at the first call moved the epoch on, so with ``num_workers > 0`` the first
    epoch ran the second's order (and a resumed fit did not continue exactly)."""
    keys = [(i * 7) % 23 for i in range(61)]
    order = EpochRandomSampler(keys, seed=3)
    sampler = BucketBatchSampler(order, batch_size=4, keys=keys, bucket_factor=3, seed=3)
    unused = iter(sampler)  # the first call, whose iterator the loader drops
    epoch0 = list(sampler)
    del unused
    expected = list(BucketBatchSampler(EpochRandomSampler(keys, seed=3), batch_size=4,
                                       keys=keys, bucket_factor=3, seed=3))
    assert epoch0 == expected
    # through a real worker-backed loader: the same batches as without workers, epoch by epoch
    dm = module(tmp_path, num_workers=1, seed=5)
    dm_plain = module(tmp_path / "plain", num_workers=0, seed=5)
    for loader_dm in (dm, dm_plain):
        loader_dm.setup("fit")
    with_workers, without = dm.train_dataloader(), dm_plain.train_dataloader()
    for epoch in range(2):
        for loader in (with_workers, without):
            loader.batch_sampler.sampler.set_epoch(epoch)
        assert [b["src"].tolist() for b in with_workers] == [b["src"].tolist() for b in without]


@pytest.mark.parametrize("shuffle", [True, False])
def test_bucketing_a_distributed_shard(shuffle):
    """What Lightning's DDP builds: each rank buckets the indices of its DistributedSampler;
    the ranks cover every index and make the same number of batches."""
    from torch.utils.data.distributed import DistributedSampler

    keys = [(i * 5) % 17 for i in range(53)]
    per_rank = []
    for rank in range(2):
        shard = DistributedSampler(keys, num_replicas=2, rank=rank, shuffle=shuffle, seed=4)
        shard.set_epoch(2)
        sampler = BucketBatchSampler(shard, batch_size=4, keys=keys, bucket_factor=3, seed=4)
        assert sampler.shuffle is shuffle
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == sorted(shard)
        per_rank.append(batches)
    assert len(per_rank[0]) == len(per_rank[1]) == 7  # 27 indices each (one repeated)
    assert {i for batches in per_rank for b in batches for i in b} == set(range(53))
    if not shuffle:  # evaluation: each rank's shard sorted by length
        flat = [keys[i] for b in per_rank[0] for i in b]
        assert flat == sorted(flat)


def test_drop_last_drops_each_pools_short_batch():
    keys = list(range(23))
    sampler = BucketBatchSampler(range(23), batch_size=5, drop_last=True, keys=keys)
    assert [len(b) for b in sampler] == [5, 5, 5, 5] and len(sampler) == 4


def test_a_resumed_training_epoch_repeats_its_order(tmp_path):
    """Lightning draws the first batch of a resumed fit before calling set_epoch: the loader
    starts at the trainer's epoch, so resumed epoch 3 is batched as epoch 3 was."""

    dm = module(tmp_path, min_freq=1, batch_size=1)
    fresh = dm.loader("train")
    fresh.batch_sampler.sampler.set_epoch(3)
    expected = [b["index"].tolist() for b in fresh]
    dm.trainer = trainer_at(3)
    resumed = [b["index"].tolist() for b in dm.loader("train")]
    assert resumed == expected
    first = dm.loader("train")
    first.batch_sampler.sampler.set_epoch(0)
    assert [b["index"].tolist() for b in first] != expected  # the orders differ by epoch


def test_overfit_batches_repeat_the_same_batches(tmp_path):
    """Lightning makes a loader's own sampler sequential for ``overfit_batches`` but not the
    one inside a batch sampler: each epoch trained on other pairs."""

    dm = module(tmp_path, min_freq=1, batch_size=1)
    epochs = []
    for epoch in range(3):
        dm.trainer = trainer_at(epoch, overfit_batches=2)
        epochs.append([b["index"].tolist() for b in dm.loader("train")])
    assert epochs[0] == epochs[1] == epochs[2]
    lengths = [b["tgt"].shape[1] for b in dm.loader("train")]
    assert lengths == sorted(lengths)  # unshuffled: by length, as evaluation batches


@pytest.mark.parametrize("rank", [0, 1])
def test_a_resumed_ddp_epoch_repeats_its_order_on_each_rank(tmp_path, rank):
    """Under DDP Lightning rebuilds the bucketing batch sampler around a ``DistributedSampler``
    of its own, at epoch 0, and draws a resumed fit's first batches before it calls
    ``set_epoch``: the rebuilt sampler starts at the trainer's epoch (``BucketBatchSampler``'s
    ``epoch``, kept by the rebuild), so each rank's resumed epoch 3 is batched as epoch 3 of
    the uninterrupted fit was; it used to replay epoch 0's. Lightning's own rebuild is used."""

    from lightning.fabric.utilities.data import _replace_dunder_methods, _set_sampler_epoch
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    dm = module(tmp_path, min_freq=1, batch_size=1)

    def rank_batches(trainer_epoch: int, set_epoch: int | None = None) -> list[list[int]]:
        dm.trainer = trainer_at(trainer_epoch)
        with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
            loader = dm.loader("train")  # as Lightning requests it
        shard = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True,
                                   seed=dm.seed)  # what Lightning injects (at epoch 0)
        loader = _update_dataloader(loader, shard, mode=RunningStage.TRAINING)
        assert loader.batch_sampler.sampler is shard
        if set_epoch is not None:
            _set_sampler_epoch(loader, set_epoch)  # the fit loop, before an epoch's iterator
        return [b["index"].tolist() for b in loader]

    uninterrupted = rank_batches(0, set_epoch=3)  # epoch 3's iterator in the uninterrupted fit
    resumed = rank_batches(3)  # a fit resumed at epoch 3: its first iterator, no set_epoch yet
    assert resumed == uninterrupted
    assert rank_batches(0) != uninterrupted  # epoch 0's order is another (what was replayed)
    assert len(resumed) == (len(dm.dataset("train")) + 1) // 2  # this rank's shard only


def test_loaders_take_nothing_from_the_global_generator(tmp_path):
    """Each new iterator used to draw its workers' base seed from the global torch generator,
    so that a resumed fit (a new iterator where persistent workers reused theirs) drifted."""
    dm = module(tmp_path, min_freq=1, batch_size=2)
    state = torch.get_rng_state()
    for stage in ("train", "val"):
        list(dm.loader(stage))
    assert torch.equal(torch.get_rng_state(), state)


def test_score_translations_script_reads_files_as_the_tools_do(tmp_path, capsys):
    """scripts/score_translations.py: the same line reading as the data and ``translate``
    (a lone carriage return is text), and a file that is not UTF-8 is one line naming it."""
    import json

    from tests.conftest import load_script

    score = load_script("score_translations")
    (tmp_path / "ref.en").write_bytes(b"\xef\xbb\xbfa dog runs .\r\nthe\rcat sleeps .\n")
    (tmp_path / "hyp.en").write_bytes(b"a dog runs .\nthe\rcat sleeps .\n")
    assert score.main([str(tmp_path / "hyp.en"), "--reference", str(tmp_path / "ref.en"),
                       "--json", str(tmp_path / "s.json")]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())["scores"]
    assert scores[str(tmp_path / "hyp.en")]["bleu"] == pytest.approx(100)
    (tmp_path / "bad.en").write_bytes(b"a dog runs .\n\xe4\n")
    assert score.main([str(tmp_path / "bad.en"), "--reference", str(tmp_path / "ref.en")]) == 2
    assert capsys.readouterr().err == f"{tmp_path / 'bad.en'}:2: not UTF-8 text (invalid " \
                                      "continuation byte)\n"


@pytest.mark.parametrize("option, value", [("batch_size", 0), ("bucket_factor", 0),
                                           ("num_workers", -2), ("max_len", 0),
                                           ("max_pairs", 0), ("max_vocab_size", 3)])
def test_out_of_range_options_are_refused_when_the_module_is_built(tmp_path, option, value):
    from captioner.config import ConfigError

    with pytest.raises(ConfigError, match=rf"ParallelTextDataModule: {option} must be .* got "
                                          rf"{value} \(data.init_args.{option}\)"):
        module(tmp_path, **{option: value})


def test_vocabularies_that_keep_no_word_are_refused(tmp_path):
    from captioner.data.vocabulary import VocabularyError

    with pytest.raises(VocabularyError, match=r"training sources \(min_freq 9, max_vocab_size "
                                              r"None\) keeps no word"):
        module(tmp_path, min_freq=9).src_vocab


def test_pairs_left_out_by_max_len_are_warned_of_when_many(tmp_path, caplog):
    """The note was logged at INFO, which the CLI does not show: most pairs could be dropped
    unseen (``max_len`` 8 left out most of Multi30k's)."""
    import logging

    with caplog.at_level(logging.WARNING, logger="captioner.data.parallel"):
        module(tmp_path, max_len=4).src_vocab  # "Zwei Hunde laufen schnell ." is 5 tokens
    assert "left out 1 of 4 training pairs longer than max_len=4 tokens" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="captioner.data.parallel"):
        module(tmp_path / "all", max_len=50).src_vocab
    assert "longer than max_len" not in caplog.text


def test_surrounding_whitespace_crlf_and_extra_tabs(tmp_path):
    from captioner.data.parallel_text import decode_lines

    assert decode_lines(b"a b\r\nc\r\n", "x") == ["a b", "c"]
    (tmp_path / "w.de").write_text("  Ein Hund. \n\tEine Katze.\n", encoding="utf-8")
    (tmp_path / "w.en").write_text("A dog.  \n A cat.\n", encoding="utf-8")
    assert read_aligned(tmp_path / "w.de", tmp_path / "w.en") == [("Ein Hund.", "A dog."),
                                                                ("Eine Katze.", "A cat.")]
    bad = tmp_path / "three.tsv"
    bad.write_text("Ein Hund.\tA dog.\nEine Katze.\tA cat.\tUn chat.\n", encoding="utf-8")
    with pytest.raises(ParallelDataError, match=rf"{bad}:2: expected 2 tab-separated fields "
                                                r"\(source, target\), got 3"):
        read_tsv(bad)


def test_pools_hold_batch_size_times_bucket_factor_and_len_counts_dropped_batches():
    # pools of 2 * 3 = 6: the first 6 indices the sampler yields make 3 sorted batches
    keys = [(i * 5) % 13 for i in range(13)]
    drawn = list(EpochRandomSampler(keys, seed=2))
    sampler = BucketBatchSampler(EpochRandomSampler(keys, seed=2), batch_size=2, keys=keys,
                                 bucket_factor=3, seed=2)
    pool = sorted(drawn[:6], key=lambda i: keys[i])
    assert sorted([pool[0:2], pool[2:4], pool[4:6]]) == sorted(
        b for b in sampler if set(b) <= set(drawn[:6]))
    # 13 = 6 + 6 + 1: with drop_last the pools keep 3, 3 and 0 batches
    dropping = BucketBatchSampler(EpochRandomSampler(keys, seed=2), batch_size=2,
                                  drop_last=True, keys=keys, bucket_factor=3)
    assert len(list(dropping)) == len(dropping) == 6
    with pytest.raises(ValueError, match="bucket_factor"):
        BucketBatchSampler(range(13), batch_size=2, keys=keys, bucket_factor=0)


def test_data_module_options_reach_the_data(tmp_path):
    from captioner.data.vocabulary import Vocabulary

    dm = module(tmp_path, max_pairs=3, eval_batch_size=1, lowercase=False, min_freq=1)
    assert len(dm.pairs("train")) == 3 and len(dm.dataset("train")) == 3
    assert "Ein" in dm.src_vocab.itos and "ein" not in dm.src_vocab.itos  # case kept
    assert [len(b["index"]) for b in dm.val_dataloader()] == [1, 1]
    # batches are sorted by (target, source) length, <start> / <end> counted
    assert dm.val_dataloader().batch_sampler.keys == [(5, 4), (6, 5)]
    # imposed vocabularies (either side) re-encode the datasets already built
    src, tgt = dm.src_vocab, dm.tgt_vocab
    reverse = lambda v: Vocabulary([*v.itos[:4], *v.itos[4:][::-1]])  # noqa: E731
    first = dm.pairs("train")[0]
    dm.set_vocabs(src, reverse(tgt))
    assert dm.dataset("train")[0]["tgt"].tolist() == reverse(tgt).encode(dm.tokenize(first[1]))
    dm.set_vocabs(reverse(src), reverse(tgt))
    assert dm.dataset("train")[0]["src"].tolist() == [
        *reverse(src).encode(dm.tokenize(first[0]), add_start_end=False), 2]


def test_bucket_sampler_leaves_a_samplers_epoch_alone_without_epoch():
    """As ``SameLengthBatchSampler``: wrapping a sampler already at epoch 4 without ``epoch``
    must not reset it to 0."""
    keys = [(i % 7, i % 5) for i in range(40)]
    order = EpochRandomSampler(keys, seed=2)
    order.set_epoch(4)
    wrapped = list(BucketBatchSampler(order, batch_size=4, keys=keys, seed=2))
    at = {e: list(BucketBatchSampler(EpochRandomSampler(keys, seed=2), batch_size=4, keys=keys,
                                     seed=2, epoch=e)) for e in (0, 4)}
    assert wrapped == at[4] and wrapped != at[0]
