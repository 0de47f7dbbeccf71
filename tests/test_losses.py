"""Training objective: masked NLL and the doubly stochastic penalty against hand computations."""

import math

import pytest
import torch

from captioner.losses import (
    attention_entropy,
    doubly_stochastic_penalty,
    masked_nll,
    sentence_log_likelihood,
)


def test_doubly_stochastic_penalty_by_hand():
    # B=1, T=3 (last step is padding), L=2
    alphas = torch.tensor([[[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]])
    step_mask = torch.tensor([[True, True, False]])
    # coverage = [0.8, 1.2]; penalty = (1-0.8)^2 + (1-1.2)^2 = 0.08
    assert math.isclose(doubly_stochastic_penalty(alphas, step_mask).item(), 0.08, rel_tol=1e-6)


def test_doubly_stochastic_penalty_is_mean_over_batch():
    a = torch.full((2, 1, 3), 1 / 3)
    mask = torch.tensor([[True], [False]])
    # image 0: 3 * (2/3)^2 = 4/3 ; image 1: nothing attended: 3 * 1 = 3
    assert math.isclose(doubly_stochastic_penalty(a, mask).item(), (4 / 3 + 3) / 2, rel_tol=1e-6)


def test_masked_nll_ignores_padding_and_reduces_per_sentence_or_token():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]],
                                     [[0.2, 0.2, 0.6], [0.3, 0.3, 0.4]]]))
    targets = torch.tensor([[1, 1], [2, 0]])  # pad_id 0 at (1, 1)
    total = -(math.log(0.25) + math.log(0.8) + math.log(0.6))
    assert math.isclose(masked_nll(logits, targets, 0, "sentence").item(), total / 2, rel_tol=1e-5)
    assert math.isclose(masked_nll(logits, targets, 0, "token").item(), total / 3, rel_tol=1e-5)


def test_packed_rows_give_the_grid_values_by_hand():
    """The rows computed by ``forward(skip_padding=True)``, scored where they are: B = 2, T = 3,
    positions (b T + t) 3, 0, 4, 1 (out of order, as the decoder's length order gives them);
    position 2 and 5 were not computed (padding targets)."""
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.3, 0.3, 0.4]])
    rows = torch.log(probs)  # (M=4, V=3), at positions 3, 0, 4, 1
    positions = torch.tensor([3, 0, 4, 1])
    targets = torch.tensor([[2, 0, 0], [1, 2, 0]])  # (B, T): (0, 1) is an inner padding target
    # scored: (0, 0) -> row 1 target 2: 0.1; (1, 0) -> row 0 target 1: 0.25;
    #         (1, 1) -> row 2 target 2: 0.6; (0, 1) is padding (row 3 ignored)
    per_caption = [-math.log(0.1), -(math.log(0.25) + math.log(0.6))]
    total = sum(per_caption)
    assert math.isclose(masked_nll(rows, targets, 0, "sentence", positions).item(), total / 2,
                        rel_tol=1e-6)
    assert math.isclose(masked_nll(rows, targets, 0, "token", positions).item(), total / 3,
                        rel_tol=1e-6)
    torch.testing.assert_close(sentence_log_likelihood(rows, targets, 0, positions),
                               -torch.tensor(per_caption))


def test_packed_rows_equal_the_zero_filled_grid_with_gradients():
    """Random rows: the packed loss and its gradient equal those of the same rows scattered into
    a zero-filled ``(B, T, V)`` grid (what the losses were given before)."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 5, 7
    targets = torch.tensor([[4, 2, 0, 0, 0], [1, 5, 6, 3, 0], [2, 0, 0, 0, 0]])
    positions = (targets != 0).flatten().nonzero().squeeze(1)[torch.randperm(7, generator=g)]
    rows = torch.randn(positions.shape[0], V, generator=g, requires_grad=True)  # (M, V)

    def grid() -> torch.Tensor:  # (B, T, V)
        return rows.new_zeros(B * T, V).index_copy(0, positions, rows).view(B, T, V)

    for reduction in ("sentence", "token"):
        packed = masked_nll(rows, targets, 0, reduction, positions)
        (g_packed,) = torch.autograd.grad(packed, rows)
        dense = masked_nll(grid(), targets, 0, reduction)
        (g_dense,) = torch.autograd.grad(dense, rows)
        torch.testing.assert_close(packed, dense)
        torch.testing.assert_close(g_packed, g_dense)
    torch.testing.assert_close(sentence_log_likelihood(rows, targets, 0, positions),
                               sentence_log_likelihood(grid(), targets, 0))


def test_mismatched_logits_are_a_clear_error():
    targets = torch.tensor([[1, 2], [3, 0]])
    with pytest.raises(ValueError, match=r"\(2, 3, 5\) do not match targets \(2, 2\)"):
        masked_nll(torch.zeros(2, 3, 5), targets)
    with pytest.raises(ValueError, match=r"\(6, 5\) do not match targets"):
        masked_nll(torch.zeros(6, 5), targets)
    rows = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.6, 0.4], [0.1, 0.9]]))
    flat = masked_nll(rows, torch.tensor([[1, 1], [0, 0]]), pad_id=0)  # (B T, V) rows in order
    assert math.isclose(flat.item(), -(math.log(0.5) + math.log(0.75)) / 2, rel_tol=1e-6)
    with pytest.raises(ValueError, match=r"do not match positions \(2,\)"):
        masked_nll(torch.zeros(3, 5), targets, positions=torch.tensor([0, 1]))


def test_losses_keep_float64_and_upcast_half():
    torch.manual_seed(2)
    logits = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[3, 1, 0, 0], [2, 5, 4, 0], [1, 1, 1, 1]])
    assert masked_nll(logits, targets).dtype == torch.float64
    assert sentence_log_likelihood(logits, targets).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x: masked_nll(x, targets, reduction="token"),
                                     (logits,))
    half = masked_nll(logits.detach().half(), targets)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(masked_nll(logits, targets).item(), rel=1e-2)


def test_attention_entropy_normalises_weights_that_do_not_sum_to_one():
    """Guards the row normalisation of ``attention_entropy``: local-p weights need not sum to
    1, and ``H`` is the entropy of ``alpha / sum(alpha)``. B=1, T=2 (second step padding), L=2.
    Step 0: [0.2, 0.2] -> p = [0.5, 0.5], H = log 2 = 0.693147 (unnormalised: -2 * 0.2 log 0.2
    = 0.643775). [0.25, 0.25] would not tell them apart (log 2 either way). The padded step
    [0.1, 0.6] (H 0.410 normalised) must add nothing."""
    alphas = torch.tensor([[[0.2, 0.2], [0.1, 0.6]]])
    step_mask = torch.tensor([[True, False]])
    h = attention_entropy(alphas, step_mask)
    assert h.shape == (1,)
    assert h.item() == pytest.approx(math.log(2), abs=1e-6)  # 0.693147
