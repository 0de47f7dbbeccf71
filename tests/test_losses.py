"""Training objective: masked NLL and the doubly stochastic penalty against hand computations."""

import math

import torch

from captioner.losses import doubly_stochastic_penalty, masked_nll


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
