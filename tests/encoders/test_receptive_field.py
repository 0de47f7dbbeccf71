"""Where each attention cell is centred in the image, measured from the backbone's layers, and
the figures and attention correctness that place cells there (``cells: receptive_field``)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captioner.encoders import ImageEncoder
from captioner.encoders.backbone import Backbone, build_backbone
from captioner.encoders.receptive_field import (axis_geometry, cell_edges, grid_cell_edges,
                                                working_probe)
from captioner.grid_frame import cell_outline, grid_edges
from captioner.metrics import attention_correctness, box_cell_coverage
from captioner.visualize import load_attention_maps, save_attention_maps, upsample_attention


def test_geometry_of_hand_made_layers():
    """Feature ``j`` is centred on input coordinate ``s j + o`` (pixel ``i`` spans ``[i, i+1)``),
    worked out by hand from kernel, stride and padding."""
    # 3x3, stride 2, padding 1: the kernel covers pixels 2j-1 .. 2j+1, centre pixel 2j -> 2j + 0.5
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    assert axis_geometry(conv, 40, 0) == (2.0, 0.5)
    # then 2x2 stride 2 (no padding) over that: features 2j, 2j+1 -> (4j + 0.5 + 4j + 2.5) / 2
    both = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(4, 5, 2, stride=2))
    assert axis_geometry(both, 40, 0) == (4.0, 1.5)
    # TensorFlow "same" padding on an even input: pad 0 before, 1 after; covers 2j .. 2j+2
    same = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 4, 3, stride=2))
    assert axis_geometry(same, 40, 1) == (2.0, 1.5)
    # max-pooling 3x3 stride 2 padding 1 (ResNet's stem) behaves as its window: 2j + 0.5
    assert axis_geometry(nn.MaxPool2d(3, 2, 1), 40, 0) == (2.0, 0.5)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                                  nn.Conv2d(3, 3, 3, stride=2, padding=1))
        self.skip = nn.Conv2d(3, 3, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.skip(x)


class _GlobalGate(nn.Module):
    """Squeeze-and-excitation-like: every output depends on every input pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x.mean(dim=(2, 3), keepdim=True))


class _Concatenated(nn.Module):
    """Two branches concatenated on channels (DenseNet, Inception): the thin one-channel probe
    cannot run it (2 channels reach a convolution made for 1), the full-width one can."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1)
        self.down = nn.Conv2d(6, 4, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.cat([self.a(x), self.b(x)], 1))


def test_a_body_the_thin_probe_cannot_run_is_measured_at_full_width():
    from captioner.encoders.receptive_field import working_probe

    assert working_probe(_Concatenated(), (40, 40)).channels == 3  # the full-width copy
    assert working_probe(_Residual(), (40, 40)).channels == 1
    assert axis_geometry(_Concatenated(), 40, 0) == (2.0, 0.5)  # centred branches, then 2j


def test_residual_branches_and_global_operations():
    # both branches centre feature j on pixel 2j: 2j + 0.5; the 3x3 branch's reach decides
    assert axis_geometry(_Residual(), 33, 0) == (2.0, 0.5)
    # a global operation reaches every pixel at any probe size: no geometry
    assert axis_geometry(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), _GlobalGate()), 32, 0) is None


@pytest.mark.parametrize("name, size, expected", [
    ("shapes_cnn", 64, (8.0, 4.0)),  # three 3x3 pad-1 convs + 2x2 pools: 8j + 3.5 + 0.5 (tiles)
    ("resnet18", 224, (32.0, 0.5)),  # every stride-2 layer centres j on 2j: pixel 32 j
    ("resnet18", 250, (32.0, 0.5)),  # symmetric padding: the same at any size
    ("efficientnet_lite0", 224, (32.0, 31.5)),  # "same" padding: 2j + 1 five times -> 32j + 31
])
def test_registered_backbones_are_measured_as_their_layers_say(name, size, expected):
    body = build_backbone(name, None).body
    assert axis_geometry(body, size, 0) == expected
    assert axis_geometry(body, size, 1) == expected


def test_pooled_cell_edges_by_hand():
    """Cell ``i`` spans ``[s (i h'/H - 1/2) + o, s ((i+1) h'/H - 1/2) + o)`` input pixels."""
    # ResNet at 224 (7 features, feature j on pixel 32 j + 0.5), 7 cells: the tiles - 15.5 px
    np.testing.assert_allclose((cell_edges(32.0, 0.5, 224, 7, 7) + 1) * 112,
                               np.arange(8) * 32 - 15.5)
    # the same map pooled to 14 cells (resnet101_soft.yaml on 224-pixel data): cells 2k, 2k+1
    # repeat feature k and split its span [32 k - 15.5, 32 k + 16.5) in two 16-pixel halves
    edges = (cell_edges(32.0, 0.5, 224, 7, 14) + 1) * 112  # (15,) pixels
    np.testing.assert_allclose(edges, np.arange(15) * 16 - 15.5)
    assert np.all(np.diff(edges) > 0)
    # 256 pixels, 8 features, 14 cells: tiles of 256/14 pixels, 15.5 px up and left
    np.testing.assert_allclose((cell_edges(32.0, 0.5, 256, 8, 14) + 1) * 128,
                               np.arange(15) * 256 / 14 - 15.5)
    # EfficientNet-Lite0 at 224: 15.5 px down and right; VGG (16 j + 8) and a map that does
    # not cover its input (250 pixels, 8 features of 32: 256 px) scaled by 256 / 250
    np.testing.assert_allclose((cell_edges(32.0, 31.5, 224, 7, 7) + 1) * 112,
                               np.arange(8) * 32 + 15.5)
    np.testing.assert_allclose(cell_edges(16.0, 8.0, 224, 14, 14), np.linspace(-1, 1, 15),
                               atol=1e-12)
    np.testing.assert_allclose((cell_edges(32.0, 0.5, 250, 8, 4) + 1) * 125,
                               np.arange(5) * 64 - 15.5)


def test_grid_cell_edges_checks_the_pooled_map():
    body = build_backbone("resnet18", None).body
    ys, xs = grid_cell_edges(body, (224, 160), (7, 5), (7, 5))
    np.testing.assert_allclose((xs + 1) * 80, np.arange(6) * 32 - 15.5)  # tiles - 15.5 px
    np.testing.assert_allclose((ys + 1) * 112, np.arange(8) * 32 - 15.5)
    # more cells than features (a 7 x 7 map pooled to 14 x 14): increasing edges, no crash
    ys, xs = grid_cell_edges(body, (224, 224), (7, 7), (14, 14))
    np.testing.assert_allclose((xs + 1) * 112, np.arange(15) * 16 - 15.5)
    assert upsample_attention(np.full((14, 14), 1 / 196), (224, 224), edges=(ys, xs)).shape == (
        224, 224)
    with pytest.raises(ValueError, match="map of 6 rows, but the backbone gives 7"):
        grid_cell_edges(body, (224, 160), (6, 5), (7, 5))


def build_gated(weights: str | None) -> Backbone:
    """A backbone with a global operation (imported by dotted path in the test below)."""
    body = nn.Sequential()
    body.add_module("conv", nn.Conv2d(3, 8, 3, stride=2, padding=1))
    body.add_module("gate", _GlobalGate())
    return Backbone(body, 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_encoder_cell_edges_after_a_forward_pass(monkeypatch):
    import captioner.encoders.receptive_field as rf

    encoder = ImageEncoder("resnet18", weights=None, grid_size=(3, 5), freeze=False).eval()
    with pytest.raises(RuntimeError, match="run the encoder"):
        encoder.cell_edges()
    with torch.no_grad():
        encoder(torch.rand(1, 3, 96, 160))  # a 3 x 5 map: one feature per cell
    ys, xs = encoder.cell_edges()
    np.testing.assert_allclose((xs + 1) * 80, np.arange(6) * 32 - 15.5)
    np.testing.assert_allclose((ys + 1) * 48, np.arange(4) * 32 - 15.5)
    calls = []
    monkeypatch.setattr(rf, "grid_cell_edges", lambda *a: calls.append(a))
    assert encoder.cell_edges()[0] is ys and not calls  # measured once per input size

    # the shapes CNN's cells are the uniform tiles
    shapes = ImageEncoder("shapes_cnn", weights=None, grid_size=(3, 5)).eval()
    with torch.no_grad():
        shapes(torch.rand(1, 3, 24, 40))
    monkeypatch.undo()
    for got, want in zip(shapes.cell_edges(), grid_edges((3, 5))):
        np.testing.assert_allclose(got, want, atol=1e-12)

    # a view-moving stage on the feature map: the view would be applied in the wrong order
    from captioner.encoders import SpatialTransformer

    moved = ImageEncoder("shapes_cnn", weights=None, grid_size=(3, 5),
                         stages=[SpatialTransformer(where="output")]).eval()
    with torch.no_grad():
        moved(torch.rand(1, 3, 24, 40))
    with pytest.warns(UserWarning, match=r"SpatialTransformer at 'output'.* at 'input' only"):
        assert moved.cell_edges() is None
    at_input = ImageEncoder("shapes_cnn", weights=None, grid_size=(3, 5),
                            stages=[SpatialTransformer(where="input")]).eval()
    with torch.no_grad():
        at_input(torch.rand(1, 3, 24, 40))
    assert at_input.cell_edges() is not None

    gated = ImageEncoder(f"{__name__}.build_gated", weights=None, grid_size=2).eval()
    with torch.no_grad():
        gated(torch.rand(1, 3, 16, 16))
    with pytest.warns(UserWarning, match="uniform tiles of the image: no receptive field"):
        assert gated.cell_edges() is None


# ResNet-style cells on a 64 x 64 image, 2 x 2 grid: tiles shifted 8 pixels up and left
SHIFTED = (np.array([-1.25, -0.25, 0.75]), np.array([-1.25, -0.25, 0.75]))


def test_figures_and_outlines_follow_the_cells():
    alpha = np.zeros((2, 2))
    alpha[1, 1] = 1.0
    tile = upsample_attention(alpha, (64, 64), smooth=False)
    moved = upsample_attention(alpha, (64, 64), smooth=False, edges=SHIFTED)
    # uniform edges give exactly the tiles' map
    np.testing.assert_array_equal(
        upsample_attention(alpha, (64, 64), smooth=False, edges=grid_edges((2, 2))), tile)
    # the map peaks at the cell's centre: pixel 48 for the tile, 40 for the shifted cell
    assert tile[48, 48] == pytest.approx(1.0, abs=0.02) and tile[40, 40] < 0.8
    assert moved[40, 40] == pytest.approx(1.0, abs=0.02) and moved[48, 48] == 1.0  # held
    # before the first centre (pixel 8) the map holds 0; pixel 24.5 is (24.5 - 8) / 32 of the
    # way from the first centre to the second along each axis
    assert moved[7, 7] == 0.0 and moved[24, 24] == pytest.approx((16.5 / 32) ** 2)
    np.testing.assert_allclose(cell_outline(3, (2, 2), None, (64, 64), SHIFTED),
                               [[24, 24], [56, 24], [56, 56], [24, 56]])
    with pytest.raises(ValueError, match=r"must be \(3,\) and \(3,\)"):
        upsample_attention(alpha, (64, 64), edges=(np.zeros(2), np.zeros(3)))
    with pytest.raises(ValueError, match="increasing"):
        cell_outline(0, (2, 2), None, (64, 64), (np.array([0.0, 0.0, 1.0]), SHIFTED[1]))


def test_coverage_and_correctness_follow_the_cells():
    # box over x in [0, 32) of a 64 x 64 image: cells span x [-8, 24) and [24, 56) pixels
    box = [(0.0, 0.0, 32.0, 64.0)]
    cover = box_cell_coverage(box, (2, 2), (64, 64), edges=SHIFTED)
    # left cells: 24 of their 32 pixel columns inside the image and the box, rows: 24 of 32 of
    # the top cells (y from -8) and all 32 of the bottom ones (y 24 .. 56) -> 0.75 x ...
    np.testing.assert_allclose(cover, [[0.75 * 0.75, 0.25 * 0.75], [0.75, 0.25]])
    identity = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    np.testing.assert_allclose(box_cell_coverage(box, (2, 2), (64, 64), identity, SHIFTED),
                               cover)  # the sampled path (16 x 16 points per cell) agrees
    # all attention on cell (1, 0): 0.75 of it in the box, not the tile's 1.0
    alphas = [np.array([[0.0, 0.0, 1.0, 0.0]])]
    words, boxes = [["red"]], [[("square", "red", box[0])]]
    tile = attention_correctness(alphas, words, boxes, (2, 2), [(64, 64)])
    cells = attention_correctness(alphas, words, boxes, (2, 2), [(64, 64)], edges=SHIFTED)
    assert tile["attention_correctness"] == 1.0 and tile["chance"] == 0.5
    assert cells["attention_correctness"] == 0.75
    assert cells["chance"] == pytest.approx(cover.mean())  # uniform attention over these cells


def test_saved_maps_keep_the_cells(tmp_path):
    path = save_attention_maps(tmp_path / "maps", ["a"], np.full((1, 4), 0.25), (2, 2),
                               edges=SHIFTED)
    loaded = load_attention_maps(path)
    for got, want in zip(loaded.edges, SHIFTED):
        np.testing.assert_array_equal(got, want)
    assert load_attention_maps(save_attention_maps(tmp_path / "plain", ["a"],
                                                   np.full((1, 4), 0.25), (2, 2))).edges is None


def test_tools_place_cells_at_the_receptive_fields(tiny_checkpoint, tmp_path, capsys):
    from PIL import Image

    from captioner.cli import main
    from captioner.inference import Captioner

    captioner = Captioner.from_checkpoint(tiny_checkpoint)
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    assert captioner.caption([image])[0].cell_edges is None  # tiles by default
    captioner.cells = "receptive_field"
    (caption,) = captioner.caption([image])
    h, w = captioner.grid_size
    assert caption.cell_edges[0].shape == (h + 1,) and caption.cell_edges[1].shape == (w + 1,)
    with pytest.raises(ValueError, match="cells must be one of tile, receptive_field"):
        Captioner(captioner.encoder, captioner.decoder, captioner.vocab, cells="centre")

    image.save(tmp_path / "red.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status = main(["visualize", "--ckpt", str(tiny_checkpoint), str(tmp_path / "red.png"),
                       "--out", str(tmp_path / "fig.png"), "--save-maps",
                       str(tmp_path / "maps.npz"), "--cells", "receptive-field"])
    assert status == 0, capsys.readouterr().err
    saved = load_attention_maps(tmp_path / "maps.npz")
    np.testing.assert_array_equal(saved.edges[1], caption.cell_edges[1])


def test_fields_clipped_by_one_border_are_not_measured():
    """Only features whose field lies inside the probe, off both borders, are measured."""
    # top padding 20 then a 21-row kernel: feature j reads rows j-20 .. j -> centre j - 9.5
    top = nn.Sequential(nn.ZeroPad2d((0, 0, 20, 0)), nn.Conv2d(3, 3, 21))
    assert axis_geometry(top, 40, 0) == (1.0, -9.5)
    # bottom padding 20: rows j .. j+20 -> centre j + 10.5
    bottom = nn.Sequential(nn.ZeroPad2d((0, 0, 0, 20)), nn.Conv2d(3, 3, 21))
    assert axis_geometry(bottom, 40, 0) == (1.0, 10.5)


class _DynamicSame(nn.Conv2d):
    """TensorFlow "same" padding computed from the input's rows (as timm's tf_ models do)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[2]
        pad = max((-(-n // 2) - 1) * 2 + 3 - n, 0)
        return super().forward(F.pad(x, [0, 0, pad // 2, pad - pad // 2]))


def test_a_growing_probe_keeps_the_parity_dynamic_same_padding_depends_on():
    """A field too large for the first probe: the probe grows by a multiple of 2, so the
    padding that depends on the input's parity stays that of the real input."""
    body = nn.Sequential(_DynamicSame(3, 3, 3, stride=2), nn.Conv2d(3, 3, 31, padding=15))
    assert axis_geometry(body, 40, 0) == (2.0, 1.5)  # even rows: pad 0 before, 2j .. 2j+2
    assert axis_geometry(body, 41, 0) == (2.0, 0.5)  # odd rows: pad 1 before, 2j-1 .. 2j+1


def test_grid_cell_edges_measures_each_axis():
    # columns padded 16 on the left only (a 17-wide kernel): feature j centred on x = j - 7.5;
    # rows padded 8 on both sides: centred on y = j + 0.5 (the tiles)
    body = nn.Sequential(nn.ZeroPad2d((16, 0, 8, 8)), nn.Conv2d(3, 3, 17))
    ys, xs = grid_cell_edges(body, (16, 16), (16, 16), (4, 4))
    np.testing.assert_allclose((ys + 1) * 8, [0, 4, 8, 12, 16])
    np.testing.assert_allclose((xs + 1) * 8, np.array([0, 4, 8, 12, 16]) - 8.0)


class _Split(nn.Module):
    """ShuffleNet-style channel split: the one-channel thin probe cannot unpack two halves."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(x).chunk(2, dim=1)
        return a + b


def test_a_channel_split_is_measured_at_full_width():
    assert working_probe(_Split(), (40, 40)).channels == 3
    assert axis_geometry(_Split(), 40, 0) == (2.0, 0.5)


class _Cancelling(nn.Module):
    """Two concatenated branches of opposite sign summed by a 2x2 conv: the output is 0, but
    the linearised copy takes every weight in absolute value, so it still reaches its field."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 1, 3, padding=1, bias=False)
        self.b = nn.Conv2d(3, 1, 3, padding=1, bias=False)
        self.down = nn.Conv2d(2, 1, 2, stride=2, bias=False)
        with torch.no_grad():
            self.a.weight.fill_(1.0)
            self.b.weight.fill_(-1.0)
            self.down.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.cat([self.a(x), self.b(x)], 1))


def test_weights_are_taken_in_absolute_value():
    # a 3x3 padded conv then 2x2 stride 2: features 2j, 2j+1 -> centres 2j + 0.5, 2j + 1.5
    assert axis_geometry(_Cancelling(), 40, 0) == (2.0, 1.0)
