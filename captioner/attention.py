r"""Attention over annotation vectors: score functions, masked softmax, local windows.

An attention module maps a query ``h`` (the decoder state, ``(B, N)``) and keys ``a``
(annotation vectors, ``(B, L, D)``) to weights ``alpha`` ``(B, L)`` over the unmasked positions,
and the decoder forms the context ``z = sum_i alpha_i a_i`` by a batched matmul. Splitting
``score()`` (the energies ``e_i``) from the softmax follows OpenNMT-py; the key projection that
does not depend on the query is computed once per image by :meth:`Attention.project_keys`
(joeynmt's ``compute_proj_keys``), not at every time step.

Soft attention (Xu et al. 2015, Section 3.1.2, Eqs. 4-5; its deterministic form, Section 4.2)::

    e_ti     = f_att(a_i, h_{t-1})
    alpha_ti = exp(e_ti) / sum_k exp(e_tk)          (masked positions: exactly 0)

The family (each class documents its equation; every constructor is
``(query_dim, key_dim, **hyper)``, i.e. a ``Callable[[int, int], Attention]``). YAML names a
score function by its class path, ``attention: {class_path: captioner.attention.X, init_args:
{...}}``, so a new one is one :class:`Attention` subclass in any module, with no other edit;
:data:`ATTENTION_REGISTRY` only gives the short names below for Python use
(:func:`build_attention`):

==================  ===================================================  =========================
name                energy / weights                                     paper
==================  ===================================================  =========================
``additive``        ``w^T tanh(W_a a_i + W_h h)``                        Bahdanau 2015; Xu 2015
``dot``             ``h^T a_i``                                          Luong 2015, Sec. 3.1
``general``         ``h^T W a_i``                                        Luong 2015, Sec. 3.1
``scaled_dot``      ``(W_q h)^T (W_k a_i) / sqrt(A)``                    Vaswani 2017, Sec. 3.2.1
``cosine``          ``beta * cos(W_k h, a_i)``, ``beta = softplus(.)``   Graves 2014, Sec. 3.3.1
``location``        ``alpha = softmax(W_a h)``, fixed ``L``              Luong 2015, Sec. 3.1
``local_m``         any score inside a window around ``p_t = t``         Luong 2015, Sec. 3.2
``local_p``         window and Gaussian around a predicted ``p_t``       Luong 2015, Sec. 3.2
``local_2d``        ``local_p`` over an ``H x W`` grid                   2-D analogue of local-p
``none``            uniform, and the decoder feeds no context            Vinyals 2015 (ablation)
==================  ===================================================  =========================

Only the score functions are borrowed from Luong et al.: here they score the *previous* state
``h_{t-1}`` inside the Show, Attend and Tell / Bahdanau decoder (attention before the LSTM step,
the context fed into it), where Luong's architecture scores the current ``h_t`` after the step
and feeds ``h~_t = tanh(W_c [c_t; h_t])`` to the output and to the next input; that
architecture is not implemented. The equations quoted in the classes read ``h_{t-1}`` for
their ``h_t``.

Position-aware attention (``local_m``) needs the decoding step ``t``: :meth:`Attention.forward`
takes an optional keyword ``step`` that the decoder passes and every other module ignores.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from captioner.compiled import CompiledOrEager


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

    Subclasses implement :meth:`score` and optionally :meth:`project_keys`; local attention
    overrides :meth:`forward`.

    Attributes:
        provides_context: ``False`` only for :class:`NoAttention`: the decoder then feeds no
            context vector ``z_t`` at all.
        reads_keys: whether :meth:`score` (or :meth:`forward`) reads the annotations
            themselves; ``False`` where it reads only :meth:`project_keys`' output, so that
            beam search can leave an image's annotations unrepeated across its hypotheses
            (:meth:`captioner.decoder.AttentionDecoder.expand_beams`).

    Args:
        query_dim: ``N``, size of the decoder state used as query.
        key_dim: ``D``, size of an annotation vector.
    """

    provides_context: bool = True
    reads_keys: bool = True

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
        step: int | None = None,
    ) -> torch.Tensor:
        """Attention weights.

        Args:
            query: ``(B, N)`` decoder state ``h_{t-1}``.
            keys: ``(B, L, D)`` annotations.
            proj_keys: output of :meth:`project_keys` (recomputed when ``None``).
            mask: ``(B, L)`` bool, ``True`` where a key is valid.
            step: the decoding step ``t`` (0-based); used only by position-aware attention.

        Returns:
            ``alpha`` ``(B, L)``.
        """
        if proj_keys is None:
            proj_keys = self.project_keys(keys)
        return masked_softmax(self.score(query, keys, proj_keys), mask)


# ---------------------------------------------------------------------- content-based scores
class AdditiveAttention(Attention):
    r"""Additive ("concat", MLP) attention of Bahdanau et al. (2015), Section 3.1 / A.1.2, the
    ``f_att`` of Show, Attend and Tell (Xu et al. 2015, Section 4.2; arctic-captions' code)::

        e_ti = w^T tanh(k_i + W_h h_{t-1})
        k_i  = W_a a_i + b              (key_activation="identity", the default)
        k_i  = tanh(W_a a_i + b)        (key_activation="tanh")

    The keys ``k_i`` ``(B, L, A)`` do not depend on ``t`` and are computed once per image
    (:meth:`project_keys`).

    ``key_activation="tanh"`` is the authors' COCO attention: arctic-captions'
    ``evaluate_coco.py`` sets ``n_layers_att = 2``, with which ``capgen.py``
    (``param_init_lstm_cond``, ``lstm_cond_layer``) maps the annotations twice, with no
    nonlinearity between the two maps, squashes once, and adds no bias to the state's term::

        pctx_i = tanh(W_att_1 (Wc_att a_i + b_att) + b_att_1)        (once per image)
        e_ti   = U_att tanh(pctx_i + Wd_att h_{t-1}) + c_tt

    (column vectors; their code multiplies rows). The two maps compose into one affine map
    ``W_a a_i + b`` (``W_a = W_att_1 Wc_att``, ``b = W_att_1 b_att + b_att_1``; their
    ``A = D``), so the function class is the same: ``b`` inside the inner ``tanh``, no bias on
    ``W_h h`` (``Wd_att`` has none) and no ``c_tt`` (one constant added to every ``e_ti``,
    which the softmax cancels).

    The hidden layer ``tanh(x)`` over ``(B, L, A)`` is the largest elementwise cost of a
    decoding step. On CPU, ATen's ``tanh`` kernel is about 6x slower than its ``sigmoid``
    (23 ms against 3.8 ms for 3.2 M floats on one AVX2 core), so by default the same function
    is computed through ``tanh(x) = 2 sigmoid(2x) - 1``::

        e_ti = 2 w^T sigmoid(2 k_i + 2 W_h h_{t-1}) - sum_k w_k

    with ``2 k_i`` cached by :meth:`project_keys` (doubled after ``key_activation``'s squash).
    The energies agree with the ``tanh`` form to float32 rounding (``sum_k w_k`` is shared by
    all ``i``, so the weights ``alpha`` do not even see that term); ``tanh_via_sigmoid=False``
    computes ``tanh`` itself.
    The shift enters the ``w^T`` GEMV as its bias, so in bf16 the energies are rounded once at
    their own scale, not after a cancellation against ``sum_k w_k`` (their error is then close
    to the ``tanh`` form's).

    Without autograd (search over ``B K`` hypotheses) the hidden layer of all rows, e.g.
    ``(160, 196, 512)`` = 64 MB at beam 5, would be written to memory, squashed and read back
    at every step; :meth:`score` then forms and reduces it ``chunk_elements`` at a time (a few
    rows), so that each chunk stays in a CPU's cache. The energies are the same row by row. With
    ``compile_search`` the search's energies come from one ``torch.compile``\ d loop instead
    (:func:`fused_energies`: hidden layer, squashing and ``w^T`` fused, nothing written but
    ``e``); 1.05-1.3x faster beam search in BENCHMARKS.md, at the cost of compiling once per
    process (seconds; a C++ compiler is needed on CPU; without one, a warning and the eager
    path).

    Args:
        query_dim: ``N``.
        key_dim: ``D``.
        attention_dim: ``A``, the hidden size of the score MLP.
        key_activation: ``"identity"`` (``k_i = W_a a_i + b``, one layer) or ``"tanh"``
            (``k_i = tanh(W_a a_i + b)``, the authors' COCO ``n_layers_att = 2``); see above.
        tanh_via_sigmoid: compute the hidden layer as ``2 sigmoid(2x) - 1`` (see above).
        chunk_elements: without autograd, on a CPU, the hidden layer's size (elements)
            formed at once; ``0`` forms it whole (as on a GPU, where chunks would only add
            kernel launches).
        compile_search: without autograd, compute the energies with the compiled
            :func:`fused_energies` (off by default: each process compiles it on first use).
    """

    reads_keys = False  # score reads proj_keys only

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int = 512,
                 key_activation: Literal["identity", "tanh"] = "identity",
                 tanh_via_sigmoid: bool = True, chunk_elements: int = 1 << 19,
                 compile_search: bool = False) -> None:
        super().__init__(query_dim, key_dim)
        if key_activation not in ("identity", "tanh"):
            raise ValueError(f"key_activation must be 'identity' or 'tanh' (the authors' COCO "
                             f"n_layers_att=2), got {key_activation!r}")
        self.key_proj = nn.Linear(key_dim, attention_dim)  # W_a and b
        self.query_proj = nn.Linear(query_dim, attention_dim, bias=False)  # W_h
        self.energy = nn.Linear(attention_dim, 1, bias=False)  # w
        self.key_activation = key_activation
        self.tanh_via_sigmoid = tanh_via_sigmoid
        self.chunk_elements = chunk_elements
        self.compile_search = compile_search

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """Keys ``k_i`` ``(B, L, A)``: ``W_a a_i + b``, squashed by ``tanh`` when
        ``key_activation="tanh"``, then doubled when ``tanh_via_sigmoid``."""
        proj = self.key_proj(keys)  # (B, L, A)
        if self.key_activation == "tanh":
            proj = torch.tanh(proj)  # (B, L, A); its backward reads it: no in-place doubling
            return proj * 2.0 if self.tanh_via_sigmoid else proj
        return proj.mul_(2.0) if self.tanh_via_sigmoid else proj

    def energies(self, proj_keys: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``e = w^T tanh(k + q)`` from :meth:`project_keys`' output ``(..., L, A)``
        and projected queries ``q = W_h h`` ``(..., 1, A)`` (broadcast) -> ``(..., L)``."""
        if not self.tanh_via_sigmoid:
            return self.energy(torch.tanh(proj_keys + q)).squeeze(-1)
        squashed = torch.add(proj_keys, q, alpha=2.0).sigmoid_()  # (..., L, A)
        w = self.energy.weight  # (1, A)
        # w^T sigma - sum_k w_k / 2 in one GEMV (the shift as its bias): in bf16 the output is
        # rounded once, at the scale of e; subtracting sum_k w_k after rounding w^T sigma would
        # lose e's digits to the cancellation when |sum_k w_k| >> |e|
        return 2.0 * F.linear(squashed, w, -0.5 * w.sum().reshape(1)).squeeze(-1)

    def score(
        self, query: torch.Tensor, keys: torch.Tensor, proj_keys: torch.Tensor | None
    ) -> torch.Tensor:
        q = self.query_proj(query).unsqueeze(1)  # (B, 1, A)
        if self.compile_search and not torch.is_grad_enabled():
            e = _FUSED_ENERGIES(proj_keys, q, self.energy.weight.view(-1), self.tanh_via_sigmoid)
            return e.to(torch.promote_types(proj_keys.dtype, q.dtype))  # (B, L), eager's dtype
        B, L, A = proj_keys.shape
        rows = max(1, self.chunk_elements // (L * A))  # rows per chunk
        if (torch.is_grad_enabled() or self.chunk_elements <= 0 or rows >= B
                or proj_keys.device.type != "cpu"):  # chunks fit a CPU's cache; a GPU gets one
            return self.energies(proj_keys, q)  # (B, L)
        return torch.cat([self.energies(proj_keys[i : i + rows], q[i : i + rows])
                          for i in range(0, B, rows)])  # (B, L)


def fused_energies(proj_keys: torch.Tensor, q: torch.Tensor, w: torch.Tensor,
                   sigmoid_form: bool) -> torch.Tensor:
    """:meth:`AdditiveAttention.energies` written as one elementwise chain and a reduction, for
    ``torch.compile`` to fuse: ``(..., L, A)`` projected keys, ``(..., 1, A)`` projected queries
    and ``w`` ``(A,)`` -> ``e`` ``(..., L)``."""
    if sigmoid_form:  # 2 w^T sigmoid(2 k + 2 q) - sum_k w_k
        return 2.0 * ((torch.sigmoid(proj_keys + 2.0 * q) * w).sum(-1) - 0.5 * w.sum())
    return (torch.tanh(proj_keys + q) * w).sum(-1)  # w^T tanh(k + q)


# compiled on the first search of a model with compile_search, for any batch size (dynamic)
_FUSED_ENERGIES = CompiledOrEager(fused_energies, dynamic=True)


def set_compile_search(model: nn.Module, on: bool = True) -> int:
    """Switch ``compile_search`` of every :class:`AdditiveAttention` in ``model`` (e.g. a
    decoder loaded from a checkpoint trained without it); returns how many were switched."""
    found = [m for m in model.modules() if isinstance(m, AdditiveAttention)]
    for m in found:
        m.compile_search = on
    return len(found)


class DotAttention(Attention):
    r"""Dot-product score of Luong et al. (2015), Section 3.1 ("dot")::

        e_ti = h_{t-1}^T a_i

    No parameters; the query and the keys must have the same size (``N == D``). For different
    sizes use :class:`GeneralAttention` or :class:`ScaledDotProductAttention`.

    Args:
        query_dim: ``N``.
        key_dim: ``D``, must equal ``N``.

    Raises:
        ValueError: when ``N != D``.
    """

    def __init__(self, query_dim: int, key_dim: int) -> None:
        super().__init__(query_dim, key_dim)
        if query_dim != key_dim:
            raise ValueError(
                f"dot attention needs query_dim == key_dim, got query_dim={query_dim} (decoder "
                f"hidden size N) and key_dim={key_dim} (annotation size D); use "
                "GeneralAttention or ScaledDotProductAttention for different sizes"
            )

    def score(
        self, query: torch.Tensor, keys: torch.Tensor, proj_keys: torch.Tensor | None
    ) -> torch.Tensor:
        return torch.bmm(keys, query.unsqueeze(-1)).squeeze(-1)  # (B, L)


class GeneralAttention(Attention):
    r"""Bilinear ("general") score of Luong et al. (2015), Section 3.1::

        e_ti = h_{t-1}^T W_a a_i

    ``W_a a_i`` (``(B, L, N)``) is computed once per image.

    Args:
        query_dim: ``N``.
        key_dim: ``D``.
    """

    reads_keys = False  # score reads proj_keys only

    def __init__(self, query_dim: int, key_dim: int) -> None:
        super().__init__(query_dim, key_dim)
        self.key_proj = nn.Linear(key_dim, query_dim, bias=False)  # W_a: D -> N

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor:
        return self.key_proj(keys)  # (B, L, N)

    def score(
        self, query: torch.Tensor, keys: torch.Tensor, proj_keys: torch.Tensor | None
    ) -> torch.Tensor:
        return torch.bmm(proj_keys, query.unsqueeze(-1)).squeeze(-1)  # (B, L)


class ScaledDotProductAttention(Attention):
    r"""Scaled dot-product score of Vaswani et al. (2017), Section 3.2.1, with learned
    projections of query and keys to a common size ``A`` (one head of Section 3.2.2)::

        e_ti = (W_q h_{t-1})^T (W_k a_i) / sqrt(A)

    Args:
        query_dim: ``N``.
        key_dim: ``D``.
        attention_dim: ``A``, the common size ``d_k``.
    """

    reads_keys = False  # score reads proj_keys only

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int = 512) -> None:
        super().__init__(query_dim, key_dim)
        self.attention_dim = attention_dim
        self.query_proj = nn.Linear(query_dim, attention_dim, bias=False)  # W_q
        self.key_proj = nn.Linear(key_dim, attention_dim, bias=False)  # W_k

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor:
        return self.key_proj(keys)  # (B, L, A)

    def score(
        self, query: torch.Tensor, keys: torch.Tensor, proj_keys: torch.Tensor | None
    ) -> torch.Tensor:
        q = self.query_proj(query).unsqueeze(-1)  # (B, A, 1)
        return torch.bmm(proj_keys, q).squeeze(-1) / math.sqrt(self.attention_dim)  # (B, L)


class CosineAttention(Attention):
    r"""Content-based addressing of Neural Turing Machines (Graves et al. 2014, Section 3.3.1,
    Eqs. 5-6). The controller state emits a key vector ``k_t`` and a key strength ``beta_t``::

        k_t    = W_k h_{t-1} + b_k                      (a D-vector, compared with the a_i)
        beta_t = softplus(w_b^T h_{t-1} + b_b)           (>= 0; sharpens the focus)
        K[u, v] = u . v / (|u| |v|)                      (cosine similarity, Eq. 6)
        e_ti   = beta_t K[k_t, a_i]                      (Eq. 5 after the softmax)

    The normalised keys ``a_i / |a_i|`` are computed once per image.

    Args:
        query_dim: ``N``.
        key_dim: ``D``.
        eps: guards the norms of zero vectors.
    """

    reads_keys = False  # score reads proj_keys only

    def __init__(self, query_dim: int, key_dim: int, eps: float = 1e-8) -> None:
        super().__init__(query_dim, key_dim)
        self.eps = eps
        self.key_vector = nn.Linear(query_dim, key_dim)  # W_k, b_k
        self.strength = nn.Linear(query_dim, 1)  # w_b, b_b

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor:
        return F.normalize(keys, dim=-1, eps=self.eps)  # (B, L, D)

    def score(
        self, query: torch.Tensor, keys: torch.Tensor, proj_keys: torch.Tensor | None
    ) -> torch.Tensor:
        k = F.normalize(self.key_vector(query), dim=-1, eps=self.eps)  # (B, D)
        beta = F.softplus(self.strength(query))  # (B, 1)
        return beta * torch.bmm(proj_keys, k.unsqueeze(-1)).squeeze(-1)  # (B, L)


# ---------------------------------------------------------------------- position-based scores
class LocationAttention(Attention):
    r"""Location-based attention of Luong et al. (2015), Section 3.1, Eq. 8::

        alpha_t = softmax(W_a h_{t-1})

    The weights depend on the query only, so the number of positions is fixed at construction
    (the paper's fixed maximum source length; here the grid size ``L = H * W``).

    Args:
        query_dim: ``N``.
        key_dim: ``D`` (unused).
        num_positions: ``L``.
        bias: add a learned bias ``b`` (``softmax(W_a h + b)``, a prior over positions); Eq. 8
            has none (the default). Models trained before 2026-11-24 had it: load them with
            ``bias: true``.

    Raises:
        ValueError: at run time, when the keys do not have ``num_positions`` positions.
    """

    def __init__(self, query_dim: int, key_dim: int, num_positions: int = 196,
                 bias: bool = False) -> None:
        super().__init__(query_dim, key_dim)
        if num_positions <= 0:
            raise ValueError(f"num_positions must be positive, got {num_positions}")
        self.num_positions = num_positions
        self.location = nn.Linear(query_dim, num_positions, bias=bias)  # W_a: N -> L

    def score(
        self, query: torch.Tensor, keys: torch.Tensor, proj_keys: torch.Tensor | None
    ) -> torch.Tensor:
        if keys.shape[1] != self.num_positions:
            raise ValueError(
                f"location-based attention was built for num_positions={self.num_positions} "
                f"but got L={keys.shape[1]} annotations; set num_positions to the grid's H * W"
            )
        return self.location(query)  # (B, L)


class NoAttention(Attention):
    r"""No attention: the Show and Tell baseline (Vinyals et al. 2015, Section 3.1).

    The image enters the decoder only at the start, through the initial state computed from the
    mean annotation (``h_0, c_0 = tanh(f_init(mean_i a_i))``, so the decoder's
    ``init_from_mean`` must be on). The decoder sees ``provides_context = False`` and feeds no
    context vector: no ``z_t`` in the LSTM input (Eq. 1), no ``L_z z_t`` in the output (Eq. 7),
    no gate. The weights returned are uniform over the valid positions, only so that attention
    maps and metrics keep their shapes (attention correctness then equals chance).

    Args:
        query_dim: ``N`` (unused).
        key_dim: ``D`` (unused).
    """

    provides_context = False

    def score(
        self, query: torch.Tensor, keys: torch.Tensor, proj_keys: torch.Tensor | None
    ) -> torch.Tensor:
        return keys.new_zeros(keys.shape[:2])  # (B, L)


# ---------------------------------------------------------------------- local attention
class _LocalAttention(Attention):
    r"""Shared machinery of local attention (Luong et al. 2015, Section 3.2).

    Position ``s`` (0-based) of a sequence sits at coordinate ``s + 1/2``; cell ``(r, c)`` of a
    grid at ``(r + 1/2, c + 1/2)``, so a centre ``p`` in ``[0, S]`` (``[0, H] x [0, W]``) spans
    the positions symmetrically. Given a centre ``p_t``::

        window_t = {s : |s + 1/2 - p_t| <= D_w}                     (D_w = ``window``)
        alpha_t  = softmax over window_t of score(h_{t-1}, a_s)      (0 outside the window)
        alpha_ts <- alpha_ts * exp(-(s + 1/2 - p_t)^2 / (2 sigma^2)), sigma = D_w / 2   (local-p)

    (on a grid the window is the square of cells within ``D_w`` of the centre along both axes,
    and the distance is Euclidean). A row whose window holds only masked positions (possible on
    a masked grid) falls back to all its valid positions. Luong et al. do **not** renormalise
    after the Gaussian, so with ``gaussian`` the weights sum to at most 1; ``renormalize=True``
    divides by their sum.

    Args:
        query_dim: ``N``.
        key_dim: ``D``.
        score: the aligned score, a ``Callable[[int, int], Attention]`` (default
            :class:`GeneralAttention`, Luong's best local-p model).
        window: half-width ``D_w`` of the window, in positions (Luong's ``D``).
        sigma: standard deviation of the Gaussian; default ``window / 2`` (the paper's).
        renormalize: divide by the sum after the Gaussian (off in the paper).
    """

    gaussian: bool = True

    def __init__(self, query_dim: int, key_dim: int,
                 score: Callable[[int, int], Attention] = GeneralAttention, window: int = 2,
                 sigma: float | None = None, renormalize: bool = False) -> None:
        super().__init__(query_dim, key_dim)
        if window < 1:
            raise ValueError(f"window (Luong et al.'s half-width D) must be >= 1, got {window}")
        self.window = window
        self.sigma = window / 2.0 if sigma is None else float(sigma)
        self.renormalize = renormalize
        self.align = score(query_dim, key_dim)

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor | None:
        return self.align.project_keys(keys)

    def score(
        self, query: torch.Tensor, keys: torch.Tensor, proj_keys: torch.Tensor | None
    ) -> torch.Tensor:
        return self.align.score(query, keys, proj_keys)

    def offsets(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None,
                step: int | None) -> torch.Tensor:
        """Signed distance of each position's coordinate from the centre, ``(B, L, k)``
        with ``k = 1`` (sequence) or ``2`` (grid)."""
        raise NotImplementedError

    def forward(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        proj_keys: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        step: int | None = None,
    ) -> torch.Tensor:
        if proj_keys is None:
            proj_keys = self.project_keys(keys)
        delta = self.offsets(query, keys, mask, step)  # (B, L, k)
        in_window = (delta.detach().abs() <= self.window).all(dim=-1)  # (B, L)
        valid = in_window if mask is None else in_window & mask
        fell_back = None
        if mask is not None:  # a window over padding only: fall back to all valid positions
            fell_back = ~valid.any(-1, keepdim=True)  # (B, 1)
            valid = torch.where(fell_back, mask, valid)
        alpha = masked_softmax(self.score(query, keys, proj_keys), valid)  # (B, L)
        if self.gaussian:
            gauss = torch.exp(-(delta**2).sum(-1) / (2 * self.sigma**2))  # (B, L)
            weighted = alpha * gauss.to(alpha.dtype)
            if self.renormalize:
                weighted = weighted / weighted.sum(-1, keepdim=True).clamp_min(
                    torch.finfo(alpha.dtype).tiny)
            # a row that fell back keeps the plain weights: its centre lies in the padding, so
            # the Gaussian around it would leave the valid positions almost no weight
            alpha = weighted if fell_back is None else torch.where(fell_back, alpha, weighted)
        return alpha


def _coordinate_dtype(keys: torch.Tensor) -> torch.dtype:
    """Positions, centres and lengths are at least float32: bf16 cannot hold ``s + 1/2`` for
    ``s >= 128`` (nor float16 for ``s >= 1024``), which would move the window's edges."""
    return torch.promote_types(keys.dtype, torch.float32)


def _positions(n: int, keys: torch.Tensor) -> torch.Tensor:
    """Coordinates ``s + 1/2`` of ``n`` positions, ``(n,)`` (:func:`_coordinate_dtype`)."""
    return torch.arange(n, device=keys.device, dtype=_coordinate_dtype(keys)) + 0.5


def _lengths(keys: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Number of valid positions ``S`` of each row, ``(B, 1)`` (:func:`_coordinate_dtype`)."""
    dtype = _coordinate_dtype(keys)
    if mask is None:
        return keys.new_full((keys.shape[0], 1), float(keys.shape[1]), dtype=dtype)
    return mask.sum(-1, keepdim=True).to(dtype)


class LocalMonotonicAttention(_LocalAttention):
    r"""Local attention with monotonic alignment, "local-m" (Luong et al. 2015, Section 3.2)::

        p_t = t   (clamped to the last valid position)

    i.e. step ``t`` attends to positions ``t - D_w .. t + D_w`` (coordinates as in
    :class:`_LocalAttention`: the window is centred on position ``t``), with the score's softmax
    inside the window and no Gaussian, so the weights sum to 1. Needs the decoding step: the
    decoder passes ``step``; a missing ``step`` raises.

    Args:
        query_dim: ``N``.
        key_dim: ``D``.
        score: the aligned score (default :class:`GeneralAttention`).
        window: half-width ``D_w`` of the window.
    """

    gaussian = False

    def __init__(self, query_dim: int, key_dim: int,
                 score: Callable[[int, int], Attention] = GeneralAttention,
                 window: int = 2) -> None:
        super().__init__(query_dim, key_dim, score=score, window=window)

    def offsets(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None,
                step: int | None) -> torch.Tensor:
        if step is None:
            raise ValueError("local-m attention needs the decoding step: call it with step=t")
        last = _lengths(keys, mask) - 1  # (B, 1)
        p = last.clamp(max=float(step)) + 0.5  # (B, 1)
        s = _positions(keys.shape[1], keys)  # (L,)
        return (s.unsqueeze(0) - p).unsqueeze(-1)  # (B, L, 1)


class LocalPredictiveAttention(_LocalAttention):
    r"""Local attention with predictive alignment, "local-p" (Luong et al. 2015, Section 3.2,
    Eqs. 9-10)::

        p_t = S * sigmoid(v_p^T tanh(W_p h_{t-1}))                      (Eq. 9)
        a_t(s) = align(h_{t-1}, a_s) exp(-(s + 1/2 - p_t)^2 / (2 sigma^2))   (Eq. 10)

    with ``align`` the score's softmax over the window ``|s + 1/2 - p_t| <= D_w``,
    ``sigma = D_w / 2`` and ``S`` the number of valid positions of each row. Not renormalised
    (as in the paper) unless ``renormalize``. The valid positions of a masked row must come
    first (right padding, as :class:`~captioner.encoders.text.TextEncoder` pads): ``p_t`` is
    placed in ``[0, S]``.

    Args:
        query_dim: ``N``.
        key_dim: ``D``.
        score: the aligned score (default :class:`GeneralAttention`).
        window: half-width ``D_w`` of the window.
        sigma: Gaussian standard deviation; default ``window / 2``.
        renormalize: divide by the sum after the Gaussian.
        position_dim: ``A``, rows of ``W_p``.
    """

    def __init__(self, query_dim: int, key_dim: int,
                 score: Callable[[int, int], Attention] = GeneralAttention, window: int = 2,
                 sigma: float | None = None, renormalize: bool = False,
                 position_dim: int = 64) -> None:
        super().__init__(query_dim, key_dim, score=score, window=window, sigma=sigma,
                         renormalize=renormalize)
        self.W_p = nn.Linear(query_dim, position_dim, bias=False)
        self.v_p = nn.Linear(position_dim, 1, bias=False)

    def centre(self, query: torch.Tensor, keys: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """Predicted centre ``p_t`` ``(B, 1)`` in ``[0, S]`` (at least float32)."""
        logit = self.v_p(torch.tanh(self.W_p(query)))  # (B, 1)
        return _lengths(keys, mask) * torch.sigmoid(logit.to(_coordinate_dtype(keys)))

    def offsets(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None,
                step: int | None) -> torch.Tensor:
        p = self.centre(query, keys, mask)  # (B, 1)
        s = _positions(keys.shape[1], keys)  # (L,)
        return (s.unsqueeze(0) - p).unsqueeze(-1)  # (B, L, 1)


class LocalAttention2d(_LocalAttention):
    r"""Local-p attention over an ``H x W`` grid of annotations (row-major, ``L = H * W``): the
    2-D analogue of Luong et al. (2015), Section 3.2::

        (p_r, p_c) = (H, W) * sigmoid(V_p tanh(W_p h_{t-1}))          (V_p: 2 x A)
        d_t(r, c)^2 = (r + 1/2 - p_r)^2 + (c + 1/2 - p_c)^2
        a_t(r, c)   = align(h_{t-1}, a_rc) exp(-d_t(r, c)^2 / (2 sigma^2))

    with ``align`` the score's softmax over the square window ``|r + 1/2 - p_r| <= D_w``,
    ``|c + 1/2 - p_c| <= D_w`` and ``sigma = D_w / 2``. Not renormalised (as local-p) unless
    ``renormalize``.

    Args:
        query_dim: ``N``.
        key_dim: ``D``.
        score: the aligned score (default :class:`GeneralAttention`).
        window: half-width ``D_w`` of the window, in cells.
        sigma: Gaussian standard deviation in cells; default ``window / 2``.
        renormalize: divide by the sum after the Gaussian.
        position_dim: ``A``, rows of ``W_p``.
        grid_size: ``(H, W)`` (or ``H`` for a square grid); ``None`` infers a square grid from
            ``L`` at run time.

    Raises:
        ValueError: at run time, when ``L`` is not ``H * W`` (or not a square without
            ``grid_size``).
    """

    def __init__(self, query_dim: int, key_dim: int,
                 score: Callable[[int, int], Attention] = GeneralAttention, window: int = 2,
                 sigma: float | None = None, renormalize: bool = False,
                 position_dim: int = 64, grid_size: int | tuple[int, int] | None = None) -> None:
        super().__init__(query_dim, key_dim, score=score, window=window, sigma=sigma,
                         renormalize=renormalize)
        self.grid_size = (grid_size, grid_size) if isinstance(grid_size, int) else (
            None if grid_size is None else tuple(grid_size))
        self.W_p = nn.Linear(query_dim, position_dim, bias=False)
        self.V_p = nn.Linear(position_dim, 2, bias=False)

    def grid(self, num_positions: int) -> tuple[int, int]:
        """``(H, W)`` for ``L = num_positions`` annotations."""
        if self.grid_size is not None:
            h, w = self.grid_size
            if h * w != num_positions:
                raise ValueError(f"LocalAttention2d was built for a {h} x {w} grid (L = {h * w}) "
                                 f"but got L = {num_positions} annotations")
            return h, w
        side = math.isqrt(num_positions)
        if side * side != num_positions:
            raise ValueError(f"LocalAttention2d cannot infer a square grid from L = "
                             f"{num_positions}; pass grid_size=(H, W)")
        return side, side

    def centre(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Predicted centre ``(p_r, p_c)`` ``(B, 2)`` in ``[0, H] x [0, W]`` (at least
        float32)."""
        h, w = self.grid(keys.shape[1])
        dtype = _coordinate_dtype(keys)
        sig = torch.sigmoid(self.V_p(torch.tanh(self.W_p(query))).to(dtype))  # (B, 2)
        # scaled by Python numbers: no host-to-device copy (a GPU sync) at every step
        return torch.stack([sig[:, 0] * float(h), sig[:, 1] * float(w)], -1)  # (B, 2)

    def offsets(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None,
                step: int | None) -> torch.Tensor:
        h, w = self.grid(keys.shape[1])
        p = self.centre(query, keys)  # (B, 2)
        rows, cols = _positions(h, keys), _positions(w, keys)  # (H,), (W,)
        coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1)  # (H, W, 2)
        coords = coords.reshape(h * w, 2)  # (L, 2), row-major like the annotations
        return coords.unsqueeze(0) - p.unsqueeze(1)  # (B, L, 2)


ATTENTION_REGISTRY: dict[str, type[Attention]] = {
    "additive": AdditiveAttention,
    "concat": AdditiveAttention,
    "dot": DotAttention,
    "general": GeneralAttention,
    "scaled_dot": ScaledDotProductAttention,
    "cosine": CosineAttention,
    "location": LocationAttention,
    "local_m": LocalMonotonicAttention,
    "local_p": LocalPredictiveAttention,
    "local_2d": LocalAttention2d,
    "none": NoAttention,
}


def build_attention(name: str, query_dim: int, key_dim: int, **kwargs) -> Attention:
    """Instantiate a registered score function by name (clear error listing valid names)."""
    if name not in ATTENTION_REGISTRY:
        raise ValueError(f"unknown attention {name!r}; available: {', '.join(sorted(ATTENTION_REGISTRY))}")
    return ATTENTION_REGISTRY[name](query_dim, key_dim, **kwargs)
