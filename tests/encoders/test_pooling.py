"""GridPool: adaptive average pooling whose backward stays deterministic (the matrix form)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captioner.encoders import ImageEncoder
from captioner.encoders.pooling import GridPool, adaptive_avg_pool2d_linear, pooling_matrix
from captioner.features import encoder_fingerprint
from tests.conftest import deterministic_algorithms


def test_pooling_matrix_by_hand():
    """5 -> 3: windows [0, 2), [1, 4), [3, 5) (floor(i 5 / 3), ceil((i + 1) 5 / 3))."""
    expected = torch.tensor([[1 / 2, 1 / 2, 0, 0, 0],
                             [0, 1 / 3, 1 / 3, 1 / 3, 0],
                             [0, 0, 0, 1 / 2, 1 / 2]])
    torch.testing.assert_close(pooling_matrix(5, 3), expected)
    # 2 -> 3 (more cells than positions): windows [0, 1), [0, 2), [1, 2)
    torch.testing.assert_close(pooling_matrix(2, 3),
                               torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]))


@pytest.mark.parametrize("h, w, size", [(7, 5, (3, 2)), (8, 8, (14, 14)), (9, 11, (4, 4)),
                                        (5, 5, (5, 5)), (1, 1, (3, 2)), (6, 9, (3, None)),
                                        (13, 7, 3)])
def test_the_matrix_form_equals_pytorchs_kernel_forward_and_backward(h, w, size):
    g = torch.Generator().manual_seed(h * 31 + w)
    x = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn_like(F.adaptive_avg_pool2d(x, size))
    ours = adaptive_avg_pool2d_linear(x, size)
    (grad_ours,) = torch.autograd.grad((ours * upstream).sum(), x)
    ref = F.adaptive_avg_pool2d(x, size)
    (grad_ref,) = torch.autograd.grad((ref * upstream).sum(), x)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-12, atol=1e-12)


def test_gridpool_takes_the_matrix_form_only_under_deterministic_algorithms(monkeypatch):
    """CUDA's adaptive pooling backward has no deterministic kernel (``deterministic: true``
    stopped training on a GPU at the first backward pass): under deterministic algorithms the
    kernel is not called at all; otherwise it is."""
    pool = GridPool((3, 2))
    x = torch.randn(2, 4, 7, 5, requires_grad=True)
    expected = F.adaptive_avg_pool2d(x, (3, 2))

    def kernel(*args, **kwargs):
        raise AssertionError("the kernel was called")

    monkeypatch.setattr("captioner.encoders.pooling.F.adaptive_avg_pool2d", kernel)
    with deterministic_algorithms():
        torch.testing.assert_close(pool(x), expected)
    with pytest.raises(AssertionError, match="the kernel was called"):
        pool(x)


def test_the_encoder_fingerprint_is_that_of_adaptive_avg_pool2d():
    """Caches extracted when the encoder pooled with ``nn.AdaptiveAvgPool2d`` stay valid."""
    torch.manual_seed(0)
    enc = ImageEncoder("shapes_cnn", weights=None, grid_size=(3, 5), freeze=False)
    assert isinstance(enc.pool, GridPool)
    ours = encoder_fingerprint(enc, 32)
    enc.pool = nn.AdaptiveAvgPool2d((3, 5))
    assert encoder_fingerprint(enc, 32) == ours
    enc.pool = nn.AdaptiveAvgPool2d((3, 4))  # a real change still changes it
    assert encoder_fingerprint(enc, 32) != ours
