"""Every shipped YAML under ``configs/`` parses against the classes it names (an option renamed
in the code would otherwise break a config nobody runs in the tests), and every model config
builds its model: the encoder's architecture, the decoder and the losses, on the tiny shapes
vocabulary (pretrained weights are not downloaded here)."""

from __future__ import annotations

import io
import logging
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from captioner.cli import lightning_main
from tests.conftest import SHAPES_SIZES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRANSLATION_MODELS = {"multi30k_gru.yaml"}
TRANSLATION_DATA = {"multi30k_de_en.yaml", "multi30k_en_de.yaml"}
MODELS = sorted(p.name for p in (CONFIGS / "model").glob("*.yaml"))
DATA = sorted(p.name for p in (CONFIGS / "data").glob("*.yaml"))
TRAINERS = sorted(p.name for p in (CONFIGS / "trainer").glob("*.yaml"))


def _printed_config(*files: Path) -> dict:
    """``captioner fit --config ... --print_config``: parsed and checked, nothing built."""
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as e:
        lightning_main(["fit", *[f"--config={f}" for f in files], "--print_config"])
    assert e.value.code in (0, None), out.getvalue()
    return yaml.safe_load(out.getvalue())


def test_the_lists_are_not_empty():
    assert len(MODELS) >= 8 and len(DATA) >= 6 and TRAINERS == ["cpu.yaml", "gpu.yaml"]


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_data_and_trainer_config_parses(data, trainer):
    model = "multi30k_gru.yaml" if data in TRANSLATION_DATA else "shapes_soft.yaml"
    printed = _printed_config(CONFIGS / "trainer" / trainer, CONFIGS / "data" / data,
                              CONFIGS / "model" / model)
    given = yaml.safe_load((CONFIGS / "data" / data).read_text())["data"]
    assert printed["data"]["class_path"] == given["class_path"]
    for key, value in given["init_args"].items():  # every option reached the class as given
        assert printed["data"]["init_args"][key] == value, key
    assert printed["trainer"]["accelerator"] == yaml.safe_load(
        (CONFIGS / "trainer" / trainer).read_text())["trainer"]["accelerator"]


@pytest.mark.filterwarnings("ignore:.*is built without pretrained weights")
@pytest.mark.parametrize("model", MODELS)
def test_every_model_config_builds_its_model(model, shapes_root, tmp_path):
    """The model of each config on the shapes data (``weights: null``: the architecture only;
    the multi30k model on a toy parallel corpus)."""
    given = yaml.safe_load((CONFIGS / "model" / model).read_text())["model"]
    if model in TRANSLATION_MODELS:
        for split in ("train", "val", "test_2016_flickr"):
            (tmp_path / f"{split}.de").write_text("Ein Hund .\nEine Katze .\n")
            (tmp_path / f"{split}.en").write_text("A dog .\nA cat .\n")
        data = [f"--config={CONFIGS / 'data' / 'multi30k_de_en.yaml'}",
                "--data.init_args.root", str(tmp_path), "--data.init_args.min_freq", "1"]
    else:
        data = [f"--config={CONFIGS / 'data' / 'shapes.yaml'}",
                "--data.init_args.root", str(shapes_root),  # the session's set, as made
                *[f"--data.init_args.{k}={v}" for k, v in SHAPES_SIZES.items()],
                "--model.init_args.encoder.init_args.weights", "null"]
    logging.disable(logging.INFO)  # Lightning's "Seed set"
    try:
        cli = lightning_main([f"--config={CONFIGS / 'trainer' / 'cpu.yaml'}",
                              f"--config={CONFIGS / 'model' / model}", *data,
                              "--trainer.logger", "false",
                              "--trainer.default_root_dir", str(tmp_path)], run=False)
    finally:
        logging.disable(logging.NOTSET)
    assert type(cli.model).__name__ == given["class_path"].rsplit(".", 1)[1]
    decoder = given["init_args"]["decoder"]["init_args"]
    if "hidden_dim" in decoder:
        assert cli.model.decoder.hidden_dim == decoder["hidden_dim"]
    assert cli.model.hparams.vocab_size == cli.datamodule.vocab_size
    encoder = given["init_args"].get("encoder", {}).get("init_args", {})
    if "backbone" in encoder:
        assert cli.model.encoder.backbone_name == encoder["backbone"]
