"""`captioner visualize` for hard attention (chosen cell per word) and Spatial Transformer stages."""

import copy
import json

import lightning as L
import numpy as np
import pytest
import yaml
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
                 "--save-maps", str(maps), "--with-end"]) == 0
    assert out.stat().st_size > 0
    saved = np.load(maps)
    alphas = saved["alphas"]  # (T, H, W): one chosen cell per word at test time
    assert alphas.shape[1:] == (3, 4) and len(alphas) >= 1  # <end> at least
    assert np.allclose(alphas.reshape(len(alphas), -1).max(-1), 1.0)
    # the outlined cells are saved with the maps, and they are the chosen ones
    np.testing.assert_array_equal(saved["hard_locations"],
                                  alphas.reshape(len(alphas), -1).argmax(-1))

    # --hard-test expectation: the same checkpoint attends to the expected context (the
    # authors' test rule): weights summing to 1 over the cells, no chosen cell outlined
    expected = tmp_path / "expected.npz"
    assert main(["visualize", "--ckpt", str(ckpt), str(_image(tmp_path)), "--out",
                 str(tmp_path / "expected.png"), "--save-maps", str(expected), "--with-end",
                 "--hard-test", "expectation"]) == 0
    spread = np.load(expected)
    assert "hard_locations" not in spread
    weights = spread["alphas"].reshape(len(spread["alphas"]), -1)  # (T, L)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    assert weights.max() < 0.99  # not one-hot

    # evaluate records the rule it decoded with
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"data": shapes_data_config(shapes_root)}))
    for rule in ("argmax", "expectation"):
        assert main(["evaluate", "--ckpt", str(ckpt), "--config", str(data), "--no-java",
                     "--out", str(tmp_path / rule), "--hard-test", rule]) == 0
        metrics = json.loads((tmp_path / rule / "metrics_test.json").read_text())
        assert metrics["protocol"]["hard_test"] == rule


def test_hard_attention_with_the_expectation_rule_outlines_no_cell(shapes_root, tmp_path,
                                                                     monkeypatch):
    import captioner.visualize as visualize

    drawn, original = {}, visualize.plot_attention

    def spy(*args, **kwargs):
        drawn.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(visualize, "plot_attention", spy)  # the command imports it when it runs
    ckpt = _checkpoint(shapes_root, tmp_path,
                       decoder={"attention_mode": "hard", "hard_test": "expectation"})
    maps = tmp_path / "maps.npz"
    assert main(["visualize", "--ckpt", str(ckpt), str(_image(tmp_path)), "--out",
                 str(tmp_path / "fig.png"), "--save-maps", str(maps), "--with-end"]) == 0
    assert drawn["hard_locations"] is None
    saved = np.load(maps)
    assert "hard_locations" not in saved
    np.testing.assert_allclose(saved["alphas"].reshape(len(saved["alphas"]), -1).sum(-1), 1.0,
                               rtol=1e-5)


@pytest.mark.parametrize("precision", ["32", "bf16"])
def test_stn_figure(shapes_root, tmp_path, monkeypatch, precision):
    """The STN figure, and the maps' transform, are those of the pass that captioned the
    image, in either precision (the figure's pass once ran in float32 whatever --precision)."""
    import captioner.visualize as visualize

    drawn, fills = [], []
    plot_stn = visualize.plot_stn
    monkeypatch.setattr(visualize, "plot_stn",
                        lambda images, theta, out, fill: drawn.append(theta) or fills.append(
                            fill) or plot_stn(images, theta, out, fill=fill))
    stn = {"class_path": "captioner.encoders.SpatialTransformer",
           "init_args": {"where": "input", "transform": "attention"}}
    ckpt = _checkpoint(shapes_root, tmp_path, encoder={"stages": [stn]})
    out, stn_out, maps = tmp_path / "fig.png", tmp_path / "stn.png", tmp_path / "maps.npz"
    assert main(["visualize", "--ckpt", str(ckpt), str(_image(tmp_path)), "--out", str(out),
                 "--stn", str(stn_out), "--save-maps", str(maps), "--precision", precision]) == 0
    assert stn_out.stat().st_size > 0
    # an input stage pads the normalised image with zeros: drawn in the normalisation's mean
    np.testing.assert_allclose(np.asarray(fills[0]), [0.5, 0.5, 0.5])  # shapes_cnn's mean
    # the maps keep where the STN's view lay in the image: its (2, 3) transform
    from captioner.inference import Captioner

    model = Captioner.from_checkpoint(ckpt, precision=precision)
    (caption,) = model.caption([_image(tmp_path)])
    assert caption.grid_theta is not None and caption.grid_theta.shape == (2, 3)
    np.testing.assert_allclose(np.load(maps)["theta"], caption.grid_theta, rtol=1e-6)
    (theta,) = drawn
    np.testing.assert_array_equal(theta.reshape(2, 3).double().numpy(), caption.grid_theta)


def test_stn_attention_is_drawn_where_the_view_looked(shapes_root, tmp_path, monkeypatch):
    """An STN that zooms onto the top-left quarter: the map of a word lands in that quarter."""
    import torch

    import captioner.visualize as visualize
    from captioner.inference import Captioner

    stn = {"class_path": "captioner.encoders.SpatialTransformer",
           "init_args": {"where": "input", "transform": "attention"}}
    ckpt = _checkpoint(shapes_root, tmp_path, encoder={"stages": [stn]})
    captioner = Captioner.from_checkpoint(ckpt)
    regress = captioner.encoder.stages[0].localisation[0][-1]
    with torch.no_grad():
        regress.weight.zero_()
        regress.bias.copy_(torch.tensor([0.5, -0.5, -0.5]))  # s, t_x, t_y
    (caption,) = captioner.caption([_image(tmp_path)])
    np.testing.assert_allclose(caption.grid_theta, [[0.5, 0, -0.5], [0, 0.5, -0.5]], atol=1e-6)
    maps, original = [], visualize.upsample_attention

    def spy(*args, **kwargs):
        maps.append(original(*args, **kwargs))
        return maps[-1]

    monkeypatch.setattr(visualize, "upsample_attention", spy)
    visualize.plot_attention(np.zeros((45, 71, 3)), ["w"], caption.alphas[:1], (3, 4),
                             tmp_path / "f.png", theta=caption.grid_theta)
    (up,) = maps  # (45, 71): nothing outside the top-left quarter the view showed
    assert up[:22, :35].max() > 0 and up[23:].max() == 0 and up[:, 36:].max() == 0



def test_stn_flag_without_a_stage_is_a_clear_error(tiny_checkpoint, tmp_path, capsys):
    status = main(["visualize", "--ckpt", str(tiny_checkpoint), str(_image(tmp_path)),
                   "--out", str(tmp_path / "f.png"), "--stn", str(tmp_path / "s.png")])
    assert status != 0
    assert "Spatial Transformer" in capsys.readouterr().err


def _ending_at_once(ckpt, tmp_path):
    """The checkpoint with ``<end>`` made the likeliest first word (an empty caption)."""
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    end = state["captioner"]["vocab"]["itos"].index("<end>")
    state["state_dict"]["decoder.L_o.bias"][end] += 100.0
    path = tmp_path / "ends.ckpt"
    torch.save(state, path)
    return path


def test_hard_attention_figure_of_an_empty_caption(shapes_root, tmp_path):
    """An undertrained model may emit ``<end>`` first: the figure and the maps of zero words
    are written (the chosen cells of no step), not a reshape error."""
    ckpt = _ending_at_once(_checkpoint(shapes_root, tmp_path, decoder={"attention_mode": "hard"}),
                           tmp_path)
    out, maps = tmp_path / "fig.png", tmp_path / "maps.npz"
    assert main(["visualize", "--ckpt", str(ckpt), str(_image(tmp_path)), "--out", str(out),
                 "--save-maps", str(maps)]) == 0
    saved = np.load(maps)
    assert saved["alphas"].shape == (0, 3, 4) and saved["hard_locations"].shape == (0,)
    assert out.stat().st_size > 0


def test_show_and_tell_has_no_gate_to_draw_or_save(shapes_root, tmp_path, monkeypatch):
    """Without attention there is no ``f_beta`` (whatever ``gate`` says): no beta in the
    titles or the saved maps."""
    import captioner.visualize as visualize
    from captioner.inference import Captioner

    drawn, original = {}, visualize.plot_attention

    def spy(*args, **kwargs):
        drawn.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(visualize, "plot_attention", spy)
    ckpt = _checkpoint(shapes_root, tmp_path, decoder={
        "attention": "captioner.attention.NoAttention", "gate": "scalar"})
    captioner = Captioner.from_checkpoint(ckpt)
    assert captioner.decoder.gate == "scalar" and not captioner.has_gate
    maps = tmp_path / "maps.npz"
    assert main(["visualize", "--ckpt", str(ckpt), str(_image(tmp_path)), "--out",
                 str(tmp_path / "fig.png"), "--save-maps", str(maps), "--with-end"]) == 0
    assert drawn["betas"] is None and "betas" not in np.load(maps)
