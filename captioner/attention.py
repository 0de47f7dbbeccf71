r"""Attention over annotation vectors: score functions, masked softmax and context.

An attention module maps a query ``h`` (the decoder state, ``(B, N)``) and keys ``a``
(annotation vectors, ``(B, L, D)``) to weights ``alpha`` ``(B, L)`` that sum to 1 over the
unmasked positions, and the decoder forms the context ``z = sum_i alpha_i a_i`` by a batched
matmul. Splitting ``score()`` (the energies ``e_i``) from the softmax follows OpenNMT-py; the
key projection that does not depend on the query is computed once per image by
:meth:`Attention.project_keys` (joeynmt's ``compute_proj_keys``), not at every time step.

Soft attention (Xu et al. 2015, Section 4.2, Eqs. 4-5)::

    e_ti     = f_att(a_i, h_{t-1})
    alpha_ti = exp(e_ti) / sum_k exp(e_tk)          (masked positions: exactly 0)

Score functions live in this module and are registered in :data:`ATTENTION_REGISTRY`.
"""

from __future__ import annotations

import torch
from torch import nn


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dimension that gives masked positions exactly zero weight.

    Args:
        scores: energies ``(B, L)``.
        mask: ``(B, L)`` bool, ``True`` for valid positions, or ``None``.

    Returns:
        ``(B, L)`` weights summing to 1 over valid positions.
    """
    if mask is None:
        return torch.softmax(scores, dim=-1)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).masked_fill(~mask, 0.0)


class Attention(nn.Module):
    """Base class: ``project_keys`` once, ``score`` per step, masked softmax.

    Subclasses implement :meth:`score` and optionally :meth:`project_keys`.

    Args:
        query_dim: ``N``, size of the decoder state used as query.
        key_dim: ``D``, size of an annotation vector.
    """

    def __init__(self, query_dim: int, key_dim: int) -> None:
        super().__init__()
        self.query_dim, self.key_dim = query_dim, key_dim

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor | None:
        """Query-independent part of the score, computed once per image.

        Args:
            keys: annotations ``(B, L, D)``.

        Returns:
            Projected keys (``(B, L, A)`` for additive attention) or ``None``.
        """
        return None

    def score(
        self, query: torch.Tensor, keys: torch.Tensor, proj_keys: torch.Tensor | None
    ) -> torch.Tensor:
        """Energies ``e`` ``(B, L)`` for query ``(B, N)`` and keys ``(B, L, D)``."""
        raise NotImplementedError

    def forward(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        proj_keys: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention weights.

        Args:
            query: ``(B, N)`` decoder state ``h_{t-1}``.
            keys: ``(B, L, D)`` annotations.
            proj_keys: output of :meth:`project_keys` (recomputed when ``None``).
            mask: ``(B, L)`` bool, ``True`` where a key is valid.

        Returns:
            ``alpha`` ``(B, L)``.
        """
        if proj_keys is None:
            proj_keys = self.project_keys(keys)
        return masked_softmax(self.score(query, keys, proj_keys), mask)


class AdditiveAttention(Attention):
    r"""Additive ("concat", MLP) attention of Bahdanau et al. (2015), Section 3.1 / A.1.2, the
    ``f_att`` of Show, Attend and Tell (Xu et al. 2015, Section 4.2; arctic-captions' code)::

        e_ti = w^T tanh(W_a a_i + W_h h_{t-1} + b)

    ``W_a a_i`` does not depend on ``t`` and is computed once per image.

    Args:
        query_dim: ``N``.
        key_dim: ``D``.
        attention_dim: ``A``, the hidden size of the score MLP.
    """

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int = 512) -> None:
        super().__init__(query_dim, key_dim)
        self.key_proj = nn.Linear(key_dim, attention_dim)  # W_a (and b)
        self.query_proj = nn.Linear(query_dim, attention_dim, bias=False)  # W_h
        self.energy = nn.Linear(attention_dim, 1, bias=False)  # w

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor:
        return self.key_proj(keys)  # (B, L, A)

    def score(
        self, query: torch.Tensor, keys: torch.Tensor, proj_keys: torch.Tensor | None
    ) -> torch.Tensor:
        q = self.query_proj(query).unsqueeze(1)  # (B, 1, A)
        return self.energy(torch.tanh(proj_keys + q)).squeeze(-1)  # (B, L)


ATTENTION_REGISTRY: dict[str, type[Attention]] = {
    "additive": AdditiveAttention,
    "concat": AdditiveAttention,
}


def build_attention(name: str, query_dim: int, key_dim: int, **kwargs) -> Attention:
    """Instantiate a registered score function by name (clear error listing valid names)."""
    if name not in ATTENTION_REGISTRY:
        raise ValueError(f"unknown attention {name!r}; available: {', '.join(sorted(ATTENTION_REGISTRY))}")
    return ATTENTION_REGISTRY[name](query_dim, key_dim, **kwargs)
