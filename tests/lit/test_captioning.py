"""CaptioningModule end to end: learning, checkpoints in a fresh process, exact resume."""

import json
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from captioner.data.datamodule import ShapesDataModule
from captioner.data.vocabulary import Vocabulary
from captioner.lit.captioning import CaptioningModule


def model_config(vocab_size: int, dropout: float = 0.1, lr: float = 3e-3) -> dict:
    return {
        "encoder": {"class_path": "captioner.encoders.ImageEncoder",
                    "init_args": {"backbone": "shapes_cnn", "weights": None, "grid_size": 3,
                                  "freeze": False}},
        "decoder": {"class_path": "captioner.decoder.AttentionDecoder",
                    "init_args": {"embed_dim": 24, "hidden_dim": 48, "dropout": dropout,
                                  "attention": {"class_path": "captioner.attention.AdditiveAttention",
                                                "init_args": {"attention_dim": 24}}}},
        "vocab_size": vocab_size,
        "lr": lr,
        "max_length": 16,
    }


def trainer(tmp_path, epochs: int, **kw) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp_path, max_epochs=epochs, accelerator="cpu", devices=1,
                     logger=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, **kw)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_tiny")
    dm = ShapesDataModule(root=str(root), num_train=24, num_val=5, num_test=5, image_size=32,
                          batch_size=8, seed=1)
    dm.prepare_data()
    return root


def tiny_dm(root, num_workers: int = 0) -> ShapesDataModule:
    return ShapesDataModule(root=str(root), num_train=24, num_val=5, num_test=5, image_size=32,
                            batch_size=8, seed=1, num_workers=num_workers)


def test_overfits_one_batch():
    """A handful of captions is memorised: per-token NLL falls below 0.05."""
    torch.manual_seed(0)
    module = CaptioningModule.from_config({**model_config(20, dropout=0.0), "doubly_stochastic": 0.0,
                                           "loss_reduction": "token"})
    images = torch.rand(5, 3, 32, 32)
    captions = torch.randint(4, 20, (5, 9))
    captions[:, 0], captions[:, -1] = 1, 2
    captions[2, 6:] = 0
    captions[2, 5] = 2
    opt = torch.optim.Adam(module.parameters(), lr=5e-3)
    batch = {"images": images, "captions": captions}
    for _ in range(250):
        opt.zero_grad()
        loss = module.loss(batch)["nll"]
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    module.eval()
    result = module.generate(module.encode(batch), beam_size=1, max_length=10)
    for i in range(5):
        n = int((captions[i] != 0).sum()) - 1  # tokens after <start>, incl. <end>
        assert result.tokens[i, :n].tolist() == captions[i, 1:n + 1].tolist()


def test_checkpoint_round_trip_in_a_fresh_process(tiny_data, tmp_path):
    dm = tiny_dm(tiny_data)
    module = CaptioningModule.from_config(model_config(dm.vocab_size))
    tr = trainer(tmp_path, 1)
    tr.fit(module, datamodule=dm)
    path = tmp_path / "model.ckpt"
    tr.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # no pickled modules
    assert Vocabulary.from_dict(ckpt["captioner"]["vocab"]) == dm.vocab
    image = dm.records("test")[0].path
    from captioner.inference import Captioner

    here = Captioner.from_checkpoint(path).caption([image])[0]
    code = (
        "import json, sys\n"
        "from captioner.inference import Captioner\n"
        f"c = Captioner.from_checkpoint({str(path)!r}).caption([{str(image)!r}])[0]\n"
        "print(json.dumps({'tokens': c.tokens, 'score': c.score}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    there = json.loads(out.stdout.strip().splitlines()[-1])
    assert there["tokens"] == here.tokens
    assert abs(there["score"] - here.score) < 1e-4


def one_step_checkpoint(tiny_data, tmp_path) -> tuple[ShapesDataModule, CaptioningModule, Path]:
    """A module trained for one step on ``tiny_data``, and its checkpoint ``model.ckpt``."""
    dm = tiny_dm(tiny_data)
    module = CaptioningModule.from_config(model_config(dm.vocab_size))
    tr = trainer(tmp_path, 1, limit_train_batches=1, limit_val_batches=0)
    tr.fit(module, datamodule=dm)
    path = tmp_path / "model.ckpt"
    tr.save_checkpoint(path)
    return dm, module, path


def test_lightning_load_from_checkpoint_rebuilds_the_module(tiny_data, tmp_path):
    """``CaptioningModule.load_from_checkpoint`` rebuilds the module from the checkpoint's model
    config (Lightning's own loader cannot: the encoder and decoder are not hyperparameters), with
    its weights and vocabulary, and init args can be replaced; a module built by hand warns
    when saved that its checkpoints cannot be rebuilt."""
    dm, module, path = one_step_checkpoint(tiny_data, tmp_path)
    loaded = CaptioningModule.load_from_checkpoint(path, beam_size=4)
    assert loaded.hparams.beam_size == 4 and loaded.vocab == dm.vocab
    expected = module.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert CaptioningModule.load_from_checkpoint(path, map_location="cpu", weights_only=True
                                                 ).vocab == dm.vocab  # Lightning's arguments
    with pytest.raises(ValueError, match="map_location: give a device"):
        CaptioningModule.load_from_checkpoint(path, map_location={"cuda:0": "cpu"})
    with pytest.raises(ValueError, match="translation"):  # another task's loader refuses it
        from captioner.lit.translation import TranslationModule

        TranslationModule.load_from_checkpoint(path)

    by_hand = CaptioningModule(module.encoder, lambda v, d: module.decoder, vocab_size=dm.vocab_size)
    tr = trainer(tmp_path / "by_hand", 1, limit_train_batches=1, limit_val_batches=0)
    with pytest.warns(UserWarning, match="built by hand"):
        tr.fit(by_hand, datamodule=dm)
        tr.save_checkpoint(tmp_path / "by_hand.ckpt")
    from captioner.inference import CheckpointError

    with pytest.raises(CheckpointError, match="no model config"):
        CaptioningModule.load_from_checkpoint(tmp_path / "by_hand.ckpt")


@pytest.mark.parametrize(("num_workers", "resume_seed"), [(0, 7), (2, 7), (0, 1)])
def test_resume_from_epoch_end_checkpoint_reproduces_the_uninterrupted_run(
        tiny_data, tmp_path, num_workers, resume_seed, recwarn):
    """Bit-identical weights after 3 epochs straight or 2 + a resumed 1, also with persistent
    workers (whose reused iterator used to take one draw less from the global generator than
    the resumed process's new one, changing the order and the dropout from then on), and when
    the resumed fit is seeded otherwise (no ``--seed_everything``: Lightning seeds 0): the
    checkpoint's run seed is kept, with a warning (the order had changed, silently)."""
    def run(epochs, ckpt_path=None, root=tmp_path / "a", seed=7):
        L.seed_everything(seed, workers=True)
        dm = tiny_dm(tiny_data, num_workers)
        module = CaptioningModule.from_config(model_config(dm.vocab_size, dropout=0.3))
        tr = trainer(root, epochs)
        tr.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return tr, module

    _, straight = run(3, root=tmp_path / "straight")
    tr1, _ = run(2, root=tmp_path / "first")
    ckpt = tmp_path / "epoch2.ckpt"
    tr1.save_checkpoint(ckpt)
    recwarn.clear()
    _, resumed = run(3, ckpt_path=str(ckpt), root=tmp_path / "resumed", seed=resume_seed)
    said = [str(w.message) for w in recwarn if "keeps its seed" in str(w.message)]
    assert said == ([] if resume_seed == 7 else [
        f"{ckpt}: the resumed run keeps its seed 7, not 1: its training order is a function of "
        "the run's seed and the epoch (give --seed_everything 7 to resume without this "
        "warning)"])
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_fit_resumed_with_another_learning_rate_trains_at_it(tiny_data, tmp_path, caplog):
    """``--model.init_args.lr`` given with ``--ckpt_path`` was silently overridden by the
    restored optimizer state (its groups carry the checkpoint's rates) while ``hparams`` said
    it applied; it now applies, to its group only (``encoder_lr`` to the backbone's), and the
    log says so. Unchanged options leave the restored groups alone."""
    import logging

    dm = tiny_dm(tiny_data)
    first = trainer(tmp_path / "first", 1, limit_train_batches=2, limit_val_batches=0)
    first.fit(CaptioningModule.from_config(model_config(dm.vocab_size, lr=3e-3)), datamodule=dm)
    ckpt = tmp_path / "epoch1.ckpt"
    first.save_checkpoint(ckpt)
    for lr, expected in [(3e-3, [3e-3, 1e-4]), (5e-4, [5e-4, 1e-4])]:
        caplog.clear()
        tr = trainer(tmp_path / f"resumed_{lr}", 2, limit_train_batches=2, limit_val_batches=0)
        with caplog.at_level(logging.INFO):
            tr.fit(CaptioningModule.from_config(model_config(dm.vocab_size, lr=lr)),
                   datamodule=dm, ckpt_path=str(ckpt))
        assert [g["lr"] for g in tr.optimizers[0].param_groups] == expected
        said = "the resumed fit trains with lr 0.0005 (the checkpoint's: 0.003)"
        assert (said in caplog.text) == (lr != 3e-3), caplog.text
    # a frozen backbone has no group for encoder_lr: not claimed as applied, but warned of
    frozen = model_config(dm.vocab_size)
    frozen["encoder"]["init_args"]["freeze"] = True
    first = trainer(tmp_path / "frozen", 1, limit_train_batches=2, limit_val_batches=0)
    first.fit(CaptioningModule.from_config(frozen), datamodule=dm)
    first.save_checkpoint(ckpt)
    caplog.clear()
    tr = trainer(tmp_path / "frozen_resumed", 2, limit_train_batches=2, limit_val_batches=0)
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning, match=re.escape(
            "encoder_lr given on resume has no parameter group to apply to")):
        tr.fit(CaptioningModule.from_config({**frozen, "encoder_lr": 0.05}), datamodule=dm,
               ckpt_path=str(ckpt))
    assert [g["lr"] for g in tr.optimizers[0].param_groups] == [3e-3]
    assert "trains with" not in caplog.text


def test_a_checkpoint_read_at_another_image_size_is_warned_of(tiny_data, tmp_path):
    """``captioner test --ckpt_path`` with a data config of another ``image_size`` scored
    another input resolution than the model was trained at, silently."""
    dm, _, ckpt = one_step_checkpoint(tiny_data, tmp_path)
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)
    stored["captioner"]["data"]["image_size"] = 48  # as if trained at 48 px
    torch.save(stored, ckpt)
    with pytest.warns(UserWarning, match=re.escape(
            f"{ckpt}: the images are read at image_size 32, but the model was trained at 48")):
        trainer(tmp_path, 1).test(CaptioningModule.from_config(model_config(dm.vocab_size)),
                                  datamodule=dm, ckpt_path=str(ckpt), verbose=False)
    # a resumed fit at another size may be meant (a resolution schedule): said, not scolded
    with pytest.warns(UserWarning, match=re.escape(
            f"{ckpt}: the resumed fit reads the images at image_size 32; the checkpoint was "
            "trained at 48")):
        trainer(tmp_path, 2, limit_train_batches=1, limit_val_batches=0).fit(
            CaptioningModule.from_config(model_config(dm.vocab_size)), datamodule=dm,
            ckpt_path=str(ckpt))


def test_a_resumed_fit_on_data_ordered_by_its_own_seed_keeps_the_seed_given(tiny_data, tmp_path,
                                                                            recwarn):
    """The checkpoint's run seed is imposed only where the training order depends on it (the
    caption data modules; translation's buckets follow the data module's own ``seed``)."""
    import os

    dm, _, ckpt = one_step_checkpoint(tiny_data, tmp_path)
    dm.order_from_run_seed = False  # as ParallelTextDataModule
    L.seed_everything(11)
    recwarn.clear()
    trainer(tmp_path, 2, limit_train_batches=1, limit_val_batches=0).fit(
        CaptioningModule.from_config(model_config(dm.vocab_size)), datamodule=dm,
        ckpt_path=str(ckpt))
    assert not [w for w in recwarn if "keeps its seed" in str(w.message)]
    assert os.environ["PL_GLOBAL_SEED"] == "11"


def test_vocabulary_mismatch_is_a_clear_error(tiny_data, tmp_path):
    dm = tiny_dm(tiny_data)
    module = CaptioningModule.from_config(model_config(dm.vocab_size + 3))
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        trainer(tmp_path, 1).fit(module, datamodule=dm)


def test_validation_attention_correctness_reads_the_stns_view(tiny_data, tmp_path):
    """With an STN, each cell is scored where it looked in the image, not where it sits."""
    import numpy as np

    from captioner.metrics import attention_correctness

    dm = tiny_dm(tiny_data)
    dm.setup("validate")
    cfg = model_config(dm.vocab_size)
    cfg["encoder"]["init_args"]["stages"] = [{
        "class_path": "captioner.encoders.SpatialTransformer",
        "init_args": {"where": "input", "transform": "attention"}}]
    model = CaptioningModule.from_config(cfg)
    regress = model.encoder.stages[0].localisation[0][-1]
    with torch.no_grad():  # a fixed zoom onto the top-left quarter
        regress.weight.zero_()
        regress.bias.copy_(torch.tensor([0.5, -0.5, -0.5]))
    (scores,) = trainer(tmp_path, 1).validate(model, datamodule=dm, verbose=False)

    outputs, hyps = model._last_outputs
    zoom = np.array([[0.5, 0.0, -0.5], [0.0, 0.5, -0.5]])
    for o in outputs:
        np.testing.assert_allclose(o["theta"], zoom, atol=1e-6)
    records = dm.records("val")
    args = ([o["alphas"][: len(h)].numpy() for o, h in zip(outputs, hyps)], hyps,
            [[(b.category, b.attributes.get("colour", ""), tuple(b.bbox))
              for b in records[o["index"]].boxes] for o in outputs], (3, 3),
            [(records[o["index"]].height, records[o["index"]].width) for o in outputs])
    through = attention_correctness(*args, thetas=[zoom] * len(outputs))
    plain = attention_correctness(*args)
    assert through["num_words"] >= 1
    assert scores["val/attention_chance"] == pytest.approx(through["chance"], abs=1e-6)
    assert scores["val/attention_chance"] != pytest.approx(plain["chance"], abs=1e-3)
    assert scores["val/attention_correctness"] == pytest.approx(
        through["attention_correctness"], abs=1e-6)


def test_attention_correctness_reads_image_sizes_the_annotations_leave_out(tiny_data, tmp_path):
    """COCO's ``width`` / ``height`` are optional: without them validation's attention
    correctness (boxes in pixels) crashed with a TypeError; it now reads the file header, as
    ``captioner evaluate`` does, and scores as with the annotated sizes."""
    import dataclasses

    from captioner.data.vocabulary import END, SPECIALS

    dm = tiny_dm(tiny_data)
    dm.setup("validate")
    model = CaptioningModule.from_config(model_config(dm.vocab_size))
    with torch.no_grad():  # an attention map for every step: no caption ends early
        model.decoder.L_o.bias[SPECIALS.index(END)] = -100.0
    trainer(tmp_path, 1).validate(model, datamodule=dm, verbose=False)
    outputs, _ = model._last_outputs
    records = dm.records("val")
    assert all(r.height and r.width and r.boxes for r in records)
    # captions naming each image's objects (an untrained model's words may name none, and
    # then every score is NaN, which compares unequal to itself)
    hyps = [[box.category for box in records[o["index"]].boxes] for o in outputs]
    bare = [dataclasses.replace(r, height=None, width=None) for r in records]
    annotated = model._attention_correctness(outputs, hyps, records)
    assert 0.0 <= annotated["attention_correctness"] <= 1.0, annotated
    assert model._attention_correctness(outputs, hyps, bare) == annotated


def test_a_checkpoint_monitoring_a_key_never_logged_is_refused_before_training(tiny_data,
                                                                               tmp_path):
    """``val/bleu`` is the translation model's key: Lightning would fail only after the first
    epoch; the module refuses at the start of fit."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from captioner.config import ConfigError

    dm = tiny_dm(tiny_data)
    model = CaptioningModule.from_config(model_config(dm.vocab_size))
    fit = trainer(tmp_path, 1, callbacks=[ModelCheckpoint(dirpath=tmp_path, monitor="val/bleu")])
    with pytest.raises(ConfigError, match=r"ModelCheckpoint\(monitor='val/bleu'\): a captioning "
                                          r"model logs val/bleu1, val/bleu2"):
        fit.fit(model, datamodule=dm)
    assert fit.global_step == 0
    # a callback told that its key may be missing is Lightning's business
    from lightning.pytorch.callbacks import EarlyStopping

    lenient = trainer(tmp_path, 1, limit_train_batches=1, limit_val_batches=1,
                      callbacks=[EarlyStopping(monitor="val/loss", strict=False)])
    lenient.fit(model, datamodule=dm)
    assert lenient.global_step == 1


def test_empty_captions_are_reported(tiny_data, tmp_path, caplog):
    dm = tiny_dm(tiny_data)
    model = CaptioningModule.from_config(model_config(dm.vocab_size))
    from captioner.data.vocabulary import END, SPECIALS

    with torch.no_grad():
        model.decoder.L_o.bias[SPECIALS.index(END)] = 100.0  # <end> is always chosen first
    with caplog.at_level("WARNING", logger="captioner.lit.captioning"):
        trainer(tmp_path, 1).validate(model, datamodule=dm, verbose=False)
    assert "val: 5 of 5 decoded captions are empty" in caplog.text



def test_frozen_blocks_replace_lightnings_eval_mode_warning_with_one_line(tiny_data, tmp_path,
                                                                          caplog):
    """A frozen backbone's blocks stay in eval mode on purpose: Lightning's "Found N module(s)
    in eval mode ... unexpected behavior" about exactly them is replaced by one log line, and
    still shown when anything else is in eval mode: more modules, or as many but not the same
    ones, before the fit starts or changed between its start and the start of training."""
    import logging
    import warnings

    from lightning.pytorch.callbacks import Callback

    class SwapModes(Callback):
        """After the sanity check (past ``on_fit_start``, before Lightning's check): one frozen
        module to train mode, one of the decoder's to eval mode: as many as before."""

        def on_sanity_check_end(self, trainer, module):
            swap(module)

    def swap(module):
        frozen_leaf = next(m for m in module.encoder.body.modules()
                           if not m.training and not list(m.children()))
        frozen_leaf.train()
        module.decoder.L_o.eval()

    def fit(case: str):
        cfg = model_config(tiny_dm(tiny_data).vocab_size)
        cfg["encoder"]["init_args"]["freeze"] = True
        module = CaptioningModule.from_config(cfg)
        frozen = sum(1 for m in module.encoder.body.modules() if not m.training)
        if case == "extra":
            module.decoder.L_o.eval()  # the user's own, not a frozen block
        if case == "swapped":
            swap(module)
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
            warnings.simplefilter("always")
            if case == "swapped_later":
                fitter = L.Trainer(default_root_dir=tmp_path, max_epochs=1, accelerator="cpu",
                                   devices=1, logger=False, enable_progress_bar=False,
                                   enable_model_summary=False, limit_train_batches=1,
                                   limit_val_batches=1, num_sanity_val_steps=1,
                                   callbacks=[SwapModes()])
            else:
                fitter = trainer(tmp_path, 1, limit_train_batches=1, limit_val_batches=0)
            fitter.fit(module, datamodule=tiny_dm(tiny_data))
            left = [f for f in warnings.filters if f[1] is not None
                    and "in eval mode" in f[1].pattern]
        assert left == []  # the filter ends with the start of training: later fits unaffected
        said = [str(w.message) for w in caught if "eval mode at the start" in str(w.message)]
        return frozen, said

    frozen, said = fit("frozen only")
    assert frozen > 0 and said == []
    assert f"({frozen} modules) stay in eval mode" in caplog.text
    _, said = fit("extra")
    assert len(said) == 1 and said[0].startswith(f"Found {frozen + 1} module(s)")
    for case in ("swapped", "swapped_later"):
        _, said = fit(case)
        assert len(said) == 1 and said[0].startswith(f"Found {frozen} module(s)"), (case, said)


def test_evaluation_keeps_every_word_of_a_caption_cut_at_max_length():
    """Validation/test outputs keep ``lengths`` tokens: ``<end>`` included where it was emitted,
    and the last word of a caption that ran to ``max_length`` without one. B = 2, T = 3, L = 9."""
    from captioner.search import SearchResult

    module = CaptioningModule.from_config(model_config(20))
    tokens = torch.tensor([[7, 2, 0], [5, 6, 9]])  # image 0 ends, image 1 is cut at T = 3
    result = SearchResult(tokens, torch.tensor([2, 3]), torch.zeros(2), torch.rand(2, 3, 9),
                          torch.ones(2, 3))
    module.generate = lambda annotations: result
    module._eval_outputs = []
    module._eval_step({"features": torch.zeros(2, 9, 5), "index": torch.tensor([4, 11])})
    got = [(o["index"], o["tokens"], tuple(o["alphas"].shape)) for o in module._eval_outputs]
    assert got == [(4, [7, 2], (2, 9)), (11, [5, 6, 9], (3, 9))]


def test_test_scores_read_every_reference(monkeypatch):
    """The COCO protocol at ``test`` scores against all of an image's references (here 6): a
    caption equal to the 6th is perfect. (The Python tokenizer: no Java start-up.)"""
    import functools
    from types import SimpleNamespace

    from captioner import metrics

    monkeypatch.setattr(metrics, "coco_caption_scores",
                        functools.partial(metrics.coco_caption_scores, use_java=False))
    module = CaptioningModule.from_config(model_config(20))
    refs = ["a cat", "the cat sits", "one cat", "a small cat", "cats", "a red ball on grass"]
    records = {3: SimpleNamespace(image_id=42, captions=refs)}
    scores, protocol = module._coco_scores(records, [{"index": 3}],
                                           [["a", "red", "ball", "on", "grass"]])
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert protocol["tokenizer"] == "python"  # as patched


def test_the_plateau_scheduler_is_stepped_with_bleu4():
    """``plateau`` reads validation BLEU-4 (what checkpoints monitor), not another score."""
    from types import SimpleNamespace

    module = CaptioningModule.from_config(model_config(20))
    module._trainer = SimpleNamespace(sanity_checking=False)
    module._score = lambda split: {"bleu1": 0.75, "bleu2": 0.5, "bleu4": 0.125}
    module.log = lambda *args, **kwargs: None
    stepped = []
    module.step_plateau = stepped.append
    module._eval_outputs = [{"index": 0}]
    module.on_validation_epoch_end()
    assert stepped == [0.125] and module._eval_outputs == []
