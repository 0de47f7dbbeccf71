"""`captioner visualize` for hard attention (chosen cell per word) and Spatial Transformer stages."""

import copy

import lightning as L
import numpy as np
from PIL import Image

from captioner.cli import main
from captioner.config import instantiate
from captioner.lit.captioning import CaptioningModule
from tests.conftest import TINY_MODEL_CONFIG, shapes_data_config


def _checkpoint(shapes_root, tmp_path, **changes):
    cfg = copy.deepcopy(TINY_MODEL_CONFIG)
    cfg["decoder"]["init_args"].update(changes.pop("decoder", {}))
    cfg["encoder"]["init_args"].update(changes.pop("encoder", {}))
    data = shapes_data_config(shapes_root)
    dm = instantiate(data["class_path"], data["init_args"])
    model = CaptioningModule.from_config({**cfg, "vocab_size": dm.vocab_size})
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    return path


def _image(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((45, 71, 3)) * 255).astype("uint8")).save(path)
    return path


def test_hard_attention_figure_and_one_hot_maps(shapes_root, tmp_path):
    ckpt = _checkpoint(shapes_root, tmp_path, decoder={"attention_mode": "hard"})
    out, maps = tmp_path / "fig.png", tmp_path / "maps.npz"
    assert main(["visualize", "--ckpt", str(ckpt), str(_image(tmp_path)), "--out", str(out),
                 "--save-maps", str(maps)]) == 0
    assert out.stat().st_size > 0
    alphas = np.load(maps)["alphas"]  # (T, H, W): one chosen cell per word at test time
    assert alphas.shape[1:] == (3, 4)
    if len(alphas):
        assert np.allclose(alphas.reshape(len(alphas), -1).max(-1), 1.0)


def test_stn_figure(shapes_root, tmp_path):
    stn = {"class_path": "captioner.encoders.SpatialTransformer",
           "init_args": {"where": "input", "transform": "attention"}}
    ckpt = _checkpoint(shapes_root, tmp_path, encoder={"stages": [stn]})
    out, stn_out = tmp_path / "fig.png", tmp_path / "stn.png"
    assert main(["visualize", "--ckpt", str(ckpt), str(_image(tmp_path)), "--out", str(out),
                 "--stn", str(stn_out)]) == 0
    assert stn_out.stat().st_size > 0


def test_stn_flag_without_a_stage_is_a_clear_error(tiny_checkpoint, tmp_path, capsys):
    status = main(["visualize", "--ckpt", str(tiny_checkpoint), str(_image(tmp_path)),
                   "--out", str(tmp_path / "f.png"), "--stn", str(tmp_path / "s.png")])
    assert status != 0
    assert "Spatial Transformer" in capsys.readouterr().err
