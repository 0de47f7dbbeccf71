"""Tests for the non-local block stage (captioner.encoders.non_local)."""

from __future__ import annotations

import math

import pytest
import torch

from captioner.encoders.non_local import PAIRWISE, NonLocalBlock

B, C, H, W = 3, 5, 7, 9  # distinct odd sizes


def _set_identity_weights(block: NonLocalBlock) -> None:
    """theta = phi = g = W_z = identity 1x1 maps (needs reduction=1, use_bn=False)."""
    with torch.no_grad():
        for conv in (block.theta, block.phi, block.g, block.w_z):
            if conv is None:
                continue
            conv.weight.zero_()
            for c in range(conv.weight.shape[0]):
                conv.weight[c, c] = 1.0
        block.w_z.bias.zero_()


@pytest.mark.parametrize("pairwise", PAIRWISE)
@pytest.mark.parametrize("use_bn", [True, False])
@pytest.mark.parametrize("subsample", [False, True])
def test_identity_at_initialisation(pairwise: str, use_bn: bool, subsample: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(B, C, H, W) * 2
    block = NonLocalBlock(pairwise=pairwise, use_bn=use_bn, subsample=subsample, in_channels=C)
    for mode in (True, False):  # train and eval batch norm
        block.train(mode)
        out = block(x)
        assert out.shape == x.shape
        torch.testing.assert_close(out, x, atol=1e-6, rtol=0)


def test_embedded_gaussian_hand_computed() -> None:
    # Two positions x_1 = (1, 0), x_2 = (0, 1); identity embeddings: f = softmax_j(x_i . x_j),
    # so y_1 = (e x_1 + x_2) / (e + 1), y_2 = (x_1 + e x_2) / (e + 1), z = y + x.
    block = NonLocalBlock(pairwise="embedded_gaussian", reduction=1, dims=1, use_bn=False,
                          in_channels=2)
    _set_identity_weights(block)
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (B=1, C=2, N=2): column n is x_n
    e = math.e
    expected = torch.tensor([[[1 + e / (e + 1), 1 / (e + 1)], [1 / (e + 1), 1 + e / (e + 1)]]])
    torch.testing.assert_close(block(x), expected)


def test_embedded_gaussian_equals_softmax_self_attention() -> None:
    """Random weights set by hand; reference computed position by position with math.exp."""
    torch.manual_seed(1)
    c, cb, h, w = 4, 2, 2, 3
    block = NonLocalBlock(pairwise="embedded_gaussian", reduction=2, use_bn=False, in_channels=c)
    wt, wp, wg, wz = torch.randn(cb, c), torch.randn(cb, c), torch.randn(cb, c), torch.randn(c, cb)
    bz = torch.randn(c)
    with torch.no_grad():
        block.theta.weight.copy_(wt.view(cb, c, 1, 1))
        block.phi.weight.copy_(wp.view(cb, c, 1, 1))
        block.g.weight.copy_(wg.view(cb, c, 1, 1))
        block.w_z.weight.copy_(wz.view(c, cb, 1, 1))
        block.w_z.bias.copy_(bz)
    x = torch.randn(1, c, h, w)
    positions = [x[0, :, r, s] for r in range(h) for s in range(w)]  # row-major, each (C,)
    expected = torch.empty(c, h * w)
    for i, xi in enumerate(positions):
        scores = [float((wt @ xi) @ (wp @ xj)) for xj in positions]
        weights = [math.exp(s) for s in scores]
        total = sum(weights)
        y = sum(wj / total * (wg @ xj) for wj, xj in zip(weights, positions))
        expected[:, i] = wz @ y + bz + xi
    torch.testing.assert_close(block(x)[0].flatten(1), expected, atol=1e-5, rtol=1e-5)


def test_dot_product_normalised_by_n() -> None:
    block = NonLocalBlock(pairwise="dot_product", reduction=1, dims=1, use_bn=False, in_channels=2)
    _set_identity_weights(block)
    x = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]]])  # positions (1,0), (2,1), (0,-1)
    # y_i = sum_j (x_i . x_j) x_j / 3
    xs = x[0].T
    y = torch.stack([sum((xi @ xj) * xj for xj in xs) / 3 for xi in xs]).T
    torch.testing.assert_close(block(x), x + y.unsqueeze(0))
    torch.testing.assert_close(block.attention(x)[0], (xs @ xs.T) / 3)


@pytest.mark.parametrize("pairwise", ["dot_product", "concatenation"])
def test_subsampled_attention_is_normalised_by_the_pooled_positions(pairwise: str) -> None:
    """With ``subsample`` ``C(x)`` is the number ``P_j`` of attended (pooled) positions, not
    ``P``: 5 positions max-pooled by 2 (ceil mode) to 3 keys."""
    block = NonLocalBlock(pairwise=pairwise, reduction=1, dims=1, subsample=True, use_bn=False,
                          in_channels=1)
    _set_identity_weights(block)
    x = torch.tensor([[[1.0, 3.0, -2.0, 0.5, 2.0]]])  # (B=1, C=1, P=5)
    q, k = x[0, 0, :, None], torch.tensor([[3.0, 0.5, 2.0]])  # k: max of (1, 3), (-2, .5), (2)
    if pairwise == "concatenation":
        with torch.no_grad():
            block.w_f.weight.copy_(torch.tensor([[1.0, -1.0]]))  # scores q_i - k_j
        f = torch.relu(q - k) / 3
    else:
        f = q * k / 3
    torch.testing.assert_close(block.attention(x)[0], f)
    torch.testing.assert_close(block(x), x + (f @ k.T).view(1, 1, 5))


def test_concatenation_relu_of_projected_pair() -> None:
    block = NonLocalBlock(pairwise="concatenation", reduction=1, dims=1, use_bn=False,
                          in_channels=2)
    _set_identity_weights(block)
    with torch.no_grad():
        block.w_f.weight.copy_(torch.tensor([[1.0, -1.0, 0.5, 2.0]]))  # w_1 = (1,-1), w_2 = (.5,2)
    x = torch.tensor([[[1.0, 0.0, -2.0], [0.0, 1.0, 1.0]]])
    xs = x[0].T
    w1, w2 = torch.tensor([1.0, -1.0]), torch.tensor([0.5, 2.0])
    f = torch.tensor([[max(0.0, float(xi @ w1 + xj @ w2)) for xj in xs] for xi in xs]) / 3
    torch.testing.assert_close(block.attention(x)[0], f)
    torch.testing.assert_close(block(x), x + (f @ xs).T.unsqueeze(0))


def test_gaussian_uses_x_itself() -> None:
    block = NonLocalBlock(pairwise="gaussian", reduction=1, dims=1, use_bn=False, in_channels=2)
    assert block.theta is None and block.phi is None
    _set_identity_weights(block)
    x = torch.tensor([[[0.5, -1.0, 2.0], [1.0, 0.0, 0.3]]])
    xs = x[0].T
    f = torch.softmax(xs @ xs.T, dim=1)
    torch.testing.assert_close(block.attention(x)[0], f)
    torch.testing.assert_close(block(x), x + (f @ xs).T.unsqueeze(0))


@pytest.mark.parametrize("pairwise", PAIRWISE)
@pytest.mark.parametrize("use_bn", [True, False])
def test_gradients_reach_every_weight_after_one_step(pairwise: str, use_bn: bool) -> None:
    """At initialisation the zero gamma (or zero W_z) blocks the gradient to theta, phi, g (and
    W_z under batch norm): only the last layer learns. After one SGD step every parameter of the
    block gets a non-zero gradient."""
    torch.manual_seed(2)
    x = torch.randn(B, C, H, W)
    target = torch.randn(B, C, H, W)
    block = NonLocalBlock(pairwise=pairwise, use_bn=use_bn, subsample=True, in_channels=C)
    params = dict(block.named_parameters())
    last = {"bn.weight", "bn.bias"} if use_bn else {"w_z.weight", "w_z.bias"}
    assert last <= set(params)
    opt = torch.optim.SGD(block.parameters(), lr=0.5)
    ((block(x) - target) ** 2).mean().backward()
    for name, p in params.items():
        nonzero = p.grad is not None and p.grad.abs().sum() > 0
        assert nonzero == (name in last), name
    opt.step()
    opt.zero_grad()
    ((block(x) - target) ** 2).mean().backward()
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _trained_like(block: NonLocalBlock) -> NonLocalBlock:
    with torch.no_grad():
        block.bn.weight.fill_(1.0)
    return block


def test_3d_block_on_a_video_tensor() -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 5, 3, 7, 9)  # (B, C, T, h, w)
    block = NonLocalBlock(dims=3, subsample=True, in_channels=5)
    torch.testing.assert_close(block(x), x, atol=1e-6, rtol=0)
    _trained_like(block)
    z = block(x)
    assert z.shape == x.shape and not torch.allclose(z, x)
    # every position attends to the spatially pooled positions (time is not pooled)
    assert block.attention(x).shape == (2, 3 * 7 * 9, 3 * 4 * 5)
    # non-local in space-time: changing the last frame changes the response in the first
    x2 = x.clone()
    x2[:, :, 2] += 1.0
    block.eval()
    assert not torch.allclose(block(x)[:, :, 0], block(x2)[:, :, 0])


def test_1d_block_on_a_sequence() -> None:
    torch.manual_seed(4)
    x = torch.randn(3, 5, 11)  # (B, C, N)
    block = NonLocalBlock(dims=1, pairwise="dot_product", subsample=True, in_channels=5)
    torch.testing.assert_close(block(x), x, atol=1e-6, rtol=0)
    _trained_like(block)
    assert block(x).shape == x.shape
    assert block.attention(x).shape == (3, 11, 6)


def test_2d_response_depends_on_far_positions() -> None:
    torch.manual_seed(5)
    block = _trained_like(NonLocalBlock(in_channels=C)).eval()
    x = torch.randn(1, C, H, W)
    x2 = x.clone()
    x2[0, :, H - 1, W - 1] += 3.0  # bottom-right corner only
    diff = (block(x2) - block(x))[0, :, 0, 0]  # response at the top-left corner
    assert diff.abs().max() > 1e-4


def test_rejects_wrong_shapes_and_options() -> None:
    block = NonLocalBlock(in_channels=C)
    with pytest.raises(ValueError, match="expects"):
        block(torch.randn(B, C, H))
    with pytest.raises(ValueError, match="expects"):
        block(torch.randn(B, C + 1, H, W))
    with pytest.raises(ValueError, match="unknown pairwise"):
        NonLocalBlock(pairwise="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dims"):
        NonLocalBlock(dims=4)  # type: ignore[arg-type]
    assert NonLocalBlock(reduction=4, in_channels=C).inner_channels == 1
    assert NonLocalBlock(reduction=8, in_channels=C).inner_channels == 1  # not C // 8 = 0


@pytest.mark.parametrize("pairwise", ["embedded_gaussian", "dot_product", "concatenation"])
def test_embedding_biases_change_the_attention(pairwise: str) -> None:
    """The paper's embeddings have no bias (the default); ``embedding_bias=True`` (the released
    code) adds those that change the output: on ``theta`` ``b^T phi(x_j)`` varies with ``j``,
    so a bias moves the weights ``f / C``. Under the softmax ``phi`` and ``g`` get none (they
    would cancel or duplicate ``W_z``'s bias / the batch norm's shift)."""
    torch.manual_seed(3)
    x = torch.randn(B, C, H, W)
    paper = NonLocalBlock(pairwise=pairwise, in_channels=C)
    assert all(not n.endswith("bias") for n, _ in paper.named_parameters()
               if n.split(".")[0] in ("theta", "phi", "g"))
    block = NonLocalBlock(pairwise=pairwise, embedding_bias=True, in_channels=C)
    softmax = pairwise == "embedded_gaussian"
    assert block.theta.bias is not None
    assert (block.phi.bias is None) == softmax and (block.g.bias is None) == softmax
    assert all(torch.count_nonzero(b) == 0 for n, b in block.named_parameters()
               if n.endswith("bias") and n.split(".")[0] in ("theta", "phi", "g"))  # zero init
    before = block.attention(x)
    with torch.no_grad():
        block.theta.bias.normal_()
    assert (block.attention(x) - before).abs().max() > 0.01 * before.abs().max()


def test_scaled_logits_option() -> None:
    """``scale=True``: softmax of ``theta^T phi / sqrt(C_b)`` (the released code's
    ``use_scale``), computed here by hand; the default (Eq. 2) is unscaled; other pairwise
    functions refuse it."""
    torch.manual_seed(6)
    x = torch.randn(B, C, H, W)
    plain = NonLocalBlock(reduction=1, in_channels=C)
    scaled = NonLocalBlock(reduction=1, scale=True, in_channels=C)
    scaled.load_state_dict(plain.state_dict())
    q = plain.theta(x).flatten(2).transpose(1, 2)  # (B, P, C_b)
    k = plain.phi(x).flatten(2)  # (B, C_b, P)
    torch.testing.assert_close(plain.attention(x), torch.softmax(q @ k, -1))
    torch.testing.assert_close(scaled.attention(x), torch.softmax(q @ k / math.sqrt(C), -1))
    with pytest.raises(ValueError, match="scale applies to the softmax"):
        NonLocalBlock(pairwise="dot_product", scale=True)
