r"""Stochastic "hard" attention of Show, Attend and Tell (Xu et al. 2015, Section 4.1).

The location ``s_t`` the decoder looks at is a latent variable drawn from the attention
weights, and the context is the annotation at that location::

    s_t ~ Multinoulli_L({alpha_ti})                           (Eq. 8)
    z_t = a_{s_t}                                             (Eq. 9; times the gate beta_t)

Training maximises the variational lower bound ``L_s = sum_s p(s | a) log p(y | s, a)`` with the
Monte Carlo estimator of Eq. 12 (``s~^m``, ``m = 1..M``, the sampled location sequences; the
paper calls their count ``N``, the package's LSTM size, so ``M`` here)::

    dL_s/dW ~ 1/M sum_m [ d log p(y | s~^m, a)/dW
                          + lambda_r (log p(y | s~^m, a) - b) d log p(s~^m | a)/dW
                          + lambda_e d H[s~^m]/dW ]

with the moving-average baseline ``b <- 0.9 b + 0.1 log p(y | s~, a)`` and the entropy ``H`` of
the multinoulli distributions. "To further improve the robustness of this learning rule, with
probability 0.5 for a given image, we set the sampled attention location s~ to its expected
value alpha" (Section 4.1): by default the choice is made **per image** (one draw for the whole
caption), as the paper states (the authors' code, arctic-captions, draws it once per
minibatch); ``expectation_per="step"`` draws it at every step instead. Steps that use the
expectation are differentiable (they are soft attention) and take no part in the REINFORCE
term. The surrogate loss whose gradient is this estimator is
:func:`captioner.losses.reinforce_surrogate`. The entropy ``H`` sums over every real step of
every caption (also those that used the expectation), as arctic-captions does; the paper leaves
it open.

``L_s`` has no doubly stochastic penalty: Eq. 14 is introduced for soft attention (Section
4.2.1), so the captioning module's ``doubly_stochastic`` defaults to 0 under hard attention.
arctic-captions adds its ``alpha_reg`` to the cost under hard attention too, but there it has
no effect: the gradients come from ``tensor.grad(cost, known_grads={alphas: ...})``, and Theano
takes a known gradient of ``alphas`` in place of the one the cost would give it, so the
penalty's gradient (which reaches the weights only through ``alphas``) is dropped. A non-zero
``doubly_stochastic`` adds it here, through the differentiable ``alpha``, as an option.

At test time the location is the most probable one (``test_rule="argmax"``; the weights returned
are then one-hot, so attention figures show the chosen cell) or the expectation
(``"expectation"``: soft attention with the hard-trained weights).

:class:`HardAttention` holds no parameters (the weights ``alpha`` come from any score function of
:mod:`captioner.attention`); it holds the baseline ``b`` as a buffer, so checkpoints carry it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class HardSelection:
    """The locations used at one step for a batch of ``B`` hypotheses.

    Attributes:
        context: ``(B, D)`` the context before the gate: ``a_{s_t}`` or ``sum_i alpha_i a_i``.
        weights: ``(B, L)`` the weights the context was formed with: one-hot rows for a chosen
            location, ``alpha`` normalised to sum to 1 (:func:`normalize_weights`; ``alpha``
            itself unless it comes from local-p) where the expectation was used.
        locations: ``(B,)`` the chosen ``s_t`` (the argmax where the expectation was used).
        log_probs: ``(B,)`` ``log p(s_t | a)`` of sampled locations, ``0`` elsewhere.
        sampled: ``(B,)`` bool, ``True`` where ``s_t`` was sampled.
    """

    context: torch.Tensor
    weights: torch.Tensor
    locations: torch.Tensor
    log_probs: torch.Tensor
    sampled: torch.Tensor


def normalize_weights(alpha: torch.Tensor) -> torch.Tensor:
    """``alpha / sum(alpha)`` over ``L`` (local-p weights need not sum to 1), ``(B, L)``."""
    return alpha / alpha.sum(-1, keepdim=True).clamp_min(torch.finfo(alpha.dtype).tiny)


class HardAttention(nn.Module):
    """Location sampling and the REINFORCE baseline of stochastic hard attention.

    Args:
        expectation_prob: probability that the expected context replaces the sample (0.5 in
            the paper); ``0`` gives pure REINFORCE.
        expectation_per: draw that choice once per image (``"sequence"``, the paper) or at every
            step (``"step"``).
        test_rule: ``"argmax"`` (most probable location) or ``"expectation"`` at test time.
        baseline_decay: ``0.9`` in ``b <- decay * b + (1 - decay) * mean log p(y | s~, a)``.
    """

    def __init__(
        self,
        expectation_prob: float = 0.5,
        expectation_per: Literal["sequence", "step"] = "sequence",
        test_rule: Literal["argmax", "expectation"] = "argmax",
        baseline_decay: float = 0.9,
    ) -> None:
        super().__init__()
        if not 0.0 <= expectation_prob <= 1.0:
            raise ValueError(f"expectation_prob must be in [0, 1], got {expectation_prob}")
        if expectation_per not in ("sequence", "step"):
            raise ValueError(
                f"expectation_per must be 'sequence' or 'step', got {expectation_per!r}")
        if test_rule not in ("argmax", "expectation"):
            raise ValueError(f"test_rule must be 'argmax' or 'expectation', got {test_rule!r}")
        self.expectation_prob, self.expectation_per = expectation_prob, expectation_per
        self.test_rule, self.baseline_decay = test_rule, baseline_decay
        self.register_buffer("baseline", torch.zeros(()))  # b
        self.register_buffer("baseline_started", torch.zeros((), dtype=torch.bool))

    def draw_expectation(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """``(B,)`` bool: which rows use the expected context (one Bernoulli draw each)."""
        return torch.rand(batch_size, device=device) < self.expectation_prob

    def forward(
        self,
        alpha: torch.Tensor,
        keys: torch.Tensor,
        sample: bool,
        use_expectation: torch.Tensor | None = None,
    ) -> HardSelection:
        """Choose the locations of one step.

        Args:
            alpha: ``(B, L)`` attention weights (zero at masked positions).
            keys: ``(B, L, D)`` annotations.
            sample: draw ``s_t ~ Multinoulli(alpha_t)`` (training); otherwise apply
                ``test_rule``.
            use_expectation: ``(B,)`` bool rows that use the expected context when sampling
                (drawn here when ``None``).

        Returns:
            :class:`HardSelection`.
        """
        B, L = alpha.shape
        probs = normalize_weights(alpha)  # (B, L)
        if sample:
            locations = torch.multinomial(probs.detach().float(), 1).squeeze(1)  # (B,)
            if use_expectation is None:
                use_expectation = self.draw_expectation(B, alpha.device)
            # rows that use the expectation report its argmax, as at test time
            locations = torch.where(use_expectation, probs.argmax(-1), locations)  # (B,)
        else:
            locations = probs.argmax(-1)  # (B,)
            use_expectation = torch.full((B,), self.test_rule == "expectation",
                                         dtype=torch.bool, device=alpha.device)
        one_hot = torch.zeros_like(probs).scatter_(1, locations.unsqueeze(1), 1.0)  # (B, L)
        weights = torch.where(use_expectation.unsqueeze(1), probs, one_hot)  # (B, L)
        context = torch.bmm(weights.unsqueeze(1), keys).squeeze(1)  # (B, D)
        sampled = ~use_expectation if sample else torch.zeros_like(use_expectation)
        picked = probs.gather(1, locations.unsqueeze(1)).squeeze(1)  # (B,)
        tiny = torch.finfo(picked.dtype).tiny
        log_probs = torch.where(sampled, torch.log(picked.clamp_min(tiny)),
                                torch.zeros_like(picked))  # (B,)
        return HardSelection(context, weights, locations, log_probs, sampled)

    @torch.no_grad()
    def update_baseline(self, rewards: torch.Tensor) -> None:
        """``b <- decay * b + (1 - decay) * mean(rewards)``; the first update sets ``b`` to the
        mean (the paper leaves ``b_0`` open; starting at 0 would push every early sample down).

        Args:
            rewards: ``(n,)`` ``log p(y | s~, a)`` of the sampled captions (no-op when empty).
        """
        if rewards.numel() == 0:
            return
        mean = rewards.detach().to(self.baseline.dtype).mean()  # float64 stays float64
        if bool(self.baseline_started):
            self.baseline.mul_(self.baseline_decay).add_((1.0 - self.baseline_decay) * mean)
        else:
            self.baseline.copy_(mean)
            self.baseline_started.fill_(True)
