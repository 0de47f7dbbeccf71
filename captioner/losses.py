r"""Training objective of soft-attention Show, Attend and Tell (Xu et al. 2015, Section 4.2.1).

The model is trained end to end by minimising the penalised negative log-likelihood (Eq. 14)::

    L_d = -log P(y | x) + lambda * sum_i^L (1 - sum_t^T alpha_ti)^2

(the paper writes the caption length ``C``; here it is the package's ``T`` decoding steps).

the second term being the *doubly stochastic* regularisation that encourages the model to pay
equal attention to every part of the image over the course of generation. Padded positions
(``t`` beyond a caption's length) contribute neither to the likelihood nor to ``sum_t alpha_ti``.

Stochastic hard attention (Section 4.1, :mod:`captioner.hard_attention`) adds the REINFORCE
terms of Eq. 12 through the surrogate :func:`reinforce_surrogate`, built from
:func:`sentence_log_likelihood` (the reward ``log p(y | s~, a)``) and :func:`attention_entropy`
(``H[s]``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def _scored_targets(logits: torch.Tensor, targets: torch.Tensor,
                    positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of logits ``(M, V)`` and their targets ``(M,)``.

    ``logits`` is ``(B, T, V)`` or its ``(B T, V)`` rows in order (``positions`` ``None``:
    ``M = B T``), or the ``(M, V)`` rows at the flat positions ``positions`` ``(M,)``
    (``b T + t``) of ``targets`` ``(B, T)``."""
    V = logits.shape[-1]
    flat_targets = targets.reshape(-1)  # (B T,)
    if positions is None:
        if logits.shape[:-1] not in (targets.shape, flat_targets.shape):
            raise ValueError(f"logits {tuple(logits.shape)} do not match targets "
                             f"{tuple(targets.shape)}: expected (B, T, V) or (B T, V) "
                             "with (B, T)")
        return logits.reshape(-1, V), flat_targets  # (B T, V), (B T,)
    if logits.dim() != 2 or logits.shape[0] != positions.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} do not match positions "
                         f"{tuple(positions.shape)}: expected (M, V) with (M,)")
    return logits, flat_targets.index_select(0, positions)  # (M, V), (M,)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is in a narrower float type (fp16, bf16 under mixed precision);
    float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def masked_nll(
    logits: torch.Tensor,
    targets: torch.Tensor,
    pad_id: int = 0,
    reduction: Literal["sentence", "token"] = "sentence",
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative log-likelihood over non-padding targets.

    Args:
        logits: ``(B, T, V)`` (or its ``(B T, V)`` rows), or with ``positions`` the ``(M, V)``
            rows that were computed (:attr:`captioner.decoder.DecoderOutput.token_logits`):
            every position with a non-padding target must be among them.
        targets: ``(B, T)`` token ids; ``pad_id`` positions are ignored.
        pad_id: padding index.
        reduction: ``"sentence"``: sum over tokens, mean over the batch (``-log P(y|x)`` of the
            paper, averaged over captions); ``"token"``: mean over all non-padding tokens.
        positions: ``(M,)`` flat positions ``b T + t`` of the rows of ``logits``, or ``None``.

    Returns:
        A scalar.
    """
    rows, row_targets = _scored_targets(logits, targets, positions)  # (M, V), (M,)
    nll = F.cross_entropy(at_least_float32(rows), row_targets, ignore_index=pad_id, reduction="sum")
    if reduction == "sentence":
        return nll / targets.shape[0]
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


def sentence_log_likelihood(logits: torch.Tensor, targets: torch.Tensor, pad_id: int = 0,
                            positions: torch.Tensor | None = None) -> torch.Tensor:
    """``log p(y | s, a)`` of each caption: the sum of its non-padding token log-probabilities.

    Args:
        logits: ``(B, T, V)`` (or its ``(B T, V)`` rows), or with ``positions`` the ``(M, V)``
            rows that were computed.
        targets: ``(B, T)`` token ids; ``pad_id`` positions are ignored.
        pad_id: padding index.
        positions: ``(M,)`` flat positions ``b T + t`` of the rows of ``logits``, or ``None``.

    Returns:
        ``(B,)``.
    """
    B, T = targets.shape
    rows, row_targets = _scored_targets(logits, targets, positions)  # (M, V), (M,)
    nll = F.cross_entropy(at_least_float32(rows), row_targets, ignore_index=pad_id,
                          reduction="none")  # (M,)
    if positions is None:
        return -nll.view(B, T).sum(1)
    return -nll.new_zeros(B).index_add(0, torch.div(positions, T, rounding_mode="floor"), nll)


def attention_entropy(alphas: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """Entropy ``H[s] = -sum_t sum_i alpha_ti log alpha_ti`` of each caption's locations.

    Rows are normalised first (local-p weights need not sum to 1); ``0 log 0 = 0``.

    Args:
        alphas: ``(B, T, L)`` attention weights.
        step_mask: ``(B, T)`` bool, ``True`` for steps that predict a real token.

    Returns:
        ``(B,)``.
    """
    p = alphas / alphas.sum(-1, keepdim=True).clamp_min(torch.finfo(alphas.dtype).tiny)
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)),
                        torch.zeros_like(p))  # (B, T, L)
    return -(plogp.sum(-1) * step_mask.to(p.dtype)).sum(1)


def reinforce_surrogate(
    log_likelihood: torch.Tensor,
    location_log_prob: torch.Tensor,
    entropy: torch.Tensor,
    baseline: torch.Tensor | float,
    lambda_r: float,
    lambda_e: float,
) -> torch.Tensor:
    r"""Surrogate loss whose gradient is minus the REINFORCE part of Eq. 12 (Section 4.1)::

        loss = -mean_n [ lambda_r (log p(y | s~^n, a) - b) log p(s~^n | a) + lambda_e H[s~^n] ]

    with the reward ``log p(y | s~^n, a) - b`` held constant. The likelihood term
    ``d log p(y | s~, a) / dW`` of Eq. 12 is the ordinary NLL of the caption under the sampled
    locations (:func:`masked_nll`), added separately.

    Args:
        log_likelihood: ``(B,)`` ``log p(y | s~, a)`` per caption (the reward).
        location_log_prob: ``(B,)`` ``log p(s~ | a) = sum_t log alpha_{t, s~_t}`` over the steps
            whose location was sampled (``0`` for a caption that used only expectations).
        entropy: ``(B,)`` ``H[s]``.
        baseline: ``b``.
        lambda_r: weight of the REINFORCE term.
        lambda_e: weight of the entropy term.

    Returns:
        A scalar.
    """
    advantage = (log_likelihood - baseline).detach()
    return -(lambda_r * advantage * location_log_prob + lambda_e * entropy).mean()
