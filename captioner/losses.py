r"""Training objective of soft-attention Show, Attend and Tell (Xu et al. 2015, Section 4.2.1).

The model is trained end to end by minimising the penalised negative log-likelihood (Eq. 14)::

    L_d = -log P(y | x) + lambda * sum_i^L (1 - sum_t^C alpha_ti)^2

the second term being the *doubly stochastic* regularisation that encourages the model to pay
equal attention to every part of the image over the course of generation. Padded positions
(``t`` beyond a caption's length) contribute neither to the likelihood nor to ``sum_t alpha_ti``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def masked_nll(
    logits: torch.Tensor,
    targets: torch.Tensor,
    pad_id: int = 0,
    reduction: Literal["sentence", "token"] = "sentence",
) -> torch.Tensor:
    """Negative log-likelihood over non-padding targets.

    Args:
        logits: ``(B, T, V)``.
        targets: ``(B, T)`` token ids; ``pad_id`` positions are ignored.
        pad_id: padding index.
        reduction: ``"sentence"``: sum over tokens, mean over the batch (``-log P(y|x)`` of the
            paper, averaged over captions); ``"token"``: mean over all non-padding tokens.

    Returns:
        A scalar.
    """
    B, T, V = logits.shape
    nll = F.cross_entropy(logits.reshape(B * T, V).float(), targets.reshape(B * T),
                          ignore_index=pad_id, reduction="sum")
    if reduction == "sentence":
        return nll / B
    return nll / (targets != pad_id).sum().clamp_min(1)


def doubly_stochastic_penalty(alphas: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """``mean_b sum_i (1 - sum_t alpha_bti)^2`` over valid steps only.

    Args:
        alphas: ``(B, T, L)`` attention weights.
        step_mask: ``(B, T)`` bool, ``True`` for steps that predict a real (non-pad) token.

    Returns:
        A scalar (multiply by ``lambda``).
    """
    coverage = (alphas * step_mask.unsqueeze(-1).to(alphas.dtype)).sum(dim=1)  # (B, L)
    return ((1.0 - coverage) ** 2).sum(dim=1).mean()
