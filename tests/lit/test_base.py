"""captioner.lit.base: what the captioning and translation modules share."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from captioner.data.vocabulary import Vocabulary
from captioner.inference import CHECKPOINT_KEY
from captioner.lit.base import CaptionerModule, rng_states, set_rng_states
from captioner.lit.captioning import CaptioningModule
from captioner.lit.translation import TranslationModule
from tests.conftest import TINY_MODEL_CONFIG
from tests.lit.test_translation import model_config


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    torch.save(rng_states(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(7), random.random()  # move every stream on
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    torch.testing.assert_close(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_rng_states_keep_the_cuda_generator_where_cuda_is_in_use(tmp_path, monkeypatch):
    """On a GPU, dropout and hard attention draw from the device's generator: its state is saved
    and restored with the others (mocked here: no GPU in the tests), and a CPU-only machine
    skips it."""
    device_state = torch.arange(16, dtype=torch.uint8)
    restored: list[torch.Tensor] = []
    assert "cuda" not in rng_states() or torch.cuda.is_initialized()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": device_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append(s))
    torch.save(rng_states(), tmp_path / "rng.pt")
    saved = torch.load(tmp_path / "rng.pt", weights_only=True)
    assert torch.equal(saved["cuda"], device_state)
    set_rng_states(saved)
    assert len(restored) == 1 and torch.equal(restored[0], device_state)
    set_rng_states(saved, cuda=False)  # a run on the CPU of a GPU machine: CUDA not started
    assert len(restored) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine
    set_rng_states(saved)
    assert len(restored) == 1


def test_rng_states_keep_the_mps_generator_where_mps_is_available(tmp_path, monkeypatch):
    """On Apple GPUs dropout draws from the MPS generator: saved and restored too (mocked)."""
    device_state = torch.arange(8, dtype=torch.uint8)
    restored: list[torch.Tensor] = []
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda *a, **k: device_state.clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda s, *a, **k: restored.append(s))
    torch.save(rng_states(), tmp_path / "rng.pt")
    saved = torch.load(tmp_path / "rng.pt", weights_only=True)
    assert torch.equal(saved["mps"], device_state)
    set_rng_states(saved)
    assert len(restored) == 1 and torch.equal(restored[0], device_state)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    set_rng_states(saved)  # resumed on a machine without MPS: skipped
    assert len(restored) == 1


def test_each_rank_resumes_from_its_own_random_states(monkeypatch):
    """A checkpoint of a DDP run keeps every rank's states; a process resumes from its rank's
    when the number of processes matches, else (and in a single process) from rank 0's."""
    import captioner.lit.base as base

    ckpt = {"rng_states": "rank 0", "rng_states_per_rank": ["rank 0", "rank 1"]}
    monkeypatch.setattr(base, "_process_group", lambda: (1, 2))
    assert base.own_rng_states(ckpt) == "rank 1"
    monkeypatch.setattr(base, "_process_group", lambda: (1, 3))  # resumed on 3 processes
    assert base.own_rng_states(ckpt) == "rank 0"
    monkeypatch.setattr(base, "_process_group", lambda: None)
    assert base.own_rng_states(ckpt) == "rank 0"
    assert base.own_rng_states({"rng_states": "rank 0"}) == "rank 0"
    assert base.all_ranks_rng_states({"torch": torch.get_rng_state()}) is None


def test_checkpoint_meta_of_each_task_and_the_task_check():
    vocab = Vocabulary.build([["a", "b"], ["c"]])
    captioning = CaptioningModule.from_config({**TINY_MODEL_CONFIG, "vocab_size": len(vocab)})
    captioning.vocab = vocab
    ckpt: dict = {}
    captioning.on_save_checkpoint(ckpt)
    meta = ckpt[CHECKPOINT_KEY]
    assert meta["task"] == "captioning" and meta["format"] == 1
    assert meta["model_config"]["class_path"] == "captioner.lit.captioning.CaptioningModule"
    assert Vocabulary.from_dict(meta["vocab"]) == vocab and "rng_states" in ckpt

    fresh = CaptioningModule.from_config({**TINY_MODEL_CONFIG, "vocab_size": len(vocab)})
    fresh.on_load_checkpoint(ckpt)
    assert fresh.vocab == vocab and fresh.model_config == captioning.model_config

    translation = TranslationModule.from_config(model_config(len(vocab), len(vocab)))
    with pytest.raises(ValueError, match="a captioning checkpoint cannot be loaded into a "
                                         "translation module"):
        translation.on_load_checkpoint(ckpt)
    with pytest.raises(ValueError, match="not a captioner checkpoint"):
        fresh.on_load_checkpoint({"state_dict": {}})
    other = CaptioningModule.from_config({**TINY_MODEL_CONFIG, "vocab_size": len(vocab) + 2})
    with pytest.raises(ValueError, match="vocabulary"):
        other.on_load_checkpoint(ckpt)  # a checkpoint of another vocabulary


def test_gathered_outputs_are_unique_and_ordered_without_ddp():
    module = CaptionerModule()
    module._eval_outputs = [{"index": 2, "x": "c"}, {"index": 0, "x": "a"},
                            {"index": 2, "x": "c"}, {"index": 1, "x": "b"}]
    assert [o["x"] for o in module._gather_outputs()] == ["a", "b", "c"]
    module.on_test_epoch_start()
    assert module._eval_outputs == []


@pytest.mark.parametrize("fn, last_batch, every_n, interval, steps", [
    ("fit", True, 1, 1.0, 1),  # the validation that ends an epoch
    ("fit", False, 1, 0.5, 0),  # a validation within the epoch (val_check_interval 0.5)
    ("fit", False, None, 1.0, 1),  # validation scheduled by steps across epochs: every one
    ("fit", False, 1, 200, 1),  # every 200 training batches: every one
    ("validate", True, 1, 1.0, 0),  # validate() after fit() on the same trainer
])
def test_plateau_steps_once_per_epoch_while_fitting(monkeypatch, fn, last_batch, every_n,
                                                    interval, steps):
    from types import SimpleNamespace

    module = CaptioningModule.from_config({**TINY_MODEL_CONFIG, "vocab_size": 9,
                                           "lr_scheduler": "plateau"})
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    trainer = SimpleNamespace(state=SimpleNamespace(fn=fn), is_last_batch=last_batch,
                              check_val_every_n_epoch=every_n, val_check_interval=interval)
    monkeypatch.setattr(module, "_trainer", trainer, raising=False)
    monkeypatch.setattr(module, "lr_schedulers", lambda: scheduler)
    module.step_plateau(0.5)
    assert scheduler.last_epoch == steps


def test_perplexity_of_a_diverged_model_is_inf():
    outputs = [{"nll": 1e6, "target_tokens": 3}, {"nll": 2.0, "target_tokens": 1}]
    assert TranslationModule._perplexity(outputs) == float("inf")
    assert TranslationModule._perplexity(outputs[1:]) == pytest.approx(np.exp(2.0))


def test_mean_over_ranks_in_one_process_is_the_mean():
    from captioner.lit.base import mean_over_ranks

    torch.testing.assert_close(mean_over_ranks(torch.tensor([1.0, 2.0, 6.0])),
                               torch.tensor([3.0]))
    assert mean_over_ranks(torch.tensor([])).shape == (0,)


def test_a_resumed_fit_records_this_runs_data_settings(tmp_path):
    """Lightning runs ``setup`` (which records the data module's settings) before it restores a
    checkpoint: the restore kept overwriting them with the earlier run's, so a fit resumed with
    another ``image_size`` saved checkpoints claiming the old one. A module loaded from a file
    takes the stored settings; a resumed translation keeps the stored ``tokenizer_version``
    (its vocabularies are the checkpoint's). A data module built with a ``pathlib.Path`` root
    gives a checkpoint that loads with ``weights_only`` (it held a ``PosixPath``)."""
    import lightning as L

    from captioner.data.datamodule import ShapesDataModule
    from captioner.inference import read_checkpoint
    from tests.conftest import SHAPES_SIZES

    shapes_root = tmp_path / "shapes"  # its own: another image_size regenerates the set

    def fit(image_size: int, steps: int, ckpt: str | None = None) -> CaptioningModule:
        dm = ShapesDataModule(root=shapes_root, **{**SHAPES_SIZES, "image_size": image_size}, seed=0,
                              batch_size=4, num_workers=0)
        assert isinstance(dm.hparams["root"], type(shapes_root))  # a Path, as given
        module = CaptioningModule.from_config({**TINY_MODEL_CONFIG, "vocab_size": dm.vocab_size})
        trainer = L.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=0,
                            logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        trainer.save_checkpoint(tmp_path / f"{steps}.ckpt")
        return module

    fit(32, 1)
    stored = read_checkpoint(tmp_path / "1.ckpt")  # weights_only: no PosixPath inside
    assert stored[CHECKPOINT_KEY]["data"]["image_size"] == 32
    assert stored[CHECKPOINT_KEY]["data"]["datamodule"]["init_args"]["root"] == str(shapes_root)
    assert stored["datamodule_hyper_parameters"]["root"] == str(shapes_root)
    resumed = fit(40, 2, str(tmp_path / "1.ckpt"))
    assert resumed.data_config["image_size"] == 40
    assert read_checkpoint(tmp_path / "2.ckpt")[CHECKPOINT_KEY]["data"]["image_size"] == 40
    loaded = CaptioningModule.load_from_checkpoint(tmp_path / "1.ckpt")
    assert loaded.data_config["image_size"] == 32

    translation = TranslationModule.from_config(model_config(9, 9))
    translation.data_config = {"tokenizer_version": 2, "lowercase": True}  # as setup records
    kept = translation.resumed_data_config({"lowercase": True})  # stored before versions: 1
    assert kept == {"tokenizer_version": 1, "lowercase": True}


def test_an_earlier_tests_results_are_moved_aside_as_one_set(tmp_path, monkeypatch):
    """One ``N`` for the set, even where only some of an earlier test's files are there; the
    checkpoint recorded as given for a URL, resolved for a path, ``None`` for the model in
    memory (a test right after its fit)."""
    from pathlib import Path
    from types import SimpleNamespace

    module = CaptioningModule.from_config({**TINY_MODEL_CONFIG, "vocab_size": 9})
    names = ("test_captions.json", "test_metrics.json")
    (tmp_path / "test_metrics.json").write_text("first")
    (tmp_path / "test_metrics.before-1.json").write_text("older")  # N = 1 is taken
    for ckpt, recorded in ((None, None), ("s3://bucket/run/last.ckpt", "s3://bucket/run/last.ckpt"),
                           ("last.ckpt", str(Path("last.ckpt").resolve()))):
        monkeypatch.setattr(CaptioningModule, "trainer", SimpleNamespace(ckpt_path=ckpt))
        assert module.keep_earlier_results(tmp_path, names) == recorded
    assert (tmp_path / "test_metrics.before-2.json").read_text() == "first"
    assert not (tmp_path / "test_captions.before-2.json").exists()
    assert (tmp_path / "test_metrics.before-1.json").read_text() == "older"
    (tmp_path / "test_captions.json").write_text("c")
    (tmp_path / "test_metrics.json").write_text("m")
    module.keep_earlier_results(tmp_path, names)
    assert [(tmp_path / f"test_{n}.before-3.json").read_text() for n in ("captions", "metrics")
            ] == ["c", "m"]
