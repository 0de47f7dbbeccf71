"""``captioner translate``: train a tiny model through ``captioner fit`` with the shipped Multi30k
configs, then translate in-process (:func:`captioner.cli.main`) and in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner.cli import lightning_main, main
from captioner.translate import Translator

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAIRS = [
    ("Der Hund.", "The dog."),
    ("Die Katze schläft.", "The cat sleeps."),
    ("Ein alter Mann lacht.", "An old man laughs."),
    ("Zwei kleine Kinder spielen im Park.", "Two small children play in the park."),
    ("Eine Frau liest.", "A woman reads."),
    ("Der rote Ball.", "The red ball."),
]
EPOCHS = 50


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy_multi30k")
    for split in ("train", "val", "test_2016_flickr"):
        (root / f"{split}.de").write_text("".join(f"{s}\n" for s, _ in PAIRS), encoding="utf-8")
        (root / f"{split}.en").write_text("".join(f"{t}\n" for _, t in PAIRS), encoding="utf-8")
    out = tmp_path_factory.mktemp("toy_fit")
    enc, dec = "--model.init_args.encoder.init_args", "--model.init_args.decoder.init_args"
    cli = lightning_main([
        "fit",
        "--config", str(CONFIGS / "trainer" / "cpu.yaml"),
        "--config", str(CONFIGS / "data" / "multi30k_de_en.yaml"),
        "--config", str(CONFIGS / "model" / "multi30k_gru.yaml"),
        "--data.init_args.root", str(root),
        "--data.init_args.min_freq", "1",
        "--data.init_args.batch_size", "2",
        f"{enc}.embed_dim", "12", f"{enc}.hidden_dim", "14", f"{enc}.dropout", "0",
        f"{dec}.embed_dim", "12", f"{dec}.hidden_dim", "26", f"{dec}.dropout", "0",
        f"{dec}.attention.init_args.attention_dim", "10",
        "--model.init_args.lr", "0.03",
        "--model.init_args.max_length", "12",
        "--trainer.max_epochs", str(EPOCHS),
        "--trainer.check_val_every_n_epoch", str(EPOCHS),
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out / "runs"),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--seed_everything", "0",
    ])
    # the source vocabulary size reached the model through the CLI link
    assert cli.model.hparams.src_vocab_size == cli.datamodule.src_vocab_size == 25  # 21 words
    assert cli.model.hparams.vocab_size == cli.datamodule.vocab_size == 24  # 20 words
    assert "val/bleu" in cli.trainer.callback_metrics
    return Path(cli.trainer.checkpoint_callback.best_model_path)


def test_translate_in_process_one_line_per_sentence(checkpoint, capsys):
    sources = [s for s, _ in PAIRS]
    assert main(["translate", "--ckpt", str(checkpoint), *sources]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [t.text for t in Translator.from_checkpoint(checkpoint).translate(sources)]
    assert lines == [t.lower() for _, t in PAIRS]  # memorised, detokenised, lowercased


def test_translate_in_bf16_runs_the_model_in_bf16(checkpoint, capsys):
    sources = [s for s, _ in PAIRS]
    translator = Translator.from_checkpoint(checkpoint, precision="bf16")
    seen: set[torch.dtype] = set()
    translator.decoder.L_o.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    texts = [t.text for t in translator.translate(sources, beam_size=2)]
    assert seen == {torch.bfloat16} and len(texts) == len(sources)
    assert main(["translate", "--ckpt", str(checkpoint), "--precision", "bf16", "--beam-size",
                 "2", *sources]) == 0
    assert capsys.readouterr().out.splitlines() == texts


def test_translate_beam_alignment_and_reference(checkpoint, capsys, tmp_path):
    ref = tmp_path / "ref.en"
    ref.write_text("\ufeff" + "".join(f"{t}\n" for _, t in PAIRS[:2]))  # with a BOM
    status = main(["translate", "--ckpt", str(checkpoint), "--beam-size", "3",
                   "--alignment", str(tmp_path / "fig.png"), "--reference", str(ref),
                   PAIRS[0][0], PAIRS[1][0]])
    captured = capsys.readouterr()
    assert status == 0
    assert captured.out.splitlines() == ["the dog.", "the cat sleeps."]
    assert "BLEU = 100.00" in captured.err and "case:lc" in captured.err
    assert (tmp_path / "fig_1.png").stat().st_size > 0 and (tmp_path / "fig_2.png").is_file()


def test_translate_takes_min_length_and_warns_of_a_file_given_as_a_sentence(checkpoint, capsys,
                                                                          tmp_path):
    """``--min-length`` was accepted and ignored (also over ``--max-length``); a file named as
    a sentence was translated as its own name without a word."""
    source = PAIRS[0][0]
    assert main(["translate", "--ckpt", str(checkpoint), source]) == 0
    short = capsys.readouterr().out.strip()
    assert main(["translate", "--ckpt", str(checkpoint), "--min-length", "8", source]) == 0
    longer = capsys.readouterr().out.strip()
    translator = Translator.from_checkpoint(checkpoint)
    translator.search["min_length"] = 8  # tokens, <end> included
    expected = translator.translate([source])[0]
    assert longer == expected.text != short and len(expected.target_tokens) >= 7, (short, longer)
    assert main(["translate", "--ckpt", str(checkpoint), "--max-length", "3", "--min-length",
                 "5", source]) == 2
    assert "--min-length 5 exceeds the most decoding steps (3; --max-length): no translation " \
           "could end" in capsys.readouterr().err
    a_file = tmp_path / "sources.de"
    a_file.write_text(f"{source}\n")
    assert main(["translate", "--ckpt", str(checkpoint), str(a_file)]) == 0
    assert (f"WARNING: sentence argument 1 names a file ({a_file}), translated as a sentence; "
            "to translate its lines give it on stdin (< FILE)") in capsys.readouterr().err
    unspaced = "这是一个很长的中文句子没有空格" * 10  # too long for a file name: no error
    assert main(["translate", "--ckpt", str(checkpoint), unspaced]) == 0
    assert "WARNING" not in capsys.readouterr().err


def test_translate_subprocess_reads_stdin(checkpoint, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    exe = str(Path(sys.executable).parent / "captioner")  # the installed entry point
    done = subprocess.run(
        [exe, "translate", "--ckpt", str(checkpoint), "--alignment", str(tmp_path / "a.png")],
        input="Der rote Ball.\n\nEine Frau liest.\n", capture_output=True, text=True, env=env,
        timeout=300)
    assert done.returncode == 0, done.stderr
    # one output line per input line: a blank line is answered by a blank line
    assert done.stdout.split("\n") == ["the red ball.", "", "a woman reads.", ""]
    # figures are named by input line: the blank second line has none
    assert (tmp_path / "a_1.png").is_file() and (tmp_path / "a_3.png").is_file()
    assert not (tmp_path / "a_2.png").exists()


def test_alignment_labels_mark_the_source_words_read_as_unk(checkpoint, tmp_path, monkeypatch):
    import captioner.visualize as visualize

    labels = []
    monkeypatch.setattr(visualize, "plot_alignment",
                        lambda source, *a, **k: labels.append(source) or a[2])
    (t,) = Translator.from_checkpoint(checkpoint).translate(["Der rote Zebraball."])
    assert t.source_tokens == ["der", "rote", "zebraball", ".", "<end>"]
    assert t.source_unknown == [False, False, True, False, False]
    assert main(["translate", "--ckpt", str(checkpoint), "--alignment",
                 str(tmp_path / "fig.png"), "Der rote Zebraball."]) == 0
    assert labels == [["der", "rote", "zebraball (<unk>)", ".", "<end>"]]


def test_translate_drops_a_byte_order_mark_from_stdin(checkpoint, capsys, monkeypatch):
    import io

    seen = []
    original = Translator.translate

    def spy(self, sentences, *args, **kwargs):
        seen.extend(sentences)
        return original(self, sentences, *args, **kwargs)

    monkeypatch.setattr(Translator, "translate", spy)
    def stdin(raw: bytes) -> io.TextIOWrapper:  # read as UTF-8 whatever the locale says
        return io.TextIOWrapper(io.BytesIO(raw), encoding="ascii", errors="strict")

    monkeypatch.setattr(sys, "stdin", stdin("\ufeffDer rote Ball.\nEine Frau liest.\n".encode()))
    assert main(["translate", "--ckpt", str(checkpoint)]) == 0
    assert seen == ["Der rote Ball.", "Eine Frau liest."]  # a BOM (Windows editors) is no word
    assert capsys.readouterr().out.splitlines() == ["the red ball.", "a woman reads."]
    # Latin-1 text: one line naming the line (was a source word made of a surrogate, and with
    # --alignment a matplotlib traceback)
    monkeypatch.setattr(sys, "stdin", stdin(b"Ein Hund.\nEin \xe4Hund.\n"))
    assert main(["translate", "--ckpt", str(checkpoint), "--alignment", "a.png"]) == 1  # data
    err = capsys.readouterr().err
    assert "captioner translate: error: stdin:2: not UTF-8 text" in err and err.count("\n") == 1
    latin1 = os.fsdecode(b"Ein \xe4Hund.")  # as Python hands over such a command-line argument
    assert main(["translate", "--ckpt", str(checkpoint), "Ein Hund.", latin1]) == 2
    assert "error: sentence argument 2 is not UTF-8 text" in capsys.readouterr().err


def test_translate_errors_are_one_line(checkpoint, capsys, tmp_path):
    assert main(["translate", "--ckpt", str(tmp_path / "missing.ckpt"), "x"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    ckpt["captioner"]["task"] = "captioning"
    torch.save(ckpt, tmp_path / "captioning.ckpt")
    assert main(["translate", "--ckpt", str(tmp_path / "captioning.ckpt"), "x"]) == 2
    err = capsys.readouterr().err
    assert "expected 'translation'" in err and "Traceback" not in err


def test_lightning_commands_answer_data_and_checkpoint_mistakes_in_one_line(checkpoint, capsys,
                                                                           tmp_path):
    trainer = ["--config", str(CONFIGS / "trainer" / "cpu.yaml"),
               "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    # data that is not there (read while the vocabulary size is linked to the model)
    assert main(["fit", *trainer, "--config", str(CONFIGS / "data" / "multi30k_de_en.yaml"),
                 "--config", str(CONFIGS / "model" / "multi30k_gru.yaml"),
                 "--data.init_args.root", str(tmp_path / "nowhere")]) == 1  # unreadable data
    err = capsys.readouterr().err
    assert f"captioner fit: {tmp_path / 'nowhere' / 'train.de'}: file not found" in err
    assert "Traceback" not in err
    # a translation checkpoint tested on caption data
    assert main(["test", *trainer, "--config", str(CONFIGS / "data" / "shapes.yaml"),
                 "--data.init_args.root", str(tmp_path / "shapes"),
                 "--ckpt_path", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert (f"captioner test: the checkpoint {checkpoint} is a translation model, but the data "
            "module ShapesDataModule holds captions") in err  # naming the file
    assert "Traceback" not in err
    # without a checkpoint: the model's task against the data's (an AttributeError, and a
    # KeyError in the first training step of a captioning model on parallel text)
    assert main(["fit", *trainer, "--config", str(CONFIGS / "data" / "shapes.yaml"),
                 "--data.init_args.root", str(tmp_path / "shapes"),
                 "--config", str(CONFIGS / "model" / "multi30k_gru.yaml")]) == 2
    err = capsys.readouterr().err
    assert ("captioner fit: the model TranslationModule is a translation model, but the data "
            "module ShapesDataModule holds captions: give the translation data config") in err
    assert "Traceback" not in err
    # the de->en checkpoint on en->de data: its vocabularies would read English as <unk>
    data = tmp_path / "toy"
    data.mkdir()
    for split in ("train", "val", "test_2016_flickr"):
        (data / f"{split}.de").write_text("".join(f"{s}\n" for s, _ in PAIRS), encoding="utf-8")
        (data / f"{split}.en").write_text("".join(f"{t}\n" for _, t in PAIRS), encoding="utf-8")
    en_de = ["--config", str(CONFIGS / "data" / "multi30k_en_de.yaml"),
             "--data.init_args.root", str(data)]
    assert main(["fit", *trainer, *en_de, "--config",
                 str(CONFIGS / "model" / "shapes_soft.yaml")]) == 2
    err = capsys.readouterr().err
    assert ("captioner fit: the model CaptioningModule is a captioning model, but the data "
            "module ParallelTextDataModule holds parallel text") in err
    assert main(["test", *trainer, *en_de, "--ckpt_path", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert ("captioner test: the --ckpt_path checkpoint was trained on data with src_lang 'de' "
            "(this data: 'en'), tgt_lang 'en' (this data: 'de')") in err
    assert "Traceback" not in err
    # a checkpoint whose source vocabulary lost a word: one line, not a traceback
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    ckpt["captioner"]["src_vocab"]["itos"].pop()
    torch.save(ckpt, tmp_path / "short_vocab.ckpt")
    de_en = ["--config", str(CONFIGS / "data" / "multi30k_de_en.yaml"),
             "--data.init_args.root", str(data)]
    assert main(["test", *trainer, *de_en, "--ckpt_path", str(tmp_path / "short_vocab.ckpt")]) == 2
    err = capsys.readouterr().err  # its fingerprint no longer matches
    assert "vocabulary fingerprint mismatch" in err and "Traceback" not in err, err
    del ckpt["captioner"]["src_vocab"]["fingerprint"]
    torch.save(ckpt, tmp_path / "short_vocab.ckpt")
    assert main(["test", *trainer, *de_en, "--ckpt_path", str(tmp_path / "short_vocab.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "source vocabulary mismatch" in err and "Traceback" not in err, err


@pytest.mark.parametrize("model_yaml", [True, False])
def test_lightning_test_builds_the_checkpoints_model(checkpoint, tmp_path, model_yaml):
    """`captioner test --ckpt_path` with the configs (with or without the model's): the encoder
    and decoder sizes given on the fit command line come from the checkpoint, and a --model
    option still wins."""
    data = tmp_path / "toy"
    data.mkdir()
    for split in ("train", "val", "test_2016_flickr"):
        (data / f"{split}.de").write_text("".join(f"{s}\n" for s, _ in PAIRS), encoding="utf-8")
        (data / f"{split}.en").write_text("".join(f"{t}\n" for _, t in PAIRS), encoding="utf-8")
    model = ["--config", str(CONFIGS / "model" / "multi30k_gru.yaml")] if model_yaml else []
    cli = lightning_main([
        "test",
        "--config", str(CONFIGS / "trainer" / "cpu.yaml"),
        "--config", str(CONFIGS / "data" / "multi30k_de_en.yaml"),
        *model,
        "--data.init_args.root", str(data), "--data.init_args.min_freq", "1",
        "--data.init_args.batch_size", "2",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
        "--model.init_args.beam_size", "3",
        "--ckpt_path", str(checkpoint),
    ])
    assert type(cli.model).__name__ == "TranslationModule"
    assert cli.model.decoder.hidden_dim == 26 and cli.model.hparams.beam_size == 3
    assert cli.model.hparams.src_vocab_size == 25 and cli.model.hparams.vocab_size == 24
    assert cli.trainer.callback_metrics["test/bleu"] > 50  # it memorised the six pairs


def test_a_checkpoint_of_another_tokenizer_version_is_warned_of(checkpoint, tmp_path):
    """Checkpoints record the ``tokenize_mt`` version their vocabularies were built with; one
    from before (no field: version 1) loads with a warning naming both versions."""
    import warnings

    import torch

    from captioner.data.tokenize import MT_TOKENIZER_VERSION

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["captioner"]["data"]["tokenizer_version"] == MT_TOKENIZER_VERSION
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the current version: silent
        Translator.from_checkpoint(checkpoint)
    del ckpt["captioner"]["data"]["tokenizer_version"]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    with pytest.warns(UserWarning, match=f"old.ckpt: its vocabularies were built with "
                                         f"tokenize_mt version 1, this is version "
                                         f"{MT_TOKENIZER_VERSION}"):
        Translator.from_checkpoint(old)


def test_a_loaded_module_refuses_data_of_another_case(checkpoint, tmp_path):
    """Through the Python API too (``load_from_checkpoint`` and a ``Trainer``): the module's
    setup compares the data with the settings its checkpoint stores."""
    from types import SimpleNamespace

    from captioner.config import ConfigError
    from captioner.data.parallel import ParallelTextDataModule
    from captioner.lit.translation import TranslationModule

    module = TranslationModule.load_from_checkpoint(checkpoint)
    module._trainer = SimpleNamespace(datamodule=ParallelTextDataModule(str(tmp_path),
                                                                         lowercase=False))
    with pytest.raises(ConfigError, match=r"the checkpoint was trained on data with lowercase "
                                          r"True \(this data: False\)"):
        module.setup("test")


def test_a_translation_fit_resumed_on_other_data_warns_of_both_vocabularies(checkpoint,
                                                                            tmp_path):
    """Captioning warned when a fit resumed on data whose words its checkpoint's vocabulary
    lacks (they train as ``<unk>``); translation imposed both vocabularies silently."""
    root = tmp_path / "other"
    root.mkdir()
    pairs = [*PAIRS, ("Ein Vogel singt.", "A bird sings.")]
    for split in ("train", "val", "test_2016_flickr"):
        (root / f"{split}.de").write_text("".join(f"{s}\n" for s, _ in pairs), encoding="utf-8")
        (root / f"{split}.en").write_text("".join(f"{t}\n" for _, t in pairs), encoding="utf-8")
    with pytest.warns(UserWarning) as caught:
        lightning_main([
            "fit", "--config", str(CONFIGS / "trainer" / "cpu.yaml"),
            "--config", str(CONFIGS / "data" / "multi30k_de_en.yaml"),
            "--config", str(CONFIGS / "model" / "multi30k_gru.yaml"),  # its trainer settings
            "--data.init_args.root", str(root), "--data.init_args.min_freq", "1",
            "--data.init_args.batch_size", "2", "--ckpt_path", str(checkpoint),
            "--trainer.max_epochs", str(EPOCHS + 1), "--trainer.limit_val_batches", "0",
            "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--trainer.enable_progress_bar", "false", "--seed_everything", "0"])
    said = [str(w.message) for w in caught if "the fit goes on with" in str(w.message)]
    assert len(said) == 2, said
    assert said[0].startswith(f"{checkpoint}: the fit goes on with the checkpoint's source "
                              "vocabulary (25 words)") and "'singt'" in said[0], said
    assert "2 words of this data's training sources" in said[0], said  # vogel, singt
    assert said[1].startswith(f"{checkpoint}: the fit goes on with the checkpoint's target "
                              "vocabulary (24 words)") and "'bird'" in said[1], said
