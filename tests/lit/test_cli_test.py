"""`captioner fit` then `captioner test` through LightningCLI: COCO-protocol metrics and results."""

import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from captioner.cli import lightning_main, main
from captioner.config import ConfigError
from captioner.inference import CheckpointError
from tests.conftest import SHAPES_SIZES

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def shapes_run(shapes_root: Path, tmp_path: Path, num_train: int, num_test: int,
               batch_size: int) -> list[str]:
    """Options shared by ``fit`` and ``test`` on the tiny shapes data (other sizes than the
    session's set are made in a folder of their own: regenerating ``shapes_root`` would change
    the data the other test files read)."""
    if (num_train, num_test) != (SHAPES_SIZES["num_train"], SHAPES_SIZES["num_test"]):
        shapes_root = shapes_root.parent / f"shapes_{num_train}_{num_test}"
    return [
        "--config", str(CONFIGS / "trainer" / "cpu.yaml"),
        "--config", str(CONFIGS / "data" / "shapes.yaml"),
        "--config", str(CONFIGS / "model" / "shapes_soft.yaml"),
        "--data.init_args.root", str(shapes_root),
        "--data.init_args.num_train", str(num_train), "--data.init_args.num_val", "6",
        "--data.init_args.num_test", str(num_test), "--data.init_args.image_size", "32",
        "--data.init_args.batch_size", str(batch_size),
        "--model.init_args.encoder.init_args.grid_size", "4",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
    ]


def last_checkpoint(cli) -> str:
    """``last.ckpt`` of a fit with configs/trainer/cpu.yaml: the unmonitored checkpoint."""
    (latest,) = [c for c in cli.trainer.checkpoint_callbacks if c.monitor is None]
    assert Path(latest.best_model_path).name == "last.ckpt"
    return latest.best_model_path


def test_fit_then_test_writes_coco_results_and_metrics(shapes_root, tmp_path):
    common = shapes_run(shapes_root, tmp_path, num_train=24, num_test=6, batch_size=8)
    fit = lightning_main(["fit", *common, "--trainer.max_epochs", "1"])
    ckpt = last_checkpoint(fit)
    assert Path(ckpt).is_file()
    test = lightning_main(["test", *common, "--ckpt_path", ckpt])
    out = Path(test.trainer.log_dir or test.trainer.default_root_dir)
    metrics = json.loads((out / "test_metrics.json").read_text())
    for key in ("bleu4", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert key in metrics and 0.0 <= metrics[key] <= 10.0
    if shutil.which("java"):
        assert "METEOR" in metrics
    # how the figures were obtained, as `captioner evaluate` records it
    assert metrics["tokenizer"] == ("ptb" if shutil.which("java") else "python")
    assert isinstance(metrics["skipped"], dict)  # part -> why (SPICE without its jars)
    assert ("METEOR" in metrics["skipped"]) == (shutil.which("java") is None)
    assert metrics["min_length"] == 1 and metrics["precision"] == "32-true"
    assert metrics["images"] == 6  # each test image once
    assert metrics["image_size"] == 32  # what the encoder read
    assert metrics["references_per_image"]["min"] >= 1
    results = json.loads((out / "test_captions.json").read_text())
    assert len(results) == 6  # every test image decoded exactly once
    gt = COCO(str(shapes_root / "annotations" / "captions_test.json"))
    res = gt.loadRes(str(out / "test_captions.json"))
    assert sorted(res.getImgIds()) == sorted(gt.getImgIds())
    files = {img["id"]: img["file_name"] for img in gt.dataset["images"]}
    assert all(Path(r["file_name"]).name == files[r["image_id"]] for r in results)
    assert (metrics["beam_size"], metrics["max_length"]) == (1, 20)  # the config's
    assert metrics["checkpoint"] == str(Path(ckpt).resolve())  # which checkpoint it scored
    # a second test into the same folder (the best after the last, say) replaced the first's
    # results silently: they are moved aside
    first = {name: (out / name).read_bytes() for name in ("test_metrics.json",
                                                           "test_captions.json")}
    second = lightning_main(["test", *common, "--ckpt_path", ckpt,
                             "--trainer.logger.init_args.version", out.name,
                             "--trainer.logger.init_args.name", out.parent.name,
                             "--trainer.logger.init_args.save_dir", str(out.parent.parent)])
    assert Path(second.trainer.log_dir) == out
    assert (out / "test_metrics.before-1.json").read_bytes() == first["test_metrics.json"]
    assert (out / "test_captions.before-1.json").read_bytes() == first["test_captions.json"]
    # a saved model config this version cannot parse: a warning, the config files' model
    ckpt_data = torch.load(ckpt, weights_only=True)
    ckpt_data["captioner"]["model_config"]["init_args"]["renamed_option"] = 3
    old = tmp_path / "old.ckpt"
    torch.save(ckpt_data, old)
    with pytest.warns(UserWarning, match="old.ckpt: its saved model config does not parse"):
        again = lightning_main(["test", *common, "--ckpt_path", str(old)])
    assert again.model.decoder.hidden_dim == 128


def test_test_builds_the_checkpoints_model_and_command_line_options_win(shapes_root, tmp_path):
    """With ``--ckpt_path`` the model is the checkpoint's (a hidden size and a learning rate
    given at fit time need not be repeated: the config file says 128 and 0.002), and an option
    given on the command line (``--model.init_args.beam_size 3``) still applies."""
    common = shapes_run(shapes_root, tmp_path, num_train=8, num_test=5, batch_size=4)
    fit = lightning_main(["fit", *common, "--trainer.max_epochs", "1",
                          "--model.init_args.decoder.init_args.hidden_dim", "20",
                          "--model.init_args.lr", "0.0123"])
    ckpt = last_checkpoint(fit)
    test = lightning_main(["test", *common, "--model.init_args.beam_size", "3",
                           "--model.init_args.max_length=7", "--model.init_args.beam_stop",
                           "exact", "--ckpt_path", ckpt])
    h = test.model.hparams
    assert (h.beam_size, h.max_length, h.beam_stop) == (3, 7, "exact")  # the command line's
    assert h.lr == 0.0123 and test.model.decoder.hidden_dim == 20  # the checkpoint's
    in_yaml = tmp_path / "ckpt.yaml"  # the checkpoint named in a config file instead
    in_yaml.write_text(f"ckpt_path: {ckpt}\n")
    again = lightning_main(["test", *common, "--config", str(in_yaml)])
    assert again.model.decoder.hidden_dim == 20
    torch.testing.assert_close(test.model.decoder.lstm.weight_hh,
                               fit.model.decoder.lstm.weight_hh)  # its weights
    out = Path(test.trainer.log_dir or test.trainer.default_root_dir)
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert (metrics["beam_size"], metrics["max_length"], metrics["beam_stop"]) == (3, 7, "exact")
    results = json.loads((out / "test_captions.json").read_text())
    assert max(len(r["caption"].split()) for r in results) <= 7


def test_model_options_are_picked_from_a_command_line():
    from captioner.cli import _model_options

    argv = ["test", "--config", "a.yaml", "--model.init_args.beam_size", "5", "--data.x", "1",
            "--model.init_args.max_length=9", "--model", "m.yaml", "--ckpt_path", "c.ckpt",
            "--modelx", "2"]
    assert _model_options(argv) == ["--model.init_args.beam_size", "5",
                                    "--model.init_args.max_length=9", "--model", "m.yaml"]
    assert _model_options(["fit", "--model.init_args.lr"]) == ["--model.init_args.lr"]


def test_unreadable_checkpoint_is_a_clear_error(shapes_root, tmp_path):
    common = shapes_run(shapes_root, tmp_path, num_train=8, num_test=5, batch_size=4)
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match=r"truncated\.ckpt: not a checkpoint file \(not a "):
        lightning_main(["test", *common, "--ckpt_path", str(bad)])
    torch.save([1, 2], tmp_path / "list.ckpt")
    with pytest.raises(CheckpointError, match=r"list\.ckpt: not a checkpoint \(a list\)"):
        lightning_main(["test", *common, "--ckpt_path", str(tmp_path / "list.ckpt")])


def test_test_needs_no_model_config_with_a_checkpoint(shapes_root, tmp_path):
    """Trainer and data configs only: the model class and config come from the checkpoint."""
    common = shapes_run(shapes_root, tmp_path, num_train=8, num_test=5, batch_size=4)
    fit = lightning_main(["fit", *common, "--trainer.max_epochs", "1",
                          "--model.init_args.decoder.init_args.hidden_dim", "18"])
    ckpt = last_checkpoint(fit)
    no_model = [  # the trainer and data parts of `common` only
        "--config", str(CONFIGS / "trainer" / "cpu.yaml"),
        "--config", str(CONFIGS / "data" / "shapes.yaml"),
        "--data.init_args.root", common[common.index("--data.init_args.root") + 1],
        "--data.init_args.num_train", "8",
        "--data.init_args.num_val", "6", "--data.init_args.num_test", "5",
        "--data.init_args.image_size", "32", "--data.init_args.batch_size", "4",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "false",
    ]
    test = lightning_main(["test", *no_model, "--model.init_args.beam_size", "2",
                           "--ckpt_path", ckpt])
    assert type(test.model).__name__ == "CaptioningModule"
    assert test.model.decoder.hidden_dim == 18 and test.model.hparams.beam_size == 2
    assert list(test.model.encoder.grid_size) == [4, 4]  # the checkpoint's, not a default
    torch.testing.assert_close(test.model.decoder.L_o.weight, fit.model.decoder.L_o.weight)
    # an architecture option over the stored config: weights of other shapes, named in one
    # error (was torch's load_state_dict traceback)
    with pytest.raises(CheckpointError, match=re.escape(
            f"{ckpt}: the checkpoint's weights do not fit the model as configured (decoder.")
            + r".*\(\d+, 18\) in the checkpoint, \(\d+, 7\) here"):
        lightning_main(["test", *no_model, "--ckpt_path", ckpt,
                        "--model.init_args.decoder.init_args.hidden_dim", "7"])
    # data whose own vocabulary would differ (min_freq 50 keeps only the specials and a few
    # words): the checkpoint's vocabulary is imposed on it, instead of a size-mismatch error
    options = {k: v for k, v in fit.datamodule.hparams.items() if not k.startswith("_")}
    assert fit.datamodule.vocab != type(fit.datamodule)(**{**options, "min_freq": 50}).vocab
    other = lightning_main(["test", *no_model, "--data.init_args.min_freq", "50",
                            "--ckpt_path", ckpt])
    assert other.model.vocab == other.datamodule.vocab == fit.model.vocab
    with pytest.raises(CheckpointError, match=r"gone\.ckpt: checkpoint not found"):
        lightning_main(["test", *no_model, "--ckpt_path", str(tmp_path / "gone.ckpt")])


def test_ckpt_path_option_and_whether_a_model_is_given(tmp_path):
    from captioner.cli import _ckpt_path_option, _gives_model, _with_model_first

    data, model = tmp_path / "data.yaml", tmp_path / "model.yaml"
    data.write_text("data:\n  class_path: x\n")
    model.write_text("model:\n  class_path: y\n")
    argv = ["test", "--ckpt_path", "a.ckpt", "--x", "1", "--ckpt_path=b.ckpt"]
    assert _ckpt_path_option(argv) == "b.ckpt" and _ckpt_path_option(["test"]) is None
    in_file = tmp_path / "ckpt.yaml"
    in_file.write_text("ckpt_path: c.ckpt\n")
    # the last setting wins, a config file's as a command line option's
    assert _ckpt_path_option([*argv, "-c", str(in_file), "--config", str(data)]) == "c.ckpt"
    assert _ckpt_path_option(["test", f"--config={in_file}", "--ckpt_path", "d.ckpt"]) == "d.ckpt"
    cancel = tmp_path / "null.yaml"
    cancel.write_text("ckpt_path: null\n")  # LightningCLI parses no checkpoint: neither do we
    assert _ckpt_path_option(["test", "--ckpt_path", "d.ckpt", "--config", str(cancel)]) is None
    root = tmp_path / "root.yaml"  # given before the subcommand: the subcommand's section
    root.write_text("test:\n  ckpt_path: e.ckpt\nfit:\n  ckpt_path: f.ckpt\n")
    assert _ckpt_path_option(["--config", str(root), "test", "--config", str(data)]) == "e.ckpt"
    assert _ckpt_path_option(["--config", str(root), "test", "--ckpt_path", "g.ckpt"]) == "g.ckpt"
    assert not _gives_model(["test", "--config", str(data), "--model.init_args.beam_size", "3"])
    assert _gives_model(["test", "--config", str(data), "-c", str(model)])
    assert _gives_model(["test", "--model", "m.yaml"])
    injected = _with_model_first(["test", "--config", str(data)],
                                 {"class_path": "C", "init_args": {"lr": 0.1}})
    assert injected[:2] == ["test", "--model"] and injected[3:] == ["--config", str(data)]
    assert json.loads(injected[2]) == {"class_path": "C", "init_args": {"lr": 0.1}}


def test_saved_model_config_leaves_the_vocabulary_size_to_the_data(tmp_path):
    from captioner.cli import _checkpoint_meta, _saved_model_config

    ckpt = tmp_path / "m.ckpt"
    torch.save({"captioner": {"model_config": {"class_path": "C", "init_args": {
        "vocab_size": 9, "lr": 0.1}}}}, ckpt)
    assert _saved_model_config(_checkpoint_meta(str(ckpt))) == {"class_path": "C",
                                                               "init_args": {"lr": 0.1}}
    torch.save({"captioner": {}}, tmp_path / "bare.ckpt")
    assert _saved_model_config(_checkpoint_meta(str(tmp_path / "bare.ckpt"))) is None
    assert _checkpoint_meta("last") is None  # Lightning resolves these names itself
    with pytest.raises(CheckpointError, match="missing.ckpt: checkpoint not found"):
        _checkpoint_meta(str(tmp_path / "missing.ckpt"))


def test_a_config_file_that_is_not_yaml_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epochs: [1, 2\n  foo: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml line 3, column 6: not valid YAML"):
        lightning_main(["fit", "--config", str(CONFIGS / "trainer" / "cpu.yaml"),
                        f"--config={bad}"])


def test_config_and_checkpoint_mistakes_exit_2_in_one_line(tmp_path, capsys):
    """A config that is not YAML, a missing, unreadable or non-captioner checkpoint: usage or
    configuration errors, exit status 2 with one line naming the file (they exited 1 with the
    bare message, unlike the tools' answer to the same mistakes)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epochs: [1, 2\n")
    (tmp_path / "truncated.ckpt").write_bytes(b"PK\x03\x04 cut")
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")  # Lightning's, not captioner's
    trainer = str(CONFIGS / "trainer" / "cpu.yaml")
    cases = [(["fit", "--config", str(bad)], r"bad\.yaml line \d+, column \d+: not valid YAML"),
             (["validate", "--config", trainer, "--ckpt_path", str(tmp_path / "gone.ckpt")],
              r"gone\.ckpt: checkpoint not found"),
             (["test", "--config", trainer, "--ckpt_path", str(tmp_path / "truncated.ckpt")],
              r"truncated\.ckpt: not a checkpoint file"),
             (["validate", "--config", trainer, "--ckpt_path", str(tmp_path / "plain.ckpt")],
              r"plain\.ckpt: not a captioner checkpoint .*only checkpoints written by captioner")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"captioner {argv[0]}: "), err
        assert re.search(message, err), err


def test_last_checkpoint_is_the_latest_epoch_best_the_best(shapes_root, tmp_path):
    """configs/trainer/cpu.yaml: ``last.ckpt`` holds the latest epoch even when the score did
    not improve (``save_last`` on the monitored callback would leave it at the best epoch, so
    a resume would redo epochs), ``best-*.ckpt`` the best epoch by val/bleu4."""
    common = shapes_run(shapes_root, tmp_path, num_train=8, num_test=5, batch_size=4)
    fit = lightning_main(["fit", *common, "--trainer.max_epochs", "3", "--model.init_args.lr",
                          "0.0", "--model.init_args.encoder.init_args.freeze", "true"])
    # nothing learns (lr 0, frozen batch norm): every epoch scores the same, the first stays best
    best = torch.load(fit.trainer.checkpoint_callback.best_model_path, weights_only=True)
    last = torch.load(last_checkpoint(fit), weights_only=True)
    assert last["epoch"] == 2 and best["epoch"] == 0



def test_a_fit_resumed_on_data_with_another_vocabulary_warns(shapes_root, tmp_path, recwarn):
    """Resuming on other data trained silently with the checkpoint's vocabulary (the other
    data's new words as ``<unk>``); the same data resumes without the warning. The checkpoint
    keeps words seen 3 times; the resumed data's own vocabulary every word."""
    common = shapes_run(shapes_root, tmp_path, num_train=8, num_test=5, batch_size=4)
    first = lightning_main(["fit", *common, "--trainer.max_epochs", "1",
                            "--data.init_args.min_freq", "3"])
    ckpt, vocab = last_checkpoint(first), first.datamodule.vocab
    lightning_main(["fit", *common, "--trainer.max_epochs", "2", "--ckpt_path", ckpt,
                    "--data.init_args.min_freq", "3"])
    assert not [w for w in recwarn if "vocabulary" in str(w.message)]
    with pytest.warns(UserWarning) as caught:
        resumed = lightning_main(["fit", *common, "--trainer.max_epochs", "3", "--ckpt_path",
                                  ckpt, "--data.init_args.min_freq", "1"])
    message = next(str(w.message) for w in caught if "vocabulary" in str(w.message))
    assert resumed.datamodule.vocab == vocab  # imposed
    from collections import Counter

    from captioner.data.tokenize import tokenize

    counts = Counter(w for r in resumed.datamodule.records("train") for c in r.captions
                     for w in tokenize(c))
    new = sorted((w for w in counts if w not in vocab.stoi), key=lambda w: (-counts[w], w))
    share = sum(counts[w] for w in new) / sum(counts.values())
    assert new and all(counts[w] < 3 for w in new)  # the words min_freq 3 left out
    assert message.startswith(f"{ckpt}: the fit goes on with the checkpoint's vocabulary "
                              f"({len(vocab)} words)"), message
    assert (f"{len(new)} words of this data's training captions ({share:.1%} of their tokens; "
            f"most frequent: {new[0]!r}") in message, message


def test_the_folders_ckpt_path_last_searches(tmp_path, monkeypatch):
    """Where ``--ckpt_path last`` looks, as Lightning writes: a callback's ``dirpath`` (``~``
    expanded; callbacks given as one dict too), a logger ``name`` of ``""`` (no name folder),
    ``default_root_dir/checkpoints`` without a logger; nothing to search is said so."""
    from captioner.cli import _gives_model, _last_checkpoint
    from captioner.config import ConfigError

    def ckpt(path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        return str(path)

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    one = {"class_path": "captioner.lit.callbacks.ResumableCheckpoint",
           "init_args": {"dirpath": "~/ckpts", "filename": "last"}}
    expected = ckpt(tmp_path / "home" / "ckpts" / "last.ckpt")
    assert _last_checkpoint({"callbacks": one}) == expected
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(tmp_path / "runs"), "name": "", "version": 3}}
    expected = ckpt(tmp_path / "runs" / "version_3" / "checkpoints" / "last.ckpt")
    assert _last_checkpoint({"logger": logger}) == expected
    expected = ckpt(tmp_path / "r" / "checkpoints" / "last-v1.ckpt")
    assert _last_checkpoint({"logger": False, "default_root_dir": str(tmp_path / "r")}) == expected
    with pytest.raises(ConfigError, match="writes no checkpoints"):
        _last_checkpoint({"enable_checkpointing": False, "callbacks": []})
    # a model in a config file given before the subcommand, in that subcommand's section only
    root = tmp_path / "root.yaml"
    root.write_text("fit:\n  model:\n    class_path: x.Y\n  ckpt_path: last\n")
    assert _gives_model(["--config", str(root), "fit"])
    assert not _gives_model(["--config", str(root), "test", "--ckpt_path", "x.ckpt"])
    # two callbacks writing to the logger's one folder: named once
    both = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"},
            {"class_path": "captioner.lit.callbacks.ResumableCheckpoint"}]
    empty = {"class_path": "lightning.pytorch.loggers.CSVLogger",
             "init_args": {"save_dir": str(tmp_path / "none"), "version": "v"}}
    with pytest.raises(ConfigError, match=r"in [^,]*v.checkpoints; give"):
        _last_checkpoint({"callbacks": both, "logger": empty}, "test")


def test_plateau_schedule_steps_at_validation_and_is_saved(shapes_root, tmp_path):
    """``lr_scheduler: plateau`` is stepped with each validation's val/bleu4, before the
    checkpoint of that validation is written (so resuming from it keeps the LR cut that was
    due), and epochs without validation need no metric (check_val_every_n_epoch 2 crashed:
    "ReduceLROnPlateau conditioned on metric val/bleu4 which is not available")."""
    common = shapes_run(shapes_root, tmp_path, num_train=8, num_test=5, batch_size=4)
    fit = lightning_main(["fit", *common, "--trainer.max_epochs", "4",
                          "--trainer.check_val_every_n_epoch", "2",
                          "--model.init_args.lr_scheduler", "plateau",
                          "--model.init_args.plateau_patience", "0"])
    scheduler = fit.model.lr_schedulers()
    assert scheduler.last_epoch == 2  # two validations (after epochs 2 and 4)
    saved = torch.load(last_checkpoint(fit), weights_only=True)["lr_schedulers"][0]
    assert saved["last_epoch"] == 2 and saved["_last_lr"] == scheduler.get_last_lr()


def test_checkpoint_values_lightning_resolves_are_left_to_it():
    from captioner.cli import _checkpoint_meta

    for value in ("last", "best", "null", "None", "s3://bucket/run/last.ckpt",
                  "registry:model:latest"):
        assert _checkpoint_meta(value) is None, value


def test_integer_batch_counts_stay_integers(shapes_root, tmp_path, capsys):
    """LightningCLI read ``limit_val_batches: 1`` as 1.0, i.e. all batches (Lightning #21259);
    the integer given, in a config file or on the command line, reaches the Trainer, and the
    config that ``--print_config`` prints (and the run saves) keeps it an integer, so that
    running that config again limits the batches alike."""
    import io
    from contextlib import redirect_stdout

    import yaml

    config = tmp_path / "limits.yaml"
    config.write_text("trainer:\n  limit_val_batches: 1\n  limit_test_batches: 2\n")
    argv = [*shapes_run(shapes_root, tmp_path, 12, 4, 4), "--config", str(config),
            "--trainer.limit_train_batches", "1", "--trainer.limit_test_batches", "0.5"]
    cli = lightning_main(argv, run=False)
    assert cli.trainer.limit_val_batches == 1 and isinstance(cli.trainer.limit_val_batches, int)
    assert isinstance(cli.trainer.limit_train_batches, int)
    assert cli.trainer.limit_test_batches == 0.5
    # settings are read in order: a later config file's fraction wins over an earlier int
    fraction = tmp_path / "fraction.yaml"
    fraction.write_text("trainer:\n  limit_val_batches: 0.25\n")
    later = [*shapes_run(shapes_root, tmp_path, 12, 4, 4), "--trainer.limit_val_batches", "3",
             "--config", str(fraction)]
    assert lightning_main(later, run=False).trainer.limit_val_batches == 0.25

    printed = io.StringIO()
    with redirect_stdout(printed), pytest.raises(SystemExit):
        lightning_main(["fit", *argv, "--print_config"])
    trainer = yaml.safe_load(printed.getvalue())["trainer"]
    assert (trainer["limit_val_batches"], trainer["limit_train_batches"],
            trainer["limit_test_batches"]) == (1, 1, 0.5)
    assert isinstance(trainer["limit_val_batches"], int)



def test_a_constructor_refusing_a_value_is_one_line_with_status_2(shapes_root, tmp_path, capsys,
                                                                  monkeypatch):
    """An unknown backbone, weights name or a bad grid size: the constructors' messages are
    clear, but came after two tracebacks and jsonargparse's union report, with status 1."""
    common = shapes_run(shapes_root, tmp_path, 12, 4, 4)
    encoder = "--model.init_args.encoder.init_args."
    cases = [([f"{encoder}backbone", "efficientnet_lit0"], "unknown backbone 'efficientnet_lit0'; "
              "available: efficientnet_lite0"),
             ([f"{encoder}grid_size", "-3"], "grid_size must be H or (H, W) with H, W >= 1, got -3"),
             ([f"{encoder}weights", "IMAGENET1K_V9"],
              "shapes_cnn has no pretrained weights; use weights: null")]
    for options, says in cases:
        assert main(["fit", *common, *options]) == 2, options
        err = capsys.readouterr().err
        assert "Traceback" not in err and "Union" not in err, err
        assert err.strip().splitlines()[-1].startswith(
            f"captioner fit: cannot build the model or data from the config: {says}"), err
    # anything else a constructor raises (jsonargparse re-raises it as a ValueError too) is a
    # bug or an environment problem: it keeps its traceback
    from captioner.encoders import ImageEncoder

    def broken(self, *args, **kwargs):
        raise RuntimeError("a bug in a constructor")

    monkeypatch.setattr(ImageEncoder, "__init__", broken)
    with pytest.raises(ValueError) as raised:
        main(["fit", *common])
    chain, error = [], raised.value
    while error is not None:
        chain.append(error)
        error = error.__cause__
    assert any(isinstance(e, RuntimeError) and "a bug in" in str(e) for e in chain), chain


def test_an_interrupted_lightning_command_exits_130_as_the_tools(monkeypatch):
    """Ctrl-C in ``fit``: Lightning shuts down gracefully, ignores SIGINT and exits 1; the
    command exits 130 (README), and SIGINT is handled again afterwards. The interrupt goes
    through Lightning's own handler (``_call_and_handle_interrupt``) on a real trainer."""
    import signal

    import lightning.pytorch as pl
    from lightning.pytorch.trainer.call import _call_and_handle_interrupt

    import captioner.cli as cli

    def interrupted(argv):
        trainer = pl.Trainer(logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)

        def fit():
            raise KeyboardInterrupt

        _call_and_handle_interrupt(trainer, fit)

    def failed(argv):  # a SystemExit(1) inside the trainer's function: not Ctrl-C
        trainer = pl.Trainer(logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)

        def fit():
            raise SystemExit(1)

        _call_and_handle_interrupt(trainer, fit)

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(cli, "lightning_main", interrupted)
    assert cli.main(["fit"]) == 130
    assert signal.getsignal(signal.SIGINT) is before  # not left ignored
    monkeypatch.setattr(cli, "lightning_main", failed)  # an exit 1 of another cause stays 1
    with pytest.raises(SystemExit) as e:
        cli.main(["fit"])
    assert e.value.code == 1


@pytest.mark.parametrize("mode, expected", [("soft", 1.0), ("hard", 0.0)])
def test_the_cli_records_the_doubly_stochastic_weight_used(shapes_root, tmp_path, mode, expected):
    """LightningCLI hands the config's values to ``save_hyperparameters``: the option left
    unset (None) reached the loss as None (a TypeError in every fit without it)."""
    common = shapes_run(shapes_root, tmp_path, 12, 4, 4)
    cli = lightning_main([*common, "--model.init_args.doubly_stochastic", "null",
                          "--model.init_args.decoder.init_args.attention_mode", mode], run=False)
    assert cli.model.hparams.doubly_stochastic == expected
    assert cli.model.hparams_initial.doubly_stochastic == expected

def test_a_misspelled_option_is_named_without_pages_of_usage(shapes_root, tmp_path, capsys):
    common = shapes_run(shapes_root, tmp_path, 12, 4, 4)
    with pytest.raises(SystemExit) as e:
        lightning_main(["fit", *common, "--model.init_args.beamsize", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Option 'beamsize' is not accepted" in err and "--help" in err
    assert "usage:" not in err and len(err.splitlines()) < 20



def test_a_misspelled_option_in_a_config_file_names_the_file_and_line(tmp_path, capsys):
    """jsonargparse names the option, not the file, after a report of every type the section
    could have been; the error now starts with the file and line of each such option."""
    import yaml

    model = yaml.safe_load((CONFIGS / "model" / "shapes_soft.yaml").read_text())
    model["model"]["init_args"]["decoder"]["init_args"]["embd_dim"] = 8
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump(model, sort_keys=False))
    line = [i for i, text in enumerate(typo.read_text().splitlines(), 1)
            if text.strip() == "embd_dim: 8"][0]
    with pytest.raises(SystemExit) as e:
        lightning_main(["fit", "--config", str(CONFIGS / "trainer" / "cpu.yaml"),
                        "--config", str(CONFIGS / "data" / "shapes.yaml"), f"--config={typo}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {typo} line {line}: option 'embd_dim' is not accepted\n" in err, err
    # an option valid in another section is not blamed there (the decoder's hidden_dim in the
    # model file), and a dotted one is found at its path (-c: LightningCLI's short --config)
    data = yaml.safe_load((CONFIGS / "data" / "shapes.yaml").read_text())
    data["data"]["init_args"]["hidden_dim"] = 4
    data["trainer"] = {"max_epoks": 3}
    for wrong, says in [({"data": data["data"]}, "option 'hidden_dim' is not accepted"),
                        ({"trainer": data["trainer"]}, "option 'max_epoks' is not accepted")]:
        typo.write_text(yaml.safe_dump(wrong, sort_keys=False))
        line = [i for i, text in enumerate(typo.read_text().splitlines(), 1)
                if text.strip().startswith(says.split("'")[1] + ":")][0]
        with pytest.raises(SystemExit):
            lightning_main(["fit", "-c", str(CONFIGS / "trainer" / "cpu.yaml"), "--config",
                            str(CONFIGS / "model" / "shapes_soft.yaml"), "-c", str(typo)])
        err = capsys.readouterr().err
        assert f"error: {typo} line {line}: {says}\n" in err, err
        assert "shapes_soft.yaml line" not in err, err

def test_config_files_given_by_relative_paths_are_named_too(tmp_path, capsys, monkeypatch):
    """The README's commands give ``--config configs/...`` relative paths, and jsonargparse
    enters a config's folder while it parses a nested section: the files were then not found
    and no file or line was named. A nested option's wrong value was also quoted with the
    rest of jsonargparse's message (``"sigmoid. Got value: Namespace(...)"``)."""
    import yaml

    (tmp_path / "sub").mkdir()
    model = yaml.safe_load((CONFIGS / "model" / "shapes_soft.yaml").read_text())
    decoder = model["model"]["init_args"]["decoder"]["init_args"]
    monkeypatch.chdir(tmp_path)
    for change, says in [
            (("attention", {"class_path": "captioner.attention.AdditiveAtention"}),
             "class_path 'captioner.attention.AdditiveAtention' cannot be imported"),
            (("gate", "sigmoid"), "gate 'sigmoid' is not one of 'scalar', 'vector', 'none'\n")]:
        (tmp_path / "sub" / "bad.yaml").write_text(
            yaml.safe_dump({"model": {**model["model"], "init_args": {
                **model["model"]["init_args"], "decoder": {
                    **model["model"]["init_args"]["decoder"],
                    "init_args": {**decoder, change[0]: change[1]}}}}}, sort_keys=False))
        given = ("class_path: captioner.attention.AdditiveAtention" if change[0] == "attention"
                 else "gate: sigmoid")
        line = next(i for i, t in enumerate(
            (tmp_path / "sub" / "bad.yaml").read_text().splitlines(), 1) if t.strip() == given)
        with pytest.raises(SystemExit) as e:
            lightning_main(["fit", "-c", str(CONFIGS / "trainer" / "cpu.yaml"),
                            "-c", str(CONFIGS / "data" / "shapes.yaml"), "-c", "sub/bad.yaml"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"error: sub/bad.yaml line {line}: {says}" in err, err


def test_an_option_a_nested_class_does_not_take_is_named_though_another_section_has_it(
        tmp_path, capsys):
    """``batch_size: 3`` under the decoder's init_args (the data section has a batch_size):
    jsonargparse names the class after the option, in the value it quotes, and the error had
    no file or line (the key was not unique across the files)."""
    import yaml

    model = yaml.safe_load((CONFIGS / "model" / "shapes_soft.yaml").read_text())
    model["model"]["init_args"]["decoder"]["init_args"]["batch_size"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(model, sort_keys=False))
    line = next(i for i, t in enumerate(bad.read_text().splitlines(), 1)
                if t.strip() == "batch_size: 3")
    with pytest.raises(SystemExit) as e:
        lightning_main(["fit", "-c", str(CONFIGS / "trainer" / "cpu.yaml"),
                        "-c", str(CONFIGS / "data" / "shapes.yaml"), "-c", str(bad)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {bad} line {line}: option 'batch_size' is not accepted\n" in err, err
    assert "shapes.yaml line" not in err, err
    # given by an override file without class_path (jsonargparse then quotes init_args before
    # the class): the data config's valid batch_size was blamed; now no file is, wrongly
    override = tmp_path / "override.yaml"
    override.write_text("model:\n  init_args:\n    decoder:\n      init_args:\n"
                        "        batch_size: 4\n")
    with pytest.raises(SystemExit):
        lightning_main(["fit", "-c", str(CONFIGS / "trainer" / "cpu.yaml"),
                        "-c", str(CONFIGS / "data" / "shapes.yaml"),
                        "-c", str(CONFIGS / "model" / "shapes_soft.yaml"), "-c", str(override)])
    err = capsys.readouterr().err
    assert 'error: Parser key "model":' in err and " line " not in err, err


def test_a_wrong_class_path_or_choice_in_a_config_file_names_the_file_and_line(tmp_path, capsys):
    """A ``class_path`` that cannot be imported and a value outside an option's ``Literal``
    choices were reported 8-15 lines down jsonargparse's union report; the error now starts
    with the file, line and reason (and the closest class name of the module, if any)."""
    import yaml

    def first_error_line(model: dict, data: Path = CONFIGS / "data" / "shapes.yaml") -> str:
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(model, sort_keys=False))
        with pytest.raises(SystemExit) as e:
            lightning_main(["fit", "-c", str(CONFIGS / "trainer" / "cpu.yaml"),
                            "-c", str(data), "-c", str(bad)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        return next(line for line in err.splitlines() if line.startswith("error: "))

    def line_of(text: str) -> int:
        lines = (tmp_path / "bad.yaml").read_text().splitlines()
        return [i for i, t in enumerate(lines, 1) if t.strip() == text][0]

    bad = tmp_path / "bad.yaml"
    model = yaml.safe_load((CONFIGS / "model" / "shapes_soft.yaml").read_text())
    attention = model["model"]["init_args"]["decoder"]["init_args"]["attention"]
    attention["class_path"] = "captioner.attention.AdditiveAttentio"
    got = first_error_line(model)
    line = line_of("class_path: captioner.attention.AdditiveAttentio")
    assert got == (f"error: {bad} line {line}: class_path 'captioner.attention.AdditiveAttentio'"
                   " cannot be imported (module 'captioner.attention' has no attribute "
                   "'AdditiveAttentio'); did you mean "
                   "'captioner.attention.AdditiveAttention'?"), got
    attention["class_path"] = "nosuchpkg.Attention"  # no module: no suggestion
    got = first_error_line(model)
    assert got == (f"error: {bad} line {line_of('class_path: nosuchpkg.Attention')}: class_path "
                   "'nosuchpkg.Attention' cannot be imported (No module named 'nosuchpkg')"), got
    attention["class_path"] = "captioner.attention.AdditiveAttention"
    model["model"]["class_path"] = "captioner.lit.captioning.CaptioningModul"  # a section's own
    got = first_error_line(model)
    assert got.startswith(f"error: {bad} line 2: class_path 'captioner.lit.captioning."
                          "CaptioningModul' cannot be imported"), got
    assert got.endswith("did you mean 'captioner.lit.captioning.CaptioningModule'?"), got

    nonlocal_model = yaml.safe_load((CONFIGS / "model" / "shapes_nonlocal.yaml").read_text())
    stage = nonlocal_model["model"]["init_args"]["encoder"]["init_args"]["stages"][0]
    stage["init_args"]["pairwise"] = "gausian"
    got = first_error_line(nonlocal_model)
    assert got == (f"error: {bad} line {line_of('pairwise: gausian')}: pairwise 'gausian' is not "
                   "one of 'gaussian', 'embedded_gaussian', 'dot_product', 'concatenation'"), got
    # the wrong value is blamed where it is given: not on a file holding a valid one, and in
    # a file that overrides another's init_args without a class_path
    soft = yaml.safe_load((CONFIGS / "model" / "shapes_soft.yaml").read_text())
    soft["model"]["init_args"]["lr_scheduler"] = "none"
    bad.write_text(yaml.safe_dump(soft, sort_keys=False))
    with pytest.raises(SystemExit):  # the wrong value on the command line: no file blamed
        lightning_main(["fit", "-c", str(CONFIGS / "trainer" / "cpu.yaml"), "-c",
                        str(CONFIGS / "data" / "shapes.yaml"), "-c", str(bad),
                        "--model.init_args.lr_scheduler", "plateu"])
    err = capsys.readouterr().err
    assert 'error: Parser key "model":' in err and " line " not in err, err
    override = tmp_path / "override.yaml"
    override.write_text("model:\n  init_args:\n    lr_scheduler: plateu\n")
    with pytest.raises(SystemExit):
        lightning_main(["fit", "-c", str(CONFIGS / "trainer" / "cpu.yaml"), "-c",
                        str(CONFIGS / "data" / "shapes.yaml"), "-c", str(bad), "-c",
                        str(override)])
    err = capsys.readouterr().err
    assert (f"error: {override} line 3: lr_scheduler 'plateu' is not one of 'none', "
            "'plateau'\n") in err and f"{bad} line" not in err, err
    soft["model"]["init_args"]["lr_scheduler"] = False  # a value that prints otherwise (False)
    got = first_error_line(soft)
    assert got.startswith(f"error: {bad} line {line_of('lr_scheduler: false')}: lr_scheduler "
                          "'False' is not one of"), got
    # an option of a nested class, not accepted: found in the class's own init_args, not in
    # an override file's init_args of another section (which only hid it, being a 2nd match)
    soft["model"]["init_args"]["lr_scheduler"] = "none"
    soft["model"]["init_args"]["decoder"]["init_args"]["min_freq"] = 2
    override.write_text("data:\n  init_args:\n    min_freq: 1\n")
    bad.write_text(yaml.safe_dump(soft, sort_keys=False))
    with pytest.raises(SystemExit):
        lightning_main(["fit", "-c", str(CONFIGS / "trainer" / "cpu.yaml"), "-c",
                        str(CONFIGS / "data" / "shapes.yaml"), "-c", str(bad), "-c",
                        str(override)])
    err = capsys.readouterr().err
    assert f"error: {bad} line {line_of('min_freq: 2')}: option 'min_freq' is not accepted" \
        in err and f"{override} line" not in err, err


def test_test_refuses_a_data_config_that_puts_training_images_in_the_split(
        capsys, tiny_checkpoint, tmp_path) -> None:
    """``captioner test --ckpt_path`` with a data config of another ``split_seed`` than the
    checkpoint was trained with draws another test split, holding training images: refused
    (naming one) as ``captioner evaluate --config`` refuses it, run only with
    ``--allow_training_images true`` and then recorded in ``test_metrics.json``; the stored
    split settings (a loader option aside) pass, and ``validate`` is checked alike. The
    checkpoint comes from a plain ``Trainer`` (the Python API): it tests without a model config
    file, from the model config captioner saved (Lightning's own parse of its
    ``hyper_parameters`` failed on it)."""
    import logging

    from captioner.cli import main
    from tests.conftest import red_squares_checkpoint

    trained, images = red_squares_checkpoint(tiny_checkpoint, tmp_path)

    def run_with(argv: list[str], out: Path) -> tuple[int, str, dict | None]:
        logging.disable(logging.INFO)  # Lightning's "Seed set" goes to an older capture
        try:
            status = main([*argv, "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                           "--trainer.enable_progress_bar", "false",
                           "--trainer.default_root_dir", str(out)])
        finally:
            logging.disable(logging.NOTSET)
        err = capsys.readouterr().err
        metrics = out / "test_metrics.json"
        return status, err, json.loads(metrics.read_text()) if metrics.is_file() else None

    def run(command: str, seed: int, *extra: str) -> tuple[int, str, dict | None]:
        return run_with([command, "--config", str(tmp_path / f"seed{seed}.yaml"),
                         "--ckpt_path", str(trained), *extra],
                        tmp_path / f"{command}_{seed}_{len(extra)}")

    for command in ("test", "validate"):
        status, err, metrics = run(command, 1)
        split = "test" if command == "test" else "val"
        assert status == 2 and f"captioner {command}: " in err, err
        assert f"{split} images are in the checkpoint's training split (e.g. {images}" in err
        assert "--allow_training_images true" in err and metrics is None
    status, err, metrics = run("test", 1, "--allow_training_images", "true")
    assert status == 0, err
    overlap = metrics["training_images_in_split"]
    assert overlap["checked"] and 0 < overlap["images"] <= metrics["images"]
    assert Path(overlap["example"]).parent == images
    status, err, metrics = run("test", 0)
    assert status == 0, err
    assert metrics["training_images_in_split"] == {
        "checked": True, "images": 0, "example": None,
        "reason": "the same split settings as the checkpoint's"}

    # the checkpoint named by a config file's ckpt_path (Lightning's hparams parse failed on
    # it there too), and stored data settings found only in Lightning's own
    # datamodule_hyper_parameters (as evaluate reads them): still refused
    ckpt = torch.load(trained, weights_only=True)
    data = ckpt["captioner"]["data"].pop("datamodule")
    ckpt["datamodule_hyper_parameters"] = {**data["init_args"], "_class_path": data["class_path"]}
    lightning_only = tmp_path / "lightning_only.ckpt"
    torch.save(ckpt, lightning_only)
    (tmp_path / "ckpt.yaml").write_text(f"ckpt_path: {lightning_only}\n")
    status, err, _ = run_with(["test", "--config", str(tmp_path / "ckpt.yaml"), "--config",
                               str(tmp_path / "seed1.yaml")], tmp_path / "from_yaml")
    assert status == 2 and "test images are in the checkpoint's training split" in err, err


def test_overlap_counts_only_what_the_config_change_brings(tmp_path) -> None:
    """Images that the stored data config itself puts in both the training and the evaluated
    split (a Karpathy file listing them twice) are in the data: changing an option that does
    not define the split (``image_size``) must not count them as training images, while an
    image that another annotation file moves from training to test still counts."""
    from captioner.commands.common import training_overlap

    images = tmp_path / "images"
    images.mkdir()
    for i in range(10):
        Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(images / f"{i}.jpg")

    def karpathy(name: str, splits: list[tuple[int, str]]) -> str:
        entries = [{"filename": f"{i}.jpg", "split": split, "imgid": n,
                    "sentences": [{"raw": f"a red square {i}"}]}
                   for n, (i, split) in enumerate(splits)]
        (tmp_path / name).write_text(json.dumps({"images": entries}))
        return str(tmp_path / name)

    shared = [(0, "train"), (0, "test"), (1, "train"), (1, "test")]
    stored_file = karpathy("stored.json", [*shared, *[(i, "train") for i in range(2, 8)],
                                           (8, "test"), (9, "test")])
    moved_file = karpathy("moved.json", [*shared, *[(i, "train") for i in (2, 4, 5, 6, 7)],
                                         (3, "test"), (8, "test"), (9, "test")])

    def config(file: str, size: int) -> dict:
        return {"class_path": "captioner.data.datamodule.CaptionDataModule",
                "init_args": {"format": "karpathy", "annotations": file,
                              "image_root": str(images), "image_size": size, "min_freq": 1}}

    def test_split(cfg: dict) -> list:
        from captioner.commands.common import instantiate_data_config

        with pytest.warns(UserWarning, match="2 images are in more than one split"):
            return instantiate_data_config(cfg, "test", strict=True).split_records(
                warn=True)["test"]

    stored = config(stored_file, 16)
    resized = config(stored_file, 24)
    overlap = training_overlap(stored, resized, test_split(resized), "test")
    assert overlap["checked"] and overlap["images"] == 0 and overlap["already_shared"] == 2
    # how training batches are formed defines no split either
    batched = {**stored, "init_args": {**stored["init_args"], "same_length_batches": True,
                                       "batch_size": 3}}
    overlap = training_overlap(stored, batched, test_split(batched), "test")
    assert overlap["checked"] and overlap["reason"] == "the same split settings as the checkpoint's"
    moved = config(moved_file, 16)
    overlap = training_overlap(stored, moved, test_split(moved), "test")
    assert (overlap["images"], overlap["already_shared"]) == (1, 2)
    assert overlap["example"] == str(images / "3.jpg")


def test_a_run_without_logger_never_writes_over_its_own_config_file(shapes_root, tmp_path):
    """Without a logger LightningCLI saves the run's config as ``default_root_dir/config.yaml``
    (overwriting, so that a later run replaces an earlier run's copy); where that is one of the
    run's own ``--config`` files it is left as the user wrote it, with a warning, and the copy
    is ``config.run.yaml``. Another folder's copy is still written, with the run's settings."""
    own = tmp_path / "config.yaml"
    own.write_text("trainer:\n  max_epochs: 1\n")
    argv = ["fit", *shapes_run(shapes_root, tmp_path, 12, 4, 4), "--config", str(own),
            "--trainer.logger", "false", "--trainer.limit_train_batches", "1",
            "--trainer.limit_val_batches", "0", "--trainer.callbacks", "[]",
            "--trainer.enable_checkpointing", "false", "--model.init_args.lr", "0.5"]
    with pytest.warns(UserWarning, match=f"{own} is one of this run's --config files or a "
                                         "config written by hand: the run's config is saved as "
                                         "config.run.yaml beside it"):
        lightning_main(argv)
    assert own.read_text() == "trainer:\n  max_epochs: 1\n"
    run_copy = tmp_path / "config.run.yaml"
    assert "lr: 0.5" in run_copy.read_text()  # the run's copy, kept
    # run again from that copy: config.yaml is no input now, but still the user's file
    with pytest.warns(UserWarning, match="config written by hand"):
        lightning_main(["fit", "--config", str(run_copy), "--trainer.max_epochs", "1"])
    assert own.read_text() == "trainer:\n  max_epochs: 1\n"
    # given before the subcommand (the callback's own config holds only the subcommand's),
    # and beside a config given as a YAML string (no file: None in jsonargparse's list)
    root_level = tmp_path / "root_level"
    root_level.mkdir()
    (root_level / "config.yaml").write_text("fit:\n  trainer:\n    max_epochs: 1\n")
    with pytest.warns(UserWarning, match="config.yaml is one of this run's --config files"):
        lightning_main(["--config", str(root_level / "config.yaml"), "fit", *argv[1:],
                        "--trainer.default_root_dir", str(root_level),
                        "--config", "{trainer: {limit_train_batches: 1}}"])
    assert (root_level / "config.yaml").read_text() == "fit:\n  trainer:\n    max_epochs: 1\n"
    elsewhere = tmp_path / "elsewhere"
    lightning_main([*argv, "--trainer.default_root_dir", str(elsewhere)])
    saved = (elsewhere / "config.yaml").read_text()
    assert "lr: 0.5" in saved and "limit_train_batches: 1\n" in saved


def test_the_shipped_trainer_config_trains_without_a_logger(shapes_root, tmp_path):
    """``--trainer.logger false`` (README) with ``configs/trainer/cpu.yaml`` as shipped: its
    learning-rate callback used to stop the run at the start of training."""
    argv = ["fit", *shapes_run(shapes_root, tmp_path, 24, 6, 8), "--trainer.logger", "false",
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
            "--trainer.limit_val_batches", "1"]
    logging.disable(logging.INFO)
    try:
        with pytest.warns(UserWarning, match="learning rates are not logged"):
            cli = lightning_main(argv)
    finally:
        logging.disable(logging.NOTSET)
    assert cli.trainer.current_epoch == 1
    assert (tmp_path / "config.yaml").is_file()
    assert any(type(c).__name__ == "LearningRateLog" for c in cli.trainer.callbacks)
    # a test run into the same folder keeps the fit's config (it replaced it with its own)
    fit_config = (tmp_path / "config.yaml").read_text()
    logging.disable(logging.INFO)
    try:
        lightning_main(["test", *argv[1:], "--ckpt_path", last_checkpoint(cli)])
    finally:
        logging.disable(logging.NOTSET)
    assert (tmp_path / "config.yaml").read_text() == fit_config
    assert "ckpt_path: " in (tmp_path / "config.test.yaml").read_text()


def test_lightning_commands_answer_unreadable_data_with_status_1_as_the_tools(capsys, tmp_path):
    """A missing captions file: one line naming it and exit status 1, as ``evaluate`` and
    ``extract-features`` answer it (``fit`` answered 2, the status of a usage or configuration
    error, which a config's checkpoint mismatch still gets)."""
    from captioner.cli import main

    missing = tmp_path / "nowhere" / "captions.txt"
    logging.disable(logging.INFO)
    try:
        status = main(["fit", "--config", str(CONFIGS / "trainer" / "cpu.yaml"),
                       "--config", str(CONFIGS / "data" / "flickr8k_subset.yaml"),
                       "--config", str(CONFIGS / "model" / "shapes_soft.yaml"),
                       "--data.init_args.annotations", str(missing),
                       "--data.init_args.image_root", str(tmp_path),
                       "--trainer.logger", "false",
                       "--trainer.default_root_dir", str(tmp_path)])
    finally:
        logging.disable(logging.NOTSET)
    err = capsys.readouterr().err
    assert status == 1, err
    assert f"captioner fit: captions file not found: {missing}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["fit", "validate", "test"])
def test_lightning_commands_help_names_captioner_and_says_what_they_do(command, capsys):
    """``captioner test --help`` began "usage: __main__.py" (under ``python -m``) and described
    itself with Trainer.test's docstring cut mid-sentence ("... never run on your")."""
    with pytest.raises(SystemExit) as e:
        lightning_main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: captioner [options] {command}")
    described = out.split("\noptions:")[0]  # usage and description
    assert f"captioner {command}: " in described and "never run on your" not in described


def test_the_overlap_check_follows_data_that_moved(tmp_path):
    """The checkpoint's stored paths name nothing (the data set moved, given with
    ``--data.init_args.image_root/annotations`` or a new ``--config``): its split settings are
    applied where the data is now, so a changed ``split_seed`` is still caught (it used to be
    "not checked: could not read the checkpoint's training split") and a pure move passes."""
    from captioner.commands.common import instantiate_data_config, training_overlap

    new = tmp_path / "new"
    (new / "images").mkdir(parents=True)
    for i in range(30):
        Image.new("RGB", (8, 8), (8 * i, 0, 0)).save(new / "images" / f"{i}.jpg")
    (new / "captions.txt").write_text(
        "image,caption\n" + "".join(f"{i}.jpg,a red square {i}\n" for i in range(30)))

    def config(root: Path, seed: int) -> dict:
        return {"class_path": "captioner.data.datamodule.CaptionDataModule",
                "init_args": {"format": "flickr8k_csv", "annotations": str(root / "captions.txt"),
                              "image_root": str(root / "images"), "split_seed": seed,
                              "val_fraction": 0.2, "test_fraction": 0.2, "min_freq": 1}}

    stored = config(tmp_path / "old", 0)  # where it was trained: gone
    for seed, overlapping in ((0, False), (1, True)):
        given = config(new, seed)
        test = instantiate_data_config(given, "given", strict=True).split_records()["test"]
        overlap = training_overlap(stored, given, test, "test")
        assert overlap["checked"], overlap["reason"]
        assert "applied where the data is now: annotations, image_root" in overlap["reason"]
        assert (overlap["images"] > 0) == overlapping


def _last_file(path: Path, mtime: int) -> str:
    """An empty ``last*.ckpt`` at ``path`` written at ``mtime`` (seconds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    os.utime(path, ns=(mtime * 10**9, mtime * 10**9))
    return str(path)


def _csv_logger(save_dir: Path, version: int | None = None, name: str = "x") -> dict:
    args = {"save_dir": str(save_dir), "name": name}
    if version is not None:
        args["version"] = version
    return {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": args}


def test_ckpt_path_last_picks_and_orders_as_lightning_writes(tmp_path):
    from captioner.cli import _last_checkpoint

    # the newest of a folder's last*.ckpt
    _last_file(tmp_path / "r" / "checkpoints" / "last.ckpt", 1000)
    newer = _last_file(tmp_path / "r" / "checkpoints" / "last-v1.ckpt", 2000)
    assert _last_checkpoint({"logger": False, "default_root_dir": str(tmp_path / "r")}) == newer
    # several loggers: the checkpoints go to the first one's folder (even if another's is newer)
    first = _last_file(tmp_path / "a" / "x" / "version_1" / "checkpoints" / "last.ckpt", 1000)
    _last_file(tmp_path / "b" / "x" / "version_2" / "checkpoints" / "last.ckpt", 2000)
    loggers = [_csv_logger(tmp_path / "a", 1), _csv_logger(tmp_path / "b", 2)]
    assert _last_checkpoint({"logger": loggers}) == first
    # version 0 is a fixed version, not an automatic one
    zero = _last_file(tmp_path / "z" / "x" / "version_0" / "checkpoints" / "last.ckpt", 1000)
    assert _last_checkpoint({"logger": _csv_logger(tmp_path / "z", 0)}) == zero


def test_ckpt_path_last_without_a_logger_option_is_lightnings_default_logger(tmp_path):
    """Logger unset (``None``): Lightning's default logger writes to
    default_root_dir/lightning_logs/version_N, a new version each run;
    default_root_dir/checkpoints is not where this run writes."""
    from captioner.cli import _last_checkpoint

    _last_file(tmp_path / "checkpoints" / "last.ckpt", 1000)
    for trainer in ({"default_root_dir": str(tmp_path)},
                    {"default_root_dir": str(tmp_path), "logger": None}):
        with pytest.raises(ConfigError, match=r"no last checkpoint in \S*lightning_logs.version_\*"
                                              r" \(a logger with an automatic version"):
            _last_checkpoint(trainer, "test")
    # a fixed version's last checkpoint is not taken, but named (it said only "no last
    # checkpoint", as if there were none)
    _last_file(tmp_path / "lightning_logs" / "v1" / "checkpoints" / "last.ckpt", 1000)
    with pytest.raises(ConfigError, match=r"init_args.version NAME to resume by `last`; fixed "
                                          r"versions with a last checkpoint: v1\)"):
        _last_checkpoint({"default_root_dir": str(tmp_path)}, "test")


def test_ckpt_path_last_validate_and_mixed_folders_are_errors(tmp_path):
    from captioner.cli import _last_checkpoint

    # validate, like test, has nothing to run without the file (only fit starts from scratch)
    with pytest.raises(ConfigError, match=r"no last checkpoint in \S*checkpoints; give"):
        _last_checkpoint({"logger": False, "default_root_dir": str(tmp_path / "e")}, "validate")
    # a fit with one callback's dirpath and one in the logger's automatic version: an error
    both = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(tmp_path / "d")}},
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"}]
    with pytest.raises(ConfigError, match="automatic version"):
        _last_checkpoint({"callbacks": both, "logger": _csv_logger(tmp_path / "s")}, "fit")


def test_ckpt_path_last_names_the_newest_earlier_versions_first(tmp_path):
    from captioner.cli import _last_checkpoint

    logs = tmp_path / "s" / "x"
    old = _last_file(logs / "version_0" / "checkpoints" / "last.ckpt", 1000)
    new = _last_file(logs / "version_1" / "checkpoints" / "last.ckpt", 3000)
    _last_file(logs / "run1" / "checkpoints" / "last.ckpt", 5000)  # a fixed version's own
    with pytest.raises(ConfigError) as error:
        _last_checkpoint({"logger": _csv_logger(tmp_path / "s")}, "fit")
    message = str(error.value)
    assert re.search(re.escape(new) + r" \([^)]*\); " + re.escape(old), message)
    assert "run1" not in message
