"""The deterministic bilinear sampler against ``F.grid_sample``, and the STN's use of it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from captioner.encoders import ImageEncoder
from captioner.encoders.sampler import bilinear_sample
from captioner.encoders.stn import SpatialTransformer, warp
from tests.conftest import deterministic_algorithms


def grid_sample(x, grid):
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@pytest.mark.parametrize("h, w, h_out, w_out, spread", [(5, 7, 4, 6, 1.3), (3, 3, 5, 2, 2.5),
                                                         (1, 4, 3, 3, 1.0), (6, 1, 2, 5, 1.1)])
def test_equals_grid_sample_values_and_gradients(h, w, h_out, w_out, spread):
    """Coordinates inside, on the border and outside the map (zero padding)."""
    g = torch.Generator().manual_seed(h * 100 + w)
    x = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    grid = ((torch.rand(2, h_out, w_out, 2, generator=g, dtype=torch.float64) * 2 - 1)
            * spread).requires_grad_()
    upstream = torch.randn(2, 3, h_out, w_out, generator=g, dtype=torch.float64)
    ours = bilinear_sample(x, grid)
    ref = grid_sample(x, grid)
    assert ours.shape == ref.shape == (2, 3, h_out, w_out)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    grads_ours = torch.autograd.grad((ours * upstream).sum(), (x, grid))
    grads_ref = torch.autograd.grad((ref * upstream).sum(), (x, grid))
    for a, b in zip(grads_ours, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_non_finite_coordinates_give_what_grid_sample_gives():
    """NaN gives NaN (it used to index outside the map: an IndexError, on CUDA a device-side
    assert); +-inf and huge coordinates as grid_sample."""
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    grid = torch.tensor([[[[float("nan"), 0.0], [0.1, 0.2], [float("inf"), 0.0],
                           [1e30, -1e30], [-0.3, float("-inf")]]]], dtype=torch.float64)
    ours, ref = bilinear_sample(x, grid), grid_sample(x, grid)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    assert ours[..., 0].isnan().all() and ours[..., 1].isfinite().all()


def test_a_pixel_centre_reads_that_pixel_and_outside_reads_zero():
    """By hand on a 2 x 3 map: pixel (row 1, col 2) has centre u = 2, v = 1, i.e.
    x^s = (2 u + 1) / w - 1 = 2/3, y^s = (2 v + 1) / h - 1 = 1/2; far outside gives 0; half
    way between columns 0 and 1 of row 0 gives their mean."""
    x = torch.arange(6, dtype=torch.float64).view(1, 1, 2, 3)  # [[0, 1, 2], [3, 4, 5]]
    grid = torch.tensor([[[[2 / 3, 0.5], [5.0, 5.0], [-1 / 3, -0.5]]]], dtype=torch.float64)
    out = bilinear_sample(x, grid)  # (1, 1, 1, 3)
    torch.testing.assert_close(out.view(3), torch.tensor([5.0, 0.0, 0.5], dtype=torch.float64))


def test_warp_samples_without_grid_sample_under_deterministic_algorithms(monkeypatch):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 9, 7, generator=g, requires_grad=True)
    theta = torch.tensor([[[0.8, 0.1, 0.2], [-0.1, 0.9, -0.3]]]).repeat(2, 1, 1)
    expected = warp(x, theta, (5, 4))

    def refuse(*args, **kwargs):
        raise AssertionError("grid_sample was called")

    monkeypatch.setattr("captioner.encoders.stn.F.grid_sample", refuse)
    with deterministic_algorithms():
        torch.testing.assert_close(warp(x, theta, (5, 4)), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(AssertionError, match="grid_sample was called"):
        warp(x, theta, (5, 4))


@pytest.mark.parametrize("localization", ["conv", "fc", "heatmap"])
def test_an_stn_encoder_trains_alike_under_deterministic_algorithms(localization):
    """The same loss and gradients with and without deterministic algorithms (the sampler and
    the localisation's pooling take their deterministic forms)."""
    def grads(deterministic: bool):
        torch.manual_seed(0)
        stn = SpatialTransformer(where="input", transform="affine", localization=localization,
                                 loc_hidden=8)
        enc = ImageEncoder("shapes_cnn", weights=None, grid_size=3, freeze=False, stages=[stn])
        with torch.no_grad():  # away from the identity, so that the sampler interpolates
            stn_last = [p for p in stn.parameters()][-1]
            stn_last.add_(0.05 * torch.randn(stn_last.shape, generator=torch.Generator()
                                             .manual_seed(1)))
        images = torch.rand(2, 3, 33, 31, generator=torch.Generator().manual_seed(2))
        with deterministic_algorithms(deterministic):
            out = enc(images)
            out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in enc.parameters() if p.grad is not None]

    out_a, grads_a = grads(False)
    out_b, grads_b = grads(True)
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
