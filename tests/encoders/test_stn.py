"""Tests for the Spatial Transformer stage (captioner.encoders.stn)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

from captioner.encoders.stn import (
    IDENTITY_PARAMS,
    NUM_PARAMS,
    HeatmapLocalisation,
    SpatialTransformer,
    compose_thetas,
    params_to_theta,
    theta_parameters,
    warp,
)
from captioner.visualize import plot_stn, theta_outline

B, C, H, W = 3, 5, 7, 9  # distinct odd sizes
FAMILIES = list(NUM_PARAMS)


def _set_params(stn: SpatialTransformer, params: list[float], net: int = 0) -> None:
    """Make localisation net ``net`` output ``params`` for every input (zero weights, bias)."""
    regress = stn.localisation[net][-1]
    with torch.no_grad():
        regress.weight.zero_()
        regress.bias.copy_(torch.tensor(params))


@pytest.mark.parametrize("transform", FAMILIES)
@pytest.mark.parametrize("localization", ["conv", "fc", "heatmap"])
def test_identity_at_initialisation(transform: str, localization: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(B, C, H, W) * 3
    stn = SpatialTransformer(where="layer2", transform=transform, localization=localization,
                             in_channels=C)
    out = stn(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)
    expected = params_to_theta(torch.tensor(IDENTITY_PARAMS[transform]), transform)
    torch.testing.assert_close(stn.last_theta, expected.expand(B, 1, 2, 3))
    torch.testing.assert_close(expected, torch.tensor([[1.0, 0, 0], [0, 1, 0]]))


@pytest.mark.parametrize("transform", FAMILIES)
def test_identity_at_initialisation_several_transformers(transform: str) -> None:
    torch.manual_seed(1)
    x = torch.randn(B, C, H, W)
    seq = SpatialTransformer(where="input", transform=transform, num_transformers=3,
                             combine="sequence", in_channels=C)
    torch.testing.assert_close(seq(x), x, atol=1e-6, rtol=0)
    assert seq.last_theta.shape == (B, 3, 2, 3)
    cat = SpatialTransformer(where="output", transform=transform, num_transformers=2,
                             combine="concat", in_channels=C)
    out = cat(x)
    assert out.shape == (B, 2 * C, H, W) and cat.out_channels == 2 * C
    torch.testing.assert_close(out, torch.cat([x, x], 1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("localization", ["conv", "heatmap"])
def test_identity_on_a_large_image_is_exact(localization: str) -> None:
    # float32 grids would be off by ~1e-5 at 224 px; warp samples in float64, and the heat
    # map's marginals are summed in float64 (float32 column sums left t_x ~1e-8, 1e-5 out)
    x = torch.rand(1, 3, 224, 224)
    stn = SpatialTransformer(in_channels=3, localization=localization, transform="translation")
    torch.testing.assert_close(stn(x), x, atol=1e-6 if localization == "conv" else 0, rtol=0)


def test_heatmap_points_at_the_pixels_a_cell_pools_on_odd_sizes() -> None:
    """The 2x2 pool (ceil mode) of a 7 x 9 map makes 4 x 5 cells, the last ones a single row /
    column: a sharp detector on the object covering rows 2-3 and columns 4-5 (cell (1, 2))
    points at those pixels' centre, x = 10/9 - 1, y = 6/7 - 1 (placing cells at
    (2 j + 1) / w_f - 1 gave x = 0, half a pixel to one pixel off)."""
    loc = HeatmapLocalisation(in_channels=2, hidden=2, transform="translation", count=1)
    loc.trunk = torch.nn.MaxPool2d(2, ceil_mode=True)  # (B, 2, 7, 9) -> (B, 2, 4, 5)
    with torch.no_grad():
        loc.heat.weight.zero_()
        loc.heat.weight[0, 0] = 200.0
    x = torch.zeros(1, 2, 7, 9)
    x[0, 0, 2:4, 4:6] = 1.0
    torch.testing.assert_close(loc(x), torch.tensor([[10 / 9 - 1, 6 / 7 - 1]]))
    x = torch.zeros(1, 2, 7, 9)
    x[0, 0, 6, 8] = 1.0  # the corner cell pools one pixel: its centre
    torch.testing.assert_close(loc(x), torch.tensor([[17 / 9 - 1, 13 / 7 - 1]]))


def test_heatmap_on_a_single_row_map() -> None:
    """A 1 x 5 map pools (2x2, ceil mode) to 1 x 3 cells: pixel column j reads cell j // 2 and
    the single row cell 0, so the last cell (one column) points at x = 9/5 - 1, y = 0."""
    loc = HeatmapLocalisation(in_channels=1, hidden=1, transform="translation", count=1)
    loc.trunk = torch.nn.MaxPool2d(2, ceil_mode=True)  # (B, 1, 1, 5) -> (B, 1, 1, 3)
    with torch.no_grad():
        loc.heat.weight.fill_(200.0)
    x = torch.zeros(1, 1, 1, 5)
    x[0, 0, 0, 4] = 1.0
    torch.testing.assert_close(loc(x), torch.tensor([[9 / 5 - 1, 0.0]]))


def test_heatmap_regresses_the_other_parameters_from_the_mean_feature() -> None:
    """``s = W mean_ij F_ij + b`` (trunk removed): channel 0 is one pixel of 7 on a 5 x 7 map
    (mean 0.2), channel 1 is -0.3 everywhere, so W = (0.5, -1), b = 1 give
    s = 1 + 0.1 + 0.3 = 1.4; the uniform heat map gives t = 0."""
    loc = HeatmapLocalisation(in_channels=2, hidden=2, transform="attention", count=1)
    loc.trunk = torch.nn.Identity()
    with torch.no_grad():
        loc.regress.weight.copy_(torch.tensor([[0.5, -1.0]]))
    x = torch.zeros(1, 2, 5, 7)
    x[0, 0, 1, 5] = 7.0
    x[0, 1] = -0.3
    torch.testing.assert_close(loc(x), torch.tensor([[1.4, 0.0, 0.0]]))


def test_params_to_theta_hand_values() -> None:
    sim = params_to_theta(torch.tensor([2.0, math.pi / 2, 0.1, 0.2]), "similarity")
    torch.testing.assert_close(sim, torch.tensor([[0.0, -2.0, 0.1], [2.0, 0.0, 0.2]]),
                               atol=1e-6, rtol=0)
    att = params_to_theta(torch.tensor([[0.5, -0.3, 0.4]]), "attention")
    torch.testing.assert_close(att, torch.tensor([[[0.5, 0.0, -0.3], [0.0, 0.5, 0.4]]]))
    tr = params_to_theta(torch.tensor([0.25, -0.75]), "translation")
    torch.testing.assert_close(tr, torch.tensor([[1.0, 0.0, 0.25], [0.0, 1.0, -0.75]]))
    aff = params_to_theta(torch.arange(6.0), "affine")
    torch.testing.assert_close(aff, torch.tensor([[0.0, 1, 2], [3, 4, 5]]))
    with pytest.raises(ValueError, match="takes 2 parameters"):
        params_to_theta(torch.zeros(3), "translation")


def test_known_translation_moves_a_one_hot_pixel() -> None:
    x = torch.zeros(1, 1, H, W)
    x[0, 0, 3, 5] = 1.0
    stn = SpatialTransformer(where="input", transform="translation", in_channels=1)
    # A maps output to input coordinates: tx = 2 * 2 / W samples 2 pixels to the right, so the
    # content moves 2 pixels left; ty = 2 * 1 / H moves it 1 pixel up.
    _set_params(stn, [2 * 2 / W, 2 * 1 / H])
    out = stn(x)
    expected = torch.zeros_like(x)
    expected[0, 0, 2, 3] = 1.0
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_crop_and_zoom_output_size_and_values() -> None:
    # Input whose value is the normalised x coordinate of each pixel centre: a linear ramp, so
    # bilinear sampling is exact and the output must be s * x_out + tx.
    ramp = (2 * torch.arange(W) + 1) / W - 1
    x = ramp.view(1, 1, 1, W).expand(2, 1, H, W).contiguous()
    stn = SpatialTransformer(where="input", transform="attention", output_size=(5, 3),
                             in_channels=1)
    _set_params(stn, [0.5, 0.2, -0.1])  # a region of half the side, right of the centre
    out = stn(x)
    assert out.shape == (2, 1, 5, 3)
    x_out = (2 * torch.arange(3) + 1) / 3 - 1
    torch.testing.assert_close(out, (0.5 * x_out + 0.2).view(1, 1, 1, 3).expand(2, 1, 5, 3),
                               atol=1e-6, rtol=0)
    square = SpatialTransformer(output_size=11, in_channels=C)
    assert square(torch.randn(B, C, H, W)).shape == (B, C, 11, 11)


def test_sequence_composes_the_transforms() -> None:
    x = torch.zeros(1, 1, H, W)
    x[0, 0, 4, 6] = 1.0
    stn = SpatialTransformer(where="input", transform="translation", num_transformers=2,
                             combine="sequence", in_channels=1)
    _set_params(stn, [2 * 1 / W, 0.0], net=0)  # 1 px left
    _set_params(stn, [2 * 2 / W, -2 * 2 / H], net=1)  # 2 px left, 2 px down
    out = stn(x)
    expected = torch.zeros_like(x)
    expected[0, 0, 6, 3] = 1.0
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    composite = stn.input_theta()
    assert composite.shape == (1, 1, 2, 3)
    torch.testing.assert_close(
        composite[0, 0], torch.tensor([[1.0, 0.0, 6 / W], [0.0, 1.0, -4 / H]]))
    torch.testing.assert_close(warp(x, composite[:, 0]), out, atol=1e-6, rtol=0)


def test_sequence_localisation_looks_at_the_previous_output() -> None:
    """Each localisation network of a sequence sees the previous transformer's output: a
    heat-map pointer centres the one-hot pixel at (1, 6) of a 7 x 9 map (t = (4/9, -4/7):
    2 px left, 2 px down); the second one sees it at the centre (3, 4) and predicts t = 0
    (looking at the input again it would move it 2 px further, to (5, 2))."""
    x = torch.zeros(1, 1, H, W)
    x[0, 0, 1, 6] = 1.0
    stn = SpatialTransformer(where="input", transform="translation", localization="heatmap",
                             loc_hidden=1, num_transformers=2, combine="sequence", in_channels=1)
    for loc in stn.localisation:
        loc.trunk = torch.nn.Identity()  # features = input
        with torch.no_grad():
            loc.heat.weight.fill_(200.0)
    expected = torch.zeros_like(x)
    expected[0, 0, 3, 4] = 1.0
    torch.testing.assert_close(stn(x), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(stn.last_theta[0, :, :, 2], torch.tensor([[4 / 9, -4 / 7], [0, 0]]))


def test_concatenated_views_each_take_their_own_transform() -> None:
    x = torch.zeros(1, 1, H, W)
    x[0, 0, 4, 6] = 1.0
    stn = SpatialTransformer(where="output", transform="translation", num_transformers=2,
                             in_channels=1)
    _set_params(stn, [2 * 1 / W, 0.0, 0.0, -2 * 2 / H])  # view 0: 1 px left; view 1: 2 px down
    expected = torch.zeros(1, 2, H, W)
    expected[0, 0, 4, 5] = expected[0, 1, 6, 6] = 1.0
    torch.testing.assert_close(stn(x), expected, atol=1e-6, rtol=0)


def test_compose_thetas_non_commuting() -> None:
    scale = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]])
    shift = torch.tensor([[1.0, 0.0, 0.4], [0.0, 1.0, 0.0]])
    # first scale then shift: p -> 0.5 * (p + t)
    total = compose_thetas(torch.stack([scale, shift]).unsqueeze(0))
    torch.testing.assert_close(total[0], torch.tensor([[0.5, 0.0, 0.2], [0.0, 0.5, 0.0]]))
    total = compose_thetas(torch.stack([shift, scale]).unsqueeze(0))
    torch.testing.assert_close(total[0], torch.tensor([[0.5, 0.0, 0.4], [0.0, 0.5, 0.0]]))


@pytest.mark.parametrize("localization", ["conv", "fc"])
@pytest.mark.parametrize("transform", FAMILIES)
def test_gradients_reach_theta_and_the_localisation_net(localization: str, transform: str) -> None:
    """At initialisation the regression layer's weights are zero, so only the regression layer
    (the parameters of theta) gets gradients; after one SGD step every localisation parameter
    does."""
    torch.manual_seed(2)
    x = torch.randn(B, C, H, W)
    target = torch.randn(B, C, H, W)
    stn = SpatialTransformer(where="conv1", transform=transform, localization=localization,
                             in_channels=C)
    params = dict(stn.named_parameters())
    regress = {id(p) for p in stn.localisation[0][-1].parameters()}  # theta's weight and bias
    assert len(regress) == 2
    opt = torch.optim.SGD(stn.parameters(), lr=0.1)

    loss = ((stn(x) - target) ** 2).mean()
    loss.backward()
    for name, p in params.items():
        if id(p) in regress:
            assert p.grad.abs().sum() > 0, name
        else:  # blocked by the zero regression weights
            assert p.grad is None or p.grad.abs().sum() == 0, name
    opt.step()
    opt.zero_grad()
    ((stn(x) - target) ** 2).mean().backward()
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("transform", FAMILIES)
def test_heatmap_translation_is_the_expected_position(transform: str) -> None:
    """t = sum_ij p_ij (x_j, y_i) with pixel-centre coordinates; the other parameters come from
    the regression's bias at initialisation. Hand check on a 5 x 7 map with the trunk removed:
    a map that is one-hot at (row 1, column 5) gives x = 11/7 - 1, y = 3/5 - 1; an even split
    between (1, 5) and (4, 0) gives the mean of the two."""
    loc = HeatmapLocalisation(in_channels=2, hidden=2, transform=transform, count=1)
    loc.trunk = torch.nn.Identity()  # features = input: (B, 2, 5, 7)
    with torch.no_grad():
        loc.heat.weight.zero_()
        loc.heat.weight[0, 0] = 200.0  # logits = 200 * channel 0
    x = torch.zeros(2, 2, 5, 7)
    x[:, 0, 1, 5] = 1.0
    x[1, 0, 4, 0] = 1.0
    params = loc(x).view(2, NUM_PARAMS[transform])
    names = {"affine": (2, 5), "attention": (1, 2), "similarity": (2, 3), "translation": (0, 1)}
    ix, iy = names[transform]
    one = torch.tensor([11 / 7 - 1, 3 / 5 - 1])
    two = (one + torch.tensor([1 / 7 - 1, 9 / 5 - 1])) / 2
    torch.testing.assert_close(params[:, [ix, iy]], torch.stack([one, two]))
    others = [i for i in range(NUM_PARAMS[transform]) if i not in (ix, iy)]
    identity = torch.tensor(IDENTITY_PARAMS[transform])[others]
    torch.testing.assert_close(params[:, others], identity.expand(2, -1))
    p, pooled = loc.heatmap(x)
    assert p.shape == (2, 1, 5, 7) and pooled.shape == (2, 2)
    torch.testing.assert_close(p.sum((2, 3)), torch.ones(2, 1))


@pytest.mark.parametrize("transform", ["attention", "translation"])
def test_heatmap_gradients_reach_every_localisation_parameter(transform: str) -> None:
    """At initialisation only the zero-initialised heat map and regression layers get
    gradients (the heat map's bias none: a softmax ignores a constant); after one SGD step the
    trunk does too."""
    torch.manual_seed(4)
    x, target = torch.randn(B, C, H, W), torch.randn(B, C, H, W)
    stn = SpatialTransformer(where="input", transform=transform, localization="heatmap",
                             in_channels=C)
    loc = stn.localisation[0]
    opt = torch.optim.SGD(stn.parameters(), lr=0.1)
    ((stn(x) - target) ** 2).mean().backward()
    assert loc.heat.weight.grad.abs().sum() > 0
    assert loc.heat.bias.grad.abs().max() < 1e-6
    if loc.regress is not None:
        assert loc.regress.weight.grad.abs().sum() > 0
    for name, p in loc.trunk.named_parameters():
        assert p.grad is None or p.grad.abs().sum() == 0, name
    opt.step()
    opt.zero_grad()
    ((stn(x) - target) ** 2).mean().backward()
    for name, p in loc.trunk.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


class _CudaAutocastSoftmax(TorchFunctionMode):
    """CUDA autocast's rule for ``softmax`` on CPU: float32 whatever the input's dtype, while
    convolutions and linear layers run in the autocast dtype (no GPU in CI)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "softmax" and torch.is_autocast_enabled("cpu"):
            args = tuple(a.float() if isinstance(a, torch.Tensor) else a for a in args)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("transform", FAMILIES)
def test_heatmap_params_under_mixed_precision(transform: str) -> None:
    """The heat map's translation (float32 softmax) and the regressed parameters (float16
    linear) meet in one tensor of their common dtype (this failed with "Index put requires
    the source and destination dtypes match")."""
    torch.manual_seed(5)
    loc = HeatmapLocalisation(C, 6, transform, 1)
    x = torch.randn(B, C, H, W)
    with _CudaAutocastSoftmax(), torch.autocast("cpu", dtype=torch.float16):
        params = loc(x)  # (B, P)
    assert params.dtype == torch.float32 and params.shape == (B, NUM_PARAMS[transform])
    torch.testing.assert_close(params, loc(x), atol=2e-3, rtol=2e-3)  # float32 values


def test_concat_away_from_output_is_rejected() -> None:
    with pytest.raises(ValueError, match="only a stage at 'output'"):
        SpatialTransformer(where="input", num_transformers=2, combine="concat")
    with pytest.raises(ValueError, match="unknown transform"):
        SpatialTransformer(transform="projective")  # type: ignore[arg-type]
    for bad in ({"loc_pool": 0}, {"loc_hidden": 0}):  # loc_pool 0: theta ignored the input
        with pytest.raises(ValueError, match="loc_hidden and loc_pool must be >= 1"):
            SpatialTransformer(**bad)


def test_build_once_and_unbuilt_forward() -> None:
    stn = SpatialTransformer(where="output")
    with pytest.raises(RuntimeError, match="not built"):
        stn(torch.zeros(1, C, H, W))
    assert stn.build(C) == C
    weight = stn.localisation[0][0].weight
    assert stn.build(C) == C and stn.localisation[0][0].weight is weight  # no rebuild
    with pytest.raises(ValueError, match="built for 5 channels"):
        stn.build(3)
    cat = SpatialTransformer(where="output", num_transformers=2, in_channels=C)
    assert cat.build(C) == 2 * C  # built by hand, then handed to an encoder: still n C out
    with pytest.raises(ValueError, match="in_channels must be positive"):
        SpatialTransformer().build(0)


def test_theta_outline_and_parameters() -> None:
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    np.testing.assert_allclose(
        theta_outline(identity, H, W),
        [[-0.5, -0.5], [W - 0.5, -0.5], [W - 0.5, H - 0.5], [-0.5, H - 0.5]], atol=1e-12)
    zoom = params_to_theta(torch.tensor([0.5, 0.0, 0.0]), "attention")
    # the central half: u = ((+-0.5 + 1) * W - 1) / 2
    np.testing.assert_allclose(theta_outline(zoom, H, W)[0], [(0.5 * W - 1) / 2, (0.5 * H - 1) / 2])
    np.testing.assert_allclose(theta_outline(zoom, H, W)[2],
                               [(1.5 * W - 1) / 2, (1.5 * H - 1) / 2])
    sim = params_to_theta(torch.tensor([0.8, math.radians(30.0), 0.1, -0.2]), "similarity")
    read = theta_parameters(sim)
    assert read["scale"].item() == pytest.approx(0.8, abs=1e-6)
    assert read["rotation_deg"].item() == pytest.approx(30.0, abs=1e-4)
    assert (read["tx"].item(), read["ty"].item()) == pytest.approx((0.1, -0.2))


def test_plot_stn_writes_a_figure(tmp_path) -> None:
    torch.manual_seed(3)
    images = torch.rand(2, 3, 13, 17)
    theta = torch.stack([
        params_to_theta(torch.tensor([[0.6, 0.2, -0.1], [1.0, 0.0, 0.0]]), "attention"),
        params_to_theta(torch.tensor([[0.9, 0.5, 0.0, 0.1], [1.2, -0.4, 0.0, 0.0]]), "similarity"),
    ])  # (K=2, n=2, 2, 3)
    out = plot_stn(images, theta, tmp_path / "stn.png", output_size=(11, 11),
                   titles=["first", "second"])
    assert out == tmp_path / "stn.png"
    with Image.open(out) as im:
        assert im.size[0] > 100 and im.size[1] > 100
    assert [p.name for p in tmp_path.iterdir()] == ["stn.png"]  # no temporary left behind
    single = plot_stn(images[0], theta[0, 0], tmp_path / "one.png")  # (3, H, W) + (2, 3)
    assert single.stat().st_size > 0
    with pytest.raises(ValueError, match="theta"):
        plot_stn(images, theta[:1], tmp_path / "bad.png")


@pytest.mark.parametrize("localization", ["conv", "fc", "heatmap"])
def test_stn_learns_to_centre_a_blob(localization: str) -> None:
    """A task that rewards undoing a translation: a Gaussian blob at a random place in a 40 x 40
    image, the loss asks for it at the centre of a 9 x 9 crop. Trained with Adam, the
    predicted ``(t_x, t_y)`` must follow the blob (identity start: both constant, r undefined)."""
    torch.manual_seed(0)
    stn = SpatialTransformer(where="input", transform="translation", localization=localization,
                             output_size=9, in_channels=1)
    opt = torch.optim.Adam(stn.parameters(), lr=3e-3)
    yy, xx = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij")

    def blobs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        centre = torch.rand(n, 2) * 24 + 8  # (n, 2) pixel (x, y), edge units
        d2 = (xx + 0.5 - centre[:, :1, None]) ** 2 + (yy + 0.5 - centre[:, 1:, None]) ** 2
        return torch.exp(-d2 / (2 * 4.0**2)).unsqueeze(1), centre  # (n, 1, 40, 40)

    for _ in range(150):
        x, _ = blobs(32)
        loss = -stn(x)[:, :, 3:6, 3:6].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, centre = blobs(64)
    stn(x)
    shift = stn.last_theta[:, 0, :, 2]  # (64, 2) normalised (t_x, t_y)
    expected = centre / 20 - 1  # normalised blob centre
    for axis in range(2):
        r = torch.corrcoef(torch.stack([shift[:, axis], expected[:, axis]]))[0, 1]
        assert r > 0.95, (axis, float(r))
    assert (shift - expected).norm(dim=-1).mean() * 20 < 2.5  # pixels; identity: ~9


def test_stn_views_show_the_padding_colour_the_network_sees() -> None:
    """A stage at the input warps the *normalised* image, whose zero padding is the mean
    colour: the drawn view (``fill=mean``) shows that colour outside the image, not black,
    and inside it the plain warp."""
    from captioner.visualize import stn_views

    torch.manual_seed(5)
    images = torch.rand(1, 3, 9, 13)
    theta = params_to_theta(torch.tensor([[2.0, 0.0, 0.0]]), "attention")  # zoom out: borders
    mean = (0.5, 0.25, 0.75)
    shown = stn_views(images, theta, fill=mean)
    black = stn_views(images, theta)
    torch.testing.assert_close(black, warp(images, theta))
    corner = shown[0, :, 0, 0]  # samples far outside the image
    torch.testing.assert_close(corner, torch.tensor(mean))
    assert black[0, :, 0, 0].abs().max() == 0
    centre = (slice(None), slice(None), 4, 6)
    torch.testing.assert_close(shown[centre], black[centre])  # inside: the same warp
    # the encoder's own buffer as fill, as a bf16-true model holds it
    buffer = torch.tensor(mean).view(1, 3, 1, 1).bfloat16()
    torch.testing.assert_close(stn_views(images, theta, fill=buffer), shown, atol=4e-3, rtol=0)
